//! Live agent sessions, by client id. A proxy user's connection picks the least-loaded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::tunnel::table::ShardedMap;
use crate::tunnel::SessionCore;

pub struct AgentHandle {
    pub client_id: String,
    /// Distinguishes successive sessions of one client id.
    pub serial: u64,
    pub remote: SocketAddr,
    pub core: Arc<SessionCore>,
}

#[derive(Default)]
pub struct AgentRegistry {
    sessions: ShardedMap<String, Arc<AgentHandle>>,
    serials: AtomicU64,
}

impl AgentRegistry {
    pub fn next_serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers a session; returns the one it replaces (same client id), which the
    /// caller must shut down.
    pub fn register(&self, handle: Arc<AgentHandle>) -> Option<Arc<AgentHandle>> {
        self.sessions.insert(handle.client_id.clone(), handle)
    }

    /// Removes the session only if it is still the registered one, so that a replaced
    /// session's cleanup cannot remove its successor.
    pub fn unregister(&self, client_id: &str, serial: u64) {
        self.sessions
            .remove_if(&client_id.to_owned(), |h| h.serial == serial);
    }

    /// The live session carrying the fewest connections.
    pub fn pick(&self) -> Option<Arc<AgentHandle>> {
        self.sessions
            .values()
            .into_iter()
            .filter(|h| !h.core.is_closed())
            .min_by_key(|h| h.core.active_conns())
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}
