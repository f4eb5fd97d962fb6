//! The Redis key and channel layout: a stable interface for operators.
//!
//! With the default prefix `sh:` and `T` the user tag (the first 8 hex digits of
//! SHA-256 of the user id, also the first 8 characters of each of the user's session
//! ids):
//!
//! | key / channel | type | content |
//! | --- | --- | --- |
//! | `sh:{T}:session:<session_id>` | hash | `user_id`, `secret_hash`, `user_agent`, `ip`, `created_at`, `last_seen_at`, `expires_at` (Unix ms); expires with the session |
//! | `sh:{T}:session:<session_id>:conns` | hash | `connection_id` → `<node_id>\|<connected_at>` |
//! | `sh:{T}:user:<user_id>:sessions` | hash | `session_id` → `expires_at` |
//! | `sh:node:<node_id>` | pub/sub channel | JSON events for the sockets that node holds |
//!
//! Every key of one user shares the hash tag `{T}`, so each Lua script touches a
//! single Redis Cluster slot.

use sessionhub_core::{NodeId, SessionId, UserId};

/// Builds key and channel names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (for example `sh:`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The session's hash.
    pub fn session(&self, sid: &SessionId) -> String {
        format!("{}{{{}}}:session:{}", self.prefix, sid.tag(), sid)
    }

    /// The session's connections hash.
    pub fn conns(&self, sid: &SessionId) -> String {
        format!("{}{{{}}}:session:{}:conns", self.prefix, sid.tag(), sid)
    }

    /// The user's session index.
    pub fn user_sessions(&self, uid: &UserId) -> String {
        format!("{}{{{}}}:user:{}:sessions", self.prefix, uid.tag(), uid)
    }

    /// The node's event channel.
    pub fn node_channel(&self, node: &NodeId) -> String {
        format!("{}node:{}", self.prefix, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("sh:");
        let alice = UserId::parse("alice").unwrap();
        let sid = SessionId::parse("2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        assert_eq!(
            k.session(&sid),
            "sh:{2bd806c9}:session:2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa"
        );
        assert_eq!(
            k.conns(&sid),
            "sh:{2bd806c9}:session:2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa:conns"
        );
        assert_eq!(k.user_sessions(&alice), "sh:{2bd806c9}:user:alice:sessions");
        assert_eq!(k.node_channel(&NodeId::parse("a").unwrap()), "sh:node:a");
    }
}
