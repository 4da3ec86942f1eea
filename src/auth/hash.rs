//! Stored passwords: argon2 and bcrypt hashes (checked when loaded, so that
//! verification cannot fail to parse), or plain text where allowed. Verification is
//! constant-time in the hash crates; plain text goes through `secret_eq`.

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::net::{secret_eq, Secret};

#[derive(Clone)]
pub enum Stored {
    /// PHC string.
    Argon2(String),
    Bcrypt(String),
    Plain(Secret),
}

impl Stored {
    /// The same stored password: the same hash string, or the same plain text
    /// (compared in constant time).
    pub fn same_as(&self, other: &Stored) -> bool {
        match (self, other) {
            (Stored::Argon2(a), Stored::Argon2(b)) | (Stored::Bcrypt(a), Stored::Bcrypt(b)) => {
                a == b
            }
            (Stored::Plain(a), Stored::Plain(b)) => secret_eq(a.expose(), b.expose()),
            _ => false,
        }
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stored::Argon2(_) => "Argon2(<redacted>)",
            Stored::Bcrypt(_) => "Bcrypt(<redacted>)",
            Stored::Plain(_) => "Plain(<redacted>)",
        })
    }
}

impl Stored {
    /// Reads a stored password: `$argon2...` and `$2...` must be well-formed hashes;
    /// anything else is plain text (the caller decides whether that is allowed).
    pub fn parse(pass: &str) -> Result<Stored, String> {
        if pass.starts_with("$argon2") {
            let parsed = PasswordHash::new(pass).map_err(|e| format!("bad argon2 hash: {e}"))?;
            // The PHC grammar allows a string without salt or hash, which no password matches.
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err("bad argon2 hash: no salt or hash part".into());
            }
            Ok(Stored::Argon2(pass.to_owned()))
        } else if pass.starts_with("$2") {
            // The crate's parser accepts truncated strings that `verify` would then
            // reject forever; a real hash is always 60 characters.
            if pass.len() != 60 {
                return Err("bad bcrypt hash: expected 60 characters".into());
            }
            pass.parse::<bcrypt::HashParts>()
                .map_err(|e| format!("bad bcrypt hash: {e}"))?;
            Ok(Stored::Bcrypt(pass.to_owned()))
        } else {
            Ok(Stored::Plain(Secret::from(pass)))
        }
    }

    pub fn is_plain(&self) -> bool {
        matches!(self, Stored::Plain(_))
    }

    pub fn verify(&self, pass: &str) -> bool {
        match self {
            Stored::Argon2(h) => PasswordHash::new(h)
                .map(|p| {
                    Argon2::default()
                        .verify_password(pass.as_bytes(), &p)
                        .is_ok()
                })
                .unwrap_or(false),
            Stored::Bcrypt(h) => bcrypt::verify(pass, h).unwrap_or(false),
            Stored::Plain(p) => secret_eq(p.expose(), pass),
        }
    }
}

/// What checking an unknown user costs: as much as a known one (a dummy argon2 check
/// when `hashed`), so timing does not tell which names exist.
pub fn verify_unknown(hashed: bool, pass: &str) {
    if hashed {
        let _ = PasswordHash::new(dummy_hash()).map(|p| {
            Argon2::default()
                .verify_password(pass.as_bytes(), &p)
                .is_ok()
        });
    } else {
        let _ = secret_eq("\u{0}no such user\u{0}", pass);
    }
}

/// An argon2 hash with the default parameters (those the generated admin uses), built
/// once, that no password matches in practice: unknown users are checked against it.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let salt = SaltString::encode_b64(b"anyproxy-no-such-user").unwrap_or_else(|_| {
            SaltString::from_b64("YW55cHJveHlub3VzZXI").expect("a valid fixed salt")
        });
        Argon2::default()
            .hash_password(b"\0no such user\0", &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// An argon2id hash of `password` with the default parameters and a random salt
/// (`anyproxy passwd`).
pub fn hash_argon2(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A bcrypt hash of `password` at `cost` (`anyproxy passwd --bcrypt`).
pub fn hash_bcrypt(password: &str, cost: u32) -> Result<String, String> {
    bcrypt::hash(password, cost).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_made_here_verify() {
        let a = Stored::parse(&hash_argon2("s3cret").unwrap()).unwrap();
        assert!(a.verify("s3cret") && !a.verify("nope"));
        let b = Stored::parse(&hash_bcrypt("s3cret", 4).unwrap()).unwrap();
        assert!(b.verify("s3cret") && !b.verify("nope"));
        assert!(Stored::parse("plain").unwrap().is_plain());
        assert!(Stored::parse("$2b$04$short").is_err());
        assert!(Stored::parse("$argon2id$v=19$m=19456,t=2,p=1").is_err());
    }
}
