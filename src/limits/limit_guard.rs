//! The limits in front of any [`Connector`]: a connection is admitted (or refused
//! with `RATE_LIMITED` and the reason) before anything is opened, and the upstream
//! keeps the admission until its relay ends.

use std::sync::Arc;

use super::Limits;
use crate::connect::{ConnectError, Connector, Requester, Upstream};
use crate::net::HostPort;

pub struct LimitGuard<C> {
    pub limits: Arc<Limits>,
    pub inner: Arc<C>,
}

impl<C: Connector> Connector for LimitGuard<C> {
    async fn connect(&self, target: &HostPort, who: &Requester) -> Result<Upstream, ConnectError> {
        let grant = self.limits.admit(who)?;
        let upstream = self.inner.connect(target, who).await?;
        Ok(grant.attach(upstream))
    }

    fn recheck(&self, target: &HostPort, who: &Requester) -> Result<(), ConnectError> {
        self.inner.recheck(target, who)
    }
}
