//! Fault injection through the real binaries: a killed agent, a frozen gateway, slow
//! readers both ways, an exhausted descriptor table, a resolver that cannot answer.
//! Each test states the guarantee it shows. Loopback only; every wait is bounded and
//! no test asserts how long anything took.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const OFFICE_SECRET: &str = "office-agent-secret";

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn pid(proc: &Proc) -> u32 {
    proc.0.id().expect("process still running")
}

/// curl in the background with its body written to `out` (so progress can be
/// watched); resolves to curl's exit code. curl's own --max-time 60 bounds it.
fn curl_to_file(args: Vec<String>, out: &Path) -> tokio::task::JoinHandle<i32> {
    let out = out.to_str().unwrap().to_owned();
    tokio::spawn(async move {
        let mut all: Vec<&str> = vec!["-o", &out];
        all.extend(args.iter().map(String::as_str));
        curl(&all).await.0
    })
}

/// Reads until the stream ends: `(bytes read, Ok)` for a clean end of stream,
/// `(bytes read, Err)` for an error; panics if neither happens within `limit`.
async fn read_to_the_end(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (usize, std::io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    let end = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => total += n,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the connection neither ended nor failed: it hangs");
    (total, end)
}

/// Guarantee: when an agent dies (SIGKILL) in the middle of transfers, every user of
/// that agent sees an error — curl through CONNECT exits non-zero with a short body,
/// a raw SOCKS5 stream and a raw CONNECT tunnel get a reset, never a clean end of stream that would pass
/// for a complete transfer — while a user whose connection runs through another
/// agent (another group) is untouched: their transfer completes byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_transfer_fails_its_users_and_spares_other_agents_users() {
    let mut stack = Stack::start(StackOptions {
        gateway_extra: vec![format!(
            "groups:\n    - {{ id: office, agent_password: {OFFICE_SECRET}, users: [{{ username: alice, password: alice-pw }}] }}"
        )],
        ..StackOptions::default()
    })
    .await;
    let _office = stack.spawn_group_agent("office-1", "office", OFFICE_SECRET, "");
    stack.wait_for_log("gateway", "group=office", 1).await;
    let target = http_target().await;
    // 200 chunks of 16 KiB, one per 50 ms: about 10 s, so all three are mid-transfer
    // when the agent dies, even on a slow machine.
    const CHUNKS: usize = 200;
    let full = CHUNKS * SLOW_CHUNK;
    let url = format!("http://{target}/slow/{CHUNKS}/50");
    let dir = stack.certs.dir.path().to_path_buf();

    // Two users of the default group's agent: curl through CONNECT, a raw SOCKS5 stream.
    let connect_out = dir.join("connect.out");
    let connect = curl_to_file(
        vec!["-p".into(), "-x".into(), stack.http_proxy(), url.clone()],
        &connect_out,
    );
    let mut raw = stack.socks5_to(target).await.expect("socks5 connect");
    raw.write_all(format!("GET /slow/{CHUNKS}/50 HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 2 * SLOW_CHUNK];
    tokio::time::timeout(Duration::from_secs(20), raw.read_exact(&mut head))
        .await
        .expect("the raw transfer starts")
        .unwrap();
    // A raw CONNECT tunnel of the same agent: HTTP cannot say "failed" once the tunnel
    // is up, so only a reset tells this user the stream broke.
    let mut tunnel = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .unwrap();
    tunnel
        .write_all(
            format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {}\r\n\r\n",
                basic(HTTP_USER, HTTP_PASS)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut established = Vec::new();
    while !established.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(20), tunnel.read_exact(&mut byte))
            .await
            .expect("the proxy answers CONNECT")
            .unwrap();
        established.push(byte[0]);
    }
    assert!(
        established.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&established)
    );
    tunnel
        .write_all(format!("GET /slow/{CHUNKS}/50 HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut tunnel_head = vec![0u8; 2 * SLOW_CHUNK];
    tokio::time::timeout(Duration::from_secs(20), tunnel.read_exact(&mut tunnel_head))
        .await
        .expect("the tunnelled transfer starts")
        .unwrap();
    // A user of the office agent, through CONNECT as alice.
    let office_out = dir.join("office.out");
    let alice = format!("http://alice:alice-pw@127.0.0.1:{}", stack.http_port);
    let office = curl_to_file(
        vec!["-p".into(), "-x".into(), alice, url.clone()],
        &office_out,
    );
    wait_until(
        "both curl transfers are under way",
        Duration::from_secs(20),
        || {
            file_len(&connect_out) >= 2 * SLOW_CHUNK as u64
                && file_len(&office_out) >= 2 * SLOW_CHUNK as u64
        },
    )
    .await;

    let mut agent = stack.agent.take().unwrap();
    agent.0.start_kill().unwrap();
    let _ = agent.0.wait().await;

    let (more, end) = read_to_the_end(&mut raw, Duration::from_secs(30)).await;
    let err = end.expect_err("the raw SOCKS5 user saw a clean end of stream after the agent died");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(head.len() + more < full + 200, "more than the whole body?");
    let (_, end) = read_to_the_end(&mut tunnel, Duration::from_secs(30)).await;
    let err = end.expect_err("the raw CONNECT user saw a clean end of stream after the agent died");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    let code = tokio::time::timeout(Duration::from_secs(90), connect)
        .await
        .expect("curl through the killed agent ends")
        .unwrap();
    assert_ne!(code, 0, "curl reported success through the killed agent");
    assert!(
        file_len(&connect_out) < full as u64,
        "the killed agent's transfer was complete"
    );

    let code = tokio::time::timeout(Duration::from_secs(90), office)
        .await
        .expect("the office transfer ends")
        .unwrap();
    assert_eq!(code, 0, "the other agent's transfer failed");
    let got = std::fs::read(&office_out).unwrap();
    assert_eq!(got.len(), full);
    assert!(
        got == pattern(SLOW_CHUNK, 7).repeat(CHUNKS),
        "the other agent's transfer is not byte-exact"
    );
}

/// An RFC 7617 `Basic` credential.
fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// Sends SIGCONT when dropped, so a failing assertion never leaves a frozen process.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Guarantee: a gateway frozen (SIGSTOP) for 10 s is detected by its agent's heartbeat
/// (`idle_timeout`), and after SIGCONT the agent reconnects and a new request succeeds;
/// nothing hangs: the transfer in flight when it froze and a request made while it
/// was frozen both end (each bounded), the former with an error, not a short success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_is_left_by_its_agent_which_reconnects_after_it_thaws() {
    let heartbeat = vec![
        "ping_interval: 500ms".to_string(),
        "idle_timeout: 2s".into(),
    ];
    let stack = Stack::start(StackOptions {
        gateway_extra: heartbeat.clone(),
        client_extra: heartbeat,
        ..StackOptions::default()
    })
    .await;
    let target = http_target().await;
    let gateway = pid(&stack.gateway);
    // 200 chunks, one per 100 ms: 20 s, longer than the freeze.
    let full = 200 * SLOW_CHUNK;
    let inflight_out = stack.certs.dir.path().join("inflight.out");
    let inflight = curl_to_file(
        vec![
            "--socks5-hostname".into(),
            stack.socks_auth(),
            format!("http://{target}/slow/200/100"),
        ],
        &inflight_out,
    );
    wait_until("the transfer is under way", Duration::from_secs(20), || {
        file_len(&inflight_out) >= SLOW_CHUNK as u64
    })
    .await;

    signal(gateway, "STOP");
    let thaw = Thaw(gateway);
    let frozen = Instant::now();
    stack.wait_for_log("agent", "peer silent", 1).await;
    // A request made while the gateway is frozen: the kernel accepts the connection,
    // nobody answers until SIGCONT.
    let during = tokio::spawn({
        let proxy = stack.http_proxy();
        let url = format!("http://{target}/");
        async move { curl_status(&["--max-time", "30", "-x", &proxy, &url]).await }
    });
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(frozen.elapsed())).await;
    drop(thaw);

    let code = tokio::time::timeout(Duration::from_secs(90), inflight)
        .await
        .expect("the in-flight transfer hangs after the thaw")
        .unwrap();
    assert_ne!(code, 0, "the in-flight transfer reported success");
    assert!(file_len(&inflight_out) < full as u64);
    let status = tokio::time::timeout(Duration::from_secs(90), during)
        .await
        .expect("the request made during the freeze hangs")
        .unwrap();
    eprintln!("request made during the freeze ended with HTTP status {status:?}");

    stack.wait_for_log("gateway", "agent connected", 2).await;
    let (code, body) = curl(&["-x", &stack.http_proxy(), &format!("http://{target}/")]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
}

/// Accepts one connection and never reads from it (held until the test ends).
async fn black_hole_target() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((s, _)) = listener.accept().await {
            tokio::time::sleep(Duration::from_secs(300)).await;
            drop(s);
        }
    });
    addr
}

/// The bound the slow-reader test asserts on each process's RSS growth. With
/// `max_window: 1MiB` a stalled connection holds at most one window in the receiving
/// process's inbox plus one 64 KiB read buffer and a WebSocket batch (≤ 256 KiB) on
/// the way (ARCHITECTURE.md, flow control): about 1.3 MiB per stalled connection, so
/// 2.6 MiB for the two. 16 MiB leaves room for allocator noise and debug builds while
/// 1 GiB (down) and 256 MiB (up) are on offer.
const STALL_RSS_BOUND: u64 = 16 << 20;

/// Guarantee: slow readers cost one window each, in either direction: a user that
/// stops reading while the target sends 1 GiB, and a target that stops reading while
/// the user uploads 256 MiB, grow neither the gateway's nor the agent's RSS by more
/// than [`STALL_RSS_BOUND`], and meanwhile other connections on the same session
/// move data both ways, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_in_both_directions_hold_one_window_each_and_block_nobody() {
    let extra = vec!["max_window: 1MiB".to_string()];
    let stack = Stack::start(StackOptions {
        gateway_extra: extra.clone(),
        client_extra: extra,
        ..StackOptions::default()
    })
    .await;
    let plain = http_target().await;
    let proxy = stack.http_proxy();
    let (gateway, agent) = (pid(&stack.gateway), pid(stack.agent.as_ref().unwrap()));
    // Warm both processes up with the same kind of traffic, so the baseline holds
    // the allocator's working set, not a cold start.
    let (code, _) = curl(&["-p", "-x", &proxy, &format!("http://{plain}/bytes/4000000")]).await;
    assert_eq!(code, 0);
    let warm = stack.certs.dir.path().join("warm.bin");
    std::fs::write(&warm, pattern(4_000_000, 11)).unwrap();
    let upload = format!("@{}", warm.display());
    let (code, _) = curl(&[
        "-p",
        "-x",
        &proxy,
        "--data-binary",
        &upload,
        &format!("http://{plain}/sha256"),
    ])
    .await;
    assert_eq!(code, 0);
    let (gateway_before, agent_before) = (rss_bytes(gateway), rss_bytes(agent));

    // Down: the target pours, the user never reads.
    let poured = Arc::new(AtomicU64::new(0));
    let hose = firehose_target(poured.clone(), Arc::new(pattern(1 << 20, 5))).await;
    let _reader = stack.socks5_to(hose).await.expect("socks5 connect");
    // Up: the user pours, the target never reads.
    let hole = black_hole_target().await;
    let writer_stream = stack.socks5_to(hole).await.expect("socks5 connect");
    let pushed = Arc::new(AtomicU64::new(0));
    let uploader = tokio::spawn({
        let pushed = pushed.clone();
        let block = pattern(1 << 20, 6);
        async move {
            let mut s = writer_stream;
            for _ in 0..256 {
                if s.write_all(&block).await.is_err() {
                    return s;
                }
                pushed.fetch_add(block.len() as u64, Ordering::Relaxed);
            }
            s
        }
    });
    let down = wait_until_still(&poured).await;
    let up = wait_until_still(&pushed).await;
    let gateway_growth = rss_bytes(gateway).saturating_sub(gateway_before);
    let agent_growth = rss_bytes(agent).saturating_sub(agent_before);
    eprintln!(
        "stalled: target pushed {down} B down, user pushed {up} B up; RSS growth gateway {gateway_growth} B, agent {agent_growth} B"
    );
    assert!(
        down > 0 && up > 0,
        "a stalled connection never carried anything"
    );
    assert!(
        down < 1 << 30 && up < 256 << 20,
        "a stalled connection took everything"
    );
    assert!(
        gateway_growth < STALL_RSS_BOUND,
        "gateway grew {gateway_growth} B with two stalled connections"
    );
    assert!(
        agent_growth < STALL_RSS_BOUND,
        "agent grew {agent_growth} B with two stalled connections"
    );

    // Meanwhile the same session carries other connections both ways, byte-exact.
    const N: usize = 16 << 20;
    let (code, body) = curl(&["-p", "-x", &proxy, &format!("http://{plain}/bytes/{N}")]).await;
    assert_eq!(code, 0, "a download was blocked by the stalled connections");
    assert_eq!(body.len(), N);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(N, 7)));
    let big = stack.certs.dir.path().join("big.bin");
    let data = pattern(N, 12);
    std::fs::write(&big, &data).unwrap();
    let upload = format!("@{}", big.display());
    let (code, digest) = curl(&[
        "-x",
        &proxy,
        "--data-binary",
        &upload,
        &format!("http://{plain}/sha256"),
    ])
    .await;
    assert_eq!(code, 0, "an upload was blocked by the stalled connections");
    assert_eq!(String::from_utf8_lossy(&digest), sha256_hex(&data));
    uploader.abort();
}

/// User + system CPU ticks of a process (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// Guarantee: a gateway out of file descriptors keeps running: it logs why it cannot
/// accept (`Too many open files`), does not spin while the table stays full (under
/// half a core, measured over a 3 s window), and serves again once connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_out_of_descriptors_says_why_does_not_spin_and_recovers() {
    let stack = Stack::start(StackOptions::default()).await;
    let target = http_target().await;
    let url = format!("http://{target}/");
    let gateway = pid(&stack.gateway);
    let (code, body) = curl(&["-x", &stack.http_proxy(), &url]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
    let baseline = fd_count(gateway);
    // Room for 16 more descriptors than it has now.
    let limit = baseline + 16;
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &gateway.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux) must be installed");
    assert!(status.success(), "prlimit --pid {gateway} failed");

    // Idle connections to the HTTP proxy until the gateway cannot accept any more;
    // the kernel queues the rest in the listen backlog.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
                .await
                .unwrap(),
        );
    }
    stack
        .wait_for_log("gateway", "Too many open files", 1)
        .await;
    assert!(stack.log("gateway").contains("accept failed"));

    let hz = clock_ticks_per_second();
    let before = cpu_ticks(gateway);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(gateway) - before;
    eprintln!(
        "gateway with a full descriptor table ({} open, limit {limit}): {used} ticks in 3 s ({hz}/s)",
        fd_count(gateway)
    );
    assert!(
        used * 2 < 3 * hz,
        "the gateway spins when out of descriptors: {used} ticks in 3 s"
    );

    drop(held);
    wait_until(
        "the gateway's descriptors return to their baseline",
        Duration::from_secs(30),
        || fd_count(gateway) <= baseline + 2,
    )
    .await;
    let (code, body) = curl(&["-x", &stack.http_proxy(), &url]).await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
}

/// Guarantee: when the agent cannot resolve a target name, the user learns it as a
/// DNS failure within the agent's `dial_timeout`: HTTP 502 whose reason says `dns:`
/// (absolute-form and CONNECT), SOCKS5 reply 4 (host unreachable). The agent runs
/// with `RES_OPTIONS=timeout:1 attempts:1`, so even where the machine's nameserver
/// is unreachable and silent the resolver gives up before `dial_timeout` (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_agent_cannot_resolve_fails_as_dns_within_dial_timeout() {
    let stack = Stack::start(StackOptions {
        with_agent: false,
        ..StackOptions::default()
    })
    .await;
    let dir = stack.certs.dir.path();
    let config = format!(
        "client:\n  gateway_addr: \"localhost:{port}\"\n  allow_local: true\n  gateway_tls_cert: \"{cert}\"\n  client_id: \"dns-agent\"\n  auth_username: \"{AGENT_USER}\"\n  auth_password: \"{AGENT_PASS}\"\n  dial_timeout: 5s\n  reconnect_min: 100ms\n  reconnect_max: 1s\n",
        port = stack.gateway_port,
        cert = stack.certs.cert.display(),
    );
    let path = dir.join("dns-agent.yaml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let _agent = Proc(
        tokio::process::Command::new(BIN)
            .args(["client", "--config", path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env("RES_OPTIONS", "timeout:1 attempts:1")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn anyproxy"),
    );
    stack.wait_for_agent().await;

    let bound = Duration::from_secs(5 + 20);
    let url = "http://nonexistent.invalid/";
    let (status, body) =
        tokio::time::timeout(bound, curl_status_body(&["-x", &stack.http_proxy(), url]))
            .await
            .expect("the HTTP proxy answers");
    assert_eq!(status, "502", "{body}");
    assert!(body.contains("dns:"), "no dns: reason in {body:?}");

    let connect = tokio::time::timeout(
        bound,
        curl_connect_status(&["-x", &stack.http_proxy(), "http://nonexistent.invalid:443/"]),
    )
    .await
    .expect("the CONNECT is answered");
    assert_eq!(connect, "502");

    let socks = tokio::time::timeout(
        bound,
        socks5_stream(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "nonexistent.invalid",
            80,
        ),
    )
    .await
    .expect("the SOCKS5 request is answered");
    assert_eq!(socks.err(), Some(Socks5Refusal::Reply(4)));

    stack.wait_for_log("gateway", "dns:", 3).await;
}
