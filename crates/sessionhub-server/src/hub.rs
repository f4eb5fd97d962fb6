//! The sockets this node holds, indexed by session and by user, and the dispatch of
//! engine events to them.
//!
//! Locks are held only to look up or change the indexes, never across an await or a
//! socket write: delivering to a socket is a `try_send` into its bounded queue, and a
//! socket whose queue is full is closed with 1013 instead of slowing anyone else.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytestring::ByteString;
use sessionhub_core::protocol::{SESSION_CREATED_MESSAGE, ServerFrame};
use sessionhub_core::{
    ConnectionId, EndReason, LocalRecord, NodeEvent, Session, SessionId, UserId,
};
use tokio::sync::{Notify, mpsc};

/// Frames that may wait in one socket's outbound queue before it counts as too slow.
pub const OUTBOUND_QUEUE_CAPACITY: usize = 256;

/// A frame queued for one socket.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The text frame.
    pub frame: ByteString,
    /// Its offset in the user's history; 0 for a frame that is not recoverable.
    pub offset: u64,
}

/// Why the hub asks a socket task to close.
#[derive(Debug, Clone)]
pub enum CloseCmd {
    /// The session ended: send this `session_ended` frame, then close 4001.
    SessionEnded(ByteString),
    /// The client did not keep up with its queue: close 1013.
    TooSlow,
}

/// The hub's handle on one socket task.
pub struct LocalConn {
    /// This connection.
    pub id: ConnectionId,
    /// Its session.
    pub session_id: SessionId,
    /// When it connected (Unix ms).
    pub connected_at: i64,
    /// Its user and session expiry, once known (after registration).
    bound: Mutex<Option<(UserId, i64)>>,
    tx: mpsc::Sender<Outbound>,
    close: Mutex<Option<CloseCmd>>,
    closing: Notify,
}

impl LocalConn {
    /// A handle and the receiving end of its outbound queue.
    pub fn new(id: ConnectionId, session_id: SessionId) -> (Arc<Self>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE_CAPACITY);
        let conn = Arc::new(Self {
            id,
            session_id,
            connected_at: sessionhub_core::time::now_ms(),
            bound: Mutex::new(None),
            tx,
            close: Mutex::new(None),
            closing: Notify::new(),
        });
        (conn, rx)
    }

    /// Queues a frame (`offset` 0: not recoverable); a full queue closes the
    /// socket as too slow (and returns false).
    pub fn send(&self, frame: ByteString, offset: u64) -> bool {
        match self.tx.try_send(Outbound { frame, offset }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.request_close(CloseCmd::TooSlow);
                false
            }
            // The socket task is gone; nothing to close.
            Err(mpsc::error::TrySendError::Closed(_)) => true,
        }
    }

    /// Asks the socket task to close. The first request wins.
    pub fn request_close(&self, cmd: CloseCmd) {
        let mut slot = lock(&self.close);
        if slot.is_none() {
            *slot = Some(cmd);
            // notify_one stores a permit if the task is not waiting right now.
            self.closing.notify_one();
        }
    }

    /// Resolves when a close has been requested, with the request.
    pub async fn closed(&self) -> CloseCmd {
        loop {
            if let Some(cmd) = lock(&self.close).clone() {
                return cmd;
            }
            self.closing.notified().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are consistent between statements; a panic elsewhere must not
    // take every socket of the node down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Index {
    by_conn: HashMap<ConnectionId, Arc<LocalConn>>,
    by_session: HashMap<SessionId, Vec<Arc<LocalConn>>>,
    by_user: HashMap<UserId, HashSet<SessionId>>,
}

/// All sockets of this node.
#[derive(Default)]
pub struct Hub {
    index: Mutex<Index>,
    /// Message events this node received (each may target several sockets).
    message_events: AtomicU64,
    /// Sockets closed because their outbound queue was full.
    slow_closes: AtomicU64,
}

/// Counters of a hub, for `/healthz` and tests.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HubStats {
    /// Sockets held.
    pub sockets: usize,
    /// Message events received.
    pub message_events: u64,
    /// Sockets closed as too slow.
    pub slow_closes: u64,
}

/// The `session_ended` frame for a session.
pub fn session_ended_frame(sid: &SessionId, reason: EndReason) -> ByteString {
    ServerFrame::SessionEnded {
        session_id: sid,
        reason,
    }
    .to_json()
    .into()
}

impl Hub {
    /// Adds a socket, before its connection is registered in the engine, so that an
    /// event racing the registration still finds it.
    pub fn insert(&self, conn: Arc<LocalConn>) {
        let mut idx = lock(&self.index);
        idx.by_conn.insert(conn.id.clone(), conn.clone());
        idx.by_session
            .entry(conn.session_id.clone())
            .or_default()
            .push(conn);
    }

    /// Records the socket's user and session expiry once the engine has confirmed
    /// the session.
    pub fn bind_user(&self, conn: &LocalConn, user: &UserId, expires_at: i64) {
        *lock(&conn.bound) = Some((user.clone(), expires_at));
        lock(&self.index)
            .by_user
            .entry(user.clone())
            .or_default()
            .insert(conn.session_id.clone());
    }

    /// Removes a socket.
    pub fn remove(&self, conn: &LocalConn) {
        let mut idx = lock(&self.index);
        idx.by_conn.remove(&conn.id);
        let Some(list) = idx.by_session.get_mut(&conn.session_id) else {
            return;
        };
        list.retain(|c| c.id != conn.id);
        if !list.is_empty() {
            return;
        }
        idx.by_session.remove(&conn.session_id);
        if let Some((user, _)) = lock(&conn.bound).as_ref()
            && let Some(set) = idx.by_user.get_mut(user)
        {
            set.remove(&conn.session_id);
            if set.is_empty() {
                idx.by_user.remove(user);
            }
        }
    }

    /// Number of sockets held.
    pub fn len(&self) -> usize {
        lock(&self.index).by_conn.len()
    }

    /// Whether no socket is held.
    pub fn is_empty(&self) -> bool {
        lock(&self.index).by_conn.is_empty()
    }

    /// Whether this socket is still held.
    pub fn contains(&self, cid: &ConnectionId) -> bool {
        lock(&self.index).by_conn.contains_key(cid)
    }

    /// The sessions that have sockets here, each with its known expiry.
    pub fn sessions(&self) -> Vec<(SessionId, i64)> {
        let idx = lock(&self.index);
        idx.by_session
            .iter()
            .map(|(sid, conns)| {
                let exp = conns
                    .iter()
                    .find_map(|c| lock(&c.bound).as_ref().map(|(_, e)| *e))
                    .unwrap_or(i64::MAX);
                (sid.clone(), exp)
            })
            .collect()
    }

    /// The records of every registered socket, to re-assert them in the engine.
    pub fn records(&self) -> Vec<LocalRecord> {
        let idx = lock(&self.index);
        idx.by_conn
            .values()
            .filter_map(|c| {
                lock(&c.bound).as_ref().map(|(user, _)| LocalRecord {
                    connection_id: c.id.clone(),
                    session_id: c.session_id.clone(),
                    user_id: user.clone(),
                    connected_at: c.connected_at,
                })
            })
            .collect()
    }

    /// The hub's counters.
    pub fn stats(&self) -> HubStats {
        HubStats {
            sockets: self.len(),
            message_events: self.message_events.load(Ordering::Relaxed),
            slow_closes: self.slow_closes.load(Ordering::Relaxed),
        }
    }

    /// Delivers a published frame to some sockets (`None`: all of them), with its
    /// history offset if it has one.
    pub fn deliver(
        &self,
        connections: Option<&[ConnectionId]>,
        frame: &ByteString,
        offset: Option<u64>,
    ) {
        self.message_events.fetch_add(1, Ordering::Relaxed);
        let targets: Vec<Arc<LocalConn>> = {
            let idx = lock(&self.index);
            match connections {
                Some(cids) => cids
                    .iter()
                    .filter_map(|c| idx.by_conn.get(c))
                    .cloned()
                    .collect(),
                None => idx.by_conn.values().cloned().collect(),
            }
        };
        for c in targets {
            if !c.send(frame.clone(), offset.unwrap_or(0)) {
                self.slow_closes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn conns_of(&self, sid: &SessionId) -> Vec<Arc<LocalConn>> {
        lock(&self.index)
            .by_session
            .get(sid)
            .cloned()
            .unwrap_or_default()
    }

    /// Closes every socket of `sid` with `session_ended` and 4001.
    pub fn end_session(&self, sid: &SessionId, reason: EndReason) {
        let conns = self.conns_of(sid);
        if conns.is_empty() {
            return;
        }
        let frame = session_ended_frame(sid, reason);
        for c in conns {
            c.request_close(CloseCmd::SessionEnded(frame.clone()));
        }
    }

    /// Tells every socket of `session.user_id`, except the new session's own, that
    /// another session was created. The frame is serialised once.
    pub fn session_created(&self, session: &Session) {
        let targets: Vec<Arc<LocalConn>> = {
            let idx = lock(&self.index);
            let Some(sids) = idx.by_user.get(&session.user_id) else {
                return;
            };
            sids.iter()
                .filter(|sid| **sid != session.session_id)
                .filter_map(|sid| idx.by_session.get(sid))
                .flatten()
                .cloned()
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let frame: ByteString = ServerFrame::SessionCreated {
            session,
            message: SESSION_CREATED_MESSAGE,
        }
        .to_json()
        .into();
        for c in targets {
            if !c.send(frame.clone(), 0) {
                self.slow_closes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Applies an engine event (all but [`NodeEvent::Resync`] and
    /// [`NodeEvent::Fenced`], which need the engine).
    pub fn apply(&self, event: &NodeEvent) {
        match event {
            NodeEvent::SessionCreated { session } => self.session_created(session),
            NodeEvent::SessionsEnded {
                session_ids,
                reason,
            } => {
                for sid in session_ids {
                    self.end_session(sid, *reason);
                }
            }
            NodeEvent::Message {
                connections,
                frame,
                offset,
            } => {
                self.deliver(connections.as_deref(), frame, *offset);
            }
            NodeEvent::Resync | NodeEvent::Fenced => {}
        }
    }
}
