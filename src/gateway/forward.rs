//! Port forwards: gateway listeners whose connections leave through agents.
//!
//! * Declared forwards (`gateway.forwards`) listen for the gateway's whole life and pick
//!   the least-loaded agent of their group for each connection.
//! * Agent forwards (`client.open_ports`, the `forward` message) belong to the session
//!   that asked: its connections go through that agent, and the port is released the
//!   moment the session ends, so a reconnecting agent can bind it again at once. A
//!   forward with `protocol: udp` binds a UDP port instead (TCP and UDP are separate
//!   port spaces) and is served by [`super::udp::serve_forward`], its flows through
//!   that agent alone.
//! * A reload swaps `gateway.agent_forwards` for new requests and closes the open agent
//!   forwards the new settings no longer allow ([`AgentForwardTable::reconfigure`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{Forward, Protocol};
use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::registry::AgentHandle;
use super::udp::{serve_forward, UdpSettings};
use crate::auth::Identity;
use crate::config::AgentForwards;
use crate::connect::{Access, ConnectError, Connector, Requester, Upstream};
use crate::limits::Limits;
use crate::net::HostPort;
use crate::transport::listen::{AcceptLoop, ProxyProtocol, Serve};

/// How long a takeover waits for the previous owner's listener to let go of the port.
const REBIND_ATTEMPTS: u32 = 40;
const REBIND_PAUSE: Duration = Duration::from_millis(25);

struct Owner {
    group: Arc<str>,
    client_id: String,
    serial: u64,
    /// This forward's own number: a session asking again for a port it holds (a new
    /// target after the agent's reload) replaces its entry, and the replaced forward's
    /// end must not remove the new one.
    id: u64,
    /// Where it listens and whether it asks for PROXY headers (TCP only), as
    /// `agent_forwards` said when it opened: a reload closes it if the new settings
    /// would not open it so.
    bind: std::net::IpAddr,
    proxy_protocol: bool,
    cancel: CancellationToken,
}

/// A forwarded port: its number and protocol (TCP and UDP are separate port spaces).
type PortKey = (u16, Protocol);

/// The agent forwards currently open, by port.
pub struct AgentForwardTable {
    /// `gateway.agent_forwards`; a reload swaps it (under `by_port`'s lock, so that
    /// no forward is opened under the old settings after the reload looked).
    policy: ArcSwapOption<AgentForwards>,
    connect_timeout: Duration,
    limits: Arc<Limits>,
    /// Used when `policy.proxy_protocol` is set (TCP forwards only: a datagram
    /// carries no PROXY header).
    proxy_protocol: Arc<ProxyProtocol>,
    /// For UDP forwards.
    udp: UdpSettings,
    by_port: Mutex<HashMap<PortKey, Owner>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl AgentForwardTable {
    pub fn new(
        policy: Option<AgentForwards>,
        connect_timeout: Duration,
        limits: Arc<Limits>,
        proxy_protocol: Arc<ProxyProtocol>,
        udp: UdpSettings,
    ) -> Self {
        AgentForwardTable {
            policy: ArcSwapOption::from(policy.map(Arc::new)),
            connect_timeout,
            limits,
            proxy_protocol,
            udp,
            by_port: Mutex::new(HashMap::new()),
            next_id: Default::default(),
        }
    }

    /// Opens the forward `req` for `agent`. A port held by an earlier session of the
    /// same agent (same group and client id) is taken over; one held by another agent
    /// is a conflict.
    pub async fn open(
        self: &Arc<Self>,
        agent: &Arc<AgentHandle>,
        req: &Forward,
    ) -> Result<SocketAddr, String> {
        let port = req.listen_port;
        let target = HostPort {
            host: req.target_host.clone(),
            port: req.target_port,
        };
        target.validate().map_err(|e| e.to_string())?;
        let key = (port, req.protocol);
        let (cancel, id, policy) = self.claim(key, agent)?;
        let addr = SocketAddr::new(policy.bind, port);
        let bound = match req.protocol {
            Protocol::Tcp => bind_when_free(|| crate::transport::listen::listen(addr))
                .await
                .map(|l| self.serve_tcp(l, agent, target, policy.proxy_protocol)),
            Protocol::Udp => bind_when_free(|| bind_udp(addr))
                .await
                .map(|s| self.serve_udp(s, agent, target)),
        };
        let serve = match bound {
            Ok(serve) => serve,
            Err(e) => {
                self.forget(key, id);
                return Err(format!(
                    "cannot listen on {addr}/{}: {e}",
                    req.protocol.as_str()
                ));
            }
        };
        let table = self.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            // The session may end before `release` could see this forward.
            tokio::select! {
                _ = serve => {}
                _ = cancel.cancelled() => {}
                _ = agent.core.closed() => {}
            }
            table.forget(key, id);
            tracing::info!(%addr, protocol = key.1.as_str(), "agent forward closed");
        });
        Ok(addr)
    }

    /// Records `agent` as the owner of `key`, taking it over from an earlier session
    /// of the same agent, if `gateway.agent_forwards` allows the port. Returns the
    /// token that ends this forward, its id, and the settings it opens with.
    fn claim(
        &self,
        key: PortKey,
        agent: &AgentHandle,
    ) -> Result<(CancellationToken, u64, Arc<AgentForwards>), String> {
        let cancel = CancellationToken::new();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut table = self.by_port.lock();
        // Read under the lock: a reload swaps it under the same lock.
        let Some(policy) = self.policy.load_full() else {
            return Err("this gateway does not accept forwards from agents (gateway.agent_forwards is not set)".into());
        };
        if !policy.ports.contains(key.0) {
            return Err(format!(
                "port {} is outside the range agents may forward ({})",
                key.0,
                range(&policy.ports)
            ));
        }
        if let Some(held) = table.get(&key) {
            let same_agent = held.group == agent.group && held.client_id == agent.client_id;
            if !same_agent {
                return Err(format!(
                    "port {}/{} is already forwarded by agent {:?} of group {:?}",
                    key.0,
                    key.1.as_str(),
                    held.client_id,
                    held.group
                ));
            }
            held.cancel.cancel();
        }
        table.insert(
            key,
            Owner {
                group: agent.group.clone(),
                client_id: agent.client_id.clone(),
                serial: agent.serial,
                id,
                bind: policy.bind,
                proxy_protocol: asks_proxy_header(&policy, key.1),
                cancel: cancel.clone(),
            },
        );
        Ok((cancel, id, policy))
    }

    /// Applies a reloaded `gateway.agent_forwards`: new requests are checked against
    /// `next`, and every open forward that `next` would not open as it is (agent
    /// forwards turned off, its port outside the new range, another bind address or
    /// another `proxy_protocol`) stops listening. The connections it already accepted
    /// carry on: each rides its agent's session, and what the new settings forbid is
    /// listening on that port, not a connection the old ones admitted. The lines to
    /// log, one per change.
    pub fn reconfigure(&self, next: Option<AgentForwards>) -> Vec<String> {
        let mut table = self.by_port.lock();
        let before = self.policy.swap(next.clone().map(Arc::new));
        let mut changes = settings_changes(before.as_deref(), next.as_ref());
        table.retain(|&(port, protocol), o| {
            let why = match &next {
                None => "gateway.agent_forwards was removed by the reload".to_owned(),
                Some(n) if !n.ports.contains(port) => {
                    "outside the reloaded agent_forwards range".to_owned()
                }
                Some(n) if n.bind != o.bind => {
                    format!("the reloaded agent_forwards.bind is {}", n.bind)
                }
                Some(n) if asks_proxy_header(n, protocol) != o.proxy_protocol => format!(
                    "the reloaded agent_forwards.proxy_protocol is {}",
                    n.proxy_protocol
                ),
                Some(_) => return true,
            };
            o.cancel.cancel();
            let udp = if protocol == Protocol::Udp {
                "/udp"
            } else {
                ""
            };
            changes.push(format!(
                "forward {}{udp} of agent {} closed: {why}",
                SocketAddr::new(o.bind, port),
                o.client_id
            ));
            false
        });
        changes
    }

    /// Drops `key` from the table if the forward `id` still holds it.
    fn forget(&self, key: PortKey, id: u64) {
        self.by_port
            .lock()
            .retain(|k, o| !(*k == key && o.id == id));
    }

    /// The accept loop of a TCP agent forward, until dropped.
    fn serve_tcp(
        &self,
        listener: TcpListener,
        agent: &Arc<AgentHandle>,
        target: HostPort,
        proxy_protocol: bool,
    ) -> ServeFuture {
        let role = Arc::new(AgentForward {
            agent: agent.clone(),
            target,
            timeout: self.connect_timeout,
            limits: self.limits.clone(),
        });
        let mut accept = AcceptLoop::new(listener, "agent forward");
        if proxy_protocol {
            accept = accept.proxy_protocol(self.proxy_protocol.clone());
        }
        Box::pin(accept.run(role, std::future::pending(), TaskTracker::new()))
    }

    /// The datagram loop of a UDP agent forward, until dropped (which ends its flows).
    fn serve_udp(
        &self,
        socket: UdpSocket,
        agent: &Arc<AgentHandle>,
        target: HostPort,
    ) -> ServeFuture {
        let support = self.udp.through_agent(agent.clone());
        Box::pin(serve_forward(
            Arc::new(socket),
            agent.group.clone(),
            target,
            support,
            CancellationToken::new(),
        ))
    }

    /// Withdraws `agent`'s forward of `key` at its request (`unforward`): the port
    /// stops listening, the connections it accepted carry on. Whether `agent` (this
    /// session, or an earlier one of the same agent) held it; another agent's port is
    /// left alone.
    pub fn withdraw(&self, agent: &AgentHandle, key: PortKey) -> bool {
        let mut table = self.by_port.lock();
        let owned = table
            .get(&key)
            .is_some_and(|o| o.group == agent.group && o.client_id == agent.client_id);
        if owned {
            if let Some(o) = table.remove(&key) {
                o.cancel.cancel();
            }
        }
        owned
    }

    /// Closes every forward of the session `serial` (it ended or was replaced).
    pub fn release(&self, serial: u64) {
        self.by_port.lock().retain(|_, o| {
            let keep = o.serial != serial;
            if !keep {
                o.cancel.cancel();
            }
            keep
        });
    }

    /// Ports currently forwarded, with their protocol, for status.
    pub fn ports(&self) -> Vec<PortKey> {
        let mut ports: Vec<PortKey> = self.by_port.lock().keys().copied().collect();
        ports.sort_unstable_by_key(|&(port, p)| (port, p.as_str()));
        ports
    }
}

/// Whether a forward of `protocol` asks for PROXY headers under `policy`: TCP ones only
/// (a datagram carries none).
fn asks_proxy_header(policy: &AgentForwards, protocol: Protocol) -> bool {
    policy.proxy_protocol && protocol == Protocol::Tcp
}

/// `first-last`, as the configuration writes a range.
fn range(r: &crate::config::PortRange) -> String {
    format!("{}-{}", r.first, r.last)
}

/// One line per setting of `gateway.agent_forwards` that a reload changed.
fn settings_changes(old: Option<&AgentForwards>, new: Option<&AgentForwards>) -> Vec<String> {
    match (old, new) {
        (None, None) => vec![],
        (None, Some(n)) => vec![format!(
            "agent_forwards added: agents may forward ports {} on {}",
            range(&n.ports),
            n.bind
        )],
        (Some(_), None) => {
            vec!["agent_forwards removed: agents may no longer forward ports".into()]
        }
        (Some(o), Some(n)) => {
            let mut lines = Vec::new();
            if o.ports != n.ports {
                lines.push(format!(
                    "agent_forwards range changed from {} to {}",
                    range(&o.ports),
                    range(&n.ports)
                ));
            }
            if o.bind != n.bind {
                lines.push(format!(
                    "agent_forwards.bind changed from {} to {}",
                    o.bind, n.bind
                ));
            }
            if o.proxy_protocol != n.proxy_protocol {
                lines.push(format!(
                    "agent_forwards.proxy_protocol changed from {} to {}",
                    o.proxy_protocol, n.proxy_protocol
                ));
            }
            lines
        }
    }
}

/// A forward's serving loop; it ends when dropped.
type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A UDP forward's socket, bound without waiting (the kernel binds at once).
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Binds with `bind`, retrying briefly while a previous listener of the same agent is
/// still shutting down.
async fn bind_when_free<T>(bind: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut attempt = 0;
    loop {
        match bind() {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < REBIND_ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(REBIND_PAUSE).await;
            }
            other => return other,
        }
    }
}

async fn relay(
    stream: TcpStream,
    upstream: Upstream,
    peer: SocketAddr,
    target: &HostPort,
    group: &str,
) {
    let access = Access::new("forward")
        .client(peer)
        .group(group)
        .target(target)
        .since(std::time::Instant::now());
    upstream.relay_logged(stream, access).await;
}

/// A forward's user: known by address only.
fn anonymous(peer: SocketAddr, group: Arc<str>) -> Requester {
    Requester::new(peer, Identity { user: None, group })
}

/// A raw TCP forward has no way to say why its connection closes: the log says it.
fn refused(who: &Requester, target: &HostPort, e: &ConnectError) {
    Access::new("forward")
        .requester(who)
        .target(target)
        .refused(e.code(), e);
}

/// A declared forward's role: each connection goes to `target` through `connector`
/// (the least-loaded agent of `group`, behind the limits).
pub struct DeclaredForward<C> {
    pub group: Arc<str>,
    pub target: HostPort,
    pub connector: Arc<C>,
}

impl<C: Connector> Serve for DeclaredForward<C> {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let who = anonymous(peer, self.group.clone());
        match self.connector.connect(&self.target, &who).await {
            Ok(conn) => relay(stream, conn, peer, &self.target, &self.group).await,
            Err(e) => refused(&who, &self.target, &e),
        }
    }
}

/// An agent forward's role: each connection goes through that agent's session, after
/// the per-address limits admitted it.
struct AgentForward {
    agent: Arc<AgentHandle>,
    target: HostPort,
    timeout: Duration,
    limits: Arc<Limits>,
}

impl Serve for AgentForward {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let (agent, target) = (&self.agent, &self.target);
        let who = anonymous(peer, agent.group.clone());
        let grant = match self.limits.admit(&who).await {
            Ok(grant) => grant,
            Err(e) => return refused(&who, target, &e),
        };
        match agent
            .core
            .open(&target.host, target.port, self.timeout)
            .await
        {
            Ok(conn) => {
                let upstream = grant.attach(Upstream::tunnel(conn));
                relay(stream, upstream, peer, target, &agent.group).await;
            }
            Err(e) => {
                let e = ConnectError::from(e);
                Access::new("forward")
                    .client(peer)
                    .group(&agent.group)
                    .via(&agent.client_id)
                    .target(target)
                    .refused(e.code(), &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;

    fn forwards(first: u16, last: u16, bind: &str, proxy_protocol: bool) -> AgentForwards {
        AgentForwards {
            bind: bind.parse().unwrap(),
            ports: PortRange { first, last },
            proxy_protocol,
        }
    }

    #[test]
    fn a_reload_logs_each_agent_forwards_setting_it_changes() {
        let wide = forwards(20000, 20999, "127.0.0.1", false);
        assert!(settings_changes(Some(&wide), Some(&wide)).is_empty());
        let narrow = forwards(20000, 20099, "0.0.0.0", true);
        assert_eq!(
            settings_changes(Some(&wide), Some(&narrow)),
            [
                "agent_forwards range changed from 20000-20999 to 20000-20099",
                "agent_forwards.bind changed from 127.0.0.1 to 0.0.0.0",
                "agent_forwards.proxy_protocol changed from false to true",
            ]
        );
        assert_eq!(
            settings_changes(None, Some(&wide)),
            ["agent_forwards added: agents may forward ports 20000-20999 on 127.0.0.1"]
        );
        assert_eq!(
            settings_changes(Some(&wide), None),
            ["agent_forwards removed: agents may no longer forward ports"]
        );
        // PROXY headers are a TCP matter: a UDP forward is not reopened for them.
        assert!(asks_proxy_header(&narrow, Protocol::Tcp));
        assert!(!asks_proxy_header(&narrow, Protocol::Udp));
    }
}
