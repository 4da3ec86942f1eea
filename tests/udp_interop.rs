//! The Python agent written from the API document alone (`tests/interop/doc_agent.py`)
//! serves a UDP `connect` (`"protocol": "udp"`, one datagram per `data`) through our
//! gateway: DNS through SOCKS5 UDP ASSOCIATE, by address and by name.

mod common;

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::udp::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_document_agent_serves_udp_flows() {
    let stack = Stack::start(StackOptions {
        with_agent: false,
        ..Default::default()
    })
    .await;
    let dir = stack.certs.dir.path().to_path_buf();
    let out = dir.join("doc_agent.out");
    let root = env!("CARGO_MANIFEST_DIR");
    let port = stack.gateway_port;
    let _agent = tokio::process::Command::new("python3")
        .arg("-u")
        .arg(format!("{root}/tests/interop/doc_agent.py"))
        .args(["--url", &format!("wss://localhost:{port}/ws")])
        .args(["--cafile", &stack.certs.cert.display().to_string()])
        .args(["--username", AGENT_USER, "--password", AGENT_PASS])
        .args(["--client-id", "py-udp"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join("doc_agent.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 must be installed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stack.log("gateway").contains("agent connected") {
        assert!(
            Instant::now() < deadline,
            "the Python agent never connected:\n{}\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(dir.join("doc_agent.err")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = Ipv4Addr::new(10, 9, 8, 7);
    let dns = dns_server(answer).await;
    let a = Association::open(stack.socks_port, SOCKS_USER, SOCKS_PASS)
        .await
        .expect("UDP ASSOCIATE accepted");
    assert_eq!(
        a.resolve(&Dest::Addr(dns.addr), 1, "a.internal").await,
        Some(answer)
    );
    let by_name = Dest::Name("localhost".into(), dns.addr.port());
    assert_eq!(a.resolve(&by_name, 2, "b.internal").await, Some(answer));
    // Datagram boundaries hold both ways: an echo of sizes up to 60,000 bytes. (Not
    // an empty one: Python's asyncio silently skips `sendto(b"")`.)
    let echo = echo_server().await;
    for len in [1usize, 1400, 9000, 60_000] {
        let d = pattern(len, len as u64);
        let mut back = None;
        for _ in 0..3 {
            a.send(&Dest::Addr(echo.addr), &d).await;
            if let Some((_, got)) = a.recv(Duration::from_secs(5)).await {
                back = Some(got);
                break;
            }
        }
        assert_eq!(back.as_deref(), Some(&d[..]), "a {len}-byte datagram");
    }
}
