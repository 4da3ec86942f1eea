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
    /// `open` may exceed `limit` after a reload lowered it.
    Concurrent {
        limit: u32,
        open: u32,
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
    /// Brings the entry's bucket to `rule` (a reload may have changed it since the
    /// entry was made): a changed rate keeps the tokens, an added one starts full.
    fn follow(&mut self, rule: CapRule, now: Instant) {
        match (rule.rate, &mut self.bucket) {
            (None, bucket) => *bucket = None,
            (Some((per_sec, burst)), Some(bucket)) => bucket.retune(per_sec, burst, now),
            (Some((per_sec, burst)), bucket @ None) => {
                *bucket = Some(TokenBucket::new(per_sec, burst, now))
            }
        }
    }

    /// Nothing to remember: no open connection, and the rate is back to a full burst.
    fn idle(&mut self, now: Instant) -> bool {
        self.active == 0 && self.bucket.as_mut().is_none_or(|b| b.is_full(now))
    }
}

type Table<K> = Arc<Mutex<HashMap<K, Entry>>>;

/// The connections open per key. The rule is not kept here but passed to each
/// admission, so that a reload changes it without touching what is counted: slots
/// taken under an old rule count against the new one.
pub struct KeyedCaps<K> {
    max_tracked: usize,
    table: Table<K>,
}

impl<K: Eq + Hash + Clone> Default for KeyedCaps<K> {
    fn default() -> Self {
        Self::with_max_tracked(MAX_TRACKED)
    }
}

impl<K: Eq + Hash + Clone> KeyedCaps<K> {
    pub fn with_max_tracked(max_tracked: usize) -> Self {
        KeyedCaps {
            max_tracked: max_tracked.max(1),
            table: Arc::default(),
        }
    }

    /// Admits one more connection for `key` under `rule`, or says why not.
    pub fn admit(&self, key: &K, rule: CapRule, now: Instant) -> Result<CapSlot<K>, CapRefusal> {
        let mut table = self.table.lock();
        if !table.contains_key(key) && table.len() >= self.max_tracked {
            table.retain(|_, e| !e.idle(now));
            if table.len() >= self.max_tracked {
                return Err(CapRefusal::TableFull);
            }
        }
        let entry = table.entry(key.clone()).or_insert(Entry {
            active: 0,
            bucket: None,
        });
        entry.follow(rule, now);
        if let Some(limit) = rule.max_concurrent {
            if entry.active >= limit {
                return Err(CapRefusal::Concurrent {
                    limit,
                    open: entry.active,
                });
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
        let (caps, rule) = (KeyedCaps::default(), concurrent(2));
        let now = Instant::now();
        let a = caps.admit(&"alice", rule, now).unwrap();
        let _b = caps.admit(&"alice", rule, now).unwrap();
        assert_eq!(
            caps.admit(&"alice", rule, now).err(),
            Some(CapRefusal::Concurrent { limit: 2, open: 2 })
        );
        assert!(caps.admit(&"bob", rule, now).is_ok(), "keys are separate");
        drop(a);
        assert!(caps.admit(&"alice", rule, now).is_ok());
    }

    #[test]
    fn a_lowered_cap_keeps_the_open_slots_and_refuses_until_enough_end() {
        let caps = KeyedCaps::default();
        let now = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|_| caps.admit(&"alice", concurrent(10), now).unwrap())
            .collect();
        let low = concurrent(2);
        assert_eq!(
            caps.admit(&"alice", low, now).err(),
            Some(CapRefusal::Concurrent { limit: 2, open: 3 }),
            "the three admitted before still count"
        );
        let mut held = held.into_iter();
        drop(held.next());
        assert!(caps.admit(&"alice", low, now).is_err(), "two still open");
        drop(held.next());
        let again = caps.admit(&"alice", low, now).unwrap();
        // Raised: more are admitted beside the ones open.
        let high = concurrent(4);
        let more: Vec<_> = (0..2)
            .map(|_| caps.admit(&"alice", high, now).unwrap())
            .collect();
        assert!(caps.admit(&"alice", high, now).is_err());
        drop((again, more, held));
        assert_eq!(caps.tracked(), 0);
    }

    #[test]
    fn a_rate_added_starts_full_and_a_changed_rate_keeps_what_was_spent() {
        let caps = KeyedCaps::default();
        let t0 = Instant::now();
        let _open = caps.admit(&"ip", concurrent(10), t0).unwrap();
        let rated = |per_sec, burst| CapRule {
            max_concurrent: Some(10),
            rate: Some((per_sec, burst)),
        };
        // Added where none was: a full burst of 2.
        let _a = caps.admit(&"ip", rated(1.0, 2.0), t0).unwrap();
        let _b = caps.admit(&"ip", rated(1.0, 2.0), t0).unwrap();
        assert!(matches!(
            caps.admit(&"ip", rated(1.0, 2.0), t0),
            Err(CapRefusal::Rate { .. })
        ));
        // A larger burst is not a refill: the spent tokens stay spent.
        assert!(caps.admit(&"ip", rated(1.0, 5.0), t0).is_err());
        // Removed: admitted at once.
        assert!(caps.admit(&"ip", concurrent(10), t0).is_ok());
    }

    #[test]
    fn a_slot_is_released_by_a_panicking_task() {
        let caps = Arc::new(KeyedCaps::default());
        let slot = caps.admit(&1u8, concurrent(1), Instant::now()).unwrap();
        let r = std::thread::spawn(move || {
            let _held = slot;
            panic!("connection task failed");
        })
        .join();
        assert!(r.is_err());
        assert!(caps.admit(&1u8, concurrent(1), Instant::now()).is_ok());
        assert_eq!(caps.tracked(), 0, "an idle key is forgotten");
    }

    #[test]
    fn rate_allows_a_burst_then_refuses_then_recovers() {
        let caps = KeyedCaps::default();
        let rule = CapRule {
            max_concurrent: None,
            rate: Some((2.0, 3.0)),
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(caps.admit(&"ip", rule, t0).unwrap());
        }
        assert!(matches!(
            caps.admit(&"ip", rule, t0),
            Err(CapRefusal::Rate { .. })
        ));
        // Half a second refills one token (slots dropped on the real clock, a little
        // after t0: hence the margin).
        assert!(caps
            .admit(&"ip", rule, t0 + Duration::from_millis(600))
            .is_ok());
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_idle_keys_first() {
        let caps = KeyedCaps::with_max_tracked(2);
        let rule = CapRule {
            max_concurrent: Some(10),
            rate: Some((1.0, 1.0)),
        };
        let t0 = Instant::now();
        let held = caps.admit(&1u32, rule, t0).unwrap();
        // Key 2's connection ended but its bucket is not full yet: still tracked.
        drop(caps.admit(&2u32, rule, t0).unwrap());
        assert_eq!(caps.tracked(), 2);
        assert_eq!(
            caps.admit(&3u32, rule, t0).err(),
            Some(CapRefusal::TableFull)
        );
        // A second later key 2 has nothing left to remember and makes room.
        let later = t0 + Duration::from_secs(1);
        let _three = caps.admit(&3u32, rule, later).unwrap();
        assert_eq!(caps.tracked(), 2);
        drop(held);
    }
}
