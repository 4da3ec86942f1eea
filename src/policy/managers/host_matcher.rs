//! `hostMatcher`: a regular expression on the target written as `host:port`.

use regex::Regex;

use crate::policy::config::HostMatcherConf;
use crate::policy::error::{At, PolicyConfigError};

pub struct HostMatcher {
    re: Regex,
}

impl HostMatcher {
    pub fn from_conf(file: &str, c: &HostMatcherConf) -> Result<HostMatcher, PolicyConfigError> {
        let at = At {
            file,
            section: "[[hostMatcher]]",
            name: &c.name,
        };
        let re = Regex::new(&c.pattern).map_err(|e| at.err("pattern", e.to_string()))?;
        Ok(HostMatcher { re })
    }

    /// `target` is `host:port` (`[v6]:port` for IPv6 literals), built once per decision.
    pub fn matches(&self, target: &str) -> bool {
        self.re.is_match(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_host_and_port() {
        let c = HostMatcherConf {
            name: "blocked".into(),
            pattern: r"(^|\.)example\.com:443$".into(),
        };
        let m = HostMatcher::from_conf("managers.toml", &c).unwrap();
        assert!(m.matches("www.example.com:443"));
        assert!(m.matches("example.com:443"));
        assert!(!m.matches("example.com:80"));
        assert!(!m.matches("notexample.com:443"));
        let bad = HostMatcherConf {
            name: "blocked".into(),
            pattern: "(".into(),
        };
        let e = HostMatcher::from_conf("managers.toml", &bad)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("managers.toml: [[hostMatcher]] \"blocked\": pattern: regex parse error"),
            "{e}"
        );
    }
}
