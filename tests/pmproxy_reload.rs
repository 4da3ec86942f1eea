//! SIGHUP on `anyproxy pmproxy`, through the real binary and curl: the rules change
//! live, open sessions and spent quotas survive (same-named managers keep their state),
//! a broken `managers.toml` changes nothing, a removed manager's state goes with it,
//! and `server.toml`'s `forbiddenHosts` applies to the next request.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const QUOTA: usize = 100 * 1024;

/// `managers.toml`: alice's session and quota, and a host matcher the rule denies.
fn managers(blocked_port: u16, quota_name: &str) -> String {
    format!(
        r#"
rules = "session ∧ {quota_name} ∧ ¬blocked"

[mapDB]
name = "users"
userPass = {{ alice = "alicepw" }}
userGroups = {{ alice = ["staff"] }}

[[sessionIPM]]
name = "session"
auth = "users"

[[dwnConsR]]
name = "{quota_name}"
userDBN = "users"
resetCycle = "168h"
[dwnConsR.groupQuota]
staff = "100 KiB"

[[hostMatcher]]
name = "blocked"
pattern = ':{blocked_port}$'
"#
    )
}

struct Pm {
    dir: PathBuf,
    log: PathBuf,
    proc: Proc,
    proxy: String,
    api: String,
    reloads: usize,
}

impl Pm {
    async fn start(dir: &Path, managers: &str) -> Pm {
        let (proxy_port, api_port) = (free_port(), free_port());
        std::fs::write(dir.join("managers.toml"), managers).unwrap();
        std::fs::write(
            dir.join("server.toml"),
            server_toml(proxy_port, api_port, "[]"),
        )
        .unwrap();
        let log = dir.join("pmproxy.log");
        let proc = spawn(&["pmproxy", "--config-dir", dir.to_str().unwrap()], &log);
        wait_for_port(proxy_port).await;
        wait_for_port(api_port).await;
        Pm {
            dir: dir.to_path_buf(),
            log,
            proc,
            proxy: format!("http://127.0.0.1:{proxy_port}"),
            api: format!("https://127.0.0.1:{api_port}/api/cmd"),
            reloads: 0,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `file` in the config dir, sends SIGHUP, and waits for the reload's
    /// outcome (bounded); returns the log written since the previous reload.
    async fn reload(&mut self, file: &str, text: &str) -> String {
        let before = self.log().len();
        std::fs::write(self.dir.join(file), text).unwrap();
        signal(self.proc.0.id().unwrap(), "HUP");
        self.reloads += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let outcomes = log.matches("reloaded").count() + log.matches("reload failed").count();
            if outcomes >= self.reloads {
                return log[before..].to_string();
            }
            assert!(Instant::now() < deadline, "no reload outcome:\n{log}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn login(&self) {
        let cert = self.dir.join("cert.pem");
        let (code, body) = curl(&[
            "--cacert",
            cert.to_str().unwrap(),
            "--noproxy",
            "*",
            "-H",
            "content-type: application/json",
            "--data-binary",
            r#"{"cmd": "open", "cred": {"user": "alice", "pass": "alicepw"}}"#,
            &self.api,
        ])
        .await;
        let body = String::from_utf8_lossy(&body);
        assert!(code == 0 && body.contains("eyJ"), "login: {body}");
    }

    /// `(status, body)` of `GET http://target/path` through the proxy.
    async fn get(&self, target: SocketAddr, path: &str) -> (String, String) {
        curl_status_body(&["-x", &self.proxy, &format!("http://{target}{path}")]).await
    }
}

fn server_toml(proxy_port: u16, api_port: u16, forbidden: &str) -> String {
    let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
        .replace("127.0.0.1:4443", &format!("127.0.0.1:{api_port}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{proxy_port}"));
    let default_forbidden = server
        .lines()
        .find(|l| l.trim_start().starts_with("forbiddenHosts"))
        .expect("the default server.toml lists forbiddenHosts")
        .to_string();
    server.replace(
        &default_forbidden,
        &format!("\tforbiddenHosts = {forbidden}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_rules_and_keeps_sessions_and_spent_quotas() {
    let (a, b) = (http_target().await, http_target().await);
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = Pm::start(tmp.path(), &managers(b.port(), "quota")).await;
    pm.login().await;
    assert_eq!(pm.get(a, "/").await, ("200".into(), "hello".into()));
    let (status, body) = pm.get(b, "/").await;
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("blocked=true"), "{body}");

    // (1) The rule flips: `b` allowed, `a` denied; alice's session survives the swap.
    let log = pm
        .reload("managers.toml", &managers(a.port(), "quota"))
        .await;
    assert!(log.contains("hostMatcher \"blocked\" changed"), "{log}");
    assert_eq!(pm.get(b, "/").await, ("200".into(), "hello".into()));
    let (status, body) = pm.get(a, "/").await;
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("blocked=true"), "{body}");

    // (3) A broken file changes nothing, and the error names the file and the key.
    let broken = managers(b.port(), "quota").replace("\"168h\"", "\"0s\"");
    let log = pm.reload("managers.toml", &broken).await;
    assert!(log.contains("reload failed"), "{log}");
    assert!(
        log.contains("managers.toml") && log.contains("resetCycle"),
        "{log}"
    );
    assert_eq!(pm.get(b, "/").await, ("200".into(), "hello".into()));
    assert_eq!(pm.get(a, "/").await.0, "403");

    // (2) Spend the quota: the download is cut at it, the next request is refused.
    let (code, got) = curl(&["-x", &pm.proxy, &format!("http://{b}/bytes/300000")]).await;
    assert_ne!(code, 0, "a download past the quota is cut");
    assert!(
        got.len() < QUOTA,
        "{} bytes passed a {QUOTA}-byte quota",
        got.len()
    );
    let (status, body) = pm.get(b, "/").await;
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("quota=false"), "{body}");
    // A reload that unblocks everything keeps the same-named quota, spent.
    pm.reload("managers.toml", &managers(1, "quota")).await;
    for t in [a, b] {
        let (status, body) = pm.get(t, "/").await;
        assert_eq!(status, "403", "{body}");
        assert!(body.contains("quota=false"), "{body}");
    }
    // A renamed quota is a new manager: the old one's state goes with it.
    let log = pm.reload("managers.toml", &managers(1, "quota2")).await;
    assert!(log.contains("\"quota\" removed"), "{log}");
    assert_eq!(pm.get(a, "/").await, ("200".into(), "hello".into()));

    // server.toml: forbiddenHosts applies to the next request.
    let ports = |url: &str| {
        url.rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches("/api/cmd")
            .parse::<u16>()
            .unwrap()
    };
    let text = server_toml(ports(&pm.proxy), ports(&pm.api), r#"["127.0.0.0/8"]"#);
    let log = pm.reload("server.toml", &text).await;
    assert!(log.contains("proxy.forbiddenHosts changed"), "{log}");
    let (status, body) = pm.get(a, "/").await;
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("forbidden network"), "{body}");
}

/// 50 SIGHUPs in one burst on a good file: the process stays up, and ends in the new
/// file's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_storm_ends_in_one_consistent_state() {
    let blocking = |port: u16| {
        format!("rules = \"¬blocked\"\n[[hostMatcher]]\nname = \"blocked\"\npattern = ':{port}$'\n")
    };
    let (a, b) = (http_target().await, http_target().await);
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = Pm::start(tmp.path(), &blocking(b.port())).await;
    assert_eq!(pm.get(a, "/").await.0, "200");
    assert_eq!(pm.get(b, "/").await.0, "403");

    std::fs::write(tmp.path().join("managers.toml"), blocking(a.port())).unwrap();
    let pid = pm.proc.0.id().unwrap();
    for _ in 0..50 {
        signal(pid, "HUP");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pm.get(a, "/").await.0 != "403" {
        assert!(Instant::now() < deadline, "never reloaded:\n{}", pm.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pm.get(b, "/").await, ("200".into(), "hello".into()));
    assert!(pm.proc.0.try_wait().unwrap().is_none(), "pmproxy exited");
    assert!(!pm.log().contains("reload failed"), "{}", pm.log());
}
