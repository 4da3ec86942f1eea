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

/// Why a token was refused before the session table was even asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a token issued by this server (malformed)")]
    Malformed,
    #[error("bad signature (signed with another key, or altered)")]
    BadSignature,
    #[error("signed with an algorithm this server does not accept")]
    WrongAlgorithm,
}

pub trait TokenCodec: Send + Sync {
    fn encode(&self, claims: &Claims) -> String;
    /// Checks the token's form and signature only: expiry and the nonce are the session
    /// table's business, judged against the policy's clock.
    fn decode(&self, token: &str) -> Result<Claims, TokenError>;
}

/// `base64url(user).nonce`: unsigned, so it is only as good as the nonce (256 random
/// bits checked in constant time against the session table).
pub struct OpaqueTokens;

impl TokenCodec for OpaqueTokens {
    fn encode(&self, c: &Claims) -> String {
        format!("{}.{}", URL_SAFE_NO_PAD.encode(c.user.as_bytes()), c.nonce)
    }

    fn decode(&self, token: &str) -> Result<Claims, TokenError> {
        let (user, nonce) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let user = URL_SAFE_NO_PAD
            .decode(user)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(TokenError::Malformed)?;
        Ok(Claims {
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
