//! One tunnelled connection as its relay holds it, and the guard that releases a
//! connection nobody relays.

use std::sync::Arc;

use anyproxy_proto::{Close, ConnId, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::writer::Lane;
use super::{Outbound, SessionCore, Unsent};
use crate::tunnel::flow::{Inbox, SendCredit};

/// One open tunnelled connection, held by its relay.
pub struct TunnelConn {
    pub id: ConnId,
    pub(crate) core: Arc<SessionCore>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) credit: Arc<SendCredit>,
    pub(crate) unsent: Unsent,
    pub(crate) cancel: CancellationToken,
    pub(crate) guard: AbandonGuard,
}

impl TunnelConn {
    pub fn session(&self) -> &Arc<SessionCore> {
        &self.core
    }

    /// For a caller that releases the id itself (and answers the peer its own way).
    pub fn disarm(mut self) {
        self.guard.armed = false;
    }
}

/// Releases a connection nobody relays: a `TunnelConn` dropped on an error path, or an
/// `open` whose caller gave up. Without it the slot (and the agent's target socket and
/// capacity permit) would live until the session ends.
pub(crate) struct AbandonGuard {
    pub(crate) id: ConnId,
    pub(crate) core: Arc<SessionCore>,
    pub(crate) armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.armed || !self.core.forget(self.id) {
            return;
        }
        let close = Message::Close(Close {
            id: self.id,
            reason: "abandoned".into(),
        });
        // Nobody relayed it, so none of its data is queued: the control lane.
        if let Err(mpsc::error::TrySendError::Full(item)) =
            self.core.ctl.try_send(Outbound::Msg(close))
        {
            // The writer is behind: queue it from a task rather than lose it.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let core = self.core.clone();
                rt.spawn(async move {
                    let _ = core.send_in(Lane::Control, item).await;
                });
            }
        }
    }
}
