//! Added latency: sequential 1 KiB request/response exchanges at a fixed low rate, so
//! nothing queues and what is measured is the path itself, through the tunnel and
//! direct.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::rathole::{Rathole, Transport};
use crate::report::{quantile, ratio, us, Cell, Report, Table};
use crate::socks5::Dial;
use crate::stack::{Stack, StackOptions, SOCKS_PASS, SOCKS_USER};
use crate::{targets, Env};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One connection for every exchange.
    Persistent,
    /// A new connection (and, through SOCKS5, a new handshake) for each exchange.
    NewConn,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Persistent => "persistent",
            Mode::NewConn => "new conn",
        }
    }
}

struct Row {
    route: String,
    mode: Mode,
    sorted: Vec<Duration>,
}

pub async fn run(env: &Env, report: &mut Report) -> Result<()> {
    let echo = targets::echo_server().await?;
    let mut rows = Vec::new();
    measure(env, report, &mut rows, "direct", &Dial::Direct(echo)).await;

    let mut stack = Stack::start(
        &env.anyproxy,
        StackOptions::binary(vec![("echo", echo)], 100),
    )
    .await?;
    let fwd = Dial::Direct(local(stack.forward("echo")?));
    measure(env, report, &mut rows, "anyproxy binary forward", &fwd).await;
    let socks = Dial::Socks5 {
        proxy: stack.socks_port,
        user: SOCKS_USER,
        pass: SOCKS_PASS,
        target: echo,
    };
    measure(env, report, &mut rows, "anyproxy binary socks5", &socks).await;
    stack.check_alive()?;
    drop(stack);

    if let Some(bin) = &env.rathole {
        for t in Transport::ALL {
            let mut r = Rathole::start(bin, t, &[("echo", echo)]).await?;
            let dial = Dial::Direct(local(r.port("echo")?));
            measure(env, report, &mut rows, t.label(), &dial).await;
            r.check_alive()?;
        }
    }

    let p50 = |route: &str, mode: Mode| {
        rows.iter()
            .find(|r| r.route == route && r.mode == mode)
            .map(|r| quantile(&r.sorted, 0.5))
    };
    let mut t = Table::new(
        format!(
            "latency: {} sequential {} B exchanges per row at {}/s",
            env.knobs.latency_count,
            targets::ECHO_SIZE,
            env.knobs.latency_rate
        ),
        &[
            "route",
            "mode",
            "p50 us",
            "p90 us",
            "p99 us",
            "added p50 us",
            "x direct p50",
        ],
    );
    for r in &rows {
        let mid = quantile(&r.sorted, 0.5);
        let direct = p50("direct", r.mode);
        t.rows.push(vec![
            Cell::text(&r.route),
            Cell::text(r.mode.name()),
            us(mid),
            us(quantile(&r.sorted, 0.9)),
            us(quantile(&r.sorted, 0.99)),
            direct.map_or(Cell::None, |d| {
                Cell::Num((mid.as_secs_f64() - d.as_secs_f64()) * 1e6, 0)
            }),
            ratio(mid.as_secs_f64(), direct.map(|d| d.as_secs_f64())),
        ]);
    }
    t.notes
        .push("new conn: connect (+ SOCKS5 handshake) + one exchange, timed together".into());
    report.add(t);

    if let (Some(a), Some(d)) = (
        p50("anyproxy binary forward", Mode::Persistent),
        p50("direct", Mode::Persistent),
    ) {
        let added = (a.as_secs_f64() - d.as_secs_f64()) * 1e6;
        report.check(
            "latency: added p50 of a 1 KiB exchange <= 150 us",
            format!(
                "{added:.0} us ({:.0} vs {:.0} us)",
                a.as_secs_f64() * 1e6,
                d.as_secs_f64() * 1e6
            ),
            Some(added <= 150.0),
        );
    }
    Ok(())
}

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

async fn measure(env: &Env, report: &mut Report, rows: &mut Vec<Row>, route: &str, dial: &Dial) {
    for mode in [Mode::Persistent, Mode::NewConn] {
        match measure_one(env, route, dial, mode).await {
            Ok(row) => rows.push(row),
            Err(e) => report.error(&format!("latency {route} {}", mode.name()), &e),
        }
    }
}

async fn measure_one(env: &Env, route: &str, dial: &Dial, mode: Mode) -> Result<Row> {
    {
        let budget = Duration::from_secs(30)
            + Duration::from_millis(
                env.knobs.latency_count as u64 * 1000 / env.knobs.latency_rate.max(1),
            ) * 3;
        let sorted = tokio::time::timeout(budget, series(env, dial, mode))
            .await
            .with_context(|| format!("latency through {route} did not finish in {budget:?}"))??;
        eprintln!(
            "  latency {route} {}: p50 {:?}",
            mode.name(),
            quantile(&sorted, 0.5)
        );
        Ok(Row {
            route: route.to_string(),
            mode,
            sorted,
        })
    }
}

pub(crate) async fn series(env: &Env, dial: &Dial, mode: Mode) -> Result<Vec<Duration>> {
    let msg = targets::noise(targets::ECHO_SIZE, 3);
    let mut back = vec![0u8; targets::ECHO_SIZE];
    let mut tick = tokio::time::interval(Duration::from_micros(
        1_000_000 / env.knobs.latency_rate.max(1),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn = if mode == Mode::Persistent {
        let mut s = dial.connect().await?;
        // Warm-up: the first exchanges pay for window growth and cold caches.
        for _ in 0..10 {
            exchange(&mut s, &msg, &mut back).await?;
        }
        Some(s)
    } else {
        None
    };
    let mut samples = Vec::with_capacity(env.knobs.latency_count);
    for _ in 0..env.knobs.latency_count {
        tick.tick().await;
        let t0 = Instant::now();
        match &mut conn {
            Some(s) => exchange(s, &msg, &mut back).await?,
            None => {
                let mut s = dial.connect().await?;
                exchange(&mut s, &msg, &mut back).await?;
            }
        }
        samples.push(t0.elapsed());
    }
    samples.sort();
    Ok(samples)
}

pub(crate) async fn exchange(
    s: &mut tokio::net::TcpStream,
    msg: &[u8],
    back: &mut [u8],
) -> Result<()> {
    s.write_all(msg).await?;
    s.read_exact(back).await.context("read the echo")?;
    if back != msg {
        bail!("the echo came back altered");
    }
    Ok(())
}
