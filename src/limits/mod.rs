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

pub use limit_guard::LimitGuard;
pub use lockout::{Gate, Lockout};
pub use throttle::AuthThrottle;

use crate::auth::{BackendError, Outcome};
use crate::cluster::{Check, Cluster, Refusal, Slots};
use crate::config::{ConnCapsConfig, LimitsConfig, StoreFailureMode};
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

/// The configured limits of one gateway, shared by its proxy listeners and forwards.
pub struct Limits {
    per_user: Option<KeyedCaps<Arc<str>>>,
    per_ip: Option<KeyedCaps<IpAddr>>,
    proxy_auth: Option<Lockout>,
    bandwidth: bandwidth::Bandwidth,
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
        whose.push((scope, CapRefusal::Concurrent { limit }));
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
            per_user: config.per_user.as_ref().map(|c| KeyedCaps::new(rule(c))),
            per_ip: config.per_ip.as_ref().map(|c| KeyedCaps::new(rule(c))),
            proxy_auth: config.proxy_auth.as_ref().map(|a| {
                let shared = cluster.map(|c| (c, "proxy"));
                Lockout::new(a.max_failures, a.window.0, a.lockout.0, shared)
            }),
            bandwidth: bandwidth::Bandwidth::new(
                config.bandwidth.per_user.map(|r| r.0),
                config
                    .bandwidth
                    .per_group
                    .iter()
                    .map(|(g, r)| (g.clone(), r.0)),
                stats.clone(),
                cluster.map(|c| bandwidth::Leases {
                    slice: c.budget_slice,
                    leaser: c.clone(),
                }),
            ),
            cluster: cluster.cloned(),
            stats,
        }
    }

    /// No limits: what a gateway without `limits` gets.
    pub fn none() -> Self {
        Self::new(&LimitsConfig::default(), None)
    }

    /// Whether any connection cap or bandwidth cap is configured.
    pub fn caps_anything(&self) -> bool {
        self.per_user.is_some() || self.per_ip.is_some() || !self.bandwidth.is_unlimited()
    }

    /// Admits one connection of `who` (per-address caps always, per-user caps when
    /// the user is known), or refuses it with the reason the user is told. In a
    /// cluster, this node's caps decide first, then the store, in one round trip.
    pub async fn admit(&self, who: &Requester) -> Result<Grant, ConnectError> {
        if !self.caps_anything() {
            return Ok(Grant::default());
        }
        let now = Instant::now();
        let ip = who.peer.ip().to_canonical();
        let ip_slot = match &self.per_ip {
            Some(caps) => Some(caps.admit(&ip, now).map_err(|r| {
                self.refused(r, &self.stats.ip_concurrent, &self.stats.ip_rate);
                ConnectError::RateLimited(describe(&format!("address {ip}"), r))
            })?),
            None => None,
        };
        let user_slot = match (&self.per_user, who.user.as_deref()) {
            (Some(caps), Some(user)) => Some(caps.admit(&Arc::from(user), now).map_err(|r| {
                self.refused(r, &self.stats.user_concurrent, &self.stats.user_rate);
                ConnectError::RateLimited(describe(&format!("user {user}"), r))
            })?),
            _ => None,
        };
        Ok(Grant {
            _ip: ip_slot,
            _user: user_slot,
            _cluster: self.admit_in_cluster(ip, who.user.as_deref()).await?,
            pacer: self.bandwidth.pacer(who.user.as_deref(), &who.group),
        })
    }

    /// The cluster-wide half of [`Limits::admit`].
    async fn admit_in_cluster(
        &self,
        ip: IpAddr,
        user: Option<&str>,
    ) -> Result<Option<Slots>, ConnectError> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let ip_text = ip.to_string();
        let mut checks = Vec::new();
        let mut whose = Vec::new();
        if let Some(caps) = &self.per_ip {
            push_checks(
                &mut checks,
                &mut whose,
                cluster,
                Scope::Ip,
                &ip_text,
                caps.rule(),
            );
        }
        if let (Some(caps), Some(user)) = (&self.per_user, user) {
            push_checks(
                &mut checks,
                &mut whose,
                cluster,
                Scope::User,
                user,
                caps.rule(),
            );
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
        let Some(lockout) = &self.proxy_auth else {
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
        self.proxy_auth.as_ref().map_or(0, Lockout::locked_count)
    }
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
        CapRefusal::Concurrent { limit } => {
            format!("{who} has {limit} connections open (limit {limit})")
        }
        CapRefusal::Rate { per_sec, burst } => format!(
            "{who} opens connections faster than {per_sec}/s (burst {burst}); try again shortly"
        ),
        CapRefusal::TableFull => {
            "too many users and addresses with open connections; try again later".into()
        }
    }
}
