//! What an agent refuses to dial: `forbidden_hosts` (names, `*.suffix` wildcards, IPs,
//! CIDRs) and, when non-empty, the `limit` allowlist. Names are checked as given and
//! every address they resolve to is checked too, so DNS, IPv4-mapped IPv6 and odd IP
//! spellings cannot slip past an IP rule.

use std::net::{IpAddr, SocketAddr};

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
}

#[derive(Debug, Default, Clone)]
pub struct Acl {
    forbidden: Vec<Rule>,
    allow: Vec<Allowed>,
}

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
            if !rule.protocol.eq_ignore_ascii_case("tcp") {
                return Err(err("only protocol \"tcp\" is supported"));
            }
            let (host, port) = rule
                .addr
                .rsplit_once(':')
                .ok_or_else(|| err("expected host:port"))?;
            let port = port.parse::<u16>().map_err(|_| err("bad port"))?;
            let host = normalize_name(host);
            let ip = host.parse::<IpAddr>().ok().map(canonical);
            allow.push(Allowed { host, ip, port });
        }
        Ok(Acl { forbidden, allow })
    }

    /// Checks the target as named, before resolving.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), String> {
        let name = normalize_name(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.check_addr(SocketAddr::new(ip, port), host);
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

    /// Checks one resolved address of a target named `host`.
    pub fn check_addr(&self, addr: SocketAddr, host: &str) -> Result<(), String> {
        let ip = canonical(addr.ip());
        // Connecting to 0.0.0.0 or :: reaches this host itself, whatever the list says.
        if ip.is_unspecified() {
            return Err(format!(
                "{host} ({ip}) is the unspecified address, i.e. this host"
            ));
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
            let allowed = self
                .allow
                .iter()
                .any(|a| a.port == addr.port() && (a.host == name || a.ip == Some(ip)));
            if !allowed {
                return Err(format!(
                    "{host}:{} is not in the limit allowlist",
                    addr.port()
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
    }
}
