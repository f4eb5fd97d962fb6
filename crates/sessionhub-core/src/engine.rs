//! The engine trait: where sessions and connections live, and how events reach the
//! nodes that hold the affected sockets.
//!
//! An engine is one node's handle on shared state. Every state change is one atomic
//! step in the engine. Events that concern sockets (a session was created for a user,
//! sessions ended) are delivered, through the [`EventSender`] given at construction,
//! to exactly the nodes whose connection records match, including this one.

use async_trait::async_trait;
use bytestring::ByteString;

use crate::history::{Recovery, Registered};
use crate::ids::{ConnectionId, GroupName, NodeId, SessionId, UserId};
use crate::model::{
    CreatedSession, Delivery, EndReason, LocalRecord, Member, NewSession, NodeStatus, NodeView,
    OnlineUser, PresenceCounts, Reasserted, Session, Target,
};
use crate::token::Token;

/// Capacity of the queue from an engine to its node's event dispatcher.
pub const EVENT_QUEUE_CAPACITY: usize = 4096;

/// Why an engine call failed. "Not found" is not an error: calls return `None`,
/// `false` or `0` for it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backing store cannot be reached or did not answer in time. Retry later.
    #[error("session store unavailable: {message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// The store client's own error, if there was one.
        #[source]
        cause: Option<Cause>,
    },
    /// The store answered with something this version cannot read.
    #[error("session store returned an unexpected reply: {message}")]
    Corrupt {
        /// What was wrong.
        message: String,
        /// The store client's own error, if there was one.
        #[source]
        cause: Option<Cause>,
    },
    /// A configured limit refused the operation; the message says which.
    #[error("{0}")]
    Limit(String),
}

/// The underlying error behind an [`EngineError`], kept for logs.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

impl EngineError {
    /// The store is unreachable, for the reason given.
    pub fn unavailable(message: impl Into<String>) -> Self {
        EngineError::Unavailable {
            message: message.into(),
            cause: None,
        }
    }

    /// The store's reply cannot be read, for the reason given.
    pub fn corrupt(message: impl Into<String>) -> Self {
        EngineError::Corrupt {
            message: message.into(),
            cause: None,
        }
    }

    /// The same error, caused by `cause`.
    pub fn caused_by(self, cause: impl Into<Cause>) -> Self {
        match self {
            EngineError::Unavailable { message, .. } => EngineError::Unavailable {
                message,
                cause: Some(cause.into()),
            },
            EngineError::Corrupt { message, .. } => EngineError::Corrupt {
                message,
                cause: Some(cause.into()),
            },
            limit @ EngineError::Limit(_) => limit,
        }
    }
}

/// An event for the sockets held by one node.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// A new session was created for `session.user_id`: tell that user's other
    /// sessions' sockets.
    SessionCreated {
        /// The new session (public fields).
        session: Session,
    },
    /// These sessions ended: send `session_ended` to their sockets and close them.
    SessionsEnded {
        /// The sessions.
        session_ids: Vec<SessionId>,
        /// Why.
        reason: EndReason,
    },
    /// Deliver a client frame to some of this node's sockets.
    Message {
        /// The sockets; `None` means every socket of the node.
        connections: Option<Vec<ConnectionId>>,
        /// The complete text frame, serialised once by the publisher.
        frame: ByteString,
        /// Its offset in the user's history, for a recoverable frame.
        offset: Option<u64>,
    },
    /// The event stream was interrupted and may have lost events: the node must
    /// re-check the sessions of the sockets it holds and re-assert their records.
    Resync,
    /// The node lost its lease (it was paused or cut off) and its records were
    /// dropped; it holds a new lease now and must re-assert its sockets' records.
    Fenced,
    /// Another process runs under this node's id now (this one was paused or cut
    /// off past its lease, and a node started with the same id meanwhile). The
    /// engine has stopped renewing and will leave the id's records alone; the node
    /// must shut down.
    Superseded,
}

/// Where an engine delivers this node's events. Bounded: a full queue slows the
/// engine's event reader, it never drops events.
pub type EventSender = tokio::sync::mpsc::Sender<NodeEvent>;

/// Counters an engine keeps about its store, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Store operations that failed (unreachable, timed out).
    pub store_errors: u64,
    /// Times the event subscriber re-established its link.
    pub reconnects: u64,
    /// Connection records of dead nodes this node removed.
    pub reaped_records: u64,
    /// Clean-ups waiting for the store to answer (records a failed call may have
    /// left, removed once it does).
    pub cleanup_pending: u64,
    /// Clean-ups given up because their queue was full.
    pub cleanup_dropped: u64,
}

/// The registered sockets a node holds, by shard ([`crate::ids::ID_SHARDS`]), as
/// reconciliation reads them: a count per shard is cheap, so only the shards whose
/// records in the store outnumber the sockets held need their ids listed.
pub trait HeldSockets: Sync {
    /// How many registered sockets of `shard` are held.
    fn count(&self, shard: u8) -> usize;
    /// The connection ids of the registered sockets of `shard`.
    fn ids(&self, shard: u8) -> Vec<ConnectionId>;
}

/// A list of records serves as what is held (tests, tools; it walks the list on
/// every call).
impl HeldSockets for Vec<LocalRecord> {
    fn count(&self, shard: u8) -> usize {
        self.iter()
            .filter(|r| r.connection_id.shard() == shard)
            .count()
    }

    fn ids(&self, shard: u8) -> Vec<ConnectionId> {
        self.iter()
            .filter(|r| r.connection_id.shard() == shard)
            .map(|r| r.connection_id.clone())
            .collect()
    }
}

/// Storage and event bus for sessions and connections. Implemented by the in-memory
/// engine (one node) and the Redis engine (a cluster). Both pass the same
/// conformance suite in `tests/`.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Short name for logs and `/healthz` (`memory`, `redis`).
    fn name(&self) -> &'static str;

    /// This node.
    fn node_id(&self) -> &NodeId;

    /// Counters about the store (zero for engines that have nothing to count).
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// Bumped every time events may have been lost (a resubscription, a new lease),
    /// before the matching [`NodeEvent::Resync`] or [`NodeEvent::Fenced`] is sent. A
    /// node whose last successful resync began at the current generation has all its
    /// records in the store.
    fn generation(&self) -> u64 {
        0
    }

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), EngineError>;

    /// Creates a session and tells the user's other sessions' sockets
    /// ([`NodeEvent::SessionCreated`]), in one atomic step.
    async fn create_session(&self, new: NewSession) -> Result<CreatedSession, EngineError>;

    /// The session of a token, if the token is valid and the session alive. The
    /// returned session has no `connections` filled in.
    async fn authenticate(&self, token: &Token) -> Result<Option<Session>, EngineError>;

    /// One session with its live connections.
    async fn get_session(&self, session_id: &SessionId) -> Result<Option<Session>, EngineError>;

    /// All live sessions of a user with their connections, oldest first.
    async fn user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>, EngineError>;

    /// Ends a session everywhere: its token stops working at once and every node
    /// holding one of its sockets gets [`NodeEvent::SessionsEnded`]. With `owner`,
    /// only a session of that user is ended (another user's session is reported as
    /// not found). Returns whether a session was ended.
    async fn kill_session(
        &self,
        session_id: &SessionId,
        owner: Option<&UserId>,
        reason: EndReason,
    ) -> Result<bool, EngineError>;

    /// Ends every session of a user except `except`, in one atomic step. Returns how
    /// many were ended.
    async fn kill_user_sessions(
        &self,
        user_id: &UserId,
        except: Option<&SessionId>,
        reason: EndReason,
    ) -> Result<u64, EngineError>;

    /// Authenticates `token` and, if valid, records connection `connection_id` on this
    /// node, in one atomic step, within the engine's [`crate::ConnLimits`] (over a
    /// limit: [`EngineError::Limit`]). Counts as activity. Returns the session, or
    /// `None` for a bad, ended or expired token.
    async fn register_connection(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
    ) -> Result<Option<Session>, EngineError> {
        Ok(self
            .register_recovering(token, connection_id, None)
            .await?
            .map(|r| r.session))
    }

    /// [`Engine::register_connection`], which also reads the user's history state
    /// in the same atomic step and, with `recovery`, the entries after the client's
    /// offset that its session may see (see [`crate::history`]). Every recoverable
    /// frame published after this step reaches the new socket live, with an offset
    /// above the returned one.
    async fn register_recovering(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
        recovery: Option<&Recovery>,
    ) -> Result<Option<Registered>, EngineError>;

    /// Removes a connection's records, including its group memberships. Unknown ids
    /// are ignored.
    async fn unregister_connection(&self, connection_id: &ConnectionId) -> Result<(), EngineError>;

    /// Sends `frame` to every live socket of `target` on every node, reaching only
    /// the nodes that hold such sockets (except for [`Target::All`]). Frames for a
    /// user or a session are recoverable when the engine keeps history: they get
    /// the user's next offset (spliced into the frame) and join the history in the
    /// same atomic step.
    async fn publish(&self, target: &Target, frame: &str) -> Result<Delivery, EngineError>;

    /// Publishes several frames, each as [`Engine::publish`] would, and answers each
    /// in order. Frames to the targets of one user keep their order. Engines make
    /// fewer round trips than one per frame (the Redis engine: one per bucket).
    async fn publish_batch(
        &self,
        items: &[(Target, String)],
    ) -> Vec<Result<Delivery, EngineError>> {
        let mut out = Vec::with_capacity(items.len());
        for (target, frame) in items {
            out.push(self.publish(target, frame).await);
        }
        out
    }

    /// Adds a member to a group. Returns false if the member is a connection that
    /// is not live.
    async fn group_add(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError>;

    /// Removes a member from a group. Returns whether it was a member.
    async fn group_remove(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError>;

    /// A group's members, sorted.
    async fn group_members(&self, group: &GroupName) -> Result<Vec<Member>, EngineError>;

    /// Up to `limit` online users after `after` (exclusive), in lexical order.
    async fn online_users(
        &self,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, EngineError>;

    /// Up to `limit` online users whose id starts with `prefix`, after `after`
    /// (exclusive), in lexical order.
    async fn online_users_matching(
        &self,
        prefix: &str,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, EngineError> {
        let mut out = Vec::new();
        let mut cursor = after.cloned();
        loop {
            let page = self.online_users(cursor.as_ref(), 1000).await?;
            let Some(last) = page.last().map(|u| u.user_id.clone()) else {
                return Ok(out);
            };
            for u in page {
                if u.user_id.as_str().starts_with(prefix) {
                    out.push(u);
                    if out.len() == limit {
                        return Ok(out);
                    }
                } else if u.user_id.as_str() > prefix && !out.is_empty() {
                    return Ok(out);
                }
            }
            cursor = Some(last);
        }
    }

    /// Records this node's status for operators. Engines without a cluster keep it
    /// for [`Engine::nodes`].
    async fn announce(&self, status: &NodeStatus) -> Result<(), EngineError> {
        let _ = status;
        Ok(())
    }

    /// The nodes of the cluster, live or not yet reaped, with their last status.
    async fn nodes(&self) -> Result<Vec<NodeView>, EngineError> {
        Ok(Vec::new())
    }

    /// Cluster-wide counts.
    async fn presence_counts(&self) -> Result<PresenceCounts, EngineError>;

    /// For each session id, whether the session is still alive, in one round trip.
    async fn sessions_alive(&self, sessions: &[SessionId]) -> Result<Vec<bool>, EngineError>;

    /// Puts back the records of this node's live sockets whose sessions still exist
    /// (after the store may have lost them); returns the sessions that are gone and
    /// the sockets that missed recoverable frames (see [`Reasserted`]).
    async fn reassert(&self, records: &[LocalRecord]) -> Result<Reasserted, EngineError>;

    /// Removes this node's records that `held` (the sockets it holds) does not list
    /// and that are older than `before` (Unix ms): records left by calls whose fate
    /// the node never learnt, or restored by the store. Returns how many went.
    async fn reconcile(&self, held: &dyn HeldSockets, before: i64) -> Result<u64, EngineError> {
        let _ = (held, before);
        Ok(0)
    }

    /// Removes every record of this node and its lease (graceful shutdown).
    async fn leave(&self) -> Result<(), EngineError>;

    /// Records activity of a session: pushes its idle expiry to now + idle timeout.
    /// Callers throttle this (once a minute per session is plenty).
    async fn touch(&self, session_id: &SessionId) -> Result<(), EngineError>;

    /// Ends every session whose absolute or idle lifetime has run out, like a kill
    /// with reason `expired` (events to every node holding its sockets). Any node may
    /// call it at any time; returns how many sessions it ended.
    async fn expire_due(&self) -> Result<u64, EngineError>;
}
