//! The shared state of one session: its connection table, the queue toward the
//! writer, and the lifecycle flags (closed, going away). Opening (`open`, gateway) and
//! registering (`register`, agent) a tunnelled connection live here.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyproxy_proto::{
    Close, ConnId, ConnIdMap, Encoding, ErrorCode, ErrorMsg, InternedIds, Message, NumericIds,
    INITIAL_WINDOW,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::{AbandonGuard, TunnelConn};
use super::writer::{write_loop, Lane, Lanes};
use super::{
    is_going_away, ConnectFailure, IdSpace, OpenError, Outbound, Session, SessionClosed,
    SessionOptions, Unsent, CONN_UNSENT, CTL_QUEUE, GOING_AWAY, OUT_QUEUE,
};
use crate::transport::ws::deflate::{CompressionCounters, CompressionStats};
use crate::transport::WsWriter;
use crate::tunnel::datagram::DatagramTable;
use crate::tunnel::flow::{Bound, Inbox, SendCredit};
use crate::tunnel::stats::{bump, SessionStats};
use crate::tunnel::table::ShardedMap;

pub(super) struct Slot {
    pub(super) inbox: Arc<Inbox>,
    pub(super) credit: Arc<SendCredit>,
    pub(super) unsent: Unsent,
    /// Present until the agent answers the `connect` (gateway side only).
    pub(super) pending: Option<oneshot::Sender<Result<(), ConnectFailure>>>,
    pub(super) cancel: CancellationToken,
}

/// Shared state of one session. Cheap to clone behind an `Arc`.
pub struct SessionCore {
    pub encoding: Encoding,
    /// The writer's data lane (see `writer`'s [`Lane`]).
    pub(super) out: mpsc::Sender<Outbound>,
    /// The writer's control lane, drained first.
    pub(super) ctl: mpsc::Sender<Outbound>,
    pub(super) conns: ShardedMap<ConnId, Slot>,
    pub(super) next_id: AtomicU32,
    pub(super) closed: CancellationToken,
    pub(super) options: SessionOptions,
    pub(super) last_pong_ms: AtomicU64,
    /// Smoothed heartbeat round trip in microseconds; 0 until the first pong.
    pub(super) rtt_us: AtomicU64,
    /// The timestamp of the last `ping` we sent and when, to time its `pong`.
    pub(super) last_ping: Mutex<Option<(i64, Instant)>>,
    /// Present when the session negotiated permessage-deflate.
    pub(super) compression: Option<Arc<CompressionCounters>>,
    /// Who is at the other end (the agent's client id on the gateway), once known.
    pub(super) peer: std::sync::OnceLock<Arc<str>>,
    /// We announced that we are going away: open nothing more here.
    pub(super) going_away: CancellationToken,
    /// The peer announced that it is going away.
    pub(super) peer_going_away: CancellationToken,
    /// How JSON `connection_id`s map to local ids (PROTOCOL.md §3.2).
    pub(super) ids: Arc<dyn ConnIdMap + Send + Sync>,
    /// Counters for metrics and the status page (relaxed atomics).
    pub(super) stats: Arc<SessionStats>,
    /// The datagram (UDP) flows, beside the streams (`tunnel::datagram`).
    datagrams: DatagramTable,
}

impl SessionCore {
    /// Creates the session state and spawns its writer task on `writer`; the
    /// [`Session`] returned owns both.
    pub fn start(encoding: Encoding, writer: WsWriter, options: SessionOptions) -> Session {
        let (out, data_rx) = mpsc::channel(OUT_QUEUE);
        let (ctl, ctl_rx) = mpsc::channel(CTL_QUEUE);
        let compression = writer.compression_counters();
        let stats = Arc::new(SessionStats::default());
        let core = Arc::new(SessionCore {
            encoding,
            out,
            ctl,
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
            datagrams: DatagramTable::default(),
            ids: match (encoding, options.ids) {
                (Encoding::Json, IdSpace::Peers) => Arc::new(InternedIds::new()),
                _ => Arc::new(NumericIds),
            },
        });
        let writer_task = tokio::spawn(write_loop(
            writer,
            Lanes::new(ctl_rx, data_rx),
            encoding,
            core.ids.clone(),
            core.closed.clone(),
            stats,
        ));
        Session::new(core, writer_task)
    }

    /// Queues a message for the peer, in the lane its kind takes (control messages go
    /// ahead of data). Waits while the writer is behind (backpressure); fails only when
    /// the session is gone. A connection's data goes through [`Self::send_ordered`].
    pub async fn send(&self, msg: Message) -> Result<(), SessionClosed> {
        self.send_raw(Outbound::Msg(msg)).await
    }

    pub(super) async fn send_raw(&self, item: Outbound) -> Result<(), SessionClosed> {
        let lane = Lane::of(&item);
        self.send_in(lane, item).await
    }

    pub(super) fn lane(&self, lane: Lane) -> &mpsc::Sender<Outbound> {
        match lane {
            Lane::Control => &self.ctl,
            Lane::Data => &self.out,
        }
    }

    pub(super) async fn send_in(&self, lane: Lane, item: Outbound) -> Result<(), SessionClosed> {
        tokio::select! {
            r = self.lane(lane).send(item) => r.map_err(|_| SessionClosed),
            _ = self.closed.cancelled() => Err(SessionClosed),
        }
    }

    /// Queues a message only if the writer's queue has more than `keep_free` places
    /// left; false otherwise, or when the session is gone. Datagrams go this way:
    /// dropping one beats holding a reader, and streams keep their places.
    pub(crate) fn try_send(&self, msg: Message, keep_free: usize) -> bool {
        self.out.capacity() > keep_free && self.out.try_send(Outbound::Msg(msg)).is_ok()
    }

    /// This session's datagram flows.
    pub(crate) fn datagrams(&self) -> &DatagramTable {
        &self.datagrams
    }

    /// Cancelled when the session ends.
    pub(crate) fn closed_token(&self) -> &CancellationToken {
        &self.closed
    }

    /// Queues `item` without waiting: at once when its lane has room, else from a task.
    /// For the session reader's own replies that take the data lane (`close` of an
    /// unknown connection, id releases): a reader waiting on its writer while the
    /// peer's reader waits on the peer's writer would be a deadlock over two full
    /// sockets.
    pub(super) fn send_soon(&self, item: Outbound) {
        let lane = self.lane(Lane::of(&item));
        if let Err(mpsc::error::TrySendError::Full(item)) = lane.try_send(item) {
            let (lane, closed) = (lane.clone(), self.closed.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = lane.send(item) => {}
                    _ = closed.cancelled() => {}
                }
            });
        }
    }

    /// Queues one of a connection's data or `fin` messages, counted in `unsent` until
    /// the writer takes it, so that its `close` knows whether it may go first.
    pub(crate) async fn send_ordered(
        &self,
        msg: Message,
        unsent: &Unsent,
    ) -> Result<(), SessionClosed> {
        // Room first, then count and queue at once: a send cancelled while waiting
        // leaves no count behind.
        let permit = tokio::select! {
            p = async {
                unsent.below(CONN_UNSENT).await;
                self.out.reserve().await
            } => p.map_err(|_| SessionClosed)?,
            _ = self.closed.cancelled() => return Err(SessionClosed),
        };
        unsent.queued();
        permit.send(Outbound::Ordered(msg, unsent.clone()));
        Ok(())
    }

    /// Queues a connection's `close`: in the control lane when none of its data is
    /// still queued, else in the data lane behind that data (never ahead of it).
    pub(crate) async fn send_close(
        &self,
        id: ConnId,
        reason: String,
        unsent: &Unsent,
    ) -> Result<(), SessionClosed> {
        let lane = match unsent.get() {
            0 => Lane::Control,
            _ => Lane::Data,
        };
        let close = Outbound::Msg(Message::Close(Close { id, reason }));
        self.send_in(lane, close).await
    }

    /// JSON mode: closes a connection whose local socket stopped taking what the peer
    /// sends (its queue outgrew the cap, see [`crate::tunnel::flow::QueueCap`]): only
    /// that connection ends, with `why` in the log, the `close` and its relay's access
    /// log. False when the connection was already gone.
    pub(crate) async fn close_stalled(&self, id: ConnId, why: &str) -> bool {
        let Some(slot) = self.conns.remove(&id) else {
            return false;
        };
        slot.inbox.mark_stalled();
        slot.cancel.cancel();
        bump(&self.stats.json_stall_closes, 1);
        tracing::warn!(conn = %id, peer = self.peer(), queued = slot.inbox.queued(), "closing a connection whose local side stopped reading: {why}");
        let _ = self
            .send_close(id, format!("stalled: {why}"), &slot.unsent)
            .await;
        true
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
        self.conns.len() + self.datagrams.len()
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
        self.datagrams.shutdown();
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

    pub(crate) fn alloc_id(&self) -> ConnId {
        loop {
            let id = ConnId(self.next_id.fetch_add(1, Ordering::Relaxed));
            if id.0 != 0 && !self.conns.contains(&id) && !self.datagrams.contains(&id) {
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
            Ok(Ok(Err(failure))) if is_going_away(&failure.message) => {
                Err(OpenError::SessionClosed)
            }
            Ok(Ok(Err(failure))) => Err(OpenError::Failed(failure)),
            Ok(Err(_)) => Err(OpenError::SessionClosed),
            Err(_) => {
                if let Some(slot) = self.conns.remove(&id) {
                    let reason = "connect timed out at the gateway".into();
                    let _ = self.send_close(id, reason, &slot.unsent).await;
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

    pub fn conn_idle_timeout(&self) -> Option<Duration> {
        self.options.conn_idle_timeout
    }

    /// JSON mode: how long a connection may stay over its queue cap.
    pub fn stall_grace(&self) -> Duration {
        self.options.stall_timeout
    }

    /// JSON mode: the per-connection queue cap in bytes.
    pub fn json_cap(&self) -> usize {
        self.options.json_cap.cap
    }

    pub(super) fn new_conn(
        self: &Arc<Self>,
        id: ConnId,
        pending: Option<oneshot::Sender<Result<(), ConnectFailure>>>,
    ) -> (Slot, TunnelConn) {
        let (bound, credit) = if self.flow_controlled() {
            (
                Bound::Credit(u64::from(INITIAL_WINDOW)),
                SendCredit::new(u64::from(INITIAL_WINDOW)),
            )
        } else {
            (Bound::Queue(self.options.json_cap), SendCredit::unlimited())
        };
        let inbox = Arc::new(Inbox::new(bound));
        let credit = Arc::new(credit);
        let cancel = self.closed.child_token();
        let unsent = Unsent::default();
        let slot = Slot {
            inbox: inbox.clone(),
            credit: credit.clone(),
            unsent: unsent.clone(),
            pending,
            cancel: cancel.clone(),
        };
        let conn = TunnelConn {
            id,
            core: self.clone(),
            inbox,
            credit,
            unsent,
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

    /// Forgets `id` locally. True when this call removed it, i.e. the caller is the one
    /// who must tell the peer.
    pub fn forget(&self, id: ConnId) -> bool {
        self.conns.remove(&id).is_some()
    }

    pub(super) async fn reply_error(&self, code: ErrorCode, message: String, id: Option<ConnId>) {
        let _ = self
            .send(Message::Error(ErrorMsg { code, message, id }))
            .await;
    }
}
