//! Why a dial failed, in the form it crosses the tunnel: the documented
//! `CONNECTION_FAILED` error carries free text, so an agent starts the text with a
//! machine-readable prefix (`refused:`, `unreachable:`, `timeout:`, `dns:`; PROTOCOL.md)
//! and the gateway maps it to an HTTP status or a SOCKS5 reply. The prefix is written
//! and read only here.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The target answered with a reset (nothing listens there).
    Refused,
    /// No route, host down, or a reason we cannot tell apart.
    Unreachable,
    /// No answer within the dial timeout.
    Timeout,
    /// The name did not resolve.
    Dns,
}

impl FailureKind {
    const ALL: [FailureKind; 4] = [
        FailureKind::Refused,
        FailureKind::Unreachable,
        FailureKind::Timeout,
        FailureKind::Dns,
    ];

    /// The prefix on the wire, colon included.
    pub const fn prefix(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused:",
            FailureKind::Unreachable => "unreachable:",
            FailureKind::Timeout => "timeout:",
            FailureKind::Dns => "dns:",
        }
    }

    /// The kind a failure message starts with; `None` for a peer that does not use
    /// the prefixes.
    pub fn of(message: &str) -> Option<FailureKind> {
        Self::ALL
            .into_iter()
            .find(|k| message.starts_with(k.prefix()))
    }

    /// The message for the wire: the prefix, a space, the detail.
    pub fn message(self, detail: impl fmt::Display) -> String {
        format!("{} {detail}", self.prefix())
    }

    /// Classifies a failed `connect(2)`.
    pub fn of_io(e: &std::io::Error) -> FailureKind {
        match e.kind() {
            std::io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            std::io::ErrorKind::TimedOut => FailureKind::Timeout,
            _ => FailureKind::Unreachable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_own_message() {
        for kind in FailureKind::ALL {
            assert_eq!(FailureKind::of(&kind.message("10.0.0.1:80")), Some(kind));
        }
        assert_eq!(FailureKind::of("connection refused"), None);
        assert_eq!(
            FailureKind::Dns.message("x.invalid: no addresses"),
            "dns: x.invalid: no addresses"
        );
    }
}
