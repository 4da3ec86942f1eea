//! Where a connection goes: `host:port` with a name or an IP literal, unresolved. One
//! type for configured targets (forwards, `open_ports`) and proxy users' requests, so
//! that the two cannot drift apart.

use serde::{Deserialize, Deserializer};

/// Longest DNS name (RFC 1035: 253 characters in text form).
pub const MAX_HOST_LEN: usize = 253;

/// `host:port` with a name or an IP literal (IPv6 without brackets in `host`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

/// A target no agent could dial, refused before a `connect` is sent for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTarget(pub String);

impl HostPort {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        HostPort {
            host: host.into(),
            port,
        }
    }

    /// Refuses what no agent could dial: an empty or overlong name, spaces or control
    /// characters (which would corrupt a request line or a log line).
    pub fn validate(&self) -> Result<(), InvalidTarget> {
        if self.host.is_empty() || self.host.len() > MAX_HOST_LEN {
            return Err(InvalidTarget(format!(
                "host must be 1 to {MAX_HOST_LEN} bytes, got {}",
                self.host.len()
            )));
        }
        if self.host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(InvalidTarget(
                "host contains spaces or control characters".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not HOST:PORT");
        let (host, port) = s.trim().rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(HostPort::new(host, port))
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> HostPort {
        HostPort::new(host, 80)
    }

    #[test]
    fn targets_no_agent_could_dial_are_refused_up_front() {
        assert!(target("example.com").validate().is_ok());
        assert!(target("2001:db8::1").validate().is_ok());
        assert!(target(&"a".repeat(MAX_HOST_LEN)).validate().is_ok());
        for bad in ["", "a b", "a\r\nb"] {
            assert!(target(bad).validate().is_err(), "{bad:?}");
        }
        assert!(target(&"a".repeat(MAX_HOST_LEN + 1)).validate().is_err());
    }

    #[test]
    fn parses_and_prints_both_families() {
        let v6: HostPort = "[::1]:8080".parse().unwrap();
        assert_eq!(v6, HostPort::new("::1", 8080));
        assert_eq!(v6.to_string(), "[::1]:8080");
        assert!("nohost".parse::<HostPort>().is_err());
        assert!("h:0".parse::<HostPort>().is_err());
    }
}
