//! One WebSocket session between the gateway and an agent: the table of tunnelled
//! connections it carries (`core`), the single writer task that owns the socket's write
//! side (`writer`), the dispatch of incoming messages (`dispatch`), the heartbeat
//! (`heartbeat`) and the connection a relay holds (`conn`). Gateway and agent share all
//! of it; what they do with the messages only one side receives is a [`Role`].
//!
//! A [`Session`] owns the writer task: closing it (or dropping it) ends the session.

mod conn;
mod core;
mod dispatch;
mod heartbeat;
mod writer;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{ConnId, ErrorCode, Message};
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::transport::WsError;
use crate::tunnel::flow::QueueCap;

pub use self::core::SessionCore;
pub use conn::TunnelConn;
pub use dispatch::{decode_all, FirstMessage, Role};

/// Messages queued toward the WebSocket writer's data lane, shared by all connections.
pub const OUT_QUEUE: usize = 256;
/// Messages queued toward the writer's control lane, which it drains first.
pub const CTL_QUEUE: usize = 256;

/// Starts the message of the `error` (code `INTERNAL_ERROR`, no connection id) by
/// which a side that is shutting down tells its peer to open nothing more on this
/// session, and of the refusal of a `connect` that arrives meanwhile (PROTOCOL.md §5.6).
pub const GOING_AWAY: &str = "going away:";

/// Whether an error message is the going-away notice (PROTOCOL.md §5.6).
pub fn is_going_away(message: &str) -> bool {
    message.starts_with(GOING_AWAY)
}

/// Settings of one session that come from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// JSON mode: how long a connection's queue may stay over `json_cap` before the
    /// connection is closed (the grace).
    pub stall_timeout: Duration,
    /// JSON mode: the per-connection queue cap (no credit bounds it).
    pub json_cap: QueueCap,
    /// Binary mode: the largest receive window a connection may grow to.
    pub max_window: u32,
    /// Who chooses the connection ids this side receives in `connect`.
    pub ids: IdSpace,
    /// A connection with no byte either way for this long is closed; `None`: never.
    pub conn_idle_timeout: Option<Duration>,
}

/// A zero duration in the configuration means "never".
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Who chooses connection ids, and so how they are read in JSON mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdSpace {
    /// This side allocates them (the gateway): numbers, on our own wire.
    Ours,
    /// The peer does (the agent): the API document makes `connection_id` a string,
    /// so a gateway written from it may send any, UUIDs included. In JSON mode each
    /// string is interned per session, and answered with the peer's own string.
    Peers,
}

impl From<&crate::config::GatewayConfig> for SessionOptions {
    fn from(c: &crate::config::GatewayConfig) -> Self {
        SessionOptions {
            stall_timeout: c.stall_timeout.0,
            json_cap: QueueCap {
                cap: c.json_conn_buffer.0 as usize,
            },
            max_window: c.max_window.0 as u32,
            ids: IdSpace::Ours,
            conn_idle_timeout: nonzero(c.conn_idle_timeout.0),
        }
    }
}

impl From<&crate::config::ClientConfig> for SessionOptions {
    fn from(c: &crate::config::ClientConfig) -> Self {
        SessionOptions {
            stall_timeout: c.stall_timeout.0,
            json_cap: QueueCap {
                cap: c.json_conn_buffer.0 as usize,
            },
            max_window: c.max_window.0 as u32,
            ids: IdSpace::Peers,
            conn_idle_timeout: nonzero(c.conn_idle_timeout.0),
        }
    }
}

/// The most of one connection's messages the writer's data lane holds at once (4 MiB at
/// full reads of `READ_SIZE`): the lane is shared and FIFO, so without a bound one bulk
/// stream could fill all of it, and every other connection's data, an interactive
/// reply say, would wait behind megabytes of it. Enough to keep the writer busy: it
/// flushes every 256 KiB.
pub(crate) const CONN_UNSENT: u32 = 64;

/// How many of one connection's order-bound messages (data, `fin`) are queued in the
/// writer's data lane and not yet written: its `close` may go ahead in the control lane
/// only at zero, and its relay queues more only below [`CONN_UNSENT`].
#[derive(Debug, Default)]
pub(crate) struct UnsentCount {
    n: AtomicU32,
    /// The writer took one of them (wakes [`UnsentCount::below`]).
    written: Notify,
}

pub(crate) type Unsent = Arc<UnsentCount>;

impl UnsentCount {
    pub(crate) fn get(&self) -> u32 {
        self.n.load(Ordering::Acquire)
    }

    fn queued(&self) {
        self.n.fetch_add(1, Ordering::AcqRel);
    }

    /// The writer took one; called by it alone.
    fn taken(&self) {
        if self.n.fetch_sub(1, Ordering::AcqRel) == CONN_UNSENT {
            self.written.notify_one();
        }
    }

    /// Waits until fewer than `limit` are queued. One waiter: the connection's relay.
    async fn below(&self, limit: u32) {
        loop {
            let written = self.written.notified();
            if self.get() < limit {
                return;
            }
            written.await;
        }
    }
}

/// Queued for the writer task.
#[derive(Debug)]
pub(super) enum Outbound {
    Msg(Message),
    /// A connection's data or `fin`, counted in its [`Unsent`] until written.
    Ordered(Message, Unsent),
    WsPong(Bytes),
    WsClose(u16, String),
    /// Nothing more will be written for this id: forget the peer's string for it.
    Release(ConnId),
}

/// Why an `open` failed, as the agent (or the session) reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
#[error("session closed")]
pub struct SessionClosed;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("agent session closed")]
    SessionClosed,
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{}: {}", .0.code, .0.message)]
    Failed(ConnectFailure),
}

/// Why a session's read loop ended.
#[derive(Debug)]
pub enum SessionEnd {
    Shutdown,
    IdleTimeout(Duration),
    PeerClosed { code: Option<u16>, reason: String },
    Error(WsError),
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Shutdown => write!(f, "shut down"),
            SessionEnd::IdleTimeout(d) => write!(f, "peer silent for {d:?}"),
            SessionEnd::PeerClosed { code, reason } => {
                write!(f, "peer closed the WebSocket (code {code:?}, {reason:?})")
            }
            SessionEnd::Error(e) => write!(f, "{e}"),
        }
    }
}

/// How long the writer may take to deliver its last frames (the close) when a
/// session ends; a writer stuck on a peer that stopped reading is then aborted.
pub const WRITER_GRACE: Duration = Duration::from_secs(2);

/// A running session: its shared state and the writer task it owns. Ending it is
/// one of three calls, each consuming it; dropping it tears the session down at
/// once (connections cancelled, the writer aborted).
pub struct Session {
    core: Arc<SessionCore>,
    writer: Option<JoinHandle<()>>,
}

impl Session {
    fn new(core: Arc<SessionCore>, writer: JoinHandle<()>) -> Self {
        Session {
            core,
            writer: Some(writer),
        }
    }

    pub fn core(&self) -> &Arc<SessionCore> {
        &self.core
    }

    /// Sends a close frame with `code` and `reason` after everything already queued
    /// (a refusal, say), lets the writer deliver it, then tears the session down.
    pub async fn close(self, code: u16, reason: &str) {
        self.send_close(code, reason).await;
        self.flush().await
    }

    /// Queues a close frame and keeps the session running: the read loop goes on
    /// until the peer answers with its own close.
    pub async fn send_close(&self, code: u16, reason: &str) {
        let close = Outbound::WsClose(code, reason.to_owned());
        let _ = tokio::time::timeout(WRITER_GRACE, self.core.send_raw(close)).await;
    }

    /// Lets the writer deliver what is queued, ending with the close frame someone
    /// queued already (the read loop does, naming a protocol error), then tears down.
    pub async fn flush(mut self) {
        if let Some(mut writer) = self.writer.take() {
            let _ = tokio::time::timeout(WRITER_GRACE, &mut writer).await;
            self.core.shutdown();
            writer.abort();
        }
    }

    /// Tears down now: every connection is cancelled, and the writer sends its own
    /// close (1001, "session ended") within the grace.
    pub async fn end(mut self) {
        self.core.shutdown();
        if let Some(mut writer) = self.writer.take() {
            let _ = tokio::time::timeout(WRITER_GRACE, &mut writer).await;
            writer.abort();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.core.shutdown();
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}
