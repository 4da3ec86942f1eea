//! How a connection leaves this process, when it is dialed here (the standalone
//! proxy): straight out, bound to an interface, or through a parent proxy. A policy
//! decides it; the dialer carries it out.

use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyScheme {
    Http,
    Socks5,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentProxy {
    pub name: String,
    pub scheme: ProxyScheme,
    pub host: String,
    pub port: u16,
    /// `user:pass@` from the URL, if any.
    pub credentials: Option<(String, String)>,
}

/// How an allowed request leaves: directly unless the rules reached a `parentProxy` or
/// `netIface` (the last one reached wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    pub proxy: Option<Arc<ParentProxy>>,
    pub iface: Option<Arc<str>>,
}
