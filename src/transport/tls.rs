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
    install_crypto_provider();
    let builder = ServerConfig::builder_with_protocol_versions(versions());
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let err = |detail: String| TlsError::ClientCa {
                path: path.display().to_string(),
                detail,
            };
            let roots = root_store(path)?;
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| err(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Certs {
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
    install_crypto_provider();
    let roots = match ca {
        Some(path) => root_store(path)?,
        None => {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        }
    };
    let builder =
        ClientConfig::builder_with_protocol_versions(versions()).with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// As [`client_config`], without ALPN: for protocols that are not HTTP (LDAP).
pub fn client_config_without_alpn(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = (*client_config(ca)?).clone();
    config.alpn_protocols.clear();
    Ok(Arc::new(config))
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
