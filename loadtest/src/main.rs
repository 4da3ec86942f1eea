//! anyproxy load tests on loopback: starts its own targets, the release `anyproxy`
//! gateway and agent, rathole for comparison, drives them with curl, iperf3 and its own
//! clients, prints tables with ratios and writes them as JSON. See loadtest/README.md.

mod bulk;
mod cluster;
mod curl;
mod latency;
mod procs;
mod rathole;
mod report;
mod scale;
mod soak;
mod socks5;
mod stack;
mod stall;
mod targets;
mod udp;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "anyproxy load tests on loopback (see loadtest/README.md)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// The anyproxy binary to test.
    #[arg(long, global = true, default_value = "target/release/anyproxy")]
    anyproxy: PathBuf,
    /// rathole 0.5 binary (default: `rathole` on PATH or in ~/.cargo/bin).
    #[arg(long, global = true)]
    rathole: Option<PathBuf>,
    /// Skip rathole in `all` even when it is installed.
    #[arg(long, global = true)]
    no_rathole: bool,
    /// Seconds-long smoke run with a handful of connections (what CI runs).
    #[arg(long, global = true)]
    tiny: bool,
    /// Keep each run's configs and logs (their directories are printed).
    #[arg(long, global = true)]
    keep_logs: bool,
    /// Also write the results as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// curl: processes per route.
    #[arg(long, global = true)]
    count: Option<usize>,
    /// curl: processes at a time; cluster: clients at a time.
    #[arg(long, global = true)]
    concurrency: Option<usize>,
    /// bulk, cluster: seconds per measurement.
    #[arg(long, global = true)]
    duration: Option<u64>,
    /// bulk: which way the data flows: down (target to user), up, or both.
    #[arg(long, global = true, value_parser = ["down", "up", "both"])]
    direction: Option<String>,
    /// scale: idle tunnelled connections to hold.
    #[arg(long, global = true)]
    conns: Option<usize>,
    /// latency: exchanges per route (cluster: paced connections per run).
    #[arg(long, global = true)]
    exchanges: Option<usize>,
    /// latency: exchanges per second.
    #[arg(long, global = true)]
    rate: Option<u64>,
    /// soak: minutes to run (default 10; 1 with --tiny).
    #[arg(long, global = true)]
    minutes: Option<u64>,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// Thousands of curl processes through the HTTP proxy, CONNECT, SOCKS5 and a forward.
    Curl,
    /// iperf3 through a forward and our own client through SOCKS5; binary/JSON, deflate.
    Bulk,
    /// Idle tunnelled connections: RSS and file descriptors per connection.
    Scale,
    /// Added latency of a 1 KiB exchange through the tunnel at a low fixed rate.
    Latency,
    /// curl + bulk + idle memory against rathole (tcp, tls, ws+tls) and direct.
    Peers,
    /// Every scenario, with rathole unless --no-rathole.
    All,
    /// New-connection rate, connect latency and Redis round trips with gateway.cluster
    /// on vs off (same caps and lockout); needs redis-server.
    Cluster,
    /// Minutes of mixed work with agent and gateway restarts: growth and stray failures.
    Soak,
    /// 512 B datagrams/s and loss through a UDP forward and SOCKS5 UDP vs direct.
    Udp,
    /// (internal) Hold every accepted connection open; prints the port.
    #[command(hide = true)]
    Hold,
}

/// Sizes of the work, after --tiny and explicit flags are applied.
pub struct Knobs {
    pub curl_count: usize,
    pub curl_concurrency: usize,
    pub bulk_secs: u64,
    pub directions: Vec<bulk::Direction>,
    pub scale_conns: usize,
    pub latency_count: usize,
    pub latency_rate: u64,
    pub cluster_workers: usize,
    pub tiny: bool,
}

/// What every scenario needs: the programs and the sizes.
pub struct Env {
    pub anyproxy: PathBuf,
    pub rathole: Option<PathBuf>,
    pub iperf3: PathBuf,
    pub curl: PathBuf,
    pub nofile: u64,
    pub knobs: Knobs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            // Returning drops the running scenario: its child processes are killed and
            // temporary directories removed on the way out.
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    drop(rt);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let nofile = procs::raise_nofile();
    procs::keep_logs(args.keep_logs);
    if args.cmd == Cmd::Hold {
        return targets::hold_server().await;
    }
    let env = env(&args, nofile)?;
    println!("{}", report::machine_line());
    println!(
        "anyproxy: {}   rathole: {}   open-file limit: {nofile}",
        env.anyproxy.display(),
        env.rathole
            .as_ref()
            .map_or("not used".into(), |p| p.display().to_string())
    );
    let started = Instant::now();
    let mut rep = report::Report::default();
    match args.cmd {
        Cmd::Curl => {
            curl::run(&env, &mut rep).await?;
        }
        Cmd::Bulk => bulk::run(&env, &mut rep, bulk::Matrix::Full).await?,
        Cmd::Scale => scale::run(&env, &mut rep).await?,
        Cmd::Latency => latency::run(&env, &mut rep).await?,
        Cmd::Cluster => cluster::run(&env, &mut rep).await?,
        Cmd::Udp => udp::run(&env, &mut rep).await?,
        Cmd::Peers => {
            curl::run(&env, &mut rep).await?;
            bulk::run(&env, &mut rep, bulk::Matrix::Peers).await?;
            scale::idle_only(&env, &mut rep).await?;
        }
        Cmd::All => {
            curl::run(&env, &mut rep).await?;
            bulk::run(&env, &mut rep, bulk::Matrix::Full).await?;
            latency::run(&env, &mut rep).await?;
            scale::run(&env, &mut rep).await?;
            udp::run(&env, &mut rep).await?;
        }
        Cmd::Soak => {
            let minutes = args
                .minutes
                .unwrap_or_else(|| soak::default_minutes(args.tiny));
            soak::run(&env, &mut rep, minutes).await?;
        }
        Cmd::Hold => unreachable!("handled above"),
    }
    rep.print_checks();
    let took = started.elapsed();
    println!("\ntook {:.0} s", took.as_secs_f64());
    if let Some(path) = &args.json {
        let argv: Vec<String> = std::env::args().collect();
        rep.write_json(path, &argv, took)?;
        println!("results written to {}", path.display());
    }
    if !rep.errors.is_empty() {
        bail!(
            "{} measurement(s) failed:\n  {}",
            rep.errors.len(),
            rep.errors.join("\n  ")
        );
    }
    Ok(())
}

fn env(args: &Args, nofile: u64) -> Result<Env> {
    if !args.anyproxy.is_file() {
        bail!(
            "no anyproxy binary at {} (build it with `cargo build --release`, or pass --anyproxy)",
            args.anyproxy.display()
        );
    }
    let anyproxy = std::fs::canonicalize(&args.anyproxy)?;
    let wants_rathole = match args.cmd {
        Cmd::Peers => true,
        Cmd::All => !args.no_rathole,
        _ => args.rathole.is_some(),
    };
    let rathole = if wants_rathole {
        let found = match &args.rathole {
            Some(p) => procs::which(&p.to_string_lossy()),
            None => procs::which("rathole").or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".cargo/bin/rathole"))
                    .filter(|p| p.is_file())
            }),
        };
        Some(found.context(
            "rathole not found: install it with `cargo install rathole --version 0.5.0` (loadtest/run.sh does), pass --rathole PATH, or --no-rathole",
        )?)
    } else {
        None
    };
    let need = |name: &str, how: &str| {
        procs::which(name).with_context(|| format!("{name} not found on PATH: {how}"))
    };
    let curl = need("curl", "apt-get install -y curl")?;
    // The soak and the cluster scenario drive curl and their own clients only.
    let iperf3 = if matches!(args.cmd, Cmd::Soak | Cmd::Cluster | Cmd::Udp) {
        procs::which("iperf3").unwrap_or_default()
    } else {
        need(
            "iperf3",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3",
        )?
    };
    let t = args.tiny;
    let pick =
        |v: Option<usize>, tiny: usize, full: usize| v.unwrap_or(if t { tiny } else { full });
    let directions = match args
        .direction
        .as_deref()
        .unwrap_or(if t { "down" } else { "both" })
    {
        "down" => vec![bulk::Direction::Down],
        "up" => vec![bulk::Direction::Up],
        _ => vec![bulk::Direction::Down, bulk::Direction::Up],
    };
    let knobs = Knobs {
        curl_count: pick(args.count, 20, 10_000),
        curl_concurrency: pick(args.concurrency, 5, 500),
        bulk_secs: args.duration.unwrap_or(if t { 1 } else { 5 }),
        directions,
        scale_conns: pick(args.conns, 50, 10_000),
        latency_count: pick(args.exchanges, 50, 2_000),
        latency_rate: args.rate.unwrap_or(200),
        cluster_workers: pick(args.concurrency, 4, 32),
        tiny: t,
    };
    if knobs.curl_count == 0 || knobs.curl_concurrency == 0 || knobs.bulk_secs == 0 {
        bail!("--count, --concurrency and --duration must be at least 1");
    }
    if args.minutes == Some(0) {
        bail!("--minutes must be at least 1");
    }
    Ok(Env {
        anyproxy,
        rathole,
        iperf3,
        curl,
        nofile,
        knobs,
    })
}
