//! What a [`super::Connector`] hands back: a connection toward the target, either
//! through an agent or dialed directly (the standalone proxy), with what the layers
//! that admitted it attached: the meter that counts what flows toward the user, the
//! policy's verdict, and the places under the limits it holds until its relay ends.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::Access;
use crate::tunnel::relay::{relay_direct, relay_tunnel, LocalStream, Pace};
use crate::tunnel::{DirectTimeouts, Quota, RelayStats, Revoke, TunnelConn};

pub enum Route {
    /// Through an agent session.
    Tunnel(TunnelConn),
    /// Dialed by this process, with the bounds its relay keeps.
    Direct(TcpStream, DirectTimeouts),
}

/// Something a layer keeps alive for as long as the connection is relayed (a place
/// under a connection cap is freed when it drops), and that may pace its bytes.
pub trait Hold: Send + Sync {
    /// What paces this connection's bytes; `None` when no bandwidth cap applies.
    fn pace(&self) -> Option<&dyn Pace> {
        None
    }
}

pub struct Upstream {
    route: Route,
    /// Counts bytes toward the user (a download quota); `None` is unmetered.
    quota: Option<Arc<dyn Quota>>,
    /// The policy's verdict for the access log, when a policy decided.
    verdict: Option<Arc<str>>,
    /// The limits' admission, held until the relay ends; `None` when no limit applies.
    hold: Option<Box<dyn Hold>>,
    /// The user's hold on their access: a reload that removes them ends the relay.
    revoke: Option<Revoke>,
}

impl Upstream {
    pub fn tunnel(conn: TunnelConn) -> Self {
        Self::new(Route::Tunnel(conn))
    }

    pub fn direct(stream: TcpStream) -> Self {
        Self::new(Route::Direct(stream, DirectTimeouts::default()))
    }

    /// Dialed by this process; its relay closes it on a stall as `timeouts` say.
    pub fn direct_within(stream: TcpStream, timeouts: DirectTimeouts) -> Self {
        Self::new(Route::Direct(stream, timeouts))
    }

    fn new(route: Route) -> Self {
        Upstream {
            route,
            quota: None,
            verdict: None,
            hold: None,
            revoke: None,
        }
    }

    /// Counts (and may cut) what flows toward the user.
    pub fn with_quota(mut self, quota: Option<Arc<dyn Quota>>) -> Self {
        self.quota = quota;
        self
    }

    /// Records the policy's verdict for the access log.
    pub fn with_verdict(mut self, verdict: Arc<str>) -> Self {
        self.verdict = Some(verdict);
        self
    }

    /// Keeps `hold` until the relay ends.
    pub fn with_hold(mut self, hold: Box<dyn Hold>) -> Self {
        self.hold = Some(hold);
        self
    }

    /// Ends the relay when `revoke` is revoked (the user removed by a reload).
    pub fn with_revoke(mut self, revoke: Option<Revoke>) -> Self {
        self.revoke = revoke;
        self
    }

    pub fn route(&self) -> &Route {
        &self.route
    }

    pub fn verdict(&self) -> Option<&Arc<str>> {
        self.verdict.as_ref()
    }

    /// Who carries the connection, for the access log: the agent, or `direct`.
    pub fn via(&self) -> Arc<str> {
        match &self.route {
            Route::Tunnel(conn) => conn.session().peer_arc(),
            Route::Direct(..) => Arc::from("direct"),
        }
    }

    /// [`Self::relay`], then writes `access` with who carried the connection, the
    /// policy's verdict and the bytes each way.
    pub async fn relay_logged<S: LocalStream>(self, local: S, access: Access<'_>) -> RelayStats {
        let (via, verdict) = (self.via(), self.verdict.clone());
        let stats = self.relay(local).await;
        access.via(&via).policy(verdict.as_deref()).relayed(stats);
        stats
    }

    /// Relays between the user's `local` socket and the target until both directions
    /// end (half-close is carried), or either side fails.
    /// The hold (and so the connection's places under the caps) is released when
    /// this returns, or if the relay's task is dropped or panics.
    pub async fn relay<S: LocalStream>(self, local: S) -> RelayStats {
        let quota = self.quota.as_deref();
        let pace = self.hold.as_deref().and_then(|h| h.pace());
        let revoke = self.revoke.as_ref();
        match self.route {
            Route::Tunnel(conn) => relay_tunnel(local, conn, quota, pace, revoke).await,
            Route::Direct(remote, timeouts) => {
                relay_direct(local, remote, quota, pace, timeouts, revoke).await
            }
        }
    }
}
