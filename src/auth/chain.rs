//! Chaining backends in a declared order, caching positive answers, and the
//! per-backend statistics (`up`, latency, errors) the metrics read at scrape time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::{Attempt, Authenticator, BackendError, CheckFuture, Verdict};

/// How a chain combines its backends' answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Every backend is asked in turn until one allows; a deny or an unknown user
    /// moves on. Refused when none allows; *unavailable* when none allows and one of
    /// them could not answer (that one might have allowed).
    #[default]
    FirstAllow,
    /// The first backend that knows the user decides, allow or deny; only an unknown
    /// user moves on. A backend that cannot answer ends the chain as *unavailable*
    /// (asking the next one could let in a user the first would refuse).
    FirstAnswer,
}

/// Backends asked in a declared order.
pub struct Chain {
    backends: Vec<Arc<dyn Authenticator>>,
    order: Order,
}

impl Chain {
    pub fn new(backends: Vec<Arc<dyn Authenticator>>, order: Order) -> Self {
        Chain { backends, order }
    }

    pub fn names(&self) -> Vec<&str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    pub async fn check(&self, attempt: &Attempt<'_>) -> Result<Verdict, BackendError> {
        let mut denied = None;
        let mut down = None;
        for backend in &self.backends {
            match backend.check(attempt).await {
                Ok(Verdict::Allow { groups }) => return Ok(Verdict::Allow { groups }),
                Ok(Verdict::Deny { reason }) => {
                    if self.order == Order::FirstAnswer {
                        return Ok(Verdict::Deny { reason });
                    }
                    if denied.is_none() || matches!(denied, Some(None)) {
                        denied = Some(reason);
                    }
                }
                Ok(Verdict::Unknown) => {}
                Err(e) => {
                    if self.order == Order::FirstAnswer {
                        return Err(e);
                    }
                    down.get_or_insert(e);
                }
            }
        }
        if let Some(e) = down {
            return Err(e);
        }
        Ok(match denied {
            Some(reason) => Verdict::Deny { reason },
            None => Verdict::Unknown,
        })
    }
}

/// Most cached answers kept per backend; past it, expired entries go, then all.
const CACHE_CAPACITY: usize = 10_000;

/// When an allow was given, and its groups.
type Remembered = (Instant, Vec<Arc<str>>);

/// A backend whose allows are remembered for `ttl` (denials, unknown users and
/// failures never are). The key is a salted SHA-256 of who asked and the password,
/// so the cache holds no password; a changed password misses it at once, and a
/// removed user or a revoked group takes effect within `ttl`.
pub struct Cached {
    inner: Arc<dyn Authenticator>,
    ttl: Duration,
    salt: [u8; 16],
    entries: Mutex<HashMap<[u8; 32], Remembered>>,
    pub hits: AtomicU64,
}

impl Cached {
    pub fn new(inner: Arc<dyn Authenticator>, ttl: Duration) -> Self {
        Cached {
            inner,
            ttl,
            salt: rand::random(),
            entries: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
        }
    }

    fn key(&self, a: &Attempt<'_>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        let kind = match a.kind {
            super::Kind::Agent => b'a',
            super::Kind::Proxy => b'p',
            super::Kind::Api => b'i',
        };
        h.update([kind]);
        for part in [a.listener, a.username, a.password] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }

    /// Forgets every answer (a reloaded users file).
    pub fn clear(&self) {
        self.entries.lock().clear();
    }
}

impl Authenticator for Cached {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        Box::pin(async move {
            if self.ttl.is_zero() {
                return self.inner.check(attempt).await;
            }
            let key = self.key(attempt);
            let now = Instant::now();
            if let Some((at, groups)) = self.entries.lock().get(&key) {
                if now.duration_since(*at) < self.ttl {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Verdict::Allow {
                        groups: groups.clone(),
                    });
                }
            }
            let verdict = self.inner.check(attempt).await;
            let mut entries = self.entries.lock();
            match &verdict {
                Ok(Verdict::Allow { groups }) => {
                    if entries.len() >= CACHE_CAPACITY {
                        let ttl = self.ttl;
                        entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
                        if entries.len() >= CACHE_CAPACITY {
                            entries.clear();
                        }
                    }
                    entries.insert(key, (Instant::now(), groups.clone()));
                }
                _ => {
                    entries.remove(&key);
                }
            }
            verdict
        })
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One backend's counters, read by the metrics at scrape time.
#[derive(Debug)]
pub struct BackendStats {
    pub name: Arc<str>,
    pub kind: &'static str,
    /// The last check got an answer (allow, deny or unknown).
    pub up: AtomicBool,
    pub checks: AtomicU64,
    pub errors: AtomicU64,
    /// Per bucket of [`LATENCY_BUCKETS`] (not cumulative), then the overflow bucket.
    pub latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl BackendStats {
    pub fn new(name: &str, kind: &'static str) -> Self {
        BackendStats {
            name: Arc::from(name),
            kind,
            up: AtomicBool::new(true),
            checks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Default::default(),
            latency_sum_us: AtomicU64::new(0),
        }
    }

    fn record(&self, took: Duration, ok: bool) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.up.store(ok, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// A backend whose checks are timed and counted in its [`BackendStats`].
pub struct Metered {
    pub inner: Arc<dyn Authenticator>,
    pub stats: Arc<BackendStats>,
}

impl Authenticator for Metered {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            let verdict = self.inner.check(attempt).await;
            self.stats.record(started.elapsed(), verdict.is_ok());
            if let Err(e) = &verdict {
                tracing::warn!(backend = %e.backend, error = %e.message, "authentication backend unavailable");
            }
            verdict
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Kind;
    use super::*;

    struct Fixed(&'static str, Result<Verdict, &'static str>, AtomicU64);

    impl Authenticator for Fixed {
        fn name(&self) -> &str {
            self.0
        }
        fn check<'a>(&'a self, _: &'a Attempt<'a>) -> CheckFuture<'a> {
            self.2.fetch_add(1, Ordering::Relaxed);
            let v = self.1.clone().map_err(|m| BackendError::new(self.0, m));
            Box::pin(std::future::ready(v))
        }
    }

    fn fixed(name: &'static str, v: Result<Verdict, &'static str>) -> Arc<Fixed> {
        Arc::new(Fixed(name, v, AtomicU64::new(0)))
    }

    fn attempt<'a>(user: &'a str, pass: &'a str) -> Attempt<'a> {
        Attempt {
            kind: Kind::Proxy,
            username: user,
            password: pass,
            client_ip: None,
            client_id: None,
            listener: "http",
        }
    }

    fn allow(g: &str) -> Verdict {
        Verdict::Allow {
            groups: vec![Arc::from(g)],
        }
    }

    fn deny(r: &str) -> Verdict {
        Verdict::Deny {
            reason: Some(r.into()),
        }
    }

    #[tokio::test]
    async fn first_allow_asks_on_past_denials_and_outages() {
        let a = attempt("u", "p");
        let chain = Chain::new(
            vec![
                fixed("a", Ok(deny("no"))),
                fixed("b", Err("down")),
                fixed("c", Ok(allow("x"))),
            ],
            Order::FirstAllow,
        );
        assert_eq!(chain.check(&a).await.unwrap(), allow("x"));
        let chain = Chain::new(
            vec![fixed("a", Ok(deny("no"))), fixed("b", Err("down"))],
            Order::FirstAllow,
        );
        assert_eq!(&*chain.check(&a).await.unwrap_err().backend, "b");
        let chain = Chain::new(
            vec![fixed("a", Ok(Verdict::Unknown)), fixed("b", Ok(deny("no")))],
            Order::FirstAllow,
        );
        assert_eq!(chain.check(&a).await.unwrap(), deny("no"));
    }

    #[tokio::test]
    async fn first_answer_stops_at_the_first_who_knows() {
        let a = attempt("u", "p");
        let c = fixed("c", Ok(allow("x")));
        let chain = Chain::new(
            vec![
                fixed("a", Ok(Verdict::Unknown)),
                fixed("b", Ok(deny("no"))),
                c.clone(),
            ],
            Order::FirstAnswer,
        );
        assert_eq!(chain.check(&a).await.unwrap(), deny("no"));
        assert_eq!(c.2.load(Ordering::Relaxed), 0);
        let chain = Chain::new(vec![fixed("b", Err("down")), c.clone()], Order::FirstAnswer);
        assert!(chain.check(&a).await.is_err());
        assert_eq!(c.2.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn only_allows_are_cached_and_only_for_the_ttl() {
        let inner = fixed("h", Ok(allow("g")));
        let cached = Cached::new(inner.clone(), Duration::from_millis(200));
        for _ in 0..5 {
            assert_eq!(cached.check(&attempt("u", "p")).await.unwrap(), allow("g"));
        }
        assert_eq!(inner.2.load(Ordering::Relaxed), 1);
        // Another password is another key.
        cached.check(&attempt("u", "q")).await.unwrap();
        assert_eq!(inner.2.load(Ordering::Relaxed), 2);
        tokio::time::sleep(Duration::from_millis(250)).await;
        cached.check(&attempt("u", "p")).await.unwrap();
        assert_eq!(inner.2.load(Ordering::Relaxed), 3);

        let denying = fixed("h", Ok(deny("no")));
        let cached = Cached::new(denying.clone(), Duration::from_secs(60));
        for _ in 0..3 {
            cached.check(&attempt("u", "p")).await.unwrap();
        }
        assert_eq!(denying.2.load(Ordering::Relaxed), 3);
    }
}
