//! The proxy front ends (`proxy.http`, `proxy.https`, `proxy.socks5`) and the declared
//! `forwards` of a gateway, as one set that the start builds and a reload changes in
//! place.
//!
//! Each entry owns its accept loop through a drop guard: dropping the entry stops
//! accepting, and the connections it accepted live on (they belong to the gateway's
//! connection tracker, not to the loop). A change is planned first, binding every new
//! address, so a port in use fails the reload before anything changes; then it is
//! applied, which cannot fail. An entry whose address stays while its settings change
//! hands its socket, and the connections waiting in its backlog, to a new loop.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::auth::{listener_accounts, AuthBackends};
use super::forward::DeclaredForward;
use super::udp::serve_forward;
use super::TunnelConnector;
use crate::auth::Authority;
use crate::config::{ForwardConfig, GroupConfig, ProxyConfig, ProxyListener};
use crate::limits::{LimitGuard, Limits};
use crate::metrics::MeteredConnector;
use crate::policy::PolicyGuard;
use crate::proxy::http::{HttpProxy, RequestTimeout, HEADER_READ_TIMEOUT};
use crate::proxy::https::HttpsProxy;
use crate::proxy::socks5::Socks5Proxy;
use crate::proxy::socks5_udp::UdpSupport;
use crate::transport::listen::{AcceptLoop, ProxyProtocol, Serve};
use crate::transport::tls;

/// What proxy users' requests pass: metrics, the policy, the limits, then a tunnel.
pub(super) type Guarded = MeteredConnector<PolicyGuard<LimitGuard<TunnelConnector>>>;
/// What forwards' connections pass: they are the operator's own routes, so no policy
/// and only per-address caps (no user is known).
pub(super) type Limited = LimitGuard<TunnelConnector>;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("proxy.https.tls_cert / tls_key: {0}")]
    Tls(tls::TlsError),
    #[error("the gateway is stopping: its listeners stay closed")]
    Stopping,
}

/// What every front end and forward is built from.
pub(super) struct Wiring {
    pub limits: Arc<Limits>,
    pub guarded: Arc<Guarded>,
    pub limited: Arc<Limited>,
    pub udp: Arc<UdpSupport>,
    pub proxy_protocol: Arc<ProxyProtocol>,
    /// The agent listener's certificate: the HTTPS front end presents it when it names
    /// no files of its own, so that one reload rotates both.
    pub agent_cert: Arc<tls::CertSlot>,
    /// Cancelled when the gateway stops: every loop's own stop is a child of it.
    pub shutdown: CancellationToken,
    /// The accept loops, which the gateway's stop waits for.
    pub loops: TaskTracker,
    /// Their connections, which nobody waits for (a keep-alive client could hold a stop
    /// forever); they end with their tunnels.
    pub conns: TaskTracker,
    /// Where loops run and sockets register: a reload runs on a blocking thread.
    pub runtime: tokio::runtime::Handle,
}

/// The three proxy front ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Http,
    Https,
    Socks5,
}

impl Front {
    const ALL: [Front; 3] = [Front::Http, Front::Https, Front::Socks5];

    /// The configuration key, which log lines and errors name.
    pub fn key(self) -> &'static str {
        match self {
            Front::Http => "proxy.http",
            Front::Https => "proxy.https",
            Front::Socks5 => "proxy.socks5",
        }
    }

    /// The name the accept loop's log lines carry.
    fn what(self) -> &'static str {
        match self {
            Front::Http => "http proxy",
            Front::Https => "https proxy",
            Front::Socks5 => "socks5 proxy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub fn of(self, proxy: &ProxyConfig) -> Option<&ProxyListener> {
        match self {
            Front::Http => proxy.http.as_ref(),
            Front::Https => proxy.https.as_ref(),
            Front::Socks5 => proxy.socks5.as_ref(),
        }
    }
}

/// Where the front ends and forwards listen now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listening {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    /// The declared forwards', in configuration order.
    pub forwards: Vec<SocketAddr>,
}

/// A socket being served; dropping it stops the loop that serves it.
struct Served<S> {
    socket: Arc<S>,
    addr: SocketAddr,
    _stop: DropGuard,
}

/// A running front end.
struct RunningFront {
    config: ProxyListener,
    /// Who may use it; a reload replaces its rules and keeps it, so that the holds of
    /// live connections (which a revocation closes) stay with it.
    users: Arc<Authority>,
    /// The HTTPS front end's own certificate, when it names files of its own.
    own_cert: Option<Arc<tls::CertSlot>>,
    served: Served<TcpListener>,
}

/// A running declared forward.
struct RunningForward {
    config: ForwardConfig,
    socket: ForwardSocket,
}

enum ForwardSocket {
    Tcp(Served<TcpListener>),
    Udp(Served<UdpSocket>),
}

impl ForwardSocket {
    fn addr(&self) -> SocketAddr {
        match self {
            ForwardSocket::Tcp(s) => s.addr,
            ForwardSocket::Udp(s) => s.addr,
        }
    }
}

/// The front ends and forwards that run.
pub(super) struct Listeners {
    wiring: Wiring,
    fronts: [Option<RunningFront>; 3],
    forwards: Vec<RunningForward>,
}

/// A change to the set, checked and with its new sockets bound: applying it cannot fail.
pub(super) struct Plan {
    fronts: [Option<FrontPlan>; 3],
    forwards: Vec<ForwardPlan>,
}

struct FrontPlan {
    config: ProxyListener,
    /// The HTTPS front end's own certificate, loaded and checked.
    own_cert: Option<tls::CheckedKey>,
    socket: Socket<TcpListener>,
}

struct ForwardPlan {
    config: ForwardConfig,
    /// The running forward on the same socket, by index.
    running: Option<usize>,
    socket: ForwardBinding,
}

/// Where a planned entry's socket comes from.
enum Socket<S> {
    /// The running entry's, served by the running loop: nothing but its users changes.
    Kept(Arc<S>),
    /// The running entry's, handed to a new loop with the new settings.
    Handed(Arc<S>),
    /// Bound for this change.
    Bound(S),
}

impl<S> Socket<S> {
    fn kept_or_handed(kept: bool, socket: &Arc<S>) -> Self {
        match kept {
            true => Socket::Kept(socket.clone()),
            false => Socket::Handed(socket.clone()),
        }
    }

    fn is_kept(&self) -> bool {
        matches!(self, Socket::Kept(_))
    }

    fn into_arc(self) -> Arc<S> {
        match self {
            Socket::Kept(s) | Socket::Handed(s) => s,
            Socket::Bound(s) => Arc::new(s),
        }
    }
}

enum ForwardBinding {
    Tcp(Socket<TcpListener>),
    Udp(Socket<UdpSocket>),
}

impl ForwardBinding {
    fn is_kept(&self) -> bool {
        match self {
            ForwardBinding::Tcp(s) => s.is_kept(),
            ForwardBinding::Udp(s) => s.is_kept(),
        }
    }
}

impl Listeners {
    /// An empty set: the start plans and applies the configuration as a reload would.
    pub fn new(wiring: Wiring) -> Self {
        Listeners {
            wiring,
            fronts: [None, None, None],
            forwards: Vec::new(),
        }
    }

    pub fn listening(&self) -> Listening {
        let addr = |f: Front| self.fronts[f.index()].as_ref().map(|r| r.served.addr);
        Listening {
            http: addr(Front::Http),
            https: addr(Front::Https),
            socks5: addr(Front::Socks5),
            forwards: self.forwards.iter().map(|f| f.socket.addr()).collect(),
        }
    }

    /// The running front end's configuration and users.
    pub fn front(&self, front: Front) -> Option<(&ProxyListener, &Arc<Authority>)> {
        self.fronts[front.index()]
            .as_ref()
            .map(|r| (&r.config, &r.users))
    }

    /// Checks `proxy` and `forwards` against what runs and binds every new address.
    /// On error nothing has changed (the sockets bound so far close again).
    pub fn plan(
        &self,
        proxy: &ProxyConfig,
        forwards: &[ForwardConfig],
    ) -> Result<Plan, ListenError> {
        if self.wiring.shutdown.is_cancelled() {
            return Err(ListenError::Stopping);
        }
        let _runtime = self.wiring.runtime.enter();
        let mut fronts = [None, None, None];
        for front in Front::ALL {
            let Some(next) = front.of(proxy) else {
                continue;
            };
            let running = self.fronts[front.index()].as_ref();
            fronts[front.index()] = Some(plan_front(front, running, next)?);
        }
        let mut taken = vec![false; self.forwards.len()];
        let mut planned = Vec::with_capacity(forwards.len());
        for (i, next) in forwards.iter().enumerate() {
            let same_socket = self.forwards.iter().enumerate().position(|(j, f)| {
                !taken[j]
                    && f.config.protocol == next.protocol
                    && f.config.listen_addr == next.listen_addr
            });
            let socket = match same_socket {
                Some(j) => {
                    taken[j] = true;
                    let running = &self.forwards[j];
                    let kept = !forward_settings_changed(&running.config, next);
                    match &running.socket {
                        ForwardSocket::Tcp(s) => {
                            ForwardBinding::Tcp(Socket::kept_or_handed(kept, &s.socket))
                        }
                        ForwardSocket::Udp(s) => {
                            ForwardBinding::Udp(Socket::kept_or_handed(kept, &s.socket))
                        }
                    }
                }
                None => bind_forward(i, next)?,
            };
            planned.push(ForwardPlan {
                config: next.clone(),
                running: same_socket,
                socket,
            });
        }
        Ok(Plan {
            fronts,
            forwards: planned,
        })
    }

    /// Closes every socket at once (the loops stop with the gateway's shutdown token,
    /// which is cancelled first, so no later plan binds again).
    pub fn close(&mut self) {
        self.fronts = [None, None, None];
        self.forwards.clear();
    }

    /// Applies `plan`: entries it drops stop accepting, new ones start, changed ones
    /// restart on their socket. New front ends get their users from `backends`.
    pub fn apply(&mut self, plan: Plan, backends: &AuthBackends, groups: &[GroupConfig]) {
        let Plan { fronts, forwards } = plan;
        for (front, next) in Front::ALL.into_iter().zip(fronts) {
            let running = self.fronts[front.index()].take();
            self.fronts[front.index()] = match next {
                Some(next) => Some(self.apply_front(front, running, next, backends, groups)),
                None => {
                    if let Some(r) = running {
                        tracing::info!(
                            "{} on {} removed: it accepts no new connections; live ones finish",
                            front.key(),
                            r.served.addr
                        );
                    }
                    None
                }
            };
        }
        let mut old: Vec<Option<RunningForward>> = std::mem::take(&mut self.forwards)
            .into_iter()
            .map(Some)
            .collect();
        for next in forwards {
            let running = self.apply_forward(next, &mut old);
            self.forwards.push(running);
        }
        for gone in old.into_iter().flatten() {
            tracing::info!(
                "forward {} removed: it accepts no new connections; live ones finish",
                gone.socket.addr()
            );
        }
    }

    fn apply_front(
        &self,
        front: Front,
        running: Option<RunningFront>,
        next: FrontPlan,
        backends: &AuthBackends,
        groups: &[GroupConfig],
    ) -> RunningFront {
        let FrontPlan {
            config,
            own_cert,
            socket,
        } = next;
        let (users, old_cert, old_served) = match running {
            Some(r) => (r.users, r.own_cert, Some(r.served)),
            None => (users_of(front, &config, backends, groups), None, None),
        };
        // A slot that keeps serving gets the new certificate in place; a new one is
        // built only where the role is rebuilt anyway (`plan_front` hands the socket).
        let own_cert = match (old_cert, own_cert) {
            (Some(slot), Some(key)) => {
                slot.store(key);
                Some(slot)
            }
            (_, Some(key)) => Some(Arc::new(tls::CertSlot::from_checked(key))),
            (_, None) => None,
        };
        let moved = matches!(socket, Socket::Bound(_));
        match old_served {
            Some(served) if socket.is_kept() => {
                return RunningFront {
                    config,
                    users,
                    own_cert,
                    served,
                }
            }
            Some(old) if moved => tracing::info!(
                "{} moved from {} to {}: live connections on the old address finish",
                front.key(),
                old.addr,
                config.listen_addr.0
            ),
            Some(old) => tracing::info!(
                "{} on {}: settings changed; new connections use them",
                front.key(),
                old.addr
            ),
            None => {}
        }
        let socket = socket.into_arc();
        tracing::info!("{} listening on {}", front.key(), local_addr(&socket));
        let served = self.serve_front(front, &config, &users, own_cert.clone(), socket);
        RunningFront {
            config,
            users,
            own_cert,
            served,
        }
    }

    fn serve_front(
        &self,
        front: Front,
        config: &ProxyListener,
        users: &Arc<Authority>,
        own_cert: Option<Arc<tls::CertSlot>>,
        socket: Arc<TcpListener>,
    ) -> Served<TcpListener> {
        let w = &self.wiring;
        let pp = config.proxy_protocol;
        match front {
            Front::Http => self.serve(socket, front.what(), pp, Arc::new(self.http(users))),
            Front::Https => {
                let slot = own_cert.unwrap_or_else(|| w.agent_cert.clone());
                let role =
                    HttpsProxy::new(Arc::new(self.http(users)), tls::proxy_server_config(slot));
                self.serve(socket, front.what(), pp, Arc::new(role))
            }
            Front::Socks5 => {
                let udp = match config.protocols.udp {
                    true => Ok(w.udp.clone()),
                    false => Err("proxy.socks5.protocols does not list udp".to_owned()),
                };
                let role = Socks5Proxy {
                    users: users.clone(),
                    limits: w.limits.clone(),
                    connector: w.guarded.clone(),
                    udp,
                    tcp: config.protocols.tcp,
                };
                self.serve(socket, front.what(), pp, Arc::new(role))
            }
        }
    }

    fn http(&self, users: &Arc<Authority>) -> HttpProxy<Guarded> {
        HttpProxy {
            users: users.clone(),
            limits: self.wiring.limits.clone(),
            connector: self.wiring.guarded.clone(),
            request_timeout: RequestTimeout::new(HEADER_READ_TIMEOUT),
        }
    }

    fn apply_forward(
        &self,
        next: ForwardPlan,
        old: &mut [Option<RunningForward>],
    ) -> RunningForward {
        let ForwardPlan {
            config,
            running,
            socket,
        } = next;
        // Dropped at the end of this call: its loop stops once the new one serves.
        let running = running.and_then(|j| old[j].take());
        if let Some(r) = running {
            if socket.is_kept() {
                return r;
            }
            tracing::info!(
                "forward {} changed: new connections go to {} through group {}",
                r.socket.addr(),
                config.target,
                config.group
            );
        }
        let socket = match socket {
            ForwardBinding::Tcp(s) => self.serve_tcp_forward(&config, s.into_arc()),
            ForwardBinding::Udp(s) => self.serve_udp_forward(&config, s.into_arc()),
        };
        tracing::info!(
            addr = %socket.addr(),
            protocol = ?config.protocol,
            group = %config.group,
            target = %config.target,
            "forward {} listening",
            socket.addr()
        );
        RunningForward { config, socket }
    }

    fn serve_tcp_forward(&self, f: &ForwardConfig, socket: Arc<TcpListener>) -> ForwardSocket {
        let role = DeclaredForward {
            group: Arc::from(f.group.as_str()),
            target: f.target.clone(),
            connector: self.wiring.limited.clone(),
        };
        ForwardSocket::Tcp(self.serve(socket, "forward", f.proxy_protocol, Arc::new(role)))
    }

    fn serve_udp_forward(&self, f: &ForwardConfig, socket: Arc<UdpSocket>) -> ForwardSocket {
        let w = &self.wiring;
        let stop = w.shutdown.child_token();
        let addr = socket.local_addr().unwrap_or(f.listen_addr.0);
        w.loops.spawn_on(
            serve_forward(
                socket.clone(),
                Arc::from(f.group.as_str()),
                f.target.clone(),
                w.udp.clone(),
                stop.clone(),
            ),
            &w.runtime,
        );
        ForwardSocket::Udp(Served {
            socket,
            addr,
            _stop: stop.drop_guard(),
        })
    }

    /// Runs one accept loop for `role` on `socket`, until the returned entry drops or
    /// the gateway stops.
    fn serve<S: Serve>(
        &self,
        socket: Arc<TcpListener>,
        what: &'static str,
        proxy_protocol: bool,
        role: Arc<S>,
    ) -> Served<TcpListener> {
        let w = &self.wiring;
        let stop = w.shutdown.child_token();
        let addr = local_addr(&socket);
        let mut accept = AcceptLoop::new(socket.clone(), what);
        if proxy_protocol {
            accept = accept.proxy_protocol(w.proxy_protocol.clone());
        }
        w.loops.spawn_on(
            accept.run(role, stop.clone().cancelled_owned(), w.conns.clone()),
            &w.runtime,
        );
        Served {
            socket,
            addr,
            _stop: stop.drop_guard(),
        }
    }
}

/// How one front end changes: a new address binds a new socket; settings that shape
/// its role (PROXY protocol, protocols, its own certificate or the gateway's) hand the
/// socket to a new loop; users alone change in place (see the reload's logins).
fn plan_front(
    front: Front,
    running: Option<&RunningFront>,
    next: &ProxyListener,
) -> Result<FrontPlan, ListenError> {
    let own_cert = match (front, next.tls_cert.as_deref().zip(next.tls_key.as_deref())) {
        (Front::Https, Some((cert, key))) => {
            let checked = tls::load_checked(cert, key).map_err(ListenError::Tls)?;
            super::reload::warn_if_expiring(cert, checked.1.not_after);
            Some(checked)
        }
        _ => None,
    };
    let socket = match running {
        Some(r) if r.config.listen_addr == next.listen_addr => {
            let same_role =
                !role_changed(&r.config, next) && r.own_cert.is_some() == own_cert.is_some();
            Socket::kept_or_handed(same_role, &r.served.socket)
        }
        _ => Socket::Bound(bind_tcp(front.key().to_owned(), next.listen_addr.0)?),
    };
    Ok(FrontPlan {
        config: next.clone(),
        own_cert,
        socket,
    })
}

/// Whether the settings a front end's role is built from differ.
///
/// Destructured without `..`: a field added to `ProxyListener` does not compile here
/// until it is declared a role setting or not.
fn role_changed(old: &ProxyListener, new: &ProxyListener) -> bool {
    let ProxyListener {
        // The socket's own: a new one is bound.
        listen_addr: _,
        // Users: replaced in place by the reload's logins.
        auth_username: _,
        auth_password: _,
        auth: _,
        // The role's.
        proxy_protocol,
        protocols,
        // Which certificate: compared by the caller; the files are re-read anyway.
        tls_cert: _,
        tls_key: _,
    } = old;
    *proxy_protocol != new.proxy_protocol || *protocols != new.protocols
}

/// Whether a forward on the same address now goes elsewhere or reads a PROXY header.
fn forward_settings_changed(old: &ForwardConfig, new: &ForwardConfig) -> bool {
    let ForwardConfig {
        // The socket's own: matched by the caller.
        listen_addr: _,
        protocol: _,
        group,
        target,
        proxy_protocol,
    } = old;
    *group != new.group || *target != new.target || *proxy_protocol != new.proxy_protocol
}

/// The users of a front end that starts, from the configuration it starts with.
fn users_of(
    front: Front,
    config: &ProxyListener,
    backends: &AuthBackends,
    groups: &[GroupConfig],
) -> Arc<Authority> {
    let users = Arc::new(backends.authority(&config.auth, listener_accounts(config, groups)));
    backends.track(&users);
    if users.is_open() {
        tracing::warn!(
            listener = front.key(),
            addr = %config.listen_addr.0,
            "proxy listener has no credentials: anyone who can reach it may use it"
        );
    }
    users
}

fn bind_tcp(key: String, addr: SocketAddr) -> Result<TcpListener, ListenError> {
    crate::transport::listen::listen(addr).map_err(|source| ListenError::Bind { key, addr, source })
}

fn bind_forward(i: usize, f: &ForwardConfig) -> Result<ForwardBinding, ListenError> {
    let key = format!("gateway.forwards[{i}]");
    let addr = f.listen_addr.0;
    if f.protocol != anyproxy_proto::Protocol::Udp {
        return Ok(ForwardBinding::Tcp(Socket::Bound(bind_tcp(key, addr)?)));
    }
    let bind = || {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        UdpSocket::from_std(socket)
    };
    bind()
        .map(|s| ForwardBinding::Udp(Socket::Bound(s)))
        .map_err(|source| ListenError::Bind { key, addr, source })
}

fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
