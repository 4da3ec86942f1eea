//! Proxy front ends: HTTP (CONNECT and absolute-form forwarding), the same behind TLS
//! (the HTTPS listener) and SOCKS5. They authenticate the user, ask a
//! [`Connector`](crate::connect::Connector) for a connection to the target, and relay.
//! They never resolve names: the target leaves through the agent (or the standalone
//! proxy's dialer).

pub mod http;
pub mod https;
pub mod socks5;
pub mod socks5_udp;
