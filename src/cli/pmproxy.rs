//! `anyproxy pmproxy`: the policy engine as a standalone forward proxy (the upstream
//! PMProxy): every request decided by the rules, direct egress (or through the
//! `parentProxy` / `netIface` the rules reach), the HTTPS `/api/cmd` API beside it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use anyproxy::auth::{Accounts, Authority};
use anyproxy::connect::Swappable;
use anyproxy::dial::direct::DirectConnector;
use anyproxy::metrics::gateway::Reloads;
use anyproxy::net::notify::{notify, State};
use anyproxy::policy::dir::{default_dir, MANAGERS_TOML, SERVER_TOML};
use anyproxy::policy::{start_api, Policy, PolicyDir, PolicyGuard, ServerConf};
use anyproxy::proxy::http::{HttpProxy, RequestTimeout};
use anyproxy::transport::listen::AcceptLoop;
use anyproxy::tunnel::DirectTimeouts;
use parking_lot::Mutex;
use tokio_util::task::TaskTracker;

use super::{reload_on_hangup, signals, until_stopped, Reload};

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
    let direct = Arc::new(Swappable::new(direct_connector(&dir.server)?));
    let connector = Arc::new(PolicyGuard {
        policy: Some(policy.clone()),
        inner: direct.clone(),
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
        request_timeout: RequestTimeout::new(dir.server.proxy.server.read_timeout()),
    });
    let live = Arc::new(Live {
        dir: dir.path.clone(),
        policy,
        direct,
        proxy: role.clone(),
        server: Mutex::new(dir.server.clone()),
        reloads: Reloads::default(),
    });
    let reload: Reload = Arc::new(move |_| live.reload());
    reload_on_hangup(reload, dir.path.clone(), shutdown.clone())?;
    let proxy = tokio::spawn(AcceptLoop::new(listener, "http proxy").run(
        role,
        shutdown.clone().cancelled_owned(),
        TaskTracker::new(),
    ));
    tracing::info!(proxy = %proxy_addr, api = %api.addr, "pmproxy running");
    // Ready: both listeners are bound, and a SIGHUP reloads instead of killing.
    notify(State::Ready);
    println!(
        "pmproxy: HTTP proxy on http://{proxy_addr}, API on https://{}/api/cmd (config {})",
        api.addr,
        dir.path.display()
    );
    signals.first.cancelled().await;
    notify(State::Stopping);
    tracing::info!("shutting down: persisting state");
    until_stopped(signals, async move {
        let _ = proxy.await;
        api.join().await;
    })
    .await;
    Ok(())
}

/// The proxy's dialer as `server.toml` configures it.
fn direct_connector(server: &ServerConf) -> anyhow::Result<DirectConnector> {
    Ok(DirectConnector {
        dial_timeout: server.proxy.dial_timeout.0,
        acl: server
            .proxy
            .acl()
            .context("server.toml: proxy.forbiddenHosts")?,
        // The manual's srvConf: stalled connections must not pile up.
        timeouts: DirectTimeouts {
            idle: Some(server.proxy.server.read_timeout()),
            write: Some(server.proxy.server.write_timeout()),
        },
    })
}

type Guarded = PolicyGuard<Swappable<DirectConnector>>;

/// What a SIGHUP changes in a running pmproxy: the rules and managers, and the proxy's
/// timeouts and forbidden hosts.
struct Live {
    dir: PathBuf,
    policy: Arc<Policy>,
    direct: Arc<Swappable<DirectConnector>>,
    proxy: Arc<HttpProxy<Guarded>>,
    /// The `server.toml` running, to name what a reload changed.
    server: Mutex<ServerConf>,
    reloads: Reloads,
}

impl Live {
    /// Counted, between systemd's RELOADING and READY; a failure is logged there.
    fn reload(&self) {
        let _ = self.reloads.run(|| self.apply());
    }

    /// Both files are read and checked before either applies: a broken one changes
    /// nothing (the policy's own swap is the last step that can fail).
    fn apply(&self) -> anyhow::Result<()> {
        let server_path = self.dir.join(SERVER_TOML);
        let server = ServerConf::load(&server_path)?;
        let direct = direct_connector(&server)?;
        let changes = self.policy.reload(&self.dir.join(MANAGERS_TOML))?;
        for change in &changes {
            tracing::info!("{MANAGERS_TOML}: {change}");
        }
        self.direct.replace(direct);
        self.proxy
            .request_timeout
            .set(server.proxy.server.read_timeout());
        let mut running = self.server.lock();
        log_server_changes(&running, &server);
        *running = server;
        tracing::info!(dir = %self.dir.display(), "reloaded");
        Ok(())
    }
}

/// One line per `server.toml` key changed: applied, or waiting for a restart.
fn log_server_changes(old: &ServerConf, new: &ServerConf) {
    let (o, n) = (&old.proxy, &new.proxy);
    for (changed, key) in [
        (o.dial_timeout != n.dial_timeout, "proxy.dialTimeout"),
        (
            o.forbidden_hosts != n.forbidden_hosts,
            "proxy.forbiddenHosts",
        ),
        (
            o.server.read_timeout != n.server.read_timeout,
            "proxy.server.readTimeout",
        ),
        (
            o.server.write_timeout != n.server.write_timeout,
            "proxy.server.writeTimeout",
        ),
    ] {
        if changed {
            tracing::info!("{SERVER_TOML}: {key} changed (new connections use it)");
        }
    }
    for key in old.restart_only_changes(new) {
        tracing::warn!("{SERVER_TOML}: {key} changed; it applies at the next restart");
    }
}
