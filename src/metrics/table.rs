//! Sessions by (group, agent) for the collectors: the live sessions' counters are read
//! at scrape time, and a session that ends folds its final counters into its series,
//! so exported counters never go backwards when an agent reconnects.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::tunnel::stats::StatsSnapshot;
use crate::tunnel::SessionCore;

/// Series (group, agent) kept at most. Agents choose their client ids, so beyond this
/// new ids share the agent label [`OTHER`] and the scrape stays bounded.
pub const MAX_SERIES: usize = 256;
pub const OTHER: &str = "_other";

pub type Key = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Series {
    live: Vec<(u64, Arc<SessionCore>)>,
    retired: StatsSnapshot,
}

#[derive(Default)]
pub struct SessionTable {
    series: Mutex<BTreeMap<Key, Series>>,
    next: AtomicU64,
}

/// One series at scrape time: the ended sessions' counters plus the live ones'.
pub struct Row {
    pub group: Arc<str>,
    pub agent: Arc<str>,
    pub stats: StatsSnapshot,
    pub live: Vec<Arc<SessionCore>>,
}

/// Keeps a session in its series; dropping it folds the session's counters into the
/// series' totals.
pub struct Attached {
    table: Arc<SessionTable>,
    key: Key,
    id: u64,
}

impl SessionTable {
    pub fn attach(self: &Arc<Self>, group: &str, agent: &str, core: Arc<SessionCore>) -> Attached {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut series = self.series.lock();
        let mut key: Key = (Arc::from(group), Arc::from(agent));
        if !series.contains_key(&key) && series.len() >= MAX_SERIES {
            key.1 = Arc::from(OTHER);
        }
        series.entry(key.clone()).or_default().live.push((id, core));
        Attached {
            table: self.clone(),
            key,
            id,
        }
    }

    pub fn rows(&self) -> Vec<Row> {
        let series = self.series.lock();
        series
            .iter()
            .map(|((group, agent), s)| {
                let mut stats = s.retired.clone();
                for (_, core) in &s.live {
                    stats.add(&core.stats().snapshot());
                }
                Row {
                    group: group.clone(),
                    agent: agent.clone(),
                    stats,
                    live: s.live.iter().map(|(_, c)| c.clone()).collect(),
                }
            })
            .collect()
    }

    /// Sessions currently attached.
    pub fn live_sessions(&self) -> usize {
        self.series.lock().values().map(|s| s.live.len()).sum()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut series = self.table.series.lock();
        if let Some(s) = series.get_mut(&self.key) {
            if let Some(i) = s.live.iter().position(|(id, _)| *id == self.id) {
                let (_, core) = s.live.swap_remove(i);
                s.retired.add(&core.stats().snapshot());
            }
        }
    }
}

/// Sum of every row's counters.
pub fn total(rows: &[Row]) -> StatsSnapshot {
    let mut t = StatsSnapshot::default();
    for r in rows {
        t.add(&r.stats);
    }
    t
}
