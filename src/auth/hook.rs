//! The `http` backend (the "custom authentication plugin"): each check is a POST of
//!
//! ```json
//! {"kind": "proxy", "username": "alice", "password": "...", "client_ip": "192.0.2.7",
//!  "client_id": null, "listener": "http"}
//! ```
//!
//! to the configured URL, answered by `200` and `{"allow": true, "group": "office"}`
//! (or `"groups": [...]`), or `{"allow": false, "reason": "..."}`. Any other status, a
//! body that is not that JSON, or no answer within `timeout` is the backend being
//! unavailable. See `docs/AUTH.md`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{Attempt, Authenticator, BackendError, CheckFuture, Kind, Verdict};

/// The largest answer read from a hook.
const MAX_ANSWER: usize = 64 * 1024;

pub struct HookBackend {
    name: String,
    uri: Uri,
    host: String,
    port: u16,
    timeout: Duration,
    /// For `https://`: the client configuration (roots) and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

#[derive(Serialize)]
struct Question<'a> {
    kind: Kind,
    username: &'a str,
    password: &'a str,
    client_ip: Option<String>,
    client_id: Option<&'a str>,
    listener: &'a str,
}

#[derive(Deserialize)]
struct Answer {
    allow: bool,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HookConfigError {
    #[error("auth_backends.{0}.url: {1}")]
    Url(String, String),
}

impl HookBackend {
    /// `tls` is required for an `https://` URL (the roots the hook's certificate must
    /// chain to).
    pub fn new(
        name: &str,
        url: &str,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<HookBackend, HookConfigError> {
        let bad = |m: &str| HookConfigError::Url(name.to_owned(), m.to_owned());
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("must be http:// or https://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = match (https, tls) {
            (false, _) => None,
            (true, None) => return Err(bad("https needs a TLS configuration")),
            (true, Some(config)) => {
                let server = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|_| bad("host is not a valid TLS server name"))?;
                Some((tokio_rustls::TlsConnector::from(config), server))
            }
        };
        Ok(HookBackend {
            name: name.to_owned(),
            uri,
            host,
            port,
            timeout,
            tls,
        })
    }

    fn unavailable(&self, message: impl Into<String>) -> BackendError {
        BackendError::new(&self.name, message)
    }

    async fn ask(&self, body: Vec<u8>) -> Result<(StatusCode, Bytes), BackendError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.unavailable(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let path = self
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let authority = self
            .uri
            .authority()
            .map_or(self.host.clone(), |a| a.to_string());
        let req = Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::CONNECTION, "close")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.unavailable(format!("request: {e}")))?;
        match &self.tls {
            None => self.exchange(TokioIo::new(tcp), req).await,
            Some((connector, server)) => {
                let tls = connector
                    .connect(server.clone(), tcp)
                    .await
                    .map_err(|e| self.unavailable(format!("TLS: {e}")))?;
                self.exchange(TokioIo::new(tls), req).await
            }
        }
    }

    async fn exchange<IO>(
        &self,
        io: IO,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), BackendError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.unavailable(format!("HTTP: {e}")))?;
        // Driven beside the exchange; aborted when the check ends (or times out).
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unavailable(format!("HTTP: {e}")))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.unavailable(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, body))
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Authenticator for HookBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        Box::pin(async move {
            let question = Question {
                kind: attempt.kind,
                username: attempt.username,
                password: attempt.password,
                client_ip: attempt.client_ip.map(|ip| ip.to_canonical().to_string()),
                client_id: attempt.client_id,
                listener: attempt.listener,
            };
            let body = serde_json::to_vec(&question)
                .map_err(|e| self.unavailable(format!("request: {e}")))?;
            let (status, answer) = tokio::time::timeout(self.timeout, self.ask(body))
                .await
                .map_err(|_| self.unavailable(format!("no answer within {:?}", self.timeout)))??;
            if status != StatusCode::OK {
                return Err(self.unavailable(format!("answered HTTP {}", status.as_u16())));
            }
            let answer: Answer = serde_json::from_slice(&answer)
                .map_err(|e| self.unavailable(format!("answer is not the expected JSON: {e}")))?;
            if !answer.allow {
                return Ok(Verdict::Deny {
                    reason: answer.reason.map(|r| r.chars().take(200).collect()),
                });
            }
            let groups = answer
                .group
                .into_iter()
                .chain(answer.groups)
                .map(|g| Arc::from(g.as_str()))
                .collect();
            Ok(Verdict::Allow { groups })
        })
    }
}
