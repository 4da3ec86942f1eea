//! The multiplexer both ends share: a session over one WebSocket carries many
//! tunnelled connections, each with its own bounded queue.

pub mod datagram;
pub mod flow;
pub mod relay;
pub mod session;
pub mod stats;
pub mod table;

pub use crate::net::Revoke;
pub use relay::{
    relay_direct, relay_tunnel, DirectTimeouts, Pace, Quota, QuotaCut, RelayEnd, RelayStats,
};
pub use session::{ConnectFailure, OpenError, SessionCore, SessionEnd, SessionOptions, TunnelConn};

/// Milliseconds on a monotonic clock since the first call; for liveness bookkeeping.
pub fn monotonic_ms() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests;
