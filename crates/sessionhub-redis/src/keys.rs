//! The Redis key and channel layout: a stable interface for operators. The full
//! table, with the meaning of every field, heads `lua/sessionhub.lua` and the README.
//!
//! Every key of one user carries the hash tag `{B}`, its bucket: the first 2 hex
//! digits of the user tag (the first 8 hex digits of SHA-256 of the user id, also
//! the first 8 characters of the user's session and connection ids). Each bucket
//! also holds its share of every index (node records, presence, expiry, groups), so
//! every function touches one hash slot and the same layout runs on one Redis and on
//! Redis Cluster, where the 256 buckets spread over the shards.

use sessionhub_core::{ConnectionId, GroupName, NodeId, SessionId, UserId};

/// How many buckets there are (two hex digits).
pub const BUCKETS: usize = 256;

/// One of the 256 buckets, `00` to `ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket(u8);

impl Bucket {
    /// Every bucket, in order.
    pub fn all() -> impl Iterator<Item = Bucket> {
        (0..=u8::MAX).map(Bucket)
    }

    /// The bucket of an id that starts with a user tag (a session or connection id,
    /// or the tag itself). Ids are validated hex, so this cannot fail for them; a
    /// malformed string falls in bucket 00.
    pub fn of(tagged: &str) -> Bucket {
        Bucket(sessionhub_core::ids::shard_of(tagged))
    }

    /// The bucket named by exactly two hex digits.
    pub fn parse_hex(hex: &str) -> Option<Bucket> {
        (hex.len() == 2)
            .then(|| u8::from_str_radix(hex, 16).ok().map(Bucket))
            .flatten()
    }

    /// The bucket's index, 0 to 255.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id shard of this bucket (`sessionhub_core::ids::ID_SHARDS`): a session
    /// or connection id is in the bucket of its shard.
    pub fn shard(self) -> u8 {
        self.0
    }

    /// The bucket's two hex digits, as in the hash tag.
    pub fn hex(self) -> String {
        format!("{:02x}", self.0)
    }
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}", self.0)
    }
}

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

    fn in_bucket(&self, b: Bucket, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}{{{b}}}:{rest}", self.prefix)
    }

    /// The session's hash.
    pub fn session(&self, sid: &SessionId) -> String {
        self.in_bucket(Bucket::of(sid.as_str()), format_args!("session:{sid}"))
    }

    /// The session's connections hash.
    pub fn conns(&self, sid: &SessionId) -> String {
        self.in_bucket(
            Bucket::of(sid.as_str()),
            format_args!("session:{sid}:conns"),
        )
    }

    /// The user's session index.
    pub fn user_sessions(&self, uid: &UserId) -> String {
        self.in_bucket(Bucket::of(&uid.tag()), format_args!("user:{uid}:sessions"))
    }

    /// A connection's record.
    pub fn conn(&self, cid: &ConnectionId) -> String {
        self.in_bucket(Bucket::of(cid.as_str()), format_args!("conn:{cid}"))
    }

    /// A node's event channel for bucket `b`.
    pub fn node_channel(&self, b: Bucket, node: &NodeId) -> String {
        self.in_bucket(b, format_args!("node:{node}"))
    }

    /// A node's connection records in bucket `b`.
    pub fn node_conns(&self, b: Bucket, node: &NodeId) -> String {
        self.in_bucket(b, format_args!("node:{node}:conns"))
    }

    /// A group's members in bucket `b`.
    pub fn group(&self, b: Bucket, group: &GroupName) -> String {
        self.in_bucket(b, format_args!("group:{group}"))
    }

    /// The buckets that may hold members of a group, each with the number of adds
    /// it has seen (a hash; the counter lets a sweep forget a bucket whose members
    /// left without racing a concurrent add).
    pub fn group_buckets(&self, group: &GroupName) -> String {
        format!("{}group:{}:in_buckets", self.prefix, group)
    }

    /// The set of buckets of a group written by 0.2.0 (read, never written).
    pub fn legacy_group_buckets(&self, group: &GroupName) -> String {
        format!("{}group:{}:buckets", self.prefix, group)
    }

    /// The groups whose members in bucket `b` were all gone, with a count each.
    pub fn groups_emptied(&self, b: Bucket) -> String {
        self.in_bucket(b, format_args!("groups:emptied"))
    }

    /// The online users of bucket `b`.
    pub fn online(&self, b: Bucket) -> String {
        self.in_bucket(b, format_args!("online"))
    }

    /// When each session of bucket `b` ends by itself.
    pub fn expiry(&self, b: Bucket) -> String {
        self.in_bucket(b, format_args!("expiry"))
    }

    /// Bucket `b`'s lifecycle event stream.
    pub fn events(&self, b: Bucket) -> String {
        self.in_bucket(b, format_args!("events"))
    }

    /// The channel that rings when bucket `b`'s event stream gets an entry.
    pub fn events_ring(&self, b: Bucket) -> String {
        self.in_bucket(b, format_args!("events:new"))
    }

    /// The node leases.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// Which process runs under a node id (its nonce; expires with the lease).
    pub fn node_claim(&self, node: &NodeId) -> String {
        format!("{}node-claim:{node}", self.prefix)
    }

    /// A node's last status (JSON, for operators; expires on its own).
    pub fn node_status(&self, node: &NodeId) -> String {
        format!("{}node-status:{node}", self.prefix)
    }

    /// The sweep index: bucket → the earliest time it may need the expiry sweep.
    pub fn sweep(&self) -> String {
        format!("{}sweep", self.prefix)
    }

    /// The channel every node subscribes to.
    pub fn all_channel(&self) -> String {
        format!("{}all", self.prefix)
    }

    /// The bucket named by the hash tag of a key or channel of this layout.
    pub fn bucket_of_key(&self, key: &str) -> Option<Bucket> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('{')?;
        let (hex, _) = rest.split_once('}')?;
        (hex.len() == 2)
            .then(|| u8::from_str_radix(hex, 16).ok().map(Bucket))
            .flatten()
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
            "sh:{2b}:session:2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa"
        );
        assert_eq!(
            k.conns(&sid),
            "sh:{2b}:session:2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa:conns"
        );
        assert_eq!(k.user_sessions(&alice), "sh:{2b}:user:alice:sessions");
        let b = Bucket::of("2b");
        let node = NodeId::parse("a").unwrap();
        assert_eq!(k.node_channel(b, &node), "sh:{2b}:node:a");
        assert_eq!(k.node_conns(b, &node), "sh:{2b}:node:a:conns");
        assert_eq!(k.online(Bucket::of("00")), "sh:{00}:online");
        assert_eq!(k.bucket_of_key("sh:{2b}:node:a"), Some(b));
        assert_eq!(k.bucket_of_key("sh:all"), None);
        assert_eq!(Bucket::all().count(), BUCKETS);
        assert_eq!(Bucket::parse_hex("2b"), Some(b));
        assert_eq!(Bucket::parse_hex("2"), None);
        assert_eq!(Bucket::parse_hex("zz"), None);
        assert_eq!(k.sweep(), "sh:sweep");
        assert_eq!(Bucket::all().last().map(|b| b.hex()), Some("ff".into()));
    }
}
