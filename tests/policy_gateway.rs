//! The policy engine guarding the gateway's proxy front ends: rules decide every request
//! through the tunnel, and a download quota cuts the transfer that crosses it.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_each_request_and_the_quota_cuts_the_download_that_crosses_it() {
    let allowed = http_target().await;
    let blocked = http_target().await;
    // A PMProxy config dir: `huser` and `suser` may go anywhere but the blocked target
    // while under a 2 MiB quota, and the API on a free loopback port.
    let api_port = free_port();
    let dir = policy_dir(blocked.port(), "2 MB", api_port);
    let admin = free_port();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            format!("policy: {{ dir: \"{}\" }}", dir.path().display()),
            format!("admin_addr: \"127.0.0.1:{admin}\""),
        ],
        ..StackOptions::default()
    })
    .await;
    let proxy = stack.http_proxy();

    // Allowed target, under quota.
    let (code, body) = curl(&["-x", &proxy, &format!("http://{allowed}/bytes/1000000")]).await;
    assert_eq!(code, 0);
    assert_eq!(body.len(), 1_000_000);
    // The rule denies the blocked port: 403, whatever the quota.
    let status = curl_status(&["-x", &proxy, &format!("http://{blocked}/")]).await;
    assert_eq!(status, "403", "{}", stack.log("gateway"));
    assert!(stack.log("gateway").contains("denied by policy"));

    // Through SOCKS5 (user suser, nothing in between to buffer): 1 MB, then a 4 MB
    // download is cut where the 2 MiB quota ends, to within one read.
    let socks = stack.socks_auth();
    let url = |n: usize| format!("http://localhost:{}/bytes/{n}", allowed.port());
    let (code, body) = curl(&["--socks5-hostname", &socks, &url(1_000_000)]).await;
    assert_eq!((code, body.len()), (0, 1_000_000));
    let (code, body) = curl(&["--socks5-hostname", &socks, &url(4_000_000)]).await;
    assert_ne!(
        code, 0,
        "the download crossing the quota must not look complete"
    );
    let quota: usize = 2 * 1024 * 1024;
    let left = quota - 1_000_000;
    assert!(
        body.len() <= left,
        "{} bytes arrived past the quota",
        body.len()
    );
    assert!(
        body.len() + 64 * 1024 + 1024 >= left,
        "cut too early: {} of {left}",
        body.len()
    );
    // The cut is logged with its reason (the log line may trail curl's exit).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !stack.log("gateway").contains("download quota") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            stack.log("gateway")
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // With the quota spent, the rule is false: refused up front (SOCKS "not allowed").
    let refused = socks5_stream(
        stack.socks_port,
        SOCKS_USER,
        SOCKS_PASS,
        "localhost",
        allowed.port(),
    )
    .await;
    assert_eq!(refused.err(), Some(Socks5Refusal::Reply(0x02)));
    // huser's quota is separate and still open.
    let (code, _) = curl(&["-x", &proxy, &format!("http://{allowed}/bytes/10")]).await;
    assert_eq!(code, 0);

    // The API next to the gateway reports the consumption the tunnel counted.
    wait_for_port(api_port).await;
    let (code, body) = curl(&[
        "--cacert",
        dir.path().join("cert.pem").to_str().unwrap(),
        "-d",
        r#"{"cmd":"show","manager":"quota"}"#,
        &format!("https://localhost:{api_port}/api/cmd"),
    ])
    .await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("quota"), "{body}");

    // The admin status lists both users' consumption: suser's spent to the byte.
    let status_url = format!("http://127.0.0.1:{admin}/api/status");
    let (code, body) = curl(&[&status_url]).await;
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let quotas = status["quotas"]
        .as_array()
        .expect("quotas with a policy on");
    let row = |user: &str| {
        quotas
            .iter()
            .find(|q| q["user"] == user)
            .unwrap_or_else(|| panic!("no quota row for {user}: {status:#}"))
    };
    assert_eq!(row(SOCKS_USER)["used"], quota as u64, "{status:#}");
    assert_eq!(row(SOCKS_USER)["quota"], quota as u64);
    assert_eq!(row(SOCKS_USER)["manager"], "quota");
    let huser_used = row(HTTP_USER)["used"].as_u64().unwrap();
    assert!(huser_used >= 1_000_010, "{status:#}");
    assert!(row(HTTP_USER)["next_reset_unix"].as_u64().unwrap() > 0);
    // Most used first.
    assert_eq!(quotas[0]["user"], SOCKS_USER);

    // And the page shows them in a real browser.
    let browser = common::browser::chromium();
    let dom = common::browser::run_chromium(
        &browser,
        &stack.certs.dir.path().join("chromium-quotas"),
        &["--dump-dom".into(), format!("http://127.0.0.1:{admin}/")],
    )
    .await;
    let dom = String::from_utf8_lossy(&dom);
    assert!(
        dom.contains(&format!(
            r#"<tr class="quota" data-user="{SOCKS_USER}" data-manager="quota">"#
        )),
        "the page does not list the quota:\n{dom}"
    );
    assert!(dom.contains(r#"<td class="limit">2.0 MiB</td>"#), "{dom}");
    assert!(dom.contains(r#"<td class="bad">100 %</td>"#), "{dom}");
}
