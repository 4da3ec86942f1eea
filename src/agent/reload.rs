//! SIGHUP on the agent: what a running agent takes from its configuration file without
//! dropping its sessions — what it may dial (`forbidden_hosts`, `limit`, `allow_local`,
//! `protocols`), `max_concurrent_conns`, the log level, `open_ports` (see
//! [`super::forwards`]) and the TLS files and pin (`tls_client_cert`/`tls_client_key`,
//! `gateway_tls_cert`, `gateway_tls_fingerprint`: read again at every reload, used by
//! the next connections while the sessions up keep theirs) — and the keys it names as
//! needing a restart.
//!
//! The rules live behind an [`ArcSwap`]: each `connect` loads them once, and a reload
//! swaps them whole. ACLs apply to every connection, not only at connect: every live
//! TCP connection is tracked with its target and a [`Revoke`], and a reload closes
//! those the new rules forbid (logged, and the access line says why). A reload reads
//! and checks the whole file before it changes anything: a bad file leaves the agent
//! exactly as it was.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyproxy_proto::Protocol;
use arc_swap::ArcSwap;

use super::{Agent, AgentError};
use crate::config::{ClientConfig, LevelSwitch, Protocols};
use crate::dial::acl::Acl;
use crate::net::HostPort;
use crate::transport::tls;
use crate::tunnel::Revoke;

/// What the access log says of a connection a reload closed.
const FORBIDDEN_NOW: &str = "target forbidden by the reloaded configuration";

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0} has no `client:` section")]
    NoClient(String),
    #[error("client.{0}")]
    Agent(#[from] AgentError),
    #[error("{key}: {source}")]
    Tls {
        key: &'static str,
        source: tls::TlsError,
    },
}

/// What decides, per `connect`, whether the agent dials: swapped whole by a reload.
pub(super) struct Rules {
    pub acl: Acl,
    pub protocols: Protocols,
    pub max_conns: usize,
}

impl Rules {
    pub fn new(config: &ClientConfig) -> Result<Rules, AgentError> {
        Ok(Rules {
            acl: Acl::new(&config.forbidden_hosts, &config.limit)?
                .refusing_local(!config.allow_local),
            protocols: config.protocols,
            max_conns: config.max_concurrent_conns,
        })
    }

    /// Why these rules forbid a live TCP connection to `target` at `addr`, if they do.
    fn forbids(&self, target: &HostPort, addr: SocketAddr) -> Option<String> {
        if !self.protocols.allows(Protocol::Tcp) {
            return Some(format!(
                "tcp is not in this agent's protocols {}",
                self.protocols.describe()
            ));
        }
        self.acl
            .check_name(&target.host, target.port)
            .and_then(|()| self.acl.check_addr(addr, &target.host))
            .err()
    }
}

/// A live TCP connection, as a reload sees it.
struct Tracked {
    target: HostPort,
    addr: SocketAddr,
    revoke: Revoke,
}

/// The agent's state a reload changes, and the connections it may have to close.
pub(super) struct Live {
    rules: ArcSwap<Rules>,
    /// Connections holding a place under `max_concurrent_conns`.
    active: Arc<AtomicUsize>,
    next: AtomicU64,
    /// Touched once when a connection opens and once when it ends, never per byte.
    conns: parking_lot::Mutex<HashMap<u64, Tracked>>,
    /// The configuration running, held by the reload in progress: reloads never
    /// interleave.
    running: parking_lot::Mutex<ClientConfig>,
    log: std::sync::OnceLock<Arc<dyn LevelSwitch>>,
}

/// A place under `max_concurrent_conns`, given back when dropped.
pub(super) struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tracked live connection; it leaves the table when dropped.
pub(super) struct Watched<'a> {
    live: &'a Live,
    key: u64,
    pub revoke: Revoke,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.live.conns.lock().remove(&self.key);
    }
}

impl Live {
    pub fn new(config: &ClientConfig) -> Result<Live, AgentError> {
        Ok(Live {
            rules: ArcSwap::from_pointee(Rules::new(config)?),
            active: Arc::default(),
            next: AtomicU64::new(0),
            conns: Default::default(),
            running: parking_lot::Mutex::new(config.clone()),
            log: std::sync::OnceLock::new(),
        })
    }

    /// The rules in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.load_full()
    }

    /// A place under the rules' `max_concurrent_conns`, or `None` at the cap. A cap
    /// lowered by a reload closes nothing: new connections wait until enough ended.
    pub fn admit(&self, rules: &Rules) -> Option<Place> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < rules.max_conns).then_some(n + 1)
            })
            .ok()?;
        Some(Place(self.active.clone()))
    }

    /// Tracks a connection just dialed to `target` at `addr`. Checked once more
    /// against the rules in force, after it is in the table: a reload that swapped
    /// the rules while it was being dialed either sees it in the table or is seen here.
    pub fn watch(&self, target: &HostPort, addr: SocketAddr) -> Watched<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let revoke = Revoke::new();
        self.conns.lock().insert(
            key,
            Tracked {
                target: target.clone(),
                addr,
                revoke: revoke.clone(),
            },
        );
        if let Some(why) = self.rules().forbids(target, addr) {
            tracing::warn!(%target, %addr, reason = %why, "closing a new connection the reloaded configuration forbids");
            revoke.revoke(FORBIDDEN_NOW);
        }
        Watched {
            live: self,
            key,
            revoke,
        }
    }

    /// Closes every live connection `rules` forbid; returns how many.
    fn close_forbidden(&self, rules: &Rules) -> usize {
        let conns = self.conns.lock();
        let mut closed = 0;
        for t in conns.values().filter(|t| !t.revoke.is_revoked()) {
            if let Some(why) = rules.forbids(&t.target, t.addr) {
                tracing::warn!(target = %t.target, addr = %t.addr, reason = %why, "closing a live connection the reloaded configuration forbids");
                t.revoke.revoke(FORBIDDEN_NOW);
                closed += 1;
            }
        }
        closed
    }
}

impl Agent {
    /// Makes `gateways` and `replicas` the plan the supervisors follow (see `run`),
    /// with one log line per gateway added or removed and one for the replicas.
    pub(super) fn replan(&self, gateways: Vec<Arc<super::Gateway>>, replicas: usize) {
        self.plan.send_if_modified(|plan| {
            let has = |list: &[Arc<super::Gateway>], g: &super::Gateway| {
                list.iter().any(|o| o.name == g.name)
            };
            for g in gateways.iter().filter(|g| !has(&plan.gateways, g)) {
                tracing::info!(gateway = %g.name, "gateway added: starting its sessions");
            }
            for g in plan.gateways.iter().filter(|g| !has(&gateways, g)) {
                tracing::info!(gateway = %g.name, "gateway removed: draining and closing its sessions");
            }
            if plan.replicas != replicas {
                tracing::info!(from = plan.replicas, to = replicas, "replicas changed");
            }
            let names = |list: &[Arc<super::Gateway>]| {
                list.iter().map(|g| g.name.clone()).collect::<Vec<_>>()
            };
            let changed =
                names(&plan.gateways) != names(&gateways) || plan.replicas != replicas;
            *plan = super::Plan { gateways, replicas };
            changed
        });
    }

    /// From now on a reload also applies `log.level` (unless `RUST_LOG` chose it).
    pub fn follow_log_level(&self, switch: Arc<dyn LevelSwitch>) {
        let _ = self.live.log.set(switch);
    }

    /// Reloads what can change live from the configuration file at `path` (see the
    /// README's "Reload"). Counted in `anyproxy_config_reload_total{result}`.
    pub fn reload(&self, path: &Path) -> Result<(), ReloadError> {
        let mut running = self.live.running.lock();
        self.metrics.reloads.run(|| self.apply(path, &mut running))
    }

    fn apply(&self, path: &Path, running: &mut ClientConfig) -> Result<(), ReloadError> {
        let file = crate::config::Config::load(path)?;
        let Some(next) = file.client else {
            return Err(ReloadError::NoClient(path.display().to_string()));
        };
        // Everything that can fail comes first; after it, nothing can.
        let rules = Rules::new(&next)?;
        let connector = super::tls_connector(&next).map_err(|source| ReloadError::Tls {
            key: tls_key(&next, &source),
            source,
        })?;
        // Built against the running `gateway_server_name` (restart-only).
        let running_gateways = self.plan.borrow().gateways.clone();
        let server_name = self.config.gateway_server_name.as_deref();
        let gateways = super::gateways(&next, server_name, &running_gateways)?;

        log_rule_changes(running, &next);
        self.live.rules.store(Arc::new(rules));
        // Read again even under the same names (a certificate renewed in place).
        // Sessions up keep their TLS; reconnects and new sessions use this.
        self.tls.store(Arc::new(connector));
        tracing::info!("TLS files read again: new gateway connections use them");
        self.forwards.set(&next.open_ports);
        self.replan(gateways, next.replicas);
        let closed = self.live.close_forbidden(&self.live.rules());
        if closed > 0 {
            tracing::warn!(
                closed,
                "live connections closed: the reloaded configuration forbids their targets"
            );
        }
        for key in restart_only(running, &next) {
            tracing::warn!(key, "changed in the file; takes effect at the next restart");
        }
        crate::config::apply_level(self.live.log.get(), &file.log);
        *running = next;
        tracing::info!(config = %path.display(), "configuration reloaded");
        Ok(())
    }
}

/// The key whose file `e` is about.
fn tls_key(next: &ClientConfig, e: &tls::TlsError) -> &'static str {
    let names = |p: &Option<std::path::PathBuf>, path: &str| {
        p.as_deref()
            .is_some_and(|p| p.display().to_string() == path)
    };
    match e {
        tls::TlsError::Certs { path, .. } if names(&next.gateway_tls_cert, path) => {
            "client.gateway_tls_cert"
        }
        tls::TlsError::Key { .. } | tls::TlsError::KeyMismatch { .. } => "client.tls_client_key",
        _ => "client.tls_client_cert",
    }
}

/// One log line per rule added or removed, and per setting changed.
fn log_rule_changes(old: &ClientConfig, new: &ClientConfig) {
    let set = |v: &[String]| v.iter().cloned().collect::<BTreeSet<_>>();
    let limits = |c: &ClientConfig| {
        c.limit
            .iter()
            .map(|l| format!("{} over {}", l.addr, l.protocol))
            .collect::<BTreeSet<_>>()
    };
    for (what, was, now) in [
        (
            "forbidden host",
            set(&old.forbidden_hosts),
            set(&new.forbidden_hosts),
        ),
        ("limit entry", limits(old), limits(new)),
    ] {
        for added in now.difference(&was) {
            tracing::info!("{what} {added} added");
        }
        for removed in was.difference(&now) {
            tracing::info!("{what} {removed} removed");
        }
    }
    if old.allow_local != new.allow_local {
        tracing::info!(allow_local = new.allow_local, "allow_local changed");
    }
    if old.protocols != new.protocols {
        tracing::info!(
            protocols = %new.protocols.describe(),
            "protocols changed"
        );
    }
    if old.max_concurrent_conns != new.max_concurrent_conns {
        tracing::info!(
            from = old.max_concurrent_conns,
            to = new.max_concurrent_conns,
            "max_concurrent_conns changed"
        );
    }
}

/// The keys of `new` that differ from what runs and that a reload does not apply.
///
/// Destructured field by field, without `..`: a field added to `ClientConfig` does not
/// compile here until it is declared either reloaded or restart-only.
fn restart_only(old: &ClientConfig, new: &ClientConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! compare {
        ($($field:ident),+) => {
            $(
                if format!("{:?}", old.$field) != format!("{:?}", new.$field) {
                    changed.push(concat!("client.", stringify!($field)));
                }
            )+
        };
    }
    let ClientConfig {
        // Reloaded.
        forbidden_hosts: _,
        allow_local: _,
        limit: _,
        protocols: _,
        max_concurrent_conns: _,
        open_ports: _,
        gateway_tls_cert: _,
        gateway_tls_fingerprint: _,
        tls_client_cert: _,
        tls_client_key: _,
        gateway_addr: _,
        gateway_addrs: _,
        replicas: _,
        // Compared below: secrets' Debug is redacted.
        auth_password: _,
        admin_password: _,
        // Restart-only.
        gateway_server_name: _,
        client_id: _,
        auth_username: _,
        group_id: _,
        dial_timeout: _,
        ping_interval: _,
        idle_timeout: _,
        conn_idle_timeout: _,
        reconnect_min: _,
        reconnect_max: _,
        max_message_size: _,
        stall_timeout: _,
        json_conn_buffer: _,
        max_window: _,
        encoding: _,
        deflate: _,
        drain_timeout: _,
        admin_addr: _,
        admin_username: _,
        udp_idle_timeout: _,
        udp_max_datagram: _,
    } = old;
    compare!(
        gateway_server_name,
        client_id,
        auth_username,
        group_id,
        dial_timeout,
        ping_interval,
        idle_timeout,
        conn_idle_timeout,
        reconnect_min,
        reconnect_max,
        max_message_size,
        stall_timeout,
        json_conn_buffer,
        max_window,
        encoding,
        deflate,
        drain_timeout,
        admin_addr,
        admin_username,
        udp_idle_timeout,
        udp_max_datagram
    );
    let secret = |s: Option<&crate::config::Secret>| s.map(|s| s.expose().to_owned());
    if secret(Some(&old.auth_password)) != secret(Some(&new.auth_password)) {
        changed.push("client.auth_password");
    }
    if secret(old.admin_password.as_ref()) != secret(new.admin_password.as_ref()) {
        changed.push("client.admin_password");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(extra: &str) -> ClientConfig {
        let text = format!(
            "client:\n  gateway_addr: \"127.0.0.1:1\"\n  client_id: c\n  auth_username: u\n  auth_password: p\n{extra}"
        );
        crate::config::Config::parse(&text, Path::new("t.yaml"))
            .unwrap()
            .client
            .unwrap()
    }

    #[test]
    fn a_lowered_cap_refuses_new_places_until_enough_end() {
        let live = Live::new(&client("  max_concurrent_conns: 2\n")).unwrap();
        let rules = live.rules();
        let (a, _b) = (live.admit(&rules).unwrap(), live.admit(&rules).unwrap());
        assert!(live.admit(&rules).is_none());
        let one = Rules::new(&client("  max_concurrent_conns: 1\n")).unwrap();
        drop(a);
        assert!(live.admit(&one).is_none(), "still one open");
    }

    #[test]
    fn a_reload_closes_only_what_it_forbids() {
        let live = Live::new(&client("")).unwrap();
        let (bad, good) = (HostPort::new("10.0.0.2", 80), HostPort::new("10.0.0.1", 80));
        let w1 = live.watch(&bad, "10.0.0.2:80".parse().unwrap());
        let w2 = live.watch(&good, "10.0.0.1:80".parse().unwrap());
        let rules = Rules::new(&client("  forbidden_hosts: [\"10.0.0.2\"]\n")).unwrap();
        live.rules.store(Arc::new(rules));
        assert_eq!(live.close_forbidden(&live.rules()), 1);
        assert!(w1.revoke.is_revoked() && !w2.revoke.is_revoked());
        // One dialed under the old rules but tracked after the swap is closed too.
        let w3 = live.watch(&bad, "10.0.0.2:80".parse().unwrap());
        assert!(w3.revoke.is_revoked());
        drop((w1, w2, w3));
        assert!(live.conns.lock().is_empty());
    }

    #[test]
    fn restart_only_keys_are_named() {
        let old = client("");
        let new = client(
            "  replicas: 2\n  forbidden_hosts: [\"x\"]\n  dial_timeout: 3s\n  ping_interval: 5s\n",
        );
        assert_eq!(
            restart_only(&old, &new),
            vec!["client.dial_timeout", "client.ping_interval"]
        );
    }
}
