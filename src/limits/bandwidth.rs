//! Bandwidth caps: one byte budget per user and one per group, shared by all their
//! connections, counting both directions. A relay reserves the bytes it just read (or
//! is about to write) and sleeps off any debt itself, so a capped connection waits on
//! its own buckets only and no lock is held while anyone waits.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::bucket::TokenBucket;
use super::LimitStats;
use crate::tunnel::stats::bump;
use crate::tunnel::Pace;

/// The burst a byte budget allows: a tenth of a second at its rate. Small, so a cap
/// holds over short transfers too; reservations may go into debt, so a read larger
/// than the burst is still carried (and paid for by waiting).
const BURST_SECS: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    User,
    Group,
}

struct SharedBucket {
    bucket: Mutex<TokenBucket>,
    scope: Scope,
}

impl SharedBucket {
    fn new(bytes_per_sec: u64, scope: Scope) -> Arc<Self> {
        let rate = bytes_per_sec as f64;
        Arc::new(SharedBucket {
            bucket: Mutex::new(TokenBucket::new(rate, rate * BURST_SECS, Instant::now())),
            scope,
        })
    }

    fn reserve(&self, n: usize, now: Instant) -> Duration {
        self.bucket.lock().reserve(n as f64, now)
    }
}

/// The budgets one connection draws from.
pub struct Pacer {
    user: Option<Arc<SharedBucket>>,
    group: Option<Arc<SharedBucket>>,
    stats: Arc<LimitStats>,
}

impl Pace for Pacer {
    fn reserve(&self, n: usize) -> Duration {
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for bucket in [&self.user, &self.group].into_iter().flatten() {
            let w = bucket.reserve(n, now);
            if !w.is_zero() {
                let counter = match bucket.scope {
                    Scope::User => &self.stats.paced_user,
                    Scope::Group => &self.stats.paced_group,
                };
                bump(counter, 1);
            }
            wait = wait.max(w);
        }
        wait
    }
}

/// User buckets live while a connection of that user does: the map holds weak
/// references, pruned when it has doubled since the last prune.
struct UserBuckets {
    by_name: HashMap<Arc<str>, Weak<SharedBucket>>,
    next_prune: usize,
}

const FIRST_PRUNE: usize = 1024;

pub struct Bandwidth {
    per_user: Option<u64>,
    users: Mutex<UserBuckets>,
    groups: HashMap<String, Arc<SharedBucket>>,
    stats: Arc<LimitStats>,
}

impl Bandwidth {
    /// `per_user` and `per_group` in bytes per second.
    pub fn new(
        per_user: Option<u64>,
        per_group: impl IntoIterator<Item = (String, u64)>,
        stats: Arc<LimitStats>,
    ) -> Self {
        Bandwidth {
            per_user,
            users: Mutex::new(UserBuckets {
                by_name: HashMap::new(),
                next_prune: FIRST_PRUNE,
            }),
            groups: per_group
                .into_iter()
                .map(|(g, rate)| (g, SharedBucket::new(rate, Scope::Group)))
                .collect(),
            stats,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.per_user.is_none() && self.groups.is_empty()
    }

    /// What a connection of `user` in `group` draws from; `None` when nothing caps it.
    pub fn pacer(&self, user: Option<&str>, group: &str) -> Option<Pacer> {
        let user = match (self.per_user, user) {
            (Some(rate), Some(name)) => Some(self.user_bucket(name, rate)),
            _ => None,
        };
        let group = self.groups.get(group).cloned();
        if user.is_none() && group.is_none() {
            return None;
        }
        Some(Pacer {
            user,
            group,
            stats: self.stats.clone(),
        })
    }

    fn user_bucket(&self, name: &str, rate: u64) -> Arc<SharedBucket> {
        let mut users = self.users.lock();
        if let Some(live) = users.by_name.get(name).and_then(Weak::upgrade) {
            return live;
        }
        if users.by_name.len() >= users.next_prune {
            users.by_name.retain(|_, w| w.strong_count() > 0);
            users.next_prune = (users.by_name.len() * 2).max(FIRST_PRUNE);
        }
        let bucket = SharedBucket::new(rate, Scope::User);
        users
            .by_name
            .insert(Arc::from(name), Arc::downgrade(&bucket));
        bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_connections_share_one_budget_and_others_have_their_own() {
        let bw = Bandwidth::new(Some(1000), [], Arc::default());
        let a1 = bw.pacer(Some("alice"), "default").unwrap();
        let a2 = bw.pacer(Some("alice"), "default").unwrap();
        let b = bw.pacer(Some("bob"), "default").unwrap();
        // 100 bytes of burst, then 1000 bytes per second for alice as a whole.
        assert_eq!(a1.reserve(100), Duration::ZERO);
        assert!(a2.reserve(500) >= Duration::from_millis(490));
        assert_eq!(b.reserve(100), Duration::ZERO, "bob is not slowed by alice");
        assert!(bw.pacer(None, "default").is_none(), "no user, no group cap");
    }

    #[test]
    fn a_group_budget_covers_its_users_and_the_stricter_cap_wins() {
        let bw = Bandwidth::new(
            Some(1_000_000),
            [("office".to_string(), 1000)],
            Arc::default(),
        );
        let p = bw.pacer(Some("alice"), "office").unwrap();
        assert_eq!(p.reserve(100), Duration::ZERO);
        assert!(p.reserve(1000) >= Duration::from_millis(990));
        let anonymous = bw.pacer(None, "office").unwrap();
        assert!(anonymous.reserve(1) > Duration::ZERO, "same group budget");
        assert_eq!(
            bw.stats
                .paced_group
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn user_buckets_are_dropped_with_their_last_connection() {
        let bw = Bandwidth::new(Some(1000), [], Arc::default());
        for i in 0..3 * FIRST_PRUNE {
            drop(bw.pacer(Some(&format!("user{i}")), "default"));
        }
        assert!(bw.users.lock().by_name.len() <= FIRST_PRUNE + 1);
        let held = bw.pacer(Some("kept"), "default").unwrap();
        held.reserve(100);
        let again = bw.pacer(Some("kept"), "default").unwrap();
        assert!(
            again.reserve(100) > Duration::ZERO,
            "the live bucket is reused"
        );
    }
}
