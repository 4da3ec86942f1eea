//! Secrets: passwords from the configuration that `Debug` never shows, and comparisons
//! that take the same time whatever the input, so timing does not reveal a secret.

use subtle::ConstantTimeEq;

/// A password from the configuration: deserialised like a string, never shown by
/// `Debug` (configs are printed in errors and logs; secrets must not be).
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <redacted>)", self.username)
    }
}

/// Compares secrets in constant time (for equal lengths; length itself is not secret
/// enough to matter and cannot be hidden without padding).
pub fn secret_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// Both parts compared without short-circuit, so timing does not tell which was wrong.
pub fn credentials_match(expected: &Credentials, username: &str, password: &str) -> bool {
    let user_ok = secret_eq(&expected.username, username);
    let pass_ok = secret_eq(&expected.password, password);
    user_ok & pass_ok
}
