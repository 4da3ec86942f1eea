//! `anyproxy check --config FILE`: everything a start would validate, without starting
//! anything (the `nginx -t` of anyproxy). Prints a summary on stdout and warnings about
//! risky settings on stderr; an error names the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};

use anyproxy::config::{
    ClientConfig, Config, GatewayConfig, ProxyConfig, ProxyListener, DEFAULT_GROUP,
};
use anyproxy::transport::tls;

mod pmproxy_dir;

/// A certificate that expires sooner than this is worth a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  anyproxy check --config /etc/anyproxy/gateway.yaml\n  anyproxy check -c new.yaml && kill -HUP $(pidof anyproxy)\n  anyproxy check --config-dir /etc/pmproxy"
)]
pub struct CheckArgs {
    /// The configuration file to check (any of `proxy:`, `gateway:`, `client:`).
    #[arg(
        long,
        short,
        required_unless_present = "config_dir",
        conflicts_with = "config_dir"
    )]
    pub config: Option<PathBuf>,
    /// A `anyproxy pmproxy` config dir to check instead (`server.toml`, `managers.toml`,
    /// the API's certificate and key); nothing in it is created or changed.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
}

/// What a check found: the summary and the warnings.
#[derive(Default)]
pub struct Report {
    pub summary: Vec<String>,
    pub warnings: Vec<String>,
}

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let (report, what) = match (&args.config, &args.config_dir) {
        (Some(file), _) => (check(file)?, file),
        (None, Some(dir)) => (pmproxy_dir::check_dir(dir)?, dir),
        (None, None) => bail!("pass --config FILE or --config-dir DIR"),
    };
    for line in &report.summary {
        println!("{line}");
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!("{}: configuration ok", what.display());
    Ok(())
}

pub fn check(path: &Path) -> anyhow::Result<Report> {
    let config = Config::load(path)?;
    let mut report = Report::default();
    if config.gateway.is_none() && config.client.is_none() {
        bail!(
            "{}: neither a `gateway:` nor a `client:` section: nothing would start",
            path.display()
        );
    }
    if config.proxy.is_some() && config.gateway.is_none() {
        report
            .warnings
            .push("`proxy:` is served by the gateway only; without `gateway:` it is unused".into());
    }
    if let Some(g) = &config.gateway {
        check_gateway(g, config.proxy.as_ref(), &mut report)?;
    }
    if let Some(c) = &config.client {
        check_client(c, &mut report)?;
    }
    plain_text_passwords(path, &config, &mut report);
    Ok(report)
}

/// A certificate file's leaf: readable, well-formed, not expired; warns when close.
pub(super) fn check_cert(key: &str, path: &Path, report: &mut Report) -> anyhow::Result<String> {
    let certs = tls::load_certs(path).with_context(|| key.to_owned())?;
    let v = tls::leaf_validity(path, &certs).with_context(|| key.to_owned())?;
    let now = tls::unix_now();
    if v.not_after <= now {
        bail!(
            "{key}: the certificate in {} expired on {}",
            path.display(),
            v.expiry()
        );
    }
    if v.not_before > now {
        report.warnings.push(format!(
            "{key}: the certificate in {} is not valid before {}",
            path.display(),
            tls::rfc3339(v.not_before)
        ));
    }
    let days = v.days_left(now);
    if days < EXPIRY_WARNING_DAYS {
        report.warnings.push(format!(
            "{key}: the certificate in {} expires in {days} days ({})",
            path.display(),
            v.expiry()
        ));
    }
    Ok(format!("expires {}, in {days} days", v.expiry()))
}

fn check_gateway(
    g: &GatewayConfig,
    proxy: Option<&ProxyConfig>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let expiry = check_cert("gateway.tls_cert", &g.tls_cert, report)?;
    tls::load_certified_key(&g.tls_cert, &g.tls_key).context("gateway.tls_key")?;
    if let Some(ca) = &g.client_ca {
        tls::root_store(ca).context("gateway.client_ca")?;
    }
    let s = &mut report.summary;
    s.push(format!(
        "gateway: agents at wss://{}/ws (certificate {expiry}{})",
        g.listen_addr.0,
        if g.client_ca.is_some() {
            ", client certificates required"
        } else {
            ""
        }
    ));
    let proxy_users: usize = g.groups.iter().map(|x| x.users.len()).sum();
    s.push(format!(
        "groups: {} ({DEFAULT_GROUP} and {}), {proxy_users} group proxy users",
        g.groups.len() + 1,
        if g.groups.is_empty() {
            "no other".to_owned()
        } else {
            g.groups
                .iter()
                .map(|x| format!("{}: {} users", x.id, x.users.len()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    let mut listeners = 0;
    if let Some(p) = proxy {
        for (name, l) in p.listeners() {
            listeners += 1;
            listener(name, l, proxy_users, report);
        }
        if let Some(l) = &p.https {
            https_cert(l, g, report)?;
        }
    }
    let s = &mut report.summary;
    if listeners == 0 {
        s.push("proxy listeners: none".into());
    }
    s.push(format!(
        "forwards: {} declared{}",
        g.forwards.len(),
        match &g.agent_forwards {
            Some(a) => format!(
                "; agents may open ports {}-{} on {}",
                a.ports.first, a.ports.last, a.bind
            ),
            None => "; agent forwards refused".into(),
        }
    ));
    for f in &g.forwards {
        s.push(format!(
            "  forward {} {} -> {} via group {}",
            f.protocol.as_str(),
            f.listen_addr.0,
            f.target,
            f.group
        ));
    }
    s.push(format!("limits: {}", limits(g)));
    match &g.cluster {
        Some(c) => s.push(format!(
            "cluster: store {}, node {}, on store failure {:?}",
            redact_url(&c.redis),
            c.node_id.as_deref().unwrap_or("<host name:port>"),
            c.on_store_failure
        )),
        None => s.push("cluster: none (this process alone)".into()),
    }
    if let Some(p) = &g.policy {
        policy(&p.dir, report)?;
    }
    if let Some(a) = g.admin() {
        admin("gateway", a.addr, a.username.is_some(), report);
    }
    if g.deflate.enabled && g.encodings.contains(&anyproxy::config::EncodingName::Json) {
        report.warnings.push(
            "gateway.deflate is on and gateway.encodings allows json: JSON messages carry \
             base64 data, and compressing it next to secrets opens CRIME/BREACH-style \
             size leaks (see ARCHITECTURE.md); allow binary only, or turn deflate off"
                .into(),
        );
    }
    Ok(())
}

fn listener(name: &str, l: &ProxyListener, group_users: usize, report: &mut Report) {
    let own = l.credentials().is_some();
    let open = !own && group_users == 0;
    report.summary.push(format!(
        "proxy.{name}: {} ({})",
        l.listen_addr.0,
        if open {
            "open: no credentials".to_owned()
        } else {
            format!(
                "{} accounts{}",
                usize::from(own) + group_users,
                if l.proxy_protocol {
                    ", PROXY protocol"
                } else {
                    ""
                }
            )
        }
    ));
    if open && !l.listen_addr.0.ip().is_loopback() {
        report.warnings.push(format!(
            "proxy.{name} on {} has no credentials and is not on a loopback address: \
             anyone who can reach it may use it (an open proxy); set auth_username and \
             auth_password",
            l.listen_addr.0
        ));
    }
}

/// The HTTPS listener's own certificate and key, when it names them, as the gateway's.
fn https_cert(l: &ProxyListener, g: &GatewayConfig, report: &mut Report) -> anyhow::Result<()> {
    let (Some(cert), Some(key)) = (&l.tls_cert, &l.tls_key) else {
        report.summary.push(format!(
            "proxy.https: TLS with the gateway's certificate ({})",
            g.tls_cert.display()
        ));
        return Ok(());
    };
    let expiry = check_cert("proxy.https.tls_cert", cert, report)?;
    tls::load_certified_key(cert, key).context("proxy.https.tls_key")?;
    report.summary.push(format!(
        "proxy.https: TLS with {} ({expiry})",
        cert.display()
    ));
    Ok(())
}

fn admin(section: &str, addr: SocketAddr, auth: bool, report: &mut Report) {
    report.summary.push(format!(
        "admin listener: {addr}{}",
        if auth { " (basic auth)" } else { "" }
    ));
    if !auth && !addr.ip().is_loopback() {
        report.warnings.push(format!(
            "{section}.admin_addr {addr} is not a loopback address and has no \
             admin_username/admin_password"
        ));
    }
}

fn limits(g: &GatewayConfig) -> String {
    let l = &g.limits;
    let caps = |c: &anyproxy::config::ConnCapsConfig| {
        let mut parts = Vec::new();
        if let Some(m) = c.max_concurrent {
            parts.push(format!("max {m} at once"));
        }
        if let Some(r) = c.rate {
            parts.push(format!("{r}/s"));
        }
        parts.join(", ")
    };
    let mut out = Vec::new();
    if let Some(c) = &l.per_user {
        out.push(format!("per user {}", caps(c)));
    }
    if let Some(c) = &l.per_ip {
        out.push(format!("per ip {}", caps(c)));
    }
    if let Some(a) = &l.proxy_auth {
        out.push(format!(
            "proxy auth lockout after {} failures",
            a.max_failures
        ));
    }
    if let Some(r) = l.bandwidth.per_user {
        out.push(format!("bandwidth per user {} B/s", r.0));
    }
    for (group, r) in &l.bandwidth.per_group {
        out.push(format!("bandwidth of group {group} {} B/s", r.0));
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join("; ")
    }
}

/// The policy dir as the gateway would load it; a missing dir is created with
/// defaults at the first start, which a check does not do.
fn policy(dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    use anyproxy::policy::dir::{MANAGERS_TOML, SERVER_TOML};
    if !dir.exists() {
        report.summary.push(format!(
            "policy: {} does not exist; the first start creates it with defaults (allow all)",
            dir.display()
        ));
        return Ok(());
    }
    let server = dir.join(SERVER_TOML);
    if server.exists() {
        anyproxy::policy::ServerConf::load(&server)
            .map_err(|e| anyhow!("gateway.policy.dir: {e}"))?;
    }
    let managers = dir.join(MANAGERS_TOML);
    if !managers.exists() {
        report.summary.push(format!(
            "policy: {} has no {MANAGERS_TOML}; the first start creates one (allow all)",
            dir.display()
        ));
        return Ok(());
    }
    let policy =
        anyproxy::policy::Policy::load(&managers, anyproxy::policy::PolicyOptions::default())
            .map_err(|e| anyhow!("gateway.policy.dir: {e}"))?;
    let names = policy.rule_names();
    report.summary.push(format!(
        "policy: {} rule over {} managers ({})",
        managers.display(),
        names.len(),
        names.join(", ")
    ));
    Ok(())
}

fn check_client(c: &ClientConfig, report: &mut Report) -> anyhow::Result<()> {
    let trust = match (&c.gateway_tls_cert, &c.gateway_tls_fingerprint) {
        (Some(path), fp) => {
            let expiry = check_cert("client.gateway_tls_cert", path, report)?;
            format!(
                "{}{} ({expiry})",
                path.display(),
                if fp.is_some() {
                    " or a fingerprint"
                } else {
                    ""
                }
            )
        }
        (None, Some(fp)) => format!("pinned {fp}"),
        (None, None) => "public web roots".into(),
    };
    if let (Some(cert), Some(key)) = (&c.tls_client_cert, &c.tls_client_key) {
        check_cert("client.tls_client_cert", cert, report)?;
        tls::load_certified_key(cert, key).context("client.tls_client_key")?;
    }
    let s = &mut report.summary;
    s.push(format!(
        "client {}: {} replica(s) to {} (trusting {trust})",
        c.client_id,
        c.replicas,
        c.gateways().collect::<Vec<_>>().join(", ")
    ));
    s.push(format!(
        "client limits: {} connections at once, {} forbidden hosts, {} allowed targets{}, {} open ports",
        c.max_concurrent_conns,
        c.forbidden_hosts.len(),
        c.limit.len(),
        if c.limit.is_empty() { " (any)" } else { "" },
        c.open_ports.len()
    ));
    if let Some(a) = c.admin() {
        admin("client", a.addr, a.username.is_some(), report);
    }
    if c.deflate.enabled && c.encoding == anyproxy::config::EncodingName::Json {
        report.warnings.push(
            "client.deflate is on with client.encoding json: see the gateway's warning on \
             CRIME/BREACH; use binary, or turn deflate off"
                .into(),
        );
    }
    Ok(())
}

/// Passwords live in the file as written: say so when others may read it.
fn plain_text_passwords(path: &Path, config: &Config, report: &mut Report) {
    let mut count = 0;
    if let Some(p) = &config.proxy {
        count += p
            .listeners()
            .filter(|(_, l)| l.credentials().is_some())
            .count();
    }
    if let Some(g) = &config.gateway {
        count += 1 + g.groups.iter().map(|x| 1 + x.users.len()).sum::<usize>();
    }
    if config.client.is_some() {
        count += 1;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if count > 0 && mode & 0o077 != 0 {
            report.warnings.push(format!(
                "{} holds {count} plain-text passwords and is readable by other users \
                 (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
    }
}

/// `redis://user:secret@host` without the secret.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}
