//! The managers a rule's names refer to, one module each.

pub mod dwn_cons_r;
pub mod egress;
pub mod group_ipm;
pub mod host_matcher;
pub mod range_ipm;
pub mod session_ipm;
pub mod time_span;
pub mod user_db;

use std::sync::Arc;

pub enum Manager {
    Range(range_ipm::RangeIpm),
    Session(Arc<session_ipm::SessionIpm>),
    Group(group_ipm::GroupIpm),
    Host(host_matcher::HostMatcher),
    Time(time_span::TimeSpan),
    DwnConsR(Arc<dwn_cons_r::DwnConsR>),
    ParentProxy(Arc<crate::connect::ParentProxy>),
    NetIface(Arc<str>),
}

impl Manager {
    /// The section name in `managers.toml`, which is also `MatchType.type` in `discover`.
    pub fn kind(&self) -> &'static str {
        match self {
            Manager::Range(_) => "rangeIPM",
            Manager::Session(_) => "sessionIPM",
            Manager::Group(_) => "groupIPM",
            Manager::Host(_) => "hostMatcher",
            Manager::Time(_) => "timeSpan",
            Manager::DwnConsR(_) => "dwnConsR",
            Manager::ParentProxy(_) => "parentProxy",
            Manager::NetIface(_) => "netIface",
        }
    }
}
