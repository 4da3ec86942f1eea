//! The PROXY protocol on the gateway's listeners (`proxy_protocol: true`, trusted by
//! `gateway.trusted_proxies`), through the real binaries: a real HAProxy in front of
//! the proxies (v2 and v1, with health checks), and hand-written headers for what a
//! balancer would never send: a header from an untrusted address, none at all, forged
//! clients that per-address caps must tell apart. The access log must name the client
//! the header named.
//!
//! 127.0.0.0/8 is all local on Linux, so a client bound to 127.0.0.5 reaches HAProxy on
//! 127.0.0.1 from another address than HAProxy's own toward the gateway.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine;
use common::haproxy::HaProxy;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The address the hand-written "balancer" connects from; the tests trust only it.
const LB: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);

fn pp_options(trusted: &str, gateway_extra: &[String]) -> StackOptions {
    let mut extra = vec![format!("trusted_proxies: [\"{trusted}\"]")];
    extra.extend_from_slice(gateway_extra);
    StackOptions {
        listener_extra: vec!["proxy_protocol: true".into()],
        gateway_extra: extra,
        ..Default::default()
    }
}

/// A TCP connection to 127.0.0.1:`port` from `from`.
async fn connect_from(from: Ipv4Addr, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .unwrap()
}

/// A PROXY v2 header (PROXY command, TCP over IPv4) naming `client`.
fn v2_header(client: SocketAddr, server_port: u16) -> Vec<u8> {
    let SocketAddr::V4(client) = client else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend(client.ip().octets());
    h.extend([127, 0, 0, 1]);
    h.extend(client.port().to_be_bytes());
    h.extend(server_port.to_be_bytes());
    h
}

/// Sends `prefix` and a CONNECT to `target` as the stack's HTTP user; returns the status
/// line and the stream (open when it was 200).
async fn connect_with(mut s: TcpStream, prefix: &[u8], target: SocketAddr) -> (String, TcpStream) {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{HTTP_USER}:{HTTP_PASS}"));
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {token}\r\n\r\n"
    );
    s.write_all(&[prefix, req.as_bytes()].concat())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match s.read_u8().await {
            Ok(b) => head.push(b),
            Err(_) => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    (head.lines().next().unwrap_or("").to_owned(), s)
}

/// Whether the gateway closed `s` (EOF or reset) without answering, within a bound.
async fn closed_without_answer(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the gateway neither answered nor closed"),
    }
}

async fn scrape(port: u16) -> String {
    let (status, body) = admin_get(port, "/metrics", None).await;
    assert_eq!(status, "200");
    body
}

fn refused(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        "anyproxy_gateway_proxy_protocol_refused_total",
        &[("reason", reason)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_v2_and_v1_carry_the_real_client_to_the_access_log() {
    let stack = Stack::start(pp_options("127.0.0.1/32", &[])).await;
    let target = http_target().await;
    let (v2_http, v1_http, v2_socks) = (free_port(), free_port(), free_port());
    let server =
        |port: u16, send: &str| format!("server gw 127.0.0.1:{port} {send} check inter 500ms");
    let haproxy = HaProxy::start(&[
        (v2_http, server(stack.http_port, "send-proxy-v2")),
        (v1_http, server(stack.http_port, "send-proxy")),
        (v2_socks, server(stack.socks_port, "send-proxy-v2")),
    ])
    .await;
    let url = format!("http://{target}/");

    // v2, absolute-form through the HTTP proxy.
    let via = |port: u16| format!("http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{port}");
    let status = curl_status(&["--interface", "127.0.0.5", "-x", &via(v2_http), &url]).await;
    assert_eq!(status, "200", "{}\n{}", stack.log("gateway"), haproxy.log());
    stack.wait_for_log("gateway", "client=127.0.0.5:", 1).await;

    // v1, a CONNECT tunnel.
    let status =
        curl_connect_status(&["--interface", "127.0.0.6", "-x", &via(v1_http), &url]).await;
    assert_eq!(status, "200", "{}", stack.log("gateway"));
    stack.wait_for_log("gateway", "client=127.0.0.6:", 1).await;

    // v2 in front of SOCKS5.
    let socks = format!("{SOCKS_USER}:{SOCKS_PASS}@127.0.0.1:{v2_socks}");
    let status = curl_status(&[
        "--interface",
        "127.0.0.7",
        "--socks5-hostname",
        &socks,
        &url,
    ])
    .await;
    assert_eq!(status, "200", "{}", stack.log("gateway"));
    stack.wait_for_log("gateway", "client=127.0.0.7:", 1).await;

    let log = stack.log("gateway");
    // Each line served for the client names it, and the balancer it came through.
    assert!(
        log.lines()
            .any(|l| l.contains("peer=127.0.0.5:") && l.contains("proxied_by=127.0.0.1:")),
        "{log}"
    );
    // HAProxy's own health checks (LOCAL in v2) are never refused; the only refusals
    // are the test harness's own readiness probes (connect, then close at once).
    for wrong in ["no PROXY protocol header", "malformed PROXY", "untrusted"] {
        assert!(!log.contains(wrong), "{wrong}: {log}");
    }
    // Never the balancer's address as the client of a request.
    assert!(
        !log.lines()
            .any(|l| l.contains("access") && l.contains("client=127.0.0.1:")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_senders_and_missing_headers_are_refused_with_a_reason() {
    let admin_port = free_port();
    let stack = Stack::start(pp_options(
        &format!("{LB}/32"),
        &[format!("admin_addr: \"127.0.0.1:{admin_port}\"")],
    ))
    .await;
    let target = http_target().await;
    let forged = v2_header("203.0.113.7:4242".parse().unwrap(), stack.http_port);

    // From 127.0.0.1, which is not trusted: refused, header or not.
    let (status, s) = connect_with(
        TcpStream::connect(("127.0.0.1", stack.http_port))
            .await
            .unwrap(),
        &forged,
        target,
    )
    .await;
    assert_eq!(status, "", "refused without an answer");
    drop(s);
    stack
        .wait_for_log("gateway", "PROXY header from an untrusted address", 1)
        .await;
    let url = format!("http://{target}/");
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy(), &url]).await,
        "000",
        "curl is refused too"
    );

    // From the trusted balancer, but no header: refused.
    let lb = LB.to_string();
    let direct = format!(
        "http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{}",
        stack.http_port
    );
    assert_eq!(
        curl_status(&["--interface", &lb, "-x", &direct, &url]).await,
        "000"
    );
    stack
        .wait_for_log("gateway", "no PROXY protocol header", 1)
        .await;
    // A malformed one: refused too, and closes only that connection.
    let mut bad = connect_from(LB, stack.socks_port).await;
    bad.write_all(b"PROXY TCP4 203.0.113.7 nope 1 2\r\n\x05\x01\x00")
        .await
        .unwrap();
    assert!(closed_without_answer(bad).await);
    stack.wait_for_log("gateway", "malformed PROXY v1", 1).await;

    // The same balancer with a header is served, as the client it names.
    let (status, _held) =
        connect_with(connect_from(LB, stack.http_port).await, &forged, target).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let metrics = scrape(admin_port).await;
    assert!(refused(&metrics, "untrusted") >= 2.0, "{metrics}");
    assert!(refused(&metrics, "missing") >= 1.0, "{metrics}");
    assert!(refused(&metrics, "malformed") >= 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_caps_count_the_client_the_header_names() {
    let stack = Stack::start(pp_options(
        &format!("{LB}/32"),
        &["limits:\n    per_ip: { max_concurrent: 1 }".into()],
    ))
    .await;
    let target = http_target().await;
    let one: SocketAddr = "198.51.100.1:1111".parse().unwrap();
    let two: SocketAddr = "198.51.100.2:2222".parse().unwrap();
    let port = stack.http_port;

    let (status, held) =
        connect_with(connect_from(LB, port).await, &v2_header(one, port), target).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // The same client again, through the same balancer: its one place is taken.
    let (status, _) =
        connect_with(connect_from(LB, port).await, &v2_header(one, port), target).await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    stack
        .wait_for_log(
            "gateway",
            "address 198.51.100.1 has 1 connections open (limit 1)",
            1,
        )
        .await;
    // Another client behind the same balancer has a place of its own.
    let (status, held_two) =
        connect_with(connect_from(LB, port).await, &v2_header(two, port), target).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // Access lines (written when a tunnel ends) name the clients, never the balancer.
    drop((held, held_two));
    // 198.51.100.1: its refusal and its tunnel; 198.51.100.2: its tunnel.
    for (client, lines) in [
        ("client=198.51.100.1:1111", 2),
        ("client=198.51.100.2:2222", 1),
    ] {
        stack.wait_for_log("gateway", client, lines).await;
    }
    let log = stack.log("gateway");
    assert!(!log.contains(&format!("client={LB}:")), "{log}");
}

/// Sends a v1 header naming `client` and a GET over a forward on `port`; the target
/// must answer.
async fn get_through_forward(port: u16, client: SocketAddr, target: SocketAddr) {
    let mut s = connect_from(LB, port).await;
    let mut req = format!(
        "PROXY TCP4 {} 127.0.0.1 {} {port}\r\n",
        client.ip(),
        client.port()
    )
    .into_bytes();
    req.extend(format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").bytes());
    s.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
        .await
        .expect("the forward answers")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Dropping `s` ends the relay both ways, and the access line is written.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_and_agent_forwards_take_the_header_too() {
    let target = http_target().await;
    let (declared, agents) = (free_port(), free_port());
    let mut opts = pp_options(
        &format!("{LB}/32"),
        &[
            format!("forwards:\n    - {{ listen_addr: \"127.0.0.1:{declared}\", target: \"{target}\", proxy_protocol: true }}"),
            format!("agent_forwards: {{ bind: 127.0.0.1, ports: \"{agents}-{agents}\", proxy_protocol: true }}"),
        ],
    );
    opts.client_extra = vec![format!(
        "open_ports:\n    - {{ remote_port: {agents}, target: \"{target}\" }}"
    )];
    let stack = Stack::start(opts).await;
    wait_for_port(declared).await;
    stack.wait_for_log("agent", "gateway forward open", 1).await;

    let one: SocketAddr = "198.51.100.20:2020".parse().unwrap();
    get_through_forward(declared, one, target).await;
    stack
        .wait_for_log("gateway", &format!("client={one}"), 1)
        .await;
    let two: SocketAddr = "198.51.100.21:2121".parse().unwrap();
    get_through_forward(agents, two, target).await;
    stack
        .wait_for_log("gateway", &format!("client={two}"), 1)
        .await;
    // Without a header, the agent forward refuses too.
    let mut plain = connect_from(LB, agents).await;
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed_without_answer(plain).await);
    stack
        .wait_for_log("gateway", "no PROXY protocol header", 1)
        .await;
    assert!(stack.log("gateway").lines().any(
        |l| l.contains("listener=\"agent forward\"") && l.contains("no PROXY protocol header")
    ));
}
