//! `gateway.cluster`: several gateways sharing their limits, lockouts, bandwidth
//! budgets and PMProxy state through one Redis. Absent, a gateway keeps all of it in
//! memory, as a single process.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::net::{HumanDuration, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://[user:pass@]host:port/db`, or `rediss://` for TLS.
    pub redis: String,
    /// The Redis password, when it is not in the URL (keeps it out of logs of the URL).
    #[serde(default)]
    pub redis_password: Option<Secret>,
    /// PEM CA the Redis server's certificate must chain to (`rediss://` only); without
    /// it, the system's trust store.
    #[serde(default)]
    pub redis_ca: Option<PathBuf>,
    /// This gateway's name in the cluster view; default: the host name and the port of
    /// `listen_addr`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Prefix of every key, so that several clusters can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long a node's registration lives without a heartbeat. A node that dies
    /// without leaving holds its connection slots at most this long (plus one
    /// heartbeat period); it renews every third of it.
    #[serde(default = "default_lease")]
    pub lease: HumanDuration,
    /// The longest any one store operation may take before the decision is taken
    /// without the store.
    #[serde(default = "default_store_timeout")]
    pub timeout: HumanDuration,
    /// What a decision does while the store is unreachable.
    #[serde(default)]
    pub on_store_failure: StoreFailureMode,
    /// Bandwidth budgets: the share of a user's or group's per-second budget one node
    /// leases from the store at a time, in the background (no read waits on the store);
    /// the store's bucket also holds at most one slice. Bigger slices mean fewer round
    /// trips (about `1 / budget_slice` per second per busy budget and node) and a bigger
    /// burst: over any `t` seconds a budget moves at most `rate × t + (nodes + 1) ×
    /// slice` bytes across the cluster (configure the budgets alike on every node).
    #[serde(default = "default_budget_slice")]
    pub budget_slice: f64,
}

/// `on_store_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFailureMode {
    /// Decide with this node's own view (its local caps, lockouts and quotas): users
    /// keep working, and a cap holds per node instead of per cluster until the store
    /// is back. Bandwidth budgets pace each node at the full rate by its own clock.
    /// The default: a Redis outage must not become a proxy outage.
    #[default]
    Open,
    /// Refuse what needs the store (new proxy connections under a cap, logins):
    /// for deployments where a cap is a contract. Bandwidth budgets pace each node at
    /// the rate divided by the members it last saw, so that the budget still holds
    /// (unless members joined during the outage): live traffic is slowed, not stopped.
    Closed,
}

impl ClusterConfig {
    pub fn lease(&self) -> Duration {
        self.lease.0
    }
}

pub(super) fn validate(c: &ClusterConfig) -> Result<(), String> {
    if !(c.redis.starts_with("redis://") || c.redis.starts_with("rediss://")) {
        return Err("gateway.cluster.redis must be a redis:// or rediss:// URL".into());
    }
    if c.lease.0 < Duration::from_secs(1) {
        return Err("gateway.cluster.lease must be at least 1s".into());
    }
    if c.timeout.0.is_zero() || c.timeout.0 >= c.lease.0 {
        return Err("gateway.cluster.timeout must be above zero and below the lease".into());
    }
    if !(c.budget_slice > 0.0 && c.budget_slice <= 1.0) {
        return Err("gateway.cluster.budget_slice must be in (0, 1]".into());
    }
    if c.key_prefix.is_empty() || c.key_prefix.contains(char::is_whitespace) {
        return Err("gateway.cluster.key_prefix must be a non-empty word".into());
    }
    Ok(())
}

fn default_key_prefix() -> String {
    "anyproxy".into()
}

fn default_lease() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_store_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}

fn default_budget_slice() -> f64 {
    0.1
}
