//! Datagram flows: UDP carried through a session (PROTOCOL.md §5.7).
//!
//! A flow is opened by a `connect` with `protocol: udp` and each `data` message on it
//! carries exactly one datagram, in both encodings. Unlike a stream, a flow has no
//! credit, no `window_update` and no `fin`: a datagram that finds no room is dropped
//! and counted, exactly as a full socket buffer drops it, so a flood on one flow can
//! never hold the session reader, the writer or another flow.
//!
//! * [`DatagramTable`]: a session's flows, beside its stream table; the session's
//!   dispatch hands each `data`, `close` and answer for a flow id to it.
//! * [`DatagramFlow`]: one flow as its relay holds it: `send` never waits, `recv` takes
//!   the next datagram from a queue bounded in datagrams and bytes.
//! * [`UdpStats`]: what flows count (datagrams and bytes each way, drops by reason),
//!   shared by every flow of one gateway or agent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyproxy_proto::{Close, ConnId, Connect, Data, ErrorCode, Message, Protocol};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::session::{is_going_away, SessionCore};
use super::stats::bump;
use super::table::ShardedMap;
use super::{ConnectFailure, OpenError};

/// The largest UDP payload over IPv4 (65,535 − 8 − 20): no datagram can be larger.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// How the writer queue is shared: a datagram is queued only while at least this
/// many places are left, so a flood never takes the places streams and control
/// messages wait for.
pub const KEEP_FREE_FOR_STREAMS: usize = 64;

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The flow's queue toward its local socket was full (datagrams or bytes).
    QueueFull,
    /// The session's writer was busy: no room toward the peer.
    SessionBusy,
    /// Larger than the configured maximum.
    Oversize,
    /// A SOCKS5 datagram from an address other than the association's client.
    ForeignSource,
    /// A SOCKS5 datagram with `FRAG != 0` (fragmentation is not supported).
    Fragmented,
    /// A SOCKS5 datagram whose header could not be read.
    Malformed,
    /// Its flow could not be opened (refused by the agent, limits, no agent).
    Refused,
    /// The local socket refused it (an ICMP error, a full send buffer).
    SendFailed,
    /// A reply that no longer fit the user's download quota (the policy's); its flow
    /// ends with it.
    Quota,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::QueueFull,
        DropReason::SessionBusy,
        DropReason::Oversize,
        DropReason::ForeignSource,
        DropReason::Fragmented,
        DropReason::Malformed,
        DropReason::Refused,
        DropReason::SendFailed,
        DropReason::Quota,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::SessionBusy => "session_busy",
            DropReason::Oversize => "oversize",
            DropReason::ForeignSource => "foreign_source",
            DropReason::Fragmented => "fragmented",
            DropReason::Malformed => "malformed",
            DropReason::Quota => "quota",
            DropReason::Refused => "refused",
            DropReason::SendFailed => "send_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of every flow of one gateway or agent: relaxed atomics, read at scrape
/// time. `in` is what local sockets sent us (proxy users, or targets on the agent),
/// `out` what we delivered to them.
#[derive(Debug, Default)]
pub struct UdpStats {
    pub flows_opened: AtomicU64,
    flows_ended: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    pub bytes_out: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl UdpStats {
    pub fn dropped(&self, why: DropReason) {
        bump(&self.drops[why.index()], 1);
    }

    pub fn drops(&self, why: DropReason) -> u64 {
        self.drops[why.index()].load(Ordering::Relaxed)
    }

    /// Flows open now.
    pub fn active(&self) -> u64 {
        let opened = self.flows_opened.load(Ordering::Relaxed);
        opened.saturating_sub(self.flows_ended.load(Ordering::Relaxed))
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn delivered(&self, n: usize) {
        bump(&self.datagrams_out, 1);
        bump(&self.bytes_out, n as u64);
    }

    fn accepted(&self, n: usize) {
        bump(&self.datagrams_in, 1);
        bump(&self.bytes_in, n as u64);
    }
}

/// The bounds of one flow, from the configuration.
#[derive(Clone, Copy, Debug)]
pub struct DatagramLimits {
    /// Datagrams larger than this are dropped (at most [`MAX_UDP_PAYLOAD`]).
    pub max_datagram: usize,
    /// Datagrams queued toward the local socket, at most.
    pub queue_datagrams: usize,
    /// Bytes queued toward the local socket, at most.
    pub queue_bytes: usize,
}

impl Default for DatagramLimits {
    fn default() -> Self {
        DatagramLimits {
            max_datagram: MAX_UDP_PAYLOAD,
            queue_datagrams: 1024,
            queue_bytes: 1 << 20,
        }
    }
}

struct QueueState {
    datagrams: VecDeque<Bytes>,
    bytes: usize,
    ended: bool,
}

/// One flow's datagrams toward its local socket: bounded, dropping when full.
struct DatagramQueue {
    state: Mutex<QueueState>,
    readable: Notify,
    limits: DatagramLimits,
    stats: Arc<UdpStats>,
    /// This flow's own drops, for its access line.
    dropped: AtomicU64,
}

impl DatagramQueue {
    fn new(limits: DatagramLimits, stats: Arc<UdpStats>) -> Self {
        DatagramQueue {
            state: Mutex::new(QueueState {
                datagrams: VecDeque::new(),
                bytes: 0,
                ended: false,
            }),
            readable: Notify::new(),
            limits,
            stats,
            dropped: AtomicU64::new(0),
        }
    }

    fn drop_one(&self, why: DropReason) {
        bump(&self.dropped, 1);
        self.stats.dropped(why);
    }

    /// Queues one datagram, or drops and counts it. Never waits.
    fn push(&self, datagram: Bytes) {
        if datagram.len() > self.limits.max_datagram {
            return self.drop_one(DropReason::Oversize);
        }
        {
            let mut st = self.state.lock();
            if st.ended {
                return;
            }
            let full = st.datagrams.len() >= self.limits.queue_datagrams
                || st.bytes + datagram.len() > self.limits.queue_bytes;
            if full {
                drop(st);
                return self.drop_one(DropReason::QueueFull);
            }
            st.bytes += datagram.len();
            // A copy: a small datagram must not pin the large WebSocket message it
            // was cut from for as long as it waits.
            st.datagrams.push_back(Bytes::copy_from_slice(&datagram));
        }
        self.readable.notify_one();
    }

    fn end(&self) {
        self.state.lock().ended = true;
        self.readable.notify_one();
    }

    /// The next datagram; `None` once the flow ended and nothing is left. Cancel-safe.
    async fn pop(&self) -> Option<Bytes> {
        loop {
            let notified = self.readable.notified();
            {
                let mut st = self.state.lock();
                if let Some(d) = st.datagrams.pop_front() {
                    st.bytes -= d.len();
                    return Some(d);
                }
                if st.ended {
                    return None;
                }
            }
            notified.await;
        }
    }
}

type Pending = oneshot::Sender<Result<(), ConnectFailure>>;

struct FlowSlot {
    queue: Arc<DatagramQueue>,
    /// Present until the agent answers the `connect` (gateway side only).
    pending: Option<Pending>,
    cancel: CancellationToken,
}

/// A session's datagram flows, by connection id (the ids are shared with streams).
#[derive(Default)]
pub struct DatagramTable {
    flows: ShardedMap<ConnId, FlowSlot>,
}

impl DatagramTable {
    pub fn contains(&self, id: &ConnId) -> bool {
        self.flows.contains(id)
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A `data` for `id`: queued (or dropped) when `id` is a flow; handed back
    /// otherwise, for the stream table. Never waits.
    pub fn deliver(&self, id: ConnId, payload: Bytes) -> Result<(), Bytes> {
        match self.flows.with(&id, |s| s.queue.clone()) {
            Some(queue) => {
                queue.push(payload);
                Ok(())
            }
            None => Err(payload),
        }
    }

    /// The peer closed `id`: the flow ends (a pending open fails with `reason`).
    /// False when `id` is not a flow.
    pub fn closed_by_peer(&self, id: ConnId, reason: &str) -> bool {
        let Some(slot) = self.flows.remove(&id) else {
            return false;
        };
        tracing::debug!(conn = %id, %reason, "datagram flow closed by peer");
        if let Some(p) = slot.pending {
            let _ = p.send(Err(ConnectFailure {
                code: ErrorCode::ConnectionFailed,
                message: reason.to_owned(),
            }));
        }
        slot.queue.end();
        slot.cancel.cancel();
        true
    }

    /// Settles a pending open of flow `id` with the agent's answer. Hands the message
    /// back when `id` is not a flow waiting for its answer.
    pub fn resolve(
        &self,
        id: ConnId,
        success: bool,
        code: ErrorCode,
        message: String,
    ) -> Option<String> {
        let Some(pending) = self.flows.with(&id, |s| s.pending.take()).flatten() else {
            return Some(message);
        };
        if success {
            let _ = pending.send(Ok(()));
        } else {
            self.flows.remove(&id);
            let _ = pending.send(Err(ConnectFailure { code, message }));
        }
        None
    }

    /// The session ended: every flow ends (pending opens fail as closed sessions).
    pub fn shutdown(&self) {
        for (_, slot) in self.flows.drain() {
            slot.queue.end();
            slot.cancel.cancel();
        }
    }

    fn insert(
        &self,
        core: &Arc<SessionCore>,
        id: ConnId,
        pending: Option<Pending>,
        limits: DatagramLimits,
        stats: Arc<UdpStats>,
    ) -> Option<DatagramFlow> {
        // An id is one connection's, stream or flow.
        if core.is_live(id) {
            return None;
        }
        let queue = Arc::new(DatagramQueue::new(limits, stats.clone()));
        let cancel = core.closed_token().child_token();
        let slot = FlowSlot {
            queue: queue.clone(),
            pending,
            cancel: cancel.clone(),
        };
        self.flows.try_insert(id, slot).ok()?;
        Some(DatagramFlow {
            id,
            core: core.clone(),
            queue,
            cancel,
            stats,
            max_datagram: limits.max_datagram,
            opened: Instant::now(),
            counted: false,
            armed: true,
            clock: tokio::time::Instant::now(),
            totals: Default::default(),
        })
    }

    fn forget(&self, id: ConnId) -> bool {
        self.flows.remove(&id).is_some()
    }
}

/// What one flow moved, for its access line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTotals {
    /// Datagrams (and their bytes) read from the local socket and sent to the peer.
    pub sent: u64,
    pub sent_bytes: u64,
    /// Datagrams (and bytes) from the peer delivered to the local socket.
    pub received: u64,
    pub received_bytes: u64,
    /// Datagrams this flow dropped, either way.
    pub dropped: u64,
}

/// One datagram flow as its relay holds it. Dropping it closes the flow (the peer is
/// told, unless the peer closed it).
pub struct DatagramFlow {
    pub id: ConnId,
    core: Arc<SessionCore>,
    queue: Arc<DatagramQueue>,
    cancel: CancellationToken,
    stats: Arc<UdpStats>,
    max_datagram: usize,
    opened: Instant,
    /// Whether this flow counts among `flows_opened` (once it was established).
    counted: bool,
    /// Whether dropping it tells the peer (see [`Self::discard`]).
    armed: bool,
    /// tokio's clock at the start, for idleness (a test with paused time can run it).
    clock: tokio::time::Instant,
    totals: FlowCounters,
}

/// A flow's own counters; `last_ms` is when it last moved a datagram, in ms since
/// `clock`.
#[derive(Default)]
struct FlowCounters {
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    dropped: AtomicU64,
    last_ms: AtomicU64,
}

impl DatagramFlow {
    pub fn session(&self) -> &Arc<SessionCore> {
        &self.core
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    pub fn stats(&self) -> &Arc<UdpStats> {
        &self.stats
    }

    /// Sends one datagram to the peer without waiting: too large, or no room in the
    /// session's writer, and it is dropped and counted. True when it was queued.
    pub fn send(&self, datagram: Bytes) -> bool {
        let len = datagram.len();
        if len > self.max_datagram {
            self.dropped(DropReason::Oversize);
            return false;
        }
        let msg = Message::Data(Data {
            id: self.id,
            payload: datagram,
        });
        if !self.core.try_send(msg, KEEP_FREE_FOR_STREAMS) {
            self.dropped(DropReason::SessionBusy);
            return false;
        }
        self.stats.accepted(len);
        bump(&self.totals.sent, 1);
        bump(&self.totals.sent_bytes, len as u64);
        self.touch();
        true
    }

    /// Counts a datagram of this flow dropped on its way (by reason, and in the
    /// flow's own total).
    pub fn dropped(&self, why: DropReason) {
        bump(&self.totals.dropped, 1);
        self.stats.dropped(why);
    }

    fn touch(&self) {
        let ms = self.clock.elapsed().as_millis() as u64;
        self.totals.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Completes once the flow has moved no datagram either way for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last = Duration::from_millis(self.totals.last_ms.load(Ordering::Relaxed));
            let quiet = self.clock.elapsed().saturating_sub(last);
            if quiet >= timeout {
                return;
            }
            tokio::time::sleep(timeout - quiet).await;
        }
    }

    /// What the flow moved so far.
    pub fn totals(&self) -> FlowTotals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FlowTotals {
            sent: get(&self.totals.sent),
            sent_bytes: get(&self.totals.sent_bytes),
            received: get(&self.totals.received),
            received_bytes: get(&self.totals.received_bytes),
            dropped: get(&self.totals.dropped) + get(&self.queue.dropped),
        }
    }

    /// Forgets the flow without telling the peer: for a caller that answers the
    /// `connect` with its own refusal.
    pub fn discard(mut self) {
        self.armed = false;
        self.core.datagrams().forget(self.id);
    }

    /// The next datagram from the peer; `None` once the flow ended (closed by the
    /// peer, the session gone, or [`Self::cancelled`]). Cancel-safe.
    pub async fn recv(&self) -> Option<Bytes> {
        tokio::select! {
            d = self.queue.pop() => d,
            _ = self.cancel.cancelled() => None,
        }
    }

    /// Counts a datagram that [`Self::recv`] returned and the local socket took.
    pub fn delivered(&self, n: usize) {
        self.stats.delivered(n);
        bump(&self.totals.received, 1);
        bump(&self.totals.received_bytes, n as u64);
        self.touch();
    }

    /// Whether the flow is still live in its session.
    pub fn is_live(&self) -> bool {
        !self.cancel.is_cancelled()
    }

    /// Counts the flow as opened (and later as ended); the relay calls it once the
    /// flow was established.
    pub fn established(&mut self) {
        if !self.counted {
            self.counted = true;
            bump(&self.stats.flows_opened, 1);
        }
    }

    /// Ends the flow, telling the peer `reason` unless it closed the flow itself.
    pub async fn close(mut self, reason: &str) {
        self.finish();
        if self.core.datagrams().forget(self.id) {
            let _ = self
                .core
                .send(Message::Close(Close {
                    id: self.id,
                    reason: reason.to_owned(),
                }))
                .await;
        }
    }

    fn finish(&mut self) {
        if std::mem::take(&mut self.counted) {
            bump(&self.stats.flows_ended, 1);
        }
        self.queue.end();
    }
}

impl Drop for DatagramFlow {
    fn drop(&mut self) {
        self.finish();
        if self.armed && self.core.datagrams().forget(self.id) {
            let close = Message::Close(Close {
                id: self.id,
                reason: "abandoned".into(),
            });
            // Never waits; a full writer queue delays the close to a task.
            if !self.core.try_send(close.clone(), 0) {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let core = self.core.clone();
                    rt.spawn(async move {
                        let _ = core.send(close).await;
                    });
                }
            }
        }
    }
}

impl SessionCore {
    /// Gateway side: asks the agent for a datagram flow to `host:port` and waits for
    /// its answer (the agent resolves and checks the name).
    pub async fn open_datagram(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        timeout: Duration,
        limits: DatagramLimits,
        stats: Arc<UdpStats>,
    ) -> Result<DatagramFlow, OpenError> {
        if self.peer_is_going_away() || self.is_closed() {
            return Err(OpenError::SessionClosed);
        }
        let id = self.alloc_id();
        let (ptx, prx) = oneshot::channel();
        let Some(mut flow) = self.datagrams().insert(self, id, Some(ptx), limits, stats) else {
            return Err(OpenError::SessionClosed);
        };
        let connect = Message::Connect(Connect {
            id,
            host: host.to_owned(),
            port,
            protocol: Protocol::Udp,
        });
        if self.send(connect).await.is_err() {
            self.datagrams().forget(id);
            return Err(OpenError::SessionClosed);
        }
        match tokio::time::timeout(timeout, prx).await {
            Ok(Ok(Ok(()))) => {
                flow.established();
                Ok(flow)
            }
            Ok(Ok(Err(failure))) if is_going_away(&failure.message) => {
                Err(OpenError::SessionClosed)
            }
            Ok(Ok(Err(failure))) => Err(OpenError::Failed(failure)),
            Ok(Err(_)) => Err(OpenError::SessionClosed),
            Err(_) => {
                flow.close("connect timed out at the gateway").await;
                Err(OpenError::Timeout(timeout))
            }
        }
    }

    /// Agent side: registers the flow a `connect` asked for, before answering it, so
    /// that the gateway's first datagram finds it. `None` when the id is in use.
    pub fn register_datagram(
        self: &Arc<Self>,
        id: ConnId,
        limits: DatagramLimits,
        stats: Arc<UdpStats>,
    ) -> Option<DatagramFlow> {
        self.datagrams().insert(self, id, None, limits, stats)
    }
}

/// Why a relayed flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEnd {
    /// The peer closed it, or the session ended.
    Closed,
    /// No datagram either way for the idle timeout.
    Idle,
    /// The local socket failed.
    Failed,
}

impl FlowEnd {
    /// The reason a `close` (and the access line) gives.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowEnd::Closed => "closed",
            FlowEnd::Idle => "idle timeout",
            FlowEnd::Failed => "udp socket failed",
        }
    }
}

/// Relays `flow` with a UDP socket connected to its target until the flow ends or it
/// moves nothing for `idle`. A datagram from the socket is sent without waiting (or
/// dropped and counted); one from the peer is written to the socket.
pub async fn relay_connected(
    socket: &tokio::net::UdpSocket,
    flow: &DatagramFlow,
    idle: Duration,
) -> FlowEnd {
    // One more than the largest datagram, so that an oversize one is seen as such.
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    let quiet = flow.idle(idle);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            r = socket.recv(&mut buf) => match r {
                Ok(n) => {
                    flow.send(Bytes::copy_from_slice(&buf[..n]));
                }
                // An ICMP error for an earlier datagram (nothing listens there): UDP
                // carries on, as it would without a tunnel.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::debug!(conn = %flow.id, error = %e, "udp socket failed");
                    return FlowEnd::Failed;
                }
            },
            d = flow.recv() => match d {
                Some(d) => match socket.send(&d).await {
                    Ok(_) => flow.delivered(d.len()),
                    Err(_) => flow.dropped(DropReason::SendFailed),
                },
                None => return FlowEnd::Closed,
            },
            _ = &mut quiet => return FlowEnd::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(max_datagram: usize, n: usize, bytes: usize) -> (DatagramQueue, Arc<UdpStats>) {
        let stats = Arc::new(UdpStats::default());
        let limits = DatagramLimits {
            max_datagram,
            queue_datagrams: n,
            queue_bytes: bytes,
        };
        (DatagramQueue::new(limits, stats.clone()), stats)
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_keeps_boundaries() {
        let (q, stats) = queue(100, 3, 1000);
        for i in 0..5u8 {
            q.push(Bytes::from(vec![i; 10 + i as usize]));
        }
        assert_eq!(stats.drops(DropReason::QueueFull), 2);
        for i in 0..3u8 {
            assert_eq!(q.pop().await.unwrap(), vec![i; 10 + i as usize]);
        }
        q.end();
        assert_eq!(q.pop().await, None);
    }

    #[tokio::test]
    async fn bytes_bound_and_oversize_are_separate_reasons() {
        let (q, stats) = queue(50, 100, 60);
        q.push(Bytes::from(vec![1; 51]));
        assert_eq!(stats.drops(DropReason::Oversize), 1);
        q.push(Bytes::from(vec![1; 40]));
        q.push(Bytes::from(vec![2; 40]));
        assert_eq!(stats.drops(DropReason::QueueFull), 1);
        assert_eq!(q.pop().await.unwrap().len(), 40);
        // Room again once taken.
        q.push(Bytes::from(vec![3; 40]));
        assert_eq!(q.pop().await.unwrap(), vec![3; 40]);
    }

    #[tokio::test]
    async fn an_empty_datagram_is_a_datagram() {
        let (q, _) = queue(10, 10, 10);
        q.push(Bytes::new());
        assert_eq!(q.pop().await, Some(Bytes::new()));
    }

    #[test]
    fn reasons_have_distinct_names() {
        let names: std::collections::HashSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
