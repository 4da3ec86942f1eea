//! The public side: accepts agents over WebSocket + TLS and serves the proxy front ends,
//! whose connections it carries through the agents.

pub mod auth;
pub mod forward;
pub mod registry;
pub mod reload;
pub mod server;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use anyproxy_proto::ErrorCode;

use crate::cluster::Cluster;
use crate::config::{GatewayConfig, ProxyConfig, ProxyListener};
use crate::connect::{ConnectError, Connector, Requester, Upstream};
use crate::limits::{LimitGuard, Limits};
use crate::net::notify::{notify, State};
use crate::net::HostPort;
use crate::proxy::http::HttpProxy;
use crate::proxy::https::HttpsProxy;
use crate::proxy::socks5::Socks5Proxy;
use crate::transport::listen::{AcceptLoop, ProxyProtocol};
use crate::transport::tls;
use crate::tunnel::datagram::DatagramLimits;
use crate::tunnel::OpenError;
use auth::{agent_accounts, listener_accounts};
pub use registry::AgentRegistry;
use reload::{warn_if_expiring, Logins, Running};
pub use reload::{ReloadError, Reloader, CERT_EXPIRY_WARNING_DAYS};
pub use server::AgentServer;

/// Opens user connections through the least-loaded live agent of the user's group.
pub struct TunnelConnector {
    pub registry: Arc<AgentRegistry>,
    pub connect_timeout: Duration,
}

/// Agents one request may try: a capacity refusal or a dying session moves on to the
/// next agent of the group, a bounded number of times.
const MAX_ATTEMPTS: usize = 4;

impl Connector for TunnelConnector {
    async fn connect(&self, target: &HostPort, who: &Requester) -> Result<Upstream, ConnectError> {
        target.validate()?;
        let mut tried = Vec::with_capacity(MAX_ATTEMPTS);
        let mut last = None;
        for _ in 0..MAX_ATTEMPTS {
            let Some(agent) = self.registry.pick(&who.group, &tried) else {
                break;
            };
            tried.push(agent.serial);
            match agent
                .core
                .open(&target.host, target.port, self.connect_timeout)
                .await
            {
                // Nothing reached the target: another agent of the group may do better.
                Err(OpenError::SessionClosed) => {}
                Err(OpenError::Failed(f)) if f.code == ErrorCode::RateLimited => {
                    tracing::debug!(client_id = %agent.client_id, group = %who.group, "agent at capacity; trying another");
                    last = Some(ConnectError::from(f));
                }
                // It reached (or tried to reach) the target: its answer stands.
                other => return other.map(Upstream::tunnel).map_err(ConnectError::from),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::NoAgent(who.group.to_string())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::DirError),
    #[error("policy API: {0}")]
    PolicyApi(String),
    #[error(transparent)]
    Admin(#[from] crate::metrics::AdminError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthStartError),
}

/// A running gateway: where it listens, and how to stop it.
pub struct Gateway {
    pub agent_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    /// The HTTPS proxy listener (`proxy.https`), when configured.
    pub https_addr: Option<SocketAddr>,
    pub socks5_addr: Option<SocketAddr>,
    /// The declared forwards' listeners, in configuration order.
    pub forward_addrs: Vec<SocketAddr>,
    pub registry: Arc<AgentRegistry>,
    /// The admin listener (metrics, health, status page), when configured.
    pub admin_addr: Option<SocketAddr>,
    admin_stop: CancellationToken,
    /// Stops the policy API and its persist loop, after the drain.
    policy_stop: CancellationToken,
    policy_api: Option<crate::policy::ApiHandle>,
    /// Closes the listeners.
    shutdown: CancellationToken,
    tasks: TaskTracker,
    server: Arc<AgentServer>,
    drain_timeout: Duration,
    /// This node's membership: leaves the cluster (freeing its slots) after the drain.
    membership: Option<Membership>,
    reloader: Arc<Reloader>,
}

/// The heartbeat task of a cluster member and what stops it.
struct Membership {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The node id a cluster member gets when the config names none: the host name and
/// the agent port, which tell an operator which box and which process.
fn default_node_id(config: &GatewayConfig) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into());
    format!("{host}:{}", config.listen_addr.0.port())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::transport::listen::listen(addr).map_err(|source| StartError::Bind { what, addr, source })
}

impl Gateway {
    /// Binds every listener, then serves in the background.
    pub async fn start(
        config: GatewayConfig,
        proxy: Option<ProxyConfig>,
    ) -> Result<Gateway, StartError> {
        let (tls, cert_slot) = tls::rotating_server_config(
            &config.tls_cert,
            &config.tls_key,
            config.client_ca.as_deref(),
        )?;
        warn_if_expiring(&config.tls_cert, cert_slot.expiry());
        let drain_timeout = config.drain_timeout.0;
        let registry = Arc::new(AgentRegistry::default());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let admin = config.admin();
        // Users change only with a restart, so the listeners as started are the profiles'.
        let profiles = crate::config::profile::ProfileSource::new(&config, proxy.as_ref());
        let cluster = match &config.cluster {
            Some(c) => Some(Cluster::open(c, &default_node_id(&config))?),
            None => None,
        };
        let limits = Arc::new(Limits::new(&config.limits, cluster.as_ref()));
        let backends = auth::AuthBackends::open(&config)?;
        let metrics = Arc::new(crate::metrics::GatewayMetrics::new(
            registry.clone(),
            shutdown.clone(),
            limits.clone(),
        ));
        if let Some(c) = &cluster {
            metrics.show_cluster(c.clone());
        }
        metrics.show_auth_backends(backends.stats.clone());
        metrics.reloads.tls_expiry(cert_slot.expiry());
        // One PROXY-protocol stage for every listener that sets `proxy_protocol`.
        let proxy_protocol = Arc::new(ProxyProtocol::new(config.trusted_proxies.clone()));
        metrics.show_proxy_protocol(proxy_protocol.clone());
        let pp = |on: bool, l: AcceptLoop| match on {
            true => l.proxy_protocol(proxy_protocol.clone()),
            false => l,
        };

        let agent_listener = bind("gateway", config.listen_addr.0).await?;
        let agent_addr = agent_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "gateway",
                addr: config.listen_addr.0,
                source,
            })?;
        let connector = Arc::new(TunnelConnector {
            registry: registry.clone(),
            connect_timeout: config.connect_timeout.0,
        });
        let policy_stop = CancellationToken::new();
        let mut policy_api = None;
        let policy = match &config.policy {
            Some(p) => {
                let dir = crate::policy::PolicyDir::open_or_init(&p.dir)?;
                if let Some(first) = &dir.first_run {
                    // Printed, never logged: it carries the generated admin password.
                    println!("{}", first.message(&dir.path));
                }
                let policy = Arc::new(dir.load_policy_in(cluster.clone())?);
                // Stopped after the drain, so that the last persist counts the bytes
                // the drain still delivered.
                let api = crate::policy::start_api(&dir, policy.clone(), policy_stop.clone())
                    .await
                    .map_err(|e| StartError::PolicyApi(e.to_string()))?;
                tracing::info!(dir = %p.dir.display(), api = %api.addr, "policy decides every proxy request");
                policy_api = Some(api);
                metrics.show_policy(policy.clone());
                Some(policy)
            }
            None => None,
        };
        // Every connection passes the limits; inside the policy, so that caps apply to
        // the user a policy identified too. Forwards are the operator's own routes: no
        // policy, and only per-address caps (no user is known).
        let limited = Arc::new(LimitGuard {
            limits: limits.clone(),
            inner: connector.clone(),
        });
        let guarded = Arc::new(crate::metrics::MeteredConnector {
            inner: Arc::new(crate::policy::PolicyGuard {
                policy: policy.clone(),
                inner: limited.clone(),
            }),
            metrics: metrics.clone(),
        });
        let groups = config.groups.clone();
        let declared = config.forwards.clone();
        let udp_settings = udp::UdpSettings {
            limits: limits.clone(),
            connect_timeout: config.connect_timeout.0,
            flow_limits: DatagramLimits {
                max_datagram: config.udp_max_datagram.0 as usize,
                ..DatagramLimits::default()
            },
            idle_timeout: config.udp_idle_timeout.0,
            metrics: metrics.clone(),
        };
        // The same rules as TCP requests decide each flow.
        let udp_support = udp_settings.through_groups(registry.clone(), policy.clone());
        let agent_forwards = Arc::new(forward::AgentForwardTable::new(
            config.agent_forwards.clone(),
            config.connect_timeout.0,
            limits.clone(),
            proxy_protocol.clone(),
            udp_settings,
        ));
        let agents = Arc::new(
            backends
                .authority(&config.agent_auth, agent_accounts(&config))
                .for_agents(),
        );
        let running_gateway = config.clone();
        let server = Arc::new(AgentServer::new(
            config,
            agents.clone(),
            registry.clone(),
            tls,
            agent_forwards,
            metrics.clone(),
            cluster.as_ref(),
        ));
        tasks.spawn(server.clone().accept(agent_listener, shutdown.clone()));
        // Proxy users' and forwards' connections end with their tunnels; nobody waits
        // for them (a keep-alive client could hold a stop forever).
        let conns = TaskTracker::new();

        let proxy = proxy.unwrap_or_default();
        let mut logins = Logins {
            agents,
            http: None,
            https: None,
            socks5: None,
        };
        let (running_http, running_https, running_socks5) = (
            proxy.http.clone(),
            proxy.https.clone(),
            proxy.socks5.clone(),
        );
        // The HTTP front end of `proxy.http`, and of `proxy.https` behind TLS, with who
        // checks its users (a reload replaces their rules).
        let http_front = |l: &ProxyListener, addr: Option<SocketAddr>| {
            let users = Arc::new(backends.authority(&l.auth, listener_accounts(l, &groups)));
            if users.is_open() {
                tracing::warn!(
                    ?addr,
                    "HTTP proxy has no credentials: anyone who can reach it may use it"
                );
            }
            let role = Arc::new(HttpProxy {
                users: users.clone(),
                limits: limits.clone(),
                connector: guarded.clone(),
                request_timeout: crate::proxy::http::RequestTimeout::new(
                    crate::proxy::http::HEADER_READ_TIMEOUT,
                ),
            });
            (role, users)
        };
        let mut http_addr = None;
        if let Some(http) = &proxy.http {
            let listener = bind("http proxy", http.listen_addr.0).await?;
            http_addr = listener.local_addr().ok();
            let (role, users) = http_front(http, http_addr);
            logins.http = Some(users);
            let accept = pp(http.proxy_protocol, AcceptLoop::new(listener, "http proxy"));
            tasks.spawn(accept.run(role, shutdown.clone().cancelled_owned(), conns.clone()));
        }
        let mut https_addr = None;
        let mut proxy_cert_slot = None;
        if let Some(https) = &proxy.https {
            let slot = match (&https.tls_cert, &https.tls_key) {
                (Some(cert), Some(key)) => {
                    let own = Arc::new(tls::CertSlot::load(cert, key)?);
                    warn_if_expiring(cert, own.expiry());
                    proxy_cert_slot = Some(own.clone());
                    own
                }
                _ => cert_slot.clone(),
            };
            let listener = bind("https proxy", https.listen_addr.0).await?;
            https_addr = listener.local_addr().ok();
            let (front, users) = http_front(https, https_addr);
            logins.https = Some(users);
            let role = Arc::new(HttpsProxy::new(front, tls::proxy_server_config(slot)));
            let accept = pp(
                https.proxy_protocol,
                AcceptLoop::new(listener, "https proxy"),
            );
            tasks.spawn(accept.run(role, shutdown.clone().cancelled_owned(), conns.clone()));
        }
        let mut socks5_addr = None;
        if let Some(socks) = &proxy.socks5 {
            let listener = bind("socks5 proxy", socks.listen_addr.0).await?;
            socks5_addr = listener.local_addr().ok();
            let users =
                Arc::new(backends.authority(&socks.auth, listener_accounts(socks, &groups)));
            if users.is_open() {
                tracing::warn!(addr = ?socks5_addr, "SOCKS5 proxy has no credentials: anyone who can reach it may use it");
            }
            logins.socks5 = Some(users.clone());
            let udp = if !socks.protocols.udp {
                Err("proxy.socks5.protocols does not list udp".to_owned())
            } else {
                Ok(udp_support.clone())
            };
            let role = Arc::new(Socks5Proxy {
                users,
                limits: limits.clone(),
                connector: guarded.clone(),
                udp,
                tcp: socks.protocols.tcp,
            });
            let accept = pp(
                socks.proxy_protocol,
                AcceptLoop::new(listener, "socks5 proxy"),
            );
            tasks.spawn(accept.run(role, shutdown.clone().cancelled_owned(), conns.clone()));
        }
        let mut forward_addrs = Vec::new();
        for f in declared {
            if f.protocol == anyproxy_proto::Protocol::Udp {
                let addr = f.listen_addr.0;
                let socket =
                    tokio::net::UdpSocket::bind(addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            what: "udp forward",
                            addr,
                            source,
                        })?;
                let addr = socket.local_addr().unwrap_or(addr);
                tracing::info!(%addr, group = %f.group, target = %f.target, "forwarding udp");
                forward_addrs.push(addr);
                tasks.spawn(udp::serve_forward(
                    socket,
                    Arc::from(f.group.as_str()),
                    f.target,
                    udp_support.clone(),
                    shutdown.clone(),
                ));
                continue;
            }
            let listener = bind("forward", f.listen_addr.0).await?;
            let addr = listener.local_addr().unwrap_or(f.listen_addr.0);
            tracing::info!(%addr, group = %f.group, target = %f.target, "forwarding");
            forward_addrs.push(addr);
            let accept = pp(f.proxy_protocol, AcceptLoop::new(listener, "forward"));
            let role = Arc::new(forward::DeclaredForward {
                group: Arc::from(f.group.as_str()),
                target: f.target,
                connector: limited.clone(),
            });
            tasks.spawn(accept.run(role, shutdown.clone().cancelled_owned(), conns.clone()));
        }
        let admin_stop = CancellationToken::new();
        let admin_addr = match admin {
            Some(a) => {
                let m = metrics.clone();
                let served = crate::metrics::admin::serve_with_profiles(
                    a,
                    m,
                    Some(profiles),
                    admin_stop.clone(),
                );
                Some(served.await?)
            }
            None => None,
        };
        tasks.close();
        let membership = cluster.map(|cluster| {
            let stop = CancellationToken::new();
            tracing::info!(node = %cluster.node_id, member = %cluster.member, "joining the cluster");
            let report = registry.clone() as Arc<dyn crate::cluster::NodeReport>;
            let task = tokio::spawn(cluster.run(report, stop.clone()));
            Membership { stop, task }
        });
        tracing::info!(%agent_addr, ?http_addr, ?https_addr, ?socks5_addr, "gateway listening");
        Ok(Gateway {
            agent_addr,
            http_addr,
            https_addr,
            socks5_addr,
            forward_addrs,
            registry,
            admin_addr,
            admin_stop,
            policy_stop,
            policy_api,
            shutdown,
            tasks,
            server,
            drain_timeout,
            membership,
            reloader: Arc::new(Reloader::new(
                reload::Certificates {
                    agents: cert_slot,
                    https: proxy_cert_slot,
                },
                metrics,
                logins,
                limits,
                policy,
                Running {
                    gateway: running_gateway,
                    http: running_http,
                    https: running_https,
                    socks5: running_socks5,
                    backends,
                },
            )),
        })
    }

    /// What reloads this gateway; it outlives a `stop` that has begun.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Lets an authenticated `POST /reload` on the admin listener reload from `path`.
    pub fn enable_admin_reload(&self, path: std::path::PathBuf) {
        // Weak: the metrics must not keep the reloader (which holds them) alive.
        let weak = Arc::downgrade(&self.reloader);
        self.reloader
            .metrics()
            .enable_reload(Box::new(move || match weak.upgrade() {
                Some(r) => r.reload(&path).map_err(|e| e.to_string()),
                None => Err("the gateway has stopped".into()),
            }));
    }

    /// See [`Reloader::reload`].
    pub fn reload(&self, path: &std::path::Path) -> Result<(), ReloadError> {
        self.reloader.reload(path)
    }

    /// Graceful stop with the configured `drain_timeout`; see [`Self::stop_within`].
    pub async fn stop(self) {
        let drain = self.drain_timeout;
        self.stop_within(drain).await
    }

    /// Closes the agent and proxy listeners at once, tells every agent the gateway is
    /// going away, lets the tunnelled connections finish for at most `drain`, then
    /// closes every session (WebSocket close 1001) and returns once every task it
    /// started has ended.
    pub async fn stop_within(self, drain: Duration) {
        notify(State::Stopping);
        self.shutdown.cancel();
        self.tasks.wait().await;
        tracing::info!(
            agents = self.registry.len(),
            ?drain,
            "listeners closed; draining"
        );
        let left = self.server.drain(drain).await;
        if left > 0 {
            tracing::warn!(
                conns = left,
                ?drain,
                "drain timeout: closing connections still open"
            );
        }
        self.server.end_sessions().await;
        self.policy_stop.cancel();
        if let Some(api) = self.policy_api {
            api.join().await;
        }
        self.admin_stop.cancel();
        if let Some(m) = self.membership {
            m.stop.cancel();
            let _ = m.task.await;
        }
        tracing::info!("gateway stopped");
    }

    /// Cancelling it closes the listeners only; sessions end through [`Self::stop`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
