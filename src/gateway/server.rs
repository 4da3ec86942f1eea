//! Accepting agents: TLS, the WebSocket upgrade at `/ws`, the `auth` exchange, then the
//! session's read loop until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{AuthResponse, Encoding, ErrorCode, ErrorMsg, ForwardResponse, Message};
use fastwebsockets::Role;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::forward::AgentForwardTable;
use super::registry::{AgentHandle, AgentRegistry};
use crate::auth::Accounts;
use crate::config::{Credentials, GatewayConfig, DEFAULT_GROUP};
use crate::limits::AuthThrottle;
use crate::transport::listen::{AcceptLoop, Serve};
use crate::transport::ws::{self, close_code};
use crate::transport::{handshake, BoxIo};
use crate::tunnel::session::{FirstMessage, Outbound};
use crate::tunnel::table::ShardedMap;
use crate::tunnel::{SessionCore, SessionOptions};

pub struct AgentServer {
    pub config: GatewayConfig,
    pub registry: Arc<AgentRegistry>,
    agents: Accounts,
    forwards: Arc<AgentForwardTable>,
    throttle: AuthThrottle,
    acceptor: TlsAcceptor,
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
        registry: Arc<AgentRegistry>,
        tls: Arc<rustls::ServerConfig>,
        forwards: Arc<AgentForwardTable>,
        metrics: Arc<crate::metrics::GatewayMetrics>,
    ) -> Self {
        // Agents of the default group use the gateway's own credentials; agents of a
        // configured group use its id and agent password. Only this configuration
        // defines them.
        let mut accounts = vec![(
            Credentials {
                username: config.auth_username.clone(),
                password: config.auth_password.expose().to_owned(),
            },
            Arc::from(DEFAULT_GROUP),
        )];
        accounts.extend(config.groups.iter().map(|g| {
            (
                Credentials {
                    username: g.id.clone(),
                    password: g.agent_password.expose().to_owned(),
                },
                Arc::from(g.id.as_str()),
            )
        }));
        let agents = Accounts::new(accounts, Arc::from(DEFAULT_GROUP));
        let throttle = AuthThrottle::new(
            config.max_auth_failures,
            config.auth_failure_window.0,
            config.auth_lockout.0,
        );
        let encodings = config.encodings.iter().map(|e| (*e).into()).collect();
        AgentServer {
            config,
            registry,
            agents,
            forwards,
            throttle,
            acceptor: TlsAcceptor::from(tls),
            encodings,
            lifecycle: Lifecycle::default(),
            metrics,
        }
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

    async fn serve_agent(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let deadline = self.config.auth_timeout.0;
        let tls = tokio::time::timeout(
            deadline,
            self.acceptor.accept(crate::transport::tls::buffered(tcp)),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let mut io: BoxIo = Box::new(tls);
        let accepted = tokio::time::timeout(
            deadline,
            handshake::accept(&mut io, &self.encodings, Some(&self.config.deflate)),
        )
        .await
        .map_err(|_| "WebSocket handshake timed out".to_string())?
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
        let max_message = self.config.max_message_size.0 as usize;
        let (mut reader, writer) = ws::split(io, Role::Server, max_message, accepted.deflate);
        let (core, writer_task) = SessionCore::start(
            accepted.encoding,
            writer,
            SessionOptions::from(&self.config),
        );

        let refuse = |code: ErrorCode, message: String| {
            let core = core.clone();
            async move {
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
                let _ = core
                    .send_raw(Outbound::WsClose(close_code::POLICY, message.clone()))
                    .await;
                message
            }
        };

        let first = tokio::time::timeout(deadline, core.first_message(&mut reader)).await;
        let auth = match first {
            Err(_) => {
                let m = refuse(
                    ErrorCode::AuthFailed,
                    format!("no auth message within {deadline:?}"),
                )
                .await;
                return finish(core, writer_task, Err(m)).await;
            }
            Ok(FirstMessage::Gone(reason)) => {
                return finish(core, writer_task, Err(reason)).await;
            }
            Ok(FirstMessage::Invalid(e)) => {
                let m = refuse(ErrorCode::InvalidMessage, e).await;
                return finish(core, writer_task, Err(m)).await;
            }
            Ok(FirstMessage::Message(Message::Auth(auth), _)) => auth,
            Ok(FirstMessage::Message(other, _)) => {
                let m = refuse(
                    ErrorCode::InvalidMessage,
                    format!(
                        "the first message must be auth, got {}",
                        other.kind().as_str()
                    ),
                )
                .await;
                return finish(core, writer_task, Err(m)).await;
            }
        };

        let ip = peer.ip();
        if self.throttle.is_locked(ip) {
            self.metrics.auth_refused_locked();
            let m = refuse(
                ErrorCode::RateLimited,
                "too many failed authentications from this address; try again later".into(),
            )
            .await;
            return finish(core, writer_task, Err(m)).await;
        }
        let group = match self.agents.authenticate(&auth.username, &auth.password) {
            Some(identity) if !auth.client_id.is_empty() => identity.group,
            _ => {
                let locked = self.throttle.failure(ip);
                self.metrics.auth_failed(locked);
                if locked {
                    tracing::warn!(%peer, "agent authentication locked out after repeated failures");
                }
                tracing::warn!(%peer, username = %auth.username, client_id = %auth.client_id, "agent authentication failed");
                let m = refuse(
                    ErrorCode::AuthFailed,
                    "authentication failed: wrong username (group), password or empty client_id"
                        .into(),
                )
                .await;
                return finish(core, writer_task, Err(m)).await;
            }
        };
        self.throttle.success(ip);

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
        // Dropped when this function returns: the session's counters join its series.
        let _counted = self
            .metrics
            .sessions
            .attach(&group, &auth.client_id, core.clone());
        if self.lifecycle.draining.is_cancelled() {
            core.announce_going_away("gateway shutting down").await;
        }

        let pinger = tokio::spawn(core.clone().heartbeat(self.config.ping_interval.0));
        let role_core = core.clone();
        let (role_handle, forwards) = (handle.clone(), self.forwards.clone());
        // Scoped: the read loop borrows `core`, which the teardown below consumes.
        let end = {
            let read = core.read_loop(&mut reader, self.config.idle_timeout.0, move |msg| {
                let core = role_core.clone();
                let (handle, forwards) = (role_handle.clone(), forwards.clone());
                async move {
                    if let Message::Forward(req) = msg {
                        // Binding may wait for a previous owner to let go of the port: off
                        // the read loop, so the session's traffic keeps flowing.
                        tokio::spawn(async move {
                            let result = forwards.open(&handle, &req).await;
                            let (success, message) = match &result {
                                Ok(addr) => (true, format!("listening on {addr}")),
                                Err(e) => (false, e.clone()),
                            };
                            tracing::info!(client_id = %handle.client_id, group = %handle.group, port = req.listen_port, target_host = %req.target_host, target_port = req.target_port, success, %message, "agent forward");
                            let _ = core
                                .send(Message::ForwardResponse(ForwardResponse {
                                    listen_port: req.listen_port,
                                    success,
                                    message,
                                }))
                                .await;
                        });
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
            });
            tokio::pin!(read);
            let mut listed = true;
            loop {
                tokio::select! {
                    end = &mut read => break end,
                    _ = shutdown.cancelled() => break crate::tunnel::SessionEnd::Shutdown,
                    // A draining agent keeps its live connections but takes no new ones.
                    _ = core.peer_going_away(), if listed => {
                        listed = false;
                        self.registry.unregister(&handle);
                    }
                }
            }
        };
        pinger.abort();
        self.forwards.release(handle.serial);
        self.registry.unregister(&handle);
        self.lifecycle.live.remove(&handle.serial);
        // Logged before the teardown, which cancels the connections still open: they
        // end now, with this reason, rather than hang.
        tracing::info!(client_id = %auth.client_id, %peer, conns = core.active_conns(), reason = %end, "agent disconnected");
        if matches!(end, crate::tunnel::SessionEnd::Shutdown) {
            let close = Outbound::WsClose(close_code::GOING_AWAY, "gateway shutting down".into());
            let _ = tokio::time::timeout(WRITER_GRACE, core.send_raw(close)).await;
            flush_then_end(core, writer_task).await;
            return Ok(());
        }
        if matches!(end, crate::tunnel::SessionEnd::Error(_)) {
            // The read loop queued a close frame naming the error (1002, 1009...): let
            // the writer send it before the session's teardown could replace it, then
            // linger so that the peer reads it before the socket goes away.
            flush_then_end(core, writer_task).await;
            linger(&mut reader).await;
            return Ok(());
        }
        finish(core, writer_task, Ok(())).await
    }
}

/// After we sent a close frame: reads (and drops) what the peer still sends for a short
/// while, until its close or end of stream. Closing a socket with unread input sends a
/// reset, which can destroy our close frame before the peer has read it.
async fn linger(reader: &mut crate::transport::WsReader) {
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

/// Lets the writer send what is queued (the refusal, the close frame), then tears the
/// session down.
async fn finish(
    core: Arc<SessionCore>,
    mut writer_task: tokio::task::JoinHandle<()>,
    result: Result<(), String>,
) -> Result<(), String> {
    if result.is_err() {
        flush_then_end(core, writer_task).await;
    } else {
        core.shutdown();
        let _ = tokio::time::timeout(WRITER_GRACE, &mut writer_task).await;
        // A writer stuck on a peer that stopped reading would otherwise outlive us.
        writer_task.abort();
    }
    result
}

const WRITER_GRACE: Duration = Duration::from_secs(2);

/// Lets the writer send what is queued (ending with a close frame), then tears down.
async fn flush_then_end(core: Arc<SessionCore>, mut writer_task: tokio::task::JoinHandle<()>) {
    let _ = tokio::time::timeout(WRITER_GRACE, &mut writer_task).await;
    core.shutdown();
    writer_task.abort();
}
