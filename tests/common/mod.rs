//! Test harness: real `anyproxy` processes on loopback, local target servers, curl.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod haproxy;
pub mod redis;
pub mod slapd;
pub mod udp;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_anyproxy");

/// A port that is free now, for a process the test starts to listen on.
///
/// Not from the kernel's ephemeral range: a port from `bind(0)` is exactly what the
/// kernel hands next to some outgoing connection (curl, an agent) in the moment before
/// the child binds it. Below that range, each port is handed out once per test process
/// (an atomic cursor that starts at a pid-dependent offset, so concurrent test binaries
/// start apart), and checked free by binding it. Falls back to `bind(0)` when the
/// ephemeral range leaves no room below it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_start > LOW + 2_000 {
        let span = ephemeral_start - LOW;
        let _ = NEXT.compare_exchange(
            0,
            1 + std::process::id() * 7919 % span,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        for _ in 0..span {
            let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
            if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Certs {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let g = anyproxy::transport::tls::generate_self_signed(&["localhost", "127.0.0.1"]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, g.cert_pem).unwrap();
    std::fs::write(&key, g.key_pem).unwrap();
    Certs { dir, cert, key }
}

/// A self-signed certificate and key made as most people make one: a bare
/// `openssl req -x509` (which marks it `CA:TRUE`), for `localhost`. PEM each.
pub fn openssl_self_signed(dir: &Path, name: &str) -> (String, String) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req -x509 failed");
    (
        std::fs::read_to_string(cert).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    )
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

pub fn spawn(args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(BIN)
        .args(args)
        // The config's `log.level` (default info) decides, whatever the caller's env.
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn anyproxy");
    Proc(child)
}

/// Waits until `port` accepts, or returns false once `proc` has exited.
pub async fn wait_for_listener(proc: &mut Proc, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_err()
    {
        if proc.0.try_wait().is_ok_and(|status| status.is_some()) {
            return false;
        }
        assert!(Instant::now() < deadline, "port {port} never opened");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

pub async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "port {port} never opened");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Knobs for one gateway + agent pair.
#[derive(Clone)]
pub struct StackOptions {
    pub forbidden_hosts: Vec<String>,
    pub encoding: &'static str,
    pub with_agent: bool,
    pub max_concurrent_conns: usize,
    /// Extra YAML lines for the `gateway:` section (each `key: value`).
    pub gateway_extra: Vec<String>,
    /// Extra YAML lines for the `client:` section.
    pub client_extra: Vec<String>,
    /// Extra top-level YAML text (e.g. a `log:` section), shared by gateway and agent.
    pub top_extra: String,
    /// Extra YAML lines for both proxy listeners (each `key: value`).
    pub listener_extra: Vec<String>,
    /// Extra YAML text inside the `proxy:` section (another listener, e.g. `https:`),
    /// each line indented by two spaces.
    pub proxy_extra: String,
    /// `client.allow_local`: the tests' targets live on loopback, so on unless a test
    /// checks the agent's default refusal.
    pub allow_local: bool,
    /// The gateway's certificate and key (PEM) instead of a generated pair; the agents
    /// trust this certificate.
    pub tls: Option<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            forbidden_hosts: vec![],
            encoding: "binary",
            with_agent: true,
            max_concurrent_conns: 1000,
            gateway_extra: vec![],
            client_extra: vec![],
            top_extra: String::new(),
            listener_extra: vec![],
            proxy_extra: String::new(),
            allow_local: true,
            tls: None,
        }
    }
}

pub const HTTP_USER: &str = "huser";
pub const HTTP_PASS: &str = "hpass";
pub const SOCKS_USER: &str = "suser";
pub const SOCKS_PASS: &str = "spass";
pub const AGENT_USER: &str = "agent";
pub const AGENT_PASS: &str = "agent-secret";

/// A gateway process with both proxies and (optionally) one agent process.
pub struct Stack {
    pub certs: Certs,
    pub gateway_port: u16,
    pub http_port: u16,
    pub socks_port: u16,
    pub gateway: Proc,
    pub agent: Option<Proc>,
    pub opts: StackOptions,
}

/// The `client:` section of a config file for an agent of this stack's gateway. The
/// gateway is named by its address: `localhost` may also resolve to ::1, which the agent
/// would take for a second gateway.
fn client_section(
    gateway_port: u16,
    cert: &Path,
    client_id: &str,
    opts: &StackOptions,
    forbidden: &str,
    extra: &[String],
) -> String {
    format!(
        r#"client:
  gateway_addr: "127.0.0.1:{gateway_port}"
  allow_local: {allow_local}
  gateway_tls_cert: "{cert}"
  client_id: "{client_id}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  max_concurrent_conns: {max}
  encoding: {encoding}
  dial_timeout: 3s
  reconnect_min: 100ms
  reconnect_max: 1s
  forbidden_hosts:{forbidden}{extra}
"#,
        cert = cert.display(),
        max = opts.max_concurrent_conns,
        allow_local = opts.allow_local,
        encoding = opts.encoding,
        extra = extra_lines(extra),
    )
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        // `free_port` only finds a port that was free a moment ago; a test running in
        // parallel can take it first. The gateway then exits at once (address in use),
        // and a fresh set of ports is the fix, not a longer wait.
        for _ in 0..3 {
            if let Some(stack) = Self::try_start(opts.clone()).await {
                return stack;
            }
        }
        panic!("the gateway could not bind its ports in three attempts");
    }

    async fn try_start(opts: StackOptions) -> Option<Stack> {
        let certs = certs();
        if let Some((cert, key)) = &opts.tls {
            std::fs::write(&certs.cert, cert).unwrap();
            std::fs::write(&certs.key, key).unwrap();
        }
        let (gateway_port, http_port, socks_port) = (free_port(), free_port(), free_port());
        let forbidden: String = opts
            .forbidden_hosts
            .iter()
            .map(|h| format!("\n    - \"{h}\""))
            .collect();
        let forbidden = if forbidden.is_empty() {
            " []".to_string()
        } else {
            forbidden
        };
        let config = format!(
            r#"{top_extra}
proxy:
  http:
    listen_addr: "127.0.0.1:{http_port}"
    auth_username: "{HTTP_USER}"
    auth_password: "{HTTP_PASS}"{listener_extra}
  socks5:
    listen_addr: "127.0.0.1:{socks_port}"
    auth_username: "{SOCKS_USER}"
    auth_password: "{SOCKS_PASS}"{listener_extra}
{proxy_extra}
gateway:
  listen_addr: "127.0.0.1:{gateway_port}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: "{AGENT_USER}"
  auth_password: "{AGENT_PASS}"
  connect_timeout: 5s{gateway_extra}
{client}"#,
            cert = certs.cert.display(),
            key = certs.key.display(),
            top_extra = opts.top_extra,
            proxy_extra = opts.proxy_extra,
            listener_extra = opts
                .listener_extra
                .iter()
                .map(|l| format!("\n    {l}"))
                .collect::<String>(),
            gateway_extra = extra_lines(&opts.gateway_extra),
            client = client_section(
                gateway_port,
                &certs.cert,
                "test-agent",
                &opts,
                &forbidden,
                &opts.client_extra
            ),
        );
        let config_path = certs.dir.path().join("config.yaml");
        std::fs::write(&config_path, config).unwrap();
        let cfg = config_path.to_str().unwrap();
        let gateway_log = certs.dir.path().join("gateway.log");
        let mut gateway = spawn(&["gateway", "--config", cfg], &gateway_log);
        for port in [gateway_port, http_port, socks_port] {
            if !wait_for_listener(&mut gateway, port).await {
                let log = std::fs::read_to_string(&gateway_log).unwrap_or_default();
                assert!(log.contains("in use"), "the gateway exited:\n{log}");
                eprintln!("a port was taken by another test; retrying with new ports");
                return None;
            }
        }
        // A port that answered may be another test's listener, if ours lost the race.
        if gateway.0.try_wait().is_ok_and(|status| status.is_some()) {
            return None;
        }
        let agent = opts.with_agent.then(|| {
            spawn(
                &["client", "--config", cfg],
                &certs.dir.path().join("agent.log"),
            )
        });
        let stack = Stack {
            certs,
            gateway_port,
            http_port,
            socks_port,
            gateway,
            agent,
            opts,
        };
        if stack.opts.with_agent {
            stack.wait_for_agent().await;
        }
        Some(stack)
    }

    pub fn http_proxy(&self) -> String {
        format!(
            "http://{HTTP_USER}:{HTTP_PASS}@127.0.0.1:{}",
            self.http_port
        )
    }

    /// The HTTP proxy's URL with `user`'s credentials, for curl's `-x`.
    pub fn http_proxy_as(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@127.0.0.1:{}", self.http_port)
    }

    /// A SOCKS5 connection as `user` to a loopback `target`.
    pub async fn socks5_as(
        &self,
        user: &str,
        pass: &str,
        target: SocketAddr,
    ) -> Result<tokio::net::TcpStream, Socks5Refusal> {
        socks5_stream(self.socks_port, user, pass, "127.0.0.1", target.port()).await
    }

    /// Waits (at most 20 s) until `user` gets `want` for `url` through the HTTP proxy.
    pub async fn until_http_status(&self, user: &str, pass: &str, url: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = curl_status(&["-x", &self.http_proxy_as(user, pass), url]).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{user} still gets {got}, not {want}:\n{}",
                self.log("gateway")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn socks_auth(&self) -> String {
        format!("{SOCKS_USER}:{SOCKS_PASS}@127.0.0.1:{}", self.socks_port)
    }

    /// A SOCKS5 connection as the stack's SOCKS user to a loopback `target`.
    pub async fn socks5_to(
        &self,
        target: SocketAddr,
    ) -> Result<tokio::net::TcpStream, Socks5Refusal> {
        socks5_stream(
            self.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "127.0.0.1",
            target.port(),
        )
        .await
    }

    pub fn log(&self, which: &str) -> String {
        std::fs::read_to_string(self.certs.dir.path().join(format!("{which}.log")))
            .unwrap_or_default()
    }

    /// Waits until the gateway logs that an agent authenticated.
    pub async fn wait_for_agent(&self) {
        self.wait_for_log("gateway", "agent connected", 1).await;
    }

    /// Starts one more agent process for this stack's gateway, with its own
    /// `client_id`, config file and log (`agent-<client_id>`), and only `extra` as
    /// additional `client:` lines.
    pub fn spawn_agent(&self, client_id: &str, extra: &[String]) -> Proc {
        let name = format!("agent-{client_id}");
        let section = client_section(
            self.gateway_port,
            &self.certs.cert,
            client_id,
            &self.opts,
            " []",
            extra,
        );
        let path = self.certs.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, section).unwrap();
        spawn(
            &["client", "--config", path.to_str().unwrap()],
            &self.certs.dir.path().join(format!("{name}.log")),
        )
    }

    /// Starts an agent process in `group` with `password` (config and log named after
    /// `client_id`); `extra` adds `client:` keys, each line indented by two spaces.
    pub fn spawn_group_agent(
        &self,
        client_id: &str,
        group: &str,
        password: &str,
        extra: &str,
    ) -> Proc {
        let dir = self.certs.dir.path();
        let config = format!(
            "client:\n  gateway_addr: \"127.0.0.1:{port}\"\n  allow_local: true\n  gateway_tls_cert: \"{cert}\"\n  client_id: \"{client_id}\"\n  group_id: \"{group}\"\n  auth_password: \"{password}\"\n  reconnect_min: 100ms\n  reconnect_max: 1s\n{extra}",
            port = self.gateway_port,
            cert = self.certs.cert.display(),
        );
        let path = dir.join(format!("{client_id}.yaml"));
        std::fs::write(&path, config).unwrap();
        spawn(
            &["client", "--config", path.to_str().unwrap()],
            &dir.join(format!("{client_id}.log")),
        )
    }

    /// Waits (at most 20 s) until log `which` holds `needle` at least `times` times.
    pub async fn wait_for_log(&self, which: &str, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log(which).matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "{which} never logged {needle:?} {times} times:\n{}\n{}",
                self.log("gateway"),
                self.log(which)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn extra_lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("\n  {l}")).collect()
}

/// Sends `signal` (e.g. "TERM", "STOP", "CONT") to a process with the `kill` command.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill command");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Open file descriptors of a process, from `/proc/PID/fd`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of a process in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// Why the SOCKS5 front end refused a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Socks5Refusal {
    /// The RFC 1929 status byte.
    Auth(u8),
    /// The RFC 1928 CONNECT reply code.
    Reply(u8),
}

/// Opens a connection through the SOCKS5 front end (user/password auth, domain name).
pub async fn socks5_stream(
    port: u16,
    user: &str,
    pass: &str,
    host: &str,
    target_port: u16,
) -> Result<tokio::net::TcpStream, Socks5Refusal> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(pass.len() as u8);
    auth.extend_from_slice(pass.as_bytes());
    s.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await.unwrap();
    if status[1] != 0 {
        return Err(Socks5Refusal::Auth(status[1]));
    }
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&target_port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    if reply[1] != 0 {
        return Err(Socks5Refusal::Reply(reply[1]));
    }
    Ok(s)
}

/// Deterministic pseudo-random bytes (xorshift), so both ends can hash without storing.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Local target: `GET /bytes/N` streams `pattern(N, 7)`, `POST /sha256` answers the body's
/// SHA-256, anything else answers "hello".
/// `/slow/` requests each target server received, by its address: tests wait for a
/// download to be under way instead of sleeping a guessed time.
static SLOW_REQUESTS: std::sync::Mutex<Vec<(SocketAddr, usize)>> =
    std::sync::Mutex::new(Vec::new());

fn slow_requests(target: SocketAddr) -> usize {
    let seen = SLOW_REQUESTS.lock().unwrap();
    seen.iter()
        .find(|(a, _)| *a == target)
        .map_or(0, |(_, n)| *n)
}

/// Waits (at most 20 s) until the target at `target` has received `n` `/slow/`
/// requests: the tunnelled connections carrying them are established end to end.
pub async fn wait_for_slow_requests(target: SocketAddr, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while slow_requests(target) < n {
        assert!(
            Instant::now() < deadline,
            "{target} received {} of {n} /slow/ requests",
            slow_requests(target)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn target_handler(
    req: hyper::Request<hyper::body::Incoming>,
    target: SocketAddr,
) -> Result<hyper::Response<BoxBody>, hyper::Error> {
    let path = req.uri().path().to_owned();
    if let Some(rest) = path.strip_prefix("/slow/") {
        {
            let mut seen = SLOW_REQUESTS.lock().unwrap();
            match seen.iter_mut().find(|(a, _)| *a == target) {
                Some((_, n)) => *n += 1,
                None => seen.push((target, 1)),
            }
        }
        return Ok(slow_body(rest));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        let data = Bytes::from(pattern(n, 7));
        let chunks: Vec<Result<Frame<Bytes>, hyper::Error>> = (0..n.div_ceil(65536))
            .map(|i| Ok(Frame::data(data.slice(i * 65536..((i + 1) * 65536).min(n)))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let mut resp = hyper::Response::new(BodyExt::boxed(body));
        resp.headers_mut().insert("content-length", n.into());
        return Ok(resp);
    }
    if path == "/sha256" {
        let mut hasher = Sha256::new();
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                hasher.update(&data);
            }
        }
        let digest = hex(&hasher.finalize());
        return Ok(hyper::Response::new(
            Full::new(Bytes::from(digest))
                .map_err(|n| match n {})
                .boxed(),
        ));
    }
    Ok(hyper::Response::new(
        Full::new(Bytes::from_static(b"hello"))
            .map_err(|n| match n {})
            .boxed(),
    ))
}

/// `GET /slow/CHUNKS/MS`: CHUNKS chunks of [`SLOW_CHUNK`] bytes of `pattern(_, 7)`,
/// one every MS milliseconds, with a content length, so a cut-short transfer shows.
pub const SLOW_CHUNK: usize = 16 * 1024;

fn slow_body(spec: &str) -> hyper::Response<BoxBody> {
    let mut parts = spec.split('/').map(|p| p.parse::<u64>().unwrap_or(0));
    let (chunks, ms) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let chunk = Bytes::from(pattern(SLOW_CHUNK, 7));
    let stream = futures_util::stream::unfold(0u64, move |i| {
        let chunk = chunk.clone();
        async move {
            if i == chunks {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Some((Ok::<_, hyper::Error>(Frame::data(chunk)), i + 1))
        }
    });
    let mut resp = hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-length", (chunks as usize * SLOW_CHUNK).into());
    resp
}

/// A TCP echo on 127.0.0.1: every byte back, then a half-close after the client's end
/// of stream.
pub async fn echo_target() -> SocketAddr {
    echo_target_on("127.0.0.1").await
}

/// A PMProxy config dir for `gateway.policy`: the rule `quota ∧ ¬blocked`, where
/// `blocked` matches `blocked_port` and `quota` gives the staff group (huser, suser)
/// `quota` of download; its API on `api_port`.
pub fn policy_dir(blocked_port: u16, quota: &str, api_port: u16) -> tempfile::TempDir {
    let managers = format!(
        r#"
rules = "quota ∧ ¬blocked"

[mapDB]
name = "users"
[mapDB.userPass]
huser = "unused-here"
suser = "unused-here"
[mapDB.userGroups]
huser = ["staff"]
suser = ["staff"]

[[hostMatcher]]
name = "blocked"
pattern = ':{blocked_port}$'

[[dwnConsR]]
name = "quota"
userDBN = "users"
resetCycle = "24h"
[dwnConsR.groupQuota]
staff = "{quota}"
"#
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("managers.toml"), managers).unwrap();
    let server = anyproxy::policy::server_config::DEFAULT_SERVER_TOML
        .replace("127.0.0.1:4443", &format!("127.0.0.1:{api_port}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port()));
    std::fs::write(dir.path().join("server.toml"), server).unwrap();
    dir
}

/// Plain HTTP target on 127.0.0.1.
pub async fn http_target() -> SocketAddr {
    serve_target(None).await
}

/// HTTPS target on 127.0.0.1 with the given certificate.
pub async fn https_target(certs: &Certs) -> SocketAddr {
    let tls = anyproxy::transport::tls::server_config(&certs.cert, &certs.key).unwrap();
    serve_target(Some(Arc::new(tokio_rustls::TlsAcceptor::from(tls)))).await
}

async fn serve_target(tls: Option<Arc<tokio_rustls::TlsAcceptor>>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| target_handler(req, addr));
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(stream).await {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

/// Runs curl; returns (exit code, stdout).
pub async fn curl(args: &[&str]) -> (i32, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .output()
        .await
        .expect("curl must be installed (the README's test command installs it)");
    if !out.status.success() {
        eprintln!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// Runs curl and returns the HTTP status it saw (`-w %{http_code}`).
pub async fn curl_status(args: &[&str]) -> String {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    let (_, out) = curl(&all).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Status of the proxy's answer to curl's CONNECT (`-p`), which curl reports separately.
pub async fn curl_connect_status(args: &[&str]) -> String {
    let mut all = vec!["-p", "-o", "/dev/null", "-w", "%{http_connect}"];
    all.extend_from_slice(args);
    let (_, out) = curl(&all).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs curl and returns `(HTTP status, body)`.
pub async fn curl_status_body(args: &[&str]) -> (String, String) {
    let mut all = vec!["-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let (_, out) = curl(&all).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_owned(), body.to_owned())
}

/// `(status, body)` of a GET on the admin listener, with basic auth when given.
pub async fn admin_get(port: u16, path: &str, auth: Option<&str>) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut args = vec![];
    if let Some(a) = auth {
        args.extend(["-u", a]);
    }
    args.push(url.as_str());
    curl_status_body(&args).await
}

/// Sum of the samples of `name` whose labels include every pair of `want`.
pub fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric_name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let all = want
            .iter()
            .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// A target that writes `block` up to 1024 times to each connection (at most 1 GiB),
/// counting in `written` what the kernel accepted.
pub async fn firehose_target(written: Arc<AtomicU64>, block: Arc<Vec<u8>>) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (written, block) = (written.clone(), block.clone());
            tokio::spawn(async move {
                for _ in 0..1024 {
                    if s.write_all(&block).await.is_err() {
                        return;
                    }
                    written.fetch_add(block.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

/// [`echo_target`] on `ip` (`127.0.0.2` is another loopback target than `127.0.0.1`),
/// keeping every connection until its client leaves.
pub async fn echo_target_on(ip: &str) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Waits until `counter` moved and then stood still for a second (the tunnel stopped
/// pulling, or the connection was closed), and returns it. A counter still at zero has
/// not started: a slow start is not a stall. Fails after 30 s.
pub async fn wait_until_still(counter: &AtomicU64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = counter.load(Ordering::Relaxed);
    let mut still = 0;
    while still < 5 {
        assert!(
            Instant::now() < deadline,
            "the counter never stood still: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = counter.load(Ordering::Relaxed);
        if now == last && now > 0 {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
    last
}

/// Waits (at most 10 s) until nothing accepts on 127.0.0.1:`port` any more: a
/// listener a reload stopped closes when its loop sees the stop, just after the
/// reload's log line.
pub async fn refused_within(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "127.0.0.1:{port} still accepts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most 10 s) until the proxy ends `s` (end of stream or a reset).
pub async fn closed_by_proxy(s: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// Writes `text` and reads it back from an echo, within 10 s.
pub async fn round_trip(s: &mut tokio::net::TcpStream, text: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(text).await.unwrap();
    let mut back = vec![0; text.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(back, text);
}

/// The size of [`slow_download`]'s body.
pub const SLOW_DOWNLOAD: usize = 64 << 20;

/// Starts a 64 MiB download of `target`'s `/bytes/` through `proxy` (curl's `-x`),
/// slowed to 16 MB/s so that what a test does meanwhile lands while the body is in
/// flight.
pub fn slow_download(proxy: String, target: SocketAddr) -> tokio::task::JoinHandle<(i32, Vec<u8>)> {
    let url = format!("http://{target}/bytes/{SLOW_DOWNLOAD}");
    tokio::spawn(async move { curl(&["--limit-rate", "16M", "-x", &proxy, &url]).await })
}

/// Waits (at most 120 s) for a [`slow_download`] and checks it arrived whole,
/// byte-identical.
pub async fn assert_downloaded_whole(download: tokio::task::JoinHandle<(i32, Vec<u8>)>) {
    let (code, body) = tokio::time::timeout(Duration::from_secs(120), download)
        .await
        .expect("the download ends within 120 s")
        .unwrap();
    assert_eq!(code, 0);
    assert_eq!(body.len(), SLOW_DOWNLOAD);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(SLOW_DOWNLOAD, 7)));
}

/// A CONNECT through the HTTP proxy as `user`, answered 200; the tunnel is the stream.
/// The answer's head is read byte by byte, so nothing of the tunnel is read past it.
pub async fn http_connect_as(
    stack: &Stack,
    user: &str,
    pass: &str,
    target: SocketAddr,
) -> tokio::net::TcpStream {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b))
            .await
            .expect("the proxy answers the CONNECT within 30 s")
            .unwrap();
        assert!(
            n == 1 && head.len() < 4096,
            "the proxy closed or sent an overlong head: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}
