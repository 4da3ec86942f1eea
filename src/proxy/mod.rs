//! Proxy front ends on the gateway: HTTP (CONNECT and absolute-form forwarding) and
//! SOCKS5. They authenticate the user, ask a [`Connector`] for a connection to the
//! target, and relay. They never resolve names: the target leaves through the agent.

pub mod auth;
pub mod direct;
pub mod guard;
pub mod http;
pub mod socks5;
pub mod upstream;

pub use upstream::{Route, Upstream};

use std::future::Future;

use anyproxy_proto::ErrorCode;

use crate::tunnel::{ConnectFailure, OpenError};

/// Where a proxy user wants to go: a name or an IP literal, unresolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetAddr {
    pub host: String,
    pub port: u16,
}

/// Longest DNS name (RFC 1035: 253 characters in text form).
pub const MAX_HOST_LEN: usize = 253;

impl TargetAddr {
    /// Refuses what no agent could dial, before a `connect` is sent for it.
    pub fn validate(&self) -> Result<(), ConnectError> {
        if self.host.is_empty() || self.host.len() > MAX_HOST_LEN {
            return Err(ConnectError::InvalidTarget(format!(
                "host must be 1 to {MAX_HOST_LEN} bytes, got {}",
                self.host.len()
            )));
        }
        if self.host.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(ConnectError::InvalidTarget(
                "host contains spaces or control characters".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Who is asking: for logs, policy, and the agent group that carries the connection.
#[derive(Clone, Debug)]
pub struct Requester {
    pub peer: std::net::SocketAddr,
    pub user: Option<String>,
    pub group: std::sync::Arc<str>,
    /// How the connection should leave, as a policy decided (direct egress only).
    pub egress: crate::policy::Egress,
}

impl Requester {
    pub fn new(peer: std::net::SocketAddr, identity: auth::Identity) -> Self {
        Requester {
            peer,
            user: identity.user,
            group: identity.group,
            egress: Default::default(),
        }
    }
}

/// Opens connections to targets on behalf of proxy users.
pub trait Connector: Send + Sync + 'static {
    fn connect(
        &self,
        target: &TargetAddr,
        who: &Requester,
    ) -> impl Future<Output = Result<Upstream, ConnectError>> + Send;

    /// Asks again whether `who` may reach `target`, for a request that would reuse an
    /// upstream opened earlier (HTTP keep-alive): rules can change their answer (a
    /// session closed, a time span ended, a quota spent). Nothing to re-check by default.
    fn recheck(&self, _target: &TargetAddr, _who: &Requester) -> Result<(), ConnectError> {
        Ok(())
    }
}

/// Why a target could not be reached, in the terms a proxy user is answered in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("no live agent in group {0:?}")]
    NoAgent(String),
    #[error("forbidden host: {0}")]
    Forbidden(String),
    #[error("connection refused: {0}")]
    Refused(String),
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("timed out: {0}")]
    TimedOut(String),
    #[error("rate limited: {0}")]
    RateLimited(String),
    #[error("tunnel error: {0}")]
    Internal(String),
    #[error("invalid target: {0}")]
    InvalidTarget(String),
}

impl ConnectError {
    /// HTTP status for the HTTP front end.
    pub fn http_status(&self) -> u16 {
        match self {
            ConnectError::NoAgent(_) => 503,
            ConnectError::Forbidden(_) => 403,
            ConnectError::Refused(_) | ConnectError::Unreachable(_) => 502,
            ConnectError::TimedOut(_) => 504,
            ConnectError::RateLimited(_) => 429,
            ConnectError::Internal(_) => 502,
            ConnectError::InvalidTarget(_) => 400,
        }
    }

    /// SOCKS5 reply code (RFC 1928 §6).
    pub fn socks_reply(&self) -> u8 {
        match self {
            ConnectError::Forbidden(_) => 0x02,
            ConnectError::Unreachable(_) | ConnectError::InvalidTarget(_) => 0x04,
            ConnectError::Refused(_) => 0x05,
            ConnectError::TimedOut(_) => 0x06,
            ConnectError::NoAgent(_) | ConnectError::RateLimited(_) | ConnectError::Internal(_) => {
                0x01
            }
        }
    }

    /// The documented error code, for logs.
    pub fn code(&self) -> ErrorCode {
        match self {
            ConnectError::Forbidden(_) => ErrorCode::ForbiddenHost,
            ConnectError::RateLimited(_) => ErrorCode::RateLimited,
            ConnectError::Refused(_) | ConnectError::Unreachable(_) | ConnectError::TimedOut(_) => {
                ErrorCode::ConnectionFailed
            }
            ConnectError::NoAgent(_) | ConnectError::Internal(_) => ErrorCode::InternalError,
            ConnectError::InvalidTarget(_) => ErrorCode::InvalidMessage,
        }
    }
}

/// Prefixes an agent puts on `CONNECTION_FAILED` messages (see PROTOCOL.md).
pub mod failure_prefix {
    pub const REFUSED: &str = "refused:";
    pub const UNREACHABLE: &str = "unreachable:";
    pub const TIMEOUT: &str = "timeout:";
    pub const DNS: &str = "dns:";
}

impl From<ConnectFailure> for ConnectError {
    fn from(f: ConnectFailure) -> Self {
        let m = f.message;
        match f.code {
            ErrorCode::ForbiddenHost => ConnectError::Forbidden(m),
            ErrorCode::RateLimited => ConnectError::RateLimited(m),
            ErrorCode::ConnectionFailed => {
                if m.starts_with(failure_prefix::REFUSED) {
                    ConnectError::Refused(m)
                } else if m.starts_with(failure_prefix::TIMEOUT) {
                    ConnectError::TimedOut(m)
                } else if m.starts_with(failure_prefix::UNREACHABLE)
                    || m.starts_with(failure_prefix::DNS)
                {
                    ConnectError::Unreachable(m)
                } else {
                    // An agent that does not use the prefixes: the target was not reached.
                    ConnectError::Unreachable(m)
                }
            }
            ErrorCode::AuthFailed | ErrorCode::InvalidMessage | ErrorCode::InternalError => {
                ConnectError::Internal(m)
            }
        }
    }
}

impl From<OpenError> for ConnectError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::SessionClosed => ConnectError::Internal("agent session closed".into()),
            OpenError::Timeout(d) => {
                ConnectError::TimedOut(format!("agent did not answer within {d:?}"))
            }
            OpenError::Failed(f) => f.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> TargetAddr {
        TargetAddr {
            host: host.into(),
            port: 80,
        }
    }

    #[test]
    fn targets_no_agent_could_dial_are_refused_up_front() {
        assert!(target("example.com").validate().is_ok());
        assert!(target("2001:db8::1").validate().is_ok());
        assert!(target(&"a".repeat(MAX_HOST_LEN)).validate().is_ok());
        for bad in ["", "a b", "a\r\nb"] {
            assert!(target(bad).validate().is_err(), "{bad:?}");
        }
        let long = target(&"a".repeat(MAX_HOST_LEN + 1))
            .validate()
            .unwrap_err();
        assert_eq!(long.http_status(), 400);
        assert_eq!(long.socks_reply(), 0x04);
    }
}
