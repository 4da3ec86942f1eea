//! Live agent sessions, by group and client id. A proxy user's connection picks the
//! least-loaded live session of the user's group.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::tunnel::SessionCore;

pub struct AgentHandle {
    pub group: Arc<str>,
    pub client_id: String,
    /// Distinguishes successive sessions of one client id.
    pub serial: u64,
    pub remote: SocketAddr,
    pub core: Arc<SessionCore>,
}

/// Sessions per group. Read on every user connection, written when agents come and go,
/// so a read-mostly lock; groups hold few sessions, so a scan picks.
#[derive(Default)]
pub struct AgentRegistry {
    groups: RwLock<HashMap<Arc<str>, Vec<Arc<AgentHandle>>>>,
    serials: AtomicU64,
}

impl AgentRegistry {
    pub fn next_serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session; returns the one it replaces (same group and client id),
    /// which the caller must shut down.
    pub fn register(&self, handle: Arc<AgentHandle>) -> Option<Arc<AgentHandle>> {
        let mut groups = self.groups.write();
        let sessions = groups.entry(handle.group.clone()).or_default();
        let old = sessions
            .iter()
            .position(|h| h.client_id == handle.client_id)
            .map(|i| sessions.swap_remove(i));
        sessions.push(handle);
        old
    }

    /// Removes the session only if it is still the registered one, so that a replaced
    /// session's cleanup cannot remove its successor.
    pub fn unregister(&self, handle: &AgentHandle) {
        let mut groups = self.groups.write();
        if let Some(sessions) = groups.get_mut(&handle.group) {
            sessions.retain(|h| h.serial != handle.serial);
            if sessions.is_empty() {
                groups.remove(&handle.group);
            }
        }
    }

    /// The live session of `group` carrying the fewest connections, skipping the
    /// sessions in `skip` (serials already tried for this request).
    pub fn pick(&self, group: &str, skip: &[u64]) -> Option<Arc<AgentHandle>> {
        self.groups
            .read()
            .get(group)?
            .iter()
            .filter(|h| !h.core.is_closed() && !skip.contains(&h.serial))
            .min_by_key(|h| h.core.active_conns())
            .cloned()
    }

    /// Sessions in every group.
    pub fn len(&self) -> usize {
        self.groups.read().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every group's sessions, groups sorted, for metrics and the status page.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Vec<Arc<AgentHandle>>)> {
        let mut all: Vec<_> = self
            .groups
            .read()
            .iter()
            .map(|(g, s)| (g.clone(), s.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Live sessions per group, for status and logs.
    pub fn group_sizes(&self) -> Vec<(Arc<str>, usize)> {
        let mut sizes: Vec<_> = self
            .groups
            .read()
            .iter()
            .map(|(g, s)| (g.clone(), s.len()))
            .collect();
        sizes.sort();
        sizes
    }
}

impl crate::metrics::AgentDirectory for AgentRegistry {
    fn sessions(&self) -> Vec<(Arc<str>, Vec<crate::metrics::AgentSession>)> {
        self.snapshot()
            .into_iter()
            .map(|(group, handles)| {
                let sessions = handles
                    .iter()
                    .map(|h| crate::metrics::AgentSession {
                        client_id: h.client_id.clone(),
                        remote: h.remote,
                        core: h.core.clone(),
                    })
                    .collect();
                (group, sessions)
            })
            .collect()
    }

    fn live(&self) -> usize {
        self.len()
    }
}

impl crate::cluster::NodeReport for AgentRegistry {
    /// One entry per client id and group, with its session count (replicas of one
    /// agent register under one client id each).
    fn agents(&self) -> Vec<crate::cluster::NodeAgent> {
        let mut out: Vec<crate::cluster::NodeAgent> = Vec::new();
        for (group, handles) in self.snapshot() {
            for h in handles.iter().filter(|h| !h.core.is_closed()) {
                match out
                    .iter_mut()
                    .find(|a| a.client_id == h.client_id && *a.group == *group)
                {
                    Some(a) => a.sessions += 1,
                    None => out.push(crate::cluster::NodeAgent {
                        client_id: h.client_id.clone(),
                        group: group.to_string(),
                        sessions: 1,
                    }),
                }
            }
        }
        out
    }
}
