//! UDP: 512-byte datagrams echoed back, as fast as a window of datagrams in flight
//! allows, through a UDP forward and through SOCKS5 UDP ASSOCIATE, against the echo
//! server direct, in the same run. Reports datagrams/s (echoes received per second)
//! and loss (sent and never echoed, after a grace for the last ones in flight).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::procs::free_port;
use crate::report::{ratio, Cell, Report, Table};
use crate::stack::{Stack, StackOptions, SOCKS_PASS, SOCKS_USER};
use crate::Env;

const SIZE: usize = 512;
/// Datagrams in flight at most: enough to keep both ends busy, few enough that no
/// socket buffer on loopback overflows by itself.
const WINDOW: usize = 64;
/// Waiting for an echo longer than this counts the datagram as lost.
const LOST_AFTER: Duration = Duration::from_millis(200);

struct Row {
    route: &'static str,
    sent: u64,
    received: u64,
    secs: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.received as f64 / self.secs
    }

    fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.sent.saturating_sub(self.received) as f64 / self.sent as f64
    }
}

pub async fn run(env: &Env, report: &mut Report) -> Result<()> {
    let secs = env.knobs.bulk_secs.max(1) * if env.knobs.tiny { 1 } else { 2 };
    let echo = echo_server().await?;
    let forward_port = free_port()?;
    let mut opts = StackOptions::binary(vec![], 100);
    opts.gateway_extra.push(format!(
        "forwards: [{{ listen_addr: \"127.0.0.1:{forward_port}\", target: \"{echo}\", protocol: udp }}]"
    ));
    let mut stack = Stack::start(&env.anyproxy, opts).await?;
    let duration = Duration::from_secs(secs);
    let mut rows = Vec::new();
    rows.push(measure("direct", Path::Plain(echo), duration).await?);
    let forward = SocketAddr::from((Ipv4Addr::LOCALHOST, forward_port));
    rows.push(
        measure(
            "anyproxy binary udp forward",
            Path::Plain(forward),
            duration,
        )
        .await?,
    );
    let assoc = associate(stack.socks_port).await?;
    let via = Path::Socks5 {
        relay: assoc.1,
        target: echo,
    };
    let row = measure("anyproxy binary socks5 udp", via, duration).await?;
    drop(assoc);
    rows.push(row);
    stack.check_alive()?;
    drop(stack);

    let direct = rows[0].rate();
    let mut t = Table::new(
        format!("udp: {SIZE} B datagrams echoed, {WINDOW} in flight, {secs} s per route"),
        &[
            "route",
            "sent",
            "received",
            "datagrams/s",
            "loss %",
            "x direct rate",
        ],
    );
    for r in &rows {
        t.rows.push(vec![
            Cell::text(r.route),
            Cell::Num(r.sent as f64, 0),
            Cell::Num(r.received as f64, 0),
            Cell::Num(r.rate(), 0),
            Cell::Num(r.loss() * 100.0, 3),
            ratio(r.rate(), Some(direct)),
        ]);
    }
    t.notes.push(
        "a datagram counts as lost when its echo has not come back within 200 ms; the window then moves on"
            .into(),
    );
    report.add(t);
    let fwd = &rows[1];
    report.check(
        "udp: >= 100k datagrams/s of 512 B through a forward with < 0.1 % loss",
        format!("{:.0}/s, {:.3} % loss", fwd.rate(), fwd.loss() * 100.0),
        Some(fwd.rate() >= 100_000.0 && fwd.loss() < 0.001),
    );
    Ok(())
}

enum Path {
    Plain(SocketAddr),
    Socks5 {
        relay: SocketAddr,
        target: SocketAddr,
    },
}

impl Path {
    /// The bytes put before each datagram, and where it is sent.
    fn header_and_addr(&self) -> (Vec<u8>, SocketAddr) {
        match self {
            Path::Plain(a) => (vec![], *a),
            Path::Socks5 { relay, target } => {
                let SocketAddr::V4(t) = target else {
                    unreachable!("loopback targets are IPv4")
                };
                let mut h = vec![0, 0, 0, 1];
                h.extend_from_slice(&t.ip().octets());
                h.extend_from_slice(&t.port().to_be_bytes());
                (h, *relay)
            }
        }
    }
}

async fn measure(route: &'static str, path: Path, duration: Duration) -> Result<Row> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let (header, to) = path.header_and_addr();
    let mut datagram = header.clone();
    datagram.resize(header.len() + SIZE, 0x5a);
    // Open the flow first (forward, SOCKS5): the first datagram waits for the agent.
    let mut buf = vec![0u8; 65_536];
    let mut opened = false;
    for _ in 0..20 {
        socket.send_to(&datagram, to).await?;
        if tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buf))
            .await
            .is_ok()
        {
            opened = true;
            break;
        }
    }
    if !opened {
        bail!("{route}: no echo came back");
    }
    let window = Arc::new(Semaphore::new(WINDOW));
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (socket, window, received, done) = (
            socket.clone(),
            window.clone(),
            received.clone(),
            done.clone(),
        );
        let want = header.len() + SIZE;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while !done.load(Ordering::Relaxed) {
                let Ok(Ok((n, _))) =
                    tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf))
                        .await
                else {
                    continue;
                };
                if n == want {
                    received.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
            }
        })
    };
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        // The echo of a lost datagram never frees its place: after LOST_AFTER, move on
        // without it.
        if let Ok(permit) = tokio::time::timeout(LOST_AFTER, window.acquire()).await {
            permit.context("window closed")?.forget();
        }
        socket.send_to(&datagram, to).await?;
        sent += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    // The last ones in flight get their grace.
    tokio::time::sleep(LOST_AFTER * 2).await;
    done.store(true, Ordering::Relaxed);
    let _ = reader.await;
    Ok(Row {
        route,
        sent,
        received: received.load(Ordering::Relaxed),
        secs,
    })
}

/// A UDP echo server on 127.0.0.1 (a task of this process).
async fn echo_server() -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    Ok(addr)
}

/// UDP ASSOCIATE (RFC 1928 §7) with user/password: the control connection, which the
/// association lives as long as, and the relay's address.
async fn associate(proxy: u16) -> Result<(TcpStream, SocketAddr)> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy)).await?;
    s.write_all(&[5, 1, 2]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    let mut auth = vec![1, SOCKS_USER.len() as u8];
    auth.extend_from_slice(SOCKS_USER.as_bytes());
    auth.push(SOCKS_PASS.len() as u8);
    auth.extend_from_slice(SOCKS_PASS.as_bytes());
    s.write_all(&auth).await?;
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await?;
    if status[1] != 0 {
        bail!("SOCKS5 authentication refused");
    }
    s.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    if reply[1] != 0 || reply[3] != 1 {
        bail!("UDP ASSOCIATE refused with reply {}", reply[1]);
    }
    let relay = SocketAddr::from((
        Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]),
        u16::from_be_bytes([reply[8], reply[9]]),
    ));
    Ok((s, relay))
}
