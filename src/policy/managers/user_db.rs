//! `mapDB`: users, their passwords (argon2 or bcrypt hashes, or plain text) and groups.

use std::collections::HashMap;

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::net::secret_eq;
use crate::policy::config::MapDbConf;
use crate::policy::error::{At, PolicyConfigError};

enum Stored {
    /// PHC string, checked at load so verification cannot fail to parse.
    Argon2(String),
    Bcrypt(String),
    Plain(String),
}

pub struct UserDb {
    name: String,
    passwords: HashMap<String, Stored>,
    groups: HashMap<String, Vec<String>>,
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
            let stored = if pass.starts_with("$argon2") {
                let parsed = PasswordHash::new(pass)
                    .map_err(|e| at.err(key(), format!("bad argon2 hash: {e}")))?;
                // The PHC grammar allows a string without salt or hash, which no password matches.
                if parsed.salt.is_none() || parsed.hash.is_none() {
                    return Err(at.err(key(), "bad argon2 hash: no salt or hash part"));
                }
                Stored::Argon2(pass.clone())
            } else if pass.starts_with("$2") {
                // The crate's parser accepts truncated strings that `verify` would then
                // reject forever; a real hash is always 60 characters.
                if pass.len() != 60 {
                    return Err(at.err(key(), "bad bcrypt hash: expected 60 characters"));
                }
                pass.parse::<bcrypt::HashParts>()
                    .map_err(|e| at.err(key(), format!("bad bcrypt hash: {e}")))?;
                Stored::Bcrypt(pass.clone())
            } else {
                plain.push(user.as_str());
                Stored::Plain(pass.clone())
            };
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
            groups: c.user_groups.clone().into_iter().collect(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hash checks are constant-time in their crates; plain text goes through `secret_eq`.
    /// An unknown user costs what a known one does (a dummy argon2 check when the DB
    /// holds hashes), so timing does not tell which names exist.
    pub fn authenticate(&self, user: &str, pass: &str) -> bool {
        match self.passwords.get(user) {
            Some(Stored::Argon2(h)) => PasswordHash::new(h)
                .map(|p| {
                    Argon2::default()
                        .verify_password(pass.as_bytes(), &p)
                        .is_ok()
                })
                .unwrap_or(false),
            Some(Stored::Bcrypt(h)) => bcrypt::verify(pass, h).unwrap_or(false),
            Some(Stored::Plain(p)) => secret_eq(p, pass),
            None => {
                let hashed = self
                    .passwords
                    .values()
                    .any(|p| !matches!(p, Stored::Plain(_)));
                if hashed {
                    let _ = PasswordHash::new(dummy_hash()).map(|p| {
                        Argon2::default()
                            .verify_password(pass.as_bytes(), &p)
                            .is_ok()
                    });
                } else {
                    let _ = secret_eq("\u{0}no such user\u{0}", pass);
                }
                false
            }
        }
    }

    pub fn groups(&self, user: &str) -> &[String] {
        self.groups.get(user).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn knows(&self, user: &str) -> bool {
        self.passwords.contains_key(user) || self.groups.contains_key(user)
    }
}

/// An argon2 hash with the default parameters (those the generated admin uses), built
/// once, that no password matches in practice: unknown users are checked against it.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"anyproxy-no-such-user").unwrap_or_else(|_| {
            SaltString::from_b64("YW55cHJveHlub3VzZXI").expect("a valid fixed salt")
        });
        Argon2::default()
            .hash_password(b"\0no such user\0", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use argon2::{Algorithm, Params, Version};

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
