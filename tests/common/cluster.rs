//! Gateways of one cluster for the tests: each node is a gateway and its agent, real
//! processes sharing one `redis-server` (see `redis.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::*;

/// The lease every node of these tests runs with: a dead node's slots free within
/// it plus a third of it.
pub const LEASE: &str = "3s";

pub struct Node {
    pub gateway: Proc,
    pub _agent: Proc,
    pub socks_port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
}

pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub redis: &'a str,
    pub certs: &'a Certs,
    pub limits: &'a str,
    pub on_store_failure: &'a str,
    /// More lines of `gateway.cluster`, each indented by four spaces (or empty).
    pub cluster_extra: &'a str,
}

impl Node {
    pub async fn start(spec: NodeSpec<'_>) -> Node {
        for _ in 0..3 {
            if let Some(node) = Self::try_start(&spec).await {
                return node;
            }
        }
        panic!(
            "node {} could not bind its ports in three attempts",
            spec.name
        );
    }

    async fn try_start(spec: &NodeSpec<'_>) -> Option<Node> {
        let (gateway_port, http_port, socks_port, admin_port) =
            (free_port(), free_port(), free_port(), free_port());
        let dir = spec.certs.dir.path().join(spec.name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            r#"proxy:
  http:
    listen_addr: "127.0.0.1:{http_port}"
    auth_username: "{HTTP_USER}"
    auth_password: "{HTTP_PASS}"
  socks5:
    listen_addr: "127.0.0.1:{socks_port}"
    auth_username: "{SOCKS_USER}"
    auth_password: "{SOCKS_PASS}"
gateway:
  listen_addr: "127.0.0.1:{gateway_port}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  connect_timeout: 5s
  admin_addr: "127.0.0.1:{admin_port}"
  limits:
{limits}
  cluster:
    redis: "{redis}"
    node_id: "{name}"
    lease: {LEASE}
    timeout: 300ms
    on_store_failure: {mode}
{cluster_extra}
client:
  gateway_addr: "127.0.0.1:{gateway_port}"
  allow_local: true
  gateway_tls_cert: "{cert}"
  client_id: "agent-{name}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  reconnect_min: 100ms
  reconnect_max: 1s
"#,
            cert = spec.certs.cert.display(),
            key = spec.certs.key.display(),
            limits = spec.limits,
            redis = spec.redis,
            name = spec.name,
            mode = spec.on_store_failure,
            cluster_extra = spec.cluster_extra,
        );
        let path = dir.join("config.yaml");
        std::fs::write(&path, config).unwrap();
        let cfg = path.to_str().unwrap();
        let mut gateway = spawn(&["gateway", "--config", cfg], &dir.join("gateway.log"));
        for port in [gateway_port, socks_port, admin_port] {
            if !wait_for_listener(&mut gateway, port).await {
                let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
                assert!(
                    log.contains("in use"),
                    "gateway {} exited:\n{log}",
                    spec.name
                );
                return None;
            }
        }
        let agent = spawn(&["client", "--config", cfg], &dir.join("agent.log"));
        let node = Node {
            gateway,
            _agent: agent,
            socks_port,
            admin_port,
            dir,
        };
        node.wait_for_log("agent connected").await;
        Some(node)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn socks(&self, target: SocketAddr) -> Result<TcpStream, Socks5Refusal> {
        self.socks_as(SOCKS_PASS, target).await
    }

    pub async fn socks_as(
        &self,
        pass: &str,
        target: SocketAddr,
    ) -> Result<TcpStream, Socks5Refusal> {
        socks5_stream(
            self.socks_port,
            SOCKS_USER,
            pass,
            "127.0.0.1",
            target.port(),
        )
        .await
    }

    pub async fn status(&self) -> serde_json::Value {
        let (code, body) = admin_get(self.admin_port, "/api/status", None).await;
        assert_eq!(code, "200", "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn metrics(&self) -> String {
        admin_get(self.admin_port, "/metrics", None).await.1
    }
}

/// Polls `f` until it yields something, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn node_names(status: &serde_json::Value) -> Vec<String> {
    status["cluster"]["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n["node_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
