//! PMProxy state in the cluster store: two policies (two gateways' worth: own config
//! dirs, own node ids) sharing one real Redis. Logins, tokens and quotas hold across
//! them, survive restarting both, and a Redis outage behaves as `on_store_failure`
//! says, recovering by itself. Every wait is bounded and generous; nothing is timed.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use anyproxy::cluster::Cluster;
use anyproxy::config::ClusterConfig;
use anyproxy::policy::managers::dwn_cons_r::FLUSH_BATCH;
use anyproxy::policy::{start_api, ApiHandle, Cmd, CmdCredentials, Policy, PolicyDir, Request};
use common::curl;
use common::redis::Redis;

const MANAGERS: &str = r#"
rules = "session ∧ quota"
admins = ["admin"]
jwtExpiration = "1h"
[mapDB]
name = "users"
userPass = { admin = "adminpw", alice = "alicepw", bob = "bobpw", carol = "carolpw" }
userGroups = { admin = ["staff"], alice = ["staff"], bob = ["staff"], carol = ["staff"] }
[[sessionIPM]]
name = "session"
auth = "users"
[[dwnConsR]]
name = "quota"
userDBN = "users"
resetCycle = "24h"
[dwnConsR.groupQuota]
staff = "8 MB"
"#;

const WAIT: Duration = Duration::from_secs(30);

fn cluster_config(url: &str, node: &str, mode: &str) -> ClusterConfig {
    toml::from_str(&format!(
        "redis = {url:?}\nnode_id = {node:?}\nkey_prefix = \"pmtest\"\nlease = \"3s\"\ntimeout = \"500ms\"\non_store_failure = {mode:?}\n"
    ))
    .unwrap()
}

struct Node {
    policy: Arc<Policy>,
    url: String,
    ca: String,
    stop: CancellationToken,
    handle: ApiHandle,
}

impl Node {
    async fn start(dir: &Path, redis_url: &str, node: &str, mode: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("managers.toml"), MANAGERS).unwrap();
        let mut d = PolicyDir::open_or_init(dir).unwrap();
        d.server.api.server.addr = "127.0.0.1:0".into();
        let cluster = Cluster::open(&cluster_config(redis_url, node, mode), node).unwrap();
        let policy = Arc::new(d.load_policy_in(Some(cluster)).unwrap());
        assert!(policy.is_clustered());
        let stop = CancellationToken::new();
        let handle = start_api(&d, policy.clone(), stop.clone()).await.unwrap();
        Node {
            url: format!("https://127.0.0.1:{}/api/cmd", handle.addr.port()),
            ca: d.cert_path().display().to_string(),
            policy,
            stop,
            handle,
        }
    }

    /// Stops the API and the store sync (which flushes once more).
    async fn stop(self) {
        self.stop.cancel();
        self.handle.join().await;
    }

    /// POST /api/cmd from the loopback address `from`.
    async fn cmd(&self, from: &str, body: Value) -> (u16, Value) {
        let body = body.to_string();
        let args = [
            "--cacert",
            &self.ca,
            "--noproxy",
            "*",
            "--interface",
            from,
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "--data-binary",
            &body,
            &self.url,
        ];
        let (code, out) = curl(&args).await;
        assert_eq!(code, 0, "curl failed");
        let text = String::from_utf8_lossy(&out).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap();
        let v = serde_json::from_str(body).unwrap_or(Value::Null);
        (status.parse().unwrap(), v)
    }

    async fn login(&self, from: &str, user: &str, pass: &str) -> String {
        let (s, v) = self
            .cmd(
                from,
                json!({"cmd": "open", "cred": {"user": user, "pass": pass}}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v.as_str().unwrap().to_string()
    }

    fn allows(&self, ip: &str) -> bool {
        self.policy.decide(&request(ip)).allow
    }

    fn used(&self, user: &str) -> u64 {
        self.policy
            .quota_usage(usize::MAX)
            .into_iter()
            .find(|u| u.user == user)
            .map_or(0, |u| u.used)
    }
}

fn request(ip: &str) -> Request<'static> {
    Request {
        client_ip: ip.parse::<IpAddr>().unwrap(),
        user: None,
        host: "example.com",
        port: 443,
        now: SystemTime::now(),
    }
}

/// Polls `f` until it holds, for at most [`WAIT`].
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const MIB: u64 = 1 << 20;
const QUOTA: u64 = 8 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_tokens_and_quotas_hold_across_nodes_and_restarts() {
    let redis = Redis::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a = Node::start(&tmp.path().join("a"), &redis.url(), "a", "open").await;
    let b = Node::start(&tmp.path().join("b"), &redis.url(), "b", "open").await;
    const ALICE: &str = "127.0.0.2";

    // A login through A is honoured by both data paths (B within its refresh period).
    let token = a.login(ALICE, "alice", "alicepw").await;
    assert!(a.allows(ALICE));
    eventually("B allows alice's address", || b.allows(ALICE)).await;
    // A's token verifies on B (same JWT key from the store), and B sees the session.
    let (s, v) = b.cmd(ALICE, json!({"cmd": "check", "secret": token})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = b
        .cmd(
            ALICE,
            json!({"cmd": "get", "manager": "session", "secret": token}),
        )
        .await;
    assert_eq!((s, v), (200, json!({ ALICE: "alice" })));

    // Renewed through B: the old token stops working on A too; the new one works.
    let (s, v) = b.cmd(ALICE, json!({"cmd": "renew", "secret": token})).await;
    assert_eq!(s, 200, "{v}");
    let renewed = v.as_str().unwrap().to_string();
    let (s, _) = a.cmd(ALICE, json!({"cmd": "check", "secret": token})).await;
    assert_eq!(s, 400);
    let (s, v) = a
        .cmd(ALICE, json!({"cmd": "check", "secret": renewed}))
        .await;
    assert_eq!(s, 200, "{v}");

    // A download through A reaches B's view by itself (a batch triggers A's flush,
    // B reads the totals back at its next period).
    let qa = a.policy.decide(&request(ALICE)).quota.unwrap();
    let qb = b.policy.decide(&request(ALICE)).quota.unwrap();
    qa.consume(2 * MIB).unwrap();
    eventually("B counts A's bytes", || b.used("alice") >= 2 * MIB).await;

    // Both nodes download in turns until one of them cuts: one quota for the cluster.
    let mut delivered = 2 * MIB;
    let mut cut = false;
    for i in 0..64 {
        let q = if i % 2 == 0 { &qa } else { &qb };
        match q.consume(MIB / 2) {
            Ok(()) => delivered += MIB / 2,
            Err(e) => {
                delivered += e.allowed;
                cut = true;
                break;
            }
        }
        // Each step waits until both nodes have flushed and read back (the periodic
        // sync would do the same within a period); the bound below holds without it.
        a.policy.sync_now().await.unwrap();
        b.policy.sync_now().await.unwrap();
    }
    assert!(cut, "the cluster never cut alice");
    assert!(
        (QUOTA..=QUOTA + 2 * FLUSH_BATCH).contains(&delivered),
        "delivered {delivered} for a quota of {QUOTA}"
    );
    eventually("both nodes refuse alice", || {
        !a.allows(ALICE) && !b.allows(ALICE)
    })
    .await;

    // Every gateway stops; fresh ones, with fresh config dirs (new local JWT keys, no
    // state files), take the state from the store.
    a.stop().await;
    b.stop().await;
    let c = Node::start(&tmp.path().join("c"), &redis.url(), "c", "open").await;
    let d = Node::start(&tmp.path().join("d"), &redis.url(), "d", "open").await;
    let (s, v) = d
        .cmd(ALICE, json!({"cmd": "check", "secret": renewed}))
        .await;
    assert_eq!(s, 200, "the old token on a new node: {v}");
    eventually(
        "the new nodes know alice's session and her spent quota",
        || {
            c.policy.decide(&request(ALICE)).consulted.first() == Some(&("session".into(), true))
                && !c.allows(ALICE)
                && !d.allows(ALICE)
                && d.used("alice") >= QUOTA
        },
    )
    .await;
    // An administrator gives the quota back on one node; both let alice through again.
    let admin = c.login("127.0.0.3", "admin", "adminpw").await;
    let (s, v) = c
        .cmd(
            "127.0.0.3",
            json!({"cmd": "set", "manager": "quota", "secret": admin, "string": "alice", "uint64": 0}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    eventually("both nodes allow alice again", || {
        c.allows(ALICE) && d.allows(ALICE)
    })
    .await;
    c.stop().await;
    d.stop().await;
}

fn open_cmd(user: &str, pass: &str, ip: &str) -> Cmd {
    Cmd {
        cmd: "open".into(),
        remote_addr: ip.into(),
        cred: Some(CmdCredentials {
            user: user.into(),
            pass: pass.into(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_follows_on_store_failure_and_recovers() {
    let mut redis = Redis::start().await;
    let url = redis.url();
    let tmp = tempfile::tempdir().unwrap();
    let closed = Node::start(&tmp.path().join("closed"), &url, "closed", "closed").await;
    let open = Node::start(&tmp.path().join("open"), &url, "open", "open").await;
    const ALICE: &str = "10.0.0.1";
    const BOB: &str = "10.0.0.2";
    const CAROL: &str = "10.0.0.3";

    closed
        .policy
        .cmd_async(open_cmd("alice", "alicepw", ALICE))
        .await
        .unwrap();
    eventually("the open node allows alice", || open.allows(ALICE)).await;

    redis.stop().await;
    // Closed: no logins without the store; the sessions it knows still decide.
    assert_eq!(
        closed.policy.cmd_async(open_cmd("bob", "bobpw", BOB)).await,
        Err(anyproxy::policy::CmdError::StoreUnavailable)
    );
    assert!(closed.allows(ALICE));
    assert!(!closed.allows(BOB));
    // Open: logins go on from this node's view, and quotas count locally.
    open.policy
        .cmd_async(open_cmd("bob", "bobpw", BOB))
        .await
        .unwrap();
    assert!(open.allows(BOB) && open.allows(ALICE));
    let q = open.policy.decide(&request(BOB)).quota.unwrap();
    q.consume(MIB).unwrap();
    assert!(open.policy.sync_now().await.is_err());

    // The store comes back (empty: this Redis keeps nothing on disk). The open node
    // replays bob's login and flushes his bytes; the closed node takes logins again.
    redis.restart().await;
    eventually(
        "the closed node sees bob's login made during the outage",
        || closed.allows(BOB),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        match closed
            .policy
            .cmd_async(open_cmd("carol", "carolpw", CAROL))
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no login after recovery: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("the open node allows carol", || open.allows(CAROL)).await;
    eventually("bob's bytes reached the closed node's view", || {
        closed.used("bob") >= MIB
    })
    .await;
    closed.stop().await;
    open.stop().await;
}
