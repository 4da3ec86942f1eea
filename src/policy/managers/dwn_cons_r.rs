//! `dwnConsR`: per-user download quotas, the sum of the user's groups' `groupQuota`.
//!
//! All connections of a user share one `Counter` (atomics behind an `Arc`), so the quota
//! holds across concurrent downloads. A relay calls `QuotaHandle::consume` for each read
//! before forwarding it; the counter never passes the quota, and the read that would
//! cross it learns how many of its bytes still fit, so the user receives exactly the quota.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::time_span::unix_ns;
use super::user_db::UserDb;
use crate::policy::config::DwnConsRConf;
use crate::policy::error::{At, PolicyConfigError};
use crate::policy::persist::{format_time, parse_time, read_json, write_json};

#[derive(Debug)]
pub struct Counter {
    /// In a cluster: the cluster's total as last read, plus this node's unflushed bytes.
    used: AtomicU64,
    /// Set again by a reload that changes the user's groups or the group quotas.
    quota: AtomicU64,
    /// In a cluster: bytes this node counted that the store has not been told yet.
    unflushed: AtomicU64,
    flush: Option<Arc<FlushSignal>>,
}

/// A flush to the store starts when this many bytes are pending on a node (or at the
/// next sync period, whichever comes first).
pub const FLUSH_BATCH: u64 = 1 << 20;

/// What the data path tells the cluster sync: bytes are pending. Synchronous and
/// lock-free (an atomic add, and a `Notify` once a batch is pending).
#[derive(Debug, Default)]
pub struct FlushSignal {
    pending: AtomicU64,
    pub notify: tokio::sync::Notify,
}

impl FlushSignal {
    fn add(&self, n: u64) {
        let before = self.pending.fetch_add(n, Ordering::Relaxed);
        if before < FLUSH_BATCH && before + n >= FLUSH_BATCH {
            self.notify.notify_one();
        }
    }

    fn sub(&self, n: u64) {
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(n))
            });
    }
}

/// One user's share of a `dwnConsR`, handed to every connection the rules let through it.
#[derive(Clone, Debug)]
pub struct QuotaHandle {
    counter: Arc<Counter>,
    user: Arc<str>,
    manager: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("download quota of {user:?} in dwnConsR {manager:?} reached ({}); {allowed} bytes of this read fitted", human_bytes(*.quota))]
pub struct QuotaExceeded {
    pub user: String,
    pub manager: String,
    pub quota: u64,
    /// Bytes of the refused read that still fitted: forward these, then cut.
    pub allowed: u64,
}

impl Counter {
    fn counted(&self, n: u64) {
        if let (Some(flush), true) = (&self.flush, n > 0) {
            self.unflushed.fetch_add(n, Ordering::Relaxed);
            flush.add(n);
        }
    }
}

impl QuotaHandle {
    pub fn consume(&self, n: u64) -> Result<(), QuotaExceeded> {
        let quota = self.counter.quota.load(Ordering::Relaxed);
        let mut cur = self.counter.used.load(Ordering::Relaxed);
        loop {
            let take = n.min(quota.saturating_sub(cur));
            match self.counter.used.compare_exchange_weak(
                cur,
                cur + take,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) if take == n => {
                    self.counter.counted(take);
                    return Ok(());
                }
                Ok(_) => {
                    self.counter.counted(take);
                    return Err(QuotaExceeded {
                        user: self.user.to_string(),
                        manager: self.manager.to_string(),
                        quota,
                        allowed: take,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn used(&self) -> u64 {
        self.counter.used.load(Ordering::Relaxed)
    }

    pub fn quota(&self) -> u64 {
        self.counter.quota.load(Ordering::Relaxed)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn manager(&self) -> &str {
        &self.manager
    }
}

/// One user's consumption in one `dwnConsR`, as the status page shows it.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct QuotaUsage {
    pub manager: String,
    pub user: String,
    pub used: u64,
    pub quota: u64,
    /// When this cycle's consumptions go back to zero, Unix seconds.
    pub next_reset_unix: u64,
}

/// The state file, field names as the upstream's `consMap`.
#[derive(Serialize, Deserialize)]
struct ConsMap {
    #[serde(rename = "lastReset")]
    last_reset: String,
    consumptions: BTreeMap<String, u64>,
}

struct State {
    last_reset: SystemTime,
    users: HashMap<Arc<str>, Arc<Counter>>,
}

pub struct DwnConsR {
    name: Arc<str>,
    user_db: Arc<UserDb>,
    cycle: Duration,
    group_quota: BTreeMap<String, u64>,
    /// Shared with the same-named manager a reload replaces this one with: live
    /// connections' handles keep counting into the counters the new one reads.
    state: Arc<Mutex<State>>,
    /// Checked without the lock on every decision; only a due reset takes it.
    next_reset_ns: AtomicI64,
    state_file: Option<PathBuf>,
    /// Set in a cluster: counters note what the store has not been told.
    flush: Option<Arc<FlushSignal>>,
}

impl DwnConsR {
    pub fn from_conf(
        file: &str,
        c: &DwnConsRConf,
        user_db: Arc<UserDb>,
        state_dir: Option<&Path>,
        now: SystemTime,
        flush: Option<Arc<FlushSignal>>,
    ) -> Result<DwnConsR, PolicyConfigError> {
        check_cycle(file, c)?;
        let state_file = state_dir.map(|d| d.join(format!("{}.json", c.name)));
        let mut state = State {
            last_reset: now,
            users: HashMap::new(),
        };
        let mut loaded = BTreeMap::new();
        if let Some(path) = &state_file {
            if let Some(map) = read_json::<ConsMap>(path)? {
                state.last_reset =
                    parse_time(&map.last_reset).ok_or_else(|| PolicyConfigError::State {
                        path: path.clone(),
                        message: format!("lastReset: {:?} is not an RFC 3339 time", map.last_reset),
                    })?;
                loaded = map.consumptions;
            }
        }
        let m = DwnConsR::with_state(c, user_db, Arc::new(Mutex::new(state)), state_file, flush);
        {
            let mut st = m.state.lock();
            for (user, used) in loaded {
                let counter = m.new_counter(&user);
                counter.used.store(used, Ordering::Relaxed);
                st.users.insert(Arc::from(user.as_str()), counter);
            }
            m.store_next_reset(&st);
        }
        m.maybe_reset(now);
        Ok(m)
    }

    /// A reload's replacement for `self`: the new configuration over the same counters
    /// (spent quotas and the cycle's start kept; memory is newer than the state file),
    /// each counter's quota set again from the new groups and group quotas.
    pub fn reconfigured(
        &self,
        file: &str,
        c: &DwnConsRConf,
        user_db: Arc<UserDb>,
        state_dir: Option<&Path>,
        now: SystemTime,
        flush: Option<Arc<FlushSignal>>,
    ) -> Result<DwnConsR, PolicyConfigError> {
        check_cycle(file, c)?;
        let state_file = state_dir.map(|d| d.join(format!("{}.json", c.name)));
        let m = DwnConsR::with_state(c, user_db, self.state.clone(), state_file, flush);
        {
            let st = m.state.lock();
            for (user, counter) in &st.users {
                counter.quota.store(m.quota_of(user), Ordering::Relaxed);
            }
            m.store_next_reset(&st);
        }
        m.maybe_reset(now);
        Ok(m)
    }

    fn with_state(
        c: &DwnConsRConf,
        user_db: Arc<UserDb>,
        state: Arc<Mutex<State>>,
        state_file: Option<PathBuf>,
        flush: Option<Arc<FlushSignal>>,
    ) -> DwnConsR {
        DwnConsR {
            name: Arc::from(c.name.as_str()),
            user_db,
            cycle: c.reset_cycle.0,
            group_quota: c
                .group_quota
                .iter()
                .map(|(g, q)| (g.clone(), q.0))
                .collect(),
            state,
            next_reset_ns: AtomicI64::new(0),
            state_file,
            flush,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn user_db(&self) -> &Arc<UserDb> {
        &self.user_db
    }

    pub fn quota_of(&self, user: &str) -> u64 {
        self.user_db
            .groups(user)
            .iter()
            .filter_map(|g| self.group_quota.get(g))
            .fold(0u64, |a, q| a.saturating_add(*q))
    }

    fn new_counter(&self, user: &str) -> Arc<Counter> {
        Arc::new(Counter {
            used: AtomicU64::new(0),
            quota: AtomicU64::new(self.quota_of(user)),
            unflushed: AtomicU64::new(0),
            flush: self.flush.clone(),
        })
    }

    fn store_next_reset(&self, st: &State) {
        let next = unix_ns(st.last_reset).saturating_add(self.cycle.as_nanos() as i128);
        self.next_reset_ns.store(
            next.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
            Ordering::Relaxed,
        );
    }

    /// Resets by whole cycles: `lastReset` moves forward by a multiple of `resetCycle`, so
    /// the cycle boundaries stay where they were however late the check runs.
    pub fn maybe_reset(&self, now: SystemTime) {
        if (unix_ns(now)) < self.next_reset_ns.load(Ordering::Relaxed) as i128 {
            return;
        }
        let mut st = self.state.lock();
        let elapsed = match now.duration_since(st.last_reset) {
            Ok(d) if d >= self.cycle => d,
            _ => return,
        };
        let cycles = elapsed.as_nanos() / self.cycle.as_nanos();
        let advance = self.cycle.as_nanos().saturating_mul(cycles);
        if let Some(t) = u64::try_from(advance)
            .ok()
            .and_then(|ns| st.last_reset.checked_add(Duration::from_nanos(ns)))
        {
            st.last_reset = t;
        }
        for c in st.users.values() {
            c.used.store(0, Ordering::Relaxed);
            // Bytes of the cycle that ended: the store starts the new one from zero.
            let dropped = c.unflushed.swap(0, Ordering::Relaxed);
            if let Some(f) = &self.flush {
                f.sub(dropped);
            }
        }
        self.store_next_reset(&st);
        tracing::info!(dwnConsR = %self.name, "consumptions reset");
    }

    /// The user's shared counter, created on first use (quota 0 if no group has one).
    pub fn handle(&self, user: &str, now: SystemTime) -> QuotaHandle {
        self.maybe_reset(now);
        let mut st = self.state.lock();
        let (user, counter) = match st.users.get_key_value(user) {
            Some((u, c)) => (u.clone(), c.clone()),
            None => {
                let u: Arc<str> = Arc::from(user);
                let c = self.new_counter(user);
                st.users.insert(u.clone(), c.clone());
                (u, c)
            }
        };
        QuotaHandle {
            counter,
            user,
            manager: self.name.clone(),
        }
    }

    pub fn set_consumption(&self, user: &str, used: u64, now: SystemTime) {
        self.handle(user, now)
            .counter
            .used
            .store(used, Ordering::Relaxed);
    }

    /// In a cluster: takes every counter's unflushed bytes, to be sent to the store.
    pub(crate) fn take_deltas(&self) -> Vec<(String, u64)> {
        let st = self.state.lock();
        let out: Vec<(String, u64)> = st
            .users
            .iter()
            .map(|(u, c)| (u.to_string(), c.unflushed.swap(0, Ordering::Relaxed)))
            .filter(|(_, d)| *d > 0)
            .collect();
        if let Some(f) = &self.flush {
            f.sub(out.iter().map(|(_, d)| d).sum());
        }
        out
    }

    /// Gives back deltas the store did not take, for the next flush.
    pub(crate) fn restore_deltas(&self, deltas: &[(String, u64)]) {
        let st = self.state.lock();
        for (user, d) in deltas {
            if let Some(c) = st.users.get(user.as_str()) {
                c.unflushed.fetch_add(*d, Ordering::Relaxed);
                if let Some(f) = &self.flush {
                    f.add(*d);
                }
            }
        }
    }

    /// Takes the store's view: its cycle start (when it differs, this node's cycle
    /// follows it and its counters restart) and the cluster's totals; each counter
    /// becomes the cluster total plus what this node has not flushed yet.
    pub(crate) fn apply_totals(&self, last_reset: SystemTime, totals: &HashMap<String, u64>) {
        let mut st = self.state.lock();
        if st.last_reset != last_reset {
            st.last_reset = last_reset;
            for c in st.users.values() {
                let dropped = c.unflushed.swap(0, Ordering::Relaxed);
                if let Some(f) = &self.flush {
                    f.sub(dropped);
                }
            }
            self.store_next_reset(&st);
        }
        for user in totals.keys() {
            if !st.users.contains_key(user.as_str()) {
                let c = self.new_counter(user);
                st.users.insert(Arc::from(user.as_str()), c);
            }
        }
        for (user, c) in &st.users {
            let total = totals.get(&**user).copied().unwrap_or(0);
            let local = c.unflushed.load(Ordering::Relaxed);
            c.used.store(total.saturating_add(local), Ordering::Relaxed);
        }
    }

    /// Forgets this node's unflushed bytes of `user` (an administrator's `set` replaced
    /// the total).
    pub(crate) fn clear_unflushed(&self, user: &str) {
        let st = self.state.lock();
        if let Some(c) = st.users.get(user) {
            let dropped = c.unflushed.swap(0, Ordering::Relaxed);
            if let Some(f) = &self.flush {
                f.sub(dropped);
            }
        }
    }

    pub fn last_reset(&self) -> SystemTime {
        self.state.lock().last_reset
    }

    pub fn cycle(&self) -> Duration {
        self.cycle
    }

    pub fn group_quota(&self) -> &BTreeMap<String, u64> {
        &self.group_quota
    }

    pub fn consumptions(&self) -> BTreeMap<String, u64> {
        let st = self.state.lock();
        st.users
            .iter()
            .map(|(u, c)| (u.to_string(), c.used.load(Ordering::Relaxed)))
            .filter(|(_, used)| *used > 0)
            .collect()
    }

    /// Every user who has a counter this cycle, most used first.
    pub fn usage(&self, now: SystemTime) -> Vec<QuotaUsage> {
        self.maybe_reset(now);
        let st = self.state.lock();
        let next_reset = st.last_reset + self.cycle;
        let mut rows: Vec<QuotaUsage> = st
            .users
            .iter()
            .map(|(u, c)| QuotaUsage {
                manager: self.name.to_string(),
                user: u.to_string(),
                used: c.used.load(Ordering::Relaxed),
                quota: c.quota.load(Ordering::Relaxed),
                next_reset_unix: next_reset
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            })
            .collect();
        drop(st);
        rows.sort_by(|a, b| b.used.cmp(&a.used).then_with(|| a.user.cmp(&b.user)));
        rows
    }

    pub fn persist(&self) -> std::io::Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let map = ConsMap {
            last_reset: format_time(self.last_reset()),
            consumptions: self.consumptions(),
        };
        write_json(path, &map)
    }
}

/// `1073741824` → `1.0 GiB`: binary units, as the configuration is read.
fn check_cycle(file: &str, c: &DwnConsRConf) -> Result<(), PolicyConfigError> {
    if c.reset_cycle.0.is_zero() {
        let at = At {
            file,
            section: "[[dwnConsR]]",
            name: &c.name,
        };
        return Err(at.err("resetCycle", "must be longer than 0 (e.g. \"24h\")"));
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests;
