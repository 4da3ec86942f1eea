//! The `http` authentication backend through the real binary, curl and a small
//! Python hook (`http.server`) started here: alice allowed into `office` (carried by
//! office's agent), bob denied with a reason that reaches the access log, an agent
//! joining through the hook, a hanging hook and a failing one refused with 503 naming
//! the backend (and counted on `/metrics`), the cache TTL honoured, and a locked-out
//! address that no longer reaches the hook.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const OFFICE_SECRET: &str = "office-secret";

/// The hook: appends `kind username` to the calls file, then answers by user name.
const HOOK: &str = r#"
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        q = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(sys.argv[2], "a") as calls:
            calls.write(q["kind"] + " " + q["username"] + "\n")
        user, password = q["username"], q["password"]
        if user == "hang":
            time.sleep(30)
        if user == "boom":
            self.send_response(500); self.end_headers(); return
        if (user, password, q["kind"]) in [("alice", "alice-pw", "proxy"), ("office", "hooked-pw", "agent")]:
            answer = {"allow": True, "group": "office"}
        elif (user, password) == ("dora", "dora-pw"):
            answer = {"allow": True}
        elif user == "bob":
            answer = {"allow": False, "reason": "bob is on leave"}
        else:
            answer = {"allow": False}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Hook)
if len(sys.argv) > 4:
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[3], sys.argv[4])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

struct Hook {
    _proc: Proc,
    port: u16,
    calls: PathBuf,
}

impl Hook {
    async fn start(dir: &Path) -> Hook {
        Self::start_with(dir, None).await
    }

    /// `tls`: the certificate and key the hook serves https with.
    async fn start_with(dir: &Path, tls: Option<(&Path, &Path)>) -> Hook {
        let script = dir.join("hook.py");
        std::fs::write(&script, HOOK).unwrap();
        let calls = dir.join("calls.txt");
        std::fs::write(&calls, "").unwrap();
        let port = free_port();
        let child = tokio::process::Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(&calls)
            .args(
                tls.map(|(c, k)| [c.to_owned(), k.to_owned()])
                    .into_iter()
                    .flatten(),
            )
            .kill_on_drop(true)
            .spawn()
            .expect("python3");
        wait_for_port(port).await;
        Hook {
            _proc: Proc(child),
            port,
            calls,
        }
    }

    /// How many times the hook was asked about `kind user`.
    fn calls(&self, kind: &str, user: &str) -> usize {
        let want = format!("{kind} {user}");
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == want)
            .count()
    }

    fn backend(&self, ttl: &str) -> String {
        format!(
            "auth_backends:\n    hook:\n      type: http\n      url: \"http://127.0.0.1:{}/auth\"\n      timeout: 1s\n      cache_ttl: {ttl}",
            self.port
        )
    }
}

const TTL: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_decides_who_gets_in_and_its_outages_are_503() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::start(dir.path()).await;
    let admin = free_port();
    // The stack's own agent (default group) may not reach loopback.
    let stack = Stack::start(StackOptions {
        forbidden_hosts: vec!["127.0.0.0/8".into(), "localhost".into()],
        gateway_extra: vec![
            format!("groups:\n    - {{ id: office, agent_password: {OFFICE_SECRET} }}"),
            hook.backend("3s"),
            "agent_auth: [static, hook]".into(),
            format!("admin_addr: \"127.0.0.1:{admin}\""),
        ],
        listener_extra: vec!["auth: [static, hook]".into()],
        ..Default::default()
    })
    .await;
    // An agent of office whose password only the hook knows.
    let _office = stack.spawn_group_agent("office-1", "office", "hooked-pw", "");
    stack.wait_for_log("gateway", "group=office", 1).await;
    assert_eq!(hook.calls("agent", "office"), 1);
    let target = http_target().await;
    let url = format!("http://127.0.0.1:{}/", target.port());

    // alice: allowed into office, whose agent reaches the target.
    let first = Instant::now();
    let (code, body) = curl(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
    // The allow is cached: quick repeats do not ask the hook again.
    for _ in 0..5 {
        let status = curl_status(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await;
        assert_eq!(status, "200");
    }
    if first.elapsed() < TTL {
        assert_eq!(hook.calls("proxy", "alice"), 1);
    }
    // ... until the TTL has passed.
    tokio::time::sleep((TTL + Duration::from_millis(500)).saturating_sub(first.elapsed())).await;
    let calls = hook.calls("proxy", "alice");
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await,
        "200"
    );
    assert_eq!(hook.calls("proxy", "alice"), calls + 1);

    // bob: denied, asked again (407), the hook's reason in the access log; denials
    // are not cached.
    for _ in 0..2 {
        let status = curl_status(&["-x", &stack.http_proxy_as("bob", "bob-pw"), &url]).await;
        assert_eq!(status, "407");
    }
    assert_eq!(hook.calls("proxy", "bob"), 2);
    stack.wait_for_log("gateway", "bob is on leave", 2).await;

    // A hook that hangs hits the timeout, one that answers 500 is no answer either:
    // 503 naming the backend, not 407.
    let (status, body) = curl_status_body(&["-x", &stack.http_proxy_as("hang", "x"), &url]).await;
    assert_eq!(status, "503", "{body}");
    assert!(body.contains("\"hook\" unavailable"), "{body}");
    let (status, body) = curl_status_body(&["-x", &stack.http_proxy_as("boom", "x"), &url]).await;
    assert_eq!(status, "503", "{body}");
    assert!(body.contains("HTTP 500"), "{body}");
    // SOCKS5 says so with its one failure status.
    assert!(matches!(
        stack.socks5_as("boom", "x", target).await,
        Err(Socks5Refusal::Auth(1))
    ));
    let metrics = admin_get(admin, "/metrics", None).await.1;
    let hook_labels = [("backend", "hook"), ("type", "http")];
    assert_eq!(
        metric(&metrics, "anyproxy_auth_backend_up", &hook_labels),
        0.0
    );
    assert!(metric(&metrics, "anyproxy_auth_backend_errors_total", &hook_labels) >= 3.0);
    assert!(
        metric(
            &metrics,
            "anyproxy_auth_backend_latency_seconds_count",
            &hook_labels
        ) >= 5.0
    );
    assert!(
        !stack.log("gateway").contains("alice-pw"),
        "a password reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_out_address_never_reaches_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Hook::start(dir.path()).await;
    let stack = Stack::start(StackOptions {
        gateway_extra: vec![
            hook.backend("30s"),
            "limits:\n    proxy_auth: { max_failures: 5, window: 1m, lockout: 1m }".into(),
        ],
        listener_extra: vec!["auth: [hook]".into()],
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let url = format!("http://127.0.0.1:{}/", target.port());
    for _ in 0..5 {
        let status = curl_status(&["-x", &stack.http_proxy_as("mallory", "guess"), &url]).await;
        assert_eq!(status, "407");
    }
    assert_eq!(hook.calls("proxy", "mallory"), 5);
    // Locked out: refused unchecked, over HTTP and SOCKS5, even with a good password.
    for _ in 0..5 {
        let status = curl_status(&["-x", &stack.http_proxy_as("mallory", "guess"), &url]).await;
        assert_eq!(status, "429");
    }
    assert_eq!(
        curl_status(&["-x", &stack.http_proxy_as("alice", "alice-pw"), &url]).await,
        "429"
    );
    assert!(stack.socks5_as("mallory", "guess", target).await.is_err());
    assert_eq!(hook.calls("proxy", "mallory"), 5);
    assert_eq!(hook.calls("proxy", "alice"), 0);
}

/// A hook over https: trusted through the CA given (the test's own certificate), or
/// pinned by its fingerprint; without either (the public web roots), or with another
/// fingerprint, the hook is unavailable, never trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_hook_is_trusted_only_through_its_ca_or_its_fingerprint() {
    use anyproxy::auth::{Attempt, Authenticator, Kind};

    let dir = tempfile::tempdir().unwrap();
    let certs = certs();
    let hook = Hook::start_with(dir.path(), Some((&certs.cert, &certs.key))).await;
    let url = format!("https://127.0.0.1:{}/auth", hook.port);
    let der = anyproxy::transport::tls::load_certs(&certs.cert).unwrap();
    let pin = anyproxy::transport::tls::fingerprint_hex(der[0].as_ref());
    let target = http_target().await;
    let target_url = format!("http://127.0.0.1:{}/", target.port());
    let trusts = [
        format!("ca: \"{}\"", certs.cert.display()),
        format!("fingerprint: \"{pin}\""),
    ];
    for (n, trust) in trusts.iter().enumerate() {
        let stack = Stack::start(StackOptions {
            gateway_extra: vec![format!(
                "auth_backends:\n    hook:\n      type: http\n      url: \"{url}\"\n      {trust}"
            )],
            listener_extra: vec!["auth: [hook]".into()],
            ..Default::default()
        })
        .await;
        let (code, body) =
            curl(&["-x", &stack.http_proxy_as("dora", "dora-pw"), &target_url]).await;
        assert_eq!((code, body.as_slice()), (0, &b"hello"[..]), "{trust}");
        assert_eq!(hook.calls("proxy", "dora"), n + 1, "{trust}");
    }
    let pinned_elsewhere =
        anyproxy::transport::tls::gateway_client_config(None, Some([0u8; 32]), None).unwrap();
    let wrong_pin = anyproxy::auth::hook::HookBackend::new(
        "hook",
        &url,
        Duration::from_secs(3),
        Some(pinned_elsewhere),
    )
    .unwrap();

    let web_roots = anyproxy::transport::tls::client_config(None).unwrap();
    let untrusted = anyproxy::auth::hook::HookBackend::new(
        "hook",
        &url,
        Duration::from_secs(3),
        Some(web_roots),
    )
    .unwrap();
    let attempt = Attempt {
        kind: Kind::Proxy,
        username: "dora",
        password: "dora-pw",
        client_ip: None,
        client_id: None,
        listener: "http",
    };
    let e = untrusted.check(&attempt).await.unwrap_err();
    assert!(e.message.contains("TLS"), "{e}");
    let e = wrong_pin.check(&attempt).await.unwrap_err();
    assert!(e.message.contains("TLS"), "{e}");
    assert_eq!(hook.calls("proxy", "dora"), 2);
}
