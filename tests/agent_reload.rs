//! SIGHUP on the agent: what it may dial changes live. A target newly forbidden is
//! refused on the next connect and its live connection is closed with a logged reason;
//! other connections (a long download among them) carry on; a bad file changes
//! nothing; a storm of signals ends in one consistent state.

mod common;

use std::time::Duration;

use common::{admin_get, free_port, metric, round_trip, signal, Stack, StackOptions};
use tokio::io::AsyncReadExt;

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
