//! The agent's metrics and status: its sessions (one per replica) and the connects
//! it refused or could not dial, by error code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyproxy_proto::ErrorCode;
use prometheus_client::encoding::DescriptorEncoder;
use tokio_util::sync::CancellationToken;

use super::admin::{base_status, Observed};
use super::encode::{counters, labels};
use super::status::{live_conns, AgentStatus, GroupStatus, Status, TrafficRing};
use super::table::{total, SessionTable};
use crate::tunnel::stats::bump;

pub struct AgentMetrics {
    pub sessions: Arc<SessionTable>,
    /// Cancelled when the agent starts shutting down (readiness).
    pub stopping: CancellationToken,
    started: Instant,
    traffic: TrafficRing,
    refused: [AtomicU64; ErrorCode::ALL.len()],
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            sessions: Arc::default(),
            stopping: CancellationToken::new(),
            started: Instant::now(),
            traffic: TrafficRing::default(),
            refused: Default::default(),
        }
    }
}

impl AgentMetrics {
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
        )
    }

    fn readiness(&self) -> (bool, String) {
        if self.stopping.is_cancelled() {
            return (false, "not ready: shutting down".into());
        }
        match self.sessions.live_sessions() {
            0 => (false, "not ready: no authenticated session".into()),
            n => (true, format!("ready: {n} sessions")),
        }
    }

    fn status(&self) -> Status {
        let mut status = base_status("agent", self, self.started);
        let rows = self.sessions.rows();
        for r in &rows {
            let agents: Vec<_> = r
                .live
                .iter()
                .map(|core| AgentStatus::of(r.agent.to_string(), String::new(), core))
                .collect();
            if agents.is_empty() {
                continue;
            }
            status.totals.agents += agents.len();
            match status.groups.iter_mut().find(|g| *g.group == *r.group) {
                Some(g) => g.agents.extend(agents),
                None => status.groups.push(GroupStatus {
                    group: r.group.to_string(),
                    agents,
                }),
            }
        }
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
