//! Credential checks for proxy users and agents.

use subtle::ConstantTimeEq;

use crate::config::Credentials;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_both() {
        let c = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        assert!(credentials_match(&c, "u", "p"));
        assert!(!credentials_match(&c, "u", "q"));
        assert!(!credentials_match(&c, "x", "p"));
        assert!(!credentials_match(&c, "", ""));
    }
}
