//! `/api/status`: the JSON the status page reads (schema in `docs/STATUS.md`), and
//! the traffic samples a background task takes every [`SAMPLE_EVERY`].

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use super::table::{total, Row};
use crate::tunnel::SessionCore;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Five minutes of samples.
pub const SAMPLES_KEPT: usize = 150;

#[derive(Serialize, Debug, Clone)]
pub struct Status {
    /// `gateway` or `agent`.
    pub role: &'static str,
    pub version: &'static str,
    pub uptime_secs: u64,
    pub ready: bool,
    pub readiness: String,
    pub groups: Vec<GroupStatus>,
    pub totals: Totals,
    pub traffic: Traffic,
    /// Present only when a policy is on (gateway): its download quotas in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Vec<crate::policy::QuotaUsage>>,
    /// Agent only: one row per gateway session (gateway address and replica), in any
    /// state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<Vec<super::links::LinkStatus>>,
    /// Present only on a cluster member (gateway): every live node and its agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// `gateway.cluster` as this node sees it.
#[derive(Serialize, Debug, Clone)]
pub struct ClusterStatus {
    pub node_id: String,
    pub member: String,
    pub store_up: bool,
    /// Every live member (this one included), as of its last heartbeat.
    pub nodes: Vec<crate::cluster::NodeInfo>,
}

#[derive(Serialize, Debug, Clone)]
pub struct GroupStatus {
    pub group: String,
    pub agents: Vec<AgentStatus>,
}

#[derive(Serialize, Debug, Clone)]
pub struct AgentStatus {
    pub client_id: String,
    /// The agent's address as the gateway sees it (empty on the agent).
    pub remote: String,
    pub encoding: &'static str,
    pub deflate: bool,
    /// Smoothed heartbeat round trip; null until the first pong.
    pub rtt_ms: Option<f64>,
    pub live_connections: usize,
    pub connections_opened: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connected_secs: u64,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Totals {
    pub agents: usize,
    pub live_connections: usize,
    pub connections_opened: u64,
    pub connections_failed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl AgentStatus {
    pub fn of(client_id: String, remote: String, core: &SessionCore) -> Self {
        let stats = core.stats();
        let s = stats.snapshot();
        AgentStatus {
            client_id,
            remote,
            encoding: core.encoding.as_str(),
            deflate: core.compressed(),
            rtt_ms: core.rtt().map(|d| d.as_secs_f64() * 1e3),
            live_connections: core.active_conns(),
            connections_opened: s.conns_opened,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            connected_secs: stats.started.elapsed().as_secs(),
        }
    }
}

impl Totals {
    /// Fills the counters from the session table (agents are counted by the caller).
    pub fn fill(&mut self, rows: &[Row], connections_failed: u64) {
        let all = total(rows);
        self.live_connections = live_conns(rows);
        self.connections_opened = all.conns_opened;
        self.connections_failed = connections_failed;
        self.bytes_in = all.bytes_in;
        self.bytes_out = all.bytes_out;
    }
}

/// Connections open or being opened on the rows' live sessions.
pub fn live_conns(rows: &[Row]) -> usize {
    rows.iter()
        .flat_map(|r| &r.live)
        .map(|c| c.active_conns())
        .sum()
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Traffic {
    pub interval_secs: u64,
    pub samples: Vec<Sample>,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix time of the end of the interval, seconds.
    pub t: u64,
    /// Bytes in this interval.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub live_connections: usize,
}

/// The last [`SAMPLES_KEPT`] samples, as differences of the running totals.
#[derive(Default)]
pub struct TrafficRing {
    inner: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    last: Option<(u64, u64)>,
    samples: VecDeque<Sample>,
}

pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TrafficRing {
    /// Records the running totals now; the first call only sets the baseline.
    pub fn record(&self, t: u64, bytes_in: u64, bytes_out: u64, live_connections: usize) {
        let mut ring = self.inner.lock();
        if let Some((last_in, last_out)) = ring.last {
            if ring.samples.len() == SAMPLES_KEPT {
                ring.samples.pop_front();
            }
            ring.samples.push_back(Sample {
                t,
                bytes_in: bytes_in.saturating_sub(last_in),
                bytes_out: bytes_out.saturating_sub(last_out),
                live_connections,
            });
        }
        ring.last = Some((bytes_in, bytes_out));
    }

    pub fn traffic(&self) -> Traffic {
        Traffic {
            interval_secs: SAMPLE_EVERY.as_secs(),
            samples: self.inner.lock().samples.iter().copied().collect(),
        }
    }
}

/// `1 agent`, `2 agents`: counts as an operator reads them.
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_differences_and_drops_the_oldest() {
        let r = TrafficRing::default();
        r.record(1, 100, 10, 0);
        assert!(r.traffic().samples.is_empty());
        r.record(3, 150, 30, 2);
        assert_eq!(
            r.traffic().samples,
            vec![Sample {
                t: 3,
                bytes_in: 50,
                bytes_out: 20,
                live_connections: 2
            }]
        );
        for i in 0..SAMPLES_KEPT as u64 + 5 {
            r.record(10 + i, 200 + i, 40, 0);
        }
        let s = r.traffic().samples;
        assert_eq!(s.len(), SAMPLES_KEPT);
        assert_eq!(s.last().unwrap().bytes_in, 1);
    }
}
