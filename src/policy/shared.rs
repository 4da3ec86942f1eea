//! The policy's state in the cluster store (`gateway.cluster`): `sessionIPM` sessions,
//! the JWT signing key and `dwnConsR` consumptions, so that a login through one gateway
//! holds on every gateway and a quota is one quota across the cluster.
//!
//! Decisions stay local and synchronous: `user_at` reads this node's session table and
//! `QuotaHandle::consume` this node's counters, with no store round trip per request or
//! per read. This module keeps those local views in step with the store:
//!
//! - Sessions: the store is the truth. `open`, `close` and `renew` write to the store
//!   first (one Lua script each, atomic across nodes), then to the local table. Every
//!   node re-reads the table every [`SYNC_PERIOD`] (one round trip that returns nothing
//!   unless a version changed), and every API command re-reads it before it runs, so a
//!   login through node A is honoured by node B's data path within one period.
//! - The JWT key: the first node to reach the store puts its key there (`SET NX`);
//!   every node signs with the stored key, so a token from A verifies on B.
//! - Consumptions: each node counts locally and flushes its deltas (`HINCRBY`) when
//!   [`FLUSH_BATCH`] bytes are pending or at every period, reading back the cluster's
//!   totals. A user is cut when the cluster total plus this node's unflushed bytes
//!   reaches the quota, so the cluster overshoots by at most what each node relayed
//!   since its last flush (about one batch per node). `lastReset` lives in the store.
//!
//! Store down: `open` keeps deciding from the local view and queues its session writes
//! for when the store is back; `closed` refuses what needs the store (`open`, `close`,
//! `renew`, `set`). Both keep the data path deciding from the local view.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use parking_lot::{Mutex, RwLock};
use redis::Script;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::cmd::{parse_addr, CmdError, Routed};
use super::jwt::JwtTokens;
use super::managers::dwn_cons_r::{DwnConsR, FlushSignal};
use super::managers::session_ipm::{Session, SessionIpm};
use super::token::{Claims, TokenCodec, TokenError};
use super::{Cmd, Policy};
use crate::cluster::{Cluster, StoreError};
use crate::config::StoreFailureMode;

/// How often every node re-reads sessions and flushes consumptions: the bound on how
/// late a session change made through another node reaches this node's data path.
pub const SYNC_PERIOD: Duration = Duration::from_secs(1);

/// Puts `user`'s session, replacing the user's old one and whoever had the address.
/// KEYS: sessions (user → JSON), addresses (ip → user), version. ARGV: user, ip, JSON,
/// new version.
static SESSION_PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, o = pcall(cjson.decode, old)
  if ok and type(o) == 'table' and o.ip and redis.call('HGET', KEYS[2], o.ip) == ARGV[1] then
    redis.call('HDEL', KEYS[2], o.ip)
  end
end
local other = redis.call('HGET', KEYS[2], ARGV[2])
if other and other ~= ARGV[1] then redis.call('HDEL', KEYS[1], other) end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
return 1
"#,
    )
});

/// Replaces (ARGV[3] = JSON) or ends (ARGV[3] = '') `user`'s session if it still has
/// the nonce `ARGV[2]`: 1 if it did, 0 if the session changed meanwhile.
/// KEYS: sessions, addresses, version. ARGV: user, nonce, JSON or '', new version.
static SESSION_CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local ok, o = pcall(cjson.decode, cur)
if not ok or type(o) ~= 'table' or o.nonce ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if o.ip and redis.call('HGET', KEYS[2], o.ip) == ARGV[1] then redis.call('HDEL', KEYS[2], o.ip) end
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
redis.call('SET', KEYS[3], ARGV[4])
return 1
"#,
    )
});

/// The sessions, unless the version is still the one this node has.
/// KEYS: sessions, version. ARGV: the version this node has.
static SESSION_SYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[2]) or ''
if v == ARGV[1] then return {v, false} end
return {v, redis.call('HGETALL', KEYS[1])}
"#,
    )
});

/// Adds this node's deltas and answers the cycle start and the cluster's totals.
/// KEYS: consumptions (user → bytes), last reset (Unix ms). ARGV: this node's last
/// reset (ms), '1' on this node's first sync (adopt the store's cycle), then user,
/// delta pairs. A node whose cycle is newer starts the store's new cycle; deltas of an
/// older cycle are dropped.
static QUOTA_SYNC: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local lr = redis.call('GET', KEYS[2])
local mine = tonumber(ARGV[1])
if not lr then
  redis.call('SET', KEYS[2], ARGV[1]); lr = ARGV[1]
elseif ARGV[2] ~= '1' and mine > tonumber(lr) then
  redis.call('DEL', KEYS[1]); redis.call('SET', KEYS[2], ARGV[1]); lr = ARGV[1]
end
if ARGV[2] == '1' or tonumber(lr) == mine then
  for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return {lr, redis.call('HGETALL', KEYS[1])}
"#,
    )
});

/// The cluster's JWT key: this node's, unless another node stored one first.
static JWT_KEY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
"#,
    )
});

/// A JWT codec whose key becomes the cluster's once the store answered. Tokens this
/// node signed with its own key (while the store was unreachable) still verify here:
/// the session table decides anyway.
pub struct SharedJwt {
    local: Arc<JwtTokens>,
    local_b64: String,
    shared: RwLock<Option<Arc<JwtTokens>>>,
}

impl SharedJwt {
    pub fn new(local: Arc<JwtTokens>, local_key: &[u8]) -> SharedJwt {
        SharedJwt {
            local,
            local_b64: STANDARD.encode(local_key),
            shared: RwLock::new(None),
        }
    }

    fn adopted(&self) -> bool {
        self.shared.read().is_some()
    }

    fn current(&self) -> Arc<JwtTokens> {
        self.shared
            .read()
            .clone()
            .unwrap_or_else(|| self.local.clone())
    }
}

impl TokenCodec for SharedJwt {
    fn encode(&self, claims: &Claims) -> String {
        self.current().encode(claims)
    }

    fn decode(&self, token: &str) -> Result<Claims, TokenError> {
        let shared = self.shared.read().clone();
        match shared {
            Some(s) => match s.decode(token) {
                Err(TokenError::BadSignature) => self.local.decode(token),
                r => r,
            },
            None => self.local.decode(token),
        }
    }
}

/// A session write taken without the store (`on_store_failure = "open"`), replayed
/// when the store is back.
enum Pending {
    Put(Session),
    Close { user: String, nonce: String },
}

/// This node's link between its policy and the store.
pub struct Shared {
    cluster: Arc<Cluster>,
    jwt: Option<Arc<SharedJwt>>,
    /// Lets the data path ask for a flush once a batch is pending.
    pub(crate) flush: Arc<FlushSignal>,
    /// The session table version this node has, per `sessionIPM`.
    versions: Mutex<HashMap<String, String>>,
    /// `dwnConsR`s that have synced once (and so follow the store's cycle).
    quota_synced: Mutex<HashMap<String, bool>>,
    pending: Mutex<Vec<(String, Pending)>>,
    warned_jwt: AtomicBool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn new_version() -> String {
    super::token::new_nonce()
}

impl Shared {
    pub fn new(cluster: Arc<Cluster>, jwt: Option<Arc<SharedJwt>>) -> Shared {
        Shared {
            cluster,
            jwt,
            flush: Arc::default(),
            versions: Mutex::default(),
            quota_synced: Mutex::default(),
            pending: Mutex::default(),
            warned_jwt: AtomicBool::new(false),
        }
    }

    fn mode(&self) -> StoreFailureMode {
        self.cluster.mode
    }

    fn key(&self, what: &str, name: &str) -> String {
        self.cluster.keys.named(&format!("policy:{what}:{name}"))
    }

    fn session_keys(&self, name: &str) -> (String, String, String) {
        (
            self.key("sessions", name),
            self.key("session-ips", name),
            self.key("sessions-version", name),
        )
    }

    /// Brings everything up to date once: the JWT key, queued session writes, every
    /// session table and every quota. Stops at the first store failure.
    pub async fn sync(&self, policy: &Policy) -> Result<(), StoreError> {
        self.adopt_jwt_key().await?;
        self.replay_pending().await?;
        for s in &policy.rules().sessions {
            self.sync_sessions(s).await?;
        }
        self.flush_quotas(policy).await
    }

    async fn adopt_jwt_key(&self) -> Result<(), StoreError> {
        let Some(jwt) = &self.jwt else {
            return Ok(());
        };
        if jwt.adopted() {
            return Ok(());
        }
        let key = self.cluster.keys.named("policy:jwt-key");
        let mine = jwt.local_b64.clone();
        let stored: String = self
            .cluster
            .store
            .run(|mut c| async move { JWT_KEY.key(key).arg(mine).invoke_async(&mut c).await })
            .await?;
        let codec = STANDARD
            .decode(stored.trim())
            .ok()
            .and_then(|k| JwtTokens::new(&k));
        match codec {
            Some(codec) => {
                *jwt.shared.write() = Some(Arc::new(codec));
                tracing::debug!("policy: signing tokens with the cluster's JWT key");
            }
            None => {
                // Someone else's value under our key: keep this node's own key.
                if !self.warned_jwt.swap(true, Ordering::Relaxed) {
                    tracing::warn!("policy: the cluster store's JWT key is not a usable key; tokens verify only on the node that issued them");
                }
            }
        }
        Ok(())
    }

    async fn replay_pending(&self) -> Result<(), StoreError> {
        let queued = std::mem::take(&mut *self.pending.lock());
        let mut rest = queued.into_iter();
        while let Some((name, op)) = rest.next() {
            let r = match &op {
                Pending::Put(s) => self.put_session(&name, s).await,
                Pending::Close { user, nonce } => {
                    self.cas_session(&name, user, nonce, None).await.map(|_| ())
                }
            };
            if let Err(e) = r {
                let mut p = self.pending.lock();
                let newer = std::mem::take(&mut *p);
                p.push((name, op));
                p.extend(rest);
                p.extend(newer);
                return Err(e);
            }
        }
        Ok(())
    }

    async fn sync_sessions(&self, s: &SessionIpm) -> Result<(), StoreError> {
        let (sessions, _, version) = self.session_keys(s.name());
        let have = self
            .versions
            .lock()
            .get(s.name())
            .cloned()
            .unwrap_or_else(|| "\0never".into());
        let (v, table): (String, Option<HashMap<String, String>>) = self
            .cluster
            .store
            .run(|mut c| async move {
                SESSION_SYNC
                    .key(sessions)
                    .key(version)
                    .arg(have)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if let Some(table) = table {
            let list: Vec<Session> = table
                .values()
                .filter_map(|j| serde_json::from_str(j).ok())
                .collect();
            s.replace_all(list);
            self.versions.lock().insert(s.name().to_string(), v);
        }
        Ok(())
    }

    async fn put_session(&self, name: &str, s: &Session) -> Result<(), StoreError> {
        let (sessions, ips, version) = self.session_keys(name);
        let json = serde_json::to_string(s).unwrap_or_default();
        let (user, ip) = (s.user.clone(), s.ip.to_string());
        self.cluster
            .store
            .run(|mut c| async move {
                SESSION_PUT
                    .key(sessions)
                    .key(ips)
                    .key(version)
                    .arg(user)
                    .arg(ip)
                    .arg(json)
                    .arg(new_version())
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    /// Replaces (`Some`) or ends (`None`) `user`'s session if it still has `nonce`.
    async fn cas_session(
        &self,
        name: &str,
        user: &str,
        nonce: &str,
        new: Option<&Session>,
    ) -> Result<bool, StoreError> {
        let (sessions, ips, version) = self.session_keys(name);
        let json = new
            .map(|s| serde_json::to_string(s).unwrap_or_default())
            .unwrap_or_default();
        let (user, nonce) = (user.to_owned(), nonce.to_owned());
        self.cluster
            .store
            .run(|mut c| async move {
                SESSION_CAS
                    .key(sessions)
                    .key(ips)
                    .key(version)
                    .arg(user)
                    .arg(nonce)
                    .arg(json)
                    .arg(new_version())
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|n| n == 1)
    }

    /// Flushes every `dwnConsR`'s deltas and takes the cluster's totals.
    pub async fn flush_quotas(&self, policy: &Policy) -> Result<(), StoreError> {
        for d in &policy.rules().quotas {
            self.flush_quota(d, policy.clock.now()).await?;
        }
        Ok(())
    }

    async fn flush_quota(&self, d: &DwnConsR, now: SystemTime) -> Result<(), StoreError> {
        d.maybe_reset(now);
        let first = !self
            .quota_synced
            .lock()
            .get(d.name())
            .copied()
            .unwrap_or(false);
        let deltas = d.take_deltas();
        let (cons, last) = (
            self.key("quota", d.name()),
            self.key("quota-reset", d.name()),
        );
        let mut inv = QUOTA_SYNC.key(cons);
        inv.key(last)
            .arg(unix_ms(d.last_reset()))
            .arg(if first { "1" } else { "0" });
        for (user, n) in &deltas {
            inv.arg(user).arg(*n);
        }
        let answer: Result<(String, HashMap<String, u64>), StoreError> = self
            .cluster
            .store
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await;
        let (lr, totals) = match answer {
            Ok(a) => a,
            Err(e) => {
                d.restore_deltas(&deltas);
                return Err(e);
            }
        };
        let lr = lr
            .parse::<u64>()
            .ok()
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            .unwrap_or_else(|| d.last_reset());
        d.apply_totals(lr, &totals);
        self.quota_synced.lock().insert(d.name().to_string(), true);
        // A cycle the store started long ago may be due here already.
        d.maybe_reset(now);
        Ok(())
    }

    /// Runs until `stop`: a full sync every [`SYNC_PERIOD`] and when the store comes
    /// back, a quota flush whenever a batch is pending; one last flush at the end.
    pub async fn run(self: Arc<Self>, policy: Arc<Policy>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SYNC_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                _ = tick.tick() => true,
                _ = self.cluster.store.recovered() => true,
                _ = self.flush.notify.notified() => false,
                _ = stop.cancelled() => break,
            };
            // Failures are logged once per transition by the store's health.
            let _ = if full {
                self.sync(&policy).await
            } else {
                self.flush_quotas(&policy).await
            };
        }
        let _ = self.replay_pending().await;
        let _ = self.flush_quotas(&policy).await;
    }

    /// Runs one `/api/cmd` command against the store: the local view is brought up to
    /// date first; session writes and `set` go to the store before the local view.
    pub async fn cmd(&self, policy: &Arc<Policy>, cmd: Cmd) -> Result<Value, CmdError> {
        let store_up = self.sync(policy).await.is_ok();
        if !store_up {
            self.cluster.store.health.decided_without_store();
        }
        let write = matches!(cmd.cmd.as_str(), "open" | "close" | "renew" | "set");
        if !write {
            return policy.cmd(cmd);
        }
        if !store_up && self.mode() == StoreFailureMode::Closed {
            return Err(CmdError::StoreUnavailable);
        }
        match policy.route(&cmd)? {
            Routed::Session(s) => self.session_write(policy, &s, &cmd, store_up).await,
            Routed::DwnConsR(d) if cmd.cmd == "set" => {
                self.quota_set(policy, &d, cmd, store_up).await
            }
            _ => policy.cmd(cmd),
        }
    }

    async fn session_write(
        &self,
        policy: &Arc<Policy>,
        s: &Arc<SessionIpm>,
        cmd: &Cmd,
        store_up: bool,
    ) -> Result<Value, CmdError> {
        let now = policy.clock.now();
        let codec = &*policy.codec;
        let name = s.name().to_string();
        match cmd.cmd.as_str() {
            "open" => {
                let cred = cmd.cred.clone().ok_or(CmdError::Missing("cred"))?;
                let ip = parse_addr(&cmd.remote_addr)?;
                // Argon2 takes tens of milliseconds of CPU: off the async workers.
                let s2 = s.clone();
                let user = cred.user.clone();
                let ok =
                    tokio::task::spawn_blocking(move || s2.authenticate(&cred.user, &cred.pass))
                        .await
                        .map_err(|_| CmdError::Internal)?;
                if !ok {
                    return Err(CmdError::BadCredentials);
                }
                let session = s.new_session(&user, ip, now);
                let stored = match store_up {
                    true => self.put_session(&name, &session).await,
                    false => Err(StoreError::Timeout(Duration::ZERO)),
                };
                if stored.is_err() {
                    self.without_store()?;
                    self.pending
                        .lock()
                        .push((name, Pending::Put(session.clone())));
                }
                let token = SessionIpm::token(&session, codec);
                s.apply_open(session);
                Ok(Value::String(token))
            }
            "close" | "renew" => {
                let claims = codec.decode(&cmd.secret)?;
                let cur = s.current(&claims, now)?;
                let new = (cmd.cmd == "renew").then(|| s.renewed(&cur, now));
                let stored = match store_up {
                    true => {
                        self.cas_session(&name, &cur.user, &cur.nonce, new.as_ref())
                            .await
                    }
                    false => Err(StoreError::Timeout(Duration::ZERO)),
                };
                match stored {
                    Ok(true) => {}
                    // Replaced or ended through another node since the sync.
                    Ok(false) => return Err(CmdError::InvalidToken),
                    Err(_) => {
                        self.without_store()?;
                        let op = match &new {
                            Some(n) => Pending::Put(n.clone()),
                            None => Pending::Close {
                                user: cur.user.clone(),
                                nonce: cur.nonce.clone(),
                            },
                        };
                        self.pending.lock().push((name, op));
                    }
                }
                match new {
                    Some(n) => {
                        let token = SessionIpm::token(&n, codec);
                        s.apply_open(n);
                        Ok(Value::String(token))
                    }
                    None => {
                        s.apply_close(&cur.user, &cur.nonce);
                        Ok(Value::Null)
                    }
                }
            }
            _ => policy.cmd(cmd.clone()),
        }
    }

    async fn quota_set(
        &self,
        policy: &Arc<Policy>,
        d: &Arc<DwnConsR>,
        cmd: Cmd,
        store_up: bool,
    ) -> Result<Value, CmdError> {
        // Checks the caller and sets the local counter, as without a cluster.
        let (user, used) = (cmd.string.clone(), cmd.uint64);
        let v = policy.cmd(cmd)?;
        d.clear_unflushed(&user);
        let key = self.key("quota", d.name());
        let stored = match store_up {
            true => {
                self.cluster
                    .store
                    .run(|mut c| async move {
                        redis::cmd("HSET")
                            .arg(key)
                            .arg(user)
                            .arg(used)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await
            }
            false => Err(StoreError::Timeout(Duration::ZERO)),
        };
        if stored.is_err() {
            // The local counter holds it until the next flush reads the store back.
            self.without_store()?;
        }
        Ok(v)
    }

    /// A write the store did not take: `open` goes on from the local view (counted),
    /// `closed` refuses.
    fn without_store(&self) -> Result<(), CmdError> {
        self.cluster.store.health.decided_without_store();
        match self.mode() {
            StoreFailureMode::Open => Ok(()),
            StoreFailureMode::Closed => Err(CmdError::StoreUnavailable),
        }
    }
}
