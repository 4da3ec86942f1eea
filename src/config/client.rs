//! `client:`, the agent inside a private network: which gateways it keeps sessions to,
//! how it authenticates, what it may dial (`forbidden_hosts`, `limit`), the ports it
//! asks the gateway to forward (`open_ports`), with their defaults and checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::session::{
    check_heartbeat, check_json_conn_buffer, check_max_window, default_conn_idle_timeout,
    default_drain_timeout, default_idle_timeout, default_json_conn_buffer, default_max_message,
    default_max_window, default_ping_interval, default_stall_timeout,
};
use super::units::admin_config;
use super::{udp, AdminConfig, ConfigError, DeflateConfig, EncodingName, ListenAddr, Protocols};
use crate::net::{ByteSize, Fingerprint, HostPort, HumanDuration, Secret};

fn default_replicas() -> usize {
    1
}

fn default_max_conns() -> usize {
    100
}

fn default_dial_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}

fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

fn default_client_encoding() -> EncodingName {
    EncodingName::Binary
}

/// A forward an agent asks for: the gateway listens on `remote_port` and the agent dials
/// `target` for each connection (`protocol: udp`: each client address's datagrams).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenPort {
    pub remote_port: u16,
    pub target: HostPort,
    /// `tcp` (default) or `udp`, as in `gateway.forwards`.
    #[serde(
        default = "udp::default_forward_protocol",
        deserialize_with = "udp::forward_protocol"
    )]
    pub protocol: anyproxy_proto::Protocol,
}

/// A client agent inside a private network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `host:port` of the gateway; the host is also the name its certificate must carry.
    /// A name with several addresses is several gateways: a session (per replica) to
    /// each. Set this or `gateway_addrs`, not both.
    #[serde(default)]
    pub gateway_addr: String,
    /// Several gateways, each `host:port` as in `gateway_addr`.
    #[serde(default)]
    pub gateway_addrs: Vec<String>,
    /// PEM file of the CA (or the self-signed certificate itself) that the gateway's
    /// certificate must chain to. Without it, the bundled public web roots are used.
    #[serde(default)]
    pub gateway_tls_cert: Option<PathBuf>,
    /// Pins the gateway's certificate by the SHA-256 of its DER form, `sha256:<hex>`
    /// (what `openssl x509 -noout -fingerprint -sha256` prints, colons allowed), without
    /// a file. With `gateway_tls_cert` too, either is accepted.
    #[serde(default)]
    pub gateway_tls_fingerprint: Option<Fingerprint>,
    /// Name to verify the certificate against, when it differs from `gateway_addr`'s host.
    #[serde(default)]
    pub gateway_server_name: Option<String>,
    pub client_id: String,
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    #[serde(default = "default_max_conns")]
    pub max_concurrent_conns: usize,
    /// Authenticates into the default group with the gateway's credentials. Leave it
    /// out and set `group_id` to join another group.
    #[serde(default)]
    pub auth_username: String,
    /// The default group's password, or with `group_id` that group's `agent_password`.
    pub auth_password: Secret,
    /// The group to join; the `auth` message then carries it as the username.
    #[serde(default)]
    pub group_id: Option<String>,
    #[serde(default)]
    pub forbidden_hosts: Vec<String>,
    /// Lets proxy users reach the agent host itself (loopback) and link-local networks
    /// (cloud metadata). Off by default: those are the classic SSRF targets.
    #[serde(default)]
    pub allow_local: bool,
    #[serde(default)]
    pub limit: Vec<LimitRule>,
    #[serde(default = "default_dial_timeout")]
    pub dial_timeout: HumanDuration,
    #[serde(default = "default_ping_interval")]
    pub ping_interval: HumanDuration,
    /// The gateway is declared dead when nothing arrives from it for this long.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A tunnelled connection with no byte either way for this long is closed, on the
    /// agent's side (its target socket); `0s` keeps idle connections forever.
    #[serde(default = "default_conn_idle_timeout")]
    pub conn_idle_timeout: HumanDuration,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    #[serde(default = "default_max_message")]
    pub max_message_size: ByteSize,
    /// JSON mode: as on the gateway, toward the targets.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: HumanDuration,
    #[serde(default = "default_json_conn_buffer")]
    pub json_conn_buffer: ByteSize,
    /// Binary mode: the largest receive window one connection may grow to.
    #[serde(default = "default_max_window")]
    pub max_window: ByteSize,
    /// Encoding to ask the gateway for (`binary` or `json`).
    #[serde(default = "default_client_encoding")]
    pub encoding: EncodingName,
    /// permessage-deflate offered to the gateway (off by default).
    #[serde(default)]
    pub deflate: DeflateConfig,
    /// Ports this agent asks the gateway to listen on and forward to it (binary mode;
    /// the gateway must allow them with `agent_forwards`).
    #[serde(default)]
    pub open_ports: Vec<OpenPort>,
    /// At shutdown, how long live tunnelled connections may take to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// PEM client certificate (chain) presented to a gateway that requires one.
    #[serde(default)]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert`.
    #[serde(default)]
    pub tls_client_key: Option<PathBuf>,
    /// Admin listener (metrics, health, status page); off unless set. See README.
    #[serde(default)]
    pub admin_addr: Option<ListenAddr>,
    /// Basic-auth credentials for the admin listener; both or neither.
    #[serde(default)]
    pub admin_username: Option<String>,
    #[serde(default)]
    pub admin_password: Option<Secret>,
    /// What this agent carries: `[tcp, udp]` (default) or either alone; a `connect`
    /// for another protocol is refused as a forbidden host, naming the list.
    #[serde(default)]
    pub protocols: Protocols,
    /// A datagram flow with no datagram either way for this long is closed (its UDP
    /// socket released); 60 s by default.
    #[serde(default = "udp::default_udp_idle_timeout")]
    pub udp_idle_timeout: HumanDuration,
    /// Datagrams larger than this are dropped and counted; at most 65507 (the default).
    #[serde(default = "udp::default_udp_max_datagram")]
    pub udp_max_datagram: ByteSize,
}

impl ClientConfig {
    /// The configured gateways, `host:port` each: `gateway_addrs`, or `gateway_addr`.
    pub fn gateways(&self) -> impl Iterator<Item = &str> {
        let one = (!self.gateway_addr.is_empty()).then_some(self.gateway_addr.as_str());
        one.into_iter()
            .chain(self.gateway_addrs.iter().map(String::as_str))
    }

    pub fn admin(&self) -> Option<AdminConfig> {
        admin_config(&self.admin_addr, &self.admin_username, &self.admin_password)
    }

    /// The section's own checks, in the order `Config::validate` has always run them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replicas == 0 {
            return Err(ConfigError::Semantic(
                "client.replicas must be at least 1".into(),
            ));
        }
        match (self.gateway_addr.is_empty(), self.gateway_addrs.is_empty()) {
            (true, true) => {
                return Err(ConfigError::Semantic(
                    "client: gateway_addr or gateway_addrs is required".into(),
                ))
            }
            (false, false) => {
                return Err(ConfigError::Semantic(
                    "client: set either gateway_addr or gateway_addrs, not both".into(),
                ))
            }
            _ => {}
        }
        for a in self.gateways() {
            a.parse::<HostPort>()
                .map_err(|e| ConfigError::Semantic(format!("client: gateway address {e}")))?;
        }
        if self.max_concurrent_conns == 0 {
            return Err(ConfigError::Semantic(
                "client.max_concurrent_conns must be at least 1".into(),
            ));
        }
        check_max_window("client.max_window", self.max_window)?;
        udp::check_max_datagram("client.udp_max_datagram", self.udp_max_datagram)
            .map_err(ConfigError::Semantic)?;
        check_json_conn_buffer("client.json_conn_buffer", self.json_conn_buffer)?;
        match (&self.group_id, self.auth_username.is_empty()) {
            (Some(_), false) => {
                return Err(ConfigError::Semantic(
                    "client: set either auth_username (the default group) or group_id, not both"
                        .into(),
                ))
            }
            (Some(g), true) if g.is_empty() => {
                return Err(ConfigError::Semantic(
                    "client.group_id must not be empty".into(),
                ))
            }
            (None, true) => {
                return Err(ConfigError::Semantic(
                    "client: auth_username (the default group) or group_id is required".into(),
                ))
            }
            _ => {}
        }
        check_heartbeat("client", self.ping_interval, self.idle_timeout)?;
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            return Err(ConfigError::Semantic(
                "client.tls_client_cert and client.tls_client_key go together".into(),
            ));
        }
        self.deflate
            .validate()
            .map_err(|e| ConfigError::Semantic(format!("client.{e}")))?;
        Ok(())
    }
}

/// An allowlist entry: when `limit` is non-empty only these targets may be dialed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    #[serde(default)]
    pub name: Option<String>,
    pub addr: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "tcp".into()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn one_gateway_or_a_list_of_them() {
        let rest = "  client_id: c\n  auth_username: u\n  auth_password: p\n";
        let parse = |gw: &str| Config::parse(&format!("client:\n{gw}{rest}"), Path::new("x.yaml"));
        let one = parse("  gateway_addr: 'g:1'\n").unwrap().client.unwrap();
        assert_eq!(one.gateways().collect::<Vec<_>>(), ["g:1"]);
        let list = parse("  gateway_addrs: ['a:1', '[::1]:2']\n")
            .unwrap()
            .client
            .unwrap();
        assert_eq!(list.gateways().collect::<Vec<_>>(), ["a:1", "[::1]:2"]);
        crate::config::assert_each_refused(
            parse,
            &[
                ("", "is required"),
                ("  gateway_addrs: []\n", "is required"),
                (
                    "  gateway_addr: 'g:1'\n  gateway_addrs: ['a:1']\n",
                    "not both",
                ),
                ("  gateway_addrs: ['a:1', 'nohost']\n", "nohost"),
            ],
        );
    }

    #[test]
    fn fingerprints_parse_as_openssl_prints_them() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        for text in [
            format!("sha256:{hex}"),
            format!("SHA256:{colons}"),
            format!("sha256 Fingerprint={colons}"),
        ] {
            let f: Fingerprint = text.parse().unwrap();
            assert_eq!(f.0, [0xab; 32], "{text}");
            assert_eq!(f.to_string(), format!("sha256:{hex}"));
        }
        for bad in [
            "",
            "ab",
            "sha1:abcd",
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
        let text = "client:\n  gateway_addr: 'g:1'\n  client_id: c\n  auth_username: u\n  auth_password: p\n  gateway_tls_fingerprint: 'sha256:12'\n";
        let err = Config::parse(text, Path::new("x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("client.gateway_tls_fingerprint"), "{err}");
    }
}
