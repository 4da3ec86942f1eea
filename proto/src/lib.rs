//! The anyproxy wire protocol: one message model and two encodings.
//!
//! * [`json`] — the documented AnyProxy JSON messages (`{"type": ..., "data": {...}}`),
//!   spoken by any WebSocket client that follows the API document.
//! * [`binary`] — a compact length-prefixed framing used by anyproxy's own agents;
//!   data payloads travel as raw bytes and decode to zero-copy [`bytes::Bytes`] slices.
//!
//! The crate has no I/O and no async runtime: it turns bytes into [`Message`]s and back.
//! `PROTOCOL.md` beside this crate is the normative description of both encodings.

pub mod binary;
mod error;
mod ids;
pub mod json;
mod message;

pub use error::DecodeError;
pub use ids::{
    ConnIdMap, InternedIds, NumericIds, DEFAULT_MAX_INTERNED, INTERNED_BASE, MAX_WIRE_ID_LEN,
};
pub use message::{
    Auth, AuthResponse, Close, ConnId, Connect, ConnectResponse, Data, ErrorCode, ErrorMsg, Fin,
    Forward, ForwardResponse, Heartbeat, Message, MessageKind, Protocol, Unforward, WindowUpdate,
};

/// How messages are encoded on one WebSocket, chosen per connection at the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The documented JSON messages in text frames. Used when no subprotocol is negotiated.
    Json,
    /// The compact binary framing of [`binary`] in binary frames.
    Binary,
}

impl Encoding {
    /// The `Sec-WebSocket-Protocol` token that selects this encoding.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => json::SUBPROTOCOL,
            Encoding::Binary => binary::SUBPROTOCOL,
        }
    }

    /// The encoding a `Sec-WebSocket-Protocol` token names, if it is one of ours.
    pub fn from_subprotocol(token: &str) -> Option<Self> {
        match token.trim() {
            json::SUBPROTOCOL => Some(Encoding::Json),
            binary::SUBPROTOCOL => Some(Encoding::Binary),
            _ => None,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Binary => "binary",
        }
    }
}

/// Largest data payload one message may carry, in either encoding.
pub const MAX_DATA_PAYLOAD: usize = 1 << 20;
/// Largest string field (credentials, host, reasons) in either encoding.
pub const MAX_STRING_LEN: usize = 4096;

/// Binary mode: the flow-control credit every connection starts with, in each direction,
/// before any `window_update`. Receivers grant more as their side consumes.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
