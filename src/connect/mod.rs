//! What every front end asks for: a connection to a target on behalf of a requester.
//! The [`Connector`] trait, the [`Upstream`] it hands back and the errors a proxy user
//! is answered with. The layers (limits, policy, metrics) and the two ends (through an
//! agent, dialed directly) implement it in their own parts; the gateway composes them.

mod access;
mod egress;
mod swap;
mod upstream;

pub use access::Access;
pub use egress::{Egress, ParentProxy, ProxyScheme};
pub use swap::Swappable;
pub use upstream::{Hold, Route, Upstream};

use std::future::Future;
#[cfg(test)]
use std::sync::Arc;

use anyproxy_proto::ErrorCode;

use crate::net::{FailureKind, HostPort, InvalidTarget};
use crate::tunnel::{ConnectFailure, OpenError};

/// Who is asking: for logs, policy, and the agent group that carries the connection.
#[derive(Clone, Debug)]
pub struct Requester {
    pub peer: std::net::SocketAddr,
    pub user: Option<String>,
    pub group: std::sync::Arc<str>,
    /// How the connection should leave, as a policy decided (direct egress only).
    pub egress: Egress,
    /// The user's hold on their connections: a reload that removes the user revokes
    /// it, and the relays of its connections end. `None`: no reload can (an open
    /// listener's anonymous users, forwards).
    pub revoke: Option<crate::net::Revoke>,
}

impl Requester {
    pub fn new(peer: std::net::SocketAddr, identity: crate::auth::Identity) -> Self {
        Requester {
            peer,
            user: identity.user,
            group: identity.group,
            egress: Default::default(),
            revoke: None,
        }
    }
}

/// Opens connections to targets on behalf of proxy users.
pub trait Connector: Send + Sync + 'static {
    fn connect(
        &self,
        target: &HostPort,
        who: &Requester,
    ) -> impl Future<Output = Result<Upstream, ConnectError>> + Send;

    /// Asks again whether `who` may reach `target`, for a request that would reuse an
    /// upstream opened earlier (HTTP keep-alive): rules can change their answer (a
    /// session closed, a time span ended, a quota spent). Nothing to re-check by default.
    fn recheck(&self, _target: &HostPort, _who: &Requester) -> Result<(), ConnectError> {
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

impl From<InvalidTarget> for ConnectError {
    fn from(e: InvalidTarget) -> Self {
        ConnectError::InvalidTarget(e.0)
    }
}

impl From<ConnectFailure> for ConnectError {
    fn from(f: ConnectFailure) -> Self {
        let m = f.message;
        match f.code {
            ErrorCode::ForbiddenHost => ConnectError::Forbidden(m),
            ErrorCode::RateLimited => ConnectError::RateLimited(m),
            ErrorCode::ConnectionFailed => match FailureKind::of(&m) {
                Some(FailureKind::Refused) => ConnectError::Refused(m),
                Some(FailureKind::Timeout) => ConnectError::TimedOut(m),
                // An agent that does not use the prefixes: the target was not reached.
                Some(FailureKind::Unreachable | FailureKind::Dns) | None => {
                    ConnectError::Unreachable(m)
                }
            },
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

/// Trivial inner connectors, for each layer's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Refuses every request with `0`.
    pub struct Refusing(pub ConnectError);

    impl Connector for Refusing {
        async fn connect(&self, _: &HostPort, _: &Requester) -> Result<Upstream, ConnectError> {
            Err(self.0.clone())
        }
    }

    /// Opens every request to a listener of its own on loopback.
    pub struct Loopback(tokio::net::TcpListener);

    impl Loopback {
        pub async fn new() -> Self {
            Loopback(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        }
    }

    impl Connector for Loopback {
        async fn connect(&self, _: &HostPort, _: &Requester) -> Result<Upstream, ConnectError> {
            let at = self.0.local_addr().unwrap();
            let (stream, _) = tokio::join!(tokio::net::TcpStream::connect(at), self.0.accept());
            Ok(Upstream::direct(stream.unwrap()))
        }
    }

    /// A requester from `peer` in `group`, with no user.
    pub fn requester(peer: &str, group: &str) -> Requester {
        Requester::new(
            peer.parse().unwrap(),
            crate::auth::Identity {
                user: None,
                group: Arc::from(group),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: ErrorCode, message: String) -> ConnectError {
        ConnectFailure { code, message }.into()
    }

    #[test]
    fn an_invalid_target_is_a_bad_request() {
        let e = ConnectError::from(HostPort::new("a b", 80).validate().unwrap_err());
        assert_eq!((e.http_status(), e.socks_reply()), (400, 0x04));
    }

    #[test]
    fn agent_failures_map_to_statuses_by_their_kind() {
        let failed = |k: FailureKind| failure(ErrorCode::ConnectionFailed, k.message("x:1"));
        assert_eq!(failed(FailureKind::Refused).socks_reply(), 0x05);
        assert_eq!(failed(FailureKind::Timeout).http_status(), 504);
        assert_eq!(failed(FailureKind::Dns).socks_reply(), 0x04);
        assert_eq!(failed(FailureKind::Unreachable).http_status(), 502);
        // A peer that does not use the prefixes: the target was not reached.
        let plain = failure(ErrorCode::ConnectionFailed, "no route".into());
        assert_eq!(plain.http_status(), 502);
        let forbidden = failure(ErrorCode::ForbiddenHost, "10.0.0.1".into());
        assert_eq!(
            (forbidden.http_status(), forbidden.socks_reply()),
            (403, 0x02)
        );
    }
}
