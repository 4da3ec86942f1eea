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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{Forward, Protocol};
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
    cancel: CancellationToken,
}

/// A forwarded port: its number and protocol (TCP and UDP are separate port spaces).
type PortKey = (u16, Protocol);

/// The agent forwards currently open, by port.
pub struct AgentForwardTable {
    policy: Option<AgentForwards>,
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
            policy,
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
        let Some(policy) = &self.policy else {
            return Err("this gateway does not accept forwards from agents (gateway.agent_forwards is not set)".into());
        };
        let port = req.listen_port;
        if !policy.ports.contains(port) {
            return Err(format!(
                "port {port} is outside the range agents may forward ({}-{})",
                policy.ports.first, policy.ports.last
            ));
        }
        let target = HostPort {
            host: req.target_host.clone(),
            port: req.target_port,
        };
        target.validate().map_err(|e| e.to_string())?;
        let key = (port, req.protocol);
        let (cancel, id) = self.claim(key, agent)?;
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
    /// of the same agent. Returns the token that ends this forward, and its id.
    fn claim(&self, key: PortKey, agent: &AgentHandle) -> Result<(CancellationToken, u64), String> {
        let cancel = CancellationToken::new();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut table = self.by_port.lock();
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
                cancel: cancel.clone(),
            },
        );
        Ok((cancel, id))
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
