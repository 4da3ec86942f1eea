//! One anyproxy gateway and one agent, as separate release processes on loopback, with
//! both proxies and a declared forward per target.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::procs::{self, free_port, Proc};

pub const HTTP_USER: &str = "huser";
pub const HTTP_PASS: &str = "hpass";
pub const SOCKS_USER: &str = "suser";
pub const SOCKS_PASS: &str = "spass";
const AGENT_USER: &str = "agent";
const AGENT_PASS: &str = "agent-secret";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Binary,
    Json,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Binary => "binary",
            Encoding::Json => "json",
        }
    }
}

#[derive(Clone, Debug)]
pub struct StackOptions {
    pub encoding: Encoding,
    pub deflate: bool,
    /// Forwards the gateway declares: name → target.
    pub forwards: Vec<(&'static str, SocketAddr)>,
    /// The agent's `max_concurrent_conns`; the scale scenario needs it above its count.
    pub max_conns: usize,
    /// Extra `key: value` lines for the `gateway:` and the `client:` section.
    pub gateway_extra: Vec<String>,
    pub client_extra: Vec<String>,
}

impl StackOptions {
    /// The default configuration (binary, no deflate) with these forwards.
    pub fn binary(forwards: Vec<(&'static str, SocketAddr)>, max_conns: usize) -> StackOptions {
        StackOptions {
            encoding: Encoding::Binary,
            deflate: false,
            forwards,
            max_conns,
            gateway_extra: vec![],
            client_extra: vec![],
        }
    }

    pub fn label(&self) -> String {
        format!(
            "anyproxy {}{}",
            self.encoding.name(),
            if self.deflate { "+deflate" } else { "" }
        )
    }
}

/// A self-signed certificate for localhost / 127.0.0.1 in a directory of its own.
pub struct Certs {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn write_certs(dir: &Path) -> Result<Certs> {
    let g = anyproxy::transport::tls::generate_self_signed(&["localhost", "127.0.0.1"])
        .context("generate a self-signed certificate")?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, g.cert_pem)?;
    std::fs::write(&key, g.key_pem)?;
    Ok(Certs { cert, key })
}

pub struct Stack {
    pub http_port: u16,
    pub socks_port: u16,
    pub gateway_port: u16,
    pub forward_ports: BTreeMap<&'static str, u16>,
    pub gateway: Proc,
    pub agent: Proc,
    bin: PathBuf,
    config: PathBuf,
    /// How many gateway and agent processes this stack has started (log names).
    gateway_starts: usize,
    agent_starts: usize,
    dir: tempfile::TempDir,
}

fn extra_lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("\n  {l}")).collect()
}

impl Stack {
    pub async fn start(bin: &Path, opts: StackOptions) -> Result<Stack> {
        let dir = procs::work_dir("anyproxy-lt-")?;
        let certs = write_certs(dir.path())?;
        let (gateway_port, http_port, socks_port) = (free_port()?, free_port()?, free_port()?);
        let mut forward_ports = BTreeMap::new();
        let mut forwards = String::new();
        for (name, target) in &opts.forwards {
            let port = free_port()?;
            forward_ports.insert(*name, port);
            forwards.push_str(&format!(
                "\n    - {{ listen_addr: \"127.0.0.1:{port}\", target: \"{target}\" }}"
            ));
        }
        if !forwards.is_empty() {
            forwards = format!("\n  forwards:{forwards}");
        }
        let deflate = if opts.deflate {
            "\n  deflate: { enabled: true }"
        } else {
            ""
        };
        let config = format!(
            r#"proxy:
  http:
    listen_addr: "127.0.0.1:{http_port}"
    auth_username: "{HTTP_USER}"
    auth_password: "{HTTP_PASS}"
  socks5:
    listen_addr: "127.0.0.1:{socks_port}"
    auth_username: "{SOCKS_USER}"
    auth_password: "{SOCKS_PASS}"
gateway:
  listen_addr: "127.0.0.1:{gateway_port}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"{deflate}{forwards}{gateway_extra}
client:
  gateway_addr: "localhost:{gateway_port}"
  allow_local: true
  gateway_tls_cert: "{cert}"
  client_id: "loadtest-agent"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  max_concurrent_conns: {max}
  encoding: {encoding}
  reconnect_min: 100ms
  reconnect_max: 1s{deflate}{client_extra}
"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
            max = opts.max_conns,
            encoding = opts.encoding.name(),
            gateway_extra = extra_lines(&opts.gateway_extra),
            client_extra = extra_lines(&opts.client_extra),
        );
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config)?;
        let cfg = config_path.to_str().context("temp path is not UTF-8")?;
        let mut gateway = procs::spawn(
            "anyproxy gateway",
            bin,
            &["gateway", "--config", cfg],
            &dir.path().join("gateway.log"),
        )?;
        // Connecting to the agent port would log a failed TLS handshake; look instead.
        for port in [gateway_port, http_port, socks_port] {
            procs::wait_for_listening(port, &mut gateway).await?;
        }
        let agent = procs::spawn(
            "anyproxy agent",
            bin,
            &["client", "--config", cfg],
            &dir.path().join("agent.log"),
        )?;
        procs::wait_for_log(&mut gateway, "agent connected", 1).await?;
        // Probing a forward by connecting would open a tunnelled connection to its
        // target (iperf3 counts that as a failed test), so look for the listener.
        for port in forward_ports.values() {
            procs::wait_for_listening(*port, &mut gateway).await?;
        }
        Ok(Stack {
            http_port,
            socks_port,
            gateway_port,
            forward_ports,
            gateway,
            agent,
            bin: bin.to_path_buf(),
            config: config_path,
            gateway_starts: 1,
            agent_starts: 1,
            dir,
        })
    }

    /// How many times the gateway's current log says an agent authenticated.
    pub fn agent_connections_logged(&self) -> usize {
        std::fs::read_to_string(&self.gateway.log)
            .unwrap_or_default()
            .matches("agent connected")
            .count()
    }

    /// Stops the gateway with SIGTERM (waiting at most `within` for it to exit) and
    /// starts a new one on the same ports, with the same config; returns once it
    /// listens again and the agent has reconnected. The exit status is returned so the
    /// caller can tell a graceful stop (status 0) from anything else.
    pub async fn restart_gateway(
        &mut self,
        within: std::time::Duration,
    ) -> Result<std::process::ExitStatus> {
        let status = self.gateway.terminate(within).await?;
        self.gateway_starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("gateway-{}.log", self.gateway_starts));
        let cfg = self.config.to_str().context("temp path is not UTF-8")?;
        self.gateway = procs::spawn(
            "anyproxy gateway",
            &self.bin,
            &["gateway", "--config", cfg],
            &log,
        )?;
        for port in [self.gateway_port, self.http_port, self.socks_port] {
            procs::wait_for_listening(port, &mut self.gateway).await?;
        }
        procs::wait_for_log(&mut self.gateway, "agent connected", 1).await?;
        Ok(status)
    }

    /// Stops the agent with SIGTERM (at most `within`) and starts a new one; returns
    /// once the gateway has logged its connection.
    pub async fn restart_agent(
        &mut self,
        within: std::time::Duration,
    ) -> Result<std::process::ExitStatus> {
        let before = self.agent_connections_logged();
        let status = self.agent.terminate(within).await?;
        self.agent_starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("agent-{}.log", self.agent_starts));
        let cfg = self.config.to_str().context("temp path is not UTF-8")?;
        self.agent = procs::spawn(
            "anyproxy agent",
            &self.bin,
            &["client", "--config", cfg],
            &log,
        )?;
        procs::wait_for_log(&mut self.gateway, "agent connected", before + 1).await?;
        self.agent.check_alive()?;
        Ok(status)
    }

    pub fn forward(&self, name: &str) -> Result<u16> {
        self.forward_ports
            .get(name)
            .copied()
            .with_context(|| format!("no forward named {name}"))
    }

    pub fn pids(&self) -> Result<[u32; 2]> {
        Ok([self.gateway.pid()?, self.agent.pid()?])
    }

    /// Fails if either process died during a run, so its numbers are not reported.
    pub fn check_alive(&mut self) -> Result<()> {
        self.gateway.check_alive()?;
        self.agent.check_alive()
    }
}
