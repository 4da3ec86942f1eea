//! The policy in front of any [`Connector`]: every request is decided by the rules
//! before a connection is opened, and an allowed one carries its quota.

use std::sync::Arc;

use crate::connect::{ConnectError, Connector, Requester, Upstream};
use crate::net::HostPort;
use crate::policy::{Policy, QuotaHandle, Request};
use crate::tunnel::{Quota, QuotaCut};

impl Quota for QuotaHandle {
    fn admit(&self, n: usize) -> Result<(), QuotaCut> {
        self.consume(n as u64).map_err(|e| QuotaCut {
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
    async fn connect(&self, target: &HostPort, who: &Requester) -> Result<Upstream, ConnectError> {
        let Some(policy) = &self.policy else {
            return self.inner.connect(target, who).await;
        };
        let decision = decide(policy, target, who)?;
        let who = decision.requester(who);
        let upstream = self.inner.connect(target, &who).await?;
        Ok(upstream
            .with_quota(decision.quota())
            .with_verdict(decision.verdict))
    }

    fn recheck(&self, target: &HostPort, who: &Requester) -> Result<(), ConnectError> {
        match &self.policy {
            Some(policy) => decide(policy, target, who).map(|_| ()),
            None => self.inner.recheck(target, who),
        }
    }
}

/// What the rules allowed a request with: who it is (a manager may name the user),
/// how it leaves, its download quota, and the verdict for the access line.
pub struct Allowed {
    user: Option<Arc<str>>,
    egress: crate::connect::Egress,
    quota: Option<QuotaHandle>,
    pub verdict: Arc<str>,
}

impl Allowed {
    /// `who` as the policy identified it.
    pub fn requester(&self, who: &Requester) -> Requester {
        let mut who = who.clone();
        who.user = self.user.as_deref().map(str::to_owned).or(who.user);
        who.egress = self.egress.clone();
        who
    }

    /// The quota the relay counts the user's downloaded bytes against.
    pub fn quota(&self) -> Option<Arc<dyn Quota>> {
        self.quota.clone().map(|q| Arc::new(q) as Arc<dyn Quota>)
    }
}

/// Runs the rules for one request (a TCP connection or a UDP flow, the same rules);
/// a denial names the managers reached (or the unresolved remainder of the rule).
pub fn decide(
    policy: &Policy,
    target: &HostPort,
    who: &Requester,
) -> Result<Allowed, ConnectError> {
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
    Ok(Allowed {
        user: decision.user,
        egress: decision.egress,
        quota: decision.quota,
        verdict: Arc::from(verdict),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::testing::{requester, Loopback};
    use crate::policy::PolicyOptions;

    const LAN_ONLY: &str = r#"
rules = "lan"
[[rangeIPM]]
name = "lan"
cidr = "10.0.0.0/8"
"#;

    async fn guard(policy: Option<&str>) -> PolicyGuard<Loopback> {
        PolicyGuard {
            policy: policy
                .map(|t| Arc::new(Policy::from_toml(t, PolicyOptions::default()).unwrap())),
            inner: Arc::new(Loopback::new().await),
        }
    }

    #[tokio::test]
    async fn the_rules_decide_before_anything_is_opened_and_the_verdict_rides_along() {
        let guard = guard(Some(LAN_ONLY)).await;
        let target = HostPort::new("example.com", 443);
        let allowed = guard
            .connect(&target, &requester("10.1.2.3:4000", "default"))
            .await;
        assert!(allowed.expect("inside the range").verdict().is_some());
        let denied = guard
            .connect(&target, &requester("192.168.1.1:4000", "default"))
            .await;
        let e = denied.err().expect("outside the range");
        assert_eq!(e.http_status(), 403, "{e}");
        assert!(guard
            .recheck(&target, &requester("192.168.1.1:4000", "default"))
            .is_err());
    }

    #[tokio::test]
    async fn without_a_policy_every_request_passes_unchanged() {
        let guard = guard(None).await;
        let up = guard
            .connect(
                &HostPort::new("example.com", 443),
                &requester("192.168.1.1:4000", "default"),
            )
            .await
            .expect("no policy, no refusal");
        assert!(up.verdict().is_none());
    }
}
