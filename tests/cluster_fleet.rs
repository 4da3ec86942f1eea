//! A fleet as production runs it: three gateways sharing one real `redis-server`, a
//! real HAProxy in TCP mode in front of their HTTP proxies (`send-proxy-v2`, health
//! checks), and two agents each connected to all three gateways. curl goes through
//! HAProxy; one gateway is SIGKILLed in the middle of a curl storm and comes back.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::cluster::eventually;
use common::haproxy::HaProxy;
use common::redis::Redis;
use common::*;

struct Gateway {
    proc: Option<Proc>,
    config: PathBuf,
    log: PathBuf,
    agent_port: u16,
    http_port: u16,
    socks_port: u16,
    admin_port: u16,
}

impl Gateway {
    fn write(name: &str, certs: &Certs, redis: &str) -> Gateway {
        let dir = certs.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let g = Gateway {
            proc: None,
            config: dir.join("config.yaml"),
            log: dir.join("gateway.log"),
            agent_port: free_port(),
            http_port: free_port(),
            socks_port: free_port(),
            admin_port: free_port(),
        };
        let config = format!(
            r#"proxy:
  http:
    listen_addr: "127.0.0.1:{http}"
    auth_username: "{HTTP_USER}"
    auth_password: "{HTTP_PASS}"
    proxy_protocol: true
  socks5:
    listen_addr: "127.0.0.1:{socks}"
    auth_username: "{SOCKS_USER}"
    auth_password: "{SOCKS_PASS}"
gateway:
  listen_addr: "127.0.0.1:{agent}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  connect_timeout: 5s
  admin_addr: "127.0.0.1:{admin}"
  trusted_proxies: ["127.0.0.1/32"]
  limits:
    per_user: {{ max_concurrent: 1000 }}
  cluster:
    redis: "{redis}"
    node_id: "{name}"
    lease: 3s
    timeout: 300ms
"#,
            http = g.http_port,
            socks = g.socks_port,
            agent = g.agent_port,
            admin = g.admin_port,
            cert = certs.cert.display(),
            key = certs.key.display(),
        );
        std::fs::write(&g.config, config).unwrap();
        g
    }

    async fn start(&mut self) {
        let mut proc = spawn(
            &["gateway", "--config", self.config.to_str().unwrap()],
            &self.log,
        );
        for port in [self.agent_port, self.http_port, self.admin_port] {
            assert!(
                wait_for_listener(&mut proc, port).await,
                "gateway exited:\n{}",
                self.log_text()
            );
        }
        self.proc = Some(proc);
    }

    async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.0.start_kill().unwrap();
            let _ = p.0.wait().await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The client ids of the agents registered here.
    async fn agents(&self) -> Vec<String> {
        let (code, body) = admin_get(self.admin_port, "/api/status", None).await;
        if code != "200" {
            return vec![];
        }
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let mut ids: Vec<String> = status["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["agents"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["client_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    }
}

fn agent_config(dir: &std::path::Path, id: &str, certs: &Certs, gateways: &[&Gateway]) -> PathBuf {
    let addrs: Vec<String> = gateways
        .iter()
        .map(|g| format!("\"127.0.0.1:{}\"", g.agent_port))
        .collect();
    let config = format!(
        r#"client:
  gateway_addrs: [{addrs}]
  allow_local: true
  gateway_tls_cert: "{cert}"
  gateway_server_name: "localhost"
  client_id: "{id}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  reconnect_min: 100ms
  reconnect_max: 1s
"#,
        addrs = addrs.join(", "),
        cert = certs.cert.display(),
    );
    let path = dir.join(format!("{id}.yaml"));
    std::fs::write(&path, config).unwrap();
    path
}

const BOTH_AGENTS: [&str; 2] = ["agent-1", "agent-2"];

/// One GET through the balancer from `from`; its HTTP status.
async fn get_via(lb: u16, from: &str, target: SocketAddr) -> String {
    let proxy = format!("http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{lb}");
    let url = format!("http://{target}/");
    curl_status(&["--interface", from, "--max-time", "10", "-x", &proxy, &url]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_behind_haproxy_survive_losing_one_during_a_curl_storm() {
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
    let all: Vec<&Gateway> = gateways.iter().collect();
    let _agents: Vec<Proc> = BOTH_AGENTS
        .iter()
        .map(|id| {
            let config = agent_config(certs.dir.path(), id, &certs, &all);
            spawn(
                &["client", "--config", config.to_str().unwrap()],
                &certs.dir.path().join(format!("{id}.log")),
            )
        })
        .collect();
    for g in &gateways {
        eventually(
            Duration::from_secs(30),
            "both agents on every gateway",
            || async { (g.agents().await == BOTH_AGENTS).then_some(()) },
        )
        .await;
    }

    let lb = free_port();
    let servers: Vec<String> = gateways
        .iter()
        .enumerate()
        .map(|(i, g)| {
            format!(
                "server g{i} 127.0.0.1:{} send-proxy-v2 check inter 300ms fall 1 rise 2",
                g.http_port
            )
        })
        .collect();
    let haproxy =
        HaProxy::start(&[(lb, format!("balance roundrobin\n{}", servers.join("\n")))]).await;
    let target = http_target().await;

    // Through the balancer, as the client it saw: every gateway names 127.0.0.5.
    for _ in 0..6 {
        assert_eq!(
            get_via(lb, "127.0.0.5", target).await,
            "200",
            "{}",
            haproxy.log()
        );
    }
    for g in &gateways {
        let log = g.log_text();
        assert!(
            log.contains("client=127.0.0.5:"),
            "round robin reaches each: {log}"
        );
        assert!(
            !log.lines()
                .any(|l| l.contains("access") && l.contains("client=127.0.0.1:")),
            "never the balancer as the client: {log}"
        );
    }

    // A storm of curls; gateway C is SIGKILLed after its first wave.
    let mut before_kill = Vec::new();
    for wave in 0..10 {
        if wave == 3 {
            gateways[2].kill().await;
        }
        let statuses =
            futures_util::future::join_all((0..4).map(|_| get_via(lb, "127.0.0.6", target))).await;
        if wave < 3 {
            before_kill.extend(statuses);
        }
    }
    assert!(before_kill.iter().all(|s| s == "200"), "{before_kill:?}");
    // Once HAProxy's check has noticed, new requests succeed on the others.
    eventually(
        Duration::from_secs(30),
        "ten in a row after the kill",
        || async {
            for _ in 0..10 {
                if get_via(lb, "127.0.0.6", target).await != "200" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // The agents kept serving on the survivors, undisturbed.
    for g in &gateways[..2] {
        assert_eq!(g.agents().await, BOTH_AGENTS);
        let mut s = socks5_stream(
            g.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "127.0.0.1",
            target.port(),
        )
        .await
        .expect("SOCKS5 through a survivor");
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    }

    // C comes back: both agents reconnect to it, and HAProxy sends it traffic again.
    gateways[2].start().await;
    let c = &gateways[2];
    eventually(Duration::from_secs(30), "both agents back on C", || async {
        (c.agents().await == BOTH_AGENTS).then_some(())
    })
    .await;
    let served_before = c.log_text().matches("client=127.0.0.7:").count();
    eventually(
        Duration::from_secs(30),
        "C serving through the balancer again",
        || async {
            (get_via(lb, "127.0.0.7", target).await == "200"
                && c.log_text().matches("client=127.0.0.7:").count() > served_before)
                .then_some(())
        },
    )
    .await;
}
