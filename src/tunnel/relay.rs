//! Moves bytes between a local socket (the proxy user's, or the target's on the agent)
//! and one tunnelled connection, with `Bytes` from the socket read to the WebSocket
//! writer and back.

use anyproxy_proto::{Close, Data, Message, MAX_DATA_PAYLOAD};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::session::{ConnEvent, TunnelConn};

/// Largest single socket read, and so the largest data message we produce.
pub const READ_SIZE: usize = 64 * 1024;
const _: () = assert!(READ_SIZE <= MAX_DATA_PAYLOAD);

/// How a relay ended, for the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Bytes read from the local socket and sent into the tunnel.
    pub sent: u64,
    /// Bytes received from the tunnel and written to the local socket.
    pub received: u64,
}

/// Relays until either side ends. The connection is closed in both directions at the
/// end (the documented protocol has no half-close), and the peer is told unless it was
/// the one that closed.
pub async fn relay<S>(stream: S, conn: TunnelConn) -> RelayStats
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let TunnelConn {
        id,
        core,
        mut rx,
        cancel,
    } = conn;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut sent = 0u64;
    let mut received = 0u64;

    let reason = {
        let upstream = async {
            let mut buf = BytesMut::with_capacity(READ_SIZE);
            loop {
                if buf.capacity() - buf.len() < READ_SIZE / 4 {
                    buf.reserve(READ_SIZE);
                }
                let n = match (&mut rd).take(READ_SIZE as u64).read_buf(&mut buf).await {
                    Ok(0) => return "local side closed",
                    Ok(n) => n,
                    Err(_) => return "local read failed",
                };
                sent += n as u64;
                let payload = buf.split_to(n).freeze();
                if core
                    .send(Message::Data(Data { id, payload }))
                    .await
                    .is_err()
                {
                    return "session closed";
                }
            }
        };

        let downstream = async {
            while let Some(ConnEvent::Data(payload)) = rx.recv().await {
                received += payload.len() as u64;
                if wr.write_all(&payload).await.is_err() {
                    return "local write failed";
                }
            }
            // The peer closed (or the session ended): deliver what was queued, then finish.
            let _ = wr.shutdown().await;
            "closed by peer"
        };

        tokio::select! {
            r = upstream => r,
            r = downstream => r,
            _ = cancel.cancelled() => "cancelled",
        }
    };
    let stats = RelayStats { sent, received };
    if core.forget(id) {
        let _ = core
            .send(Message::Close(Close {
                id,
                reason: reason.into(),
            }))
            .await;
    }
    tracing::debug!(conn = %id, reason, sent = stats.sent, received = stats.received, "relay ended");
    stats
}
