//! `mapDB`: users, their passwords (argon2 or bcrypt hashes, or plain text) and groups.

use std::collections::HashMap;

use crate::auth::hash::{verify_unknown, Stored};
use crate::policy::config::MapDbConf;
use crate::policy::error::{At, PolicyConfigError};

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
            Some(stored) => stored.verify(pass),
            None => {
                verify_unknown(self.passwords.values().any(|p| !p.is_plain()), pass);
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
