//! Incoming messages: the read loop, what both sides do with each message (data into
//! a connection's inbox, credit, half-close, answers to `connect`, heartbeats), and the
//! [`Role`] that handles what only one side may receive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyproxy_proto::{
    binary, json, Close, ConnId, ConnIdMap, ConnectResponse, Data, Encoding, ErrorCode, ErrorMsg,
    Fin, Message, WindowUpdate,
};
use bytes::Bytes;

use super::{is_going_away, ConnectFailure, Outbound, SessionCore, SessionEnd};
use crate::transport::ws::close_code;
use crate::transport::{Incoming, WsReader};
use crate::tunnel::flow::{InboxEnd, PushError, Pushed, PROGRESS_WINDOW};
use crate::tunnel::stats::bump;

/// What differs between the gateway and the agent: the messages only one side may
/// receive (`connect` on the agent, `forward` on the gateway; anything else there is
/// answered as unexpected).
pub trait Role: Send + Sync {
    fn on_message(
        &self,
        session: &Arc<SessionCore>,
        msg: Message,
    ) -> impl Future<Output = ()> + Send;
}

impl SessionCore {
    /// Handles one decoded message that is common to both roles. Returns the message
    /// back when the role must handle it (`connect`, `auth`, `auth_response`).
    pub async fn dispatch(&self, msg: Message) -> Option<Message> {
        match msg {
            Message::Data(Data { id, payload }) => {
                if let Err(payload) = self.datagrams().deliver(id, payload) {
                    self.deliver(id, payload).await;
                }
                None
            }
            Message::Close(Close { id, reason }) => {
                self.datagrams().closed_by_peer(id, &reason);
                if let Some(slot) = self.conns.remove(&id) {
                    tracing::debug!(conn = %id, %reason, "closed by peer");
                    if let Some(p) = slot.pending {
                        let _ = p.send(Err(ConnectFailure {
                            code: ErrorCode::ConnectionFailed,
                            message: reason,
                        }));
                    }
                    // The relay still delivers what was queued, then ends. In JSON mode
                    // `close` is the only way a stream ends, so it counts as a finish.
                    slot.inbox.end(if self.flow_controlled() {
                        InboxEnd::Reset
                    } else {
                        InboxEnd::Finished
                    });
                }
                // Whatever we still queued for it goes out first (FIFO), then its
                // string is forgotten.
                self.send_soon(Outbound::Release(id));
                None
            }
            Message::WindowUpdate(WindowUpdate { id, increment }) => {
                if self.refuse_in_json("window_update").await {
                    return None;
                }
                // Unknown ids are normal: the connection may have just ended here.
                if let Some(credit) = self.conns.with(&id, |s| s.credit.clone()) {
                    credit.grant(u64::from(increment));
                }
                None
            }
            Message::Fin(Fin { id }) => {
                if self.refuse_in_json("fin").await {
                    return None;
                }
                if let Some(inbox) = self.conns.with(&id, |s| s.inbox.clone()) {
                    inbox.end(InboxEnd::Finished);
                }
                None
            }
            Message::ConnectResponse(ConnectResponse {
                id,
                success,
                message,
            }) => {
                self.resolve(id, success, ErrorCode::ConnectionFailed, message);
                None
            }
            Message::Error(ErrorMsg {
                code,
                message,
                id: Some(id),
            }) => {
                if !self.resolve(id, false, code, message.clone()) {
                    tracing::warn!(conn = %id, %code, %message, "peer reported an error");
                }
                None
            }
            Message::Error(ErrorMsg {
                code: ErrorCode::InternalError,
                message,
                id: None,
            }) if is_going_away(&message) => {
                tracing::info!(%message, conns = self.active_conns(), "peer is going away");
                self.peer_going_away.cancel();
                None
            }
            Message::Error(ErrorMsg {
                code,
                message,
                id: None,
            }) => {
                tracing::warn!(%code, %message, "peer reported an error");
                None
            }
            Message::Ping(h) => {
                let _ = self.send(Message::Pong(h)).await;
                None
            }
            Message::Pong(h) => {
                // A foreign peer's non-integer timestamp never matches one of ours.
                self.pong_received(h.integer());
                None
            }
            other @ (Message::Connect(_) | Message::Auth(_) | Message::AuthResponse(_)) => {
                Some(other)
            }
            other @ (Message::Forward(_) | Message::ForwardResponse(_) | Message::Unforward(_)) => {
                if self.refuse_in_json(other.kind().as_str()).await {
                    return None;
                }
                Some(other)
            }
        }
    }

    /// Flow-control and half-close messages exist only in binary mode; a JSON-mode peer
    /// that sends them is told so. Returns true when the message was refused.
    async fn refuse_in_json(&self, kind: &str) -> bool {
        if self.flow_controlled() {
            return false;
        }
        self.reply_error(
            ErrorCode::InvalidMessage,
            format!("{kind} is only valid in binary mode"),
            None,
        )
        .await;
        true
    }

    /// Settles a pending `open`. Returns false when nothing was pending for `id`.
    fn resolve(&self, id: ConnId, success: bool, code: ErrorCode, message: String) -> bool {
        let Some(message) = self.datagrams().resolve(id, success, code, message) else {
            return true;
        };
        let pending = self.conns.with(&id, |slot| slot.pending.take()).flatten();
        let Some(pending) = pending else {
            return false;
        };
        if success {
            let _ = pending.send(Ok(()));
        } else {
            self.conns.remove(&id);
            let _ = pending.send(Err(ConnectFailure { code, message }));
        }
        true
    }

    /// Hands a payload to its connection's inbox.
    ///
    /// Binary mode never waits: the peer may only send what we granted, so the inbox
    /// has room by construction, and a peer that oversteps has that one connection
    /// reset. JSON mode has no credit: past its cap a connection makes the reader wait
    /// only while its local socket keeps taking data (see
    /// [`crate::tunnel::flow::QueueCap`]); one that stopped is given its payloads up to
    /// twice the cap without waiting, and closed beyond that, so a user who stopped
    /// reading costs the others on the session one [`PROGRESS_WINDOW`] at most.
    async fn deliver(&self, id: ConnId, payload: Bytes) {
        let Some((inbox, cancel)) = self
            .conns
            .with(&id, |s| (s.inbox.clone(), s.cancel.clone()))
        else {
            // After whatever we still queued for it (its relay's last data and close).
            self.send_soon(Outbound::Msg(Message::Close(Close {
                id,
                reason: "unknown connection".into(),
            })));
            return;
        };
        if !self.flow_controlled() {
            tokio::select! {
                _ = inbox.make_room(payload.len(), PROGRESS_WINDOW) => {}
                _ = cancel.cancelled() => return,
            }
        }
        match inbox.push(payload) {
            Ok(Pushed::Queued) => {}
            Ok(Pushed::OverCap) => bump(&self.stats.json_stalls, 1),
            Err(e @ PushError::Overfull { .. }) => {
                self.close_stalled(id, &e.to_string()).await;
            }
            // A JSON-mode inbox only ends when its slot is gone, and then the relay no
            // longer reads it: nothing to report.
            Err(PushError::AfterEnd) if !self.flow_controlled() => {}
            Err(e) => self.reset(id, &e).await,
        }
    }

    /// Answers a message that could not be decoded. One that names a live connection
    /// fails that connection at once, with the reason, rather than leave its user
    /// waiting; the session goes on.
    async fn undecodable(&self, e: anyproxy_proto::DecodeError) {
        tracing::warn!(error = %e, "undecodable message from peer");
        let id = e.conn_id();
        self.reply_error(e.code(), e.to_string(), id).await;
        let Some(id) = id else { return };
        match self.conns.remove(&id) {
            Some(slot) => {
                slot.cancel.cancel();
                if let Some(p) = slot.pending {
                    let _ = p.send(Err(ConnectFailure {
                        code: e.code(),
                        message: e.to_string(),
                    }));
                }
                let _ = self.send_close(id, e.to_string(), &slot.unsent).await;
            }
            // An id the decoder interned only for this error: forget it again.
            None => self.send_soon(Outbound::Release(id)),
        }
    }

    /// Resets one connection because its peer broke the flow-control or half-close
    /// rules. Only that connection suffers.
    async fn reset(&self, id: ConnId, why: &PushError) {
        let Some(slot) = self.conns.remove(&id) else {
            return;
        };
        slot.cancel.cancel();
        tracing::warn!(conn = %id, error = %why, "resetting a connection whose peer broke the protocol");
        self.reply_error(ErrorCode::InvalidMessage, why.to_string(), Some(id))
            .await;
        let _ = self.send_close(id, why.to_string(), &slot.unsent).await;
    }

    /// Reads and dispatches messages until the socket closes, fails or stays silent
    /// for `idle_timeout`. Messages only a role can handle go to `role`.
    pub async fn read_loop<R: Role>(
        self: &Arc<Self>,
        reader: &mut WsReader,
        idle_timeout: Duration,
        role: &R,
    ) -> SessionEnd {
        loop {
            let incoming = tokio::select! {
                r = tokio::time::timeout(idle_timeout, reader.next()) => r,
                _ = self.closed.cancelled() => return SessionEnd::Shutdown,
            };
            let incoming = match incoming {
                Err(_) => return SessionEnd::IdleTimeout(idle_timeout),
                Ok(Err(e)) => {
                    let code = e.close_code();
                    let _ = self.out.try_send(Outbound::WsClose(code, e.to_string()));
                    return SessionEnd::Error(e);
                }
                Ok(Ok(i)) => i,
            };
            match incoming {
                Incoming::Message { payload, .. } => {
                    for decoded in decode_all(self.encoding, &*self.ids, payload) {
                        match decoded {
                            Ok(msg) => {
                                self.stats.received(msg.kind());
                                if let Message::Error(e) = &msg {
                                    self.stats.error_received(e.code);
                                }
                                if let Some(role_msg) = self.dispatch(msg).await {
                                    role.on_message(self, role_msg).await;
                                }
                            }
                            Err(e) => self.undecodable(e).await,
                        }
                    }
                }
                Incoming::Ping(p) => {
                    let _ = self.send_raw(Outbound::WsPong(p)).await;
                }
                Incoming::Pong => self.pong_received(None),
                Incoming::Close { code, reason } => {
                    let _ = self
                        .out
                        .try_send(Outbound::WsClose(close_code::NORMAL, String::new()));
                    return SessionEnd::PeerClosed { code, reason };
                }
            }
        }
    }

    /// Reads until the first protocol message, answering WebSocket pings meanwhile.
    pub async fn first_message(&self, reader: &mut WsReader) -> FirstMessage {
        loop {
            match reader.next().await {
                Err(e) => return FirstMessage::Gone(e.to_string()),
                Ok(Incoming::Ping(p)) => {
                    let _ = self.send_raw(Outbound::WsPong(p)).await;
                }
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close { code, reason }) => {
                    return FirstMessage::Gone(format!(
                        "peer closed the WebSocket (code {code:?}, {reason:?})"
                    ))
                }
                Ok(Incoming::Message { payload, .. }) => {
                    let mut decoded = decode_all(self.encoding, &*self.ids, payload);
                    match decoded.next() {
                        None => continue,
                        Some(Err(e)) => return FirstMessage::Invalid(e.to_string()),
                        Some(Ok(first)) => {
                            let rest = decoded.filter_map(Result::ok).collect();
                            return FirstMessage::Message(first, rest);
                        }
                    }
                }
            }
        }
    }
}

/// The first message of a session, read before the role's loop starts.
pub enum FirstMessage {
    /// The first message, and any that arrived with it in the same WebSocket message.
    Message(Message, Vec<Message>),
    /// It could not be decoded.
    Invalid(String),
    /// The socket closed or failed first.
    Gone(String),
}

/// Decodes every message in one WebSocket message (binary mode may carry several);
/// JSON ids are read through `ids`.
pub fn decode_all<'a>(
    encoding: Encoding,
    ids: &'a (dyn ConnIdMap + Send + Sync),
    payload: Bytes,
) -> impl Iterator<Item = Result<Message, anyproxy_proto::DecodeError>> + 'a {
    let (json_msg, frames) = match encoding {
        Encoding::Json => (Some(json::decode_with(&payload, ids)), None),
        Encoding::Binary => (None, Some(binary::Frames::new(payload))),
    };
    json_msg.into_iter().chain(frames.into_iter().flatten())
}
