//! Binary mode's flow control and half-close, end to end through the real binaries.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads the whole request (until the client shuts its write side), then answers with
/// `"<len> <sha256>\n"` followed by `RESPONSE_LEN` bytes of `pattern(_, 3)`.
async fn request_then_response_target() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if s.read_to_end(&mut request).await.is_err() {
                    return;
                }
                let head = format!("{} {}\n", request.len(), sha256_hex(&request));
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&pattern(RESPONSE_LEN, 3)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

const RESPONSE_LEN: usize = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_with_the_write_side_shut_gets_its_full_response() {
    let stack = Stack::start(StackOptions::default()).await;
    let target = request_then_response_target().await;
    let request = pattern(1 << 20, 11);
    for round in 0..3 {
        let mut s = socks5_stream(
            stack.socks_port,
            SOCKS_USER,
            SOCKS_PASS,
            "localhost",
            target.port(),
        )
        .await
        .expect("socks5 connect");
        s.write_all(&request).await.unwrap();
        // Like `nc -N` or an HTTP/1.0 client: done sending, still reading.
        s.shutdown().await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut response))
            .await
            .expect("the response ends")
            .unwrap();
        let want_head = format!("{} {}\n", request.len(), sha256_hex(&request));
        assert!(
            response.starts_with(want_head.as_bytes()),
            "round {round}: the target did not see the whole request: {:?}",
            String::from_utf8_lossy(&response[..response.len().min(120)])
        );
        let body = &response[want_head.len()..];
        assert_eq!(body.len(), RESPONSE_LEN, "round {round}");
        assert_eq!(body, &pattern(RESPONSE_LEN, 3)[..], "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_stops_only_itself_and_memory_stays_bounded() {
    // A stall timeout far beyond the test's limits: if the stalled connection blocked
    // the session, the second transfer would hang, not get rescued by the timeout.
    let extra = vec!["stall_timeout: 10m".to_string(), "max_window: 1MiB".into()];
    let stack = Stack::start(StackOptions {
        gateway_extra: extra.clone(),
        client_extra: extra,
        ..StackOptions::default()
    })
    .await;
    let plain = http_target().await;
    let proxy = stack.http_proxy();
    let (code, _) = curl(&["-x", &proxy, &format!("http://{plain}/bytes/1000000")]).await;
    assert_eq!(code, 0);
    let gateway_pid = stack.gateway.0.id().unwrap();
    let agent_pid = stack.agent.as_ref().unwrap().0.id().unwrap();
    let (gateway_before, agent_before) = (rss_bytes(gateway_pid), rss_bytes(agent_pid));

    // Connection A: the target pours data in, the user never reads.
    let written = Arc::new(AtomicU64::new(0));
    let block = Arc::new(pattern(1 << 20, 5));
    let hose = firehose_target(written.clone(), block.clone()).await;
    let mut stalled = socks5_stream(
        stack.socks_port,
        SOCKS_USER,
        SOCKS_PASS,
        "localhost",
        hose.port(),
    )
    .await
    .expect("socks5 connect");
    let held = wait_until_still(&written).await;

    // Connection B, same agent, same WebSocket: 64 MiB must still flow.
    const N: usize = 64 << 20;
    let (code, body) = curl(&["-x", &proxy, &format!("http://{plain}/bytes/{N}")]).await;
    assert_eq!(
        code, 0,
        "the second transfer was blocked by the stalled one"
    );
    assert_eq!(body.len(), N);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(N, 7)));
    drop(body);

    // What the target managed to push is what the kernel buffers plus one window hold,
    // not the gigabyte on offer; and neither process grew by anything like it.
    let held_after = written.load(Ordering::Relaxed);
    let gateway_growth = rss_bytes(gateway_pid).saturating_sub(gateway_before);
    let agent_growth = rss_bytes(agent_pid).saturating_sub(agent_before);
    eprintln!(
        "stalled connection: target wrote {held} then {held_after} bytes; RSS growth gateway {gateway_growth}, agent {agent_growth}"
    );
    assert!(held > 0, "the stalled connection never carried anything");
    assert!(held_after < 48 << 20, "{held_after} bytes left the target");
    assert!(
        gateway_growth < 48 << 20,
        "gateway grew {gateway_growth} bytes"
    );
    assert!(agent_growth < 48 << 20, "agent grew {agent_growth} bytes");

    // Nothing was lost while it waited: the stalled user now reads a gapless stream.
    let mut got = vec![0u8; 24 << 20];
    tokio::time::timeout(Duration::from_secs(30), stalled.read_exact(&mut got))
        .await
        .expect("the stalled connection resumes")
        .unwrap();
    for (i, chunk) in got.chunks(block.len()).enumerate() {
        assert_eq!(chunk, &block[..chunk.len()], "block {i} differs");
    }
}

/// Reads until the stream ends: `Ok` for a clean end of stream, the error otherwise;
/// `None` if neither happens within `limit`.
async fn read_to_the_end(
    s: &mut tokio::net::TcpStream,
    limit: Duration,
) -> Option<std::io::Result<()>> {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_tunnel_loses_ends_in_an_error_not_a_clean_end() {
    let mut stack = Stack::start(StackOptions::default()).await;
    let written = Arc::new(AtomicU64::new(0));
    let block = Arc::new(pattern(1 << 20, 5));
    let hose = firehose_target(written, block).await;
    let mut s = socks5_stream(
        stack.socks_port,
        SOCKS_USER,
        SOCKS_PASS,
        "localhost",
        hose.port(),
    )
    .await
    .expect("socks5 connect");
    let mut buf = vec![0u8; 1 << 20];
    s.read_exact(&mut buf).await.unwrap();
    // The agent dies mid-stream: a raw TCP user must not see a clean end of stream,
    // which would look like a complete (truncated) transfer.
    drop(stack.agent.take());
    let outcome = read_to_the_end(&mut s, Duration::from_secs(10))
        .await
        .expect("the lost connection ends promptly");
    let err = outcome.expect_err("a clean end of stream after the agent died");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_resets_is_reset_for_the_user_too() {
    let stack = Stack::start(StackOptions::default()).await;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(&pattern(256 * 1024, 9)).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            // An abortive close: the agent reads a reset, not an end of stream.
            let _ = s.set_zero_linger();
        }
    });
    let mut s = socks5_stream(
        stack.socks_port,
        SOCKS_USER,
        SOCKS_PASS,
        "localhost",
        target.port(),
    )
    .await
    .expect("socks5 connect");
    let outcome = read_to_the_end(&mut s, Duration::from_secs(10))
        .await
        .expect("the reset arrives promptly");
    let err = outcome.expect_err("the user saw a clean end of stream after the target's reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}
