//! Session tokens as HS256 JWTs signed with a key kept in the config dir, so tokens
//! outlive a restart (the upstream generated a new key at every start).
//!
//! Only form, algorithm and signature are checked here. Expiry is checked by the session
//! table against the policy's clock, which tests can move; a JWT library's own `exp`
//! check would read the wall clock and disagree with it.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::token::{Claims, TokenCodec, TokenError};

/// Shorter keys are refused: HS256 is only as strong as its key.
pub const MIN_KEY_LEN: usize = 32;

pub struct JwtTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

#[derive(Serialize, Deserialize)]
struct JwtClaims {
    sub: String,
    /// The session's nonce: a token stops working when its session is renewed or closed.
    jti: String,
    exp: u64,
    iat: u64,
}

impl JwtTokens {
    /// `None` when the key is shorter than [`MIN_KEY_LEN`].
    pub fn new(key: &[u8]) -> Option<JwtTokens> {
        if key.len() < MIN_KEY_LEN {
            return None;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        Some(JwtTokens {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
        })
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenCodec for JwtTokens {
    fn encode(&self, c: &Claims) -> String {
        let claims = JwtClaims {
            sub: c.user.clone(),
            jti: c.nonce.clone(),
            exp: c.expires,
            iat: now_secs().min(c.expires),
        };
        // HS256 signing of a plain struct cannot fail; an empty token would simply be
        // refused by `decode`, never accepted.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    fn decode(&self, token: &str) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<JwtClaims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenError::WrongAlgorithm
                }
                _ => TokenError::Malformed,
            })?;
        Ok(Claims {
            user: data.claims.sub,
            nonce: data.claims.jti,
            expires: data.claims.exp,
        })
    }
}

/// The expiry (Unix seconds) and lifetime written in a JWT, read without checking the
/// signature: for a client deciding when to renew, never for trusting the token.
pub fn peek_expiry(token: &str) -> Option<(u64, u64)> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let claims: JwtClaims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    Some((claims.exp, claims.exp.saturating_sub(claims.iat)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            user: "alice".into(),
            nonce: "n0nce".into(),
            expires: now_secs() + 3600,
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let codec = JwtTokens::new(&[7u8; 32]).unwrap();
        let t = codec.encode(&claims());
        assert_eq!(codec.decode(&t).unwrap(), claims());
        let (exp, life) = peek_expiry(&t).unwrap();
        assert_eq!(exp, claims().expires);
        assert!((3599..=3600).contains(&life));

        let other = JwtTokens::new(&[8u8; 32]).unwrap();
        assert_eq!(other.decode(&t), Err(TokenError::BadSignature));
        assert_eq!(codec.decode("garbage"), Err(TokenError::Malformed));
        // The same claims with `alg: none` and no signature.
        let mut parts = t.split('.');
        let _ = parts.next();
        let body = parts.next().unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        assert!(codec.decode(&none).is_err());
        assert!(JwtTokens::new(b"short").is_none());
    }
}
