//! `deflate:`, the permessage-deflate settings of the gateway and the agent.

use serde::Deserialize;

use crate::net::ByteSize;

/// The largest LZ77 window; our inflater always uses it, so it can read any peer.
pub const MAX_WINDOW_BITS: u8 = 15;
/// zlib cannot produce raw deflate with a 256-byte window (it silently uses 512).
pub const MIN_WINDOW_BITS: u8 = 9;

/// `deflate:` in the gateway and client configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeflateConfig {
    /// Offer (client) or accept (gateway) permessage-deflate. Off by default: most
    /// tunnelled traffic is TLS already, and see ARCHITECTURE.md on CRIME/BREACH.
    pub enabled: bool,
    /// zlib level, 1 (fastest) ..= 9 (smallest).
    pub level: u32,
    /// Messages smaller than this always go out uncompressed.
    pub min_size: ByteSize,
    /// Compress every message on its own, and ask the peer to do the same. Costs ratio,
    /// but no secret in one message can be guessed through the size of a later one.
    pub no_context_takeover: bool,
    /// Largest LZ77 window we use and ask the peer to use, 9 ..= 15.
    pub max_window_bits: u8,
    /// Stop trying to compress for a while after several incompressible messages.
    pub adaptive: bool,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: false,
            level: 1,
            min_size: ByteSize(256),
            no_context_takeover: true,
            max_window_bits: MAX_WINDOW_BITS,
            adaptive: true,
        }
    }
}

impl DeflateConfig {
    /// Checks the ranges serde cannot express; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=9).contains(&self.level) {
            return Err(format!("deflate.level must be 1..=9, got {}", self.level));
        }
        if !(MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&self.max_window_bits) {
            return Err(format!(
                "deflate.max_window_bits must be {MIN_WINDOW_BITS}..={MAX_WINDOW_BITS}, got {}",
                self.max_window_bits
            ));
        }
        if usize::try_from(self.min_size.0).is_err() {
            return Err("deflate.min_size is too large".into());
        }
        Ok(())
    }
}
