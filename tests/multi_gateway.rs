//! One agent, several gateways (a cluster behind a load balancer): the agent keeps
//! `replicas` sessions to every gateway, each reconnecting on its own; losing one
//! gateway leaves the sessions to the others undisturbed; its `open_ports` are bound
//! on every gateway. Real binaries on loopback; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One gateway process with an HTTP and a SOCKS5 proxy, an admin listener and agent
/// forwards allowed on `forward_bind`; restartable on the same ports.
struct Gw {
    name: &'static str,
    listen: String,
    http: u16,
    socks: u16,
    admin: u16,
    config: PathBuf,
    dir: PathBuf,
    proc: Option<Proc>,
    starts: usize,
}

impl Gw {
    fn new(
        certs: &Certs,
        name: &'static str,
        listen: String,
        forward_bind: &str,
        forward_port: u16,
    ) -> Gw {
        let (http, socks, admin) = (free_port(), free_port(), free_port());
        let dir = certs.dir.path().to_path_buf();
        let config = dir.join(format!("{name}.yaml"));
        let text = format!(
            r#"proxy:
  http:
    listen_addr: "127.0.0.1:{http}"
    auth_username: "{HTTP_USER}"
    auth_password: "{HTTP_PASS}"
  socks5:
    listen_addr: "127.0.0.1:{socks}"
    auth_username: "{SOCKS_USER}"
    auth_password: "{SOCKS_PASS}"
gateway:
  listen_addr: "{listen}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  connect_timeout: 5s
  admin_addr: "127.0.0.1:{admin}"
  agent_forwards: {{ bind: {forward_bind}, ports: "{forward_port}-{forward_port}" }}
"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
        );
        std::fs::write(&config, text).unwrap();
        Gw {
            name,
            listen,
            http,
            socks,
            admin,
            config,
            dir,
            proc: None,
            starts: 0,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}-{}.log", self.name, self.starts))
    }

    async fn start(&mut self) {
        self.starts += 1;
        let mut proc = spawn(
            &["gateway", "--config", self.config.to_str().unwrap()],
            &self.log_path(),
        );
        for port in [self.http, self.socks, self.admin] {
            assert!(
                wait_for_listener(&mut proc, port).await,
                "gateway {} exited:\n{}",
                self.name,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
        }
        self.proc = Some(proc);
    }

    async fn kill(&mut self) {
        let mut proc = self.proc.take().expect("running");
        proc.0.start_kill().unwrap();
        tokio::time::timeout(Duration::from_secs(10), proc.0.wait())
            .await
            .expect("the gateway dies")
            .unwrap();
    }

    fn http_proxy(&self) -> String {
        format!("http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{}", self.http)
    }

    /// The client ids of the agent sessions this gateway lists.
    async fn agents(&self) -> Vec<String> {
        let status = status(self.admin).await;
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

    async fn wait_agents(&self, want: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.agents().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway {} lists {got:?}, want {want:?}:\n{}",
                self.name,
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `/api/status` of the admin listener on `port` (null when it does not answer).
async fn status(port: u16) -> Value {
    let (code, body) = admin_get(port, "/api/status", None).await;
    if code != "200" {
        return Value::Null;
    }
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// An agent process for `gateways` (YAML list items), with an admin listener.
struct AgentProc {
    admin: u16,
    log: PathBuf,
    _proc: Proc,
}

impl AgentProc {
    fn start(certs: &Certs, gateways: &str, extra: &str) -> AgentProc {
        let admin = free_port();
        let dir = certs.dir.path();
        let text = format!(
            r#"client:
{gateways}
  gateway_tls_cert: "{cert}"
  client_id: "multi"
  allow_local: true
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  dial_timeout: 3s
  reconnect_min: 100ms
  reconnect_max: 1s
  admin_addr: "127.0.0.1:{admin}"
{extra}"#,
            cert = certs.cert.display(),
        );
        let config = dir.join("agent.yaml");
        std::fs::write(&config, text).unwrap();
        let log = dir.join("agent.log");
        let proc = spawn(&["client", "--config", config.to_str().unwrap()], &log);
        AgentProc {
            admin,
            log,
            _proc: proc,
        }
    }

    /// The agent's gateway session rows.
    async fn rows(&self) -> Vec<Value> {
        status(self.admin).await["gateways"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until every row is connected and there are `n` of them.
    async fn wait_connected(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.rows().await;
            if rows.len() == n && rows.iter().all(|r| r["state"] == "connected") {
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "agent rows {rows:#?}, want {n} connected:\n{}",
                read(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Sends `msg` on `s` and expects it back.
async fn echo_round(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("the echo answers")
        .unwrap();
    assert_eq!(back, msg);
}

/// A connection to `addr` answers an echo round (retried until the port is bound).
async fn forward_echoes(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "{addr} never bound: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    echo_round(&mut s, format!("through {addr}").as_bytes()).await;
}

async fn hello_through(gw: &Gw, target: SocketAddr) {
    let (code, body) = curl(&["-x", &gw.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!(code, 0, "curl through gateway {}", gw.name);
    assert_eq!(String::from_utf8_lossy(&body), "hello", "via {}", gw.name);
}

fn rows_of<'a>(rows: &'a [Value], gateway: &str) -> Vec<&'a Value> {
    rows.iter().filter(|r| r["gateway"] == gateway).collect()
}

fn addrs_list(gws: &[&Gw]) -> String {
    let items: String = gws
        .iter()
        .map(|g| format!("\n    - \"{}\"", g.listen))
        .collect();
    format!("  gateway_addrs:{items}")
}

/// Guarantee: with `gateway_addrs` naming two gateways and `replicas: 2`, the agent
/// registers both replicas on each gateway, traffic flows through either, its
/// `open_ports` forward is bound on both, and its status shows one connected row per
/// gateway session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_every_gateway_it_is_given() {
    let certs = certs();
    let forward = free_port();
    let mut a = Gw::new(
        &certs,
        "a",
        format!("127.0.0.1:{}", free_port()),
        "127.0.0.1",
        forward,
    );
    let mut b = Gw::new(
        &certs,
        "b",
        format!("127.0.0.1:{}", free_port()),
        "127.0.0.2",
        forward,
    );
    a.start().await;
    b.start().await;
    let echo = echo_target().await;
    let agent = AgentProc::start(
        &certs,
        &addrs_list(&[&a, &b]),
        &format!(
            "  replicas: 2\n  open_ports:\n    - {{ remote_port: {forward}, target: \"127.0.0.1:{}\" }}\n",
            echo.port()
        ),
    );
    for gw in [&a, &b] {
        gw.wait_agents(&["multi.0", "multi.1"]).await;
    }
    let rows = agent.wait_connected(4).await;
    for gw in [&a, &b] {
        let mine = rows_of(&rows, &gw.listen);
        assert_eq!(mine.len(), 2, "{rows:#?}");
        assert!(mine.iter().all(|r| r["address"] == gw.listen.as_str()));
    }
    let status = status(agent.admin).await;
    assert_eq!(status["totals"]["agents"], 4, "{status:#}");

    let target = http_target().await;
    hello_through(&a, target).await;
    hello_through(&b, target).await;
    forward_echoes(SocketAddr::from(([127, 0, 0, 1], forward))).await;
    forward_echoes(SocketAddr::from(([127, 0, 0, 2], forward))).await;

    let (_, metrics) = admin_get(agent.admin, "/metrics", None).await;
    for gw in [&a, &b] {
        let up = metric(
            &metrics,
            "anyproxy_agent_gateway_session_up",
            &[("gateway", &gw.listen)],
        );
        assert_eq!(up, 2.0, "{metrics}");
    }
}

/// Guarantee: when gateway A dies, the agent's sessions to gateway B are not touched
/// (a connection held open through B keeps flowing, B's rows never reconnect), and
/// when A comes back on the same port the agent reconnects to it by itself and its
/// forward is bound there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_one_gateway_leaves_the_others_undisturbed() {
    let certs = certs();
    let forward = free_port();
    let mut a = Gw::new(
        &certs,
        "a",
        format!("127.0.0.1:{}", free_port()),
        "127.0.0.1",
        forward,
    );
    let mut b = Gw::new(
        &certs,
        "b",
        format!("127.0.0.1:{}", free_port()),
        "127.0.0.2",
        forward,
    );
    a.start().await;
    b.start().await;
    let echo = echo_target().await;
    let agent = AgentProc::start(
        &certs,
        &addrs_list(&[&a, &b]),
        &format!(
            "  open_ports:\n    - {{ remote_port: {forward}, target: \"127.0.0.1:{}\" }}\n",
            echo.port()
        ),
    );
    a.wait_agents(&["multi"]).await;
    b.wait_agents(&["multi"]).await;
    agent.wait_connected(2).await;

    // A connection through B, held open across A's death and return.
    let mut held = socks5_stream(b.socks, SOCKS_USER, SOCKS_PASS, "127.0.0.1", echo.port())
        .await
        .expect("SOCKS5 through B");
    echo_round(&mut held, b"before").await;

    a.kill().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = agent.rows().await;
        let a_rows = rows_of(&rows, &a.listen);
        if a_rows.len() == 1 && a_rows[0]["state"] != "connected" {
            break;
        }
        assert!(Instant::now() < deadline, "A's row stays {rows:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    echo_round(&mut held, b"while A is down").await;
    let target = http_target().await;
    hello_through(&b, target).await;
    let rows = agent.rows().await;
    let b_rows = rows_of(&rows, &b.listen);
    assert_eq!(b_rows.len(), 1);
    assert_eq!(b_rows[0]["state"], "connected", "{rows:#?}");
    assert_eq!(b_rows[0]["reconnects"], 0, "{rows:#?}");

    a.start().await;
    a.wait_agents(&["multi"]).await;
    let rows = agent.wait_connected(2).await;
    assert!(
        rows_of(&rows, &a.listen)[0]["reconnects"].as_u64().unwrap() >= 1,
        "{rows:#?}"
    );
    assert_eq!(rows_of(&rows, &b.listen)[0]["reconnects"], 0, "{rows:#?}");
    echo_round(&mut held, b"after A is back").await;
    hello_through(&a, target).await;
    forward_echoes(SocketAddr::from(([127, 0, 0, 1], forward))).await;
    b.wait_agents(&["multi"]).await;
    let log = read(&agent.log);
    assert!(
        log.contains(&a.listen),
        "the agent's lines name the gateway:\n{log}"
    );
}

/// Guarantee: a gateway name with several addresses is several gateways. `localhost`
/// resolves to 127.0.0.1 and ::1 on most hosts: two gateways on the same port of
/// each, and `gateway_addr: localhost:PORT`, give two sessions, each verifying the
/// certificate against `localhost`. Skipped where localhost has no IPv6 address or
/// ::1 cannot be bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_two_addresses_is_two_gateways() {
    let port = free_port();
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(("localhost", port))
        .await
        .map(|a| a.collect())
        .unwrap_or_default();
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    if !(resolved.contains(&v4) && resolved.contains(&v6)) {
        eprintln!(
            "skipped: localhost resolves to {resolved:?} here, not to both 127.0.0.1 and ::1"
        );
        return;
    }
    if std::net::TcpListener::bind(v6).is_err() {
        eprintln!("skipped: [::1]:{port} cannot be bound here");
        return;
    }
    let certs = certs();
    let forward = free_port();
    let mut four = Gw::new(&certs, "v4", v4.to_string(), "127.0.0.1", forward);
    let mut six = Gw::new(&certs, "v6", v6.to_string(), "127.0.0.2", forward);
    four.start().await;
    six.start().await;
    let agent = AgentProc::start(&certs, &format!("  gateway_addr: \"localhost:{port}\""), "");
    four.wait_agents(&["multi"]).await;
    six.wait_agents(&["multi"]).await;
    let rows = agent.wait_connected(2).await;
    let mut addresses: Vec<_> = rows
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_owned())
        .collect();
    addresses.sort();
    assert_eq!(addresses, [v4.to_string(), v6.to_string()]);
    assert!(rows
        .iter()
        .all(|r| r["gateway"] == format!("localhost:{port}").as_str()));
    let target = http_target().await;
    hello_through(&four, target).await;
    hello_through(&six, target).await;
}
