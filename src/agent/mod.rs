//! The client agent: keeps authenticated WebSocket sessions to the gateway and dials
//! the targets the gateway asks for, inside its own network.

use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{Auth, ConnectResponse, Encoding, ErrorCode, ErrorMsg, Message, Protocol};
use fastwebsockets::Role;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ClientConfig;
use crate::connect::Access;
use crate::dial::{self as dial, acl, acl::Acl};
use crate::net::{FailureKind, HostPort};
use crate::transport::ws::close_code;
use crate::transport::{handshake, tls, ws, BoxIo, WsReader};
use crate::tunnel::session::{
    FirstMessage, Role as SessionRole, Session, GOING_AWAY, WRITER_GRACE,
};
use crate::tunnel::{relay_tunnel, RelayStats, SessionCore, SessionEnd, SessionOptions};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Acl(#[from] acl::AclError),
    #[error("gateway_addr {0:?} is not host:port")]
    GatewayAddr(String),
}

/// Why one session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot reach the gateway: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
    #[error("authentication refused: {0}")]
    AuthRefused(String),
    #[error("session ended: {0}")]
    Ended(String),
}

pub struct Agent {
    config: ClientConfig,
    acl: Acl,
    tls: TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
    /// `max_concurrent_conns`, shared by all replicas.
    permits: Arc<Semaphore>,
    /// Every `connect` being served, so that `run` returns only once they ended.
    conn_tasks: TaskTracker,
    metrics: Arc<crate::metrics::AgentMetrics>,
}

/// An authenticated session, ready to serve.
struct Established {
    session: Session,
    reader: WsReader,
    /// Messages that arrived together with `auth_response`.
    leftovers: Vec<Message>,
}

impl Agent {
    pub fn new(config: ClientConfig) -> Result<Arc<Agent>, AgentError> {
        let acl = Acl::new(&config.forbidden_hosts, &config.limit)?;
        let identity = config
            .tls_client_cert
            .as_deref()
            .zip(config.tls_client_key.as_deref());
        let tls_config =
            tls::client_config_with_identity(config.gateway_tls_cert.as_deref(), identity)?;
        let host = match &config.gateway_server_name {
            Some(name) => name.clone(),
            None => gateway_host(&config.gateway_addr)
                .ok_or_else(|| AgentError::GatewayAddr(config.gateway_addr.clone()))?,
        };
        let server_name = tls::server_name(&host)?;
        let permits = Arc::new(Semaphore::new(config.max_concurrent_conns));
        Ok(Arc::new(Agent {
            config,
            acl,
            tls: TlsConnector::from(tls_config),
            server_name,
            permits,
            conn_tasks: TaskTracker::new(),
            metrics: Arc::default(),
        }))
    }

    /// Starts the admin listener when `admin_addr` is set; it reports "not ready" once
    /// `shutdown` fires and lives as long as the process.
    pub async fn start_admin(
        &self,
        shutdown: CancellationToken,
    ) -> Result<Option<std::net::SocketAddr>, crate::metrics::AdminError> {
        let Some(admin) = self.config.admin() else {
            return Ok(None);
        };
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            metrics.stopping.cancel();
        });
        let observed = self.metrics.clone();
        crate::metrics::admin::serve(admin, observed, CancellationToken::new())
            .await
            .map(Some)
    }

    /// Runs every replica until `shutdown`, reconnecting forever. At `shutdown` each
    /// authenticated session drains (new `connect`s refused, live connections given
    /// `drain_timeout`), closes with 1001 and is not reconnected; returns once every
    /// task it started has ended.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let replicas = self.config.replicas;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..replicas {
            let client_id = if replicas == 1 {
                self.config.client_id.clone()
            } else {
                format!("{}.{}", self.config.client_id, i)
            };
            // Every line a replica logs names it, through this span.
            let span =
                tracing::info_span!("agent", %client_id, gateway = %self.config.gateway_addr);
            tasks.spawn(
                self.clone()
                    .replica(client_id, shutdown.clone())
                    .instrument(span),
            );
        }
        while tasks.join_next().await.is_some() {}
        self.conn_tasks.close();
        self.conn_tasks.wait().await;
    }

    async fn replica(self: Arc<Self>, client_id: String, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        loop {
            // Until authenticated there is nothing to drain: a shutdown simply drops it.
            let established = tokio::select! {
                r = self.establish(&client_id) => r,
                _ = shutdown.cancelled() => return,
            };
            let result = match established {
                Ok(session) => {
                    attempt = 0;
                    self.serve(&client_id, session, &shutdown).await
                }
                Err(e) => Err(e),
            };
            if shutdown.is_cancelled() {
                tracing::info!("session closed for shutdown");
                return;
            }
            if let Err(e) = &result {
                tracing::warn!(error = %e, "gateway session ended");
            }
            let delay = backoff(
                attempt,
                self.config.reconnect_min.0,
                self.config.reconnect_max.0,
            );
            attempt = attempt.saturating_add(1);
            tracing::info!(?delay, attempt, "reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Connects, verifies TLS, negotiates and authenticates: the gateway's phases,
    /// seen from the other side.
    async fn establish(&self, client_id: &str) -> Result<Established, SessionError> {
        let tcp = self.connect_tcp().await?;
        let io = self.tls_handshake(tcp).await?;
        let (mut reader, session) = self.upgrade(io).await?;
        match self
            .authenticate(client_id, session.core(), &mut reader)
            .await
        {
            Ok(leftovers) => Ok(Established {
                session,
                reader,
                leftovers,
            }),
            Err(e) => {
                session.end().await;
                Err(e)
            }
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream, SessionError> {
        let cfg = &self.config;
        let tcp = tokio::time::timeout(cfg.dial_timeout.0, TcpStream::connect(&cfg.gateway_addr))
            .await
            .map_err(|_| SessionError::Connect(format!("{} timed out", cfg.gateway_addr)))?
            .map_err(|e| SessionError::Connect(format!("{}: {e}", cfg.gateway_addr)))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn tls_handshake(&self, tcp: TcpStream) -> Result<BoxIo, SessionError> {
        let tls = tokio::time::timeout(
            self.config.dial_timeout.0,
            self.tls
                .connect(self.server_name.clone(), tls::buffered(tcp)),
        )
        .await
        .map_err(|_| SessionError::Tls("handshake timed out".into()))?
        .map_err(|e| SessionError::Tls(e.to_string()))?;
        Ok(Box::new(tls))
    }

    /// The WebSocket upgrade, offering our encodings and compression; starts the
    /// session (and its writer).
    async fn upgrade(&self, mut io: BoxIo) -> Result<(WsReader, Session), SessionError> {
        let cfg = &self.config;
        let offer: &[Encoding] = match Encoding::from(cfg.encoding) {
            Encoding::Binary => &[Encoding::Binary, Encoding::Json],
            Encoding::Json => &[Encoding::Json],
        };
        let connected = tokio::time::timeout(
            cfg.dial_timeout.0,
            handshake::connect(&mut io, &cfg.gateway_addr, offer, Some(&cfg.deflate)),
        )
        .await
        .map_err(|_| SessionError::Handshake("timed out".into()))?
        .map_err(handshake_error)?;
        let (reader, writer) = ws::split(
            io,
            Role::Client,
            cfg.max_message_size.0 as usize,
            connected.deflate,
        );
        let options = SessionOptions::from(cfg);
        Ok((
            reader,
            SessionCore::start(connected.encoding, writer, options),
        ))
    }

    /// Sends `auth` and waits for the answer; returns what arrived with it.
    async fn authenticate(
        &self,
        client_id: &str,
        core: &Arc<SessionCore>,
        reader: &mut ws::WsReader,
    ) -> Result<Vec<Message>, SessionError> {
        let cfg = &self.config;
        // A group's agents authenticate with the group id as the username.
        core.send(Message::Auth(Auth {
            username: cfg
                .group_id
                .clone()
                .unwrap_or_else(|| cfg.auth_username.clone()),
            password: cfg.auth_password.expose().to_owned(),
            client_id: client_id.to_owned(),
        }))
        .await
        .map_err(|e| SessionError::Ended(e.to_string()))?;

        let mut refusal = None;
        loop {
            let first = tokio::time::timeout(cfg.idle_timeout.0, core.first_message(reader))
                .await
                .map_err(|_| {
                    SessionError::AuthRefused("no auth_response from the gateway".into())
                })?;
            match first {
                FirstMessage::Gone(reason) if refusal.is_none() && reason.contains("alert") => {
                    // TLS 1.3: a refused client certificate shows up at the first read.
                    return Err(SessionError::Tls(format!(
                        "the gateway refused the TLS handshake ({reason}); check tls_client_cert"
                    )));
                }
                FirstMessage::Gone(reason) => {
                    return Err(SessionError::AuthRefused(refusal.unwrap_or(reason)));
                }
                FirstMessage::Invalid(e) => return Err(SessionError::Ended(e)),
                FirstMessage::Message(Message::AuthResponse(r), rest) => {
                    if !r.success {
                        return Err(SessionError::AuthRefused(r.message));
                    }
                    return Ok(rest);
                }
                FirstMessage::Message(Message::Error(e), rest) => {
                    let detail = format!("{}: {}", e.code, e.message);
                    // The refusal usually travels with its auth_response.
                    if let Some(Message::AuthResponse(r)) = rest.first() {
                        if !r.success {
                            return Err(SessionError::AuthRefused(detail));
                        }
                    }
                    refusal = Some(detail);
                }
                FirstMessage::Message(other, _) => {
                    return Err(SessionError::Ended(format!(
                        "expected auth_response, got {}",
                        other.kind().as_str()
                    )))
                }
            }
        }
    }

    /// Serves an authenticated session until it ends, or, at `shutdown`, drains it:
    /// tells the gateway we are going away, refuses new `connect`s, lets the live
    /// connections finish for at most `drain_timeout`, then closes with 1001.
    async fn serve(
        self: &Arc<Self>,
        client_id: &str,
        session: Established,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let cfg = &self.config;
        let Established {
            session,
            mut reader,
            leftovers,
        } = session;
        let core = session.core().clone();
        tracing::info!(
            encoding = core.encoding.as_str(),
            deflate = core.compressed(),
            "authenticated to the gateway"
        );

        let group = cfg
            .group_id
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_GROUP);
        let _counted = self.metrics.sessions.attach(group, client_id, core.clone());
        let pinger = tokio::spawn(core.clone().heartbeat(cfg.ping_interval.0));
        // One replica owns the forwards: the others would only meet a conflict.
        let replicas = cfg.replicas;
        if replicas == 1 || client_id == format!("{}.0", cfg.client_id) {
            self.request_forwards(&core).await;
        }
        for msg in leftovers {
            if let Some(role_msg) = core.dispatch(msg).await {
                self.on_role_message(&core, role_msg).await;
            }
        }
        let role = AgentRole(self.clone());
        let read = core.read_loop(&mut reader, cfg.idle_timeout.0, &role);
        tokio::pin!(read);
        let end = tokio::select! {
            end = &mut read => end,
            _ = shutdown.cancelled() => {
                let drain = cfg.drain_timeout.0;
                tracing::info!(conns = core.active_conns(), ?drain, "shutting down: draining");
                let drained = async {
                    core.announce_going_away("agent shutting down").await;
                    core.drained(drain).await
                };
                // The reader keeps running meanwhile: the live connections need it.
                let early_end = tokio::select! {
                    end = &mut read => Some(end),
                    done = tokio::time::timeout(drain, drained) => {
                        if !matches!(done, Ok(true)) {
                            tracing::warn!(conns = core.active_conns(), "drain timeout: closing connections still open");
                        }
                        None
                    }
                };
                match early_end {
                    Some(end) => end,
                    None => {
                        session.send_close(close_code::GOING_AWAY, "agent shutting down").await;
                        // The gateway echoes the close; don't wait for it forever.
                        tokio::time::timeout(WRITER_GRACE, &mut read)
                            .await
                            .unwrap_or(SessionEnd::Shutdown)
                    }
                }
            }
        };
        pinger.abort();
        session.end().await;
        Err(SessionError::Ended(end.to_string()))
    }

    async fn on_role_message(self: &Arc<Self>, core: &Arc<SessionCore>, msg: Message) {
        match msg {
            Message::Connect(c) => {
                self.conn_tasks.spawn(
                    self.clone()
                        .serve_connect(core.clone(), c)
                        .in_current_span(),
                );
            }
            Message::ForwardResponse(r) => {
                if r.success {
                    tracing::info!(port = r.listen_port, message = %r.message, "gateway forward open");
                } else {
                    tracing::error!(port = r.listen_port, message = %r.message, "gateway refused a forward");
                }
            }
            other => {
                let _ = core
                    .send(Message::Error(ErrorMsg {
                        code: ErrorCode::InvalidMessage,
                        message: format!(
                            "unexpected {} on an authenticated session",
                            other.kind().as_str()
                        ),
                        id: other.conn_id(),
                    }))
                    .await;
            }
        }
    }

    /// Asks the gateway for this agent's `open_ports`, again on every new session (the
    /// gateway releases them when a session ends).
    async fn request_forwards(&self, core: &Arc<SessionCore>) {
        if self.config.open_ports.is_empty() {
            return;
        }
        if !core.flow_controlled() {
            tracing::error!("open_ports needs the binary encoding; the gateway chose JSON");
            return;
        }
        for p in &self.config.open_ports {
            let req = Message::Forward(anyproxy_proto::Forward {
                listen_port: p.remote_port,
                target_host: p.target.host.clone(),
                target_port: p.target.port,
            });
            if core.send(req).await.is_err() {
                return;
            }
        }
    }

    async fn serve_connect(self: Arc<Self>, core: Arc<SessionCore>, c: anyproxy_proto::Connect) {
        let id = c.id;
        let target = HostPort::new(c.host.clone(), c.port);
        let refuse = |code: ErrorCode, message: String| {
            self.metrics.connect_refused(code);
            let core = core.clone();
            let target = target.clone();
            async move {
                Access::new("agent")
                    .target(&target)
                    .conn(id)
                    .refused(code, &message);
                let _ = core
                    .send(Message::Error(ErrorMsg {
                        code,
                        message: message.clone(),
                        id: Some(id),
                    }))
                    .await;
                let _ = core
                    .send(Message::ConnectResponse(ConnectResponse {
                        id,
                        success: false,
                        message,
                    }))
                    .await;
            }
        };
        if core.is_going_away() {
            return refuse(
                ErrorCode::InternalError,
                format!("{GOING_AWAY} agent shutting down, not taking new connections"),
            )
            .await;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let max = self.config.max_concurrent_conns;
            return refuse(
                ErrorCode::RateLimited,
                format!("agent is at max_concurrent_conns ({max})"),
            )
            .await;
        };
        if c.protocol == Protocol::Udp {
            return refuse(
                ErrorCode::ConnectionFailed,
                FailureKind::Unreachable.message("udp is not supported by this agent"),
            )
            .await;
        }
        // Registered before dialing, so that a `close` from the gateway (it gave up
        // waiting) cancels this connect instead of leaving an orphan.
        let Some(conn) = core.register(id) else {
            return refuse(
                ErrorCode::InvalidMessage,
                format!("connection id {id} is already in use"),
            )
            .await;
        };
        match dial::dial(&self.acl, &c.host, c.port, self.config.dial_timeout.0).await {
            Ok(stream) => {
                if !core.is_live(id) {
                    return;
                }
                let ok = core
                    .send(Message::ConnectResponse(ConnectResponse {
                        id,
                        success: true,
                        message: "connected".into(),
                    }))
                    .await;
                if ok.is_ok() {
                    crate::tunnel::stats::bump(&core.stats().conns_opened, 1);
                    let started = std::time::Instant::now();
                    let stats = relay_tunnel(stream, conn, None, None).await;
                    // The user's point of view, as on the gateway: what they sent
                    // reached the target.
                    let stats = RelayStats {
                        sent: stats.received,
                        received: stats.sent,
                    };
                    Access::new("agent")
                        .target(&target)
                        .conn(id)
                        .since(started)
                        .relayed(stats);
                }
            }
            Err(e) => {
                // The refusal below is this connection's answer, not an "abandoned" close.
                conn.disarm();
                if core.forget(id) {
                    refuse(e.code, e.message).await;
                }
            }
        }
        drop(permit);
    }
}

/// The agent's side of a session: `connect`s to serve and answers to our `forward`s.
struct AgentRole(Arc<Agent>);

impl SessionRole for AgentRole {
    async fn on_message(&self, core: &Arc<SessionCore>, msg: Message) {
        self.0.on_role_message(core, msg).await
    }
}

/// A TLS failure surfaces as an I/O error of the first write or read; name it as such.
fn handshake_error(e: handshake::HandshakeError) -> SessionError {
    let text = e.to_string();
    match &e {
        handshake::HandshakeError::Io(io)
            if io.get_ref().is_some_and(|i| i.is::<rustls::Error>()) =>
        {
            SessionError::Tls(format!(
                "the gateway refused the TLS handshake ({text}); check tls_client_cert"
            ))
        }
        _ => SessionError::Handshake(text),
    }
}

/// Capped exponential backoff with jitter in [50%, 100%] of the step.
fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let step = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

fn gateway_host(addr: &str) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..40 {
            let d = backoff(attempt, min, max);
            assert!(d <= max);
            let step = min.saturating_mul(1u32 << attempt.min(16)).min(max);
            assert!(d >= step / 2);
        }
    }

    #[test]
    fn gateway_host_parsing() {
        assert_eq!(
            gateway_host("gw.example.com:8443").unwrap(),
            "gw.example.com"
        );
        assert_eq!(gateway_host("[::1]:8443").unwrap(), "::1");
        assert!(gateway_host("nohost").is_none());
    }
}
