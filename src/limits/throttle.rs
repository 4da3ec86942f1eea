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

pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    lockout: Duration,
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl AuthThrottle {
    pub fn new(max_failures: u32, window: Duration, lockout: Duration) -> Self {
        AuthThrottle {
            max_failures: max_failures.max(1),
            window,
            lockout,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` is locked out now.
    pub fn is_locked(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let now = Instant::now();
        self.records
            .lock()
            .get(&ip)
            .and_then(|r| r.locked_until)
            .is_some_and(|until| until > now)
    }

    /// Records a failure; returns true when this failure locked the IP out.
    pub fn failure(&self, ip: IpAddr) -> bool {
        // An IPv4 client seen through a dual-stack socket must not get a second count.
        let ip = ip.to_canonical();
        let now = Instant::now();
        let mut records = self.records.lock();
        if records.len() >= MAX_TRACKED && !records.contains_key(&ip) {
            let (window, lockout) = (self.window, self.lockout);
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
        if now.duration_since(r.window_start) > self.window {
            r.failures = 0;
            r.window_start = now;
        }
        r.failures += 1;
        if r.failures >= self.max_failures {
            r.locked_until = Some(now + self.lockout);
            r.failures = 0;
            r.window_start = now;
            return true;
        }
        false
    }

    pub fn success(&self, ip: IpAddr) {
        self.records.lock().remove(&ip.to_canonical());
    }

    /// Addresses locked out now (for a gauge; walks the table, so scrape-time only).
    pub fn locked_count(&self) -> usize {
        let now = Instant::now();
        self.records
            .lock()
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
}
