//! HTTP proxy front end: `CONNECT` tunnels and absolute-form requests (any method,
//! bodies, chunked, keep-alive), with `Proxy-Authorization: Basic`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use anyproxy_proto::ErrorCode;

use crate::auth::{Attempt, Authority, Identity, Kind};
use crate::connect::{Access, ConnectError, Connector, Requester};
use crate::limits::lockout::STORE_DOWN;
use crate::limits::{AuthVerdict, Limits, LOCKED_OUT};
use crate::net::{HostPort, Revoke};
use crate::transport::listen::Serve;
use crate::tunnel::relay::LocalStream;
use tracing::Instrument;

type Body = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request head, and may keep a connection with
/// nothing in progress (HTTP/1 keep-alive, HTTP/2 with no open stream).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP proxy listener's role: each accepted connection is served by hyper, and
/// `limits` guards the password check.
pub struct HttpProxy<C> {
    pub users: Arc<Authority>,
    pub limits: Arc<Limits>,
    pub connector: Arc<C>,
    /// How long a client may take to send a request head, and may stay idle between
    /// requests on a keep-alive connection (hyper restarts the timer when one goes
    /// idle): [`HEADER_READ_TIMEOUT`] on the gateway, `readTimeout` in pmproxy (which a
    /// reload sets again, for the connections accepted after it).
    pub request_timeout: RequestTimeout,
}

/// A duration read once per accepted connection and settable while the listener runs.
#[derive(Debug)]
pub struct RequestTimeout(std::sync::atomic::AtomicU64);

impl RequestTimeout {
    pub fn new(d: Duration) -> Self {
        RequestTimeout(std::sync::atomic::AtomicU64::new(Self::millis(d)))
    }

    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn set(&self, d: Duration) {
        self.0
            .store(Self::millis(d), std::sync::atomic::Ordering::Relaxed);
    }

    fn millis(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }
}

/// HTTP/2 streams one client connection may have open at once (each CONNECT tunnel
/// is one, for as long as it lives).
pub const H2_MAX_STREAMS: u32 = 256;

/// How often an HTTP/2 connection is pinged, and how long the answer may take: a peer
/// that vanished is dropped with its tunnels.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Spawns HTTP/2 streams inside the connection's span, so that their log lines (the
/// access line too) name the listener and the peer like HTTP/1 requests do.
#[derive(Clone)]
struct InSpan(tracing::Span);

impl<F> hyper::rt::Executor<F> for InSpan
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.instrument(self.0.clone()));
    }
}

/// HTTP/2: what one connection has in progress (requests being answered and CONNECT
/// tunnels, each a stream), so that a connection with none can be closed after the
/// idle timeout as HTTP/1 keep-alive connections are by hyper. hyper's HTTP/2 server
/// keeps a connection open as long as the client answers its pings.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    changed: Notify,
}

/// One stream in progress, counted until dropped.
struct StreamGuard(Arc<Streams>);

impl Streams {
    fn enter(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Resolves once no stream has been open for `idle` (never without a count). One
    /// waiter: the connection.
    async fn idle_for(this: Option<&Self>, idle: Duration) {
        let Some(this) = this else {
            return std::future::pending().await;
        };
        this.wait_idle(idle).await
    }

    async fn wait_idle(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(idle) => return,
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_one();
        }
    }
}

/// The HTTP version a user connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    /// Only over TLS, when the client chose `h2` by ALPN.
    Http2,
}

impl<C: Connector> Serve for HttpProxy<C> {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        self.serve_io(stream, peer, Version::Http1).await
    }
}

impl<C: Connector> HttpProxy<C> {
    /// Serves one user connection over `io`: the accepted TCP socket, or the TLS
    /// session of the HTTPS listener (`proxy/https.rs`), in HTTP/1.1 or HTTP/2 (where
    /// every CONNECT is a stream of the one connection).
    pub async fn serve_io<S: LocalStream + 'static>(
        self: Arc<Self>,
        io: S,
        peer: SocketAddr,
        version: Version,
    ) {
        // HTTP/1 needs no count: hyper closes an idle keep-alive connection itself.
        let streams = (version == Version::Http2).then(|| Arc::new(Streams::default()));
        let state = Arc::new(ConnState {
            peer,
            users: self.users.clone(),
            limits: self.limits.clone(),
            upstream: tokio::sync::Mutex::new(None),
            accepted: parking_lot::Mutex::new(None),
            streams: streams.clone(),
        });
        let connector = self.connector.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            let connector = connector.clone();
            async move {
                let stream = state.streams.as_ref().map(Streams::enter);
                Ok::<_, Infallible>(handle::<C, S>(req, &state, &*connector, stream).await)
            }
        });
        let result = match version {
            Version::Http1 => {
                hyper::server::conn::http1::Builder::new()
                    .preserve_header_case(true)
                    .title_case_headers(true)
                    // A client that trickles its request head (slowloris) is dropped.
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(self.request_timeout.get())
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades()
                    .await
            }
            Version::Http2 => {
                let conn =
                    hyper::server::conn::http2::Builder::new(InSpan(tracing::Span::current()))
                        .timer(hyper_util::rt::TokioTimer::new())
                        .max_concurrent_streams(H2_MAX_STREAMS)
                        .keep_alive_interval(H2_KEEPALIVE)
                        .keep_alive_timeout(H2_KEEPALIVE)
                        .serve_connection(TokioIo::new(io), service);
                tokio::pin!(conn);
                let idle = self.request_timeout.get();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = Streams::idle_for(streams.as_deref(), idle) => {
                        tracing::debug!(%peer, ?idle, "http/2 connection idle: closing");
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "http proxy connection ended");
        }
    }
}

/// The upstream kept alive for a user connection's last request: where and for whom
/// (a keep-alive connection may carry several users' requests), the HTTP client over
/// it, who carries it and the policy's verdict (for the access log).
struct KeptUpstream {
    target: HostPort,
    user: Option<String>,
    group: Arc<str>,
    sender: hyper::client::conn::http1::SendRequest<Incoming>,
    via: Arc<str>,
    verdict: Option<Arc<str>>,
}

/// Per user connection: who it is, and the upstream kept alive for its last target.
struct ConnState {
    peer: SocketAddr,
    users: Arc<Authority>,
    limits: Arc<Limits>,
    upstream: tokio::sync::Mutex<Option<KeptUpstream>>,
    /// The last `Proxy-Authorization` accepted on this connection and whom it proved:
    /// the next requests with the same header are not checked again (one check per
    /// connection, or per change of user on a keep-alive connection).
    /// With it, the user's hold: once a reload revoked it, the header proves nothing.
    accepted: parking_lot::Mutex<Option<(crate::net::Secret, Identity, Revoke)>>,
    /// HTTP/2 only.
    streams: Option<Arc<Streams>>,
}

fn text_response(status: u16, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = format!(
        "{} {}: {message}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn proxy_auth_required() -> Response<Body> {
    let mut resp = text_response(407, "proxy credentials required or wrong");
    resp.headers_mut().insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"anyproxy\""),
    );
    resp
}

/// The user and password of `Proxy-Authorization: Basic`, if it is there and well
/// formed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::PROXY_AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// Why a request was not let through: ask for credentials (407), refuse the
/// locked-out address (429), or say that authentication cannot be done now (503: the
/// cluster store, or the named backend, did not answer), so that clients do not
/// prompt for a password again.
enum AuthRefusal {
    Ask,
    LockedOut,
    Unavailable,
    BackendDown(String),
}

/// Who sent `req`. A request without credentials is asked for them and does not count
/// as a failure: browsers always try without first.
async fn authenticate(
    req: &Request<Incoming>,
    state: &ConnState,
) -> Result<(Identity, Option<Revoke>), AuthRefusal> {
    if state.users.is_open() {
        return Ok((state.users.anonymous(), None));
    }
    let Some((user, pass)) = basic_credentials(req.headers()) else {
        return Err(AuthRefusal::Ask);
    };
    let header = req
        .headers()
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some((last, identity, hold)) = &*state.accepted.lock() {
        if crate::net::secret_eq(last.expose(), header) && !hold.is_revoked() {
            return Ok((identity.clone(), Some(hold.clone())));
        }
    }
    let attempt = Attempt {
        kind: Kind::Proxy,
        username: &user,
        password: &pass,
        client_ip: Some(state.peer.ip()),
        client_id: None,
        listener: "http",
    };
    // Taken before the check: a reload removing the user after this revokes it, and
    // one before it is met by the check.
    let hold = state.users.hold(&user);
    match state
        .limits
        .proxy_auth(state.peer.ip(), state.users.authenticate(&attempt))
        .await
    {
        AuthVerdict::Accepted(identity) => {
            let cached = (
                crate::net::Secret::from(header),
                identity.clone(),
                hold.clone(),
            );
            *state.accepted.lock() = Some(cached);
            Ok((identity, Some(hold)))
        }
        AuthVerdict::Rejected(reason) => {
            if let Some(reason) = reason {
                Access::new("http")
                    .client(state.peer)
                    .user(&user)
                    .refused(ErrorCode::AuthFailed, &reason);
            }
            Err(AuthRefusal::Ask)
        }
        AuthVerdict::BackendDown(e) => {
            Access::new("http")
                .client(state.peer)
                .user(&user)
                .refused(ErrorCode::AuthFailed, &e);
            Err(AuthRefusal::BackendDown(e.to_string()))
        }
        AuthVerdict::LockedOut => {
            Access::new("http")
                .client(state.peer)
                .user(&user)
                .refused(ErrorCode::RateLimited, &LOCKED_OUT);
            Err(AuthRefusal::LockedOut)
        }
        AuthVerdict::Unavailable => {
            Access::new("http")
                .client(state.peer)
                .user(&user)
                .refused(ErrorCode::RateLimited, &STORE_DOWN);
            Err(AuthRefusal::Unavailable)
        }
    }
}

fn split_authority(uri: &Uri, default_port: Option<u16>) -> Option<HostPort> {
    let authority = uri.authority()?;
    let host = authority.host();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    let port = authority.port_u16().or(default_port)?;
    Some(HostPort {
        host: host.to_owned(),
        port,
    })
}

async fn handle<C: Connector, S: LocalStream + 'static>(
    req: Request<Incoming>,
    state: &ConnState,
    connector: &C,
    stream: Option<StreamGuard>,
) -> Response<Body> {
    let (identity, hold) = match authenticate(&req, state).await {
        Ok(x) => x,
        Err(AuthRefusal::Ask) => return proxy_auth_required(),
        Err(AuthRefusal::LockedOut) => return text_response(429, LOCKED_OUT),
        Err(AuthRefusal::Unavailable) => return text_response(503, STORE_DOWN),
        Err(AuthRefusal::BackendDown(why)) => return text_response(503, &why),
    };
    let mut who = Requester::new(state.peer, identity);
    who.revoke = hold;
    if req.method() == Method::CONNECT {
        connect_tunnel::<C, S>(req, who, connector, stream).await
    } else {
        let resp = forward(req, who, state, connector).await;
        match stream {
            // The stream is busy until its body has been sent.
            Some(stream) => resp.map(|body| {
                body.map_frame(move |frame| {
                    let _busy = &stream;
                    frame
                })
                .boxed()
            }),
            None => resp,
        }
    }
}

fn log_failure(
    kind: &'static str,
    who: &Requester,
    target: &HostPort,
    e: &ConnectError,
    started: Instant,
) {
    Access::new(kind)
        .requester(who)
        .target(target)
        .since(started)
        .refused(e.code(), e);
}

async fn connect_tunnel<C: Connector, S: LocalStream + 'static>(
    mut req: Request<Incoming>,
    who: Requester,
    connector: &C,
    stream: Option<StreamGuard>,
) -> Response<Body> {
    let Some(target) = split_authority(req.uri(), None) else {
        return text_response(400, "CONNECT needs host:port");
    };
    let started = Instant::now();
    let conn = match connector.connect(&target, &who).await {
        Ok(conn) => conn.with_revoke(who.revoke.clone()),
        Err(e) => {
            log_failure("connect", &who, &target, &e, started);
            return text_response(e.http_status(), &e.to_string());
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(
        async move {
            // The tunnel is the stream's work: the connection is busy until it ends.
            let _stream = stream;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let access = Access::new("connect")
                        .requester(&who)
                        .target(&target)
                        .since(started);
                    // Take the socket back from hyper (it is ours: `HttpProxy::serve_io`),
                    // so that a tunnel the far side lost ends with a reset, never with a
                    // clean close that would pass for a complete download.
                    match upgraded.downcast::<TokioIo<S>>() {
                        Ok(parts) => {
                            let socket = Rewound {
                                early: parts.read_buf,
                                io: parts.io.into_inner(),
                            };
                            conn.relay_logged(socket, access).await;
                        }
                        Err(upgraded) => {
                            conn.relay_logged(TokioIo::new(upgraded), access).await;
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        }
        .in_current_span(),
    );
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1), plus the ones the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

async fn forward<C: Connector>(
    req: Request<Incoming>,
    who: Requester,
    state: &ConnState,
    connector: &C,
) -> Response<Body> {
    if req.uri().scheme_str() != Some("http") {
        return text_response(
            400,
            "not a proxy request: use an absolute http:// URI, or CONNECT for https",
        );
    }
    let Some(target) = split_authority(req.uri(), Some(80)) else {
        return text_response(400, "request URI has no host");
    };
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let origin_form: Uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    parts.uri = origin_form;
    // The upstream connection speaks HTTP/1.1, whatever the user's connection speaks.
    parts.version = hyper::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let req = Request::from_parts(parts, body);

    let mut upstream = state.upstream.lock().await;
    let reusable = matches!(&*upstream, Some(k) if k.target == target
        && k.user == who.user && k.group == who.group && !k.sender.is_closed());
    if reusable {
        // The same user and target, but the rules may have changed their answer.
        if let Err(e) = connector.recheck(&target, &who) {
            *upstream = None;
            log_failure("http", &who, &target, &e, started);
            return text_response(e.http_status(), &e.to_string());
        }
    } else {
        *upstream = None;
        let conn = match connector.connect(&target, &who).await {
            Ok(conn) => conn.with_revoke(who.revoke.clone()),
            Err(e) => {
                log_failure("http", &who, &target, &e, started);
                return text_response(e.http_status(), &e.to_string());
            }
        };
        // hyper's client speaks over a pipe whose far end the relay carries.
        let (client_io, relay_io) = tokio::io::duplex(64 * 1024);
        let (via, verdict) = (conn.via(), conn.verdict().cloned());
        tokio::spawn(conn.relay(relay_io));
        match hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .title_case_headers(true)
            .handshake(TokioIo::new(client_io))
            .await
        {
            Ok((sender, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                *upstream = Some(KeptUpstream {
                    target: target.clone(),
                    user: who.user.clone(),
                    group: who.group.clone(),
                    sender,
                    via,
                    verdict,
                });
            }
            Err(e) => return text_response(502, &format!("upstream handshake: {e}")),
        }
    }
    let Some(KeptUpstream {
        sender,
        via,
        verdict,
        ..
    }) = upstream.as_mut()
    else {
        return text_response(502, "no upstream");
    };
    if sender.ready().await.is_err() {
        *upstream = None;
        return text_response(502, "upstream connection closed");
    }
    match sender.send_request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Access::new("http")
                .requester(&who)
                .target(&target)
                .via(via)
                .policy(verdict.as_deref())
                .since(started)
                .answered(parts.status.as_u16());
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            *upstream = None;
            text_response(502, &format!("upstream request failed: {e}"))
        }
    }
}

/// A CONNECT tunnel's socket after hyper's upgrade, with the bytes hyper had already
/// read past the request head (a client may send its TLS hello right behind CONNECT),
/// which are read first.
struct Rewound<S> {
    early: Bytes,
    io: S,
}

impl<S: LocalStream> tokio::io::AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.early.is_empty() {
            let n = self.early.len().min(buf.remaining());
            let early = self.early.split_to(n);
            buf.put_slice(&early);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: LocalStream> tokio::io::AsyncWrite for Rewound<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S: LocalStream> LocalStream for Rewound<S> {
    fn abort_on_close(&self) {
        self.io.abort_on_close()
    }
}

/// What [`read_head_for_fuzzing`] found in a request head.
#[cfg(feature = "fuzzing")]
#[derive(Debug)]
pub struct HeadReading {
    /// `Proxy-Authorization: Basic`, decoded.
    pub credentials: Option<(String, String)>,
    /// The target as a CONNECT request names it (no default port).
    pub connect_target: Option<HostPort>,
    /// The target of an absolute-form request (port 80 by default).
    pub forward_target: Option<HostPort>,
}

/// The front end's own readings of a request head hyper parsed, for the fuzz targets
/// (`crate::fuzzing`); `headers` are left as they would be forwarded.
#[cfg(feature = "fuzzing")]
pub(crate) fn read_head_for_fuzzing(uri: &Uri, headers: &mut HeaderMap) -> HeadReading {
    let credentials = basic_credentials(headers);
    strip_hop_by_hop(headers);
    HeadReading {
        credentials,
        connect_target: split_authority(uri, None),
        forward_target: split_authority(uri, Some(80)),
    }
}
