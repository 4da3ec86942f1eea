//! The small value types of the configuration: listen addresses (Go-style `":8080"`),
//! port ranges, and the admin listener's settings that the gateway and the agent share.

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer};

use crate::net::Secret;

/// A listen address; Go-style `":8080"` means every interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_listen_addr(&s)
            .map(ListenAddr)
            .map_err(serde::de::Error::custom)
    }
}

pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    full.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not a listen address (expected \"HOST:PORT\" or \":PORT\")"))
}

/// An inclusive range of ports, written `"20000-20999"` or `"8080"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad =
            || serde::de::Error::custom(format!("{s:?} is not a port range like \"20000-20999\""));
        let (a, b) = s.split_once('-').unwrap_or((&s, &s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// Where the admin listener listens and who may use it.
#[derive(Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("addr", &self.addr)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The admin listener of `admin_addr`, `admin_username` and `admin_password`, which the
/// gateway and the client sections both carry.
pub(super) fn admin_config(
    addr: &Option<ListenAddr>,
    username: &Option<String>,
    password: &Option<Secret>,
) -> Option<AdminConfig> {
    addr.as_ref().map(|a| AdminConfig {
        addr: a.0,
        username: username.clone(),
        password: password.as_ref().map(|p| p.expose().to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_listens_on_every_interface() {
        assert_eq!(
            parse_listen_addr(" :8080 ").unwrap(),
            "0.0.0.0:8080".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            parse_listen_addr("[::1]:9").unwrap(),
            "[::1]:9".parse::<SocketAddr>().unwrap()
        );
        let err = parse_listen_addr("8080").unwrap_err();
        assert!(err.contains("\"HOST:PORT\""), "{err}");
    }

    #[test]
    fn port_ranges_are_inclusive_and_ordered() {
        let parse = |s: &str| yaml_serde::from_str::<PortRange>(s);
        let r = parse("'20000-20999'").unwrap();
        assert!(r.contains(20000) && r.contains(20999) && !r.contains(21000));
        assert_eq!(
            parse("'8080'").unwrap(),
            PortRange {
                first: 8080,
                last: 8080
            }
        );
        for bad in ["'0-10'", "'10-9'", "'a-b'", "'70000'"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
