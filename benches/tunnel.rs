//! The whole tunnel in one process: a gateway and an agent (the library's own
//! `Gateway` and `Agent`) talking WebSocket over TLS on loopback, a declared forward
//! carrying user connections to a local target. Each case runs beside the same work
//! straight to the target (`direct`), in the same run, so the ratio is the tunnel's cost.
//!
//! - `tunnel/download/{direct,binary,json,binary+metrics}`: one connection reads 16 MiB
//!   from the target.
//! - `tunnel/connect/{...}`: open a connection, one 1-byte round trip, close: what a new
//!   user connection costs (the agent dials the target each time).
//!
//! `binary+metrics` is `binary` with both admin listeners on and `/metrics` and
//! `/api/status` of both scraped every 100 ms (Prometheus scrapes every 15 s): the
//! counters are always kept, so this is what turning metrics on can cost.
//!
//! `cargo bench --bench tunnel -- --warm-up-time 1 --measurement-time 5`
//!
//! Both ends share this process's runtime (2 workers), as on a 2-core machine; the
//! loadtest harness (`loadtest/`) measures the real binaries.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use anyproxy::agent::Agent;
use anyproxy::config::Config;
use anyproxy::gateway::Gateway;
use anyproxy::transport::tls;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DOWNLOAD: u64 = 16 * 1024 * 1024;

/// The target: `S` + u64 length sends that many bytes and closes; `E` echoes.
async fn target() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut cmd = [0u8; 1];
                if s.read_exact(&mut cmd).await.is_err() {
                    return;
                }
                if cmd[0] == b'S' {
                    let Ok(mut left) = s.read_u64().await else {
                        return;
                    };
                    let chunk = vec![0x5au8; 64 * 1024];
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = s.shutdown().await;
                } else {
                    let mut buf = [0u8; 4096];
                    let _ = s.write_all(&cmd).await;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fetches `path` from an admin listener every 100 ms until `stop`.
async fn scrape(port: u16, path: &'static str, stop: CancellationToken) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut body = Vec::new();
    while !stop.is_cancelled() {
        if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
            let _ = s.write_all(request.as_bytes()).await;
            body.clear();
            let _ = s.read_to_end(&mut body).await;
            assert!(body.starts_with(b"HTTP/1.1 200"), "admin {path} failed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway and one agent in `encoding`; returns the forward's address.
async fn tunnel(
    dir: &Path,
    encoding: &str,
    target: SocketAddr,
    metrics: bool,
    stop: CancellationToken,
) -> (Gateway, SocketAddr) {
    let name = format!("{encoding}{}", if metrics { "-metrics" } else { "" });
    let (gateway_admin, agent_admin) = (free_port(), free_port());
    let admin = |port: u16| match metrics {
        true => format!("\n  admin_addr: \"127.0.0.1:{port}\""),
        false => String::new(),
    };
    let cert = tls::generate_self_signed(&["localhost"]).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.cert_pem).unwrap();
    std::fs::write(&key_path, cert.key_pem).unwrap();
    let (gateway_port, forward_port) = (free_port(), free_port());
    let text = format!(
        r#"
gateway:
  listen_addr: "127.0.0.1:{gateway_port}"
  tls_cert: "{cert}"
  tls_key: "{key}"
  auth_username: agent
  auth_password: bench-secret
  forwards:
    - {{ listen_addr: "127.0.0.1:{forward_port}", target: "{target}" }}{gateway_admin}
client:
  gateway_addr: "localhost:{gateway_port}"
  gateway_tls_cert: "{cert}"
  client_id: bench
  auth_username: agent
  auth_password: bench-secret
  encoding: {encoding}
  max_concurrent_conns: 10000{agent_admin}
"#,
        cert = cert_path.display(),
        key = key_path.display(),
        gateway_admin = admin(gateway_admin),
        agent_admin = admin(agent_admin),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let gateway = Gateway::start(config.gateway.unwrap(), None).await.unwrap();
    let agent = Agent::new(config.client.unwrap()).unwrap();
    if metrics {
        agent.start_admin(stop.clone()).await.unwrap();
    }
    tokio::spawn(agent.run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.registry.is_empty() {
        assert!(Instant::now() < deadline, "the agent did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if metrics {
        for port in [gateway_admin, agent_admin] {
            tokio::spawn(scrape(port, "/metrics", stop.clone()));
            tokio::spawn(scrape(port, "/api/status", stop.clone()));
        }
    }
    (
        gateway,
        SocketAddr::from((Ipv4Addr::LOCALHOST, forward_port)),
    )
}

async fn download(to: SocketAddr) {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_u8(b'S').await.unwrap();
    s.write_u64(DOWNLOAD).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf).await.unwrap() {
            0 => break,
            n => got += n as u64,
        }
    }
    assert_eq!(got, DOWNLOAD);
}

async fn connect_round_trip(to: SocketAddr) {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"E").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
}

fn bench(c: &mut Criterion) {
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (ends, target) = rt.block_on(async {
        let target = target().await;
        let binary = tunnel(dir.path(), "binary", target, false, stop.clone()).await;
        let json = tunnel(dir.path(), "json", target, false, stop.clone()).await;
        let metered = tunnel(dir.path(), "binary", target, true, stop.clone()).await;
        ([binary, json, metered], target)
    });
    let routes = [
        ("direct", target),
        ("binary", ends[0].1),
        ("json", ends[1].1),
        ("binary+metrics", ends[2].1),
    ];

    let mut group = c.benchmark_group("tunnel/download");
    group.throughput(Throughput::Bytes(DOWNLOAD));
    group.sample_size(20);
    for (name, to) in routes {
        group.bench_function(name, |b| b.iter(|| rt.block_on(download(to))));
    }
    group.finish();

    let mut group = c.benchmark_group("tunnel/connect");
    for (name, to) in routes {
        group.bench_function(name, |b| b.iter(|| rt.block_on(connect_round_trip(to))));
    }
    group.finish();

    stop.cancel();
    rt.block_on(async {
        for (gateway, _) in ends {
            gateway.stop_within(Duration::from_secs(1)).await;
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
