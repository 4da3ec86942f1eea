//! A user's bandwidth budget across two gateways sharing one real `redis-server`:
//! downloads through both at once move no more than the one budget (plus the burst
//! bound of the leases), where two gateways with budgets of their own would move
//! about twice as much.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::{Node, NodeSpec};
use common::redis::Redis;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RATE: u64 = 1 << 20; // 1 MiB/s, as configured below
const SLICE: f64 = 0.1; // the default budget_slice
const NODES: u64 = 2;
const FOR: Duration = Duration::from_secs(4);

/// A target that sends as fast as it is read, to every connection.
async fn fast_target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

/// Bytes downloaded through `node` from `start` until `start + FOR`.
async fn download(node: &Node, target: SocketAddr, start: Instant) -> u64 {
    let mut s = node.socks(target).await.expect("admitted");
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let deadline = tokio::time::Instant::from_std(start + FOR);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return total,
            Ok(Ok(n)) => total += n as u64,
        }
    }
}

/// Starts two gateways and downloads through both at once as one user; returns the
/// bytes through each.
async fn two_downloads(redis: &str, certs: &Certs, names: [&str; 2], shared: bool) -> [u64; 2] {
    let limits = "    bandwidth: { per_user: 1MiB/s }";
    // Budgets of their own: each gateway under a key prefix of its own.
    let prefixes = names.map(|n| format!("    key_prefix: {n}"));
    let spec = |i: usize| NodeSpec {
        name: names[i],
        redis,
        certs,
        limits,
        on_store_failure: "open",
        cluster_extra: if shared { "" } else { &prefixes[i] },
    };
    let a = Node::start(spec(0)).await;
    let b = Node::start(spec(1)).await;
    let target = fast_target().await;
    let start = Instant::now();
    let (through_a, through_b) =
        tokio::join!(download(&a, target, start), download(&b, target, start));
    for node in [&a, &b] {
        let m = node.metrics().await;
        assert_eq!(
            metric(&m, "anyproxy_cluster_decisions_without_store_total", &[]),
            0.0,
            "the store answered every lease"
        );
        assert!(metric(&m, "anyproxy_limit_paced_total", &[("scope", "user")]) >= 1.0);
    }
    [through_a, through_b]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_budget_holds_across_two_gateways() {
    let redis = Redis::start().await;
    let certs = certs();
    let url = redis.url();

    let [a, b] = two_downloads(&url, &certs, ["gw-a", "gw-b"], true).await;
    // The bound (README, ARCHITECTURE.md): rate × t + (nodes + 1) slices. A loaded
    // machine only moves less; the 25 % covers the start of each download falling a
    // little before the clock that timed it.
    let slice = RATE as f64 * SLICE;
    let bound = RATE as f64 * FOR.as_secs_f64() * 1.25 + (NODES + 1) as f64 * slice;
    let total = (a + b) as f64;
    eprintln!(
        "shared budget: {a} + {b} = {total} bytes in {FOR:?} (bound {bound:.0}, budget {})",
        RATE * FOR.as_secs()
    );
    assert!(a > 0 && b > 0, "both gateways moved bytes: {a}, {b}");
    assert!(
        total <= bound,
        "{total} bytes through two gateways, over the bound of {bound:.0}"
    );

    // For contrast (not asserted: a loaded machine may move less): budgets of their
    // own let the same user move up to twice the budget.
    let [c, d] = two_downloads(&url, &certs, ["gw-c", "gw-d"], false).await;
    eprintln!(
        "budgets of their own: {c} + {d} = {} bytes in {FOR:?}",
        c + d
    );
}
