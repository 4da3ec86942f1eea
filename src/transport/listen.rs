//! Listening sockets and the one accept loop every listener runs (agents, proxies,
//! forwards, the admin listener, the policy API): bind with a deep backlog, accept,
//! back off while accepting fails (out of descriptors), stop when told, and hand each
//! connection to the listener's role, a [`Serve`], in a task of its own.
//!
//! A listener behind a load balancer may also require the PROXY protocol
//! ([`AcceptLoop::proxy_protocol`]): in the connection's own task, before its role sees
//! a byte, the header is read (exactly its bytes, within [`PROXY_HEADER_TIMEOUT`]) from
//! a trusted address only, and the client it names becomes the connection's peer.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::proxy_header::{self, HeaderError, Progress, Source};
use crate::net::Cidr;

/// Pending connections the kernel may queue before `accept`, capped by its
/// `net.core.somaxconn` (4096 on current Linux). `TcpListener::bind` asks for 1024; a
/// proxy that hundreds of clients open connections to at once overflowed that queue
/// whenever the accept loop fell behind for a moment, and every overflow costs the
/// client a SYN retransmission: one second, then three, then seven.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind`
/// sets on Unix, so a restart does not wait out TIME_WAIT).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A listener's role: what happens to each connection it accepts.
pub trait Serve: Send + Sync + 'static {
    /// Serves one accepted connection, in a task of its own.
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send;
}

/// The first pause after a failed `accept`, doubled on each failure in a row.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest pause: a listener out of descriptors retries at least this often.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// One listener's accept loop; see the module docs.
pub struct AcceptLoop {
    /// Shared, so that a listener whose settings change can hand its socket (and the
    /// connections waiting in its backlog) to the loop that replaces it.
    listener: Arc<TcpListener>,
    what: &'static str,
    slots: Option<Arc<Semaphore>>,
    proxy_protocol: Option<Arc<ProxyProtocol>>,
}

impl AcceptLoop {
    /// `what` names the listener in logs (`"socks5 proxy"`).
    pub fn new(listener: impl Into<Arc<TcpListener>>, what: &'static str) -> Self {
        AcceptLoop {
            listener: listener.into(),
            what,
            slots: None,
            proxy_protocol: None,
        }
    }

    /// Requires a PROXY protocol header (v1 or v2) on every connection, from the
    /// addresses `pp` trusts; see [`ProxyProtocol`].
    pub fn proxy_protocol(mut self, pp: Arc<ProxyProtocol>) -> Self {
        self.proxy_protocol = Some(pp);
        self
    }

    /// Serves at most `n` connections at once; the next is accepted when one ends.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.slots = Some(Arc::new(Semaphore::new(n)));
        self
    }

    /// Accepts until `stop` resolves, spawning `role.serve` on `tasks` for each
    /// connection (with `TCP_NODELAY`: every listener here relays or answers small
    /// requests). Connections already accepted live on; `tasks` says when they end.
    pub async fn run<S: Serve>(
        self,
        role: Arc<S>,
        stop: impl Future<Output = ()> + Send,
        tasks: TaskTracker,
    ) {
        tokio::pin!(stop);
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u64;
        loop {
            let slot = match &self.slots {
                Some(slots) => tokio::select! {
                    biased;
                    _ = &mut stop => return,
                    s = slots.clone().acquire_owned() => s.ok(),
                },
                None => None,
            };
            // Stop first: once a reload has stopped this loop, a connection waiting on a
            // shared socket goes to the loop that replaced it.
            let accepted = tokio::select! {
                biased;
                _ = &mut stop => return,
                r = self.listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    // Out of descriptors and the like: the next accept would fail the
                    // same way at once, so pause instead of spinning, longer each time.
                    if failures == 0 {
                        tracing::warn!(listener = self.what, error = %e, "accept failed; backing off until it succeeds");
                    }
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            if failures > 0 {
                tracing::info!(listener = self.what, failures, "accepting again");
                failures = 0;
                backoff = BACKOFF_MIN;
            }
            let _ = stream.set_nodelay(true);
            let role = role.clone();
            // Every line logged while serving this connection names the listener and
            // the peer, instead of each line repeating them.
            let span = tracing::info_span!("conn", listener = self.what, %peer);
            let Some(pp) = self.proxy_protocol.clone() else {
                tasks.spawn(
                    async move {
                        let _slot = slot;
                        role.serve(stream, peer).await;
                    }
                    .instrument(span),
                );
                continue;
            };
            // The header is read in the connection's task: a slow one never holds up
            // the accept loop. Once it names the client, the connection is served in a
            // span that says so (`peer` = the client, `proxied_by` = the balancer).
            let what = self.what;
            let parent = tracing::Span::current();
            tasks.spawn(async move {
                let _slot = slot;
                let mut stream = stream;
                let peer = match pp.accept(&mut stream, peer).instrument(span.clone()).await {
                    Ok(Source::Local) => peer,
                    Ok(Source::Client(client)) => {
                        let span = tracing::info_span!(parent: &parent, "conn", listener = what, peer = %client, proxied_by = %peer);
                        return role.serve(stream, client).instrument(span).await;
                    }
                    Err(_) => return,
                };
                role.serve(stream, peer).instrument(span).await;
            });
        }
    }
}

/// How long a connection to a PROXY-protocol listener may take to send its header: a
/// balancer sends it at once, with the connection.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The PROXY protocol stage of the listeners that require it: who may send a header,
/// and the connections refused, by reason. One is shared by a gateway's listeners.
///
/// A connection from an address outside `trusted` is refused before anything is read
/// (whatever it would have sent: a forged header, or none); one from a trusted address
/// must start with a valid header. Each refusal is logged with its reason and closes
/// only that connection.
pub struct ProxyProtocol {
    trusted: Arc<[Cidr]>,
    timeout: Duration,
    refused: [AtomicU64; HeaderError::REASONS.len()],
}

impl ProxyProtocol {
    pub fn new(trusted: impl Into<Arc<[Cidr]>>) -> Self {
        ProxyProtocol {
            trusted: trusted.into(),
            timeout: PROXY_HEADER_TIMEOUT,
            refused: Default::default(),
        }
    }

    /// Another header timeout than [`PROXY_HEADER_TIMEOUT`].
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connections refused so far, by [`HeaderError::reason`] (every reason listed).
    pub fn refused(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        HeaderError::REASONS
            .iter()
            .zip(&self.refused)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    /// Checks `peer` and reads the header from `stream`, leaving the stream at the
    /// connection's first byte after it; a refusal is logged and counted here.
    pub async fn accept(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<Source, HeaderError> {
        let result = if !self.trusted.iter().any(|c| c.contains(peer.ip())) {
            Err(HeaderError::Untrusted)
        } else {
            match tokio::time::timeout(self.timeout, read_header(stream)).await {
                Ok(r) => r,
                Err(_) => Err(HeaderError::TimedOut(self.timeout)),
            }
        };
        if let Err(e) = &result {
            let reason = e.reason();
            if let Some(i) = HeaderError::REASONS.iter().position(|r| *r == reason) {
                self.refused[i].fetch_add(1, Ordering::Relaxed);
            }
            match e {
                // Anyone who can reach the port can cause this one.
                HeaderError::Untrusted => tracing::info!(reason, "connection refused: {e}"),
                // A balancer's plain TCP health check, or a port probe.
                HeaderError::Empty => tracing::debug!(reason, "connection refused: {e}"),
                // The balancer itself sends something wrong: worth a look.
                _ => tracing::warn!(reason, "connection refused: {e}"),
            }
        }
        result
    }
}

/// Reads exactly the header's bytes (never one past it) and parses them.
async fn read_header(stream: &mut TcpStream) -> Result<Source, HeaderError> {
    let io = |e: std::io::Error| HeaderError::Io(e.to_string());
    let mut buf = Vec::with_capacity(proxy_header::V1_MAX);
    loop {
        let need = match proxy_header::parse_prefix(&buf)? {
            Progress::Done { source, .. } => return Ok(source),
            Progress::Need(n) => n,
        };
        let have = buf.len();
        let take = if proxy_header::is_v1(&buf) {
            // The rest of a v1 line, up to its LF, in one read.
            let mut peeked = [0u8; proxy_header::V1_MAX];
            let n = stream.peek(&mut peeked).await.map_err(io)?;
            proxy_header::v1_take(have, &peeked[..n])
        } else {
            need
        };
        // `need` bytes (or a v1 line's rest) all belong to the header, so a read of at
        // most that many takes none of the connection's own bytes.
        buf.resize(have + take.max(1), 0);
        let n = stream.read(&mut buf[have..]).await.map_err(io)?;
        if n == 0 {
            return Err(match have {
                0 => HeaderError::Empty,
                _ => HeaderError::Truncated,
            });
        }
        buf.truncate(have + n);
    }
}

/// Errors about one connection that died in the queue: the next accept is fine.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listens_and_accepts_on_both_families() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = listen(addr.parse().unwrap()) else {
                continue; // no IPv6 on this host
            };
            let at = listener.local_addr().unwrap();
            let client = tokio::net::TcpStream::connect(at);
            let (accepted, connected) = tokio::join!(listener.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok(), "{addr}");
        }
    }

    struct Echo;

    impl Serve for Echo {
        async fn serve(self: Arc<Self>, mut stream: TcpStream, _peer: SocketAddr) {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    }

    #[tokio::test]
    async fn serves_each_connection_until_stopped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let at = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = TaskTracker::new();
        let run = tokio::spawn(AcceptLoop::new(listener, "test").max_connections(2).run(
            Arc::new(Echo),
            stop.clone().cancelled_owned(),
            tasks.clone(),
        ));
        for _ in 0..3 {
            let mut c = TcpStream::connect(at).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
        stop.cancel();
        run.await.unwrap();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .expect("served connections end when their clients leave");
    }

    /// Tells which peer it was handed, then echoes.
    struct Tell(tokio::sync::mpsc::UnboundedSender<SocketAddr>);

    impl Serve for Tell {
        async fn serve(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
            let _ = self.0.send(peer);
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    }

    /// A PROXY-protocol listener trusting `trusted`, with its role's reports.
    async fn pp_listener(
        trusted: &str,
        timeout: Duration,
    ) -> (
        SocketAddr,
        Arc<ProxyProtocol>,
        tokio::sync::mpsc::UnboundedReceiver<SocketAddr>,
    ) {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let at = listener.local_addr().unwrap();
        let pp = Arc::new(
            ProxyProtocol::new(vec![Cidr::parse(trusted).unwrap()]).header_timeout(timeout),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(
            AcceptLoop::new(listener, "test")
                .proxy_protocol(pp.clone())
                .run(
                    Arc::new(Tell(tx)),
                    std::future::pending(),
                    TaskTracker::new(),
                ),
        );
        (at, pp, rx)
    }

    fn count(pp: &ProxyProtocol, reason: &str) -> u64 {
        pp.refused().find(|(r, _)| *r == reason).unwrap().1
    }

    #[tokio::test]
    async fn a_trusted_header_names_the_peer_and_the_stream_after_it_is_untouched() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (at, _pp, mut peers) = pp_listener("127.0.0.0/8", Duration::from_secs(10)).await;
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        v2.extend([198, 51, 100, 9, 127, 0, 0, 1, 0x30, 0x39, 0, 80]);
        for (header, want) in [
            (
                &b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n"[..],
                "203.0.113.7:4242",
            ),
            (&v2[..], "198.51.100.9:12345"),
        ] {
            let mut c = TcpStream::connect(at).await.unwrap();
            // The header and the first bytes in one segment.
            c.write_all(&[header, b"ping"].concat()).await.unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            assert_eq!(peers.recv().await.unwrap(), want.parse().unwrap());
        }
        // LOCAL (a health check): the socket's own peer.
        let mut c = TcpStream::connect(at).await.unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00")
            .await
            .unwrap();
        assert_eq!(peers.recv().await.unwrap(), me);
    }

    #[tokio::test]
    async fn refusals_close_only_that_connection_and_are_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let refused = |mut c: TcpStream| async move {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
            assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
        };
        // Untrusted: refused whatever it sends.
        let (at, pp, mut peers) = pp_listener("127.0.0.9/32", Duration::from_secs(10)).await;
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 80\r\n")
            .await
            .unwrap();
        refused(c).await;
        assert_eq!(count(&pp, "untrusted"), 1);

        // Trusted: no header, a bad one, none in time.
        let (at, pp, mut peers2) = pp_listener("127.0.0.1", Duration::from_millis(300)).await;
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        refused(c).await;
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"PROXY TCP4 1.2.3.4 nope 1 2\r\n")
            .await
            .unwrap();
        refused(c).await;
        let c = TcpStream::connect(at).await.unwrap();
        refused(c).await;
        drop(TcpStream::connect(at).await.unwrap());
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        c.shutdown().await.unwrap();
        refused(c).await;
        assert_eq!(
            ["missing", "malformed", "timed_out", "truncated"].map(|r| count(&pp, r)),
            [1; 4]
        );
        // The connection dropped at once: its refusal is counted, eventually.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count(&pp, "empty") == 0 {
            assert!(std::time::Instant::now() < deadline, "never counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count(&pp, "empty"), 1);
        // None of them reached the role, and the listener still serves.
        let mut c = TcpStream::connect(at).await.unwrap();
        c.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(peers2.recv().await.unwrap(), c.local_addr().unwrap());
        assert!(peers.try_recv().is_err());
    }
}
