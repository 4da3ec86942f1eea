//! Accepting agents: TLS, the WebSocket upgrade at `/ws`, the `auth` exchange, then the
//! session's read loop until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{
    Auth, AuthResponse, Encoding, ErrorCode, ErrorMsg, ForwardResponse, Message, Protocol,
};
use arc_swap::ArcSwap;
use fastwebsockets::Role;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::forward::AgentForwardTable;
use super::registry::{AgentHandle, AgentRegistry};
use crate::auth::{Attempt, Authority, Kind, Outcome};
use crate::config::{DeflateConfig, GatewayConfig};
use crate::limits::{Gate, Lockout};
use crate::transport::listen::{AcceptLoop, Serve};
use crate::transport::ws::{self, close_code};
use crate::transport::{handshake, BoxIo, WsReader};
use crate::tunnel::session::{FirstMessage, Role as SessionRole, Session, SessionEnd};
use crate::tunnel::table::ShardedMap;
use crate::tunnel::{SessionCore, SessionOptions};

pub struct AgentServer {
    /// As the gateway started: its `client_ca`, `deflate` and `agent_forwards` are the
    /// start's, and a reload swaps the live ones (`tls`, `deflate`, `forwards`).
    pub config: GatewayConfig,
    pub registry: Arc<AgentRegistry>,
    agents: Arc<Authority>,
    forwards: Arc<AgentForwardTable>,
    throttle: Lockout,
    /// What each new TLS handshake is served with: a reload that changes
    /// `gateway.client_ca` swaps it (one atomic load per handshake; established
    /// sessions keep the verification they passed).
    tls: ArcSwap<rustls::ServerConfig>,
    /// The `gateway.deflate` new sessions negotiate with: a reload swaps it, live
    /// sessions keep what they agreed on.
    deflate: ArcSwap<DeflateConfig>,
    encodings: Vec<Encoding>,
    lifecycle: Lifecycle,
    metrics: Arc<crate::metrics::GatewayMetrics>,
}

/// What a graceful stop needs: every agent connection's task, the authenticated
/// sessions (registered or not: a replaced session may still carry connections), and
/// the two stages of the stop.
#[derive(Default)]
struct Lifecycle {
    tasks: TaskTracker,
    live: ShardedMap<u64, Arc<SessionCore>>,
    draining: CancellationToken,
    ending: CancellationToken,
}

impl Serve for AgentServer {
    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let ending = self.lifecycle.ending.clone();
        if let Err(reason) = self.serve_agent(tcp, peer, ending).await {
            tracing::info!(%peer, %reason, "agent connection refused");
        }
    }
}

impl AgentServer {
    pub fn new(
        config: GatewayConfig,
        agents: Arc<Authority>,
        registry: Arc<AgentRegistry>,
        tls: Arc<rustls::ServerConfig>,
        forwards: Arc<AgentForwardTable>,
        metrics: Arc<crate::metrics::GatewayMetrics>,
        cluster: Option<&Arc<crate::cluster::Cluster>>,
    ) -> Self {
        let throttle = Lockout::new(
            config.max_auth_failures,
            config.auth_failure_window.0,
            config.auth_lockout.0,
            cluster.map(|c| (c, "agent")),
        );
        let encodings = config.encodings.iter().map(|e| (*e).into()).collect();
        let deflate = ArcSwap::from_pointee(config.deflate.clone());
        AgentServer {
            config,
            registry,
            agents,
            forwards,
            throttle,
            tls: ArcSwap::new(tls),
            deflate,
            encodings,
            lifecycle: Lifecycle::default(),
            metrics,
        }
    }

    /// Serves new agent handshakes with `tls` (a reload changed `gateway.client_ca`).
    pub(super) fn replace_tls(&self, tls: Arc<rustls::ServerConfig>) {
        self.tls.store(tls);
    }

    /// New agent sessions negotiate permessage-deflate with `deflate`; the old value.
    pub(super) fn replace_deflate(&self, deflate: DeflateConfig) -> Arc<DeflateConfig> {
        self.deflate.swap(Arc::new(deflate))
    }

    /// The agent forwards open, and the `gateway.agent_forwards` they are checked by.
    pub(super) fn forwards(&self) -> &AgentForwardTable {
        &self.forwards
    }

    /// First stage of a stop (the listener is already closed): tells every agent we
    /// are going away, so no new connection is opened, then waits until the tunnelled
    /// connections end or `timeout` passes. Returns how many were still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.lifecycle.draining.cancel();
        let sessions = self.lifecycle.live.values();
        let each = sessions.iter().map(|core| async move {
            core.announce_going_away("gateway shutting down").await;
            core.drained(timeout).await;
        });
        let _ = tokio::time::timeout(timeout, futures_util::future::join_all(each)).await;
        sessions.iter().map(|c| c.active_conns()).sum()
    }

    /// Second stage: closes every session (WebSocket close 1001) and waits for every
    /// agent connection's task to end. Safe to call more than once.
    pub async fn end_sessions(&self) {
        self.lifecycle.ending.cancel();
        self.lifecycle.tasks.close();
        self.lifecycle.tasks.wait().await;
    }

    /// Accepts agents until `shutdown`; the sessions live on until [`Self::end_sessions`].
    pub async fn accept(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let tasks = self.lifecycle.tasks.clone();
        AcceptLoop::new(listener, "gateway")
            .run(self, shutdown.cancelled_owned(), tasks)
            .await
    }

    /// One agent connection, phase by phase: TLS, the WebSocket upgrade (which
    /// negotiates the encoding and compression), `auth`, registration, the session's
    /// read loop, teardown. An `Err` is why the connection was refused.
    async fn serve_agent(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let io = self.tls_handshake(tcp).await?;
        let (mut reader, session) = self.upgrade(io).await?;
        let (auth, group) = match self.authenticate(&session, &mut reader, peer).await {
            Ok(x) => x,
            Err(refusal) => {
                if let Some(reason) = &refusal.close {
                    session.close(close_code::POLICY, reason).await;
                } else {
                    session.flush().await;
                }
                return Err(refusal.reason);
            }
        };
        let registered = self.register(session.core(), &auth, group, peer).await;
        let span = tracing::info_span!("agent", client_id = %auth.client_id, group = %registered.handle.group);
        let end = self
            .run(session.core(), &mut reader, &registered.handle, shutdown)
            .instrument(span.clone())
            .await;
        self.teardown(session, reader, registered, end)
            .instrument(span)
            .await;
        Ok(())
    }

    async fn tls_handshake(&self, tcp: TcpStream) -> Result<BoxIo, String> {
        let deadline = self.config.auth_timeout.0;
        let acceptor = TlsAcceptor::from(self.tls.load_full());
        let tls = tokio::time::timeout(
            deadline,
            acceptor.accept(crate::transport::tls::buffered(tcp)),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
        Ok(Box::new(tls))
    }

    /// The WebSocket upgrade at `/ws`; starts the session (and its writer).
    async fn upgrade(&self, mut io: BoxIo) -> Result<(WsReader, Session), String> {
        let deflate = self.deflate.load_full();
        let accepted = tokio::time::timeout(
            self.config.auth_timeout.0,
            handshake::accept(&mut io, &self.encodings, Some(&deflate)),
        )
        .await
        .map_err(|_| "WebSocket handshake timed out".to_string())?
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
        let max_message = self.config.max_message_size.0 as usize;
        let (reader, writer) = ws::split(io, Role::Server, max_message, accepted.deflate);
        let options = SessionOptions::from(&self.config);
        Ok((
            reader,
            SessionCore::start(accepted.encoding, writer, options),
        ))
    }

    /// Reads the first message, which must be `auth`, and checks it (deadline,
    /// lockout, constant-time credentials); the username names the agent's group.
    async fn authenticate(
        &self,
        session: &Session,
        reader: &mut WsReader,
        peer: SocketAddr,
    ) -> Result<(Auth, Arc<str>), Refusal> {
        let core = session.core();
        let deadline = self.config.auth_timeout.0;
        let auth = match tokio::time::timeout(deadline, core.first_message(reader)).await {
            Err(_) => {
                let m = format!("no auth message within {deadline:?}");
                return Err(refuse(core, ErrorCode::AuthFailed, m).await);
            }
            Ok(FirstMessage::Gone(reason)) => return Err(Refusal::silent(reason)),
            Ok(FirstMessage::Invalid(e)) => {
                return Err(refuse(core, ErrorCode::InvalidMessage, e).await)
            }
            Ok(FirstMessage::Message(Message::Auth(auth), _)) => auth,
            Ok(FirstMessage::Message(other, _)) => {
                let m = format!(
                    "the first message must be auth, got {}",
                    other.kind().as_str()
                );
                return Err(refuse(core, ErrorCode::InvalidMessage, m).await);
            }
        };
        let ip = peer.ip();
        match self.throttle.gate(ip).await {
            Gate::Open => {}
            Gate::Locked => {
                self.metrics.auth_refused_locked();
                let m = "too many failed authentications from this address; try again later";
                return Err(refuse(core, ErrorCode::RateLimited, m.into()).await);
            }
            Gate::StoreDown => {
                let m = crate::limits::lockout::STORE_DOWN;
                return Err(refuse(core, ErrorCode::RateLimited, m.into()).await);
            }
        }
        let attempt = Attempt {
            kind: Kind::Agent,
            username: &auth.username,
            password: &auth.password,
            client_ip: Some(ip),
            client_id: Some(&auth.client_id),
            listener: "gateway",
        };
        let outcome = if auth.client_id.is_empty() {
            Outcome::Denied(Some("empty client_id".into()))
        } else {
            // Bounded like the rest of the exchange: a slow backend cannot hold it open.
            match tokio::time::timeout(deadline, self.agents.authenticate(&attempt)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Unavailable(crate::auth::BackendError::new(
                    "agent_auth",
                    format!("no answer within {deadline:?}"),
                )),
            }
        };
        match outcome {
            Outcome::Allowed(identity) => {
                self.throttle.success(ip);
                Ok((auth, identity.group))
            }
            Outcome::Unavailable(e) => {
                // Not the agent's fault: no lockout count, and it will retry.
                tracing::warn!(%peer, username = %auth.username, client_id = %auth.client_id, error = %e, "agent authentication: backend unavailable");
                let m = format!("authentication backend unavailable ({e})");
                Err(refuse(core, ErrorCode::AuthFailed, m).await)
            }
            Outcome::Denied(reason) => {
                let locked = self.throttle.failure(ip).await;
                self.metrics.auth_failed(locked);
                if locked {
                    tracing::warn!(%peer, "agent authentication locked out after repeated failures");
                }
                let reason = reason.unwrap_or_default();
                tracing::warn!(%peer, username = %auth.username, client_id = %auth.client_id, %reason, "agent authentication failed");
                let m =
                    "authentication failed: wrong username (group), password or empty client_id";
                Err(refuse(core, ErrorCode::AuthFailed, m.into()).await)
            }
        }
    }

    /// Makes the session reachable: the registry (replacing an earlier session of the
    /// same client id), the drain's list, the metrics table; answers `auth_response`.
    async fn register(
        &self,
        core: &Arc<SessionCore>,
        auth: &Auth,
        group: Arc<str>,
        peer: SocketAddr,
    ) -> Registered {
        core.set_peer(&auth.client_id);
        let handle = Arc::new(AgentHandle {
            group: group.clone(),
            client_id: auth.client_id.clone(),
            serial: self.registry.next_serial(),
            remote: peer,
            core: core.clone(),
        });
        if let Some(old) = self.registry.register(handle.clone()) {
            tracing::warn!(client_id = %auth.client_id, old = %old.remote, new = %peer, conns = old.core.active_conns(), "client id reconnected: replacing its previous session");
            self.forwards.release(old.serial);
            old.core.shutdown();
        }
        let _ = core
            .send(Message::AuthResponse(AuthResponse {
                success: true,
                message: format!("Authentication successful; group {group}"),
            }))
            .await;
        tracing::info!(client_id = %auth.client_id, %group, %peer, encoding = core.encoding.as_str(), deflate = core.compressed(), "agent connected");
        self.lifecycle.live.insert(handle.serial, core.clone());
        let counted = self
            .metrics
            .sessions
            .attach(&group, &auth.client_id, core.clone());
        if self.lifecycle.draining.is_cancelled() {
            core.announce_going_away("gateway shutting down").await;
        }
        Registered {
            handle,
            _counted: counted,
        }
    }

    /// The session's life: heartbeat and read loop until the agent leaves, the gateway
    /// ends the sessions, or the agent announces it is going away (it is then
    /// unregistered, but its live connections keep flowing).
    async fn run(
        &self,
        core: &Arc<SessionCore>,
        reader: &mut WsReader,
        handle: &Arc<AgentHandle>,
        shutdown: CancellationToken,
    ) -> SessionEnd {
        let _pinger = AbortOnDrop(tokio::spawn(
            core.clone().heartbeat(self.config.ping_interval.0),
        ));
        let role = GatewayRole {
            handle: handle.clone(),
            forwards: self.forwards.clone(),
        };
        let read = core.read_loop(reader, self.config.idle_timeout.0, &role);
        tokio::pin!(read);
        let mut listed = true;
        loop {
            tokio::select! {
                end = &mut read => return end,
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                // A draining agent keeps its live connections but takes no new ones.
                _ = core.peer_going_away(), if listed => {
                    listed = false;
                    self.registry.unregister(handle);
                }
            }
        }
    }

    /// Unregisters the session and ends it in the way its end calls for.
    async fn teardown(
        &self,
        session: Session,
        mut reader: WsReader,
        registered: Registered,
        end: SessionEnd,
    ) {
        let handle = &registered.handle;
        self.forwards.release(handle.serial);
        self.registry.unregister(handle);
        self.lifecycle.live.remove(&handle.serial);
        // Logged before the teardown, which cancels the connections still open: they
        // end now, with this reason, rather than hang.
        tracing::info!(conns = session.core().active_conns(), reason = %end, "agent disconnected");
        match end {
            SessionEnd::Shutdown => {
                session
                    .close(close_code::GOING_AWAY, "gateway shutting down")
                    .await
            }
            SessionEnd::Error(_) => {
                // The read loop queued a close frame naming the error (1002, 1009...):
                // let the writer send it, then linger so that the peer reads it before
                // the socket goes away.
                session.flush().await;
                linger(&mut reader).await;
            }
            _ => session.end().await,
        }
    }
}

/// A registered session: its registry entry, and its place in the metrics table
/// (dropped at teardown, when its counters join its series).
struct Registered {
    handle: Arc<AgentHandle>,
    _counted: crate::metrics::table::Attached,
}

/// Why an agent was refused, and the close frame's reason when one is to be sent.
struct Refusal {
    reason: String,
    close: Option<String>,
}

impl Refusal {
    /// The agent left (or broke the socket) before anything could be answered.
    fn silent(reason: String) -> Self {
        Refusal {
            reason,
            close: None,
        }
    }
}

/// Tells the agent why it is refused: `error`, and `auth_response` for credential
/// refusals (what an agent written from the document waits for).
async fn refuse(core: &SessionCore, code: ErrorCode, message: String) -> Refusal {
    let _ = core
        .send(Message::Error(ErrorMsg {
            code,
            message: message.clone(),
            id: None,
        }))
        .await;
    if code == ErrorCode::AuthFailed || code == ErrorCode::RateLimited {
        let _ = core
            .send(Message::AuthResponse(AuthResponse {
                success: false,
                message: message.clone(),
            }))
            .await;
    }
    Refusal {
        reason: message.clone(),
        close: Some(message),
    }
}

/// The gateway's side of a session: `forward` requests, and anything only a gateway
/// sends is answered as unexpected.
struct GatewayRole {
    handle: Arc<AgentHandle>,
    forwards: Arc<AgentForwardTable>,
}

impl SessionRole for GatewayRole {
    async fn on_message(&self, core: &Arc<SessionCore>, msg: Message) {
        if let Message::Forward(req) = msg {
            // Binding may wait for a previous owner to let go of the port: off the
            // read loop, so the session's traffic keeps flowing.
            let (core, handle, forwards) =
                (core.clone(), self.handle.clone(), self.forwards.clone());
            tokio::spawn(async move {
                let result = forwards.open(&handle, &req).await;
                let protocol = req.protocol;
                let (success, message) = match &result {
                    Ok(addr) if protocol == Protocol::Udp => {
                        (true, format!("listening on {addr}/udp"))
                    }
                    Ok(addr) => (true, format!("listening on {addr}")),
                    Err(e) => (false, e.clone()),
                };
                tracing::info!(client_id = %handle.client_id, group = %handle.group, port = req.listen_port, protocol = protocol.as_str(), target_host = %req.target_host, target_port = req.target_port, success, %message, "agent forward");
                let _ = core
                    .send(Message::ForwardResponse(ForwardResponse {
                        listen_port: req.listen_port,
                        success,
                        message,
                        protocol,
                    }))
                    .await;
            });
            return;
        }
        if let Message::Unforward(req) = msg {
            let key = (req.listen_port, req.protocol);
            let (port, protocol) = (req.listen_port, req.protocol.as_str());
            let client_id = &self.handle.client_id;
            match self.forwards.withdraw(&self.handle, key) {
                true => {
                    tracing::info!(%client_id, port, protocol, "agent withdrew its forward")
                }
                // Idempotent: the agent may withdraw a port it never got.
                false => {
                    tracing::info!(%client_id, port, protocol, "agent withdrew a forward it does not hold; nothing to do")
                }
            }
            return;
        }
        let what = match &msg {
            Message::Connect(_) => "connect is sent by the gateway, not to it",
            _ => "already authenticated",
        };
        let _ = core
            .send(Message::Error(ErrorMsg {
                code: ErrorCode::InvalidMessage,
                message: format!("unexpected {}: {what}", msg.kind().as_str()),
                id: msg.conn_id(),
            }))
            .await;
    }
}

/// Aborts a helper task (the heartbeat) when the phase that started it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After we sent a close frame: reads (and drops) what the peer still sends for a short
/// while, until its close or end of stream. Closing a socket with unread input sends a
/// reset, which can destroy our close frame before the peer has read it.
async fn linger(reader: &mut WsReader) {
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(incoming) = reader.next().await {
            if matches!(incoming, crate::transport::Incoming::Close { .. }) {
                break;
            }
        }
    })
    .await;
}

/// How long [`linger`] waits for the peer to acknowledge our close.
const LINGER: Duration = Duration::from_millis(500);
