//! Port forwarding through the real binaries: declared by the gateway, and asked for by
//! an agent (`open_ports`), with bulk data byte-identical both ways.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// iperf-style: pushes `len` bytes through `port` while reading the echo back, and
/// checks that every byte returned intact.
async fn bulk_echo(port: u16, len: usize) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let data = pattern(len, 21);
    let want = sha256_hex(&data);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(len);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .expect("the echo completes")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), len);
    assert_eq!(sha256_hex(&back), want);
}

async fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?}:\n{log}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_forward_carries_bulk_data_both_ways() {
    let echo = echo_target().await;
    let port = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![format!(
            "forwards:\n    - {{ listen_addr: \"127.0.0.1:{port}\", target: \"localhost:{}\" }}",
            echo.port()
        )],
        ..StackOptions::default()
    })
    .await;
    wait_for_port(port).await;
    bulk_echo(port, 64 << 20).await;
    // Several at once, as iperf -P would.
    let parallel: Vec<_> = (0..4)
        .map(|_| tokio::spawn(bulk_echo(port, 8 << 20)))
        .collect();
    for p in parallel {
        p.await.unwrap();
    }
    // One access line per forwarded connection.
    let log = stack.log("gateway");
    let lines = log
        .lines()
        .filter(|l| l.contains("forward") && l.contains("result"))
        .count();
    assert!(lines >= 5, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_own_forward_conflicts_and_is_released_when_it_leaves() {
    let echo = echo_target().await;
    let port = free_port();
    let mut stack = Stack::start(StackOptions {
        gateway_extra: vec![format!(
            "agent_forwards: {{ bind: 127.0.0.1, ports: \"{port}-{port}\" }}"
        )],
        client_extra: vec![format!(
            "open_ports:\n    - {{ remote_port: {port}, target: \"localhost:{}\" }}",
            echo.port()
        )],
        ..StackOptions::default()
    })
    .await;
    let dir = stack.certs.dir.path().to_path_buf();
    wait_for_log(&dir.join("agent.log"), "gateway forward open").await;
    bulk_echo(port, 16 << 20).await;

    // A second agent asking for the same port gets a clear conflict.
    let config = std::fs::read_to_string(dir.join("config.yaml"))
        .unwrap()
        .replace("client_id: \"test-agent\"", "client_id: \"second-agent\"");
    std::fs::write(dir.join("second.yaml"), config).unwrap();
    let second = spawn(
        &[
            "client",
            "--config",
            dir.join("second.yaml").to_str().unwrap(),
        ],
        &dir.join("second.log"),
    );
    let log = wait_for_log(&dir.join("second.log"), "gateway refused a forward").await;
    assert!(log.contains("already forwarded by agent"), "{log}");
    drop(second);

    // The owner leaves: the port is free again promptly.
    drop(stack.agent.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => {
                drop(l);
                break;
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "port {port} still held after the agent left"
                );
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }

    // It comes back: the port is bound again and carries traffic.
    let log_before = stack.log("gateway").matches("agent forward").count();
    let _again = spawn(
        &[
            "client",
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
        ],
        &dir.join("agent-again.log"),
    );
    wait_for_log(&dir.join("agent-again.log"), "gateway forward open").await;
    assert!(stack.log("gateway").matches("agent forward").count() > log_before);
    bulk_echo(port, 4 << 20).await;
}
