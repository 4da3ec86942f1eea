//! `gateway:`, the public side: its listener, TLS and credentials, agent groups and
//! their users, the authentication backends and chains, the admin listener, the policy
//! dir, with their defaults and checks. Forwards are in `forwards.rs`, limits in
//! `limits.rs`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::limits::{default_max_auth_failures, default_minute};
use super::session::{
    check_heartbeat, check_json_conn_buffer, check_max_window, default_conn_idle_timeout,
    default_drain_timeout, default_idle_timeout, default_json_conn_buffer, default_max_message,
    default_max_window, default_ping_interval, default_stall_timeout,
};
use super::units::admin_config;
use super::{
    udp, AdminConfig, AgentForwards, AuthOrder, BackendConfig, ClusterConfig, ConfigError,
    DeflateConfig, EncodingName, ForwardConfig, LimitsConfig, ListenAddr, ProxyConfig, STATIC,
};
use crate::net::{ByteSize, Credentials, HumanDuration, Secret};

/// The group agents join with the gateway's own `auth_username`/`auth_password`, and
/// that proxy users of a listener's own credentials (or of an open listener) reach.
pub const DEFAULT_GROUP: &str = "default";

/// A group of agents serving one private network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Agents join by authenticating with `username` = this id.
    pub id: String,
    /// ... and `password` = this secret. Only the gateway's configuration sets it;
    /// nothing an agent sends can change it.
    pub agent_password: Secret,
    /// Proxy accounts bound to this group: their connections leave through its agents.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserConfig({:?}, <redacted>)", self.username)
    }
}

impl From<&UserConfig> for Credentials {
    fn from(u: &UserConfig) -> Credentials {
        Credentials {
            username: u.username.clone(),
            password: u.password.clone(),
        }
    }
}

fn default_auth_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(15))
}

fn default_encodings() -> Vec<EncodingName> {
    vec![EncodingName::Binary, EncodingName::Json]
}

/// The public side: agents connect here over WebSocket + TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen_addr: ListenAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub auth_username: String,
    pub auth_password: Secret,
    /// An agent must authenticate within this time after the WebSocket opens.
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout: HumanDuration,
    /// How long a proxy user waits for the agent's `connect_response`.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Failed authentications from one IP within `auth_failure_window` before lockout.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u32,
    #[serde(default = "default_minute")]
    pub auth_failure_window: HumanDuration,
    #[serde(default = "default_minute")]
    pub auth_lockout: HumanDuration,
    /// A session that sends nothing (not even a heartbeat) for this long is dropped.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A tunnelled connection with no byte either way for this long is closed, freeing
    /// its slot, its caps and the agent's socket; `0s` keeps idle connections forever.
    #[serde(default = "default_conn_idle_timeout")]
    pub conn_idle_timeout: HumanDuration,
    /// Largest WebSocket message accepted from an agent.
    #[serde(default = "default_max_message")]
    pub max_message_size: ByteSize,
    /// JSON mode (no flow control): a connection with more than `json_conn_buffer`
    /// queued toward its user, of which nothing was taken for this long, is closed (the
    /// user stopped reading).
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: HumanDuration,
    /// JSON mode: bytes one connection queues toward its local socket before the
    /// session reader waits for it (while it moves) or the `stall_timeout` grace starts
    /// (once it stops); a stopped connection holds at most twice this.
    #[serde(default = "default_json_conn_buffer")]
    pub json_conn_buffer: ByteSize,
    /// Binary mode: the largest receive window one connection may grow to, i.e. the
    /// most the agent can have in flight toward one stalled user.
    #[serde(default = "default_max_window")]
    pub max_window: ByteSize,
    /// Heartbeat `ping` toward each agent; the pongs time the round trip.
    #[serde(default = "default_ping_interval")]
    pub ping_interval: HumanDuration,
    /// Encodings agents may negotiate.
    #[serde(default = "default_encodings")]
    pub encodings: Vec<EncodingName>,
    /// permessage-deflate toward agents that offer it (off by default).
    #[serde(default)]
    pub deflate: DeflateConfig,
    /// At shutdown, how long live tunnelled connections may take to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// PEM CA(s): when set, agents must present a client certificate that chains to
    /// one of them, checked in the TLS handshake before any `auth`.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Further agent groups besides [`DEFAULT_GROUP`].
    #[serde(default)]
    pub groups: Vec<GroupConfig>,
    /// Ports the gateway listens on and carries to a target through a group's agents.
    #[serde(default)]
    pub forwards: Vec<ForwardConfig>,
    /// Lets agents ask for forwards of their own (`client.open_ports`); absent = refused.
    #[serde(default)]
    pub agent_forwards: Option<AgentForwards>,
    /// PMProxy rules deciding every proxy request (`docs/POLICY.md`); absent = allow.
    #[serde(default)]
    pub policy: Option<GatewayPolicy>,
    /// Admin listener (metrics, health, status page); off unless set. See README.
    #[serde(default)]
    pub admin_addr: Option<ListenAddr>,
    /// Basic-auth credentials for the admin listener; both or neither.
    #[serde(default)]
    pub admin_username: Option<String>,
    #[serde(default)]
    pub admin_password: Option<Secret>,
    /// Connection caps, proxy-auth lockout and bandwidth caps; all off by default.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Shared state with the other gateways of a cluster (Redis); absent = this
    /// process alone.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// Load balancers (CIDRs) whose PROXY protocol headers the listeners with
    /// `proxy_protocol: true` accept; required when any listener sets it.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::net::Cidr>,
    /// Named authentication backends (`file`, `http`) that listeners' `auth` and
    /// `agent_auth` refer to. See docs/AUTH.md.
    #[serde(default)]
    pub auth_backends: std::collections::BTreeMap<String, BackendConfig>,
    /// The backends agents authenticate with, in order; default `[static]` (the
    /// gateway's own credentials and the groups' agent passwords).
    #[serde(default)]
    pub agent_auth: Vec<String>,
    /// How chains combine their backends: `first_allow` (default) or `first_answer`.
    #[serde(default)]
    pub auth_order: AuthOrder,
    /// A datagram flow (SOCKS5 UDP, a UDP forward) with no datagram either way for this
    /// long is closed; 60 s by default.
    #[serde(default = "udp::default_udp_idle_timeout")]
    pub udp_idle_timeout: HumanDuration,
    /// Datagrams larger than this are dropped and counted; at most 65507 (the default).
    #[serde(default = "udp::default_udp_max_datagram")]
    pub udp_max_datagram: ByteSize,
}

impl GatewayConfig {
    pub fn admin(&self) -> Option<AdminConfig> {
        admin_config(&self.admin_addr, &self.admin_username, &self.admin_password)
    }

    /// The section's own checks, and those of the `proxy:` listeners it serves, in the
    /// order `Config::validate` has always run them.
    pub fn validate(&self, proxy: Option<&ProxyConfig>) -> Result<(), ConfigError> {
        if self.encodings.is_empty() {
            return Err(ConfigError::Semantic(
                "gateway.encodings must allow at least one encoding".into(),
            ));
        }
        check_max_window("gateway.max_window", self.max_window)?;
        udp::check_max_datagram("gateway.udp_max_datagram", self.udp_max_datagram)
            .map_err(ConfigError::Semantic)?;
        check_json_conn_buffer("gateway.json_conn_buffer", self.json_conn_buffer)?;
        self.check_groups(proxy)?;
        self.check_auth(proxy)?;
        if let Some(c) = &self.cluster {
            super::cluster::validate(c).map_err(ConfigError::Semantic)?;
        }
        for (i, f) in self.forwards.iter().enumerate() {
            f.check(i, &self.groups)?;
        }
        check_heartbeat("gateway", self.ping_interval, self.idle_timeout)?;
        self.limits.check(&self.groups)?;
        self.check_proxy_protocol(proxy)?;
        // The proxy listeners are the gateway's: their TLS is checked with it.
        if let Some(p) = proxy {
            p.check_tls()?;
        }
        self.deflate
            .validate()
            .map_err(|e| ConfigError::Semantic(format!("gateway.{e}")))?;
        Ok(())
    }

    /// Group ids and proxy usernames must be unambiguous: an agent's username selects its
    /// group, a proxy user's name selects theirs.
    fn check_groups(&self, proxy: Option<&ProxyConfig>) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::Semantic(m));
        let mut ids = std::collections::HashSet::new();
        let mut users = std::collections::HashSet::new();
        if let Some(p) = proxy {
            for (_, l) in p.listeners() {
                if let Some(c) = l.credentials() {
                    users.insert(c.username);
                }
            }
        }
        for (i, group) in self.groups.iter().enumerate() {
            if group.id.is_empty() || group.id == DEFAULT_GROUP {
                return err(format!(
                    "gateway.groups[{i}].id must be non-empty and not {DEFAULT_GROUP:?}"
                ));
            }
            if group.id == self.auth_username {
                return err(format!(
                    "gateway.groups[{i}].id {:?} equals gateway.auth_username, which already selects the default group",
                    group.id
                ));
            }
            if !ids.insert(group.id.as_str()) {
                return err(format!("gateway.groups: id {:?} appears twice", group.id));
            }
            if group.agent_password.is_empty() {
                return err(format!(
                    "gateway.groups[{i}].agent_password must not be empty"
                ));
            }
            for (j, u) in group.users.iter().enumerate() {
                if u.username.is_empty() || u.password.is_empty() {
                    return err(format!(
                        "gateway.groups[{i}].users[{j}]: username and password must not be empty"
                    ));
                }
                if !users.insert(u.username.clone()) {
                    return err(format!(
                        "gateway.groups[{i}].users[{j}]: proxy user {:?} is defined twice",
                        u.username
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every backend well-formed, every chain naming declared backends once each.
    fn check_auth(&self, proxy: Option<&ProxyConfig>) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::Semantic(m));
        for (name, backend) in &self.auth_backends {
            if name.is_empty() || name == STATIC {
                return err(format!(
                    "gateway.auth_backends: {name:?} is reserved (static is the configuration's own accounts)"
                ));
            }
            backend.validate(name).map_err(ConfigError::Semantic)?;
        }
        let mut chains = vec![("gateway.agent_auth".to_owned(), &self.agent_auth)];
        if let Some(p) = proxy {
            chains.extend(
                p.listeners()
                    .map(|(k, l)| (format!("proxy.{k}.auth"), &l.auth)),
            );
        }
        for (key, chain) in chains {
            let mut seen = std::collections::HashSet::new();
            for name in chain {
                if name != STATIC && !self.auth_backends.contains_key(name) {
                    return err(format!(
                        "{key}: {name:?} is neither static nor a backend of gateway.auth_backends"
                    ));
                }
                if !seen.insert(name) {
                    return err(format!("{key}: {name:?} appears twice"));
                }
            }
        }
        Ok(())
    }

    /// `proxy_protocol: true` trusts the headers of `gateway.trusted_proxies` alone: with
    /// none, no connection could ever be accepted.
    fn check_proxy_protocol(&self, proxy: Option<&ProxyConfig>) -> Result<(), ConfigError> {
        if !self.trusted_proxies.is_empty() {
            return Ok(());
        }
        let mut on = Vec::new();
        if let Some(p) = proxy {
            for (key, l) in p.listeners() {
                if l.proxy_protocol {
                    on.push(format!("proxy.{key}"));
                }
            }
        }
        for (i, f) in self.forwards.iter().enumerate() {
            if f.proxy_protocol {
                on.push(format!("gateway.forwards[{i}]"));
            }
        }
        if self
            .agent_forwards
            .as_ref()
            .is_some_and(|a| a.proxy_protocol)
        {
            on.push("gateway.agent_forwards".into());
        }
        match on.first() {
            None => Ok(()),
            Some(first) => Err(ConfigError::Semantic(format!(
                "{first}.proxy_protocol needs gateway.trusted_proxies: the addresses (CIDRs) of the load balancers that may send PROXY headers"
            ))),
        }
    }
}

/// The policy engine on the gateway: a PMProxy config dir (`managers.toml` with the
/// rules, `server.toml` whose `[api]` section places the HTTPS `/api/cmd` API, the
/// certificate, the JWT key and the persisted state), created with defaults if missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayPolicy {
    pub dir: PathBuf,
}

/// `id` names the default group or one of `groups`.
pub(super) fn is_configured_group(groups: &[GroupConfig], id: &str) -> bool {
    id == DEFAULT_GROUP || groups.iter().any(|g| g.id == id)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn human_units_in_fields() {
        let text = "gateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n  auth_timeout: 2m30s\n  max_message_size: 64KiB\n";
        let g = Config::parse(text, Path::new("x.yaml"))
            .unwrap()
            .gateway
            .unwrap();
        assert_eq!(g.auth_timeout.0, Duration::from_secs(150));
        assert_eq!(g.max_message_size.0, 65536);
        let bad = text.replace("2m30s", "soon");
        let err = Config::parse(&bad, Path::new("x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("gateway.auth_timeout"), "{err}");
    }

    #[test]
    fn proxy_protocol_needs_trusted_proxies() {
        let gw = "gateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n";
        let http = "proxy:\n  http: { listen_addr: ':1', proxy_protocol: true }\n";
        let fwd = "  forwards: [{ listen_addr: ':2', target: 'a:1', proxy_protocol: true }]\n";
        let agents =
            "  agent_forwards: { bind: 127.0.0.1, ports: '2000-2001', proxy_protocol: true }\n";
        crate::config::assert_each_refused(
            |text| Config::parse(text, Path::new("x.yaml")),
            &[
                (
                    format!("{http}{gw}"),
                    "proxy.http.proxy_protocol needs gateway.trusted_proxies",
                ),
                (format!("{gw}{fwd}"), "gateway.forwards[0].proxy_protocol"),
                (
                    format!("{gw}{agents}"),
                    "gateway.agent_forwards.proxy_protocol",
                ),
                (
                    format!("{gw}  trusted_proxies: ['10.0.0.0/33']\n"),
                    "not an IP network",
                ),
            ],
        );

        let trusted = "  trusted_proxies: ['10.0.0.0/8', '2001:db8::1']\n";
        let c = Config::parse(&format!("{http}{gw}{fwd}{trusted}"), Path::new("x.yaml")).unwrap();
        assert!(c.proxy.unwrap().http.unwrap().proxy_protocol);
        let g = c.gateway.unwrap();
        assert!(g.forwards[0].proxy_protocol);
        assert!(g.trusted_proxies[0].contains("10.1.2.3".parse().unwrap()));
        assert!(g.trusted_proxies[1].contains("2001:db8::1".parse().unwrap()));
    }
}
