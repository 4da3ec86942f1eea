//! The single writer task that owns a session's WebSocket write side: it drains what
//! is queued, packs binary frames back to back into one WebSocket message, and flushes
//! once per batch (fastwebsockets never flushes, and rustls would hold the bytes).
//!
//! Two lanes feed it, and it always empties the control lane first ([`Lane`] says which
//! message takes which): a `connect`, its answer, a heartbeat or an error never waits
//! behind megabytes of other connections' data. Order within each lane is FIFO. A
//! connection's order-bound messages (data, `fin`) all take the data lane, so they keep
//! their order; its `close` takes the control lane only when none of them is still
//! queued ([`super::Unsent`] is zero), and otherwise the data lane, behind them. So a
//! `close` never overtakes its own connection's data.

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

/// Which of the writer's queues a message takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    Control,
    Data,
}

impl Lane {
    /// The lane of `item` when its sender knows no more than its kind. A `close` takes
    /// the data lane: whether the connection still has data queued is known only to
    /// [`super::SessionCore::send_close`], which may choose the control lane instead.
    pub(super) fn of(item: &Outbound) -> Lane {
        match item {
            Outbound::Msg(Message::Close(_) | Message::Data(_) | Message::Fin(_))
            | Outbound::Ordered(..) => Lane::Data,
            // After everything queued before it (a refusal, say), as the caller expects.
            Outbound::WsClose(..) => Lane::Data,
            // Must follow whatever of that connection is still queued.
            Outbound::Release(_) => Lane::Data,
            Outbound::Msg(_) | Outbound::WsPong(_) => Lane::Control,
        }
    }
}

/// The writer's two queues, control first.
pub(super) struct Lanes {
    ctl: mpsc::Receiver<Outbound>,
    data: mpsc::Receiver<Outbound>,
    ctl_open: bool,
    data_open: bool,
}

impl Lanes {
    pub(super) fn new(ctl: mpsc::Receiver<Outbound>, data: mpsc::Receiver<Outbound>) -> Self {
        Lanes {
            ctl,
            data,
            ctl_open: true,
            data_open: true,
        }
    }

    /// The next item, control first; `None` once both lanes are closed and empty.
    async fn recv(&mut self) -> Option<Outbound> {
        loop {
            if !self.ctl_open && !self.data_open {
                return None;
            }
            tokio::select! {
                biased;
                m = self.ctl.recv(), if self.ctl_open => match m {
                    Some(m) => return Some(m),
                    None => self.ctl_open = false,
                },
                m = self.data.recv(), if self.data_open => match m {
                    Some(m) => return Some(m),
                    None => self.data_open = false,
                },
            }
        }
    }

    /// What is already queued, control first, without waiting.
    fn try_recv(&mut self) -> Option<Outbound> {
        self.ctl
            .try_recv()
            .ok()
            .or_else(|| self.data.try_recv().ok())
    }
}

pub(super) async fn write_loop(
    mut ws: WsWriter,
    mut rx: Lanes,
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
    rx: &mut Lanes,
    first: Outbound,
    encoding: Encoding,
    ids: &(dyn ConnIdMap + Send + Sync),
    batch: &mut Batch,
    stats: &SessionStats,
) -> Result<bool, WsError> {
    let mut written = 0usize;
    let mut item = Some(first);
    while let Some(next) = item.take() {
        let msg = match next {
            Outbound::Msg(msg) => Some(msg),
            Outbound::Ordered(msg, unsent) => {
                unsent.taken();
                Some(msg)
            }
            Outbound::Release(id) => {
                ids.release(id);
                None
            }
            Outbound::WsPong(p) => {
                flush_batch(ws, batch).await?;
                ws.send_pong(p).await?;
                None
            }
            Outbound::WsClose(code, reason) => {
                flush_batch(ws, batch).await?;
                ws.send_close(code, &reason).await?;
                return Ok(false);
            }
        };
        if let Some(msg) = msg {
            written += write_msg(ws, msg, encoding, ids, batch, stats).await?;
        }
        if written + batch.buf.len() < BATCH_BYTES {
            item = rx.try_recv();
        }
    }
    flush_batch(ws, batch).await?;
    ws.flush().await?;
    Ok(true)
}

/// Encodes one message: into the batch (binary, flushed when full or when isolation
/// demands) or as its own text message (JSON). Returns the bytes flushed or sent.
async fn write_msg(
    ws: &mut WsWriter,
    msg: Message,
    encoding: Encoding,
    ids: &(dyn ConnIdMap + Send + Sync),
    batch: &mut Batch,
    stats: &SessionStats,
) -> Result<usize, WsError> {
    stats.sent(msg.kind());
    let mut written = 0;
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
    Ok(written)
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
    use crate::transport::ws;
    use crate::transport::Incoming;
    use crate::tunnel::session::{decode_all, IdSpace, SessionCore, SessionOptions, Unsent};
    use anyproxy_proto::{Close, Connect, Data, Heartbeat, NumericIds, Protocol, WindowUpdate};
    use bytes::Bytes;
    use std::time::Duration;

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

    fn options() -> SessionOptions {
        SessionOptions {
            stall_timeout: Duration::from_secs(600),
            json_cap: crate::tunnel::flow::QueueCap { cap: 4 << 20 },
            max_window: 8 << 20,
            ids: IdSpace::Ours,
            conn_idle_timeout: None,
        }
    }

    /// What the peer receives, in order, until it has `n` messages.
    async fn received(reader: &mut crate::transport::WsReader, n: usize) -> Vec<Message> {
        let mut got = Vec::new();
        while got.len() < n {
            let next = tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .expect("the writer wrote")
                .expect("a frame");
            if let Incoming::Message { payload, .. } = next {
                got.extend(decode_all(Encoding::Binary, &NumericIds, payload).map(Result::unwrap));
            }
        }
        got
    }

    fn describe(m: &Message) -> String {
        match m {
            Message::Data(d) => format!("data {}", d.id),
            Message::Close(c) => format!("close {}", c.id),
            Message::Connect(c) => format!("connect {}", c.id),
            other => other.kind().as_str().to_owned(),
        }
    }

    /// A binary session whose writer writes into a pipe, and the peer's reader of it;
    /// `_keep` holds the unused halves open.
    fn writer_under_test() -> (
        crate::tunnel::session::Session,
        Arc<SessionCore>,
        crate::transport::WsReader,
        impl Sized,
    ) {
        let (near, far) = tokio::io::duplex(1 << 20);
        let (unused, writer) =
            ws::split(Box::new(near), fastwebsockets::Role::Server, 1 << 20, None);
        let (reader, far_writer) =
            ws::split(Box::new(far), fastwebsockets::Role::Client, 4 << 20, None);
        let session = SessionCore::start(Encoding::Binary, writer, options());
        let core = session.core().clone();
        (session, core, reader, (unused, far_writer))
    }

    // One runtime thread: everything below is queued before the writer task first runs,
    // so the order on the wire is the writer's choice alone.
    #[tokio::test]
    async fn control_messages_overtake_queued_data_but_a_close_never_its_own() {
        let (session, core, mut reader, _keep) = writer_under_test();
        let (one, two): (Unsent, Unsent) = Default::default();
        for _ in 0..3 {
            core.send_ordered(data(1), &one).await.unwrap();
        }
        core.send_ordered(data(2), &two).await.unwrap();
        // Connection 2 still has data queued: its close waits behind it.
        core.send_close(ConnId(2), "done".into(), &two)
            .await
            .unwrap();
        // Connection 3 has none: its close, like every control message, goes first.
        let none = Unsent::default();
        core.send_close(ConnId(3), "reset".into(), &none)
            .await
            .unwrap();
        core.send(Message::Ping(Heartbeat::new(1))).await.unwrap();
        core.send(Message::Connect(Connect {
            id: ConnId(4),
            host: "example".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }))
        .await
        .unwrap();
        // A close sent without its connection's count is data-lane: never ahead.
        core.send(Message::Close(Close {
            id: ConnId(1),
            reason: "end".into(),
        }))
        .await
        .unwrap();
        let order: Vec<String> = received(&mut reader, 9)
            .await
            .iter()
            .map(describe)
            .collect();
        assert_eq!(
            order,
            [
                "close 3",
                "ping",
                "connect 4",
                "data 1",
                "data 1",
                "data 1",
                "data 2",
                "close 2",
                "close 1",
            ]
        );
        // Written data is no longer counted: the next close of connection 2 may go first.
        assert_eq!(two.get(), 0);
        assert_eq!(one.get(), 0);
        session.end().await;
    }

    // One runtime thread: the writer runs only when the test waits.
    #[tokio::test]
    async fn one_connection_never_fills_the_shared_data_lane() {
        use crate::tunnel::session::CONN_UNSENT;
        use futures_util::FutureExt;
        let (session, core, mut reader, _keep) = writer_under_test();
        let (bulk, other): (Unsent, Unsent) = Default::default();
        for _ in 0..CONN_UNSENT {
            core.send_ordered(data(1), &bulk).await.unwrap();
        }
        // The lane has room, but not for more of connection 1.
        let mut next = Box::pin(core.send_ordered(data(1), &bulk));
        assert!(
            (&mut next).now_or_never().is_none(),
            "connection 1 went past its bound"
        );
        // Anyone else still gets in.
        let queued = core.send_ordered(data(2), &other).now_or_never();
        assert!(matches!(queued, Some(Ok(()))), "connection 2 was held up");
        // Once the writer takes some of connection 1's, it may queue again.
        tokio::time::timeout(Duration::from_secs(10), next)
            .await
            .expect("connection 1 queued after the writer took some")
            .unwrap();
        let got = received(&mut reader, CONN_UNSENT as usize + 2).await;
        assert_eq!(got.len(), CONN_UNSENT as usize + 2);
        session.end().await;
    }
}
