//! Limits on what proxy users may do (`gateway.limits`): connection caps per user and
//! per source address (`caps`), a brute-force lockout on proxy passwords (`throttle`,
//! shared with agent authentication and the policy API), and bandwidth caps per user
//! and per group (`bandwidth`). Everything is off unless configured.

pub mod bandwidth;
pub mod bucket;
pub mod caps;
pub mod limit_guard;
pub mod lockout;
pub mod throttle;

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};

pub use limit_guard::LimitGuard;
pub use lockout::{Gate, Lockout};
pub use throttle::AuthThrottle;

use crate::auth::{BackendError, Outcome};
use crate::cluster::{Check, Cluster, Refusal, Slots};
use crate::config::{ConnCapsConfig, LimitsConfig, ProxyAuthLimits, StoreFailureMode};
use crate::connect::{ConnectError, Hold, Requester, Upstream};
use crate::tunnel::stats::bump;
use crate::tunnel::Pace;
use caps::{CapRefusal, CapRule, CapSlot, KeyedCaps};

/// What the limits refused or slowed, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct LimitStats {
    pub user_concurrent: AtomicU64,
    pub user_rate: AtomicU64,
    pub ip_concurrent: AtomicU64,
    pub ip_rate: AtomicU64,
    pub table_full: AtomicU64,
    pub proxy_auth_failures: AtomicU64,
    pub proxy_auth_lockouts: AtomicU64,
    pub proxy_auth_refused_locked: AtomicU64,
    /// Reads or writes that waited for a user's or a group's bandwidth budget.
    pub paced_user: AtomicU64,
    pub paced_group: AtomicU64,
}

/// The connection caps in force; a reload swaps them whole, and each admission reads
/// them once.
#[derive(Debug, Clone, Copy, Default)]
struct CapRules {
    per_user: Option<CapRule>,
    per_ip: Option<CapRule>,
}

/// The configured limits of one gateway, shared by its proxy listeners and forwards.
/// [`Limits::reconfigure`] changes the rules in place; what they count (connections
/// open, failures, bytes owed) stays.
pub struct Limits {
    caps: ArcSwap<CapRules>,
    /// The connections open per user and per address. A connection admitted while
    /// its kind had no cap took no place, and so does not count if a reload adds one.
    per_user: KeyedCaps<Arc<str>>,
    per_ip: KeyedCaps<IpAddr>,
    proxy_auth: ArcSwapOption<Lockout>,
    bandwidth: bandwidth::Bandwidth,
    /// The configuration in force: what a reload compares with (and holds, so that
    /// two reconfigurations never interleave).
    config: parking_lot::Mutex<LimitsConfig>,
    /// With `gateway.cluster`: the caps hold across every gateway (this node's own
    /// caps still apply, and are what is left when the store does not answer).
    cluster: Option<Arc<Cluster>>,
    pub stats: Arc<LimitStats>,
}

/// What an admitted connection holds while it lives (an [`Upstream`] keeps it until
/// its relay ends): its places under the caps, freed on drop, and the bandwidth
/// budgets it draws from. The default holds nothing.
#[derive(Default)]
pub struct Grant {
    _ip: Option<CapSlot<IpAddr>>,
    _user: Option<CapSlot<Arc<str>>>,
    _cluster: Option<Slots>,
    pacer: Option<bandwidth::Pacer>,
}

impl Grant {
    /// Whether the grant holds nothing (no limit applies to this connection).
    pub fn is_empty(&self) -> bool {
        self._ip.is_none()
            && self._user.is_none()
            && self._cluster.is_none()
            && self.pacer.is_none()
    }

    /// Hands the grant to `upstream`, which keeps it until its relay ends.
    pub fn attach(self, upstream: Upstream) -> Upstream {
        if self.is_empty() {
            return upstream;
        }
        upstream.with_hold(Box::new(self))
    }
}

impl Hold for Grant {
    fn pace(&self) -> Option<&dyn Pace> {
        self.pacer.as_ref().map(|p| p as &dyn Pace)
    }
}

/// Whose connections a cluster check counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Ip,
    User,
}

impl Scope {
    fn key_part(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::User => "user",
        }
    }
}

/// The cluster checks of one cap rule for `key` of `scope`, and beside each, what its
/// refusal tells the user.
fn push_checks(
    checks: &mut Vec<Check>,
    whose: &mut Vec<(Scope, CapRefusal)>,
    cluster: &Cluster,
    scope: Scope,
    key: &str,
    rule: CapRule,
) {
    if let Some(limit) = rule.max_concurrent {
        checks.push(Check::Concurrent {
            key: cluster.keys.slots(scope.key_part(), key),
            limit,
        });
        // The store does not say how many are open: at the limit, at least.
        whose.push((scope, CapRefusal::Concurrent { limit, open: limit }));
    }
    if let Some((per_sec, burst)) = rule.rate {
        checks.push(Check::Rate {
            key: cluster.keys.rate(scope.key_part(), key),
            per_sec,
            burst,
        });
        whose.push((scope, CapRefusal::Rate { per_sec, burst }));
    }
}

/// What an address locked out of proxy authentication is told.
pub const LOCKED_OUT: &str =
    "too many failed proxy authentications from this address; try again later";

/// The outcome of a proxy user's password check, with the lockout applied.
#[derive(Debug)]
pub enum AuthVerdict<T> {
    Accepted(T),
    /// Wrong credentials; the reason is a backend's, for the log.
    Rejected(Option<String>),
    /// Too many failures from this address: refused without checking.
    LockedOut,
    /// The cluster store did not answer and `on_store_failure: closed`.
    Unavailable,
    /// The authentication backend could not answer: neither a failure nor a success
    /// for the lockout.
    BackendDown(BackendError),
}

impl Limits {
    /// This node's limits; with `cluster`, the caps and the lockout hold across it.
    pub fn new(config: &LimitsConfig, cluster: Option<&Arc<Cluster>>) -> Self {
        let stats = Arc::new(LimitStats::default());
        Limits {
            caps: ArcSwap::from_pointee(cap_rules(config)),
            per_user: KeyedCaps::default(),
            per_ip: KeyedCaps::default(),
            proxy_auth: ArcSwapOption::from(
                config
                    .proxy_auth
                    .as_ref()
                    .map(|a| Arc::new(proxy_lockout(a, cluster))),
            ),
            bandwidth: bandwidth::Bandwidth::new(
                config.bandwidth.per_user.map(|r| r.0),
                group_rates(config),
                stats.clone(),
                cluster.map(|c| bandwidth::Leases {
                    slice: c.budget_slice,
                    leaser: c.clone(),
                }),
            ),
            config: parking_lot::Mutex::new(config.clone()),
            cluster: cluster.cloned(),
            stats,
        }
    }

    /// Applies `config` in place (a reload), for every holder of these limits, and
    /// says what changed, one line each. Connections already admitted keep their
    /// places and count against the new caps (a lowered cap closes nothing: new
    /// connections are refused until enough end); bandwidth rates apply to live
    /// connections from their next read or write; the lockout keeps its counts. In a
    /// cluster only this node's rules change: the store's counts are shared, each
    /// node checks them against its own caps.
    pub fn reconfigure(&self, config: &LimitsConfig) -> Vec<String> {
        let mut current = self.config.lock();
        let changes = changes(&current, config);
        if changes.is_empty() {
            return changes;
        }
        self.caps.store(Arc::new(cap_rules(config)));
        match (self.proxy_auth.load_full(), &config.proxy_auth) {
            (Some(kept), Some(a)) => kept.retune(params(a)),
            (_, a) => self.proxy_auth.store(
                a.as_ref()
                    .map(|a| Arc::new(proxy_lockout(a, self.cluster.as_ref()))),
            ),
        }
        self.bandwidth
            .reconfigure(config.bandwidth.per_user.map(|r| r.0), group_rates(config));
        *current = config.clone();
        changes
    }

    /// No limits: what a gateway without `limits` gets.
    pub fn none() -> Self {
        Self::new(&LimitsConfig::default(), None)
    }

    /// Whether any connection cap or bandwidth cap is configured.
    pub fn caps_anything(&self) -> bool {
        let caps = self.caps.load();
        caps.per_user.is_some() || caps.per_ip.is_some() || !self.bandwidth.is_unlimited()
    }

    /// Admits one connection of `who` (per-address caps always, per-user caps when
    /// the user is known), or refuses it with the reason the user is told. In a
    /// cluster, this node's caps decide first, then the store, in one round trip.
    pub async fn admit(&self, who: &Requester) -> Result<Grant, ConnectError> {
        if !self.caps_anything() {
            return Ok(Grant::default());
        }
        let now = Instant::now();
        let rules = **self.caps.load();
        let ip = who.peer.ip().to_canonical();
        let ip_slot = match rules.per_ip {
            Some(rule) => Some(self.per_ip.admit(&ip, rule, now).map_err(|r| {
                self.refused(r, &self.stats.ip_concurrent, &self.stats.ip_rate);
                ConnectError::RateLimited(describe(&format!("address {ip}"), r))
            })?),
            None => None,
        };
        let user_slot = match (rules.per_user, who.user.as_deref()) {
            (Some(rule), Some(user)) => Some(
                self.per_user
                    .admit(&Arc::from(user), rule, now)
                    .map_err(|r| {
                        self.refused(r, &self.stats.user_concurrent, &self.stats.user_rate);
                        ConnectError::RateLimited(describe(&format!("user {user}"), r))
                    })?,
            ),
            _ => None,
        };
        Ok(Grant {
            _ip: ip_slot,
            _user: user_slot,
            _cluster: self
                .admit_in_cluster(rules, ip, who.user.as_deref())
                .await?,
            pacer: self.bandwidth.pacer(who.user.as_deref(), &who.group),
        })
    }

    /// The cluster-wide half of [`Limits::admit`].
    async fn admit_in_cluster(
        &self,
        rules: CapRules,
        ip: IpAddr,
        user: Option<&str>,
    ) -> Result<Option<Slots>, ConnectError> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let ip_text = ip.to_string();
        let mut checks = Vec::new();
        let mut whose = Vec::new();
        if let Some(rule) = rules.per_ip {
            push_checks(&mut checks, &mut whose, cluster, Scope::Ip, &ip_text, rule);
        }
        if let (Some(rule), Some(user)) = (rules.per_user, user) {
            push_checks(&mut checks, &mut whose, cluster, Scope::User, user, rule);
        }
        if checks.is_empty() {
            return Ok(None);
        }
        match cluster.admit(&checks).await {
            Ok(Ok(slots)) => Ok(Some(slots)),
            Ok(Err(Refusal { index, .. })) => {
                let Some(&(scope, refusal)) = whose.get(index) else {
                    tracing::warn!(index, "cluster store refused an admission it was not asked for; deciding without it");
                    return self.without_store(cluster);
                };
                let (name, concurrent, rate) = match scope {
                    Scope::Ip => (
                        format!("address {ip}"),
                        &self.stats.ip_concurrent,
                        &self.stats.ip_rate,
                    ),
                    Scope::User => (
                        format!("user {}", user.unwrap_or_default()),
                        &self.stats.user_concurrent,
                        &self.stats.user_rate,
                    ),
                };
                self.refused(refusal, concurrent, rate);
                Err(ConnectError::RateLimited(format!(
                    "{} (across the cluster)",
                    describe(&name, refusal)
                )))
            }
            Err(_) => self.without_store(cluster),
        }
    }

    /// What an admission does when the store did not answer: `on_store_failure`.
    fn without_store(&self, cluster: &Cluster) -> Result<Option<Slots>, ConnectError> {
        cluster.store.health.decided_without_store();
        match cluster.mode {
            StoreFailureMode::Open => Ok(None),
            StoreFailureMode::Closed => Err(ConnectError::RateLimited(
                "connection caps unavailable (cluster store unreachable); try again later".into(),
            )),
        }
    }

    fn refused(&self, r: CapRefusal, concurrent: &AtomicU64, rate: &AtomicU64) {
        let counter = match r {
            CapRefusal::Concurrent { .. } => concurrent,
            CapRefusal::Rate { .. } => rate,
            CapRefusal::TableFull => &self.stats.table_full,
        };
        bump(counter, 1);
    }

    /// Checks a proxy user's password with `check`, unless `ip` is locked out (then
    /// `check` is never polled, so a locked-out address never reaches a backend), and
    /// counts the outcome toward the lockout. A backend that could not answer counts
    /// neither way. Without `limits.proxy_auth` it only checks.
    pub async fn proxy_auth<T>(
        &self,
        ip: IpAddr,
        check: impl std::future::Future<Output = Outcome<T>>,
    ) -> AuthVerdict<T> {
        let Some(lockout) = self.proxy_auth.load_full() else {
            return match check.await {
                Outcome::Allowed(t) => AuthVerdict::Accepted(t),
                Outcome::Denied(r) => AuthVerdict::Rejected(r),
                Outcome::Unavailable(e) => AuthVerdict::BackendDown(e),
            };
        };
        match lockout.gate(ip).await {
            Gate::Open => {}
            Gate::Locked => {
                bump(&self.stats.proxy_auth_refused_locked, 1);
                return AuthVerdict::LockedOut;
            }
            Gate::StoreDown => return AuthVerdict::Unavailable,
        }
        match check.await {
            Outcome::Allowed(t) => {
                lockout.success(ip);
                AuthVerdict::Accepted(t)
            }
            Outcome::Denied(reason) => {
                bump(&self.stats.proxy_auth_failures, 1);
                if lockout.failure(ip).await {
                    bump(&self.stats.proxy_auth_lockouts, 1);
                    tracing::warn!(%ip, "proxy authentication locked out after repeated failures");
                }
                AuthVerdict::Rejected(reason)
            }
            Outcome::Unavailable(e) => AuthVerdict::BackendDown(e),
        }
    }

    /// Addresses locked out of proxy authentication now.
    pub fn proxy_auth_locked(&self) -> usize {
        self.proxy_auth
            .load()
            .as_ref()
            .map_or(0, |l| l.locked_count())
    }
}

fn cap_rules(config: &LimitsConfig) -> CapRules {
    CapRules {
        per_user: config.per_user.as_ref().map(rule),
        per_ip: config.per_ip.as_ref().map(rule),
    }
}

fn params(a: &ProxyAuthLimits) -> throttle::Params {
    throttle::Params {
        max_failures: a.max_failures,
        window: a.window.0,
        lockout: a.lockout.0,
    }
}

fn proxy_lockout(a: &ProxyAuthLimits, cluster: Option<&Arc<Cluster>>) -> Lockout {
    let shared = cluster.map(|c| (c, "proxy"));
    Lockout::new(a.max_failures, a.window.0, a.lockout.0, shared)
}

fn group_rates(config: &LimitsConfig) -> impl Iterator<Item = (String, u64)> + '_ {
    config
        .bandwidth
        .per_group
        .iter()
        .map(|(g, r)| (g.clone(), r.0))
}

/// One line per key of `gateway.limits` that differs between `old` and `new`.
fn changes(old: &LimitsConfig, new: &LimitsConfig) -> Vec<String> {
    let mut lines = Vec::new();
    let mut diff = |key: String, was: String, now: String| {
        if was != now {
            lines.push(format!("gateway.limits.{key} changed from {was} to {now}"));
        }
    };
    fn shown<T: std::fmt::Display>(v: Option<T>) -> String {
        v.map_or_else(|| "none".to_owned(), |v| v.to_string())
    }
    for (key, was, now) in [
        ("per_user", &old.per_user, &new.per_user),
        ("per_ip", &old.per_ip, &new.per_ip),
    ] {
        let (was, now) = (was.as_ref(), now.as_ref());
        diff(
            format!("{key}.max_concurrent"),
            shown(was.and_then(|c| c.max_concurrent)),
            shown(now.and_then(|c| c.max_concurrent)),
        );
        diff(
            format!("{key}.rate"),
            shown(was.and_then(|c| c.rate)),
            shown(now.and_then(|c| c.rate)),
        );
        diff(
            format!("{key}.burst"),
            shown(was.and_then(|c| c.burst)),
            shown(now.and_then(|c| c.burst)),
        );
    }
    let (was, now) = (old.proxy_auth.as_ref(), new.proxy_auth.as_ref());
    diff(
        "proxy_auth.max_failures".into(),
        shown(was.map(|a| a.max_failures)),
        shown(now.map(|a| a.max_failures)),
    );
    diff(
        "proxy_auth.window".into(),
        shown(was.map(|a| a.window)),
        shown(now.map(|a| a.window)),
    );
    diff(
        "proxy_auth.lockout".into(),
        shown(was.map(|a| a.lockout)),
        shown(now.map(|a| a.lockout)),
    );
    let rate = |r: Option<&crate::net::ByteRate>| shown(r.map(|r| format!("{} bytes/s", r.0)));
    let (was, now) = (&old.bandwidth, &new.bandwidth);
    diff(
        "bandwidth.per_user".into(),
        rate(was.per_user.as_ref()),
        rate(now.per_user.as_ref()),
    );
    let groups: std::collections::BTreeSet<&String> =
        was.per_group.keys().chain(now.per_group.keys()).collect();
    for g in groups {
        diff(
            format!("bandwidth.per_group.{g}"),
            rate(was.per_group.get(g)),
            rate(now.per_group.get(g)),
        );
    }
    lines
}

fn rule(c: &ConnCapsConfig) -> CapRule {
    CapRule {
        max_concurrent: c.max_concurrent,
        rate: c
            .rate
            .map(|per_sec| (per_sec, c.burst.map_or(per_sec.ceil(), f64::from))),
    }
}

/// The reason a refused user reads (HTTP body, access log).
fn describe(who: &str, r: CapRefusal) -> String {
    match r {
        CapRefusal::Concurrent { limit, open } => {
            format!("{who} has {open} connections open (limit {limit})")
        }
        CapRefusal::Rate { per_sec, burst } => format!(
            "{who} opens connections faster than {per_sec}/s (burst {burst}); try again shortly"
        ),
        CapRefusal::TableFull => {
            "too many users and addresses with open connections; try again later".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::testing::requester;

    fn config(yaml: &str) -> LimitsConfig {
        yaml_serde::from_str(yaml).unwrap()
    }

    fn alice() -> Requester {
        let mut who = requester("10.0.0.1:5000", "default");
        who.user = Some("alice".into());
        who
    }

    /// `n` connections of alice, all admitted.
    async fn hold(limits: &Limits, n: usize) -> Vec<Grant> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(limits.admit(&alice()).await.unwrap());
        }
        held
    }

    async fn admits(limits: &Limits) -> bool {
        limits.admit(&alice()).await.is_ok()
    }

    #[tokio::test]
    async fn a_lowered_cap_refuses_the_next_while_the_admitted_keep_their_places() {
        let limits = Limits::new(&config("per_user: { max_concurrent: 10 }"), None);
        let held = hold(&limits, 3).await;
        let lines = limits.reconfigure(&config("per_user: { max_concurrent: 2 }"));
        assert_eq!(
            lines,
            ["gateway.limits.per_user.max_concurrent changed from 10 to 2"]
        );
        let refused = limits.admit(&alice()).await.err().unwrap();
        assert!(
            refused
                .to_string()
                .contains("user alice has 3 connections open (limit 2)"),
            "{refused}"
        );
        let mut held = held.into_iter();
        drop(held.next());
        assert!(!admits(&limits).await, "two still open");
        drop(held.next());
        let third = limits.admit(&alice()).await.unwrap();
        // Raised: more are admitted beside the ones open.
        limits.reconfigure(&config("per_user: { max_concurrent: 4 }"));
        let more = hold(&limits, 2).await;
        assert!(!admits(&limits).await, "four open");
        drop((held, third, more));
        assert!(admits(&limits).await);
    }

    #[tokio::test]
    async fn a_cap_added_from_none_counts_from_then_and_one_removed_admits_all() {
        let limits = Limits::none();
        let before = limits.admit(&alice()).await.unwrap();
        assert!(before.is_empty(), "no cap: no place taken");
        let lines = limits.reconfigure(&config("per_ip: { max_concurrent: 1 }"));
        assert_eq!(
            lines,
            ["gateway.limits.per_ip.max_concurrent changed from none to 1"]
        );
        let first = limits.admit(&alice()).await.unwrap();
        assert!(!admits(&limits).await, "the cap holds from now on");
        let lines = limits.reconfigure(&LimitsConfig::default());
        assert_eq!(
            lines,
            ["gateway.limits.per_ip.max_concurrent changed from 1 to none"]
        );
        assert!(!limits.caps_anything());
        let many = hold(&limits, 5).await;
        // The place taken under the cap is still given back when it ends.
        drop((first, many, before));
        limits.reconfigure(&config("per_ip: { max_concurrent: 1 }"));
        assert!(admits(&limits).await);
        assert!(limits
            .reconfigure(&config("per_ip: { max_concurrent: 1 }"))
            .is_empty());
    }

    #[tokio::test]
    async fn the_lockout_keeps_its_counts_through_a_reconfiguration() {
        let limits = Limits::new(
            &config("proxy_auth: { max_failures: 5, window: 60s, lockout: 60s }"),
            None,
        );
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let deny = || async { Outcome::<()>::Denied(None) };
        for _ in 0..3 {
            assert!(matches!(
                limits.proxy_auth(ip, deny()).await,
                AuthVerdict::Rejected(_)
            ));
        }
        let lines = limits.reconfigure(&config(
            "proxy_auth: { max_failures: 3, window: 60s, lockout: 60s }",
        ));
        assert_eq!(
            lines,
            ["gateway.limits.proxy_auth.max_failures changed from 5 to 3"]
        );
        assert!(matches!(
            limits.proxy_auth(ip, deny()).await,
            AuthVerdict::Rejected(_)
        ));
        assert!(matches!(
            limits.proxy_auth(ip, deny()).await,
            AuthVerdict::LockedOut
        ));
        assert_eq!(limits.proxy_auth_locked(), 1);
        limits.reconfigure(&LimitsConfig::default());
        assert!(matches!(
            limits.proxy_auth(ip, deny()).await,
            AuthVerdict::Rejected(_)
        ));
    }

    #[test]
    fn every_changed_key_gets_a_line() {
        let old = config("bandwidth: { per_user: 1MiB, per_group: { default: 2MiB } }");
        let new = config(
            "per_user: { rate: 2, burst: 4 }\nbandwidth: { per_group: { default: 3MiB, lab: 1MiB } }",
        );
        assert_eq!(
            changes(&old, &new),
            [
                "gateway.limits.per_user.rate changed from none to 2",
                "gateway.limits.per_user.burst changed from none to 4",
                "gateway.limits.bandwidth.per_user changed from 1048576 bytes/s to none",
                "gateway.limits.bandwidth.per_group.default changed from 2097152 bytes/s to 3145728 bytes/s",
                "gateway.limits.bandwidth.per_group.lab changed from none to 1048576 bytes/s",
            ]
        );
    }
}
