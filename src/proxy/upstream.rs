//! What a [`super::Connector`] hands back: a connection toward the target, either
//! through an agent or dialed directly (the standalone proxy), with the meter that
//! counts what flows toward the user.

use std::sync::Arc;

use tokio::net::TcpStream;

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
}

impl Upstream {
    pub fn tunnel(conn: TunnelConn) -> Self {
        Upstream {
            route: Route::Tunnel(conn),
            meter: None,
            verdict: None,
        }
    }

    pub fn direct(stream: TcpStream) -> Self {
        Upstream {
            route: Route::Direct(stream),
            meter: None,
            verdict: None,
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
    pub async fn carry<S: LocalStream>(self, local: S) -> RelayStats {
        let meter = self.meter.as_deref();
        match self.route {
            Route::Tunnel(conn) => relay_metered(local, conn, meter).await,
            Route::Direct(remote) => super::direct::relay_direct(local, remote, meter).await,
        }
    }
}
