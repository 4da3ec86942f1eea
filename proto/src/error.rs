use crate::{ConnId, ErrorCode};

/// Why a message could not be decoded. Every variant maps to
/// [`ErrorCode::InvalidMessage`] and names the problem so that the peer can be told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("unknown message type {0}")]
    UnknownType(String),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("invalid `{msg_type}` message: {detail}")]
    InvalidField {
        msg_type: &'static str,
        detail: String,
    },
    #[error("field `{0}` is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("payload is not valid standard base64: {0}")]
    InvalidBase64(String),
    #[error("connection_id {0:?} is not a decimal integer in 0..=4294967295")]
    InvalidConnId(String),
    #[error("unknown error code {0:?}")]
    UnknownErrorCode(String),
    #[error("unknown protocol {0:?} (expected \"tcp\" or \"udp\")")]
    UnknownProtocol(String),
    /// A `connection_id` string that a [`ConnIdMap`](crate::ConnIdMap) refused: empty,
    /// longer than [`MAX_WIRE_ID_LEN`](crate::MAX_WIRE_ID_LEN), or too many live ids.
    #[error("connection_id {id:?} refused: {reason}")]
    ConnIdRefused { id: String, reason: String },
    /// A message about connection `id` (its `connection_id` was readable) that could not
    /// be decoded for the reason in `error`, so that the receiver can fail that
    /// connection at once. Produced only by [`json::decode_with`](crate::json::decode_with);
    /// it displays as `error` alone.
    #[error("{error}")]
    ForConnection { id: ConnId, error: Box<DecodeError> },
}

impl DecodeError {
    /// The documented error code a peer receives for this failure.
    pub const fn code(&self) -> ErrorCode {
        ErrorCode::InvalidMessage
    }

    /// The connection the undecodable message was about, when its `connection_id` could
    /// be read (local id; with an interning [`ConnIdMap`](crate::ConnIdMap), encoding a
    /// reply for it writes the peer's own string).
    pub fn conn_id(&self) -> Option<ConnId> {
        match self {
            DecodeError::ForConnection { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Why the message could not be decoded, without the connection it was about.
    pub fn cause(&self) -> &DecodeError {
        match self {
            DecodeError::ForConnection { error, .. } => error.cause(),
            other => other,
        }
    }

    /// [`DecodeError::cause`], by value.
    pub fn into_cause(self) -> DecodeError {
        match self {
            DecodeError::ForConnection { error, .. } => error.into_cause(),
            other => other,
        }
    }

    /// Attaches the connection the message was about.
    pub(crate) fn for_connection(self, id: ConnId) -> DecodeError {
        DecodeError::ForConnection {
            id,
            error: Box::new(self.into_cause()),
        }
    }
}
