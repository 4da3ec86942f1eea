//! UDP: 512-byte datagrams echoed back, as fast as a window of datagrams in flight
//! allows, through a UDP forward and through SOCKS5 UDP ASSOCIATE, against the echo
//! server direct, in the same run. Reports datagrams/s (echoes received per second)
//! and loss (sent and never echoed, after a grace for the last ones in flight).
//!
//! Then, on the same agent session: a TCP download through a TCP forward, alone and
//! beside a paced UDP flood through the UDP forward (the bar: within 1.5× of
//! its time alone); and `iperf3 -u` through a TCP forward and a UDP forward that share
//! one port number (iperf3's control connection is TCP, its datagrams UDP), against
//! iperf3 direct.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::procs::free_port;
use crate::report::{ratio, Cell, Report, Table};
use crate::stack::{Stack, StackOptions, SOCKS_PASS, SOCKS_USER};
use crate::targets;
use crate::Env;

const SIZE: usize = 512;
/// Datagrams in flight at most: enough to keep both ends busy, few enough that no
/// socket buffer on loopback overflows by itself.
const WINDOW: usize = 64;
/// Waiting for an echo longer than this counts the datagram as lost.
const LOST_AFTER: Duration = Duration::from_millis(200);

struct Row {
    route: &'static str,
    sent: u64,
    received: u64,
    secs: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.received as f64 / self.secs
    }

    fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }
}

pub async fn run(env: &Env, report: &mut Report) -> Result<()> {
    let secs = env.knobs.bulk_secs.max(1) * if env.knobs.tiny { 1 } else { 2 };
    let echo = echo_server().await?;
    let bulk = targets::bulk_server().await?;
    let iperf = match IperfServer::start(env).await {
        Ok(i) => i,
        Err(e) => {
            report.error("udp iperf3 server", &e);
            None
        }
    };
    let (forward_port, bulk_port) = (free_port()?, free_port()?);
    let mut forwards = vec![
        format!(
            "{{ listen_addr: \"127.0.0.1:{forward_port}\", target: \"{echo}\", protocol: udp }}"
        ),
        format!(
            "{{ listen_addr: \"127.0.0.1:{bulk_port}\", target: \"{}\" }}",
            bulk.addr
        ),
    ];
    if let Some(i) = &iperf {
        // One port number, both protocols, to the same iperf3 server.
        for protocol in ["tcp", "udp"] {
            forwards.push(format!(
                "{{ listen_addr: \"127.0.0.1:{}\", target: \"127.0.0.1:{}\", protocol: {protocol} }}",
                i.forward_port, i.port
            ));
        }
    }
    let mut opts = StackOptions::binary(vec![], 100);
    opts.gateway_extra
        .push(format!("forwards: [{}]", forwards.join(", ")));
    let mut stack = Stack::start(&env.anyproxy, opts).await?;
    let duration = Duration::from_secs(secs);
    let mut rows = Vec::new();
    rows.push(measure("direct", Path::Plain(echo), duration).await?);
    let forward = SocketAddr::from((Ipv4Addr::LOCALHOST, forward_port));
    rows.push(
        measure(
            "anyproxy binary udp forward",
            Path::Plain(forward),
            duration,
        )
        .await?,
    );
    let assoc = associate(stack.socks_port).await?;
    let via = Path::Socks5 {
        relay: assoc.1,
        target: echo,
    };
    let row = measure("anyproxy binary socks5 udp", via, duration).await?;
    drop(assoc);
    rows.push(row);
    windowed_table(report, &rows, secs);
    if let Err(e) = flood_beside_download(env, report, forward, bulk_port).await {
        report.error("udp flood beside a tcp download", &e);
    }
    if let Some(mut i) = iperf {
        if let Err(e) = iperf3_udp(env, report, &mut i).await {
            report.error("udp iperf3 -u", &e);
        }
    }
    stack.check_alive()?;
    drop(stack);
    Ok(())
}

fn windowed_table(report: &mut Report, rows: &[Row], secs: u64) {
    let direct = rows[0].rate();
    let mut t = Table::new(
        format!("udp: {SIZE} B datagrams echoed, {WINDOW} in flight, {secs} s per route"),
        &[
            "route",
            "sent",
            "received",
            "datagrams/s",
            "loss %",
            "x direct rate",
        ],
    );
    for r in rows {
        t.rows.push(vec![
            Cell::text(r.route),
            Cell::Num(r.sent as f64, 0),
            Cell::Num(r.received as f64, 0),
            Cell::Num(r.rate(), 0),
            Cell::Num(r.loss() * 100.0, 3),
            ratio(r.rate(), Some(direct)),
        ]);
    }
    t.notes.push(
        "a datagram counts as lost when its echo has not come back within 200 ms; the window then moves on"
            .into(),
    );
    report.add(t);
    let fwd = &rows[1];
    report.check(
        "udp: >= 100k datagrams/s of 512 B through a forward with < 0.1 % loss",
        format!("{:.0}/s, {:.3} % loss", fwd.rate(), fwd.loss() * 100.0),
        Some(fwd.rate() >= 100_000.0 && fwd.loss() < 0.001),
    );
}

/// The flood's offered rate: half the throughput goal, so that on a small
/// machine the flood's own CPU (sender, echo, both ends of the tunnel) leaves the
/// download a core; the table says what the flood really moved.
const FLOOD_RATE: u64 = 50_000;
/// Downloads per condition; the best of each is compared (noise on a shared machine
/// only ever adds time).
const DOWNLOAD_RUNS: usize = 2;

/// A TCP download through a TCP forward alone and beside a UDP flood through the UDP
/// forward, on the same agent session, alternately; reports the best time of each and
/// their ratio.
async fn flood_beside_download(
    env: &Env,
    report: &mut Report,
    udp_forward: SocketAddr,
    bulk_port: u16,
) -> Result<()> {
    let bytes: u64 = if env.knobs.tiny { 32 << 20 } else { 256 << 20 };
    let (mut alone, mut beside) = (Vec::new(), Vec::new());
    let (mut flood_sent, mut flood_echoed, mut flood_secs) = (0u64, 0u64, 0f64);
    for _ in 0..DOWNLOAD_RUNS {
        alone.push(download(bulk_port, bytes).await?);
        let flood = Flood::start(udp_forward, FLOOD_RATE).await?;
        let took = download(bulk_port, bytes).await;
        let (sent, echoed, secs) = flood.stop().await;
        beside.push(took?);
        flood_sent += sent;
        flood_echoed += echoed;
        flood_secs += secs;
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default().as_secs_f64();
    let (a, b) = (best(&alone), best(&beside));
    let mib = bytes as f64 / f64::from(1 << 20);
    let mut t = Table::new(
        format!(
            "udp flood beside a tcp download: {mib:.0} MiB through a TCP forward, best of {DOWNLOAD_RUNS}"
        ),
        &["condition", "download s", "MiB/s", "x alone", "flood sent/s", "flood echoed %"],
    );
    t.rows.push(vec![
        Cell::text("alone"),
        Cell::Num(a, 3),
        Cell::Num(mib / a, 0),
        ratio(a, Some(a)),
        Cell::text("-"),
        Cell::text("-"),
    ]);
    t.rows.push(vec![
        Cell::text(format!("beside a {FLOOD_RATE}/s flood of {SIZE} B")),
        Cell::Num(b, 3),
        Cell::Num(mib / b, 0),
        ratio(b, Some(a)),
        Cell::Num(flood_sent as f64 / flood_secs.max(1e-9), 0),
        Cell::Num(100.0 * flood_echoed as f64 / flood_sent.max(1) as f64, 1),
    ]);
    t.notes.push(
        "same agent session; the flood is one flow through the UDP forward to the echo server, paced per millisecond, its echoes drained".into(),
    );
    report.add(t);
    report.check(
        "udp: a flood beside a TCP download on the same session: download within 1.5x of its time alone",
        format!("{:.2}x ({b:.3} s vs {a:.3} s)", b / a),
        Some(b <= 1.5 * a),
    );
    Ok(())
}

/// Reads `bytes` of a download through the TCP forward on `port`; returns how long.
async fn download(port: u16, bytes: u64) -> Result<Duration> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&[targets::BULK_DOWNLOAD]).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let mut got = 0u64;
    let read = async {
        while got < bytes {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                bail!("the download ended after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), read)
        .await
        .context("the download did not finish in 300 s")??;
    Ok(started.elapsed())
}

/// A paced flood of 512 B datagrams to one address, and a drain of its echoes.
struct Flood {
    stop: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<(u64, f64)>,
    reader: tokio::task::JoinHandle<u64>,
}

impl Flood {
    async fn start(to: SocketAddr, rate: u64) -> Result<Flood> {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let (socket, stop) = (socket.clone(), stop.clone());
            tokio::spawn(async move {
                let datagram = vec![0xa5u8; SIZE];
                let started = Instant::now();
                let mut sent = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                // Bounded in time whatever happens to the download.
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(330)
                {
                    tick.tick().await;
                    let owed = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                    // At most 10 ms of datagrams at once after a stall.
                    let burst = owed.saturating_sub(sent).min(rate / 100);
                    for _ in 0..burst {
                        let _ = socket.send_to(&datagram, to).await;
                    }
                    sent += burst;
                }
                (sent, started.elapsed().as_secs_f64())
            })
        };
        let reader = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                let mut echoed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r = tokio::time::timeout(
                        Duration::from_millis(100),
                        socket.recv_from(&mut buf),
                    )
                    .await;
                    if let Ok(Ok(_)) = r {
                        echoed += 1;
                    }
                }
                echoed
            })
        };
        Ok(Flood {
            stop,
            sender,
            reader,
        })
    }

    /// Stops it after a grace for the last echoes: (sent, echoed, seconds sending).
    async fn stop(self) -> (u64, u64, f64) {
        let (sent, secs) = {
            self.stop.store(true, Ordering::Relaxed);
            self.sender.await.unwrap_or_default()
        };
        tokio::time::sleep(LOST_AFTER).await;
        let echoed = self.reader.await.unwrap_or_default();
        (sent, echoed, secs)
    }
}

/// An iperf3 server for `iperf3 -u`, and the port number its forwards share.
struct IperfServer {
    proc: crate::procs::Proc,
    port: u16,
    forward_port: u16,
    _dir: tempfile::TempDir,
}

impl IperfServer {
    /// None when iperf3 is not installed (`loadtest udp` runs without it).
    async fn start(env: &Env) -> Result<Option<IperfServer>> {
        if env.iperf3.as_os_str().is_empty() {
            return Ok(None);
        }
        let dir = crate::procs::work_dir("iperf3-udp-")?;
        let port = free_port()?;
        let mut proc = crate::procs::spawn(
            "iperf3 server",
            &env.iperf3,
            &["-s", "-B", "127.0.0.1", "-p", &port.to_string()],
            &dir.path().join("iperf3.log"),
        )?;
        crate::procs::wait_for_listening(port, &mut proc).await?;
        Ok(Some(IperfServer {
            proc,
            port,
            forward_port: free_port()?,
            _dir: dir,
        }))
    }
}

/// What `iperf3 -u` reports: datagrams the receiver got per second, and lost.
struct IperfUdp {
    packets: u64,
    lost: u64,
    secs: f64,
}

/// The rates `iperf3 -u` offers, in datagrams of 512 B per second.
const IPERF_RATES: [u64; 2] = [25_000, 100_000];

/// `iperf3 -u -l 512` at each of [`IPERF_RATES`], direct and through the forwards.
async fn iperf3_udp(env: &Env, report: &mut Report, server: &mut IperfServer) -> Result<()> {
    let secs = env.knobs.bulk_secs.max(1);
    let mut t = Table::new(
        format!("udp: iperf3 -u -l {SIZE}, {secs} s per run, through a TCP + UDP forward pair on one port"),
        &["route", "offered/s", "received/s", "loss %", "x direct received"],
    );
    for rate in IPERF_RATES {
        let direct = iperf3_retried(env, server.port, rate, secs, &mut server.proc).await?;
        let fwd = iperf3_retried(env, server.forward_port, rate, secs, &mut server.proc).await?;
        for (route, r) in [("direct", &direct), ("anyproxy binary udp forward", &fwd)] {
            t.rows.push(vec![
                Cell::text(route),
                Cell::Num(rate as f64, 0),
                Cell::Num(r.received_rate(), 0),
                Cell::Num(r.loss() * 100.0, 3),
                ratio(r.received_rate(), Some(direct.received_rate())),
            ]);
        }
    }
    t.notes.push(
        "iperf3's loss is the receiver's count; iperf3's own UDP receiver loses datagrams direct too at high rates on a small machine".into(),
    );
    report.add(t);
    Ok(())
}

impl IperfUdp {
    fn received_rate(&self) -> f64 {
        self.packets.saturating_sub(self.lost) as f64 / self.secs.max(1e-9)
    }

    fn loss(&self) -> f64 {
        self.lost as f64 / self.packets.max(1) as f64
    }
}

/// [`iperf3_once`], again while the server is still busy with the last run.
async fn iperf3_retried(
    env: &Env,
    port: u16,
    rate: u64,
    secs: u64,
    server: &mut crate::procs::Proc,
) -> Result<IperfUdp> {
    let mut attempt = 0;
    loop {
        match iperf3_once(env, port, rate, secs, server).await {
            Err(e) if crate::procs::iperf3_busy(&e, &mut attempt).await => {}
            other => return other,
        }
    }
}

async fn iperf3_once(
    env: &Env,
    port: u16,
    rate: u64,
    secs: u64,
    server: &mut crate::procs::Proc,
) -> Result<IperfUdp> {
    let bits = rate * SIZE as u64 * 8;
    let mut cmd = crate::procs::command(&env.iperf3);
    cmd.args(["-c", "127.0.0.1", "-u", "-J"])
        .args(["-p", &port.to_string()])
        .args(["-l", &SIZE.to_string()])
        .args(["-b", &bits.to_string()])
        .args(["-t", &secs.to_string()]);
    let out = tokio::time::timeout(Duration::from_secs(secs + 30), cmd.output())
        .await
        .context("iperf3 -u did not finish in time")?
        .context("run iperf3")?;
    server.check_alive()?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 -J output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = doc.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 -u through port {port}: {e}");
    }
    let sum = &doc["end"]["sum_received"];
    let field = |k: &str| {
        sum[k]
            .as_f64()
            .with_context(|| format!("iperf3 -u JSON has no end.sum_received.{k}"))
    };
    Ok(IperfUdp {
        packets: field("packets")? as u64,
        lost: field("lost_packets")? as u64,
        secs: field("seconds")?,
    })
}

enum Path {
    Plain(SocketAddr),
    Socks5 {
        relay: SocketAddr,
        target: SocketAddr,
    },
}

impl Path {
    /// The bytes put before each datagram, and where it is sent.
    fn header_and_addr(&self) -> (Vec<u8>, SocketAddr) {
        match self {
            Path::Plain(a) => (vec![], *a),
            Path::Socks5 { relay, target } => {
                let SocketAddr::V4(t) = target else {
                    unreachable!("loopback targets are IPv4")
                };
                let mut h = vec![0, 0, 0, 1];
                h.extend_from_slice(&t.ip().octets());
                h.extend_from_slice(&t.port().to_be_bytes());
                (h, *relay)
            }
        }
    }
}

async fn measure(route: &'static str, path: Path, duration: Duration) -> Result<Row> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let (header, to) = path.header_and_addr();
    let mut datagram = header.clone();
    datagram.resize(header.len() + SIZE, 0x5a);
    // Open the flow first (forward, SOCKS5): the first datagram waits for the agent.
    let mut buf = vec![0u8; 65_536];
    let mut opened = false;
    for _ in 0..20 {
        socket.send_to(&datagram, to).await?;
        if tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf))
            .await
            .is_ok()
        {
            opened = true;
            break;
        }
    }
    if !opened {
        bail!("{route}: no echo came back");
    }
    let window = Arc::new(Semaphore::new(WINDOW));
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (socket, window, received, done) = (
            socket.clone(),
            window.clone(),
            received.clone(),
            done.clone(),
        );
        let want = header.len() + SIZE;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while !done.load(Ordering::Relaxed) {
                let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf))
                        .await
                else {
                    continue;
                };
                if n == want {
                    received.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
            }
        })
    };
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        // The echo of a lost datagram never frees its place: after LOST_AFTER, move on
        // without it.
        if let Ok(permit) = tokio::time::timeout(LOST_AFTER, window.acquire()).await {
            permit.context("window closed")?.forget();
        }
        socket.send_to(&datagram, to).await?;
        sent += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    // The last ones in flight get their grace.
    tokio::time::sleep(LOST_AFTER * 2).await;
    done.store(true, Ordering::Relaxed);
    let _ = reader.await;
    Ok(Row {
        route,
        sent,
        received: received.load(Ordering::Relaxed),
        secs,
    })
}

/// A UDP echo server on 127.0.0.1 (a task of this process).
async fn echo_server() -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    Ok(addr)
}

/// UDP ASSOCIATE (RFC 1928 §7) with user/password: the control connection, which the
/// association lives as long as, and the relay's address.
async fn associate(proxy: u16) -> Result<(TcpStream, SocketAddr)> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).await?;
    s.write_all(&[5, 1, 2]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    let mut auth = vec![1, SOCKS_USER.len() as u8];
    auth.extend_from_slice(SOCKS_USER.as_bytes());
    auth.push(SOCKS_PASS.len() as u8);
    auth.extend_from_slice(SOCKS_PASS.as_bytes());
    s.write_all(&auth).await?;
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await?;
    if status[1] != 0 {
        bail!("SOCKS5 authentication refused");
    }
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    if reply[1] != 0 || reply[3] != 1 {
        bail!("UDP ASSOCIATE refused with reply {}", reply[1]);
    }
    let relay = SocketAddr::from((
        Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]),
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    Ok((s, relay))
}
