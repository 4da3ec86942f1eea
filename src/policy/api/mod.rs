//! The HTTPS API: `POST /api/cmd` with the manual's `Cmd` JSON, and static files for a
//! web interface.
//!
//! The caller's address always comes from the TCP peer: a `remoteAddr` in the body would
//! let anyone open a session for someone else's IP.

pub mod client;
mod files;
mod timeout_io;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dir::{DirError, PolicyDir};
use super::{Cmd, Policy};
use crate::transport::listen::{AcceptLoop, Serve};

/// Commands are a few hundred bytes; anything near this is not a command.
pub const MAX_BODY: usize = 64 * 1024;
/// Open API connections at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 512;
/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct ApiOptions {
    /// `webStaticFilesDir`; `None` serves no files (404).
    pub static_dir: Option<PathBuf>,
    /// `excludedRoutes`: paths (and everything below them) answered with `index.html`.
    pub excluded_routes: Vec<String>,
    /// `api.server.readTimeout`: the longest wait for the client's next bytes.
    pub read_timeout: Duration,
    /// `api.server.writeTimeout`: the longest wait for the client to take our bytes.
    pub write_timeout: Duration,
}

impl ApiOptions {
    pub fn from_dir(dir: &PolicyDir) -> ApiOptions {
        let s = &dir.server.api;
        ApiOptions {
            static_dir: dir.static_dir(),
            excluded_routes: s.excluded_routes.clone(),
            read_timeout: s.server.read_timeout(),
            write_timeout: s.server.write_timeout(),
        }
    }
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            static_dir: None,
            excluded_routes: Vec::new(),
            read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("api.server.addr: {0}")]
    Addr(String),
    #[error("cannot listen on {addr} (api.server.addr): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The running API, its persist loop and (in a cluster) its store sync.
pub struct ApiHandle {
    pub addr: SocketAddr,
    server: JoinHandle<()>,
    persist: JoinHandle<()>,
    sync: JoinHandle<()>,
}

impl ApiHandle {
    /// Waits until both have stopped (after `shutdown` is cancelled); the state has been
    /// persisted once more by then.
    pub async fn join(self) {
        let _ = self.server.await;
        let _ = self.persist.await;
        let _ = self.sync.await;
    }
}

/// Listens on `api.server.addr` with the dir's certificate, serves the API, and persists
/// the policy's state every `persistInterval` and once more when `shutdown` is cancelled.
pub async fn start_api(
    dir: &PolicyDir,
    policy: Arc<Policy>,
    shutdown: CancellationToken,
) -> Result<ApiHandle, ApiError> {
    let addr = dir
        .server
        .api
        .server
        .socket_addr()
        .map_err(ApiError::Addr)?;
    let tls = dir.tls_config()?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ApiError::Bind { addr, source })?;
    if policy.is_clustered() {
        // Bounded by the store's timeout per step; a store that is down is caught up
        // with by the sync task when it is back.
        if let Err(e) = policy.sync_now().await {
            tracing::warn!("policy: starting without the cluster store ({e}); deciding from this node's view until it answers");
        }
    }
    let persist = tokio::spawn(
        policy
            .clone()
            .run_persist_loop(dir.server.api.persist_interval.0, shutdown.clone()),
    );
    let sync = tokio::spawn(policy.clone().run_cluster_sync(shutdown.clone()));
    let server = tokio::spawn(serve_api(
        listener,
        tls,
        policy,
        ApiOptions::from_dir(dir),
        shutdown,
    ));
    tracing::info!("policy API on https://{addr}/api/cmd");
    Ok(ApiHandle {
        addr,
        server,
        persist,
        sync,
    })
}

/// Serves until `shutdown`, then gives open connections [`DRAIN`] to finish.
pub async fn serve_api(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    policy: Arc<Policy>,
    opts: ApiOptions,
    shutdown: CancellationToken,
) {
    let role = Arc::new(ApiServer {
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        policy,
        opts,
        stop: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    AcceptLoop::new(listener, "policy API")
        .max_connections(MAX_CONNECTIONS)
        .run(role, shutdown.cancelled_owned(), tracker.clone())
        .await;
    tracker.close();
    let _ = tokio::time::timeout(DRAIN + Duration::from_secs(1), tracker.wait()).await;
}

/// The policy API listener's role: TLS with the read and write timeouts, then hyper.
struct ApiServer {
    acceptor: tokio_rustls::TlsAcceptor,
    policy: Arc<Policy>,
    opts: ApiOptions,
    stop: CancellationToken,
}

impl Serve for ApiServer {
    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let opts = &self.opts;
        let tls = match tokio::time::timeout(opts.read_timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!("policy API TLS handshake with {peer}: {e}");
                return;
            }
            Err(_) => return,
        };
        let io = timeout_io::TimeoutIo::new(tls, opts.read_timeout, opts.write_timeout);
        let header_timeout = opts.read_timeout;
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(handle(req, peer, &this.policy, &this.opts).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_BODY.max(8192) * 2)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::time::timeout(DRAIN, conn.as_mut()).await.unwrap_or(Ok(()))
            }
        };
        if let Err(e) = result {
            tracing::debug!("policy API connection from {peer}: {e}");
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Every API error has the same shape as `CmdError::to_json`.
fn json_error(status: StatusCode, code: &str, message: &str) -> Resp {
    let body = serde_json::json!({ "error": message, "code": code }).to_string();
    let mut r = respond(status, "application/json", body);
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    policy: &Arc<Policy>,
    opts: &ApiOptions,
) -> Resp {
    let path = req.uri().path();
    if path == "/api/cmd" {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        return api_cmd(req, peer, policy).await;
    }
    if path.starts_with("/api/") || path == "/api" {
        return json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the API is POST /api/cmd",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return method_not_allowed("GET, HEAD");
    }
    let head = req.method() == Method::HEAD;
    let mut r = files::serve(path, opts).await;
    if head {
        *r.body_mut() = Full::new(Bytes::new());
    }
    r
}

/// Failed logins per source address: 5 within a minute lock the address out for a
/// minute, so passwords cannot be guessed at argon2 speed (and argon2 cannot be used to
/// exhaust the CPU). The same mechanism guards agent and proxy-user authentication on
/// the gateway.
fn login_throttle() -> &'static crate::limits::AuthThrottle {
    static THROTTLE: std::sync::OnceLock<crate::limits::AuthThrottle> = std::sync::OnceLock::new();
    THROTTLE.get_or_init(|| {
        crate::limits::AuthThrottle::new(
            5,
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(60),
        )
    })
}

async fn api_cmd(req: Request<Incoming>, peer: SocketAddr, policy: &Arc<Policy>) -> Resp {
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("a command is at most {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                &format!("reading the body: {e}"),
            )
        }
    };
    let mut cmd: Cmd = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("the body is not a Cmd object: {e}"),
            )
        }
    };
    cmd.remote_addr = peer.ip().to_canonical().to_string();
    cmd.user.clear();
    cmd.is_admin = false;
    let name = cmd.cmd.clone();
    let ip = peer.ip().to_canonical();
    let is_login = name == "open";
    if is_login && login_throttle().is_locked(ip) {
        return json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed logins from this address; try again later",
        );
    }
    let result = match policy.cmd_async(cmd).await {
        Ok(v) => {
            if is_login {
                login_throttle().success(ip);
            }
            let mut r = respond(StatusCode::OK, "application/json", v.to_string());
            r.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return r;
        }
        Err(e) => e,
    };
    if is_login
        && matches!(result, crate::policy::CmdError::BadCredentials)
        && login_throttle().failure(ip)
    {
        tracing::warn!(%ip, "policy API logins locked out after repeated failures");
    }
    tracing::debug!("api {name:?} from {}: {result}", peer.ip());
    let status = StatusCode::from_u16(result.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = respond(status, "application/json", result.to_json().to_string());
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
