//! The Redis key and channel layout: a stable interface for operators. The full
//! table, with the meaning of every field, heads `lua/sessionhub.lua` and the README.
//!
//! Every key of one user shares the hash tag `{T}` (T: the user tag, the first 8 hex
//! digits of SHA-256 of the user id, also the first 8 characters of the user's
//! session and connection ids).

use sessionhub_core::{ConnectionId, GroupName, NodeId, SessionId, UserId};

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

    /// A connection's record.
    pub fn conn(&self, cid: &ConnectionId) -> String {
        format!("{}{{{}}}:conn:{}", self.prefix, cid.tag(), cid)
    }

    /// A group's members.
    pub fn group(&self, group: &GroupName) -> String {
        format!("{}group:{}", self.prefix, group)
    }

    /// The node leases.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// The online users.
    pub fn online(&self) -> String {
        format!("{}online", self.prefix)
    }

    /// When each session ends by itself.
    pub fn expiry(&self) -> String {
        format!("{}expiry", self.prefix)
    }

    /// The channel every node subscribes to.
    pub fn all_channel(&self) -> String {
        format!("{}all", self.prefix)
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
