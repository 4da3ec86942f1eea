//! Two sessions joined by an in-memory pipe, so that what flow control promises can be
//! counted exactly: bytes in flight toward a stalled reader never exceed its window,
//! other connections keep flowing, and a peer that ignores its credit loses only the
//! connection it abused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyproxy_proto::{ConnId, Data, Encoding, Message, INITIAL_WINDOW};
use bytes::Bytes;
use fastwebsockets::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::relay::{relay_tunnel, READ_SIZE};
use super::session::{SessionCore, SessionOptions};
use crate::transport::ws;

const PIPE: usize = 64 * 1024;

struct Pair {
    a: Arc<SessionCore>,
    b: Arc<SessionCore>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.a.shutdown();
        self.b.shutdown();
    }
}

/// A role that ignores what only a role would handle.
struct Ignore;

impl super::session::Role for Ignore {
    async fn on_message(&self, _: &Arc<SessionCore>, _: anyproxy_proto::Message) {}
}

fn pair() -> Pair {
    let (x, y) = tokio::io::duplex(1 << 20);
    let options = SessionOptions {
        stall_timeout: Duration::from_secs(600),
        json_cap: crate::tunnel::flow::QueueCap { cap: 4 << 20 },
        max_window: 8 << 20,
        ids: super::session::IdSpace::Ours,
        conn_idle_timeout: None,
    };
    let start = |io: DuplexStream, role: Role| {
        let (mut reader, writer) = ws::split(Box::new(io), role, 4 << 20, None);
        let session = SessionCore::start(Encoding::Binary, writer, options);
        let core = session.core().clone();
        let looped = core.clone();
        tokio::spawn(async move {
            // The session lives as long as its read loop.
            let _session = session;
            looped
                .read_loop(&mut reader, Duration::from_secs(600), &Ignore)
                .await
        });
        core
    };
    Pair {
        a: start(x, Role::Client),
        b: start(y, Role::Server),
    }
}

/// Opens connection `id` on both sides and relays each end to a local pipe; returns
/// the user ends (A's, B's).
fn connect(pair: &Pair, id: u32) -> (DuplexStream, DuplexStream) {
    let id = ConnId(id);
    let (a_user, a_local) = tokio::io::duplex(PIPE);
    let (b_user, b_local) = tokio::io::duplex(PIPE);
    let a = pair.a.register(id).expect("free id");
    let b = pair.b.register(id).expect("free id");
    tokio::spawn(relay_tunnel(a_local, a, None, None, None));
    tokio::spawn(relay_tunnel(b_local, b, None, None, None));
    (a_user, b_user)
}

/// Waits until `counter` has not moved for a while.
async fn settle(counter: &AtomicU64) -> u64 {
    let mut last = counter.load(Ordering::Relaxed);
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while still < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counter.load(Ordering::Relaxed);
        if now == last {
            still += 1;
        } else {
            (still, last) = (0, now);
        }
    }
    last
}

fn byte_at(i: u64) -> u8 {
    (i % 251) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_toward_a_stalled_reader_never_exceed_its_window() {
    let pair = pair();
    let (mut stalled_src, mut stalled_dst) = connect(&pair, 1);
    let pushed = Arc::new(AtomicU64::new(0));
    let counter = pushed.clone();
    let writer = tokio::spawn(async move {
        let mut offset = 0u64;
        for _ in 0..1024 {
            let chunk: Vec<u8> = (offset..offset + 65536).map(byte_at).collect();
            if stalled_src.write_all(&chunk).await.is_err() {
                return;
            }
            offset += 65536;
            counter.store(offset, Ordering::Relaxed);
        }
    });
    let held = settle(&pushed).await;
    // In flight: the window, plus at most one read and each pipe's buffer on the way.
    let bound = INITIAL_WINDOW as u64 + (READ_SIZE + 2 * PIPE) as u64;
    assert!(held > 0);
    assert!(held <= bound, "{held} bytes in flight, bound {bound}");

    // A second connection on the same WebSocket moves 16 MiB meanwhile.
    let (mut src, mut dst) = connect(&pair, 2);
    const N: usize = 16 << 20;
    let sender = tokio::spawn(async move {
        let data = vec![0x5a; N];
        src.write_all(&data).await.unwrap();
        src.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), dst.read_to_end(&mut got))
        .await
        .expect("the second connection was held up by the stalled one")
        .unwrap();
    sender.await.unwrap();
    assert_eq!(got.len(), N);
    assert!(got.iter().all(|&b| b == 0x5a));
    assert_eq!(
        pushed.load(Ordering::Relaxed),
        held,
        "the stalled one moved"
    );

    // The stalled reader now reads everything, in order, with nothing lost.
    let mut buf = vec![0u8; 8 << 20];
    stalled_dst.read_exact(&mut buf).await.unwrap();
    assert!(buf.iter().enumerate().all(|(i, &b)| b == byte_at(i as u64)));
    writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_ignores_its_credit_loses_only_that_connection() {
    let pair = pair();
    let (_abused_src, mut abused_dst) = connect(&pair, 7);
    let (mut good_src, mut good_dst) = connect(&pair, 8);
    // Bypass the relay's credit: A sends B more than the initial window at once. B's
    // relay can consume at most what fits in its pipe plus one chunk before the user
    // reads (the test reads only after the reset), and so grant at most that much more credit:
    // twice the window is beyond any credit B can have granted, whatever the timing.
    let chunk = Bytes::from(vec![1u8; 64 * 1024]);
    for _ in 0..(2 * INITIAL_WINDOW as usize / chunk.len() + 2) {
        let msg = Message::Data(Data {
            id: ConnId(7),
            payload: chunk.clone(),
        });
        pair.a.send(msg).await.unwrap();
    }
    // B resets connection 7 and tells A. Nothing reads B's side of it before that: a
    // reader draining it meanwhile would have B grant credit while A's burst is still
    // arriving, and the burst could then fit.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair.a.is_live(ConnId(7)) || pair.b.is_live(ConnId(7)) {
        assert!(Instant::now() < deadline, "connection 7 still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its user sees the end of the stream, after no more than B had taken.
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), abused_dst.read_to_end(&mut sink))
        .await
        .expect("the abused connection ended")
        .unwrap();
    assert!(sink.len() <= INITIAL_WINDOW as usize);
    // Connection 8 and the session are fine.
    good_src.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    good_dst.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    assert!(!pair.a.is_closed() && !pair.b.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_without_a_relay_is_released_on_both_sides() {
    let pair = pair();
    let a = pair.a.register(ConnId(3)).expect("free id");
    let _b = pair.b.register(ConnId(3)).expect("free id");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair.a.is_live(ConnId(3)) || pair.b.is_live(ConnId(3)) {
        assert!(Instant::now() < deadline, "connection 3 was leaked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A taken id is refused without disturbing its owner.
    let owner = pair.a.register(ConnId(4)).expect("free id");
    assert!(pair.a.register(ConnId(4)).is_none());
    assert!(pair.a.is_live(ConnId(4)));
    drop(owner);

    // An `open` whose caller gives up (the peer never answers here) leaves nothing.
    let give_up = tokio::time::timeout(
        Duration::from_millis(100),
        pair.a.open("example.invalid", 80, Duration::from_secs(60)),
    )
    .await;
    assert!(give_up.is_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair.a.active_conns() != 0 {
        assert!(Instant::now() < deadline, "an abandoned open kept its slot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
