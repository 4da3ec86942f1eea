//! The client agent: keeps authenticated WebSocket sessions to every gateway and dials
//! the targets the gateways ask for, inside its own network.
//!
//! Each configured gateway (`host:port`) has a supervisor that resolves its name and
//! keeps one [`Target`] per distinct address: `replicas` sessions to it, each
//! reconnecting on its own schedule, so that losing one gateway never disturbs the
//! sessions to the others. Names are resolved again every [`RESOLVE_EVERY`]: an
//! address gone from the answer has its sessions drained and closed, a new one gets
//! sessions; a failed resolution keeps what there is. A literal address is one target,
//! never resolved again. TLS always verifies the gateway's name, never the address.
//! A reload publishes a new [`Plan`] (the gateways and `replicas`): `run` starts and
//! retires supervisors by gateway name, and each supervisor brings its targets to the
//! new number of replicas, draining the sessions no longer wanted.

mod forwards;
mod reload;
mod udp;

pub use reload::ReloadError;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{Auth, ConnectResponse, Encoding, ErrorCode, ErrorMsg, Message, Protocol};
use fastwebsockets::Role;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::ClientConfig;
use crate::connect::Access;
use crate::dial::{self as dial, acl};
use crate::metrics::links::{LinkRow, LinkState};
use crate::net::HostPort;
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
    #[error("gateway address {0:?} is not host:port")]
    GatewayAddr(String),
}

/// How often a gateway's name is resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// Addresses kept per gateway name, the first ones in the resolver's order.
pub const MAX_ADDRS: usize = 16;

/// Resolves `host:port` to its addresses.
type Resolver = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    })
}

/// A configured gateway.
struct Gateway {
    /// As configured, `host:port`: the WebSocket `Host`, and its name in logs and status.
    name: Arc<str>,
    host: String,
    port: u16,
    /// What its certificate must carry: `gateway_server_name`, or the host.
    server_name: rustls::pki_types::ServerName<'static>,
    /// A literal address is one target, never resolved.
    literal: Option<SocketAddr>,
}

/// One address of a gateway: the agent keeps `replicas` sessions to it.
struct Target {
    gateway: Arc<Gateway>,
    addr: SocketAddr,
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
    /// What it may dial and how many at once: a SIGHUP swaps them (see `reload`).
    live: reload::Live,
    /// Used by each new connection; a SIGHUP swaps it (client certificate, trust).
    tls: arc_swap::ArcSwap<TlsConnector>,
    /// `open_ports`, and the sessions that ask for them: a SIGHUP changes them.
    forwards: forwards::Forwards,
    /// The gateways and replicas wanted; `run` and each supervisor follow it.
    plan: tokio::sync::watch::Sender<Plan>,
    resolver: Resolver,
    resolve_every: Duration,
    /// Addresses with sessions, and the gateway that keeps them: two names for one
    /// address would be two sessions of one client id to one gateway, replacing each
    /// other.
    claimed: parking_lot::Mutex<HashMap<SocketAddr, Arc<str>>>,
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
        let live = reload::Live::new(&config)?;
        let connector = tls_connector(&config)?;
        let gateways = gateways(&config, config.gateway_server_name.as_deref(), &[])?;
        let plan = tokio::sync::watch::Sender::new(Plan {
            gateways,
            replicas: config.replicas,
        });
        Ok(Arc::new(Agent {
            forwards: forwards::Forwards::new(&config.open_ports),
            config,
            live,
            tls: arc_swap::ArcSwap::from_pointee(connector),
            plan,
            resolver: system_resolver(),
            resolve_every: RESOLVE_EVERY,
            claimed: Default::default(),
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

    /// Keeps the sessions to every gateway until `shutdown`, reconnecting forever. At
    /// `shutdown` each authenticated session drains (new `connect`s refused, live
    /// connections given `drain_timeout`), closes with 1001 and is not reconnected;
    /// returns once every task it started has ended. A reload that changes the
    /// gateways starts a supervisor for each one added and retires each one removed
    /// (its sessions drain and close the same way).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        let stopping = shutdown.clone();
        tasks.spawn(async move {
            stopping.cancelled().await;
            crate::net::notify::notify(crate::net::notify::State::Stopping);
        });
        let mut plan = self.plan.subscribe();
        // Each supervisor stops when its token is cancelled: at shutdown (a child
        // token) or when a reload removes its gateway.
        let mut kept: HashMap<Arc<str>, CancellationToken> = HashMap::new();
        loop {
            let gateways = plan.borrow_and_update().gateways.clone();
            kept.retain(|name, retire| {
                let keep = gateways.iter().any(|g| &g.name == name);
                if !keep {
                    retire.cancel();
                }
                keep
            });
            for gateway in gateways {
                if kept.contains_key(&gateway.name) {
                    continue;
                }
                let retire = shutdown.child_token();
                kept.insert(gateway.name.clone(), retire.clone());
                let stops = Stops {
                    shutdown: shutdown.clone(),
                    gateway: retire,
                    target: CancellationToken::new(),
                    replica: CancellationToken::new(),
                };
                tasks.spawn(self.clone().keep_gateway(gateway, stops));
            }
            tokio::select! {
                changed = plan.changed() => if changed.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        self.conn_tasks.close();
        self.conn_tasks.wait().await;
    }

    /// One gateway's supervisor: resolves its name, keeps a [`Target`] per address
    /// (retiring those gone from the answer) with the configured number of replicas,
    /// and returns once every session it started has ended after `stops.gateway`.
    async fn keep_gateway(self: Arc<Self>, gateway: Arc<Gateway>, stops: Stops) {
        let retire = stops.gateway.clone();
        let mut plan = self.plan.subscribe();
        let mut targets: BTreeMap<SocketAddr, Replicas> = BTreeMap::new();
        let mut sessions = tokio::task::JoinSet::new();
        let mut failures: u32 = 0;
        // While the name has never resolved, a row saying so.
        let mut unresolved: Option<LinkRow> = None;
        loop {
            let replicas = {
                let plan = plan.borrow_and_update();
                if !plan.gateways.iter().any(|g| g.name == gateway.name) {
                    // Removed: retired here rather than by `run`, which may see the
                    // change later, so that no session mistakes it for fewer replicas.
                    retire.cancel();
                    break;
                }
                plan.replicas
            };
            let resolved = match gateway.literal {
                Some(addr) => Ok(vec![addr]),
                None => tokio::select! {
                    r = self.resolve(&gateway) => r,
                    _ = retire.cancelled() => break,
                },
            };
            match resolved {
                Ok(addrs) => {
                    failures = 0;
                    unresolved = None;
                    let want = Want { addrs, replicas };
                    self.reconcile(&gateway, &mut targets, want, &mut sessions, &stops);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(gateway = %gateway.name, error = %e, kept = targets.len(), "cannot resolve the gateway");
                    if targets.is_empty() {
                        unresolved
                            .get_or_insert_with(|| {
                                self.metrics.links.add(
                                    gateway.name.clone(),
                                    None,
                                    &self.client_id(replicas, 0),
                                    0,
                                    LinkState::Resolving,
                                )
                            })
                            .unresolved(e);
                    }
                }
            }
            // A name that never resolved is retried like a failed connection; a
            // literal address is never resolved again, only a reload wakes it (or,
            // while another name or a retired supervisor still holds it, the timer).
            let wait = if targets.is_empty() && failures > 0 {
                backoff(
                    failures - 1,
                    self.config.reconnect_min.0,
                    self.config.reconnect_max.0,
                )
            } else if gateway.literal.is_some() && !targets.is_empty() {
                Duration::MAX
            } else {
                self.resolve_every
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = plan.changed() => {}
                _ = retire.cancelled() => break,
            }
            while sessions.try_join_next().is_some() {}
        }
        drop(unresolved);
        while sessions.join_next().await.is_some() {}
        let mut claimed = self.claimed.lock();
        for addr in targets.keys() {
            claimed.remove(addr);
        }
    }

    /// The gateway's addresses, distinct, at most [`MAX_ADDRS`], within `dial_timeout`.
    async fn resolve(&self, gateway: &Gateway) -> Result<Vec<SocketAddr>, String> {
        let lookup = (self.resolver)(gateway.host.clone(), gateway.port);
        let mut addrs = tokio::time::timeout(self.config.dial_timeout.0, lookup)
            .await
            .map_err(|_| "resolution timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(*a));
        addrs.truncate(MAX_ADDRS);
        if addrs.is_empty() {
            return Err("the name has no address".into());
        }
        Ok(addrs)
    }

    /// Retires the targets whose address is gone from `want.addrs` (their sessions
    /// drain and close), starts one for each new address, and brings every target to
    /// `want.replicas` sessions.
    fn reconcile(
        self: &Arc<Self>,
        gateway: &Arc<Gateway>,
        targets: &mut BTreeMap<SocketAddr, Replicas>,
        want: Want,
        sessions: &mut tokio::task::JoinSet<()>,
        stops: &Stops,
    ) {
        let mut claimed = self.claimed.lock();
        targets.retain(|addr, replicas| {
            let keep = want.addrs.contains(addr);
            if !keep {
                tracing::info!(gateway = %gateway.name, %addr, "address no longer resolved: closing its sessions");
                replicas.stop.cancel();
                claimed.remove(addr);
            }
            keep
        });
        for addr in want.addrs {
            if targets.contains_key(&addr) {
                continue;
            }
            if let Some(other) = claimed.get(&addr) {
                tracing::debug!(gateway = %gateway.name, %addr, %other, "address already served for another gateway name");
                continue;
            }
            claimed.insert(addr, gateway.name.clone());
            let target = Arc::new(Target {
                gateway: gateway.clone(),
                addr,
            });
            let stop = stops.gateway.child_token();
            targets.insert(
                addr,
                Replicas {
                    target,
                    stop,
                    each: Vec::new(),
                },
            );
        }
        drop(claimed);
        for replicas in targets.values_mut() {
            self.resize(replicas, want.replicas, sessions, stops);
        }
    }

    /// Closes the replicas of a target beyond `n` (they drain) and starts the missing
    /// ones. A replica keeps the client id it started with until it ends: one started
    /// alone is `client_id`, and stays so when more join it.
    fn resize(
        self: &Arc<Self>,
        replicas: &mut Replicas,
        n: usize,
        sessions: &mut tokio::task::JoinSet<()>,
        stops: &Stops,
    ) {
        for stop in replicas.each.drain(n.min(replicas.each.len())..) {
            stop.cancel();
        }
        let (gateway, addr) = (&replicas.target.gateway, replicas.target.addr);
        for replica in replicas.each.len()..n {
            let client_id = self.client_id(n, replica);
            // Every line a replica logs names it, through this span.
            let span = tracing::info_span!("agent", %client_id, gateway = %gateway.name, %addr);
            let row = self.metrics.links.add(
                gateway.name.clone(),
                Some(addr),
                &client_id,
                replica,
                LinkState::Connecting,
            );
            let stop = replicas.stop.child_token();
            replicas.each.push(stop.clone());
            let stops = Stops {
                target: replicas.stop.clone(),
                replica: stop,
                ..stops.clone()
            };
            let me = Replica {
                target: replicas.target.clone(),
                index: replica,
                client_id,
            };
            sessions.spawn(self.clone().replica(me, row, stops).instrument(span));
        }
    }

    /// The client id of replica `i` of `n`: `client_id`, or `client_id.i` with replicas.
    fn client_id(&self, n: usize, i: usize) -> String {
        if n == 1 {
            self.config.client_id.clone()
        } else {
            format!("{}.{}", self.config.client_id, i)
        }
    }

    /// One session to one target, reconnected with backoff until `stops.replica`
    /// (shutdown, the gateway or address retired, replicas lowered). `row` shows it in
    /// the status; it goes with this task.
    async fn replica(self: Arc<Self>, me: Replica, row: LinkRow, stops: Stops) {
        let Replica {
            target,
            index: replica,
            client_id,
        } = me;
        let stop = &stops.replica;
        let mut attempt: u32 = 0;
        loop {
            row.connecting();
            // Until authenticated there is nothing to drain: a stop simply drops it.
            let established = tokio::select! {
                r = self.establish(&target, &client_id) => r,
                _ = stop.cancelled() => return,
            };
            let result = match established {
                Ok(session) => {
                    attempt = 0;
                    let serving = Serving {
                        client_id: &client_id,
                        replica,
                        row: &row,
                        stops: &stops,
                    };
                    self.serve(serving, session).await
                }
                Err(e) => Err(e),
            };
            if stop.is_cancelled() {
                tracing::info!("session closed: {}", stops.reason());
                return;
            }
            row.backoff(result.as_ref().err().map(|e| e.to_string()));
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
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Connects, verifies TLS, negotiates and authenticates: the gateway's phases,
    /// seen from the other side.
    async fn establish(
        &self,
        target: &Target,
        client_id: &str,
    ) -> Result<Established, SessionError> {
        let tcp = self.connect_tcp(target.addr).await?;
        let io = self.tls_handshake(&target.gateway, tcp).await?;
        let (mut reader, session) = self.upgrade(&target.gateway, io).await?;
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

    async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, SessionError> {
        let tcp = tokio::time::timeout(self.config.dial_timeout.0, TcpStream::connect(addr))
            .await
            .map_err(|_| SessionError::Connect(format!("{addr} timed out")))?
            .map_err(|e| SessionError::Connect(format!("{addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn tls_handshake(
        &self,
        gateway: &Gateway,
        tcp: TcpStream,
    ) -> Result<BoxIo, SessionError> {
        let tls = tokio::time::timeout(
            self.config.dial_timeout.0,
            self.tls
                .load()
                .connect(gateway.server_name.clone(), tls::buffered(tcp)),
        )
        .await
        .map_err(|_| SessionError::Tls("handshake timed out".into()))?
        .map_err(|e| SessionError::Tls(tls::describe_io_error(&e)))?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        if let Some(v) = leaf.and_then(tls::validity) {
            if self.metrics.gateway_cert_seen(&gateway.name, v.not_after) {
                let days = v.days_left(tls::unix_now());
                if days < CERT_EXPIRY_WARNING_DAYS {
                    tracing::warn!(
                        days,
                        "the gateway's tls certificate expires on {}",
                        v.expiry()
                    );
                }
            }
        }
        Ok(Box::new(tls))
    }

    /// The WebSocket upgrade, offering our encodings and compression; starts the
    /// session (and its writer).
    async fn upgrade(
        &self,
        gateway: &Gateway,
        mut io: BoxIo,
    ) -> Result<(WsReader, Session), SessionError> {
        let cfg = &self.config;
        let offer: &[Encoding] = match Encoding::from(cfg.encoding) {
            Encoding::Binary => &[Encoding::Binary, Encoding::Json],
            Encoding::Json => &[Encoding::Json],
        };
        let connected = tokio::time::timeout(
            cfg.dial_timeout.0,
            handshake::connect(&mut io, &gateway.name, offer, Some(&cfg.deflate)),
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

    /// Serves an authenticated session until it ends, or, at `stop`, drains it:
    /// tells the gateway we are going away, refuses new `connect`s, lets the live
    /// connections finish for at most `drain_timeout`, then closes with 1001.
    async fn serve(
        self: &Arc<Self>,
        serving: Serving<'_>,
        session: Established,
    ) -> Result<(), SessionError> {
        let Serving {
            client_id,
            replica,
            row,
            stops,
        } = serving;
        let stop = &stops.replica;
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
        crate::net::notify::ready_once();

        let group = cfg
            .group_id
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_GROUP);
        let _counted = self.metrics.sessions.attach(group, client_id, core.clone());
        row.connected(core.clone());
        let pinger = tokio::spawn(core.clone().heartbeat(cfg.ping_interval.0));
        // On each gateway one replica owns the forwards: the others would only meet a
        // conflict. Registered, it also gets the ports a reload adds.
        let owner = (replica == 0).then(|| self.forwards.register());
        let (_registered, announcer) = match owner {
            Some((registered, queue)) => {
                let task = forwards::announce(core.clone(), queue).in_current_span();
                (Some(registered), Some(tokio::spawn(task)))
            }
            None => (None, None),
        };
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
            _ = stop.cancelled() => {
                let drain = cfg.drain_timeout.0;
                let why = stops.reason();
                tracing::info!(conns = core.active_conns(), ?drain, "{why}: draining");
                let drained = async {
                    core.announce_going_away(why).await;
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
                        session.send_close(close_code::GOING_AWAY, why).await;
                        // The gateway echoes the close; don't wait for it forever.
                        tokio::time::timeout(WRITER_GRACE, &mut read)
                            .await
                            .unwrap_or(SessionEnd::Shutdown)
                    }
                }
            }
        };
        pinger.abort();
        if let Some(announcer) = announcer {
            announcer.abort();
        }
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
                let protocol = r.protocol.as_str();
                if r.success {
                    tracing::info!(port = r.listen_port, protocol, message = %r.message, "gateway forward open");
                } else {
                    tracing::error!(port = r.listen_port, protocol, message = %r.message, "gateway refused a forward");
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
        // Loaded once: this connect is decided by one configuration.
        let rules = self.live.rules();
        let Some(permit) = self.live.admit(&rules) else {
            let max = rules.max_conns;
            return refuse(
                ErrorCode::RateLimited,
                format!("agent is at max_concurrent_conns ({max})"),
            )
            .await;
        };
        if !rules.protocols.allows(c.protocol) {
            return refuse(
                ErrorCode::ForbiddenHost,
                format!(
                    "{} is not in this agent's protocols {}",
                    c.protocol.as_str(),
                    rules.protocols.describe()
                ),
            )
            .await;
        }
        if c.protocol == Protocol::Udp {
            if let Err(e) = self.serve_udp(&core, &c).await {
                refuse(e.code, e.message).await;
            }
            drop(permit);
            return;
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
        match dial::dial(&rules.acl, &c.host, c.port, self.config.dial_timeout.0).await {
            Ok(stream) => {
                if !core.is_live(id) {
                    return;
                }
                // A reload that forbids this target closes it, whenever it comes.
                let watched = stream.peer_addr().ok().map(|a| self.live.watch(&target, a));
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
                    let revoke = watched.as_ref().map(|w| &w.revoke);
                    let stats = relay_tunnel(stream, conn, None, None, revoke).await;
                    // The user's point of view, as on the gateway: what they sent
                    // reached the target.
                    let stats = RelayStats {
                        sent: stats.received,
                        received: stats.sent,
                        ended_by: stats.ended_by,
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

/// What [`Agent::serve`] needs besides the session.
struct Serving<'a> {
    client_id: &'a str,
    replica: usize,
    row: &'a LinkRow,
    /// `stops.replica`: drain and close.
    stops: &'a Stops,
}

/// What a session waits on to drain and close, from the widest: the agent's shutdown,
/// its gateway removed by a reload, its address no longer resolved, its replica no
/// longer wanted. Each is a child of the one before; `replica` fires for all.
#[derive(Clone)]
struct Stops {
    shutdown: CancellationToken,
    gateway: CancellationToken,
    target: CancellationToken,
    replica: CancellationToken,
}

impl Stops {
    /// Why the session is being closed on purpose, for the logs and the gateway.
    fn reason(&self) -> &'static str {
        if self.shutdown.is_cancelled() {
            "agent shutting down"
        } else if self.gateway.is_cancelled() {
            "gateway removed from the configuration"
        } else if self.target.is_cancelled() {
            "gateway address no longer resolved"
        } else {
            "replica no longer configured (replicas lowered)"
        }
    }
}

/// One replica's place: its target, its index and the client id it keeps.
struct Replica {
    target: Arc<Target>,
    index: usize,
    client_id: String,
}

/// A target's replicas: `stop` ends them all (the address retired), `each` one.
struct Replicas {
    target: Arc<Target>,
    stop: CancellationToken,
    each: Vec<CancellationToken>,
}

/// What a supervisor reconciles to: the addresses resolved, the replicas configured.
struct Want {
    addrs: Vec<SocketAddr>,
    replicas: usize,
}

/// The gateways and replicas configured: a reload replaces it.
struct Plan {
    gateways: Vec<Arc<Gateway>>,
    replicas: usize,
}

/// The agent's side of a session: `connect`s to serve and answers to our `forward`s.
struct AgentRole(Arc<Agent>);

impl SessionRole for AgentRole {
    async fn on_message(&self, core: &Arc<SessionCore>, msg: Message) {
        self.0.on_role_message(core, msg).await
    }
}

/// A gateway certificate expiring within this many days is logged as a warning.
const CERT_EXPIRY_WARNING_DAYS: i64 = 14;

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

/// The gateways `config` names, each verified against `server_name` (or its host);
/// one already in `running` under the same name is kept as it is.
fn gateways(
    config: &ClientConfig,
    server_name: Option<&str>,
    running: &[Arc<Gateway>],
) -> Result<Vec<Arc<Gateway>>, AgentError> {
    let mut gateways = Vec::new();
    for name in config.gateways() {
        if let Some(g) = running.iter().find(|g| &*g.name == name) {
            gateways.push(g.clone());
            continue;
        }
        let hp: HostPort = name
            .parse()
            .map_err(|_| AgentError::GatewayAddr(name.to_owned()))?;
        let verify = server_name.unwrap_or(&hp.host);
        gateways.push(Arc::new(Gateway {
            name: Arc::from(name),
            server_name: tls::server_name(verify)?,
            literal: hp
                .host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, hp.port)),
            host: hp.host,
            port: hp.port,
        }));
    }
    if gateways.is_empty() {
        return Err(AgentError::GatewayAddr(String::new()));
    }
    Ok(gateways)
}

/// How the agent opens TLS to its gateways: whom it trusts (`gateway_tls_cert`,
/// `gateway_tls_fingerprint`) and the certificate it presents (`tls_client_cert`).
fn tls_connector(config: &ClientConfig) -> Result<TlsConnector, tls::TlsError> {
    let identity = config
        .tls_client_cert
        .as_deref()
        .zip(config.tls_client_key.as_deref());
    let tls_config = tls::gateway_client_config(
        config.gateway_tls_cert.as_deref(),
        config.gateway_tls_fingerprint.map(|f| f.0),
        identity,
    )?;
    Ok(TlsConnector::from(tls_config))
}

/// Capped exponential backoff with jitter in [50%, 100%] of the step.
fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let step = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
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

    /// Addresses on which nothing listens: connections to them are refused at once.
    fn refusing_addrs(n: usize) -> Vec<SocketAddr> {
        let held: Vec<_> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        held.iter().map(|l| l.local_addr().unwrap()).collect()
    }

    /// A `client:` section of `lines` and the client id `c`'s credentials.
    fn client_config(lines: &str) -> ClientConfig {
        let text =
            format!("client:\n{lines}\n  client_id: c\n  auth_username: u\n  auth_password: p\n");
        crate::config::Config::parse(&text, std::path::Path::new("t.yaml"))
            .unwrap()
            .client
            .unwrap()
    }

    /// An agent whose resolver answers, for every name, what `answer` holds now
    /// (`None`: fails), and resolves again every 20 ms.
    fn agent_with(
        client: &str,
        answer: Arc<parking_lot::Mutex<HashMap<String, Option<Vec<SocketAddr>>>>>,
    ) -> Arc<Agent> {
        let config = client_config(&format!(
            "{client}\n  reconnect_min: 10ms\n  reconnect_max: 50ms"
        ));
        let mut agent = Arc::into_inner(Agent::new(config).unwrap()).unwrap();
        agent.resolve_every = Duration::from_millis(20);
        agent.resolver = Arc::new(move |host, _port| {
            let answer = answer.lock().get(&host).cloned().flatten();
            Box::pin(
                async move { answer.ok_or_else(|| std::io::Error::other("no such name (test)")) },
            )
        });
        Arc::new(agent)
    }

    /// The (gateway, address, replica) of every status row.
    fn rows(agent: &Agent) -> Vec<(String, Option<String>, usize)> {
        agent
            .metrics
            .links
            .status()
            .into_iter()
            .map(|r| (r.gateway, r.address, r.replica))
            .collect()
    }

    /// Shuts the agent down and checks that `run` returned and left no status row.
    async fn stop_and_check_empty(
        agent: &Agent,
        shutdown: CancellationToken,
        run: tokio::task::JoinHandle<()>,
    ) {
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap()
            .unwrap();
        assert!(rows(agent).is_empty());
    }

    async fn wait_rows(agent: &Agent, want: &[(&str, Option<SocketAddr>, usize)]) {
        let mut want: Vec<_> = want
            .iter()
            .map(|(g, a, r)| (g.to_string(), a.map(|a| a.to_string()), *r))
            .collect();
        want.sort();
        let sorted = || {
            let mut r = rows(agent);
            r.sort();
            r
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sorted() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "rows {:?}, want {want:?}",
                rows(agent)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_session_per_address_and_replica_following_the_names_answers() {
        let [a, b, c]: [SocketAddr; 3] = refusing_addrs(3).try_into().unwrap();
        let answer = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        answer
            .lock()
            .insert("gw.test".to_owned(), Some(vec![a, b, a]));
        let agent = agent_with(
            "  gateway_addr: \"gw.test:8443\"\n  replicas: 2",
            answer.clone(),
        );
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(agent.clone().run(shutdown.clone()));
        let gw = "gw.test:8443";
        wait_rows(
            &agent,
            &[
                (gw, Some(a), 0),
                (gw, Some(a), 1),
                (gw, Some(b), 0),
                (gw, Some(b), 1),
            ],
        )
        .await;
        // The TLS name stays the host's, whatever the address.
        let name = &agent.plan.borrow().gateways[0].server_name;
        assert_eq!(name.to_str(), "gw.test");

        // b leaves the answer and c joins it.
        answer.lock().insert("gw.test".to_owned(), Some(vec![c, a]));
        wait_rows(
            &agent,
            &[
                (gw, Some(a), 0),
                (gw, Some(a), 1),
                (gw, Some(c), 0),
                (gw, Some(c), 1),
            ],
        )
        .await;
        // A failed resolution keeps the sessions there are.
        answer.lock().insert("gw.test".to_owned(), None);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rows(&agent).len(), 4);

        stop_and_check_empty(&agent, shutdown, run).await;
    }

    #[tokio::test]
    async fn a_new_plan_adds_and_retires_gateways_and_replicas() {
        let [a, b]: [SocketAddr; 2] = refusing_addrs(2).try_into().unwrap();
        let answer = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        answer.lock().insert("gw.test".to_owned(), Some(vec![a]));
        let agent = agent_with("  gateway_addr: \"gw.test:1\"\n  replicas: 2", answer);
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(agent.clone().run(shutdown.clone()));
        let gw = "gw.test:1";
        wait_rows(&agent, &[(gw, Some(a), 0), (gw, Some(a), 1)]).await;
        let running = agent.plan.borrow().gateways.clone();
        agent.replan(running.clone(), 3);
        wait_rows(
            &agent,
            &[(gw, Some(a), 0), (gw, Some(a), 1), (gw, Some(a), 2)],
        )
        .await;
        // A literal gateway added, the replicas lowered to one: the one left keeps its id.
        let literal = b.to_string();
        let config = client_config(&format!("  gateway_addrs: [\"{gw}\", \"{literal}\"]"));
        let both = gateways(&config, None, &running).unwrap();
        assert!(
            Arc::ptr_eq(&both[0], &running[0]),
            "a kept gateway is the same"
        );
        agent.replan(both, 1);
        wait_rows(&agent, &[(gw, Some(a), 0), (literal.as_str(), Some(b), 0)]).await;
        let ids: Vec<_> = agent
            .metrics
            .links
            .status()
            .into_iter()
            .map(|r| r.client_id)
            .collect();
        assert!(
            ids.contains(&"c.0".to_owned()) && ids.contains(&"c".to_owned()),
            "{ids:?}"
        );
        // The named gateway removed: its sessions end, the literal one's stay.
        let only_literal = agent.plan.borrow().gateways[1..].to_vec();
        agent.replan(only_literal, 1);
        wait_rows(&agent, &[(literal.as_str(), Some(b), 0)]).await;
        stop_and_check_empty(&agent, shutdown, run).await;
    }

    #[tokio::test]
    async fn names_sharing_an_address_keep_one_session_to_it() {
        let [a, b]: [SocketAddr; 2] = refusing_addrs(2).try_into().unwrap();
        let answer = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        answer.lock().insert("one.test".to_owned(), Some(vec![a]));
        answer.lock().insert("two.test".to_owned(), None);
        let literal = format!("{b}");
        let agent = agent_with(
            &format!("  gateway_addrs: [\"one.test:1\", \"two.test:1\", \"{literal}\"]"),
            answer.clone(),
        );
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(agent.clone().run(shutdown.clone()));
        // two.test does not resolve yet: one row says so.
        wait_rows(
            &agent,
            &[
                (literal.as_str(), Some(b), 0),
                ("one.test:1", Some(a), 0),
                ("two.test:1", None, 0),
            ],
        )
        .await;
        let status = agent.metrics.links.status();
        let unresolved = status.iter().find(|r| r.address.is_none()).unwrap();
        assert_eq!(unresolved.state, LinkState::Resolving);
        assert!(unresolved.last_error.is_some());
        // It now resolves to an address one.test already has a session to.
        answer.lock().insert("two.test".to_owned(), Some(vec![a]));
        wait_rows(
            &agent,
            &[(literal.as_str(), Some(b), 0), ("one.test:1", Some(a), 0)],
        )
        .await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .unwrap()
            .unwrap();
    }
}
