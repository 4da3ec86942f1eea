//! Interop with the independent Python implementations of the documented JSON protocol
//! (`tests/interop/doc_agent.py`, `tests/interop/doc_gateway.py`, written from the API
//! document alone). Needs `python3` with the `websockets` package, and `curl`.
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    curl, free_port, http_target, pattern, sha256_hex, Stack, StackOptions, AGENT_PASS, AGENT_USER,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIG: usize = 8 * 1024 * 1024;
const UPLOAD: usize = 4 * 1024 * 1024;
const CONCURRENT: usize = 20;

/// A Python helper process (killed on drop): stdout lines are collected in memory,
/// stderr goes to a file, both are shown when a wait fails.
struct PyProc {
    name: &'static str,
    child: Child,
    stdout: Arc<parking_lot::Mutex<String>>,
    stderr_path: PathBuf,
}

impl Drop for PyProc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl PyProc {
    fn spawn(name: &'static str, script: &str, args: &[String], dir: &Path) -> PyProc {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(script)
            .args(args)
            .current_dir(ROOT)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 {script}: {e} (python3 must be installed)"));
        let stdout = Arc::new(parking_lot::Mutex::new(String::new()));
        let lines = child.stdout.take().unwrap();
        let sink = stdout.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(lines).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = sink.lock();
                s.push_str(&line);
                s.push('\n');
            }
        });
        PyProc {
            name,
            child,
            stdout,
            stderr_path,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- {name} stdout ---\n{}\n--- {name} stderr ---\n{}",
            self.stdout.lock(),
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
            name = self.name
        )
    }

    /// Waits for a stdout line starting with `prefix`; `extra` adds logs to the panic.
    async fn wait_for_line(&mut self, prefix: &str, timeout: Duration, extra: impl Fn() -> String) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout.lock().lines().any(|l| l.starts_with(prefix)) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader task a moment to collect the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if self.stdout.lock().lines().any(|l| l.starts_with(prefix)) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before printing {prefix:?}\n{}\n{}",
                    self.name,
                    self.output(),
                    extra()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not print {prefix:?} within {timeout:?}\n{}\n{}",
                    self.name,
                    self.output(),
                    extra()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Runs curl and asserts success; `logs` is shown on failure.
async fn curl_ok(args: &[&str], what: &str, logs: &dyn Fn() -> String) -> Vec<u8> {
    let (code, out) = curl(args).await;
    assert_eq!(
        code,
        0,
        "{what}: curl {args:?} exited with {code}\n{}",
        logs()
    );
    out
}

/// The traffic both tests push through a tunnel. `args` are the curl options selecting
/// the path (proxy or nothing); `base` is the URL prefix of the target.
async fn exercise(args: &[String], base: &str, dir: &Path, logs: &dyn Fn() -> String) {
    let with = |extra: &[&str]| -> Vec<String> {
        args.iter()
            .cloned()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };

    // Small request.
    let t = Instant::now();
    let a = with(&[&format!("{base}/")]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let body = curl_ok(&a, "small GET", logs).await;
    assert_eq!(body, b"hello", "small GET body\n{}", logs());
    eprintln!("small GET ok in {:?}", t.elapsed());

    // 8 MiB download.
    let t = Instant::now();
    let a = with(&[&format!("{base}/bytes/{BIG}")]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let body = curl_ok(&a, "8 MiB download", logs).await;
    assert_eq!(body.len(), BIG, "8 MiB download length\n{}", logs());
    assert_eq!(
        sha256_hex(&body),
        sha256_hex(&pattern(BIG, 7)),
        "8 MiB download hash\n{}",
        logs()
    );
    eprintln!("8 MiB download ok in {:?}", t.elapsed());

    // 4 MiB upload.
    let t = Instant::now();
    let data = pattern(UPLOAD, 11);
    let file = dir.join("upload.bin");
    std::fs::write(&file, &data).unwrap();
    let at_file = format!("@{}", file.display());
    let a = with(&[
        "--data-binary",
        &at_file,
        "-H",
        "Content-Type: application/octet-stream",
        &format!("{base}/sha256"),
    ]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let body = curl_ok(&a, "4 MiB upload", logs).await;
    assert_eq!(
        String::from_utf8_lossy(&body),
        sha256_hex(&data),
        "4 MiB upload hash\n{}",
        logs()
    );
    eprintln!("4 MiB upload ok in {:?}", t.elapsed());

    // Concurrent small requests.
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|i| {
            let a = with(&[&format!("{base}/?n={i}")]);
            tokio::spawn(async move {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                curl(&a).await
            })
        })
        .collect();
    for (i, task) in futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .enumerate()
    {
        let (code, body) = task.unwrap();
        assert_eq!(
            code,
            0,
            "concurrent request {i}: curl exit code\n{}",
            logs()
        );
        assert_eq!(body, b"hello", "concurrent request {i}: body\n{}", logs());
    }
    eprintln!("{CONCURRENT} concurrent requests ok in {:?}", t.elapsed());
}

fn doc_agent_args(stack: &Stack, client_id: &str, flags: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--url".into(),
        format!("wss://localhost:{}/ws", stack.gateway_port),
        "--cafile".into(),
        stack.certs.cert.display().to_string(),
        "--username".into(),
        AGENT_USER.into(),
        "--password".into(),
        AGENT_PASS.into(),
        "--client-id".into(),
        client_id.into(),
    ];
    args.extend(flags.iter().map(|f| f.to_string()));
    args
}

/// Starts a gateway (with `gateway_extra` config lines) and the Python agent (with
/// `flags`), pushes the common traffic through it, and returns the agent's
/// `EXTENSIONS` line: what the handshake negotiated.
async fn doc_agent_round(gateway_extra: &[&str], flags: &[&str]) -> String {
    let started = Instant::now();
    let stack = Stack::start(StackOptions {
        with_agent: false,
        gateway_extra: gateway_extra.iter().map(|l| l.to_string()).collect(),
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let dir = stack.certs.dir.path().to_path_buf();
    let mut agent = PyProc::spawn(
        "doc_agent",
        "tests/interop/doc_agent.py",
        &doc_agent_args(&stack, "py-agent", flags),
        &dir,
    );
    let gateway_log = || format!("--- gateway log ---\n{}", stack.log("gateway"));
    agent
        .wait_for_line("AUTH_OK", Duration::from_secs(20), gateway_log)
        .await;

    // The gateway logs the session once it has answered the auth.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.log("gateway").contains("agent connected") {
        assert!(
            Instant::now() < deadline,
            "gateway never logged \"agent connected\" for the Python agent\n{}\n{}",
            gateway_log(),
            agent.output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = stack.log("gateway");
    let line = log
        .lines()
        .find(|l| l.contains("agent connected"))
        .unwrap_or_default();
    assert!(
        line.contains("py-agent") && line.contains("json"),
        "the Python agent should have been accepted in JSON mode: {line}"
    );
    eprintln!(
        "python agent {flags:?} authenticated after {:?}",
        started.elapsed()
    );

    let logs = || format!("{}\n{}", gateway_log(), agent.output());
    let proxy = stack.http_proxy();
    exercise(
        &["-x".into(), proxy],
        &format!("http://127.0.0.1:{}", target.port()),
        &dir,
        &logs,
    )
    .await;

    // One request through SOCKS5, with the hostname resolved by the agent.
    let socks = stack.socks_auth();
    let url = format!("http://localhost:{}/", target.port());
    let body = curl_ok(&["--socks5-hostname", &socks, &url], "SOCKS5 GET", &logs).await;
    assert_eq!(body, b"hello", "SOCKS5 GET body\n{}", logs());

    let exited = agent.child.try_wait().unwrap();
    assert!(
        exited.is_none(),
        "the Python agent exited during the test ({exited:?})\n{}\n{}",
        gateway_log(),
        agent.output()
    );
    eprintln!("round {flags:?} done in {:?}", started.elapsed());
    let out = agent.stdout.lock().clone();
    out.lines()
        .find_map(|l| l.strip_prefix("EXTENSIONS "))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_doc_agent_serves_curl_through_our_gateway() {
    let extensions = doc_agent_round(&[], &[]).await;
    assert_eq!(extensions, "none");
}

async fn against_doc_gateway(id_style: &str) {
    let started = Instant::now();
    let certs = common::certs();
    let dir = certs.dir.path().to_path_buf();
    let target = http_target().await;
    let (gw_port, fwd_port) = (free_port(), free_port());
    let report = dir.join("report.json");
    let (user, pass) = ("rust-user", "rust-pass");

    let mut gateway = PyProc::spawn(
        "doc_gateway",
        "tests/interop/doc_gateway.py",
        &[
            "--port".into(),
            gw_port.to_string(),
            "--cert".into(),
            certs.cert.display().to_string(),
            "--key".into(),
            certs.key.display().to_string(),
            "--username".into(),
            user.into(),
            "--password".into(),
            pass.into(),
            "--forward".into(),
            format!("{fwd_port}:127.0.0.1:{}", target.port()),
            "--report".into(),
            report.display().to_string(),
            "--ids".into(),
            id_style.into(),
        ],
        &dir,
    );
    gateway
        .wait_for_line("READY", Duration::from_secs(20), String::new)
        .await;

    let config = format!(
        r#"
client:
  gateway_addr: "localhost:{gw_port}"
  allow_local: true
  gateway_tls_cert: "{cert}"
  client_id: "rust-agent"
  auth_username: "{user}"
  auth_password: "{pass}"
  encoding: binary
  reconnect_min: 100ms
  reconnect_max: 1s
  ping_interval: 1s
"#,
        cert = certs.cert.display(),
    );
    let config_path = dir.join("client.yaml");
    std::fs::write(&config_path, config).unwrap();
    let agent_log = dir.join("agent.log");
    let _agent = common::spawn(
        &["client", "--config", config_path.to_str().unwrap()],
        &agent_log,
    );
    let our_log = || {
        format!(
            "--- our agent log ---\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        )
    };
    gateway
        .wait_for_line("AGENT_AUTHED", Duration::from_secs(20), our_log)
        .await;
    eprintln!("our agent authenticated after {:?}", started.elapsed());
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("authenticated to the gateway"))
    {
        assert!(
            line.contains("json"),
            "our agent should have fallen back to JSON: {line}"
        );
    }

    let logs = || format!("{}\n{}", our_log(), gateway.output());
    exercise(&[], &format!("http://127.0.0.1:{fwd_port}"), &dir, &logs).await;

    // The target closes first (`Connection: close`) while our TCP client keeps its side
    // open, so the agent must send `close` and the gateway must then end the connection.
    for i in 0..3 {
        let t = Instant::now();
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", fwd_port))
            .await
            .unwrap_or_else(|e| panic!("connect to forward port: {e}\n{}", logs()));
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut response))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "target-closed request {i}: no EOF within 10 s (got {:?})\n{}",
                    String::from_utf8_lossy(&response),
                    logs()
                )
            })
            .unwrap_or_else(|e| panic!("target-closed request {i}: {e}\n{}", logs()));
        let text = String::from_utf8_lossy(&response);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
            "target-closed request {i}: unexpected response {text:?}\n{}",
            logs()
        );
        eprintln!("target-closed request {i} ok in {:?}", t.elapsed());
    }

    // Wait (bounded) until the report, rewritten every second, counts at least one of
    // each message kind below (an agent ping included), instead of sleeping a guess.
    let kinds = ["auth", "connect_response", "data", "close", "ping"];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let complete = std::fs::read_to_string(&report)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|r| {
                kinds
                    .iter()
                    .all(|k| r["received"][k].as_u64().unwrap_or(0) >= 1)
            });
        if complete || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("read {}: {e}\n{}", report.display(), logs()));
    let rep: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parse report: {e}\n{text}\n{}", logs()));
    let violations = rep["violations"].as_array().cloned().unwrap_or_default();
    assert!(
        rep["violations"].is_array() && violations.is_empty(),
        "the Python gateway reported {} protocol violation(s):\n{}\nreport: {text}\n{}",
        rep["violation_count"],
        violations
            .iter()
            .map(|v| format!("  - {v}"))
            .collect::<Vec<_>>()
            .join("\n"),
        logs()
    );
    for kind in kinds {
        let n = rep["received"][kind].as_u64().unwrap_or(0);
        assert!(
            n >= 1,
            "report: expected at least one {kind:?} message from our agent, got {n}\nreport: {text}\n{}",
            logs()
        );
    }
    let warnings = rep["warnings"].as_array().cloned().unwrap_or_default();
    if !warnings.is_empty() {
        eprintln!("doc_gateway warnings: {warnings:?}");
    }
    eprintln!("received: {}", rep["received"]);
    eprintln!("test done in {:?}", started.elapsed());
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_with_permessage_deflate_against_our_gateway() {
    let takeover = "deflate: { enabled: true, no_context_takeover: false }";
    // The gateway does not compress unless configured to: the offer is declined.
    let ext = doc_agent_round(&[], &["--deflate"]).await;
    assert_eq!(ext, "none");
    // Both sides keep their compression context across messages.
    let ext = doc_agent_round(&[takeover], &["--deflate"]).await;
    assert!(ext.starts_with("permessage-deflate"), "{ext}");
    assert!(!ext.contains("no_context_takeover"), "{ext}");
    // The gateway's default: every message compressed on its own, both ways.
    let ext = doc_agent_round(&["deflate: { enabled: true }"], &["--deflate"]).await;
    assert!(ext.contains("server_no_context_takeover"), "{ext}");
    assert!(ext.contains("client_no_context_takeover"), "{ext}");
    // The peer asks for no context takeover and a 1 KiB window, and fragments its
    // messages (the first fragment carries RSV1, the rest continue the deflate stream).
    let ext = doc_agent_round(
        &[takeover],
        &[
            "--deflate",
            "--no-context-takeover",
            "--max-window-bits",
            "10",
            "--fragment",
            "1000",
        ],
    )
    .await;
    assert!(ext.contains("server_no_context_takeover"), "{ext}");
    assert!(ext.contains("server_max_window_bits=10"), "{ext}");
    // Fragmented, uncompressed messages from a peer that offers nothing.
    let ext = doc_agent_round(&["deflate: { enabled: true }"], &["--fragment", "700"]).await;
    assert_eq!(ext, "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflate_bomb_closes_only_its_own_session_with_1009() {
    let stack = Stack::start(StackOptions {
        gateway_extra: vec!["deflate: { enabled: true }".into()],
        ..Default::default()
    })
    .await;
    let target = http_target().await;
    let dir = stack.certs.dir.path().to_path_buf();
    // 64 MiB of one character deflates to a few tens of KiB; the gateway's limit on a
    // message is 2 MiB, decompressed.
    let bomb = (64usize << 20).to_string();
    let mut bomber = PyProc::spawn(
        "doc_agent_bomb",
        "tests/interop/doc_agent.py",
        &doc_agent_args(&stack, "bomber", &["--deflate", "--bomb", &bomb]),
        &dir,
    );
    let gateway_log = || format!("--- gateway log ---\n{}", stack.log("gateway"));
    bomber
        .wait_for_line("CLOSED", Duration::from_secs(30), gateway_log)
        .await;
    let out = bomber.stdout.lock().clone();
    assert!(
        out.contains("EXTENSIONS permessage-deflate"),
        "deflate was not negotiated:\n{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("CLOSED 1009")),
        "expected close code 1009:\n{out}\n{}",
        gateway_log()
    );
    // The gateway's own agent session is untouched and keeps carrying traffic.
    let (code, body) = curl(&[
        "-x",
        &stack.http_proxy(),
        &format!("http://127.0.0.1:{}/bytes/1000000", target.port()),
    ])
    .await;
    assert_eq!(code, 0, "{}", gateway_log());
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(1_000_000, 7)));
    assert!(
        !stack.log("agent").contains("disconnected"),
        "the innocent agent lost its session:\n{}",
        stack.log("agent")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_against_python_doc_gateway() {
    against_doc_gateway("numeric").await
}

/// The document makes `connection_id` a string: a gateway that uses UUIDs is served
/// the same way, and answered with its own strings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_against_a_doc_gateway_that_uses_uuid_ids() {
    against_doc_gateway("uuid").await
}
