//! The documented JSON encoding: `{"type": "...", "data": {...}}`.
//!
//! Field names and types follow the AnyProxy API document. Unknown fields are ignored;
//! a missing field, a wrong type, bad base64 or an unknown `type` is a [`DecodeError`].

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    Auth, AuthResponse, Close, ConnId, Connect, ConnectResponse, Data, DecodeError, ErrorCode,
    ErrorMsg, Fin, Forward, ForwardResponse, Heartbeat, Message, MessageKind, Protocol,
    WindowUpdate, MAX_DATA_PAYLOAD, MAX_STRING_LEN,
};

/// `Sec-WebSocket-Protocol` token for this encoding. Offering no token at all also
/// selects JSON, so that clients written from the document alone keep working.
pub const SUBPROTOCOL: &str = "anyproxy-json.v1";

/// Largest JSON message accepted: a maximal data payload in base64 plus the envelope.
pub const MAX_MESSAGE_LEN: usize = MAX_B64_PAYLOAD + 4096;

/// Longest base64 text of a data payload: 4 characters carry 3 bytes.
const MAX_B64_PAYLOAD: usize = MAX_DATA_PAYLOAD.div_ceil(3) * 4;

// ---------------------------------------------------------------- encoding

#[derive(Serialize)]
struct Envelope<T> {
    #[serde(rename = "type")]
    kind: &'static str,
    data: T,
}

#[derive(Serialize)]
struct AuthOut<'a> {
    username: &'a str,
    password: &'a str,
    client_id: &'a str,
}

#[derive(Serialize)]
struct AuthResponseOut<'a> {
    success: bool,
    message: &'a str,
}

#[derive(Serialize)]
struct ConnectOut<'a> {
    connection_id: String,
    target_host: &'a str,
    target_port: u16,
    protocol: &'static str,
}

#[derive(Serialize)]
struct ConnectResponseOut<'a> {
    connection_id: String,
    success: bool,
    message: &'a str,
}

#[derive(Serialize)]
struct CloseOut<'a> {
    connection_id: String,
    reason: &'a str,
}

#[derive(Serialize)]
struct WindowUpdateOut {
    connection_id: String,
    increment: u32,
}

#[derive(Serialize)]
struct FinOut {
    connection_id: String,
}

#[derive(Serialize)]
struct ForwardOut<'a> {
    listen_port: u16,
    target_host: &'a str,
    target_port: u16,
}

#[derive(Serialize)]
struct ForwardResponseOut<'a> {
    listen_port: u16,
    success: bool,
    message: &'a str,
}

#[derive(Serialize)]
struct HeartbeatOut {
    timestamp: i64,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_id: Option<String>,
}

fn write<T: Serialize>(out: &mut Vec<u8>, kind: MessageKind, data: T) {
    let envelope = Envelope {
        kind: kind.as_str(),
        data,
    };
    // Serializing plain structs of strings and integers into a Vec cannot fail.
    serde_json::to_writer(out, &envelope).expect("JSON serialization into memory");
}

// Data messages are nearly all of the bytes in JSON mode, so they skip serde both ways:
// the payload is base64 (no character needs escaping) and the id is digits, so the
// bytes below are exactly what serde_json writes for the same message.
const DATA_PREFIX: &[u8] = br#"{"type":"data","data":{"connection_id":""#;
const DATA_PAYLOAD: &[u8] = br#"","payload":""#;
const DATA_SUFFIX: &[u8] = br#""}}"#;

fn encode_data(m: &Data, out: &mut Vec<u8>) {
    let b64 = base64_simd::STANDARD;
    out.reserve(
        DATA_PREFIX.len()
            + 10
            + DATA_PAYLOAD.len()
            + b64.encoded_length(m.payload.len())
            + DATA_SUFFIX.len(),
    );
    out.extend_from_slice(DATA_PREFIX);
    let mut digits = [0u8; 10];
    out.extend_from_slice(decimal(m.id.0, &mut digits));
    out.extend_from_slice(DATA_PAYLOAD);
    b64.encode_append(&m.payload[..], out);
    out.extend_from_slice(DATA_SUFFIX);
}

fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A data message in exactly the shape [`encode_data`] writes. Anything else (other
/// key order, spaces, escapes, a numeric id, bad base64) returns `None` and goes
/// through the general parser, which accepts every valid form and names the error.
fn decode_data_fast(input: &[u8]) -> Option<Message> {
    let rest = input.strip_prefix(DATA_PREFIX)?;
    let quote = rest.iter().take(11).position(|&b| b == b'"')?;
    let (digits, rest) = rest.split_at(quote);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let id = std::str::from_utf8(digits).ok()?.parse::<u32>().ok()?;
    let b64 = rest.strip_prefix(DATA_PAYLOAD)?.strip_suffix(DATA_SUFFIX)?;
    if b64.len() > MAX_B64_PAYLOAD {
        return None;
    }
    // Rejects any byte outside the alphabet, so a quote or backslash inside cannot
    // have ended the string early or hidden an escape.
    let payload = base64_simd::STANDARD.decode_to_vec(b64).ok()?;
    Some(Message::Data(Data {
        id: ConnId(id),
        payload: Bytes::from(payload),
    }))
}

/// Appends the JSON form of `msg` to `out`.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    let kind = msg.kind();
    match msg {
        Message::Auth(m) => write(
            out,
            kind,
            AuthOut {
                username: &m.username,
                password: &m.password,
                client_id: &m.client_id,
            },
        ),
        Message::AuthResponse(m) => write(
            out,
            kind,
            AuthResponseOut {
                success: m.success,
                message: &m.message,
            },
        ),
        Message::Connect(m) => write(
            out,
            kind,
            ConnectOut {
                connection_id: m.id.to_string(),
                target_host: &m.host,
                target_port: m.port,
                protocol: m.protocol.as_str(),
            },
        ),
        Message::ConnectResponse(m) => write(
            out,
            kind,
            ConnectResponseOut {
                connection_id: m.id.to_string(),
                success: m.success,
                message: &m.message,
            },
        ),
        Message::Data(m) => encode_data(m, out),
        Message::Close(m) => write(
            out,
            kind,
            CloseOut {
                connection_id: m.id.to_string(),
                reason: &m.reason,
            },
        ),
        Message::Ping(h) | Message::Pong(h) => write(
            out,
            kind,
            HeartbeatOut {
                timestamp: h.timestamp,
            },
        ),
        Message::Error(m) => write(
            out,
            kind,
            ErrorOut {
                code: m.code.as_str(),
                message: &m.message,
                connection_id: m.id.map(|id| id.to_string()),
            },
        ),
        Message::WindowUpdate(m) => write(
            out,
            kind,
            WindowUpdateOut {
                connection_id: m.id.to_string(),
                increment: m.increment,
            },
        ),
        Message::Fin(m) => write(
            out,
            kind,
            FinOut {
                connection_id: m.id.to_string(),
            },
        ),
        Message::Forward(m) => write(
            out,
            kind,
            ForwardOut {
                listen_port: m.listen_port,
                target_host: &m.target_host,
                target_port: m.target_port,
            },
        ),
        Message::ForwardResponse(m) => write(
            out,
            kind,
            ForwardResponseOut {
                listen_port: m.listen_port,
                success: m.success,
                message: &m.message,
            },
        ),
    }
}

/// The JSON form of `msg`.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(match msg {
        Message::Data(d) => d.payload.len() / 3 * 4 + 96,
        _ => 128,
    });
    encode_into(msg, &mut out);
    out
}

// ---------------------------------------------------------------- decoding

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// A `connection_id` as it appears on the wire: the document says string; a bare number
/// is accepted too, since it is unambiguous.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireId<'a> {
    Str(#[serde(borrow)] Cow<'a, str>),
    Num(u64),
}

impl WireId<'_> {
    fn to_conn_id(&self) -> Result<ConnId, DecodeError> {
        match self {
            WireId::Str(s) => parse_conn_id(s),
            WireId::Num(n) => u32::try_from(*n)
                .map(ConnId)
                .map_err(|_| DecodeError::InvalidConnId(n.to_string())),
        }
    }
}

fn parse_conn_id(s: &str) -> Result<ConnId, DecodeError> {
    let digits_only = !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only {
        return Err(DecodeError::InvalidConnId(truncate_for_error(s)));
    }
    s.parse::<u32>()
        .map(ConnId)
        .map_err(|_| DecodeError::InvalidConnId(truncate_for_error(s)))
}

fn truncate_for_error(s: &str) -> String {
    s.chars().take(64).collect()
}

#[derive(Deserialize)]
struct AuthIn<'a> {
    #[serde(borrow)]
    username: Cow<'a, str>,
    #[serde(borrow)]
    password: Cow<'a, str>,
    #[serde(borrow)]
    client_id: Cow<'a, str>,
}

#[derive(Deserialize)]
struct AuthResponseIn<'a> {
    success: bool,
    #[serde(borrow)]
    message: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ConnectIn<'a> {
    #[serde(borrow)]
    connection_id: WireId<'a>,
    #[serde(borrow)]
    target_host: Cow<'a, str>,
    target_port: u16,
    #[serde(borrow)]
    protocol: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ConnectResponseIn<'a> {
    #[serde(borrow)]
    connection_id: WireId<'a>,
    success: bool,
    #[serde(borrow)]
    message: Cow<'a, str>,
}

#[derive(Deserialize)]
struct DataIn<'a> {
    #[serde(borrow)]
    connection_id: WireId<'a>,
    #[serde(borrow)]
    payload: Cow<'a, str>,
}

#[derive(Deserialize)]
struct CloseIn<'a> {
    #[serde(borrow)]
    connection_id: WireId<'a>,
    #[serde(borrow)]
    reason: Cow<'a, str>,
}

#[derive(Deserialize)]
struct WindowUpdateIn<'a> {
    #[serde(borrow)]
    connection_id: WireId<'a>,
    increment: u32,
}

#[derive(Deserialize)]
struct FinIn<'a> {
    #[serde(borrow)]
    connection_id: WireId<'a>,
}

#[derive(Deserialize)]
struct ForwardIn<'a> {
    listen_port: u16,
    #[serde(borrow)]
    target_host: Cow<'a, str>,
    target_port: u16,
}

#[derive(Deserialize)]
struct ForwardResponseIn<'a> {
    listen_port: u16,
    success: bool,
    #[serde(borrow)]
    message: Cow<'a, str>,
}

#[derive(Deserialize)]
struct HeartbeatIn {
    timestamp: i64,
}

#[derive(Deserialize)]
struct ErrorIn<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
    #[serde(borrow)]
    message: Cow<'a, str>,
    #[serde(default, borrow)]
    connection_id: Option<WireId<'a>>,
}

fn body<'a, T>(kind: MessageKind, raw: Option<&'a RawValue>) -> Result<T, DecodeError>
where
    T: Deserialize<'a>,
{
    let raw = raw.ok_or_else(|| DecodeError::InvalidField {
        msg_type: kind.as_str(),
        detail: "missing field `data`".into(),
    })?;
    serde_json::from_str(raw.get()).map_err(|_| DecodeError::InvalidField {
        msg_type: kind.as_str(),
        detail: field_error::<T>(raw.get()),
    })
}

/// Describes why a body failed to deserialize, naming the offending field
/// (`"connection_id: invalid type: ..."`). Only runs on the error path, so the
/// path tracking costs nothing on well-formed input.
fn field_error<'a, T>(raw: &'a str) -> String
where
    T: Deserialize<'a>,
{
    let mut de = serde_json::Deserializer::from_str(raw);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        // Errors about the body as a whole ("missing field `x`") have the root path.
        Err(e) if e.path().iter().next().is_none() => e.into_inner().to_string(),
        Err(e) => e.to_string(),
        // Unreachable in practice: the same input just failed without path tracking.
        Ok(_) => "invalid body".into(),
    }
}

fn string(field: &'static str, s: Cow<'_, str>) -> Result<String, DecodeError> {
    if s.len() > MAX_STRING_LEN {
        return Err(DecodeError::TooLarge {
            what: field,
            len: s.len(),
            max: MAX_STRING_LEN,
        });
    }
    Ok(s.into_owned())
}

fn decode_payload(b64: &str) -> Result<Bytes, DecodeError> {
    // Bound the allocation before decoding: 4 base64 characters carry 3 bytes.
    let max_encoded = MAX_B64_PAYLOAD;
    if b64.len() > max_encoded {
        return Err(DecodeError::TooLarge {
            what: "data payload",
            len: b64.len() / 4 * 3,
            max: MAX_DATA_PAYLOAD,
        });
    }
    STANDARD
        .decode(b64)
        .map(Bytes::from)
        .map_err(|e| DecodeError::InvalidBase64(e.to_string()))
}

/// Decodes one JSON message. Never panics; allocation is bounded by [`MAX_MESSAGE_LEN`].
pub fn decode(input: &[u8]) -> Result<Message, DecodeError> {
    if input.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge {
            what: "JSON message",
            len: input.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    if let Some(msg) = decode_data_fast(input) {
        return Ok(msg);
    }
    let text = std::str::from_utf8(input).map_err(|_| DecodeError::InvalidUtf8("message"))?;
    let envelope: EnvelopeIn<'_> =
        serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
    let kind = MessageKind::parse(&envelope.kind)
        .ok_or_else(|| DecodeError::UnknownType(truncate_for_error(&envelope.kind)))?;
    let raw = envelope.data;
    let msg = match kind {
        MessageKind::Auth => {
            let b: AuthIn = body(kind, raw)?;
            Message::Auth(Auth {
                username: string("username", b.username)?,
                password: string("password", b.password)?,
                client_id: string("client_id", b.client_id)?,
            })
        }
        MessageKind::AuthResponse => {
            let b: AuthResponseIn = body(kind, raw)?;
            Message::AuthResponse(AuthResponse {
                success: b.success,
                message: string("message", b.message)?,
            })
        }
        MessageKind::Connect => {
            let b: ConnectIn = body(kind, raw)?;
            let protocol = Protocol::parse(&b.protocol)
                .ok_or_else(|| DecodeError::UnknownProtocol(truncate_for_error(&b.protocol)))?;
            Message::Connect(Connect {
                id: b.connection_id.to_conn_id()?,
                host: string("target_host", b.target_host)?,
                port: b.target_port,
                protocol,
            })
        }
        MessageKind::ConnectResponse => {
            let b: ConnectResponseIn = body(kind, raw)?;
            Message::ConnectResponse(ConnectResponse {
                id: b.connection_id.to_conn_id()?,
                success: b.success,
                message: string("message", b.message)?,
            })
        }
        MessageKind::Data => {
            let b: DataIn = body(kind, raw)?;
            Message::Data(Data {
                id: b.connection_id.to_conn_id()?,
                payload: decode_payload(&b.payload)?,
            })
        }
        MessageKind::Close => {
            let b: CloseIn = body(kind, raw)?;
            Message::Close(Close {
                id: b.connection_id.to_conn_id()?,
                reason: string("reason", b.reason)?,
            })
        }
        MessageKind::Ping | MessageKind::Pong => {
            let b: HeartbeatIn = body(kind, raw)?;
            let h = Heartbeat {
                timestamp: b.timestamp,
            };
            if kind == MessageKind::Ping {
                Message::Ping(h)
            } else {
                Message::Pong(h)
            }
        }
        MessageKind::Error => {
            let b: ErrorIn = body(kind, raw)?;
            let code = ErrorCode::parse(&b.code)
                .ok_or_else(|| DecodeError::UnknownErrorCode(truncate_for_error(&b.code)))?;
            // "optional_connection_id": absent, null and "" all mean "no connection".
            let id = match b.connection_id {
                None => None,
                Some(WireId::Str(s)) if s.is_empty() => None,
                Some(w) => Some(w.to_conn_id()?),
            };
            Message::Error(ErrorMsg {
                code,
                message: string("message", b.message)?,
                id,
            })
        }
        MessageKind::WindowUpdate => {
            let b: WindowUpdateIn = body(kind, raw)?;
            Message::WindowUpdate(WindowUpdate {
                id: b.connection_id.to_conn_id()?,
                increment: crate::binary::nonzero_increment(b.increment)?,
            })
        }
        MessageKind::Fin => {
            let b: FinIn = body(kind, raw)?;
            Message::Fin(Fin {
                id: b.connection_id.to_conn_id()?,
            })
        }
        MessageKind::Forward => {
            let b: ForwardIn = body(kind, raw)?;
            Message::Forward(Forward {
                listen_port: b.listen_port,
                target_host: string("target_host", b.target_host)?,
                target_port: b.target_port,
            })
        }
        MessageKind::ForwardResponse => {
            let b: ForwardResponseIn = body(kind, raw)?;
            Message::ForwardResponse(ForwardResponse {
                listen_port: b.listen_port,
                success: b.success,
                message: string("message", b.message)?,
            })
        }
    };
    Ok(msg)
}

#[cfg(test)]
mod data_fast_path {
    use super::*;
    use proptest::prelude::*;

    #[derive(Serialize)]
    struct DataOut {
        connection_id: String,
        payload: String,
    }

    /// What serde_json writes for a data message (the encoder before the fast path):
    /// the reference the fast path must match byte for byte.
    fn serde_form(id: u32, payload: &[u8]) -> String {
        let envelope = Envelope {
            kind: "data",
            data: DataOut {
                connection_id: id.to_string(),
                payload: STANDARD.encode(payload),
            },
        };
        serde_json::to_string(&envelope).unwrap()
    }

    fn general(input: &[u8]) -> Result<Message, DecodeError> {
        // The general parser alone: a leading space keeps the fast path out.
        let mut spaced = b" ".to_vec();
        spaced.extend_from_slice(input);
        decode(&spaced)
    }

    proptest! {
        #[test]
        fn fast_encoding_is_byte_identical_to_serde_and_both_decoders_agree(
            id in any::<u32>(),
            payload in proptest::collection::vec(any::<u8>(), 0..3000),
        ) {
            let msg = Message::Data(Data { id: ConnId(id), payload: Bytes::from(payload.clone()) });
            let fast = encode(&msg);
            prop_assert_eq!(String::from_utf8(fast.clone()).unwrap(), serde_form(id, &payload));
            prop_assert_eq!(decode_data_fast(&fast), Some(msg.clone()));
            prop_assert_eq!(general(&fast).unwrap(), msg);
        }

        #[test]
        fn whatever_the_fast_path_accepts_the_general_parser_decodes_the_same(
            tail in proptest::collection::vec(
                prop_oneof![Just(b'A'), Just(b'='), Just(b'"'), Just(b'\\'), Just(b'}'), Just(b'/'), any::<u8>()],
                0..24,
            ),
        ) {
            let mut input = DATA_PREFIX.to_vec();
            input.extend_from_slice(b"12");
            input.extend_from_slice(DATA_PAYLOAD);
            input.extend_from_slice(&tail);
            input.extend_from_slice(DATA_SUFFIX);
            if let Some(fast) = decode_data_fast(&input) {
                prop_assert_eq!(general(&input).ok(), Some(fast));
            }
        }
    }

    #[test]
    fn other_valid_forms_fall_back_and_still_decode() {
        let want = Message::Data(Data {
            id: ConnId(7),
            payload: Bytes::from_static(b"hi?"),
        });
        for text in [
            // Python's json.dumps spacing, a numeric id, key order, an escaped slash.
            r#"{"type": "data", "data": {"connection_id": "7", "payload": "aGk/"}}"#,
            r#"{"type":"data","data":{"connection_id":7,"payload":"aGk/"}}"#,
            r#"{"data":{"payload":"aGk/","connection_id":"7"},"type":"data"}"#,
            r#"{"type":"data","data":{"connection_id":"7","payload":"aGk\/"}}"#,
        ] {
            assert_eq!(decode_data_fast(text.as_bytes()), None, "{text}");
            assert_eq!(decode(text.as_bytes()).unwrap(), want, "{text}");
        }
        // Bad base64 in the fast shape gets the general parser's error.
        let bad = br#"{"type":"data","data":{"connection_id":"7","payload":"aGk"}}"#;
        assert!(matches!(decode(bad), Err(DecodeError::InvalidBase64(_))));
        // Non-canonical trailing bits are refused by both decoders alike.
        let loose = br#"{"type":"data","data":{"connection_id":"7","payload":"aGl="}}"#;
        assert_eq!(decode_data_fast(loose), None);
        assert!(decode(loose).is_err());
        let big = br#"{"type":"data","data":{"connection_id":"4294967296","payload":""}}"#;
        assert!(matches!(decode(big), Err(DecodeError::InvalidConnId(_))));
    }
}
