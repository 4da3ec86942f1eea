//! What a [`super::Connector`] hands back: a connection toward the target, either
//! through an agent or dialed directly (the standalone proxy), with the meter that
//! counts what flows toward the user.

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::limits::Grant;
use crate::tunnel::relay::LocalStream;
use crate::tunnel::{relay_metered, Meter, RelayStats, TunnelConn};

pub enum Route {
    /// Through an agent session.
    Tunnel(TunnelConn),
    /// Dialed by this process.
    Direct(TcpStream),
}

pub struct Upstream {
    pub route: Route,
    /// Counts bytes toward the user (a download quota); `None` is unmetered.
    pub meter: Option<Arc<dyn Meter>>,
    /// The policy's verdict for the access log, when a policy decided.
    pub verdict: Option<Arc<str>>,
    /// Places under the connection caps and bandwidth budgets, held until the relay
    /// ends (`gateway.limits`); empty by default.
    pub limits: Grant,
}

impl Upstream {
    pub fn tunnel(conn: TunnelConn) -> Self {
        Upstream {
            route: Route::Tunnel(conn),
            meter: None,
            verdict: None,
            limits: Grant::default(),
        }
    }

    pub fn direct(stream: TcpStream) -> Self {
        Upstream {
            route: Route::Direct(stream),
            meter: None,
            verdict: None,
            limits: Grant::default(),
        }
    }

    /// Who carries the connection, for the access log: the agent, or `direct`.
    pub fn via(&self) -> Arc<str> {
        match &self.route {
            Route::Tunnel(conn) => conn.session().peer_arc(),
            Route::Direct(_) => Arc::from("direct"),
        }
    }

    /// Relays between the user's `local` socket and the target until both directions
    /// end (half-close is carried), or either side fails.
    /// The grant (and so the connection's places under the caps) is released when
    /// this returns, or if the relay's task is dropped or panics.
    pub async fn carry<S: LocalStream>(self, local: S) -> RelayStats {
        let meter = self.meter.as_deref();
        match self.route {
            Route::Tunnel(conn) => relay_metered(local, conn, meter, self.limits.pace()).await,
            // The standalone proxy has no `limits` configuration: nothing to pace.
            Route::Direct(remote) => super::direct::relay_direct(local, remote, meter).await,
        }
    }
}
