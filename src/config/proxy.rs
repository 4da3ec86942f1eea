//! `proxy:`, the proxy front ends on the gateway (`http`, `https`, `socks5`): one
//! listener each, with its own credentials, authentication chain and protocols.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, ListenAddr, Protocols};
use crate::net::{Credentials, Secret};

/// Proxy front ends on the gateway.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub http: Option<ProxyListener>,
    /// The HTTP proxy again, behind TLS (`curl -x https://...`, Chromium's
    /// `--proxy-server=https://...`): credentials never cross the network in clear.
    /// A listener of its own rather than a TLS switch on `http`, so that one gateway
    /// can serve both the clients that speak TLS to a proxy and those that cannot.
    #[serde(default)]
    pub https: Option<ProxyListener>,
    #[serde(default)]
    pub socks5: Option<ProxyListener>,
}

impl ProxyConfig {
    /// The configured listeners with their key (`"http"`, `"https"`, `"socks5"`).
    pub fn listeners(&self) -> impl Iterator<Item = (&'static str, &ProxyListener)> {
        [
            ("http", &self.http),
            ("https", &self.https),
            ("socks5", &self.socks5),
        ]
        .into_iter()
        .filter_map(|(k, l)| Some((k, l.as_ref()?)))
    }

    /// What the listeners carry: the HTTP proxy is TCP only.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(http) = &self.http {
            if !http.protocols.tcp {
                return Err(ConfigError::Semantic(
                    "proxy.http.protocols must list tcp: the HTTP proxy carries TCP only".into(),
                ));
            }
        }
        Ok(())
    }

    /// Only `proxy.https` speaks TLS, and its certificate and key go together.
    pub fn check_tls(&self) -> Result<(), ConfigError> {
        for (key, l) in self.listeners() {
            let (cert, tls_key) = (l.tls_cert.is_some(), l.tls_key.is_some());
            if key != "https" && (cert || tls_key) {
                return Err(ConfigError::Semantic(format!(
                    "proxy.{key}.tls_cert/tls_key: only proxy.https serves TLS; declare this listener as proxy.https"
                )));
            }
            if cert != tls_key {
                return Err(ConfigError::Semantic(
                    "proxy.https.tls_cert and proxy.https.tls_key go together (neither: the gateway's own)"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

/// One proxy listener with its own credentials; no credentials means open.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyListener {
    pub listen_addr: ListenAddr,
    #[serde(default)]
    pub auth_username: Option<String>,
    #[serde(default)]
    pub auth_password: Option<Secret>,
    /// Connections start with a PROXY protocol header (v1 or v2) from one of
    /// `gateway.trusted_proxies`, naming the real client; anything else is refused.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The authentication backends of this listener's users, in order (names of
    /// `gateway.auth_backends`, or `static` for the accounts of this configuration);
    /// default `[static]`.
    #[serde(default)]
    pub auth: Vec<String>,
    /// What the listener carries: `[tcp, udp]` (default; SOCKS5 UDP ASSOCIATE) or
    /// `[tcp]`, which answers UDP ASSOCIATE with "command not supported".
    #[serde(default)]
    pub protocols: Protocols,
    /// `proxy.https` only: the certificate chain and key it presents; default the
    /// gateway's own `tls_cert`/`tls_key` (and a SIGHUP rotates either).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl ProxyListener {
    pub fn credentials(&self) -> Option<Credentials> {
        match (&self.auth_username, &self.auth_password) {
            (Some(u), Some(p)) if !u.is_empty() => Some(Credentials {
                username: u.clone(),
                password: p.expose().to_owned(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    #[test]
    fn only_the_https_listener_takes_a_certificate_and_both_files_go_together() {
        let gw = "gateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n";
        let parse =
            |proxy: &str| Config::parse(&format!("proxy:\n{proxy}{gw}"), Path::new("x.yaml"));
        let p = parse("  https: { listen_addr: ':1', tls_cert: c, tls_key: k }\n")
            .unwrap()
            .proxy
            .unwrap();
        let https = p.https.as_ref().unwrap();
        assert_eq!(https.tls_cert.as_deref(), Some(Path::new("c")));
        assert_eq!(p.listeners().map(|(k, _)| k).collect::<Vec<_>>(), ["https"]);
        assert!(parse("  https: { listen_addr: ':1' }\n").is_ok());
        crate::config::assert_each_refused(
            parse,
            &[
                (
                    "  http: { listen_addr: ':1', tls_cert: c, tls_key: k }\n",
                    "only proxy.https",
                ),
                (
                    "  https: { listen_addr: ':1', tls_cert: c }\n",
                    "go together",
                ),
                (
                    "  https: { listen_addr: ':1', proxy_protocol: true }\n",
                    "proxy.https.proxy_protocol",
                ),
                (
                    "  https: { listen_addr: ':1', auth: [corp] }\n",
                    "proxy.https.auth",
                ),
            ],
        );
    }
}
