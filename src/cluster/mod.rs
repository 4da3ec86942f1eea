//! The cluster: gateways that share their state through one Redis (`gateway.cluster`).
//! This part knows the store and the shape of what is shared (membership, connection
//! slots, lockouts, budget leases, named records); the parts above decide what to ask
//! and what to do when the store does not answer.
//!
//! Everything here is one round trip per decision (a Lua script), bounded by the
//! configured timeout; nothing waits on the store on a read or write of user data.

mod keys;
mod nodes;
mod scripts;
mod slots;
mod store;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use crate::config::{ClusterConfig, StoreFailureMode};
pub use keys::Keys;
pub use nodes::{NodeAgent, NodeInfo, NodeReport};
pub use slots::{Check, Refusal};
pub use store::{Store, StoreError, StoreHealth};

/// One gateway's membership of the cluster.
pub struct Cluster {
    pub store: Store,
    pub keys: Keys,
    pub node_id: String,
    /// This process in the store: `node_id` and a boot id.
    pub member: String,
    pub mode: StoreFailureMode,
    /// The share of a byte budget one lease takes (`budget_slice`).
    pub budget_slice: f64,
    lease: Duration,
    started_at: u64,
    slots: slots::LocalSlots,
    /// The live members as last read (after each heartbeat), for the status page and
    /// the metrics, which must not wait on the store.
    view: parking_lot::Mutex<Vec<NodeInfo>>,
}

impl Cluster {
    /// Joins the cluster of `config` (lazily: the store may be down at start).
    /// `default_node_id` names this node when the config does not.
    pub fn open(config: &ClusterConfig, default_node_id: &str) -> Result<Arc<Cluster>, StoreError> {
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| default_node_id.to_owned());
        Ok(Arc::new(Cluster {
            store: Store::open(config)?,
            keys: Keys::new(&config.key_prefix),
            member: nodes::member_name(&node_id),
            node_id,
            mode: config.on_store_failure,
            budget_slice: config.budget_slice,
            lease: config.lease(),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            slots: slots::LocalSlots::default(),
            view: parking_lot::Mutex::default(),
        }))
    }

    /// How long a dead member's slots may still count: its lease, plus the heartbeat
    /// period in which it may have renewed just before dying.
    pub fn dead_node_bound(&self) -> Duration {
        self.lease + self.heartbeat_period()
    }

    fn heartbeat_period(&self) -> Duration {
        self.lease / 3
    }

    fn slot_ttl_ms(&self) -> u64 {
        (self.lease * 3).as_millis() as u64
    }

    /// Renews this member's lease and repairs its slot counts every third of the
    /// lease, until `stop`; then leaves the cluster, freeing its slots at once.
    pub async fn run(self: Arc<Self>, report: Arc<dyn NodeReport>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.heartbeat_period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.store.recovered() => {}
                _ = stop.cancelled() => break,
            }
            // Failures are logged once per transition by the store's health.
            if self.heartbeat(report.as_ref()).await.is_ok() {
                if let Ok(nodes) = self.live_nodes().await {
                    *self.view.lock() = nodes;
                }
            }
        }
        let _ = self.leave().await;
    }

    async fn heartbeat(&self, report: &dyn NodeReport) -> Result<(), StoreError> {
        let info = NodeInfo {
            node_id: self.node_id.clone(),
            member: self.member.clone(),
            started_at: self.started_at,
            agents: report.agents(),
        };
        let json = serde_json::to_string(&info).unwrap_or_default();
        let (nodes, info_key) = (self.keys.nodes(), self.member_key());
        let lease_ms = self.lease.as_millis() as u64;
        self.store
            .run(|mut c| async move {
                scripts::HEARTBEAT
                    .key(nodes)
                    .key(info_key)
                    .arg(&self.member)
                    .arg(lease_ms)
                    .arg(json)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await?;
        self.repair_slots().await
    }

    /// Rewrites this member's counts from its own table (see `slots`).
    async fn repair_slots(&self) -> Result<(), StoreError> {
        let (held, emptied) = self.slots.snapshot();
        if held.is_empty() && emptied.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, n) in &held {
            pipe.hset(key, &self.member, *n).ignore();
            pipe.pexpire(key, self.slot_ttl_ms() as i64).ignore();
        }
        for key in &emptied {
            pipe.hdel(key, &self.member).ignore();
        }
        let result = self
            .store
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await;
        if result.is_err() {
            self.slots.retry_emptied(emptied);
        }
        result
    }

    /// Leaves the cluster: the registration goes, and so do this member's slots.
    async fn leave(&self) -> Result<(), StoreError> {
        let (held, emptied) = self.slots.snapshot();
        let mut pipe = redis::pipe();
        pipe.zrem(self.keys.nodes(), &self.member).ignore();
        pipe.del(self.member_key()).ignore();
        for key in held.iter().map(|(k, _)| k).chain(&emptied) {
            pipe.hdel(key, &self.member).ignore();
        }
        self.store
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    fn member_key(&self) -> String {
        format!("{}{}", self.keys.node_prefix(), self.member)
    }

    /// Every live member's registration.
    pub async fn live_nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let (nodes, prefix) = (self.keys.nodes(), self.keys.node_prefix());
        let raw: Vec<String> = self
            .store
            .run(|mut c| async move {
                scripts::LIVE_NODES
                    .key(nodes)
                    .arg(prefix)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let mut out: Vec<NodeInfo> = raw
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id).then(a.member.cmp(&b.member)));
        Ok(out)
    }

    /// Admits one connection under `checks`, all or none, in one round trip. An
    /// admitted connection holds [`Slots`] until it ends.
    pub async fn admit(
        self: &Arc<Self>,
        checks: &[Check],
    ) -> Result<Result<Slots, Refusal>, StoreError> {
        let concurrent: Vec<String> = checks
            .iter()
            .filter(|c| matches!(c, Check::Concurrent { .. }))
            .map(|c| c.key().to_owned())
            .collect();
        // Counted here first, so that a repair racing this admission over-counts for a
        // moment rather than under-counts.
        let slots = Slots {
            cluster: self.clone(),
            keys: concurrent,
        };
        for k in &slots.keys {
            self.slots.hold(k);
        }
        let mut invocation = scripts::ADMIT.key(self.keys.nodes());
        invocation.arg(&self.member).arg(self.slot_ttl_ms());
        for check in checks {
            invocation.key(check.key());
            match check {
                Check::Concurrent { limit, .. } => invocation.arg("c").arg(*limit).arg(0),
                Check::Rate { per_sec, burst, .. } => invocation.arg("r").arg(*per_sec).arg(*burst),
            };
        }
        let answer: Vec<u64> = match self
            .store
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
        {
            Ok(a) => a,
            Err(e) => {
                slots.forget();
                return Err(e);
            }
        };
        match answer.as_slice() {
            [1] => Ok(Ok(slots)),
            [0, index, open] => {
                slots.forget();
                Ok(Err(Refusal {
                    index: *index as usize,
                    open: *open,
                }))
            }
            _ => {
                slots.forget();
                Err(StoreError::Redis(redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "admission script answered out of shape",
                ))))
            }
        }
    }

    /// Whether `ip` is locked out of `scope`'s password checks.
    pub async fn is_locked(&self, scope: &str, ip: IpAddr) -> Result<bool, StoreError> {
        let key = self.keys.auth_locked(scope, &ip.to_canonical().to_string());
        self.store
            .run(|mut c| async move { c.exists(key).await })
            .await
    }

    /// Counts a failed check of `ip`; true when it locked the address out.
    pub async fn auth_failure(
        &self,
        scope: &str,
        ip: IpAddr,
        max_failures: u32,
        window: Duration,
        lockout: Duration,
    ) -> Result<bool, StoreError> {
        let ip = ip.to_canonical().to_string();
        let (failures, locked) = (
            self.keys.auth_failures(scope, &ip),
            self.keys.auth_locked(scope, &ip),
        );
        self.store
            .run(|mut c| async move {
                scripts::AUTH_FAILURE
                    .key(failures)
                    .key(locked)
                    .arg(max_failures.max(1))
                    .arg(window.as_millis().max(1) as u64)
                    .arg(lockout.as_millis().max(1) as u64)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|n| n == 1)
    }

    /// A successful check clears the address's failures.
    pub async fn auth_success(&self, scope: &str, ip: IpAddr) -> Result<(), StoreError> {
        let key = self
            .keys
            .auth_failures(scope, &ip.to_canonical().to_string());
        self.store
            .run(|mut c| async move { c.del(key).await })
            .await
    }

    /// Leases up to `want` bytes of `key`'s budget of `per_sec` bytes per second,
    /// of which at most `burst` accumulate while nobody leases: every node draws from
    /// the same bucket, one round trip per lease.
    pub async fn lease_budget(
        &self,
        key: &str,
        per_sec: u64,
        burst: u64,
        want: u64,
    ) -> Result<BudgetLease, StoreError> {
        let key = key.to_owned();
        let (per_sec, burst) = (per_sec.max(1), burst.max(1));
        let (granted, retry_ms): (u64, u64) = self
            .store
            .run(|mut c| async move {
                scripts::LEASE_BUDGET
                    .key(key)
                    .arg(per_sec)
                    .arg(burst)
                    .arg(want)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(BudgetLease {
            granted: granted.min(want),
            retry_after: Duration::from_millis(retry_ms.min(60_000)),
        })
    }

    /// How many members the cluster had at the last successful look, at least 1 (this
    /// one): kept through a store outage, unlike [`Cluster::view`].
    pub fn members_last_seen(&self) -> usize {
        self.view.lock().len().max(1)
    }

    /// The live members as of the last heartbeat (empty while the store is down).
    pub fn view(&self) -> Vec<NodeInfo> {
        if self.store.health.is_up() {
            self.view.lock().clone()
        } else {
            Vec::new()
        }
    }

    /// Connections this member holds under cluster-wide caps.
    pub fn slots_held(&self) -> usize {
        self.slots.held()
    }
}

/// What one lease of a budget got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLease {
    /// Bytes granted, at most the bytes asked for; 0 when the budget is spent.
    pub granted: u64,
    /// When short: how long until the shortfall is back in the budget (if nobody else
    /// takes it first).
    pub retry_after: Duration,
}

/// The places one connection holds under cluster-wide concurrent caps; dropping it
/// gives them back (in a task: a drop cannot wait for the store, and a release lost to
/// a store outage is repaired by the next heartbeat).
pub struct Slots {
    cluster: Arc<Cluster>,
    keys: Vec<String>,
}

impl Slots {
    /// Undoes the local count of an admission that did not happen.
    fn forget(mut self) {
        for k in std::mem::take(&mut self.keys) {
            self.cluster.slots.release(&k);
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.keys);
        for k in &keys {
            self.cluster.slots.release(k);
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // shutting down: the lease ends, and with it these slots
        };
        let cluster = self.cluster.clone();
        rt.spawn(async move {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.hincr(k, &cluster.member, -1).ignore();
            }
            let _ = cluster
                .store
                .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await;
        });
    }
}
