use crate::ErrorCode;

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
}

impl DecodeError {
    /// The documented error code a peer receives for this failure.
    pub const fn code(&self) -> ErrorCode {
        ErrorCode::InvalidMessage
    }
}
