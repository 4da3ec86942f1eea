//! A hold on live connections that a reload can take away: the proxy user's (revoked
//! when a reload removes them) or an agent connection's (revoked when a reload forbids
//! its target).

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// A hold on live connections: revoked once, with the reason the access log
/// gives. Clones share it (one per proxy user, or one per agent connection). The
/// relays wait on it beside the idle watchdog: nothing is added per byte.
#[derive(Clone, Debug, Default)]
pub struct Revoke {
    token: CancellationToken,
    reason: Arc<OnceLock<&'static str>>,
}

impl Revoke {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends every relay holding this, with `reason` (the first one given wins).
    pub fn revoke(&self, reason: &'static str) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn is_revoked(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves with the reason once revoked; never without a hold.
    pub async fn wait(revoke: Option<&Revoke>) -> &'static str {
        let Some(r) = revoke else {
            return std::future::pending().await;
        };
        r.token.cancelled().await;
        r.reason
            .get()
            .copied()
            .unwrap_or("access revoked by a reload")
    }
}

impl PartialEq for Revoke {
    /// The same hold, not an equal one.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.reason, &other.reason)
    }
}

impl Eq for Revoke {}

impl Revoke {
    /// Whether something besides this handle still holds it (a live connection).
    pub fn is_held(&self) -> bool {
        Arc::strong_count(&self.reason) > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clones_share_one_revocation_and_its_first_reason() {
        let a = Revoke::new();
        let b = a.clone();
        assert!(a.is_held() && a == b && a != Revoke::new());
        b.revoke("first");
        a.revoke("second");
        assert!(a.is_revoked());
        assert_eq!(Revoke::wait(Some(&a)).await, "first");
    }
}
