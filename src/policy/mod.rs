//! The policy engine (PMProxy): a predicate over named managers decides every request.
//!
//! `Policy` is built from `managers.toml`, and `reload` swaps in a new file's rules and
//! managers whole (same-named session and quota managers keep their state); `decide`
//! runs per request (no locks beyond a session lookup and a quota counter, no allocation
//! beyond the report); `cmd` is the manual's `/api/cmd` command layer without the HTTP.

pub mod api;
mod build;
pub mod clock;
pub mod cmd;
pub mod config;
pub mod dir;
mod error;
pub mod jwt;
pub mod managers;
mod persist;
mod policy_guard;
mod reload;
pub mod rule;
pub mod server_config;
pub mod shared;
pub mod token;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

pub use crate::connect::{Egress, ParentProxy, ProxyScheme};
pub use api::{serve_api, start_api, ApiHandle, ApiOptions};
pub use clock::{Clock, ManualClock, SystemClock};
pub use cmd::{Cmd, CmdCredentials, CmdError};
pub use config::ManagersConf;
pub use dir::{DirError, FirstRun, PolicyDir};
pub use error::PolicyConfigError;
pub use jwt::JwtTokens;
pub use managers::dwn_cons_r::{QuotaExceeded, QuotaHandle, QuotaUsage};
pub use policy_guard::{decide, Allowed, PolicyGuard};
pub use rule::{Outcome, ParseError, Rule};
pub use server_config::ServerConf;
pub use token::{Claims, OpaqueTokens, TokenCodec, TokenError};

use managers::dwn_cons_r::DwnConsR;
use managers::session_ipm::SessionIpm;
use managers::Manager;

pub struct PolicyOptions {
    /// Where `<dwnConsR>.json` and `<sessionIPM>.sessions.json` live; `None` keeps state
    /// in memory only.
    pub state_dir: Option<PathBuf>,
    pub clock: Arc<dyn Clock>,
    pub codec: Arc<dyn TokenCodec>,
    /// Prefix of configuration errors, normally the file's name.
    pub file_label: String,
    /// `gateway.cluster`: sessions and consumptions live in its store (not in
    /// `state_dir`), kept in step by the task `start_api` runs.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// With `cluster`: the JWT codec that adopts the cluster's key (`codec` is it).
    pub shared_jwt: Option<Arc<shared::SharedJwt>>,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            state_dir: None,
            clock: Arc::new(SystemClock),
            codec: Arc::new(OpaqueTokens),
            file_label: "managers.toml".to_string(),
            cluster: None,
            shared_jwt: None,
        }
    }
}

/// One request to decide. `user` is a user the front end already authenticated (proxy
/// credentials); without one, the user is whoever has a session at `client_ip`.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub client_ip: IpAddr,
    pub user: Option<&'a str>,
    pub host: &'a str,
    pub port: u16,
    pub now: SystemTime,
}

#[derive(Clone, Debug)]
pub struct Decision {
    pub allow: bool,
    /// The managers evaluation reached, in order, with their values.
    pub consulted: Vec<(Arc<str>, bool)>,
    /// Set when a name has no manager: the rule with everything known substituted.
    pub reduced: Option<String>,
    pub egress: Egress,
    /// The quota the connection counts against (last `dwnConsR` reached that allowed it).
    pub quota: Option<QuotaHandle>,
    pub user: Option<Arc<str>>,
}

/// What `managers.toml` says: the rule and its managers. A reload swaps it whole (see
/// [`Policy::reload`]); a decision reads one snapshot from start to end.
pub(crate) struct Rules {
    rule: Rule,
    /// Rule variable → manager index, resolved at load.
    slots: Vec<Option<usize>>,
    names: Vec<Arc<str>>,
    managers: Vec<Manager>,
    by_name: HashMap<String, usize>,
    /// Each manager's settings as a [`build::fingerprint`], by index.
    settings: Vec<u64>,
    /// `[mapDB]` / `[adDB]` by their section and name, with their settings' fingerprint.
    user_dbs: Vec<(String, u64)>,
    sessions: Vec<Arc<SessionIpm>>,
    quotas: Vec<Arc<DwnConsR>>,
    admins: Vec<String>,
}

impl Rules {
    fn user_for(&self, req: &Request<'_>) -> Option<Arc<str>> {
        match req.user {
            Some(u) => Some(Arc::from(u)),
            None => self.sessions.iter().find_map(|s| s.user_at(req.client_ip)),
        }
    }

    fn manager(&self, name: &str) -> Option<(&Arc<str>, &Manager)> {
        self.by_name
            .get(name)
            .map(|&i| (&self.names[i], &self.managers[i]))
    }

    fn is_admin(&self, user: &str) -> bool {
        self.admins.iter().any(|a| a == user)
    }
}

pub struct Policy {
    /// Swapped by a reload; the data path loads it without a lock.
    rules: ArcSwap<Rules>,
    codec: Arc<dyn TokenCodec>,
    clock: Arc<dyn Clock>,
    shared: Option<Arc<shared::Shared>>,
    /// Where the state files live (`None` in memory or in a cluster), for a reload's
    /// new managers.
    state_dir: Option<PathBuf>,
}

impl Policy {
    pub fn from_toml(text: &str, opts: PolicyOptions) -> Result<Policy, PolicyConfigError> {
        let conf = ManagersConf::from_toml(&opts.file_label, text)?;
        build::build(conf, opts)
    }

    pub fn load(path: &Path, mut opts: PolicyOptions) -> Result<Policy, PolicyConfigError> {
        opts.file_label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyConfigError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, opts)
    }

    /// The rule's names, in order of first appearance.
    pub fn rule_names(&self) -> Vec<String> {
        self.rules.load().rule.names().to_vec()
    }

    /// The rule as written back (canonical form).
    pub fn rule_text(&self) -> String {
        self.rules.load().rule.to_string()
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    pub fn decide(&self, req: &Request<'_>) -> Decision {
        let rules = self.rules.load();
        let mut ctx = Ctx {
            rules: &rules,
            req,
            user: None,
            target: None,
            consulted: Vec::with_capacity(rules.slots.len()),
            egress: Egress::default(),
            quota: None,
        };
        let outcome = rules.rule.eval(&mut ctx);
        let (allow, reduced) = match outcome {
            Outcome::Known(b) => (b, None),
            Outcome::Unresolved(r) => (false, Some(r)),
        };
        Decision {
            allow,
            consulted: ctx.consulted,
            reduced,
            egress: ctx.egress,
            quota: ctx.quota,
            user: ctx.user.flatten(),
        }
    }

    /// Starts due quota cycles; `decide` does it too, so this is for idle periods.
    pub fn tick(&self) {
        let now = self.clock.now();
        for q in &self.rules.load().quotas {
            q.maybe_reset(now);
        }
    }

    /// Download consumption of users with a counter this cycle, per `dwnConsR` in
    /// configuration order: the `top` most used of each.
    pub fn quota_usage(&self, top: usize) -> Vec<QuotaUsage> {
        let now = self.clock.now();
        self.rules
            .load()
            .quotas
            .iter()
            .flat_map(|q| q.usage(now).into_iter().take(top))
            .collect()
    }

    /// Writes every quota and session table to the state directory.
    pub fn persist(&self) -> std::io::Result<()> {
        self.tick();
        let rules = self.rules.load();
        for q in &rules.quotas {
            q.persist()?;
        }
        for s in &rules.sessions {
            s.persist()?;
        }
        Ok(())
    }

    /// Persists every `every` (the manual's `persistInterval`) and once more on `stop`.
    pub async fn run_persist_loop(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut timer = tokio::time::interval(every.max(Duration::from_millis(10)));
        timer.tick().await;
        loop {
            tokio::select! {
                _ = timer.tick() => {}
                _ = stop.cancelled() => break,
            }
            if let Err(e) = self.persist() {
                tracing::warn!("persisting policy state: {e}");
            }
        }
        if let Err(e) = self.persist() {
            tracing::warn!("persisting policy state at shutdown: {e}");
        }
    }

    /// Whether sessions and consumptions live in a cluster store.
    pub fn is_clustered(&self) -> bool {
        self.shared.is_some()
    }

    /// With a cluster: brings this node's view up to date with the store once (JWT
    /// key, sessions, consumptions), each step bounded by the store's timeout.
    pub async fn sync_now(&self) -> Result<(), crate::cluster::StoreError> {
        match &self.shared {
            Some(s) => s.sync(self).await,
            None => Ok(()),
        }
    }

    /// With a cluster: keeps this node's view in step with the store until `stop`
    /// (see [`shared`]), then flushes once more. Without one, returns at once.
    pub async fn run_cluster_sync(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        if let Some(s) = self.shared.clone() {
            s.run(self, stop).await;
        }
    }
}

/// Per-decision state; the user and the `host:port` string are computed at most once,
/// and only if a manager needs them.
struct Ctx<'p, 'r> {
    rules: &'p Rules,
    req: &'r Request<'r>,
    user: Option<Option<Arc<str>>>,
    target: Option<String>,
    consulted: Vec<(Arc<str>, bool)>,
    egress: Egress,
    quota: Option<QuotaHandle>,
}

impl Ctx<'_, '_> {
    fn user(&mut self) -> Option<Arc<str>> {
        if self.user.is_none() {
            self.user = Some(self.rules.user_for(self.req));
        }
        self.user.clone().flatten()
    }

    fn target(&mut self) -> &str {
        let req = self.req;
        self.target.get_or_insert_with(|| {
            if req.host.contains(':') {
                format!("[{}]:{}", req.host, req.port)
            } else {
                format!("{}:{}", req.host, req.port)
            }
        })
    }
}

impl rule::Env for Ctx<'_, '_> {
    fn value(&mut self, var: usize) -> Option<bool> {
        let idx = (*self.rules.slots.get(var)?)?;
        let rules = self.rules;
        let v = match &rules.managers[idx] {
            Manager::Range(m) => m.matches(self.req.client_ip),
            Manager::Session(s) => s.user_at(self.req.client_ip).is_some(),
            Manager::Group(g) => {
                let user = self.user();
                g.matches(user.as_deref())
            }
            Manager::Host(h) => {
                self.target();
                h.matches(self.target.as_deref().unwrap_or_default())
            }
            Manager::Time(t) => t.contains(self.req.now),
            Manager::DwnConsR(d) => match self.user() {
                Some(user) => {
                    let h = d.handle(&user, self.req.now);
                    let ok = h.used() < h.quota();
                    if ok {
                        self.quota = Some(h);
                    }
                    ok
                }
                None => false,
            },
            Manager::ParentProxy(p) => {
                self.egress.proxy = Some(p.clone());
                true
            }
            Manager::NetIface(i) => {
                self.egress.iface = Some(i.clone());
                true
            }
        };
        self.consulted.push((rules.names[idx].clone(), v));
        Some(v)
    }
}
