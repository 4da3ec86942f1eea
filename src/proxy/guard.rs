//! The policy in front of any [`Connector`]: every request is decided by the rules
//! before a connection is opened, and an allowed one carries its quota meter.

use std::sync::Arc;

use super::{ConnectError, Connector, Requester, TargetAddr, Upstream};
use crate::policy::{Policy, QuotaHandle, Request};
use crate::tunnel::{Meter, MeterCut};

impl Meter for QuotaHandle {
    fn admit(&self, n: usize) -> Result<(), MeterCut> {
        self.consume(n as u64).map_err(|e| MeterCut {
            allowed: e.allowed as usize,
            reason: e.to_string(),
        })
    }
}

/// Decides with `policy` (when there is one), then opens through `inner`.
pub struct PolicyGuard<C> {
    pub policy: Option<Arc<Policy>>,
    pub inner: Arc<C>,
}

impl<C: Connector> Connector for PolicyGuard<C> {
    async fn connect(
        &self,
        target: &TargetAddr,
        who: &Requester,
    ) -> Result<Upstream, ConnectError> {
        let Some(policy) = &self.policy else {
            return self.inner.connect(target, who).await;
        };
        let decision = policy.decide(&Request {
            client_ip: who.peer.ip(),
            user: who.user.as_deref(),
            host: &target.host,
            port: target.port,
            now: policy.now(),
        });
        let consulted: Vec<String> = decision
            .consulted
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        let verdict = match (&decision.reduced, decision.allow) {
            (Some(reduced), _) => format!("deny(unresolved: {reduced})"),
            (None, allow) => format!(
                "{}({})",
                if allow { "allow" } else { "deny" },
                consulted.join(",")
            ),
        };
        if !decision.allow {
            return Err(ConnectError::Forbidden(format!(
                "denied by policy: {verdict}"
            )));
        }
        let mut who = who.clone();
        who.user = decision.user.as_deref().map(str::to_owned).or(who.user);
        who.egress = decision.egress.clone();
        let mut upstream = self.inner.connect(target, &who).await?;
        upstream.meter = decision.quota.map(|q| Arc::new(q) as Arc<dyn Meter>);
        upstream.verdict = Some(Arc::from(verdict));
        Ok(upstream)
    }
}
