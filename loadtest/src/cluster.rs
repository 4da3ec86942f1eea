//! The cost of `gateway.cluster` on new connections: two gateways with the same
//! connection caps and proxy-auth lockout, one deciding alone ("off") and one through a
//! local `redis-server` ("on"), driven alternately (off, on, off, on) by new SOCKS5
//! connections with a 1 KiB echo each. Reports the new-connection rate, the connect
//! latency and the store round trips per connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::latency::{exchange, series, Mode};
use crate::procs::{self, free_port, Proc};
use crate::report::{quantile, us, Cell, Report, Table};
use crate::socks5::Dial;
use crate::stack::{Stack, StackOptions, SOCKS_PASS, SOCKS_USER};
use crate::{targets, Env};

/// Off, on, off, on: drift over the run falls on both arms alike.
const ROUNDS: usize = 2;
/// Caps high enough never to refuse, so that every connection pays the check.
const LIMITS: &str = "limits: { per_user: { max_concurrent: 100000 }, per_ip: { max_concurrent: 100000, rate: 100000 }, proxy_auth: {} }";
const ROUND_TRIPS: &str = "anyproxy_cluster_store_round_trips_total";
const STORE_ERRORS: &str = "anyproxy_cluster_store_errors_total";

/// A `redis-server` on a loopback port of its own, nothing persisted, killed on drop.
struct Redis {
    port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Redis {
    async fn start() -> Result<Redis> {
        let bin = procs::which("redis-server").context(
            "redis-server not found on PATH: DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server",
        )?;
        let dir = procs::work_dir("redis-lt-")?;
        let port = free_port()?;
        let dir_arg = dir.path().to_str().context("temp path is not UTF-8")?;
        let mut proc = procs::spawn(
            "redis-server",
            &bin,
            &[
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir_arg,
            ],
            &dir.path().join("redis.log"),
        )?;
        procs::wait_for_listening(port, &mut proc).await?;
        Ok(Redis {
            port,
            _proc: proc,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One `INFO` section as text (an inline command; the reply is one bulk string).
    async fn info(&self, section: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.write_all(format!("INFO {section}\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                bail!("redis closed the connection before answering INFO");
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            let Some((head, body)) = text.split_once("\r\n") else {
                continue;
            };
            let len: usize = head
                .strip_prefix('$')
                .and_then(|l| l.parse().ok())
                .with_context(|| format!("unexpected INFO reply {head:?}"))?;
            if body.len() >= len {
                return Ok(body.to_string());
            }
        }
    }

    /// `total_commands_processed`, and the calls of each command (`INFO commandstats`;
    /// commands run by scripts count there too).
    async fn commands(&self) -> Result<(u64, BTreeMap<String, u64>)> {
        let total = self
            .info("stats")
            .await?
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no total_commands_processed in INFO stats")?;
        let per = self
            .info("commandstats")
            .await?
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .collect();
        Ok((total, per))
    }
}

/// One gateway + agent of one arm, and its admin port.
struct Arm {
    name: &'static str,
    stack: Stack,
    admin: u16,
    dial: Dial,
}

impl Arm {
    async fn start(env: &Env, echo: SocketAddr, redis: Option<&Redis>) -> Result<Arm> {
        let admin = free_port()?;
        let mut opts = StackOptions::binary(vec![], 1000);
        opts.gateway_extra = vec![
            format!("admin_addr: \"127.0.0.1:{admin}\""),
            LIMITS.to_string(),
        ];
        if let Some(r) = redis {
            opts.gateway_extra.push(format!(
                "cluster: {{ redis: \"{}\", node_id: \"loadtest\", lease: 10s, timeout: 500ms, on_store_failure: open }}",
                r.url()
            ));
        }
        let mut stack = Stack::start(&env.anyproxy, opts).await?;
        procs::wait_for_listening(admin, &mut stack.gateway).await?;
        let dial = Dial::Socks5 {
            proxy: stack.socks_port,
            user: SOCKS_USER,
            pass: SOCKS_PASS,
            target: echo,
        };
        let arm = Arm {
            name: if redis.is_some() { "on" } else { "off" },
            stack,
            admin,
            dial,
        };
        if redis.is_some() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while arm.metric("anyproxy_cluster_store_up").await? != 1.0 {
                if Instant::now() > deadline {
                    bail!("the gateway never reported its cluster store up");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(arm)
    }

    /// One unlabelled sample of the gateway's /metrics.
    async fn metric(&self, name: &str) -> Result<f64> {
        let mut s = TcpStream::connect(("127.0.0.1", self.admin)).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
            .await
            .context("/metrics did not answer in 10 s")??;
        if !text.starts_with("HTTP/1.1 200") {
            bail!(
                "/metrics answered {:?}",
                text.lines().next().unwrap_or_default()
            );
        }
        // `name{} 1.0`, or `name 1` (no labels).
        text.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?;
                rest.strip_prefix("{}").unwrap_or(rest).strip_prefix(' ')
            })
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} on the gateway's /metrics"))
    }
}

/// Counter readings of the "on" gateway and of Redis.
struct Counters {
    at: Instant,
    round_trips: f64,
    errors: f64,
    redis_commands: u64,
    redis_calls: BTreeMap<String, u64>,
}

async fn counters(arm: &Arm, redis: &Redis) -> Result<Counters> {
    let (total, redis_calls) = redis.commands().await?;
    // Not our own INFO calls.
    let redis_commands = total - redis_calls.get("info").copied().unwrap_or(0);
    Ok(Counters {
        at: Instant::now(),
        round_trips: arm.metric(ROUND_TRIPS).await?,
        errors: arm.metric(STORE_ERRORS).await?,
        redis_commands,
        redis_calls,
    })
}

/// What one arm did in one round.
struct Run {
    arm: &'static str,
    round: usize,
    conns: usize,
    secs: f64,
    /// Connect to echo, per connection, with `workers` at once.
    loaded: Vec<Duration>,
    /// The same, one at a time at the latency scenario's rate.
    paced: Vec<Duration>,
}

/// `workers` clients, each opening a new connection, exchanging 1 KiB and closing, over
/// and over for `secs`; returns the latencies (connect through the echo) and the wall
/// time until the last one finished.
async fn storm(dial: &Dial, workers: usize, secs: Duration) -> Result<(Vec<Duration>, f64)> {
    let msg = Arc::new(targets::noise(targets::ECHO_SIZE, 7));
    let started = Instant::now();
    let deadline = started + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (dial, msg) = (dial.clone(), msg.clone());
        tasks.spawn(async move {
            let mut back = vec![0u8; msg.len()];
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                tokio::time::timeout(Duration::from_secs(10), async {
                    let mut s = dial.connect().await?;
                    exchange(&mut s, &msg, &mut back).await
                })
                .await
                .context("a new connection took over 10 s")??;
                lat.push(t0.elapsed());
            }
            anyhow::Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("worker task")??);
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    Ok((all, secs))
}

pub async fn run(env: &Env, report: &mut Report) -> Result<()> {
    let redis = Redis::start().await?;
    let echo = targets::echo_server().await?;
    let mut arms = [
        Arm::start(env, echo, None).await?,
        Arm::start(env, echo, Some(&redis)).await?,
    ];
    let k = &env.knobs;
    let secs = Duration::from_secs(k.bulk_secs);
    // Warm-up: first connections pay for lazy set-up (the store connection, caches).
    for arm in &arms {
        storm(&arm.dial, 2, Duration::from_millis(300)).await?;
    }

    // The heartbeat's round trips over an idle interval as long as one run of an arm.
    let idle0 = counters(&arms[1], &redis).await?;
    let paced_secs = k.latency_count as f64 / k.latency_rate.max(1) as f64;
    tokio::time::sleep(secs + Duration::from_secs_f64(paced_secs)).await;
    let idle1 = counters(&arms[1], &redis).await?;
    let idle_secs = idle1.at.duration_since(idle0.at).as_secs_f64();
    let idle_rt = (idle1.round_trips - idle0.round_trips) / idle_secs;
    let idle_cmds = (idle1.redis_commands - idle0.redis_commands) as f64 / idle_secs;

    let mut runs = Vec::new();
    let (mut on_rt, mut on_cmds, mut on_errors, mut on_secs, mut on_conns) =
        (0.0, 0.0, 0.0, 0.0, 0usize);
    let mut on_calls: BTreeMap<String, u64> = BTreeMap::new();
    for round in 1..=ROUNDS {
        for arm in &mut arms {
            let before = counters_if_on(arm, &redis).await?;
            let (loaded, storm_secs) = storm(&arm.dial, k.cluster_workers, secs)
                .await
                .with_context(|| format!("cluster {} round {round}", arm.name))?;
            let paced = series(env, &arm.dial, Mode::NewConn)
                .await
                .with_context(|| format!("cluster {} round {round}, paced", arm.name))?;
            if let Some(b) = before {
                // The releases and lockout clears go off the path: let them land.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let a = counters(arm, &redis).await?;
                on_rt += a.round_trips - b.round_trips;
                on_errors += a.errors - b.errors;
                on_cmds += (a.redis_commands - b.redis_commands) as f64;
                on_secs += a.at.duration_since(b.at).as_secs_f64();
                on_conns += loaded.len() + paced.len();
                for (name, n) in &a.redis_calls {
                    let was = b.redis_calls.get(name).copied().unwrap_or(0);
                    *on_calls.entry(name.clone()).or_default() += n - was;
                }
            }
            eprintln!(
                "  cluster {} round {round}: {:.0} conn/s, p50 {:?} loaded, {:?} paced",
                arm.name,
                loaded.len() as f64 / storm_secs,
                quantile(&loaded, 0.5),
                quantile(&paced, 0.5)
            );
            runs.push(Run {
                arm: arm.name,
                round,
                conns: loaded.len(),
                secs: storm_secs,
                loaded,
                paced,
            });
            arm.stack.check_alive()?;
        }
    }

    let mut t = Table::new(
        format!(
            "cluster: new SOCKS5 connections (auth, 1 KiB echo), caps + lockout local vs through Redis; {} workers for {} s, then {} paced at {}/s, per run",
            k.cluster_workers, k.bulk_secs, k.latency_count, k.latency_rate
        ),
        &[
            "cluster",
            "round",
            "conns",
            "conn/s",
            "loaded p50 us",
            "loaded p99 us",
            "paced p50 us",
            "paced p99 us",
        ],
    );
    for r in &runs {
        t.rows.push(vec![
            Cell::text(r.arm),
            Cell::Num(r.round as f64, 0),
            Cell::Num(r.conns as f64, 0),
            Cell::Num(r.conns as f64 / r.secs, 0),
            us(quantile(&r.loaded, 0.5)),
            us(quantile(&r.loaded, 0.99)),
            us(quantile(&r.paced, 0.5)),
            us(quantile(&r.paced, 0.99)),
        ]);
    }
    t.notes.push(format!(
        "both arms: {LIMITS}; on adds gateway.cluster (lease 10s, timeout 500ms, open) on a local redis-server"
    ));
    t.notes.push(
        "latency: TCP connect + SOCKS5 auth and CONNECT + one 1 KiB echo; loaded = during the workers' run, paced = one at a time"
            .into(),
    );
    report.add(t);

    let pooled = |arm: &str, pick: fn(&Run) -> &Vec<Duration>| {
        let mut v: Vec<Duration> = runs
            .iter()
            .filter(|r| r.arm == arm)
            .flat_map(|r| pick(r).iter().copied())
            .collect();
        v.sort();
        v
    };
    let rate = |arm: &str| {
        let (n, s) = runs
            .iter()
            .filter(|r| r.arm == arm)
            .fold((0usize, 0.0), |(n, s), r| (n + r.conns, s + r.secs));
        n as f64 / s.max(1e-9)
    };
    let (off_rate, on_rate) = (rate("off"), rate("on"));
    let mut s = Table::new(
        "cluster: on vs off, all rounds pooled",
        &["measure", "off", "on", "on / off", "added us"],
    );
    s.rows.push(vec![
        Cell::text("new conn/s"),
        Cell::Num(off_rate, 0),
        Cell::Num(on_rate, 0),
        Cell::Num(on_rate / off_rate.max(1e-9), 2),
        Cell::None,
    ]);
    let mut added_p50 = 0.0;
    for (name, pick, q) in [
        (
            "paced p50 us",
            (|r: &Run| &r.paced) as fn(&Run) -> &Vec<Duration>,
            0.5,
        ),
        ("paced p99 us", |r: &Run| &r.paced, 0.99),
        ("loaded p50 us", |r: &Run| &r.loaded, 0.5),
        ("loaded p99 us", |r: &Run| &r.loaded, 0.99),
    ] {
        let off = quantile(&pooled("off", pick), q).as_secs_f64() * 1e6;
        let on = quantile(&pooled("on", pick), q).as_secs_f64() * 1e6;
        if name == "paced p50 us" {
            added_p50 = on - off;
        }
        s.rows.push(vec![
            Cell::text(name),
            Cell::Num(off, 0),
            Cell::Num(on, 0),
            Cell::Num(on / off.max(1e-9), 2),
            Cell::Num(on - off, 0),
        ]);
    }
    report.add(s);

    let conns = on_conns.max(1) as f64;
    let mut rt = Table::new(
        "cluster: store round trips per new connection (cluster on)",
        &[
            "counter",
            "delta",
            "idle over same time",
            "per conn raw",
            "per conn net",
        ],
    );
    let idle = |per_sec: f64| per_sec * on_secs;
    rt.rows.push(vec![
        Cell::text(ROUND_TRIPS),
        Cell::Num(on_rt, 0),
        Cell::Num(idle(idle_rt), 1),
        Cell::Num(on_rt / conns, 2),
        Cell::Num((on_rt - idle(idle_rt)) / conns, 2),
    ]);
    rt.rows.push(vec![
        Cell::text("redis total_commands_processed - info"),
        Cell::Num(on_cmds, 0),
        Cell::Num(idle(idle_cmds), 1),
        Cell::Num(on_cmds / conns, 2),
        Cell::Num((on_cmds - idle(idle_cmds)) / conns, 2),
    ]);
    rt.notes.push(format!(
        "{on_conns} connections in {on_secs:.1} s of the on arm's runs; idle = the rate over {idle_secs:.1} s with no connections (the heartbeat; our INFO calls are left out) times that time"
    ));
    rt.notes.push(format!(
        "{ROUND_TRIPS} counts every store operation (a command, a script or a pipeline); on the connection's path: the lockout's EXISTS and the caps' script; off it: the lockout clear and the slot release"
    ));
    let calls: Vec<String> = on_calls
        .iter()
        .filter(|(name, n)| **n as f64 / conns >= 0.005 && name.as_str() != "info")
        .map(|(name, n)| format!("{name} {:.2}", *n as f64 / conns))
        .collect();
    rt.notes.push(format!(
        "redis calls per connection by command (INFO commandstats; a script's own commands count too): {}",
        calls.join(", ")
    ));
    rt.notes
        .push(format!("store errors during the runs: {on_errors:.0}"));
    report.add(rt);
    if on_errors > 0.0 {
        report.error(
            "cluster",
            &anyhow::anyhow!("{on_errors:.0} store operations failed during the on arm's runs"),
        );
    }

    let judged = !k.tiny;
    report.check(
        "cluster: new-connection rate with cluster on >= 0.8x off",
        format!(
            "{:.2}x ({on_rate:.0} vs {off_rate:.0} conn/s)",
            on_rate / off_rate.max(1e-9)
        ),
        judged.then_some(on_rate >= 0.8 * off_rate),
    );
    report.check(
        "cluster: added p50 connect (paced) <= 1 ms",
        format!("{added_p50:.0} us"),
        judged.then_some(added_p50 <= 1000.0),
    );
    drop(arms);
    drop(redis);
    Ok(())
}

async fn counters_if_on(arm: &Arm, redis: &Redis) -> Result<Option<Counters>> {
    if arm.name == "on" {
        Ok(Some(counters(arm, redis).await?))
    } else {
        Ok(None)
    }
}
