//! `managers.toml` as the manual writes it. Shapes only: checking values and building
//! managers happens in `build.rs`, which can name the manager and key at fault.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{ByteSize, HumanDuration};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagersConf {
    /// The manual's example file spells it `rule`; its struct says `rules`.
    #[serde(alias = "rule")]
    pub rules: Option<String>,
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(rename = "jwtExpiration")]
    pub jwt_expiration: Option<HumanDuration>,
    /// Accepted so upstream files load; logs go through `tracing`, not syslog.
    #[serde(rename = "syslogAddr")]
    pub syslog_addr: Option<String>,
    #[serde(rename = "mapDB")]
    pub map_db: Option<MapDbConf>,
    #[serde(rename = "adDB")]
    pub ad_db: Option<AdDbConf>,
    #[serde(rename = "rangeIPM", default)]
    pub range_ipm: Vec<RangeIpmConf>,
    #[serde(rename = "sessionIPM", default)]
    pub session_ipm: Vec<SessionIpmConf>,
    #[serde(rename = "groupIPM", default)]
    pub group_ipm: Vec<GroupIpmConf>,
    #[serde(rename = "hostMatcher", default)]
    pub host_matcher: Vec<HostMatcherConf>,
    #[serde(rename = "timeSpan", default)]
    pub time_span: Vec<TimeSpanConf>,
    #[serde(rename = "dwnConsR", default)]
    pub dwn_cons_r: Vec<DwnConsRConf>,
    #[serde(rename = "parentProxy", default)]
    pub parent_proxy: Vec<ParentProxyConf>,
    #[serde(rename = "netIface", default)]
    pub net_iface: Vec<NetIfaceConf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapDbConf {
    pub name: String,
    #[serde(rename = "userPass", default)]
    pub user_pass: BTreeMap<String, String>,
    #[serde(rename = "userGroups", default)]
    pub user_groups: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdDbConf {
    pub name: String,
    pub addr: Option<String>,
    pub suff: Option<String>,
    pub bdn: Option<String>,
    pub user: Option<String>,
    pub pass: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeIpmConf {
    pub name: String,
    pub cidr: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionIpmConf {
    pub name: String,
    pub auth: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupIpmConf {
    pub name: String,
    pub group: String,
    #[serde(rename = "userDBN")]
    pub user_dbn: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMatcherConf {
    pub name: String,
    pub pattern: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSpanConf {
    pub name: String,
    /// The manual's example writes `[timeSpan.Span]` (Go's TOML decoder ignores case).
    #[serde(alias = "Span")]
    pub span: SpanConf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanConf {
    /// A TOML offset date-time, or the same as an RFC 3339 string.
    pub start: Option<toml::Value>,
    pub active: Option<HumanDuration>,
    pub total: Option<HumanDuration>,
    #[serde(default)]
    pub times: i64,
    #[serde(default)]
    pub infinite: bool,
    #[serde(rename = "allTime", default)]
    pub all_time: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DwnConsRConf {
    pub name: String,
    #[serde(rename = "userDBN")]
    pub user_dbn: String,
    #[serde(rename = "resetCycle")]
    pub reset_cycle: HumanDuration,
    #[serde(rename = "groupQuota", default)]
    pub group_quota: BTreeMap<String, ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentProxyConf {
    pub name: String,
    #[serde(rename = "proxyURL")]
    pub proxy_url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetIfaceConf {
    pub name: String,
    pub iface: String,
}

impl ManagersConf {
    /// `file` only labels errors (`managers.toml: ...`).
    pub fn from_toml(file: &str, text: &str) -> Result<ManagersConf, super::PolicyConfigError> {
        toml::from_str(text).map_err(|e| super::PolicyConfigError::Syntax {
            file: file.to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }
}
