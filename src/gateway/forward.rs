//! Port forwards: gateway listeners whose connections leave through agents.
//!
//! * Declared forwards (`gateway.forwards`) listen for the gateway's whole life and pick
//!   the least-loaded agent of their group for each connection.
//! * Agent forwards (`client.open_ports`, the `forward` message) belong to the session
//!   that asked: its connections go through that agent, and the port is released the
//!   moment the session ends, so a reconnecting agent can bind it again at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::Forward;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::registry::AgentHandle;
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
    cancel: CancellationToken,
}

/// The agent forwards currently open, by port.
pub struct AgentForwardTable {
    policy: Option<AgentForwards>,
    connect_timeout: Duration,
    limits: Arc<Limits>,
    /// Used when `policy.proxy_protocol` is set.
    proxy_protocol: Arc<ProxyProtocol>,
    by_port: Mutex<HashMap<u16, Owner>>,
}

impl AgentForwardTable {
    pub fn new(
        policy: Option<AgentForwards>,
        connect_timeout: Duration,
        limits: Arc<Limits>,
        proxy_protocol: Arc<ProxyProtocol>,
    ) -> Self {
        AgentForwardTable {
            policy,
            connect_timeout,
            limits,
            proxy_protocol,
            by_port: Mutex::new(HashMap::new()),
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
        let cancel = CancellationToken::new();
        {
            let mut table = self.by_port.lock();
            if let Some(held) = table.get(&port) {
                let same_agent = held.group == agent.group && held.client_id == agent.client_id;
                if !same_agent {
                    return Err(format!(
                        "port {port} is already forwarded by agent {:?} of group {:?}",
                        held.client_id, held.group
                    ));
                }
                held.cancel.cancel();
            }
            table.insert(
                port,
                Owner {
                    group: agent.group.clone(),
                    client_id: agent.client_id.clone(),
                    serial: agent.serial,
                    cancel: cancel.clone(),
                },
            );
        }
        let addr = SocketAddr::new(policy.bind, port);
        let listener = match bind_when_free(addr).await {
            Ok(l) => l,
            Err(e) => {
                self.by_port
                    .lock()
                    .retain(|p, o| !(*p == port && o.serial == agent.serial));
                return Err(format!("cannot listen on {addr}: {e}"));
            }
        };
        let role = Arc::new(AgentForward {
            agent: agent.clone(),
            target,
            timeout: self.connect_timeout,
            limits: self.limits.clone(),
        });
        let mut accept = AcceptLoop::new(listener, "agent forward");
        if policy.proxy_protocol {
            accept = accept.proxy_protocol(self.proxy_protocol.clone());
        }
        let table = self.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            // The session may end before `release` could see this forward.
            let stop = async {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = agent.core.closed() => {}
                }
            };
            accept.run(role, stop, TaskTracker::new()).await;
            table
                .by_port
                .lock()
                .retain(|p, o| !(*p == port && o.serial == agent.serial));
            tracing::info!(%addr, "agent forward closed");
        });
        Ok(addr)
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

    /// Ports currently forwarded, for status.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.by_port.lock().keys().copied().collect();
        ports.sort_unstable();
        ports
    }
}

/// Binds `addr`, retrying briefly while a previous listener of the same agent is still
/// shutting down.
async fn bind_when_free(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut attempt = 0;
    loop {
        match crate::transport::listen::listen(addr) {
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
