//! anyproxy: a reverse-tunnel proxy. A public **gateway** serves HTTP and SOCKS5 proxy
//! listeners; every user connection is carried over WebSocket + TLS to a **client
//! agent**, which dials the target inside its own network.
//!
//! Layout: [`transport`] (TLS, WebSocket), [`tunnel`] (the multiplexer both ends share),
//! [`gateway`], [`client`] (the agent), [`proxy`] (HTTP and SOCKS5 front ends),
//! [`config`]. The wire protocol lives in the `anyproxy-proto` crate.

pub mod client;
pub mod config;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod transport;
pub mod tunnel;
