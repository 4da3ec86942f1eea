//! Per-connection flow control (binary mode), and the per-connection receive queue both
//! modes use.
//!
//! * [`Inbox`]: what the peer sent for one connection, waiting for the local socket.
//!   In binary mode it is bounded by the credit we granted (a peer that sends beyond it
//!   is refused, never buffered); in JSON mode, which has no credit, the session reader
//!   waits for room instead.
//! * [`SendCredit`]: how many payload bytes we may still send on one connection.
//! * [`RecvWindow`]: when to grant the peer more credit, and how much. The window
//!   starts at [`anyproxy_proto::INITIAL_WINDOW`] and doubles while the local side
//!   drains it quickly compared with the session's round trip, up to a configured
//!   maximum; a connection whose reader stalls stops granting, so it stops only itself.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
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
}

struct InboxState {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    queued: usize,
    end: Option<InboxEnd>,
    /// Binary mode: credit the peer still holds, i.e. what it may send before waiting.
    allowance: u64,
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
    space: Notify,
}

impl Inbox {
    pub fn new(allowance: u64) -> Self {
        Inbox {
            state: Mutex::new(InboxState {
                chunks: VecDeque::new(),
                tail: BytesMut::new(),
                queued: 0,
                end: None,
                allowance,
            }),
            readable: Notify::new(),
            space: Notify::new(),
        }
    }

    /// Queues a payload. With `metered` (binary mode) it must fit the peer's credit.
    pub fn push(&self, data: Bytes, metered: bool) -> Result<(), PushError> {
        {
            let mut st = self.state.lock();
            if st.end.is_some() {
                return Err(PushError::AfterEnd);
            }
            if metered {
                let len = data.len() as u64;
                if len > st.allowance {
                    return Err(PushError::Overrun {
                        len: data.len(),
                        allowance: st.allowance,
                    });
                }
                st.allowance -= len;
            }
            if data.is_empty() {
                return Ok(());
            }
            st.queued += data.len();
            if data.len() < COPY_BELOW {
                st.tail.extend_from_slice(&data);
            } else {
                st.seal_tail();
                st.chunks.push_back(data);
            }
        }
        self.readable.notify_one();
        Ok(())
    }

    /// Bytes queued and not yet taken by the relay.
    pub fn queued(&self) -> usize {
        self.state.lock().queued
    }

    /// JSON mode: waits until fewer than `limit` bytes are queued.
    pub async fn wait_for_room(&self, limit: usize) {
        loop {
            let notified = self.space.notified();
            if self.queued() < limit {
                return;
            }
            notified.await;
        }
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
                    st.queued = 0;
                    drop(st);
                    self.space.notify_one();
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
        let inbox = Inbox::new(1 << 20);
        let big = Bytes::from(vec![7u8; COPY_BELOW]);
        inbox.push(Bytes::from_static(b"ab"), true).unwrap();
        inbox.push(Bytes::from_static(b"cd"), true).unwrap();
        inbox.push(big.clone(), true).unwrap();
        inbox.push(Bytes::from_static(b"ef"), true).unwrap();
        assert_eq!(inbox.queued(), 6 + COPY_BELOW);
        let mut out = VecDeque::new();
        assert_eq!(inbox.take(&mut out).await, None);
        // "ab"+"cd" share one chunk; the big payload is its own; "ef" is the tail.
        assert_eq!(out.len(), 3);
        let mut want = b"abcd".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"ef");
        assert_eq!(collect(&mut out), want);
        assert_eq!(inbox.queued(), 0);
    }

    #[tokio::test]
    async fn inbox_refuses_data_beyond_the_credit_and_after_the_end() {
        let inbox = Inbox::new(10);
        inbox.push(Bytes::from_static(b"0123456789"), true).unwrap();
        assert_eq!(
            inbox.push(Bytes::from_static(b"x"), true),
            Err(PushError::Overrun {
                len: 1,
                allowance: 0
            })
        );
        inbox.granted(1);
        inbox.push(Bytes::from_static(b"x"), true).unwrap();
        inbox.end(InboxEnd::Finished);
        assert_eq!(
            inbox.push(Bytes::from_static(b"y"), false),
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
        let inbox = Inbox::new(0);
        inbox.end(InboxEnd::Finished);
        inbox.end(InboxEnd::Reset);
        inbox.end(InboxEnd::Finished);
        let mut out = VecDeque::new();
        assert_eq!(inbox.take(&mut out).await, Some(InboxEnd::Reset));
    }

    #[tokio::test]
    async fn take_waits_for_data() {
        let inbox = std::sync::Arc::new(Inbox::new(100));
        let reader = {
            let inbox = inbox.clone();
            tokio::spawn(async move {
                let mut out = VecDeque::new();
                inbox.take(&mut out).await;
                collect(&mut out)
            })
        };
        tokio::task::yield_now().await;
        inbox.push(Bytes::from_static(b"late"), true).unwrap();
        assert_eq!(reader.await.unwrap(), b"late");
    }

    #[tokio::test]
    async fn room_is_signalled_when_the_relay_takes() {
        let inbox = std::sync::Arc::new(Inbox::new(0));
        inbox.push(Bytes::from(vec![1u8; 100]), false).unwrap();
        let waiter = {
            let inbox = inbox.clone();
            tokio::spawn(async move { inbox.wait_for_room(50).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let mut out = VecDeque::new();
        inbox.take(&mut out).await;
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
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
