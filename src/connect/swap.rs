//! A connector a reload can replace while the listener runs: each connect uses the one
//! current when it starts (connections it already opened keep theirs).

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{ConnectError, Connector, Requester, Upstream};
use crate::net::HostPort;

pub struct Swappable<C> {
    current: ArcSwap<C>,
}

impl<C> Swappable<C> {
    pub fn new(inner: C) -> Self {
        Swappable {
            current: ArcSwap::from_pointee(inner),
        }
    }

    /// New connects use `inner` from now on.
    pub fn replace(&self, inner: C) {
        self.current.store(Arc::new(inner));
    }

    pub fn current(&self) -> Arc<C> {
        self.current.load_full()
    }
}

impl<C: Connector> Connector for Swappable<C> {
    async fn connect(&self, target: &HostPort, who: &Requester) -> Result<Upstream, ConnectError> {
        let inner = self.current.load_full();
        inner.connect(target, who).await
    }

    fn recheck(&self, target: &HostPort, who: &Requester) -> Result<(), ConnectError> {
        self.current.load().recheck(target, who)
    }
}
