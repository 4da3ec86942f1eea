//! Listening sockets for the user-facing ports (proxies, forwards, agents).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

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
}
