//! WebSocket messages over an upgraded stream.
//!
//! Two implementations behind one API, so that the tunnel does not care which one carries
//! a session: fastwebsockets for uncompressed sessions ([`fast`]), and our own RFC 6455
//! frame layer ([`frame`]) for sessions that negotiated permessage-deflate ([`deflate`]),
//! because fastwebsockets rejects every frame with RSV1 set.
//!
//! Both readers reassemble fragmented messages themselves so that the total size is
//! capped, and hand control frames to the caller instead of answering them inline,
//! because the writer lives in another task.

pub mod deflate;
mod fast;
pub mod frame;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use fastwebsockets::Role;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

pub use deflate::{CompressionCounters, CompressionStats, DeflateParams};

/// Any byte stream a WebSocket can run over (TLS, plain TCP in tests, duplex pipes).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// WebSocket close codes we send.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const POLICY: u16 = 1008;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("message of more than {max} bytes")]
    TooLarge { max: usize },
    #[error("WebSocket protocol error: {0}")]
    Protocol(String),
    #[error("text message is not UTF-8")]
    InvalidUtf8,
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
}

impl WsError {
    /// The close code that tells the peer why we are leaving.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::TooLarge { .. } => close_code::TOO_BIG,
            WsError::Protocol(_) => close_code::PROTOCOL_ERROR,
            WsError::InvalidUtf8 => close_code::INVALID_DATA,
            WsError::Io(_) | WsError::Closed => close_code::GOING_AWAY,
        }
    }
}

/// What the reader yields.
#[derive(Debug)]
pub enum Incoming {
    /// A complete data message; `text` for opcode 1.
    Message {
        text: bool,
        payload: Bytes,
    },
    /// A ping frame whose payload must be echoed in a pong.
    Ping(Bytes),
    Pong,
    /// The peer started the closing handshake.
    Close {
        code: Option<u16>,
        reason: String,
    },
}

/// Close reasons are limited to 123 bytes by the control-frame size; cut on a character
/// boundary so the peer still reads UTF-8.
fn close_reason(reason: &str) -> &[u8] {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason.as_bytes()[..end]
}

pub struct WsReader(Reader);

enum Reader {
    Fast(fast::FastReader),
    Framed(frame::FrameReader<ReadHalf<BoxIo>>),
}

pub struct WsWriter(Writer);

enum Writer {
    Fast(fast::FastWriter),
    // Boxed: the compressor makes it several times larger than the fast writer.
    Framed(Box<frame::FrameWriter<WriteHalf<BoxIo>>>),
}

/// Splits an upgraded stream into a reader and a writer. `deflate` is what the
/// handshake agreed on; `None` keeps the session on fastwebsockets.
pub fn split(
    io: BoxIo,
    role: Role,
    max_message: usize,
    deflate: Option<DeflateParams>,
) -> (WsReader, WsWriter) {
    match deflate {
        None => {
            let (r, w) = fast::split(io, role, max_message);
            (WsReader(Reader::Fast(r)), WsWriter(Writer::Fast(w)))
        }
        Some(params) => {
            let (r, w) = tokio::io::split(io);
            let server = matches!(role, Role::Server);
            (
                WsReader(Reader::Framed(frame::FrameReader::new(
                    r,
                    server,
                    max_message,
                    Some(&params),
                ))),
                WsWriter(Writer::Framed(Box::new(frame::FrameWriter::new(
                    w,
                    server,
                    Some(&params),
                )))),
            )
        }
    }
}

impl WsReader {
    /// The next message or control frame. Not cancel-safe: give the reader its own task.
    pub async fn next(&mut self) -> Result<Incoming, WsError> {
        match &mut self.0 {
            Reader::Fast(r) => r.next().await,
            Reader::Framed(r) => r.next().await,
        }
    }
}

impl WsWriter {
    pub async fn send_text(&mut self, payload: Vec<u8>) -> Result<(), WsError> {
        match &mut self.0 {
            Writer::Fast(w) => w.send_text(payload).await,
            Writer::Framed(w) => w.send_text(payload).await,
        }
    }

    pub async fn send_binary(&mut self, payload: BytesMut) -> Result<(), WsError> {
        match &mut self.0 {
            Writer::Fast(w) => w.send_binary(payload).await,
            Writer::Framed(w) => w.send_binary(payload).await,
        }
    }

    pub async fn send_pong(&mut self, payload: Bytes) -> Result<(), WsError> {
        match &mut self.0 {
            Writer::Fast(w) => w.send_pong(payload).await,
            Writer::Framed(w) => w.send_pong(&payload).await,
        }
    }

    /// Sends a close frame and flushes.
    pub async fn send_close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        match &mut self.0 {
            Writer::Fast(w) => w.send_close(code, reason).await,
            Writer::Framed(w) => w.send_close(code, reason).await,
        }
    }

    /// Neither implementation flushes on its own; over TLS, unflushed bytes sit in rustls.
    pub async fn flush(&mut self) -> Result<(), WsError> {
        match &mut self.0 {
            Writer::Fast(w) => w.flush().await,
            Writer::Framed(w) => w.flush().await,
        }
    }

    /// What compression did so far; `None` on an uncompressed session.
    pub fn compression_stats(&self) -> Option<CompressionStats> {
        self.compression_counters().map(|c| c.snapshot())
    }

    /// The live counters, for a metrics task to read while this writer runs.
    pub fn compression_counters(&self) -> Option<Arc<CompressionCounters>> {
        match &self.0 {
            Writer::Fast(_) => None,
            Writer::Framed(w) => w.counters(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeflateConfig;
    use crate::transport::handshake::{accept, connect};
    use anyproxy_proto::Encoding;

    type Side = (WsReader, WsWriter, Option<DeflateParams>);

    /// Our client and our server, handshake included, over an in-memory pipe.
    async fn pair(client: DeflateConfig, server: DeflateConfig) -> (Side, Side) {
        let (a, b) = tokio::io::duplex(4 << 20);
        let (mut a, mut b): (BoxIo, BoxIo) = (Box::new(a), Box::new(b));
        let srv = tokio::spawn(async move {
            let acc = accept(&mut b, &[Encoding::Binary], Some(&server))
                .await
                .unwrap();
            (b, acc.deflate)
        });
        let con = connect(&mut a, "x", &[Encoding::Binary], Some(&client))
            .await
            .unwrap();
        let (b, sd) = srv.await.unwrap();
        assert_eq!(con.deflate.is_some(), sd.is_some());
        let (cr, cw) = split(a, Role::Client, 1 << 20, con.deflate);
        let (sr, sw) = split(b, Role::Server, 1 << 20, sd);
        ((cr, cw, con.deflate), (sr, sw, sd))
    }

    fn messages() -> Vec<(bool, Vec<u8>)> {
        let json = br#"{"type":"data","id":7,"payload":"R0VUIC8gSFRUUC8xLjENCkhvc3Q6IGV4YW1wbGUuY29tDQoNCg=="}"#;
        let noise: Vec<u8> = (0..3000).map(|_| rand::random::<u8>()).collect();
        vec![
            (true, json.repeat(10)),
            (false, noise),
            (true, json.repeat(10)),
            (false, b"tiny".to_vec()),
            (false, vec![0; 200_000]),
            (true, json.repeat(3)),
        ]
    }

    async fn exchange(from: &mut WsWriter, to: &mut WsReader) {
        let msgs = messages();
        for (text, m) in &msgs {
            if *text {
                from.send_text(m.clone()).await.unwrap();
            } else {
                from.send_binary(BytesMut::from(&m[..])).await.unwrap();
            }
        }
        from.flush().await.unwrap();
        for (text, m) in &msgs {
            match to.next().await.unwrap() {
                Incoming::Message { text: t, payload } => {
                    assert_eq!(t, *text);
                    assert_eq!(&payload[..], &m[..]);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn round_trips_for_every_combination() {
        let config = |nct: bool, bits: u8| DeflateConfig {
            enabled: true,
            no_context_takeover: nct,
            max_window_bits: bits,
            ..DeflateConfig::default()
        };
        for client_nct in [true, false] {
            for server_nct in [true, false] {
                for bits in [9, 15] {
                    let what =
                        format!("client nct {client_nct}, server nct {server_nct}, {bits} bits");
                    let ((mut cr, mut cw, cp), (mut sr, mut sw, sp)) =
                        pair(config(client_nct, bits), config(server_nct, 15)).await;
                    let (cp, sp) = (cp.unwrap(), sp.unwrap());
                    assert_eq!(sp.compress_window_bits, bits, "{what}");
                    assert_eq!(cp.compress_reset, sp.decompress_reset, "{what}");
                    assert_eq!(sp.compress_reset, cp.decompress_reset, "{what}");
                    exchange(&mut cw, &mut sr).await;
                    exchange(&mut sw, &mut cr).await;
                    for w in [&cw, &sw] {
                        let s = w.compression_stats().unwrap();
                        assert_eq!(s.compressed, 4, "{what}: {s:?}");
                        assert_eq!((s.incompressible, s.skipped), (1, 1), "{what}: {s:?}");
                        assert!(s.wire_bytes < s.raw_bytes / 10, "{what}: {s:?}");
                    }
                    // Control frames pass too.
                    sw.send_pong(Bytes::from_static(b"p")).await.unwrap();
                    sw.send_close(close_code::NORMAL, "done").await.unwrap();
                    assert!(matches!(cr.next().await.unwrap(), Incoming::Pong));
                    assert!(matches!(
                        cr.next().await.unwrap(),
                        Incoming::Close {
                            code: Some(1000),
                            ..
                        }
                    ));
                }
            }
        }
    }

    #[tokio::test]
    async fn without_agreement_the_fast_path_carries_the_session() {
        let on = DeflateConfig {
            enabled: true,
            ..DeflateConfig::default()
        };
        for (client, server) in [
            (on.clone(), DeflateConfig::default()),
            (DeflateConfig::default(), on.clone()),
        ] {
            let ((mut cr, mut cw, cp), (mut sr, mut sw, sp)) = pair(client, server).await;
            assert!(cp.is_none() && sp.is_none());
            exchange(&mut cw, &mut sr).await;
            exchange(&mut sw, &mut cr).await;
            assert!(cw.compression_stats().is_none());
        }
    }
}
