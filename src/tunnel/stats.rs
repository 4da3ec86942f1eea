//! Counters the tunnel updates while it works: plain relaxed atomics, one set per
//! session. Nothing here knows about Prometheus; the collectors in this module read
//! them at scrape time, so the cost on the data path is one uncontended `fetch_add`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyproxy_proto::{ErrorCode, MessageKind};

const KINDS: usize = MessageKind::ALL.len();
const CODES: usize = ErrorCode::ALL.len();

/// Bucket bounds (seconds) for time to connect and heartbeat round trips.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds (seconds) for how long tunnelled connections live.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0,
];

/// A fixed-bucket histogram of relaxed atomics: one observation is two `fetch_add`s
/// and a short scan, no lock.
pub struct AtomicHistogram {
    bounds: &'static [f64],
    /// Non-cumulative counts; the last slot is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// A histogram's values at one moment; snapshots of one shape add up.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl AtomicHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    pub fn empty(bounds: &'static [f64]) -> Self {
        HistogramSnapshot {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_us: 0,
        }
    }

    pub fn add(&mut self, other: &HistogramSnapshot) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }

    /// `(upper bound, cumulative count)` pairs ending with `+Inf`, as Prometheus wants.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        self.bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(bound, n)| {
                total += n;
                (bound, total)
            })
            .collect()
    }
}

/// Everything one session counts.
pub struct SessionStats {
    pub started: Instant,
    msgs_rx: [AtomicU64; KINDS],
    msgs_tx: [AtomicU64; KINDS],
    errors_rx: [AtomicU64; CODES],
    /// Bytes read from local sockets (proxy users on the gateway, targets on the agent).
    pub bytes_in: AtomicU64,
    /// Bytes written to local sockets.
    pub bytes_out: AtomicU64,
    /// Tunnelled connections established (the agent reached the target).
    pub conns_opened: AtomicU64,
    /// A relay had data to send but no send credit (binary mode).
    pub credit_stalls: AtomicU64,
    /// A JSON-mode connection's queue went over its cap (the grace started).
    pub json_stalls: AtomicU64,
    /// JSON-mode connections closed because their local side stopped reading.
    pub json_stall_closes: AtomicU64,
    /// Connections closed after `conn_idle_timeout` without a byte either way.
    pub idle_timeouts: AtomicU64,
    pub connect_time: AtomicHistogram,
    pub conn_duration: AtomicHistogram,
    pub rtt: AtomicHistogram,
}

impl Default for SessionStats {
    fn default() -> Self {
        SessionStats {
            started: Instant::now(),
            msgs_rx: Default::default(),
            msgs_tx: Default::default(),
            errors_rx: Default::default(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            conns_opened: AtomicU64::new(0),
            credit_stalls: AtomicU64::new(0),
            json_stalls: AtomicU64::new(0),
            json_stall_closes: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            connect_time: AtomicHistogram::new(LATENCY_BUCKETS),
            conn_duration: AtomicHistogram::new(DURATION_BUCKETS),
            rtt: AtomicHistogram::new(LATENCY_BUCKETS),
        }
    }
}

/// Adds `n` to a counter; relaxed, because nothing is ordered by it.
#[inline]
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl SessionStats {
    #[inline]
    pub fn received(&self, kind: MessageKind) {
        bump(&self.msgs_rx[kind as usize], 1);
    }

    #[inline]
    pub fn sent(&self, kind: MessageKind) {
        bump(&self.msgs_tx[kind as usize], 1);
    }

    #[inline]
    pub fn error_received(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            bump(&self.errors_rx[i], 1);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            msgs_rx: self.msgs_rx.each_ref().map(load),
            msgs_tx: self.msgs_tx.each_ref().map(load),
            errors_rx: self.errors_rx.each_ref().map(load),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            conns_opened: load(&self.conns_opened),
            credit_stalls: load(&self.credit_stalls),
            json_stalls: load(&self.json_stalls),
            json_stall_closes: load(&self.json_stall_closes),
            idle_timeouts: load(&self.idle_timeouts),
            connect_time: self.connect_time.snapshot(),
            conn_duration: self.conn_duration.snapshot(),
            rtt: self.rtt.snapshot(),
        }
    }
}

/// A session's counters at one moment; the counters of ended sessions are kept as
/// one of these so that exported totals never go backwards.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsSnapshot {
    pub msgs_rx: [u64; KINDS],
    pub msgs_tx: [u64; KINDS],
    pub errors_rx: [u64; CODES],
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub conns_opened: u64,
    pub credit_stalls: u64,
    pub json_stalls: u64,
    pub json_stall_closes: u64,
    pub idle_timeouts: u64,
    pub connect_time: HistogramSnapshot,
    pub conn_duration: HistogramSnapshot,
    pub rtt: HistogramSnapshot,
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        StatsSnapshot {
            msgs_rx: [0; KINDS],
            msgs_tx: [0; KINDS],
            errors_rx: [0; CODES],
            bytes_in: 0,
            bytes_out: 0,
            conns_opened: 0,
            credit_stalls: 0,
            json_stalls: 0,
            json_stall_closes: 0,
            idle_timeouts: 0,
            connect_time: HistogramSnapshot::empty(LATENCY_BUCKETS),
            conn_duration: HistogramSnapshot::empty(DURATION_BUCKETS),
            rtt: HistogramSnapshot::empty(LATENCY_BUCKETS),
        }
    }
}

impl StatsSnapshot {
    pub fn add(&mut self, o: &StatsSnapshot) {
        let sum = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        sum(&mut self.msgs_rx, &o.msgs_rx);
        sum(&mut self.msgs_tx, &o.msgs_tx);
        sum(&mut self.errors_rx, &o.errors_rx);
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.conns_opened += o.conns_opened;
        self.credit_stalls += o.credit_stalls;
        self.json_stalls += o.json_stalls;
        self.json_stall_closes += o.json_stall_closes;
        self.idle_timeouts += o.idle_timeouts;
        self.connect_time.add(&o.connect_time);
        self.conn_duration.add(&o.conn_duration);
        self.rtt.add(&o.rtt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let h = AtomicHistogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count(), 3);
        let c = s.cumulative();
        assert_eq!(c[0], (0.001, 1));
        assert_eq!(c[1], (0.01, 2));
        assert!(c[2].0.is_infinite());
        assert_eq!(c[2].1, 3);
        assert!((s.sum_secs() - 1.0055).abs() < 1e-9);
    }

    #[test]
    fn snapshots_add_up() {
        let a = SessionStats::default();
        a.received(MessageKind::Data);
        bump(&a.bytes_out, 10);
        a.error_received(ErrorCode::RateLimited);
        let mut total = StatsSnapshot::default();
        total.add(&a.snapshot());
        total.add(&a.snapshot());
        assert_eq!(total.msgs_rx[MessageKind::Data as usize], 2);
        assert_eq!(total.bytes_out, 20);
        assert_eq!(total.errors_rx[4], 2);
    }
}
