//! Curl sessions: many short-lived curl processes with bounded concurrency, one GET of
//! the static page each, through every route to the same HTTP target.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::Semaphore;

use crate::procs::{self, CpuMeter};
use crate::rathole::{Rathole, Transport};
use crate::report::{ms, quantile, ratio, Cell, Report, Table};
use crate::stack::{Stack, StackOptions, HTTP_PASS, HTTP_USER, SOCKS_PASS, SOCKS_USER};
use crate::{targets, Env};

/// What one route's batch of curl runs gave.
pub struct Outcome {
    pub label: String,
    pub ok: usize,
    pub failed: usize,
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Tunnel CPU (both ends) per 1000 requests, when there is a tunnel.
    pub cpu_per_k: Option<f64>,
    pub first_error: Option<String>,
}

pub async fn run(env: &Env, report: &mut Report) -> Result<Vec<Outcome>> {
    let target = targets::http_server().await?;
    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    let mut out = Vec::new();

    out.push(batch(env, "direct", &[], &url(target.port()), &[]).await?);

    let mut stack = Stack::start(
        &env.anyproxy,
        StackOptions::binary(vec![("http", target)], env.knobs.curl_concurrency * 2 + 100),
    )
    .await?;
    let pids = stack.pids()?;
    let proxy = format!(
        "http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{}",
        stack.http_port
    );
    let socks = format!("{SOCKS_USER}:{SOCKS_PASS}@127.0.0.1:{}", stack.socks_port);
    let routes: Vec<(&str, Vec<String>, String)> = vec![
        (
            "anyproxy http proxy",
            vec!["-x".into(), proxy.clone()],
            url(target.port()),
        ),
        (
            "anyproxy http CONNECT",
            vec!["-p".into(), "-x".into(), proxy],
            url(target.port()),
        ),
        (
            "anyproxy socks5",
            vec!["--socks5-hostname".into(), socks],
            url(target.port()),
        ),
        ("anyproxy forward", vec![], url(stack.forward("http")?)),
    ];
    for (label, args, u) in routes {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        out.push(batch(env, label, &args, &u, &pids).await?);
        stack.check_alive()?;
    }
    drop(stack);

    if let Some(bin) = &env.rathole {
        for t in Transport::ALL {
            let mut r = Rathole::start(bin, t, &[("http", target)]).await?;
            let pids = r.pids()?;
            out.push(batch(env, t.label(), &[], &url(r.port("http")?), &pids).await?);
            r.check_alive()?;
        }
    }

    table(env, report, &out);
    Ok(out)
}

fn table(env: &Env, report: &mut Report, out: &[Outcome]) {
    let find = |l: &str| out.iter().find(|o| o.label == l).map(|o| o.rate);
    let direct = find("direct");
    let rh_tls = find(Transport::Tls.label());
    let mut t = Table::new(
        format!(
            "curl sessions: {} curl processes per route, {} at a time, GET of a {} B page",
            env.knobs.curl_count,
            env.knobs.curl_concurrency,
            targets::PAGE_SIZE
        ),
        &[
            "route",
            "ok",
            "failed",
            "req/s",
            "p50 ms",
            "p99 ms",
            "x direct",
            "x rathole tls",
            "tunnel cpu ms/1k req",
        ],
    );
    for o in out {
        t.rows.push(vec![
            Cell::text(&o.label),
            Cell::Num(o.ok as f64, 0),
            Cell::Num(o.failed as f64, 0),
            Cell::Num(o.rate, 0),
            ms(o.p50),
            ms(o.p99),
            ratio(o.rate, direct),
            ratio(o.rate, rh_tls),
            o.cpu_per_k.map_or(Cell::None, |c| Cell::Num(c, 0)),
        ]);
        if let Some(e) = &o.first_error {
            t.notes.push(format!("{}: first failure: {e}", o.label));
        }
    }
    t.notes.push(
        "latency is curl's time_total (connect + proxy handshake + request); req/s is completions over wall time"
            .into(),
    );
    report.add(t);

    let anyproxy: Vec<&Outcome> = out
        .iter()
        .filter(|o| o.label.starts_with("anyproxy"))
        .collect();
    let failed: usize = anyproxy.iter().map(|o| o.failed).sum();
    let total: usize = anyproxy.iter().map(|o| o.ok + o.failed).sum();
    report.check(
        format!("curl: 0 failures ({} per route)", env.knobs.curl_count),
        format!("{failed} failed of {total}"),
        Some(failed == 0),
    );
    if let (Some(fwd), Some(tls)) = (find("anyproxy forward"), rh_tls) {
        report.check(
            "curl: new-connection rate >= 1.5x rathole tls (forward vs its service)",
            format!("{:.2}x ({fwd:.0} vs {tls:.0} req/s)", fwd / tls),
            Some(fwd >= 1.5 * tls),
        );
    }
}

/// Runs `count` curl processes, `concurrency` at a time, each fetching `url` once.
async fn batch(env: &Env, label: &str, args: &[&str], url: &str, pids: &[u32]) -> Result<Outcome> {
    let count = env.knobs.curl_count;
    let sem = Arc::new(Semaphore::new(env.knobs.curl_concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let cpu = if pids.is_empty() {
        None
    } else {
        Some(CpuMeter::start(pids)?)
    };
    // Bounded in wall time too: a stuck route must not hang the run.
    let deadline = Instant::now() + Duration::from_secs(30 + count as u64 / 20);
    let started = Instant::now();
    let mut args_owned: Vec<String> = vec![
        "-sS".into(),
        "-o".into(),
        "/dev/null".into(),
        "--max-time".into(),
        "30".into(),
        "-w".into(),
        "%{http_code} %{time_total} %{size_download}".into(),
    ];
    args_owned.extend(args.iter().map(|s| s.to_string()));
    args_owned.push(url.to_string());
    let args = Arc::new(args_owned);
    let mut skipped = 0;
    for _ in 0..count {
        let permit = tokio::time::timeout_at(deadline.into(), sem.clone().acquire_owned()).await;
        let Ok(permit) = permit else {
            skipped += 1;
            continue;
        };
        let permit = permit.context("semaphore closed")?;
        let (curl, args) = (env.curl.clone(), args.clone());
        tasks.spawn(async move {
            let _permit = permit;
            one(&curl, &args).await
        });
    }
    let mut lat = Vec::with_capacity(count);
    let mut failed = skipped;
    let mut first_error = None;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline.into(), tasks.join_next()).await {
        match r.context("curl task")? {
            Ok(d) => lat.push(d),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    // Whatever is still running past the deadline is killed (kill_on_drop) and failed.
    failed += tasks.len();
    if !tasks.is_empty() {
        first_error.get_or_insert_with(|| "wall-clock deadline reached".into());
    }
    tasks.shutdown().await;
    let wall = started.elapsed();
    let cpu_per_k = match cpu {
        Some(c) => Some(c.elapsed()?.as_secs_f64() * 1e3 / (lat.len().max(1) as f64 / 1e3)),
        None => None,
    };
    lat.sort();
    let o = Outcome {
        label: label.to_string(),
        ok: lat.len(),
        failed,
        rate: lat.len() as f64 / wall.as_secs_f64(),
        p50: quantile(&lat, 0.5),
        p99: quantile(&lat, 0.99),
        cpu_per_k,
        first_error,
    };
    eprintln!(
        "  curl {label}: {} ok, {} failed, {:.0} req/s",
        o.ok, o.failed, o.rate
    );
    Ok(o)
}

/// One curl process; Ok(its time_total) when it fetched the whole page with a 200.
async fn one(curl: &std::path::Path, args: &[String]) -> std::result::Result<Duration, String> {
    let out = procs::command(curl)
        .args(args)
        .output()
        .await
        .map_err(|e| format!("spawn curl: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut f = stdout.split_whitespace();
    let (code, secs, size) = (f.next(), f.next(), f.next());
    let good = out.status.success()
        && code == Some("200")
        && size.and_then(|s| s.parse::<usize>().ok()) == Some(targets::PAGE_SIZE);
    if !good {
        return Err(format!(
            "exit {:?}, http {}, {}",
            out.status.code(),
            code.unwrap_or("?"),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    secs.and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("unparsable curl -w output {stdout:?}"))
}
