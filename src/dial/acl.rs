//! What an agent refuses to dial: `forbidden_hosts` (names, `*.suffix` wildcards, IPs,
//! CIDRs) and, when non-empty, the `limit` allowlist. Names are checked as given and
//! every address they resolve to is checked too, so DNS, IPv4-mapped IPv6 and odd IP
//! spellings cannot slip past an IP rule.

use std::net::{IpAddr, SocketAddr};

use anyproxy_proto::Protocol;

use crate::config::LimitRule;
use crate::net::{canonical, Cidr};

fn normalize_name(name: &str) -> String {
    name.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Name(String),
    /// `*.example.com`: any name below example.com (not example.com itself).
    Suffix(String),
    Net(Cidr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Allowed {
    host: String,
    ip: Option<IpAddr>,
    port: u16,
    protocol: Protocol,
}

#[derive(Debug, Default, Clone)]
pub struct Acl {
    forbidden: Vec<Rule>,
    allow: Vec<Allowed>,
    /// Refuse this host and the link-local networks (see [`local_network`]), whatever
    /// the lists say, unless the operator opted in (`client.allow_local`).
    refuse_local: bool,
}

/// Why an address counts as local: the agent host itself (loopback, and through it the
/// agent's own admin listener) or link-local (where cloud metadata services answer,
/// 169.254.169.254 and fd00:ec2::254, the classic SSRF path to a VM's credentials).
pub fn local_network(ip: IpAddr) -> Option<&'static str> {
    const AWS_METADATA_V6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match canonical(ip) {
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("a link-local address (cloud metadata lives there)")
        }
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("a link-local address"),
        IpAddr::V6(v6) if v6 == AWS_METADATA_V6 => Some("a cloud metadata address"),
        _ => None,
    }
}

/// What a refused local target is told: the key that allows it.
const ALLOW_LOCAL_HINT: &str = "set client.allow_local: true to allow";

#[derive(Debug, thiserror::Error)]
#[error("invalid {what} entry {entry:?}: {why}")]
pub struct AclError {
    what: &'static str,
    entry: String,
    why: &'static str,
}

impl Acl {
    pub fn new(forbidden_hosts: &[String], limit: &[LimitRule]) -> Result<Acl, AclError> {
        let mut forbidden = Vec::new();
        for entry in forbidden_hosts {
            let e = entry.trim();
            let err = |why| AclError {
                what: "forbidden_hosts",
                entry: entry.clone(),
                why,
            };
            if e.is_empty() {
                return Err(err("empty"));
            }
            if let Some(cidr) = Cidr::parse(e.trim_start_matches('[').trim_end_matches(']')) {
                forbidden.push(Rule::Net(cidr));
            } else if e.contains('/') {
                return Err(err("not a valid CIDR"));
            } else if let Some(suffix) = e.strip_prefix("*.") {
                forbidden.push(Rule::Suffix(normalize_name(suffix)));
            } else if e.contains('*') {
                return Err(err("wildcards are only allowed as a leading \"*.\""));
            } else {
                forbidden.push(Rule::Name(normalize_name(e)));
            }
        }
        let mut allow = Vec::new();
        for rule in limit {
            let err = |why| AclError {
                what: "limit",
                entry: rule.addr.clone(),
                why,
            };
            let protocol = Protocol::parse(&rule.protocol.to_ascii_lowercase())
                .ok_or_else(|| err("protocol must be \"tcp\" or \"udp\""))?;
            let (host, port) = rule
                .addr
                .rsplit_once(':')
                .ok_or_else(|| err("expected host:port"))?;
            let port = port.parse::<u16>().map_err(|_| err("bad port"))?;
            let host = normalize_name(host);
            let ip = host.parse::<IpAddr>().ok().map(canonical);
            allow.push(Allowed {
                host,
                ip,
                port,
                protocol,
            });
        }
        Ok(Acl {
            forbidden,
            allow,
            refuse_local: false,
        })
    }

    /// Refuses the agent host itself and link-local targets (the default for agents).
    pub fn refusing_local(mut self, refuse: bool) -> Self {
        self.refuse_local = refuse;
        self
    }

    /// Checks the target as named, before resolving.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), String> {
        let name = normalize_name(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.check_addr(SocketAddr::new(ip, port), host);
        }
        if self.refuse_local && (name == "localhost" || name.ends_with(".localhost")) {
            return Err(format!("{host} is this host ({ALLOW_LOCAL_HINT})"));
        }
        for rule in &self.forbidden {
            let hit = match rule {
                Rule::Name(n) => *n == name,
                Rule::Suffix(s) => {
                    name.len() > s.len() + 1
                        && name.ends_with(s.as_str())
                        && name.as_bytes()[name.len() - s.len() - 1] == b'.'
                }
                Rule::Net(_) => false,
            };
            if hit {
                return Err(format!("{host} is a forbidden host"));
            }
        }
        Ok(())
    }

    /// Whether nothing is forbidden and nothing is limited.
    pub fn is_empty(&self) -> bool {
        self.forbidden.is_empty() && self.allow.is_empty()
    }

    /// Checks one resolved address of a TCP target named `host`.
    pub fn check_addr(&self, addr: SocketAddr, host: &str) -> Result<(), String> {
        self.check_addr_for(addr, host, Protocol::Tcp)
    }

    /// Checks one resolved address of a target named `host` reached over `protocol`:
    /// `forbidden_hosts` apply to both protocols, a `limit` entry to its own only.
    pub fn check_addr_for(
        &self,
        addr: SocketAddr,
        host: &str,
        protocol: Protocol,
    ) -> Result<(), String> {
        let ip = canonical(addr.ip());
        // Connecting to 0.0.0.0 or :: reaches this host itself, whatever the list says.
        if ip.is_unspecified() {
            return Err(format!(
                "{host} ({ip}) is the unspecified address, i.e. this host"
            ));
        }
        if self.refuse_local {
            if let Some(what) = local_network(ip) {
                return Err(format!("{host} ({ip}) is {what} ({ALLOW_LOCAL_HINT})"));
            }
        }
        for rule in &self.forbidden {
            if let Rule::Net(cidr) = rule {
                if cidr.contains(ip) {
                    return Err(format!("{host} ({ip}) is in a forbidden network"));
                }
            }
        }
        if !self.allow.is_empty() {
            let name = normalize_name(host);
            let allowed = self.allow.iter().any(|a| {
                a.protocol == protocol
                    && a.port == addr.port()
                    && (a.host == name || a.ip == Some(ip))
            });
            if !allowed {
                return Err(format!(
                    "{host}:{} over {} is not in the limit allowlist",
                    addr.port(),
                    protocol.as_str()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(forbidden: &[&str]) -> Acl {
        Acl::new(
            &forbidden.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            &[],
        )
        .unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_wildcards_and_networks() {
        let a = acl(&[
            "internal.company.com",
            "*.corp.example",
            "192.168.0.0/16",
            "fd00::/8",
            "10.1.2.3",
        ]);
        assert!(a.check_name("internal.company.com", 80).is_err());
        assert!(a.check_name("INTERNAL.company.com.", 80).is_err());
        assert!(a.check_name("other.company.com", 80).is_ok());
        assert!(a.check_name("a.b.corp.example", 80).is_err());
        assert!(a.check_name("corp.example", 80).is_ok());
        assert!(a.check_name("xcorp.example", 80).is_ok());
        assert!(a.check_name("192.168.4.4", 80).is_err());
        assert!(a.check_name("::ffff:192.168.4.4", 80).is_err());
        assert!(a.check_name("[fd12::1]", 80).is_err());
        assert!(a.check_addr(addr("10.1.2.3:1"), "x").is_err());
        assert!(a.check_addr(addr("[::ffff:10.1.2.3]:1"), "x").is_err());
        assert!(a.check_addr(addr("10.1.2.4:1"), "x").is_ok());
    }

    #[test]
    fn local_targets_are_refused_unless_allowed() {
        let strict = acl(&[]).refusing_local(true);
        for (host, ip) in [
            ("localhost", "127.0.0.1:22"),
            ("x", "127.1.2.3:22"),
            ("x", "[::1]:22"),
            ("x", "[::ffff:127.0.0.1]:22"),
            ("x", "169.254.169.254:80"),
            ("x", "[fe80::1]:80"),
            ("x", "[fd00:ec2::254]:80"),
        ] {
            let e = strict.check_addr(addr(ip), host).unwrap_err();
            assert!(e.contains("client.allow_local"), "{e}");
        }
        assert!(strict.check_name("localhost", 22).is_err());
        assert!(strict.check_name("api.localhost", 22).is_err());
        assert!(strict.check_name("127.0.0.1", 22).is_err());
        // Private networks stay reachable: an agent exists to reach them.
        for ip in [
            "10.0.0.5:22",
            "192.168.1.1:80",
            "[fd12::1]:80",
            "8.8.8.8:53",
        ] {
            assert!(strict.check_addr(addr(ip), "x").is_ok(), "{ip}");
        }
        let open = acl(&[]).refusing_local(false);
        assert!(open.check_addr(addr("127.0.0.1:22"), "localhost").is_ok());
        assert!(open.check_name("localhost", 22).is_ok());
    }

    #[test]
    fn cidr_edges() {
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("1.2.3.4/33").is_none());
        assert!(!Cidr::parse("10.0.0.0/8")
            .unwrap()
            .contains("::1".parse().unwrap()));
        assert!(Acl::new(&["10.0.0.0/xx".into()], &[]).is_err());
        assert!(Acl::new(&["a*b.com".into()], &[]).is_err());
    }

    #[test]
    fn limit_is_an_allowlist() {
        let a = Acl::new(
            &[],
            &[
                LimitRule {
                    name: Some("web".into()),
                    addr: "localhost:8080".into(),
                    protocol: "tcp".into(),
                },
                LimitRule {
                    name: None,
                    addr: "127.0.0.2:22".into(),
                    protocol: "tcp".into(),
                },
            ],
        )
        .unwrap();
        assert!(a.check_addr(addr("127.0.0.1:8080"), "localhost").is_ok());
        assert!(a.check_addr(addr("127.0.0.1:8081"), "localhost").is_err());
        assert!(a.check_addr(addr("127.0.0.2:22"), "whatever").is_ok());
        assert!(a.check_addr(addr("127.0.0.3:22"), "whatever").is_err());
        // A tcp entry allows no udp.
        let e = a
            .check_addr_for(addr("127.0.0.2:22"), "whatever", Protocol::Udp)
            .unwrap_err();
        assert!(e.contains("over udp"), "{e}");
    }

    #[test]
    fn limit_entries_honour_their_protocol() {
        let a = Acl::new(
            &["10.9.0.0/16".into()],
            &[LimitRule {
                name: Some("dns".into()),
                addr: "10.0.0.53:53".into(),
                protocol: "udp".into(),
            }],
        )
        .unwrap();
        let dns = addr("10.0.0.53:53");
        assert!(a.check_addr_for(dns, "x", Protocol::Udp).is_ok());
        assert!(a.check_addr_for(dns, "x", Protocol::Tcp).is_err());
        // forbidden_hosts apply to every protocol.
        let e = a
            .check_addr_for(addr("10.9.1.1:53"), "x", Protocol::Udp)
            .unwrap_err();
        assert!(e.contains("forbidden"), "{e}");
        let bad = Acl::new(
            &[],
            &[LimitRule {
                name: None,
                addr: "a:1".into(),
                protocol: "sctp".into(),
            }],
        );
        assert!(bad.is_err());
    }
}
