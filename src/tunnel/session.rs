//! One WebSocket session between the gateway and an agent: the table of tunnelled
//! connections it carries, the single writer task that owns the socket's write side,
//! and the dispatch of incoming messages. Gateway and agent share all of it; only what
//! they do with `connect` differs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyproxy_proto::{
    binary, json, Close, ConnId, ConnectResponse, Data, Encoding, ErrorCode, ErrorMsg, Fin,
    Heartbeat, Message, WindowUpdate, INITIAL_WINDOW,
};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::flow::{Inbox, InboxEnd, PushError, SendCredit};
use super::table::ShardedMap;
use crate::metrics::stats::{bump, SessionStats};
use crate::transport::ws::close_code;
use crate::transport::ws::deflate::{CompressionCounters, CompressionStats};
use crate::transport::{Incoming, WsError, WsReader, WsWriter};

/// JSON mode has no flow control: the session reader waits while a connection has
/// this many bytes queued toward its local socket (and closes it after the stall
/// timeout), so one connection's memory stays bounded.
pub const JSON_CONN_BUFFER: usize = 1 << 20;
/// Messages queued toward the WebSocket writer, shared by all connections.
pub const OUT_QUEUE: usize = 256;
/// The writer flushes after at most this many bytes in one batch.
const BATCH_BYTES: usize = 256 * 1024;

/// Starts the message of the `error` (code `INTERNAL_ERROR`, no connection id) by
/// which a side that is shutting down tells its peer to open nothing more on this
/// session, and of the refusal of a `connect` that arrives meanwhile (PROTOCOL.md §5.6).
pub const GOING_AWAY: &str = "going away:";

/// Settings of one session that come from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// JSON mode: how long a connection may keep the session reader waiting.
    pub stall_timeout: Duration,
    /// Binary mode: the largest receive window a connection may grow to.
    pub max_window: u32,
}

/// Queued for the writer task.
#[derive(Debug)]
pub enum Outbound {
    Msg(Message),
    WsPong(Bytes),
    WsClose(u16, String),
}

/// Why an `open` failed, as the agent (or the session) reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    pub code: ErrorCode,
    pub message: String,
}

struct Slot {
    inbox: Arc<Inbox>,
    credit: Arc<SendCredit>,
    /// Present until the agent answers the `connect` (gateway side only).
    pending: Option<oneshot::Sender<Result<(), ConnectFailure>>>,
    cancel: CancellationToken,
}

/// Shared state of one session. Cheap to clone behind an `Arc`.
pub struct SessionCore {
    pub encoding: Encoding,
    out: mpsc::Sender<Outbound>,
    conns: ShardedMap<ConnId, Slot>,
    next_id: AtomicU32,
    closed: CancellationToken,
    options: SessionOptions,
    last_pong_ms: AtomicU64,
    /// Smoothed heartbeat round trip in microseconds; 0 until the first pong.
    rtt_us: AtomicU64,
    /// The timestamp of the last `ping` we sent and when, to time its `pong`.
    last_ping: Mutex<Option<(i64, Instant)>>,
    /// Present when the session negotiated permessage-deflate.
    compression: Option<Arc<CompressionCounters>>,
    /// Who is at the other end (the agent's client id on the gateway), once known.
    peer: std::sync::OnceLock<Arc<str>>,
    /// We announced that we are going away: open nothing more here.
    going_away: CancellationToken,
    /// The peer announced that it is going away.
    peer_going_away: CancellationToken,
    /// Counters for metrics and the status page (relaxed atomics).
    stats: Arc<SessionStats>,
}

impl SessionCore {
    /// Creates the session state and spawns its writer task on `writer`.
    pub fn start(
        encoding: Encoding,
        writer: WsWriter,
        options: SessionOptions,
    ) -> (Arc<SessionCore>, tokio::task::JoinHandle<()>) {
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let compression = writer.compression_counters();
        let stats = Arc::new(SessionStats::default());
        let core = Arc::new(SessionCore {
            encoding,
            out,
            conns: ShardedMap::default(),
            next_id: AtomicU32::new(1),
            closed: CancellationToken::new(),
            options,
            last_pong_ms: AtomicU64::new(0),
            rtt_us: AtomicU64::new(0),
            last_ping: Mutex::new(None),
            compression,
            peer: std::sync::OnceLock::new(),
            going_away: CancellationToken::new(),
            peer_going_away: CancellationToken::new(),
            stats: stats.clone(),
        });
        let writer_task =
            tokio::spawn(write_loop(writer, rx, encoding, core.closed.clone(), stats));
        (core, writer_task)
    }

    /// Queues a message for the peer. Waits while the writer is behind (backpressure);
    /// fails only when the session is gone.
    pub async fn send(&self, msg: Message) -> Result<(), SessionClosed> {
        tokio::select! {
            r = self.out.send(Outbound::Msg(msg)) => r.map_err(|_| SessionClosed),
            _ = self.closed.cancelled() => Err(SessionClosed),
        }
    }

    pub async fn send_raw(&self, item: Outbound) -> Result<(), SessionClosed> {
        tokio::select! {
            r = self.out.send(item) => r.map_err(|_| SessionClosed),
            _ = self.closed.cancelled() => Err(SessionClosed),
        }
    }

    /// Names the peer once it has authenticated; later calls are ignored.
    pub fn set_peer(&self, name: &str) {
        let _ = self.peer.set(Arc::from(name));
    }

    /// The peer's name for logs, `-` before authentication.
    pub fn peer(&self) -> &str {
        self.peer.get().map_or("-", |p| p)
    }

    /// [`Self::peer`] as a shared string, without copying it.
    pub fn peer_arc(&self) -> Arc<str> {
        self.peer.get().cloned().unwrap_or_else(|| Arc::from("-"))
    }

    /// Whether this session's messages are compressed (permessage-deflate).
    pub fn compressed(&self) -> bool {
        self.compression.is_some()
    }

    /// What compression achieved so far, on compressed sessions.
    pub fn compression_stats(&self) -> Option<CompressionStats> {
        self.compression.as_ref().map(|c| c.snapshot())
    }

    /// This session's counters.
    pub fn stats(&self) -> &Arc<SessionStats> {
        &self.stats
    }

    /// Completes when the session has ended.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Tunnelled connections currently open or being opened.
    pub fn active_conns(&self) -> usize {
        self.conns.len()
    }

    /// Ends the session: every connection it carried is cancelled at once (their
    /// relays close the local sockets), and pending `open`s fail with
    /// [`OpenError::SessionClosed`] so the caller may try another agent. Idempotent.
    pub fn shutdown(&self) {
        self.closed.cancel();
        for (_, slot) in self.conns.drain() {
            slot.cancel.cancel();
            // Dropping `slot.pending` is what tells `open` the session is gone.
        }
    }

    /// Tells the peer we are shutting down (PROTOCOL.md §5.6); from now on this side
    /// refuses new connections. Only the first call sends anything.
    pub async fn announce_going_away(&self, detail: &str) {
        if self.going_away.is_cancelled() {
            return;
        }
        self.going_away.cancel();
        self.reply_error(
            ErrorCode::InternalError,
            format!("{GOING_AWAY} {detail}"),
            None,
        )
        .await;
    }

    /// Whether this side announced it is going away.
    pub fn is_going_away(&self) -> bool {
        self.going_away.is_cancelled()
    }

    /// Whether the peer announced it is going away; nothing new may be opened here.
    pub fn peer_is_going_away(&self) -> bool {
        self.peer_going_away.is_cancelled()
    }

    /// Resolves once the peer announces it is going away.
    pub async fn peer_going_away(&self) {
        self.peer_going_away.cancelled().await
    }

    /// Waits until no tunnelled connection is left or `timeout` passes; true when none
    /// is left. Polls, because connections end in many places and a drain is rare.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.active_conns() > 0 && !self.is_closed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn alloc_id(&self) -> ConnId {
        loop {
            let id = ConnId(self.next_id.fetch_add(1, Ordering::Relaxed));
            if id.0 != 0 && !self.conns.contains(&id) {
                return id;
            }
        }
    }

    /// Gateway side: asks the agent to connect to `host:port` and waits for its answer.
    pub async fn open(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TunnelConn, OpenError> {
        if self.peer_is_going_away() || self.is_closed() {
            return Err(OpenError::SessionClosed);
        }
        let started = Instant::now();
        let id = self.alloc_id();
        let (ptx, prx) = oneshot::channel();
        let (slot, conn) = self.new_conn(id, Some(ptx));
        if self.conns.try_insert(id, slot).is_err() {
            // The id belongs to someone else: this conn must not release it.
            conn.disarm();
            return Err(OpenError::SessionClosed);
        }
        let connect = Message::Connect(anyproxy_proto::Connect {
            id,
            host: host.to_owned(),
            port,
            protocol: anyproxy_proto::Protocol::Tcp,
        });
        if self.send(connect).await.is_err() {
            self.conns.remove(&id);
            return Err(OpenError::SessionClosed);
        }
        match tokio::time::timeout(timeout, prx).await {
            Ok(Ok(Ok(()))) => {
                bump(&self.stats.conns_opened, 1);
                self.stats.connect_time.observe(started.elapsed());
                Ok(conn)
            }
            // An agent that is shutting down refuses; another agent may still take it.
            Ok(Ok(Err(failure))) if failure.message.starts_with(GOING_AWAY) => {
                Err(OpenError::SessionClosed)
            }
            Ok(Ok(Err(failure))) => Err(OpenError::Failed(failure)),
            Ok(Err(_)) => Err(OpenError::SessionClosed),
            Err(_) => {
                if self.conns.remove(&id).is_some() {
                    let _ = self
                        .send(Message::Close(Close {
                            id,
                            reason: "connect timed out at the gateway".into(),
                        }))
                        .await;
                }
                Err(OpenError::Timeout(timeout))
            }
        }
    }

    /// Agent side: registers a connection the agent has dialed, before it tells the
    /// gateway so, so that the gateway's first data finds it.
    pub fn register(self: &Arc<Self>, id: ConnId) -> Option<TunnelConn> {
        let (slot, conn) = self.new_conn(id, None);
        if self.conns.try_insert(id, slot).is_err() {
            // The id belongs to a live connection: this conn must not release it.
            conn.disarm();
            return None;
        }
        Some(conn)
    }

    /// Binary mode has per-connection flow control and half-close; JSON mode has not.
    pub fn flow_controlled(&self) -> bool {
        self.encoding == Encoding::Binary
    }

    pub fn max_window(&self) -> u32 {
        self.options.max_window
    }

    fn new_conn(
        self: &Arc<Self>,
        id: ConnId,
        pending: Option<oneshot::Sender<Result<(), ConnectFailure>>>,
    ) -> (Slot, TunnelConn) {
        let (allowance, credit) = if self.flow_controlled() {
            (
                u64::from(INITIAL_WINDOW),
                SendCredit::new(u64::from(INITIAL_WINDOW)),
            )
        } else {
            (u64::MAX, SendCredit::unlimited())
        };
        let inbox = Arc::new(Inbox::new(allowance));
        let credit = Arc::new(credit);
        let cancel = self.closed.child_token();
        let slot = Slot {
            inbox: inbox.clone(),
            credit: credit.clone(),
            pending,
            cancel: cancel.clone(),
        };
        let conn = TunnelConn {
            id,
            core: self.clone(),
            inbox,
            credit,
            cancel,
            guard: AbandonGuard {
                id,
                core: self.clone(),
                armed: true,
            },
        };
        (slot, conn)
    }

    pub fn is_live(&self, id: ConnId) -> bool {
        self.conns.contains(&id)
    }

    /// Milliseconds (monotonic, since an arbitrary origin) of the last pong received.
    pub fn last_pong_ms(&self) -> u64 {
        self.last_pong_ms.load(Ordering::Relaxed)
    }

    /// The heartbeat round trip, once one was measured.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    fn pong_received(&self, timestamp: Option<i64>) {
        self.last_pong_ms
            .store(crate::tunnel::monotonic_ms(), Ordering::Relaxed);
        let Some(timestamp) = timestamp else { return };
        let sent = self.last_ping.lock().take_if(|(ts, _)| *ts == timestamp);
        if let Some((_, at)) = sent {
            self.stats.rtt.observe(at.elapsed());
            let sample = at.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
            let old = self.rtt_us.load(Ordering::Relaxed);
            // The usual 7/8 smoothing, so one queued-behind-data ping does not swing it.
            let rtt = if old == 0 {
                sample
            } else {
                (old * 7 + sample) / 8
            };
            self.rtt_us.store(rtt.max(1), Ordering::Relaxed);
        }
    }

    /// Sends a `ping` every `interval` until the session ends; the pongs time the round
    /// trip (for the flow-control window) and show the peer is alive. The first ping
    /// goes out at once so that the round trip is known early.
    pub async fn heartbeat(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            *self.last_ping.lock() = Some((timestamp, Instant::now()));
            if self
                .send(Message::Ping(Heartbeat::new(timestamp)))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Forgets `id` locally. True when this call removed it, i.e. the caller is the one
    /// who must tell the peer.
    pub fn forget(&self, id: ConnId) -> bool {
        self.conns.remove(&id).is_some()
    }

    async fn reply_error(&self, code: ErrorCode, message: String, id: Option<ConnId>) {
        let _ = self
            .send(Message::Error(ErrorMsg { code, message, id }))
            .await;
    }

    /// Handles one decoded message that is common to both roles. Returns the message
    /// back when the role must handle it (`connect`, `auth`, `auth_response`).
    pub async fn dispatch(&self, msg: Message) -> Option<Message> {
        match msg {
            Message::Data(Data { id, payload }) => {
                self.deliver(id, payload).await;
                None
            }
            Message::Close(Close { id, reason }) => {
                if let Some(slot) = self.conns.remove(&id) {
                    tracing::debug!(conn = %id, %reason, "closed by peer");
                    if let Some(p) = slot.pending {
                        let _ = p.send(Err(ConnectFailure {
                            code: ErrorCode::ConnectionFailed,
                            message: reason,
                        }));
                    }
                    // The relay still delivers what was queued, then ends. In JSON mode
                    // `close` is the only way a stream ends, so it counts as a finish.
                    slot.inbox.end(if self.flow_controlled() {
                        InboxEnd::Reset
                    } else {
                        InboxEnd::Finished
                    });
                }
                None
            }
            Message::WindowUpdate(WindowUpdate { id, increment }) => {
                if self.refuse_in_json("window_update").await {
                    return None;
                }
                // Unknown ids are normal: the connection may have just ended here.
                if let Some(credit) = self.conns.with(&id, |s| s.credit.clone()) {
                    credit.grant(u64::from(increment));
                }
                None
            }
            Message::Fin(Fin { id }) => {
                if self.refuse_in_json("fin").await {
                    return None;
                }
                if let Some(inbox) = self.conns.with(&id, |s| s.inbox.clone()) {
                    inbox.end(InboxEnd::Finished);
                }
                None
            }
            Message::ConnectResponse(ConnectResponse {
                id,
                success,
                message,
            }) => {
                self.resolve(id, success, ErrorCode::ConnectionFailed, message);
                None
            }
            Message::Error(ErrorMsg {
                code,
                message,
                id: Some(id),
            }) => {
                if !self.resolve(id, false, code, message.clone()) {
                    tracing::warn!(conn = %id, %code, %message, "peer reported an error");
                }
                None
            }
            Message::Error(ErrorMsg {
                code: ErrorCode::InternalError,
                message,
                id: None,
            }) if message.starts_with(GOING_AWAY) => {
                tracing::info!(%message, conns = self.active_conns(), "peer is going away");
                self.peer_going_away.cancel();
                None
            }
            Message::Error(ErrorMsg {
                code,
                message,
                id: None,
            }) => {
                tracing::warn!(%code, %message, "peer reported an error");
                None
            }
            Message::Ping(h) => {
                let _ = self.send(Message::Pong(h)).await;
                None
            }
            Message::Pong(Heartbeat { timestamp, .. }) => {
                self.pong_received(Some(timestamp));
                None
            }
            other @ (Message::Connect(_) | Message::Auth(_) | Message::AuthResponse(_)) => {
                Some(other)
            }
            other @ (Message::Forward(_) | Message::ForwardResponse(_)) => {
                if self.refuse_in_json(other.kind().as_str()).await {
                    return None;
                }
                Some(other)
            }
        }
    }

    /// Flow-control and half-close messages exist only in binary mode; a JSON-mode peer
    /// that sends them is told so. Returns true when the message was refused.
    async fn refuse_in_json(&self, kind: &str) -> bool {
        if self.flow_controlled() {
            return false;
        }
        self.reply_error(
            ErrorCode::InvalidMessage,
            format!("{kind} is only valid in binary mode"),
            None,
        )
        .await;
        true
    }

    /// Settles a pending `open`. Returns false when nothing was pending for `id`.
    fn resolve(&self, id: ConnId, success: bool, code: ErrorCode, message: String) -> bool {
        let pending = self.conns.with(&id, |slot| slot.pending.take()).flatten();
        let Some(pending) = pending else {
            return false;
        };
        if success {
            let _ = pending.send(Ok(()));
        } else {
            self.conns.remove(&id);
            let _ = pending.send(Err(ConnectFailure { code, message }));
        }
        true
    }

    /// Hands a payload to its connection's inbox.
    ///
    /// Binary mode never waits: the peer may only send what we granted, so the inbox has
    /// room by construction, and a peer that oversteps has that one connection reset.
    /// JSON mode has no credit: the reader waits while the connection is full (lossless
    /// backpressure), and a connection that stays full past the stall timeout is closed
    /// so that it cannot hold the whole session hostage.
    async fn deliver(&self, id: ConnId, payload: Bytes) {
        let Some(inbox) = self.conns.with(&id, |s| s.inbox.clone()) else {
            let _ = self
                .send(Message::Close(Close {
                    id,
                    reason: "unknown connection".into(),
                }))
                .await;
            return;
        };
        if self.flow_controlled() {
            if let Err(e) = inbox.push(payload, true) {
                self.reset(id, &e).await;
            }
            return;
        }
        if inbox.queued() >= JSON_CONN_BUFFER {
            bump(&self.stats.json_stalls, 1);
        }
        let room = inbox.wait_for_room(JSON_CONN_BUFFER);
        if tokio::time::timeout(self.options.stall_timeout, room)
            .await
            .is_err()
        {
            if let Some(slot) = self.conns.remove(&id) {
                slot.cancel.cancel();
                tracing::warn!(conn = %id, timeout = ?self.options.stall_timeout, "closing a connection whose reader stalled");
                let _ = self
                    .send(Message::Close(Close {
                        id,
                        reason: "stalled: the receiving side stopped reading".into(),
                    }))
                    .await;
            }
            return;
        }
        // A JSON-mode inbox only ends when its slot is gone, and then the relay no
        // longer reads it: nothing to report.
        let _ = inbox.push(payload, false);
    }

    /// Resets one connection because its peer broke the flow-control or half-close
    /// rules. Only that connection suffers.
    async fn reset(&self, id: ConnId, why: &PushError) {
        let Some(slot) = self.conns.remove(&id) else {
            return;
        };
        slot.cancel.cancel();
        tracing::warn!(conn = %id, error = %why, "resetting a connection whose peer broke the protocol");
        self.reply_error(ErrorCode::InvalidMessage, why.to_string(), Some(id))
            .await;
        let _ = self
            .send(Message::Close(Close {
                id,
                reason: why.to_string(),
            }))
            .await;
    }

    /// Reads and dispatches messages until the socket closes, fails or stays silent
    /// for `idle_timeout`. Messages only a role can handle go to `on_role_message`.
    pub async fn read_loop<F, Fut>(
        self: &Arc<Self>,
        reader: &mut WsReader,
        idle_timeout: Duration,
        mut on_role_message: F,
    ) -> SessionEnd
    where
        F: FnMut(Message) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            let incoming = tokio::select! {
                r = tokio::time::timeout(idle_timeout, reader.next()) => r,
                _ = self.closed.cancelled() => return SessionEnd::Shutdown,
            };
            let incoming = match incoming {
                Err(_) => return SessionEnd::IdleTimeout(idle_timeout),
                Ok(Err(e)) => {
                    let code = e.close_code();
                    let _ = self.out.try_send(Outbound::WsClose(code, e.to_string()));
                    return SessionEnd::Error(e);
                }
                Ok(Ok(i)) => i,
            };
            match incoming {
                Incoming::Message { payload, .. } => {
                    for decoded in decode_all(self.encoding, payload) {
                        match decoded {
                            Ok(msg) => {
                                self.stats.received(msg.kind());
                                if let Message::Error(e) = &msg {
                                    self.stats.error_received(e.code);
                                }
                                if let Some(role_msg) = self.dispatch(msg).await {
                                    on_role_message(role_msg).await;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable message from peer");
                                self.reply_error(e.code(), e.to_string(), None).await;
                            }
                        }
                    }
                }
                Incoming::Ping(p) => {
                    let _ = self.send_raw(Outbound::WsPong(p)).await;
                }
                Incoming::Pong => self.pong_received(None),
                Incoming::Close { code, reason } => {
                    let _ = self
                        .out
                        .try_send(Outbound::WsClose(close_code::NORMAL, String::new()));
                    return SessionEnd::PeerClosed { code, reason };
                }
            }
        }
    }
}

/// The first message of a session, read before the role's loop starts.
pub enum FirstMessage {
    /// The first message, and any that arrived with it in the same WebSocket message.
    Message(Message, Vec<Message>),
    /// It could not be decoded.
    Invalid(String),
    /// The socket closed or failed first.
    Gone(String),
}

impl SessionCore {
    /// Reads until the first protocol message, answering WebSocket pings meanwhile.
    pub async fn first_message(&self, reader: &mut WsReader) -> FirstMessage {
        loop {
            match reader.next().await {
                Err(e) => return FirstMessage::Gone(e.to_string()),
                Ok(Incoming::Ping(p)) => {
                    let _ = self.send_raw(Outbound::WsPong(p)).await;
                }
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close { code, reason }) => {
                    return FirstMessage::Gone(format!(
                        "peer closed the WebSocket (code {code:?}, {reason:?})"
                    ))
                }
                Ok(Incoming::Message { payload, .. }) => {
                    let mut decoded = decode_all(self.encoding, payload);
                    match decoded.next() {
                        None => continue,
                        Some(Err(e)) => return FirstMessage::Invalid(e.to_string()),
                        Some(Ok(first)) => {
                            let rest = decoded.filter_map(Result::ok).collect();
                            return FirstMessage::Message(first, rest);
                        }
                    }
                }
            }
        }
    }
}

/// Decodes every message in one WebSocket message (binary mode may carry several).
pub fn decode_all(
    encoding: Encoding,
    payload: Bytes,
) -> impl Iterator<Item = Result<Message, anyproxy_proto::DecodeError>> {
    let (json_msg, frames) = match encoding {
        Encoding::Json => (Some(json::decode(&payload)), None),
        Encoding::Binary => (None, Some(binary::Frames::new(payload))),
    };
    json_msg.into_iter().chain(frames.into_iter().flatten())
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

/// One open tunnelled connection, held by its relay.
pub struct TunnelConn {
    pub id: ConnId,
    pub(super) core: Arc<SessionCore>,
    pub(super) inbox: Arc<Inbox>,
    pub(super) credit: Arc<SendCredit>,
    pub(super) cancel: CancellationToken,
    pub(super) guard: AbandonGuard,
}

impl TunnelConn {
    pub fn session(&self) -> &Arc<SessionCore> {
        &self.core
    }

    /// For a caller that releases the id itself (and answers the peer its own way).
    pub fn disarm(mut self) {
        self.guard.armed = false;
    }
}

/// Releases a connection nobody relays: a `TunnelConn` dropped on an error path, or an
/// `open` whose caller gave up. Without it the slot (and the agent's target socket and
/// capacity permit) would live until the session ends.
pub(super) struct AbandonGuard {
    pub(super) id: ConnId,
    pub(super) core: Arc<SessionCore>,
    pub(super) armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.armed || !self.core.forget(self.id) {
            return;
        }
        let close = Message::Close(Close {
            id: self.id,
            reason: "abandoned".into(),
        });
        if let Err(mpsc::error::TrySendError::Full(item)) =
            self.core.out.try_send(Outbound::Msg(close))
        {
            // The writer is behind: queue it from a task rather than lose it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let core = self.core.clone();
                rt.spawn(async move {
                    let _ = core.send_raw(item).await;
                });
            }
        }
    }
}

async fn write_loop(
    mut ws: WsWriter,
    mut rx: mpsc::Receiver<Outbound>,
    encoding: Encoding,
    closed: CancellationToken,
    stats: Arc<SessionStats>,
) {
    // On a compressed session, data of two connections never share a WebSocket message
    // (and so never a compression context): one user's chosen bytes must not become a
    // length oracle for another user's secrets (CRIME/BREACH).
    let isolate = ws.compression_counters().is_some();
    let mut batch = Batch {
        buf: BytesMut::new(),
        conn: None,
        isolate,
    };
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = closed.cancelled() => None,
        };
        let Some(first) = first else {
            let _ = ws.send_close(close_code::GOING_AWAY, "session ended").await;
            return;
        };
        match write_batch(&mut ws, &mut rx, first, encoding, &mut batch, &stats).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket write failed");
                closed.cancel();
                return;
            }
        }
    }
}

/// Binary frames waiting to go out as one WebSocket message.
struct Batch {
    buf: BytesMut,
    /// The connection whose data is in `buf`, when isolating connections.
    conn: Option<ConnId>,
    isolate: bool,
}

impl Batch {
    /// Whether `msg` must start a new WebSocket message. Control messages carry no
    /// user data and may join any batch.
    fn must_split_before(&self, msg: &Message) -> bool {
        match (self.isolate, msg) {
            (true, Message::Data(d)) => self.conn.is_some_and(|c| c != d.id),
            _ => false,
        }
    }

    fn push(&mut self, msg: &Message) {
        if let Message::Data(d) = msg {
            self.conn = Some(d.id);
        }
        binary::encode_into(msg, &mut self.buf);
    }
}

/// Writes `first` and whatever else is already queued, up to [`BATCH_BYTES`], then
/// flushes once. Binary messages queued together share one WebSocket message.
/// Returns false once a close frame has been sent.
async fn write_batch(
    ws: &mut WsWriter,
    rx: &mut mpsc::Receiver<Outbound>,
    first: Outbound,
    encoding: Encoding,
    batch: &mut Batch,
    stats: &SessionStats,
) -> Result<bool, WsError> {
    let mut written = 0usize;
    let mut item = Some(first);
    while let Some(next) = item.take() {
        match next {
            Outbound::Msg(msg) => {
                stats.sent(msg.kind());
                match encoding {
                    Encoding::Binary => {
                        if batch.must_split_before(&msg) {
                            written += batch.buf.len();
                            flush_batch(ws, batch).await?;
                        }
                        batch.push(&msg);
                        if batch.buf.len() >= BATCH_BYTES {
                            written += batch.buf.len();
                            flush_batch(ws, batch).await?;
                        }
                    }
                    Encoding::Json => {
                        let text = json::encode(&msg);
                        written += text.len();
                        ws.send_text(text).await?;
                    }
                }
            }
            Outbound::WsPong(p) => {
                flush_batch(ws, batch).await?;
                ws.send_pong(p).await?;
            }
            Outbound::WsClose(code, reason) => {
                flush_batch(ws, batch).await?;
                ws.send_close(code, &reason).await?;
                return Ok(false);
            }
        }
        if written + batch.buf.len() < BATCH_BYTES {
            item = rx.try_recv().ok();
        }
    }
    flush_batch(ws, batch).await?;
    ws.flush().await?;
    Ok(true)
}

async fn flush_batch(ws: &mut WsWriter, batch: &mut Batch) -> Result<(), WsError> {
    batch.conn = None;
    if !batch.buf.is_empty() {
        ws.send_binary(batch.buf.split()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(id: u32) -> Message {
        Message::Data(Data {
            id: ConnId(id),
            payload: Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn a_compressed_batch_never_mixes_two_connections_data() {
        let mut batch = Batch {
            buf: BytesMut::new(),
            conn: None,
            isolate: true,
        };
        assert!(!batch.must_split_before(&data(1)));
        batch.push(&data(1));
        assert!(!batch.must_split_before(&data(1)));
        assert!(batch.must_split_before(&data(2)));
        // Control messages carry no user bytes and may ride along.
        let update = Message::WindowUpdate(WindowUpdate {
            id: ConnId(2),
            increment: 1,
        });
        assert!(!batch.must_split_before(&update));

        let mut plain = Batch {
            isolate: false,
            ..batch
        };
        assert!(!plain.must_split_before(&data(2)));
        plain.push(&data(2));
        assert!(!plain.must_split_before(&data(3)));
    }
}
