//! Brute-force protection for any password check (agents, proxy users, the policy
//! API's logins): after too many failures from one source IP within a window, that IP
//! is refused for a cool-down without its password being checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries kept at most; beyond it, expired entries are pruned, then the oldest.
const MAX_TRACKED: usize = 65_536;

struct Record {
    failures: u32,
    window_start: Instant,
    locked_until: Option<Instant>,
}

/// When an address is locked out, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub max_failures: u32,
    pub window: Duration,
    pub lockout: Duration,
}

/// The parameters sit beside the records, under the one lock every check takes
/// anyway, so that a reload changes them without adding a lock.
struct Records {
    params: Params,
    by_ip: HashMap<IpAddr, Record>,
}

pub struct AuthThrottle {
    records: Mutex<Records>,
}

impl AuthThrottle {
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> Self {
        AuthThrottle {
            records: Mutex::new(Records {
                params: Params {
                    max_failures: max_failures.max(1),
                    window,
                    lockout,
                },
                by_ip: HashMap::new(),
            }),
        }
    }

    /// Takes new parameters (a reload), keeping the failures counted so far: an
    /// address at or above a lowered `max_failures` is locked by its next failure,
    /// and a lockout under way ends no later than `lockout` from now.
    pub fn retune(&self, params: Params) {
        let params = Params {
            max_failures: params.max_failures.max(1),
            ..params
        };
        let now = Instant::now();
        let mut records = self.records.lock();
        records.params = params;
        let latest = now + params.lockout;
        for r in records.by_ip.values_mut() {
            if let Some(until) = &mut r.locked_until {
                *until = (*until).min(latest);
            }
        }
    }

    /// Whether `ip` is locked out now.
    pub fn is_locked(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let now = Instant::now();
        self.records
            .lock()
            .by_ip
            .get(&ip)
            .and_then(|r| r.locked_until)
            .is_some_and(|until| until > now)
    }

    /// Records a failure; returns true when this failure locked the IP out.
    pub fn failure(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen through a dual-stack socket must not get a second count.
        let ip = ip.to_canonical();
        let now = Instant::now();
        let mut guard = self.records.lock();
        let Records { params, by_ip } = &mut *guard;
        let records = by_ip;
        if records.len() >= MAX_TRACKED && !records.contains_key(&ip) {
            let (window, lockout) = (params.window, params.lockout);
            records.retain(|_, r| {
                now.duration_since(r.window_start) < window.max(lockout)
                    || r.locked_until.is_some_and(|u| u > now)
            });
            if records.len() >= MAX_TRACKED {
                if let Some(oldest) = records
                    .iter()
                    .min_by_key(|(_, r)| r.window_start)
                    .map(|(ip, _)| *ip)
                {
                    records.remove(&oldest);
                }
            }
        }
        let r = records.entry(ip).or_insert(Record {
            failures: 0,
            window_start: now,
            locked_until: None,
        });
        if now.duration_since(r.window_start) > params.window {
            r.failures = 0;
            r.window_start = now;
        }
        r.failures += 1;
        if r.failures >= params.max_failures {
            r.locked_until = Some(now + params.lockout);
            r.failures = 0;
            r.window_start = now;
            return true;
        }
        false
    }

    pub fn success(&self, ip: IpAddr) {
        self.records.lock().by_ip.remove(&ip.to_canonical());
    }

    /// Addresses locked out now (for a gauge; walks the table, so scrape-time only).
    pub fn locked_count(&self) -> usize {
        let now = Instant::now();
        self.records
            .lock()
            .by_ip
            .values()
            .filter(|r| r.locked_until.is_some_and(|u| u > now))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_max_failures_and_unlocks_after_cooldown() {
        let t = AuthThrottle::new(3, Duration::from_secs(60), Duration::from_millis(50));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!t.failure(ip));
        assert!(!t.failure(ip));
        assert!(!t.is_locked(ip));
        assert!(t.failure(ip));
        assert!(t.is_locked(ip));
        assert_eq!(t.locked_count(), 1);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(t.is_locked(mapped), "one address, however it is written");
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!t.is_locked(other));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!t.is_locked(ip));
    }

    #[test]
    fn a_retune_keeps_the_failures_counted_and_shortens_a_lockout_under_way() {
        let minute = Duration::from_secs(60);
        let t = AuthThrottle::new(5, minute, minute);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..5 {
            t.failure(a);
        }
        assert!(t.is_locked(a));
        for _ in 0..3 {
            assert!(!t.failure(b));
        }
        t.retune(Params {
            max_failures: 2,
            window: minute,
            lockout: Duration::from_millis(30),
        });
        assert!(t.is_locked(a), "a lockout under way is kept");
        assert!(
            t.failure(b),
            "three counted before, two allowed now: locked"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(!t.is_locked(a), "the shorter lockout ends it");
        assert!(!t.is_locked(b));
    }
}
