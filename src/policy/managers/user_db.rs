//! The policy's user databases, checked through the one authentication interface
//! (`auth::Authenticator`, kind `api`): `mapDB` (users, their passwords (argon2 or
//! bcrypt hashes, or plain text) and groups) and `adDB` (an LDAP / Active Directory
//! directory: the gateway's `ldap` authentication backend).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::auth::config::LdapConfig;
use crate::auth::hash::{verify_unknown, Stored};
use crate::auth::ldap::LdapBackend;
use crate::auth::{Attempt, Authenticator, BackendError, CheckFuture, Kind, Verdict};
use crate::net::HumanDuration;
use crate::policy::config::{AdDbConf, MapDbConf};
use crate::policy::error::{At, PolicyConfigError};

pub struct UserDb {
    name: String,
    backend: Arc<dyn Authenticator>,
    /// mapDB: the configured groups; adDB: each user's groups at their last login.
    groups: RwLock<HashMap<String, Vec<String>>>,
    /// adDB: the directory's runtime (policy commands are synchronous).
    runtime: Option<DirectoryRuntime>,
}

/// A runtime of the directory's own: the policy's commands run on blocking threads,
/// and the check is asynchronous.
struct DirectoryRuntime(Option<tokio::runtime::Runtime>);

impl Drop for DirectoryRuntime {
    fn drop(&mut self) {
        // A runtime may not be dropped where blocking is not allowed (a policy reload).
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A `mapDB` as a backend: stored passwords, checked at once (constant time in the
/// hash crates, `secret_eq` for plain text; an unknown user costs a dummy check).
struct MapDb {
    name: String,
    passwords: HashMap<String, Stored>,
    hashed: bool,
}

impl Authenticator for MapDb {
    fn name(&self) -> &str {
        &self.name
    }

    fn check<'a>(&'a self, attempt: &'a Attempt<'a>) -> CheckFuture<'a> {
        let verdict = match self.passwords.get(attempt.username) {
            Some(stored) if stored.verify(attempt.password) => Verdict::Allow { groups: vec![] },
            Some(_) => Verdict::Deny { reason: None },
            None => {
                verify_unknown(self.hashed, attempt.password);
                Verdict::Unknown
            }
        };
        Box::pin(std::future::ready(Ok(verdict)))
    }
}

impl UserDb {
    pub fn from_conf(file: &str, c: &MapDbConf) -> Result<UserDb, PolicyConfigError> {
        let at = At {
            file,
            section: "[mapDB]",
            name: &c.name,
        };
        let mut passwords = HashMap::new();
        let mut plain = Vec::new();
        for (user, pass) in &c.user_pass {
            let key = || format!("userPass.{user}");
            let stored = Stored::parse(pass).map_err(|e| at.err(key(), e))?;
            if stored.is_plain() {
                plain.push(user.as_str());
            }
            passwords.insert(user.clone(), stored);
        }
        if !plain.is_empty() {
            tracing::warn!(
                "[mapDB] {:?}: plain-text passwords for {}; store argon2 (`$argon2id$...`) or bcrypt (`$2b$...`) hashes instead",
                c.name,
                plain.join(", ")
            );
        }
        let hashed = passwords.values().any(|p| !p.is_plain());
        Ok(UserDb {
            name: c.name.clone(),
            backend: Arc::new(MapDb {
                name: c.name.clone(),
                passwords,
                hashed,
            }),
            groups: RwLock::new(c.user_groups.clone().into_iter().collect()),
            runtime: None,
        })
    }

    /// An `[adDB]` as upstream: `addr` the directory (`host:port`, `ldaps` for 636, or
    /// a URL), `suff` the UPN suffix appended to the user name, `bdn` the base DN,
    /// `user`/`pass` the service account that searches users and groups. Users are
    /// found by `userPrincipalName` = name + suffix, `sAMAccountName` or `uid`, then
    /// bound as; groups come from `memberOf` and from a `(member=DN)` search under `bdn`.
    pub fn from_ad_conf(file: &str, c: &AdDbConf) -> Result<UserDb, PolicyConfigError> {
        let at = At {
            file,
            section: "[adDB]",
            name: &c.name,
        };
        let addr = c.addr.as_deref().ok_or_else(|| at.err("addr", "missing"))?;
        let bdn = c.bdn.as_deref().ok_or_else(|| at.err("bdn", "missing"))?;
        let url = if addr.contains("://") {
            addr.to_owned()
        } else if addr.ends_with(":636") {
            format!("ldaps://{addr}")
        } else {
            format!("ldap://{addr}")
        };
        let suffix = ldap3::ldap_escape(c.suff.as_deref().unwrap_or("")).into_owned();
        let config = LdapConfig {
            url: url.clone(),
            starttls: false,
            ca: None,
            fingerprint: None,
            user_dn: None,
            base_dn: Some(bdn.to_owned()),
            user_filter: format!(
                "(|(userPrincipalName={{user}}{suffix})(sAMAccountName={{user}})(uid={{user}}))"
            ),
            bind_dn: c.user.clone().filter(|u| !u.is_empty()),
            bind_password: c
                .pass
                .as_deref()
                .filter(|_| c.user.as_deref().is_some_and(|u| !u.is_empty()))
                .map(crate::net::Secret::from),
            group_attribute: Some("memberOf".into()),
            group_base_dn: Some(bdn.to_owned()),
            group_filter: "(member={dn})".into(),
            group_name_attribute: "cn".into(),
            group_map: Default::default(),
            timeout: HumanDuration(Duration::from_secs(5)),
            pool_size: 2,
            cache_ttl: HumanDuration(Duration::ZERO),
        };
        config.validate(&c.name).map_err(|e| at.err("addr", e))?;
        let tls = if url.starts_with("ldaps://") {
            Some(
                crate::transport::tls::client_config_without_alpn(None, None)
                    .map_err(|e| at.err("addr", e.to_string()))?,
            )
        } else {
            None
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("adDB")
            .enable_all()
            .build()
            .map_err(|e| at.err("addr", format!("cannot start its runtime: {e}")))?;
        Ok(UserDb {
            name: c.name.clone(),
            backend: Arc::new(LdapBackend::new(&c.name, config, tls)),
            groups: RwLock::new(HashMap::new()),
            runtime: Some(DirectoryRuntime(Some(runtime))),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One check through the backend (kind `api`). An adDB's allow remembers the
    /// user's directory groups; a directory that does not answer refuses the login
    /// and says so in the log.
    pub fn authenticate(&self, user: &str, pass: &str) -> bool {
        let attempt = Attempt {
            kind: Kind::Api,
            username: user,
            password: pass,
            client_ip: None,
            client_id: None,
            listener: "api",
        };
        let verdict = match self.runtime.as_ref().and_then(|r| r.0.as_ref()) {
            // On a thread of its own, whatever the caller's thread is (a blocking
            // thread of the API, a runtime's worker, no runtime at all).
            Some(rt) => std::thread::scope(|s| {
                s.spawn(|| rt.block_on(self.backend.check(&attempt)))
                    .join()
                    .unwrap_or_else(|_| Err(BackendError::new(&self.name, "the check panicked")))
            }),
            // A mapDB answers at once.
            None => futures_util::FutureExt::now_or_never(self.backend.check(&attempt))
                .unwrap_or_else(|| Err(BackendError::new(&self.name, "did not answer at once"))),
        };
        match verdict {
            Ok(Verdict::Allow { groups }) => {
                if self.runtime.is_some() {
                    let groups = groups.iter().map(|g| g.to_string()).collect();
                    self.groups.write().insert(user.to_owned(), groups);
                }
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(db = %self.name, error = %e, "login refused: user database unavailable");
                false
            }
        }
    }

    pub fn groups(&self, user: &str) -> Vec<String> {
        self.groups.read().get(user).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::{Algorithm, Argon2, Params, Version};

    use super::*;

    fn db(pass: &str) -> Result<UserDb, PolicyConfigError> {
        let text = format!(
            "name = \"db\"\nuserPass = {{ alice = {pass:?} }}\nuserGroups = {{ alice = [\"staff\"] }}"
        );
        let c: MapDbConf = toml::from_str(&text).unwrap();
        UserDb::from_conf("managers.toml", &c)
    }

    #[test]
    fn argon2_bcrypt_and_plain() {
        // Cheap parameters: verification reads them from the hash itself.
        let a2 = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8, 1, 1, None).unwrap(),
        );
        let salt = SaltString::from_b64("c29tZXNhbHRzYWx0").unwrap();
        let argon = a2.hash_password(b"s3cret", &salt).unwrap().to_string();
        assert!(argon.starts_with("$argon2id$"));
        let bc = bcrypt::hash("s3cret", 4).unwrap();
        for stored in [argon.as_str(), bc.as_str(), "s3cret"] {
            let db = db(stored).unwrap();
            assert!(db.authenticate("alice", "s3cret"), "{stored}");
            assert!(!db.authenticate("alice", "wrong"), "{stored}");
            assert!(!db.authenticate("bob", "s3cret"), "{stored}");
            assert_eq!(db.groups("alice"), ["staff".to_string()]);
            assert!(db.groups("bob").is_empty());
        }
    }

    #[test]
    fn broken_hashes_name_the_user() {
        let e = db("$argon2id$garbage").err().unwrap().to_string();
        assert!(
            e.starts_with("managers.toml: [mapDB] \"db\": userPass.alice: bad argon2 hash"),
            "{e}"
        );
        let e = db("$2b$99$short").err().unwrap().to_string();
        assert!(
            e.starts_with("managers.toml: [mapDB] \"db\": userPass.alice: bad bcrypt hash"),
            "{e}"
        );
    }
}
