use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

/// Identifies one tunnelled connection within one WebSocket session.
///
/// Compact on the binary wire (`u32`); rendered as a decimal string in JSON, where the
/// document types `connection_id` as a string. The gateway allocates them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u32);

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The six error codes of the API document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    AuthFailed,
    InvalidMessage,
    ConnectionFailed,
    ForbiddenHost,
    RateLimited,
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::AuthFailed,
        ErrorCode::InvalidMessage,
        ErrorCode::ConnectionFailed,
        ErrorCode::ForbiddenHost,
        ErrorCode::RateLimited,
        ErrorCode::InternalError,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::InvalidMessage => "INVALID_MESSAGE",
            ErrorCode::ConnectionFailed => "CONNECTION_FAILED",
            ErrorCode::ForbiddenHost => "FORBIDDEN_HOST",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Stable one-byte tag used by the binary encoding.
    pub(crate) const fn tag(self) -> u8 {
        match self {
            ErrorCode::AuthFailed => 1,
            ErrorCode::InvalidMessage => 2,
            ErrorCode::ConnectionFailed => 3,
            ErrorCode::ForbiddenHost => 4,
            ErrorCode::RateLimited => 5,
            ErrorCode::InternalError => 6,
        }
    }

    pub(crate) fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.tag() == tag)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport protocol a `connect` asks the agent to use toward the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// `auth`: client agent → gateway, the first message on a session.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    pub username: String,
    pub password: String,
    pub client_id: String,
}

// Hand-written so that a logged message never shows the password.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// `auth_response`: gateway → client agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthResponse {
    pub success: bool,
    pub message: String,
}

/// `connect`: gateway → client agent, open a connection to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub id: ConnId,
    /// A name or an IP literal. Names are resolved by the agent, never by the gateway.
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// `connect_response`: client agent → gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectResponse {
    pub id: ConnId,
    pub success: bool,
    pub message: String,
}

/// `data`: bytes of one tunnelled connection, either direction.
#[derive(Clone, PartialEq, Eq)]
pub struct Data {
    pub id: ConnId,
    pub payload: Bytes,
}

// Payloads can be megabytes: show their size, not their bytes.
impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Data")
            .field("id", &self.id)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// `close`: either direction, the connection is finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub id: ConnId,
    pub reason: String,
}

/// Body of `ping` and `pong`; a pong echoes the ping's timestamp.
///
/// anyproxy sends integer Unix seconds. The API document leaves the JSON number open, so
/// a peer's `timestamp` may be any JSON number (`1640995200.5`, `-3`, `1e9`); its exact
/// text is kept so that the `pong` answering it carries the same number back, digit for
/// digit. [`Heartbeat::timestamp`] is always an integer: the number itself when the text is
/// a plain `i64` literal, else the number truncated toward zero and saturated to the
/// `i64` range (what a binary frame, which has no room for the text, carries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub timestamp: i64,
    /// The peer's JSON number text, when it is not exactly `timestamp.to_string()`.
    /// Private so that it always holds a valid JSON number.
    raw: Option<Arc<str>>,
}

impl Heartbeat {
    /// A heartbeat with an integer timestamp, as anyproxy sends them.
    pub const fn new(timestamp: i64) -> Self {
        Heartbeat {
            timestamp,
            raw: None,
        }
    }

    /// A heartbeat from the text of a JSON number (RFC 8259 `number`: `-?int frac? exp?`,
    /// no surrounding whitespace); `None` if `text` is not one.
    pub fn from_json_number(text: &str) -> Option<Self> {
        if !crate::json::is_json_number(text) {
            return None;
        }
        let is_integer = !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'));
        let timestamp = match text.parse::<i64>() {
            Ok(n) if is_integer => n,
            // A fraction, an exponent or an integer beyond i64: `as` truncates toward
            // zero and saturates (JSON has no NaN or infinity; "1e999" parses as inf).
            _ => text.parse::<f64>().map(|f| f as i64).unwrap_or(0),
        };
        let exact = is_integer && text.parse::<i64>().is_ok() && timestamp.to_string() == text;
        Some(Heartbeat {
            timestamp,
            raw: (!exact).then(|| Arc::from(text)),
        })
    }

    /// The peer's exact JSON number text, when it was not a plain `i64` integer literal
    /// (`1640995200.5`, `1e3`, `-0`, `99999999999999999999`). The JSON encoder writes this
    /// text instead of [`Heartbeat::timestamp`]; the binary encoder writes `timestamp`.
    pub fn raw_json(&self) -> Option<&str> {
        self.raw.as_deref()
    }

    /// The timestamp when it is exactly the integer the peer sent (always, for ours);
    /// `None` for a foreign number kept as text. Use this for round-trip timing.
    pub fn integer(&self) -> Option<i64> {
        self.raw.is_none().then_some(self.timestamp)
    }
}

/// `window_update` (binary mode): either direction, the sender may now send
/// `increment` more payload bytes on connection `id` (per-connection flow control).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowUpdate {
    pub id: ConnId,
    /// Never zero: the decoders refuse a zero increment.
    pub increment: u32,
}

/// `fin` (binary mode): either direction, the sender will send no more `data` on
/// connection `id` (end of stream, like TCP's FIN); the other direction stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fin {
    pub id: ConnId,
}

/// `forward` (binary mode): agent → gateway, "listen on `listen_port` and carry each
/// connection to `target_host:target_port` through me" (a reverse port forward). With
/// `protocol` `udp` the gateway binds a UDP port and each client address is one
/// datagram flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub listen_port: u16,
    pub target_host: String,
    pub target_port: u16,
    /// On the wire only when `udp` (absent means `tcp`), so a TCP forward keeps the
    /// bytes it always had.
    pub protocol: Protocol,
}

/// `forward_response` (binary mode): gateway → agent, the outcome of a `forward`,
/// naming the port and protocol it answers (a TCP and a UDP forward may share a port
/// number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardResponse {
    pub listen_port: u16,
    pub success: bool,
    pub message: String,
    /// As in `forward`: on the wire only when `udp`.
    pub protocol: Protocol,
}

/// `unforward` (binary mode): agent → gateway, "stop listening on `listen_port`
/// (`protocol`) for me": the forward this session asked for is withdrawn. The gateway
/// sends no answer; a port the session does not hold is left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unforward {
    pub listen_port: u16,
    /// As in `forward`: on the wire only when `udp`.
    pub protocol: Protocol,
}

/// `error`: either direction, optionally about one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<ConnId>,
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Auth(Auth),
    AuthResponse(AuthResponse),
    Connect(Connect),
    ConnectResponse(ConnectResponse),
    Data(Data),
    Close(Close),
    Ping(Heartbeat),
    Pong(Heartbeat),
    Error(ErrorMsg),
    WindowUpdate(WindowUpdate),
    Fin(Fin),
    Forward(Forward),
    ForwardResponse(ForwardResponse),
    Unforward(Unforward),
}

/// The kind of a [`Message`], without its body: for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Auth,
    AuthResponse,
    Connect,
    ConnectResponse,
    Data,
    Close,
    Ping,
    Pong,
    Error,
    WindowUpdate,
    Fin,
    Forward,
    ForwardResponse,
    Unforward,
}

impl MessageKind {
    pub const ALL: [MessageKind; 14] = [
        MessageKind::Auth,
        MessageKind::AuthResponse,
        MessageKind::Connect,
        MessageKind::ConnectResponse,
        MessageKind::Data,
        MessageKind::Close,
        MessageKind::Ping,
        MessageKind::Pong,
        MessageKind::Error,
        MessageKind::WindowUpdate,
        MessageKind::Fin,
        MessageKind::Forward,
        MessageKind::ForwardResponse,
        MessageKind::Unforward,
    ];

    /// The `type` string of the JSON encoding.
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageKind::Auth => "auth",
            MessageKind::AuthResponse => "auth_response",
            MessageKind::Connect => "connect",
            MessageKind::ConnectResponse => "connect_response",
            MessageKind::Data => "data",
            MessageKind::Close => "close",
            MessageKind::Ping => "ping",
            MessageKind::Pong => "pong",
            MessageKind::Error => "error",
            MessageKind::WindowUpdate => "window_update",
            MessageKind::Fin => "fin",
            MessageKind::Forward => "forward",
            MessageKind::ForwardResponse => "forward_response",
            MessageKind::Unforward => "unforward",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Kinds that only exist in the binary encoding's session rules (flow control and
    /// half-close); a JSON-mode session refuses them.
    pub const fn is_binary_only(self) -> bool {
        matches!(
            self,
            MessageKind::WindowUpdate
                | MessageKind::Fin
                | MessageKind::Forward
                | MessageKind::ForwardResponse
                | MessageKind::Unforward
        )
    }
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Auth(_) => MessageKind::Auth,
            Message::AuthResponse(_) => MessageKind::AuthResponse,
            Message::Connect(_) => MessageKind::Connect,
            Message::ConnectResponse(_) => MessageKind::ConnectResponse,
            Message::Data(_) => MessageKind::Data,
            Message::Close(_) => MessageKind::Close,
            Message::Ping(_) => MessageKind::Ping,
            Message::Pong(_) => MessageKind::Pong,
            Message::Error(_) => MessageKind::Error,
            Message::WindowUpdate(_) => MessageKind::WindowUpdate,
            Message::Fin(_) => MessageKind::Fin,
            Message::Forward(_) => MessageKind::Forward,
            Message::ForwardResponse(_) => MessageKind::ForwardResponse,
            Message::Unforward(_) => MessageKind::Unforward,
        }
    }

    /// The connection this message is about, if any.
    pub fn conn_id(&self) -> Option<ConnId> {
        match self {
            Message::Connect(m) => Some(m.id),
            Message::ConnectResponse(m) => Some(m.id),
            Message::Data(m) => Some(m.id),
            Message::Close(m) => Some(m.id),
            Message::Error(m) => m.id,
            Message::WindowUpdate(m) => Some(m.id),
            Message::Fin(m) => Some(m.id),
            Message::Auth(_)
            | Message::AuthResponse(_)
            | Message::Ping(_)
            | Message::Pong(_)
            | Message::Forward(_)
            | Message::ForwardResponse(_)
            | Message::Unforward(_) => None,
        }
    }
}
