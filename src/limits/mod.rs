//! Limits on what proxy users may do (`gateway.limits`): connection caps per user and
//! per source address (`caps`), a brute-force lockout on proxy passwords (`throttle`,
//! shared with agent authentication and the policy API), and bandwidth caps per user
//! and per group (`bandwidth`). Everything is off unless configured.

pub mod bandwidth;
pub mod bucket;
pub mod caps;
pub mod limit_guard;
pub mod throttle;

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

pub use limit_guard::LimitGuard;
pub use throttle::AuthThrottle;

use crate::config::{ConnCapsConfig, LimitsConfig};
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
    proxy_auth: Option<AuthThrottle>,
    bandwidth: bandwidth::Bandwidth,
    pub stats: Arc<LimitStats>,
}

/// What an admitted connection holds while it lives (an [`Upstream`] keeps it until
/// its relay ends): its places under the caps, freed on drop, and the bandwidth
/// budgets it draws from. The default holds nothing.
#[derive(Default)]
pub struct Grant {
    _ip: Option<CapSlot<IpAddr>>,
    _user: Option<CapSlot<Arc<str>>>,
    pacer: Option<bandwidth::Pacer>,
}

impl Grant {
    /// Whether the grant holds nothing (no limit applies to this connection).
    pub fn is_empty(&self) -> bool {
        self._ip.is_none() && self._user.is_none() && self.pacer.is_none()
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

/// What an address locked out of proxy authentication is told.
pub const LOCKED_OUT: &str =
    "too many failed proxy authentications from this address; try again later";

/// The outcome of a proxy user's password check, with the lockout applied.
#[derive(Debug)]
pub enum AuthVerdict<T> {
    Accepted(T),
    Rejected,
    /// Too many failures from this address: refused without checking.
    LockedOut,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        let stats = Arc::new(LimitStats::default());
        Limits {
            per_user: config.per_user.as_ref().map(|c| KeyedCaps::new(rule(c))),
            per_ip: config.per_ip.as_ref().map(|c| KeyedCaps::new(rule(c))),
            proxy_auth: config
                .proxy_auth
                .as_ref()
                .map(|a| AuthThrottle::new(a.max_failures, a.window.0, a.lockout.0)),
            bandwidth: bandwidth::Bandwidth::new(
                config.bandwidth.per_user.map(|r| r.0),
                config
                    .bandwidth
                    .per_group
                    .iter()
                    .map(|(g, r)| (g.clone(), r.0)),
                stats.clone(),
            ),
            stats,
        }
    }

    /// No limits: what a gateway without `limits` gets.
    pub fn none() -> Self {
        Self::new(&LimitsConfig::default())
    }

    /// Whether any connection cap or bandwidth cap is configured.
    pub fn caps_anything(&self) -> bool {
        self.per_user.is_some() || self.per_ip.is_some() || !self.bandwidth.is_unlimited()
    }

    /// Admits one connection of `who` (per-address caps always, per-user caps when
    /// the user is known), or refuses it with the reason the user is told.
    pub fn admit(&self, who: &Requester) -> Result<Grant, ConnectError> {
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
            pacer: self.bandwidth.pacer(who.user.as_deref(), &who.group),
        })
    }

    fn refused(&self, r: CapRefusal, concurrent: &AtomicU64, rate: &AtomicU64) {
        let counter = match r {
            CapRefusal::Concurrent { .. } => concurrent,
            CapRefusal::Rate { .. } => rate,
            CapRefusal::TableFull => &self.stats.table_full,
        };
        bump(counter, 1);
    }

    /// Checks a proxy user's password with `check`, unless `ip` is locked out, and
    /// counts the outcome toward the lockout. Without `limits.proxy_auth` it only
    /// checks.
    pub fn proxy_auth<T>(&self, ip: IpAddr, check: impl FnOnce() -> Option<T>) -> AuthVerdict<T> {
        let Some(throttle) = &self.proxy_auth else {
            return check().map_or(AuthVerdict::Rejected, AuthVerdict::Accepted);
        };
        if throttle.is_locked(ip) {
            bump(&self.stats.proxy_auth_refused_locked, 1);
            return AuthVerdict::LockedOut;
        }
        match check() {
            Some(t) => {
                throttle.success(ip);
                AuthVerdict::Accepted(t)
            }
            None => {
                bump(&self.stats.proxy_auth_failures, 1);
                if throttle.failure(ip) {
                    bump(&self.stats.proxy_auth_lockouts, 1);
                    tracing::warn!(%ip, "proxy authentication locked out after repeated failures");
                }
                AuthVerdict::Rejected
            }
        }
    }

    /// Addresses locked out of proxy authentication now.
    pub fn proxy_auth_locked(&self) -> usize {
        self.proxy_auth
            .as_ref()
            .map_or(0, AuthThrottle::locked_count)
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
