//! The servers the tunnels lead to, all on 127.0.0.1 in this process (except the idle
//! hold server, which runs as a child so its sockets don't count against our fd limit).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Size of the static page, about what a default nginx index page weighs.
pub const PAGE_SIZE: usize = 1024;
/// Size of one latency exchange each way.
pub const ECHO_SIZE: usize = 1024;

/// The first byte a bulk client sends: which way the data flows.
pub const BULK_DOWNLOAD: u8 = b'D';
pub const BULK_UPLOAD: u8 = b'U';

/// What the hold server sends on accept, so a client knows the whole path is up.
pub const HOLD_HELLO: u8 = b'!';

/// With anyproxy's own backlog: a target that drops SYNs under 500 concurrent clients
/// would measure the kernel's retransmission timer, on every route alike.
async fn listen() -> Result<(TcpListener, SocketAddr)> {
    let l = anyproxy::transport::listen::listen("127.0.0.1:0".parse()?)?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// A static HTTP/1.1 server (keep-alive) answering every request with the same page.
pub async fn http_server() -> Result<SocketAddr> {
    let (listener, addr) = listen().await?;
    let page = Bytes::from(vec![b'a'; PAGE_SIZE]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let page = page.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let page = page.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(page)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The chunk the bytes server repeats: `GET /bytes/N` answers N bytes of it, over
/// and over, so a client can check every byte without storing the body.
pub const BYTES_CHUNK: usize = 64 * 1024;
pub const BYTES_SEED: u64 = 0x5eed_0001;

/// A body of `left` bytes: `chunk` repeated, cut at the end.
struct Repeat {
    chunk: Bytes,
    left: u64,
}

impl hyper::body::Body for Repeat {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= n as u64;
        let data = self.chunk.slice(..n);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// An HTTP/1.1 server answering `GET /bytes/N` with N bytes (`BYTES_CHUNK` of noise,
/// repeated) and a content length, so a cut-short download shows as an error.
pub async fn bytes_server() -> Result<SocketAddr> {
    let (listener, addr) = listen().await?;
    let chunk = Bytes::from(noise(BYTES_CHUNK, BYTES_SEED));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let left = req
                        .uri()
                        .path()
                        .strip_prefix("/bytes/")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let body = Repeat {
                        chunk: chunk.clone(),
                        left,
                    };
                    async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(body)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Bulk source and sink: after the direction byte it streams data until the client
/// goes away (download), or swallows everything (upload). `received` counts what the
/// sink saw, which is what an upload measures.
pub struct Bulk {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
}

pub async fn bulk_server() -> Result<Bulk> {
    let (listener, addr) = listen().await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    // Incompressible, like iperf3's default payload, so deflate has no unfair edge.
    let chunk = Bytes::from(noise(128 * 1024, 0x9e37_79b9));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let chunk = chunk.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut dir = [0u8; 1];
                if s.read_exact(&mut dir).await.is_err() {
                    return;
                }
                if dir[0] == BULK_DOWNLOAD {
                    while s.write_all(&chunk).await.is_ok() {}
                } else {
                    let mut buf = vec![0u8; 128 * 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok(Bulk { addr, received })
}

/// Echoes fixed-size messages back: the latency target.
pub async fn echo_server() -> Result<SocketAddr> {
    let (listener, addr) = listen().await?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Accepts and holds connections, greeting each with one byte, until the client
/// closes. Run as a child process (`loadtest hold`); prints its port on stdout.
pub async fn hold_server() -> Result<()> {
    let (listener, addr) = listen().await?;
    println!("{}", addr.port());
    loop {
        let mut s = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of descriptors: connections being closed will free some.
            Err(e) => {
                eprintln!("hold server: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if s.write_all(&[HOLD_HELLO]).await.is_ok() {
                // Held until the client goes away, so rounds don't pile up descriptors.
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
}

/// Deterministic incompressible bytes (xorshift).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
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
