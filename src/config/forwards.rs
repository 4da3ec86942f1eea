//! The gateway's forwards: the ports it declares itself (`gateway.forwards`) and where
//! agents may ask for their own (`gateway.agent_forwards`).

use serde::Deserialize;

use super::gateway::is_configured_group;
use super::{udp, ConfigError, GroupConfig, HostPort, ListenAddr, PortRange, DEFAULT_GROUP};

/// A port forward declared by the gateway (the model rathole and frp users know).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    pub listen_addr: ListenAddr,
    #[serde(default = "default_group")]
    pub group: String,
    /// `host:port`, dialed (and checked against its ACL) by the agent.
    pub target: HostPort,
    /// As on a proxy listener: a PROXY header from `gateway.trusted_proxies` required.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// `tcp` (default) or `udp`: a UDP forward carries datagrams to `target`.
    #[serde(
        default = "udp::default_forward_protocol",
        deserialize_with = "udp::forward_protocol"
    )]
    pub protocol: anyproxy_proto::Protocol,
}

impl ForwardConfig {
    /// `gateway.forwards[i]`: a PROXY header only on TCP, the group one of `configured`.
    pub fn check(&self, i: usize, configured: &[GroupConfig]) -> Result<(), ConfigError> {
        if self.protocol == anyproxy_proto::Protocol::Udp && self.proxy_protocol {
            return Err(ConfigError::Semantic(format!(
                "gateway.forwards[{i}]: proxy_protocol is for TCP; a udp forward cannot carry a PROXY header"
            )));
        }
        if !is_configured_group(configured, &self.group) {
            return Err(ConfigError::Semantic(format!(
                "gateway.forwards[{i}].group {:?} is not a configured group",
                self.group
            )));
        }
        Ok(())
    }
}

fn default_group() -> String {
    DEFAULT_GROUP.to_owned()
}

/// Where agent-requested forwards may listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentForwards {
    /// Address to bind, e.g. `127.0.0.1` or `0.0.0.0`.
    pub bind: std::net::IpAddr,
    /// Inclusive port range agents may ask for, e.g. `"20000-20999"`.
    pub ports: PortRange,
    /// Every agent forward requires a PROXY header from `gateway.trusted_proxies`.
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use anyproxy_proto::Protocol;

    use crate::config::Config;

    #[test]
    fn forwards_default_to_tcp_through_the_default_group_and_are_checked() {
        let gw = "gateway:\n  listen_addr: '127.0.0.1:9'\n  tls_cert: a\n  tls_key: b\n  auth_username: u\n  auth_password: p\n  groups: [{ id: office, agent_password: s }]\n  trusted_proxies: ['10.0.0.0/8']\n";
        let parse =
            |fwd: &str| Config::parse(&format!("{gw}  forwards: [{fwd}]\n"), Path::new("x.yaml"));
        let g = parse("{ listen_addr: ':2', target: 'a:1' }, { listen_addr: ':3', target: 'b:1', group: office, protocol: udp }")
            .unwrap()
            .gateway
            .unwrap();
        assert_eq!(
            (g.forwards[0].group.as_str(), g.forwards[0].protocol),
            ("default", Protocol::Tcp)
        );
        assert_eq!(
            (g.forwards[1].group.as_str(), g.forwards[1].protocol),
            ("office", Protocol::Udp)
        );
        crate::config::assert_each_refused(
            parse,
            &[
                (
                    "{ listen_addr: ':2', target: 'a:1', protocol: udp, proxy_protocol: true }",
                    "gateway.forwards[0]: proxy_protocol is for TCP",
                ),
                (
                    "{ listen_addr: ':2', target: 'a:1' }, { listen_addr: ':3', target: 'b:1', group: lab }",
                    "gateway.forwards[1].group \"lab\" is not a configured group",
                ),
            ],
        );
    }
}
