//! The admin listener end to end: real gateway and agent processes, real curl, and the
//! status page in a real headless Chromium.

mod common;

use std::time::{Duration, Instant};

use common::browser::{chromium, run_chromium};
use common::*;

const ADMIN_USER: &str = "ops";
const ADMIN_PASS: &str = "ops-secret";

fn admin_lines(port: u16, auth: bool) -> Vec<String> {
    let mut lines = vec![format!("admin_addr: \"127.0.0.1:{port}\"")];
    if auth {
        lines.push(format!("admin_username: \"{ADMIN_USER}\""));
        lines.push(format!("admin_password: \"{ADMIN_PASS}\""));
    }
    lines
}

fn creds() -> String {
    format!("{ADMIN_USER}:{ADMIN_PASS}")
}

async fn wait_until_status(port: u16, path: &str, status: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, body) = admin_get(port, path, None).await;
        if s == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} on {port} stayed {s} ({body:?}), wanted {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_counters_move_with_real_traffic() {
    let (gw_admin, agent_admin) = (free_port(), free_port());
    let stack = Stack::start(StackOptions {
        with_agent: false,
        gateway_extra: admin_lines(gw_admin, true),
        ..Default::default()
    })
    .await;
    wait_for_port(gw_admin).await;

    // Health checks answer without credentials; nothing else does.
    assert_eq!(admin_get(gw_admin, "/healthz", None).await.0, "200");
    let (status, body) = admin_get(gw_admin, "/readyz", None).await;
    assert_eq!(status, "503", "ready without an agent: {body}");
    assert!(body.contains("no agent"), "{body}");
    for path in ["/metrics", "/api/status", "/"] {
        assert_eq!(admin_get(gw_admin, path, None).await.0, "401", "{path}");
    }
    let wrong = format!("{ADMIN_USER}:nope");
    assert_eq!(admin_get(gw_admin, "/metrics", Some(&wrong)).await.0, "401");

    let _agent = stack.spawn_agent("test-agent", &admin_lines(agent_admin, false));
    stack.wait_for_agent().await;
    let body = wait_until_status(gw_admin, "/readyz", "200").await;
    assert!(body.contains("ready: 1 agent\n"), "{body:?}");
    wait_for_port(agent_admin).await;
    wait_until_status(agent_admin, "/readyz", "200").await;

    let (status, before) = admin_get(gw_admin, "/metrics", Some(&creds())).await;
    assert_eq!(status, "200");
    let agent_labels = [("group", "default"), ("agent", "test-agent")];
    let opened = "anyproxy_tunnel_connections_opened_total";
    let bytes = "anyproxy_tunnel_bytes_total";
    let out_labels = [
        ("group", "default"),
        ("agent", "test-agent"),
        ("direction", "out"),
    ];
    let in_labels = [
        ("group", "default"),
        ("agent", "test-agent"),
        ("direction", "in"),
    ];

    // Three proxied requests, one of them a 1 MiB download; then one refused target.
    let target = http_target().await;
    let proxy = stack.http_proxy();
    for path in ["/", "/", "/bytes/1048576"] {
        let url = format!("http://{target}{path}");
        let (code, out) = curl(&["-x", &proxy, &url]).await;
        assert_eq!(code, 0);
        if path != "/" {
            assert_eq!(out.len(), 1 << 20);
        }
    }
    let closed = format!("http://127.0.0.1:{}/", free_port());
    assert_eq!(curl_status(&["-x", &proxy, &closed]).await, "502");

    let (_, after) = admin_get(gw_admin, "/metrics", Some(&creds())).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    assert_eq!(delta(opened, &agent_labels), 3.0, "{after}");
    assert!(delta(bytes, &out_labels) >= (1 << 20) as f64, "{after}");
    assert!(delta(bytes, &in_labels) > 0.0, "{after}");
    assert!(
        delta(
            "anyproxy_tunnel_messages_total",
            &[("direction", "rx"), ("type", "data")]
        ) > 0.0
    );
    assert!(
        delta(
            "anyproxy_tunnel_messages_total",
            &[("direction", "tx"), ("type", "connect")]
        ) >= 4.0
    );
    assert!(
        delta(
            "anyproxy_tunnel_connect_seconds_count",
            &[("group", "default")]
        ) >= 3.0
    );
    assert_eq!(
        delta(
            "anyproxy_gateway_connections_failed_total",
            &[
                ("group", "default"),
                ("code", "CONNECTION_FAILED"),
                ("reason", "refused")
            ]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "anyproxy_gateway_agents",
            &[("group", "default"), ("encoding", "binary")]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "anyproxy_tunnel_sessions", &agent_labels),
        1.0
    );
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "anyproxy_gateway_auth_failures_total",
    ] {
        assert!(after.contains(name), "{name} missing:\n{after}");
    }
    assert!(metric(&after, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(metric(&after, "process_open_fds", &[]) > 3.0);

    // The agent counts the same connections from its side, and the refused dial.
    let (status, agent_text) = admin_get(agent_admin, "/metrics", None).await;
    assert_eq!(status, "200");
    assert_eq!(
        metric(&agent_text, opened, &agent_labels),
        3.0,
        "{agent_text}"
    );
    assert!(metric(&agent_text, bytes, &in_labels) >= (1 << 20) as f64);
    assert_eq!(
        metric(
            &agent_text,
            "anyproxy_agent_connects_refused_total",
            &[("code", "CONNECTION_FAILED")]
        ),
        1.0,
        "{agent_text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_and_page_show_the_agent_and_a_live_connection() {
    let browser = chromium();
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: admin_lines(admin, false),
        ..Default::default()
    })
    .await;
    wait_until_status(admin, "/readyz", "200").await;

    // A SOCKS5 stream to a target that keeps it open while nothing is sent.
    let target = http_target().await;
    let held = stack.socks5_to(target).await.expect("socks5 connect");

    let (status, body) = admin_get(admin, "/api/status", None).await;
    assert_eq!(status, "200");
    let json: serde_json::Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(json["role"], "gateway");
    assert_eq!(json["ready"], true);
    let group = &json["groups"][0];
    assert_eq!(group["group"], "default", "{json:#}");
    let agent = &group["agents"][0];
    assert_eq!(agent["client_id"], "test-agent", "{json:#}");
    assert_eq!(agent["encoding"], "binary");
    assert_eq!(agent["deflate"], false);
    assert_eq!(agent["live_connections"], 1, "{json:#}");
    assert_eq!(json["totals"]["agents"], 1);
    assert_eq!(json["totals"]["live_connections"], 1);
    assert!(json["traffic"]["samples"].is_array());
    assert_eq!(json["traffic"]["interval_secs"], 2);
    assert!(json.get("quotas").is_none(), "no policy, no quotas");

    // The page, rendered by a real browser from the same listener.
    let out_dir = stack.certs.dir.path();
    let url = format!("http://127.0.0.1:{admin}/");
    let dom = run_chromium(
        &browser,
        &out_dir.join("chromium-dom"),
        &["--dump-dom".into(), url.clone()],
    )
    .await;
    let dom = String::from_utf8_lossy(&dom);
    assert!(
        dom.contains(r#"data-client-id="test-agent""#),
        "the page does not list the agent:\n{dom}"
    );
    assert!(
        dom.contains(r#"<td class="live-connections">1</td>"#),
        "the page does not show the live connection:\n{dom}"
    );
    assert!(
        dom.contains(r#"<dd id="total-live-connections">1</dd>"#),
        "{dom}"
    );
    // Counts read as words do: one session, one live connection.
    assert!(dom.contains("group default (1 session)"), "{dom}");
    assert!(dom.contains("· 1 live connection</p>"), "{dom}");

    let shot = out_dir.join("status.png");
    run_chromium(
        &browser,
        &out_dir.join("chromium-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,900".into(),
            url,
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // Kept with the test's other output (logs, config) in its temp dir.
    let keep = std::env::temp_dir().join("anyproxy-status.png");
    let _ = std::fs::copy(&shot, &keep);
    println!(
        "status page screenshot: {} (copy: {})",
        shot.display(),
        keep.display()
    );
    drop(held);
}
