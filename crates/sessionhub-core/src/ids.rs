//! Typed identifiers.
//!
//! Every id that ends up in a Redis key or channel name is validated on the way in,
//! so a hostile id can never break the key layout (no spaces, braces, colons in
//! session ids, no control characters anywhere).
//!
//! Sessions are keyed by their **user tag**: the first 8 hex digits of the SHA-256 of
//! the user id. The tag is the Redis Cluster hash tag of every key of that user (so a
//! script that touches a user's sessions touches one hash slot), and it is also the
//! first 8 characters of each of the user's session ids, so a session id alone is
//! enough to find its keys, in one round trip.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest node id accepted, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;
/// Length of a user tag in hex digits.
pub const USER_TAG_LEN: usize = 8;
/// Length of a session id in hex digits: the user tag plus 96 random bits.
pub const SESSION_ID_LEN: usize = USER_TAG_LEN + 24;
/// Session and connection ids fall into this many shards by their first byte (the
/// first two hex digits of their user's tag), which the Redis engine uses as its
/// buckets: a node can then look at the sockets of one shard without walking all.
pub const ID_SHARDS: usize = 256;

/// The shard of a string that starts with a user tag (a session or connection id,
/// or the tag itself): its first byte. 0 for one that does not start with two hex
/// digits (which a validated id always does). The Redis engine's bucket of an id.
pub fn shard_of(id: &str) -> u8 {
    id.get(..2)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id was empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which kind of id.
        kind: &'static str,
    },
    /// The id was longer than allowed.
    #[error("{kind} is longer than {max} bytes")]
    TooLong {
        /// Which kind of id.
        kind: &'static str,
        /// The limit.
        max: usize,
    },
    /// The id contained a character outside its alphabet.
    #[error("{kind} may only contain {allowed}")]
    BadChar {
        /// Which kind of id.
        kind: &'static str,
        /// A human description of the alphabet.
        allowed: &'static str,
    },
}

fn check(
    kind: &'static str,
    s: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(u8) -> bool,
) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !s.bytes().all(ok) {
        return Err(IdError::BadChar { kind, allowed });
    }
    Ok(())
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// Lower-case hex of some bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// `n` bytes from the operating system's secure random generator.
///
/// # Panics
/// Panics if the OS generator fails, which on Linux only happens before the
/// kernel's pool is initialised; there is no safe way to go on without it.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut buf).expect("the OS secure random generator failed");
    buf
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// An application's user id: 1 to 128 bytes of `A-Z a-z 0-9 . _ @ + : -`.
    UserId
);
string_id!(
    /// A session's public id: the owner's 8-digit user tag followed by 24 random hex
    /// digits. Safe to show and log; it grants nothing without the secret.
    SessionId
);
string_id!(
    /// One WebSocket connection: its user's 8-digit tag followed by 24 random hex
    /// digits, so its records live in the user's hash slot.
    ConnectionId
);
string_id!(
    /// A group name: 1 to 128 bytes of `A-Z a-z 0-9 . _ : -`.
    GroupName
);
string_id!(
    /// A node of the cluster: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`.
    NodeId
);

impl UserId {
    /// Validates a user id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "user_id",
            s,
            MAX_USER_ID_LEN,
            "letters, digits and . _ @ + : -",
            |b| b.is_ascii_alphanumeric() || b".-_@+:".contains(&b),
        )?;
        Ok(Self(s.to_owned()))
    }

    /// The user's hash tag: the first 8 hex digits of SHA-256 of the id.
    pub fn tag(&self) -> String {
        let digest = Sha256::digest(self.0.as_bytes());
        to_hex(&digest[..USER_TAG_LEN / 2])
    }
}

impl SessionId {
    /// Validates a session id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "session_id",
            s,
            SESSION_ID_LEN,
            "lower-case hex digits",
            is_lower_hex,
        )?;
        if s.len() != SESSION_ID_LEN {
            return Err(IdError::BadChar {
                kind: "session_id",
                allowed: "exactly 32 lower-case hex digits",
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh random session id for `user`.
    pub fn generate(user: &UserId) -> Self {
        let mut s = user.tag();
        s.push_str(&to_hex(&random_bytes::<12>()));
        Self(s)
    }

    /// The owner's user tag (the first 8 characters).
    pub fn tag(&self) -> &str {
        &self.0[..USER_TAG_LEN]
    }

    /// The session's shard (see [`ID_SHARDS`]).
    pub fn shard(&self) -> u8 {
        shard_of(&self.0)
    }
}

impl ConnectionId {
    /// Validates a connection id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "connection_id",
            s,
            SESSION_ID_LEN,
            "lower-case hex digits",
            is_lower_hex,
        )?;
        if s.len() != SESSION_ID_LEN {
            return Err(IdError::BadChar {
                kind: "connection_id",
                allowed: "exactly 32 lower-case hex digits",
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh random connection id for a socket of `session`.
    pub fn generate(session: &SessionId) -> Self {
        let mut s = session.tag().to_owned();
        s.push_str(&to_hex(&random_bytes::<12>()));
        Self(s)
    }

    /// The owner's user tag (the first 8 characters).
    pub fn tag(&self) -> &str {
        &self.0[..USER_TAG_LEN]
    }

    /// The connection's shard (see [`ID_SHARDS`]): its session's and its user's.
    pub fn shard(&self) -> u8 {
        shard_of(&self.0)
    }
}

impl GroupName {
    /// Validates a group name.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "group",
            s,
            MAX_USER_ID_LEN,
            "letters, digits and . _ : -",
            |b| b.is_ascii_alphanumeric() || b"._:-".contains(&b),
        )?;
        Ok(Self(s.to_owned()))
    }
}

impl NodeId {
    /// Validates a node id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(
            "node_id",
            s,
            MAX_NODE_ID_LEN,
            "letters, digits and . _ -",
            |b| b.is_ascii_alphanumeric() || b".-_".contains(&b),
        )?;
        Ok(Self(s.to_owned()))
    }

    /// A fresh random node id, `node-` and 8 hex digits.
    pub fn generate() -> Self {
        Self(format!("node-{}", to_hex(&random_bytes::<4>())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_carry_their_users_tag() {
        let alice = UserId::parse("alice").unwrap();
        let sid = SessionId::generate(&alice);
        assert_eq!(sid.as_str().len(), SESSION_ID_LEN);
        assert_eq!(sid.tag(), alice.tag());
        assert_eq!(SessionId::parse(sid.as_str()).unwrap(), sid);
        // sha256("alice") = 2bd806c9...
        assert_eq!(alice.tag(), "2bd806c9");
    }

    #[test]
    fn hostile_ids_are_refused() {
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("a{b}").is_err());
        assert!(UserId::parse(&"a".repeat(129)).is_err());
        assert!(SessionId::parse("ABCDEF").is_err());
        assert!(SessionId::parse(&"a".repeat(31)).is_err());
        assert!(NodeId::parse("a:b").is_err());
        assert!(UserId::parse("bob@example.com").is_ok());
    }
}
