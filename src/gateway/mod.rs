//! The public side: accepts agents over WebSocket + TLS and serves the proxy front ends,
//! whose connections it carries through the agents.

pub mod auth;
pub mod forward;
pub mod listeners;
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
use crate::config::{GatewayConfig, ProxyConfig};
use crate::connect::{ConnectError, Connector, Requester, Upstream};
use crate::limits::{LimitGuard, Limits};
use crate::net::notify::{notify, State};
use crate::net::HostPort;
use crate::transport::listen::ProxyProtocol;
use crate::transport::tls;
use crate::tunnel::datagram::DatagramLimits;
use crate::tunnel::OpenError;
use auth::agent_accounts;
use listeners::Listeners;
pub use listeners::Listening;
pub use registry::AgentRegistry;
use reload::{warn_if_expiring, Running};
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
    #[error(transparent)]
    Listen(#[from] listeners::ListenError),
}

/// A running gateway: where it listens, and how to stop it.
pub struct Gateway {
    pub agent_addr: SocketAddr,
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
        // A reload replaces them with its listeners and users.
        let profiles = Arc::new(arc_swap::ArcSwap::from_pointee(
            crate::config::profile::ProfileSource::new(&config, proxy.as_ref()),
        ));
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
        backends.track(&agents);
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

        let proxy = proxy.unwrap_or_default();
        let mut listeners = Listeners::new(listeners::Wiring {
            limits: limits.clone(),
            guarded,
            limited,
            udp: udp_support,
            proxy_protocol,
            agent_cert: cert_slot.clone(),
            shutdown: shutdown.clone(),
            loops: tasks.clone(),
            conns: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        // The start is a reload from nothing: the same plan binds every address first.
        let plan = listeners.plan(&proxy, &declared)?;
        listeners.apply(plan, &backends, &groups);
        let admin_stop = CancellationToken::new();
        let admin_addr = match admin {
            Some(a) => {
                let m = metrics.clone();
                let served = crate::metrics::admin::serve_with_profiles(
                    a,
                    m,
                    Some(profiles.clone()),
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
        let on = listeners.listening();
        tracing::info!(%agent_addr, http_addr = ?on.http, https_addr = ?on.https, socks5_addr = ?on.socks5, "gateway listening");
        Ok(Gateway {
            agent_addr,
            registry,
            admin_addr,
            admin_stop,
            policy_stop,
            policy_api,
            shutdown,
            tasks,
            server: server.clone(),
            drain_timeout,
            membership,
            reloader: Arc::new(Reloader::new(
                cert_slot,
                metrics,
                agents,
                limits,
                policy,
                profiles,
                Running {
                    gateway: running_gateway,
                    listeners,
                    backends,
                    server,
                },
            )),
        })
    }

    /// Where the proxy front ends and forwards listen now (a reload may change it).
    pub fn listening(&self) -> Listening {
        self.reloader.listening()
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
        self.reloader.close_listeners();
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
