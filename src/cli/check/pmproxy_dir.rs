//! `anyproxy check --config-dir DIR`: what `anyproxy pmproxy --config-dir DIR` would
//! validate at start, read-only. A start creates what is missing (`server.toml`,
//! `managers.toml`, the API's certificate, the JWT key); a check says so and creates
//! nothing, so it can run against a production dir.

use std::path::Path;

use anyhow::{bail, Context};

use anyproxy::policy::dir::{JWT_KEY_FILE, MANAGERS_TOML, SERVER_TOML};
use anyproxy::policy::server_config::ServerConf;
use anyproxy::policy::{Policy, PolicyOptions};
use anyproxy::transport::tls;

use super::{check_cert, Report};

pub fn check_dir(dir: &Path) -> anyhow::Result<Report> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let mut report = Report::default();
    let server = server_conf(dir, &mut report)?;
    check_server(dir, &server, &mut report)?;
    check_managers(dir, &mut report)?;
    if !dir.join(JWT_KEY_FILE).exists() {
        report.warnings.push(format!(
            "{JWT_KEY_FILE} is missing: a start generates a new one, and tokens issued \
             before it stop being accepted"
        ));
    }
    Ok(report)
}

/// `server.toml`, or its defaults (what a start would write) when it is missing.
fn server_conf(dir: &Path, report: &mut Report) -> anyhow::Result<ServerConf> {
    let path = dir.join(SERVER_TOML);
    if path.exists() {
        return Ok(ServerConf::load(&path)?);
    }
    report.warnings.push(format!(
        "{SERVER_TOML} is missing: a start writes the defaults, checked here"
    ));
    Ok(ServerConf::from_toml(
        SERVER_TOML,
        anyproxy::policy::server_config::DEFAULT_SERVER_TOML,
    )?)
}

fn check_server(dir: &Path, server: &ServerConf, report: &mut Report) -> anyhow::Result<()> {
    let proxy = server
        .proxy
        .server
        .socket_addr()
        .map_err(|e| anyhow::anyhow!("{SERVER_TOML}: proxy.server.addr: {e}"))?;
    let api = server
        .api
        .server
        .socket_addr()
        .map_err(|e| anyhow::anyhow!("{SERVER_TOML}: api.server.addr: {e}"))?;
    report.summary.push(format!(
        "proxy on {proxy} (dial timeout {}, read timeout {}, {} forbidden hosts)",
        server.proxy.dial_timeout,
        server.proxy.server.read_timeout,
        server.proxy.forbidden_hosts.len()
    ));
    if !proxy.ip().is_loopback() {
        report.warnings.push(format!(
            "{SERVER_TOML}: proxy.server.addr {proxy} is not loopback: the proxy asks for no \
             credentials, so whoever reaches it is decided by managers.toml alone"
        ));
    }
    let cert = dir.join(&server.api.https_cert);
    let key = dir.join(&server.api.https_key);
    match (cert.exists(), key.exists()) {
        (false, false) => {
            report.summary.push(format!("policy API on {api}"));
            report.warnings.push(format!(
                "api.httpsCert {} is missing: a start generates a self-signed one",
                cert.display()
            ));
        }
        _ => {
            let expiry = check_cert("api.httpsCert", &cert, report)?;
            tls::load_checked(&cert, &key).context("api.httpsCert / api.httpsKey")?;
            report
                .summary
                .push(format!("policy API on {api}, certificate {expiry}"));
        }
    }
    Ok(())
}

fn check_managers(dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    let path = dir.join(MANAGERS_TOML);
    if !path.exists() {
        report.warnings.push(format!(
            "{MANAGERS_TOML} is missing: a start writes one with a generated administrator"
        ));
        return Ok(());
    }
    // In memory only: a check reads no state file and writes none.
    let policy = Policy::load(&path, PolicyOptions::default())?;
    report.summary.push(format!(
        "{MANAGERS_TOML}: rules {:?} over {}",
        policy.rule_text(),
        policy.rule_names().join(", ")
    ));
    Ok(())
}
