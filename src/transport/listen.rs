//! Listening sockets and the one accept loop every listener runs (agents, proxies,
//! forwards, the admin listener, the policy API): bind with a deep backlog, accept,
//! back off while accepting fails (out of descriptors), stop when told, and hand each
//! connection to the listener's role, a [`Serve`], in a task of its own.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

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
    listener: TcpListener,
    what: &'static str,
    slots: Option<Arc<Semaphore>>,
}

impl AcceptLoop {
    /// `what` names the listener in logs (`"socks5 proxy"`).
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        AcceptLoop {
            listener,
            what,
            slots: None,
        }
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
                    s = slots.clone().acquire_owned() => s.ok(),
                    _ = &mut stop => return,
                },
                None => None,
            };
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = &mut stop => return,
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
            tasks.spawn(
                async move {
                    let _slot = slot;
                    role.serve(stream, peer).await;
                }
                .instrument(span),
            );
        }
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
}
