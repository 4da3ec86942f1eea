//! A password lockout that holds across the cluster: this node's own
//! [`AuthThrottle`] always counts, and with `gateway.cluster` the store counts too, so
//! that failures spread over several gateways lock an address out on all of them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::throttle::Params;
use super::AuthThrottle;
use crate::cluster::Cluster;
use crate::config::StoreFailureMode;

/// What a password check may do for an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Locked out (here or on another node): refused without checking.
    Locked,
    /// The store did not answer and `on_store_failure: closed`: refused.
    StoreDown,
}

/// What a refused address is told when the store is down in closed mode.
pub const STORE_DOWN: &str =
    "authentication unavailable (cluster store unreachable); try again later";

pub struct Lockout {
    local: AuthThrottle,
    shared: Option<Shared>,
}

struct Shared {
    cluster: Arc<Cluster>,
    /// Which password checks these are (`proxy`, `agent`): each scope locks apart.
    scope: &'static str,
    /// What the store is told to count with: this node's parameters.
    params: ArcSwap<Params>,
}

impl Lockout {
    pub fn new(
        max_failures: u32,
        window: Duration,
        lockout: Duration,
        cluster: Option<(&Arc<Cluster>, &'static str)>,
    ) -> Self {
        Lockout {
            local: AuthThrottle::new(max_failures, window, lockout),
            shared: cluster.map(|(cluster, scope)| Shared {
                cluster: cluster.clone(),
                scope,
                params: ArcSwap::from_pointee(Params {
                    max_failures,
                    window,
                    lockout,
                }),
            }),
        }
    }

    pub async fn gate(&self, ip: IpAddr) -> Gate {
        if self.local.is_locked(ip) {
            return Gate::Locked;
        }
        let Some(s) = &self.shared else {
            return Gate::Open;
        };
        match s.cluster.is_locked(s.scope, ip).await {
            Ok(true) => Gate::Locked,
            Ok(false) => Gate::Open,
            Err(_) => {
                s.cluster.store.health.decided_without_store();
                match s.cluster.mode {
                    StoreFailureMode::Open => Gate::Open,
                    StoreFailureMode::Closed => Gate::StoreDown,
                }
            }
        }
    }

    /// Counts a failure here and in the store; true when it locked the address out.
    pub async fn failure(&self, ip: IpAddr) -> bool {
        let here = self.local.failure(ip);
        let Some(s) = &self.shared else {
            return here;
        };
        let p = **s.params.load();
        let there = s
            .cluster
            .auth_failure(s.scope, ip, p.max_failures, p.window, p.lockout)
            .await
            .unwrap_or(false);
        here || there
    }

    /// Takes new parameters (a reload), keeping the failures counted here; the
    /// store's counts are kept and read with the new parameters from the next failure.
    pub fn retune(&self, params: Params) {
        self.local.retune(params);
        if let Some(s) = &self.shared {
            s.params.store(Arc::new(params));
        }
    }

    /// Clears the address's failures; the store is told in the background, off the
    /// connection's path.
    pub fn success(&self, ip: IpAddr) {
        self.local.success(ip);
        if let Some(s) = &self.shared {
            let (cluster, scope) = (s.cluster.clone(), s.scope);
            tokio::spawn(async move {
                let _ = cluster.auth_success(scope, ip).await;
            });
        }
    }

    /// Addresses this node has locked out now.
    pub fn locked_count(&self) -> usize {
        self.local.locked_count()
    }
}
