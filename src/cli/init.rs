//! `anyproxy init gateway|client`: the files of a real deployment, as opposed to the
//! demo's loopback: a commented configuration with public bind addresses, a
//! certificate for the host name users and agents reach, generated credentials, and
//! every file holding a secret written with mode 0600. `init gateway` also writes (and
//! prints) the agent configuration that matches the gateway it made.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use anyproxy::transport::tls;

/// How long the generated certificate is valid: long enough not to surprise anyone,
/// short enough that a forgotten test deployment does not trust a key forever.
/// `anyproxy check` and `anyproxy_tls_cert_expiry_timestamp_seconds` warn before it ends.
const CERT_DAYS: i64 = 730;

#[derive(clap::Args)]
pub struct InitArgs {
    #[command(subcommand)]
    pub what: InitCommand,
}

#[derive(clap::Subcommand)]
pub enum InitCommand {
    /// Writes gateway.yaml, a self-signed certificate for --host (cert.pem, key.pem) and
    /// generated credentials into --dir, plus client.yaml for its agents, which it also
    /// prints. Example: `anyproxy init gateway --host gw.example.com --dir /etc/anyproxy`
    Gateway(GatewayInit),
    /// Writes client.yaml for an agent of an existing gateway into --dir; the agent
    /// password is read from stdin (its first line). Example:
    /// `echo "$PW" | anyproxy init client --gateway gw.example.com:8443 --fingerprint sha256:... --dir /etc/anyproxy`
    Client(ClientInit),
}

#[derive(clap::Args)]
pub struct GatewayInit {
    /// The public host name (or IP address) agents and proxy users connect to: the
    /// certificate's name, and the agents' `gateway_addr`.
    #[arg(long)]
    pub host: String,
    /// Where the files are written (created if missing; existing files are kept unless
    /// --force).
    #[arg(long, default_value = "/etc/anyproxy")]
    pub dir: PathBuf,
    /// The address the public listeners bind; empty = every interface.
    #[arg(long, default_value = "")]
    pub bind: String,
    /// The agents' port (WebSocket + TLS).
    #[arg(long, default_value_t = 8443)]
    pub gateway_port: u16,
    /// The HTTPS proxy listener's port (credentials inside TLS).
    #[arg(long, default_value_t = 3129)]
    pub https_port: u16,
    /// The SOCKS5 listener's port.
    #[arg(long, default_value_t = 1080)]
    pub socks_port: u16,
    /// The plain HTTP proxy listener's port; it binds loopback only (its Basic
    /// credentials would cross the network in clear).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// The admin listener's port (metrics, status page), on loopback with basic auth.
    #[arg(long, default_value_t = 9090)]
    pub admin_port: u16,
    /// Replace files that exist already.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct ClientInit {
    /// The gateway, `HOST:PORT`.
    #[arg(long)]
    pub gateway: String,
    /// The gateway certificate's SHA-256 (`sha256:<hex>`, as `init gateway` prints it),
    /// pinned.
    #[arg(long, conflicts_with = "ca")]
    pub fingerprint: Option<String>,
    /// A PEM file with the gateway's CA or certificate; copied into --dir. Neither this
    /// nor --fingerprint: the public web roots verify the gateway.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The agent's username (the gateway's `auth_username`).
    #[arg(long, default_value = "agent")]
    pub username: String,
    /// This agent's name at the gateway; default the host name.
    #[arg(long)]
    pub client_id: Option<String>,
    #[arg(long, default_value = "/etc/anyproxy")]
    pub dir: PathBuf,
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    match args.what {
        InitCommand::Gateway(g) => gateway(g),
        InitCommand::Client(c) => client(c),
    }
}

/// What an agent needs to reach one gateway.
struct AgentParams<'a> {
    gateway: &'a str,
    /// `gateway_tls_fingerprint` or `gateway_tls_cert`, as a YAML line.
    trust: String,
    username: &'a str,
    password: &'a str,
    client_id: String,
}

/// The agent's configuration file, commented.
fn client_yaml(p: &AgentParams<'_>, origin: &str) -> String {
    format!(
        r#"# Written by `{origin}`.
# On the agent host, inside the private network: /etc/anyproxy/client.yaml, mode 0600,
# owned by the service's user. Check it with `anyproxy check --config client.yaml`, run
# it with `anyproxy client --config client.yaml` (contrib/systemd/anyproxy-client.service).
# Every key: README, "Configuration".
log:
  level: info
client:
  gateway_addr: "{gateway}"
  # How the gateway's certificate is verified. A pinned fingerprint breaks when the
  # certificate is replaced: with a certificate from a CA, use gateway_tls_cert: ca.pem
  # (or neither key, for the public web roots).
  {trust}
  client_id: "{client_id}"
  auth_username: "{username}"
  auth_password: "{password}"
  # Connections at once; further ones are refused with RATE_LIMITED.
  max_concurrent_conns: 100
  # Targets users may not reach through this agent (names, wildcards, IPs, CIDRs).
  forbidden_hosts: []
  # This host's own services (loopback) and link-local addresses are refused unless:
  # allow_local: false
"#,
        gateway = p.gateway,
        trust = p.trust,
        client_id = p.client_id,
        username = p.username,
        password = p.password,
    )
}

/// The gateway's configuration file, commented.
fn gateway_yaml(g: &GatewayInit, dir: &Path, agent_password: &str, users: &Users) -> String {
    let public = |port: u16| format!("{}:{port}", g.bind);
    format!(
        r#"# Written by `anyproxy init gateway --host {host}`.
# Check it with `anyproxy check --config gateway.yaml`, run it with
# `anyproxy gateway --config gateway.yaml` (contrib/systemd/anyproxy-gateway.service);
# `kill -HUP` (systemctl reload) replaces the certificate. The agents' side is in
# client.yaml next to this file. Every key: README, "Configuration".
# This file holds passwords: keep it mode 0600, owned by the service's user.
log:
  level: info                 # or "warn,access=info": one line per proxied connection
proxy:
  # The HTTP proxy behind TLS: curl -x https://{user}:PASSWORD@{host}:{https_port}
  # --proxy-cacert cert.pem; browsers: an HTTPS proxy {host}:{https_port}.
  https:
    listen_addr: "{https}"
    auth_username: "{user}"
    auth_password: "{password}"
  socks5:                     # credentials in clear (RFC 1929): prefer https across the internet
    listen_addr: "{socks}"
    auth_username: "{user}"
    auth_password: "{password}"
  http:                       # plain HTTP: Basic credentials in clear, so loopback only
    listen_addr: "127.0.0.1:{http_port}"
    auth_username: "{user}"
    auth_password: "{password}"
gateway:
  listen_addr: "{agents}"     # agents connect to wss://{host}:{gateway_port}/ws
  # A self-signed certificate for {host}, valid {CERT_DAYS} days. Replace it with one
  # from your CA or ACME (certbot) at any time: same paths, then `systemctl reload`.
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "agent"      # what agents authenticate with
  auth_password: "{agent_password}"
  limits:
    proxy_auth: {{}}           # 5 wrong proxy passwords from an address in 1m lock it out for 1m
  admin_addr: "127.0.0.1:{admin_port}"   # /metrics, /healthz, /readyz, the status page
  admin_username: "ops"
  admin_password: "{admin_password}"
"#,
        host = g.host,
        https = public(g.https_port),
        socks = public(g.socks_port),
        agents = public(g.gateway_port),
        https_port = g.https_port,
        http_port = g.http_port,
        gateway_port = g.gateway_port,
        admin_port = g.admin_port,
        user = users.proxy_user,
        password = users.proxy_password,
        admin_password = users.admin_password,
        cert = dir.join("cert.pem").display(),
        key = dir.join("key.pem").display(),
    )
}

/// The generated proxy and admin credentials.
struct Users {
    proxy_user: &'static str,
    proxy_password: String,
    admin_password: String,
}

fn gateway(g: GatewayInit) -> anyhow::Result<()> {
    format!("{}:{}", g.host, g.gateway_port)
        .parse::<anyproxy::config::HostPort>()
        .map_err(|e| anyhow::anyhow!("--host: {e}"))?;
    if !g.bind.is_empty() {
        anyproxy::config::parse_listen_addr(&format!("{}:1", g.bind))
            .map_err(|e| anyhow::anyhow!("--bind: {e}"))?;
    }
    let dir = prepare_dir(&g.dir)?;
    let files = ["gateway.yaml", "client.yaml", "cert.pem", "key.pem"].map(|f| dir.join(f));
    refuse_existing(&files, g.force)?;
    let [gateway_path, client_path, cert_path, key_path] = &files;

    let not_after = tls::unix_now() + CERT_DAYS * 86_400;
    let cert = tls::generate_self_signed_until(&[g.host.as_str()], not_after)
        .with_context(|| format!("generating a certificate for {:?}", g.host))?;
    write_file(cert_path, &cert.cert_pem, 0o644)?;
    write_file(key_path, &cert.key_pem, 0o600)?;
    let der = tls::load_certs(cert_path)?;
    let fingerprint = tls::fingerprint_hex(der[0].as_ref());

    let agent_password = super::demo::secret();
    let users = Users {
        proxy_user: "user",
        proxy_password: super::demo::secret(),
        admin_password: super::demo::secret(),
    };
    let gateway_text = gateway_yaml(&g, &dir, &agent_password, &users);
    anyproxy::config::Config::parse(&gateway_text, gateway_path)?;
    write_file(gateway_path, &gateway_text, 0o600)?;
    let gateway_addr = format!("{}:{}", g.host, g.gateway_port);
    let agent = client_yaml(
        &AgentParams {
            gateway: &gateway_addr,
            trust: format!("gateway_tls_fingerprint: \"{fingerprint}\""),
            username: "agent",
            password: &agent_password,
            client_id: "agent-1".into(),
        },
        &format!("anyproxy init gateway --host {}", g.host),
    );
    anyproxy::config::Config::parse(&agent, client_path)?;
    write_file(client_path, &agent, 0o600)?;

    eprintln!(
        "wrote {}, {} (mode 0600), {} and {}",
        gateway_path.display(),
        key_path.display(),
        cert_path.display(),
        client_path.display()
    );
    eprintln!(
        "start: anyproxy gateway --config {}\n\
         proxy: curl -x https://{user}:{pw}@{host}:{https} --proxy-cacert {cert} https://example.com/\n\
         the matching agent configuration (also in {client}):\n",
        gateway_path.display(),
        user = users.proxy_user,
        pw = users.proxy_password,
        host = g.host,
        https = g.https_port,
        cert = cert_path.display(),
        client = client_path.display(),
    );
    print!("{agent}");
    Ok(())
}

fn client(c: ClientInit) -> anyhow::Result<()> {
    let password = read_password_line().context("the agent password, on stdin")?;
    let dir = prepare_dir(&c.dir)?;
    let client_path = dir.join("client.yaml");
    let ca_copy = dir.join("gateway-ca.pem");
    let mut files = vec![client_path.clone()];
    if c.ca.is_some() {
        files.push(ca_copy.clone());
    }
    refuse_existing(&files, c.force)?;
    let trust = match (&c.fingerprint, &c.ca) {
        (Some(f), _) => format!("gateway_tls_fingerprint: \"{f}\""),
        (None, Some(ca)) => {
            let pem = std::fs::read_to_string(ca).with_context(|| format!("{}", ca.display()))?;
            tls::load_certs(ca)?;
            write_file(&ca_copy, &pem, 0o644)?;
            format!("gateway_tls_cert: \"{}\"", ca_copy.display())
        }
        (None, None) => "# gateway_tls_cert: ca.pem   (none: the public web roots)".into(),
    };
    let client_id = c.client_id.clone().unwrap_or_else(host_name);
    let text = client_yaml(
        &AgentParams {
            gateway: &c.gateway,
            trust,
            username: &c.username,
            password: &password,
            client_id,
        },
        &format!("anyproxy init client --gateway {}", c.gateway),
    );
    // Validated as a start would, before anyone relies on it.
    anyproxy::config::Config::parse(&text, &client_path)?;
    write_file(&client_path, &text, 0o600)?;
    eprintln!(
        "wrote {} (mode 0600); start: anyproxy client --config {}",
        client_path.display(),
        client_path.display()
    );
    Ok(())
}

/// The first line of stdin without its line end; empty is an error.
pub fn read_password_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("empty password on stdin");
    }
    Ok(password.to_owned())
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent-1".into())
}

/// Creates `dir` (mode 0700: it will hold keys) if missing; returns its absolute path,
/// which the configuration names so that it works from any working directory.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    dir.canonicalize()
        .with_context(|| format!("opening {}", dir.display()))
}

fn refuse_existing(files: &[PathBuf], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    if let Some(f) = files.iter().find(|f| f.exists()) {
        bail!(
            "{} exists already; nothing was written (--force replaces it)",
            f.display()
        );
    }
    Ok(())
}

/// Writes `text` to `path` with `mode` from the start (a secret is never readable by
/// others, not even for a moment), replacing a file that exists.
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its old mode through `open`: set it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
