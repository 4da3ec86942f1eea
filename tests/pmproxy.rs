//! `anyproxy pmproxy`, the standalone policy proxy, through the real binary and curl:
//! rules allow and deny, and a `parentProxy` the rules reach carries the request on
//! (here: through an anyproxy gateway and its agent).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_proxy_allows_denies_and_chains_through_a_parent_proxy() {
    let direct = http_target().await;
    let blocked = http_target().await;
    let chained = http_target().await;
    // The parent proxy: a gateway's HTTP front end, whose agent reaches loopback.
    let stack = Stack::start(StackOptions::default()).await;

    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, api_port) = (free_port(), free_port());
    let managers = format!(
        r#"
rules = "¬blocked ∧ (¬tunnelled ∨ gateway)"

[[hostMatcher]]
name = "blocked"
pattern = ':{blocked}$'

[[hostMatcher]]
name = "tunnelled"
pattern = ':{chained}$'

[[parentProxy]]
name = "gateway"
proxyURL = "http://{user}:{pass}@127.0.0.1:{gw}"
"#,
        blocked = blocked.port(),
        chained = chained.port(),
        user = HTTP_USER,
        pass = HTTP_PASS,
        gw = stack.http_port,
    );
    std::fs::write(dir.path().join("managers.toml"), managers).unwrap();
    let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
        .replace("127.0.0.1:4443", &format!("127.0.0.1:{api_port}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{proxy_port}"));
    // The targets here are on loopback, which the default forbids; keep the name
    // `localhost` and one other loopback address forbidden to see the check work.
    let default_forbidden = server
        .lines()
        .find(|l| l.trim_start().starts_with("forbiddenHosts"))
        .expect("the default server.toml lists forbiddenHosts")
        .to_string();
    let server = server.replace(
        &default_forbidden,
        r#"	forbiddenHosts = ["localhost", "127.0.0.2/32"]"#,
    );
    std::fs::write(dir.path().join("server.toml"), server).unwrap();
    let log = dir.path().join("pmproxy.log");
    let _pmproxy = spawn(
        &["pmproxy", "--config-dir", dir.path().to_str().unwrap()],
        &log,
    );
    wait_for_port(proxy_port).await;
    let proxy = format!("http://127.0.0.1:{proxy_port}");

    // Allowed, dialed directly.
    let (code, body) = curl(&["-x", &proxy, &format!("http://{direct}/")]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
    // Forbidden egress: by name (the policy API's own port), and by address.
    for (url, why) in [
        (
            format!("http://localhost:{api_port}/"),
            "is a forbidden host",
        ),
        (
            format!("http://127.0.0.2:{}/", direct.port()),
            "is in a forbidden network",
        ),
    ] {
        let (_, body) = curl(&["-x", &proxy, &url]).await;
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.starts_with("403") && body.contains(why),
            "{url}: {body}"
        );
    }
    // Denied by the rule, with the reason.
    let (_, body) = curl(&["-x", &proxy, &format!("http://{blocked}/")]).await;
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("403"), "{body}");
    assert!(body.contains("denied by policy"), "{body}");
    // Reaches `gateway`: leaves through the parent proxy, i.e. the tunnel.
    let (code, body) = curl(&["-x", &proxy, &format!("http://{chained}/bytes/100000")]).await;
    assert_eq!(code, 0);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(100_000, 7)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!(":{}", chained.port());
    while !stack
        .log("gateway")
        .lines()
        .any(|l| l.contains("access") && l.contains(&needle))
    {
        assert!(
            Instant::now() < deadline,
            "the chained request never reached the gateway:\n{}",
            stack.log("gateway")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The direct request did not go through the gateway.
    assert!(!stack
        .log("gateway")
        .contains(&format!(":{}", direct.port())));
}

/// The manual's srvConf: `readTimeout` and `writeTimeout` bound stalled connections on
/// the proxy listener. A CONNECT tunnel on which nothing moves for `readTimeout` is
/// closed, and the access line says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tunnel_is_closed_after_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, api_port) = (free_port(), free_port());
    std::fs::write(dir.path().join("managers.toml"), "rules = \"true\"\n").unwrap();
    let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
        .replace("127.0.0.1:4443", &format!("127.0.0.1:{api_port}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{proxy_port}"))
        .replace("readTimeout = \"30s\"", "readTimeout = \"1s\"");
    let forbidden = server
        .lines()
        .find(|l| l.trim_start().starts_with("forbiddenHosts"))
        .expect("the default server.toml lists forbiddenHosts")
        .to_string();
    let server = server.replace(&forbidden, "\tforbiddenHosts = []");
    std::fs::write(dir.path().join("server.toml"), server).unwrap();
    let log = dir.path().join("pmproxy.log");
    let _pmproxy = spawn(
        &["pmproxy", "--config-dir", dir.path().to_str().unwrap()],
        &log,
    );
    wait_for_port(proxy_port).await;

    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
        .await
        .unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "the proxy answered");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    // Then nothing moves: closed after readTimeout (bounded, generous wait).
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "a stalled tunnel must be closed");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reason=\"idle timeout\"")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
