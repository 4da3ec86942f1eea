//! Scale: many idle tunnelled connections held open at once; what each costs the
//! gateway and the agent in resident memory and file descriptors.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::procs::{self, fd_count, rss_kib, Proc};
use crate::rathole::{Rathole, Transport};
use crate::report::{Cell, Report, Table};
use crate::socks5::Dial;
use crate::stack::{Stack, StackOptions, SOCKS_PASS, SOCKS_USER};
use crate::{targets, Env};

/// Memory and descriptors of the two tunnel processes at one moment.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss: [u64; 2],
    fds: [usize; 2],
}

fn sample(pids: [u32; 2]) -> Result<Sample> {
    Ok(Sample {
        rss: [rss_kib(pids[0])?, rss_kib(pids[1])?],
        fds: [fd_count(pids[0])?, fd_count(pids[1])?],
    })
}

struct Row {
    route: String,
    conns: usize,
    idle: Sample,
    held: Sample,
    closed: Sample,
    open_secs: f64,
}

pub async fn run(env: &Env, report: &mut Report) -> Result<()> {
    measure_all(env, report, env.knobs.scale_conns).await
}

/// Idle memory only (no connections): the peers comparison.
pub async fn idle_only(env: &Env, report: &mut Report) -> Result<()> {
    measure_all(env, report, 0).await
}

async fn measure_all(env: &Env, report: &mut Report, conns: usize) -> Result<()> {
    let hold_dir = procs::work_dir("hold-lt-")?;
    let (_hold, hold) = hold_server(&hold_dir.path().join("hold.log")).await?;
    // Our own sockets count against our limit too; leave room for everything else.
    let fit = (env.nofile as usize).saturating_sub(512);
    let mut notes = Vec::new();
    let ours = conns.min(fit);
    if ours < conns {
        notes.push(format!(
            "open-file limit {} caps this run at {ours} connections",
            env.nofile
        ));
    }
    let mut rows = Vec::new();
    for route in ["socks5", "forward"] {
        if conns == 0 && route == "forward" {
            break;
        }
        let mut stack = Stack::start(
            &env.anyproxy,
            StackOptions::binary(vec![("hold", hold)], ours + 100),
        )
        .await?;
        let dial = if route == "socks5" {
            Dial::Socks5 {
                proxy: stack.socks_port,
                user: SOCKS_USER,
                pass: SOCKS_PASS,
                target: hold,
            }
        } else {
            Dial::Direct(([127, 0, 0, 1], stack.forward("hold")?).into())
        };
        let pids = stack.pids()?;
        let label = format!("anyproxy {route}");
        match hold_many(&label, pids, &dial, ours).await {
            Ok(row) => rows.push(row),
            Err(e) => report.error(&format!("scale {label}"), &e),
        }
        stack.check_alive()?;
    }
    if let Some(bin) = &env.rathole {
        // rathole holds two sockets per connection in each process (visitor + data
        // channel on the server, data channel + target on the client).
        let theirs = ours.min(fit / 2);
        if theirs < ours {
            notes.push(format!(
                "rathole needs two descriptors per connection: capped at {theirs} by the open-file limit {}",
                env.nofile
            ));
        }
        for t in Transport::ALL {
            let mut r = Rathole::start(bin, t, &[("hold", hold)]).await?;
            let dial = Dial::Direct(([127, 0, 0, 1], r.port("hold")?).into());
            match hold_many(t.label(), r.pids()?, &dial, theirs).await {
                Ok(row) => rows.push(row),
                Err(e) => report.error(&format!("scale {}", t.label()), &e),
            }
            r.check_alive()?;
        }
    }

    let title = if conns == 0 {
        "idle memory: tunnel processes with one session and no connections".to_string()
    } else {
        format!("scale: {conns} idle tunnelled connections held at once (1 byte each way at open)")
    };
    let mut t = Table::new(
        title,
        &[
            "route",
            "conns",
            "server idle KiB",
            "agent idle KiB",
            "server KiB/conn",
            "agent KiB/conn",
            "server fds/conn",
            "agent fds/conn",
            "server KiB after close",
            "open conn/s",
        ],
    );
    for r in &rows {
        // Growth from idle to held, per connection, for one process's measure.
        let per = |held: f64, idle: f64| {
            if r.conns == 0 {
                Cell::None
            } else {
                Cell::Num((held - idle) / r.conns as f64, 2)
            }
        };
        let rss = |i: usize| per(r.held.rss[i] as f64, r.idle.rss[i] as f64);
        let fds = |i: usize| per(r.held.fds[i] as f64, r.idle.fds[i] as f64);
        t.rows.push(vec![
            Cell::text(&r.route),
            Cell::Num(r.conns as f64, 0),
            Cell::Num(r.idle.rss[0] as f64, 0),
            Cell::Num(r.idle.rss[1] as f64, 0),
            rss(0),
            rss(1),
            fds(0),
            fds(1),
            if r.conns == 0 {
                Cell::None
            } else {
                Cell::Num(r.closed.rss[0] as f64, 0)
            },
            if r.conns == 0 {
                Cell::None
            } else {
                Cell::Num(r.conns as f64 / r.open_secs, 0)
            },
        ]);
    }
    t.notes.push(
        "server = anyproxy gateway / rathole server; agent = anyproxy agent / rathole client; RSS is VmRSS"
            .into(),
    );
    t.notes.extend(notes);
    report.add(t);

    let gw = rows.iter().find(|r| r.route == "anyproxy socks5");
    if let Some(g) = gw.filter(|g| g.conns > 0) {
        let per = (g.held.rss[0] as f64 - g.idle.rss[0] as f64) / g.conns as f64;
        report.check(
            "scale: gateway RSS per idle tunnelled connection <= 16 KiB at 10,000",
            format!("{per:.2} KiB/conn at {}", g.conns),
            (g.conns >= 10_000).then_some(per <= 16.0),
        );
    }
    let peer = rows.iter().find(|r| r.route == Transport::WsTls.label());
    if let (Some(g), Some(p)) = (gw, peer) {
        report.check(
            "idle gateway RSS <= rathole server's (ws+tls)",
            format!("{} vs {} KiB", g.idle.rss[0], p.idle.rss[0]),
            Some(g.idle.rss[0] <= p.idle.rss[0]),
        );
    }
    Ok(())
}

/// Opens `n` connections through `dial` to the hold server, each confirmed end to end
/// by the server's greeting byte, samples the tunnel processes, then closes them all.
async fn hold_many(route: &str, pids: [u32; 2], dial: &Dial, n: usize) -> Result<Row> {
    // Let start-up allocations settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = sample(pids)?;
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(100));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .context("semaphore closed")?;
        let dial = dial.clone();
        tasks.spawn(async move {
            let _permit = permit;
            tokio::time::timeout(Duration::from_secs(30), open_one(&dial))
                .await
                .context("open timed out")?
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r.context("open task")? {
            Ok(s) => held.push(s),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        bail!(
            "{route}: only {} of {n} idle connections opened; first error: {e:#}",
            held.len()
        );
    }
    let open_secs = started.elapsed().as_secs_f64().max(1e-6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_peak = sample(pids)?;
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed = sample(pids)?;
    eprintln!(
        "  scale {route}: {n} conns, gateway {} -> {} KiB, agent {} -> {} KiB",
        idle.rss[0], at_peak.rss[0], idle.rss[1], at_peak.rss[1]
    );
    Ok(Row {
        route: route.to_string(),
        conns: n,
        idle,
        held: at_peak,
        closed,
        open_secs,
    })
}

async fn open_one(dial: &Dial) -> Result<TcpStream> {
    let mut s = dial.connect().await?;
    let mut hello = [0u8; 1];
    s.read_exact(&mut hello)
        .await
        .context("no greeting from the hold server")?;
    if hello[0] != targets::HOLD_HELLO {
        bail!("unexpected greeting {hello:?}");
    }
    Ok(s)
}

/// Starts this binary's `hold` subcommand as a child; its sockets then count against
/// its own open-file limit, not ours.
async fn hold_server(log: &std::path::Path) -> Result<(Proc, SocketAddr)> {
    let exe = std::env::current_exe().context("find this executable")?;
    let err = std::fs::File::create(log)?;
    let mut child = procs::command(&exe)
        .arg("hold")
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .context("spawn the hold server")?;
    let stdout = child.stdout.take().context("hold server stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the hold server did not print its port")??
        .context("the hold server exited before printing its port")?;
    let port: u16 = line.trim().parse().context("hold server port")?;
    let proc = Proc {
        name: "hold server".into(),
        child,
        log: log.to_path_buf(),
    };
    Ok((proc, ([127, 0, 0, 1], port).into()))
}
