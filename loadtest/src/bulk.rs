//! Bulk throughput: iperf3 through a declared forward (and rathole's services, and
//! direct), and our own client through SOCKS5, one stream and eight.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procs::{self, CpuMeter, Proc};
use crate::rathole::{Rathole, Transport};
use crate::report::{ratio, Cell, Report, Table};
use crate::socks5::Dial;
use crate::stack::{Encoding, Stack, StackOptions, SOCKS_PASS, SOCKS_USER};
use crate::{stall, targets, Env};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Target to user: what a proxy user downloading sees (iperf3 -R).
    Down,
    /// User to target.
    Up,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Up => "up",
        }
    }
}

/// Which anyproxy configurations to measure.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Matrix {
    /// binary and JSON, deflate off and on.
    Full,
    /// binary without deflate only: the peer comparison.
    Peers,
}

const STREAMS: [usize; 2] = [1, 8];

struct Row {
    route: String,
    tool: &'static str,
    dir: Direction,
    streams: usize,
    gbps: f64,
    /// Tunnel CPU seconds (both ends) per GiB moved.
    cpu_per_gib: Option<f64>,
}

pub async fn run(env: &Env, report: &mut Report, matrix: Matrix) -> Result<()> {
    let dir = procs::work_dir("iperf3-lt-")?;
    let iperf_port = procs::free_port()?;
    let mut iperf = procs::spawn(
        "iperf3 server",
        &env.iperf3,
        &["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()],
        &dir.path().join("iperf3.log"),
    )?;
    // iperf3 takes any connection as a test, so look for its listener instead.
    procs::wait_for_listening(iperf_port, &mut iperf).await?;
    let iperf_addr: SocketAddr = ([127, 0, 0, 1], iperf_port).into();
    let sink = targets::bulk_server().await?;
    let echo = targets::echo_server().await?;
    let stall_probes = if env.knobs.tiny { 5 } else { 20 };
    let mut stalls = Vec::new();
    let mut rows = Vec::new();

    for &d in &env.knobs.directions {
        for &n in &STREAMS {
            let what = format!("bulk direct iperf3 {} x{n}", d.name());
            match iperf3(env, iperf_port, n, d, &mut iperf).await {
                Ok(gbps) => rows.push(row("direct", "iperf3", d, n, gbps, None)),
                Err(e) => report.error(&what, &e),
            }
            let what = format!("bulk direct own {} x{n}", d.name());
            match native(env, &Dial::Direct(sink.addr), &sink, n, d, None).await {
                Ok((gbps, _)) => rows.push(row("direct", "own", d, n, gbps, None)),
                Err(e) => report.error(&what, &e),
            }
        }
    }

    let configs: Vec<(Encoding, bool)> = match matrix {
        Matrix::Full => vec![
            (Encoding::Binary, false),
            (Encoding::Binary, true),
            (Encoding::Json, false),
            (Encoding::Json, true),
        ],
        Matrix::Peers => vec![(Encoding::Binary, false)],
    };
    for (encoding, deflate) in configs {
        let opts = StackOptions {
            encoding,
            deflate,
            forwards: vec![("iperf", iperf_addr)],
            max_conns: 100,
            gateway_extra: vec![],
            client_extra: vec![],
        };
        let label = opts.label();
        let mut stack = Stack::start(&env.anyproxy, opts).await?;
        let pids = stack.pids()?;
        let fwd = stack.forward("iperf")?;
        if !deflate {
            match stall::measure(&stack, &label, echo, sink.addr, stall_probes).await {
                Ok(r) => stalls.push(r),
                Err(e) => report.error(&format!("stall {label}"), &e),
            }
        }
        let socks = Dial::Socks5 {
            proxy: stack.socks_port,
            user: SOCKS_USER,
            pass: SOCKS_PASS,
            target: sink.addr,
        };
        // JSON mode has no flow control (the document has none): iperf3's control
        // messages are data, and wait in the session's data lane behind megabytes of
        // another connection's (only `connect`, its answer and the other control
        // messages go first). On debug builds in the CI smoke run that wait can pass
        // iperf3's own timeouts, so there JSON gets one connection at a time.
        let json_smoke = env.knobs.tiny && encoding == Encoding::Json;
        let streams: &[usize] = if json_smoke { &[1] } else { &STREAMS };
        for &d in &env.knobs.directions {
            for &n in streams {
                if !json_smoke {
                    let route = format!("{label} forward");
                    match iperf3_metered(env, fwd, n, d, &mut iperf, &pids).await {
                        Ok((gbps, cpu)) => rows.push(row(&route, "iperf3", d, n, gbps, cpu)),
                        Err(e) => {
                            report.error(&format!("bulk {route} iperf3 {} x{n}", d.name()), &e)
                        }
                    }
                }
                let route = format!("{label} socks5");
                match native(env, &socks, &sink, n, d, Some(&pids)).await {
                    Ok((gbps, cpu)) => rows.push(row(&route, "own", d, n, gbps, cpu)),
                    Err(e) => report.error(&format!("bulk {route} own {} x{n}", d.name()), &e),
                }
                stack.check_alive()?;
            }
        }
    }

    if let Some(bin) = &env.rathole {
        for t in Transport::ALL {
            let mut r = Rathole::start(bin, t, &[("iperf", iperf_addr)]).await?;
            let pids = r.pids()?;
            let port = r.port("iperf")?;
            for &d in &env.knobs.directions {
                for &n in &STREAMS {
                    match iperf3_metered(env, port, n, d, &mut iperf, &pids).await {
                        Ok((gbps, cpu)) => rows.push(row(t.label(), "iperf3", d, n, gbps, cpu)),
                        Err(e) => report
                            .error(&format!("bulk {} iperf3 {} x{n}", t.label(), d.name()), &e),
                    }
                    r.check_alive()?;
                }
            }
        }
    }

    table(env, report, &rows);
    stall::report(report, &stalls, stall_probes);
    Ok(())
}

fn row(
    route: &str,
    tool: &'static str,
    dir: Direction,
    streams: usize,
    gbps: f64,
    cpu: Option<f64>,
) -> Row {
    eprintln!(
        "  bulk {route} {tool} {} x{streams}: {gbps:.2} Gbit/s",
        dir.name()
    );
    Row {
        route: route.to_string(),
        tool,
        dir,
        streams,
        gbps,
        cpu_per_gib: cpu,
    }
}

fn cpu_per_gib(meter: &CpuMeter, gbps: f64, secs: u64) -> Result<Option<f64>> {
    let gib = gbps * 1e9 / 8.0 * secs as f64 / (1u64 << 30) as f64;
    (gib > 0.0)
        .then(|| meter.elapsed().map(|c| c.as_secs_f64() / gib))
        .transpose()
}

fn table(env: &Env, report: &mut Report, rows: &[Row]) {
    let find = |route: &str, tool: &str, d: Direction, n: usize| {
        rows.iter()
            .find(|r| r.route == route && r.tool == tool && r.dir == d && r.streams == n)
    };
    let gbps =
        |route: &str, tool: &str, d: Direction, n: usize| find(route, tool, d, n).map(|r| r.gbps);
    let mut t = Table::new(
        format!(
            "bulk: {} s per run; iperf3 through a forward / rathole service, own client through SOCKS5",
            env.knobs.bulk_secs
        ),
        &[
            "route",
            "tool",
            "dir",
            "streams",
            "Gbit/s",
            "x direct",
            "x rathole ws+tls",
            "x rathole tls",
            "x rathole tcp",
            "8 vs 1",
            "tunnel cpu s/GiB",
        ],
    );
    for r in rows {
        let peer = |t: Transport| {
            if r.tool == "iperf3" {
                ratio(r.gbps, gbps(t.label(), "iperf3", r.dir, r.streams))
            } else {
                Cell::None
            }
        };
        t.rows.push(vec![
            Cell::text(&r.route),
            Cell::text(r.tool),
            Cell::text(r.dir.name()),
            Cell::Num(r.streams as f64, 0),
            Cell::Num(r.gbps, 2),
            ratio(r.gbps, gbps("direct", r.tool, r.dir, r.streams)),
            peer(Transport::WsTls),
            peer(Transport::Tls),
            peer(Transport::Tcp),
            if r.streams == 1 {
                Cell::None
            } else {
                ratio(r.gbps, gbps(&r.route, r.tool, r.dir, 1))
            },
            r.cpu_per_gib.map_or(Cell::None, |c| Cell::Num(c, 2)),
        ]);
    }
    t.notes.push("own = this harness's client and sink, incompressible data; iperf3 sends its default (random) payload".into());
    report.add(t);

    let bin = "anyproxy binary forward";
    for &d in &env.knobs.directions {
        let dn = d.name();
        if let Some(b) = gbps(bin, "iperf3", d, 1) {
            for (t, want) in [(Transport::WsTls, 1.3), (Transport::Tls, 1.2)] {
                if let Some(p) = gbps(t.label(), "iperf3", d, 1) {
                    report.check(
                        format!("bulk {dn}: binary WSS 1 stream >= {want}x {}", t.label()),
                        format!("{:.2}x ({b:.2} vs {p:.2} Gbit/s)", b / p),
                        Some(b >= want * p),
                    );
                }
            }
            // The CI smoke run gives JSON no iperf3 (see `json_smoke`).
            let json = gbps("anyproxy json forward", "iperf3", d, 1);
            if !env.knobs.tiny {
                report.check(
                    format!("bulk {dn}: JSON finishes and >= 0.75x binary (1 stream)"),
                    json.map_or("did not finish".into(), |j| {
                        format!("{:.2}x ({j:.2} vs {b:.2} Gbit/s)", j / b)
                    }),
                    Some(json.is_some_and(|j| j >= 0.75 * b)),
                );
            }
        }
        if let (Some(one), Some(eight)) = (find(bin, "iperf3", d, 1), find(bin, "iperf3", d, 8)) {
            // "No worse per byte": as much throughput and no more tunnel CPU per byte,
            // within 5% for noise.
            let cpu = match (one.cpu_per_gib, eight.cpu_per_gib) {
                (Some(a), Some(b)) if a > 0.0 => Some(b / a),
                _ => None,
            };
            report.check(
                format!("bulk {dn}: 8 streams no worse per byte than 1 (binary forward)"),
                format!(
                    "throughput {:.2}x, cpu/GiB {}",
                    eight.gbps / one.gbps,
                    cpu.map_or("-".into(), |c| format!("{c:.2}x"))
                ),
                Some(eight.gbps >= 0.95 * one.gbps && cpu.is_none_or(|c| c <= 1.05)),
            );
        }
    }
}

/// An iperf3 run with the tunnel's CPU measured: (Gbit/s, CPU s/GiB).
async fn iperf3_metered(
    env: &Env,
    port: u16,
    streams: usize,
    d: Direction,
    server: &mut Proc,
    pids: &[u32; 2],
) -> Result<(f64, Option<f64>)> {
    let meter = CpuMeter::start(pids)?;
    let gbps = iperf3(env, port, streams, d, server).await?;
    Ok((gbps, cpu_per_gib(&meter, gbps, env.knobs.bulk_secs)?))
}

/// One iperf3 client run; returns the receiver's Gbit/s.
async fn iperf3(
    env: &Env,
    port: u16,
    streams: usize,
    d: Direction,
    server: &mut Proc,
) -> Result<f64> {
    let mut attempt = 0;
    loop {
        match iperf3_once(env, port, streams, d, server).await {
            Err(e) if procs::iperf3_busy(&e, &mut attempt).await => {}
            other => return other,
        }
    }
}

async fn iperf3_once(
    env: &Env,
    port: u16,
    streams: usize,
    d: Direction,
    server: &mut Proc,
) -> Result<f64> {
    let secs = env.knobs.bulk_secs;
    let mut cmd = procs::command(&env.iperf3);
    cmd.args(["-c", "127.0.0.1", "-J"])
        .args(["-p", &port.to_string()])
        .args(["-t", &secs.to_string()])
        .args(["-P", &streams.to_string()]);
    if d == Direction::Down {
        cmd.arg("-R");
    }
    let out = tokio::time::timeout(Duration::from_secs(secs + 30), cmd.output())
        .await
        .context("iperf3 client did not finish in time")?
        .context("run iperf3")?;
    server.check_alive()?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 -J output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = doc.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 through port {port}: {e}");
    }
    let bps = doc["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    Ok(bps / 1e9)
}

/// Our own bulk client: `streams` connections through `dial`, moving data for the run's
/// duration; returns (Gbit/s, tunnel CPU s/GiB).
async fn native(
    env: &Env,
    dial: &Dial,
    sink: &targets::Bulk,
    streams: usize,
    d: Direction,
    pids: Option<&[u32; 2]>,
) -> Result<(f64, Option<f64>)> {
    let secs = env.knobs.bulk_secs;
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        conns.push(dial.connect().await?);
    }
    // Start every stream only once all are connected: a download nobody reads yet
    // fills its buffers, and in JSON mode (no per-connection credit) one that outgrows
    // json_conn_buffer is closed as stalled.
    let start_byte = if d == Direction::Down {
        targets::BULK_DOWNLOAD
    } else {
        targets::BULK_UPLOAD
    };
    for s in &mut conns {
        s.write_all(&[start_byte]).await?;
    }
    let meter = pids.map(|p| CpuMeter::start(p)).transpose()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let sunk_before = sink.received.load(Ordering::Relaxed);
    let chunk = Arc::new(targets::noise(64 * 1024, 7));
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in conns {
        let chunk = chunk.clone();
        tasks.spawn(async move {
            let mut got = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            while Instant::now() < end {
                let step = tokio::time::timeout_at(end.into(), async {
                    if d == Direction::Down {
                        s.read(&mut buf).await
                    } else {
                        s.write_all(&chunk).await.map(|_| 0)
                    }
                })
                .await;
                match step {
                    Ok(Ok(0)) if d == Direction::Down => anyhow::bail!("the stream ended early"),
                    Ok(Ok(n)) => got += n as u64,
                    Ok(Err(e)) => return Err(e).context("bulk stream"),
                    Err(_) => break,
                }
            }
            Ok(got)
        });
    }
    let mut down = 0u64;
    while let Some(r) = tasks.join_next().await {
        down += r.context("bulk task")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = match d {
        Direction::Down => down,
        Direction::Up => sink.received.load(Ordering::Relaxed) - sunk_before,
    };
    let cpu = match meter {
        Some(m) if bytes > 0 => {
            Some(m.elapsed()?.as_secs_f64() / (bytes as f64 / (1u64 << 30) as f64))
        }
        _ => None,
    };
    Ok((bytes as f64 * 8.0 / elapsed / 1e9, cpu))
}
