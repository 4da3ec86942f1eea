//! Bandwidth caps: one byte budget per user and one per group, shared by all their
//! connections, counting both directions. A relay reserves the bytes it just read (or
//! is about to write) and sleeps off any debt itself, so a capped connection waits on
//! its own buckets only and no lock is held while anyone waits.
//!
//! In a cluster (`gateway.cluster`) a budget holds across every node: a node's bucket
//! is refilled not by its clock but by leases of `budget_slice` of the budget from one
//! token bucket in the store. Reserving stays synchronous and never waits on the
//! store: it draws from the bytes already leased, and when fewer than half a slice are
//! left it starts a lease in the background (one at a time per bucket). Bytes move
//! only once leased bytes cover them (the relay asks [`Pace::pending`] after each
//! wait). Over any `t` seconds the cluster moves at most `rate × t + (nodes + 1) ×
//! slice` bytes of one budget: the store's bucket holds one slice, and each node one
//! more, leased but not yet spent. When the store does not answer, a node paces itself
//! with its own clock: at the full rate with `on_store_failure: open`, at the rate
//! divided by the members it last saw with `closed` (traffic is never paused: live
//! connections keep moving, within the cluster's budget as long as the membership
//! did not grow during the outage).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;

use super::bucket::TokenBucket;
use super::LimitStats;
use crate::cluster::{BudgetLease, Cluster, StoreError};
use crate::config::StoreFailureMode;
use crate::tunnel::stats::bump;
use crate::tunnel::Pace;

/// The burst a byte budget allows: a tenth of a second at its rate. Small, so a cap
/// holds over short transfers too; reservations may go into debt, so a read larger
/// than the burst is still carried (and paid for by waiting).
const BURST_SECS: f64 = 0.1;

/// Leased bytes: how soon a waiting relay looks again whether its bytes are covered.
/// The estimate is the debt at the full rate, within these bounds.
const MIN_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(100);

/// After a short grant, the next lease waits what the store said, within these.
const MIN_RETRY: Duration = Duration::from_millis(5);
const MAX_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    User,
    Group,
}

impl Scope {
    fn key_part(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Group => "group",
        }
    }
}

/// Where budgets are leased from: the cluster, or a fake in tests.
pub(crate) trait Leaser: Send + Sync {
    /// The store key of `scope`'s budget `name`.
    fn budget_key(&self, scope: &str, name: &str) -> String;
    /// Leases up to `want` bytes from the budget at `key` (one round trip).
    fn lease<'a>(
        &'a self,
        key: &'a str,
        per_sec: u64,
        burst: u64,
        want: u64,
    ) -> BoxFuture<'a, Result<BudgetLease, StoreError>>;
    /// False while the store is known to be down: lease without asking it.
    fn store_is_up(&self) -> bool;
    /// Counts one lease decided without the store.
    fn decided_without_store(&self);
    /// The share of the budget a node paces itself at without the store.
    fn share_without_store(&self) -> f64;
}

impl Leaser for Cluster {
    fn budget_key(&self, scope: &str, name: &str) -> String {
        self.keys.budget(scope, name)
    }

    fn lease<'a>(
        &'a self,
        key: &'a str,
        per_sec: u64,
        burst: u64,
        want: u64,
    ) -> BoxFuture<'a, Result<BudgetLease, StoreError>> {
        Box::pin(self.lease_budget(key, per_sec, burst, want))
    }

    fn store_is_up(&self) -> bool {
        self.store.health.is_up()
    }

    fn decided_without_store(&self) {
        self.store.health.decided_without_store();
    }

    fn share_without_store(&self) -> f64 {
        match self.mode {
            StoreFailureMode::Open => 1.0,
            StoreFailureMode::Closed => 1.0 / self.members_last_seen() as f64,
        }
    }
}

/// How a cluster's budgets are leased.
#[derive(Clone)]
pub(crate) struct Leases {
    pub leaser: Arc<dyn Leaser>,
    /// The share of a budget one lease takes, in (0, 1].
    pub slice: f64,
}

/// One node's account of a leased budget. Counters only grow: a reservation gets a
/// ticket (the bytes reserved so far, its own included) and is covered once the bytes
/// leased reach it, so waiting relays are served in order and none is overtaken.
#[derive(Debug)]
struct LeaseAccount {
    /// The rate asked of the store, and as a float for the waits.
    rate: u64,
    per_sec: f64,
    slice: u64,
    reserved: u64,
    leased: u64,
    /// A lease task runs for this bucket.
    leasing: bool,
    /// Paces this node while the store does not answer; gone once it answers.
    fallback: Option<TokenBucket>,
}

impl LeaseAccount {
    fn new(per_sec: u64, slice: u64) -> Self {
        LeaseAccount {
            rate: per_sec,
            per_sec: per_sec.max(1) as f64,
            slice: slice.max(1),
            reserved: 0,
            leased: 0,
            leasing: false,
            fallback: None,
        }
    }

    /// Leased bytes not yet reserved; negative when relays wait for bytes.
    fn balance(&self) -> i128 {
        i128::from(self.leased) - i128::from(self.reserved)
    }

    fn low(&self) -> bool {
        self.balance() < i128::from(self.slice / 2)
    }

    /// Reserves `n` bytes: their ticket, and whether the caller must start a lease
    /// task (the balance is low and none runs).
    fn reserve(&mut self, n: u64) -> (u64, bool) {
        self.reserved = self.reserved.saturating_add(n);
        (self.reserved, self.needs_task())
    }

    /// Whether a lease task must start (the balance is low and none runs); if so, the
    /// caller starts it.
    fn needs_task(&mut self) -> bool {
        let start = !self.leasing && self.low();
        self.leasing |= start;
        start
    }

    /// How long the bytes of `ticket` wait before looking again (zero: covered).
    fn wait(&self, ticket: u64) -> Duration {
        if self.leased >= ticket {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((ticket - self.leased) as f64 / self.per_sec)
            .clamp(MIN_POLL, MAX_POLL)
    }

    /// What the lease task asks for next: back up to one slice (debt included), or
    /// nothing when the balance is not low, which ends the task.
    fn want(&mut self) -> Option<u64> {
        if !self.low() {
            self.leasing = false;
            return None;
        }
        let want = i128::from(self.slice) - self.balance();
        Some(u64::try_from(want).unwrap_or(u64::MAX))
    }

    fn credit(&mut self, n: u64, from_store: bool) {
        self.leased = self.leased.saturating_add(n);
        if from_store {
            self.fallback = None;
        }
    }

    /// Without the store: how long until `want` bytes are this node's at `share` of
    /// the rate (by its own clock, one slice of burst from the start of the outage).
    fn fallback_wait(&mut self, want: u64, share: f64, now: Instant) -> Duration {
        let rate = self.per_sec * share.clamp(f64::MIN_POSITIVE, 1.0);
        let burst = self.slice as f64 * share.clamp(0.0, 1.0);
        self.fallback
            .get_or_insert_with(|| TokenBucket::new(rate, burst, now))
            .reserve(want as f64, now)
    }

    /// Takes a new rate and slice (a reload), keeping the counters: bytes leased or
    /// owed stay so, and the next lease asks the store at the new rate. An outage's
    /// own bucket starts again at the new rate.
    fn retune(&mut self, per_sec: u64, slice: u64) {
        self.rate = per_sec;
        self.per_sec = per_sec.max(1) as f64;
        self.slice = slice.max(1);
        self.fallback = None;
    }

    /// The task's end when its bucket is gone or cannot be leased for.
    fn stop(&mut self) {
        self.leasing = false;
    }
}

/// A budget leased from the cluster, as one node holds it.
struct Leased {
    account: Mutex<LeaseAccount>,
    leases: Leases,
    key: String,
}

enum Source {
    /// Refilled by this node's clock: a single gateway.
    Local(Mutex<TokenBucket>),
    /// Refilled by leases from the cluster's budget.
    Leased(Leased),
}

struct SharedBucket {
    source: Source,
    scope: Scope,
    /// Its cap was removed by a reload: the connections still holding it move freely.
    off: AtomicBool,
}

/// The bytes of one lease: `budget_slice` of a second at the rate.
fn slice_of(bytes_per_sec: u64, leases: &Leases) -> u64 {
    (bytes_per_sec as f64 * leases.slice).ceil() as u64
}

impl SharedBucket {
    fn new(bytes_per_sec: u64, scope: Scope, name: &str, leases: Option<&Leases>) -> Arc<Self> {
        let source = match leases {
            None => {
                let rate = bytes_per_sec as f64;
                Source::Local(Mutex::new(TokenBucket::new(
                    rate,
                    rate * BURST_SECS,
                    Instant::now(),
                )))
            }
            Some(leases) => Source::Leased(Leased {
                account: Mutex::new(LeaseAccount::new(
                    bytes_per_sec,
                    slice_of(bytes_per_sec, leases),
                )),
                key: leases.leaser.budget_key(scope.key_part(), name),
                leases: leases.clone(),
            }),
        };
        Arc::new(SharedBucket {
            source,
            scope,
            off: AtomicBool::new(false),
        })
    }

    /// A new rate (a reload), for the connections drawing from it now and later,
    /// from their next reservation on.
    fn retune(&self, bytes_per_sec: u64) {
        match &self.source {
            Source::Local(bucket) => {
                let rate = bytes_per_sec as f64;
                bucket
                    .lock()
                    .retune(rate, rate * BURST_SECS, Instant::now());
            }
            Source::Leased(leased) => {
                let slice = slice_of(bytes_per_sec, &leased.leases);
                leased.account.lock().retune(bytes_per_sec, slice);
            }
        }
    }

    fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    /// Reserves `n` bytes: the wait, and the ticket of leased bytes (0 for a local
    /// bucket, whose wait is exact).
    fn reserve(self: &Arc<Self>, n: usize, now: Instant) -> (Duration, u64) {
        if self.is_off() {
            return (Duration::ZERO, 0);
        }
        match &self.source {
            Source::Local(bucket) => (bucket.lock().reserve(n as f64, now), 0),
            Source::Leased(leased) => {
                let mut account = leased.account.lock();
                let (ticket, start) = account.reserve(n as u64);
                let wait = account.wait(ticket);
                drop(account);
                if start {
                    self.start_leasing();
                }
                (wait, ticket)
            }
        }
    }

    /// Starts a lease task too if none runs (one could not be spawned before).
    fn pending(self: &Arc<Self>, ticket: u64) -> Duration {
        if self.is_off() {
            return Duration::ZERO;
        }
        match &self.source {
            Source::Local(_) => Duration::ZERO,
            Source::Leased(leased) => {
                let mut account = leased.account.lock();
                let (wait, start) = (account.wait(ticket), account.needs_task());
                drop(account);
                if start {
                    self.start_leasing();
                }
                wait
            }
        }
    }

    fn start_leasing(self: &Arc<Self>) {
        let Source::Leased(leased) = &self.source else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(lease_task(Arc::downgrade(self)));
            }
            // No runtime (shutting down): the next reservation or look tries again.
            Err(_) => leased.account.lock().stop(),
        }
    }
}

/// Keeps one bucket leased while it runs low, then ends; it holds the bucket only
/// between awaits, so a user's bucket still goes with its last connection.
async fn lease_task(bucket: Weak<SharedBucket>) {
    let mut pause = Duration::ZERO;
    loop {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let Some(strong) = bucket.upgrade() else {
            return;
        };
        let Source::Leased(leased) = &strong.source else {
            return;
        };
        let (want, slice, per_sec) = {
            let mut account = leased.account.lock();
            match account.want() {
                Some(want) => (want, account.slice, account.rate),
                None => return,
            }
        };
        let (leases, key) = (leased.leases.clone(), leased.key.clone());
        drop(strong);
        let leaser = leases.leaser.as_ref();
        let answer = if leaser.store_is_up() {
            leaser.lease(&key, per_sec, slice, want).await.ok()
        } else {
            None
        };
        let Some(strong) = bucket.upgrade() else {
            return;
        };
        let Source::Leased(leased) = &strong.source else {
            return;
        };
        match answer {
            Some(lease) => {
                leased.account.lock().credit(lease.granted, true);
                pause = if lease.granted < want {
                    lease.retry_after.clamp(MIN_RETRY, MAX_RETRY)
                } else {
                    Duration::ZERO
                };
            }
            None => {
                leaser.decided_without_store();
                let share = leaser.share_without_store();
                let now = tokio::time::Instant::now().into_std();
                let wait = leased.account.lock().fallback_wait(want, share, now);
                drop(strong);
                tokio::time::sleep(wait).await;
                let Some(strong) = bucket.upgrade() else {
                    return;
                };
                if let Source::Leased(leased) = &strong.source {
                    leased.account.lock().credit(want, false);
                }
                pause = Duration::ZERO;
            }
        }
    }
}

/// The budgets one connection draws from.
pub struct Pacer {
    user: Option<Arc<SharedBucket>>,
    group: Option<Arc<SharedBucket>>,
    /// The latest ticket of each leased budget (user, group): this connection's
    /// bytes move once both are covered.
    tickets: [AtomicU64; 2],
    stats: Arc<LimitStats>,
}

impl Pacer {
    fn buckets(&self) -> impl Iterator<Item = (&Arc<SharedBucket>, &AtomicU64)> {
        [&self.user, &self.group]
            .into_iter()
            .zip(&self.tickets)
            .filter_map(|(b, t)| b.as_ref().map(|b| (b, t)))
    }
}

impl Pace for Pacer {
    fn reserve(&self, n: usize) -> Duration {
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, ticket) in self.buckets() {
            let (w, t) = bucket.reserve(n, now);
            ticket.fetch_max(t, Ordering::Relaxed);
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

    fn pending(&self) -> Duration {
        self.buckets()
            .map(|(bucket, ticket)| bucket.pending(ticket.load(Ordering::Relaxed)))
            .max()
            .unwrap_or_default()
    }
}

/// User buckets live while a connection of that user does: the map holds weak
/// references, pruned when it has doubled since the last prune. The per-user rate
/// sits under the same lock, so that a bucket is never made at a rate a reload has
/// just replaced.
struct UserBuckets {
    rate: Option<u64>,
    by_name: HashMap<Arc<str>, Weak<SharedBucket>>,
    next_prune: usize,
}

const FIRST_PRUNE: usize = 1024;

/// What the caps are now; a reload swaps it whole.
struct Rules {
    per_user: Option<u64>,
    groups: HashMap<String, Arc<SharedBucket>>,
}

pub struct Bandwidth {
    rules: ArcSwap<Rules>,
    users: Mutex<UserBuckets>,
    leases: Option<Leases>,
    stats: Arc<LimitStats>,
}

impl Bandwidth {
    /// `per_user` and `per_group` in bytes per second; with `leases`, each budget
    /// holds across the cluster.
    pub(crate) fn new(
        per_user: Option<u64>,
        per_group: impl IntoIterator<Item = (String, u64)>,
        stats: Arc<LimitStats>,
        leases: Option<Leases>,
    ) -> Self {
        let bw = Bandwidth {
            rules: ArcSwap::from_pointee(Rules {
                per_user: None,
                groups: HashMap::new(),
            }),
            users: Mutex::new(UserBuckets {
                rate: None,
                by_name: HashMap::new(),
                next_prune: FIRST_PRUNE,
            }),
            leases,
            stats,
        };
        bw.reconfigure(per_user, per_group);
        bw
    }

    /// New caps (a reload). A changed rate applies to the live connections under it
    /// from their next reservation; a removed cap stops pacing them; a cap added
    /// applies to connections admitted from now on (the others hold no budget of it).
    pub(crate) fn reconfigure(
        &self,
        per_user: Option<u64>,
        per_group: impl IntoIterator<Item = (String, u64)>,
    ) {
        let old = self.rules.load_full();
        let mut groups = HashMap::new();
        for (g, rate) in per_group {
            let bucket = match old.groups.get(&g) {
                Some(kept) => {
                    kept.retune(rate);
                    kept.clone()
                }
                None => SharedBucket::new(rate, Scope::Group, &g, self.leases.as_ref()),
            };
            groups.insert(g, bucket);
        }
        for (g, bucket) in &old.groups {
            if !groups.contains_key(g) {
                bucket.off.store(true, Ordering::Relaxed);
            }
        }
        self.rules.store(Arc::new(Rules { per_user, groups }));
        let mut users = self.users.lock();
        users.rate = per_user;
        let live = users.by_name.values().filter_map(Weak::upgrade);
        match per_user {
            Some(rate) => live.for_each(|b| b.retune(rate)),
            None => live.for_each(|b| b.off.store(true, Ordering::Relaxed)),
        }
        if per_user.is_none() {
            users.by_name.clear();
        }
    }

    pub fn is_unlimited(&self) -> bool {
        let rules = self.rules.load();
        rules.per_user.is_none() && rules.groups.is_empty()
    }

    /// What a connection of `user` in `group` draws from; `None` when nothing caps it.
    pub fn pacer(&self, user: Option<&str>, group: &str) -> Option<Pacer> {
        let rules = self.rules.load();
        let user = match (rules.per_user, user) {
            (Some(_), Some(name)) => self.user_bucket(name),
            _ => None,
        };
        let group = rules.groups.get(group).cloned();
        if user.is_none() && group.is_none() {
            return None;
        }
        Some(Pacer {
            user,
            group,
            tickets: Default::default(),
            stats: self.stats.clone(),
        })
    }

    /// `name`'s bucket, at the rate under the lock (none: a reload just removed it).
    fn user_bucket(&self, name: &str) -> Option<Arc<SharedBucket>> {
        let mut users = self.users.lock();
        let rate = users.rate?;
        if let Some(live) = users.by_name.get(name).and_then(Weak::upgrade) {
            return Some(live);
        }
        if users.by_name.len() >= users.next_prune {
            users.by_name.retain(|_, w| w.strong_count() > 0);
            users.next_prune = (users.by_name.len() * 2).max(FIRST_PRUNE);
        }
        let bucket = SharedBucket::new(rate, Scope::User, name, self.leases.as_ref());
        users
            .by_name
            .insert(Arc::from(name), Arc::downgrade(&bucket));
        Some(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_connections_share_one_budget_and_others_have_their_own() {
        let bw = Bandwidth::new(Some(1000), [], Arc::default(), None);
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
            None,
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
    fn a_changed_rate_paces_live_connections_from_their_next_reservation() {
        let bw = Bandwidth::new(Some(1000), [("office".into(), 1000)], Arc::default(), None);
        let user = bw.pacer(Some("alice"), "default").unwrap();
        let group = bw.pacer(None, "office").unwrap();
        assert_eq!(user.reserve(100), Duration::ZERO);
        assert_eq!(group.reserve(100), Duration::ZERO);
        bw.reconfigure(Some(1_000_000), [("office".into(), 1_000_000)]);
        // 5000 bytes: 5 s at the old rate, 5 ms at the new one.
        for live in [&user, &group] {
            let wait = live.reserve(5000);
            assert!(wait < Duration::from_millis(100), "{wait:?}");
        }
        bw.reconfigure(Some(1000), [("office".into(), 1000)]);
        assert!(user.reserve(5000) > Duration::from_secs(1), "lowered too");
    }

    #[test]
    fn a_removed_cap_frees_live_connections_and_an_added_one_caps_new_ones() {
        let bw = Bandwidth::new(Some(1000), [("office".into(), 1000)], Arc::default(), None);
        let user = bw.pacer(Some("alice"), "default").unwrap();
        let group = bw.pacer(None, "office").unwrap();
        bw.reconfigure(None, []);
        assert!(bw.is_unlimited());
        assert!(bw.pacer(Some("alice"), "office").is_none());
        for live in [&user, &group] {
            assert_eq!(live.reserve(1 << 20), Duration::ZERO);
            assert_eq!(live.pending(), Duration::ZERO);
        }
        bw.reconfigure(Some(1000), [("office".into(), 1000)]);
        let new = bw.pacer(Some("alice"), "office").unwrap();
        assert_eq!(new.reserve(100), Duration::ZERO);
        assert!(new.reserve(1000) > Duration::ZERO, "the new cap holds");
        assert_eq!(user.reserve(1 << 20), Duration::ZERO, "the old one is gone");
    }

    #[test]
    fn user_buckets_are_dropped_with_their_last_connection() {
        let bw = Bandwidth::new(Some(1000), [], Arc::default(), None);
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

    // --- Leased budgets (a cluster), with a fake store. ---

    use std::collections::VecDeque;
    use std::sync::atomic::AtomicBool;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lease_account_covers_tickets_in_order_and_asks_for_one_lease_at_a_time() {
        // 1000 B/s, slices of 100 bytes.
        let mut a = LeaseAccount::new(1000, 100);
        let (t1, start) = a.reserve(30);
        assert!(start, "nothing leased yet: a lease must start");
        let (t2, again) = a.reserve(40);
        assert!(!again, "one lease task at a time");
        assert_eq!((t1, t2), (30, 70));
        assert_eq!(a.wait(t1), ms(30), "the debt at the full rate");
        assert_eq!(a.want(), Some(170), "back to one slice, the debt included");
        a.credit(50, true);
        assert_eq!(
            a.wait(t1),
            Duration::ZERO,
            "the earlier bytes are covered first"
        );
        assert_eq!(a.wait(t2), ms(20));
        a.credit(120, true);
        assert_eq!(a.wait(t2), Duration::ZERO);
        assert_eq!(a.want(), None, "a slice in hand: the task ends");
        assert!(!a.leasing);
        let (_, start) = a.reserve(60);
        assert!(start, "below half a slice: the next lease starts");
        let (t, _) = a.reserve(10_000);
        assert_eq!(a.wait(t), MAX_POLL, "relays look again at least this often");
        a.credit(t - 1 - a.leased, true);
        assert_eq!(a.wait(t), MIN_POLL, "one byte short");
    }

    #[test]
    fn a_retuned_lease_account_keeps_its_counters_and_asks_at_the_new_rate() {
        let mut a = LeaseAccount::new(1000, 100);
        let (t, _) = a.reserve(30);
        a.credit(10, true);
        a.fallback_wait(10, 1.0, Instant::now());
        a.retune(10_000, 1000);
        assert_eq!((a.reserved, a.leased), (30, 10), "counters kept");
        assert_eq!(a.rate, 10_000);
        assert_eq!(a.wait(t), MIN_POLL, "20 bytes owed at the new rate");
        assert_eq!(a.want(), Some(1020), "a new slice, the debt included");
        assert!(a.fallback.is_none(), "an outage's bucket starts again");
    }

    #[test]
    fn without_the_store_a_lease_account_paces_by_its_own_clock_at_its_share() {
        let t0 = Instant::now();
        let mut a = LeaseAccount::new(1000, 100);
        // Half the rate (two members seen, `closed`): 500 B/s, 50 bytes of burst.
        assert_eq!(a.fallback_wait(50, 0.5, t0), Duration::ZERO);
        assert_eq!(a.fallback_wait(100, 0.5, t0), ms(200));
        a.credit(150, false);
        assert!(a.fallback.is_some(), "kept while the store does not answer");
        a.credit(0, true);
        assert!(a.fallback.is_none(), "a store answer ends the outage");
        // The full rate (`open`) in a new outage: a fresh bucket of one slice.
        assert_eq!(a.fallback_wait(100, 1.0, t0), Duration::ZERO);
        assert_eq!(a.fallback_wait(1000, 1.0, t0), ms(1000));
    }

    /// A store that answers from a script (then grants all it is asked), or not at all.
    #[derive(Default)]
    struct FakeStore {
        answers: Mutex<VecDeque<Result<BudgetLease, ()>>>,
        down: AtomicBool,
        /// Leases hang until released.
        hold: Option<Arc<tokio::sync::Semaphore>>,
        share: f64,
        calls: AtomicU64,
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
        without_store: AtomicU64,
    }

    impl Leaser for FakeStore {
        fn budget_key(&self, scope: &str, name: &str) -> String {
            format!("{scope}:{name}")
        }

        fn lease<'a>(
            &'a self,
            _key: &'a str,
            _per_sec: u64,
            _burst: u64,
            want: u64,
        ) -> BoxFuture<'a, Result<BudgetLease, StoreError>> {
            Box::pin(async move {
                let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_in_flight.fetch_max(n, Ordering::SeqCst);
                self.calls.fetch_add(1, Ordering::SeqCst);
                match &self.hold {
                    Some(gate) => drop(gate.acquire().await),
                    None => tokio::task::yield_now().await,
                }
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                match self.answers.lock().pop_front() {
                    Some(Ok(lease)) => Ok(lease),
                    Some(Err(())) => Err(StoreError::Timeout(ms(300))),
                    None => Ok(BudgetLease {
                        granted: want,
                        retry_after: Duration::ZERO,
                    }),
                }
            })
        }

        fn store_is_up(&self) -> bool {
            !self.down.load(Ordering::SeqCst)
        }

        fn decided_without_store(&self) {
            self.without_store.fetch_add(1, Ordering::SeqCst);
        }

        fn share_without_store(&self) -> f64 {
            self.share
        }
    }

    fn leased_bandwidth(store: &Arc<FakeStore>) -> Bandwidth {
        let leases = Leases {
            leaser: store.clone(),
            slice: 0.1,
        };
        Bandwidth::new(Some(1000), [], Arc::default(), Some(leases))
    }

    /// Alice's connection under 1000 B/s in slices of 100, leased from `store`, which
    /// answers `answers` first.
    fn alice(
        store: FakeStore,
        answers: impl IntoIterator<Item = Result<BudgetLease, ()>>,
    ) -> (Arc<FakeStore>, Pacer) {
        store.answers.lock().extend(answers);
        let store = Arc::new(store);
        let pacer = leased_bandwidth(&store).pacer(Some("alice"), "default");
        (store, pacer.unwrap())
    }

    /// What the relay does: reserve, then wait until the bytes are covered.
    async fn move_bytes(p: &Pacer, n: usize) {
        let mut wait = p.reserve(n);
        while !wait.is_zero() {
            tokio::time::sleep(wait).await;
            wait = p.pending();
        }
    }

    fn account(p: &Pacer) -> parking_lot::MutexGuard<'_, LeaseAccount> {
        match &p.user.as_ref().unwrap().source {
            Source::Leased(l) => l.account.lock(),
            Source::Local(_) => panic!("a local bucket"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leased_bytes_move_once_leased_and_the_lease_task_ends() {
        let store = Arc::new(FakeStore::default());
        let bw = leased_bandwidth(&store);
        let a1 = bw.pacer(Some("alice"), "default").unwrap();
        let a2 = bw.pacer(Some("alice"), "default").unwrap();
        assert!(a1.reserve(150) > Duration::ZERO, "nothing leased yet");
        assert!(a2.reserve(50) > Duration::ZERO);
        tokio::join!(move_bytes(&a1, 0), move_bytes(&a2, 0));
        assert_eq!(a1.pending(), Duration::ZERO);
        assert_eq!(a2.pending(), Duration::ZERO);
        tokio::time::sleep(ms(10)).await;
        {
            let acct = account(&a1);
            assert!(!acct.leasing, "the task ended with a slice in hand");
            assert_eq!(acct.balance(), 100);
        }
        assert_eq!(store.max_in_flight.load(Ordering::SeqCst), 1);
        let calls = store.calls.load(Ordering::SeqCst);
        // Within the slice in hand: no store at all.
        assert_eq!(a1.reserve(40), Duration::ZERO);
        tokio::time::sleep(ms(10)).await;
        assert_eq!(store.calls.load(Ordering::SeqCst), calls);
        assert_eq!(store.without_store.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_holds_the_bytes_until_the_store_grants_again() {
        let spent = BudgetLease {
            granted: 0,
            retry_after: ms(400),
        };
        let short = BudgetLease {
            granted: 30,
            retry_after: ms(70),
        };
        let (store, p) = alice(FakeStore::default(), [Ok(spent), Ok(short)]);
        let t0 = tokio::time::Instant::now();
        move_bytes(&p, 100).await;
        // Nothing, then 30 bytes: the 100 waited for the third lease, 400 + 70 ms on.
        assert!(t0.elapsed() >= ms(470), "{:?}", t0.elapsed());
        assert_eq!(store.calls.load(Ordering::SeqCst), 3);
        assert!(account(&p).leased >= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_store_a_node_paces_itself_and_counts_each_lease() {
        // The store fails once, then is known down: no more round trips.
        let half = FakeStore {
            share: 0.5,
            ..FakeStore::default()
        };
        let (store, p) = alice(half, [Err(())]);
        let t0 = tokio::time::Instant::now();
        move_bytes(&p, 500).await;
        // 500 B/s with 50 bytes of burst: the 600 bytes asked (the debt and a slice)
        // came 1.1 s on.
        assert!(t0.elapsed() >= ms(1100), "{:?}", t0.elapsed());
        assert_eq!(store.without_store.load(Ordering::SeqCst), 1);
        store.down.store(true, Ordering::SeqCst);
        move_bytes(&p, 200).await;
        assert_eq!(
            store.calls.load(Ordering::SeqCst),
            1,
            "known down: not asked"
        );
        assert_eq!(store.without_store.load(Ordering::SeqCst), 2);
        // Back: the store is asked again.
        store.down.store(false, Ordering::SeqCst);
        move_bytes(&p, 200).await;
        assert_eq!(store.calls.load(Ordering::SeqCst), 2);
        assert_eq!(store.without_store.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_in_flight_keeps_no_user_bucket_alive() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let store = Arc::new(FakeStore {
            hold: Some(gate.clone()),
            ..FakeStore::default()
        });
        let bw = leased_bandwidth(&store);
        let p = bw.pacer(Some("alice"), "default").unwrap();
        assert!(p.reserve(10) > Duration::ZERO);
        tokio::time::sleep(ms(1)).await;
        assert_eq!(
            store.in_flight.load(Ordering::SeqCst),
            1,
            "the lease is out"
        );
        let bucket = Arc::downgrade(p.user.as_ref().unwrap());
        drop(p);
        assert!(bucket.upgrade().is_none(), "gone with its last connection");
        gate.add_permits(100);
        tokio::time::sleep(ms(1000)).await;
        assert_eq!(store.calls.load(Ordering::SeqCst), 1, "and its task ended");
        assert_eq!(store.in_flight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_lease_that_could_not_start_starts_when_the_relay_looks_again() {
        let store = Arc::new(FakeStore::default());
        let bw = leased_bandwidth(&store);
        let p = bw.pacer(Some("alice"), "default").unwrap();
        assert!(p.reserve(10) > Duration::ZERO, "no runtime: no lease yet");
        assert!(!account(&p).leasing);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut wait = p.pending();
            while !wait.is_zero() {
                tokio::time::sleep(wait).await;
                wait = p.pending();
            }
        });
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    }
}
