//! The session's heartbeat: a `ping` on a timer, and the round trip its `pong` measures
//! (smoothed), which the flow-control window and liveness checks read.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyproxy_proto::{Heartbeat, Message};

use super::SessionCore;

impl SessionCore {
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

    pub(super) fn pong_received(&self, timestamp: Option<i64>) {
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
}
