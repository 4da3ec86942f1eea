//! Lifecycle under faults and at shutdown: dead and frozen agents, graceful drains on
//! SIGTERM, mutual TLS, and nothing left behind after a stop. Real binaries, real curl,
//! loopback only; every wait is bounded.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tokio_util::sync::CancellationToken;

/// A transfer run in the background: curl's exit code, the bytes it got, when it ended.
struct Transfer {
    code: i32,
    len: usize,
    ended: Instant,
}

fn start_transfer(args: Vec<String>) -> tokio::task::JoinHandle<Transfer> {
    tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&args).await;
        Transfer {
            code,
            len: body.len(),
            ended: Instant::now(),
        }
    })
}

fn via_tunnel(stack: &Stack, url: &str) -> Vec<String> {
    vec!["-p".into(), "-x".into(), stack.http_proxy(), url.into()]
}

fn via_socks(stack: &Stack, url: &str) -> Vec<String> {
    vec!["--socks5-hostname".into(), stack.socks_auth(), url.into()]
}

async fn hello(stack: &Stack, target: std::net::SocketAddr) -> String {
    let (_, body) = curl(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    String::from_utf8_lossy(&body).into_owned()
}

/// A stack started with `opts`, and a download of `chunks` slow chunks (one per 100 ms)
/// that is under way (the target received its request).
async fn stack_with_download(
    opts: StackOptions,
    chunks: usize,
    socks: bool,
) -> (Stack, tokio::task::JoinHandle<Transfer>) {
    let stack = Stack::start(opts).await;
    let target = http_target().await;
    let url = format!("http://{target}/slow/{chunks}/100");
    let args = if socks {
        via_socks(&stack, &url)
    } else {
        via_tunnel(&stack, &url)
    };
    let transfer = start_transfer(args);
    wait_for_slow_requests(target, 1).await;
    (stack, transfer)
}

fn refused(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

async fn exit_status(proc: &mut Proc, within: Duration) -> std::process::ExitStatus {
    tokio::time::timeout(within, proc.0.wait())
        .await
        .expect("process did not exit in time")
        .unwrap()
}

fn pid(proc: &Proc) -> u32 {
    proc.0.id().expect("process still running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_agents_fails_only_its_own_connections() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let _second = stack.spawn_agent("second", &[]);
    stack.wait_for_log("gateway", "agent connected", 2).await;
    let target = http_target().await;
    let url = format!("http://{target}/slow/40/100");

    // The least-loaded pick sends the second transfer to the other agent.
    // Each waits until its connection is established, so the pick sees the first.
    let first = start_transfer(via_tunnel(&stack, &url));
    wait_for_slow_requests(target, 1).await;
    let second = start_transfer(via_tunnel(&stack, &url));
    wait_for_slow_requests(target, 2).await;
    let mut agent = stack.agent.take().unwrap();
    agent.0.start_kill().unwrap();
    let killed = Instant::now();
    let _ = agent.0.wait().await;

    // Bounded, generously: a user connection the lost session left open would hang
    // for conn_idle_timeout (an hour).
    let (a, b) = tokio::time::timeout(Duration::from_secs(60), async {
        (first.await.unwrap(), second.await.unwrap())
    })
    .await
    .expect("a transfer hangs after its agent died");
    let full = 40 * SLOW_CHUNK;
    let (ok, failed) = if a.code == 0 { (a, b) } else { (b, a) };
    assert_eq!(
        (ok.code, ok.len),
        (0, full),
        "the other agent's transfer completes"
    );
    assert_ne!(failed.code, 0, "the killed agent's transfer fails");
    assert!(failed.len < full);
    eprintln!(
        "transfer through the killed agent failed {:?} after SIGKILL",
        failed.ended - killed
    );
    // The gateway saw the agent's connection end, rather than waiting for the
    // heartbeat to give up on it (idle_timeout, 30 s by default).
    stack.wait_for_log("gateway", "agent disconnected", 1).await;
    let gateway_log = stack.log("gateway");
    assert!(!gateway_log.contains("peer silent"), "{gateway_log}");

    for _ in 0..5 {
        assert_eq!(hello(&stack, target).await, "hello");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_detected_by_heartbeat_and_reconnects_after_it_thaws() {
    let heartbeat = vec![
        "ping_interval: 500ms".to_string(),
        "idle_timeout: 2s".into(),
    ];
    let stack = Stack::start(StackOptions {
        gateway_extra: heartbeat.clone(),
        client_extra: heartbeat,
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let agent_pid = pid(stack.agent.as_ref().unwrap());

    let transfer = start_transfer(via_socks(&stack, &format!("http://{target}/slow/80/100")));
    wait_for_slow_requests(target, 1).await;
    signal(agent_pid, "STOP");
    let stopped = Instant::now();
    // Bounded far above the 2 s idle_timeout: a transfer still hanging by then was
    // never cut (the frozen agent keeps its socket open).
    let t = tokio::time::timeout(Duration::from_secs(30), transfer).await;
    // Resume before any assertion, so a failure leaves no frozen process behind.
    let status = curl_status(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    signal(agent_pid, "CONT");
    let t = t.expect("the in-flight transfer hangs").unwrap();
    eprintln!(
        "in-flight transfer failed {:?} after SIGSTOP (idle_timeout 2s)",
        t.ended - stopped
    );
    assert_ne!(t.code, 0, "the in-flight transfer fails instead of hanging");
    assert!(t.len < 80 * SLOW_CHUNK, "cut, not completed");
    // The heartbeat is what cut it.
    assert!(stack.log("gateway").contains("peer silent for 2s"));
    assert_eq!(status, "503", "no live agent left");

    // Thawed, it finds its session gone, reconnects and takes requests at once.
    let thawed = Instant::now();
    stack.wait_for_log("gateway", "agent connected", 2).await;
    eprintln!("reconnected {:?} after SIGCONT", thawed.elapsed());
    assert_eq!(hello(&stack, target).await, "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_gateway_closes_listeners_and_drains_a_live_download() {
    let opts = StackOptions {
        gateway_extra: vec!["drain_timeout: 10s".into()],
        ..Default::default()
    };
    let (mut stack, transfer) = stack_with_download(opts, 30, false).await;
    signal(pid(&stack.gateway), "TERM");
    let termed = Instant::now();
    // The listeners close once the signal is handled: poll (bounded) rather than guess.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(refused(stack.http_port) && refused(stack.socks_port) && refused(stack.gateway_port))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused(stack.http_port), "HTTP proxy still accepting");
    assert!(refused(stack.socks_port), "SOCKS5 proxy still accepting");
    assert!(
        refused(stack.gateway_port),
        "agent listener still accepting"
    );

    let t = transfer.await.unwrap();
    assert_eq!(
        (t.code, t.len),
        (0, 30 * SLOW_CHUNK),
        "the download completes"
    );
    let status = exit_status(&mut stack.gateway, Duration::from_secs(15)).await;
    eprintln!(
        "download done {:?} after SIGTERM, gateway exited {:?} after that",
        t.ended - termed,
        t.ended.elapsed()
    );
    let gateway_log = stack.log("gateway");
    assert!(status.success(), "{status:?}\n{gateway_log}");
    // It stopped because the drain was done, not at drain_timeout.
    assert!(!gateway_log.contains("drain timeout"), "{gateway_log}");
    let agent_log = stack.log("agent");
    assert!(agent_log.contains("peer is going away"), "{agent_log}");
    assert!(agent_log.contains("gateway shutting down"), "{agent_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_gateway_drain_at_once() {
    let opts = StackOptions {
        gateway_extra: vec!["drain_timeout: 30s".into()],
        ..Default::default()
    };
    let (mut stack, transfer) = stack_with_download(opts, 100, false).await;
    let gw = pid(&stack.gateway);
    signal(gw, "TERM");
    // The second signal must come after the first was handled, not merely sent.
    stack
        .wait_for_log("gateway", "shutting down: closing listeners, draining", 1)
        .await;
    signal(gw, "INT");
    let second = Instant::now();
    // Well under the 30 s drain_timeout, which the second signal cuts short.
    let status = exit_status(&mut stack.gateway, Duration::from_secs(15)).await;
    eprintln!("exited {:?} after the second signal", second.elapsed());
    assert!(!status.success());
    assert!(stack.log("gateway").contains("second signal"));
    let t = transfer.await.unwrap();
    assert_ne!(t.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_agent_drains_its_download_refuses_new_work_and_exits_zero() {
    let opts = StackOptions {
        client_extra: vec!["drain_timeout: 10s".into()],
        ..Default::default()
    };
    let (mut stack, transfer) = stack_with_download(opts, 30, true).await;
    let mut agent = stack.agent.take().unwrap();
    signal(pid(&agent), "TERM");
    let termed = Instant::now();
    stack.wait_for_log("gateway", "peer is going away", 1).await;
    let target = http_target().await;
    let status = curl_status(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!(status, "503", "a draining agent takes no new connection");

    let t = transfer.await.unwrap();
    assert_eq!(
        (t.code, t.len),
        (0, 30 * SLOW_CHUNK),
        "the download completes"
    );
    let exit = exit_status(&mut agent, Duration::from_secs(15)).await;
    eprintln!(
        "agent: download done {:?} after SIGTERM, exited {:?} after that",
        t.ended - termed,
        t.ended.elapsed()
    );
    assert!(exit.success(), "{exit:?}\n{}", stack.log("agent"));
    let agent_log = stack.log("agent");
    let after_term = &agent_log[agent_log.find("draining").expect("drain logged")..];
    assert!(!after_term.contains("reconnecting"), "{agent_log}");
    stack.wait_for_log("gateway", "agent disconnected", 1).await;
    let gateway_log = stack.log("gateway");
    assert!(
        gateway_log.contains("code Some(1001)") && gateway_log.contains("agent shutting down"),
        "{gateway_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_agents_with_a_certificate_from_client_ca() {
    let pki = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = pki.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let ca = anyproxy::transport::tls::GeneratedCa::new("anyproxy test CA").unwrap();
    let good = ca.client_cert("agent-1").unwrap();
    let other_ca = anyproxy::transport::tls::GeneratedCa::new("someone else").unwrap();
    let rogue = other_ca.client_cert("rogue").unwrap();
    let ca_path = write("ca.pem", &ca.cert_pem);
    let identity = |cert: &str, key: &str| {
        vec![
            format!("tls_client_cert: \"{cert}\""),
            format!("tls_client_key: \"{key}\""),
        ]
    };
    let good_id = identity(
        &write("good.pem", &good.cert_pem),
        &write("good.key", &good.key_pem),
    );
    let rogue_id = identity(
        &write("rogue.pem", &rogue.cert_pem),
        &write("rogue.key", &rogue.key_pem),
    );

    let stack = Stack::start(StackOptions {
        gateway_extra: vec![format!("client_ca: \"{ca_path}\"")],
        client_extra: good_id,
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    assert_eq!(hello(&stack, target).await, "hello");

    let _anonymous = stack.spawn_agent("anonymous", &[]);
    let _rogue = stack.spawn_agent("rogue", &rogue_id);
    for agent in ["agent-anonymous", "agent-rogue"] {
        stack
            .wait_for_log(agent, "the gateway refused the TLS handshake", 1)
            .await;
    }
    let gateway_log = stack.log("gateway");
    assert!(
        gateway_log.contains("peer sent no certificates"),
        "{gateway_log}"
    );
    assert!(gateway_log.contains("UnknownIssuer"), "{gateway_log}");
    assert_eq!(gateway_log.matches("agent connected").count(), 1);
    assert!(!gateway_log.contains("client_id=anonymous"));
    assert!(!gateway_log.contains("client_id=rogue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_descriptors_return_to_baseline_after_a_burst_and_both_exit_zero_on_sigterm() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let target = http_target().await;
    let (gw, agent) = (pid(&stack.gateway), pid(stack.agent.as_ref().unwrap()));
    // One request first, so lazily opened descriptors are part of the baseline.
    assert_eq!(hello(&stack, target).await, "hello");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (gw_base, agent_base) = (fd_count(gw), fd_count(agent));

    let burst: Vec<_> = (0..50)
        .map(|i| {
            let args = if i % 2 == 0 {
                via_socks(&stack, &format!("http://{target}/bytes/100000"))
            } else {
                via_tunnel(&stack, &format!("http://{target}/bytes/100000"))
            };
            start_transfer(args)
        })
        .collect();
    for t in burst {
        let t = t.await.unwrap();
        assert_eq!((t.code, t.len), (0, 100_000));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut gw_now, mut agent_now) = (fd_count(gw), fd_count(agent));
    while (gw_now > gw_base || agent_now > agent_base) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (gw_now, agent_now) = (fd_count(gw), fd_count(agent));
    }
    eprintln!("fds: gateway {gw_base} -> {gw_now}, agent {agent_base} -> {agent_now}");
    assert!(gw_now <= gw_base && agent_now <= agent_base);

    signal(agent, "TERM");
    signal(gw, "TERM");
    let mut agent_proc = stack.agent.take().unwrap();
    assert!(exit_status(&mut agent_proc, Duration::from_secs(10))
        .await
        .success());
    assert!(exit_status(&mut stack.gateway, Duration::from_secs(10))
        .await
        .success());
}

/// The library's stop paths, in one process: a gateway and an agent carry traffic,
/// the gateway drains a live download while stopping, and afterwards the runtime has
/// exactly the tasks it had before they started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_stop_drains_and_leaves_no_task_behind() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let certs = certs();
    let (gateway_port, socks_port) = (free_port(), free_port());
    let yaml = format!(
        r#"
proxy:
  socks5: {{ listen_addr: "127.0.0.1:{socks_port}", auth_username: su, auth_password: sp }}
gateway:
  listen_addr: "127.0.0.1:{gateway_port}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: a
  auth_password: b
client:
  gateway_addr: "localhost:{gateway_port}"
  allow_local: true
  gateway_tls_cert: "{cert}"
  client_id: inproc
  auth_username: a
  auth_password: b
  reconnect_min: 50ms
  reconnect_max: 200ms
"#,
        cert = certs.cert.display(),
        key = certs.key.display(),
    );
    let config = anyproxy::config::Config::parse(&yaml, Path::new("inproc.yaml")).unwrap();
    let target = http_target().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let gateway = anyproxy::gateway::Gateway::start(config.gateway.unwrap(), config.proxy)
        .await
        .unwrap();
    let agent = anyproxy::agent::Agent::new(config.client.unwrap()).unwrap();
    let stop_agent = CancellationToken::new();
    let agent_run = tokio::spawn(agent.run(stop_agent.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.registry.is_empty() {
        assert!(Instant::now() < deadline, "agent never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let get = |path: String| async move {
        let mut s = socks5_stream(socks_port, "su", "sp", "127.0.0.1", target.port())
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    };
    let burst: Vec<_> = (0..20).map(|_| tokio::spawn(get("/".into()))).collect();
    for r in burst {
        assert!(r.await.unwrap().ends_with(b"hello"));
    }
    let download = tokio::spawn(get("/slow/20/50".into()));
    wait_for_slow_requests(target, 1).await;
    let busy = metrics.num_alive_tasks();

    let stopping = Instant::now();
    gateway.stop_within(Duration::from_secs(10)).await;
    let stop_took = stopping.elapsed();
    let body = download.await.unwrap();
    assert!(
        body.len() > 20 * SLOW_CHUNK,
        "the download was drained, not cut"
    );
    stop_agent.cancel();
    tokio::time::timeout(Duration::from_secs(10), agent_run)
        .await
        .expect("agent stops")
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.num_alive_tasks() > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "tasks: baseline {baseline}, busy {busy}, after stop {}; gateway stop took {stop_took:?}",
        metrics.num_alive_tasks()
    );
    assert_eq!(metrics.num_alive_tasks(), baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnelled_connection_is_closed_and_logged_as_an_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            "conn_idle_timeout: 1s".into(),
            format!("admin_addr: \"127.0.0.1:{admin}\""),
        ],
        ..StackOptions::default()
    })
    .await;
    // An echo target that never closes by itself.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut s = stack.socks5_to(target).await.expect("through the tunnel");
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // Then silence: the gateway ends it after the idle timeout (bounded, generous).
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "an idle connection must be closed");
    assert!(rest.is_empty());
    stack
        .wait_for_log("gateway", "reason=\"idle timeout\"", 1)
        .await;
    let (_, metrics) = admin_get(admin, "/metrics", None).await;
    assert!(metric(&metrics, "anyproxy_tunnel_idle_timeouts_total", &[]) >= 1.0);
}
