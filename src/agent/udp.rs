//! The agent's side of a datagram flow (`connect` with `protocol: udp`): one UDP
//! socket per flow, connected to the first address of the target that passed the ACL
//! (the name and every resolved address, as for TCP), closed after
//! `udp_idle_timeout` without a datagram either way.

use std::sync::Arc;
use std::time::Instant;

use anyproxy_proto::{Connect, ConnectResponse, ErrorCode, Message};

use super::Agent;
use crate::connect::Access;
use crate::dial::{self, DialError};
use crate::net::HostPort;
use crate::tunnel::datagram::{relay_connected, DatagramLimits, FlowEnd};
use crate::tunnel::{RelayEnd, RelayStats, SessionCore};

impl Agent {
    /// The flow's limits, from the configuration.
    fn datagram_limits(&self) -> DatagramLimits {
        DatagramLimits {
            max_datagram: self.config.udp_max_datagram.0 as usize,
            ..DatagramLimits::default()
        }
    }

    /// Serves one UDP `connect` until its flow ends. An error is the refusal to send
    /// (nothing was told to the gateway yet).
    pub(super) async fn serve_udp(
        &self,
        core: &Arc<SessionCore>,
        c: &Connect,
    ) -> Result<(), DialError> {
        let id = c.id;
        // Registered before resolving, so that a `close` from the gateway (it gave up
        // waiting) ends this flow instead of leaving an orphan.
        let Some(mut flow) =
            core.register_datagram(id, self.datagram_limits(), self.metrics.udp.clone())
        else {
            return Err(DialError {
                code: ErrorCode::InvalidMessage,
                message: format!("connection id {id} is already in use"),
            });
        };
        let opened = dial::udp::open(
            &self.live.rules().acl,
            &c.host,
            c.port,
            self.config.dial_timeout.0,
        )
        .await;
        let (socket, addr) = match opened {
            Ok(x) => x,
            Err(e) => {
                flow.discard();
                return Err(e);
            }
        };
        if !flow.is_live() {
            return Ok(());
        }
        let ok = core
            .send(Message::ConnectResponse(ConnectResponse {
                id,
                success: true,
                message: format!("udp flow open to {addr}"),
            }))
            .await;
        if ok.is_err() {
            return Ok(());
        }
        flow.established();
        let started = Instant::now();
        let end = relay_connected(&socket, &flow, self.config.udp_idle_timeout.0).await;
        let t = flow.totals();
        let target = HostPort::new(c.host.clone(), c.port);
        // The user's point of view, as for TCP: what the target sent is what the user
        // received.
        Access::new("agent-udp")
            .target(&target)
            .conn(id)
            .since(started)
            .datagrams(t.received, t.sent)
            .relayed(RelayStats {
                sent: t.received_bytes,
                received: t.sent_bytes,
                ended_by: (end == FlowEnd::Idle).then_some(RelayEnd::IdleTimeout),
            });
        tracing::debug!(conn = %id, reason = end.as_str(), dropped = t.dropped, "udp flow ended");
        flow.close(end.as_str()).await;
        Ok(())
    }
}
