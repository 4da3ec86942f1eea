//! The UDP keys: which transport protocols a listener or an agent carries
//! (`protocols`), how long an idle datagram flow lives (`udp_idle_timeout`) and the
//! largest datagram carried (`udp_max_datagram`).

use std::time::Duration;

use anyproxy_proto::Protocol;
use serde::{Deserialize, Deserializer};

use crate::net::{ByteSize, HumanDuration};

/// The largest UDP payload there is (IPv4: 65,535 − 20 − 8).
pub const MAX_UDP_DATAGRAM: u64 = 65_507;

/// A `protocols:` allowlist: `[tcp, udp]` (the default) or either alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocols {
    pub tcp: bool,
    pub udp: bool,
}

impl Default for Protocols {
    fn default() -> Self {
        Protocols {
            tcp: true,
            udp: true,
        }
    }
}

impl Protocols {
    pub fn allows(&self, p: Protocol) -> bool {
        match p {
            Protocol::Tcp => self.tcp,
            Protocol::Udp => self.udp,
        }
    }

    /// How the list is written, for refusals: `[tcp]`.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = [(self.tcp, "tcp"), (self.udp, "udp")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        format!("[{}]", names.join(", "))
    }
}

impl<'de> Deserialize<'de> for Protocols {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut p = Protocols {
            tcp: false,
            udp: false,
        };
        for n in &names {
            match Protocol::parse(&n.to_ascii_lowercase()) {
                Some(Protocol::Tcp) => p.tcp = true,
                Some(Protocol::Udp) => p.udp = true,
                None => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown protocol {n:?} (expected tcp or udp)"
                    )))
                }
            }
        }
        if !p.tcp && !p.udp {
            return Err(serde::de::Error::custom(
                "an empty protocols list would carry nothing; list tcp, udp or both",
            ));
        }
        Ok(p)
    }
}

/// One minute: longer than the keepalives UDP protocols send to keep NAT state alive
/// (WireGuard 25 s, QUIC's typical 30 s), short enough that a one-shot DNS query's
/// socket is released soon after.
pub fn default_udp_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

pub fn default_udp_max_datagram() -> ByteSize {
    ByteSize(MAX_UDP_DATAGRAM)
}

/// `udp_max_datagram` must be between 1 byte and the largest UDP payload.
pub fn check_max_datagram(key: &str, size: ByteSize) -> Result<(), String> {
    if size.0 == 0 || size.0 > MAX_UDP_DATAGRAM {
        return Err(format!(
            "{key}: {} bytes is outside 1..={MAX_UDP_DATAGRAM} (the largest UDP payload)",
            size.0
        ));
    }
    Ok(())
}

/// The transport protocol of a forward (`protocol: tcp` or `udp`, default tcp).
pub fn forward_protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
    let name = String::deserialize(d)?;
    Protocol::parse(&name.to_ascii_lowercase()).ok_or_else(|| {
        serde::de::Error::custom(format!("unknown protocol {name:?} (expected tcp or udp)"))
    })
}

pub fn default_forward_protocol() -> Protocol {
    Protocol::Tcp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_lists() {
        let p: Protocols = yaml_serde::from_str("[udp]").unwrap();
        assert!(p.udp && !p.tcp);
        assert_eq!(p.describe(), "[udp]");
        let p: Protocols = yaml_serde::from_str("[TCP, udp]").unwrap();
        assert_eq!(p, Protocols::default());
        assert!(yaml_serde::from_str::<Protocols>("[]").is_err());
        let e = yaml_serde::from_str::<Protocols>("[sctp]").unwrap_err();
        assert!(e.to_string().contains("sctp"), "{e}");
    }

    #[test]
    fn max_datagram_bounds() {
        assert!(check_max_datagram("k", ByteSize(65_507)).is_ok());
        assert!(check_max_datagram("k", ByteSize(65_508)).is_err());
        assert!(check_max_datagram("k", ByteSize(0)).is_err());
    }
}
