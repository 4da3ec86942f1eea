//! The config dir (`~/.config/pmproxy` by default): `server.toml`, `managers.toml`, the
//! API's certificate and key, the JWT signing key, and the persisted state files.
//!
//! A missing dir or file is created with a working default; an existing file is never
//! overwritten, so an administrator's edits always win.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::jwt::{JwtTokens, MIN_KEY_LEN};
use super::server_config::{ServerConf, ServerConfError, DEFAULT_SERVER_TOML};
use super::shared::SharedJwt;
use super::{Clock, Policy, PolicyConfigError, PolicyOptions, SystemClock, TokenCodec};
use crate::cluster::Cluster;
use crate::transport::tls::{self, TlsError};

pub const SERVER_TOML: &str = "server.toml";
pub const MANAGERS_TOML: &str = "managers.toml";
pub const JWT_KEY_FILE: &str = "jwt.key";

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] ServerConfError),
    #[error(transparent)]
    Managers(#[from] PolicyConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{}: {message}", path.display())]
    JwtKey { path: PathBuf, message: String },
    #[error("cannot hash the generated admin password: {0}")]
    Hash(String),
}

/// What a first start created. The admin password exists nowhere else (the file holds
/// its argon2 hash): show it to the operator once.
#[derive(Clone)]
pub struct FirstRun {
    pub admin_user: String,
    pub admin_password: String,
}

impl std::fmt::Debug for FirstRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstRun")
            .field("admin_user", &self.admin_user)
            .field("admin_password", &"<redacted>")
            .finish()
    }
}

impl FirstRun {
    /// For the operator's terminal (not the log: it holds the password).
    pub fn message(&self, dir: &Path) -> String {
        format!(
            "created {MANAGERS_TOML} in {} with the administrator {:?}, password {:?} \
             (shown only now; its hash is in the file)",
            dir.display(),
            self.admin_user,
            self.admin_password
        )
    }
}

pub struct PolicyDir {
    pub path: PathBuf,
    /// Public so a caller can override values (tests listen on port 0).
    pub server: ServerConf,
    /// Set when this start generated `managers.toml`.
    pub first_run: Option<FirstRun>,
    codec: Arc<JwtTokens>,
    /// The raw key behind `codec`, offered to the cluster store on first start.
    jwt_key: Vec<u8>,
}

impl std::fmt::Debug for PolicyDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyDir")
            .field("path", &self.path)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// `$XDG_CONFIG_HOME/pmproxy`, else `$HOME/.config/pmproxy`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("pmproxy"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".config").join("pmproxy"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` with `contents` unless it exists; `private` files are 0600 from the
/// first byte (no window where another user could read them). `Ok(false)` if it existed.
pub(crate) fn create_new(path: &Path, contents: &[u8], private: bool) -> Result<bool, DirError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    match opts.open(path) {
        Ok(mut f) => {
            f.write_all(contents)
                .and_then(|_| f.sync_all())
                .map_err(io_err(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use rand::Rng;
    let mut b = [0u8; N];
    rand::rng().fill(&mut b[..]);
    b
}

/// 18 random bytes as base64url: 24 characters, 144 bits.
fn generate_password() -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    URL_SAFE_NO_PAD.encode(random_bytes::<18>())
}

fn hash_password(password: &str) -> Result<String, DirError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt =
        SaltString::encode_b64(&random_bytes::<16>()).map_err(|e| DirError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DirError::Hash(e.to_string()))
}

fn default_managers_toml(admin: &str, hash: &str) -> String {
    format!(
        r#"# anyproxy pmproxy: managers.toml (keys as in the PMProxy manual; see docs/POLICY.md).
# Generated on first start. Requests are allowed from an address where a user logged in
# (`anyproxy ctl login`) while that user is under their download quota.
rules = "session ∧ quota"
admins = ["{admin}"]
jwtExpiration = "24h"

[mapDB]
	name = "users"
	# argon2 or bcrypt hashes; plain text works too, with a warning at load.
	userPass = {{ {admin} = "{hash}" }}
	userGroups = {{ {admin} = ["admins"] }}

[[sessionIPM]]
	name = "session"
	auth = "users"

[[dwnConsR]]
	name = "quota"
	userDBN = "users"
	resetCycle = "168h"
	[dwnConsR.groupQuota]
		admins = "100 GB"
"#
    )
}

const DEFAULT_INDEX_HTML: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>anyproxy</title></head>\n<body><h1>anyproxy policy API</h1>\n<p>Log in with <code>anyproxy ctl login</code>, or POST a command to <code>/api/cmd</code>.</p></body></html>\n";

impl PolicyDir {
    /// Opens `dir`, creating it and whatever is missing of `server.toml`,
    /// `managers.toml`, the certificate and key, the JWT key and the static files dir.
    pub fn open_or_init(dir: &Path) -> Result<PolicyDir, DirError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let server_path = dir.join(SERVER_TOML);
        create_new(&server_path, DEFAULT_SERVER_TOML.as_bytes(), false)?;
        let server = ServerConf::load(&server_path)?;

        let managers_path = dir.join(MANAGERS_TOML);
        let mut first_run = None;
        if !managers_path.exists() {
            let admin = "admin".to_string();
            let password = generate_password();
            let text = default_managers_toml(&admin, &hash_password(&password)?);
            if create_new(&managers_path, text.as_bytes(), true)? {
                first_run = Some(FirstRun {
                    admin_user: admin,
                    admin_password: password,
                });
            }
        }

        let cert = dir.join(&server.api.https_cert);
        let key = dir.join(&server.api.https_key);
        if !cert.exists() && !key.exists() {
            let g = tls::generate_self_signed(&["localhost", "127.0.0.1", "::1"])?;
            // Key first: a cert without its key is useless, the reverse is regenerated.
            create_new(&key, g.key_pem.as_bytes(), true)?;
            create_new(&cert, g.cert_pem.as_bytes(), false)?;
        }

        if let Some(static_dir) = server.api.static_dir(dir) {
            if !static_dir.exists() {
                std::fs::create_dir_all(&static_dir).map_err(io_err(&static_dir))?;
                create_new(
                    &static_dir.join("index.html"),
                    DEFAULT_INDEX_HTML.as_bytes(),
                    false,
                )?;
            }
        }

        let (codec, jwt_key) = load_or_create_jwt_key(&dir.join(JWT_KEY_FILE))?;
        Ok(PolicyDir {
            path: dir.to_path_buf(),
            server,
            first_run,
            codec: Arc::new(codec),
            jwt_key,
        })
    }

    pub fn managers_path(&self) -> PathBuf {
        self.path.join(MANAGERS_TOML)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.path.join(&self.server.api.https_cert)
    }

    pub fn key_path(&self) -> PathBuf {
        self.path.join(&self.server.api.https_key)
    }

    pub fn static_dir(&self) -> Option<PathBuf> {
        self.server.api.static_dir(&self.path)
    }

    /// The JWT codec signed with this dir's key.
    pub fn token_codec(&self) -> Arc<JwtTokens> {
        self.codec.clone()
    }

    /// `managers.toml` with JWT tokens and state files in this dir.
    pub fn load_policy(&self) -> Result<Policy, DirError> {
        self.load_policy_with_clock(Arc::new(SystemClock))
    }

    pub fn load_policy_with_clock(&self, clock: Arc<dyn Clock>) -> Result<Policy, DirError> {
        self.load(clock, None)
    }

    /// `load_policy`, with sessions, consumptions and the JWT key in `cluster`'s store
    /// when there is one (the gateway's `gateway.cluster`).
    pub fn load_policy_in(&self, cluster: Option<Arc<Cluster>>) -> Result<Policy, DirError> {
        self.load(Arc::new(SystemClock), cluster)
    }

    fn load(
        &self,
        clock: Arc<dyn Clock>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Policy, DirError> {
        let shared_jwt = cluster
            .as_ref()
            .map(|_| Arc::new(SharedJwt::new(self.token_codec(), &self.jwt_key)));
        let codec: Arc<dyn TokenCodec> = match &shared_jwt {
            Some(j) => j.clone(),
            None => self.token_codec(),
        };
        let opts = PolicyOptions {
            state_dir: Some(self.path.clone()),
            clock,
            codec,
            file_label: MANAGERS_TOML.to_string(),
            cluster,
            shared_jwt,
        };
        Ok(Policy::load(&self.managers_path(), opts)?)
    }

    pub fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, DirError> {
        Ok(tls::server_config(&self.cert_path(), &self.key_path())?)
    }
}

/// Reads the key (base64), generating it on first use; warns if others can read it.
fn load_or_create_jwt_key(path: &Path) -> Result<(JwtTokens, Vec<u8>), DirError> {
    let fresh = STANDARD.encode(random_bytes::<64>()) + "\n";
    create_new(path, fresh.as_bytes(), true)?;
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let key = STANDARD.decode(text.trim()).map_err(|e| DirError::JwtKey {
        path: path.to_path_buf(),
        message: format!("not base64: {e} (remove the file to generate a new key; every token then stops working)"),
    })?;
    let codec = JwtTokens::new(&key).ok_or_else(|| DirError::JwtKey {
        path: path.to_path_buf(),
        message: format!("{} bytes; at least {MIN_KEY_LEN} are needed", key.len()),
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{}: readable by other users; anyone who reads it can forge session tokens (chmod 600)",
                    path.display()
                );
            }
        }
    }
    Ok((codec, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_working_default_and_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pm");
        let d = PolicyDir::open_or_init(&dir).unwrap();
        let first = d.first_run.clone().unwrap();
        assert!(!format!("{first:?}").contains(&first.admin_password));
        let managers = std::fs::read_to_string(d.managers_path()).unwrap();
        assert!(!managers.contains(&first.admin_password));
        let p = d.load_policy().unwrap();
        d.tls_config().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [JWT_KEY_FILE, "key.pem", MANAGERS_TOML] {
                let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        let token = p
            .cmd(crate::policy::Cmd {
                cmd: "open".into(),
                remote_addr: "127.0.0.1".into(),
                cred: Some(crate::policy::CmdCredentials {
                    user: first.admin_user.clone(),
                    pass: first.admin_password.clone(),
                }),
                ..Default::default()
            })
            .unwrap();
        assert!(token.as_str().unwrap().starts_with("eyJ"));

        let key = std::fs::read(dir.join(JWT_KEY_FILE)).unwrap();
        let again = PolicyDir::open_or_init(&dir).unwrap();
        assert!(again.first_run.is_none());
        assert_eq!(std::fs::read(dir.join(JWT_KEY_FILE)).unwrap(), key);
        assert_eq!(
            std::fs::read_to_string(again.managers_path()).unwrap(),
            managers
        );
    }
}
