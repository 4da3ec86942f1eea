//! Connection caps per key (a user name, a source address): how many connections may
//! be open at once, and how fast new ones may be opened (a token bucket). A granted
//! connection holds a [`CapSlot`] that gives its place back when dropped, whatever
//! way the connection ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::bucket::TokenBucket;

/// Keys tracked at most. Keys come from the network (addresses) or from accounts, so
/// the table must not grow without bound; an entry with nothing to remember (no open
/// connection, a full bucket) can always be forgotten.
pub const MAX_TRACKED: usize = 65_536;

/// One kind of cap, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapRule {
    pub max_concurrent: Option<u32>,
    /// New connections per second, and how many may come at once.
    pub rate: Option<(f64, f64)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CapRefusal {
    Concurrent {
        limit: u32,
    },
    Rate {
        per_sec: f64,
        burst: f64,
    },
    /// Every tracked key has open connections: new keys wait until some close.
    TableFull,
}

struct Entry {
    active: u32,
    bucket: Option<TokenBucket>,
}

impl Entry {
    /// Nothing to remember: no open connection, and the rate is back to a full burst.
    fn idle(&mut self, now: Instant) -> bool {
        self.active == 0 && self.bucket.as_mut().is_none_or(|b| b.is_full(now))
    }
}

type Table<K> = Arc<Mutex<HashMap<K, Entry>>>;

pub struct KeyedCaps<K> {
    rule: CapRule,
    max_tracked: usize,
    table: Table<K>,
}

impl<K: Eq + Hash + Clone> KeyedCaps<K> {
    pub fn new(rule: CapRule) -> Self {
        Self::with_max_tracked(rule, MAX_TRACKED)
    }

    pub fn with_max_tracked(rule: CapRule, max_tracked: usize) -> Self {
        KeyedCaps {
            rule,
            max_tracked: max_tracked.max(1),
            table: Arc::default(),
        }
    }

    pub fn rule(&self) -> CapRule {
        self.rule
    }

    /// Admits one more connection for `key`, or says why not.
    pub fn admit(&self, key: &K, now: Instant) -> Result<CapSlot<K>, CapRefusal> {
        let mut table = self.table.lock();
        if !table.contains_key(key) && table.len() >= self.max_tracked {
            table.retain(|_, e| !e.idle(now));
            if table.len() >= self.max_tracked {
                return Err(CapRefusal::TableFull);
            }
        }
        let rule = self.rule;
        let entry = table.entry(key.clone()).or_insert_with(|| Entry {
            active: 0,
            bucket: rule
                .rate
                .map(|(per_sec, burst)| TokenBucket::new(per_sec, burst, now)),
        });
        if let Some(limit) = rule.max_concurrent {
            if entry.active >= limit {
                return Err(CapRefusal::Concurrent { limit });
            }
        }
        if let (Some(bucket), Some((per_sec, burst))) = (&mut entry.bucket, rule.rate) {
            if !bucket.try_take(1.0, now) {
                return Err(CapRefusal::Rate { per_sec, burst });
            }
        }
        entry.active += 1;
        Ok(CapSlot {
            table: self.table.clone(),
            key: key.clone(),
        })
    }

    /// Keys tracked now (tests, and to show the table stays bounded).
    pub fn tracked(&self) -> usize {
        self.table.lock().len()
    }
}

/// One admitted connection's place; dropping it frees the place.
pub struct CapSlot<K: Eq + Hash> {
    table: Table<K>,
    key: K,
}

impl<K: Eq + Hash> Drop for CapSlot<K> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut table = self.table.lock();
        let forget = match table.get_mut(&self.key) {
            Some(entry) => {
                entry.active = entry.active.saturating_sub(1);
                entry.idle(now)
            }
            None => false,
        };
        if forget {
            table.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn concurrent(n: u32) -> CapRule {
        CapRule {
            max_concurrent: Some(n),
            rate: None,
        }
    }

    #[test]
    fn a_concurrent_place_comes_back_when_its_slot_drops() {
        let caps = KeyedCaps::new(concurrent(2));
        let now = Instant::now();
        let a = caps.admit(&"alice", now).unwrap();
        let _b = caps.admit(&"alice", now).unwrap();
        assert_eq!(
            caps.admit(&"alice", now).err(),
            Some(CapRefusal::Concurrent { limit: 2 })
        );
        assert!(caps.admit(&"bob", now).is_ok(), "keys are separate");
        drop(a);
        assert!(caps.admit(&"alice", now).is_ok());
    }

    #[test]
    fn a_slot_is_released_by_a_panicking_task() {
        let caps = Arc::new(KeyedCaps::new(concurrent(1)));
        let slot = caps.admit(&1u8, Instant::now()).unwrap();
        let r = std::thread::spawn(move || {
            let _held = slot;
            panic!("connection task failed");
        })
        .join();
        assert!(r.is_err());
        assert!(caps.admit(&1u8, Instant::now()).is_ok());
        assert_eq!(caps.tracked(), 0, "an idle key is forgotten");
    }

    #[test]
    fn rate_allows_a_burst_then_refuses_then_recovers() {
        let caps = KeyedCaps::new(CapRule {
            max_concurrent: None,
            rate: Some((2.0, 3.0)),
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(caps.admit(&"ip", t0).unwrap());
        }
        assert!(matches!(
            caps.admit(&"ip", t0),
            Err(CapRefusal::Rate { .. })
        ));
        // Half a second refills one token (slots dropped on the real clock, a little
        // after t0: hence the margin).
        assert!(caps.admit(&"ip", t0 + Duration::from_millis(600)).is_ok());
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_idle_keys_first() {
        let caps = KeyedCaps::with_max_tracked(
            CapRule {
                max_concurrent: Some(10),
                rate: Some((1.0, 1.0)),
            },
            2,
        );
        let t0 = Instant::now();
        let held = caps.admit(&1u32, t0).unwrap();
        // Key 2's connection ended but its bucket is not full yet: still tracked.
        drop(caps.admit(&2u32, t0).unwrap());
        assert_eq!(caps.tracked(), 2);
        assert_eq!(caps.admit(&3u32, t0).err(), Some(CapRefusal::TableFull));
        // A second later key 2 has nothing left to remember and makes room.
        let later = t0 + Duration::from_secs(1);
        let _three = caps.admit(&3u32, later).unwrap();
        assert_eq!(caps.tracked(), 2);
        drop(held);
    }
}
