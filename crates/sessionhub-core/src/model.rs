//! Sessions and connections as engines store and return them.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{ConnectionId, GroupName, NodeId, SessionId, UserId};
use crate::time::as_rfc3339;
use crate::token::Token;

/// Default session lifetime when the caller gives none.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a caller may ask for.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest `user_agent` kept, in bytes (longer ones are refused).
pub const MAX_USER_AGENT_LEN: usize = 512;
/// Default idle timeout: a session without authenticated activity this long ends.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// What is needed to create a session. Validated by the caller (the HTTP layer).
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Owner.
    pub user_id: UserId,
    /// The device's user agent, for display.
    pub user_agent: Option<String>,
    /// The device's address, for display.
    pub ip: Option<String>,
    /// Absolute lifetime from now.
    pub ttl: Duration,
    /// Idle timeout: the session ends after this long without activity.
    pub idle: Duration,
}

/// A live WebSocket connection of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    /// The connection.
    pub connection_id: ConnectionId,
    /// The node that holds its socket.
    pub node_id: NodeId,
    /// When it was registered (Unix ms; RFC 3339 on the wire).
    #[serde(with = "as_rfc3339")]
    pub connected_at: i64,
}

/// A session, as shown to the application, the user and other sessions of the user.
/// It never carries the secret or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Session {
    /// Public id.
    pub session_id: SessionId,
    /// Owner.
    pub user_id: UserId,
    /// Device user agent, if known.
    pub user_agent: Option<String>,
    /// Device address, if known.
    pub ip: Option<String>,
    /// Creation time (Unix ms; RFC 3339 on the wire).
    #[serde(with = "as_rfc3339")]
    pub created_at: i64,
    /// Last authenticated activity (Unix ms; RFC 3339 on the wire).
    #[serde(with = "as_rfc3339")]
    pub last_seen_at: i64,
    /// Absolute expiry (Unix ms; RFC 3339 on the wire).
    #[serde(with = "as_rfc3339")]
    pub expires_at: i64,
    /// When it ends if there is no activity before (`last_seen_at` + idle timeout).
    #[serde(with = "as_rfc3339")]
    pub idle_expires_at: i64,
    /// Live connections, sorted by connection time.
    pub connections: Vec<ConnectionInfo>,
}

impl Session {
    /// The idle timeout in milliseconds.
    pub fn idle_ms(&self) -> i64 {
        self.idle_expires_at - self.last_seen_at
    }

    /// When the session ends by itself: the earlier of its absolute and idle
    /// expiry.
    pub fn deadline(&self) -> i64 {
        self.expires_at.min(self.idle_expires_at)
    }

    /// Whether it has ended by itself at `now`.
    pub fn expired_at(&self, now: i64) -> bool {
        self.deadline() <= now
    }
}

/// Limits on the sockets of one session and one user, enforced atomically when a
/// connection registers, and on the sessions of one user, enforced when one is
/// created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most live sockets of one session.
    pub per_session: u32,
    /// Most live sockets of one user, across sessions and nodes.
    pub per_user: u32,
    /// Most sessions of one user: a login past it ends the user's oldest session
    /// (reason [`EndReason::Limit`]).
    pub sessions_per_user: u32,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            per_session: DEFAULT_MAX_SOCKETS_PER_SESSION,
            per_user: DEFAULT_MAX_SOCKETS_PER_USER,
            sessions_per_user: DEFAULT_MAX_SESSIONS_PER_USER,
        }
    }
}

/// Default [`ConnLimits::sessions_per_user`].
pub const DEFAULT_MAX_SESSIONS_PER_USER: u32 = 100;

/// Default [`ConnLimits::per_session`].
pub const DEFAULT_MAX_SOCKETS_PER_SESSION: u32 = 32;
/// Default [`ConnLimits::per_user`].
pub const DEFAULT_MAX_SOCKETS_PER_USER: u32 = 128;

/// A freshly created session and its token, which is shown exactly once.
#[derive(Debug, Clone)]
pub struct CreatedSession {
    /// The session.
    pub session: Session,
    /// The token for the client's cookie.
    pub token: Token,
}

/// Why a session ended; sent to its sockets in `session_ended`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Ended by the application, an operator, or another session of the user.
    Killed,
    /// The session logged itself out.
    Logout,
    /// Its lifetime ran out.
    Expired,
    /// The user logged in once more than the per-user session cap allows; this was
    /// the oldest session.
    Limit,
}

impl EndReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Killed => "killed",
            EndReason::Logout => "logout",
            EndReason::Expired => "expired",
            EndReason::Limit => "limit",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "killed" => Some(EndReason::Killed),
            "logout" => Some(EndReason::Logout),
            "expired" => Some(EndReason::Expired),
            "limit" => Some(EndReason::Limit),
            _ => None,
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a published message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every live socket of a user.
    User(UserId),
    /// Every live socket of a session.
    Session(SessionId),
    /// One socket.
    Connection(ConnectionId),
    /// Every socket in a group (directly, or through its user).
    Group(GroupName),
    /// Every socket on every node.
    All,
}

/// A group member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Member {
    /// One connection; membership ends when it closes.
    Connection(ConnectionId),
    /// A user: all of their current and future connections.
    User(UserId),
}

/// How far a publish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Nodes the message was sent to.
    pub nodes: u64,
    /// Sockets targeted, where known (not for `All`).
    pub connections: Option<u64>,
    /// The message's offset in the user's history, for a recoverable message (a
    /// string on the wire, as in frames).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "offset_str")]
    pub offset: Option<u64>,
}

fn offset_str<S: serde::Serializer>(o: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match o {
        Some(n) => s.collect_str(n),
        None => s.serialize_none(),
    }
}

/// Cluster-wide presence counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PresenceCounts {
    /// Users with at least one live connection (each counted once).
    pub online_users: u64,
    /// Live connections.
    pub connections: u64,
    /// Nodes holding a lease.
    pub nodes: u64,
}

/// An online user and their number of live connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnlineUser {
    /// The user.
    pub user_id: UserId,
    /// Live connections across the cluster.
    pub connections: u64,
}

/// What a node says of itself, for operators (the admin console, `GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Where it listens (as it bound it).
    pub address: String,
    /// Sockets it holds.
    pub sockets: u64,
    /// Whether it answers `/readyz` with 200.
    pub ready: bool,
    /// When it said so (Unix ms).
    pub at: i64,
    /// Its counters at that moment (zero from a node too old to say): the admin
    /// console's rates, from consecutive statuses of each node.
    #[serde(default)]
    pub counters: NodeCounters,
}

/// Counters a node announces with its status (as on its `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    /// Frames sent to its sockets.
    pub messages_out: u64,
    /// Sessions created through it.
    pub sessions_created: u64,
    /// Sessions it ended as killed.
    pub sessions_killed: u64,
}

/// A node of the cluster as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeView {
    /// The node.
    pub node_id: NodeId,
    /// When its lease runs out (Unix ms); in the past: the node is dead and about to
    /// be reaped. `None`: the store keeps no leases (one node).
    pub lease_expires_at: Option<i64>,
    /// Its last status, if it announced one recently.
    pub status: Option<NodeStatus>,
}

/// A socket as its node knows it, for re-registering records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRecord {
    /// The connection.
    pub connection_id: ConnectionId,
    /// Its session.
    pub session_id: SessionId,
    /// Its user.
    pub user_id: UserId,
    /// When it connected (Unix ms).
    pub connected_at: i64,
    /// Where the socket is in its user's history (the epoch it was given and the
    /// last offset it got, or that its registration accounted for): what it would
    /// recover from on a reconnect. `None` without history.
    pub recovery: Option<crate::history::Recovery>,
}

/// What [`crate::Engine::reassert`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reasserted {
    /// The sessions that no longer exist (one entry per socket of theirs).
    pub gone: Vec<SessionId>,
    /// The sockets whose session has recoverable frames after their
    /// [`LocalRecord::recovery`] point, or whose user's history was renumbered:
    /// frames published while this node could not hear them (it was not
    /// subscribed) that they never got.
    pub missed: Vec<ConnectionId>,
}
