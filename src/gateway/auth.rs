//! Building `gateway.auth_backends` and the chains that listeners and the agent
//! server ask: each named backend is metered (its `up`, latency and errors), and its
//! allows are cached for its `cache_ttl`; `static` stands for the configuration's own
//! accounts of the listener (or of the agents) that asks.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::config::{BackendConfig, STATIC};
use crate::auth::file::{FileBackend, FileError};
use crate::auth::hook::{HookBackend, HookConfigError};
use crate::auth::ldap::LdapBackend;
use crate::auth::{
    Accounts, Authenticator, Authority, BackendStats, Cached, Chain, Metered, Order,
};
use crate::config::{Credentials, GatewayConfig, GroupConfig, ProxyListener, DEFAULT_GROUP};
use crate::transport::tls;

#[derive(Debug, thiserror::Error)]
pub enum AuthStartError {
    #[error("auth_backends: users file {0}")]
    File(#[from] FileError),
    #[error(transparent)]
    Hook(#[from] HookConfigError),
    #[error("auth_backends.{0}: {1}")]
    Tls(String, tls::TlsError),
}

/// The gateway's named backends, ready to be chained.
pub struct AuthBackends {
    named: HashMap<String, Arc<dyn Authenticator>>,
    order: Order,
    /// The tunnel groups besides the default one.
    groups: Vec<Arc<str>>,
    /// Every named backend's counters, for `/metrics`.
    pub stats: Vec<Arc<BackendStats>>,
    /// The authorities that listeners and the agent server hold: a users file that
    /// removes or changes a user closes that user's connections in those that chain it.
    tracked: Tracked,
}

/// The authorities in use, weakly: a listener that stops takes its own away.
type Tracked = Arc<parking_lot::Mutex<Vec<std::sync::Weak<Authority>>>>;

/// What the access line of a connection closed by a users file's reload says.
const FILE_USER_GONE: &str = "user removed or changed in the users file";

/// Closes the live connections of `gone` wherever an authority chains `backend`.
fn revoke_file_users(tracked: &Tracked, backend: &str, gone: &[String]) {
    let live: Vec<Arc<Authority>> = tracked.lock().iter().filter_map(|w| w.upgrade()).collect();
    for authority in live.iter().filter(|a| a.chains(backend)) {
        for user in gone {
            if authority.revoke(user, FILE_USER_GONE) {
                tracing::warn!(%backend, %user, "closing the live connections of a user the users file removed or changed");
            }
        }
    }
}

impl AuthBackends {
    /// Opens every backend (a users file must load); starts the users files' reload.
    pub fn open(config: &GatewayConfig) -> Result<AuthBackends, AuthStartError> {
        let mut named = HashMap::new();
        let mut stats = Vec::new();
        let tracked = Tracked::default();
        for (name, backend) in &config.auth_backends {
            let mut file = None;
            let inner: Arc<dyn Authenticator> = match backend {
                BackendConfig::File(f) => {
                    let b = FileBackend::open(name, f.clone())?;
                    file = Some(b.clone());
                    b
                }
                BackendConfig::Http(h) => {
                    let tls_config = if h.url.starts_with("https") {
                        Some(
                            tls::gateway_client_config(
                                h.ca.as_deref(),
                                h.fingerprint.map(|f| f.0),
                                None,
                            )
                            .map_err(|e| AuthStartError::Tls(name.clone(), e))?,
                        )
                    } else {
                        None
                    };
                    Arc::new(HookBackend::new(name, &h.url, h.timeout.0, tls_config)?)
                }
                BackendConfig::Ldap(l) => {
                    let tls_config = if l.url.starts_with("ldaps://") || l.starttls {
                        Some(
                            tls::client_config_without_alpn(
                                l.ca.as_deref(),
                                l.fingerprint.map(|f| f.0),
                            )
                            .map_err(|e| AuthStartError::Tls(name.clone(), e))?,
                        )
                    } else {
                        None
                    };
                    Arc::new(LdapBackend::new(name, (**l).clone(), tls_config))
                }
            };
            let s = Arc::new(BackendStats::new(name, backend.kind()));
            stats.push(s.clone());
            let metered = Arc::new(Metered { inner, stats: s });
            let cached = Arc::new(Cached::new(metered, backend.cache_ttl()));
            if let Some(file) = file {
                // A reloaded file drops the cached allows, so a removed user is out at
                // once, and then closes what the old entry let in.
                let weak = Arc::downgrade(&cached);
                let (tracked, backend) = (tracked.clone(), name.clone());
                file.watch(move |gone| {
                    if let Some(c) = weak.upgrade() {
                        c.clear();
                    }
                    revoke_file_users(&tracked, &backend, gone);
                });
            }
            named.insert(name.clone(), cached as Arc<dyn Authenticator>);
        }
        Ok(AuthBackends {
            named,
            order: config.auth_order,
            groups: tunnel_groups(&config.groups),
            stats,
            tracked,
        })
    }

    /// Follows a reload's groups: the chains built from now on lead to them.
    pub fn set_groups(&mut self, groups: &[GroupConfig]) {
        self.groups = tunnel_groups(groups);
    }

    /// Lets a users file's reload close the connections `authority` let in.
    pub fn track(&self, authority: &Arc<Authority>) {
        let mut tracked = self.tracked.lock();
        tracked.retain(|w| w.strong_count() > 0);
        tracked.push(Arc::downgrade(authority));
    }

    /// Whether a chain may name `name`: `static`, or a backend opened at start.
    pub fn runs(&self, name: &str) -> bool {
        name == STATIC || self.named.contains_key(name)
    }

    /// The chain `names` (empty: `[static]`), where `static` is `accounts`. Open when
    /// it is `static` alone and `accounts` are none.
    pub fn authority(&self, names: &[String], accounts: Accounts) -> Authority {
        let default_names = [STATIC.to_owned()];
        let names = if names.is_empty() {
            &default_names[..]
        } else {
            names
        };
        let open = names.len() == 1 && names[0] == STATIC && accounts.is_open();
        let default_group = accounts.anonymous().group;
        let mut accounts = Some(Arc::new(accounts));
        let chain = names
            .iter()
            .filter_map(|n| match n.as_str() {
                STATIC => accounts.take().map(|a| a as Arc<dyn Authenticator>),
                other => self.named.get(other).cloned(),
            })
            .collect();
        Authority::new(
            Chain::new(chain, self.order),
            open,
            default_group,
            self.groups.clone(),
        )
    }
}

/// Who may use one proxy listener: its own credentials lead to the default group, and
/// every group's users to their group. With neither, the listener is open.
pub(super) fn listener_accounts(listener: &ProxyListener, groups: &[GroupConfig]) -> Accounts {
    let default: Arc<str> = Arc::from(DEFAULT_GROUP);
    let mut accounts: Vec<(Credentials, Arc<str>)> = listener
        .credentials()
        .map(|c| (c, default.clone()))
        .into_iter()
        .collect();
    for g in groups {
        let group: Arc<str> = Arc::from(g.id.as_str());
        accounts.extend(g.users.iter().map(|u| (u.into(), group.clone())));
    }
    Accounts::new(accounts, default)
}

/// The agents' static accounts: the default group's agents use the gateway's own
/// credentials; agents of a configured group use its id and agent password. Only this
/// configuration defines them.
pub(super) fn agent_accounts(config: &GatewayConfig) -> Accounts {
    let mut accounts = vec![(
        Credentials {
            username: config.auth_username.clone(),
            password: config.auth_password.expose().to_owned(),
        },
        Arc::from(DEFAULT_GROUP),
    )];
    accounts.extend(config.groups.iter().map(|g| {
        (
            Credentials {
                username: g.id.clone(),
                password: g.agent_password.expose().to_owned(),
            },
            Arc::from(g.id.as_str()),
        )
    }));
    Accounts::new(accounts, Arc::from(DEFAULT_GROUP))
}

/// The tunnel groups besides the default one.
fn tunnel_groups(groups: &[GroupConfig]) -> Vec<Arc<str>> {
    groups.iter().map(|g| Arc::from(g.id.as_str())).collect()
}
