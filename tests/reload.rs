//! SIGHUP on the gateway: the certificate is re-read, new agent handshakes get the new
//! one, established sessions and their connections keep working, and a bad file
//! changes nothing.

mod common;

use std::time::Duration;

use common::{
    admin_get, closed_by_proxy, free_port, metric, round_trip, signal, Stack, StackOptions,
};

async fn metrics(port: u16) -> String {
    admin_get(port, "/metrics", None).await.1
}

#[tokio::test]
async fn sighup_rotates_the_certificate_without_dropping_a_session() {
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![format!("admin_addr: \"127.0.0.1:{admin}\"")],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let echo = common::echo_target_on("127.0.0.1").await;
    let mut live = stack.socks5_to(echo).await.unwrap();
    round_trip(&mut live, b"before the reload").await;
    let m = metrics(admin).await;
    let first_expiry = metric(&m, "anyproxy_tls_cert_expiry_timestamp_seconds", &[]);
    assert!(first_expiry > 0.0, "{m}");

    // Rotate: the old certificate is kept aside to prove it is no longer served.
    let dir = stack.certs.dir.path();
    std::fs::copy(&stack.certs.cert, dir.join("old.pem")).unwrap();
    let until = anyproxy::transport::tls::unix_now() + 40 * 86_400;
    let new =
        anyproxy::transport::tls::generate_self_signed_until(&["localhost", "127.0.0.1"], until)
            .unwrap();
    std::fs::write(&stack.certs.key, &new.key_pem).unwrap();
    std::fs::write(&stack.certs.cert, &new.cert_pem).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "tls certificate replaced (new expiry", 1)
        .await;

    // The established session and its connection carry on.
    round_trip(&mut live, b"after the reload").await;
    let target = common::http_target().await;
    let status =
        common::curl_status(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!(status, "200");
    assert_eq!(
        stack
            .log("agent")
            .matches("authenticated to the gateway")
            .count(),
        1
    );

    // A new agent trusting the new file connects; one pinning the old one is refused.
    let _second = stack.spawn_agent("second", &[]);
    stack.wait_for_log("gateway", "agent connected", 2).await;
    let old = dir.join("old.pem");
    let stale_config = dir.join("stale.yaml");
    std::fs::write(
        &stale_config,
        format!(
            "client:\n  gateway_addr: \"127.0.0.1:{}\"\n  gateway_tls_cert: \"{}\"\n  client_id: stale\n  auth_username: \"{}\"\n  auth_password: \"{}\"\n",
            stack.gateway_port,
            old.display(),
            common::AGENT_USER,
            common::AGENT_PASS
        ),
    )
    .unwrap();
    let _stale = common::spawn(
        &["client", "--config", stale_config.to_str().unwrap()],
        &dir.join("agent-stale.log"),
    );
    stack
        .wait_for_log("agent-stale", "pinned certificate mismatch", 1)
        .await;

    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "anyproxy_tls_cert_expiry_timestamp_seconds", &[]),
        until as f64
    );
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "success")]),
        1.0
    );
    assert!(
        metric(
            &m,
            "anyproxy_config_last_reload_success_timestamp_seconds",
            &[]
        ) > 0.0
    );

    // A key of another certificate: the reload fails, the new certificate stays.
    let other = anyproxy::transport::tls::generate_self_signed(&["localhost"]).unwrap();
    std::fs::write(&stack.certs.key, &other.key_pem).unwrap();
    signal(pid, "HUP");
    stack.wait_for_log("gateway", "reload failed", 1).await;
    assert!(stack.log("gateway").contains("does not match"));
    // An invalid config: nothing changes, the error names the key.
    std::fs::write(&stack.certs.key, &new.key_pem).unwrap();
    let config = dir.join("config.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("connect_timeout: 5s", "connect_timeout: soon"),
    )
    .unwrap();
    signal(pid, "HUP");
    stack.wait_for_log("gateway", "reload failed", 2).await;
    assert!(stack.log("gateway").contains("gateway.connect_timeout"));

    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "failure")]),
        2.0
    );
    assert_eq!(
        metric(&m, "anyproxy_tls_cert_expiry_timestamp_seconds", &[]),
        until as f64
    );
    // Still serving the new certificate, and the first connection still works.
    let _third = stack.spawn_agent("third", &[]);
    stack.wait_for_log("gateway", "agent connected", 3).await;
    round_trip(&mut live, b"after two failed reloads").await;
}

#[tokio::test]
async fn a_storm_of_sighups_is_harmless() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let pid = stack.gateway.0.id().unwrap();
    for _ in 0..50 {
        signal(pid, "HUP");
    }
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;
    let target = common::http_target().await;
    let status =
        common::curl_status(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!(status, "200");
    assert!(
        stack.gateway.0.try_wait().unwrap().is_none(),
        "still running"
    );
}
#[tokio::test]
async fn sighup_reloads_users_and_groups() {
    let groups = |users: &str, extra: &str| {
        format!(
            "groups: [{{ id: office, agent_password: office-secret, users: [{users}] }}{extra}]"
        )
    };
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![groups("{ username: alice, password: alice-pw }", "")],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let _office = stack.spawn_group_agent("office-1", "office", "office-secret", "");
    stack.wait_for_log("gateway", "agent connected", 2).await;
    let target = common::http_target().await;
    let url = format!("http://{target}/");
    let status = |user: &'static str, pass: &'static str| {
        let (proxy, url) = (stack.http_proxy_as(user, pass), url.clone());
        async move { common::curl_status(&["-x", &proxy, &url]).await }
    };
    assert_eq!(status("alice", "alice-pw").await, "200");
    assert_eq!(status("bob", "bob-pw").await, "407");

    // bob replaces alice; a group `lab` appears; a restart-only key changes too.
    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let new = text
        .replace(
            &groups("{ username: alice, password: alice-pw }", ""),
            &groups(
                "{ username: bob, password: bob-pw }",
                ", { id: lab, agent_password: lab-secret }",
            ),
        )
        .replace("connect_timeout: 5s", "connect_timeout: 6s");
    assert_ne!(new, text);
    std::fs::write(&config, new).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;
    let log = stack.log("gateway");
    for line in [
        "proxy.http user bob added",
        "proxy.http user alice removed",
        "proxy.socks5 user bob added",
        "agent login lab added",
        "takes effect at the next restart key=\"gateway.connect_timeout\"",
    ] {
        assert!(log.contains(line), "{line:?} not in\n{log}");
    }
    assert!(
        !log.contains("bob-pw") && !log.contains("lab-secret"),
        "{log}"
    );

    assert_eq!(status("bob", "bob-pw").await, "200");
    assert_eq!(status("alice", "alice-pw").await, "407");
    // The listener's own account is untouched.
    let own = common::curl_status(&["-x", &stack.http_proxy(), &url]).await;
    assert_eq!(own, "200");
    // An agent of the new group is accepted; the office agent's session carried on.
    let _lab = stack.spawn_group_agent("lab-1", "lab", "lab-secret", "");
    stack
        .wait_for_log("gateway", "client_id=lab-1 group=lab", 1)
        .await;
    assert_eq!(
        stack
            .log("office-1")
            .matches("authenticated to the gateway")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_reload_that_adds_a_backend_is_refused_whole() {
    let stack = Stack::start(StackOptions::default()).await;
    let pid = stack.gateway.0.id().unwrap();
    let target = common::http_target().await;
    let url = format!("http://{target}/");
    assert_eq!(
        common::curl_status(&["-x", &stack.http_proxy(), &url]).await,
        "200"
    );

    // A new users file backend, named by the HTTP listener, and the listener's own
    // password changed in the same file: nothing of it may apply.
    let dir = stack.certs.dir.path();
    std::fs::write(dir.join("users.htpasswd"), "carol:carol-pw\n").unwrap();
    let config = dir.join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let new = text
        .replacen(
            &format!("auth_password: \"{}\"", common::HTTP_PASS),
            "auth_password: \"changed\"\n    auth: [static, users]",
            1,
        )
        .replace(
            "connect_timeout: 5s",
            &format!(
                "connect_timeout: 5s\n  auth_backends:\n    users: {{ type: file, path: \"{}\", allow_plaintext: true }}",
                dir.join("users.htpasswd").display()
            ),
        );
    assert_ne!(new, text);
    std::fs::write(&config, new).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log(
            "gateway",
            "reload failed; the running configuration stays",
            1,
        )
        .await;
    let log = stack.log("gateway");
    assert!(
        log.contains("proxy.http.auth: backend \"users\" is not running"),
        "{log}"
    );
    assert_eq!(
        common::curl_status(&["-x", &stack.http_proxy(), &url]).await,
        "200",
        "the old password still works"
    );
}

#[tokio::test]
async fn a_certificate_close_to_expiry_is_warned_about_on_both_sides() {
    let (gw_admin, agent_admin) = (free_port(), free_port());
    let until = anyproxy::transport::tls::unix_now() + 5 * 86_400;
    let cert =
        anyproxy::transport::tls::generate_self_signed_until(&["localhost", "127.0.0.1"], until)
            .unwrap();
    let stack = Stack::start(StackOptions {
        tls: Some((cert.cert_pem, cert.key_pem)),
        gateway_extra: vec![format!("admin_addr: \"127.0.0.1:{gw_admin}\"")],
        client_extra: vec![format!("admin_addr: \"127.0.0.1:{agent_admin}\"")],
        ..Default::default()
    })
    .await;
    assert!(stack
        .log("gateway")
        .contains("the tls certificate expires on"));
    stack
        .wait_for_log("agent", "the gateway's tls certificate expires on", 1)
        .await;
    let g = metrics(gw_admin).await;
    assert_eq!(
        metric(
            &g,
            "anyproxy_tls_cert_expiry_timestamp_seconds",
            &[("role", "gateway")]
        ),
        until as f64
    );
    let a = metrics(agent_admin).await;
    assert_eq!(
        metric(
            &a,
            "anyproxy_tls_cert_expiry_timestamp_seconds",
            &[("role", "peer")]
        ),
        until as f64,
        "{a}"
    );
}

#[tokio::test]
async fn post_reload_needs_the_admin_credentials() {
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("admin_addr: \"127.0.0.1:{admin}\""),
            "admin_username: ops".into(),
            "admin_password: ops-secret".into(),
        ],
        with_agent: false,
        ..Default::default()
    })
    .await;
    let url = format!("http://127.0.0.1:{admin}/reload");
    let post = |auth: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut args = vec!["-X", "POST"];
            if let Some(a) = auth {
                args.extend(["-u", a]);
            }
            args.push(&url);
            common::curl_status_body(&args).await
        }
    };
    assert_eq!(post(None).await.0, "401");
    assert_eq!(post(Some("ops:wrong")).await.0, "401");
    let (status, body) = post(Some("ops:ops-secret")).await;
    assert_eq!((status.as_str(), body.as_str()), ("200", "reloaded\n"));

    let config = stack.certs.dir.path().join("config.yaml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace("connect_timeout: 5s", "connect_timeout: soon"),
    )
    .unwrap();
    let (status, body) = post(Some("ops:ops-secret")).await;
    assert_eq!(status, "422", "{body}");
    assert!(body.contains("gateway.connect_timeout"), "{body}");
    let m = metrics_as(admin, "ops:ops-secret").await;
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "failure")]),
        1.0
    );
}

#[tokio::test]
async fn post_reload_is_refused_without_configured_credentials() {
    let admin = free_port();
    let _stack = Stack::start(StackOptions {
        gateway_extra: vec![format!("admin_addr: \"127.0.0.1:{admin}\"")],
        with_agent: false,
        ..Default::default()
    })
    .await;
    let url = format!("http://127.0.0.1:{admin}/reload");
    let (status, body) = common::curl_status_body(&["-X", "POST", &url]).await;
    assert_eq!(status, "403", "{body}");
    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "success")]),
        0.0
    );
}

async fn metrics_as(port: u16, auth: &str) -> String {
    admin_get(port, "/metrics", Some(auth)).await.1
}

/// Reloads that change credentials under a 64 MiB download leave it whole: the
/// connection was authenticated once, and its user stays in the configuration.
#[tokio::test]
async fn a_download_runs_through_reloads_that_change_credentials() {
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            "groups: [{ id: office, agent_password: office-secret, users: [] }]".into(),
        ],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let target = common::http_target().await;
    let download = common::slow_download(stack.http_proxy(), target);

    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    for round in 1..=3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let users = format!("users: [{{ username: u{round}, password: p{round} }}]");
        std::fs::write(&config, text.replace("users: []", &users)).unwrap();
        signal(pid, "HUP");
        stack
            .wait_for_log("gateway", "configuration reloaded", round)
            .await;
    }
    assert!(stack.log("gateway").contains("proxy.http user u3 added"));

    common::assert_downloaded_whole(download).await;
}

#[tokio::test]
async fn sighup_applies_the_log_level() {
    let stack = Stack::start(StackOptions {
        top_extra: "log: { level: \"info\" }".into(),
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let target = common::http_target().await;
    let url = format!("http://{target}/");
    let proxy = stack.http_proxy();
    let args = ["-x", proxy.as_str(), url.as_str()];
    assert_eq!(common::curl_status(&args).await, "200");
    stack.wait_for_log("gateway", "access:", 1).await;
    assert!(!stack.log("gateway").contains("relay finished"));

    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("level: \"info\"", "level: \"debug\"")).unwrap();
    signal(pid, "HUP");
    stack.wait_for_log("gateway", "log level changed", 1).await;
    assert_eq!(common::curl_status(&args).await, "200");
    // A debug line of the tunnel's relay, which `info` hid.
    stack.wait_for_log("gateway", "relay finished", 1).await;
}

/// One plain-HTTP GET of `target`'s `/` as `user` on a kept-alive proxy connection;
/// the answer's status (the target answers `hello`, the proxy's refusals a short text).
async fn get_on(
    s: &mut tokio::net::TcpStream,
    target: std::net::SocketAddr,
    user: &str,
    pass: &str,
) -> String {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let req = format!(
        "GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The head and a body announced by content-length, all small.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert!(
            n > 0 && got.len() < 65536,
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len {
                return head[9..12].to_owned();
            }
        }
    }
}

/// A user removed by a reload loses their live connections (HTTP CONNECT, SOCKS5 and
/// a SOCKS5 UDP association, with the reason in the access log) and gets 407 on new ones; another user's 64 MiB
/// download and live tunnel run through the reload untouched.
#[tokio::test]
async fn a_removed_users_live_connections_close_and_other_users_finish() {
    let users = "{ username: alice, password: alice-pw }, { username: bob, password: bob-pw }";
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![format!(
            "groups: [{{ id: office, agent_password: office-secret, users: [{users}] }}]"
        )],
        with_agent: false,
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let _office = stack.spawn_group_agent("office-1", "office", "office-secret", "");
    stack.wait_for_agent().await;
    let echo = common::echo_target_on("127.0.0.1").await;
    let mut bob_socks = stack.socks5_as("bob", "bob-pw", echo).await.unwrap();
    let mut bob_connect = common::http_connect_as(&stack, "bob", "bob-pw", echo).await;
    let mut alice_socks = stack.socks5_as("alice", "alice-pw", echo).await.unwrap();
    let hello = common::http_target().await;
    let mut bob_kept = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .unwrap();
    assert_eq!(get_on(&mut bob_kept, hello, "bob", "bob-pw").await, "200");
    let udp_echo = common::udp::echo_server().await;
    let mut bob_udp = common::udp::Association::open(stack.socks_port, "bob", "bob-pw")
        .await
        .expect("UDP ASSOCIATE accepted");
    let to = common::udp::Dest::Addr(udp_echo.addr);
    bob_udp.send(&to, b"ping").await;
    let back = bob_udp.recv(Duration::from_secs(10)).await;
    assert_eq!(back, Some((to, b"ping".to_vec())));
    for s in [&mut bob_socks, &mut bob_connect, &mut alice_socks] {
        round_trip(s, b"before the reload").await;
    }

    let target = common::http_target().await;
    let download = common::slow_download(stack.http_proxy_as("alice", "alice-pw"), target);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without_bob = text.replace(", { username: bob, password: bob-pw }", "");
    assert_ne!(without_bob, text);
    std::fs::write(&config, without_bob).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;

    closed_by_proxy(&mut bob_socks).await;
    closed_by_proxy(&mut bob_connect).await;
    closed_by_proxy(&mut bob_udp.control).await;
    stack
        .wait_for_log("gateway", "proxy user removed by a reload", 2)
        .await;
    let log = stack.log("gateway");
    assert!(
        log.contains("closing the live connections of a user the reload removed"),
        "{log}"
    );
    let url = format!("http://{target}/");
    let bob = stack.http_proxy_as("bob", "bob-pw");
    assert_eq!(common::curl_status(&["-x", &bob, &url]).await, "407");
    // A kept-alive connection's accepted credentials are checked again.
    assert_eq!(get_on(&mut bob_kept, hello, "bob", "bob-pw").await, "407");

    round_trip(&mut alice_socks, b"after the reload").await;
    common::assert_downloaded_whole(download).await;
}

/// A reload that lowers `gateway.limits.per_user.max_concurrent` to the connections a
/// user has open closes none of them: a 64 MiB download runs on to the last byte, the
/// user's next connection is refused as any over the cap is, and once the download
/// ends one is admitted again. An invalid value reloaded changes nothing.
#[tokio::test]
async fn a_reload_tightens_a_users_cap_under_a_live_download() {
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("admin_addr: \"127.0.0.1:{admin}\""),
            "limits:\n    per_user: { max_concurrent: 10 }".into(),
        ],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let target = common::http_target().await;
    // 4096 chunks of 16 KiB, 2 ms apart: 64 MiB over at least 8 s.
    let chunks = common::SLOW_DOWNLOAD / common::SLOW_CHUNK;
    let slow = format!("http://{target}/slow/{chunks}/2");
    let proxy = stack.http_proxy();
    let download = {
        let (proxy, slow) = (proxy.clone(), slow.clone());
        tokio::spawn(async move { common::curl(&["-x", &proxy, &slow]).await })
    };
    common::wait_for_slow_requests(target, 1).await;

    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let one = text.replace("max_concurrent: 10", "max_concurrent: 1");
    assert_ne!(one, text);
    std::fs::write(&config, &one).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;
    let log = stack.log("gateway");
    assert!(
        log.contains("gateway.limits.per_user.max_concurrent changed from 10 to 1"),
        "{log}"
    );
    assert!(!log.contains("key=\"gateway.limits\""), "{log}");

    let url = format!("http://{target}/");
    let (status, body) = common::curl_status_body(&["-x", &proxy, &url]).await;
    assert_eq!(status, "429", "{body}");
    assert!(
        body.contains(&format!(
            "user {} has 1 connections open (limit 1)",
            common::HTTP_USER
        )),
        "{body}"
    );
    assert!(
        !download.is_finished(),
        "the refusal was checked mid-download"
    );

    let (code, got) = tokio::time::timeout(Duration::from_secs(120), download)
        .await
        .expect("the download ends within 120 s")
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(got.len(), common::SLOW_DOWNLOAD);
    let want = common::pattern(common::SLOW_CHUNK, 7).repeat(chunks);
    assert_eq!(common::sha256_hex(&got), common::sha256_hex(&want));
    // The download's place is given back when its relay ends, just after curl's.
    admitted_within(&proxy, &url, Duration::from_secs(15)).await;

    // Invalid: the whole file is refused, the error names the key, the cap stays 1.
    std::fs::write(
        &config,
        one.replace("max_concurrent: 1", "max_concurrent: 5, rate: -1"),
    )
    .unwrap();
    hup_fails_naming(&stack, pid, admin, "gateway.limits.per_user.rate").await;
    let echo = common::echo_target_on("127.0.0.1").await;
    let mut held =
        common::http_connect_as(&stack, common::HTTP_USER, common::HTTP_PASS, echo).await;
    round_trip(&mut held, b"the one place").await;
    let (status, body) = common::curl_status_body(&["-x", &proxy, &url]).await;
    assert_eq!(status, "429", "still capped at 1: {body}");
}

/// Retries a GET through `proxy` until it is answered 200, failing after `within`.
async fn admitted_within(proxy: &str, url: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let status = common::curl_status(&["-x", proxy, url]).await;
        if status == "200" {
            return;
        }
        assert_eq!(status, "429", "only the cap may refuse");
        assert!(
            std::time::Instant::now() < deadline,
            "not admitted within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_reload_applies_the_policy_dirs_rules_and_keeps_its_quotas() {
    let allowed = common::http_target().await;
    let blocked = common::http_target().await;
    let dir = common::policy_dir(blocked.port(), "2 MB", free_port());
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("policy: {{ dir: \"{}\" }}", dir.path().display()),
            format!("admin_addr: \"127.0.0.1:{admin}\""),
        ],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let proxy = stack.http_proxy();
    let get = |target: std::net::SocketAddr, path: &str| format!("http://{target}{path}");
    // 1 MB of the 2 MiB quota spent before the reload.
    let (code, body) = common::curl(&["-x", &proxy, &get(allowed, "/bytes/1000000")]).await;
    assert_eq!((code, body.len()), (0, 1_000_000));
    assert_eq!(
        common::curl_status(&["-x", &proxy, &get(blocked, "/")]).await,
        "403"
    );

    // The new rules block the other target instead; the quota manager keeps its name.
    let managers = dir.path().join("managers.toml");
    let text = std::fs::read_to_string(&managers).unwrap();
    let swapped = text.replace(
        &format!("':{}$'", blocked.port()),
        &format!("':{}$'", allowed.port()),
    );
    assert_ne!(swapped, text);
    std::fs::write(&managers, &swapped).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;
    let log = stack.log("gateway");
    assert!(log.contains("hostMatcher \"blocked\" changed"), "{log}");
    assert!(!log.contains("key=\"gateway.policy\""), "{log}");
    assert_eq!(
        common::curl_status(&["-x", &proxy, &get(allowed, "/")]).await,
        "403"
    );
    // The quota spent before the reload still counts: 1.5 MB more crosses 2 MiB.
    let (code, body) = common::curl(&["-x", &proxy, &get(blocked, "/bytes/1500000")]).await;
    assert!(
        code != 0 || body.len() < 1_500_000,
        "the quota was forgotten by the reload: {} bytes",
        body.len()
    );

    // A broken managers.toml changes nothing, and the reload says which file and key.
    std::fs::write(
        &managers,
        swapped.replace("resetCycle = \"24h\"", "resetCycle = \"0s\""),
    )
    .unwrap();
    hup_fails_naming(&stack, pid, admin, "resetCycle").await;
    assert_eq!(
        common::curl_status(&["-x", &proxy, &get(allowed, "/")]).await,
        "403"
    );
}

/// Sends SIGHUP for a file that must not load: the first failed reload is logged
/// naming `key`, and counted.
async fn hup_fails_naming(stack: &Stack, pid: u32, admin: u16, key: &str) {
    signal(pid, "HUP");
    stack.wait_for_log("gateway", "reload failed", 1).await;
    let log = stack.log("gateway");
    assert!(log.contains(key), "{log}");
    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "anyproxy_config_reload_total", &[("result", "failure")]),
        1.0
    );
}

/// Replaces `from` with `to` in the gateway's file, sends SIGHUP and waits for the
/// `times`th successful reload; the gateway's log.
async fn edit_and_reload(
    stack: &Stack,
    pid: u32,
    (from, to): (&str, &str),
    times: usize,
) -> String {
    let config = stack.certs.dir.path().join("config.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let edited = text.replace(from, to);
    assert_ne!(edited, text, "{from:?} is not in the file");
    std::fs::write(&config, edited).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", times)
        .await;
    stack.log("gateway")
}

/// Writes `text` to `name` in `dir`; the path, for a YAML value.
fn write_in(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The `tls_client_cert`/`tls_client_key` lines of an agent presenting a certificate
/// issued by `ca` for `name`, written to `dir`.
fn client_identity(
    dir: &std::path::Path,
    ca: &anyproxy::transport::tls::GeneratedCa,
    name: &str,
) -> Vec<String> {
    let id = ca.client_cert(name).unwrap();
    vec![
        format!(
            "tls_client_cert: \"{}\"",
            write_in(dir, &format!("{name}.pem"), &id.cert_pem)
        ),
        format!(
            "tls_client_key: \"{}\"",
            write_in(dir, &format!("{name}.key"), &id.key_pem)
        ),
    ]
}

/// `gateway.client_ca` rewritten with another CA's certificate: new agents with a
/// certificate of the new CA are admitted, new ones of the old CA refused, and the
/// agent verified against the old CA keeps its session and its connection. A file
/// that holds no certificate fails the reload naming the key and changes nothing.
#[tokio::test]
async fn a_reload_rotates_client_ca_for_new_agents_only() {
    let pki = tempfile::tempdir().unwrap();
    let old_ca = anyproxy::transport::tls::GeneratedCa::new("old agents' CA").unwrap();
    let new_ca = anyproxy::transport::tls::GeneratedCa::new("new agents' CA").unwrap();
    let ca_path = write_in(pki.path(), "ca.pem", &old_ca.cert_pem);
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("client_ca: \"{ca_path}\""),
            format!("admin_addr: \"127.0.0.1:{admin}\""),
        ],
        client_extra: client_identity(pki.path(), &old_ca, "first"),
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let echo = common::echo_target_on("127.0.0.1").await;
    let mut live = stack.socks5_to(echo).await.unwrap();
    round_trip(&mut live, b"before the reload").await;

    std::fs::write(&ca_path, &new_ca.cert_pem).unwrap();
    signal(pid, "HUP");
    stack
        .wait_for_log("gateway", "configuration reloaded", 1)
        .await;
    let log = stack.log("gateway");
    assert!(log.contains("gateway.client_ca changed"), "{log}");
    assert!(!log.contains("key=\"gateway.client_ca\""), "{log}");

    let _new = stack.spawn_agent("new", &client_identity(pki.path(), &new_ca, "new"));
    stack.wait_for_log("gateway", "client_id=new", 1).await;
    let _old = stack.spawn_agent("old", &client_identity(pki.path(), &old_ca, "old"));
    stack
        .wait_for_log("agent-old", "the gateway refused the TLS handshake", 1)
        .await;
    assert!(!stack.log("gateway").contains("client_id=old"));
    // The agent verified against the old CA carries on, on its first session.
    round_trip(&mut live, b"after the reload").await;
    let target = common::http_target().await;
    let url = format!("http://{target}/");
    assert_eq!(
        common::curl_status(&["-x", &stack.http_proxy(), &url]).await,
        "200"
    );
    assert_eq!(
        stack
            .log("agent")
            .matches("authenticated to the gateway")
            .count(),
        1
    );

    // No certificate in the file: the reload fails naming the key; the new CA stays.
    std::fs::write(&ca_path, "not a certificate\n").unwrap();
    hup_fails_naming(&stack, pid, admin, "gateway.client_ca").await;
    let _later = stack.spawn_agent("later", &client_identity(pki.path(), &new_ca, "later"));
    stack.wait_for_log("gateway", "client_id=later", 1).await;
    round_trip(&mut live, b"after the failed reload").await;

    // Removed: new agents connect without a certificate.
    let line = format!("\n  client_ca: \"{ca_path}\"");
    let log = edit_and_reload(&stack, pid, (&line, ""), 2).await;
    assert!(log.contains("gateway.client_ca removed"), "{log}");
    let _anonymous = stack.spawn_agent("anonymous", &[]);
    stack
        .wait_for_log("gateway", "client_id=anonymous", 1)
        .await;
    round_trip(&mut live, b"after the removal").await;
}

/// `gateway.deflate` turned on by a reload: the next agent session negotiates
/// permessage-deflate, the one connected before keeps its uncompressed session and
/// its connection.
#[tokio::test]
async fn a_reload_turns_deflate_on_for_new_agent_sessions() {
    let deflate = "deflate: { enabled: true }".to_owned();
    let stack = Stack::start(StackOptions {
        client_extra: vec![deflate.clone()],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let echo = common::echo_target_on("127.0.0.1").await;
    let mut live = stack.socks5_to(echo).await.unwrap();
    round_trip(&mut live, b"before the reload").await;
    let log = stack.log("gateway");
    assert!(log.contains("deflate=false"), "{log}");
    assert!(!log.contains("deflate=true"), "{log}");

    let on = format!("connect_timeout: 5s\n  {deflate}");
    let log = edit_and_reload(&stack, pid, ("connect_timeout: 5s", &on), 1).await;
    assert!(
        log.contains("gateway.deflate.enabled changed from false to true"),
        "{log}"
    );
    assert!(!log.contains("key=\"gateway.deflate\""), "{log}");

    let _second = stack.spawn_agent("second", std::slice::from_ref(&deflate));
    stack.wait_for_log("gateway", "agent connected", 2).await;
    let log = stack.log("gateway");
    let line = log
        .lines()
        .find(|l| l.contains("agent connected") && l.contains("client_id=second"))
        .unwrap_or_default();
    assert!(line.contains("deflate=true"), "{log}");
    round_trip(&mut live, b"after the reload").await;
    assert_eq!(
        stack
            .log("agent")
            .matches("authenticated to the gateway")
            .count(),
        1
    );
}

/// `gateway.agent_forwards.ports` narrowed by a reload: the open forward now outside
/// the range stops listening (logged with the reason; the connection it accepted
/// before carries on), the one inside keeps serving, and an agent asking for a port
/// outside the new range is refused.
#[tokio::test]
async fn a_reload_narrowing_agent_forwards_closes_the_forwards_outside() {
    let (inside, outside, asked) = (free_port(), free_port(), free_port());
    let (low, high) = (inside.min(outside), inside.max(outside));
    let stack = Stack::start(StackOptions {
        with_agent: false,
        gateway_extra: vec![format!(
            "agent_forwards: {{ bind: 127.0.0.1, ports: \"{low}-{high}\" }}"
        )],
        ..Default::default()
    })
    .await;
    let pid = stack.gateway.0.id().unwrap();
    let echo = common::echo_target_on("127.0.0.1").await;
    let ports = format!(
        "open_ports:\n    - {{ remote_port: {inside}, target: \"{echo}\" }}\n    - {{ remote_port: {outside}, target: \"{echo}\" }}"
    );
    let _a = stack.spawn_agent("a", &[ports]);
    stack
        .wait_for_log("agent-a", "gateway forward open", 2)
        .await;
    let connect = |port: u16| tokio::net::TcpStream::connect(("127.0.0.1", port));
    let mut held_in = connect(inside).await.unwrap();
    let mut held_out = connect(outside).await.unwrap();
    round_trip(&mut held_in, b"inside, before").await;
    round_trip(&mut held_out, b"outside, before").await;

    let (wide, narrow) = (
        format!("ports: \"{low}-{high}\""),
        format!("ports: \"{inside}\""),
    );
    let log = edit_and_reload(&stack, pid, (&wide, &narrow), 1).await;
    for line in [
        format!("agent_forwards range changed from {low}-{high} to {inside}-{inside}"),
        format!(
            "forward 127.0.0.1:{outside} of agent a closed: outside the reloaded agent_forwards range"
        ),
    ] {
        assert!(log.contains(&line), "{line:?} not in\n{log}");
    }
    assert!(
        !log.contains(&format!("forward 127.0.0.1:{inside} of agent a closed")),
        "{log}"
    );
    assert!(!log.contains("key=\"gateway.agent_forwards\""), "{log}");

    let closed = format!("port {outside} stops listening");
    common::cluster::eventually(Duration::from_secs(10), &closed, || async {
        connect(outside).await.is_err().then_some(())
    })
    .await;
    let mut fresh = connect(inside).await.unwrap();
    round_trip(&mut fresh, b"inside, after").await;
    round_trip(&mut held_in, b"inside, held").await;
    // Accepted before the reload: it rides the agent's session, and carries on.
    round_trip(&mut held_out, b"outside, held").await;

    let refused = format!("open_ports:\n    - {{ remote_port: {asked}, target: \"{echo}\" }}");
    let _b = stack.spawn_agent("b", &[refused]);
    stack
        .wait_for_log("agent-b", "gateway refused a forward", 1)
        .await;
    let log = stack.log("agent-b");
    assert!(
        log.contains(&format!(
            "port {asked} is outside the range agents may forward ({inside}-{inside})"
        )),
        "{log}"
    );
    assert!(connect(asked).await.is_err());
}
