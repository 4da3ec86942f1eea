//! The agent's `open_ports`, kept in step with the configuration file.
//!
//! The sessions that own the forwards (replica 0 of each gateway) register here; each
//! gets the ports wanted now and, after a reload, the ports added or retargeted, all
//! through one queue per session so that they reach the gateway in the order decided.
//! A port a reload removes is withdrawn (`unforward`) on those sessions; later sessions
//! do not ask for it.

use std::collections::{BTreeMap, HashMap};

use anyproxy_proto::{Forward, Message, Unforward};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::config::OpenPort;
use crate::tunnel::SessionCore;

/// A port forward's identity: its number and protocol (separate port spaces).
type Key = (u16, &'static str);

fn key(p: &OpenPort) -> Key {
    (p.remote_port, p.protocol.as_str())
}

fn request(p: &OpenPort) -> Message {
    Message::Forward(Forward {
        listen_port: p.remote_port,
        target_host: p.target.host.clone(),
        target_port: p.target.port,
        protocol: p.protocol,
    })
}

fn withdrawal(p: &OpenPort) -> Message {
    Message::Unforward(Unforward {
        listen_port: p.remote_port,
        protocol: p.protocol,
    })
}

struct Inner {
    wanted: Vec<OpenPort>,
    next: u64,
    /// The queue of every session that owns forwards: `forward` and `unforward`
    /// requests, in the order the reloads decided them.
    sessions: HashMap<u64, UnboundedSender<Message>>,
}

pub(super) struct Forwards(parking_lot::Mutex<Inner>);

/// A session's place in [`Forwards`]; it leaves when dropped.
pub(super) struct Registered<'a> {
    forwards: &'a Forwards,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.forwards.0.lock().sessions.remove(&self.id);
    }
}

impl Forwards {
    pub fn new(ports: &[OpenPort]) -> Forwards {
        Forwards(parking_lot::Mutex::new(Inner {
            wanted: ports.to_vec(),
            next: 0,
            sessions: HashMap::new(),
        }))
    }

    /// Registers a session that owns forwards: its queue starts with every port
    /// wanted now. Under the same lock as [`Forwards::set`], so it misses no change.
    pub fn register(&self) -> (Registered<'_>, UnboundedReceiver<Message>) {
        let (tx, rx) = unbounded_channel();
        let mut inner = self.0.lock();
        for p in &inner.wanted {
            let _ = tx.send(request(p));
        }
        let id = inner.next;
        inner.next += 1;
        inner.sessions.insert(id, tx);
        (Registered { forwards: self, id }, rx)
    }

    /// Makes `next` the ports wanted: those added or retargeted are asked for on every
    /// registered session (the gateway takes a port over from the same agent), those
    /// removed are withdrawn there. One log line per port added, retargeted or removed.
    pub fn set(&self, next: &[OpenPort]) {
        let mut inner = self.0.lock();
        let was: BTreeMap<Key, &OpenPort> = inner.wanted.iter().map(|p| (key(p), p)).collect();
        let now: BTreeMap<Key, &OpenPort> = next.iter().map(|p| (key(p), p)).collect();
        let mut ask = Vec::new();
        for (k, p) in &now {
            match was.get(k) {
                None => {
                    tracing::info!(port = k.0, protocol = k.1, target = %p.target, "open port added: asking the gateway");
                    ask.push(request(p));
                }
                Some(old) if old.target != p.target => {
                    tracing::info!(port = k.0, protocol = k.1, target = %p.target, was = %old.target, "open port retargeted: asking the gateway again");
                    ask.push(request(p));
                }
                Some(_) => {}
            }
        }
        for (k, p) in &was {
            if !now.contains_key(k) {
                tracing::info!(port = k.0, protocol = k.1, target = %p.target, "open port removed: asking the gateway to withdraw it");
                ask.push(withdrawal(p));
            }
        }
        for tx in inner.sessions.values() {
            for m in &ask {
                let _ = tx.send(m.clone());
            }
        }
        inner.wanted = next.to_vec();
    }
}

/// Sends a session's forward requests and withdrawals as they come, until the
/// session ends or its registration is dropped.
pub(super) async fn announce(
    core: std::sync::Arc<SessionCore>,
    mut queue: UnboundedReceiver<Message>,
) {
    let mut warned = false;
    while let Some(m) = queue.recv().await {
        if !core.flow_controlled() {
            if !warned {
                tracing::error!("open_ports needs the binary encoding; the gateway chose JSON");
                warned = true;
            }
            continue;
        }
        if core.send(m).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(remote_port: u16, target: &str) -> OpenPort {
        OpenPort {
            remote_port,
            target: target.parse().unwrap(),
            protocol: anyproxy_proto::Protocol::Tcp,
        }
    }

    /// Each request as (port, target port), a withdrawal as (port, 0).
    fn drain(queue: &mut UnboundedReceiver<Message>) -> Vec<(u16, u16)> {
        std::iter::from_fn(|| queue.try_recv().ok())
            .map(|m| match m {
                Message::Forward(f) => (f.listen_port, f.target_port),
                Message::Unforward(u) => (u.listen_port, 0),
                other => panic!("{other:?} in a forwards queue"),
            })
            .collect()
    }

    #[test]
    fn a_session_gets_what_is_wanted_then_what_a_reload_adds_retargets_or_withdraws() {
        let forwards = Forwards::new(&[port(1, "h:10"), port(2, "h:20")]);
        let (registered, mut queue) = forwards.register();
        assert_eq!(drain(&mut queue), [(1, 10), (2, 20)]);
        forwards.set(&[port(2, "h:21"), port(3, "h:30"), port(1, "h:10")]);
        assert_eq!(drain(&mut queue), [(2, 21), (3, 30)]);
        // Removed ports are withdrawn; a session registered now gets the new set only.
        forwards.set(&[port(3, "h:30")]);
        assert_eq!(drain(&mut queue), [(1, 0), (2, 0)]);
        let (_later, mut later) = forwards.register();
        assert_eq!(drain(&mut later), [(3, 30)]);
        drop(registered);
        assert!(
            queue.try_recv().is_err(),
            "its queue ends with its registration"
        );
        assert_eq!(forwards.0.lock().sessions.len(), 1);
    }
}
