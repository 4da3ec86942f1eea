//! The agent's gateway sessions, one row per (gateway address, replica) for as long as
//! the agent keeps that session: what it is doing now, since when, how often it
//! reconnected and why it last failed. Its supervisor owns the row; dropping it
//! removes the row.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use crate::tunnel::SessionCore;

/// What one gateway session is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// The gateway's name has no address yet (the row has none either).
    Resolving,
    /// Connecting, handshaking or authenticating.
    Connecting,
    /// Authenticated: taking connections.
    Connected,
    /// Waiting before the next attempt.
    Backoff,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Resolving => "resolving",
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Backoff => "backoff",
        }
    }
}

/// One gateway session as `/api/status` shows it.
#[derive(Serialize, Debug, Clone)]
pub struct LinkStatus {
    /// The gateway as configured (`host:port`).
    pub gateway: String,
    /// The address this session dials; null while the name has none.
    pub address: Option<String>,
    pub client_id: String,
    pub replica: usize,
    pub state: LinkState,
    /// Seconds in `state`.
    pub state_secs: u64,
    /// Seconds since the session authenticated; null unless connected.
    pub connected_secs: Option<u64>,
    /// Sessions ended or attempts failed so far.
    pub reconnects: u64,
    pub last_error: Option<String>,
}

struct Inner {
    state: LinkState,
    since: Instant,
    core: Option<Arc<SessionCore>>,
    reconnects: u64,
    last_error: Option<String>,
}

struct Link {
    gateway: Arc<str>,
    address: Option<SocketAddr>,
    client_id: String,
    replica: usize,
    inner: Mutex<Inner>,
}

/// Every gateway session of the agent.
#[derive(Default)]
pub struct Links {
    rows: Mutex<BTreeMap<u64, Arc<Link>>>,
    next: AtomicU64,
}

/// A connected session: its row's identity and its core.
pub struct LiveLink {
    pub gateway: Arc<str>,
    pub address: Option<SocketAddr>,
    pub client_id: String,
    pub core: Arc<SessionCore>,
}

/// One row, present while this is held.
pub struct LinkRow {
    table: Arc<Links>,
    id: u64,
    link: Arc<Link>,
}

impl Links {
    /// Adds a row in `state`.
    pub fn add(
        self: &Arc<Self>,
        gateway: Arc<str>,
        address: Option<SocketAddr>,
        client_id: &str,
        replica: usize,
        state: LinkState,
    ) -> LinkRow {
        let link = Arc::new(Link {
            gateway,
            address,
            client_id: client_id.to_owned(),
            replica,
            inner: Mutex::new(Inner {
                state,
                since: Instant::now(),
                core: None,
                reconnects: 0,
                last_error: None,
            }),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.rows.lock().insert(id, link.clone());
        LinkRow {
            table: self.clone(),
            id,
            link,
        }
    }

    fn sorted(&self) -> Vec<Arc<Link>> {
        let mut links: Vec<_> = self.rows.lock().values().cloned().collect();
        links.sort_by(|a, b| {
            (&a.gateway, a.address, a.replica).cmp(&(&b.gateway, b.address, b.replica))
        });
        links
    }

    /// Every row, by gateway, address and replica.
    pub fn status(&self) -> Vec<LinkStatus> {
        self.sorted()
            .iter()
            .map(|l| {
                let i = l.inner.lock();
                LinkStatus {
                    gateway: l.gateway.to_string(),
                    address: l.address.map(|a| a.to_string()),
                    client_id: l.client_id.clone(),
                    replica: l.replica,
                    state: i.state,
                    state_secs: i.since.elapsed().as_secs(),
                    connected_secs: (i.state == LinkState::Connected)
                        .then(|| i.since.elapsed().as_secs()),
                    reconnects: i.reconnects,
                    last_error: i.last_error.clone(),
                }
            })
            .collect()
    }

    /// The connected sessions, in the same order.
    pub fn live(&self) -> Vec<LiveLink> {
        self.sorted()
            .iter()
            .filter_map(|l| {
                let core = l.inner.lock().core.clone()?;
                Some(LiveLink {
                    gateway: l.gateway.clone(),
                    address: l.address,
                    client_id: l.client_id.clone(),
                    core,
                })
            })
            .collect()
    }
}

impl LinkRow {
    fn set(&self, state: LinkState, core: Option<Arc<SessionCore>>) {
        let mut i = self.link.inner.lock();
        i.state = state;
        i.since = Instant::now();
        i.core = core;
    }

    pub fn connecting(&self) {
        self.set(LinkState::Connecting, None);
    }

    pub fn connected(&self, core: Arc<SessionCore>) {
        self.set(LinkState::Connected, Some(core));
    }

    /// The session ended or the attempt failed; the next one waits.
    pub fn backoff(&self, error: Option<String>) {
        self.set(LinkState::Backoff, None);
        let mut i = self.link.inner.lock();
        i.reconnects += 1;
        if error.is_some() {
            i.last_error = error;
        }
    }

    /// The name could not be resolved (a row without an address).
    pub fn unresolved(&self, error: String) {
        self.set(LinkState::Resolving, None);
        self.link.inner.lock().last_error = Some(error);
    }
}

impl Drop for LinkRow {
    fn drop(&mut self) {
        self.table.rows.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_lives_as_long_as_its_owner_and_counts_reconnects() {
        let links = Arc::new(Links::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let row = links.add("gw:1".into(), Some(addr), "c", 0, LinkState::Connecting);
        let _other = links.add("gw:1".into(), None, "c", 0, LinkState::Resolving);
        row.backoff(Some("refused".into()));
        row.connecting();
        let s = links.status();
        assert_eq!(s.len(), 2);
        let mine = s.iter().find(|r| r.address.is_some()).unwrap();
        assert_eq!(mine.state, LinkState::Connecting);
        assert_eq!(mine.reconnects, 1);
        assert_eq!(mine.last_error.as_deref(), Some("refused"));
        assert!(links.live().is_empty());
        drop(row);
        assert_eq!(links.status().len(), 1);
    }
}
