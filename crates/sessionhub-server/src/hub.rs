//! The sockets this node holds, indexed by session and by user, and the dispatch of
//! engine events to them.
//!
//! Locks are held only to look up or change the indexes, never across an await or a
//! socket write: delivering to a socket is a push onto its bounded queue, and a
//! socket whose queue is full is closed with 1013 instead of slowing anyone else.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytestring::ByteString;
use sessionhub_core::ids::ID_SHARDS;
use sessionhub_core::protocol::{SESSION_CREATED_MESSAGE, ServerFrame};
use sessionhub_core::{
    ConnectionId, EndReason, HeldSockets, LocalRecord, NodeEvent, Recovery, Session, SessionId,
    UserId,
};
use tokio::sync::Notify;

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
    /// The socket missed recoverable frames while this node was not subscribed:
    /// close 1012, so that the client reconnects with `since` and gets them.
    Missed,
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
    /// Its user's history epoch, once registered with history on.
    epoch: std::sync::OnceLock<Box<str>>,
    /// The last history offset it got (or that its registration accounted for).
    seen: AtomicU64,
    /// The outbound queue, bounded by [`OUTBOUND_QUEUE_CAPACITY`]. A plain deque and
    /// not a channel: an idle socket's queue then holds no memory (a tokio channel
    /// keeps a block of 32 slots from the start, 1.3 KiB per socket).
    outbox: Mutex<Outbox>,
    close: Mutex<Option<CloseCmd>>,
    /// Woken when a frame is queued or a close requested: one waiter (the socket
    /// task), one notifier for both, so an idle socket waits on one future.
    wake: Notify,
}

/// What a socket task does next.
#[derive(Debug)]
pub enum Next {
    /// Close (this wins over queued frames).
    Close(CloseCmd),
    /// Send this frame.
    Frame(Outbound),
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Outbound>,
    /// The socket task is gone: frames are dropped.
    gone: bool,
    /// Frames wait until released (see [`LocalConn::hold`]); a close still goes.
    held: bool,
}

impl LocalConn {
    /// A handle on a new socket.
    pub fn new(id: ConnectionId, session_id: SessionId) -> Arc<Self> {
        Arc::new(Self {
            id,
            session_id,
            connected_at: sessionhub_core::time::now_ms(),
            bound: Mutex::new(None),
            epoch: std::sync::OnceLock::new(),
            seen: AtomicU64::new(0),
            outbox: Mutex::new(Outbox::default()),
            close: Mutex::new(None),
            wake: Notify::new(),
        })
    }

    /// Where the socket starts in its user's history: the epoch it was given, and
    /// the offset its registration accounted for.
    pub fn start_history(&self, epoch: &str, offset: u64) {
        let _ = self.epoch.set(epoch.into());
        self.saw(offset);
    }

    /// The socket got the recoverable frame at `offset`.
    pub fn saw(&self, offset: u64) {
        self.seen.fetch_max(offset, Ordering::Relaxed);
    }

    /// Where the socket would recover from on a reconnect (`None` without history).
    fn recovery(&self) -> Option<Recovery> {
        self.epoch.get().map(|epoch| Recovery {
            since: self.seen.load(Ordering::Relaxed),
            epoch: epoch.to_string(),
        })
    }

    /// Queues a frame (`offset` 0: not recoverable). A full queue drops it and
    /// closes the socket as too slow: false when this frame's overflow is what
    /// closed it, so that a socket is counted once, not once per frame dropped.
    pub fn send(&self, frame: ByteString, offset: u64) -> bool {
        {
            let mut out = lock(&self.outbox);
            // The socket task is gone; nothing to close.
            if out.gone {
                return true;
            }
            if out.frames.len() >= OUTBOUND_QUEUE_CAPACITY {
                drop(out);
                return !self.request_close(CloseCmd::TooSlow);
            }
            out.frames.push_back(Outbound { frame, offset });
        }
        // notify_one stores a permit if the task is not waiting right now.
        self.wake.notify_one();
        true
    }

    /// Frames queued and not yet taken.
    pub fn queued(&self) -> usize {
        lock(&self.outbox).frames.len()
    }

    /// The next thing to do: a requested close, else the next queued frame,
    /// waiting for either. Cancel-safe: a frame leaves the queue only in the poll
    /// that returns it.
    pub async fn next(&self) -> Next {
        loop {
            if let Some(cmd) = lock(&self.close).clone() {
                return Next::Close(cmd);
            }
            {
                let mut out = lock(&self.outbox);
                if let Some(f) = out.pop_front_unless_held() {
                    if out.frames.is_empty() {
                        // Let an idle socket's queue go back to holding nothing.
                        out.frames = VecDeque::new();
                    }
                    return Next::Frame(f);
                }
            }
            self.wake.notified().await;
        }
    }

    /// Holds the frames queued from now on, and those not yet sent: events may have
    /// been lost, and until a resync has said whether this socket missed any, no
    /// frame heard after the gap may reach the client ahead of the ones it missed
    /// (its next reconnect would then ask for what follows the newer one). A
    /// requested close still goes.
    pub fn hold(&self) {
        lock(&self.outbox).held = true;
    }

    /// Lets held frames go (the socket missed nothing).
    pub fn release(&self) {
        lock(&self.outbox).held = false;
        self.wake.notify_one();
    }

    /// The socket task is done: frames queued from now on are dropped.
    pub fn close_outbox(&self) {
        let mut out = lock(&self.outbox);
        out.gone = true;
        out.frames = VecDeque::new();
    }

    /// Asks the socket task to close. The first request wins.
    pub fn request_close(&self, cmd: CloseCmd) -> bool {
        let mut slot = lock(&self.close);
        if slot.is_some() {
            return false;
        }
        *slot = Some(cmd);
        // notify_one stores a permit if the task is not waiting right now.
        self.wake.notify_one();
        true
    }

    /// Resolves when a close has been requested, with the request.
    pub async fn closed(&self) -> CloseCmd {
        loop {
            if let Some(cmd) = lock(&self.close).clone() {
                return cmd;
            }
            // A queued frame wakes this too; it then waits again.
            self.wake.notified().await;
        }
    }
}

impl Outbox {
    fn pop_front_unless_held(&mut self) -> Option<Outbound> {
        if self.held {
            return None;
        }
        self.frames.pop_front()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are consistent between statements; a panic elsewhere must not
    // take every socket of the node down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The slices the sessions are kept in: a session's slice is its Redis bucket (the
/// first byte of its hex id) modulo this, so a slice is whole buckets. Revalidation
/// asks about one slice at a time (`crate::sync::revalidate_forever`), and reads it
/// without walking the others: walking every session once per slice cost a node
/// ~1 % of its CPU under load with 3,000 sessions (a cache miss per id).
pub const SESSION_SLICES: usize = 16;

/// The slice of a session (see [`SESSION_SLICES`]).
pub fn session_slice(sid: &SessionId) -> usize {
    usize::from(sid.shard()) % SESSION_SLICES
}

/// A session's sockets here, and its user once one of them is registered (kept
/// with the session, so the user's index forgets the session when its last socket
/// goes, whichever socket that is).
#[derive(Default)]
struct SessionEntry {
    conns: Vec<Arc<LocalConn>>,
    user: Option<UserId>,
}

/// The sockets of each session, kept in [`SESSION_SLICES`] maps.
#[derive(Default)]
struct BySession([HashMap<SessionId, SessionEntry>; SESSION_SLICES]);

impl BySession {
    fn get(&self, sid: &SessionId) -> Option<&Vec<Arc<LocalConn>>> {
        self.0[session_slice(sid)].get(sid).map(|e| &e.conns)
    }

    fn get_mut(&mut self, sid: &SessionId) -> Option<&mut SessionEntry> {
        self.0[session_slice(sid)].get_mut(sid)
    }

    fn push(&mut self, conn: Arc<LocalConn>) {
        self.0[session_slice(&conn.session_id)]
            .entry(conn.session_id.clone())
            .or_default()
            .conns
            .push(conn);
    }

    fn remove(&mut self, sid: &SessionId) -> Option<SessionEntry> {
        self.0[session_slice(sid)].remove(sid)
    }
}

/// The sockets held, in [`ID_SHARDS`] maps by their connection id's shard (its
/// Redis bucket), with the number of registered ones per shard kept as they change:
/// reconciliation compares those counts with the store's and lists the ids of a
/// shard only where they differ. Listing every socket each round held the node's
/// thread 18–28 ms at 30,000 sockets (66–113 ms at 100,000).
struct ByConn {
    shards: Vec<HashMap<ConnectionId, Arc<LocalConn>>>,
    /// Registered (bound) sockets per shard. Changed under the index lock only,
    /// with `LocalConn::bound` (see `Hub::bind_user` and `ByConn::remove`).
    registered: Vec<usize>,
    len: usize,
}

impl Default for ByConn {
    fn default() -> Self {
        Self {
            shards: (0..ID_SHARDS).map(|_| HashMap::new()).collect(),
            registered: vec![0; ID_SHARDS],
            len: 0,
        }
    }
}

impl ByConn {
    fn shard(&self, cid: &ConnectionId) -> &HashMap<ConnectionId, Arc<LocalConn>> {
        &self.shards[usize::from(cid.shard())]
    }

    fn get(&self, cid: &ConnectionId) -> Option<&Arc<LocalConn>> {
        self.shard(cid).get(cid)
    }

    fn insert(&mut self, conn: Arc<LocalConn>) {
        let shard = &mut self.shards[usize::from(conn.id.shard())];
        if shard.insert(conn.id.clone(), conn).is_none() {
            self.len += 1;
        }
    }

    /// Forgets a socket (and its registration in the counts); false if unknown.
    fn remove(&mut self, conn: &LocalConn) -> bool {
        let i = usize::from(conn.id.shard());
        if self.shards[i].remove(&conn.id).is_none() {
            return false;
        }
        self.len -= 1;
        if lock(&conn.bound).is_some() {
            self.registered[i] = self.registered[i].saturating_sub(1);
        }
        true
    }

    fn values(&self) -> impl Iterator<Item = &Arc<LocalConn>> {
        self.shards.iter().flat_map(HashMap::values)
    }
}

#[derive(Default)]
struct Index {
    by_conn: ByConn,
    by_session: BySession,
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
    /// Where each socket stood in its user's history when the node last heard that
    /// events may have been lost (see [`Hub::note_history_points`]), until a resync
    /// has checked it.
    points: Mutex<HashMap<ConnectionId, Recovery>>,
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

/// What reconciliation reads of the hub: registered sockets per shard, counted as
/// they change, and the ids of one shard.
impl HeldSockets for Hub {
    fn count(&self, shard: u8) -> usize {
        lock(&self.index).by_conn.registered[usize::from(shard)]
    }

    fn ids(&self, shard: u8) -> Vec<ConnectionId> {
        lock(&self.index).by_conn.shards[usize::from(shard)]
            .values()
            .filter(|c| lock(&c.bound).is_some())
            .map(|c| c.id.clone())
            .collect()
    }
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
        idx.by_conn.insert(conn.clone());
        idx.by_session.push(conn);
    }

    /// Records the socket's user and session expiry once the engine has confirmed
    /// the session; nothing for a socket the hub no longer holds.
    pub fn bind_user(&self, conn: &LocalConn, user: &UserId, expires_at: i64) {
        let mut idx = lock(&self.index);
        if idx.by_conn.get(&conn.id).is_none() {
            return;
        }
        let first = lock(&conn.bound)
            .replace((user.clone(), expires_at))
            .is_none();
        if first {
            idx.by_conn.registered[usize::from(conn.id.shard())] += 1;
        }
        if let Some(entry) = idx.by_session.get_mut(&conn.session_id) {
            entry.user.get_or_insert_with(|| user.clone());
        }
        idx.by_user
            .entry(user.clone())
            .or_default()
            .insert(conn.session_id.clone());
    }

    /// Removes a socket.
    pub fn remove(&self, conn: &LocalConn) {
        let mut idx = lock(&self.index);
        if !idx.by_conn.remove(conn) {
            return;
        }
        let Some(entry) = idx.by_session.get_mut(&conn.session_id) else {
            return;
        };
        entry.conns.retain(|c| c.id != conn.id);
        if !entry.conns.is_empty() {
            return;
        }
        let user = idx.by_session.remove(&conn.session_id).and_then(|e| e.user);
        if let Some(user) = user
            && let Some(set) = idx.by_user.get_mut(&user)
        {
            set.remove(&conn.session_id);
            if set.is_empty() {
                idx.by_user.remove(&user);
            }
        }
    }

    /// Number of sockets held.
    pub fn len(&self) -> usize {
        lock(&self.index).by_conn.len
    }

    /// Whether no socket is held.
    pub fn is_empty(&self) -> bool {
        lock(&self.index).by_conn.len == 0
    }

    /// Whether this socket is still held.
    pub fn contains(&self, cid: &ConnectionId) -> bool {
        lock(&self.index).by_conn.get(cid).is_some()
    }

    /// The known expiry of a session with sockets here (`i64::MAX` while none of
    /// them is registered), or `None` if it has none here. A lookup, not a walk:
    /// revalidation asks it for the few sessions it found gone.
    pub fn session_expiry(&self, sid: &SessionId) -> Option<i64> {
        let idx = lock(&self.index);
        let conns = idx.by_session.get(sid)?;
        Some(
            conns
                .iter()
                .find_map(|c| lock(&c.bound).as_ref().map(|(_, e)| *e))
                .unwrap_or(i64::MAX),
        )
    }

    /// The ids of the sessions of one slice (see [`SESSION_SLICES`]) with a socket
    /// here; none for a slice out of range.
    pub fn session_ids_in_slice(&self, slice: usize) -> Vec<SessionId> {
        let idx = lock(&self.index);
        idx.by_session
            .0
            .get(slice)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Notes where every socket stands in its user's history, at the event that
    /// says events may have been lost (a resubscription; a fencing), and holds its
    /// frames ([`LocalConn::hold`]) until a resync settles it
    /// ([`Hub::settle_held`]). Called by the dispatcher in event order, so no frame
    /// heard after the gap has moved a point past the frames lost in it, or reached
    /// a client: a resync checks from these points, not from where the sockets are
    /// by the time it runs. A point noted earlier and not yet checked is kept (it is
    /// the older one).
    pub fn note_history_points(&self) {
        let found: Vec<(ConnectionId, Recovery)> = {
            let idx = lock(&self.index);
            idx.by_conn
                .values()
                .filter_map(|c| {
                    let point = c.recovery()?;
                    c.hold();
                    Some((c.id.clone(), point))
                })
                .collect()
        };
        let mut points = lock(&self.points);
        for (cid, point) in found {
            points.entry(cid).or_insert(point);
        }
    }

    /// The records to re-assert, each socket's history point the one noted
    /// ([`Hub::note_history_points`]) if any, with the noted points taken: give
    /// them back with [`Hub::keep_history_points`] if the resync fails.
    pub fn records_to_resync(&self) -> (Vec<LocalRecord>, HashMap<ConnectionId, Recovery>) {
        let points = std::mem::take(&mut *lock(&self.points));
        let mut records = self.records();
        for r in &mut records {
            if let Some(p) = points.get(&r.connection_id) {
                r.recovery = Some(p.clone());
            }
        }
        (records, points)
    }

    /// Puts back points taken by a resync that failed; they are older than any
    /// noted since, so they win.
    pub fn keep_history_points(&self, taken: HashMap<ConnectionId, Recovery>) {
        let mut points = lock(&self.points);
        for (cid, point) in taken {
            points.insert(cid, point);
        }
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
                    recovery: c.recovery(),
                })
            })
            .collect()
    }

    /// Counts a socket closed as too slow by its own task (a write to it waited
    /// past the pong timeout), with those whose queue overflowed.
    pub fn count_slow_close(&self) {
        self.slow_closes.fetch_add(1, Ordering::Relaxed);
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

    /// Settles the sockets a resync checked (`checked`: the points it took): those
    /// in `missed` close with 1012 ([`CloseCmd::Missed`]; their held frames go
    /// with them, and the client's reconnect with `since` gets them all, in order),
    /// the others get their held frames. Returns how many were asked to close.
    pub fn settle_held(
        &self,
        checked: &HashMap<ConnectionId, Recovery>,
        missed: &[ConnectionId],
    ) -> usize {
        let missed: HashSet<&ConnectionId> = missed.iter().collect();
        let conns: Vec<Arc<LocalConn>> = {
            let idx = lock(&self.index);
            checked
                .keys()
                .filter_map(|c| idx.by_conn.get(c).cloned())
                .collect()
        };
        // Sockets noted again since this resync took their points: events may have
        // been lost once more, and the next resync settles them; releasing them now
        // would let frames heard after that second gap through ahead of its losses.
        let noted_since: HashSet<ConnectionId> = {
            let points = lock(&self.points);
            conns
                .iter()
                .filter(|c| points.contains_key(&c.id))
                .map(|c| c.id.clone())
                .collect()
        };
        let mut closed = 0;
        for c in &conns {
            if missed.contains(&c.id) {
                c.request_close(CloseCmd::Missed);
                closed += 1;
            } else if !noted_since.contains(&c.id) {
                c.release();
            }
        }
        closed
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

    /// Applies an engine event (all but [`NodeEvent::Resync`],
    /// [`NodeEvent::Fenced`] and [`NodeEvent::Superseded`], which the dispatcher
    /// handles).
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
            NodeEvent::Resync | NodeEvent::Fenced | NodeEvent::Superseded => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn conn() -> Arc<LocalConn> {
        let user = UserId::parse("alice").expect("user id");
        let sid = SessionId::generate(&user);
        LocalConn::new(ConnectionId::generate(&sid), sid)
    }

    fn frame(conn: &LocalConn) -> Option<Next> {
        let next = std::pin::pin!(conn.next());
        futures_util::FutureExt::now_or_never(next)
    }

    /// A registered socket's record says where it is in its user's history: the
    /// epoch it was given and the highest offset it got, or where it stood when
    /// events may have been lost; closing the ones that missed frames asks exactly
    /// those to close with 1012.
    #[test]
    fn records_carry_the_history_point_and_missed_sockets_close() {
        let hub = Hub::default();
        let (a, b) = (conn(), conn());
        let alice = UserId::parse("alice").expect("user id");
        for c in [&a, &b] {
            hub.insert(c.clone());
            hub.bind_user(c, &alice, 42);
        }
        a.start_history("e1", 3);
        a.saw(5);
        a.saw(4);
        let point = |c: &LocalConn| {
            hub.records()
                .into_iter()
                .find(|r| r.connection_id == c.id)
                .expect("record")
                .recovery
        };
        assert_eq!(
            point(&a),
            Some(Recovery {
                since: 5,
                epoch: "e1".into()
            })
        );
        assert_eq!(point(&b), None, "no history: nothing to check");

        // A resync checks from where the socket stood when events may have been
        // lost, not from frames it got after; a failed one keeps the point.
        hub.note_history_points();
        a.saw(9);
        hub.note_history_points();
        let resync_point = |hub: &Hub| {
            let (records, taken) = hub.records_to_resync();
            let p = records
                .into_iter()
                .find(|r| r.connection_id == a.id)
                .and_then(|r| r.recovery)
                .map(|r| r.since);
            (p, taken)
        };
        let (p, taken) = resync_point(&hub);
        assert_eq!(p, Some(5));
        hub.keep_history_points(taken);
        assert_eq!(resync_point(&hub).0, Some(5), "kept after a failed resync");
        assert_eq!(
            resync_point(&hub).0,
            Some(9),
            "taken by a resync that went through"
        );

        // Noted sockets hold their frames until settled: a missed one closes (its
        // held frames go with it), another gets them.
        let c = conn();
        hub.insert(c.clone());
        hub.bind_user(&c, &alice, 42);
        c.start_history("e1", 7);
        assert!(c.send(ByteString::from_static("before"), 7));
        hub.note_history_points();
        assert!(c.send(ByteString::from_static("after"), 8));
        assert!(a.send(ByteString::from_static("late"), 10));
        assert!(frame(&c).is_none() && frame(&a).is_none(), "held");
        assert!(frame(&b).is_none());
        let (_, taken) = hub.records_to_resync();
        assert_eq!(hub.settle_held(&taken, std::slice::from_ref(&a.id)), 1);
        assert!(matches!(frame(&a), Some(Next::Close(CloseCmd::Missed))));
        for want in ["before", "after"] {
            match frame(&c) {
                Some(Next::Frame(f)) => assert_eq!(f.frame, want),
                other => panic!("expected {want}, got {other:?}"),
            }
        }
    }

    /// A hub with one socket of alice's, at history point 1, noted (its frames held).
    fn held_conn() -> (Hub, Arc<LocalConn>) {
        let hub = Hub::default();
        let c = conn();
        hub.insert(c.clone());
        hub.bind_user(&c, &UserId::parse("alice").expect("user id"), 42);
        c.start_history("e1", 1);
        hub.note_history_points();
        (hub, c)
    }

    /// A resync settles only the sockets whose hold it checked: one noted again
    /// meanwhile (a second gap while the first resync ran) stays held for the next
    /// resync, which checks from the newer point.
    #[test]
    fn a_second_gap_during_a_resync_keeps_the_socket_held() {
        let (hub, c) = held_conn();
        let (_, first) = hub.records_to_resync();
        hub.note_history_points(); // gap 2, while the first resync runs
        assert!(c.send(ByteString::from_static("after gap 2"), 5));
        assert_eq!(hub.settle_held(&first, &[]), 0);
        assert!(frame(&c).is_none(), "released across the second gap");
        let (_, second) = hub.records_to_resync();
        assert_eq!(hub.settle_held(&second, &[]), 0);
        assert!(matches!(frame(&c), Some(Next::Frame(f)) if f.frame == "after gap 2"));
    }

    /// A hold that outlasts the outbound queue (a resync that does not go through
    /// while messages keep coming) ends as a full queue does: the socket is asked to
    /// close as too slow (1013), and a settle that comes after does not reopen it.
    #[test]
    fn a_hold_past_the_queue_bound_closes_the_socket_as_too_slow() {
        let (hub, c) = held_conn();
        for i in 0..OUTBOUND_QUEUE_CAPACITY {
            assert!(
                c.send(ByteString::from(format!("f{i}")), 2 + i as u64),
                "frame {i}"
            );
        }
        assert!(frame(&c).is_none(), "held");
        assert!(!c.send(ByteString::from_static("one too many"), 999));
        assert!(matches!(frame(&c), Some(Next::Close(CloseCmd::TooSlow))));
        let (_, taken) = hub.records_to_resync();
        assert_eq!(hub.settle_held(&taken, &[]), 0);
        assert!(matches!(frame(&c), Some(Next::Close(CloseCmd::TooSlow))));
    }

    /// A session is listed in its slice only, while it has a socket here, and its
    /// slice is emptied again when its last socket goes.
    #[test]
    fn sessions_are_listed_in_their_slice_until_their_last_socket_goes() {
        let hub = Hub::default();
        let a = conn();
        let sid = a.session_id.clone();
        let b = LocalConn::new(ConnectionId::generate(&sid), sid.clone());
        hub.insert(a.clone());
        hub.insert(b.clone());
        assert_eq!(hub.session_expiry(&sid), Some(i64::MAX), "none registered");
        hub.bind_user(&b, &UserId::parse("alice").expect("user id"), 42);
        assert_eq!(hub.session_expiry(&sid), Some(42));
        let slice = session_slice(&sid);
        for s in 0..SESSION_SLICES {
            let want = if s == slice {
                vec![sid.clone()]
            } else {
                vec![]
            };
            assert_eq!(hub.session_ids_in_slice(s), want, "slice {s}");
        }
        assert!(hub.session_ids_in_slice(SESSION_SLICES).is_empty());
        hub.remove(&a);
        assert_eq!(hub.session_ids_in_slice(slice), vec![sid.clone()]);
        hub.remove(&b);
        assert!(hub.session_ids_in_slice(slice).is_empty());
        assert_eq!(hub.session_expiry(&sid), None);
        assert!(lock(&hub.index).by_session.0.iter().all(HashMap::is_empty));
    }

    /// Registered sockets are counted per shard as they are bound and removed, only
    /// bound ones are listed, and a socket bound after it was removed is not held.
    /// The user's index forgets the session although its last socket to go is one
    /// that never registered.
    #[test]
    fn registered_sockets_are_counted_per_shard_and_the_counts_shrink_back() {
        let hub = Hub::default();
        let a = conn();
        let shard = a.id.shard();
        let user = UserId::parse("alice").expect("user id");
        let b = LocalConn::new(ConnectionId::generate(&a.session_id), a.session_id.clone());
        hub.insert(a.clone());
        hub.insert(b.clone());
        assert_eq!(hub.len(), 2);
        assert_eq!(hub.count(shard), 0, "not registered yet");
        assert!(hub.ids(shard).is_empty());
        hub.bind_user(&a, &user, i64::MAX);
        hub.bind_user(&a, &user, i64::MAX);
        assert_eq!(hub.count(shard), 1, "bound once, counted once");
        assert_eq!(hub.ids(shard), vec![a.id.clone()]);
        let total: usize = (0..=u8::MAX).map(|s| hub.count(s)).sum();
        assert_eq!(total, 1);
        hub.remove(&a);
        hub.remove(&a);
        assert_eq!(hub.count(shard), 0);
        assert_eq!(hub.len(), 1);
        hub.remove(&b);
        // Bound after it went (a registration that finished late): not held.
        hub.bind_user(&b, &user, i64::MAX);
        assert_eq!(hub.count(shard), 0);
        assert!(hub.is_empty());
        assert!(lock(&hub.index).by_user.is_empty());
    }

    #[test]
    fn frames_come_out_in_order_and_an_empty_queue_holds_nothing() {
        let c = conn();
        assert!(c.send("a".into(), 1));
        assert!(c.send("b".into(), 0));
        for want in ["a", "b"] {
            match frame(&c) {
                Some(Next::Frame(f)) => assert_eq!(&*f.frame, want),
                other => panic!("expected frame {want}, got {other:?}"),
            }
        }
        assert!(frame(&c).is_none(), "nothing is queued");
        assert_eq!(lock(&c.outbox).frames.capacity(), 0);
    }

    #[test]
    fn a_full_queue_closes_the_socket_as_too_slow_and_the_close_wins() {
        let c = conn();
        for _ in 0..OUTBOUND_QUEUE_CAPACITY {
            assert!(c.send("x".into(), 0));
        }
        assert!(!c.send("one too many".into(), 0));
        // Dropped too, but the socket is closing already: counted once.
        assert!(c.send("two too many".into(), 0));
        assert_eq!(lock(&c.outbox).frames.len(), OUTBOUND_QUEUE_CAPACITY);
        assert!(matches!(frame(&c), Some(Next::Close(CloseCmd::TooSlow))));
    }

    /// `slow_closes` counts sockets closed as too slow, not the frames dropped.
    #[test]
    fn a_socket_closed_as_too_slow_is_counted_once() {
        let hub = Hub::default();
        let c = conn();
        hub.insert(c.clone());
        let frame = ByteString::from_static("x");
        for _ in 0..OUTBOUND_QUEUE_CAPACITY + 50 {
            hub.deliver(None, &frame, None);
        }
        assert_eq!(hub.stats().slow_closes, 1);
        hub.count_slow_close();
        assert_eq!(hub.stats().slow_closes, 2);
    }

    #[test]
    fn frames_for_a_finished_socket_are_dropped() {
        let c = conn();
        assert!(c.send("queued".into(), 0));
        c.close_outbox();
        assert!(
            c.send("late".into(), 0),
            "no close for a socket that is gone"
        );
        assert!(lock(&c.outbox).frames.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_socket_is_woken_by_a_frame_and_by_a_close() {
        let c = conn();
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.next().await }
        });
        tokio::task::yield_now().await;
        assert!(c.send("hello".into(), 0));
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the frame")
            .expect("task");
        assert!(matches!(got, Next::Frame(f) if &*f.frame == "hello"));

        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.closed().await }
        });
        tokio::task::yield_now().await;
        c.request_close(CloseCmd::TooSlow);
        let got = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the close")
            .expect("task");
        assert!(matches!(got, CloseCmd::TooSlow));
    }
}
