//! The admin listener: plain HTTP/1.1 on `admin_addr`, serving `/metrics`, `/healthz`,
//! `/readyz`, `/api/status`, the status page and, on a gateway, the client profiles
//! (`/profiles/FORMAT?user=NAME`). Basic auth, when configured, guards everything except
//! the two health checks (load balancers probe them without credentials, and they reveal
//! no more than an agent count); profiles carry passwords, so they need it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::transport::listen::{AcceptLoop, Serve};
use tokio_util::sync::CancellationToken;

use super::process::ProcessStats;
use super::status::{unix_secs, Status, TrafficRing, SAMPLE_EVERY};
use crate::config::profile::{ProfileRequest, ProfileSource};
use crate::config::AdminConfig;
use crate::net::secret_eq;

/// What a role (gateway or agent) shows on its admin listener.
pub trait Observed: Send + Sync + 'static {
    /// The role's metric families (the registry adds the `anyproxy_` prefix).
    fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error>;
    /// Ready, and the one-line reason.
    fn readiness(&self) -> (bool, String);
    fn status(&self) -> Status;
    /// Running totals for the traffic chart: bytes in, bytes out, live connections.
    fn running_totals(&self) -> (u64, u64, usize);
    fn traffic(&self) -> &TrafficRing;
    /// `POST /reload`: reloads the configuration; `None` where that is not possible.
    /// Runs on a blocking thread (it reads files).
    fn reload(&self) -> Option<Result<(), String>> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} (admin): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin_username and admin_password go together")]
    Credentials,
}

const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/app.js");
const PAGE_CSS: &str = include_str!("page/style.css");

struct RoleCollector(Arc<dyn Observed>);
struct ProcessCollector;

impl std::fmt::Debug for RoleCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoleCollector")
    }
}

impl std::fmt::Debug for ProcessCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessCollector")
    }
}

impl Collector for RoleCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(&mut enc)
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        ProcessStats::read().encode(&mut enc)
    }
}

struct Admin {
    registry: Registry,
    observed: Arc<dyn Observed>,
    /// The expected `Authorization` header value, when basic auth is on.
    credentials: Option<(String, String)>,
    /// The gateway's proxy listeners, for `/profiles/`; a reload replaces them.
    profiles: Option<Arc<arc_swap::ArcSwap<ProfileSource>>>,
}

/// Binds `cfg.addr` and serves until `stop`; also samples traffic for the status page.
pub async fn serve(
    cfg: AdminConfig,
    observed: Arc<dyn Observed>,
    stop: CancellationToken,
) -> Result<SocketAddr, AdminError> {
    serve_with_profiles(cfg, observed, None, stop).await
}

/// [`serve`], also answering `/profiles/FORMAT` from `profiles`.
pub async fn serve_with_profiles(
    cfg: AdminConfig,
    observed: Arc<dyn Observed>,
    profiles: Option<Arc<arc_swap::ArcSwap<ProfileSource>>>,
    stop: CancellationToken,
) -> Result<SocketAddr, AdminError> {
    let credentials = match (cfg.username, cfg.password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => return Err(AdminError::Credentials),
    };
    let listener = TcpListener::bind(cfg.addr)
        .await
        .map_err(|source| AdminError::Bind {
            addr: cfg.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: cfg.addr,
        source,
    })?;
    if credentials.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "admin listener has no credentials: anyone who can reach it sees the status and metrics");
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    registry
        .sub_registry_with_prefix("anyproxy")
        .register_collector(Box::new(RoleCollector(observed.clone())));
    let admin = Arc::new(Admin {
        registry,
        observed: observed.clone(),
        credentials,
        profiles,
    });
    tokio::spawn(sample_traffic(observed, stop.clone()));
    tokio::spawn(AcceptLoop::new(listener, "admin").run(
        admin,
        stop.cancelled_owned(),
        TaskTracker::new(),
    ));
    tracing::info!(%addr, "admin listener (metrics, health, status page)");
    Ok(addr)
}

async fn sample_traffic(observed: Arc<dyn Observed>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (bytes_in, bytes_out, live) = observed.running_totals();
        observed
            .traffic()
            .record(unix_secs(), bytes_in, bytes_out, live);
    }
}

impl Serve for Admin {
    async fn serve(self: Arc<Self>, tcp: TcpStream, _peer: std::net::SocketAddr) {
        let service = hyper::service::service_fn(move |req| {
            let admin = self.clone();
            async move {
                if req.uri().path() == "/reload" && req.method() == Method::POST {
                    return Ok::<_, Infallible>(admin.reload(&req).await);
                }
                Ok::<_, Infallible>(admin.handle(&req))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
            .await;
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Admin {
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some((user, pass)) = &self.credentials else {
            return true;
        };
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok());
        let Some(given) = given else { return false };
        let (u, p) = given.split_once(':').unwrap_or((given.as_str(), ""));
        // Both compared every time, so timing tells nothing about which one was wrong.
        let user_ok = secret_eq(u, user);
        let pass_ok = secret_eq(p, pass);
        user_ok & pass_ok
    }

    fn unauthorized() -> Response<Full<Bytes>> {
        let mut r = reply(StatusCode::UNAUTHORIZED, TEXT, "authentication required\n");
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"anyproxy admin\""),
        );
        r
    }

    /// `POST /reload`: only with configured credentials, and only when given them.
    async fn reload(self: Arc<Self>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if self.credentials.is_none() {
            return reply(
                StatusCode::FORBIDDEN,
                TEXT,
                "POST /reload needs admin_username and admin_password in the configuration\n",
            );
        }
        if !self.authorized(req) {
            return Self::unauthorized();
        }
        let observed = self.observed.clone();
        match tokio::task::spawn_blocking(move || observed.reload()).await {
            Ok(Some(Ok(()))) => reply(StatusCode::OK, TEXT, "reloaded\n"),
            Ok(Some(Err(e))) => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                TEXT,
                format!("reload failed; the running configuration stays: {e}\n"),
            ),
            Ok(None) => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "this process does not reload\n",
            ),
            Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "reload failed\n"),
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" => return reply(StatusCode::OK, TEXT, "ok\n"),
            "/readyz" => {
                let (ready, why) = self.observed.readiness();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                return reply(status, TEXT, format!("{why}\n"));
            }
            _ => {}
        }
        if !self.authorized(req) {
            return Self::unauthorized();
        }
        match path {
            "/metrics" => {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &self.registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding failed\n"),
                }
            }
            "/api/status" => match serde_json::to_vec(&self.observed.status()) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "encoding failed\n"),
            },
            "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE_HTML),
            "/app.js" => reply(StatusCode::OK, "text/javascript; charset=utf-8", PAGE_JS),
            "/style.css" => reply(StatusCode::OK, "text/css; charset=utf-8", PAGE_CSS),
            _ => match path.strip_prefix("/profiles/") {
                Some(format) => self.profile(format, req.uri().query().unwrap_or("")),
                None => reply(StatusCode::NOT_FOUND, TEXT, "not found\n"),
            },
        }
    }

    /// `/profiles/FORMAT?user=&host=&bypass=&url=`, the query as `anyproxy export`'s
    /// options. Only behind credentials: a profile carries its user's password.
    fn profile(&self, format: &str, query: &str) -> Response<Full<Bytes>> {
        let Some(source) = &self.profiles else {
            return reply(StatusCode::NOT_FOUND, TEXT, "not found\n");
        };
        if self.credentials.is_none() {
            return reply(
                StatusCode::FORBIDDEN,
                TEXT,
                "profiles carry passwords: set admin_username and admin_password to serve them\n",
            );
        }
        let rendered = profile_request(query).and_then(|req| {
            let format = format
                .parse::<crate::config::profile::Format>()
                .map_err(|e| e.to_string())?;
            let profile = source.load().profile(&req).map_err(|e| e.to_string())?;
            profile
                .render(format)
                .map(|text| (format, text))
                .map_err(|e| e.to_string())
        });
        match rendered {
            Ok((format, text)) => reply(StatusCode::OK, format.content_type(), text),
            Err(e) => reply(StatusCode::BAD_REQUEST, TEXT, format!("{e}\n")),
        }
    }
}

/// The query of a `/profiles/` request; unknown or repeated keys are refused, so that a
/// typo is not silently a different profile.
fn profile_request(query: &str) -> Result<ProfileRequest, String> {
    let mut req = ProfileRequest::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = crate::net::percent_decode(&value.replace('+', " "))
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or_else(|| format!("query {key}: bad percent-encoding"))?;
        let slot = match key {
            "user" => &mut req.user,
            "host" => &mut req.host,
            "url" => &mut req.url,
            "bypass" => {
                for entry in value.split(',').filter(|e| !e.is_empty()) {
                    req.bypass.push(entry.parse().map_err(|e| format!("{e}"))?);
                }
                continue;
            }
            other => {
                return Err(format!(
                    "unknown query parameter {other:?} (user, host, bypass, url)"
                ))
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("query parameter {key} appears twice"));
        }
    }
    Ok(req)
}

/// What every role's status shares.
pub fn uptime_secs(started: std::time::Instant) -> u64 {
    started.elapsed().as_secs()
}

/// Keeps `Status` construction in one place for both roles.
pub fn base_status(
    role: &'static str,
    observed: &dyn Observed,
    started: std::time::Instant,
) -> Status {
    let (ready, readiness) = observed.readiness();
    Status {
        role,
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: uptime_secs(started),
        ready,
        readiness,
        groups: Vec::new(),
        totals: Default::default(),
        traffic: observed.traffic().traffic(),
        quotas: None,
        cluster: None,
        gateways: None,
    }
}
