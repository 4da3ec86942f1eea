//! A real HAProxy (TCP mode) in front of gateways, started by the test on loopback
//! ports in a temporary dir, in the foreground (`-db`), killed on drop.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// A HAProxy process in front of the gateway, killed on drop.
pub struct HaProxy {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

fn haproxy_bin() -> PathBuf {
    for p in ["/usr/sbin/haproxy", "/usr/bin/haproxy"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("haproxy must be installed (scripts/test.sh installs it: apt-get install haproxy)");
}

impl HaProxy {
    /// Starts HAProxy in TCP mode with one frontend per `(port, backend lines)` (one
    /// or more `server` lines, joined by newlines) and waits (bounded) until every
    /// frontend accepts.
    pub async fn start(frontends: &[(u16, String)]) -> HaProxy {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = String::from(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
        );
        for (i, (port, server)) in frontends.iter().enumerate() {
            cfg.push_str(&format!(
                "frontend f{i}\n  bind 127.0.0.1:{port}\n  default_backend b{i}\nbackend b{i}\n  {}\n",
                server.replace('\n', "\n  ")
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let log = dir.path().join("haproxy.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut child = tokio::process::Command::new(haproxy_bin())
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn haproxy");
        let deadline = Instant::now() + Duration::from_secs(20);
        for (port, _) in frontends {
            while TcpStream::connect((Ipv4Addr::LOCALHOST, *port))
                .await
                .is_err()
            {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "haproxy exited ({status}):\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "haproxy never listened on {port}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        HaProxy {
            _child: child,
            _dir: dir,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
