//! anyproxy: a reverse-tunnel proxy. A public **gateway** serves HTTP and SOCKS5 proxy
//! listeners; every user connection is carried over WebSocket + TLS to an **agent**
//! (the "client agent" of the API document), which dials the target inside its own
//! network. The wire protocol lives in the `anyproxy-proto` crate.
//!
//! The parts, lowest first. A part may import only the parts above it in this list
//! (`tests/layers.rs` fails on any other import), so there are no cycles:
//!
//! 1. [`net`]: the shared vocabulary (targets, CIDRs, units, secrets, dial failures).
//! 2. [`auth`]: the one authenticator interface and its backends (static, file, hook, LDAP).
//! 3. [`config`]: the YAML shapes.
//! 4. [`cluster`]: state shared with the other gateways through Redis.
//! 5. [`transport`]: TLS, the WebSocket handshake and framing, the accept loop.
//! 6. [`tunnel`]: the multiplexer both ends share (session, flow control, relay, counters).
//! 7. [`connect`]: the `Connector` trait every front end asks, and its `Upstream`.
//! 8. [`dial`]: where traffic leaves (ACL, resolve and dial, direct egress).
//! 9. [`limits`]: connection caps, lockouts, bandwidth budgets.
//! 10. [`policy`]: PMProxy rules, managers, quotas and its `/api/cmd` API.
//! 11. [`metrics`]: Prometheus collectors and the admin listener.
//! 12. [`proxy`]: the HTTP and SOCKS5 front ends.
//! 13. [`agent`]: the agent role.
//! 14. [`gateway`]: the gateway role, which composes everything above.
//!
//! The binary's `cli` sits on top of all of them.

pub mod net;

pub mod auth;
pub mod config;

pub mod cluster;
pub mod transport;

pub mod tunnel;

pub mod connect;
pub mod dial;
pub mod limits;
pub mod policy;

pub mod metrics;
pub mod proxy;

pub mod agent;
pub mod gateway;

/// Entry points for the fuzz targets in `fuzz/` and their replay on stable
/// (`tests/fuzz_regressions.rs`) into parsers that are not public otherwise. Not an
/// API: present only with the `fuzzing` feature.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::net::SocketAddr;

    use tokio::io::{AsyncRead, AsyncWrite};

    use crate::auth::{Authority, Identity};
    use crate::limits::Limits;
    use crate::net::HostPort;

    /// The SOCKS5 negotiation (greeting, RFC 1929 sub-negotiation, request) over
    /// `stream`; the error as the log would show it.
    pub async fn socks5_negotiate<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        users: &Authority,
        limits: &Limits,
        peer: SocketAddr,
    ) -> Result<(HostPort, Identity), String> {
        crate::proxy::socks5::negotiate_for_fuzzing(stream, users, limits, peer).await
    }

    pub use crate::proxy::http::HeadReading;

    /// What the HTTP front end reads from one parsed request head; `headers` are left
    /// as they would be forwarded.
    pub fn http_read_head(uri: &hyper::Uri, headers: &mut hyper::HeaderMap) -> HeadReading {
        crate::proxy::http::read_head_for_fuzzing(uri, headers)
    }
}
