//! The HTTPS proxy listener: the HTTP front end behind TLS, so that the proxy
//! credentials (`Proxy-Authorization: Basic`) and the requests of absolute-form
//! forwarding never cross the network in clear (`curl -x https://...`, Chromium's
//! `--proxy-server=https://...`).
//!
//! A client that speaks plain HTTP to this port gets a plain `400` saying so, instead of
//! a TLS alert its user could not read; only that connection is affected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::http::{HttpProxy, Version};
use crate::connect::Connector;
use crate::transport::listen::Serve;
use crate::tunnel::relay::LocalStream;

/// The first byte of every TLS connection: a handshake record (RFC 8446 §5.1).
const TLS_HANDSHAKE: u8 = 0x16;

/// What a plain-HTTP client is told, and then the connection is closed.
const NOT_TLS: &str = "this port is an HTTPS proxy: connect to it with TLS (curl -x https://HOST:PORT, Chromium --proxy-server=https://HOST:PORT)\n";

/// How long a plain-HTTP client's request is read (and thrown away) after it was told,
/// so that closing the socket does not reset the answer away; at most [`DRAIN_MAX`].
const DRAIN_FOR: Duration = Duration::from_secs(2);
const DRAIN_MAX: usize = 64 * 1024;

/// The HTTPS proxy listener's role: a TLS handshake (within the HTTP front end's
/// request timeout), then [`HttpProxy`] over the session.
pub struct HttpsProxy<C> {
    http: Arc<HttpProxy<C>>,
    acceptor: TlsAcceptor,
}

impl<C: Connector> HttpsProxy<C> {
    pub fn new(http: Arc<HttpProxy<C>>, tls: Arc<rustls::ServerConfig>) -> Self {
        HttpsProxy {
            http,
            acceptor: TlsAcceptor::from(tls),
        }
    }
}

impl<C: Connector> Serve for HttpsProxy<C> {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let within = self.http.request_timeout.get();
        let mut first = [0u8; 1];
        match tokio::time::timeout(within, stream.peek(&mut first)).await {
            Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE => {}
            Ok(Ok(1..)) => return refuse_plain(stream, peer).await,
            // Closed, failed or silent before a byte: nothing to answer.
            _ => return,
        }
        match tokio::time::timeout(within, self.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                let version = match tls.get_ref().1.alpn_protocol() {
                    Some(b"h2") => Version::Http2,
                    _ => Version::Http1,
                };
                self.http.clone().serve_io(tls, peer, version).await
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "https proxy: TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, ?within, "https proxy: TLS handshake timed out"),
        }
    }
}

/// Tells a plain-HTTP client that this port speaks TLS, and closes.
async fn refuse_plain(mut stream: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "https proxy: a plain-HTTP client; answered 400");
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{NOT_TLS}",
        NOT_TLS.len()
    );
    if stream.write_all(answer.as_bytes()).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    // Unread bytes at close would make the kernel send a reset, which may reach the
    // client before it read the answer.
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = DRAIN_MAX;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_FOR, drain).await;
}

/// A CONNECT tunnel over the HTTPS listener ends like one over plain TCP: a tunnel the
/// far side lost resets the user's connection instead of closing it cleanly.
impl LocalStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort_on_close(&self) {
        self.get_ref().0.abort_on_close()
    }
}
