//! Soak: one gateway and one agent under a steady mix of work for N minutes, with
//! deliberate restarts of each; a row of /proc figures per minute; a verdict on growth
//! and on failures no restart explains. The rules are in loadtest/README.md ("soak").
//!
//! The run has two halves so that each process is judged over a long life of its own:
//! in the first half the **agent** is restarted periodically and the gateway is judged
//! (checkpoint A after warm-up → checkpoint B at half time); in the second half the
//! **gateway** is restarted periodically and the agent, which reconnects each time, is
//! judged (B → C at the end). A checkpoint stops all work, waits until both processes'
//! descriptor counts settle, and samples them quiet, so descriptors compare exactly.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::procs;
use crate::report::{Cell, Report, Table};
use crate::socks5::Dial;
use crate::stack::{Stack, StackOptions, HTTP_PASS, HTTP_USER, SOCKS_PASS, SOCKS_USER};
use crate::{targets, Env};

/// Descriptors a judged process may have gained between its two quiet checkpoints.
pub const FD_SLACK: i64 = 8;
/// RSS a judged process may have gained between its two quiet checkpoints: the larger
/// of this many KiB and `RSS_SLACK_PCT` percent of its first figure.
pub const RSS_SLACK_KIB: u64 = 16 * 1024;
pub const RSS_SLACK_PCT: u64 = 50;
/// A failed request counts as "expected during restart" when it was in flight at any
/// moment between the SIGTERM and this long after the restarted side was ready again.
pub const RESTART_GRACE: Duration = Duration::from_secs(1);
/// drain_timeout of both processes, and how long a SIGTERM may take to end one.
const DRAIN: &str = "2s";
const STOP_WITHIN: Duration = Duration::from_secs(15);
/// Per-download rate (curl --limit-rate), so a long download is long in time.
const DOWNLOAD_RATE: u64 = 4 << 20;

/// When things happen, as offsets from the start; all derived from the run length.
#[derive(Debug)]
pub struct Plan {
    pub total: Duration,
    pub checkpoint_a: Duration,
    pub checkpoint_b: Duration,
    pub agent_restarts: Vec<Duration>,
    pub gateway_restarts: Vec<Duration>,
    pub download_secs: u64,
    pub hold: (Duration, Duration),
    pub short_workers: usize,
    pub download_workers: usize,
    pub held_conns: usize,
}

impl Plan {
    pub fn new(minutes: u64) -> Plan {
        let t = minutes.max(1) * 60;
        let warmup = (t / 6).clamp(10, 60);
        let half = t / 2;
        let period = (t / 15).clamp(20, 120);
        // Agent restarts in the first half, the last one a warm-up before B, so the
        // agent judged from B on is warm; gateway restarts in the second half, the
        // last one at least ten seconds before the end.
        let mut agent_restarts = vec![];
        let mut at = warmup + period / 2;
        while at + warmup <= half {
            agent_restarts.push(Duration::from_secs(at));
            at += period;
        }
        let mut gateway_restarts = vec![];
        let mut at = half + period / 2;
        while at + 10 <= t {
            gateway_restarts.push(Duration::from_secs(at));
            at += period;
        }
        let short = t <= 120;
        Plan {
            total: Duration::from_secs(t),
            checkpoint_a: Duration::from_secs(warmup),
            checkpoint_b: Duration::from_secs(half),
            agent_restarts,
            gateway_restarts,
            download_secs: (t / 8).clamp(5, 30),
            hold: (
                Duration::from_secs((t / 12).clamp(5, 45)),
                Duration::from_secs((t / 6).clamp(10, 90)),
            ),
            short_workers: 3,
            download_workers: 2,
            held_conns: if short { 8 } else { 16 },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Short,
    Download,
    Held,
}

const KINDS: [Kind; 3] = [Kind::Short, Kind::Download, Kind::Held];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Short => "short curl",
            Kind::Download => "long download",
            Kind::Held => "held idle conn",
        }
    }
}

enum Outcome {
    Ok,
    Failed(String),
    /// Stopped by the harness itself (a checkpoint or the end): neither.
    Cancelled,
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    expected: AtomicU64,
    unexpected: AtomicU64,
    cancelled: AtomicU64,
}

#[derive(Clone, Copy, Default)]
struct Totals {
    ok: u64,
    expected: u64,
    unexpected: u64,
    cancelled: u64,
}

impl std::ops::Sub for Totals {
    type Output = Totals;
    fn sub(self, o: Totals) -> Totals {
        Totals {
            ok: self.ok - o.ok,
            expected: self.expected - o.expected,
            unexpected: self.unexpected - o.unexpected,
            cancelled: self.cancelled - o.cancelled,
        }
    }
}

/// What every worker reports into.
struct Shared {
    start: Instant,
    /// Restart windows: from the SIGTERM to readiness + grace (None while open).
    windows: Mutex<Vec<(Instant, Option<Instant>)>>,
    counts: [Counts; 3],
    /// The unexpected failures, described (the first 50).
    unexpected: Mutex<Vec<String>>,
    /// Unexpected events that are not requests (a stop that was not graceful).
    unexpected_events: AtomicU64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            start: Instant::now(),
            windows: Mutex::new(vec![]),
            counts: Default::default(),
            unexpected: Mutex::new(vec![]),
            unexpected_events: AtomicU64::new(0),
        }
    }

    fn counts(&self, kind: Kind) -> &Counts {
        &self.counts[KINDS.iter().position(|k| *k == kind).unwrap_or(0)]
    }

    /// Whether [started, now] overlaps a restart window (an open one counts).
    fn during_restart(&self, started: Instant) -> bool {
        let now = Instant::now();
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows
            .iter()
            .any(|(from, to)| *from <= now && to.is_none_or(|to| started <= to))
    }

    fn record(&self, kind: Kind, started: Instant, outcome: Outcome) {
        let c = self.counts(kind);
        match outcome {
            Outcome::Ok => c.ok.fetch_add(1, Ordering::Relaxed),
            Outcome::Cancelled => c.cancelled.fetch_add(1, Ordering::Relaxed),
            Outcome::Failed(_) if self.during_restart(started) => {
                c.expected.fetch_add(1, Ordering::Relaxed)
            }
            Outcome::Failed(why) => {
                let mut list = self.unexpected.lock().unwrap_or_else(|e| e.into_inner());
                if list.len() < 50 {
                    list.push(format!(
                        "{} started at {:.1} s, failed at {:.1} s: {why}",
                        kind.name(),
                        (started - self.start).as_secs_f64(),
                        self.start.elapsed().as_secs_f64()
                    ));
                }
                c.unexpected.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// A failure of the harness's own making that no restart explains (a stop that
    /// was not graceful, a process that died).
    fn unexpected_event(&self, what: String) {
        eprintln!("  UNEXPECTED: {what}");
        self.unexpected_events.fetch_add(1, Ordering::Relaxed);
        self.unexpected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }

    fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in &self.counts {
            t.ok += c.ok.load(Ordering::Relaxed);
            t.expected += c.expected.load(Ordering::Relaxed);
            t.unexpected += c.unexpected.load(Ordering::Relaxed);
            t.cancelled += c.cancelled.load(Ordering::Relaxed);
        }
        t
    }

    fn open_window(&self) -> usize {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w.push((Instant::now(), None));
        w.len() - 1
    }

    fn close_window(&self, i: usize) {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        w[i].1 = Some(Instant::now() + RESTART_GRACE);
    }
}

/// Where the workers send their requests.
#[derive(Clone)]
struct Routes {
    curl: PathBuf,
    http_proxy: String,
    socks: String,
    http_port: u16,
    socks_port: u16,
    page: String,
    bytes: std::net::SocketAddr,
    echo: std::net::SocketAddr,
}

/// The proxy route a curl uses (absolute-form, CONNECT, SOCKS5).
fn route_args(r: &Routes, i: usize) -> Vec<String> {
    match i % 3 {
        0 => vec!["-x".into(), r.http_proxy.clone()],
        1 => vec!["-p".into(), "-x".into(), r.http_proxy.clone()],
        _ => vec!["--socks5-hostname".into(), r.socks.clone()],
    }
}

/// A small deterministic RNG (xorshift) for jitter.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs `op` unless `stop` fires first.
async fn unless_stopped<F>(stop: &mut watch::Receiver<bool>, op: F) -> Option<F::Output>
where
    F: std::future::Future,
{
    tokio::select! {
        r = op => Some(r),
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// How long a worker rests after `out` (`ok_ms` after a success; after a failure
/// half a second, so a restart window is not a busy loop of refused connections);
/// None = it was cancelled, stop.
fn after(out: &Outcome, ok_ms: u64) -> Option<Duration> {
    match out {
        Outcome::Ok => Some(Duration::from_millis(ok_ms)),
        Outcome::Failed(_) => Some(Duration::from_millis(500)),
        Outcome::Cancelled => None,
    }
}

/// Sleeps for `pause` unless stopped; false when the worker should end.
async fn rest(stop: &mut watch::Receiver<bool>, pause: Option<Duration>) -> bool {
    match pause {
        None => false,
        Some(d) if d.is_zero() => !*stop.borrow(),
        Some(d) => unless_stopped(stop, tokio::time::sleep(d)).await.is_some(),
    }
}

fn to_outcome(r: Option<std::result::Result<(), String>>) -> Outcome {
    match r {
        None => Outcome::Cancelled,
        Some(Ok(())) => Outcome::Ok,
        Some(Err(e)) => Outcome::Failed(e),
    }
}

async fn short_worker(sh: Arc<Shared>, r: Routes, id: usize, mut stop: watch::Receiver<bool>) {
    let mut n = id;
    while !*stop.borrow() {
        let started = Instant::now();
        let out = to_outcome(unless_stopped(&mut stop, short_one(&r, n)).await);
        let pause = after(&out, 100);
        sh.record(Kind::Short, started, out);
        n += 1;
        if !rest(&mut stop, pause).await {
            return;
        }
    }
}

/// One curl process, one GET of the page through route `n`.
async fn short_one(r: &Routes, n: usize) -> std::result::Result<(), String> {
    let mut args: Vec<String> = [
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "20",
        "-w",
        "%{http_code} %{size_download}",
    ]
    .map(String::from)
    .to_vec();
    args.extend(route_args(r, n));
    args.push(r.page.clone());
    let out = procs::command(&r.curl)
        .args(&args)
        .output()
        .await
        .map_err(|e| format!("spawn curl: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!("200 {}", targets::PAGE_SIZE);
    if !out.status.success() || stdout.trim() != want {
        return Err(format!(
            "curl {} exit {:?}, got {stdout:?}: {}",
            args[7..args.len() - 1].join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

async fn download_worker(
    sh: Arc<Shared>,
    r: Routes,
    id: usize,
    secs: u64,
    mut stop: watch::Receiver<bool>,
) {
    // CONNECT and SOCKS5 (the page workers cover absolute-form).
    let mut n = id;
    while !*stop.borrow() {
        let started = Instant::now();
        let route = 1 + n % 2;
        let out = to_outcome(unless_stopped(&mut stop, download_one(&r, route, secs)).await);
        let pause = after(&out, 0);
        sh.record(Kind::Download, started, out);
        n += 1;
        if !rest(&mut stop, pause).await {
            return;
        }
    }
}

/// One rate-limited curl download of `secs` seconds' worth, every byte checked.
async fn download_one(r: &Routes, route: usize, secs: u64) -> std::result::Result<(), String> {
    let len = DOWNLOAD_RATE * secs;
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "-f".into(),
        "--max-time".into(),
        (secs * 3 + 15).to_string(),
        "--limit-rate".into(),
        DOWNLOAD_RATE.to_string(),
        "-o".into(),
        "-".into(),
    ];
    args.extend(route_args(r, route));
    args.push(format!("http://{}/bytes/{len}", r.bytes));
    let mut child = procs::command(&r.curl)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn curl: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let expect = targets::noise(targets::BYTES_CHUNK, targets::BYTES_SEED);
    let mut buf = vec![0u8; 64 * 1024];
    let mut got: u64 = 0;
    let mut first_bad: Option<u64> = None;
    loop {
        let n = stdout
            .read(&mut buf)
            .await
            .map_err(|e| format!("read curl's output: {e}"))?;
        if n == 0 {
            break;
        }
        if first_bad.is_none() {
            for (i, b) in buf[..n].iter().enumerate() {
                let at = got + i as u64;
                if *b != expect[(at % targets::BYTES_CHUNK as u64) as usize] {
                    first_bad = Some(at);
                    break;
                }
            }
        }
        got += n as u64;
    }
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err).await;
    let status = child.wait().await.map_err(|e| format!("wait curl: {e}"))?;
    let via = args[8..args.len() - 1].join(" ");
    if !status.success() {
        return Err(format!(
            "download via {via}: curl exit {:?} after {got} of {len} bytes: {}",
            status.code(),
            err.trim()
        ));
    }
    if got != len {
        return Err(format!("download via {via}: {got} of {len} bytes, exit 0"));
    }
    if let Some(at) = first_bad {
        return Err(format!("download via {via}: byte {at} differs"));
    }
    Ok(())
}

async fn held_worker(
    sh: Arc<Shared>,
    r: Routes,
    id: usize,
    hold: (Duration, Duration),
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x1000_0001));
    let mut n = id;
    // Spread the first openings, so the connections do not cycle in lockstep.
    let spread = Duration::from_millis(rng.below(2000));
    if unless_stopped(&mut stop, tokio::time::sleep(spread))
        .await
        .is_none()
    {
        return;
    }
    while !*stop.borrow() {
        let span = hold.1.saturating_sub(hold.0).as_millis() as u64;
        let dur = hold.0 + Duration::from_millis(rng.below(span + 1));
        let started = Instant::now();
        let out = to_outcome(unless_stopped(&mut stop, held_one(&r, n % 2 == 0, dur)).await);
        let pause = after(&out, 0);
        sh.record(Kind::Held, started, out);
        n += 1;
        if !rest(&mut stop, pause).await {
            return;
        }
    }
}

/// Opens a tunnelled connection to the echo server (SOCKS5 or a raw CONNECT), checks an
/// exchange, holds it idle for `dur`, checks another exchange, closes.
async fn held_one(r: &Routes, socks: bool, dur: Duration) -> std::result::Result<(), String> {
    let how = if socks { "SOCKS5" } else { "CONNECT" };
    let open = async {
        if socks {
            Dial::Socks5 {
                proxy: r.socks_port,
                user: SOCKS_USER,
                pass: SOCKS_PASS,
                target: r.echo,
            }
            .connect()
            .await
            .map_err(|e| format!("{e:#}"))
        } else {
            http_connect(r.http_port, r.echo).await
        }
    };
    let mut s = tokio::time::timeout(Duration::from_secs(20), open)
        .await
        .map_err(|_| format!("held {how}: open timed out"))?
        .map_err(|e| format!("held {how}: open: {e}"))?;
    let msg = targets::noise(targets::ECHO_SIZE, dur.as_millis() as u64);
    exchange(&mut s, &msg)
        .await
        .map_err(|e| format!("held {how}: first exchange: {e}"))?;
    tokio::time::sleep(dur).await;
    exchange(&mut s, &msg).await.map_err(|e| {
        format!(
            "held {how}: exchange after {:.0} s idle: {e}",
            dur.as_secs_f64()
        )
    })
}

async fn exchange(s: &mut tokio::net::TcpStream, msg: &[u8]) -> std::result::Result<(), String> {
    let io = async {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back)
    };
    let back = tokio::time::timeout(Duration::from_secs(20), io)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if back != msg {
        return Err("the echo differs".into());
    }
    Ok(())
}

/// A raw `CONNECT` through the HTTP proxy; the stream once the proxy said 200.
async fn http_connect(
    port: u16,
    target: std::net::SocketAddr,
) -> std::result::Result<tokio::net::TcpStream, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to the HTTP proxy: {e}"))?;
    let _ = s.set_nodelay(true);
    let auth = base64(format!("{HTTP_USER}:{HTTP_PASS}").as_bytes());
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // The proxy's answer ends with an empty line; nothing follows before we speak.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err("CONNECT answer too long".into());
        }
        match s.read(&mut byte).await {
            Ok(0) => return Err("proxy closed before answering CONNECT".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let status = String::from_utf8_lossy(&head);
    let line = status.lines().next().unwrap_or("");
    if line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("CONNECT answered {line:?}"));
    }
    Ok(s)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The running workers and the switch that stops them.
struct Load {
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(sh: &Arc<Shared>, r: &Routes, plan: &Plan, round: usize) -> Load {
        let (stop, rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..plan.short_workers {
            tasks.spawn(short_worker(sh.clone(), r.clone(), i + round, rx.clone()));
        }
        for i in 0..plan.download_workers {
            tasks.spawn(download_worker(
                sh.clone(),
                r.clone(),
                i + round,
                plan.download_secs,
                rx.clone(),
            ));
        }
        for i in 0..plan.held_conns {
            tasks.spawn(held_worker(
                sh.clone(),
                r.clone(),
                i + round * 100,
                plan.hold,
                rx.clone(),
            ));
        }
        Load { stop, tasks }
    }

    /// Stops every worker (what is in flight is cancelled, not failed); bounded.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .is_err()
        {
            self.tasks.shutdown().await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn sample(pid: u32) -> Result<Sample> {
    Ok(Sample {
        rss_kib: procs::rss_kib(pid)?,
        fds: procs::fd_count(pid)?,
        threads: procs::threads(pid)?,
    })
}

/// Both processes, after checking that they are alive.
fn sample_both(stack: &mut Stack) -> Result<(Sample, Sample)> {
    stack.check_alive()?;
    let [g, a] = stack.pids()?;
    Ok((sample(g)?, sample(a)?))
}

/// Waits (at most 15 s) until neither process's descriptor count moved for a second,
/// then samples both.
async fn settle(stack: &mut Stack) -> Result<(Sample, Sample)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = sample_both(stack)?;
    let mut still = 0;
    while still < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = sample_both(stack)?;
        if now.0.fds == last.0.fds && now.1.fds == last.1.fds {
            still += 1;
        } else {
            still = 0;
        }
        last = now;
    }
    Ok(last)
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Row,
    Checkpoint(char),
    RestartAgent,
    RestartGateway,
}

fn mib(kib: u64) -> Cell {
    Cell::Num(kib as f64 / 1024.0, 1)
}

pub async fn run(env: &Env, report: &mut Report, minutes: u64) -> Result<()> {
    let plan = Plan::new(minutes);
    let page = targets::http_server().await?;
    let bytes = targets::bytes_server().await?;
    let echo = targets::echo_server().await?;
    let drain = format!("drain_timeout: {DRAIN}");
    let mut opts = StackOptions::binary(vec![], 500);
    opts.gateway_extra = vec![drain.clone()];
    opts.client_extra = vec![drain];
    let mut stack = Stack::start(&env.anyproxy, opts).await?;
    let routes = Routes {
        curl: env.curl.clone(),
        http_proxy: format!(
            "http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{}",
            stack.http_port
        ),
        socks: format!("{SOCKS_USER}:{SOCKS_PASS}@127.0.0.1:{}", stack.socks_port),
        http_port: stack.http_port,
        socks_port: stack.socks_port,
        page: format!("http://{page}/"),
        bytes,
        echo,
    };
    println!(
        "\n== soak: {minutes} min; checkpoints at {:?} and {:?}; agent restarts at {:?}; gateway restarts at {:?}",
        plan.checkpoint_a,
        plan.checkpoint_b,
        plan.agent_restarts,
        plan.gateway_restarts
    );
    println!(
        "   work: {} curl GET loops (absolute-form, CONNECT, SOCKS5 in turn), {} downloads of {} s at {} MiB/s (CONNECT, SOCKS5), {} held idle connections ({:?}..{:?}) to an echo server",
        plan.short_workers,
        plan.download_workers,
        plan.download_secs,
        DOWNLOAD_RATE >> 20,
        plan.held_conns,
        plan.hold.0,
        plan.hold.1
    );

    let mut events: Vec<(Duration, Event)> = vec![];
    let mut m = 60;
    while m <= plan.total.as_secs() {
        events.push((Duration::from_secs(m), Event::Row));
        m += 60;
    }
    events.push((plan.checkpoint_a, Event::Checkpoint('A')));
    events.push((plan.checkpoint_b, Event::Checkpoint('B')));
    events.extend(
        plan.agent_restarts
            .iter()
            .map(|t| (*t, Event::RestartAgent)),
    );
    events.extend(
        plan.gateway_restarts
            .iter()
            .map(|t| (*t, Event::RestartGateway)),
    );
    events.push((plan.total, Event::Checkpoint('C')));
    // Stable: at equal times a row comes before the checkpoint that ends the run.
    events.sort_by_key(|(t, _)| *t);

    let mut minutes_t = Table::new(
        format!("soak: one row per minute ({minutes} min)"),
        &[
            "min",
            "gw RSS MiB",
            "gw fds",
            "gw thr",
            "agent RSS MiB",
            "agent fds",
            "agent thr",
            "ok",
            "failed",
            "expected (restart)",
            "unexpected",
            "restarts",
        ],
    );
    let mut checkpoints_t = Table::new(
        "soak: quiet checkpoints (all work stopped, descriptors settled)",
        &[
            "checkpoint",
            "at s",
            "gw RSS MiB",
            "gw fds",
            "gw thr",
            "agent RSS MiB",
            "agent fds",
            "agent thr",
        ],
    );
    println!(
        "  {:>4} {:>10} {:>6} {:>6} {:>13} {:>9} {:>9} {:>7} {:>7} {:>9} {:>10} {:>8}",
        "min",
        "gw RSS MiB",
        "gw fds",
        "gw thr",
        "agent RSS MiB",
        "agent fds",
        "agent thr",
        "ok",
        "failed",
        "expected",
        "unexpected",
        "restarts"
    );

    let sh = Arc::new(Shared::new());
    let start = sh.start;
    let mut round = 0;
    let mut load = Some(Load::start(&sh, &routes, &plan, round));
    let mut last = Totals::default();
    let mut restarts = 0usize;
    let mut restarts_in_row = 0usize;
    let mut checkpoints: Vec<(char, f64, Sample, Sample)> = vec![];
    let mut fatal: Option<anyhow::Error> = None;

    for (at, event) in events {
        tokio::time::sleep_until((start + at).into()).await;
        let step: Result<()> = async {
            match event {
                Event::Row => {
                    let (g, a) = sample_both(&mut stack)?;
                    let now = sh.totals();
                    let d = now - last;
                    last = now;
                    let minute = at.as_secs() / 60;
                    println!(
                        "  {:>4} {:>10.1} {:>6} {:>6} {:>13.1} {:>9} {:>9} {:>7} {:>7} {:>9} {:>10} {:>8}",
                        minute,
                        g.rss_kib as f64 / 1024.0,
                        g.fds,
                        g.threads,
                        a.rss_kib as f64 / 1024.0,
                        a.fds,
                        a.threads,
                        d.ok,
                        d.expected + d.unexpected,
                        d.expected,
                        d.unexpected,
                        restarts_in_row
                    );
                    minutes_t.rows.push(vec![
                        Cell::Num(minute as f64, 0),
                        mib(g.rss_kib),
                        Cell::Num(g.fds as f64, 0),
                        Cell::Num(g.threads as f64, 0),
                        mib(a.rss_kib),
                        Cell::Num(a.fds as f64, 0),
                        Cell::Num(a.threads as f64, 0),
                        Cell::Num(d.ok as f64, 0),
                        Cell::Num((d.expected + d.unexpected) as f64, 0),
                        Cell::Num(d.expected as f64, 0),
                        Cell::Num(d.unexpected as f64, 0),
                        Cell::Num(restarts_in_row as f64, 0),
                    ]);
                    restarts_in_row = 0;
                }
                Event::Checkpoint(name) => {
                    if let Some(l) = load.take() {
                        l.stop().await;
                    }
                    let (g, a) = settle(&mut stack).await?;
                    let secs = start.elapsed().as_secs_f64();
                    println!(
                        "  checkpoint {name} at {secs:.0} s: gateway {:.1} MiB, {} fds, {} threads; agent {:.1} MiB, {} fds, {} threads",
                        g.rss_kib as f64 / 1024.0,
                        g.fds,
                        g.threads,
                        a.rss_kib as f64 / 1024.0,
                        a.fds,
                        a.threads
                    );
                    checkpoints.push((name, secs, g, a));
                    if name != 'C' {
                        round += 1;
                        load = Some(Load::start(&sh, &routes, &plan, round));
                    }
                }
                Event::RestartAgent | Event::RestartGateway => {
                    let gateway = matches!(event, Event::RestartGateway);
                    let what = if gateway { "gateway" } else { "agent" };
                    let w = sh.open_window();
                    let t = start.elapsed().as_secs_f64();
                    let r = if gateway {
                        stack.restart_gateway(STOP_WITHIN).await
                    } else {
                        stack.restart_agent(STOP_WITHIN).await
                    };
                    sh.close_window(w);
                    restarts += 1;
                    restarts_in_row += 1;
                    let status = r.with_context(|| format!("restart the {what} at {t:.0} s"))?;
                    if !status.success() {
                        sh.unexpected_event(format!(
                            "the {what} stopped with {status} after SIGTERM at {t:.0} s (a graceful stop exits 0)"
                        ));
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = step {
            fatal = Some(e);
            break;
        }
    }
    if let Some(l) = load.take() {
        l.stop().await;
    }
    drop(stack);

    // The verdict.
    let totals = sh.totals();
    let mut kinds_t = Table::new(
        "soak: requests by kind",
        &[
            "kind",
            "ok",
            "expected (restart)",
            "unexpected",
            "cancelled (checkpoints)",
        ],
    );
    for k in KINDS {
        let c = sh.counts(k);
        kinds_t.rows.push(vec![
            Cell::text(k.name()),
            Cell::Num(c.ok.load(Ordering::Relaxed) as f64, 0),
            Cell::Num(c.expected.load(Ordering::Relaxed) as f64, 0),
            Cell::Num(c.unexpected.load(Ordering::Relaxed) as f64, 0),
            Cell::Num(c.cancelled.load(Ordering::Relaxed) as f64, 0),
        ]);
    }
    kinds_t.notes.push(format!(
        "expected (restart) = failed while a restart window was open at some moment of its life (SIGTERM .. ready + {RESTART_GRACE:?}); {restarts} restarts"
    ));
    for (name, secs, g, a) in &checkpoints {
        checkpoints_t.rows.push(vec![
            Cell::text(name.to_string()),
            Cell::Num(*secs, 0),
            mib(g.rss_kib),
            Cell::Num(g.fds as f64, 0),
            Cell::Num(g.threads as f64, 0),
            mib(a.rss_kib),
            Cell::Num(a.fds as f64, 0),
            Cell::Num(a.threads as f64, 0),
        ]);
    }
    checkpoints_t.notes.push(
        "A: after warm-up; B: half time (agent restarted in between: the gateway is judged A→B); C: the end (gateway restarted in between: the agent is judged B→C)".into(),
    );
    let unexpected = sh
        .unexpected
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for u in unexpected.iter().take(10) {
        kinds_t.notes.push(format!("unexpected: {u}"));
    }
    report.add(minutes_t);
    report.add(checkpoints_t);
    report.add(kinds_t);

    if let Some(e) = fatal {
        report.error("soak", &e);
        return Ok(());
    }
    let find = |n: char| checkpoints.iter().find(|c| c.0 == n).copied();
    let (Some(a), Some(b), Some(c)) = (find('A'), find('B'), find('C')) else {
        bail!("soak: a checkpoint is missing");
    };
    let mut judge = |who: &str, from: (char, Sample), to: (char, Sample)| {
        let (f, t) = (from.1, to.1);
        let fd_ok = t.fds as i64 - f.fds as i64 <= FD_SLACK;
        let slack = RSS_SLACK_KIB.max(f.rss_kib * RSS_SLACK_PCT / 100);
        let rss_ok = t.rss_kib <= f.rss_kib + slack;
        let measured = format!(
            "{who}: fds {} → {} (≤ +{FD_SLACK}), RSS {:.1} → {:.1} MiB (≤ +{:.1} MiB)",
            f.fds,
            t.fds,
            f.rss_kib as f64 / 1024.0,
            t.rss_kib as f64 / 1024.0,
            slack as f64 / 1024.0
        );
        report.check(
            format!("soak: {who} fds and RSS do not grow {}→{}", from.0, to.0),
            measured.clone(),
            Some(fd_ok && rss_ok),
        );
        if !(fd_ok && rss_ok) {
            report.errors.push(format!("soak: {who} grew: {measured}"));
        }
    };
    judge("gateway", ('A', a.2), ('B', b.2));
    judge("agent", ('B', b.3), ('C', c.3));
    let bad = totals.unexpected + sh.unexpected_events.load(Ordering::Relaxed);
    report.check(
        "soak: no failure outside a restart window",
        format!(
            "{} ok, {} expected during restart, {} unexpected, {} cancelled by checkpoints",
            totals.ok, totals.expected, bad, totals.cancelled
        ),
        Some(bad == 0),
    );
    if bad > 0 {
        report.errors.push(format!(
            "soak: {bad} unexpected failure(s); first: {}",
            unexpected.first().map_or("?", String::as_str)
        ));
    }
    for k in KINDS {
        if sh.counts(k).ok.load(Ordering::Relaxed) == 0 {
            report
                .errors
                .push(format!("soak: no {} ever succeeded", k.name()));
        }
    }
    Ok(())
}

/// The default soak length when --minutes is not given.
pub fn default_minutes(tiny: bool) -> u64 {
    if tiny {
        1
    } else {
        10
    }
}
