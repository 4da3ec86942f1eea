//! Per-connection flow control (binary mode), and the per-connection receive queue both
//! modes use.
//!
//! * [`Inbox`]: what the peer sent for one connection, waiting for the local socket.
//!   In binary mode it is bounded by the credit we granted (a peer that sends beyond it
//!   is refused, never buffered); in JSON mode, which has no credit, by a [`QueueCap`]
//!   and the connection's progress: the session reader waits for a connection past its
//!   cap only while that connection's local socket is still taking data, and a
//!   connection that stops taking it is closed alone (see [`Inbox::make_room`]).
//! * [`SendCredit`]: how many payload bytes we may still send on one connection.
//! * [`RecvWindow`]: when to grant the peer more credit, and how much. The window
//!   starts at [`anyproxy_proto::INITIAL_WINDOW`] and doubles while the local side
//!   drains it quickly compared with the session's round trip, up to a configured
//!   maximum; a connection whose reader stalls stops granting, so it stops only itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Payloads shorter than this are copied into a shared tail buffer instead of being
/// queued as their own `Bytes`: a flood of tiny messages then costs its bytes, not a
/// queue entry each, and a tiny slice never pins the large WebSocket message it was
/// cut from.
const COPY_BELOW: usize = 8 * 1024;

/// Credit beyond this is pointless and would only invite overflow games.
const MAX_CREDIT: u64 = 1 << 40;

/// Slack added to twice the round trip when deciding whether the window was drained
/// "quickly": it absorbs scheduling jitter when the measured round trip is tiny.
const GROW_SLACK: Duration = Duration::from_millis(2);

/// How a connection's incoming direction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboxEnd {
    /// The peer will send no more data (`fin`, or `close` in JSON mode after which the
    /// queued bytes are still delivered).
    Finished,
    /// The connection was reset (`close` in binary mode, or a local decision).
    Reset,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    #[error("data after the end of the stream")]
    AfterEnd,
    #[error("flow-control violation: {len} bytes sent with {allowance} bytes of credit")]
    Overrun { len: usize, allowance: u64 },
    #[error(
        "{queued} bytes queued toward a local socket that is not reading (the most is {limit})"
    )]
    Overfull { queued: usize, limit: usize },
}

/// JSON mode's bound on one connection's queue, which no credit limits.
///
/// Up to `cap` a payload is queued at once. Past it, the session reader waits for room
/// as long as the local socket keeps taking data (lossless backpressure, like TCP's, for
/// a reader that is slow but moving) and stops waiting once it has taken nothing for
/// [`PROGRESS_WINDOW`]: then the payload is queued anyway, up to twice the cap, so a
/// connection that stopped reading holds the others up for that window at most. A
/// connection still over its cap after `grace` with nothing taken is closed (see
/// [`Inbox::stalled_for`]), and so is one that would pass twice the cap while not
/// moving. Memory per connection stays within twice the cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCap {
    pub cap: usize,
}

impl QueueCap {
    /// The hard ceiling: data that would take a queue that is not moving past it is
    /// refused.
    pub fn limit(self) -> usize {
        self.cap.saturating_mul(2)
    }
}

/// What bounds an inbox: the peer's credit (binary) or a queue cap (JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Binary mode: the credit the peer holds when the connection starts.
    Credit(u64),
    /// JSON mode.
    Queue(QueueCap),
}

/// JSON mode: how long the session reader waits on a connection past its cap whose
/// local socket takes nothing. Long enough for a loaded machine's scheduler to run a
/// slow reader again; short enough that a user who stopped reading costs everyone else
/// on the session at most this, once.
pub const PROGRESS_WINDOW: Duration = Duration::from_secs(1);

/// A payload accepted by [`Inbox::push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// JSON mode: this payload took the queue past its cap.
    OverCap,
}

struct InboxState {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    /// Bytes pushed and not yet written to the local socket (taken ones included until
    /// the relay reports them [`Inbox::delivered`]): what the connection holds.
    queued: usize,
    end: Option<InboxEnd>,
    /// Binary mode: credit the peer still holds, i.e. what it may send before waiting.
    allowance: u64,
    /// JSON mode, while the queue is over its cap: when it last moved (it went over,
    /// or the relay wrote some of it since). `None` within the cap.
    moved_at: Option<tokio::time::Instant>,
}

impl InboxState {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            self.chunks.push_back(tail);
        }
    }
}

pub struct Inbox {
    state: Mutex<InboxState>,
    readable: Notify,
    /// JSON mode: the queue went over its cap (wakes [`Inbox::stalled_for`]).
    over_cap: Notify,
    /// JSON mode: the relay wrote some of the queue (wakes [`Inbox::make_room`]).
    space: Notify,
    cap: Option<QueueCap>,
    /// The connection was closed because it stalled (for its relay's access log).
    stalled: AtomicBool,
}

impl Inbox {
    pub fn new(bound: Bound) -> Self {
        let (allowance, cap) = match bound {
            Bound::Credit(allowance) => (allowance, None),
            Bound::Queue(cap) => (u64::MAX, Some(cap)),
        };
        Inbox {
            state: Mutex::new(InboxState {
                chunks: VecDeque::new(),
                tail: BytesMut::new(),
                queued: 0,
                end: None,
                allowance,
                moved_at: None,
            }),
            readable: Notify::new(),
            over_cap: Notify::new(),
            space: Notify::new(),
            cap,
            stalled: AtomicBool::new(false),
        }
    }

    /// Queues a payload without ever waiting. Binary mode: it must fit the peer's
    /// credit. JSON mode: it must keep the queue within twice the cap (call
    /// [`Self::make_room`] first); the payload that takes the queue past the cap starts
    /// the grace ([`Pushed::OverCap`]).
    pub fn push(&self, data: Bytes) -> Result<Pushed, PushError> {
        let mut pushed = Pushed::Queued;
        {
            let mut st = self.state.lock();
            if st.end.is_some() {
                return Err(PushError::AfterEnd);
            }
            match self.cap {
                None => {
                    let len = data.len() as u64;
                    if len > st.allowance {
                        return Err(PushError::Overrun {
                            len: data.len(),
                            allowance: st.allowance,
                        });
                    }
                    st.allowance -= len;
                }
                Some(cap) => {
                    let queued = st.queued + data.len();
                    if queued > cap.limit() {
                        return Err(PushError::Overfull {
                            queued,
                            limit: cap.limit(),
                        });
                    }
                    if queued > cap.cap && st.queued <= cap.cap {
                        // `make_room` may have started the clock already.
                        st.moved_at.get_or_insert_with(tokio::time::Instant::now);
                        pushed = Pushed::OverCap;
                    }
                }
            }
            if data.is_empty() {
                return Ok(pushed);
            }
            st.queued += data.len();
            if data.len() < COPY_BELOW {
                st.tail.extend_from_slice(&data);
            } else {
                st.seal_tail();
                st.chunks.push_back(data);
            }
        }
        if pushed == Pushed::OverCap {
            self.over_cap.notify_one();
        }
        self.readable.notify_one();
        Ok(pushed)
    }

    /// Bytes queued and not yet written to the local socket.
    pub fn queued(&self) -> usize {
        self.state.lock().queued
    }

    /// The relay wrote `n` taken bytes to the local socket: in JSON mode that is
    /// progress, and a queue back within its cap ends the grace.
    pub fn delivered(&self, n: usize) {
        let Some(cap) = self.cap else {
            let mut st = self.state.lock();
            st.queued = st.queued.saturating_sub(n);
            return;
        };
        {
            let mut st = self.state.lock();
            st.queued = st.queued.saturating_sub(n);
            st.moved_at = (st.queued > cap.cap).then(tokio::time::Instant::now);
        }
        self.space.notify_one();
    }

    /// JSON mode: waits until a payload of `len` bytes fits within the cap (or the
    /// queue is empty), as long as the relay keeps writing the queue to the local
    /// socket; returns without room once it has written nothing for `window`, or the
    /// connection ended. Returns at once in binary mode, where credit bounds the queue.
    pub async fn make_room(&self, len: usize, window: Duration) {
        let Some(cap) = self.cap else { return };
        loop {
            let space = self.space.notified();
            let deadline = {
                let mut st = self.state.lock();
                if st.queued == 0 || st.queued + len <= cap.cap || st.end.is_some() {
                    return;
                }
                let moved = *st.moved_at.get_or_insert_with(tokio::time::Instant::now);
                moved + window
            };
            tokio::select! {
                _ = space => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let st = self.state.lock();
                    if st.moved_at.is_none_or(|m| m + window <= tokio::time::Instant::now()) {
                        return;
                    }
                }
            }
        }
    }

    /// JSON mode: resolves once the queue has been over its cap with nothing written
    /// to the local socket for `grace`. Never in binary mode.
    pub async fn stalled_for(&self, grace: Duration) {
        if self.cap.is_none() {
            return std::future::pending().await;
        }
        loop {
            let notified = self.over_cap.notified();
            let moved = self.state.lock().moved_at;
            match moved {
                None => notified.await,
                Some(moved) => {
                    let deadline = moved + grace;
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    tokio::time::sleep_until(deadline).await;
                }
            }
        }
    }

    /// Marks the connection as closed for stalling; its relay reports that reason.
    pub fn mark_stalled(&self) {
        self.stalled.store(true, Ordering::Relaxed);
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Ends the incoming direction. A reset overrides an earlier finish.
    pub fn end(&self, how: InboxEnd) {
        {
            let mut st = self.state.lock();
            match (st.end, how) {
                (None, _) | (Some(InboxEnd::Finished), InboxEnd::Reset) => st.end = Some(how),
                _ => {}
            }
        }
        self.readable.notify_one();
    }

    /// Adds credit we just granted to the peer.
    pub fn granted(&self, n: u32) {
        let mut st = self.state.lock();
        st.allowance = (st.allowance + n as u64).min(MAX_CREDIT);
    }

    /// Waits for data and moves all of it into `out` (which must be empty); `None`.
    /// Once everything queued was taken and the direction ended, returns how it ended.
    pub async fn take(&self, out: &mut VecDeque<Bytes>) -> Option<InboxEnd> {
        debug_assert!(out.is_empty());
        loop {
            let notified = self.readable.notified();
            {
                let mut st = self.state.lock();
                st.seal_tail();
                if !st.chunks.is_empty() {
                    std::mem::swap(&mut st.chunks, out);
                    return None;
                }
                if let Some(end) = st.end {
                    return Some(end);
                }
            }
            notified.await;
        }
    }
}

/// Payload bytes this side may still send on one connection.
pub struct SendCredit {
    avail: AtomicU64,
    notify: Notify,
    limited: bool,
}

impl SendCredit {
    pub fn new(initial: u64) -> Self {
        SendCredit {
            avail: AtomicU64::new(initial),
            notify: Notify::new(),
            limited: true,
        }
    }

    /// JSON mode has no flow control.
    pub fn unlimited() -> Self {
        SendCredit {
            avail: AtomicU64::new(u64::MAX),
            notify: Notify::new(),
            limited: false,
        }
    }

    /// Waits for credit and takes up to `max` bytes of it.
    pub async fn take(&self, max: usize) -> usize {
        if !self.limited {
            return max;
        }
        loop {
            let notified = self.notify.notified();
            let taken = self
                .avail
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    (cur > 0).then(|| cur - cur.min(max as u64))
                });
            if let Ok(before) = taken {
                return before.min(max as u64) as usize;
            }
            notified.await;
        }
    }

    /// Returns credit taken but not used (a read shorter than the credit taken).
    pub fn give_back(&self, n: usize) {
        self.grant(n as u64);
    }

    /// Credit from the peer's `window_update`.
    pub fn grant(&self, n: u64) {
        if !self.limited {
            return;
        }
        let _ = self
            .avail
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_add(n).min(MAX_CREDIT))
            });
        self.notify.notify_one();
    }

    pub fn available(&self) -> u64 {
        self.avail.load(Ordering::Acquire)
    }
}

/// The receiving side's bookkeeping: bytes written to the local socket since the last
/// grant, and the current window size.
pub struct RecvWindow {
    window: u32,
    max: u32,
    unacked: u64,
    last_grant: Instant,
}

impl RecvWindow {
    pub fn new(initial: u32, max: u32, now: Instant) -> Self {
        RecvWindow {
            window: initial,
            max: max.max(initial),
            unacked: 0,
            last_grant: now,
        }
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// Records `n` bytes delivered to the local socket. Returns the credit to grant when
    /// half the window was consumed: what was consumed, plus the growth when it was
    /// consumed within about two round trips (the window, not the reader, was the limit).
    pub fn consumed(&mut self, n: usize, now: Instant, rtt: Duration) -> Option<u32> {
        self.unacked += n as u64;
        if self.unacked < u64::from(self.window / 2) {
            return None;
        }
        let mut grant = self.unacked;
        let quick = now.duration_since(self.last_grant) < rtt * 2 + GROW_SLACK;
        if quick && self.window < self.max {
            let grown = (self.window.saturating_mul(2)).min(self.max);
            grant += u64::from(grown - self.window);
            self.window = grown;
        }
        self.unacked = 0;
        self.last_grant = now;
        // `unacked` is at most a window plus one read, far below u32::MAX.
        Some(grant.min(u64::from(u32::MAX)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(out: &mut VecDeque<Bytes>) -> Vec<u8> {
        out.drain(..).flat_map(|b| b.to_vec()).collect()
    }

    #[tokio::test]
    async fn inbox_keeps_order_and_coalesces_small_payloads() {
        let inbox = Inbox::new(Bound::Credit(1 << 20));
        let big = Bytes::from(vec![7u8; COPY_BELOW]);
        inbox.push(Bytes::from_static(b"ab")).unwrap();
        inbox.push(Bytes::from_static(b"cd")).unwrap();
        inbox.push(big.clone()).unwrap();
        inbox.push(Bytes::from_static(b"ef")).unwrap();
        assert_eq!(inbox.queued(), 6 + COPY_BELOW);
        let mut out = VecDeque::new();
        assert_eq!(inbox.take(&mut out).await, None);
        // "ab"+"cd" share one chunk; the big payload is its own; "ef" is the tail.
        assert_eq!(out.len(), 3);
        let mut want = b"abcd".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"ef");
        assert_eq!(collect(&mut out), want);
        // Taken is not written: the relay still holds them until it says so.
        assert_eq!(inbox.queued(), 6 + COPY_BELOW);
        inbox.delivered(6 + COPY_BELOW);
        assert_eq!(inbox.queued(), 0);
    }

    #[tokio::test]
    async fn inbox_refuses_data_beyond_the_credit_and_after_the_end() {
        let inbox = Inbox::new(Bound::Credit(10));
        inbox.push(Bytes::from_static(b"0123456789")).unwrap();
        assert_eq!(
            inbox.push(Bytes::from_static(b"x")),
            Err(PushError::Overrun {
                len: 1,
                allowance: 0
            })
        );
        inbox.granted(1);
        inbox.push(Bytes::from_static(b"x")).unwrap();
        inbox.end(InboxEnd::Finished);
        assert_eq!(
            inbox.push(Bytes::from_static(b"y")),
            Err(PushError::AfterEnd)
        );
        // What was queued before the end is still delivered, then the end.
        let mut out = VecDeque::new();
        assert_eq!(inbox.take(&mut out).await, None);
        assert_eq!(collect(&mut out), b"0123456789x");
        assert_eq!(inbox.take(&mut out).await, Some(InboxEnd::Finished));
    }

    #[tokio::test]
    async fn reset_overrides_finish() {
        let inbox = Inbox::new(Bound::Credit(0));
        inbox.end(InboxEnd::Finished);
        inbox.end(InboxEnd::Reset);
        inbox.end(InboxEnd::Finished);
        let mut out = VecDeque::new();
        assert_eq!(inbox.take(&mut out).await, Some(InboxEnd::Reset));
    }

    #[tokio::test]
    async fn take_waits_for_data() {
        let inbox = std::sync::Arc::new(Inbox::new(Bound::Credit(100)));
        let reader = {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let mut out = VecDeque::new();
                inbox.take(&mut out).await;
                collect(&mut out)
            })
        };
        tokio::task::yield_now().await;
        inbox.push(Bytes::from_static(b"late")).unwrap();
        assert_eq!(reader.await.unwrap(), b"late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_json_queue_past_its_cap_gets_the_grace_and_never_twice_the_cap() {
        let inbox = std::sync::Arc::new(Inbox::new(Bound::Queue(QueueCap { cap: 100 })));
        let grace = Duration::from_secs(5);
        let kib = |n| Bytes::from(vec![1u8; n]);
        assert_eq!(inbox.push(kib(100)), Ok(Pushed::Queued));
        // Past the cap: accepted, and the grace starts (once).
        assert_eq!(inbox.push(kib(50)), Ok(Pushed::OverCap));
        assert_eq!(inbox.push(kib(50)), Ok(Pushed::Queued));
        // Never past twice the cap: refused, not buffered.
        assert_eq!(
            inbox.push(kib(1)),
            Err(PushError::Overfull {
                queued: 201,
                limit: 200
            })
        );
        assert_eq!(inbox.queued(), 200);
        // Taken but not written still counts; written back within the cap ends the grace.
        let mut out = VecDeque::new();
        inbox.take(&mut out).await;
        assert_eq!(inbox.queued(), 200);
        inbox.delivered(150);
        let watchdog = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.stalled_for(grace).await })
        };
        tokio::time::sleep(grace * 3).await;
        assert!(!watchdog.is_finished(), "fired for a queue within its cap");
        // Over the cap again and not drained: it fires after the grace.
        assert_eq!(inbox.push(kib(60)), Ok(Pushed::OverCap));
        tokio::time::timeout(grace * 2, watchdog)
            .await
            .expect("fired after the grace")
            .unwrap();
        // Binary inboxes have no cap to outstay.
        let binary = Inbox::new(Bound::Credit(10));
        let never = tokio::time::timeout(grace * 10, binary.stalled_for(grace)).await;
        assert!(never.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_json_queue_that_keeps_moving_is_never_stalled() {
        let inbox = std::sync::Arc::new(Inbox::new(Bound::Queue(QueueCap { cap: 100 })));
        let grace = Duration::from_secs(5);
        inbox.push(Bytes::from(vec![1u8; 150])).unwrap();
        let watchdog = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.stalled_for(grace).await })
        };
        // Over the cap for four graces, but writing a little every second.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            inbox.delivered(1);
            inbox.push(Bytes::from(vec![1u8; 1])).unwrap();
        }
        assert!(inbox.queued() > 100);
        assert!(
            !watchdog.is_finished(),
            "a moving queue was taken for stalled"
        );
        // Then nothing more is written: stalled after the grace.
        tokio::time::timeout(grace * 2, watchdog)
            .await
            .expect("fired once nothing moved for the grace")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn room_is_waited_for_while_the_local_side_moves_and_not_after() {
        let inbox = std::sync::Arc::new(Inbox::new(Bound::Queue(QueueCap { cap: 100 })));
        let window = Duration::from_secs(1);
        // Within the cap: no wait at all.
        inbox.make_room(100, window).await;
        inbox.push(Bytes::from(vec![1u8; 100])).unwrap();
        // Past it, with the relay writing every half window: waits until it fits.
        let writer = {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(window / 2).await;
                    inbox.delivered(10);
                }
            })
        };
        let started = tokio::time::Instant::now();
        inbox.make_room(50, window).await;
        assert!(inbox.queued() + 50 <= 100, "returned without room");
        assert!(started.elapsed() >= window * 2, "did not wait for room");
        writer.await.unwrap();
        // Nothing written any more: gives up after one window ...
        inbox.push(Bytes::from(vec![1u8; 150])).unwrap();
        let started = tokio::time::Instant::now();
        inbox.make_room(50, window).await;
        assert!(started.elapsed() >= window && started.elapsed() < window * 2);
        // ... and then at once, until the queue moves again.
        let started = tokio::time::Instant::now();
        inbox.make_room(50, window).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // An ended connection is never waited for.
        inbox.end(InboxEnd::Reset);
        inbox.delivered(1);
        let started = tokio::time::Instant::now();
        inbox.make_room(50, window).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test]
    async fn credit_is_taken_in_pieces_and_waits_when_exhausted() {
        let credit = std::sync::Arc::new(SendCredit::new(100));
        assert_eq!(credit.take(60).await, 60);
        assert_eq!(credit.take(60).await, 40);
        credit.give_back(15);
        assert_eq!(credit.take(60).await, 15);
        let waiter = {
            let credit = credit.clone();
            tokio::spawn(async move { credit.take(1000).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        credit.grant(500);
        assert_eq!(waiter.await.unwrap(), 500);
        // Unlimited stays unlimited.
        let free = SendCredit::unlimited();
        assert_eq!(free.take(64).await, 64);
        free.grant(1);
        assert_eq!(free.available(), u64::MAX);
    }

    #[test]
    fn credit_cannot_overflow() {
        let credit = SendCredit::new(0);
        credit.grant(u64::MAX - 1);
        credit.grant(u64::MAX - 1);
        assert_eq!(credit.available(), MAX_CREDIT);
    }

    #[test]
    fn window_grants_at_half_and_grows_only_when_drained_quickly() {
        let t0 = Instant::now();
        let rtt = Duration::from_millis(1);
        let mut w = RecvWindow::new(1000, 8000, t0);
        assert_eq!(w.consumed(400, t0, rtt), None);
        // Half consumed within 2 RTT + slack: grant what was consumed plus the growth.
        assert_eq!(
            w.consumed(100, t0 + Duration::from_millis(1), rtt),
            Some(1500)
        );
        assert_eq!(w.window(), 2000);
        // A slow reader: half a window took a long time; no growth.
        let slow = t0 + Duration::from_secs(1);
        assert_eq!(w.consumed(1000, slow, rtt), Some(1000));
        assert_eq!(w.window(), 2000);
        // Growth stops at the maximum.
        let mut now = slow;
        for _ in 0..10 {
            now += Duration::from_micros(100);
            w.consumed(w.window() as usize, now, rtt);
        }
        assert_eq!(w.window(), 8000);
    }

    #[test]
    fn a_long_round_trip_still_lets_the_window_grow() {
        // On a 100 ms link a window-limited stream drains half a window every ~50 ms.
        let t0 = Instant::now();
        let rtt = Duration::from_millis(100);
        let mut w = RecvWindow::new(1000, 1 << 20, t0);
        let g = w.consumed(500, t0 + Duration::from_millis(50), rtt);
        assert_eq!(g, Some(1500));
    }
}
