//! Service management: the systemd units in `contrib/systemd/` pass `systemd-analyze
//! verify` (and its offline security review), and the processes speak the notify
//! protocol to a fake `NOTIFY_SOCKET` the test binds and reads: the gateway's
//! `READY=1` once its listeners are bound, `RELOADING=1`/`READY=1` around a SIGHUP and
//! `STOPPING=1` on SIGTERM; the agent's `READY=1` only once its first session
//! authenticated (over an abstract-namespace socket), and `STOPPING=1`; pmproxy's
//! `READY=1` once its proxy and API are bound, around a SIGHUP and on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const UNITS: [&str; 3] = [
    "anyproxy-gateway.service",
    "anyproxy-client.service",
    "anyproxy-pmproxy.service",
];

fn systemd_analyze(args: &[&str], unit: &Path) -> std::process::Output {
    std::process::Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .expect(
            "systemd-analyze is required for the unit tests; `bash scripts/test.sh` \
             installs it (apt-get install -y systemd)",
        )
}

/// The unit as shipped, with the binary this test built in place of the installed one
/// (verify checks that every command exists and is executable).
fn unit_for_test(name: &str, dir: &Path) -> PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name);
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("/usr/local/bin/anyproxy"), "{name}");
    let path = dir.join(name);
    std::fs::write(&path, text.replace("/usr/local/bin/anyproxy", BIN)).unwrap();
    path
}

#[test]
fn the_units_verify_without_a_warning_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let unit = unit_for_test(name, dir.path());
        let text = std::fs::read_to_string(&unit).unwrap();
        for line in [
            "Type=notify",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "LimitNOFILE=65536",
        ] {
            assert!(text.lines().any(|l| l == line), "{name} lacks {line}");
        }
        let out = systemd_analyze(&["verify"], &unit);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {name}: {:?}\n{stderr}",
            out.status
        );
        let out = systemd_analyze(&["security", "--offline=true"], &unit);
        let report = String::from_utf8_lossy(&out.stdout);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no security verdict for {name}:\n{report}"));
        assert!(overall.contains(" OK"), "{name}: {overall}");
    }
    let gateway = std::fs::read_to_string(dir.path().join(UNITS[0])).unwrap();
    for line in [
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(
            gateway.lines().any(|l| l == line),
            "the gateway lacks {line}"
        );
    }
    // A misspelt key is only a warning to systemd: the check above would catch it.
    let broken = dir.path().join("broken.service");
    std::fs::write(&broken, gateway.replace("ProtectHome=", "ProtectHom=")).unwrap();
    let out = systemd_analyze(&["verify"], &broken);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectHom"));
}

/// A Unix datagram socket standing in for systemd's notify socket.
struct FakeNotify {
    socket: tokio::net::UnixDatagram,
    /// What `NOTIFY_SOCKET` is set to: a path, or `@name`.
    env: String,
    _dir: tempfile::TempDir,
}

impl FakeNotify {
    fn at_path() -> FakeNotify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        FakeNotify {
            socket,
            env: path.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    fn abstract_name() -> FakeNotify {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "anyproxy-test-notify-{}-{}",
            std::process::id(),
            free_port()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let std = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        std.set_nonblocking(true).unwrap();
        FakeNotify {
            socket: tokio::net::UnixDatagram::from_std(std).unwrap(),
            env: format!("@{name}"),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The next message, within 30 s.
    async fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(30), self.socket.recv(&mut buf))
            .await
            .expect("a notify message within 30 s")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Nothing was sent so far.
    fn is_silent(&self) -> bool {
        let mut buf = [0u8; 512];
        matches!(self.socket.try_recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    fn spawn(&self, args: &[&str], log: &Path) -> Proc {
        let child = tokio::process::Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .env("NOTIFY_SOCKET", &self.env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn anyproxy");
        Proc(child)
    }
}

fn gateway_config(certs: &Certs, gateway: u16, http: u16, https: u16) -> String {
    format!(
        r#"proxy:
  http: {{ listen_addr: "127.0.0.1:{http}", auth_username: "{HTTP_USER}", auth_password: "{HTTP_PASS}" }}
  https: {{ listen_addr: "127.0.0.1:{https}", auth_username: "{HTTP_USER}", auth_password: "{HTTP_PASS}" }}
gateway:
  listen_addr: "127.0.0.1:{gateway}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  drain_timeout: 2s
"#,
        cert = certs.cert.display(),
        key = certs.key.display(),
    )
}

/// The next message is `READY=1`, and ready means bound: every port accepts now,
/// without waiting.
async fn ready_and_bound(notify: &FakeNotify, ports: &[u16], log: &Path) {
    assert_eq!(notify.next().await, "READY=1");
    for port in ports {
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_ok(),
            "port {port} not bound at READY=1:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// A SIGHUP to `pid` is told as `RELOADING=1`, then `READY=1`.
async fn reloads(notify: &FakeNotify, pid: u32) {
    signal(pid, "HUP");
    assert_eq!(notify.next().await, "RELOADING=1");
    assert_eq!(notify.next().await, "READY=1");
}

async fn exits_zero(proc: &mut Proc) {
    let status = tokio::time::timeout(Duration::from_secs(30), proc.0.wait())
        .await
        .expect("exited within 30 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_notifies_ready_once_bound_reloading_around_sighup_and_stopping() {
    let certs = certs();
    let notify = FakeNotify::at_path();
    let ports = [free_port(), free_port(), free_port()];
    let config = certs.dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        gateway_config(&certs, ports[0], ports[1], ports[2]),
    )
    .unwrap();
    let log = certs.dir.path().join("gateway.log");
    let mut gateway = notify.spawn(&["gateway", "--config", config.to_str().unwrap()], &log);

    ready_and_bound(&notify, &ports, &log).await;

    let pid = gateway.0.id().unwrap();
    reloads(&notify, pid).await;
    // A reload that fails still ends in READY=1: the old configuration serves on.
    std::fs::write(&config, "gateway: [not, a, gateway]\n").unwrap();
    reloads(&notify, pid).await;

    signal(pid, "TERM");
    assert_eq!(notify.next().await, "STOPPING=1");
    exits_zero(&mut gateway).await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("reload failed"), "{log}");
    assert!(!log.contains("cannot notify"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_notifies_ready_after_its_first_session_authenticated_and_stopping() {
    let certs = certs();
    let notify = FakeNotify::abstract_name();
    let (gateway_port, http, https) = (free_port(), free_port(), free_port());
    let dir = certs.dir.path();
    let agent_config = dir.join("client.yaml");
    std::fs::write(
        &agent_config,
        format!(
            r#"client:
  gateway_addr: "127.0.0.1:{gateway_port}"
  gateway_tls_cert: "{cert}"
  client_id: "notified"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  reconnect_min: 100ms
  reconnect_max: 500ms
  drain_timeout: 2s
"#,
            cert = certs.cert.display()
        ),
    )
    .unwrap();
    let agent_log = dir.join("agent.log");
    let mut agent = notify.spawn(
        &["client", "--config", agent_config.to_str().unwrap()],
        &agent_log,
    );
    // No gateway yet: the agent retries, and is not ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&agent_log)
        .unwrap_or_default()
        .contains("reconnecting")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never retried"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(notify.is_silent(), "READY=1 before any session");

    let gateway_config_path = dir.join("gateway.yaml");
    std::fs::write(
        &gateway_config_path,
        gateway_config(&certs, gateway_port, http, https),
    )
    .unwrap();
    let _gateway = spawn(
        &["gateway", "--config", gateway_config_path.to_str().unwrap()],
        &dir.join("gateway.log"),
    );
    assert_eq!(notify.next().await, "READY=1");
    let log = std::fs::read_to_string(&agent_log).unwrap();
    assert!(log.contains("authenticated to the gateway"), "{log}");

    signal(agent.0.id().unwrap(), "TERM");
    assert_eq!(notify.next().await, "STOPPING=1");
    exits_zero(&mut agent).await;
    // READY=1 once: nothing else was sent.
    assert!(notify.is_silent());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pmproxy_notifies_ready_once_bound_reloading_around_sighup_and_stopping() {
    let notify = FakeNotify::at_path();
    let dir = tempfile::tempdir().unwrap();
    let (proxy_port, api_port) = (free_port(), free_port());
    let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
        .replace("127.0.0.1:4443", &format!("127.0.0.1:{api_port}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{proxy_port}"));
    std::fs::write(dir.path().join("server.toml"), server).unwrap();
    let log = dir.path().join("pmproxy.log");
    let mut pmproxy = notify.spawn(
        &["pmproxy", "--config-dir", dir.path().to_str().unwrap()],
        &log,
    );
    ready_and_bound(&notify, &[proxy_port, api_port], &log).await;
    let pid = pmproxy.0.id().unwrap();
    reloads(&notify, pid).await;
    signal(pid, "TERM");
    assert_eq!(notify.next().await, "STOPPING=1");
    exits_zero(&mut pmproxy).await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("cannot notify"), "{log}");
}
