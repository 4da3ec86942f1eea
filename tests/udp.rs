//! UDP through the tunnel, with real sockets: SOCKS5 UDP ASSOCIATE (DNS by address and
//! by name in both encodings, 10,000 datagrams reconciled with the drop counters, a
//! forbidden destination, foreign sources, the association's lifetime and its
//! descriptors), a UDP forward, an agent's own UDP port (`open_ports` with
//! `protocol: udp`) beside a TCP port of the same number, the idle timeout, and a flood
//! beside a TCP download.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::udp::*;
use common::*;

const ANSWER: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);

/// A stack with both admin listeners; returns it and their ports (gateway, agent).
async fn stack_with_admin(mut opts: StackOptions) -> (Stack, u16, u16) {
    let (gw_admin, agent_admin) = (free_port(), free_port());
    opts.gateway_extra
        .push(format!("admin_addr: \"127.0.0.1:{gw_admin}\""));
    opts.client_extra
        .push(format!("admin_addr: \"127.0.0.1:{agent_admin}\""));
    let stack = Stack::start(opts).await;
    wait_for_port(gw_admin).await;
    wait_for_port(agent_admin).await;
    (stack, gw_admin, agent_admin)
}

async fn metrics(port: u16) -> String {
    admin_get(port, "/metrics", None).await.1
}

async fn associate(stack: &Stack) -> Association {
    Association::open(stack.socks_port, SOCKS_USER, SOCKS_PASS)
        .await
        .expect("UDP ASSOCIATE accepted")
}

/// Polls `f` every 50 ms for at most 20 s until it holds.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_by_address_and_by_name_in_both_encodings() {
    let dns = dns_server(ANSWER).await;
    for encoding in ["binary", "json"] {
        let stack = Stack::start(StackOptions {
            encoding,
            ..Default::default()
        })
        .await;
        let a = associate(&stack).await;
        assert_eq!(
            a.relay.ip(),
            std::net::IpAddr::from([127, 0, 0, 1]),
            "bound on the listener's address"
        );
        let by_ip = Dest::Addr(dns.addr);
        assert_eq!(
            a.resolve(&by_ip, 7, "db.internal").await,
            Some(ANSWER),
            "{encoding}"
        );
        // By name: the gateway passes "localhost" to the agent, which resolves it.
        let by_name = Dest::Name("localhost".into(), dns.addr.port());
        assert_eq!(
            a.resolve(&by_name, 8, "web.internal").await,
            Some(ANSWER),
            "{encoding}"
        );
        // Several queries on one flow.
        for id in 9..20 {
            assert_eq!(a.resolve(&by_ip, id, "x.internal").await, Some(ANSWER));
        }
        drop(a);
        // Each flow's access line, on both sides, once the association ended.
        stack.wait_for_log("gateway", "socks5-udp", 2).await;
        stack.wait_for_log("agent", "agent-udp", 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_datagrams_of_mixed_sizes_reconcile_with_the_drop_counters() {
    const N: usize = 10_000;
    const MAX: usize = 1500;
    let echo = echo_server().await;
    let (stack, gw_admin, agent_admin) = stack_with_admin(StackOptions {
        gateway_extra: vec![format!("udp_max_datagram: {MAX}")],
        ..Default::default()
    })
    .await;
    let a = associate(&stack).await;
    let to = Dest::Addr(echo.addr);
    // Sizes from a fixed seed; every 50th is over the gateway's maximum (dropped and
    // counted as oversize), the rest carry their sequence number and a pattern.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let datagram = |seq: usize, len: usize| {
        let mut d = pattern(len.max(8), seq as u64);
        d[..8].copy_from_slice(&(seq as u64).to_be_bytes());
        d
    };
    let (mut sent, mut oversize, mut received) = (0usize, 0usize, 0usize);
    let mut seen = vec![false; N];
    // At most WINDOW datagrams in flight, so that no kernel buffer overflows unseen.
    const WINDOW: usize = 32;
    let mut stalled_at = None;
    while received + oversize < N {
        while sent < N && sent - received - oversize < WINDOW {
            let len = if sent % 50 == 49 {
                MAX + 1 + (next() % 500) as usize
            } else {
                8 + (next() % (MAX as u64 - 8)) as usize
            };
            a.send(&to, &datagram(sent, len)).await;
            if len > MAX {
                oversize += 1;
            }
            sent += 1;
        }
        match a.recv(Duration::from_secs(3)).await {
            Some((from, d)) => {
                assert_eq!(from, to);
                let seq = u64::from_be_bytes(d[..8].try_into().unwrap()) as usize;
                assert_eq!(d, datagram(seq, d.len()), "datagram {seq} arrived intact");
                assert!(!seen[seq], "datagram {seq} arrived twice");
                seen[seq] = true;
                received += 1;
            }
            None => {
                stalled_at = Some(received);
                break;
            }
        }
    }
    let gw = metrics(gw_admin).await;
    let agent = metrics(agent_admin).await;
    let dropped = |text: &str| metric(text, "anyproxy_udp_dropped_total", &[]) as usize;
    let counted = dropped(&gw) + dropped(&agent);
    assert_eq!(
        metric(&gw, "anyproxy_udp_dropped_total", &[("reason", "oversize")]) as usize,
        oversize
    );
    // Every datagram either came back or was counted as dropped, once each way at
    // most: a lost reply (agent → user) is counted where it was dropped too.
    assert_eq!(
        received + counted,
        N,
        "sent {N}, received {received}, counted drops {counted} (stalled at {stalled_at:?})\n{gw}"
    );
    assert!(metric(&agent, "anyproxy_udp_flows_opened_total", &[]) >= 1.0);
    assert_eq!(echo.received() as usize, N - counted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_destination_is_refused_and_foreign_sources_are_dropped() {
    let echo = echo_server().await;
    let (stack, gw_admin, _) = stack_with_admin(StackOptions {
        forbidden_hosts: vec!["blocked.test".into(), "10.255.0.0/16".into()],
        ..Default::default()
    })
    .await;
    let a = associate(&stack).await;
    // By name and by a forbidden network: the agent refuses before sending anything.
    for (i, dest) in [
        Dest::Name("blocked.test".into(), 53),
        Dest::Addr("10.255.0.1:53".parse().unwrap()),
    ]
    .iter()
    .enumerate()
    {
        for _ in 0..3 {
            a.send(dest, b"query").await;
        }
        assert!(a.recv(Duration::from_millis(500)).await.is_none());
        stack.wait_for_log("agent", "FORBIDDEN_HOST", i + 1).await;
        stack.wait_for_log("gateway", "FORBIDDEN_HOST", i + 1).await;
    }
    let log = stack.log("gateway");
    assert!(log.contains("blocked.test is a forbidden host"), "{log}");
    eventually("the refused datagrams are counted", || async {
        metric(
            &metrics(gw_admin).await,
            "anyproxy_udp_dropped_total",
            &[("reason", "refused")],
        ) >= 6.0
    })
    .await;

    // The client's first datagram fixed its address; another port of the same host
    // and another host's address are foreign.
    let to = Dest::Addr(echo.addr);
    a.send(&to, b"mine").await;
    assert_eq!(a.recv(Duration::from_secs(5)).await.unwrap().1, b"mine");
    let before = echo.received();
    let mut d = to.header();
    d.extend_from_slice(b"spoofed");
    for local in ["127.0.0.1:0", "127.0.0.2:0"] {
        let other = tokio::net::UdpSocket::bind(local).await.unwrap();
        other.send_to(&d, a.relay).await.unwrap();
    }
    // FRAG != 0 from the client itself is dropped as well.
    let mut frag = to.header();
    frag[2] = 1;
    frag.extend_from_slice(b"fragment");
    a.socket.send_to(&frag, a.relay).await.unwrap();
    eventually("foreign and fragmented datagrams are counted", || async {
        let m = metrics(gw_admin).await;
        metric(
            &m,
            "anyproxy_udp_dropped_total",
            &[("reason", "foreign_source")],
        ) >= 2.0
            && metric(
                &m,
                "anyproxy_udp_dropped_total",
                &[("reason", "fragmented")],
            ) >= 1.0
    })
    .await;
    a.send(&to, b"still mine").await;
    assert_eq!(
        a.recv(Duration::from_secs(5)).await.unwrap().1,
        b"still mine"
    );
    assert_eq!(
        echo.received(),
        before + 1,
        "nothing foreign reached the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_association_ends_with_its_control_connection_and_releases_its_sockets() {
    let echo = echo_server().await;
    let (stack, gw_admin, agent_admin) = stack_with_admin(StackOptions::default()).await;
    let gw_pid = stack.gateway.0.id().unwrap();
    let agent_pid = stack.agent.as_ref().unwrap().0.id().unwrap();
    // Warm up (lazily opened descriptors), then take the baseline.
    let warm = associate(&stack).await;
    warm.send(&Dest::Addr(echo.addr), b"w").await;
    warm.recv(Duration::from_secs(5)).await.unwrap();
    drop(warm);
    eventually("the warm-up flow ended", || async {
        metric(
            &metrics(agent_admin).await,
            "anyproxy_udp_flows_active",
            &[],
        ) == 0.0
    })
    .await;
    // The socket closes just after the flow counts as ended: let it go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (gw_base, agent_base) = (fd_count(gw_pid), fd_count(agent_pid));

    let mut assocs = Vec::new();
    for i in 0..20u8 {
        let a = associate(&stack).await;
        a.send(&Dest::Addr(echo.addr), &[i]).await;
        assert_eq!(a.recv(Duration::from_secs(5)).await.unwrap().1, [i]);
        assocs.push(a);
    }
    // A relay socket each on the gateway (beside the control connections), a UDP
    // socket each on the agent.
    assert!(
        fd_count(gw_pid) >= gw_base + 40,
        "{} vs {gw_base}",
        fd_count(gw_pid)
    );
    assert!(
        fd_count(agent_pid) >= agent_base + 20,
        "{} vs {agent_base}",
        fd_count(agent_pid)
    );
    let gw = metrics(gw_admin).await;
    assert_eq!(metric(&gw, "anyproxy_udp_flows_active", &[]), 20.0);

    let relays: Vec<SocketAddr> = assocs.iter().map(|a| a.relay).collect();
    drop(assocs);
    eventually("every socket is released", || async {
        fd_count(gw_pid) <= gw_base && fd_count(agent_pid) <= agent_base
    })
    .await;
    assert_eq!(
        metric(&metrics(gw_admin).await, "anyproxy_udp_flows_active", &[]),
        0.0
    );
    // The relay sockets are gone: their ports can be bound again.
    for r in relays {
        assert!(std::net::UdpSocket::bind(r).is_ok(), "{r} still bound");
    }
}

/// Sends `d` from `client` to `forward` until it comes back intact (the first datagram
/// may meet its flow still opening); at most 3 tries of 5 s.
async fn echoed(client: &tokio::net::UdpSocket, forward: SocketAddr, d: &[u8]) {
    let mut buf = vec![0u8; 65_536];
    for _ in 0..3 {
        client.send_to(d, forward).await.unwrap();
        if let Ok(Ok((n, from))) =
            tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf)).await
        {
            assert_eq!(from, forward);
            assert_eq!(&buf[..n], d);
            return;
        }
    }
    panic!("{} bytes never came back through {forward}", d.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_forward_carries_an_echo_and_an_idle_flow_ends_after_its_timeout() {
    let echo = echo_server().await;
    let forward_port = free_port();
    let (stack, gw_admin, agent_admin) = stack_with_admin(StackOptions {
        gateway_extra: vec![
            format!(
                "forwards: [{{ listen_addr: \"127.0.0.1:{forward_port}\", target: \"{}\", protocol: udp }}]",
                echo.addr
            ),
            "udp_idle_timeout: 1s".into(),
        ],
        client_extra: vec!["udp_idle_timeout: 1s".into()],
        ..Default::default()
    })
    .await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let forward: SocketAddr = ([127, 0, 0, 1], forward_port).into();
    let mut buf = vec![0u8; 65_536];
    for i in 0..50u32 {
        echoed(
            &client,
            forward,
            &pattern(100 + i as usize * 20, u64::from(i)),
        )
        .await;
    }
    // Silent now: the flow ends after its idle timeout on both sides.
    eventually("the idle flow ended", || async {
        metric(
            &metrics(agent_admin).await,
            "anyproxy_udp_flows_active",
            &[],
        ) == 0.0
            && metric(&metrics(gw_admin).await, "anyproxy_udp_flows_active", &[]) == 0.0
    })
    .await;
    stack.wait_for_log("gateway", "forward-udp", 1).await;
    let log = stack.log("agent");
    let line = log
        .lines()
        .find(|l| l.contains("agent-udp"))
        .expect("the agent's access line");
    assert!(line.contains("idle timeout"), "{line}");
    assert!(line.contains("dgrams_sent=50"), "{line}");
    // A new datagram opens a new flow.
    client.send_to(b"again", forward).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(&buf[..n], b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_off_on_the_listener_answers_command_not_supported_with_a_hint() {
    let stack = Stack::start(StackOptions {
        listener_extra: vec!["protocols: [tcp]".into()],
        ..Default::default()
    })
    .await;
    let refused = Association::open(stack.socks_port, SOCKS_USER, SOCKS_PASS)
        .await
        .err();
    assert_eq!(refused, Some(0x07));
    stack
        .wait_for_log("gateway", "proxy.socks5.protocols does not list udp", 1)
        .await;
    // TCP still works on it.
    let target = http_target().await;
    let (code, body) = curl(&[
        "--socks5",
        &stack.socks_auth(),
        &format!("http://{target}/"),
    ])
    .await;
    assert_eq!((code, body.as_slice()), (0, &b"hello"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_udp_in_its_protocols_refuses_naming_the_list() {
    let echo = echo_server().await;
    let stack = Stack::start(StackOptions {
        client_extra: vec!["protocols: [tcp]".into()],
        ..Default::default()
    })
    .await;
    let a = associate(&stack).await;
    a.send(&Dest::Addr(echo.addr), b"x").await;
    stack
        .wait_for_log("agent", "udp is not in this agent's protocols [tcp]", 1)
        .await;
    assert_eq!(echo.received(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_flow_leaves_a_tcp_download_on_the_same_session_intact() {
    let echo = echo_server().await;
    let stack = Stack::start(StackOptions::default()).await;
    let target = http_target().await;
    let a = associate(&stack).await;
    let to = Dest::Addr(echo.addr);
    // Open the flow, then flood it from a task for as long as the download runs.
    a.send(&to, b"open").await;
    a.recv(Duration::from_secs(5))
        .await
        .expect("the flow is open");
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = {
        let stop = stop.clone();
        let mut d = to.header();
        d.extend_from_slice(&[0xab; 1200]);
        let relay = a.relay;
        let socket = a.socket;
        tokio::spawn(async move {
            let mut sent = 0u64;
            // Bounded in count and time.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.is_cancelled() && sent < 5_000_000 && Instant::now() < deadline {
                for _ in 0..64 {
                    let _ = socket.send_to(&d, relay).await;
                    sent += 1;
                }
                tokio::task::yield_now().await;
            }
            sent
        })
    };
    let size = 32 << 20;
    let (code, body) = curl(&[
        "-s",
        "--max-time",
        "120",
        "-x",
        &stack.http_proxy(),
        &format!("http://{target}/bytes/{size}"),
    ])
    .await;
    stop.cancel();
    let sent = flood.await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(body.len(), size);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(size, 7)));
    assert!(sent > 0);
    drop(a.control);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_caps_count_udp_flows() {
    let echo = echo_server().await;
    let dns = dns_server(ANSWER).await;
    let stack = Stack::start(StackOptions {
        gateway_extra: vec!["limits: { per_user: { max_concurrent: 1 } }".into()],
        ..Default::default()
    })
    .await;
    let a = associate(&stack).await;
    a.send(&Dest::Addr(echo.addr), b"one").await;
    assert_eq!(a.recv(Duration::from_secs(5)).await.unwrap().1, b"one");
    // A second destination is a second flow: over the user's cap.
    a.send(&Dest::Addr(dns.addr), &dns_query(1, "x.internal"))
        .await;
    stack
        .wait_for_log("gateway", "user suser has 1 connections open (limit 1)", 1)
        .await;
    // The first flow still works, and once it is gone the place is free again.
    a.send(&Dest::Addr(echo.addr), b"two").await;
    assert_eq!(a.recv(Duration::from_secs(5)).await.unwrap().1, b"two");
    drop(a);
    // The refused flow's line and the first flow's, written when it ended.
    stack.wait_for_log("gateway", "socks5-udp", 2).await;
    let b = associate(&stack).await;
    assert_eq!(
        b.resolve(&Dest::Addr(dns.addr), 2, "y.internal").await,
        Some(ANSWER)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_own_udp_port_carries_an_echo_beside_its_tcp_twin_and_goes_with_the_agent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_server().await;
    let tcp = echo_target().await;
    let port = free_port();
    let (mut stack, gw_admin, agent_admin) = stack_with_admin(StackOptions {
        gateway_extra: vec![
            format!("agent_forwards: {{ bind: 127.0.0.1, ports: \"{port}-{port}\" }}"),
            "udp_idle_timeout: 1s".into(),
        ],
        client_extra: vec![format!(
            "open_ports:\n    - {{ remote_port: {port}, target: \"{}\", protocol: udp }}\n    - {{ remote_port: {port}, target: \"{tcp}\" }}",
            echo.addr
        )],
        ..Default::default()
    })
    .await;
    // One port number, both protocols: two forwards, each answered with its protocol.
    stack.wait_for_log("agent", "gateway forward open", 2).await;
    let log = stack.log("agent");
    assert!(
        log.contains(&format!("listening on 127.0.0.1:{port}/udp")),
        "{log}"
    );

    let forward: SocketAddr = ([127, 0, 0, 1], port).into();
    let (a, b) = (
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    for i in 0..50u32 {
        echoed(&a, forward, &pattern(64 + i as usize * 30, u64::from(i))).await;
    }
    // Another client address is another flow, through the same agent.
    echoed(&b, forward, b"second client").await;
    // At least: a reply slower than 5 s on a loaded machine is sent again, and a
    // flow that idled out (1 s) between two datagrams opens again.
    assert!(echo.received() >= 51);
    assert!(
        metric(
            &metrics(agent_admin).await,
            "anyproxy_udp_flows_opened_total",
            &[]
        ) >= 2.0
    );
    // The TCP twin on the same number still carries its stream.
    let mut s = tokio::net::TcpStream::connect(forward).await.unwrap();
    s.write_all(b"tcp twin").await.unwrap();
    let mut back = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("the TCP twin echoes")
        .unwrap();
    assert_eq!(&back, b"tcp twin");
    drop(s);
    // Idle flows end after the gateway's timeout, each with its access line.
    eventually("the idle flows ended", || async {
        metric(&metrics(gw_admin).await, "anyproxy_udp_flows_active", &[]) == 0.0
    })
    .await;
    stack.wait_for_log("gateway", "forward-udp", 2).await;

    // The agent leaves: its UDP port is released with its session.
    drop(stack.agent.take());
    eventually("the UDP port is free again", || async {
        std::net::UdpSocket::bind(forward).is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_decides_each_udp_flow_and_its_quota_ends_the_flow_that_crosses_it() {
    let echo = echo_server().await;
    let blocked = dns_server(ANSWER).await;
    // suser may reach anything but the blocked port while under a 64 KiB quota.
    let dir = policy_dir(blocked.addr.port(), "64 KB", free_port());
    let (stack, gw_admin, _) = stack_with_admin(StackOptions {
        gateway_extra: vec![format!("policy: {{ dir: \"{}\" }}", dir.path().display())],
        ..Default::default()
    })
    .await;
    let failed = |m: &str| {
        metric(
            m,
            "anyproxy_gateway_connections_failed_total",
            &[("reason", "forbidden")],
        )
    };
    let a = associate(&stack).await;
    // The rule denies the blocked port: no datagram reaches it, the refusal is logged
    // with the policy's verdict and counted like a TCP one.
    a.send(&Dest::Addr(blocked.addr), &dns_query(1, "x.internal"))
        .await;
    stack.wait_for_log("gateway", "denied by policy", 1).await;
    assert_eq!(failed(&metrics(gw_admin).await), 1.0);
    assert_eq!(blocked.received(), 0);

    // Allowed: replies count against suser's 64 KiB (65,536 B) quota. 65 replies of
    // 1000 B fit; the 66th does not, and is never cut: the flow ends there.
    let to = Dest::Addr(echo.addr);
    let mut received = 0;
    'sending: for i in 0..100u64 {
        a.send(&to, &pattern(1000, i)).await;
        // A slow reply on a loaded machine is waited for (up to 5 × 3 s); silence
        // ends the loop once the gateway cut the flow at the quota.
        for _ in 0..5 {
            if let Some((_, d)) = a.recv(Duration::from_secs(3)).await {
                assert_eq!(d, pattern(1000, i));
                received += 1;
                continue 'sending;
            }
            if stack.log("gateway").contains("download quota") {
                break 'sending;
            }
        }
        panic!("datagram {i} never came back and no quota was reached");
    }
    assert_eq!(received, 65, "{}", stack.log("gateway"));
    stack.wait_for_log("gateway", "download quota", 1).await;
    let m = metrics(gw_admin).await;
    assert_eq!(
        metric(&m, "anyproxy_udp_dropped_total", &[("reason", "quota")]),
        1.0
    );
    // The flow's access line carries the verdict and why it ended.
    stack.wait_for_log("gateway", "socks5-udp", 2).await;
    let log = stack.log("gateway");
    let line = log
        .lines()
        .find(|l| l.contains("socks5-udp") && l.contains("download quota exceeded"))
        .unwrap_or_else(|| panic!("the quota's access line:\n{log}"));
    assert!(line.contains("allow("), "{line}");
    assert!(line.contains("dgrams_received=65"), "{line}");

    // With the quota spent the rule is false: a new flow is refused up front.
    drop(a);
    let b = associate(&stack).await;
    b.send(&to, b"after the quota").await;
    stack.wait_for_log("gateway", "denied by policy", 2).await;
    assert!(b.recv(Duration::from_millis(500)).await.is_none());
    assert_eq!(failed(&metrics(gw_admin).await), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_forwards_flows_count_under_the_address_cap_and_its_bytes_are_paced() {
    let echo = echo_server().await;
    let forward_port = free_port();
    let (stack, gw_admin, _) = stack_with_admin(StackOptions {
        gateway_extra: vec![
            format!(
                "forwards: [{{ listen_addr: \"127.0.0.1:{forward_port}\", target: \"{}\", protocol: udp }}]",
                echo.addr
            ),
            "limits: { per_ip: { max_concurrent: 1 }, bandwidth: { per_group: { default: 50KiB/s } } }"
                .into(),
        ],
        ..Default::default()
    })
    .await;
    let forward: SocketAddr = ([127, 0, 0, 1], forward_port).into();
    let first = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    echoed(&first, forward, b"first").await;
    // Another port of the same address is another flow: over the address's cap.
    let second = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    second.send_to(b"second", forward).await.unwrap();
    stack
        .wait_for_log(
            "gateway",
            "address 127.0.0.1 has 1 connections open (limit 1)",
            1,
        )
        .await;
    eventually("the capped flow is counted", || async {
        metric(
            &metrics(gw_admin).await,
            "anyproxy_gateway_connections_failed_total",
            &[("reason", "rate_limited")],
        ) == 1.0
    })
    .await;

    // 100 datagrams of 1000 B each way are 200,000 B of the group's 50 KiB/s budget
    // (a tenth of a second of burst): at least 3.7 s however fast the machine is.
    // Only the lower bound is asserted; a loaded machine only makes it longer.
    let started = Instant::now();
    for i in 0..100u64 {
        echoed(&first, forward, &pattern(1000, i)).await;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3000),
        "200,000 B through a 50 KiB/s budget in {took:?}"
    );
}
