//! Client profiles: what a proxy client needs to use this gateway's proxy listeners as
//! one user, in the formats of the common clients (a PAC file, Clash / Mihomo YAML,
//! proxychains, shell `export` lines, curl). Built from the configuration alone, so that
//! `anyproxy export` and the admin listener's `/profiles/` print the same text.
//!
//! A profile carries the chosen user's passwords and nobody else's.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{GatewayConfig, ProxyConfig, ProxyListener, STATIC};
use crate::net::{percent_encode, Cidr, Credentials};

/// The formats `export` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pac,
    Clash,
    Proxychains,
    Env,
    Curl,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::Pac,
        Format::Clash,
        Format::Proxychains,
        Format::Env,
        Format::Curl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Format::Pac => "pac",
            Format::Clash => "clash",
            Format::Proxychains => "proxychains",
            Format::Env => "env",
            Format::Curl => "curl",
        }
    }

    /// The media type the admin listener serves it with; browsers and OS settings
    /// expect this one for PAC files.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Pac => "application/x-ns-proxy-autoconfig",
            Format::Clash => "application/yaml; charset=utf-8",
            _ => "text/plain; charset=utf-8",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| ProfileError::Format(s.to_owned()))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("{0:?} is not a profile format (pac, clash, proxychains, env or curl)")]
    Format(String),
    #[error("the configuration has no proxy listener (`proxy: {{http, socks5}}`)")]
    NoListener,
    #[error("several users can use the proxies ({0}): name one (--user, or ?user= on the admin listener)")]
    WhichUser(String),
    #[error("the proxies authenticate through external backends only: name the user (--user)")]
    NeedUser,
    #[error("{0:?} is not an account of this configuration (a listener's auth_username or gateway.groups[].users); users of file, ldap or hook backends have no password here to export")]
    UnknownUser(String),
    #[error("proxy.{listener} listens on every interface ({addr}): give the host name or address clients use (--host)")]
    NeedHost {
        listener: &'static str,
        addr: SocketAddr,
    },
    #[error("{0:?} is not a URL curl can fetch (http:// or https://, no spaces)")]
    Url(String),
    #[error("{0:?} is not a host name or IP address")]
    Host(String),
    #[error("bypass entry {0:?} is neither a network (10.0.0.0/8) nor a domain (corp.example)")]
    Bypass(String),
    #[error("proxychains4 takes the proxy as a numeric IPv4 address, not {0:?}: pass --host with the gateway's IPv4 address")]
    ProxychainsHost(String),
    #[error("proxychains4 cannot carry a username or password with whitespace in it")]
    ProxychainsCredentials,
}

/// Which kind of proxy a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    Socks5,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Socks5 => "socks5",
        }
    }
}

/// One listener as profiles see it: where it listens and whose passwords it knows.
#[derive(Debug, Clone)]
struct Listener {
    kind: Kind,
    addr: SocketAddr,
    /// The static accounts its chain consults (none when the chain leaves `static` out).
    accounts: Vec<Credentials>,
    /// Anyone may use it.
    open: bool,
    /// SOCKS5 UDP ASSOCIATE is served (`protocols` lists udp).
    udp: bool,
}

impl Listener {
    /// The accounts the gateway checks on this listener (see `gateway::listener_accounts`):
    /// its own credentials and every group's users, when `static` is in its chain.
    fn new(kind: Kind, l: &ProxyListener, gateway: &GatewayConfig) -> Listener {
        let uses_static = l.auth.is_empty() || l.auth.iter().any(|n| n == STATIC);
        let mut accounts = Vec::new();
        if uses_static {
            accounts.extend(l.credentials());
            for g in &gateway.groups {
                accounts.extend(g.users.iter().map(Credentials::from));
            }
        }
        let external = l.auth.iter().any(|n| n != STATIC);
        Listener {
            kind,
            addr: l.listen_addr.0,
            open: accounts.is_empty() && !external,
            accounts,
            udp: kind == Kind::Socks5 && l.protocols.udp,
        }
    }
}

/// What profiles are made from: the proxy listeners of one configuration.
#[derive(Debug, Clone, Default)]
pub struct ProfileSource {
    listeners: Vec<Listener>,
}

/// What one profile is for.
#[derive(Debug, Clone, Default)]
pub struct ProfileRequest {
    /// The user; may be left out when only one user (or nobody) can log in.
    pub user: Option<String>,
    /// The name or address clients reach the gateway at; by default the listener's own
    /// address, which must then be a specific one.
    pub host: Option<String>,
    /// Destinations that go direct, beyond [`default_bypass`].
    pub bypass: Vec<Bypass>,
    /// What the curl lines fetch; [`EXAMPLE_URL`] by default.
    pub url: Option<String>,
}

impl ProfileSource {
    pub fn new(gateway: &GatewayConfig, proxy: Option<&ProxyConfig>) -> ProfileSource {
        let mut listeners = Vec::new();
        if let Some(p) = proxy {
            if let Some(l) = &p.http {
                listeners.push(Listener::new(Kind::Http, l, gateway));
            }
            if let Some(l) = &p.socks5 {
                listeners.push(Listener::new(Kind::Socks5, l, gateway));
            }
        }
        ProfileSource { listeners }
    }

    /// Every username some listener knows a password for, sorted, each once.
    pub fn usernames(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .listeners
            .iter()
            .flat_map(|l| l.accounts.iter().map(|a| a.username.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    pub fn profile(&self, req: &ProfileRequest) -> Result<Profile, ProfileError> {
        if self.listeners.is_empty() {
            return Err(ProfileError::NoListener);
        }
        let user = match &req.user {
            Some(u) => Some(u.clone()),
            None => {
                let names = self.usernames();
                match names.len() {
                    0 if self.listeners.iter().any(|l| l.open) => None,
                    0 => return Err(ProfileError::NeedUser),
                    1 => names.into_iter().next(),
                    _ => return Err(ProfileError::WhichUser(names.join(", "))),
                }
            }
        };
        let host = req.host.as_deref().map(check_host).transpose()?;
        let url = match &req.url {
            Some(u) => check_url(u)?,
            None => EXAMPLE_URL.to_owned(),
        };
        let mut endpoints = Vec::new();
        for l in &self.listeners {
            let credentials = match &user {
                Some(u) => match l.accounts.iter().find(|a| &a.username == u) {
                    Some(a) => Some(a.clone()),
                    None if l.open => None,
                    None => continue,
                },
                None => None,
            };
            let host = match &host {
                Some(h) => h.clone(),
                None if l.addr.ip().is_unspecified() => {
                    return Err(ProfileError::NeedHost {
                        listener: l.kind.key(),
                        addr: l.addr,
                    })
                }
                None => l.addr.ip().to_string(),
            };
            endpoints.push(Endpoint {
                kind: l.kind,
                host,
                port: l.addr.port(),
                credentials,
                udp: l.udp,
            });
        }
        if endpoints.is_empty() {
            return Err(ProfileError::UnknownUser(user.unwrap_or_default()));
        }
        let mut bypass = default_bypass();
        bypass.extend(req.bypass.iter().cloned());
        let take = |kind: Kind| endpoints.iter().find(|e| e.kind == kind).cloned();
        Ok(Profile {
            user,
            http: take(Kind::Http),
            socks5: take(Kind::Socks5),
            bypass,
            url,
        })
    }
}

/// A host name or an IP address (IPv6 with or without brackets), nothing that could
/// escape the quoting of any format.
fn check_host(h: &str) -> Result<String, ProfileError> {
    let bare = h.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
    };
    if !h.is_empty() && h.len() <= 253 && h.split('.').all(label_ok) {
        Ok(h.to_ascii_lowercase())
    } else {
        Err(ProfileError::Host(h.to_owned()))
    }
}

fn check_url(u: &str) -> Result<String, ProfileError> {
    let scheme_ok = u.starts_with("http://") || u.starts_with("https://");
    if scheme_ok && u.len() <= 2048 && !u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(u.to_owned())
    } else {
        Err(ProfileError::Url(u.to_owned()))
    }
}

/// A destination that goes direct instead of through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bypass {
    Net(Cidr),
    /// This domain and its subdomains.
    Domain(String),
}

impl std::str::FromStr for Bypass {
    type Err = ProfileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(c) = Cidr::parse(s) {
            return Ok(Bypass::Net(c));
        }
        let domain = s.trim_start_matches('.');
        match check_host(domain) {
            Ok(d) if !d.contains(':') => Ok(Bypass::Domain(d)),
            _ => Err(ProfileError::Bypass(s.to_owned())),
        }
    }
}

/// What never goes through the tunnel: this machine (loopback, `localhost`), its link
/// (link-local addresses, mDNS `.local` names) and plain host names. Private ranges
/// (10/8, 192.168/16, ...) are not in it: they are often the very network behind the
/// agent that the proxy exists to reach; add yours with `--bypass`.
pub fn default_bypass() -> Vec<Bypass> {
    ["127.0.0.0/8", "::1", "169.254.0.0/16", "fe80::/10"]
        .into_iter()
        .filter_map(Cidr::parse)
        .map(Bypass::Net)
        .chain(["localhost", "local"].map(|d| Bypass::Domain(d.to_owned())))
        .collect()
}

fn cidr_text(c: &Cidr) -> String {
    format!("{}/{}", c.network(), c.prefix())
}

/// One proxy listener for one user.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub kind: Kind,
    pub host: String,
    pub port: u16,
    pub credentials: Option<Credentials>,
    /// UDP is carried too (SOCKS5 UDP ASSOCIATE).
    pub udp: bool,
}

impl Endpoint {
    /// `host:port`, with an IPv6 address in brackets.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A proxy URL with percent-encoded credentials, as curl and `*_proxy` take it.
    fn url(&self, scheme: &str) -> String {
        match &self.credentials {
            Some(c) => format!(
                "{scheme}://{}:{}@{}",
                percent_encode(&c.username),
                percent_encode(&c.password),
                self.authority()
            ),
            None => format!("{scheme}://{}", self.authority()),
        }
    }
}

/// One user's view of the proxies.
#[derive(Debug, Clone)]
pub struct Profile {
    pub user: Option<String>,
    pub http: Option<Endpoint>,
    pub socks5: Option<Endpoint>,
    pub bypass: Vec<Bypass>,
    pub url: String,
}

/// A string as a shell word: as is when it is plainly safe, else single-quoted.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'@' | b'%' | b'+' | b'=' | b':' | b',' | b'.' | b'/' | b'_' | b'-'
                )
        });
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A string as a double-quoted scalar: JSON's escaping is valid in YAML and in JavaScript.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

impl Profile {
    pub fn render(&self, format: Format) -> Result<String, ProfileError> {
        Ok(match format {
            Format::Pac => self.pac(),
            Format::Clash => self.clash(),
            Format::Proxychains => self.proxychains()?,
            Format::Env => self.env(),
            Format::Curl => self.curl(),
        })
    }

    fn header(&self, what: &str, format: Format, comment: &str) -> String {
        let who = match &self.user {
            Some(u) => format!("user {}", quoted(u)),
            None => "an open proxy".to_owned(),
        };
        let secret = match format {
            Format::Pac => "",
            _ => "; it carries this user's password",
        };
        format!(
            "{comment} anyproxy client profile for {who}: {what}.\n{comment} Generated by `anyproxy export {}`{secret}.\n",
            format.name()
        )
    }

    fn pac(&self) -> String {
        let mut out = self.header("proxy auto-config", Format::Pac, "//");
        out.push_str("// Browsers ask for the proxy password themselves.\n");
        out.push_str("function FindProxyForURL(url, host) {\n");
        out.push_str("  host = host.toLowerCase().replace(/^\\[|\\]$/g, \"\");\n");
        // An IPv6 literal has no dot either: it is no plain host name.
        out.push_str(
            "  if (host.indexOf(\":\") < 0 && isPlainHostName(host)) return \"DIRECT\";\n",
        );
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for b in &self.bypass {
            match b {
                Bypass::Domain(d) => {
                    let _ = writeln!(
                        out,
                        "  if (host == {} || dnsDomainIs(host, {})) return \"DIRECT\";",
                        quoted(d),
                        quoted(&format!(".{d}"))
                    );
                }
                Bypass::Net(c) => match c.network() {
                    IpAddr::V4(net) => v4.push((net, c.prefix())),
                    // Loopback and link-local are matched by text below.
                    IpAddr::V6(_) if !default_bypass().contains(b) => v6.push(c.clone()),
                    IpAddr::V6(_) => {}
                },
            }
        }
        // Only IP literals are compared: resolving every name would cost a DNS lookup
        // per URL, and a name may exist only behind the agent.
        out.push_str("  if (/^[0-9]+(\\.[0-9]+){3}$/.test(host)) {\n");
        for (net, prefix) in v4 {
            let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
            let _ = writeln!(
                out,
                "    if (isInNet(host, \"{net}\", \"{mask}\")) return \"DIRECT\";"
            );
        }
        out.push_str("  }\n");
        // isInNet is IPv4 only; loopback and link-local by text, others where the
        // browser has isInNetEx (Chromium).
        out.push_str("  if (host.indexOf(\":\") >= 0) {\n");
        out.push_str(
            "    if (host == \"::1\" || /^fe[89ab][0-9a-f]:/.test(host)) return \"DIRECT\";\n",
        );
        for c in v6 {
            let _ = writeln!(
                out,
                "    if (typeof isInNetEx == \"function\" && isInNetEx(host, \"{}\")) return \"DIRECT\";",
                cidr_text(&c)
            );
        }
        out.push_str("  }\n");
        let mut proxies = Vec::new();
        if let Some(h) = &self.http {
            proxies.push(format!("PROXY {}", h.authority()));
        }
        // Browsers cannot log in to a SOCKS5 proxy: offered only when it needs no login
        // or when there is nothing else.
        if let Some(s) = &self.socks5 {
            if s.credentials.is_none() || proxies.is_empty() {
                proxies.push(format!("SOCKS5 {}", s.authority()));
            }
        }
        // No DIRECT fallback: a destination behind the agent is unreachable from here,
        // and a silent detour would hide a proxy that is down.
        let _ = writeln!(out, "  return {};\n}}", quoted(&proxies.join("; ")));
        out
    }

    fn clash(&self) -> String {
        let mut out = self.header("Clash / Mihomo configuration", Format::Clash, "#");
        out.push_str("# Use as is, or merge `proxies` and the `anyproxy` group into yours.\n");
        out.push_str("mixed-port: 7890\nallow-lan: false\nmode: rule\nproxies:\n");
        let mut names = Vec::new();
        for (e, kind) in [(&self.socks5, "socks5"), (&self.http, "http")] {
            let Some(e) = e else { continue };
            let name = format!("anyproxy-{kind}");
            let _ = write!(
                out,
                "  - name: {}\n    type: {kind}\n    server: {}\n    port: {}\n",
                quoted(&name),
                quoted(&e.host),
                e.port
            );
            if let Some(c) = &e.credentials {
                let _ = write!(
                    out,
                    "    username: {}\n    password: {}\n",
                    quoted(&c.username),
                    quoted(&c.password)
                );
            }
            if e.kind == Kind::Socks5 {
                // UDP ASSOCIATE, unless the listener's `protocols` leave udp out.
                let _ = writeln!(out, "    udp: {}", e.udp);
            }
            names.push(quoted(&name));
        }
        let _ = write!(
            out,
            "proxy-groups:\n  - name: \"anyproxy\"\n    type: select\n    proxies: [{}]\nrules:\n",
            names.join(", ")
        );
        for b in &self.bypass {
            let rule = match b {
                Bypass::Domain(d) => format!("DOMAIN-SUFFIX,{d},DIRECT"),
                Bypass::Net(c) if c.network().is_ipv4() => {
                    format!("IP-CIDR,{},DIRECT,no-resolve", cidr_text(c))
                }
                Bypass::Net(c) => format!("IP-CIDR6,{},DIRECT,no-resolve", cidr_text(c)),
            };
            let _ = writeln!(out, "  - {}", quoted(&rule));
        }
        out.push_str("  - \"MATCH,anyproxy\"\n");
        out
    }

    fn proxychains(&self) -> Result<String, ProfileError> {
        // One proxy: strict_chain would chain two, not pick one. SOCKS5 carries any
        // TCP; the HTTP proxy's CONNECT is the fallback.
        let e = self
            .socks5
            .as_ref()
            .or(self.http.as_ref())
            .ok_or(ProfileError::NoListener)?;
        if e.host.parse::<Ipv4Addr>().is_err() {
            return Err(ProfileError::ProxychainsHost(e.host.clone()));
        }
        let mut out = self.header("proxychains4 (proxychains-ng)", Format::Proxychains, "#");
        out.push_str("# Use: proxychains4 -f THIS_FILE COMMAND...\n");
        out.push_str("strict_chain\n# Names are resolved behind the agent, like socks5h://.\nproxy_dns\nremote_dns_subnet 224\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n");
        // proxychains wraps one command on purpose: only the networks asked for with
        // --bypass go direct (IPv4; localnet takes no names).
        for b in &self.bypass[default_bypass().len()..] {
            if let Bypass::Net(c) = b {
                if let IpAddr::V4(net) = c.network() {
                    let mask = Ipv4Addr::from(
                        u32::MAX
                            .checked_shl(32 - u32::from(c.prefix()))
                            .unwrap_or(0),
                    );
                    let _ = writeln!(out, "localnet {net}/{mask}");
                }
            }
        }
        let kind = match e.kind {
            Kind::Http => "http",
            Kind::Socks5 => "socks5",
        };
        let _ = write!(out, "[ProxyList]\n{kind} {} {}", e.host, e.port);
        if let Some(c) = &e.credentials {
            let spaced = |s: &str| s.is_empty() || s.chars().any(char::is_whitespace);
            if spaced(&c.username) || spaced(&c.password) {
                return Err(ProfileError::ProxychainsCredentials);
            }
            let _ = write!(out, " {} {}", c.username, c.password);
        }
        out.push('\n');
        Ok(out)
    }

    fn env(&self) -> String {
        let mut out = self.header("shell environment", Format::Env, "#");
        out.push_str("# Use: . THIS_FILE  (sh, bash, zsh)\n");
        let mut set = |name: &str, value: &str| {
            let v = shell_word(value);
            let _ = writeln!(out, "export {name}={v}");
            let _ = writeln!(out, "export {}={v}", name.to_ascii_uppercase());
        };
        if let Some(h) = &self.http {
            let url = h.url("http");
            set("http_proxy", &url);
            set("https_proxy", &url);
        }
        if let Some(s) = &self.socks5 {
            // socks5h: names are resolved behind the agent.
            set("all_proxy", &s.url("socks5h"));
        }
        let no_proxy: Vec<String> = self
            .bypass
            .iter()
            .map(|b| match b {
                Bypass::Domain(d) => d.clone(),
                Bypass::Net(c) => cidr_text(c),
            })
            .collect();
        set("no_proxy", &no_proxy.join(","));
        out
    }

    fn curl(&self) -> String {
        let mut out = self.header("curl", Format::Curl, "#");
        for line in self.curl_lines(&self.url) {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Commands that fetch `url` through each proxy, as printed by `demo` too.
    pub fn curl_lines(&self, url: &str) -> Vec<String> {
        let url = shell_word(url);
        let mut lines = Vec::new();
        if let Some(h) = &self.http {
            let proxy = shell_word(&h.url("http"));
            lines.push(format!("curl -x {proxy} {url}"));
            // -p: a CONNECT tunnel, as HTTPS and non-HTTP clients use.
            lines.push(format!("curl -p -x {proxy} {url}"));
        }
        if let Some(s) = &self.socks5 {
            lines.push(format!("curl -x {} {url}", shell_word(&s.url("socks5h"))));
        }
        lines
    }
}

/// What the curl profile fetches unless told otherwise.
pub const EXAMPLE_URL: &str = "https://example.com/";

#[cfg(test)]
mod tests {
    use super::*;

    fn source(yaml: &str) -> ProfileSource {
        let c = crate::config::Config::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        ProfileSource::new(c.gateway.as_ref().unwrap(), c.proxy.as_ref())
    }

    const GATEWAY: &str = r#"
gateway:
  listen_addr: "127.0.0.1:8443"
  tls_cert: "c.pem"
  tls_key: "k.pem"
  auth_username: "agent"
  auth_password: "agent-secret"
  groups:
    - id: "lab"
      agent_password: "lab-agent"
      users:
        - {username: "alice", password: "alice pw"}
        - {username: "bob", password: "b'ob:@"}
"#;

    fn two_users() -> ProfileSource {
        source(&format!(
            "{GATEWAY}proxy:\n  http:\n    listen_addr: \"10.1.2.3:8080\"\n  socks5:\n    listen_addr: \"10.1.2.3:1080\"\n"
        ))
    }

    #[test]
    fn one_users_profile_carries_only_that_users_password() {
        let p = two_users()
            .profile(&ProfileRequest {
                user: Some("bob".into()),
                ..Default::default()
            })
            .unwrap();
        for f in Format::ALL {
            let Ok(text) = p.render(f) else { continue };
            assert!(!text.contains("alice"), "{f:?}: {text}");
            assert!(
                !text.contains("agent-secret") && !text.contains("lab-agent"),
                "{text}"
            );
        }
        let env = p.render(Format::Env).unwrap();
        assert!(
            env.contains("export http_proxy=http://bob:b%27ob%3A%40@10.1.2.3:8080\n"),
            "{env}"
        );
        assert!(
            env.contains("export ALL_PROXY=socks5h://bob:b%27ob%3A%40@10.1.2.3:1080\n"),
            "{env}"
        );
    }

    #[test]
    fn the_user_must_be_named_when_several_can_log_in() {
        let err = two_users().profile(&ProfileRequest::default()).unwrap_err();
        assert_eq!(err, ProfileError::WhichUser("alice, bob".into()));
        let err = two_users()
            .profile(&ProfileRequest {
                user: Some("mallory".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(err, ProfileError::UnknownUser("mallory".into()));
    }

    #[test]
    fn every_interface_needs_a_host_and_hosts_are_checked() {
        let s = source(&format!(
            "{GATEWAY}proxy:\n  http:\n    listen_addr: \":8080\"\n    auth_username: u\n    auth_password: p\n"
        ));
        let req = |host: Option<&str>| ProfileRequest {
            user: Some("u".into()),
            host: host.map(str::to_owned),
            ..Default::default()
        };
        assert!(matches!(
            s.profile(&req(None)),
            Err(ProfileError::NeedHost { .. })
        ));
        let p = s.profile(&req(Some("Proxy.Example.COM"))).unwrap();
        assert_eq!(p.http.unwrap().authority(), "proxy.example.com:8080");
        let p = s.profile(&req(Some("[2001:db8::1]"))).unwrap();
        assert_eq!(p.http.unwrap().authority(), "[2001:db8::1]:8080");
        for bad in ["a\"b", "x y", "", "-a.example", "a/b"] {
            assert!(
                matches!(s.profile(&req(Some(bad))), Err(ProfileError::Host(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bypass_entries_parse() {
        assert_eq!(
            "10.0.0.0/8".parse::<Bypass>().unwrap(),
            Bypass::Net(Cidr::parse("10.0.0.0/8").unwrap())
        );
        assert_eq!(
            ".Corp.Example".parse::<Bypass>().unwrap(),
            Bypass::Domain("corp.example".into())
        );
        assert!("not a net".parse::<Bypass>().is_err());
        assert!("Pac".parse::<Format>().is_err());
        assert_eq!("pac".parse::<Format>().unwrap(), Format::Pac);
    }

    #[test]
    fn a_listener_without_static_in_its_chain_offers_no_static_password() {
        let s = source(&format!(
            "{GATEWAY}  auth_backends:\n    users: {{type: file, path: users.txt}}\nproxy:\n  http:\n    listen_addr: \"127.0.0.1:8080\"\n    auth: [users]\n"
        ));
        assert_eq!(
            s.profile(&ProfileRequest::default()).unwrap_err(),
            ProfileError::NeedUser
        );
    }
}
