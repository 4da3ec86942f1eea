//! Several gateways sharing one real `redis-server` (`gateway.cluster`): connection
//! caps and lockouts hold across them, a killed gateway's slots come back within the
//! lease, the cluster view lists every node, and a store outage is survived as
//! `on_store_failure` says and recovered from without a restart.

mod common;

use std::time::Duration;

use common::cluster::{eventually, node_names, Node, NodeSpec};
use common::redis::Redis;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echoes(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 5];
    s.write_all(b"hello").await.is_ok()
        && matches!(
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == b"hello"
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cap_and_a_lockout_hold_across_three_gateways_and_a_dead_one_frees_its_slots() {
    let redis = Redis::start().await;
    let certs = certs();
    let limits = "    per_user: { max_concurrent: 3 }\n    proxy_auth: { max_failures: 3, window: 60s, lockout: 60s }";
    let url = redis.url();
    let spec = |name| NodeSpec {
        name,
        redis: &url,
        certs: &certs,
        limits,
        on_store_failure: "open",
        cluster_extra: "",
    };
    let a = Node::start(spec("gw-a")).await;
    let b = Node::start(spec("gw-b")).await;
    let mut c = Node::start(spec("gw-c")).await;
    let target = echo_target().await;

    // Every node lists every node, each with its agent (as of each one's latest
    // heartbeat, a third of the lease apart).
    let each_with_its_agent = |s: &serde_json::Value| {
        s["cluster"]["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().all(|n| {
                n["agents"][0]["client_id"].as_str()
                    == n["node_id"]
                        .as_str()
                        .map(|id| format!("agent-{id}"))
                        .as_deref()
            })
        })
    };
    let status = eventually(
        Duration::from_secs(20),
        "three nodes in the view",
        || async {
            let s = a.status().await;
            (node_names(&s) == ["gw-a", "gw-b", "gw-c"] && each_with_its_agent(&s)).then_some(s)
        },
    )
    .await;
    assert_eq!(status["cluster"]["store_up"], true);

    // Three held connections, one through each gateway: the cap of 3 is reached.
    let mut held_a = a.socks(target).await.expect("first, through A");
    let mut held_b = b.socks(target).await.expect("second, through B");
    let mut held_c = c.socks(target).await.expect("third, through C");
    for node in [&a, &b, &c] {
        let refused = node.socks(target).await.err();
        assert!(
            matches!(refused, Some(Socks5Refusal::Reply(_))),
            "a fourth is refused by every gateway: {refused:?}"
        );
    }
    assert!(
        a.log()
            .contains("user suser has 3 connections open (limit 3) (across the cluster)"),
        "{}",
        a.log()
    );
    assert!(echoes(&mut held_a).await && echoes(&mut held_c).await);

    // One ends: a place is free again, on another gateway.
    drop(held_a);
    let mut again = eventually(Duration::from_secs(10), "a freed place", || async {
        b.socks(target).await.ok()
    })
    .await;
    assert!(echoes(&mut again).await);

    // C dies holding a place: it comes back once C's lease ends (3 s + 1 s).
    c.gateway.0.start_kill().unwrap();
    let _ = c.gateway.0.wait().await;
    drop(held_c);
    let mut after_death = eventually(Duration::from_secs(20), "the dead node's place", || async {
        a.socks(target).await.ok()
    })
    .await;
    assert!(echoes(&mut after_death).await && echoes(&mut held_b).await);
    let status = eventually(Duration::from_secs(20), "C out of the view", || async {
        let s = b.status().await;
        (node_names(&s) == ["gw-a", "gw-b"]).then_some(s)
    })
    .await;
    assert_eq!(status["cluster"]["store_up"], true);

    // Three wrong passwords through A lock this address out on B too.
    drop((again, after_death, held_b));
    for _ in 0..3 {
        assert_eq!(
            a.socks_as("wrong", target).await.err(),
            Some(Socks5Refusal::Auth(1))
        );
    }
    assert_eq!(
        b.socks(target).await.err(),
        Some(Socks5Refusal::Auth(1)),
        "the right password through B is refused while locked out"
    );
    b.wait_for_log("too many failed proxy authentications")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_is_decided_as_configured_and_recovered_from() {
    let mut redis = Redis::start().await;
    let certs = certs();
    let url = redis.url();
    let limits = "    per_user: { max_concurrent: 5 }";
    let open = Node::start(NodeSpec {
        name: "gw-open",
        redis: &url,
        certs: &certs,
        limits,
        on_store_failure: "open",
        cluster_extra: "",
    })
    .await;
    let closed = Node::start(NodeSpec {
        name: "gw-closed",
        redis: &url,
        certs: &certs,
        limits,
        on_store_failure: "closed",
        cluster_extra: "",
    })
    .await;
    let target = echo_target().await;
    let store_up = |text: &str| metric(text, "anyproxy_cluster_store_up", &[]);
    assert!(open.socks(target).await.is_ok() && closed.socks(target).await.is_ok());
    assert_eq!(store_up(&open.metrics().await), 1.0);

    redis.stop().await;
    eventually(Duration::from_secs(20), "the outage noticed", || async {
        (store_up(&closed.metrics().await) == 0.0).then_some(())
    })
    .await;
    let mut s = open
        .socks(target)
        .await
        .expect("open: admitted on this node's own caps");
    assert!(echoes(&mut s).await);
    assert!(
        matches!(
            closed.socks(target).await.err(),
            Some(Socks5Refusal::Reply(_))
        ),
        "closed: refused without the store"
    );
    for node in [&open, &closed] {
        let m = node.metrics().await;
        assert!(metric(&m, "anyproxy_cluster_decisions_without_store_total", &[]) >= 1.0);
        assert!(metric(&m, "anyproxy_cluster_store_errors_total", &[]) >= 1.0);
    }
    closed.wait_for_log("cluster store unreachable").await;

    redis.restart().await;
    eventually(Duration::from_secs(30), "the store back", || async {
        (store_up(&closed.metrics().await) == 1.0 && closed.socks(target).await.is_ok())
            .then_some(())
    })
    .await;
    closed.wait_for_log("cluster store reachable again").await;
    // The restarted store was empty: the nodes registered themselves again.
    eventually(
        Duration::from_secs(20),
        "both nodes in the view again",
        || async { (node_names(&open.status().await) == ["gw-closed", "gw-open"]).then_some(()) },
    )
    .await;
    assert_eq!(
        open.log().matches("cluster store unreachable").count(),
        1,
        "logged once per transition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_rate_holds_across_gateways() {
    let redis = Redis::start().await;
    let certs = certs();
    let url = redis.url();
    // Two at once, then one per 100 s: the third within the test is always refused.
    let limits = "    per_user: { rate: 0.01, burst: 2 }";
    let spec = |name| NodeSpec {
        name,
        redis: &url,
        certs: &certs,
        limits,
        on_store_failure: "open",
        cluster_extra: "",
    };
    let a = Node::start(spec("gw-a")).await;
    let b = Node::start(spec("gw-b")).await;
    let target = echo_target().await;
    let first = a.socks(target).await.expect("the burst, through A");
    let second = b.socks(target).await.expect("the burst, through B");
    drop((first, second));
    for node in [&a, &b] {
        assert!(
            matches!(
                node.socks(target).await.err(),
                Some(Socks5Refusal::Reply(_))
            ),
            "the burst is spent across the cluster"
        );
    }
    a.wait_for_log("faster than").await;
    a.wait_for_log("across the cluster").await;
}
