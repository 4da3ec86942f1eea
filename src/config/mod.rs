//! Configuration: the YAML shapes of the API document (`proxy`, `gateway`, `client`),
//! any of which may stand in one file. Unknown keys are refused with their path.

mod client;
mod cluster;
mod deflate;
mod forwards;
mod gateway;
mod limits;
mod log;
pub mod profile;
mod proxy;
mod session;
mod udp;
mod units;

use std::path::{Path, PathBuf};

pub use crate::net::Fingerprint;
use serde::Deserialize;

pub use crate::auth::config::{BackendConfig, FileConfig, FileFormat, HookConfig, STATIC};
pub use crate::auth::Order as AuthOrder;
pub use crate::net::{
    parse_duration, parse_size, ByteRate, ByteSize, Credentials, HostPort, HumanDuration, Secret,
};
pub use client::{ClientConfig, LimitRule, OpenPort};
pub use cluster::{ClusterConfig, StoreFailureMode};
pub use deflate::{DeflateConfig, MAX_WINDOW_BITS, MIN_WINDOW_BITS};
pub use forwards::{AgentForwards, ForwardConfig};
pub use gateway::{GatewayConfig, GatewayPolicy, GroupConfig, UserConfig, DEFAULT_GROUP};
pub use limits::{BandwidthLimits, ConnCapsConfig, LimitsConfig, ProxyAuthLimits};
pub use log::{apply_level, LevelSwitch, LogConfig, LogFormat};
pub use proxy::{ProxyConfig, ProxyListener};
pub use session::EncodingName;
pub use udp::{Protocols, MAX_UDP_DATAGRAM};
pub use units::{parse_listen_addr, AdminConfig, ListenAddr, PortRange};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: at `{at}`: {message}")]
    Invalid {
        path: PathBuf,
        at: String,
        message: String,
    },
    #[error("{0}")]
    Semantic(String),
}

/// One configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    #[serde(default)]
    pub client: Option<ClientConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses YAML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let de = yaml_serde::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let at = e.path().to_string();
            ConfigError::Invalid {
                path: origin.to_owned(),
                at: if at.is_empty() { ".".into() } else { at },
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Each section checks itself: `proxy`, `client`, then `gateway` (with the proxy
    /// listeners it serves). The first error wins, so this order decides which one a
    /// file with several is told about.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.proxy {
            p.validate()?;
        }
        if let Some(c) = &self.client {
            c.validate()?;
        }
        if let Some(g) = &self.gateway {
            g.validate(self.proxy.as_ref())?;
        }
        Ok(())
    }
}

/// Tests of every section: each case's text, given to `parse`, is refused with an error
/// that says the case's words.
#[cfg(test)]
pub(crate) fn assert_each_refused<T: std::fmt::Debug, S: AsRef<str>>(
    parse: impl Fn(&str) -> Result<T, ConfigError>,
    cases: &[(S, &str)],
) {
    for (bad, why) in cases {
        let err = parse(bad.as_ref()).unwrap_err().to_string();
        assert!(err.contains(why), "{:?}: {err}", bad.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DOC_EXAMPLE: &str = r#"
proxy:
  http:
    listen_addr: ":8080"
    auth_username: "http_user"
    auth_password: "http_password"
  socks5:
    listen_addr: ":1080"
    auth_username: "socks_user"
    auth_password: "socks_password"
gateway:
  listen_addr: ":8443"
  tls_cert: "path/to/cert.pem"
  tls_key: "path/to/key.pem"
  auth_username: "gateway_user"
  auth_password: "gateway_password"
client:
  gateway_addr: "gateway.example.com:8443"
  gateway_tls_cert: "path/to/gateway_cert.pem"
  client_id: "unique_client_identifier"
  replicas: 1
  max_concurrent_conns: 100
  auth_username: "gateway_user"
  auth_password: "gateway_password"
  forbidden_hosts:
    - "internal.company.com"
    - "192.168.0.0/16"
  limit:
    - name: "web-server"
      addr: "localhost:8080"
      protocol: "tcp"
"#;

    #[test]
    fn the_documents_example_parses() {
        let c = Config::parse(DOC_EXAMPLE, Path::new("doc.yaml")).unwrap();
        let http = c.proxy.as_ref().unwrap().http.as_ref().unwrap();
        assert_eq!(http.listen_addr.0, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(http.credentials().unwrap().username, "http_user");
        let g = c.gateway.unwrap();
        assert_eq!(g.auth_timeout.0, Duration::from_secs(10));
        let client = c.client.unwrap();
        assert_eq!(client.forbidden_hosts.len(), 2);
        assert_eq!(client.limit[0].addr, "localhost:8080");
        assert_eq!(client.encoding, EncodingName::Binary);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let text = "gateway:\n  listen_addr: ':1'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n  colour: blue\n";
        let err = Config::parse(text, Path::new("x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        assert!(err.contains("gateway"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_a_password() {
        let text = "proxy:\n  http: { listen_addr: ':1', auth_username: h, auth_password: http-secret }\ngateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: gw-secret\n  admin_addr: '127.0.0.1:10'\n  admin_username: ad\n  admin_password: admin-secret\n  groups:\n    - { id: office, agent_password: group-secret }\n";
        let c = Config::parse(text, Path::new("x.yaml")).unwrap();
        let shown = format!("{c:?}");
        for secret in ["http-secret", "gw-secret", "admin-secret", "group-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(
            c.gateway.unwrap().auth_password.expose(),
            "gw-secret",
            "the value itself is kept"
        );
    }
}
