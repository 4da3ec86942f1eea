//! The agent's ACL (`forbidden_hosts`, the `limit` allowlist, the local refusal):
//! never panics, and agrees with a plain reference matcher on which entries are valid
//! and on every check, by name and by address.
//!
//! The input is lines: `L host:port` is a `limit` entry, `N host port` a check by
//! name, `A ip port` a check by address, anything else a `forbidden_hosts` entry. The
//! first byte's bit 0 turns the local refusal on.

use std::net::{IpAddr, SocketAddr};

use anyproxy::config::LimitRule;
use anyproxy::dial::acl::Acl;

pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let (mut forbidden, mut limit, mut queries) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.split('\n') {
        if let Some(addr) = line.strip_prefix("L ") {
            limit.push(LimitRule {
                name: None,
                addr: addr.to_owned(),
                protocol: "tcp".into(),
            });
        } else if let Some(q) = line.strip_prefix("N ").or_else(|| line.strip_prefix("A ")) {
            if let Some((host, port)) = q.rsplit_once(' ') {
                if let Ok(port) = port.parse::<u16>() {
                    queries.push((line.starts_with('A'), host.to_owned(), port));
                }
            }
        } else {
            forbidden.push(line.to_owned());
        }
    }
    let refuse_local = mode & 1 == 1;
    let reference = Reference::new(&forbidden, &limit, refuse_local);
    let acl = match Acl::new(&forbidden, &limit) {
        Ok(acl) => acl.refusing_local(refuse_local),
        Err(e) => {
            assert!(
                reference.is_none(),
                "refused ({e}) but valid for the reference"
            );
            return;
        }
    };
    let reference = reference.expect("valid for the ACL, refused by the reference");
    for (by_addr, host, port) in &queries {
        if *by_addr {
            let Ok(ip) = host.parse::<IpAddr>() else {
                continue;
            };
            let addr = SocketAddr::new(ip, *port);
            let got = acl.check_addr(addr, host);
            assert_eq!(got.is_ok(), reference.addr(addr, host), "{addr} {got:?}");
        } else {
            let got = acl.check_name(host, *port);
            assert_eq!(got.is_ok(), reference.name(host, *port), "{host:?} {got:?}");
        }
    }
}

fn normalize(name: &str) -> String {
    name.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// `ip/prefix` or a bare address, compared as 128-bit numbers (IPv4 as itself).
#[derive(Debug)]
struct Net {
    v4: bool,
    bits: u128,
    prefix: u32,
}

fn as_number(ip: IpAddr) -> (bool, u128) {
    match ip.to_canonical() {
        IpAddr::V4(a) => (true, u128::from(u32::from(a))),
        IpAddr::V6(a) => (false, u128::from(a)),
    }
}

impl Net {
    fn parse(s: &str) -> Option<Net> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let (v4, bits) = as_number(ip);
        let width = if v4 { 32 } else { 128 };
        let prefix = prefix.map_or(width, u32::from);
        (prefix <= width).then_some(Net { v4, bits, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (v4, bits) = as_number(ip);
        let width = if v4 { 32 } else { 128 };
        // Compare the top `prefix` bits, one at a time: slow and obviously right.
        v4 == self.v4
            && (0..self.prefix).all(|i| {
                let bit = width - 1 - i;
                (bits >> bit) & 1 == (self.bits >> bit) & 1
            })
    }
}

enum Entry {
    Name(String),
    Below(String),
    Net(Net),
}

struct Reference {
    forbidden: Vec<Entry>,
    allow: Vec<(String, Option<IpAddr>, u16)>,
    refuse_local: bool,
}

impl Reference {
    fn new(forbidden: &[String], limit: &[LimitRule], refuse_local: bool) -> Option<Reference> {
        let mut entries = Vec::new();
        for entry in forbidden {
            let e = entry.trim();
            if e.is_empty() {
                return None;
            }
            if let Some(net) = Net::parse(e.trim_start_matches('[').trim_end_matches(']')) {
                entries.push(Entry::Net(net));
            } else if e.contains('/') {
                return None;
            } else if let Some(below) = e.strip_prefix("*.") {
                entries.push(Entry::Below(normalize(below)));
            } else if e.contains('*') {
                return None;
            } else {
                entries.push(Entry::Name(normalize(e)));
            }
        }
        let mut allow = Vec::new();
        for rule in limit {
            let (host, port) = rule.addr.rsplit_once(':')?;
            let port = port.parse::<u16>().ok()?;
            let host = normalize(host);
            let ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
            allow.push((host, ip, port));
        }
        Some(Reference {
            forbidden: entries,
            allow,
            refuse_local,
        })
    }

    fn is_local(ip: IpAddr) -> bool {
        let (v4, n) = as_number(ip);
        if v4 {
            n >> 24 == 127 || n >> 16 == 0xa9fe
        } else {
            n == 1 || n >> 118 == 0x3fa || n == 0xfd00_0ec2_0000_0000_0000_0000_0000_0254
        }
    }

    fn addr(&self, addr: SocketAddr, host: &str) -> bool {
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() || (self.refuse_local && Self::is_local(ip)) {
            return false;
        }
        let forbidden = self.forbidden.iter().any(|e| match e {
            Entry::Net(n) => n.contains(ip),
            _ => false,
        });
        let name = normalize(host);
        let allowed = self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|(h, a, p)| *p == addr.port() && (*h == name || *a == Some(ip)));
        !forbidden && allowed
    }

    fn name(&self, host: &str, port: u16) -> bool {
        let name = normalize(host);
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self.addr(SocketAddr::new(ip, port), host);
        }
        if self.refuse_local && (name == "localhost" || name.ends_with(".localhost")) {
            return false;
        }
        !self.forbidden.iter().any(|e| match e {
            Entry::Name(n) => *n == name,
            Entry::Below(b) => name
                .strip_suffix(b.as_str())
                .and_then(|above| above.strip_suffix('.'))
                .is_some_and(|above| !above.is_empty()),
            Entry::Net(_) => false,
        })
    }
}
