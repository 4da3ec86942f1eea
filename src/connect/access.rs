//! The access log: one line per proxied connection, request or refusal, under the log
//! target `access`, with the same fields on every line (README, "Access log"), written
//! by [`Access::write`] alone so that operators' parsers see one shape.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

use anyproxy_proto::{ConnId, ErrorCode};

use super::Requester;
use crate::net::HostPort;
use crate::tunnel::RelayStats;

/// One access-log line being assembled; consumed by the call that writes it.
#[derive(Default)]
pub struct Access<'a> {
    proto: &'static str,
    client: Option<SocketAddr>,
    user: Option<&'a str>,
    group: Option<&'a str>,
    via: Option<&'a str>,
    policy: Option<&'a str>,
    target: Option<&'a HostPort>,
    conn: Option<ConnId>,
    started: Option<Instant>,
    /// Datagrams each way (UDP flows): from the user, toward the user.
    datagrams: (u64, u64),
}

/// How the line ends: the fields that depend on the outcome.
struct Outcome<'r> {
    result: &'r str,
    reason: &'r str,
    status: u16,
    stats: RelayStats,
}

impl<'a> Access<'a> {
    /// `proto`: `http`, `connect`, `socks5`, `forward` (the gateway) or `agent`.
    pub fn new(proto: &'static str) -> Self {
        Access {
            proto,
            ..Default::default()
        }
    }

    /// Who asked: their address, user and group.
    pub fn requester(mut self, who: &'a Requester) -> Self {
        self.client = Some(who.peer);
        self.user = who.user.as_deref();
        self.group = Some(&who.group);
        self
    }

    pub fn client(mut self, peer: SocketAddr) -> Self {
        self.client = Some(peer);
        self
    }

    pub fn user(mut self, user: &'a str) -> Self {
        self.user = Some(user);
        self
    }

    pub fn group(mut self, group: &'a str) -> Self {
        self.group = Some(group);
        self
    }

    pub fn target(mut self, target: &'a HostPort) -> Self {
        self.target = Some(target);
        self
    }

    /// Who carried it: the agent's client id, or `direct`.
    pub fn via(mut self, via: &'a str) -> Self {
        self.via = Some(via);
        self
    }

    /// The policy's verdict, when a policy decided.
    pub fn policy(mut self, verdict: Option<&'a str>) -> Self {
        self.policy = verdict;
        self
    }

    /// The tunnelled connection's id (on the agent).
    pub fn conn(mut self, id: ConnId) -> Self {
        self.conn = Some(id);
        self
    }

    /// A UDP flow's datagrams from the user toward the target, and back.
    pub fn datagrams(mut self, sent: u64, received: u64) -> Self {
        self.datagrams = (sent, received);
        self
    }

    /// When the request started, for `ms`.
    pub fn since(mut self, started: Instant) -> Self {
        self.started = Some(started);
        self
    }

    /// A connection relayed until it ended.
    /// Relayed until it ended; the reason says when the relay ended it (idle timeout,
    /// quota).
    pub fn relayed(self, stats: RelayStats) {
        self.write(Outcome {
            result: "ok",
            reason: stats.ended_by.map_or("", |e| e.as_str()),
            status: 0,
            stats,
        })
    }

    /// One HTTP request answered by the target with `status`.
    pub fn answered(self, status: u16) {
        self.write(Outcome {
            result: "ok",
            reason: "",
            status,
            stats: RelayStats::default(),
        })
    }

    /// Refused, or failed before anything was relayed: the documented code and why.
    pub fn refused(self, code: ErrorCode, reason: &dyn Display) {
        let reason = reason.to_string();
        self.write(Outcome {
            result: code.as_str(),
            reason: &reason,
            status: 0,
            stats: RelayStats::default(),
        })
    }

    /// The one place an access line is written. Absent text fields are `-` and
    /// absent numbers 0, so every line has every field.
    fn write(self, o: Outcome<'_>) {
        let dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
        let shown = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        let ms = self.started.map_or(0, |t| t.elapsed().as_millis() as u64);
        tracing::info!(
            target: "access",
            proto = self.proto,
            client = %shown(self.client.map(|c| c.to_string())),
            user = %dash(self.user),
            group = %dash(self.group),
            via = %dash(self.via),
            policy = %dash(self.policy),
            target = %shown(self.target.map(|t| t.to_string())),
            conn = %shown(self.conn.map(|c| c.to_string())),
            result = o.result,
            reason = if o.reason.is_empty() { "-" } else { o.reason },
            status = o.status,
            sent = o.stats.sent,
            received = o.stats.received,
            dgrams_sent = self.datagrams.0,
            dgrams_received = self.datagrams.1,
            ms,
        );
    }
}
