//! What each fuzz target asserts, one module per target: `check(input)` panics on a
//! violated property, and returns quietly on anything else. The fuzz targets in
//! `fuzz_targets/` call these; `tests/fuzz_regressions.rs` replays the committed
//! `seeds/` and `regressions/` through the same functions on stable.

pub mod acl;
pub mod config;
pub mod http_head;
pub mod mem;
pub mod policy_rule;
pub mod proxy_header;
pub mod socks5;
pub mod udp_header;
pub mod ws_frame;
pub mod ws_handshake;

/// A target's property: panics when it does not hold for the input.
pub type Check = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/` binary and of its directories
/// under `seeds/` and `regressions/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("acl", acl::check),
    ("config", config::check),
    ("http_head", http_head::check),
    ("policy_rule", policy_rule::check),
    ("proxy_header", proxy_header::check),
    ("socks5", socks5::check),
    ("udp_header", udp_header::check),
    ("ws_frame", ws_frame::check),
    ("ws_handshake", ws_handshake::check),
];
