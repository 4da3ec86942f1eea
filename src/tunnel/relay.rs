//! Moves bytes between a local socket (the proxy user's, or the target's on the agent)
//! and one tunnelled connection, with `Bytes` from the socket read to the WebSocket
//! writer and back.
//!
//! Binary mode: the upstream half sends only what the peer's credit allows and ends
//! with `fin` at the local end of stream; the downstream half grants credit as it
//! writes, and shuts the local write side down at the peer's `fin`. The connection ends
//! when both directions are done, or at once on a reset. JSON mode has neither, so
//! either side ending ends both.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyproxy_proto::{Data, Fin, Message, WindowUpdate, INITIAL_WINDOW, MAX_DATA_PAYLOAD};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::flow::{InboxEnd, RecvWindow};
use super::session::TunnelConn;
use crate::net::Revoke;
use crate::tunnel::stats::bump;

/// Largest single socket read, and so the largest data message we produce.
pub const READ_SIZE: usize = 64 * 1024;
const _: () = assert!(READ_SIZE <= MAX_DATA_PAYLOAD);

/// The first reads of a connection. Most connections are idle or carry requests and
/// small answers, and a buffer that waits on an idle socket is memory held per
/// connection; a read that fills it moves the connection up to [`READ_SIZE`].
const FIRST_READ: usize = 4 * 1024;

/// How a relay ended, for the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Bytes read from the local socket and sent into the tunnel.
    pub sent: u64,
    /// Bytes received from the tunnel and written to the local socket.
    pub received: u64,
    /// The relay ended the connection itself, and why; `None` when its ends did.
    pub ended_by: Option<RelayEnd>,
}

/// Why the relay itself ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// No byte either way for `conn_idle_timeout`.
    IdleTimeout,
    /// The download quota was spent.
    QuotaExceeded,
    /// JSON mode: the local side stopped reading and its queue outgrew the cap.
    Stalled,
    /// A reload took away what the connection was admitted for; the reason says what.
    Revoked(&'static str),
}

impl RelayEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::IdleTimeout => "idle timeout",
            RelayEnd::QuotaExceeded => "download quota exceeded",
            RelayEnd::Stalled => "stalled: the local side stopped reading",
            RelayEnd::Revoked(reason) => reason,
        }
    }
}

/// When the connection last moved a byte, in ms since the relay started: one relaxed
/// store per read or write, and a watchdog that sleeps until the deadline instead of
/// a timer reset on every read.
/// Without a timeout it does nothing: no clock read on the data path.
struct Activity {
    // tokio's clock, so that a test with paused time can run the watchdog.
    started: tokio::time::Instant,
    last_ms: AtomicU64,
    idle: Option<Duration>,
}

impl Activity {
    fn new(idle: Option<Duration>) -> Self {
        Activity {
            started: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            idle,
        }
    }

    fn touch(&self) {
        if self.idle.is_some() {
            let ms = self.started.elapsed().as_millis() as u64;
            self.last_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Resolves once nothing has moved for the timeout; never without one.
    async fn idle_out(&self) {
        let Some(idle) = self.idle else {
            return std::future::pending().await;
        };
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.started + last + idle;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Counts the bytes a relay delivers to its local socket, and may cut the connection
/// (a download quota). Called once per write, so enforcement is exact to one read.
pub trait Quota: Send + Sync {
    /// Admits `n` bytes, or says how many of them still fit and why the rest do not.
    fn admit(&self, n: usize) -> Result<(), QuotaCut>;
}

/// A quota's refusal: deliver `allowed` bytes of this write, then end the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaCut {
    pub allowed: usize,
    pub reason: String,
}

/// Paces the bytes a relay moves (bandwidth caps), in both directions: told of each
/// read before its bytes are sent on, and of each write before it happens.
pub trait Pace: Send + Sync {
    /// Accounts for `n` bytes; the relay waits the returned time before moving them.
    fn reserve(&self, n: usize) -> Duration;

    /// Asked again after each wait: how much longer this connection's reserved bytes
    /// must wait. A budget refilled from elsewhere (leases from a cluster store) can
    /// only estimate the wait up front; one refilled by the clock knows it exactly and
    /// keeps the default.
    fn pending(&self) -> Duration {
        Duration::ZERO
    }
}

/// Waits what `pace` asks for `n` bytes; nothing at all without a pace.
async fn paced(pace: Option<&dyn Pace>, n: usize) {
    if let Some(p) = pace {
        let mut wait = p.reserve(n);
        while !wait.is_zero() {
            tokio::time::sleep(wait).await;
            wait = p.pending();
        }
    }
}

/// Why a connection ended before both directions finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Abort {
    LocalClosed,
    LocalReadFailed,
    LocalWriteFailed,
    SessionClosed,
    ClosedByPeer,
    ResetByPeer,
    Cancelled,
    QuotaExceeded,
    IdleTimeout,
    Stalled,
    Revoked(&'static str),
}

impl Abort {
    fn as_str(self) -> &'static str {
        match self {
            Abort::LocalClosed => "local side closed",
            Abort::LocalReadFailed => "local read failed",
            Abort::LocalWriteFailed => "local write failed",
            Abort::SessionClosed => "session closed",
            Abort::ClosedByPeer => "closed by peer",
            Abort::ResetByPeer => "reset by peer",
            Abort::Cancelled => "cancelled",
            Abort::QuotaExceeded => RelayEnd::QuotaExceeded.as_str(),
            Abort::IdleTimeout => RelayEnd::IdleTimeout.as_str(),
            Abort::Stalled => RelayEnd::Stalled.as_str(),
            Abort::Revoked(reason) => reason,
        }
    }

    /// What the access log says about an end the relay chose.
    fn relay_end(self) -> Option<RelayEnd> {
        match self {
            Abort::QuotaExceeded => Some(RelayEnd::QuotaExceeded),
            Abort::IdleTimeout => Some(RelayEnd::IdleTimeout),
            Abort::Stalled => Some(RelayEnd::Stalled),
            Abort::Revoked(reason) => Some(RelayEnd::Revoked(reason)),
            _ => None,
        }
    }

    /// The tunnel, not the local socket, failed (or dropped data it could not queue):
    /// the local peer must learn of it.
    fn tunnel_failed(self) -> bool {
        matches!(
            self,
            Abort::SessionClosed
                | Abort::ResetByPeer
                | Abort::Cancelled
                | Abort::Stalled
                | Abort::Revoked(_)
        )
    }
}

/// One direction finished cleanly, or the whole connection must end now.
type Step = Result<(), Abort>;

/// A local socket the relay can carry.
pub trait LocalStream: AsyncRead + AsyncWrite + Send + Unpin {
    /// Makes the coming close abortive (a TCP RST), so that the far end of a connection
    /// the tunnel lost sees an error instead of a clean, truncated end of stream.
    fn abort_on_close(&self) {}
}

impl LocalStream for tokio::net::TcpStream {
    fn abort_on_close(&self) {
        // Zero linger sends RST on drop without blocking the thread.
        let _ = self.set_zero_linger();
    }
}

/// In-memory pipes (the HTTP proxy's client side, tests): the reader sees the end of
/// stream, which its owner interprets.
impl LocalStream for tokio::io::DuplexStream {}

/// CONNECT tunnels after hyper's upgrade, when the socket could not be taken back from
/// hyper (the HTTP front end normally takes it, see `proxy/http.rs` `Rewound`): the
/// user then sees a close; the access log carries the reason.
impl LocalStream for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {}

/// Relays until both directions are done (binary mode) or either ends (JSON mode), or
/// the connection is reset. The peer is told with `close` unless the connection ended
/// cleanly or the peer was the one that closed it. The bytes toward the local socket
/// are counted by `quota`, and the bytes both ways paced by `pace`; `revoke` ends it
/// at once (both sides told) when a reload takes its access away.
pub async fn relay_tunnel<S: LocalStream>(
    stream: S,
    conn: TunnelConn,
    quota: Option<&dyn Quota>,
    pace: Option<&dyn Pace>,
    revoke: Option<&Revoke>,
) -> RelayStats {
    let TunnelConn {
        id,
        core,
        inbox,
        credit,
        unsent,
        cancel,
        mut guard,
    } = conn;
    // From here on the relay releases the id itself, with the right reason.
    guard.armed = false;
    let half_close = core.flow_controlled();
    let started = Instant::now();
    let counters = core.stats().clone();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut sent = 0u64;
    let mut received = 0u64;
    let activity = Activity::new(core.conn_idle_timeout());
    let grace = core.stall_grace();

    let upstream = async {
        let mut buf = BytesMut::new();
        let mut read_size = FIRST_READ;
        loop {
            if half_close && credit.available() == 0 {
                bump(&counters.credit_stalls, 1);
            }
            let allowed = credit.take(read_size).await;
            if buf.capacity() - buf.len() < allowed.min(read_size / 4) {
                buf.reserve(read_size);
            }
            let offered = allowed.min(buf.capacity() - buf.len());
            let n = match (&mut rd).take(offered as u64).read_buf(&mut buf).await {
                Ok(n) => n,
                Err(_) => return Err(Abort::LocalReadFailed),
            };
            credit.give_back(allowed - n);
            // A whole first-size read, not just the tail of a part-used buffer: light
            // request/response traffic keeps the small reads.
            if n >= FIRST_READ && read_size < READ_SIZE {
                read_size = READ_SIZE;
            }
            if n == 0 {
                if !half_close {
                    return Err(Abort::LocalClosed);
                }
                return match core.send_ordered(Message::Fin(Fin { id }), &unsent).await {
                    Ok(()) => Ok(()),
                    Err(_) => Err(Abort::SessionClosed),
                };
            }
            activity.touch();
            paced(pace, n).await;
            sent += n as u64;
            bump(&counters.bytes_in, n as u64);
            let payload = buf.split_to(n).freeze();
            if core
                .send_ordered(Message::Data(Data { id, payload }), &unsent)
                .await
                .is_err()
            {
                return Err(Abort::SessionClosed);
            }
        }
    };

    let downstream = async {
        let mut chunks: VecDeque<Bytes> = VecDeque::new();
        let mut window = RecvWindow::new(INITIAL_WINDOW, core.max_window(), Instant::now());
        let metered = core.flow_controlled();
        loop {
            match inbox.take(&mut chunks).await {
                None => {}
                Some(InboxEnd::Finished) => {
                    let _ = wr.shutdown().await;
                    return if half_close {
                        Ok(())
                    } else {
                        Err(Abort::ClosedByPeer)
                    };
                }
                // No FIN first: after a FIN the user's reads end cleanly and the reset
                // that follows would go unseen.
                Some(InboxEnd::Reset) => {
                    return Err(Abort::ResetByPeer);
                }
            }
            activity.touch();
            let mut written = 0usize;
            let taken: usize = chunks.iter().map(Bytes::len).sum();
            for chunk in chunks.drain(..) {
                paced(pace, chunk.len()).await;
                let cut = quota.and_then(|m| m.admit(chunk.len()).err());
                let allowed = cut
                    .as_ref()
                    .map_or(chunk.len(), |c| c.allowed.min(chunk.len()));
                if wr.write_all(&chunk[..allowed]).await.is_err() {
                    return Err(Abort::LocalWriteFailed);
                }
                written += allowed;
                bump(&counters.bytes_out, allowed as u64);
                // JSON mode: each chunk written is progress that the session reader
                // and the stall watch below may be waiting for.
                if !metered {
                    inbox.delivered(allowed);
                }
                if let Some(cut) = cut {
                    received += written as u64;
                    // A plain close, not a reset: a reset could discard the bytes
                    // just counted against the quota before the user reads them.
                    let _ = wr.shutdown().await;
                    tracing::info!(conn = %id, reason = %cut.reason, "cutting a connection at its quota");
                    return Err(Abort::QuotaExceeded);
                }
            }
            received += written as u64;
            if metered {
                inbox.delivered(taken);
            }
            if half_close {
                let rtt = core.rtt().unwrap_or(Duration::ZERO);
                if let Some(increment) = window.consumed(written, Instant::now(), rtt) {
                    inbox.granted(increment);
                    let update = Message::WindowUpdate(WindowUpdate { id, increment });
                    if core.send(update).await.is_err() {
                        return Err(Abort::SessionClosed);
                    }
                }
            }
        }
    };

    let outcome = {
        tokio::pin!(upstream);
        tokio::pin!(downstream);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let step: Step = tokio::select! {
                r = &mut upstream, if !up_done => { up_done = true; r }
                r = &mut downstream, if !down_done => { down_done = true; r }
                // The session reader closes a stalled connection that reached twice
                // its cap; the grace below is this relay's to watch.
                _ = cancel.cancelled() => Err(if inbox.is_stalled() {
                    Abort::Stalled
                } else {
                    Abort::Cancelled
                }),
                _ = activity.idle_out() => Err(Abort::IdleTimeout),
                _ = inbox.stalled_for(grace) => {
                    let why = format!(
                        "over {} bytes queued and none written for {grace:?}",
                        core.json_cap()
                    );
                    core.close_stalled(id, &why).await;
                    Err(Abort::Stalled)
                }
                reason = Revoke::wait(revoke) => Err(Abort::Revoked(reason)),
            };
            match step {
                Err(reason) => break Err(reason),
                Ok(()) if up_done && down_done => break Ok(()),
                Ok(()) => {}
            }
        }
    };
    let stats = RelayStats {
        sent,
        received,
        ended_by: outcome.err().and_then(Abort::relay_end),
    };
    if stats.ended_by == Some(RelayEnd::IdleTimeout) {
        bump(&counters.idle_timeouts, 1);
    }
    counters.conn_duration.observe(started.elapsed());
    if let Err(reason) = outcome {
        // The tunnel side failed (peer reset, session lost, cancelled): the local peer
        // must not mistake the end for a complete stream.
        if reason.tunnel_failed() {
            rd.unsplit(wr).abort_on_close();
        }
    }
    let removed = core.forget(id);
    // Nothing reads the queue any more: a session reader waiting for room in it
    // (JSON mode) must not wait for this connection.
    inbox.end(InboxEnd::Reset);
    match outcome {
        // Both sides sent `fin`: the peer forgets the connection by itself.
        Ok(()) => {
            tracing::debug!(conn = %id, sent = stats.sent, received = stats.received, "relay finished")
        }
        Err(reason) => {
            if removed {
                // After this connection's last data: in JSON mode this is its end of
                // stream.
                let _ = core.send_close(id, reason.as_str().into(), &unsent).await;
            }
            tracing::debug!(conn = %id, reason = reason.as_str(), sent = stats.sent, received = stats.received, "relay ended");
        }
    }
    stats
}

/// Bounds on a directly relayed connection (the standalone pmproxy's `readTimeout`
/// and `writeTimeout`): a connection on which nothing moves either way for `idle` is
/// closed, and so is one whose single write waits longer than `write` (a reader that
/// stalled). `None`: unbounded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectTimeouts {
    pub idle: Option<Duration>,
    pub write: Option<Duration>,
}

/// Writes all of `buf` within `limit` (when set); a write that times out is an error.
async fn write_within<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    limit: Option<Duration>,
) -> std::io::Result<()> {
    match limit {
        None => w.write_all(buf).await,
        Some(limit) => tokio::time::timeout(limit, w.write_all(buf))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Relays between the user's socket and a directly dialed target, carrying half-close;
/// `quota` counts (and may cut) what goes toward the user, `timeouts` bound stalls,
/// and `revoke` ends it at once (both sockets reset) when a reload takes its access away.
pub async fn relay_direct<S: LocalStream>(
    local: S,
    remote: TcpStream,
    quota: Option<&dyn Quota>,
    pace: Option<&dyn Pace>,
    timeouts: DirectTimeouts,
    revoke: Option<&Revoke>,
) -> RelayStats {
    let activity = Activity::new(timeouts.idle);
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut rr, mut rw) = remote.into_split();
    let mut stats = RelayStats::default();
    let up = async {
        let mut buf = vec![0u8; READ_SIZE];
        let mut total = 0u64;
        loop {
            let n = lr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            activity.touch();
            paced(pace, n).await;
            write_within(&mut rw, &buf[..n], timeouts.write).await?;
            total += n as u64;
        }
        let _ = rw.shutdown().await;
        Ok::<u64, std::io::Error>(total)
    };
    let down = async {
        let mut buf = vec![0u8; READ_SIZE];
        let mut total = 0u64;
        loop {
            let n = match rr.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                // The target reset: the user must see a reset too, not a clean end.
                Err(_) => return Err(DownEnd::TargetFailed(total)),
            };
            activity.touch();
            let cut = quota.and_then(|m| m.admit(n).err());
            let allowed = cut.as_ref().map_or(n, |c| c.allowed.min(n));
            paced(pace, allowed).await;
            if write_within(&mut lw, &buf[..allowed], timeouts.write)
                .await
                .is_err()
            {
                return Err(DownEnd::UserFailed(total));
            }
            total += allowed as u64;
            if let Some(cut) = cut {
                tracing::info!(reason = %cut.reason, "cutting a connection at its quota");
                let _ = lw.shutdown().await;
                return Err(DownEnd::Cut(total));
            }
        }
        let _ = lw.shutdown().await;
        Ok(total)
    };
    // Either side failing ends both directions; either side's end of stream only ends
    // its own direction (half-close), as in the tunnel relay.
    let mut abort = false;
    {
        tokio::pin!(up);
        tokio::pin!(down);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            tokio::select! {
                _ = activity.idle_out() => {
                    stats.ended_by = Some(RelayEnd::IdleTimeout);
                    break;
                }
                reason = Revoke::wait(revoke) => {
                    stats.ended_by = Some(RelayEnd::Revoked(reason));
                    abort = true;
                    break;
                }
                r = &mut up, if !up_done => {
                    up_done = true;
                    match r {
                        Ok(n) => stats.sent = n,
                        Err(_) => break,
                    }
                }
                r = &mut down, if !down_done => {
                    down_done = true;
                    match r {
                        Ok(n) => stats.received = n,
                        Err(DownEnd::Cut(n)) => {
                            stats.received = n;
                            stats.ended_by = Some(RelayEnd::QuotaExceeded);
                            break;
                        }
                        Err(DownEnd::UserFailed(n)) => {
                            stats.received = n;
                            break;
                        }
                        Err(DownEnd::TargetFailed(n)) => {
                            stats.received = n;
                            abort = true;
                            break;
                        }
                    }
                }
            }
        }
    }
    if abort {
        lr.unsplit(lw).abort_on_close();
    }
    stats
}

/// How the target → user direction ended, when not by the target's end of stream.
enum DownEnd {
    TargetFailed(u64),
    UserFailed(u64),
    Cut(u64),
}
