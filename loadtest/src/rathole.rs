//! rathole 0.5 (from crates.io) server + client on loopback, one service per target:
//! the like-for-like peer of anyproxy's declared forwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::procs::{self, free_port, Proc};
use crate::stack::write_certs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Tls,
    WsTls,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::WsTls, Transport::Tls, Transport::Tcp];

    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "rathole tcp",
            Transport::Tls => "rathole tls",
            Transport::WsTls => "rathole ws+tls",
        }
    }
}

const TOKEN: &str = "loadtest-token";
const P12_PASSWORD: &str = "loadtest";

pub struct Rathole {
    pub ports: BTreeMap<&'static str, u16>,
    pub server: Proc,
    pub client: Proc,
    _dir: tempfile::TempDir,
}

impl Rathole {
    pub async fn start(
        bin: &Path,
        transport: Transport,
        services: &[(&'static str, SocketAddr)],
    ) -> Result<Rathole> {
        let dir = procs::work_dir("rathole-lt-")?;
        let control_port = free_port()?;
        let (server_transport, client_transport) = transport_sections(transport, dir.path())?;
        let mut server = format!(
            "[server]\nbind_addr = \"127.0.0.1:{control_port}\"\ndefault_token = \"{TOKEN}\"\n{server_transport}"
        );
        let mut client = format!(
            "[client]\nremote_addr = \"localhost:{control_port}\"\ndefault_token = \"{TOKEN}\"\n{client_transport}"
        );
        let mut ports = BTreeMap::new();
        for (name, target) in services {
            let port = free_port()?;
            ports.insert(*name, port);
            server.push_str(&format!(
                "\n[server.services.{name}]\nbind_addr = \"127.0.0.1:{port}\"\n"
            ));
            client.push_str(&format!(
                "\n[client.services.{name}]\nlocal_addr = \"{target}\"\n"
            ));
        }
        let server_toml = dir.path().join("server.toml");
        let client_toml = dir.path().join("client.toml");
        std::fs::write(&server_toml, server)?;
        std::fs::write(&client_toml, client)?;
        let path = |p: &Path| p.to_str().map(str::to_owned).context("temp path not UTF-8");
        let mut server = procs::spawn(
            &format!("{} server", transport.label()),
            bin,
            &["--server", &path(&server_toml)?],
            &dir.path().join("server.log"),
        )?;
        procs::wait_for_listening(control_port, &mut server).await?;
        let mut client = procs::spawn(
            &format!("{} client", transport.label()),
            bin,
            &["--client", &path(&client_toml)?],
            &dir.path().join("client.log"),
        )?;
        // The server binds a service's port once the client's control channel for it is up.
        procs::wait_for_log(&mut server, "Control channel established", services.len()).await?;
        for port in ports.values() {
            procs::wait_for_listening(*port, &mut server).await?;
        }
        client.check_alive()?;
        Ok(Rathole {
            ports,
            server,
            client,
            _dir: dir,
        })
    }

    pub fn port(&self, name: &str) -> Result<u16> {
        self.ports
            .get(name)
            .copied()
            .with_context(|| format!("no rathole service named {name}"))
    }

    pub fn pids(&self) -> Result<[u32; 2]> {
        Ok([self.server.pid()?, self.client.pid()?])
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.server.check_alive()?;
        self.client.check_alive()
    }
}

/// The `[server.transport]` and `[client.transport]` sections; TLS needs a PKCS#12
/// identity on the server and the certificate as the client's trusted root.
fn transport_sections(t: Transport, dir: &Path) -> Result<(String, String)> {
    if t == Transport::Tcp {
        return Ok((
            "[server.transport]\ntype = \"tcp\"\n".into(),
            "[client.transport]\ntype = \"tcp\"\n".into(),
        ));
    }
    let certs = write_certs(dir)?;
    let p12 = dir.join("identity.pfx");
    let out = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-out"])
        .arg(&p12)
        .arg("-inkey")
        .arg(&certs.key)
        .arg("-in")
        .arg(&certs.cert)
        .arg("-passout")
        .arg(format!("pass:{P12_PASSWORD}"))
        .output()
        .context("run openssl to make rathole's PKCS#12 identity (is openssl installed?)")?;
    if !out.status.success() {
        bail!(
            "openssl pkcs12 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let kind = if t == Transport::Tls {
        "tls"
    } else {
        "websocket"
    };
    let ws = if t == Transport::WsTls {
        "tls = true\n"
    } else {
        ""
    };
    let ws_server = if ws.is_empty() {
        String::new()
    } else {
        format!("[server.transport.websocket]\n{ws}")
    };
    let ws_client = if ws.is_empty() {
        String::new()
    } else {
        format!("[client.transport.websocket]\n{ws}")
    };
    Ok((
        format!(
            "[server.transport]\ntype = \"{kind}\"\n[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"{P12_PASSWORD}\"\n{ws_server}",
            p12.display()
        ),
        format!(
            "[client.transport]\ntype = \"{kind}\"\n[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n{ws_client}",
            certs.cert.display()
        ),
    ))
}
