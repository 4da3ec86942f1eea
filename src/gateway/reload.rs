//! SIGHUP (and the admin `POST /reload`): what a running gateway takes from its
//! configuration file without a restart — the agent certificate and `client_ca`, the
//! agents' logins, the proxy listeners (added, removed, moved, their users and
//! certificates), the declared forwards, `agent_forwards`, `deflate`, `gateway.limits`
//! and the policy dir's rules — and the keys it names as needing one.
//!
//! A reload reads and checks the whole file before it changes anything, so a bad file
//! (or a certificate that does not load, or a chain naming a backend that is not
//! running) leaves the gateway exactly as it was.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::auth::{agent_accounts, listener_accounts, AuthBackends};
use super::listeners::{Front, Listeners, Listening};
use super::AgentServer;
use crate::auth::Authority;
use crate::config::profile::ProfileSource;
use crate::config::{GatewayConfig, LevelSwitch, ProxyListener, DEFAULT_GROUP};
use crate::transport::tls;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0} has no `gateway:` section")]
    NoGateway(String),
    #[error("gateway.tls_cert / gateway.tls_key: {0}; the old certificate stays")]
    Tls(tls::TlsError),
    #[error("{0}; the running listeners and certificates stay")]
    Listen(#[from] super::listeners::ListenError),
    #[error("gateway.client_ca: {0}; the running CA bundle stays")]
    ClientCa(tls::TlsError),
    #[error("gateway.policy: {0}; the running rules stay")]
    Policy(crate::policy::PolicyConfigError),
    #[error(
        "{key}: backend {name:?} is not running; adding an authentication backend takes a restart"
    )]
    NewBackend { key: &'static str, name: String },
}

/// The configuration a gateway runs with, its front ends and forwards, its agent
/// listener, and the backends it opened at start.
pub(super) struct Running {
    pub gateway: GatewayConfig,
    /// They own the proxy listeners' configuration, users and certificates.
    pub listeners: Listeners,
    pub backends: AuthBackends,
    /// The agent listener: its TLS config (`client_ca`), `deflate` and agent forwards.
    pub server: Arc<AgentServer>,
}

/// The certificates of a `gateway.client_ca` bundle.
type CaCerts = Option<Vec<rustls::pki_types::CertificateDer<'static>>>;

/// The parts of a running gateway that a reload swaps, and what it counts with.
pub struct Reloader {
    /// The certificate new agent handshakes get (and HTTPS proxy ones, when that
    /// listener names no files of its own); a reload replaces it.
    agent_cert: Arc<tls::CertSlot>,
    metrics: Arc<crate::metrics::GatewayMetrics>,
    /// Who checks the agents' logins; a reload gives it the new rules.
    agents: Arc<Authority>,
    /// Shared by every front end: a reload changes their rules in place.
    limits: Arc<crate::limits::Limits>,
    /// The rules of `gateway.policy`, when it is set: a reload re-reads its
    /// `managers.toml`, keeping sessions and quotas.
    policy: Option<Arc<crate::policy::Policy>>,
    /// What the admin listener's `/profiles/` are made from.
    profiles: Arc<arc_swap::ArcSwap<ProfileSource>>,
    /// The process's log filter, when the binary hands it over.
    log: std::sync::OnceLock<Arc<dyn LevelSwitch>>,
    /// The certificates of the `gateway.client_ca` agents are verified against, to tell
    /// whether a reload changed the bundle (used under `running`'s lock only).
    client_ca: parking_lot::Mutex<CaCerts>,
    /// Held by the reload in progress: reloads never interleave.
    running: parking_lot::Mutex<Running>,
}

impl Reloader {
    pub(super) fn new(
        agent_cert: Arc<tls::CertSlot>,
        metrics: Arc<crate::metrics::GatewayMetrics>,
        agents: Arc<Authority>,
        limits: Arc<crate::limits::Limits>,
        policy: Option<Arc<crate::policy::Policy>>,
        profiles: Arc<arc_swap::ArcSwap<ProfileSource>>,
        running: Running,
    ) -> Self {
        // The bundle the start verified agents with, read again to be compared with the
        // next reload's (the start read it a moment before).
        let client_ca = running
            .gateway
            .client_ca
            .as_deref()
            .and_then(|path| tls::ClientCa::load(path).ok())
            .map(|ca| ca.certs);
        Reloader {
            agent_cert,
            metrics,
            agents,
            limits,
            policy,
            profiles,
            log: std::sync::OnceLock::new(),
            client_ca: parking_lot::Mutex::new(client_ca),
            running: parking_lot::Mutex::new(running),
        }
    }

    /// From now on a reload also applies `log.level` (unless `RUST_LOG` chose it).
    pub fn follow_log_level(&self, switch: Arc<dyn LevelSwitch>) {
        let _ = self.log.set(switch);
    }

    /// Releases the front ends' and forwards' sockets: the gateway is stopping.
    pub(super) fn close_listeners(&self) {
        self.running.lock().listeners.close();
    }

    /// Where the front ends and forwards listen now.
    pub(super) fn listening(&self) -> Listening {
        self.running.lock().listeners.listening()
    }

    /// What the reloads are counted in; the admin listener's `POST /reload` lives there.
    pub(super) fn metrics(&self) -> &crate::metrics::GatewayMetrics {
        &self.metrics
    }

    /// Reloads what can change live from the configuration file at `path` (see the
    /// README's "Reload"). Counted in `anyproxy_config_reload_total{result}`.
    pub fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        let mut running = self.running.lock();
        self.metrics.reloads.run(|| self.apply(path, &mut running))
    }

    fn apply(&self, path: &Path, running: &mut Running) -> Result<(), ReloadError> {
        let file = crate::config::Config::load(path)?;
        let Some(gateway) = file.gateway else {
            return Err(ReloadError::NoGateway(path.display().to_string()));
        };
        let log = file.log;
        let next = Next {
            gateway,
            proxy: file.proxy.unwrap_or_default(),
        };
        // Everything that can fail comes first; after it, nothing can.
        next.check_backends(&running.backends)?;
        let agent_cert = tls::load_checked(&next.gateway.tls_cert, &next.gateway.tls_key)
            .map_err(ReloadError::Tls)?;
        let client_ca = self.check_client_ca(&next.gateway)?;
        // New addresses are bound here: a port in use changes nothing.
        let listeners = running
            .listeners
            .plan(&next.proxy, &next.gateway.forwards)?;
        // The policy's own swap is the last step that can fail: a broken managers.toml
        // changes nothing, and after it nothing else can fail.
        self.reload_policy(&running.gateway, &next.gateway)?;
        self.replace_certificate(&next.gateway, agent_cert);
        self.replace_client_ca(&running.server, client_ca);
        replace_agent_side(&running.server, &next.gateway);

        running.backends.set_groups(&next.gateway.groups);
        self.replace_logins(running, &next);
        // After the logins: a front end that keeps running keeps its users, with the
        // new rules; one that starts gets them from the new file.
        running
            .listeners
            .apply(listeners, &running.backends, &next.gateway.groups);
        self.profiles.store(Arc::new(ProfileSource::new(
            &next.gateway,
            Some(&next.proxy),
        )));
        for change in self.limits.reconfigure(&next.gateway.limits) {
            tracing::info!("{change}");
        }
        for key in restart_only(running, &next) {
            tracing::warn!(key, "changed in the file; takes effect at the next restart");
        }
        crate::config::apply_level(self.log.get(), &log);
        running.gateway = next.gateway;
        tracing::info!(config = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// Re-reads the policy dir's `managers.toml` when the dir is the one the gateway
    /// started with (another dir, or a policy added or dropped, takes a restart and is
    /// named as such by [`restart_only`]).
    fn reload_policy(&self, old: &GatewayConfig, new: &GatewayConfig) -> Result<(), ReloadError> {
        let (Some(policy), Some(was), Some(now)) = (&self.policy, &old.policy, &new.policy) else {
            return Ok(());
        };
        if was.dir != now.dir {
            return Ok(());
        }
        let file = now.dir.join(crate::policy::dir::MANAGERS_TOML);
        for change in policy.reload(&file).map_err(ReloadError::Policy)? {
            tracing::info!("{}: {change}", file.display());
        }
        Ok(())
    }

    /// The agent listener's TLS config with the reloaded `gateway.client_ca` (around the
    /// same certificate slot), and the bundle's certificates; a file that does not load
    /// fails the reload before anything changes.
    fn check_client_ca(&self, next: &GatewayConfig) -> Result<CheckedClientCa, ReloadError> {
        let ca = next
            .client_ca
            .as_deref()
            .map(tls::ClientCa::load)
            .transpose()
            .map_err(ReloadError::ClientCa)?;
        let config = tls::agent_server_config(self.agent_cert.clone(), ca.as_ref())
            .map_err(ReloadError::ClientCa)?;
        Ok(CheckedClientCa {
            config,
            certs: ca.map(|ca| ca.certs),
        })
    }

    /// New agent handshakes are verified against the reloaded bundle; sessions already
    /// established keep the verification they passed.
    fn replace_client_ca(&self, server: &AgentServer, checked: CheckedClientCa) {
        let mut running = self.client_ca.lock();
        match (running.as_ref(), checked.certs.as_ref()) {
            (was, now) if was == now => return,
            (None, Some(now)) => tracing::info!(
                "gateway.client_ca added: new agents must present a certificate from one of its {} CAs",
                now.len()
            ),
            (_, None) => tracing::info!(
                "gateway.client_ca removed: new agents connect without a client certificate"
            ),
            (Some(_), Some(now)) => tracing::info!(
                "gateway.client_ca changed: new agents are verified against its {} CAs",
                now.len()
            ),
        }
        server.replace_tls(checked.config);
        *running = checked.certs;
    }

    /// The HTTPS front end's own certificate, when it has one, is replaced with the
    /// listeners (every file was checked before either is swapped).
    fn replace_certificate(&self, config: &GatewayConfig, checked: tls::CheckedKey) {
        let before = self.agent_cert.leaf();
        let validity = self.agent_cert.store(checked);
        self.metrics.reloads.tls_expiry(validity.not_after);
        if before != self.agent_cert.leaf() {
            tracing::info!(
                cert = %config.tls_cert.display(),
                "tls certificate replaced (new expiry {})",
                validity.expiry()
            );
            warn_if_expiring(&config.tls_cert, validity.not_after);
        } else {
            tracing::info!("tls certificate unchanged");
        }
    }

    /// New connections (and each new request of a keep-alive HTTP connection) are
    /// checked against the new logins; sessions and tunnels already open carry on.
    fn replace_logins(&self, running: &Running, next: &Next) {
        let (old, new) = (&running.gateway, &next.gateway);
        log_changes(&agent_logins(old), &agent_logins(new), "agent login");
        let agents = running
            .backends
            .authority(&new.agent_auth, agent_accounts(new))
            .for_agents();
        self.agents.replace(agents);
        for front in [Front::Http, Front::Https, Front::Socks5] {
            // A front end that starts gets its users as it starts; one that stops keeps
            // its users' live connections until they finish.
            let (Some((was, authority)), Some(now)) =
                (running.listeners.front(front), front.of(&next.proxy))
            else {
                continue;
            };
            let name = front.key();
            let (before, after) = (
                proxy_users(Some(was), &old.groups),
                proxy_users(Some(now), &new.groups),
            );
            log_changes(&before, &after, &format!("{name} user"));
            let next = running
                .backends
                .authority(&now.auth, listener_accounts(now, &new.groups));
            if next.is_open() {
                tracing::warn!(
                    listener = name,
                    "proxy listener has no credentials now: anyone who can reach it may use it"
                );
            }
            authority.replace(next);
            // After the swap: a user authenticating now meets the new rules.
            revoke_removed(authority, name, &before, &after);
        }
    }
}

/// What the access line of a connection closed by [`revoke_removed`] says.
const USER_REMOVED: &str = "proxy user removed by a reload";

/// Closes the live connections of the users gone from `after`, or moved to another
/// group (their connections ride the old group's agents): ACLs apply to every
/// connection, not only at login.
fn revoke_removed(
    users: &crate::auth::Authority,
    listener: &str,
    before: &BTreeMap<String, (String, String)>,
    after: &BTreeMap<String, (String, String)>,
) {
    for (name, (group, _)) in before {
        let gone = after.get(name).is_none_or(|(now, _)| now != group);
        if gone && users.revoke(name, USER_REMOVED) {
            tracing::warn!(
                listener,
                user = %name,
                "closing the live connections of a user the reload removed"
            );
        }
    }
}

/// The configuration a reload is about to apply.
struct Next {
    gateway: GatewayConfig,
    proxy: crate::config::ProxyConfig,
}

impl Next {
    /// Every chain names only backends that run: the backends themselves are opened at
    /// start (a users file watched, a directory's TLS configured), not by a reload.
    fn check_backends(&self, backends: &AuthBackends) -> Result<(), ReloadError> {
        let chains = [
            ("gateway.agent_auth", Some(&self.gateway.agent_auth)),
            ("proxy.http.auth", self.proxy.http.as_ref().map(|l| &l.auth)),
            (
                "proxy.https.auth",
                self.proxy.https.as_ref().map(|l| &l.auth),
            ),
            (
                "proxy.socks5.auth",
                self.proxy.socks5.as_ref().map(|l| &l.auth),
            ),
        ];
        for (key, names) in chains {
            if let Some(name) = names
                .into_iter()
                .flatten()
                .find(|n| !backends.runs(n.as_str()))
            {
                return Err(ReloadError::NewBackend {
                    key,
                    name: name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Agent logins: the default group's (named with its username) and each group's, by
/// name, to their password.
fn agent_logins(g: &GatewayConfig) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        format!("{DEFAULT_GROUP} ({})", g.auth_username),
        g.auth_password.expose().to_owned(),
    );
    for x in &g.groups {
        m.insert(x.id.clone(), x.agent_password.expose().to_owned());
    }
    m
}

/// A listener's proxy users, by name, to their group and password.
fn proxy_users(
    l: Option<&ProxyListener>,
    groups: &[crate::config::GroupConfig],
) -> BTreeMap<String, (String, String)> {
    let mut m = BTreeMap::new();
    if let Some(c) = l.and_then(|l| l.credentials()) {
        m.insert(c.username, (DEFAULT_GROUP.to_owned(), c.password));
    }
    for g in groups {
        for u in &g.users {
            m.insert(u.username.clone(), (g.id.clone(), u.password.clone()));
        }
    }
    m
}

/// One log line per account added, removed or changed; never the secret.
fn log_changes<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>, what: &str) {
    for (name, value) in new {
        match old.get(name) {
            None => tracing::info!("{what} {name} added"),
            Some(v) if v != value => tracing::info!("{what} {name} changed"),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|k| !new.contains_key(*k)) {
        tracing::info!("{what} {name} removed (new connections are refused; live ones are closed)");
    }
}

/// The keys of `next` that differ from what runs and that a reload does not apply.
///
/// Each configuration struct is destructured field by field, without `..`: a field
/// added to `GatewayConfig` or `ProxyListener` does not compile here until it is
/// declared either reloaded or restart-only.
fn restart_only(running: &Running, next: &Next) -> Vec<&'static str> {
    // The proxy listeners (`Listeners`) take every key of theirs live.
    let (old, new) = (&running.gateway, &next.gateway);
    let mut changed = Vec::new();
    macro_rules! compare {
        ($prefix:literal, $old:expr, $new:expr, $($field:ident),+) => {
            $(
                if format!("{:?}", $old.$field) != format!("{:?}", $new.$field) {
                    changed.push(concat!($prefix, stringify!($field)));
                }
            )+
        };
    }
    let GatewayConfig {
        // Reloaded.
        tls_cert: _,
        tls_key: _,
        auth_username: _,
        auth_password: _,
        groups: _,
        agent_auth: _,
        limits: _,
        client_ca: _,
        deflate: _,
        agent_forwards: _,
        // With the proxy listeners, by `Listeners`.
        forwards: _,
        // Compared below: secrets' Debug is redacted.
        admin_password: _,
        // Restart-only.
        listen_addr: _,
        auth_timeout: _,
        connect_timeout: _,
        max_auth_failures: _,
        auth_failure_window: _,
        auth_lockout: _,
        idle_timeout: _,
        conn_idle_timeout: _,
        max_message_size: _,
        stall_timeout: _,
        max_window: _,
        ping_interval: _,
        encodings: _,
        drain_timeout: _,
        // Its dir is restart-only; the dir's managers.toml is reloaded.
        policy: _,
        admin_addr: _,
        admin_username: _,
        cluster: _,
        trusted_proxies: _,
        auth_backends: _,
        auth_order: _,
        udp_idle_timeout: _,
        udp_max_datagram: _,
        json_conn_buffer: _,
    } = old;
    compare!(
        "gateway.",
        old,
        new,
        listen_addr,
        auth_timeout,
        connect_timeout,
        max_auth_failures,
        auth_failure_window,
        auth_lockout,
        idle_timeout,
        conn_idle_timeout,
        max_message_size,
        stall_timeout,
        max_window,
        ping_interval,
        encodings,
        drain_timeout,
        policy,
        admin_addr,
        admin_username,
        cluster,
        trusted_proxies,
        auth_backends,
        auth_order,
        udp_idle_timeout,
        udp_max_datagram,
        json_conn_buffer
    );
    let secret = |s: &Option<crate::config::Secret>| s.as_ref().map(|s| s.expose().to_owned());
    if secret(&old.admin_password) != secret(&new.admin_password) {
        changed.push("gateway.admin_password");
    }
    changed
}

/// The agent listener's TLS config of a reload, and its `client_ca` bundle.
struct CheckedClientCa {
    config: Arc<rustls::ServerConfig>,
    certs: CaCerts,
}

/// `gateway.deflate` for new agent sessions (live ones keep what they negotiated), and
/// `gateway.agent_forwards` for new forward requests (open forwards it no longer allows
/// are closed; see [`super::forward::AgentForwardTable::reconfigure`]).
fn replace_agent_side(server: &AgentServer, next: &GatewayConfig) {
    let before = server.replace_deflate(next.deflate.clone());
    for change in deflate_changes(&before, &next.deflate) {
        tracing::info!("{change} (for new agent sessions; live ones keep theirs)");
    }
    for change in server.forwards().reconfigure(next.agent_forwards.clone()) {
        tracing::info!("{change}");
    }
}

/// One line per `gateway.deflate` setting that differs.
fn deflate_changes(
    old: &crate::config::DeflateConfig,
    new: &crate::config::DeflateConfig,
) -> Vec<String> {
    // Without `..`: a new setting does not compile until it is listed here.
    let settings = |d: &crate::config::DeflateConfig| {
        let crate::config::DeflateConfig {
            enabled,
            level,
            min_size,
            no_context_takeover,
            max_window_bits,
            adaptive,
        } = d;
        [
            ("enabled", enabled.to_string()),
            ("level", level.to_string()),
            ("min_size", min_size.0.to_string()),
            ("no_context_takeover", no_context_takeover.to_string()),
            ("max_window_bits", max_window_bits.to_string()),
            ("adaptive", adaptive.to_string()),
        ]
    };
    let (old, new) = (settings(old), settings(new));
    old.into_iter()
        .zip(new)
        .filter(|((_, was), (_, now))| was != now)
        .map(|((key, was), (_, now))| format!("gateway.deflate.{key} changed from {was} to {now}"))
        .collect()
}

/// Certificates expiring within this many days are logged as a warning.
pub const CERT_EXPIRY_WARNING_DAYS: i64 = 14;

pub(super) fn warn_if_expiring(cert: &Path, not_after: i64) {
    let days = (not_after - tls::unix_now()).div_euclid(86_400);
    if days < CERT_EXPIRY_WARNING_DAYS {
        tracing::warn!(
            cert = %cert.display(),
            days,
            "the tls certificate expires on {}",
            tls::rfc3339(not_after)
        );
    }
}
