//! The gateway's metrics and status: agents from the registry, tunnel counters from
//! the session table, and the few per-event counters (auth, failed connects) that
//! happen at most once per connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;
use tokio_util::sync::CancellationToken;

use super::admin::{base_status, Observed};
use super::encode::{counters, gauges, histograms, labels};
use super::status::{live_conns, AgentStatus, ClusterStatus, GroupStatus, Status, TrafficRing};
use super::table::{total, SessionTable};
use crate::connect::{ConnectError, Connector, Requester, Upstream};
use crate::limits::Limits;
use crate::net::HostPort;
use crate::transport::listen::ProxyProtocol;
use crate::tunnel::stats::bump;

/// One live agent session, as `/metrics` and the status page show it.
pub struct AgentSession {
    pub client_id: String,
    pub remote: std::net::SocketAddr,
    pub core: Arc<crate::tunnel::SessionCore>,
}

/// The gateway's live agent sessions; its registry implements it. A trait, so that
/// metrics reads the registry without depending on the gateway that owns it.
pub trait AgentDirectory: Send + Sync {
    /// Every group's live sessions, groups sorted.
    fn sessions(&self) -> Vec<(Arc<str>, Vec<AgentSession>)>;
    /// How many sessions are live.
    fn live(&self) -> usize;
}

/// (group, error code, reason) of a failed proxy request.
type FailKey = (Arc<str>, &'static str, &'static str);

/// Users listed per quota manager on the status page, most used first: the page is
/// polled every second or two, so it must not grow with the user base.
pub const QUOTA_ROWS: usize = 100;

pub struct GatewayMetrics {
    pub sessions: Arc<SessionTable>,
    registry: Arc<dyn AgentDirectory>,
    /// Cancelled when the gateway stops accepting (readiness).
    accepting: CancellationToken,
    started: Instant,
    traffic: TrafficRing,
    auth_failures: AtomicU64,
    auth_lockouts: AtomicU64,
    auth_refused_locked: AtomicU64,
    /// Failed proxy requests by (group, code, reason); groups come from the
    /// configuration, so the key space is bounded.
    failed: Mutex<BTreeMap<FailKey, u64>>,
    /// The policy whose quotas the status shows; set once it is loaded.
    policy: std::sync::OnceLock<Arc<crate::policy::Policy>>,
    /// Connection caps, proxy-auth lockout and bandwidth caps, with their counters.
    limits: Arc<Limits>,
    /// The cluster this gateway is a member of, if any.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// The listeners' PROXY protocol stage, whose refusals are counted by reason.
    proxy_protocol: std::sync::OnceLock<Arc<ProxyProtocol>>,
    /// The named authentication backends' counters.
    auth_backends: std::sync::OnceLock<Vec<Arc<crate::auth::BackendStats>>>,
    /// Configuration reloads and the certificate's expiry.
    pub reloads: Reloads,
    /// What `POST /reload` runs, once the process knows its configuration file.
    reload: std::sync::OnceLock<ReloadHook>,
    /// Every datagram flow of the SOCKS5 listener and the UDP forwards.
    pub udp: Arc<crate::tunnel::datagram::UdpStats>,
}

/// Reloads the configuration; the error in words.
pub type ReloadHook = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Reloads by result, the last success, and the expiry of the certificate served.
#[derive(Default)]
pub struct Reloads {
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// Unix seconds of the last successful reload; 0 = none yet.
    last_success: std::sync::atomic::AtomicI64,
    /// Unix seconds of the served certificate's `not_after`; 0 = not known.
    tls_expiry: std::sync::atomic::AtomicI64,
}

impl Reloads {
    pub fn succeeded(&self, at_unix: i64) {
        bump(&self.succeeded, 1);
        self.last_success.store(at_unix, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        bump(&self.failed, 1);
    }

    /// Runs one reload between systemd's `RELOADING=1` and `READY=1`, counts its
    /// result, and logs a failure (the running configuration stays).
    pub fn run<E: std::fmt::Display>(
        &self,
        reload: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        use crate::net::notify::{notify, State};
        notify(State::Reloading);
        let result = reload();
        notify(State::Ready);
        match &result {
            Ok(()) => self.succeeded(crate::transport::tls::unix_now()),
            Err(e) => {
                self.failed();
                tracing::error!(error = %e, "reload failed; the running configuration stays");
            }
        }
        result
    }

    pub fn tls_expiry(&self, not_after_unix: i64) {
        self.tls_expiry.store(not_after_unix, Ordering::Relaxed);
    }

    pub(super) fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counters(
            enc,
            "config_reload",
            "Configuration reloads (SIGHUP), by result",
            &[
                (labels([("result", "success")]), load(&self.succeeded)),
                (labels([("result", "failure")]), load(&self.failed)),
            ],
        )?;
        let last = self.last_success.load(Ordering::Relaxed);
        if last > 0 {
            gauges(
                enc,
                "config_last_reload_success_timestamp_seconds",
                "When the configuration was last reloaded successfully (Unix seconds)",
                &[(vec![], last as f64)],
            )?;
        }
        let expiry = self.tls_expiry.load(Ordering::Relaxed);
        if expiry > 0 {
            gauges(
                enc,
                "tls_cert_expiry_timestamp_seconds",
                "When the certificate served to agents expires (Unix seconds)",
                &[(labels([("role", "gateway")]), expiry as f64)],
            )?;
        }
        Ok(())
    }
}

/// A short, stable name for why a connect failed (the metric's `reason` label).
pub fn reason(e: &ConnectError) -> &'static str {
    match e {
        ConnectError::NoAgent(_) => "no_agent",
        ConnectError::Forbidden(_) => "forbidden",
        ConnectError::Refused(_) => "refused",
        ConnectError::Unreachable(_) => "unreachable",
        ConnectError::TimedOut(_) => "timed_out",
        ConnectError::RateLimited(_) => "rate_limited",
        ConnectError::Internal(_) => "internal",
        ConnectError::InvalidTarget(_) => "invalid_target",
    }
}

impl GatewayMetrics {
    pub fn new(
        registry: Arc<dyn AgentDirectory>,
        accepting: CancellationToken,
        limits: Arc<Limits>,
    ) -> Self {
        GatewayMetrics {
            sessions: Arc::default(),
            registry,
            accepting,
            started: Instant::now(),
            traffic: TrafficRing::default(),
            auth_failures: AtomicU64::new(0),
            auth_lockouts: AtomicU64::new(0),
            auth_refused_locked: AtomicU64::new(0),
            failed: Mutex::default(),
            policy: std::sync::OnceLock::new(),
            limits,
            cluster: std::sync::OnceLock::new(),
            proxy_protocol: std::sync::OnceLock::new(),
            auth_backends: std::sync::OnceLock::new(),
            reloads: Reloads::default(),
            reload: std::sync::OnceLock::new(),
            udp: Arc::default(),
        }
    }

    /// Lets `POST /reload` on the admin listener run `hook`.
    pub fn enable_reload(&self, hook: ReloadHook) {
        let _ = self.reload.set(hook);
    }

    /// Shows the cluster's nodes on `/api/status`, and its store's health as metrics.
    pub fn show_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// Shows this policy's quotas on `/api/status` from now on.
    pub fn show_policy(&self, policy: Arc<crate::policy::Policy>) {
        let _ = self.policy.set(policy);
    }

    /// Counts this PROXY protocol stage's refusals on `/metrics` from now on.
    pub fn show_proxy_protocol(&self, pp: Arc<ProxyProtocol>) {
        let _ = self.proxy_protocol.set(pp);
    }

    /// Shows these authentication backends' `up`, latency and errors on `/metrics`.
    pub fn show_auth_backends(&self, stats: Vec<Arc<crate::auth::BackendStats>>) {
        let _ = self.auth_backends.set(stats);
    }

    /// An agent failed to authenticate; `locked` when this failure locked its IP out.
    pub fn auth_failed(&self, locked: bool) {
        bump(&self.auth_failures, 1);
        if locked {
            bump(&self.auth_lockouts, 1);
        }
    }

    /// An agent was refused because its IP is locked out.
    pub fn auth_refused_locked(&self) {
        bump(&self.auth_refused_locked, 1);
    }

    pub fn connect_failed(&self, group: &Arc<str>, e: &ConnectError) {
        *self
            .failed
            .lock()
            .entry((group.clone(), e.code().as_str(), reason(e)))
            .or_default() += 1;
    }

    fn failed_total(&self) -> u64 {
        self.failed.lock().values().sum()
    }
}

impl Observed for GatewayMetrics {
    fn reload(&self) -> Option<Result<(), String>> {
        self.reload.get().map(|hook| hook())
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.sessions.rows();
        super::tunnel::encode(enc, &rows)?;
        super::udp::encode(enc, &self.udp)?;

        let mut agents: BTreeMap<(Arc<str>, &'static str, bool), f64> = BTreeMap::new();
        for (group, handles) in self.registry.sessions() {
            for h in handles {
                *agents
                    .entry((group.clone(), h.core.encoding.as_str(), h.core.compressed()))
                    .or_default() += 1.0;
            }
        }
        let agents: Vec<_> = agents
            .into_iter()
            .map(|((g, e, d), n)| {
                let deflate = if d { "true" } else { "false" };
                (
                    labels([("group", &g), ("encoding", e), ("deflate", deflate)]),
                    n,
                )
            })
            .collect();
        gauges(
            enc,
            "gateway_agents",
            "Agent sessions taking connections, by group, encoding and deflate",
            &agents,
        )?;
        let failed: Vec<_> = self
            .failed
            .lock()
            .iter()
            .map(|((g, c, r), n)| (labels([("group", g), ("code", c), ("reason", r)]), *n))
            .collect();
        counters(
            enc,
            "gateway_connections_failed",
            "Proxy requests that could not be connected, by group, error code and reason",
            &failed,
        )?;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counters(
            enc,
            "gateway_auth_failures",
            "Failed agent authentications",
            &[(vec![], load(&self.auth_failures))],
        )?;
        counters(
            enc,
            "gateway_auth_lockouts",
            "Source IPs locked out after repeated agent authentication failures",
            &[(vec![], load(&self.auth_lockouts))],
        )?;
        counters(
            enc,
            "gateway_auth_refused_locked",
            "Agent authentications refused because the source IP was locked out",
            &[(vec![], load(&self.auth_refused_locked))],
        )?;
        // Every reason from the start, zero until a listener with `proxy_protocol`
        // refuses a connection.
        let refused: Vec<_> = match self.proxy_protocol.get() {
            Some(pp) => pp.refused().collect(),
            None => crate::transport::proxy_header::HeaderError::REASONS
                .iter()
                .map(|r| (*r, 0))
                .collect(),
        };
        counters(
            enc,
            "gateway_proxy_protocol_refused",
            "Connections refused by the PROXY protocol stage of a listener with proxy_protocol, by reason",
            &refused
                .iter()
                .map(|(r, n)| (labels([("reason", r)]), *n))
                .collect::<Vec<_>>(),
        )?;
        encode_limits(enc, &self.limits)?;
        if let Some(policy) = self.policy.get() {
            encode_quotas(enc, &policy.quota_usage(QUOTA_ROWS))?;
        }
        if let Some(backends) = self.auth_backends.get() {
            encode_auth_backends(enc, backends)?;
        }
        self.reloads.encode(enc)?;
        match self.cluster.get() {
            Some(c) => encode_cluster(enc, c),
            None => Ok(()),
        }
    }

    fn readiness(&self) -> (bool, String) {
        if self.accepting.is_cancelled() {
            return (false, "not ready: shutting down".into());
        }
        match self.registry.live() {
            0 => (false, "not ready: no agent connected".into()),
            n => (
                true,
                format!("ready: {}", super::status::counted(n, "agent", "agents")),
            ),
        }
    }

    fn status(&self) -> Status {
        let mut status = base_status("gateway", self, self.started);
        for (group, handles) in self.registry.sessions() {
            let agents = handles
                .iter()
                .map(|h| AgentStatus::of(h.client_id.clone(), h.remote.to_string(), &h.core))
                .collect::<Vec<_>>();
            status.totals.agents += agents.len();
            status.groups.push(GroupStatus {
                group: group.to_string(),
                agents,
            });
        }
        let rows = self.sessions.rows();
        status.totals.fill(&rows, self.failed_total());
        status.quotas = self.policy.get().map(|p| p.quota_usage(QUOTA_ROWS));
        status.cluster = self.cluster.get().map(|c| ClusterStatus {
            node_id: c.node_id.clone(),
            member: c.member.clone(),
            store_up: c.store.health.is_up(),
            nodes: c.view(),
        });
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

/// `gateway.limits`: refusals by kind, the proxy-auth lockout, bandwidth waits. The
/// families are there even when no limit is configured (all zero), so dashboards and
/// alerts need not know the configuration.
fn encode_limits(enc: &mut DescriptorEncoder, limits: &Limits) -> Result<(), std::fmt::Error> {
    let s = &limits.stats;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let kind = |k: &str, a: &AtomicU64| (labels([("kind", k)]), load(a));
    counters(
        enc,
        "limit_refused",
        "Connections refused by gateway.limits, by which cap refused them",
        &[
            kind("user_concurrent", &s.user_concurrent),
            kind("user_rate", &s.user_rate),
            kind("ip_concurrent", &s.ip_concurrent),
            kind("ip_rate", &s.ip_rate),
            kind("table_full", &s.table_full),
        ],
    )?;
    let scope = |k: &str, a: &AtomicU64| (labels([("scope", k)]), load(a));
    counters(
        enc,
        "limit_paced",
        "Reads and writes that waited for a bandwidth budget, by the budget's scope",
        &[scope("user", &s.paced_user), scope("group", &s.paced_group)],
    )?;
    counters(
        enc,
        "proxy_auth_failures",
        "Wrong proxy credentials (HTTP and SOCKS5), counted while gateway.limits.proxy_auth is set",
        &[(vec![], load(&s.proxy_auth_failures))],
    )?;
    counters(
        enc,
        "proxy_auth_lockouts",
        "Source addresses locked out after repeated wrong proxy credentials",
        &[(vec![], load(&s.proxy_auth_lockouts))],
    )?;
    counters(
        enc,
        "proxy_auth_refused_locked",
        "Proxy authentications refused unchecked because the address was locked out",
        &[(vec![], load(&s.proxy_auth_refused_locked))],
    )?;
    gauges(
        enc,
        "proxy_auth_locked_addresses",
        "Source addresses locked out of proxy authentication now",
        &[(vec![], limits.proxy_auth_locked() as f64)],
    )
}

/// `gateway.auth_backends`: whether each backend answered its last check, how long
/// its checks take (cached answers not included), and how many could not be answered.
fn encode_auth_backends(
    enc: &mut DescriptorEncoder,
    backends: &[Arc<crate::auth::BackendStats>],
) -> Result<(), std::fmt::Error> {
    if backends.is_empty() {
        return Ok(());
    }
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let who = |b: &crate::auth::BackendStats| labels([("backend", &b.name), ("type", b.kind)]);
    gauges(
        enc,
        "auth_backend_up",
        "1 when the authentication backend answered its last check (allow or deny), 0 when it could not",
        &backends
            .iter()
            .map(|b| (who(b), f64::from(u8::from(b.up.load(Ordering::Relaxed)))))
            .collect::<Vec<_>>(),
    )?;
    counters(
        enc,
        "auth_backend_checks",
        "Checks asked of the authentication backend (cached answers not included)",
        &backends
            .iter()
            .map(|b| (who(b), load(&b.checks)))
            .collect::<Vec<_>>(),
    )?;
    counters(
        enc,
        "auth_backend_errors",
        "Checks the authentication backend could not answer (down, timeout, bad answer)",
        &backends
            .iter()
            .map(|b| (who(b), load(&b.errors)))
            .collect::<Vec<_>>(),
    )?;
    let snapshots: Vec<_> = backends
        .iter()
        .map(|b| crate::tunnel::stats::HistogramSnapshot {
            bounds: &crate::auth::chain::LATENCY_BUCKETS,
            counts: b.latency.iter().map(load).collect(),
            sum_us: load(&b.latency_sum_us),
        })
        .collect();
    histograms(
        enc,
        "auth_backend_latency_seconds",
        "How long the authentication backend took to answer a check",
        &backends
            .iter()
            .zip(&snapshots)
            .map(|(b, s)| (who(b), s))
            .collect::<Vec<_>>(),
    )
}

/// `gateway.cluster`: the store's health and what was decided without it.
fn encode_cluster(
    enc: &mut DescriptorEncoder,
    cluster: &crate::cluster::Cluster,
) -> Result<(), std::fmt::Error> {
    let h = &cluster.store.health;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    gauges(
        enc,
        "cluster_store_up",
        "1 while the cluster store (Redis) answers, 0 while it does not",
        &[(vec![], if h.is_up() { 1.0 } else { 0.0 })],
    )?;
    counters(
        enc,
        "cluster_decisions_without_store",
        "Decisions (caps, lockouts, quotas, bandwidth leases) taken without the store because it did not answer",
        &[(vec![], load(&h.decisions_without_store))],
    )?;
    counters(
        enc,
        "cluster_store_errors",
        "Store operations that failed or timed out",
        &[(vec![], load(&h.errors))],
    )?;
    counters(
        enc,
        "cluster_store_round_trips",
        "Store operations sent (each one round trip)",
        &[(vec![], load(&h.round_trips))],
    )?;
    gauges(
        enc,
        "cluster_nodes",
        "Live cluster members as of this node's last heartbeat",
        &[(vec![], cluster.view().len() as f64)],
    )?;
    gauges(
        enc,
        "cluster_slots_held",
        "Connections this node holds under cluster-wide caps",
        &[(vec![], cluster.slots_held() as f64)],
    )
}

/// Counts the proxy requests a connector could not connect, by group and code.
pub struct MeteredConnector<C> {
    pub inner: Arc<C>,
    pub metrics: Arc<GatewayMetrics>,
}

impl<C: Connector> Connector for MeteredConnector<C> {
    async fn connect(&self, target: &HostPort, who: &Requester) -> Result<Upstream, ConnectError> {
        let r = self.inner.connect(target, who).await;
        if let Err(e) = &r {
            self.metrics.connect_failed(&who.group, e);
        }
        r
    }

    fn recheck(&self, target: &HostPort, who: &Requester) -> Result<(), ConnectError> {
        let r = self.inner.recheck(target, who);
        if let Err(e) = &r {
            self.metrics.connect_failed(&who.group, e);
        }
        r
    }
}

/// The policy's download quotas in use, for dashboards: the [`QUOTA_ROWS`] most used
/// users per manager, as on the status page (bounded, whatever the user count).
fn encode_quotas(
    enc: &mut DescriptorEncoder,
    usage: &[crate::policy::QuotaUsage],
) -> Result<(), std::fmt::Error> {
    let rows = |value: fn(&crate::policy::QuotaUsage) -> u64| -> Vec<_> {
        usage
            .iter()
            .map(|q| {
                let l = labels([("manager", q.manager.as_str()), ("user", q.user.as_str())]);
                (l, value(q) as f64)
            })
            .collect()
    };
    gauges(
        enc,
        "policy_quota_used_bytes",
        "Bytes downloaded in the current quota cycle, per quota manager and user (the most used)",
        &rows(|q| q.used),
    )?;
    gauges(
        enc,
        "policy_quota_bytes",
        "The download quota per cycle, per quota manager and user (the most used)",
        &rows(|q| q.quota),
    )
}

#[cfg(test)]
mod layer_tests {
    use super::*;
    use crate::connect::testing::{requester, Refusing};

    struct NoAgents;

    impl AgentDirectory for NoAgents {
        fn sessions(&self) -> Vec<(Arc<str>, Vec<AgentSession>)> {
            Vec::new()
        }
        fn live(&self) -> usize {
            0
        }
    }

    #[tokio::test]
    async fn every_refusal_is_counted_by_group_code_and_reason() {
        let metrics = Arc::new(GatewayMetrics::new(
            Arc::new(NoAgents),
            CancellationToken::new(),
            Arc::new(Limits::none()),
        ));
        let layer = MeteredConnector {
            inner: Arc::new(Refusing(ConnectError::Forbidden("10.0.0.1".into()))),
            metrics: metrics.clone(),
        };
        let target = HostPort::new("example.com", 80);
        for _ in 0..2 {
            assert!(layer
                .connect(&target, &requester("10.0.0.9:1", "office"))
                .await
                .is_err());
        }
        assert_eq!(metrics.failed_total(), 2);
        let failed = metrics.failed.lock();
        let key: FailKey = (Arc::from("office"), "FORBIDDEN_HOST", "forbidden");
        assert_eq!(failed.get(&key), Some(&2));
    }
}
