//! The policy's user databases: `mapDB` (users, their passwords (argon2 or bcrypt
//! hashes, or plain text) and groups) and `adDB` (an LDAP / Active Directory
//! directory, checked through the gateway's `ldap` authentication backend).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::auth::config::LdapConfig;
use crate::auth::hash::{verify_unknown, Stored};
use crate::auth::ldap::LdapBackend;
use crate::auth::{Attempt, Authenticator, Kind, Verdict};
use crate::net::HumanDuration;
use crate::policy::config::{AdDbConf, MapDbConf};
use crate::policy::error::{At, PolicyConfigError};

pub struct UserDb {
    name: String,
    passwords: HashMap<String, Stored>,
    groups: RwLock<HashMap<String, Vec<String>>>,
    directory: Option<Directory>,
}

/// An `adDB`: the directory, and a runtime of its own, since the policy's commands are
/// synchronous (they run on blocking threads). The groups of a user are those of their
/// last successful login.
struct Directory {
    backend: Arc<LdapBackend>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Directory {
    fn drop(&mut self) {
        // A runtime may not be dropped where blocking is not allowed (a policy reload).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
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
        Ok(UserDb {
            name: c.name.clone(),
            passwords,
            groups: RwLock::new(c.user_groups.clone().into_iter().collect()),
            directory: None,
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
                crate::transport::tls::client_config_without_alpn(None)
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
            passwords: HashMap::new(),
            groups: RwLock::new(HashMap::new()),
            directory: Some(Directory {
                backend: Arc::new(LdapBackend::new(&c.name, config, tls)),
                runtime: Some(runtime),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hash checks are constant-time in their crates; plain text goes through `secret_eq`.
    /// An unknown user costs what a known one does (a dummy argon2 check when the DB
    /// holds hashes), so timing does not tell which names exist.
    pub fn authenticate(&self, user: &str, pass: &str) -> bool {
        if let Some(d) = &self.directory {
            return self.authenticate_in(d, user, pass);
        }
        match self.passwords.get(user) {
            Some(stored) => stored.verify(pass),
            None => {
                verify_unknown(self.passwords.values().any(|p| !p.is_plain()), pass);
                false
            }
        }
    }

    /// A bind as the user; on success their directory groups are remembered. A
    /// directory that does not answer refuses the login (and says so in the log).
    fn authenticate_in(&self, d: &Directory, user: &str, pass: &str) -> bool {
        let Some(rt) = &d.runtime else {
            return false;
        };
        let attempt = Attempt {
            kind: Kind::Api,
            username: user,
            password: pass,
            client_ip: None,
            client_id: None,
            listener: "api",
        };
        let backend = d.backend.clone();
        // On a thread of its own, whatever the caller's thread is (a blocking thread
        // of the API, a runtime's worker, no runtime at all).
        let verdict = std::thread::scope(|s| {
            s.spawn(|| rt.block_on(backend.check(&attempt)))
                .join()
                .unwrap_or_else(|_| Err(crate::auth::BackendError::new(&self.name, "panicked")))
        });
        match verdict {
            Ok(Verdict::Allow { groups }) => {
                let groups = groups.iter().map(|g| g.to_string()).collect();
                self.groups.write().insert(user.to_owned(), groups);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(db = %self.name, error = %e, "adDB login refused: directory unavailable");
                false
            }
        }
    }

    pub fn groups(&self, user: &str) -> Vec<String> {
        self.groups.read().get(user).cloned().unwrap_or_default()
    }

    pub fn knows(&self, user: &str) -> bool {
        self.passwords.contains_key(user) || self.groups.read().contains_key(user)
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
