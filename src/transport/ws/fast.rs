//! Uncompressed sessions, on fastwebsockets.
//!
//! The reader reassembles fragmented messages itself so that the total size is capped
//! (fastwebsockets' `FragmentCollector` has no cap) and hands control frames to the
//! caller instead of answering them inline, because the writer lives in another task.

use bytes::{Bytes, BytesMut};
use fastwebsockets::{OpCode, Payload, Role, WebSocketError};
use tokio::io::{ReadHalf, WriteHalf};

use super::{BoxIo, Incoming, WsError};

fn map_err(e: WebSocketError, max: usize) -> WsError {
    match e {
        WebSocketError::FrameTooLarge => WsError::TooLarge { max },
        WebSocketError::IoError(io) => WsError::Io(io),
        WebSocketError::UnexpectedEOF | WebSocketError::ConnectionClosed => WsError::Closed,
        other => WsError::Protocol(other.to_string()),
    }
}

pub struct FastReader {
    inner: fastwebsockets::WebSocketRead<ReadHalf<BoxIo>>,
    max_message: usize,
    partial: Option<(bool, BytesMut)>,
}

pub struct FastWriter {
    inner: fastwebsockets::WebSocketWrite<WriteHalf<BoxIo>>,
}

/// Splits an upgraded stream into a reader and a writer.
pub fn split(io: BoxIo, role: Role, max_message: usize) -> (FastReader, FastWriter) {
    let (r, w) = tokio::io::split(io);
    let (mut rd, wr) = fastwebsockets::after_handshake_split(r, w, role);
    rd.set_auto_close(false);
    rd.set_auto_pong(false);
    rd.set_max_message_size(max_message + 1);
    (
        FastReader {
            inner: rd,
            max_message,
            partial: None,
        },
        FastWriter { inner: wr },
    )
}

fn into_bytes(p: Payload<'_>) -> Bytes {
    match p {
        Payload::Bytes(b) => b.freeze(),
        Payload::Owned(v) => Bytes::from(v),
        other => Bytes::copy_from_slice(&other),
    }
}

impl FastReader {
    /// The next message or control frame. Not cancel-safe: give the reader its own task.
    pub async fn next(&mut self) -> Result<Incoming, WsError> {
        loop {
            let max = self.max_message;
            let frame = self
                .inner
                .read_frame(&mut |_| async { Ok::<(), std::io::Error>(()) })
                .await
                .map_err(|e| map_err(e, max))?;
            match frame.opcode {
                OpCode::Text | OpCode::Binary => {
                    if self.partial.is_some() {
                        return Err(WsError::Protocol(
                            "new message started inside a fragmented message".into(),
                        ));
                    }
                    let text = frame.opcode == OpCode::Text;
                    if frame.fin {
                        return Ok(Incoming::Message {
                            text,
                            payload: into_bytes(frame.payload),
                        });
                    }
                    let mut buf = BytesMut::with_capacity(frame.payload.len() * 2);
                    buf.extend_from_slice(&frame.payload);
                    self.partial = Some((text, buf));
                }
                OpCode::Continuation => {
                    let Some((text, mut buf)) = self.partial.take() else {
                        return Err(WsError::Protocol("continuation without a message".into()));
                    };
                    if buf.len() + frame.payload.len() > self.max_message {
                        return Err(WsError::TooLarge {
                            max: self.max_message,
                        });
                    }
                    buf.extend_from_slice(&frame.payload);
                    if frame.fin {
                        if text && std::str::from_utf8(&buf).is_err() {
                            return Err(WsError::Protocol("text message is not UTF-8".into()));
                        }
                        return Ok(Incoming::Message {
                            text,
                            payload: buf.freeze(),
                        });
                    }
                    self.partial = Some((text, buf));
                }
                OpCode::Ping => return Ok(Incoming::Ping(into_bytes(frame.payload))),
                OpCode::Pong => return Ok(Incoming::Pong),
                OpCode::Close => {
                    let p = &frame.payload;
                    let (code, reason) = if p.len() >= 2 {
                        (
                            Some(u16::from_be_bytes([p[0], p[1]])),
                            String::from_utf8_lossy(&p[2..]).into_owned(),
                        )
                    } else {
                        (None, String::new())
                    };
                    return Ok(Incoming::Close { code, reason });
                }
            }
        }
    }
}

impl FastWriter {
    pub async fn send_text(&mut self, payload: Vec<u8>) -> Result<(), WsError> {
        self.write(fastwebsockets::Frame::text(Payload::Owned(payload)))
            .await
    }

    pub async fn send_binary(&mut self, payload: BytesMut) -> Result<(), WsError> {
        self.write(fastwebsockets::Frame::binary(Payload::Bytes(payload)))
            .await
    }

    pub async fn send_pong(&mut self, payload: Bytes) -> Result<(), WsError> {
        self.write(fastwebsockets::Frame::pong(Payload::Owned(
            payload.to_vec(),
        )))
        .await
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) -> Result<(), WsError> {
        self.write(fastwebsockets::Frame::close(
            code,
            super::close_reason(reason),
        ))
        .await?;
        self.flush().await
    }

    async fn write(&mut self, frame: fastwebsockets::Frame<'_>) -> Result<(), WsError> {
        self.inner
            .write_frame(frame)
            .await
            .map_err(|e| map_err(e, usize::MAX))
    }

    /// fastwebsockets never flushes; over TLS, unflushed bytes would sit in rustls.
    pub async fn flush(&mut self) -> Result<(), WsError> {
        self.inner.flush().await.map_err(|e| map_err(e, usize::MAX))
    }
}
