//! PMProxy across a fleet, end to end: three gateway processes, each with its own
//! policy dir and `/api/cmd`, sharing one real `redis-server`, and one agent on all
//! three. A login through A's API lets the user's traffic through B and C; a download
//! quota is one quota across the three, cut within the documented bound (one batch
//! per gateway); it is still spent after every gateway has been restarted.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyproxy::policy::managers::dwn_cons_r::FLUSH_BATCH;
use common::cluster::eventually;
use common::redis::Redis;
use common::*;

const MANAGERS: &str = r#"
rules = "session ∧ quota"
[mapDB]
name = "users"
userPass = { alice = "alicepw" }
userGroups = { alice = ["staff"] }
[[sessionIPM]]
name = "session"
auth = "users"
[[dwnConsR]]
name = "quota"
userDBN = "users"
resetCycle = "24h"
[dwnConsR.groupQuota]
staff = "3 MB"
"#;

const QUOTA: u64 = 3 << 20;
/// Every wait here is a bounded poll, generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);
/// The user's address: the session is opened from it, the traffic comes from it.
const ALICE: &str = "127.0.0.8";

struct Gateway {
    proc: Option<Proc>,
    config: PathBuf,
    log: PathBuf,
    policy_dir: PathBuf,
    agent_port: u16,
    http_port: u16,
    api_port: u16,
}

impl Gateway {
    fn write(name: &str, certs: &Certs, redis: &str) -> Gateway {
        let dir = certs.dir.path().join(name);
        let policy_dir = dir.join("policy");
        std::fs::create_dir_all(&policy_dir).unwrap();
        std::fs::write(policy_dir.join("managers.toml"), MANAGERS).unwrap();
        let api_port = free_port();
        let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
            .replace("127.0.0.1:4443", &format!("127.0.0.1:{api_port}"))
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port()));
        std::fs::write(policy_dir.join("server.toml"), server).unwrap();
        let g = Gateway {
            proc: None,
            config: dir.join("config.yaml"),
            log: dir.join("gateway.log"),
            policy_dir,
            agent_port: free_port(),
            http_port: free_port(),
            api_port,
        };
        let config = format!(
            r#"proxy:
  http:
    listen_addr: "127.0.0.1:{http}"
gateway:
  listen_addr: "127.0.0.1:{agent}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  connect_timeout: 5s
  policy: {{ dir: "{policy}" }}
  cluster:
    redis: "{redis}"
    node_id: "{name}"
    lease: 3s
    timeout: 300ms
"#,
            http = g.http_port,
            agent = g.agent_port,
            cert = certs.cert.display(),
            key = certs.key.display(),
            policy = g.policy_dir.display(),
        );
        std::fs::write(&g.config, config).unwrap();
        g
    }

    async fn start(&mut self) {
        let mut proc = spawn(
            &["gateway", "--config", self.config.to_str().unwrap()],
            &self.log,
        );
        for port in [self.agent_port, self.http_port, self.api_port] {
            assert!(
                wait_for_listener(&mut proc, port).await,
                "gateway exited:\n{}",
                self.log_text()
            );
        }
        self.proc = Some(proc);
    }

    /// A graceful stop (SIGTERM), waited for: the policy flushes its last batch.
    async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            signal(p.0.id().unwrap(), "TERM");
            let _ = tokio::time::timeout(Duration::from_secs(60), p.0.wait()).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until an agent has connected to this gateway's current process.
    async fn wait_for_agent(&self) {
        eventually(WAIT, "the agent on every gateway", || async {
            self.log_text().contains("agent connected").then_some(())
        })
        .await
    }

    /// `GET http://target/bytes/n` from ALICE through this gateway: curl's exit code
    /// and the bytes that arrived.
    async fn download(&self, target: SocketAddr, n: usize) -> (i32, usize) {
        let proxy = format!("http://127.0.0.1:{}", self.http_port);
        let url = format!("http://{target}/bytes/{n}");
        let (code, body) = curl(&["--interface", ALICE, "-x", &proxy, &url]).await;
        (code, body.len())
    }

    async fn status(&self, target: SocketAddr) -> String {
        let proxy = format!("http://127.0.0.1:{}", self.http_port);
        let url = format!("http://{target}/bytes/10");
        curl_status(&["--interface", ALICE, "-x", &proxy, &url]).await
    }

    async fn login(&self, user: &str, pass: &str) -> String {
        let body = format!(r#"{{"cmd":"open","cred":{{"user":"{user}","pass":"{pass}"}}}}"#);
        let ca = self.policy_dir.join("cert.pem");
        let url = format!("https://localhost:{}/api/cmd", self.api_port);
        let args = ["--cacert", ca.to_str().unwrap(), "--interface", ALICE];
        let (_, out) =
            curl(&[&args[..], &["-w", "\n%{http_code}", "-d", &body, &url]].concat()).await;
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_and_a_quota_hold_across_three_gateways_and_their_restart() {
    let redis = Redis::start().await;
    let certs = certs();
    let url = redis.url();
    let mut gateways: Vec<Gateway> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|n| Gateway::write(n, &certs, &url))
        .collect();
    for g in gateways.iter_mut() {
        g.start().await;
    }
    let addrs: Vec<String> = gateways
        .iter()
        .map(|g| format!("\"127.0.0.1:{}\"", g.agent_port))
        .collect();
    let agent_config = certs.dir.path().join("agent.yaml");
    std::fs::write(
        &agent_config,
        format!(
            "client:\n  gateway_addrs: [{}]\n  allow_local: true\n  gateway_tls_cert: \"{}\"\n  gateway_server_name: localhost\n  client_id: agent\n  auth_username: \"{AGENT_USER}\"\n  auth_password: \"{AGENT_PASS}\"\n  reconnect_min: 100ms\n  reconnect_max: 1s\n",
            addrs.join(", "),
            certs.cert.display()
        ),
    )
    .unwrap();
    let _agent = spawn(
        &["client", "--config", agent_config.to_str().unwrap()],
        &certs.dir.path().join("agent.log"),
    );
    for g in &gateways {
        g.wait_for_agent().await;
    }
    let target = http_target().await;

    // No session yet: denied everywhere.
    for g in &gateways {
        assert_eq!(g.status(target).await, "403", "{}", g.log_text());
    }
    // A login through A's API ...
    let answer = gateways[0].login("alice", "alicepw").await;
    assert!(answer.ends_with("\n200"), "{answer}");
    // ... lets the traffic through B and C too (each refreshes within 1 s).
    for g in &gateways {
        eventually(WAIT, "the session on every gateway", || async {
            (g.status(target).await == "200").then_some(())
        })
        .await;
    }

    // One quota across the three: 1 MB through each, then more until it is cut.
    let mut delivered = 0u64;
    for g in &gateways {
        let (code, n) = g.download(target, 1_000_000).await;
        assert_eq!((code, n), (0, 1_000_000), "{}", g.log_text());
        delivered += n as u64;
    }
    let mut cut = false;
    for g in gateways.iter().cycle().take(12) {
        let (code, n) = g.download(target, 1_000_000).await;
        delivered += n as u64;
        if code != 0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "the quota never cut a download ({delivered} bytes)");
    // The documented bound: at most one batch per gateway beyond the quota, plus the
    // read in flight on each.
    let bound = QUOTA + 3 * FLUSH_BATCH + 3 * 64 * 1024;
    assert!(
        delivered <= bound,
        "{delivered} bytes delivered, bound {bound}"
    );
    for g in &gateways {
        eventually(WAIT, "the spent quota on every gateway", || async {
            (g.status(target).await == "403").then_some(())
        })
        .await;
    }

    // Every gateway restarted: the consumption is in the store, not in a process.
    for g in gateways.iter_mut() {
        g.stop().await;
    }
    for g in gateways.iter_mut() {
        g.start().await;
    }
    for g in &gateways {
        g.wait_for_agent().await;
        assert_eq!(
            g.status(target).await,
            "403",
            "quota still spent: {}",
            g.log_text()
        );
        // The session survived too (in the store): only the quota says no.
        let log = g.log_text();
        assert!(log.contains("deny(session=true,quota=false)"), "{log}");
    }
}
