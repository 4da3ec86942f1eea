//! Agent groups through the real binaries: proxy accounts reach their group's agents
//! only, group membership is authenticated, and a group's agents share the load.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OFFICE_SECRET: &str = "office-agent-secret";

/// The stack's gateway with two groups: `office` (user alice) and `lab` (user bob,
/// and no agent). The stack's own agent is in the default group and may not reach
/// loopback, so a request that wrongly lands on it gets 403 instead of passing.
async fn stack() -> Stack {
    Stack::start(StackOptions {
        forbidden_hosts: vec!["127.0.0.0/8".into(), "localhost".into()],
        gateway_extra: vec![format!(
            "groups:\n    - {{ id: office, agent_password: {OFFICE_SECRET}, users: [{{ username: alice, password: alice-pw }}] }}\n    - {{ id: lab, agent_password: lab-secret, users: [{{ username: bob, password: bob-pw }}] }}"
        )],
        ..StackOptions::default()
    })
    .await
}

/// Waits until the gateway logged `needle`.
async fn wait_for_gateway_log(stack: &Stack, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stack.log("gateway").contains(needle) {
        assert!(
            Instant::now() < deadline,
            "gateway never logged {needle:?}:\n{}",
            stack.log("gateway")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_accounts_reach_only_their_groups_agents() {
    let stack = stack().await;
    let target = http_target().await;
    let url = format!("http://127.0.0.1:{}/", target.port());
    let _office = stack.spawn_group_agent("office-1", "office", OFFICE_SECRET, "");
    wait_for_gateway_log(&stack, "group=office").await;

    // alice is bound to office, whose agent may reach loopback.
    let (code, body) = curl(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
    // The listener's own account goes to the default group, whose agent refuses it.
    assert_eq!(curl_status(&["-x", &stack.http_proxy(), &url]).await, "403");
    // bob's group has no agent: 503 with the reason, SOCKS general failure.
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("bob", "bob-pw"), &url]).await,
        "503"
    );
    let (_, body) = curl(&["-x", &stack.http_proxy_as("bob", "bob-pw"), &url]).await;
    assert!(
        String::from_utf8_lossy(&body).contains("no live agent in group \"lab\""),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let socks = stack.socks5_as("bob", "bob-pw", target).await;
    assert_eq!(socks.err(), Some(Socks5Refusal::Reply(0x01)));
    let socks = socks5_stream(
        stack.socks_port,
        "alice",
        "alice-pw",
        "localhost",
        target.port(),
    )
    .await;
    assert!(socks.is_ok(), "alice through SOCKS5: {:?}", socks.err());
    // Wrong passwords are still wrong.
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("alice", "bob-pw"), &url]).await,
        "407"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_the_wrong_group_secret_is_refused() {
    let stack = stack().await;
    let target = http_target().await;
    let url = format!("http://127.0.0.1:{}/", target.port());
    let _impostor = stack.spawn_group_agent("impostor", "office", "lab-secret", "");
    wait_for_gateway_log(&stack, "agent authentication failed").await;
    assert!(!stack.log("gateway").contains("group=office"));
    // With no office agent, alice is not served by anyone else.
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await,
        "503"
    );
}

/// Accepts connections and holds them open, answering one byte so the client knows.
async fn holding_target() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"!").await;
                let mut sink = [0u8; 64];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_agents_share_connections_and_capacity_refusals_move_on() {
    let stack = stack().await;
    let hold = holding_target().await;
    // One agent takes a single connection at a time, the other many.
    let _small = stack.spawn_group_agent(
        "office-small",
        "office",
        OFFICE_SECRET,
        "  max_concurrent_conns: 1\n",
    );
    let _big = stack.spawn_group_agent("office-big", "office", OFFICE_SECRET, "");
    wait_for_gateway_log(&stack, "client_id=office-small").await;
    wait_for_gateway_log(&stack, "client_id=office-big").await;

    // Ten long-lived connections: every one must open, although picks that land on the
    // full agent are refused with RATE_LIMITED and must move on to the other.
    let mut held = Vec::new();
    for i in 0..10 {
        let mut s = socks5_stream(
            stack.socks_port,
            "alice",
            "alice-pw",
            "127.0.0.1",
            hold.port(),
        )
        .await
        .unwrap_or_else(|e| panic!("connection {i} refused: {e:?}\n{}", stack.log("gateway")));
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.unwrap();
        held.push(s);
    }
    // Both agents carried connections.
    let small = std::fs::read_to_string(stack.certs.dir.path().join("office-small.log")).unwrap();
    assert!(
        small.contains("agent is at max_concurrent_conns"),
        "the small agent was never asked beyond its capacity:\n{small}"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let big = std::fs::read_to_string(stack.certs.dir.path().join("office-big.log")).unwrap();
        let small =
            std::fs::read_to_string(stack.certs.dir.path().join("office-small.log")).unwrap();
        let (b, s) = (
            big.matches("result=\"ok\"").count() + big.matches("result=ok").count(),
            small.matches("result=\"ok\"").count() + small.matches("result=ok").count(),
        );
        if b + s == 10 {
            assert!(b >= 1 && s == 1, "big {b}, small {s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "access lines: big {b}, small {s}\n{big}\n{small}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_separate_sessions_that_share_the_load() {
    let stack = stack().await;
    let hold = holding_target().await;
    let _agent = stack.spawn_group_agent("office-r", "office", OFFICE_SECRET, "  replicas: 3\n");
    for i in 0..3 {
        wait_for_gateway_log(&stack, &format!("client_id=office-r.{i}")).await;
    }
    // Held at once, the least-loaded pick spreads them over the three sessions.
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = socks5_stream(
            stack.socks_port,
            "alice",
            "alice-pw",
            "127.0.0.1",
            hold.port(),
        )
        .await
        .expect("connect");
        let mut first = [0u8; 1];
        s.read_exact(&mut first).await.unwrap();
        held.push(s);
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = stack.log("gateway");
        let per_session: Vec<usize> = (0..3)
            .map(|i| {
                log.lines()
                    .filter(|l| l.contains("proto=\"socks5\"") || l.contains("proto=socks5"))
                    .filter(|l| l.contains(&format!("via=office-r.{i} ")))
                    .count()
            })
            .collect();
        if per_session.iter().sum::<usize>() == 6 {
            assert_eq!(per_session, vec![2, 2, 2], "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "{per_session:?}\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
