//! The single writer task that owns a session's WebSocket write side: it drains what
//! is queued, packs binary frames back to back into one WebSocket message, and flushes
//! once per batch (fastwebsockets never flushes, and rustls would hold the bytes).

use std::sync::Arc;

use anyproxy_proto::{binary, json, ConnId, ConnIdMap, Encoding, Message};
use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Outbound;
use crate::transport::ws::close_code;
use crate::transport::{WsError, WsWriter};
use crate::tunnel::stats::SessionStats;

/// The writer flushes after at most this many bytes in one batch.
const BATCH_BYTES: usize = 256 * 1024;

pub(super) async fn write_loop(
    mut ws: WsWriter,
    mut rx: mpsc::Receiver<Outbound>,
    encoding: Encoding,
    ids: Arc<dyn ConnIdMap + Send + Sync>,
    closed: CancellationToken,
    stats: Arc<SessionStats>,
) {
    // On a compressed session, data of two connections never share a WebSocket message
    // (and so never a compression context): one user's chosen bytes must not become a
    // length oracle for another user's secrets (CRIME/BREACH).
    let isolate = ws.compression_counters().is_some();
    let mut batch = Batch {
        buf: BytesMut::new(),
        conn: None,
        isolate,
    };
    loop {
        let first = tokio::select! {
            m = rx.recv() => m,
            _ = closed.cancelled() => None,
        };
        let Some(first) = first else {
            let _ = ws.send_close(close_code::GOING_AWAY, "session ended").await;
            return;
        };
        match write_batch(&mut ws, &mut rx, first, encoding, &*ids, &mut batch, &stats).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket write failed");
                closed.cancel();
                return;
            }
        }
    }
}

/// Binary frames waiting to go out as one WebSocket message.
struct Batch {
    buf: BytesMut,
    /// The connection whose data is in `buf`, when isolating connections.
    conn: Option<ConnId>,
    isolate: bool,
}

impl Batch {
    /// Whether `msg` must start a new WebSocket message. Control messages carry no
    /// user data and may join any batch.
    fn must_split_before(&self, msg: &Message) -> bool {
        match (self.isolate, msg) {
            (true, Message::Data(d)) => self.conn.is_some_and(|c| c != d.id),
            _ => false,
        }
    }

    fn push(&mut self, msg: &Message) {
        if let Message::Data(d) = msg {
            self.conn = Some(d.id);
        }
        binary::encode_into(msg, &mut self.buf);
    }
}

/// Writes `first` and whatever else is already queued, up to [`BATCH_BYTES`], then
/// flushes once. Binary messages queued together share one WebSocket message.
/// Returns false once a close frame has been sent.
async fn write_batch(
    ws: &mut WsWriter,
    rx: &mut mpsc::Receiver<Outbound>,
    first: Outbound,
    encoding: Encoding,
    ids: &(dyn ConnIdMap + Send + Sync),
    batch: &mut Batch,
    stats: &SessionStats,
) -> Result<bool, WsError> {
    let mut written = 0usize;
    let mut item = Some(first);
    while let Some(next) = item.take() {
        match next {
            Outbound::Msg(msg) => {
                stats.sent(msg.kind());
                match encoding {
                    Encoding::Binary => {
                        if batch.must_split_before(&msg) {
                            written += batch.buf.len();
                            flush_batch(ws, batch).await?;
                        }
                        batch.push(&msg);
                        if batch.buf.len() >= BATCH_BYTES {
                            written += batch.buf.len();
                            flush_batch(ws, batch).await?;
                        }
                    }
                    Encoding::Json => {
                        let text = json::encode_with(&msg, ids);
                        written += text.len();
                        ws.send_text(text).await?;
                        if let Some(id) = last_for_connection(&msg) {
                            ids.release(id);
                        }
                    }
                }
            }
            Outbound::Release(id) => ids.release(id),
            Outbound::WsPong(p) => {
                flush_batch(ws, batch).await?;
                ws.send_pong(p).await?;
            }
            Outbound::WsClose(code, reason) => {
                flush_batch(ws, batch).await?;
                ws.send_close(code, &reason).await?;
                return Ok(false);
            }
        }
        if written + batch.buf.len() < BATCH_BYTES {
            item = rx.try_recv().ok();
        }
    }
    flush_batch(ws, batch).await?;
    ws.flush().await?;
    Ok(true)
}

/// The id of a message after which nothing more is written for its connection: our
/// `close`, or a failed `connect_response`.
fn last_for_connection(msg: &Message) -> Option<ConnId> {
    match msg {
        Message::Close(c) => Some(c.id),
        Message::ConnectResponse(r) if !r.success => Some(r.id),
        _ => None,
    }
}

async fn flush_batch(ws: &mut WsWriter, batch: &mut Batch) -> Result<(), WsError> {
    batch.conn = None;
    if !batch.buf.is_empty() {
        ws.send_binary(batch.buf.split()).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyproxy_proto::{Data, WindowUpdate};
    use bytes::Bytes;

    fn data(id: u32) -> Message {
        Message::Data(Data {
            id: ConnId(id),
            payload: Bytes::from_static(b"x"),
        })
    }

    #[test]
    fn a_compressed_batch_never_mixes_two_connections_data() {
        let mut batch = Batch {
            buf: BytesMut::new(),
            conn: None,
            isolate: true,
        };
        assert!(!batch.must_split_before(&data(1)));
        batch.push(&data(1));
        assert!(!batch.must_split_before(&data(1)));
        assert!(batch.must_split_before(&data(2)));
        // Control messages carry no user bytes and may ride along.
        let update = Message::WindowUpdate(WindowUpdate {
            id: ConnId(2),
            increment: 1,
        });
        assert!(!batch.must_split_before(&update));

        let mut plain = Batch {
            isolate: false,
            ..batch
        };
        assert!(!plain.must_split_before(&data(2)));
        plain.push(&data(2));
        assert!(!plain.must_split_before(&data(3)));
    }
}
