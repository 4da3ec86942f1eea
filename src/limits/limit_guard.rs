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
        let grant = self.limits.admit(who).await?;
        let upstream = self.inner.connect(target, who).await?;
        Ok(grant.attach(upstream))
    }

    fn recheck(&self, target: &HostPort, who: &Requester) -> Result<(), ConnectError> {
        self.inner.recheck(target, who)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::connect::testing::{requester, Loopback, Refusing};

    fn capped(max_concurrent: u32) -> Arc<Limits> {
        let config: LimitsConfig =
            yaml_serde::from_str(&format!("per_ip: {{ max_concurrent: {max_concurrent} }}"))
                .unwrap();
        Arc::new(Limits::new(&config, None))
    }

    #[tokio::test]
    async fn an_admitted_connection_holds_its_place_until_it_is_dropped() {
        let guard = LimitGuard {
            limits: capped(1),
            inner: Arc::new(Loopback::new().await),
        };
        let (target, who) = (
            HostPort::new("example.com", 80),
            requester("10.0.0.1:5000", "default"),
        );
        let first = guard
            .connect(&target, &who)
            .await
            .expect("the first is admitted");
        let refused = guard
            .connect(&target, &who)
            .await
            .err()
            .expect("the second is refused");
        assert_eq!(refused.code(), anyproxy_proto::ErrorCode::RateLimited);
        // Another address has a place of its own.
        let other = requester("10.0.0.2:5000", "default");
        assert!(guard.connect(&target, &other).await.is_ok());
        drop(first);
        assert!(
            guard.connect(&target, &who).await.is_ok(),
            "admitted again once the first ended"
        );
    }

    #[tokio::test]
    async fn a_connection_the_inner_layer_refuses_gives_its_place_back() {
        let guard = LimitGuard {
            limits: capped(1),
            inner: Arc::new(Refusing(ConnectError::Refused("nothing listens".into()))),
        };
        let (target, who) = (
            HostPort::new("example.com", 80),
            requester("10.0.0.1:5000", "default"),
        );
        for _ in 0..3 {
            let e = guard.connect(&target, &who).await.err().unwrap();
            assert!(matches!(e, ConnectError::Refused(_)), "{e}");
        }
    }
}
