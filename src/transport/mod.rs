//! How agents and the gateway reach each other: TLS, the WebSocket handshake with
//! encoding negotiation, and WebSocket message framing.

pub mod handshake;
pub mod listen;
pub mod proxy_header;
pub mod tls;
pub mod ws;

pub use ws::{BoxIo, Incoming, WsError, WsReader, WsWriter};
