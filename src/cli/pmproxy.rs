//! `anyproxy pmproxy`: the policy engine as a standalone forward proxy (the upstream
//! PMProxy): every request decided by the rules, direct egress (or through the
//! `parentProxy` / `netIface` the rules reach), the HTTPS `/api/cmd` API beside it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use anyproxy::auth::{Accounts, Authority};
use anyproxy::dial::direct::DirectConnector;
use anyproxy::policy::PolicyGuard;
use anyproxy::policy::{dir::default_dir, start_api, PolicyDir};
use anyproxy::proxy::http::HttpProxy;
use anyproxy::transport::listen::AcceptLoop;
use anyproxy::tunnel::DirectTimeouts;
use tokio_util::task::TaskTracker;

use super::{signals, until_stopped};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  anyproxy pmproxy\n  anyproxy pmproxy --config-dir /etc/pmproxy"
)]
pub struct PmproxyArgs {
    /// Config dir with `server.toml` and `managers.toml` (created with a working
    /// default, a certificate and a JWT key when missing).
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
}

pub async fn run(args: PmproxyArgs) -> anyhow::Result<()> {
    let path = match args.config_dir {
        Some(p) => p,
        None => default_dir().ok_or_else(|| anyhow!("no home directory; pass --config-dir"))?,
    };
    let dir = PolicyDir::open_or_init(&path)
        .with_context(|| format!("opening the config dir {}", path.display()))?;
    if let Some(first) = &dir.first_run {
        // Printed, never logged: it carries the generated admin password.
        println!("{}", first.message(&dir.path));
    }
    let policy = Arc::new(dir.load_policy().context("loading managers.toml")?);
    let signals = signals()?;
    let shutdown = signals.first.clone();
    let api = start_api(&dir, policy.clone(), shutdown.clone())
        .await
        .context("starting the policy API")?;

    let proxy_addr = dir
        .server
        .proxy
        .server
        .socket_addr()
        .map_err(|e| anyhow!("server.toml: proxy.server.addr: {e}"))?;
    let listener = anyproxy::transport::listen::listen(proxy_addr)
        .with_context(|| format!("listening on {proxy_addr}"))?;
    let proxy_addr = listener.local_addr()?;
    let connector = Arc::new(PolicyGuard {
        policy: Some(policy),
        inner: Arc::new(DirectConnector {
            dial_timeout: dir.server.proxy.dial_timeout.0,
            acl: dir
                .server
                .proxy
                .acl()
                .context("server.toml: proxy.forbiddenHosts")?,
            // The manual's srvConf: stalled connections must not pile up.
            timeouts: DirectTimeouts {
                idle: Some(dir.server.proxy.server.read_timeout()),
                write: Some(dir.server.proxy.server.write_timeout()),
            },
        }),
    });
    // Users are told apart by their session at their IP (`sessionIPM`), as upstream:
    // the proxy itself asks for no credentials.
    let users = Arc::new(Authority::of_accounts(
        Accounts::new(vec![], Arc::from("direct")),
        vec![],
    ));
    let role = Arc::new(HttpProxy {
        users,
        limits: Arc::new(anyproxy::limits::Limits::none()),
        connector,
        request_timeout: dir.server.proxy.server.read_timeout(),
    });
    let proxy = tokio::spawn(AcceptLoop::new(listener, "http proxy").run(
        role,
        shutdown.clone().cancelled_owned(),
        TaskTracker::new(),
    ));
    tracing::info!(proxy = %proxy_addr, api = %api.addr, "pmproxy running");
    println!(
        "pmproxy: HTTP proxy on http://{proxy_addr}, API on https://{}/api/cmd (config {})",
        api.addr,
        dir.path.display()
    );
    signals.first.cancelled().await;
    tracing::info!("shutting down: persisting state");
    until_stopped(signals, async move {
        let _ = proxy.await;
        api.join().await;
    })
    .await;
    Ok(())
}
