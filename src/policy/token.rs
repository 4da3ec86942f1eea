//! Session tokens. The session table is the authority (a token names a user and the
//! nonce of that user's current session), so a pluggable codec only shapes the string:
//! the later HTTP step can sign JWTs with a key from the config dir without touching the
//! session logic.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub nonce: String,
    /// Unix seconds.
    pub expires: u64,
}

pub trait TokenCodec: Send + Sync {
    fn encode(&self, claims: &Claims) -> String;
    /// `None` for anything malformed or not issued by this codec.
    fn decode(&self, token: &str) -> Option<Claims>;
}

/// `base64url(user).nonce`: unsigned, so it is only as good as the nonce (256 random
/// bits checked in constant time against the session table).
pub struct OpaqueTokens;

impl TokenCodec for OpaqueTokens {
    fn encode(&self, c: &Claims) -> String {
        format!("{}.{}", URL_SAFE_NO_PAD.encode(c.user.as_bytes()), c.nonce)
    }

    fn decode(&self, token: &str) -> Option<Claims> {
        let (user, nonce) = token.split_once('.')?;
        let user = String::from_utf8(URL_SAFE_NO_PAD.decode(user).ok()?).ok()?;
        Some(Claims {
            user,
            nonce: nonce.to_string(),
            expires: 0,
        })
    }
}

pub fn new_nonce() -> String {
    use rand::Rng;
    let mut b = [0u8; 32];
    rand::rng().fill(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}
