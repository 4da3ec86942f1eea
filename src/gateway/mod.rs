//! The public side: accepts agents over WebSocket + TLS and serves the proxy front ends,
//! whose connections it carries through the agents.

pub mod registry;
pub mod server;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{GatewayConfig, ProxyConfig};
use crate::proxy::{ConnectError, Connector, Requester, TargetAddr};
use crate::transport::tls;
use crate::tunnel::{OpenError, TunnelConn};
pub use registry::AgentRegistry;
pub use server::AgentServer;

/// Opens user connections through the least-loaded live agent.
pub struct TunnelConnector {
    pub registry: Arc<AgentRegistry>,
    pub connect_timeout: Duration,
}

impl Connector for TunnelConnector {
    async fn connect(
        &self,
        target: &TargetAddr,
        _who: &Requester,
    ) -> Result<TunnelConn, ConnectError> {
        target.validate()?;
        // One retry: a session can die between being picked and carrying the connect.
        for _ in 0..2 {
            let agent = self.registry.pick().ok_or(ConnectError::NoAgent)?;
            match agent
                .core
                .open(&target.host, target.port, self.connect_timeout)
                .await
            {
                Err(OpenError::SessionClosed) => continue,
                other => return other.map_err(ConnectError::from),
            }
        }
        Err(ConnectError::NoAgent)
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
}

/// A running gateway: where it listens, and how to stop it.
pub struct Gateway {
    pub agent_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub socks5_addr: Option<SocketAddr>,
    pub registry: Arc<AgentRegistry>,
    /// Closes the listeners.
    shutdown: CancellationToken,
    tasks: TaskTracker,
    server: Arc<AgentServer>,
    drain_timeout: Duration,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

impl Gateway {
    /// Binds every listener, then serves in the background.
    pub async fn start(
        config: GatewayConfig,
        proxy: Option<ProxyConfig>,
    ) -> Result<Gateway, StartError> {
        let tls = tls::server_config_with_client_ca(
            &config.tls_cert,
            &config.tls_key,
            config.client_ca.as_deref(),
        )?;
        let drain_timeout = config.drain_timeout.0;
        let registry = Arc::new(AgentRegistry::default());
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();

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
        let server = Arc::new(AgentServer::new(config, registry.clone(), tls));
        tasks.spawn(server.clone().serve(agent_listener, shutdown.clone()));

        let proxy = proxy.unwrap_or_default();
        let mut http_addr = None;
        if let Some(http) = proxy.http {
            let listener = bind("http proxy", http.listen_addr.0).await?;
            http_addr = listener.local_addr().ok();
            let creds = http.credentials();
            if creds.is_none() {
                tracing::warn!(addr = ?http_addr, "HTTP proxy has no credentials: anyone who can reach it may use it");
            }
            tasks.spawn(crate::proxy::http::serve(
                listener,
                creds,
                connector.clone(),
                shutdown.clone(),
            ));
        }
        let mut socks5_addr = None;
        if let Some(socks) = proxy.socks5 {
            let listener = bind("socks5 proxy", socks.listen_addr.0).await?;
            socks5_addr = listener.local_addr().ok();
            let creds = socks.credentials();
            if creds.is_none() {
                tracing::warn!(addr = ?socks5_addr, "SOCKS5 proxy has no credentials: anyone who can reach it may use it");
            }
            tasks.spawn(crate::proxy::socks5::serve(
                listener,
                creds,
                connector.clone(),
                shutdown.clone(),
            ));
        }
        tasks.close();
        tracing::info!(%agent_addr, ?http_addr, ?socks5_addr, "gateway listening");
        Ok(Gateway {
            agent_addr,
            http_addr,
            socks5_addr,
            registry,
            shutdown,
            tasks,
            server,
            drain_timeout,
        })
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
        tracing::info!("gateway stopped");
    }

    /// Cancelling it closes the listeners only; sessions end through [`Self::stop`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
