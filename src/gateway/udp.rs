//! UDP on the gateway: the [`DatagramConnector`] that opens datagram flows through the
//! agents of a user's group (behind the limits, which count each flow as a
//! connection), and the UDP forwards (`forwards` with `protocol: udp`): one flow per
//! client address, to the forward's target.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::ErrorCode;
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::registry::AgentRegistry;
use super::MAX_ATTEMPTS;
use crate::auth::Identity;
use crate::connect::{ConnectError, Requester};
use crate::limits::Limits;
use crate::net::HostPort;
use crate::proxy::socks5_udp::{
    DatagramConnector, DatagramUpstream, Destination, OpenFuture, Reply, Route, UdpSupport,
    MAX_FLOWS_PER_ASSOCIATION,
};
use crate::tunnel::datagram::{DatagramLimits, DropReason, UdpStats, MAX_UDP_PAYLOAD};
use crate::tunnel::OpenError;

/// Opens datagram flows through the least-loaded live agent of the user's group,
/// once the limits admitted the flow.
pub struct TunnelDatagrams {
    pub registry: Arc<AgentRegistry>,
    pub limits: Arc<Limits>,
    pub connect_timeout: Duration,
    pub flow_limits: DatagramLimits,
    pub stats: Arc<UdpStats>,
}

impl TunnelDatagrams {
    async fn open_flow(
        &self,
        target: &HostPort,
        who: &Requester,
    ) -> Result<DatagramUpstream, ConnectError> {
        target.validate()?;
        let grant = self.limits.admit(who).await?;
        let mut tried = Vec::with_capacity(MAX_ATTEMPTS);
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(agent) = self.registry.pick(&who.group, &tried) else {
                break;
            };
            tried.push(agent.serial);
            let opened = agent
                .core
                .open_datagram(
                    &target.host,
                    target.port,
                    self.connect_timeout,
                    self.flow_limits,
                    self.stats.clone(),
                )
                .await;
            match opened {
                Ok(flow) => return Ok(DatagramUpstream { flow, grant }),
                Err(OpenError::SessionClosed) => {}
                Err(OpenError::Failed(f)) if f.code == ErrorCode::RateLimited => {
                    last = Some(ConnectError::from(f));
                }
                Err(e) => return Err(ConnectError::from(e)),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::NoAgent(who.group.to_string())))
    }
}

impl DatagramConnector for TunnelDatagrams {
    fn open<'a>(&'a self, target: &'a HostPort, who: &'a Requester) -> OpenFuture<'a> {
        Box::pin(self.open_flow(target, who))
    }
}

/// Serves one UDP forward on `socket` until `stop`: each client address is one flow
/// to `target` through an agent of `group`, ended after the idle timeout.
pub async fn serve_forward(
    socket: UdpSocket,
    group: Arc<str>,
    target: HostPort,
    support: Arc<UdpSupport>,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let flows_stop = stop.child_token();
    let _end_flows = flows_stop.clone().drop_guard();
    let mut clients: HashMap<SocketAddr, Destination> = HashMap::new();
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    loop {
        let (n, src) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // An ICMP error for an earlier reply: the client is gone, UDP carries on.
                Err(_) => continue,
            },
            _ = stop.cancelled() => return,
        };
        if clients.get(&src).is_none_or(Destination::is_gone) {
            clients.retain(|_, c| !c.is_gone());
            if clients.len() >= MAX_FLOWS_PER_ASSOCIATION * 16 {
                support.stats.dropped(DropReason::Refused);
                continue;
            }
            let who = Requester::new(
                src,
                Identity {
                    user: None,
                    group: group.clone(),
                },
            );
            let route = Route {
                proto: "forward-udp",
                target: target.clone(),
                header: Bytes::new(),
                who: Arc::new(who),
                reply: Reply::To(src),
            };
            let dest =
                Destination::spawn(route, support.clone(), socket.clone(), flows_stop.clone());
            clients.insert(src, dest);
        }
        if let Some(c) = clients.get(&src) {
            c.push(Bytes::copy_from_slice(&buf[..n]), &support.stats);
        }
    }
}
