//! `anyproxy ctl`: the upstream's `pmcl`, a command-line client of the policy API.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::Value;

use anyproxy::policy::api::client::{ApiClient, ClientError, Trust};
use anyproxy::policy::dir::{default_dir, SERVER_TOML};
use anyproxy::policy::jwt::peek_expiry;
use anyproxy::policy::{Cmd, CmdCredentials, ServerConf};

#[derive(Args)]
#[command(
    after_help = "Examples:\n  anyproxy ctl discover\n  anyproxy ctl --cacert ~/.config/pmproxy/cert.pem login --user alice\n  anyproxy ctl status"
)]
pub struct CtlArgs {
    /// API URL (https://host:port). Default: `api.server.addr` of the config dir's
    /// server.toml, on this machine, trusting the dir's certificate.
    #[arg(long, global = true)]
    api: Option<String>,
    /// PEM file with the CA or the server's own certificate to verify the API against.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// Do not verify the server's certificate (anyone in the path can then read your
    /// password and token).
    #[arg(long, global = true)]
    insecure: bool,
    /// The pmproxy config dir (default ~/.config/pmproxy).
    #[arg(long, global = true)]
    config_dir: Option<PathBuf>,
    /// Where the session token is kept (default <config dir>/ctl-token).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Whether this machine may use the proxy, and which managers decided it.
    #[command(after_help = "Example:\n  anyproxy ctl discover --target example.com:443")]
    Discover {
        /// Target `host:port` to ask about (some rules depend on it).
        #[arg(long)]
        target: Option<String>,
    },
    /// Open a session from this machine's address and keep its token.
    #[command(
        after_help = "Example:\n  anyproxy ctl login --user alice\n  anyproxy ctl login --user alice --password-stdin < password.txt"
    )]
    Login {
        /// Asked for when missing.
        #[arg(long)]
        user: Option<String>,
        /// Read the password from standard input's first line instead of prompting.
        #[arg(long)]
        password_stdin: bool,
        /// The sessionIPM, when there are several.
        #[arg(long)]
        manager: Option<String>,
    },
    /// Close the session and forget the token.
    #[command(after_help = "Example:\n  anyproxy ctl logout")]
    Logout {
        #[arg(long)]
        manager: Option<String>,
    },
    /// Check the session (renewing the token when it is close to expiry) and show the
    /// download quota.
    #[command(after_help = "Example:\n  anyproxy ctl status")]
    Status {
        /// The dwnConsR, when there are several.
        #[arg(long)]
        manager: Option<String>,
    },
    /// Administrators: set a user's consumption (to 0 unless --bytes is given).
    #[command(
        after_help = "Example:\n  anyproxy ctl reset alice\n  anyproxy ctl reset alice --bytes 1048576"
    )]
    Reset {
        user: String,
        #[arg(long, default_value_t = 0)]
        bytes: u64,
        #[arg(long)]
        manager: Option<String>,
    },
    /// A dwnConsR's configuration (and everyone's consumption, for administrators).
    #[command(after_help = "Example:\n  anyproxy ctl show")]
    Show {
        #[arg(long)]
        manager: Option<String>,
    },
}

struct Ctx {
    client: ApiClient,
    token_file: PathBuf,
}

pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let dir = match &args.config_dir {
        Some(d) => d.clone(),
        None => default_dir().context("no HOME: pass --config-dir or --token-file")?,
    };
    let (url, default_ca) = match &args.api {
        Some(u) => (u.clone(), None),
        None => local_api(&dir)?,
    };
    let trust = if args.insecure {
        eprintln!("warning: --insecure: the server's certificate is not checked");
        Trust::Insecure
    } else if let Some(ca) = args.cacert.as_deref().or(default_ca.as_deref()) {
        Trust::CaFile(ca)
    } else {
        Trust::WebRoots
    };
    let client = ApiClient::new(&url, trust).with_context(|| format!("API at {url}"))?;
    let ctx = Ctx {
        client,
        token_file: args
            .token_file
            .clone()
            .unwrap_or_else(|| dir.join("ctl-token")),
    };
    match args.command {
        CtlCommand::Discover { target } => {
            let v = ctx
                .send(Cmd {
                    cmd: "discover".into(),
                    manager: "rules".into(),
                    string: target.unwrap_or_default(),
                    ..Cmd::default()
                })
                .await?;
            println!("{}", pretty(&v));
        }
        CtlCommand::Login {
            user,
            password_stdin,
            manager,
        } => ctx.login(user, password_stdin, manager).await?,
        CtlCommand::Logout { manager } => {
            let token = ctx.stored_token()?;
            let r = ctx
                .send(Cmd {
                    cmd: "close".into(),
                    manager: manager.unwrap_or_default(),
                    secret: token,
                    ..Cmd::default()
                })
                .await;
            // The token is worthless either way; keep no stale copy.
            remove_token(&ctx.token_file)?;
            match r {
                Ok(_) => println!("logged out"),
                Err(e) => println!("token forgotten; the server said: {e:#}"),
            }
        }
        CtlCommand::Status { manager } => ctx.status(manager).await?,
        CtlCommand::Reset {
            user,
            bytes,
            manager,
        } => {
            let token = ctx.fresh_token().await?;
            ctx.send(Cmd {
                cmd: "set".into(),
                manager: manager.unwrap_or_default(),
                secret: token,
                string: user.clone(),
                uint64: bytes,
                ..Cmd::default()
            })
            .await?;
            println!("consumption of {user:?} set to {bytes} bytes");
        }
        CtlCommand::Show { manager } => {
            // Works logged out too (without consumptions).
            let token = if ctx.token_file.exists() {
                ctx.fresh_token().await?
            } else {
                String::new()
            };
            let v = ctx
                .send(Cmd {
                    cmd: "show".into(),
                    manager: manager.unwrap_or_default(),
                    secret: token,
                    ..Cmd::default()
                })
                .await?;
            println!("{}", pretty(&v));
        }
    }
    Ok(())
}

/// The API of the pmproxy whose config dir this is, trusting its certificate.
fn local_api(dir: &Path) -> anyhow::Result<(String, Option<PathBuf>)> {
    let path = dir.join(SERVER_TOML);
    if !path.exists() {
        bail!(
            "no {} to find the API in: pass --api https://host:port",
            path.display()
        );
    }
    let conf = ServerConf::load(&path)?;
    let mut addr = conf
        .api
        .server
        .socket_addr()
        .map_err(|e| anyhow::anyhow!("{}: api.server.addr: {e}", path.display()))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok((
        format!("https://{addr}"),
        Some(dir.join(&conf.api.https_cert)),
    ))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn prompt(label: &str, hidden: bool) -> anyhow::Result<String> {
    eprint!("{label}: ");
    std::io::stderr().flush().ok();
    let stdin = std::io::stdin();
    let echo_off = hidden && stdin.is_terminal() && stty("-echo");
    let mut line = String::new();
    let r = stdin.lock().read_line(&mut line);
    if echo_off {
        stty("echo");
        eprintln!();
    }
    r.context("reading standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Terminal echo on or off through `stty`, which every Unix has; `false` if it failed.
fn stty(arg: &str) -> bool {
    std::process::Command::new("stty")
        .arg(arg)
        .stdin(std::process::Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success())
}

fn write_token(path: &Path, token: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(token.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn remove_token(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

impl Ctx {
    async fn send(&self, cmd: Cmd) -> anyhow::Result<Value> {
        self.client.cmd(&cmd).await.map_err(|e| match e {
            ClientError::Api { ref code, .. }
                if code == "invalid_token" || code == "token_expired" =>
            {
                anyhow::anyhow!("{e}\nrun `anyproxy ctl login` again")
            }
            e => anyhow::Error::new(e),
        })
    }

    fn stored_token(&self) -> anyhow::Result<String> {
        let t = std::fs::read_to_string(&self.token_file).with_context(|| {
            format!(
                "no session token in {} (run `anyproxy ctl login`)",
                self.token_file.display()
            )
        })?;
        Ok(t.trim().to_string())
    }

    /// The stored token, renewed first when less than a quarter of its life (at least a
    /// minute) is left, so a regular `status` keeps a session's token alive.
    async fn fresh_token(&self) -> anyhow::Result<String> {
        let token = self.stored_token()?;
        let Some((exp, life)) = peek_expiry(&token) else {
            return Ok(token);
        };
        let now = now_secs();
        if now >= exp {
            bail!("the session token expired: run `anyproxy ctl login` again");
        }
        if exp - now > (life / 4).max(60) {
            return Ok(token);
        }
        let v = self
            .send(Cmd {
                cmd: "renew".into(),
                secret: token,
                ..Cmd::default()
            })
            .await?;
        let renewed = v
            .as_str()
            .context("the server's answer to renew is not a token")?
            .to_string();
        write_token(&self.token_file, &renewed)?;
        eprintln!("token renewed");
        Ok(renewed)
    }

    async fn login(
        &self,
        user: Option<String>,
        password_stdin: bool,
        manager: Option<String>,
    ) -> anyhow::Result<()> {
        let user = match user {
            Some(u) => u,
            None => prompt("user", false)?,
        };
        let pass = if password_stdin {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        } else {
            prompt("password", true)?
        };
        let v = self
            .send(Cmd {
                cmd: "open".into(),
                manager: manager.unwrap_or_default(),
                cred: Some(CmdCredentials {
                    user: user.clone(),
                    pass,
                }),
                ..Cmd::default()
            })
            .await?;
        let token = v
            .as_str()
            .context("the server's answer to open is not a token")?;
        write_token(&self.token_file, token)?;
        println!(
            "logged in as {user:?}; token kept in {}",
            self.token_file.display()
        );
        Ok(())
    }

    async fn status(&self, manager: Option<String>) -> anyhow::Result<()> {
        let token = self.fresh_token().await?;
        self.send(Cmd {
            cmd: "check".into(),
            secret: token.clone(),
            ..Cmd::default()
        })
        .await?;
        match peek_expiry(&token) {
            Some((exp, _)) => println!(
                "session open; token valid for {} more minutes",
                exp.saturating_sub(now_secs()) / 60
            ),
            None => println!("session open"),
        }
        // `get` alone is ambiguous between a sessionIPM and a dwnConsR; `show` without a
        // manager names the dwnConsR when there is exactly one.
        let manager = match manager {
            Some(m) => m,
            None => match self
                .client
                .cmd(&Cmd {
                    cmd: "show".into(),
                    ..Cmd::default()
                })
                .await
            {
                Ok(v) => v
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Err(ClientError::Api { message, .. }) => {
                    println!("quota: {message}");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        };
        let quota = self
            .client
            .cmd(&Cmd {
                cmd: "get".into(),
                manager,
                secret: token,
                ..Cmd::default()
            })
            .await;
        match quota {
            Ok(info) if info.get("bytesQuota").is_some() => {
                let s = |k: &str| {
                    info.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                println!(
                    "user {:?}: {} of {} used (groups: {})",
                    s("userName"),
                    s("consumption"),
                    s("quota"),
                    info.get("groups")
                        .and_then(Value::as_array)
                        .map(|g| g
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                );
            }
            Ok(other) => println!("{}", pretty(&other)),
            Err(ClientError::Api { message, .. }) => println!("quota: {message}"),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}
