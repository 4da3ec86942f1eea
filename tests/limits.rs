//! `gateway.limits` through the real binaries and real curl: connection caps per user
//! and per address, the proxy-auth lockout, bandwidth caps. Each limit is shown to
//! trigger (with its reason, status and metric) and to recover.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a limit may take to let go (a closed connection's relay ending, a
/// lockout or a token bucket running out): generous, as only the upper bound is
/// checked and the machine may be busy.
const RECOVERY: Duration = Duration::from_secs(15);

/// Retries `attempt` until it returns true, failing after [`RECOVERY`].
async fn recovers<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + RECOVERY;
    while !attempt().await {
        assert!(Instant::now() < deadline, "{what} never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn limits(lines: &str) -> String {
    format!("limits:\n{lines}")
}

fn admin(port: u16) -> String {
    format!("admin_addr: \"127.0.0.1:{port}\"")
}

async fn scrape(port: u16) -> String {
    let (status, body) = admin_get(port, "/metrics", None).await;
    assert_eq!(status, "200");
    body
}

/// Opens a CONNECT tunnel through the HTTP front end as the stack's HTTP user and
/// returns it open, after the proxy's `200`.
async fn hold_connect(stack: &Stack, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .unwrap();
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{HTTP_USER}:{HTTP_PASS}"));
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_concurrent_cap_refuses_the_next_connection_and_recovers() {
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![limits("    per_user: { max_concurrent: 2 }")],
        ..Default::default()
    })
    .await;
    let target = http_target().await;

    // SOCKS5: the third connection of one user gets general failure (0x01).
    let first = stack.socks5_to(target).await.unwrap();
    let _second = stack.socks5_to(target).await.unwrap();
    assert_eq!(
        stack.socks5_to(target).await.err(),
        Some(Socks5Refusal::Reply(0x01))
    );
    stack
        .wait_for_log("gateway", "user suser has 2 connections open (limit 2)", 1)
        .await;
    assert!(stack.log("gateway").contains("RATE_LIMITED"));

    // The HTTP user is another user: their own two places, then 429 with the reason.
    let held = hold_connect(&stack, target).await;
    let _also = hold_connect(&stack, target).await;
    let url = format!("http://{target}/");
    let (status, body) = curl_status_body(&["-x", &stack.http_proxy(), &url]).await;
    assert_eq!(status, "429", "{body}");
    assert!(
        body.contains("user huser has 2 connections open (limit 2)"),
        "{body}"
    );

    // Closing a connection gives its place back.
    drop(first);
    recovers("the SOCKS5 user's cap", || async {
        stack.socks5_to(target).await.is_ok()
    })
    .await;
    drop(held);
    recovers("the HTTP user's cap", || async {
        curl_status(&["-x", &stack.http_proxy(), &url]).await == "200"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_rate_allows_a_burst_then_refuses_then_recovers() {
    let admin_port = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            limits("    per_ip: { rate: 0.5, burst: 3 }"),
            admin(admin_port),
        ],
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let url = format!("http://{target}/");

    // One token every two seconds: ten requests in a row must run out, and not before
    // the burst of three (whatever the machine's speed, refills only add).
    let mut served = 0;
    let mut refusal = None;
    for _ in 0..10 {
        let (status, body) = curl_status_body(&["-x", &stack.http_proxy(), &url]).await;
        if status == "200" {
            served += 1;
        } else {
            refusal = Some((status, body));
            break;
        }
    }
    let (status, body) = refusal.expect("ten requests in a row were all served");
    assert!(served >= 3, "only {served} served before a refusal");
    assert_eq!(status, "429", "{body}");
    assert!(
        body.contains("address 127.0.0.1 opens connections faster than 0.5/s (burst 3)"),
        "{body}"
    );

    // The address is limited on every front end: SOCKS5 runs out the same way.
    let mut socks_refused = false;
    for _ in 0..5 {
        if stack.socks5_to(target).await.err() == Some(Socks5Refusal::Reply(0x01)) {
            socks_refused = true;
            break;
        }
    }
    assert!(socks_refused, "SOCKS5 was never refused");

    let metrics = scrape(admin_port).await;
    assert!(
        metric(
            &metrics,
            "anyproxy_limit_refused_total",
            &[("kind", "ip_rate")]
        ) >= 2.0
    );
    assert!(
        metric(
            &metrics,
            "anyproxy_gateway_connections_failed_total",
            &[("reason", "rate_limited")]
        ) >= 2.0,
        "{metrics}"
    );

    recovers("the address's rate", || async {
        curl_status(&["-x", &stack.http_proxy(), &url]).await == "200"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_proxy_passwords_lock_the_address_out_for_a_while() {
    let admin_port = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            limits("    proxy_auth: { max_failures: 5, window: 1m, lockout: 4s }"),
            admin(admin_port),
        ],
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let url = format!("http://{target}/");
    let wrong = format!("http://{HTTP_USER}:nope@127.0.0.1:{}", stack.http_port);

    // No credentials at all is a question, not a failure (browsers ask first).
    let open = format!("http://127.0.0.1:{}", stack.http_port);
    assert_eq!(curl_status(&["-x", &open, &url]).await, "407");
    for i in 0..5 {
        assert_eq!(
            curl_status(&["-x", &wrong, &url]).await,
            "407",
            "attempt {i}"
        );
    }

    // Locked: even the right password is refused, without being checked.
    let (status, body) = curl_status_body(&["-x", &stack.http_proxy(), &url]).await;
    assert_eq!(status, "429", "{body}");
    assert!(
        body.contains("too many failed proxy authentications"),
        "{body}"
    );
    assert_eq!(
        stack.socks5_to(target).await.err(),
        Some(Socks5Refusal::Auth(1))
    );

    let metrics = scrape(admin_port).await;
    let value = |name: &str| metric(&metrics, name, &[]);
    assert_eq!(
        value("anyproxy_proxy_auth_failures_total"),
        5.0,
        "{metrics}"
    );
    assert_eq!(value("anyproxy_proxy_auth_lockouts_total"), 1.0);
    assert_eq!(value("anyproxy_proxy_auth_locked_addresses"), 1.0);
    assert!(value("anyproxy_proxy_auth_refused_locked_total") >= 2.0);

    // After the lockout the right password works again, on both front ends.
    recovers("the lockout", || async {
        curl_status(&["-x", &stack.http_proxy(), &url]).await == "200"
    })
    .await;
    assert!(stack.socks5_to(target).await.is_ok());
    let metrics = scrape(admin_port).await;
    assert_eq!(
        metric(&metrics, "anyproxy_proxy_auth_locked_addresses", &[]),
        0.0
    );
}

const OFFICE_SECRET: &str = "office-agent-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_bandwidth_cap_slows_its_users_and_no_one_else() {
    let admin_port = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!(
                "groups:\n    - {{ id: office, agent_password: {OFFICE_SECRET}, users: [{{ username: alice, password: alice-pw }}] }}"
            ),
            limits("    bandwidth: { per_group: { office: 2MiB/s } }"),
            admin(admin_port),
        ],
        ..Default::default()
    })
    .await;
    let _office = stack.spawn_group_agent("office-1", "office", OFFICE_SECRET, "");
    stack.wait_for_log("gateway", "group=office", 1).await;
    let target = http_target().await;

    const CAPPED: usize = 4 << 20;
    const FREE: usize = 2 << 20;
    let alice = format!("http://alice:alice-pw@127.0.0.1:{}", stack.http_port);
    let capped_url = format!("http://{target}/bytes/{CAPPED}");
    let free_url = format!("http://{target}/bytes/{FREE}");
    let started = Instant::now();
    let capped = async {
        let (code, body) = curl(&["-x", &alice, &capped_url]).await;
        (code, body.len(), started.elapsed())
    };
    let free = async {
        let (code, body) = curl(&["-x", &stack.http_proxy(), &free_url]).await;
        (code, body.len(), started.elapsed())
    };
    let ((code, len, capped_took), (free_code, free_len, free_took)) = tokio::join!(capped, free);
    assert_eq!((code, len), (0, CAPPED));
    assert_eq!((free_code, free_len), (0, FREE));
    eprintln!("capped download took {capped_took:?}, uncapped {free_took:?}");
    // 4 MiB at 2 MiB/s with a tenth of a second of burst: about 1.9 s. A lower bound
    // the budget implies (a slower machine only takes longer), not a timing guess.
    assert!(
        capped_took >= Duration::from_millis(1500),
        "capped download took {capped_took:?}"
    );
    let paced =
        |metrics: &str| metric(metrics, "anyproxy_limit_paced_total", &[("scope", "group")]);
    let paced_before = paced(&scrape(admin_port).await);
    assert!(paced_before > 0.0, "office's budget paced its user");
    // The default group's user shares no budget with office: alone, its download
    // waits for no budget at all.
    let (free_code, free_len) = {
        let (code, body) = curl(&["-x", &stack.http_proxy(), &free_url]).await;
        (code, body.len())
    };
    assert_eq!((free_code, free_len), (0, FREE));
    let metrics = scrape(admin_port).await;
    assert_eq!(paced(&metrics), paced_before, "the uncapped user was paced");
    assert_eq!(
        metric(&metrics, "anyproxy_limit_paced_total", &[("scope", "user")]),
        0.0
    );
}
