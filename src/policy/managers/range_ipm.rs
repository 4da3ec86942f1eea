//! `rangeIPM`: the client address is inside a CIDR range.

use std::net::IpAddr;

use crate::net::Cidr;
use crate::policy::config::RangeIpmConf;
use crate::policy::error::{At, PolicyConfigError};

pub struct RangeIpm {
    cidr: Cidr,
}

impl RangeIpm {
    pub fn from_conf(file: &str, c: &RangeIpmConf) -> Result<RangeIpm, PolicyConfigError> {
        let at = At {
            file,
            section: "[[rangeIPM]]",
            name: &c.name,
        };
        let cidr = Cidr::parse(c.cidr.trim()).ok_or_else(|| {
            at.err(
                "cidr",
                format!(
                    "{:?} is not an address or CIDR range (e.g. 10.0.0.0/8)",
                    c.cidr
                ),
            )
        })?;
        Ok(RangeIpm { cidr })
    }

    pub fn matches(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_and_outside() {
        let c = RangeIpmConf {
            name: "lan".into(),
            cidr: "10.1.0.0/16".into(),
        };
        let m = RangeIpm::from_conf("managers.toml", &c).unwrap();
        assert!(m.matches("10.1.2.3".parse().unwrap()));
        assert!(m.matches("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!m.matches("10.2.0.1".parse().unwrap()));
        let bad = RangeIpmConf {
            name: "lan".into(),
            cidr: "10.1.0.0/33".into(),
        };
        let e = RangeIpm::from_conf("managers.toml", &bad)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("managers.toml: [[rangeIPM]] \"lan\": cidr: "),
            "{e}"
        );
    }
}
