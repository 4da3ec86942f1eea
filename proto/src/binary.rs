//! The compact binary encoding.
//!
//! A WebSocket binary message carries one or more frames back to back:
//!
//! ```text
//! 0        1                 5                 9
//! +--------+-----------------+-----------------+----------------------+
//! | type   | connection id   | body length     | body (length bytes)  |
//! | u8     | u32 big-endian  | u32 big-endian  |                      |
//! +--------+-----------------+-----------------+----------------------+
//! ```
//!
//! A `data` body is the raw payload; decoding returns it as a slice of the input
//! [`Bytes`] without copying. Strings in control bodies are a `u16` big-endian length
//! followed by UTF-8. See `PROTOCOL.md` for every body layout.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{
    Auth, AuthResponse, Close, ConnId, Connect, ConnectResponse, Data, DecodeError, ErrorCode,
    ErrorMsg, Fin, Forward, ForwardResponse, Heartbeat, Message, Protocol, Unforward, WindowUpdate,
    MAX_DATA_PAYLOAD, MAX_STRING_LEN,
};

/// `Sec-WebSocket-Protocol` token for this encoding; the suffix is the wire version.
pub const SUBPROTOCOL: &str = "anyproxy-binary.v2";

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 9;

/// Largest body of a control (non-`data`) frame.
pub const MAX_CONTROL_BODY: usize = 4 * (MAX_STRING_LEN + 2) + 16;

/// Frame type tags. `0x00` is never used; `0x0E..=0x3F` are reserved for protocol
/// messages added in later wire versions; `0x40..=0xFF` are reserved for extensions.
pub mod tag {
    pub const AUTH: u8 = 0x01;
    pub const AUTH_RESPONSE: u8 = 0x02;
    pub const CONNECT: u8 = 0x03;
    pub const CONNECT_RESPONSE: u8 = 0x04;
    pub const DATA: u8 = 0x05;
    pub const CLOSE: u8 = 0x06;
    pub const PING: u8 = 0x07;
    pub const PONG: u8 = 0x08;
    pub const ERROR: u8 = 0x09;
    pub const WINDOW_UPDATE: u8 = 0x0A;
    pub const FIN: u8 = 0x0B;
    pub const FORWARD: u8 = 0x0C;
    pub const FORWARD_RESPONSE: u8 = 0x0D;
    pub const UNFORWARD: u8 = 0x0E;
}

const PROTOCOL_TCP: u8 = 0;
const PROTOCOL_UDP: u8 = 1;

/// The optional last byte of a `forward` / `forward_response` body: written only for
/// `udp`, so that a TCP forward keeps the bytes of the first v2 peers (which refuse the
/// byte as trailing garbage: a clear error, not a TCP forward by mistake).
fn forward_trailer(p: Protocol) -> &'static [u8] {
    match p {
        Protocol::Tcp => &[],
        Protocol::Udp => &[PROTOCOL_UDP],
    }
}

/// Reads that optional byte: absent means `tcp`.
fn get_forward_protocol(body: &mut Bytes) -> Result<Protocol, DecodeError> {
    if !body.has_remaining() {
        return Ok(Protocol::Tcp);
    }
    get_protocol(body)
}

fn get_protocol(body: &mut Bytes) -> Result<Protocol, DecodeError> {
    match get_u8(body)? {
        PROTOCOL_TCP => Ok(Protocol::Tcp),
        PROTOCOL_UDP => Ok(Protocol::Udp),
        other => Err(DecodeError::UnknownProtocol(other.to_string())),
    }
}

// ---------------------------------------------------------------- encoding

fn put_header(out: &mut BytesMut, tag: u8, id: u32, body_len: usize) {
    out.put_u8(tag);
    out.put_u32(id);
    // Bodies are bounded far below u32::MAX by MAX_DATA_PAYLOAD / MAX_CONTROL_BODY.
    out.put_u32(body_len as u32);
}

/// Length-prefixed string. Strings longer than the limit are cut at a char boundary:
/// the encoder never produces a frame the decoder would refuse.
fn put_str(out: &mut BytesMut, s: &str) {
    let s = clamp_str(s, MAX_STRING_LEN);
    out.put_u16(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn clamp_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn str_len(s: &str) -> usize {
    2 + clamp_str(s, MAX_STRING_LEN).len()
}

/// Appends the frame for `msg` to `out`.
///
/// A data payload larger than [`MAX_DATA_PAYLOAD`] is a caller bug (readers size their
/// reads below it); it is caught in debug builds.
pub fn encode_into(msg: &Message, out: &mut BytesMut) {
    match msg {
        Message::Auth(m) => {
            let len = str_len(&m.username) + str_len(&m.password) + str_len(&m.client_id);
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::AUTH, 0, len);
            put_str(out, &m.username);
            put_str(out, &m.password);
            put_str(out, &m.client_id);
        }
        Message::AuthResponse(m) => {
            let len = 1 + str_len(&m.message);
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::AUTH_RESPONSE, 0, len);
            out.put_u8(m.success as u8);
            put_str(out, &m.message);
        }
        Message::Connect(m) => {
            let len = 1 + 2 + str_len(&m.host);
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::CONNECT, m.id.0, len);
            out.put_u8(match m.protocol {
                Protocol::Tcp => PROTOCOL_TCP,
                Protocol::Udp => PROTOCOL_UDP,
            });
            out.put_u16(m.port);
            put_str(out, &m.host);
        }
        Message::ConnectResponse(m) => {
            let len = 1 + str_len(&m.message);
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::CONNECT_RESPONSE, m.id.0, len);
            out.put_u8(m.success as u8);
            put_str(out, &m.message);
        }
        Message::Data(m) => {
            debug_assert!(m.payload.len() <= MAX_DATA_PAYLOAD);
            out.reserve(HEADER_LEN + m.payload.len());
            put_header(out, tag::DATA, m.id.0, m.payload.len());
            out.put_slice(&m.payload);
        }
        Message::Close(m) => {
            let len = str_len(&m.reason);
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::CLOSE, m.id.0, len);
            put_str(out, &m.reason);
        }
        Message::Ping(h) | Message::Pong(h) => {
            let t = if matches!(msg, Message::Ping(_)) {
                tag::PING
            } else {
                tag::PONG
            };
            out.reserve(HEADER_LEN + 8);
            put_header(out, t, 0, 8);
            out.put_i64(h.timestamp);
        }
        Message::Error(m) => {
            let len = 2 + str_len(&m.message);
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::ERROR, m.id.map_or(0, |id| id.0), len);
            out.put_u8(m.code.tag());
            out.put_u8(m.id.is_some() as u8);
            put_str(out, &m.message);
        }
        Message::WindowUpdate(m) => {
            debug_assert!(m.increment > 0);
            out.reserve(HEADER_LEN + 4);
            put_header(out, tag::WINDOW_UPDATE, m.id.0, 4);
            out.put_u32(m.increment);
        }
        Message::Fin(m) => {
            out.reserve(HEADER_LEN);
            put_header(out, tag::FIN, m.id.0, 0);
        }
        Message::Forward(m) => {
            let trailer = forward_trailer(m.protocol);
            let len = 2 + 2 + str_len(&m.target_host) + trailer.len();
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::FORWARD, 0, len);
            out.put_u16(m.listen_port);
            out.put_u16(m.target_port);
            put_str(out, &m.target_host);
            out.put_slice(trailer);
        }
        Message::ForwardResponse(m) => {
            let trailer = forward_trailer(m.protocol);
            let len = 2 + 1 + str_len(&m.message) + trailer.len();
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::FORWARD_RESPONSE, 0, len);
            out.put_u16(m.listen_port);
            out.put_u8(m.success as u8);
            put_str(out, &m.message);
            out.put_slice(trailer);
        }
        Message::Unforward(m) => {
            let trailer = forward_trailer(m.protocol);
            let len = 2 + trailer.len();
            out.reserve(HEADER_LEN + len);
            put_header(out, tag::UNFORWARD, 0, len);
            out.put_u16(m.listen_port);
            out.put_slice(trailer);
        }
    }
}

/// The frame for `msg`.
pub fn encode(msg: &Message) -> Bytes {
    let mut out = BytesMut::new();
    encode_into(msg, &mut out);
    out.freeze()
}

/// Writes only the header of a `data` frame, for callers that place the payload
/// themselves (e.g. read it straight from a socket behind reserved headroom).
pub fn data_header(id: ConnId, payload_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = tag::DATA;
    h[1..5].copy_from_slice(&id.0.to_be_bytes());
    h[5..9].copy_from_slice(&(payload_len as u32).to_be_bytes());
    h
}

// ---------------------------------------------------------------- decoding

fn need(buf: &Bytes, n: usize) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError::Truncated {
            needed: n,
            available: buf.remaining(),
        })
    } else {
        Ok(())
    }
}

fn get_u8(body: &mut Bytes) -> Result<u8, DecodeError> {
    need(body, 1)?;
    Ok(body.get_u8())
}

fn get_bool(body: &mut Bytes, field: &'static str) -> Result<bool, DecodeError> {
    match get_u8(body)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::InvalidField {
            msg_type: field,
            detail: format!("boolean byte must be 0 or 1, got {other}"),
        }),
    }
}

fn get_str(body: &mut Bytes, field: &'static str) -> Result<String, DecodeError> {
    need(body, 2)?;
    let len = body.get_u16() as usize;
    if len > MAX_STRING_LEN {
        return Err(DecodeError::TooLarge {
            what: field,
            len,
            max: MAX_STRING_LEN,
        });
    }
    need(body, len)?;
    let raw = body.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::InvalidUtf8(field))
}

pub(crate) fn nonzero_increment(increment: u32) -> Result<u32, DecodeError> {
    if increment == 0 {
        return Err(DecodeError::InvalidField {
            msg_type: "window_update",
            detail: "increment must be at least 1".into(),
        });
    }
    Ok(increment)
}

/// Decodes the frame at the front of `buf` and advances past it.
///
/// A `data` payload is returned as a slice of `buf` (no copy). Never panics; a length
/// that exceeds the limits is refused before anything is allocated.
pub fn decode_frame(buf: &mut Bytes) -> Result<Message, DecodeError> {
    need(buf, HEADER_LEN)?;
    let tag = buf[0];
    let id = ConnId(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]));
    let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
    let max = if tag == tag::DATA {
        MAX_DATA_PAYLOAD
    } else {
        MAX_CONTROL_BODY
    };
    if len > max {
        return Err(DecodeError::TooLarge {
            what: "frame body",
            len,
            max,
        });
    }
    if !(tag::AUTH..=tag::UNFORWARD).contains(&tag) {
        return Err(DecodeError::UnknownType(format!("0x{tag:02x}")));
    }
    need(buf, HEADER_LEN + len)?;
    buf.advance(HEADER_LEN);
    let mut body = buf.split_to(len);
    let msg = decode_body(tag, id, &mut body)?;
    if body.has_remaining() {
        return Err(DecodeError::InvalidField {
            msg_type: crate::MessageKind::ALL[(tag - 1) as usize].as_str(),
            detail: format!(
                "{} unexpected bytes at the end of the body",
                body.remaining()
            ),
        });
    }
    Ok(msg)
}

fn decode_body(tag: u8, id: ConnId, body: &mut Bytes) -> Result<Message, DecodeError> {
    Ok(match tag {
        tag::AUTH => Message::Auth(Auth {
            username: get_str(body, "username")?,
            password: get_str(body, "password")?,
            client_id: get_str(body, "client_id")?,
        }),
        tag::AUTH_RESPONSE => Message::AuthResponse(AuthResponse {
            success: get_bool(body, "auth_response")?,
            message: get_str(body, "message")?,
        }),
        tag::CONNECT => {
            let protocol = get_protocol(body)?;
            need(body, 2)?;
            let port = body.get_u16();
            Message::Connect(Connect {
                id,
                host: get_str(body, "target_host")?,
                port,
                protocol,
            })
        }
        tag::CONNECT_RESPONSE => Message::ConnectResponse(ConnectResponse {
            id,
            success: get_bool(body, "connect_response")?,
            message: get_str(body, "message")?,
        }),
        tag::DATA => Message::Data(Data {
            id,
            payload: std::mem::take(body),
        }),
        tag::CLOSE => Message::Close(Close {
            id,
            reason: get_str(body, "reason")?,
        }),
        tag::PING | tag::PONG => {
            need(body, 8)?;
            let h = Heartbeat::new(body.get_i64());
            if tag == tag::PING {
                Message::Ping(h)
            } else {
                Message::Pong(h)
            }
        }
        tag::ERROR => {
            let code_tag = get_u8(body)?;
            let code = ErrorCode::from_tag(code_tag)
                .ok_or_else(|| DecodeError::UnknownErrorCode(code_tag.to_string()))?;
            let has_id = get_bool(body, "error")?;
            Message::Error(ErrorMsg {
                code,
                id: has_id.then_some(id),
                message: get_str(body, "message")?,
            })
        }
        tag::WINDOW_UPDATE => {
            need(body, 4)?;
            Message::WindowUpdate(WindowUpdate {
                id,
                increment: nonzero_increment(body.get_u32())?,
            })
        }
        tag::FIN => Message::Fin(Fin { id }),
        tag::FORWARD => {
            need(body, 4)?;
            let listen_port = body.get_u16();
            let target_port = body.get_u16();
            Message::Forward(Forward {
                listen_port,
                target_host: get_str(body, "target_host")?,
                target_port,
                protocol: get_forward_protocol(body)?,
            })
        }
        tag::FORWARD_RESPONSE => {
            need(body, 2)?;
            let listen_port = body.get_u16();
            Message::ForwardResponse(ForwardResponse {
                listen_port,
                success: get_bool(body, "forward_response")?,
                message: get_str(body, "message")?,
                protocol: get_forward_protocol(body)?,
            })
        }
        tag::UNFORWARD => {
            need(body, 2)?;
            Message::Unforward(Unforward {
                listen_port: body.get_u16(),
                protocol: get_forward_protocol(body)?,
            })
        }
        other => return Err(DecodeError::UnknownType(format!("0x{other:02x}"))),
    })
}

/// Iterates over the frames of one WebSocket message. Stops after the first error.
pub struct Frames {
    buf: Bytes,
    failed: bool,
}

impl Frames {
    pub fn new(message: Bytes) -> Self {
        Frames {
            buf: message,
            failed: false,
        }
    }
}

impl Iterator for Frames {
    type Item = Result<Message, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || !self.buf.has_remaining() {
            return None;
        }
        let item = decode_frame(&mut self.buf);
        self.failed = item.is_err();
        Some(item)
    }
}
