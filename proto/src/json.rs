//! The documented JSON encoding: `{"type": "...", "data": {...}}`.
//!
//! Field names and types follow the AnyProxy API document. Unknown fields are ignored,
//! and so are absent or `null` human-readable texts (`message`, `reason`: empty); a
//! missing required field, a wrong type, bad base64 or an unknown `type` is a
//! [`DecodeError`]. `timestamp` may be any JSON number and is echoed as it came.
//!
//! [`decode`] and [`encode_into`] use anyproxy's numeric connection ids;
//! [`decode_with`] and [`encode_into_with`] translate them through a [`ConnIdMap`], so
//! that a peer may use any string.

use std::borrow::Cow;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::ids::truncate_for_error;
use crate::{
    Auth, AuthResponse, Close, ConnId, ConnIdMap, Connect, ConnectResponse, Data, DecodeError,
    ErrorCode, ErrorMsg, Fin, Forward, ForwardResponse, Heartbeat, Message, MessageKind,
    NumericIds, Protocol, Unforward, WindowUpdate, MAX_DATA_PAYLOAD, MAX_STRING_LEN,
    MAX_WIRE_ID_LEN,
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
    /// Written only for `udp`: a TCP forward keeps its old shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
}

#[derive(Serialize)]
struct ForwardResponseOut<'a> {
    listen_port: u16,
    success: bool,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
}

#[derive(Serialize)]
struct UnforwardOut {
    listen_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
}

/// A forward's `protocol` member: absent for `tcp`.
fn forward_protocol_out(p: Protocol) -> Option<&'static str> {
    (p == Protocol::Udp).then_some(p.as_str())
}

/// A forward's optional `protocol` member: absent or `null` means `tcp`.
fn forward_protocol_in(p: Option<Cow<'_, str>>) -> Result<Protocol, DecodeError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(p) => {
            Protocol::parse(&p).ok_or_else(|| DecodeError::UnknownProtocol(truncate_for_error(&p)))
        }
    }
}

#[derive(Serialize)]
struct HeartbeatOut {
    /// The integer, or a peer's number text exactly as it came.
    timestamp: Box<RawValue>,
}

impl HeartbeatOut {
    fn new(h: &Heartbeat) -> Self {
        let text = match h.raw_json() {
            Some(raw) => raw.to_owned(),
            None => h.timestamp.to_string(),
        };
        HeartbeatOut {
            // A Heartbeat's raw text is a validated JSON number (its constructor checks).
            timestamp: RawValue::from_string(text).expect("a JSON number"),
        }
    }
}

/// Whether `s` is exactly one JSON number (RFC 8259: `-? (0 | [1-9][0-9]*) (. [0-9]+)?
/// ([eE] [+-]? [0-9]+)?`), without whitespace.
pub(crate) fn is_json_number(s: &str) -> bool {
    fn digits(b: &[u8]) -> usize {
        b.iter().take_while(|c| c.is_ascii_digit()).count()
    }
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i += digits(&b[i..]),
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        let n = digits(&b[i + 1..]);
        if n == 0 {
            return false;
        }
        i += 1 + n;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let n = digits(&b[i..]);
        if n == 0 {
            return false;
        }
        i += n;
    }
    i == b.len()
}

/// The `connection_id` to write for `id`: the map's string, else the decimal.
fn wire_id<M: ConnIdMap + ?Sized>(ids: &M, id: ConnId) -> String {
    match ids.wire(id) {
        Some(s) => s.to_string(),
        None => id.to_string(),
    }
}

/// Whether serde_json writes `s` inside quotes unchanged (it escapes exactly the control
/// characters, `"` and `\`).
fn needs_no_escape(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
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
// the payload is base64 (no character needs escaping) and the id is digits (or a peer's
// string, escaped by serde_json when it needs escaping), so the bytes below are exactly
// what serde_json writes for the same message.
const DATA_PREFIX: &[u8] = br#"{"type":"data","data":{"connection_id":""#;
const DATA_PAYLOAD: &[u8] = br#"","payload":""#;
const DATA_SUFFIX: &[u8] = br#""}}"#;

fn encode_data<M: ConnIdMap + ?Sized>(m: &Data, out: &mut Vec<u8>, ids: &M) {
    let b64 = base64_simd::STANDARD;
    let wire = ids.wire(m.id);
    out.reserve(
        DATA_PREFIX.len()
            + wire.as_ref().map_or(10, |w| w.len() + 2)
            + DATA_PAYLOAD.len()
            + b64.encoded_length(m.payload.len())
            + DATA_SUFFIX.len(),
    );
    match wire {
        None => {
            out.extend_from_slice(DATA_PREFIX);
            let mut digits = [0u8; 10];
            out.extend_from_slice(decimal(m.id.0, &mut digits));
            out.extend_from_slice(DATA_PAYLOAD);
        }
        Some(w) if needs_no_escape(&w) => {
            out.extend_from_slice(DATA_PREFIX);
            out.extend_from_slice(w.as_bytes());
            out.extend_from_slice(DATA_PAYLOAD);
        }
        Some(w) => {
            // The quotes come from serde_json here, with the escapes.
            out.extend_from_slice(&DATA_PREFIX[..DATA_PREFIX.len() - 1]);
            serde_json::to_writer(&mut *out, &*w).expect("JSON serialization into memory");
            out.extend_from_slice(&DATA_PAYLOAD[1..]);
        }
    }
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

/// A data message in exactly the shape [`encode_data`] writes for an id of printable
/// ASCII without `\\`. Anything else (other key order, spaces, escapes, a numeric id,
/// bad base64, an id the map refuses) returns `None` and goes through the general
/// parser, which accepts every valid form and names the error.
fn decode_data_fast<M: ConnIdMap + ?Sized>(input: &[u8], ids: &M) -> Option<Message> {
    let rest = input.strip_prefix(DATA_PREFIX)?;
    let quote = rest
        .iter()
        .take(MAX_WIRE_ID_LEN + 1)
        .position(|&b| b == b'"')?;
    let (wire, rest) = rest.split_at(quote);
    // Printable ASCII and no backslash: the string's text is the id itself.
    if wire.is_empty()
        || !wire
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        return None;
    }
    let b64 = rest.strip_prefix(DATA_PAYLOAD)?.strip_suffix(DATA_SUFFIX)?;
    if b64.len() > MAX_B64_PAYLOAD {
        return None;
    }
    // Rejects any byte outside the alphabet, so a quote or backslash inside cannot
    // have ended the string early or hidden an escape.
    let payload = base64_simd::STANDARD.decode_to_vec(b64).ok()?;
    // Last, so that an interning map sees only ids of messages that decode here.
    let id = ids.local(std::str::from_utf8(wire).ok()?).ok()?;
    Some(Message::Data(Data {
        id,
        payload: Bytes::from(payload),
    }))
}

/// Appends the JSON form of `msg` to `out`, connection ids as decimals.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    encode_into_with(msg, out, &NumericIds)
}

/// Appends the JSON form of `msg` to `out`, every `connection_id` written as
/// `ids.wire(id)` (the peer's own string) or, where that is `None`, as the decimal.
pub fn encode_into_with<M: ConnIdMap + ?Sized>(msg: &Message, out: &mut Vec<u8>, ids: &M) {
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
                connection_id: wire_id(ids, m.id),
                target_host: &m.host,
                target_port: m.port,
                protocol: m.protocol.as_str(),
            },
        ),
        Message::ConnectResponse(m) => write(
            out,
            kind,
            ConnectResponseOut {
                connection_id: wire_id(ids, m.id),
                success: m.success,
                message: &m.message,
            },
        ),
        Message::Data(m) => encode_data(m, out, ids),
        Message::Close(m) => write(
            out,
            kind,
            CloseOut {
                connection_id: wire_id(ids, m.id),
                reason: &m.reason,
            },
        ),
        Message::Ping(h) | Message::Pong(h) => write(out, kind, HeartbeatOut::new(h)),
        Message::Error(m) => write(
            out,
            kind,
            ErrorOut {
                code: m.code.as_str(),
                message: &m.message,
                connection_id: m.id.map(|id| wire_id(ids, id)),
            },
        ),
        Message::WindowUpdate(m) => write(
            out,
            kind,
            WindowUpdateOut {
                connection_id: wire_id(ids, m.id),
                increment: m.increment,
            },
        ),
        Message::Fin(m) => write(
            out,
            kind,
            FinOut {
                connection_id: wire_id(ids, m.id),
            },
        ),
        Message::Forward(m) => write(
            out,
            kind,
            ForwardOut {
                listen_port: m.listen_port,
                target_host: &m.target_host,
                target_port: m.target_port,
                protocol: forward_protocol_out(m.protocol),
            },
        ),
        Message::ForwardResponse(m) => write(
            out,
            kind,
            ForwardResponseOut {
                listen_port: m.listen_port,
                success: m.success,
                message: &m.message,
                protocol: forward_protocol_out(m.protocol),
            },
        ),
        Message::Unforward(m) => write(
            out,
            kind,
            UnforwardOut {
                listen_port: m.listen_port,
                protocol: forward_protocol_out(m.protocol),
            },
        ),
    }
}

/// The JSON form of `msg`, connection ids as decimals.
pub fn encode(msg: &Message) -> Vec<u8> {
    encode_with(msg, &NumericIds)
}

/// The JSON form of `msg`, connection ids through `ids` (see [`encode_into_with`]).
pub fn encode_with<M: ConnIdMap + ?Sized>(msg: &Message, ids: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(match msg {
        Message::Data(d) => d.payload.len() / 3 * 4 + 96,
        _ => 128,
    });
    encode_into_with(msg, &mut out, ids);
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
    /// The local id, through the map (a number goes as its decimal text).
    fn resolve<M: ConnIdMap + ?Sized>(&self, ids: &M) -> Result<ConnId, DecodeError> {
        match self {
            WireId::Str(s) => ids.local(s),
            WireId::Num(n) => ids.local(&n.to_string()),
        }
    }
}

/// Just the `connection_id` of a body that failed to decode, to say which connection
/// the failure is about.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(default, borrow)]
    connection_id: Option<WireId<'a>>,
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

// `message` and `reason` are texts for people: absent or `null` reads as empty.
#[derive(Deserialize)]
struct AuthResponseIn<'a> {
    success: bool,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
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
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
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
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
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
    #[serde(default, borrow)]
    protocol: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ForwardResponseIn<'a> {
    listen_port: u16,
    success: bool,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    protocol: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct UnforwardIn<'a> {
    listen_port: u16,
    #[serde(default, borrow)]
    protocol: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct HeartbeatIn<'a> {
    /// Any JSON number; checked and kept as text by `Heartbeat::from_json_number`.
    #[serde(borrow)]
    timestamp: &'a RawValue,
}

#[derive(Deserialize)]
struct ErrorIn<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
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

/// [`body`], and when it fails, the connection the body names if its `connection_id` is
/// readable on its own.
fn body_about<'a, T, M>(
    kind: MessageKind,
    raw: Option<&'a RawValue>,
    ids: &M,
) -> Result<T, DecodeError>
where
    T: Deserialize<'a>,
    M: ConnIdMap + ?Sized,
{
    body(kind, raw).map_err(|e| {
        let id = raw
            .and_then(|r| serde_json::from_str::<IdOnly>(r.get()).ok())
            .and_then(|b| b.connection_id)
            .and_then(|w| w.resolve(ids).ok());
        match id {
            Some(id) => e.for_connection(id),
            None => e,
        }
    })
}

fn optional_text(field: &'static str, s: Option<Cow<'_, str>>) -> Result<String, DecodeError> {
    string(field, s.unwrap_or_default())
}

fn heartbeat(kind: MessageKind, raw: &RawValue) -> Result<Heartbeat, DecodeError> {
    let text = raw.get();
    if text.len() > MAX_STRING_LEN {
        return Err(DecodeError::TooLarge {
            what: "timestamp",
            len: text.len(),
            max: MAX_STRING_LEN,
        });
    }
    Heartbeat::from_json_number(text).ok_or_else(|| DecodeError::InvalidField {
        msg_type: kind.as_str(),
        detail: format!(
            "timestamp: expected a JSON number, found {}",
            truncate_for_error(text)
        ),
    })
}

/// Decodes one JSON message, connection ids as decimals ([`NumericIds`]). Never panics;
/// allocation is bounded by [`MAX_MESSAGE_LEN`]. Errors never carry the connection
/// (see [`decode_with`] for that).
pub fn decode(input: &[u8]) -> Result<Message, DecodeError> {
    decode_with(input, &NumericIds).map_err(DecodeError::into_cause)
}

/// Decodes one JSON message, every `connection_id` mapped to a local id by
/// `ids.local` (a JSON number id as its decimal text). Never panics; allocation is
/// bounded by [`MAX_MESSAGE_LEN`].
///
/// A failure in a message whose `connection_id` could be read is
/// [`DecodeError::ForConnection`] ([`DecodeError::conn_id`] says which local id; with an
/// interning map, that id may have been allocated by this call).
pub fn decode_with<M: ConnIdMap + ?Sized>(input: &[u8], ids: &M) -> Result<Message, DecodeError> {
    if input.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge {
            what: "JSON message",
            len: input.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    if let Some(msg) = decode_data_fast(input, ids) {
        return Ok(msg);
    }
    decode_general(input, ids)
}

/// Not part of the API: the two halves of [`decode_with`] (below the size check), for
/// the tests and fuzz targets that check they agree.
#[doc(hidden)]
pub mod split {
    use super::*;

    /// The `data` fast path: `Some` only for a message it decodes by itself.
    pub fn fast<M: ConnIdMap + ?Sized>(input: &[u8], ids: &M) -> Option<Message> {
        decode_data_fast(input, ids)
    }

    /// The general (serde) parser alone.
    pub fn general<M: ConnIdMap + ?Sized>(input: &[u8], ids: &M) -> Result<Message, DecodeError> {
        decode_general(input, ids)
    }
}

fn decode_general<M: ConnIdMap + ?Sized>(input: &[u8], ids: &M) -> Result<Message, DecodeError> {
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
                message: optional_text("message", b.message)?,
            })
        }
        MessageKind::Connect => {
            let b: ConnectIn = body_about(kind, raw, ids)?;
            let id = b.connection_id.resolve(ids);
            // The protocol is checked before the id, as it always was; the error names
            // the connection when the id is good.
            let protocol = Protocol::parse(&b.protocol).ok_or_else(|| {
                let e = DecodeError::UnknownProtocol(truncate_for_error(&b.protocol));
                match &id {
                    Ok(id) => e.for_connection(*id),
                    Err(_) => e,
                }
            })?;
            let id = id?;
            Message::Connect(Connect {
                id,
                host: string("target_host", b.target_host).map_err(|e| e.for_connection(id))?,
                port: b.target_port,
                protocol,
            })
        }
        MessageKind::ConnectResponse => {
            let b: ConnectResponseIn = body_about(kind, raw, ids)?;
            let id = b.connection_id.resolve(ids)?;
            Message::ConnectResponse(ConnectResponse {
                id,
                success: b.success,
                message: optional_text("message", b.message).map_err(|e| e.for_connection(id))?,
            })
        }
        MessageKind::Data => {
            let b: DataIn = body_about(kind, raw, ids)?;
            let id = b.connection_id.resolve(ids)?;
            Message::Data(Data {
                id,
                payload: decode_payload(&b.payload).map_err(|e| e.for_connection(id))?,
            })
        }
        MessageKind::Close => {
            let b: CloseIn = body_about(kind, raw, ids)?;
            let id = b.connection_id.resolve(ids)?;
            Message::Close(Close {
                id,
                reason: optional_text("reason", b.reason).map_err(|e| e.for_connection(id))?,
            })
        }
        MessageKind::Ping | MessageKind::Pong => {
            let b: HeartbeatIn = body(kind, raw)?;
            let h = heartbeat(kind, b.timestamp)?;
            if kind == MessageKind::Ping {
                Message::Ping(h)
            } else {
                Message::Pong(h)
            }
        }
        MessageKind::Error => {
            let b: ErrorIn = body_about(kind, raw, ids)?;
            // "optional_connection_id": absent, null and "" all mean "no connection".
            let id = match b.connection_id {
                None => None,
                Some(WireId::Str(s)) if s.is_empty() => None,
                Some(w) => Some(w.resolve(ids)),
            };
            let about = |e: DecodeError| match &id {
                Some(Ok(id)) => e.for_connection(*id),
                _ => e,
            };
            let code = ErrorCode::parse(&b.code)
                .ok_or_else(|| about(DecodeError::UnknownErrorCode(truncate_for_error(&b.code))))?;
            let id = id.transpose()?;
            let message = optional_text("message", b.message).map_err(|e| match id {
                Some(id) => e.for_connection(id),
                None => e,
            })?;
            Message::Error(ErrorMsg { code, message, id })
        }
        MessageKind::WindowUpdate => {
            let b: WindowUpdateIn = body_about(kind, raw, ids)?;
            let id = b.connection_id.resolve(ids)?;
            Message::WindowUpdate(WindowUpdate {
                id,
                increment: crate::binary::nonzero_increment(b.increment)
                    .map_err(|e| e.for_connection(id))?,
            })
        }
        MessageKind::Fin => {
            let b: FinIn = body_about(kind, raw, ids)?;
            Message::Fin(Fin {
                id: b.connection_id.resolve(ids)?,
            })
        }
        MessageKind::Forward => {
            let b: ForwardIn = body(kind, raw)?;
            Message::Forward(Forward {
                listen_port: b.listen_port,
                target_host: string("target_host", b.target_host)?,
                target_port: b.target_port,
                protocol: forward_protocol_in(b.protocol)?,
            })
        }
        MessageKind::ForwardResponse => {
            let b: ForwardResponseIn = body(kind, raw)?;
            Message::ForwardResponse(ForwardResponse {
                listen_port: b.listen_port,
                success: b.success,
                message: optional_text("message", b.message)?,
                protocol: forward_protocol_in(b.protocol)?,
            })
        }
        MessageKind::Unforward => {
            let b: UnforwardIn = body(kind, raw)?;
            Message::Unforward(Unforward {
                listen_port: b.listen_port,
                protocol: forward_protocol_in(b.protocol)?,
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
            prop_assert_eq!(decode_data_fast(&fast, &NumericIds), Some(msg.clone()));
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
            if let Some(fast) = decode_data_fast(&input, &NumericIds) {
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
            assert_eq!(
                decode_data_fast(text.as_bytes(), &NumericIds),
                None,
                "{text}"
            );
            assert_eq!(decode(text.as_bytes()).unwrap(), want, "{text}");
        }
        // Bad base64 in the fast shape gets the general parser's error.
        let bad = br#"{"type":"data","data":{"connection_id":"7","payload":"aGk"}}"#;
        assert!(matches!(decode(bad), Err(DecodeError::InvalidBase64(_))));
        // Non-canonical trailing bits are refused by both decoders alike.
        let loose = br#"{"type":"data","data":{"connection_id":"7","payload":"aGl="}}"#;
        assert_eq!(decode_data_fast(loose, &NumericIds), None);
        assert!(decode(loose).is_err());
        let big = br#"{"type":"data","data":{"connection_id":"4294967296","payload":""}}"#;
        assert!(matches!(decode(big), Err(DecodeError::InvalidConnId(_))));
    }
}
