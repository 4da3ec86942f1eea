//! TLS for the agent link: one crypto provider (ring), PEM loading, self-signed
//! certificates for the zero-config start.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {detail}")]
    Certs { path: String, detail: String },
    #[error("cannot read private key from {path}: {detail}")]
    Key { path: String, detail: String },
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("client_ca {path}: {detail}")]
    ClientCa { path: String, detail: String },
    #[error("the private key in {key} does not match the certificate in {cert}: {detail}")]
    KeyMismatch {
        cert: String,
        key: String,
        detail: String,
    },
    #[error("the certificate in {path} expired on {at}")]
    Expired { path: String, at: String },
    #[error("{path}: cannot read the certificate's validity dates")]
    Validity { path: String },
}

/// Socket reads under the agent link's TLS, per syscall.
pub const LINK_READ_BUF: usize = 64 * 1024;

/// The TCP socket of an agent link, as TLS should read it. rustls asks its transport
/// for at most 4 KiB per read (and shrinks its buffer whenever it drains), so a bulk
/// stream of 16 KiB records costs four or five `recv` calls per record; reading 64 KiB
/// at a time and handing rustls copies from memory costs one. Writes pass through.
pub fn buffered(tcp: tokio::net::TcpStream) -> tokio::io::BufReader<tokio::net::TcpStream> {
    tokio::io::BufReader::with_capacity(LINK_READ_BUF, tcp)
}

/// Installs ring as the process-wide provider. Idempotent; must run before any TLS
/// config is built so that a second provider pulled in by a dependency cannot make
/// rustls ambiguous.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// TLS 1.3 preferred, TLS 1.2 the minimum.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    VERSIONS
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::Certs {
        path: path.display().to_string(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// The validity period of an X.509 certificate, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// `not_after` as RFC 3339 (`2027-01-31T12:00:00Z`).
    pub fn expiry(&self) -> String {
        rfc3339(self.not_after)
    }

    /// Whole days from `now` (Unix seconds) until expiry; negative once expired.
    pub fn days_left(&self, now: i64) -> i64 {
        (self.not_after - now).div_euclid(86_400)
    }
}

/// Unix seconds as RFC 3339, or the number itself if out of range.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// One DER element: (tag, contents, what follows).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `UTCTime` (tag 0x17, `YYMMDDHHMMSSZ`) or `GeneralizedTime` (0x18,
/// `YYYYMMDDHHMMSSZ`) as Unix seconds.
fn der_time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 if text.len() == 12 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        0x18 if text.len() == 14 => (text.get(..4)?.parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<u8> { rest.get(i..i + 2)?.parse().ok() };
    let month = time::Month::try_from(field(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, field(2)?).ok()?;
    let at = date.with_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(at.assume_utc().unix_timestamp())
}

/// The validity period of a DER certificate; `None` if it is not well-formed.
pub fn validity(cert: &CertificateDer<'_>) -> Option<Validity> {
    let (_, certificate, _) = der_element(cert.as_ref())?;
    let (_, tbs, _) = der_element(certificate)?;
    let mut fields = tbs;
    // [0] version is optional.
    if fields.first() == Some(&0xa0) {
        fields = der_element(fields)?.2;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        fields = der_element(fields)?.2;
    }
    let (tag, validity, _) = der_element(fields)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, before, rest) = der_element(validity)?;
    let (t2, after, _) = der_element(rest)?;
    Some(Validity {
        not_before: der_time(t1, before)?,
        not_after: der_time(t2, after)?,
    })
}

/// The leaf certificate's validity, for a file's error messages.
pub fn leaf_validity(path: &Path, certs: &[CertificateDer<'_>]) -> Result<Validity, TlsError> {
    certs
        .first()
        .and_then(validity)
        .ok_or_else(|| TlsError::Validity {
            path: path.display().to_string(),
        })
}

/// The certificate chain and key of `cert`/`key`, checked to belong together.
pub fn load_certified_key(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let certs = load_certs(cert)?;
    let key_der = load_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key_der, &provider)
        .map(Arc::new)
        .map_err(|e| TlsError::KeyMismatch {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            detail: e.to_string(),
        })
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Server config for the gateway: TLS 1.2 minimum, HTTP/1.1 ALPN for the upgrade.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with_client_ca(cert, key, None)
}

/// As [`server_config`]; with `client_ca`, every client must present a certificate
/// that chains to one of the CAs in that PEM file, or the handshake fails.
pub fn server_config_with_client_ca(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(rotating_server_config(cert, key, client_ca)?.0)
}

/// As [`server_config_with_client_ca`], with the certificate in a [`CertSlot`] that a
/// reload may replace: new handshakes take the new certificate, established
/// connections keep the one they were made with.
pub fn rotating_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<(Arc<ServerConfig>, Arc<CertSlot>), TlsError> {
    let slot = Arc::new(CertSlot::load(cert, key)?);
    let ca = client_ca.map(ClientCa::load).transpose()?;
    Ok((agent_server_config(slot.clone(), ca.as_ref())?, slot))
}

/// The agent listener's server config: the certificate of `slot`, and with `client_ca`
/// every client must present a certificate that chains to one of its CAs. A reload
/// that changes `gateway.client_ca` builds a new one around the same slot.
pub fn agent_server_config(
    slot: Arc<CertSlot>,
    client_ca: Option<&ClientCa>,
) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let builder = ServerConfig::builder_with_protocol_versions(versions());
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder(Arc::new(ca.roots.clone()))
                    .build()
                    .map_err(|e| TlsError::ClientCa {
                        path: ca.path.display().to_string(),
                        detail: e.to_string(),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(slot);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The CA bundle of `gateway.client_ca`, read: its certificates (what a reload
/// compares to tell whether the bundle changed) and their trust anchors.
#[derive(Debug, Clone)]
pub struct ClientCa {
    pub path: std::path::PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
    roots: RootCertStore,
}

impl ClientCa {
    /// Reads and parses the bundle at `path`; an unreadable file, or one without a
    /// usable CA certificate, is an error.
    pub fn load(path: &Path) -> Result<ClientCa, TlsError> {
        let certs = load_certs(path)?;
        let roots = roots_of(path, &certs)?;
        Ok(ClientCa {
            path: path.to_owned(),
            certs,
            roots,
        })
    }
}

/// Server config for the HTTPS proxy listener: the certificate of `slot` (the agent
/// listener's own when the listener names no files, so that one reload rotates both),
/// no client certificates, HTTP/2 (preferred) or HTTP/1.1 by ALPN.
pub fn proxy_server_config(slot: Arc<CertSlot>) -> Arc<ServerConfig> {
    install_crypto_provider();
    let mut config = ServerConfig::builder_with_protocol_versions(versions())
        .with_no_client_auth()
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The server's certificate and key, read at each handshake from a slot a reload
/// swaps whole (no lock on the handshake path).
#[derive(Debug)]
pub struct CertSlot {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    /// The leaf's `not_after`, Unix seconds.
    expiry: std::sync::atomic::AtomicI64,
}

impl CertSlot {
    /// The certificate chain and key of these files, checked to belong together.
    /// An expired certificate is loaded (and logged by the caller): refusing to start
    /// would not help the clients that cannot connect either way.
    pub fn load(cert: &Path, key: &Path) -> Result<CertSlot, TlsError> {
        let certified = load_certified_key(cert, key)?;
        let validity = leaf_validity(cert, &certified.cert)?;
        Ok(CertSlot {
            current: arc_swap::ArcSwap::new(certified),
            expiry: std::sync::atomic::AtomicI64::new(validity.not_after),
        })
    }

    /// A slot holding a certificate from [`load_checked`]: one that a reload starts
    /// serving was checked with the rest of the reload's files.
    pub fn from_checked((certified, validity): CheckedKey) -> CertSlot {
        CertSlot {
            current: arc_swap::ArcSwap::new(certified),
            expiry: std::sync::atomic::AtomicI64::new(validity.not_after),
        }
    }

    /// Reads the files again and, if they hold a valid certificate with its key, makes
    /// it the one new handshakes present. On error the current one stays.
    pub fn replace(&self, cert: &Path, key: &Path) -> Result<Validity, TlsError> {
        let checked = load_checked(cert, key)?;
        Ok(self.store(checked))
    }

    /// Makes a certificate from [`load_checked`] the one new handshakes present: a
    /// reload that swaps several slots checks every file before it stores any.
    pub fn store(&self, (certified, validity): CheckedKey) -> Validity {
        self.current.store(certified);
        self.expiry
            .store(validity.not_after, std::sync::atomic::Ordering::Relaxed);
        validity
    }

    /// The current leaf's `not_after`, Unix seconds.
    pub fn expiry(&self) -> i64 {
        self.expiry.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current leaf certificate (DER).
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.load().cert.first().cloned()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A certificate with its key, and the leaf's validity, as [`load_checked`] made it.
pub type CheckedKey = (Arc<rustls::sign::CertifiedKey>, Validity);

/// A certificate and key that belong together, with the leaf's validity; an expired
/// certificate is refused: replacing a working certificate with it could only fail
/// every new handshake.
pub fn load_checked(cert: &Path, key: &Path) -> Result<CheckedKey, TlsError> {
    let certified = load_certified_key(cert, key)?;
    let validity = leaf_validity(cert, &certified.cert)?;
    if validity.not_after <= unix_now() {
        return Err(TlsError::Expired {
            path: cert.display().to_string(),
            at: validity.expiry(),
        });
    }
    Ok((certified, validity))
}

pub fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    roots_of(path, &load_certs(path)?)
}

/// The trust anchors of `certs`, read from `path`.
fn roots_of(path: &Path, certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|e| TlsError::Certs {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Client config for the agent. Verification is always on: against `ca` when given
/// (a CA or the gateway's self-signed certificate itself), else the public web roots.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with_identity(ca, None)
}

/// As [`client_config`], presenting `identity` (certificate chain PEM, key PEM) to a
/// gateway that asks for a client certificate.
pub fn client_config_with_identity(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    gateway_client_config(ca, None, identity)
}

/// The agent's client config. With `ca` (a PEM file) or `fingerprint` (SHA-256 of a
/// DER certificate), a gateway presenting exactly a certificate of the file, or one of
/// that fingerprint, is trusted as pinned (whatever its CA flag; its handshake
/// signature is still checked); else the file's certificates are the roots of normal
/// verification. With neither, the public web roots.
pub fn gateway_client_config(
    ca: Option<&Path>,
    fingerprint: Option<[u8; 32]>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let builder = ClientConfig::builder_with_protocol_versions(versions());
    let builder = if ca.is_none() && fingerprint.is_none() {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(ca, fingerprint)?))
    };
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// As [`gateway_client_config`] without a client certificate, and without ALPN: for
/// protocols that are not HTTP (LDAP).
pub fn client_config_without_alpn(
    ca: Option<&Path>,
    fingerprint: Option<[u8; 32]>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = (*gateway_client_config(ca, fingerprint, None)?).clone();
    config.alpn_protocols.clear();
    Ok(Arc::new(config))
}

/// SHA-256 of a DER certificate, as `sha256:<hex>`.
pub fn fingerprint_hex(cert: &[u8]) -> String {
    hex_pin(&sha256(cert))
}

fn sha256(cert: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert).into()
}

/// A certificate error in words an operator can act on.
#[derive(Debug)]
struct Explained(String);

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Explained {}

fn explained(text: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Explained(text)),
    )))
}

/// Pinning first (the configured certificate itself, or its fingerprint), then normal
/// verification against the configured file as roots; every refusal says what to fix.
#[derive(Debug)]
struct PinnedVerifier {
    /// The certificates of the configured file.
    pinned: Vec<CertificateDer<'static>>,
    fingerprint: Option<[u8; 32]>,
    /// The file, for messages.
    file: Option<String>,
    /// Normal verification against the file's certificates as roots, when any is one.
    fallback: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedVerifier {
    fn new(ca: Option<&Path>, fingerprint: Option<[u8; 32]>) -> Result<PinnedVerifier, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = match ca {
            Some(path) => load_certs(path)?,
            None => Vec::new(),
        };
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(pinned.iter().cloned());
        let fallback = match added {
            0 => None,
            _ => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Certs {
                    path: ca.map(|p| p.display().to_string()).unwrap_or_default(),
                    detail: e.to_string(),
                })?,
            ),
        };
        Ok(PinnedVerifier {
            pinned,
            fingerprint,
            file: ca.map(|p| p.display().to_string()),
            fallback,
            provider,
        })
    }

    /// What was pinned, as the configuration says it.
    fn configured(&self) -> String {
        match (&self.file, self.fingerprint) {
            (Some(f), None) => format!("the certificate in {f}"),
            (None, Some(fp)) => format!("the pinned fingerprint {}", hex_pin(&fp)),
            (Some(f), Some(fp)) => format!(
                "the certificate in {f} nor the pinned fingerprint {}",
                hex_pin(&fp)
            ),
            (None, None) => "anything configured".into(),
        }
    }

    fn mismatch(&self, end_entity: &CertificateDer<'_>) -> rustls::Error {
        explained(format!(
            "pinned certificate mismatch: the gateway presented a certificate with \
             fingerprint {}, which is not {} (nor issued by it); if the gateway's \
             certificate changed, configure the new one",
            fingerprint_hex(end_entity),
            self.configured()
        ))
    }

    fn explain(
        &self,
        e: rustls::Error,
        end_entity: &CertificateDer<'_>,
        name: &ServerName<'_>,
    ) -> rustls::Error {
        use rustls::CertificateError as C;
        let rustls::Error::InvalidCertificate(c) = &e else {
            return e;
        };
        match c {
            C::UnknownIssuer | C::BadSignature => self.mismatch(end_entity),
            // webpki's `CaUsedAsEndEntity`: a CA certificate that is not the pinned one.
            C::Other(o) if o.to_string().contains("CaUsedAsEndEntity") => self.mismatch(end_entity),
            C::NotValidForName | C::NotValidForNameContext { .. } => explained(format!(
                "the gateway's certificate is not valid for the name {:?}: set \
             gateway_server_name to a name the certificate carries, or reissue it for \
             this name",
                name.to_str()
            )),
            C::Expired | C::ExpiredContext { .. } => explained(format!(
                "the gateway's certificate has expired{}: renew it on the gateway",
                validity(end_entity)
                    .map(|v| format!(" (on {})", v.expiry()))
                    .unwrap_or_default()
            )),
            C::NotValidYet | C::NotValidYetContext { .. } => explained(
                "the gateway's certificate is not valid yet: check the clocks of the agent \
             and the gateway"
                    .into(),
            ),
            _ => e,
        }
    }
}

/// The words of a TLS failure: the explanation of a refused certificate as this
/// module wrote it, else the error as rustls says it.
pub fn describe_io_error(e: &std::io::Error) -> String {
    let explained = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<Explained>().map(|x| x.0.clone())
            }
            _ => None,
        });
    explained.unwrap_or_else(|| e.to_string())
}

fn hex_pin(fp: &[u8; 32]) -> String {
    let hex: String = fp.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let is_pinned = self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
            || self.fingerprint == Some(sha256(end_entity));
        if is_pinned {
            // The very certificate configured: trusted as it is, but not past its end.
            if let Some(v) = validity(end_entity) {
                if now.as_secs() as i64 > v.not_after {
                    return Err(explained(format!(
                        "the pinned gateway certificate expired on {}: renew it on the \
             gateway and configure the new one",
                        v.expiry()
                    )));
                }
            }
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        match &self.fallback {
            None => Err(self.mismatch(end_entity)),
            Some(v) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| self.explain(e, end_entity, server_name)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(bare.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
}

/// A freshly generated self-signed certificate and its key, both PEM.
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA that signs client certificates (for `client_ca` / `tls_client_cert`).
pub struct GeneratedCa {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl GeneratedCa {
    pub fn new(name: &str) -> Result<GeneratedCa, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(GeneratedCa {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A server certificate for `name`, signed by this CA.
    pub fn server_cert(&self, name: &str) -> Result<GeneratedCert, TlsError> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(GeneratedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate for `name`, signed by this CA.
    pub fn client_cert(&self, name: &str) -> Result<GeneratedCert, TlsError> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(GeneratedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

pub fn generate_self_signed(names: &[&str]) -> Result<GeneratedCert, TlsError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names)?;
    Ok(GeneratedCert {
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
    })
}

/// As [`generate_self_signed`], valid from a day ago until `not_after` (Unix seconds):
/// certificates near their expiry, for tests and checks.
pub fn generate_self_signed_until(
    names: &[&str],
    not_after: i64,
) -> Result<GeneratedCert, TlsError> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names)?;
    let at = |unix: i64| {
        time::OffsetDateTime::from_unix_timestamp(unix)
            .map_err(|_| TlsError::Generate(rcgen::Error::Time))
    };
    params.not_before = at(unix_now() - 86_400)?;
    params.not_after = at(not_after)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn validity_is_read_from_the_certificate() {
        let until = 2_000_000_000; // 2033-05-18T03:33:20Z
        let g = generate_self_signed_until(&["localhost"], until).unwrap();
        let v = validity(&der(&g.cert_pem)).unwrap();
        assert_eq!(v.not_after, until);
        assert!(v.not_before < unix_now());
        assert_eq!(v.expiry(), "2033-05-18T03:33:20Z");
        // Far dates use GeneralizedTime.
        let far = generate_self_signed_until(&["localhost"], 4_102_444_800 + 3600).unwrap();
        assert_eq!(
            validity(&der(&far.cert_pem)).unwrap().not_after,
            4_102_444_800 + 3600
        );
        assert!(validity(&CertificateDer::from(vec![0x30, 0x03, 1, 2])).is_none());
        assert!(validity(&CertificateDer::from(Vec::new())).is_none());
    }

    #[test]
    fn a_slot_replaces_its_certificate_and_keeps_it_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let write = |g: &GeneratedCert| {
            std::fs::write(&cert, &g.cert_pem).unwrap();
            std::fs::write(&key, &g.key_pem).unwrap();
        };
        let first = generate_self_signed_until(&["a"], unix_now() + 86_400).unwrap();
        write(&first);
        let slot = CertSlot::load(&cert, &key).unwrap();
        let old_leaf = slot.leaf().unwrap();
        let second = generate_self_signed_until(&["a"], unix_now() + 2 * 86_400).unwrap();
        write(&second);
        let v = slot.replace(&cert, &key).unwrap();
        assert_eq!(slot.expiry(), v.not_after);
        let new_leaf = slot.leaf().unwrap();
        assert_ne!(new_leaf, old_leaf);
        // A key of another certificate, or an expired one: the slot keeps what it has.
        std::fs::write(&key, &first.key_pem).unwrap();
        let err = slot.replace(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        write(&generate_self_signed_until(&["a"], unix_now() - 60).unwrap());
        let err = slot.replace(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("expired on"), "{err}");
        assert_eq!(slot.leaf().unwrap(), new_leaf);
        assert_eq!(slot.expiry(), v.not_after);
    }

    /// A handshake in memory: the gateway serves `served`, the agent trusts `trust`
    /// (a PEM file) and dials `name`. The agent's error in words, if any.
    async fn handshake(served: &GeneratedCert, trust: &str, name: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        std::fs::write(path("c.pem"), &served.cert_pem).unwrap();
        std::fs::write(path("k.pem"), &served.key_pem).unwrap();
        std::fs::write(path("trust.pem"), trust).unwrap();
        let (server, _) = rotating_server_config(&path("c.pem"), &path("k.pem"), None).unwrap();
        let client = gateway_client_config(Some(&path("trust.pem")), None, None).unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            let _ = tokio_rustls::TlsAcceptor::from(server).accept(b).await;
        });
        let result = tokio_rustls::TlsConnector::from(client)
            .connect(server_name(name).unwrap(), a)
            .await
            .map(|_| ())
            .map_err(|e| describe_io_error(&e));
        accept.abort();
        result
    }

    #[tokio::test]
    async fn refusals_name_the_fix() {
        let ca = GeneratedCa::new("test ca").unwrap();
        let served = ca.server_cert("gw.example").unwrap();
        // Chained to the configured CA: verified as usual, the name included.
        handshake(&served, &ca.cert_pem, "gw.example")
            .await
            .unwrap();
        let err = handshake(&served, &ca.cert_pem, "other.example")
            .await
            .unwrap_err();
        assert!(err.contains("not valid for the name"), "{err}");
        assert!(err.contains("gateway_server_name"), "{err}");
        // Another CA: a mismatch, with the fingerprint the gateway presented.
        let other = GeneratedCa::new("other ca").unwrap();
        let err = handshake(&served, &other.cert_pem, "gw.example")
            .await
            .unwrap_err();
        assert!(err.contains("pinned certificate mismatch"), "{err}");
        let der = CertificateDer::from_pem_slice(served.cert_pem.as_bytes()).unwrap();
        assert!(err.contains(&fingerprint_hex(der.as_ref())), "{err}");
        // The configured certificate itself: pinned, whatever the name.
        handshake(&served, &served.cert_pem, "anything.example")
            .await
            .unwrap();
        // ... but not once it has expired.
        let old = generate_self_signed_until(&["gw.example"], unix_now() - 60).unwrap();
        let err = handshake(&old, &old.cert_pem, "gw.example")
            .await
            .unwrap_err();
        assert!(err.contains("pinned gateway certificate expired"), "{err}");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            generate_self_signed(&["a"]).unwrap(),
            generate_self_signed(&["b"]).unwrap(),
        );
        let (cert, key) = (dir.path().join("a.pem"), dir.path().join("b.key"));
        std::fs::write(&cert, &a.cert_pem).unwrap();
        std::fs::write(&key, &b.key_pem).unwrap();
        let err = load_certified_key(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        std::fs::write(&key, &a.key_pem).unwrap();
        load_certified_key(&cert, &key).unwrap();
    }
}
