//! `server.toml` as the PMProxy manual writes it: `[api]`, `[api.server]`, `[proxy]`,
//! `[proxy.server]`. Unknown keys are refused and every error names the key.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::HumanDuration;

#[derive(Debug, thiserror::Error)]
pub enum ServerConfError {
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Key {
        file: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConf {
    pub api: ApiConf,
    pub proxy: ProxyConf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConf {
    /// Relative to the config dir.
    #[serde(rename = "httpsCert", default = "default_cert")]
    pub https_cert: String,
    #[serde(rename = "httpsKey", default = "default_key")]
    pub https_key: String,
    /// Relative to the config dir; empty serves no static files.
    #[serde(rename = "webStaticFilesDir", default)]
    pub web_static_files_dir: String,
    #[serde(rename = "persistInterval", default = "default_persist")]
    pub persist_interval: HumanDuration,
    #[serde(rename = "excludedRoutes", default)]
    pub excluded_routes: Vec<String>,
    pub server: SrvConf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConf {
    #[serde(rename = "dialTimeout", default = "default_dial")]
    pub dial_timeout: HumanDuration,
    /// Targets the proxy never dials, in the agent's `forbidden_hosts` syntax (names,
    /// `*.suffix`, IPs, CIDRs), checked on the name and on every resolved address.
    /// Absent: [`DEFAULT_FORBIDDEN`]; `[]` forbids nothing.
    #[serde(rename = "forbiddenHosts", default = "default_forbidden")]
    pub forbidden_hosts: Vec<String>,
    pub server: SrvConf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrvConf {
    /// Bounds reading a request (Go's `http.Server.ReadTimeout`, which the upstream set).
    #[serde(rename = "readTimeout", default = "default_read")]
    pub read_timeout: HumanDuration,
    /// Bounds writing a response (Go's `WriteTimeout`).
    #[serde(rename = "writeTimeout", default = "default_write")]
    pub write_timeout: HumanDuration,
    /// `host:port`; Go's `:port` means every interface.
    pub addr: String,
    /// Upstream chose between two Go HTTP servers; there is one implementation here, so
    /// the value is accepted and has no effect.
    #[serde(rename = "fastOrStd", default)]
    pub fast_or_std: bool,
}

fn default_cert() -> String {
    "cert.pem".into()
}
fn default_key() -> String {
    "key.pem".into()
}
fn default_persist() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
/// This host and the link-local range (cloud metadata services live there): without
/// them, any user of the proxy could reach the policy API and whatever else listens on
/// loopback, from the proxy's own address. Private networks stay reachable; an office
/// proxy exists to reach them.
pub const DEFAULT_FORBIDDEN: [&str; 7] = [
    "localhost",
    "*.localhost",
    "127.0.0.0/8",
    "::1/128",
    "0.0.0.0/8",
    "169.254.0.0/16",
    "fe80::/10",
];

fn default_forbidden() -> Vec<String> {
    DEFAULT_FORBIDDEN.iter().map(|s| s.to_string()).collect()
}

impl ProxyConf {
    /// The egress ACL of `forbiddenHosts`.
    pub fn acl(&self) -> Result<crate::dial::acl::Acl, crate::dial::acl::AclError> {
        crate::dial::acl::Acl::new(&self.forbidden_hosts, &[])
    }
}

fn default_dial() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_read() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_write() -> HumanDuration {
    HumanDuration(Duration::from_secs(20))
}

/// What a fresh config dir gets: loopback only, so a first start exposes nothing.
pub const DEFAULT_SERVER_TOML: &str = r#"# anyproxy pmproxy: server.toml (keys as in the PMProxy manual; see docs/POLICY.md).
# Durations: "ns", "ms", "s", "m", "h". Paths are relative to this directory.
[api]
	httpsCert = "cert.pem"
	httpsKey = "key.pem"
	webStaticFilesDir = "staticFiles"
	persistInterval = "5m"
	excludedRoutes = []
	[api.server]
		addr = "127.0.0.1:4443"
		readTimeout = "30s"
		writeTimeout = "20s"
		fastOrStd = false

[proxy]
	dialTimeout = "10s"
	# Never dialed (names, *.suffix, IPs, CIDRs); [] forbids nothing.
	forbiddenHosts = ["localhost", "*.localhost", "127.0.0.0/8", "::1/128", "0.0.0.0/8", "169.254.0.0/16", "fe80::/10"]
	[proxy.server]
		addr = "127.0.0.1:8080"
		readTimeout = "30s"
		writeTimeout = "20s"
		fastOrStd = false
"#;

impl ServerConf {
    /// The keys `new` changes that only a restart applies. A reload applies the others:
    /// `proxy.dialTimeout`, `proxy.forbiddenHosts`, `proxy.server.readTimeout` and
    /// `proxy.server.writeTimeout` (to the connections and dials that start after it).
    pub fn restart_only_changes(&self, new: &ServerConf) -> Vec<&'static str> {
        let ServerConf { api, proxy } = self;
        let ApiConf {
            https_cert,
            https_key,
            web_static_files_dir,
            persist_interval,
            excluded_routes,
            server,
        } = api;
        let ProxyConf {
            dial_timeout: _,
            forbidden_hosts: _,
            server: proxy_server,
        } = proxy;
        let SrvConf {
            read_timeout: _,
            write_timeout: _,
            addr,
            fast_or_std,
        } = proxy_server;
        let (na, np) = (&new.api, &new.proxy.server);
        [
            (*https_cert != na.https_cert, "api.httpsCert"),
            (*https_key != na.https_key, "api.httpsKey"),
            (
                *web_static_files_dir != na.web_static_files_dir,
                "api.webStaticFilesDir",
            ),
            (
                *persist_interval != na.persist_interval,
                "api.persistInterval",
            ),
            (*excluded_routes != na.excluded_routes, "api.excludedRoutes"),
            (*server != na.server, "api.server"),
            (*addr != np.addr, "proxy.server.addr"),
            (*fast_or_std != np.fast_or_std, "proxy.server.fastOrStd"),
        ]
        .into_iter()
        .filter_map(|(changed, key)| changed.then_some(key))
        .collect()
    }

    pub fn from_toml(file: &str, text: &str) -> Result<ServerConf, ServerConfError> {
        let conf: ServerConf = toml::from_str(text).map_err(|e| ServerConfError::Syntax {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let key_err = |key: &str, message: String| ServerConfError::Key {
            file: file.to_string(),
            key: key.to_string(),
            message,
        };
        for (key, srv) in [
            ("api.server", &conf.api.server),
            ("proxy.server", &conf.proxy.server),
        ] {
            srv.socket_addr()
                .map_err(|m| key_err(&format!("{key}.addr"), m))?;
            for (name, d) in [
                ("readTimeout", srv.read_timeout),
                ("writeTimeout", srv.write_timeout),
            ] {
                if d.0.is_zero() {
                    return Err(key_err(
                        &format!("{key}.{name}"),
                        "must be more than 0".into(),
                    ));
                }
            }
        }
        if conf.api.persist_interval.0.is_zero() {
            return Err(key_err("api.persistInterval", "must be more than 0".into()));
        }
        if conf.proxy.dial_timeout.0.is_zero() {
            return Err(key_err("proxy.dialTimeout", "must be more than 0".into()));
        }
        if let Err(e) = conf.proxy.acl() {
            return Err(key_err("proxy.forbiddenHosts", e.to_string()));
        }
        for r in &conf.api.excluded_routes {
            if !r.starts_with('/') {
                return Err(key_err(
                    "api.excludedRoutes",
                    format!("{r:?} must start with `/`"),
                ));
            }
        }
        Ok(conf)
    }

    pub fn load(path: &Path) -> Result<ServerConf, ServerConfError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ServerConfError::Syntax {
            file: file.clone(),
            message: e.to_string(),
        })?;
        Self::from_toml(&file, &text)
    }
}

impl SrvConf {
    /// The address to listen on. `:port` (Go) is every interface; a host name is
    /// resolved and its first address used.
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        let a = self.addr.trim();
        let a = match a.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => a.to_string(),
        };
        if let Ok(sa) = a.parse::<SocketAddr>() {
            return Ok(sa);
        }
        a.to_socket_addrs()
            .map_err(|e| format!("{:?}: {e} (expected host:port or :port)", self.addr))?
            .next()
            .ok_or_else(|| format!("{:?}: resolves to no address", self.addr))
    }

    pub fn read_timeout(&self) -> Duration {
        self.read_timeout.0
    }

    pub fn write_timeout(&self) -> Duration {
        self.write_timeout.0
    }
}

impl ApiConf {
    /// `None` when `webStaticFilesDir` is empty.
    pub fn static_dir(&self, config_dir: &Path) -> Option<PathBuf> {
        (!self.web_static_files_dir.is_empty()).then(|| config_dir.join(&self.web_static_files_dir))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_default_forbids_this_host_and_link_local_but_not_private_networks() {
        let conf = ServerConf::from_toml("server.toml", DEFAULT_SERVER_TOML).unwrap();
        assert_eq!(conf.proxy.forbidden_hosts, default_forbidden());
        let acl = conf.proxy.acl().unwrap();
        for (host, port) in [
            ("localhost", 80),
            ("127.0.0.1", 4443),
            ("::1", 22),
            ("169.254.169.254", 80),
        ] {
            assert!(acl.check_name(host, port).is_err(), "{host}");
        }
        let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert!(acl.check_addr(mapped, "sneaky.example").is_err());
        for host in ["10.1.2.3", "192.168.1.1", "example.com"] {
            assert!(acl.check_name(host, 443).is_ok(), "{host}");
        }
        let bad = DEFAULT_SERVER_TOML.replace("\"0.0.0.0/8\"", "\"10.0.0.0/99\"");
        let err = ServerConf::from_toml("server.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy.forbiddenHosts"), "{err}");
    }
    use super::*;

    const MANUAL: &str = r#"
[api]
	excludedRoutes=["/about"]
	httpsCert="cert.pem"
	httpsKey="key.pem"
	webStaticFilesDir="staticFiles"
	persistInterval="5m"
	[api.server]
		readTimeout="30s"
		writeTimeout="20s"
		addr=":4443"
		fastOrStd=false

[proxy]
	dialTimeout="10s"
	[proxy.server]
		readTimeout="30s"
		writeTimeout="20s"
		addr=":8080"
		fastOrStd=false
"#;

    #[test]
    fn the_manuals_example_loads() {
        let c = ServerConf::from_toml("server.toml", MANUAL).unwrap();
        assert_eq!(
            c.api.server.socket_addr().unwrap(),
            "0.0.0.0:4443".parse().unwrap()
        );
        assert_eq!(c.api.persist_interval.0, Duration::from_secs(300));
        assert_eq!(c.api.server.write_timeout(), Duration::from_secs(20));
        assert_eq!(c.proxy.dial_timeout.0, Duration::from_secs(10));
        assert_eq!(c.api.excluded_routes, ["/about"]);
        assert_eq!(
            c.api.static_dir(Path::new("/etc/pm")),
            Some(PathBuf::from("/etc/pm/staticFiles"))
        );
        ServerConf::from_toml("server.toml", DEFAULT_SERVER_TOML).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| {
            ServerConf::from_toml("server.toml", text)
                .unwrap_err()
                .to_string()
        };
        let e = err(&MANUAL.replace(
            "fastOrStd=false\n\n[proxy]",
            "fastOrStd=false\n\tloginAddr=\"x\"\n\n[proxy]",
        ));
        assert!(e.contains("loginAddr"), "{e}");
        let e = err(&MANUAL.replace("readTimeout=\"30s\"", "readTimeout=\"30 parsecs\""));
        assert!(e.contains("readTimeout"), "{e}");
        let e = err(&MANUAL.replace("addr=\":8080\"", "addr=\"nonsense\""));
        assert!(e.contains("proxy.server.addr"), "{e}");
        let e = err(&MANUAL.replace("persistInterval=\"5m\"", "persistInterval=\"0s\""));
        assert!(e.contains("api.persistInterval"), "{e}");
        let e = err(&MANUAL.replace("[\"/about\"]", "[\"about\"]"));
        assert!(e.contains("api.excludedRoutes"), "{e}");
    }
}
