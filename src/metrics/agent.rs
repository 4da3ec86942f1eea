//! The agent's metrics and status: its sessions (one per replica and gateway address,
//! [`Links`]) and the connects it refused or could not dial, by error code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyproxy_proto::ErrorCode;
use prometheus_client::encoding::DescriptorEncoder;
use tokio_util::sync::CancellationToken;

use super::admin::{base_status, Observed};
use super::encode::{counters, gauges, labels};
use super::links::Links;
use super::status::{live_conns, AgentStatus, GroupStatus, Status, TrafficRing};
use super::table::{total, SessionTable};
use crate::tunnel::stats::bump;

pub struct AgentMetrics {
    pub sessions: Arc<SessionTable>,
    /// Every gateway session, whatever its state.
    pub links: Arc<Links>,
    /// Cancelled when the agent starts shutting down (readiness).
    pub stopping: CancellationToken,
    started: Instant,
    traffic: TrafficRing,
    refused: [AtomicU64; ErrorCode::ALL.len()],
    /// `not_after` (Unix seconds) of the certificate each gateway presented last, by
    /// gateway name; the configuration bounds the names.
    gateway_cert_expiry: parking_lot::Mutex<std::collections::BTreeMap<String, i64>>,
    /// Every datagram flow this agent serves.
    pub udp: Arc<crate::tunnel::datagram::UdpStats>,
    /// Configuration reloads (SIGHUP).
    pub reloads: super::gateway::Reloads,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            sessions: Arc::default(),
            links: Arc::default(),
            stopping: CancellationToken::new(),
            started: Instant::now(),
            traffic: TrafficRing::default(),
            refused: Default::default(),
            gateway_cert_expiry: Default::default(),
            udp: Arc::default(),
            reloads: Default::default(),
        }
    }
}

impl AgentMetrics {
    /// The certificate `gateway` presented expires at `not_after`; true when that is
    /// news (a first handshake, or a rotated certificate).
    pub fn gateway_cert_seen(&self, gateway: &str, not_after: i64) -> bool {
        self.gateway_cert_expiry
            .lock()
            .insert(gateway.to_owned(), not_after)
            != Some(not_after)
    }

    /// A `connect` was refused or its dial failed with `code`.
    pub fn connect_refused(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            bump(&self.refused[i], 1);
        }
    }
}

impl Observed for AgentMetrics {
    fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        super::tunnel::encode(enc, &self.sessions.rows())?;
        super::udp::encode(enc, &self.udp)?;
        self.reloads.encode(enc)?;
        let links = self.links.status();
        let link = |l: &super::links::LinkStatus| {
            labels([
                ("gateway", l.gateway.as_str()),
                ("address", l.address.as_deref().unwrap_or("")),
                ("replica", &l.replica.to_string()),
            ])
        };
        let up: Vec<_> = links
            .iter()
            .map(|l| {
                let connected = l.state == super::links::LinkState::Connected;
                (link(l), f64::from(u8::from(connected)))
            })
            .collect();
        gauges(
            enc,
            "agent_gateway_session_up",
            "1 when this gateway session (one per gateway address and replica) is authenticated",
            &up,
        )?;
        let reconnects: Vec<_> = links.iter().map(|l| (link(l), l.reconnects)).collect();
        counters(
            enc,
            "agent_gateway_reconnects",
            "Gateway sessions ended or attempts failed, per gateway address and replica",
            &reconnects,
        )?;
        let refused: Vec<_> = ErrorCode::ALL
            .iter()
            .zip(&self.refused)
            .map(|(c, n)| (labels([("code", c.as_str())]), n.load(Ordering::Relaxed)))
            .collect();
        counters(
            enc,
            "agent_connects_refused",
            "connect requests refused or not dialed, by the error code sent to the gateway",
            &refused,
        )?;
        let expiry: Vec<_> = self
            .gateway_cert_expiry
            .lock()
            .iter()
            .map(|(g, t)| (labels([("role", "peer"), ("gateway", g)]), *t as f64))
            .collect();
        gauges(
            enc,
            "tls_cert_expiry_timestamp_seconds",
            "When the certificate each gateway presented at its last handshake expires (Unix seconds)",
            &expiry,
        )
    }

    fn readiness(&self) -> (bool, String) {
        if self.stopping.is_cancelled() {
            return (false, "not ready: shutting down".into());
        }
        match self.sessions.live_sessions() {
            0 => (false, "not ready: no authenticated session".into()),
            n => (
                true,
                format!(
                    "ready: {}",
                    super::status::counted(n, "session", "sessions")
                ),
            ),
        }
    }

    fn status(&self) -> Status {
        let mut status = base_status("agent", self, self.started);
        let rows = self.sessions.rows();
        // One entry per authenticated gateway session, `remote` = the gateway address.
        let agents: Vec<_> = self
            .links
            .live()
            .into_iter()
            .map(|l| {
                let remote = l.address.map_or(l.gateway.to_string(), |a| a.to_string());
                AgentStatus::of(l.client_id, remote, &l.core)
            })
            .collect();
        status.totals.agents = agents.len();
        if let Some(group) = rows.first().map(|r| r.group.to_string()) {
            if !agents.is_empty() {
                status.groups.push(GroupStatus { group, agents });
            }
        }
        status.gateways = Some(self.links.status());
        let refused = self.refused.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        status.totals.fill(&rows, refused);
        status
    }

    fn running_totals(&self) -> (u64, u64, usize) {
        let rows = self.sessions.rows();
        let all = total(&rows);
        (all.bytes_in, all.bytes_out, live_conns(&rows))
    }

    fn traffic(&self) -> &TrafficRing {
        &self.traffic
    }
}
