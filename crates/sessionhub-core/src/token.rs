//! Session tokens.
//!
//! A token is `<session_id>.<secret>`: the public session id (see
//! [`SessionId`]) and 256 random bits as 64 hex digits. The token is handed out once,
//! at creation. Storage keeps only [`SecretHash`], the SHA-256 of the secret; because
//! the secret is uniformly random, a plain (unsalted) hash is as strong as a slow one.
//! Verification compares digests in constant time.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{SessionId, UserId, random_bytes, to_hex};

/// Length of the secret part in hex digits (256 bits).
pub const SECRET_LEN: usize = 64;

/// Why a token string was refused. Deliberately says nothing about the content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `<32 hex>.<64 hex>`.
    #[error("malformed session token")]
    Malformed,
}

/// A session token: public id plus secret. Its `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    session_id: SessionId,
    secret: String,
}

/// The SHA-256 of a token's secret, as 64 lower-case hex digits: the only form of the
/// secret that storage ever holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretHash(String);

impl Token {
    /// A fresh token for a new session of `user`.
    pub fn generate(user: &UserId) -> Self {
        Self {
            session_id: SessionId::generate(user),
            secret: to_hex(&random_bytes::<32>()),
        }
    }

    /// Parses `<session_id>.<secret>` strictly; anything else is [`TokenError::Malformed`].
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let (sid, secret) = s.split_once('.').ok_or(TokenError::Malformed)?;
        let session_id = SessionId::parse(sid).map_err(|_| TokenError::Malformed)?;
        if secret.len() != SECRET_LEN
            || !secret
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(TokenError::Malformed);
        }
        Ok(Self {
            session_id,
            secret: secret.to_owned(),
        })
    }

    /// The public part.
    pub fn session_id(&self) -> &SessionId {
        &self.session_id
    }

    /// The hash that storage keeps for this token.
    pub fn secret_hash(&self) -> SecretHash {
        SecretHash(to_hex(&Sha256::digest(self.secret.as_bytes())))
    }

    /// The full token string, to hand to the client once. Never log it.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.session_id, self.secret)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("session_id", &self.session_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl SecretHash {
    /// Wraps a stored hash string (as read back from storage).
    pub fn from_stored(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The hex digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with another hash.
    pub fn ct_eq(&self, other: &SecretHash) -> bool {
        self.0.len() == other.0.len() && bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_verify() {
        let alice = UserId::parse("alice").unwrap();
        let t = Token::generate(&alice);
        let parsed = Token::parse(&t.expose()).unwrap();
        assert_eq!(parsed, t);
        assert!(parsed.secret_hash().ct_eq(&t.secret_hash()));
        assert!(!format!("{t:?}").contains(&t.expose()[33..]));
        let other = Token::generate(&alice);
        assert!(!other.secret_hash().ct_eq(&t.secret_hash()));
    }

    #[test]
    fn malformed_tokens() {
        for bad in [
            "",
            ".",
            "abc.def",
            &format!("{}.{}", "a".repeat(32), "g".repeat(64)),
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Malformed), "{bad}");
        }
    }
}
