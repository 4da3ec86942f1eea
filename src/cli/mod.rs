//! Command-line entry points of the `anyproxy` binary.

pub mod check;
pub mod ctl;
pub mod demo;
pub mod export;
pub mod init;
mod logging;
pub mod manual;
pub mod pmproxy;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use anyproxy::agent::Agent;
use anyproxy::config::{Config, LogConfig, LogFormat};
use anyproxy::gateway::Gateway;
use anyproxy::net::notify::{notify, State};

#[derive(Parser)]
#[command(
    name = "anyproxy",
    version = env!("ANYPROXY_LONG_VERSION"),
    about = "Reverse-tunnel proxy: a public gateway serves HTTP and SOCKS5 proxies whose connections leave through client agents over WebSocket + TLS.",
    after_help = "Quick start: `anyproxy demo` runs a gateway, an agent and both proxies on loopback and prints curl commands.\nLogs: the config's `log: {level, format}`; RUST_LOG=debug overrides the level.\n\nExamples:\n  anyproxy demo\n  anyproxy gateway --config /etc/anyproxy/gateway.yaml\n  anyproxy client --config /etc/anyproxy/client.yaml\n  anyproxy COMMAND --help"
)]
pub struct Cli {
    /// Log line format on stderr, `human` or `json`; overrides the config's `log.format`.
    #[arg(long, global = true)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the public gateway: accepts agents at wss://LISTEN/ws and serves the proxy
    /// listeners of the `proxy:` section. Needs `gateway:` in the config file.
    #[command(
        after_help = "Examples:\n  anyproxy gateway --config /etc/anyproxy/gateway.yaml\n  anyproxy gateway -c anyproxy-demo/config.yaml --log-format json\n  kill -HUP $(pidof anyproxy)   # reload the certificate"
    )]
    Gateway {
        /// YAML file with a `gateway:` section and optionally `proxy: {http, socks5}`.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a client agent: connects to the gateway, authenticates and dials the targets
    /// it is asked for. Needs `client:` in the config file.
    #[command(
        after_help = "Examples:\n  anyproxy client --config /etc/anyproxy/client.yaml\n  anyproxy client -c anyproxy-demo/config.yaml"
    )]
    Client {
        /// YAML file with a `client:` section.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Zero-config demo on loopback: generates a certificate and credentials, starts a
    /// gateway, an agent, HTTP and SOCKS5 proxies, the admin listener and a sample target,
    /// and prints curl commands and the status page's URL that work as printed.
    #[command(
        after_help = "Examples:\n  anyproxy demo\n  anyproxy demo --dir /tmp/demo --http-port 18080 --socks-port 11080"
    )]
    Demo {
        /// Where the certificate, key and an equivalent config file are written.
        #[arg(long, default_value = "anyproxy-demo")]
        dir: PathBuf,
        /// Gateway (agent) port; falls back to a free port if taken.
        #[arg(long, default_value_t = 8443)]
        gateway_port: u16,
        /// HTTP proxy port; falls back to a free port if taken.
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// SOCKS5 proxy port; falls back to a free port if taken.
        #[arg(long, default_value_t = 1080)]
        socks_port: u16,
        /// Admin listener port (status page, /metrics); falls back to a free port if taken.
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
    /// Writes the files of a real deployment: a commented configuration with public
    /// listeners, a certificate, generated credentials (secrets mode 0600), and for a
    /// gateway the matching agent configuration.
    /// Example: `anyproxy init gateway --host gw.example.com --dir /etc/anyproxy`
    Init(init::InitArgs),
    /// Validates a configuration file as a start would (files, certificate and key,
    /// expiry, policy dir), prints a summary and warnings, and starts nothing.
    Check(check::CheckArgs),
    /// Client of the policy API (PMProxy's `pmcl`): discover, login, logout, status,
    /// reset, show. Keeps the session token in a file and renews it.
    Ctl(ctl::CtlArgs),
    /// The policy engine as a standalone forward proxy (the upstream PMProxy): reads
    /// `server.toml` and `managers.toml` from the config dir, serves the HTTP proxy on
    /// `proxy.server.addr` with direct egress and the HTTPS API on `api.server.addr`.
    Pmproxy(pmproxy::PmproxyArgs),
    /// Prints one user's client profile: a PAC file, a Clash / Mihomo configuration, a
    /// proxychains4 configuration, shell `export` lines or curl commands.
    Export(export::ExportArgs),
    /// Prints shell completions for bash, zsh, fish, elvish or PowerShell.
    Completions(manual::CompletionsArgs),
    /// Prints the man page (roff), or writes one per subcommand with --dir.
    Man(manual::ManArgs),
    /// Reads a password from stdin (its first line) and prints its hash for a users
    /// file (`gateway.auth_backends`, type `file`): argon2id by default.
    #[command(
        after_help = "Examples:\n  printf '%s\\n' 'alice-password' | anyproxy passwd\n  anyproxy passwd --bcrypt --cost 12 < password.txt"
    )]
    Passwd {
        /// A bcrypt hash instead of argon2id.
        #[arg(long)]
        bcrypt: bool,
        /// bcrypt's cost (4 to 31).
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(4..=31))]
        cost: u32,
    },
}

/// The first SIGINT/SIGTERM asks for a graceful stop; a second one during it means
/// "now".
pub struct Signals {
    pub first: CancellationToken,
    pub second: CancellationToken,
}

pub fn signals() -> anyhow::Result<Signals> {
    let first = CancellationToken::new();
    let second = CancellationToken::new();
    #[cfg(unix)]
    let mut streams = {
        use tokio::signal::unix::{signal, SignalKind};
        let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        (int, term)
    };
    let (f, s) = (first.clone(), second.clone());
    tokio::spawn(async move {
        for token in [f, s] {
            #[cfg(unix)]
            tokio::select! {
                _ = streams.0.recv() => {}
                _ = streams.1.recv() => {}
            }
            #[cfg(not(unix))]
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            token.cancel();
        }
    });
    Ok(Signals { first, second })
}

/// What a SIGHUP runs: reloads from the file; logs and counts its own failure.
type Reload = std::sync::Arc<dyn Fn(&std::path::Path) + Send + Sync>;

/// Each SIGHUP reloads from `config`, one reload at a time; signals that arrive during
/// a reload are folded into one more reload after it.
fn reload_on_hangup(
    reload: Reload,
    config: PathBuf,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                tracing::info!(config = %config.display(), "SIGHUP: reloading");
                let (r, path) = (reload.clone(), config.clone());
                // Reading files is blocking I/O; the error is logged and counted there.
                let _ = tokio::task::spawn_blocking(move || r(&path)).await;
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (reload, config, stop);
    Ok(())
}

/// Cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    Ok(signals()?.first)
}

/// Runs `graceful` after the first signal; a second signal ends the process at once.
async fn until_stopped(signals: Signals, graceful: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = graceful => tracing::info!("stopped"),
        _ = signals.second.cancelled() => {
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(1);
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let log_format = cli.log_format;
    match cli.command {
        Command::Gateway { config } => {
            let file = Config::load(&config)?;
            let log_level = logging::init(&file.log, log_format);
            let Some(gw) = file.gateway else {
                bail!("{} has no `gateway:` section", config.display());
            };
            let signals = signals()?;
            let gateway = Gateway::start(gw, file.proxy)
                .await
                .context("starting the gateway")?;
            gateway.reloader().follow_log_level(log_level);
            let reloader = gateway.reloader();
            let reload: Reload = std::sync::Arc::new(move |path| {
                let _ = reloader.reload(path);
            });
            reload_on_hangup(reload, config.clone(), signals.first.clone())?;
            gateway.enable_admin_reload(config.clone());
            // Ready: every listener is bound, and a SIGHUP now reloads instead of killing.
            notify(State::Ready);
            signals.first.cancelled().await;
            tracing::info!("shutting down: closing listeners, draining");
            until_stopped(signals, gateway.stop()).await;
            Ok(())
        }
        Command::Client { config } => {
            let file = Config::load(&config)?;
            let log_level = logging::init(&file.log, log_format);
            let Some(client) = file.client else {
                bail!("{} has no `client:` section", config.display());
            };
            let agent = Agent::new(client).context("starting the agent")?;
            agent.follow_log_level(log_level);
            let signals = signals()?;
            let reloaded = agent.clone();
            let reload: Reload = std::sync::Arc::new(move |path| {
                let _ = reloaded.reload(path);
            });
            // Before the first session: from READY=1 on, a SIGHUP reloads.
            reload_on_hangup(reload, config.clone(), signals.first.clone())?;
            let first = signals.first.clone();
            agent
                .start_admin(first.clone())
                .await
                .context("starting the agent's admin listener")?;
            until_stopped(signals, agent.run(first)).await;
            Ok(())
        }
        Command::Demo {
            dir,
            gateway_port,
            http_port,
            socks_port,
            admin_port,
        } => {
            logging::init(&LogConfig::default(), log_format);
            demo::run(demo::Options {
                dir,
                gateway_port,
                http_port,
                socks_port,
                admin_port,
            })
            .await
        }
        Command::Check(args) => check::run(args),
        Command::Init(args) => init::run(args),
        Command::Export(args) => export::run(args),
        Command::Completions(args) => manual::completions(args),
        Command::Man(args) => manual::man(args),
        Command::Ctl(args) => {
            logging::init(&LogConfig::default(), log_format);
            ctl::run(args).await
        }
        Command::Pmproxy(args) => {
            logging::init(&LogConfig::default(), log_format);
            pmproxy::run(args).await
        }
        Command::Passwd { bcrypt, cost } => {
            let password = init::read_password_line()?;
            let password = password.as_str();
            let hash = if bcrypt {
                anyproxy::auth::hash::hash_bcrypt(password, cost)
            } else {
                anyproxy::auth::hash::hash_argon2(password)
            }
            .map_err(|e| anyhow::anyhow!("hashing: {e}"))?;
            println!("{hash}");
            Ok(())
        }
    }
}
