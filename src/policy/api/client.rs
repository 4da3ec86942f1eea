//! A small HTTPS client for `/api/cmd` (what `anyproxy ctl` speaks): hyper's HTTP/1.1
//! over tokio-rustls, one connection per command.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde_json::Value;

use super::super::Cmd;
use crate::transport::tls::{self, TlsError};

/// Answers are small JSON values; a sessions table of many users still fits.
const MAX_ANSWER: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("API URL {0:?}: expected https://host[:port]")]
    Url(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP with {addr}: {message}")]
    Http { addr: String, message: String },
    #[error("{addr} took longer than {0:?}", .timeout)]
    Timeout { addr: String, timeout: Duration },
    /// The server refused the command (`{"error", "code"}`).
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
}

pub struct ApiClient {
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

/// Certificate verification off, for `--insecure` only.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    // Signatures are still checked: the handshake stays sound, only identity is skipped.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub enum Trust<'a> {
    /// The public web roots.
    WebRoots,
    /// A CA or the server's own self-signed certificate (PEM).
    CaFile(&'a std::path::Path),
    /// No verification of the server's identity.
    Insecure,
}

impl ApiClient {
    pub fn new(url: &str, trust: Trust<'_>) -> Result<ApiClient, ClientError> {
        let bad = || ClientError::Url(url.to_string());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("https") {
            return Err(bad());
        }
        let host = uri.host().ok_or_else(bad)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let tls = match trust {
            Trust::WebRoots => tls::client_config(None)?,
            Trust::CaFile(p) => tls::client_config(Some(p))?,
            Trust::Insecure => {
                tls::install_crypto_provider();
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut c = ClientConfig::builder()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
                    .with_no_client_auth();
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Arc::new(c)
            }
        };
        Ok(ApiClient {
            host,
            port,
            tls,
            timeout: Duration::from_secs(30),
        })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one command; `Err(ClientError::Api)` carries the server's refusal.
    pub async fn cmd(&self, cmd: &Cmd) -> Result<Value, ClientError> {
        let addr = self.addr();
        match tokio::time::timeout(self.timeout, self.cmd_inner(cmd, &addr)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                addr,
                timeout: self.timeout,
            }),
        }
    }

    async fn cmd_inner(&self, cmd: &Cmd, addr: &str) -> Result<Value, ClientError> {
        let http = |message: String| ClientError::Http {
            addr: addr.to_string(),
            message,
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let name = tls::server_name(&self.host)?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| ClientError::Handshake {
                addr: addr.to_string(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let body = serde_json::to_vec(cmd).map_err(|e| http(e.to_string()))?;
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/cmd")
            .header(HOST, addr)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| http(format!("reading the answer: {e}")))?
            .to_bytes();
        driver.abort();
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| http(format!("HTTP {status}, answer is not JSON: {e}")))?;
        if status.is_success() {
            return Ok(value);
        }
        let field = |k: &str| {
            value
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Err(ClientError::Api {
            status: status.as_u16(),
            code: field("code"),
            message: field("error"),
        })
    }
}
