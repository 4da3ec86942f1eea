//! JSON mode (the document's protocol, no flow control) with a user or a target that
//! stops reading: the session reader never waits for one connection, so everyone else
//! on the same agent keeps being served, and the stalled connection alone is closed
//! once its queue outgrows `json_conn_buffer`, with its reason logged.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Far beyond every wait below: a reader that waited for the stalled connection would
/// hang the test, not be rescued by the timeout.
const FAR: &str = "stall_timeout: 300s";

/// A JSON-mode stack with the stall grace far away; `gateway_extra` adds gateway keys.
async fn json_stack(gateway_extra: Vec<String>) -> Stack {
    let mut gateway = vec![FAR.to_string()];
    gateway.extend(gateway_extra);
    Stack::start(StackOptions {
        encoding: "json",
        gateway_extra: gateway,
        client_extra: vec![FAR.to_string()],
        ..StackOptions::default()
    })
    .await
}

/// Accepts connections and never reads them; counts accepted connections.
async fn deaf_target(accepted: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::Relaxed);
            held.push(s);
        }
    });
    addr
}

/// Other users of the same agent: five new requests, each answered in full.
async fn others_are_served(stack: &Stack, plain: SocketAddr) {
    let proxy = stack.http_proxy();
    for i in 0..5 {
        let (code, body) = curl(&["-x", &proxy, &format!("http://{plain}/bytes/100000")]).await;
        assert_eq!(code, 0, "request {i} of another user was not served");
        assert_eq!(body, pattern(100_000, 7), "request {i}");
    }
}

/// Reads until the stream ends: the error, or `None` for a clean end of stream.
async fn read_to_the_end(s: &mut TcpStream) -> Option<std::io::Error> {
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e) => return Some(e),
            }
        }
    });
    end.await.expect("the stalled connection ends once read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_stops_reading_costs_only_themselves() {
    let admin = free_port();
    let stack = json_stack(vec![format!("admin_addr: \"127.0.0.1:{admin}\"")]).await;
    let plain = http_target().await;
    // Served before anything stalls, so a failure below is the stall's.
    others_are_served(&stack, plain).await;

    // One user opens a download of up to 1 GiB through the HTTP proxy and never reads.
    let written = Arc::new(AtomicU64::new(0));
    let hose = firehose_target(written.clone(), Arc::new(pattern(1 << 20, 5))).await;
    let mut stalled = http_connect_as(&stack, HTTP_USER, HTTP_PASS, hose).await;
    let held = wait_until_still(&written).await;
    assert!(held > 0, "the stalled connection never carried anything");

    // Everyone else on that agent is still served.
    others_are_served(&stack, plain).await;

    // The stalled connection was closed by its queue cap (twice json_conn_buffer: the
    // target pours in far more), with the reason in the log, the access log and the
    // counter; the target was not drained into memory.
    stack
        .wait_for_log(
            "gateway",
            "closing a connection whose local side stopped reading",
            1,
        )
        .await;
    stack
        .wait_for_log("gateway", "stalled: the local side stopped reading", 1)
        .await;
    assert!(held < 256 << 20, "{held} bytes left the target");
    let (status, metrics) = admin_get(admin, "/metrics", None).await;
    assert_eq!(status, "200");
    assert_eq!(
        metric(&metrics, "anyproxy_tunnel_json_stall_closes_total", &[]),
        1.0,
        "{metrics}"
    );
    // The user learns that the stream was cut, not that it ended.
    let end = read_to_the_end(&mut stalled).await;
    assert!(end.is_some(), "a clean end of stream after the stall close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_stops_reading_costs_only_itself() {
    let stack = json_stack(vec![]).await;
    let plain = http_target().await;
    let accepted = Arc::new(AtomicU64::new(0));
    let deaf = deaf_target(accepted.clone()).await;

    // One user uploads to a target that never reads: the agent's side stalls.
    let mut uploader = socks5_stream(
        stack.socks_port,
        SOCKS_USER,
        SOCKS_PASS,
        "127.0.0.1",
        deaf.port(),
    )
    .await
    .expect("socks5 connect");
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    let upload = tokio::spawn(async move {
        let block = pattern(1 << 20, 9);
        for _ in 0..256 {
            if uploader.write_all(&block).await.is_err() {
                return;
            }
            counted.fetch_add(block.len() as u64, Ordering::Relaxed);
        }
    });
    let pushed = wait_until_still(&sent).await;
    assert!(pushed > 0, "the upload never started");
    assert_eq!(accepted.load(Ordering::Relaxed), 1);

    others_are_served(&stack, plain).await;

    // The agent closed that one connection with its reason.
    stack
        .wait_for_log(
            "agent",
            "closing a connection whose local side stopped reading",
            1,
        )
        .await;
    stack
        .wait_for_log("agent", "stalled: the local side stopped reading", 1)
        .await;
    upload.abort();
}

/// iperf3's shape: a data connection uploads while a control connection talks at the
/// end. The target stops reading the data connection when the control says the test
/// ended (iperf3's server does), with megabytes of the upload still in the tunnel; the
/// control connection's exchange that follows must still get through.
async fn iperf_like_target() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut control, _) = listener.accept().await.unwrap();
        let (mut data, _) = listener.accept().await.unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let counted = received.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    r = data.read(&mut buf) => match r {
                        Ok(n) if n > 0 => {
                            counted.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        _ => break,
                    },
                }
            }
            data
        });
        let mut word = [0u8; 3];
        control.read_exact(&mut word).await.unwrap();
        assert_eq!(&word, b"END");
        // Stop reading the data connection, keep it open, and exchange results.
        let _ = stop.send(());
        let _held_open = reading.await.unwrap();
        control.write_all(b"RES?").await.unwrap();
        let mut theirs = [0u8; 6];
        control.read_exact(&mut theirs).await.unwrap();
        let ours = format!("{:020}", received.load(Ordering::Relaxed));
        control.write_all(ours.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let _ = control.read_to_end(&mut rest).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_receiver_stops_at_the_end_still_finishes_its_exchange() {
    let stack = json_stack(vec![]).await;
    let target = iperf_like_target().await;
    let open = || {
        socks5_stream(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "127.0.0.1",
            target.port(),
        )
    };
    // The SOCKS5 answer comes after the agent reached the target, so the target
    // accepts the control connection first.
    let mut control = open().await.expect("control connection");
    let data = open().await.expect("data connection");
    // Like iperf3's client, the data connection is written flat out; the control says
    // the end while megabytes of it are still on their way.
    let written = Arc::new(AtomicU64::new(0));
    let counted = written.clone();
    let writer = tokio::spawn(async move {
        let mut data = data;
        let block = pattern(1 << 20, 13);
        for _ in 0..512 {
            if data.write_all(&block).await.is_err() {
                return;
            }
            counted.fetch_add(block.len() as u64, Ordering::Relaxed);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while written.load(Ordering::Relaxed) < 16 << 20 {
        assert!(Instant::now() < deadline, "the upload did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    control.write_all(b"END").await.unwrap();
    let exchange = async {
        let mut ask = [0u8; 4];
        control.read_exact(&mut ask).await.unwrap();
        assert_eq!(&ask, b"RES?");
        control.write_all(b"CLIENT").await.unwrap();
        let mut theirs = [0u8; 20];
        control.read_exact(&mut theirs).await.unwrap();
        String::from_utf8_lossy(&theirs)
            .trim_start_matches('0')
            .to_string()
    };
    let received = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .expect("the control exchange after the end of the upload got through");
    eprintln!("target received {received} bytes of the upload before it stopped reading");
    writer.abort();
}

/// Accepts one connection per upload: reads an 8-byte length, then that many bytes,
/// comparing them with `expected` as they come (a plain compare, so that the sink reads
/// faster than the tunnel delivers even in a debug build), and answers `"<n> ok\n"`,
/// or where the first difference was (JSON mode has no half-close to end an upload).
async fn checking_sink(expected: Arc<Vec<u8>>) -> SocketAddr {
    paced_checking_sink(expected, None).await
}

/// [`checking_sink`], reading at most `(bytes, pause)` at a time when paced: a reader
/// that is slower than the tunnel but never stops.
async fn paced_checking_sink(
    expected: Arc<Vec<u8>>,
    pace: Option<(usize, Duration)>,
) -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let expected = expected.clone();
            tokio::spawn(async move {
                let Ok(len) = s.read_u64().await else { return };
                let len = (len as usize).min(expected.len());
                let mut at = 0;
                let mut buf = vec![0u8; pace.map_or(256 * 1024, |(n, _)| n)];
                let mut verdict = "ok".to_string();
                while at < len {
                    let want = buf.len().min(len - at);
                    match s.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if verdict == "ok" && buf[..n] != expected[at..at + n] {
                                verdict = format!("differs within {at}..{}", at + n);
                            }
                            at += n;
                            if let Some((_, pause)) = pace {
                                tokio::time::sleep(pause).await;
                            }
                        }
                    }
                }
                let _ = s.write_all(format!("{at} {verdict}\n").as_bytes()).await;
            });
        }
    });
    addr
}

/// Uploads `upload` to a checking sink through SOCKS5 and returns the sink's answer.
async fn upload_to(stack: &Stack, sink: SocketAddr, upload: &[u8]) -> String {
    let mut s = socks5_stream(
        stack.socks_port,
        SOCKS_USER,
        SOCKS_PASS,
        "127.0.0.1",
        sink.port(),
    )
    .await
    .expect("socks5 connect");
    s.write_u64(upload.len() as u64).await.unwrap();
    if let Err(e) = s.write_all(upload).await {
        panic!("the upload was cut ({e}):\n{}", stack.log("agent"));
    }
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), s.read_to_string(&mut answer));
    let _ = read.await.expect("the sink answers");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_upload_through_a_json_agent_arrives_whole() {
    let stack = json_stack(vec![]).await;
    const N: usize = 64 << 20;
    let upload = Arc::new(pattern(N, 21));
    let sink = checking_sink(upload.clone()).await;
    for round in 0..2 {
        let answer = upload_to(&stack, sink, &upload).await;
        assert_eq!(answer, format!("{N} ok\n"), "round {round}");
    }
    assert!(
        !stack.log("agent").contains("stopped reading"),
        "a sink that reads was taken for a stalled one:\n{}",
        stack.log("agent")
    );
}

/// A small cap and a short grace, so that a slow reader spends many graces over the cap.
const TIGHT: [&str; 2] = ["json_conn_buffer: 256KiB", "stall_timeout: 2s"];

fn tight_stack_options() -> StackOptions {
    let tight: Vec<String> = TIGHT.iter().map(|s| s.to_string()).collect();
    StackOptions {
        encoding: "json",
        gateway_extra: tight.clone(),
        client_extra: tight,
        ..StackOptions::default()
    }
}

/// A reader slower than the tunnel but always moving is backpressured, never cut: its
/// queue stays past the cap for many graces, and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_keeps_reading_is_never_cut() {
    let stack = Stack::start(tight_stack_options()).await;
    // Download: curl reads at 1 MB/s, the target writes as fast as the tunnel takes it.
    let plain = http_target().await;
    const DOWN: usize = 6 << 20;
    let (code, body) = curl(&[
        "--limit-rate",
        "1M",
        "-x",
        &stack.http_proxy(),
        &format!("http://{plain}/bytes/{DOWN}"),
    ])
    .await;
    assert_eq!(
        code,
        0,
        "the slow download was cut:\n{}",
        stack.log("gateway")
    );
    assert!(
        body == pattern(DOWN, 7),
        "the slow download arrived altered"
    );
    // Upload: the target reads 32 KiB every 10 ms.
    const UP: usize = 6 << 20;
    let upload = Arc::new(pattern(UP, 22));
    let pace = Some((32 << 10, Duration::from_millis(10)));
    let sink = paced_checking_sink(upload.clone(), pace).await;
    let answer = upload_to(&stack, sink, &upload).await;
    assert_eq!(answer, format!("{UP} ok\n"), "{}", stack.log("agent"));
    for side in ["gateway", "agent"] {
        assert!(
            !stack.log(side).contains("stopped reading"),
            "a slow reader was taken for a stalled one:\n{}",
            stack.log(side)
        );
    }
}
