//! The policy engine guarding the gateway's proxy front ends: rules decide every request
//! through the tunnel, and a download quota cuts the transfer that crosses it.

mod common;

use common::*;

/// Rules: `huser` may go anywhere but the blocked target while under a 2 MiB quota.
fn managers(blocked_port: u16) -> String {
    format!(
        r#"
rules = "quota ∧ ¬blocked"

[mapDB]
name = "users"
[mapDB.userPass]
huser = "unused-here"
suser = "unused-here"
[mapDB.userGroups]
huser = ["staff"]
suser = ["staff"]

[[hostMatcher]]
name = "blocked"
pattern = ':{blocked_port}$'

[[dwnConsR]]
name = "quota"
userDBN = "users"
resetCycle = "24h"
[dwnConsR.groupQuota]
staff = "2 MB"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_decide_each_request_and_the_quota_cuts_the_download_that_crosses_it() {
    let allowed = http_target().await;
    let blocked = http_target().await;
    let dir = tempfile::tempdir().unwrap();
    let managers_path = dir.path().join("managers.toml");
    std::fs::write(&managers_path, managers(blocked.port())).unwrap();
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![format!(
            "policy: {{ managers: \"{}\", state_dir: \"{}\" }}",
            managers_path.display(),
            dir.path().display()
        )],
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
}
