//! The YAML shapes of `gateway.auth_backends` (defined here, where the backends are,
//! and used by `config`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::net::{Fingerprint, HumanDuration};

/// The name that stands for the configuration's own accounts in a chain.
pub const STATIC: &str = "static";

/// How long an allow is remembered when a backend sets no `cache_ttl`: long enough
/// that a browser opening dozens of connections costs one round trip, short enough
/// that a changed password or a removed user takes effect within half a minute.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);

/// One named backend of `gateway.auth_backends`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BackendConfig {
    /// A users file (YAML or htpasswd-style) with bcrypt or argon2 hashes.
    File(FileConfig),
    /// A POST of JSON to a service of the operator's.
    Http(HookConfig),
    /// An LDAP directory (OpenLDAP, Active Directory): a bind as the user.
    Ldap(Box<LdapConfig>),
}

impl BackendConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BackendConfig::File(_) => "file",
            BackendConfig::Http(_) => "http",
            BackendConfig::Ldap(_) => "ldap",
        }
    }

    pub fn cache_ttl(&self) -> Duration {
        match self {
            BackendConfig::File(f) => f.cache_ttl.0,
            BackendConfig::Http(h) => h.cache_ttl.0,
            BackendConfig::Ldap(l) => l.cache_ttl.0,
        }
    }

    /// The checks the YAML shape cannot express.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        match self {
            BackendConfig::File(f) => {
                let r = f.reload_interval.0;
                if r < Duration::from_millis(100) || r > Duration::from_secs(3600) {
                    return Err(format!(
                        "auth_backends.{name}.reload_interval must be between 100ms and 1h"
                    ));
                }
            }
            BackendConfig::Http(h) => {
                let uri: hyper::Uri = h
                    .url
                    .parse()
                    .map_err(|e| format!("auth_backends.{name}.url: {e}"))?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(format!(
                        "auth_backends.{name}.url must be an http:// or https:// URL"
                    ));
                }
                if h.timeout.0.is_zero() || h.timeout.0 > Duration::from_secs(60) {
                    return Err(format!(
                        "auth_backends.{name}.timeout must be between 1ms and 60s"
                    ));
                }
            }
            BackendConfig::Ldap(l) => l.validate(name)?,
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// `users: [{username, password, groups}]`.
    Yaml,
    /// One `user:hash[:group,group]` a line; `#` starts a comment.
    Htpasswd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: PathBuf,
    /// Default: `yaml` for a `.yaml`/`.yml` file, else `htpasswd`.
    #[serde(default)]
    pub format: Option<FileFormat>,
    /// Accept passwords that are not bcrypt or argon2 hashes, compared as plain text
    /// (in constant time). Off: such a file is refused.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// How often the file's modification time and size are looked at.
    #[serde(default = "default_reload")]
    pub reload_interval: HumanDuration,
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: HumanDuration,
}

impl FileConfig {
    pub fn format(&self) -> FileFormat {
        self.format
            .unwrap_or_else(|| match self.path.extension().and_then(|e| e.to_str()) {
                Some("yaml" | "yml") => FileFormat::Yaml,
                _ => FileFormat::Htpasswd,
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Where the JSON is POSTed: `http://` or `https://`.
    pub url: String,
    /// The whole exchange (connect, TLS, request, answer) must end within this time.
    #[serde(default = "default_hook_timeout")]
    pub timeout: HumanDuration,
    /// PEM CA(s) that the hook's certificate must chain to, or the hook's own
    /// certificate (pinned); default: the web PKI.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Pins the hook's certificate by its SHA-256 (`sha256:<hex>`), without a file.
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: HumanDuration,
}

/// `type: ldap`. Either `user_dn` (bind straight as the user, `{user}` replaced) or
/// `base_dn` (search the user with `user_filter`, as `bind_dn` or anonymously, then
/// bind as the entry found). Groups come from `group_attribute` on the user's entry
/// (`memberOf`) and/or a search under `group_base_dn` with `group_filter`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host[:389]` or `ldaps://host[:636]`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before any bind.
    #[serde(default)]
    pub starttls: bool,
    /// PEM CA(s) the directory's certificate must chain to, or its own certificate
    /// (pinned); default: the web PKI.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Pins the directory's certificate by its SHA-256 (`sha256:<hex>`), without a file.
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    /// Direct bind: the user's DN, `{user}` standing for the (DN-escaped) user name,
    /// e.g. `uid={user},ou=people,dc=example,dc=org`.
    #[serde(default)]
    pub user_dn: Option<String>,
    /// Search-then-bind: where users are searched.
    #[serde(default)]
    pub base_dn: Option<String>,
    /// The search's filter; `{user}` is the (filter-escaped) user name.
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    /// The service account that searches users and groups; absent = anonymous.
    #[serde(default)]
    pub bind_dn: Option<String>,
    #[serde(default)]
    pub bind_password: Option<crate::net::Secret>,
    /// An attribute of the user's entry that lists its groups' DNs (`memberOf`).
    #[serde(default)]
    pub group_attribute: Option<String>,
    /// Where groups are searched with `group_filter` (`{dn}`: the user's DN, `{user}`:
    /// the user name; both filter-escaped).
    #[serde(default)]
    pub group_base_dn: Option<String>,
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    /// The group entries' name attribute.
    #[serde(default = "default_group_name")]
    pub group_name_attribute: String,
    /// Directory group (its name or its whole DN, case-insensitive) → anyproxy group.
    /// When set, only mapped groups count; absent, directory group names are used as
    /// they are.
    #[serde(default)]
    pub group_map: std::collections::BTreeMap<String, String>,
    /// Each check (connect, binds, searches) must end within this time.
    #[serde(default = "default_ldap_timeout")]
    pub timeout: HumanDuration,
    /// Connections kept open for reuse, and the most open at once.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: HumanDuration,
}

impl LdapConfig {
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let key = |k: &str| format!("auth_backends.{name}.{k}");
        let ldaps = self.url.starts_with("ldaps://");
        if !ldaps && !self.url.starts_with("ldap://") {
            return Err(format!("{} must be an ldap:// or ldaps:// URL", key("url")));
        }
        if ldaps && self.starttls {
            return Err(format!("{}: StartTLS is for ldap:// URLs", key("starttls")));
        }
        match (&self.user_dn, &self.base_dn) {
            (Some(t), None) if t.contains("{user}") => {}
            (Some(_), None) => return Err(format!("{} must contain {{user}}", key("user_dn"))),
            (None, Some(_)) if self.user_filter.contains("{user}") => {}
            (None, Some(_)) => {
                return Err(format!("{} must contain {{user}}", key("user_filter")))
            }
            _ => {
                return Err(format!(
                    "auth_backends.{name}: set either user_dn (direct bind) or base_dn (search, then bind)"
                ))
            }
        }
        if self.bind_dn.is_some() != self.bind_password.is_some() {
            return Err(format!(
                "auth_backends.{name}: bind_dn and bind_password go together"
            ));
        }
        if self.pool_size == 0 || self.pool_size > 64 {
            return Err(format!("{} must be between 1 and 64", key("pool_size")));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > Duration::from_secs(60) {
            return Err(format!("{} must be between 1ms and 60s", key("timeout")));
        }
        Ok(())
    }
}

fn default_user_filter() -> String {
    "(uid={user})".into()
}

fn default_group_filter() -> String {
    "(member={dn})".into()
}

fn default_group_name() -> String {
    "cn".into()
}

fn default_ldap_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_pool() -> usize {
    4
}

fn default_reload() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

fn default_cache_ttl() -> HumanDuration {
    HumanDuration(DEFAULT_CACHE_TTL)
}

fn default_hook_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_are_tagged_and_strict() {
        let b: std::collections::BTreeMap<String, BackendConfig> = yaml_serde::from_str(
            "users: {type: file, path: /x/users.yaml}\nhook: {type: http, url: \"http://127.0.0.1:1/a\", timeout: 1s}\n",
        )
        .unwrap();
        let BackendConfig::File(f) = &b["users"] else {
            panic!("not a file backend")
        };
        assert_eq!(f.format(), FileFormat::Yaml);
        assert_eq!(f.cache_ttl.0, DEFAULT_CACHE_TTL);
        assert!(b["hook"].validate("hook").is_ok());
        let unknown: Result<BackendConfig, _> =
            yaml_serde::from_str("{type: file, path: /x, nope: 1}");
        assert!(unknown.is_err());
        let bad: BackendConfig = yaml_serde::from_str("{type: http, url: \"ftp://x\"}").unwrap();
        assert!(bad.validate("h").is_err());
    }
}
