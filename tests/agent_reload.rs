//! SIGHUP on the agent: what it may dial changes live. A target newly forbidden is
//! refused on the next connect and its live connection is closed with a logged reason;
//! other connections (a long download among them) carry on; a bad file changes
//! nothing; a storm of signals ends in one consistent state. `open_ports` added by a
//! reload are opened on the live session, and removed ones are withdrawn there and
//! not asked for by the next session; a rotated client certificate is presented by the next connection
//! while the live session keeps serving.

mod common;

use std::time::Duration;

use common::{
    admin_get, free_port, metric, refused_within, round_trip, signal, spawn, wait_for_listener,
    Stack, StackOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Through the stack's SOCKS5 listener to `target`, named by its IP.
async fn socks5(
    stack: &Stack,
    target: std::net::SocketAddr,
) -> Result<tokio::net::TcpStream, common::Socks5Refusal> {
    common::socks5_stream(
        stack.socks_port,
        common::SOCKS_USER,
        common::SOCKS_PASS,
        &target.ip().to_string(),
        target.port(),
    )
    .await
}

/// A stack whose only agent (`a`, config file `agent-a.yaml`) has an admin listener.
async fn stack_with_agent(admin: u16) -> (Stack, common::Proc, std::path::PathBuf) {
    let stack = Stack::start(StackOptions {
        with_agent: false,
        ..Default::default()
    })
    .await;
    let agent = stack.spawn_agent("a", &[format!("admin_addr: \"127.0.0.1:{admin}\"")]);
    stack.wait_for_agent().await;
    let config = stack.certs.dir.path().join("agent-a.yaml");
    (stack, agent, config)
}

/// Rewrites the agent's file with `from` replaced by `to`, then sends SIGHUP.
fn edit_and_hup(config: &std::path::Path, pid: u32, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains(from), "{from:?} not in\n{text}");
    std::fs::write(config, text.replace(from, to)).unwrap();
    signal(pid, "HUP");
}

#[tokio::test]
async fn a_target_newly_forbidden_is_refused_and_its_live_connection_closed() {
    let admin = free_port();
    let (stack, agent, config) = stack_with_agent(admin).await;
    let pid = agent.0.id().unwrap();
    let doomed = common::echo_target_on("127.0.0.2").await;
    let kept = common::echo_target_on("127.0.0.1").await;
    let mut to_doomed = socks5(&stack, doomed).await.unwrap();
    let mut to_kept = socks5(&stack, kept).await.unwrap();
    round_trip(&mut to_doomed, b"before").await;
    round_trip(&mut to_kept, b"before").await;

    // A long download from an allowed target, slowed so the reload lands mid-body.
    let target = common::http_target().await;
    let download = common::slow_download(stack.http_proxy(), target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    edit_and_hup(
        &config,
        pid,
        "forbidden_hosts: []",
        "forbidden_hosts: [\"127.0.0.2\"]",
    );
    stack
        .wait_for_log("agent-a", "configuration reloaded", 1)
        .await;

    // The live connection to the forbidden target is closed, with the reason logged.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), to_doomed.read(&mut buf))
        .await
        .expect("the forbidden connection ends within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let log = stack.log("agent-a");
    for line in [
        "forbidden host 127.0.0.2 added",
        "closing a live connection the reloaded configuration forbids",
    ] {
        assert!(log.contains(line), "{line:?} not in\n{log}");
    }
    stack
        .wait_for_log(
            "agent-a",
            "target forbidden by the reloaded configuration",
            1,
        )
        .await;
    // The next connect to it is refused: 403 through the HTTP proxy.
    let forbidden = format!("http://{doomed}/");
    let status = common::curl_status(&["-x", &stack.http_proxy(), &forbidden]).await;
    assert_eq!(status, "403");
    // Other connections are untouched.
    round_trip(&mut to_kept, b"after the reload").await;
    common::assert_downloaded_whole(download).await;
    // One session all along.
    assert_eq!(log.matches("authenticated to the gateway").count(), 1);
    let m = admin_get(admin, "/metrics", None).await.1;
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "success")]),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_bad_file_changes_nothing_and_a_storm_ends_in_one_state() {
    let admin = free_port();
    let (stack, mut agent, config) = stack_with_agent(admin).await;
    let pid = agent.0.id().unwrap();
    let other = common::echo_target_on("127.0.0.2").await;
    let mut held = socks5(&stack, other).await.unwrap();
    round_trip(&mut held, b"held").await;

    // An entry that is not a CIDR: refused whole, the error names the key.
    let text = std::fs::read_to_string(&config).unwrap();
    let bad = text
        .replace(
            "forbidden_hosts: []",
            "forbidden_hosts: [\"127.0.0.2\", \"10.0.0.0/99\"]",
        )
        .replace("max_concurrent_conns: 1000", "max_concurrent_conns: 1");
    assert_ne!(bad, text);
    std::fs::write(&config, &bad).unwrap();
    signal(pid, "HUP");
    stack.wait_for_log("agent-a", "reload failed", 1).await;
    let log = stack.log("agent-a");
    assert!(log.contains("invalid forbidden_hosts entry"), "{log}");
    let m = admin_get(admin, "/metrics", None).await.1;
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "failure")]),
        1.0,
        "{m}"
    );
    // Nothing of it applied: the target is not forbidden, the cap not lowered.
    round_trip(&mut held, b"still held").await;
    let mut second = socks5(&stack, other).await.unwrap();
    round_trip(&mut second, b"second").await;
    drop(second);

    // 50 signals in one go on a good file: one consistent state after them.
    std::fs::write(
        &config,
        bad.replace("\"10.0.0.0/99\"", "\"10.0.0.0/8\"")
            .replace("\"127.0.0.2\", ", ""),
    )
    .unwrap();
    for _ in 0..50 {
        signal(pid, "HUP");
    }
    stack
        .wait_for_log("agent-a", "configuration reloaded", 1)
        .await;
    // The reloads the storm folded into settle; the last one names the new cap.
    stack
        .wait_for_log("agent-a", "max_concurrent_conns changed", 1)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = stack.log("agent-a");
    assert_eq!(log.matches("reload failed").count(), 1, "{log}");
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent survived the storm"
    );
    // The cap of 1 holds (one connection is open), and the held one carries on.
    let refused = socks5(&stack, other).await;
    assert!(refused.is_err(), "a second connection under a cap of 1");
    round_trip(&mut held, b"after the storm").await;
    stack
        .wait_for_log("agent-a", "agent is at max_concurrent_conns (1)", 1)
        .await;
    drop(held);
    // Its place freed, a new connection is admitted (the cap counts live ones).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = socks5(&stack, other).await {
            round_trip(&mut s, b"admitted").await;
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never admitted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stack
            .log("agent-a")
            .matches("authenticated to the gateway")
            .count(),
        1
    );
}

/// Kills the stack's gateway and starts it again from its file (edited or not), its
/// log in `gateway-<n>.log`: the agent's sessions end and it reconnects.
async fn restart_gateway(stack: &mut Stack, n: usize) {
    let _ = stack.gateway.0.kill().await;
    let dir = stack.certs.dir.path();
    let config = dir.join("config.yaml");
    let log = dir.join(format!("gateway-{n}.log"));
    stack.gateway = spawn(&["gateway", "--config", config.to_str().unwrap()], &log);
    assert!(
        wait_for_listener(&mut stack.gateway, stack.gateway_port).await,
        "the gateway did not start again:\n{}",
        stack.log(&format!("gateway-{n}"))
    );
}

/// [`edit_and_hup`] on agent `a`, then waits until its log holds `needle` `times` times.
async fn reload_until(
    stack: &Stack,
    (config, pid): (&std::path::Path, u32),
    (from, to): (&str, &str),
    (needle, times): (&str, usize),
) {
    edit_and_hup(config, pid, from, to);
    stack.wait_for_log("agent-a", needle, times).await;
}

/// A plain TCP connection to a gateway port on loopback.
async fn connect(port: u16) -> std::io::Result<tokio::net::TcpStream> {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await
}

/// `open_ports` lines for the agent's file: each (gateway port, target).
fn open_ports(ports: &[(u16, std::net::SocketAddr)]) -> String {
    let mut text = "open_ports:".to_owned();
    for (port, target) in ports {
        text.push_str(&format!(
            "\n    - {{ remote_port: {port}, target: \"{target}\" }}"
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_ports_added_by_a_reload_forward_at_once_and_removed_ones_are_withdrawn() {
    let (kept_port, added_port) = (free_port(), free_port());
    let (low, high) = (kept_port.min(added_port), kept_port.max(added_port));
    let mut stack = Stack::start(StackOptions {
        with_agent: false,
        gateway_extra: vec![format!(
            "agent_forwards: {{ bind: 127.0.0.1, ports: \"{low}-{high}\" }}"
        )],
        ..Default::default()
    })
    .await;
    let (kept, added) = (
        common::echo_target_on("127.0.0.1").await,
        common::echo_target_on("127.0.0.1").await,
    );
    let before = open_ports(&[(kept_port, kept)]);
    let agent = stack.spawn_agent("a", std::slice::from_ref(&before));
    let pid = agent.0.id().unwrap();
    let config = stack.certs.dir.path().join("agent-a.yaml");
    stack
        .wait_for_log("agent-a", "gateway forward open", 1)
        .await;
    let mut held = connect(kept_port).await.unwrap();
    round_trip(&mut held, b"before").await;

    // Added: the gateway opens it on the live session.
    let both = open_ports(&[(kept_port, kept), (added_port, added)]);
    let file = (config.as_path(), pid);
    reload_until(&stack, file, (&before, &both), ("gateway forward open", 2)).await;
    let mut fresh = connect(added_port).await.unwrap();
    round_trip(&mut fresh, b"through the added port").await;
    let log = stack.log("agent-a");
    assert_eq!(log.matches("open port added").count(), 1, "{log}");

    // Retargeted twice: the gateway takes the port over each time, on the same session.
    let web = common::http_target().await;
    let to_web = open_ports(&[(kept_port, kept), (added_port, web)]);
    reload_until(&stack, file, (&both, &to_web), ("gateway forward open", 3)).await;
    let mut http = connect(added_port).await.unwrap();
    http.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), http.read_to_end(&mut answer)).await;
    assert!(answer.starts_with(b"HTTP/1."), "{answer:?}");
    reload_until(&stack, file, (&to_web, &both), ("gateway forward open", 4)).await;
    let mut fresh = connect(added_port).await.unwrap();
    round_trip(&mut fresh, b"back to the echo").await;
    let log = stack.log("agent-a");
    assert_eq!(log.matches("open port retargeted").count(), 2, "{log}");
    assert!(!log.contains("gateway refused a forward"), "{log}");
    round_trip(&mut held, b"the kept one carries on").await;
    assert_eq!(log.matches("authenticated to the gateway").count(), 1);

    // Removed: withdrawn on the live session (`unforward`). The port stops listening,
    // the connection it accepted carries on, and the next session does not ask for it.
    let only_added = open_ports(&[(added_port, added)]);
    reload_until(&stack, file, (&both, &only_added), ("open port removed", 1)).await;
    stack
        .wait_for_log("gateway", "agent withdrew its forward", 1)
        .await;
    refused_within(kept_port).await;
    round_trip(&mut held, b"accepted before the withdrawal").await;
    let mut still = connect(added_port).await.unwrap();
    round_trip(&mut still, b"the other port stays").await;
    assert_eq!(
        stack
            .log("agent-a")
            .matches("authenticated to the gateway")
            .count(),
        1,
        "withdrawn on the same session"
    );
    drop((held, fresh, still));

    restart_gateway(&mut stack, 2).await;
    stack
        .wait_for_log("agent-a", "authenticated to the gateway", 2)
        .await;
    stack
        .wait_for_log("agent-a", "gateway forward open", 5)
        .await;
    let mut again = connect(added_port).await.unwrap();
    round_trip(&mut again, b"asked for again").await;
    assert!(
        connect(kept_port).await.is_err(),
        "the removed port is open on the new session"
    );
    let asked = stack.log("gateway-2");
    assert_eq!(asked.matches("agent forward").count(), 1, "{asked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_presented_next_while_the_live_session_serves() {
    let pki = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = pki.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (old_ca, new_ca) = (
        anyproxy::transport::tls::GeneratedCa::new("old CA").unwrap(),
        anyproxy::transport::tls::GeneratedCa::new("new CA").unwrap(),
    );
    let (old, new) = (
        old_ca.client_cert("a").unwrap(),
        new_ca.client_cert("a").unwrap(),
    );
    let both_cas = write(
        "both.pem",
        &format!("{}{}", old_ca.cert_pem, new_ca.cert_pem),
    );
    let new_ca_only = write("new-ca.pem", &new_ca.cert_pem);
    let (old_cert, old_key) = (
        write("old.pem", &old.cert_pem),
        write("old.key", &old.key_pem),
    );
    let (new_cert, new_key) = (
        write("new.pem", &new.cert_pem),
        write("new.key", &new.key_pem),
    );
    let identity =
        |cert: &str, key: &str| format!("tls_client_cert: \"{cert}\"\n  tls_client_key: \"{key}\"");
    let mut stack = Stack::start(StackOptions {
        with_agent: false,
        gateway_extra: vec![format!("client_ca: \"{both_cas}\"")],
        ..Default::default()
    })
    .await;
    let before = identity(&old_cert, &old_key);
    let agent = stack.spawn_agent("a", std::slice::from_ref(&before));
    let pid = agent.0.id().unwrap();
    let config = stack.certs.dir.path().join("agent-a.yaml");
    stack.wait_for_agent().await;

    // A long download on the live session, slowed so the reloads land mid-body.
    let target = common::http_target().await;
    let download = common::slow_download(stack.http_proxy(), target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A key file that is not a key: refused whole, the error names the key.
    let bad_key = write("bad.key", "not a key");
    let broken = identity(&new_cert, &bad_key);
    let file = (config.as_path(), pid);
    reload_until(&stack, file, (&before, &broken), ("reload failed", 1)).await;
    let log = stack.log("agent-a");
    assert!(log.contains("client.tls_client_key"), "{log}");

    let after = identity(&new_cert, &new_key);
    reload_until(
        &stack,
        file,
        (&broken, &after),
        ("configuration reloaded", 1),
    )
    .await;
    let log = stack.log("agent-a");
    assert!(!log.contains("takes effect at the next restart"), "{log}");
    common::assert_downloaded_whole(download).await;
    assert_eq!(
        stack
            .log("agent-a")
            .matches("authenticated to the gateway")
            .count(),
        1
    );

    // The gateway now trusts only the new CA: the agent's next connection gets in,
    // so it presents the new certificate.
    let gateway_config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&gateway_config).unwrap();
    std::fs::write(&gateway_config, text.replace(&both_cas, &new_ca_only)).unwrap();
    restart_gateway(&mut stack, 2).await;
    stack.wait_for_log("gateway-2", "agent connected", 1).await;
    let log = stack.log("agent-a");
    assert!(!log.contains("refused the TLS handshake"), "{log}");
    let status =
        common::curl_status(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!(status, "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_and_replicas_follow_the_file_and_retired_sessions_drain() {
    let first = Stack::start(StackOptions {
        with_agent: false,
        ..Default::default()
    })
    .await;
    let pem = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    // The second gateway serves the same certificate: the agent trusts that one file.
    let second = Stack::start(StackOptions {
        with_agent: false,
        tls: Some((pem(&first.certs.cert), pem(&first.certs.key))),
        ..Default::default()
    })
    .await;
    let agent = first.spawn_agent("a", &[]);
    let config = first.certs.dir.path().join("agent-a.yaml");
    let file = (config.as_path(), agent.0.id().unwrap());
    first.wait_for_agent().await;
    let echo = common::echo_target_on("127.0.0.1").await;
    let mut held = first.socks5_to(echo).await.unwrap();
    round_trip(&mut held, b"before").await;

    // A gateway added and the replicas raised: new sessions, the first one untouched.
    let (p1, p2) = (first.gateway_port, second.gateway_port);
    let one = format!("gateway_addr: \"127.0.0.1:{p1}\"");
    let two = format!("gateway_addrs: [\"127.0.0.1:{p1}\", \"127.0.0.1:{p2}\"]\n  replicas: 2");
    reload_until(&first, file, (&one, &two), ("gateway added", 1)).await;
    second.wait_for_log("gateway", "agent connected", 2).await;
    first.wait_for_log("gateway", "agent connected", 2).await;
    round_trip(&mut held, b"during").await;
    let mut via_second = second.socks5_to(echo).await.unwrap();
    round_trip(&mut via_second, b"second").await;
    let log = first.log("agent-a");
    assert_eq!(log.matches("replicas changed").count(), 1, "{log}");
    assert!(!first.log("gateway").contains("agent disconnected"));

    // The first gateway removed and the replicas lowered: the sessions no longer
    // wanted drain (a live connection carries on until it ends), then close.
    let only_second = format!("gateway_addrs: [\"127.0.0.1:{p2}\"]\n  replicas: 1");
    reload_until(&first, file, (&two, &only_second), ("gateway removed", 1)).await;
    round_trip(&mut held, b"while draining").await;
    round_trip(&mut via_second, b"while draining").await;
    drop((held, via_second));
    first
        .wait_for_log(
            "agent-a",
            "session closed: gateway removed from the configuration",
            2,
        )
        .await;
    first
        .wait_for_log("agent-a", "session closed: replica no longer configured", 1)
        .await;
    first.wait_for_log("gateway", "agent disconnected", 2).await;
    second
        .wait_for_log("gateway", "agent disconnected", 1)
        .await;
    let mut again = second.socks5_to(echo).await.unwrap();
    round_trip(&mut again, b"one session left").await;
    let log = first.log("agent-a");
    assert!(!log.contains("takes effect at the next restart"), "{log}");
    assert_eq!(
        log.matches("authenticated to the gateway").count(),
        4,
        "{log}"
    );
}
