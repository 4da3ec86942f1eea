//! Other users while one stalls: new connections with a 1 KiB exchange through the
//! same agent, first with nobody stalling, then while one user holds a download open
//! and reads nothing. Run inside `bulk` for the binary and the JSON stack, so all four
//! rows come from one run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::report::{quantile, Cell, Report, Table};
use crate::socks5::Dial;
use crate::stack::{Stack, SOCKS_PASS, SOCKS_USER};
use crate::targets;

/// A request slower than this counts as failed: far beyond the 2 s target, and below
/// the gateway's connect timeout so that a blocked session shows as slow, not as an
/// error of another kind.
const PROBE_LIMIT: Duration = Duration::from_secs(12);

/// How long the stalled download runs before the probes start: the pipes toward the
/// user fill within milliseconds on loopback.
const FILL: Duration = Duration::from_secs(1);

/// The probes of one stack, without and with a stalled user.
pub struct Rows {
    label: String,
    calm: Probes,
    stalled: Probes,
}

struct Probes {
    sorted: Vec<Duration>,
    failed: usize,
}

/// Probes `stack` with `count` requests to `echo`, then again while one user stalls a
/// download from `sink`.
pub async fn measure(
    stack: &Stack,
    label: &str,
    echo: SocketAddr,
    sink: SocketAddr,
    count: usize,
) -> Result<Rows> {
    let via = |target| Dial::Socks5 {
        proxy: stack.socks_port,
        user: SOCKS_USER,
        pass: SOCKS_PASS,
        target,
    };
    let calm = probes(&via(echo), count).await;
    let mut stalled_user = via(sink).connect().await.context("the stalling user")?;
    stalled_user.write_all(&[targets::BULK_DOWNLOAD]).await?;
    tokio::time::sleep(FILL).await;
    let stalled = probes(&via(echo), count).await;
    drop(stalled_user);
    let rows = Rows {
        label: label.to_string(),
        calm,
        stalled,
    };
    eprintln!(
        "  stall {label}: max {:?} calm, {:?} while one user stalls",
        rows.calm.sorted.last(),
        rows.stalled.sorted.last()
    );
    Ok(rows)
}

/// `count` sequential new connections with one 1 KiB exchange each.
async fn probes(dial: &Dial, count: usize) -> Probes {
    let mut sorted = Vec::with_capacity(count);
    let mut failed = 0;
    for _ in 0..count {
        let started = Instant::now();
        match tokio::time::timeout(PROBE_LIMIT, exchange(dial)).await {
            Ok(Ok(())) => sorted.push(started.elapsed()),
            _ => failed += 1,
        }
    }
    sorted.sort();
    Probes { sorted, failed }
}

async fn exchange(dial: &Dial) -> Result<()> {
    let mut s = dial.connect().await?;
    let msg = vec![7u8; targets::ECHO_SIZE];
    s.write_all(&msg).await?;
    let mut back = vec![0u8; targets::ECHO_SIZE];
    s.read_exact(&mut back).await?;
    anyhow::ensure!(back == msg, "the echo differs");
    Ok(())
}

/// The table and the target check (JSON: every request answered in < 2 s while one
/// user stalls).
pub fn report(report: &mut Report, rows: &[Rows], count: usize) {
    let mut t = Table::new(
        format!(
            "stall: {count} new SOCKS5 connections + 1 KiB exchange by other users, calm vs while one user stops reading a download"
        ),
        &["route", "one user stalls", "ok", "p50 ms", "max ms"],
    );
    for r in rows {
        for (stalls, p) in [("no", &r.calm), ("yes", &r.stalled)] {
            let ms = |q: f64| {
                if p.sorted.is_empty() {
                    Cell::None
                } else {
                    Cell::Num(quantile(&p.sorted, q).as_secs_f64() * 1e3, 1)
                }
            };
            t.rows.push(vec![
                Cell::text(r.label.as_str()),
                Cell::text(stalls),
                Cell::text(format!("{}/{}", p.sorted.len(), p.sorted.len() + p.failed)),
                ms(0.5),
                ms(1.0),
            ]);
        }
    }
    t.notes.push(format!(
        "a request not answered within {PROBE_LIMIT:?} counts as failed"
    ));
    report.add(t);
    for r in rows.iter().filter(|r| r.label.contains("json")) {
        let max = r.stalled.sorted.last().copied();
        report.check(
            "JSON: other users served in < 2 s while one stalls",
            format!(
                "{} of {count} answered, slowest {}",
                r.stalled.sorted.len(),
                max.map_or("-".into(), |m| format!("{:.0} ms", m.as_secs_f64() * 1e3))
            ),
            Some(r.stalled.failed == 0 && max.is_some_and(|m| m < Duration::from_secs(2))),
        );
    }
}
