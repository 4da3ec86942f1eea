//! End to end: the real `anyproxy` binary (gateway + agent processes) on loopback,
//! driven with real curl and a raw SOCKS5 client.

mod common;

use std::time::Duration;

use common::*;

async fn http_body(args: &[&str]) -> String {
    let (code, out) = curl(args).await;
    assert_eq!(code, 0, "curl {args:?} failed");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_and_socks5_reach_targets_through_the_agent() {
    let stack = Stack::start(StackOptions::default()).await;
    let plain = http_target().await;
    let tls = https_target(&stack.certs).await;
    let proxy = stack.http_proxy();
    let cacert = stack.certs.cert.to_str().unwrap();

    // Absolute-form forwarding, and CONNECT to plain HTTP.
    assert_eq!(
        http_body(&["-x", &proxy, &format!("http://{plain}/")]).await,
        "hello"
    );
    assert_eq!(
        http_body(&["-p", "-x", &proxy, &format!("http://{plain}/")]).await,
        "hello"
    );
    // https:// through CONNECT, to a TLS server verified end to end by curl.
    let url = format!("https://localhost:{}/", tls.port());
    assert_eq!(
        http_body(&["--cacert", cacert, "-x", &proxy, &url]).await,
        "hello"
    );
    // SOCKS5 with an IP target, and with the name resolved by the agent.
    let socks = stack.socks_auth();
    assert_eq!(
        http_body(&["--socks5", &socks, &format!("http://{plain}/")]).await,
        "hello"
    );
    let by_name = format!("http://localhost:{}/", plain.port());
    assert_eq!(
        http_body(&["--socks5-hostname", &socks, &by_name]).await,
        "hello"
    );
    // Keep-alive: two URLs on one curl invocation reuse the proxy connection.
    let two = http_body(&[
        "-x",
        &proxy,
        &format!("http://{plain}/"),
        &format!("http://{plain}/"),
    ])
    .await;
    assert_eq!(two, "hellohello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_bodies_arrive_byte_identical_both_ways() {
    let stack = Stack::start(StackOptions::default()).await;
    sixty_four_mib_both_ways(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deflate_sessions_carry_sixty_four_mib_byte_identical_in_both_encodings() {
    for encoding in ["binary", "json"] {
        let deflate = vec!["deflate: { enabled: true }".to_string()];
        let stack = Stack::start(StackOptions {
            encoding,
            gateway_extra: deflate.clone(),
            client_extra: deflate,
            ..StackOptions::default()
        })
        .await;
        let log = stack.log("gateway");
        let line = log
            .lines()
            .find(|l| l.contains("agent connected"))
            .unwrap_or_default();
        assert!(
            line.contains(&format!("encoding=\"{encoding}\""))
                || line.contains(&format!("encoding={encoding}")),
            "{line}"
        );
        assert!(line.contains("deflate=true"), "{line}");
        sixty_four_mib_both_ways(&stack).await;
    }
}

/// Downloads (absolute-form HTTP, HTTPS via CONNECT, SOCKS5) and uploads 64 MiB through
/// the stack and checks every byte.
async fn sixty_four_mib_both_ways(stack: &Stack) {
    let plain = http_target().await;
    let tls = https_target(&stack.certs).await;
    let proxy = stack.http_proxy();
    let cacert = stack.certs.cert.to_str().unwrap();
    const N: usize = 64 << 20;
    let expected = sha256_hex(&pattern(N, 7));

    // Download: absolute-form HTTP and HTTPS via CONNECT and SOCKS5.
    for args in [
        vec![
            "-x".to_string(),
            proxy.clone(),
            format!("http://{plain}/bytes/{N}"),
        ],
        vec![
            "--cacert".into(),
            cacert.into(),
            "-x".into(),
            proxy.clone(),
            format!("https://localhost:{}/bytes/{N}", tls.port()),
        ],
        vec![
            "--socks5-hostname".into(),
            stack.socks_auth(),
            format!("http://localhost:{}/bytes/{N}", plain.port()),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, body) = curl(&args).await;
        assert_eq!(code, 0);
        assert_eq!(body.len(), N, "{args:?}");
        assert_eq!(sha256_hex(&body), expected, "{args:?}");
    }

    // Upload: the target hashes what it received.
    let upload = stack.certs.dir.path().join("upload.bin");
    let data = pattern(N, 99);
    std::fs::write(&upload, &data).unwrap();
    let at = format!("@{}", upload.display());
    let sent_hash = sha256_hex(&data);
    let via_http = http_body(&[
        "-x",
        &proxy,
        "--data-binary",
        &at,
        &format!("http://{plain}/sha256"),
    ])
    .await;
    assert_eq!(via_http, sent_hash);
    let via_connect = http_body(&[
        "--cacert",
        cacert,
        "-x",
        &proxy,
        "--data-binary",
        &at,
        &format!("https://localhost:{}/sha256", tls.port()),
    ])
    .await;
    assert_eq!(via_connect, sent_hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_curl_sessions_all_succeed() {
    let stack = Stack::start(StackOptions::default()).await;
    let plain = http_target().await;
    let proxy = stack.http_proxy();
    let socks = stack.socks_auth();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let args: Vec<String> = match i % 3 {
            0 => vec![
                "-x".into(),
                proxy.clone(),
                format!("http://{plain}/bytes/{}", 1000 + i),
            ],
            1 => vec![
                "-p".into(),
                "-x".into(),
                proxy.clone(),
                format!("http://{plain}/bytes/{}", 1000 + i),
            ],
            _ => vec![
                "--socks5-hostname".into(),
                socks.clone(),
                format!("http://localhost:{}/bytes/{}", plain.port(), 1000 + i),
            ],
        };
        tasks.push(tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, body) = curl(&args).await;
            (code, body == pattern(1000 + i, 7))
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (code, same) = t.await.unwrap();
        if code == 0 && same {
            ok += 1;
        }
    }
    assert_eq!(ok, 200);
}

/// A raw SOCKS5 CONNECT; returns the reply code, or `Err` with the auth status byte.
async fn socks5_connect(
    port: u16,
    user: &str,
    pass: &str,
    host: &str,
    target_port: u16,
) -> Result<u8, u8> {
    match socks5_stream(port, user, pass, host, target_port).await {
        Ok(_) => Ok(0),
        Err(Socks5Refusal::Reply(code)) => Ok(code),
        Err(Socks5Refusal::Auth(status)) => Err(status),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_map_to_clear_statuses() {
    let forbidden = vec![
        "forbidden.example".to_string(),
        "*.blocked.example".to_string(),
        "127.0.0.2/32".to_string(),
        "::1/128".to_string(),
    ];
    let stack = Stack::start(StackOptions {
        forbidden_hosts: forbidden,
        ..Default::default()
    })
    .await;
    let plain = http_target().await;
    let proxy = stack.http_proxy();
    let closed_port = free_port();

    // Wrong or missing proxy credentials.
    let wrong = format!("http://{HTTP_USER}:nope@127.0.0.1:{}", stack.http_port);
    assert_eq!(
        curl_status(&["-x", &wrong, &format!("http://{plain}/")]).await,
        "407"
    );
    let anonymous = format!("http://127.0.0.1:{}", stack.http_port);
    assert_eq!(
        curl_status(&["-x", &anonymous, &format!("http://{plain}/")]).await,
        "407"
    );
    assert_eq!(
        socks5_connect(stack.socks_port, SOCKS_USER, "nope", "localhost", 1).await,
        Err(1)
    );

    // Forbidden by name, by wildcard, by CIDR, and by a name resolving into a forbidden
    // network (localhost resolves to ::1 here, or the rule below catches 127.0.0.2).
    for url in [
        "http://forbidden.example/".to_string(),
        "http://a.blocked.example/".to_string(),
        format!("http://127.0.0.2:{}/", plain.port()),
        format!("http://[::ffff:127.0.0.2]:{}/", plain.port()),
    ] {
        assert_eq!(curl_status(&["-x", &proxy, &url]).await, "403", "{url}");
    }
    assert_eq!(
        curl_connect_status(&["-x", &proxy, "http://forbidden.example/"]).await,
        "403"
    );
    assert_eq!(
        socks5_connect(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "forbidden.example",
            80
        )
        .await,
        Ok(0x02)
    );
    assert_eq!(
        socks5_connect(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "127.0.0.2",
            plain.port()
        )
        .await,
        Ok(0x02)
    );

    // A closed port is refused by the target.
    let refused = format!("http://127.0.0.1:{closed_port}/");
    assert_eq!(curl_status(&["-x", &proxy, &refused]).await, "502");
    assert_eq!(curl_connect_status(&["-x", &proxy, &refused]).await, "502");
    assert_eq!(
        socks5_connect(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "127.0.0.1",
            closed_port
        )
        .await,
        Ok(0x05)
    );
    // The session survived all of it.
    assert_eq!(
        http_body(&["-x", &proxy, &format!("http://{plain}/")]).await,
        "hello"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_resolving_into_a_forbidden_network_is_refused() {
    // localhost resolves to 127.0.0.1 (and maybe ::1); both are forbidden here.
    let stack = Stack::start(StackOptions {
        forbidden_hosts: vec!["127.0.0.0/8".into(), "::1/128".into()],
        ..Default::default()
    })
    .await;
    let plain = http_target().await;
    let url = format!("http://localhost:{}/", plain.port());
    assert_eq!(curl_status(&["-x", &stack.http_proxy(), &url]).await, "403");
    assert_eq!(
        socks5_connect(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "localhost",
            plain.port()
        )
        .await,
        Ok(0x02)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_gives_503_and_socks_general_failure() {
    let stack = Stack::start(StackOptions {
        with_agent: false,
        ..Default::default()
    })
    .await;
    let plain = http_target().await;
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy(), &format!("http://{plain}/")]).await,
        "503"
    );
    assert_eq!(
        socks5_connect(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "localhost",
            plain.port()
        )
        .await,
        Ok(0x01)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_carries_traffic_too() {
    let stack = Stack::start(StackOptions {
        encoding: "json",
        ..Default::default()
    })
    .await;
    assert!(
        stack.log("gateway").contains("encoding=\"json\""),
        "{}",
        stack.log("gateway")
    );
    let plain = http_target().await;
    const N: usize = 16 << 20;
    let (code, body) = curl(&[
        "-x",
        &stack.http_proxy(),
        &format!("http://{plain}/bytes/{N}"),
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(N, 7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_the_gateway_restarts() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let plain = http_target().await;
    let _ = stack.gateway.0.start_kill();
    let _ = stack.gateway.0.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = stack.certs.dir.path().join("config.yaml");
    let log = stack.certs.dir.path().join("gateway.log");
    stack.gateway = spawn(&["gateway", "--config", cfg.to_str().unwrap()], &log);
    wait_for_port(stack.http_port).await;
    stack.wait_for_agent().await;
    assert_eq!(
        http_body(&["-x", &stack.http_proxy(), &format!("http://{plain}/")]).await,
        "hello"
    );
}

/// An agent as the document configures it (no `forbidden_hosts`, no `allow_local`)
/// refuses its own host and the link-local networks: 403 / SOCKS 0x02, with a reason
/// that names the key to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_its_own_host_and_cloud_metadata_by_default() {
    let stack = Stack::start(StackOptions {
        allow_local: false,
        ..Default::default()
    })
    .await;
    let plain = http_target().await;
    let proxy = stack.http_proxy();
    for url in [
        format!("http://127.0.0.1:{}/", plain.port()),
        format!("http://localhost:{}/", plain.port()),
        "http://169.254.169.254/latest/meta-data/".to_string(),
    ] {
        let (status, body) = curl_status_body(&["-x", &proxy, &url]).await;
        assert_eq!(status, "403", "{url}: {body}");
        assert!(body.contains("client.allow_local"), "{url}: {body}");
    }
    assert_eq!(
        socks5_connect(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "127.0.0.1",
            plain.port()
        )
        .await,
        Ok(0x02)
    );
    stack
        .wait_for_log("agent", "set client.allow_local: true to allow", 1)
        .await;
}
