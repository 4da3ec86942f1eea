//! `gateway.limits`: what proxy users may do: connection caps per user and per source
//! address, the lockout after wrong proxy passwords, and bandwidth caps per user and per
//! group. Every part is off unless present.

use std::time::Duration;

use serde::Deserialize;

use super::gateway::is_configured_group;
use super::{ConfigError, GroupConfig};
use crate::net::{ByteRate, HumanDuration};

/// The lockout defaults, for proxy users here and for agents (`gateway.max_auth_failures`).
pub(super) fn default_max_auth_failures() -> u32 {
    5
}

pub(super) fn default_minute() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

/// `gateway.limits`: what proxy users may do. Every part is off unless present.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Caps per authenticated proxy user (all their connections, both listeners).
    #[serde(default)]
    pub per_user: Option<ConnCapsConfig>,
    /// Caps per source address (proxy listeners and forwards).
    #[serde(default)]
    pub per_ip: Option<ConnCapsConfig>,
    /// Lockout after repeated wrong proxy passwords from one address.
    #[serde(default)]
    pub proxy_auth: Option<ProxyAuthLimits>,
    #[serde(default)]
    pub bandwidth: BandwidthLimits,
}

/// How many connections may be open at once, and how fast new ones may come.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnCapsConfig {
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// New connections per second (fractions allowed: 0.5 = one every two seconds).
    #[serde(default)]
    pub rate: Option<f64>,
    /// New connections allowed at once before `rate` applies; default `rate` rounded up.
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyAuthLimits {
    #[serde(default = "default_max_auth_failures")]
    pub max_failures: u32,
    #[serde(default = "default_minute")]
    pub window: HumanDuration,
    #[serde(default = "default_minute")]
    pub lockout: HumanDuration,
}

/// Bytes per second, both directions together, shared by all connections of a user
/// or of a group.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthLimits {
    #[serde(default)]
    pub per_user: Option<ByteRate>,
    /// By group id (`default` included).
    #[serde(default)]
    pub per_group: std::collections::BTreeMap<String, ByteRate>,
}

/// Below this a single 64 KiB read would wait a minute: surely a typo.
const MIN_BANDWIDTH: u64 = 1024;

impl LimitsConfig {
    /// Every cap at least one, every rate positive, every bandwidth cap sensible and on
    /// a configured group (of `configured`, besides the default one).
    pub fn check(&self, configured: &[GroupConfig]) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError::Semantic(m));
        for (key, caps) in [("per_user", &self.per_user), ("per_ip", &self.per_ip)] {
            let Some(c) = caps else { continue };
            if c.max_concurrent == Some(0) {
                return err(format!(
                    "gateway.limits.{key}.max_concurrent must be at least 1"
                ));
            }
            if let Some(rate) = c.rate {
                if !(rate.is_finite() && rate > 0.0) {
                    return err(format!(
                        "gateway.limits.{key}.rate must be a positive number of connections per second"
                    ));
                }
            }
            match (c.rate, c.burst) {
                (None, Some(_)) => {
                    return err(format!(
                        "gateway.limits.{key}.burst needs gateway.limits.{key}.rate"
                    ))
                }
                (_, Some(0)) => {
                    return err(format!("gateway.limits.{key}.burst must be at least 1"))
                }
                _ => {}
            }
            if c.max_concurrent.is_none() && c.rate.is_none() {
                return err(format!(
                    "gateway.limits.{key}: set max_concurrent, rate or both"
                ));
            }
        }
        if let Some(a) = &self.proxy_auth {
            if a.max_failures == 0 || a.lockout.0.is_zero() || a.window.0.is_zero() {
                return err(
                    "gateway.limits.proxy_auth: max_failures, window and lockout must be above zero"
                        .into(),
                );
            }
        }
        let rates = self
            .bandwidth
            .per_user
            .iter()
            .map(|r| ("per_user".to_owned(), r));
        let groups = self
            .bandwidth
            .per_group
            .iter()
            .map(|(g, r)| (format!("per_group.{g}"), r));
        for (key, rate) in rates.chain(groups) {
            if rate.0 < MIN_BANDWIDTH {
                return err(format!(
                    "gateway.limits.bandwidth.{key} must be at least 1KiB/s, got {} bytes/s",
                    rate.0
                ));
            }
        }
        for group in self.bandwidth.per_group.keys() {
            if !is_configured_group(configured, group) {
                return err(format!(
                    "gateway.limits.bandwidth.per_group: {group:?} is not a configured group"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;

    #[test]
    fn limits_parse_and_are_checked() {
        let gw = "gateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n  groups: [{ id: office, agent_password: s }]\n";
        let parse =
            |limits: &str| Config::parse(&format!("{gw}  limits:\n{limits}"), Path::new("x.yaml"));
        let g = parse("    per_user: { max_concurrent: 20 }\n    per_ip: { rate: 0.5, burst: 3 }\n    proxy_auth: {}\n    bandwidth: { per_user: 10MiB/s, per_group: { office: 1 MiB, default: 2048 } }\n")
            .unwrap()
            .gateway
            .unwrap();
        let l = &g.limits;
        assert_eq!(l.per_user.as_ref().unwrap().max_concurrent, Some(20));
        assert_eq!(l.per_ip.as_ref().unwrap().rate, Some(0.5));
        let auth = l.proxy_auth.as_ref().unwrap();
        assert_eq!(
            (auth.max_failures, auth.lockout.0),
            (5, Duration::from_secs(60))
        );
        assert_eq!(l.bandwidth.per_user, Some(ByteRate(10 << 20)));
        assert_eq!(l.bandwidth.per_group["office"], ByteRate(1 << 20));
        let off = Config::parse(gw, Path::new("x.yaml"))
            .unwrap()
            .gateway
            .unwrap();
        assert!(off.limits.per_user.is_none() && off.limits.proxy_auth.is_none());
        crate::config::assert_each_refused(
            parse,
            &[
                ("    per_user: { max_concurrent: 0 }\n", "max_concurrent"),
                ("    per_ip: { rate: 0 }\n", "rate"),
                ("    per_ip: { burst: 3 }\n", "burst"),
                ("    per_ip: {}\n", "set max_concurrent"),
                ("    proxy_auth: { lockout: 0s }\n", "proxy_auth"),
                ("    bandwidth: { per_user: 10B/s }\n", "1KiB/s"),
                ("    bandwidth: { per_group: { lab: 1MiB } }\n", "\"lab\""),
                ("    per_usr: {}\n", "per_usr"),
            ],
        );
    }
}
