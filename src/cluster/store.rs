//! The connection to Redis: one multiplexed, self-reconnecting connection per node
//! (`ConnectionManager`), every operation bounded by the configured timeout, and the
//! store's health tracked from the outcomes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, RedisError};

use crate::config::ClusterConfig;

/// Why the store gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster store timed out after {0:?}")]
    Timeout(Duration),
    #[error("cluster store: {0}")]
    Redis(#[from] RedisError),
    #[error("cluster store CA {path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Counters and the up/down state, read by the metrics and the status page.
#[derive(Debug)]
pub struct StoreHealth {
    up: AtomicBool,
    /// Operations that failed or timed out.
    pub errors: AtomicU64,
    /// Decisions taken without the store (from this node's own view, or refused),
    /// because it did not answer.
    pub decisions_without_store: AtomicU64,
    /// Operations sent to the store, for round trips per connection.
    pub round_trips: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            // Optimistic until the first operation says otherwise, so that the first
            // failure is logged as a transition.
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            decisions_without_store: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
        }
    }
}

impl StoreHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records an outcome; returns true when it changed the state from down to up
    /// (the moment to reconcile what was decided without the store).
    fn record(&self, result: Result<(), &StoreError>) -> bool {
        match result {
            Ok(()) => {
                let was_up = self.up.swap(true, Ordering::Relaxed);
                if !was_up {
                    tracing::info!("cluster store reachable again");
                }
                !was_up
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cluster store unreachable; deciding without it until it is back");
                }
                false
            }
        }
    }

    pub fn decided_without_store(&self) {
        self.decisions_without_store.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handle on the store; cheap to clone (the connection is shared).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    timeout: Duration,
    pub health: Arc<StoreHealth>,
    recovered: Arc<tokio::sync::Notify>,
}

impl Store {
    /// Opens the store lazily: a gateway starts even while Redis is down, and the
    /// connection is made (and remade) in the background.
    pub fn open(config: &ClusterConfig) -> Result<Store, StoreError> {
        let mut info = config.redis.as_str().into_connection_info()?;
        if let Some(password) = &config.redis_password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &config.redis_ca {
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|source| StoreError::Ca {
                    path: path.clone(),
                    source,
                })?;
                Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )?
            }
            None => Client::open(info)?,
        };
        let timeout = config.timeout.0;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)?;
        Ok(Store {
            conn,
            timeout,
            health: Arc::default(),
            recovered: Arc::default(),
        })
    }

    /// Runs one operation (one round trip: a command, a script or a pipeline) within
    /// the timeout, and records the outcome.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.health.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = match tokio::time::timeout(self.timeout, op(self.conn.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        if self.health.record(result.as_ref().map(|_| ())) {
            self.recovered.notify_waiters();
        }
        result
    }

    /// Resolves the next time the store comes back after being down.
    pub async fn recovered(&self) {
        self.recovered.notified().await
    }
}
