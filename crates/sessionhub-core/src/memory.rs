//! The embedded in-memory engine: what a single node runs on when no Redis is
//! configured, so that `cargo run` works on a bare machine.
//!
//! It mirrors the Redis engine's data model (sessions, connection records, groups,
//! presence) in one mutex-guarded [`State`]. A [`MemoryStore`] can be shared by
//! several [`MemoryEngine`] handles with different node ids; the conformance suite
//! uses that to check cross-node routing with the same tests as the Redis engine.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytestring::ByteString;

use crate::engine::{Engine, EngineError, EventSender, NodeEvent};
use crate::history::{Audience, HistoryConfig, Recovery, Registered, UserHistory};
use crate::ids::{ConnectionId, GroupName, NodeId, SessionId, UserId};
use crate::model::{
    ConnLimits, ConnectionInfo, CreatedSession, Delivery, EndReason, LocalRecord, Member,
    NewSession, NodeStatus, NodeView, OnlineUser, PresenceCounts, Reasserted, Session, Target,
};
use crate::protocol::{SESSION_CREATED_MESSAGE, ServerFrame};
use crate::time::now_ms;
use crate::token::{SecretHash, Token};

struct Record {
    session: Session,
    secret_hash: SecretHash,
    conns: BTreeSet<ConnectionId>,
}

struct ConnRecord {
    session_id: SessionId,
    user_id: UserId,
    node: NodeId,
    connected_at: i64,
    groups: BTreeSet<GroupName>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<SessionId, Record>,
    users: HashMap<UserId, HashSet<SessionId>>,
    conns: HashMap<ConnectionId, ConnRecord>,
    online: BTreeMap<UserId, u64>,
    groups: HashMap<GroupName, BTreeSet<Member>>,
    nodes: HashMap<NodeId, EventSender>,
    histories: HashMap<UserId, UserHistory>,
    statuses: HashMap<NodeId, NodeStatus>,
}

/// Events to send once the lock is released.
type Outbox = Vec<(EventSender, NodeEvent)>;

impl State {
    /// Whether `sid` exists and its lifetime is not over. (Sessions past their
    /// lifetime are ended, with events, by `expire_due`.)
    fn alive(&self, sid: &SessionId, now: i64) -> bool {
        self.sessions
            .get(sid)
            .is_some_and(|r| !r.session.expired_at(now))
    }

    fn add_conn(&mut self, cid: &ConnectionId, sid: &SessionId, node: &NodeId, at: i64) -> bool {
        if self.conns.contains_key(cid) {
            return false;
        }
        let Some(rec) = self.sessions.get_mut(sid) else {
            return false;
        };
        rec.conns.insert(cid.clone());
        let user_id = rec.session.user_id.clone();
        *self.online.entry(user_id.clone()).or_default() += 1;
        self.conns.insert(
            cid.clone(),
            ConnRecord {
                session_id: sid.clone(),
                user_id,
                node: node.clone(),
                connected_at: at,
                groups: BTreeSet::new(),
            },
        );
        true
    }

    /// Removes every record of a connection; returns its node.
    fn drop_conn(&mut self, cid: &ConnectionId) -> Option<NodeId> {
        let rec = self.conns.remove(cid)?;
        if let Some(s) = self.sessions.get_mut(&rec.session_id) {
            s.conns.remove(cid);
        }
        for g in &rec.groups {
            if let Some(members) = self.groups.get_mut(g) {
                members.remove(&Member::Connection(cid.clone()));
                if members.is_empty() {
                    self.groups.remove(g);
                }
            }
        }
        if let Some(n) = self.online.get_mut(&rec.user_id) {
            *n -= 1;
            if *n == 0 {
                self.online.remove(&rec.user_id);
            }
        }
        Some(rec.node)
    }

    /// Ends a session: drops its connections and itself; returns the nodes that held
    /// its sockets.
    fn end_session(&mut self, sid: &SessionId) -> HashSet<NodeId> {
        let Some(rec) = self.sessions.get(sid) else {
            return HashSet::new();
        };
        let cids: Vec<ConnectionId> = rec.conns.iter().cloned().collect();
        let nodes = cids.iter().filter_map(|c| self.drop_conn(c)).collect();
        if let Some(rec) = self.sessions.remove(sid) {
            let user = &rec.session.user_id;
            if let Some(set) = self.users.get_mut(user) {
                set.remove(sid);
                if set.is_empty() {
                    self.users.remove(user);
                }
            }
        }
        nodes
    }

    fn drop_node(&mut self, node: &NodeId) {
        let cids: Vec<ConnectionId> = self
            .conns
            .iter()
            .filter(|(_, r)| &r.node == node)
            .map(|(c, _)| c.clone())
            .collect();
        for c in cids {
            self.drop_conn(&c);
        }
    }

    fn session_view(&self, rec: &Record) -> Session {
        let mut s = rec.session.clone();
        s.connections = rec
            .conns
            .iter()
            .filter_map(|cid| {
                self.conns.get(cid).map(|c| ConnectionInfo {
                    connection_id: cid.clone(),
                    node_id: c.node.clone(),
                    connected_at: c.connected_at,
                })
            })
            .collect();
        s.connections.sort_by_key(|c| c.connected_at);
        s
    }

    fn live_sessions_of(&self, user: &UserId, now: i64) -> Vec<SessionId> {
        let sids: Vec<SessionId> = self
            .users
            .get(user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        sids.into_iter().filter(|s| self.alive(s, now)).collect()
    }

    /// The target sockets of a publish, grouped by node.
    fn targets(&mut self, target: &Target, now: i64) -> HashMap<NodeId, Vec<ConnectionId>> {
        let mut cids: BTreeSet<ConnectionId> = BTreeSet::new();
        let add_user = |st: &mut Self, user: &UserId, cids: &mut BTreeSet<ConnectionId>| {
            for sid in st.live_sessions_of(user, now) {
                if let Some(r) = st.sessions.get(&sid) {
                    cids.extend(r.conns.iter().cloned());
                }
            }
        };
        match target {
            Target::User(u) => add_user(self, u, &mut cids),
            Target::Session(sid) => {
                if self.alive(sid, now)
                    && let Some(r) = self.sessions.get(sid)
                {
                    cids.extend(r.conns.iter().cloned());
                }
            }
            Target::Connection(cid) => {
                cids.insert(cid.clone());
            }
            Target::Group(g) => {
                let members: Vec<Member> = self
                    .groups
                    .get(g)
                    .map(|m| m.iter().cloned().collect())
                    .unwrap_or_default();
                for m in members {
                    match m {
                        Member::Connection(c) => {
                            cids.insert(c);
                        }
                        Member::User(u) => add_user(self, &u, &mut cids),
                    }
                }
            }
            Target::All => {}
        }
        let mut per_node: HashMap<NodeId, Vec<ConnectionId>> = HashMap::new();
        for cid in cids {
            if let Some(rec) = self.conns.get(&cid) {
                per_node.entry(rec.node.clone()).or_default().push(cid);
            }
        }
        per_node
    }

    fn sender(&self, node: &NodeId) -> Option<EventSender> {
        self.nodes.get(node).cloned()
    }

    /// The user's history, started afresh (a new epoch) if it was forgotten.
    fn history(&mut self, cfg: &HistoryConfig, user: &UserId, now: i64) -> &mut UserHistory {
        if self
            .histories
            .get(user)
            .is_some_and(|h| h.forgotten(cfg, now))
        {
            self.histories.remove(user);
        }
        self.histories
            .entry(user.clone())
            .or_insert_with(|| UserHistory::new(now))
    }

    /// Message events for `per_node`'s sockets, all with the same frame.
    fn message_events(
        &self,
        per_node: HashMap<NodeId, Vec<ConnectionId>>,
        frame: &ByteString,
        offset: Option<u64>,
    ) -> Outbox {
        per_node
            .into_iter()
            .filter_map(|(node, cids)| {
                self.sender(&node).map(|tx| {
                    (
                        tx,
                        NodeEvent::Message {
                            connections: Some(cids),
                            frame: frame.clone(),
                            offset,
                        },
                    )
                })
            })
            .collect()
    }
}

/// Shared in-memory state: sessions, connections, groups, and the event queues of
/// the nodes attached to it.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    /// Held by calls that send recoverable frames, from assigning offsets until
    /// their events are queued, so that every node gets them in offset order.
    order: Arc<tokio::sync::Mutex<()>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state
        // is consistent between statements, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One node's handle on a [`MemoryStore`].
pub struct MemoryEngine {
    store: MemoryStore,
    node_id: NodeId,
    limits: ConnLimits,
    history: HistoryConfig,
}

impl MemoryEngine {
    /// Attaches node `node_id` to `store`; its events go to `events`.
    pub fn new(store: MemoryStore, node_id: NodeId, events: EventSender) -> Self {
        Self::with_limits(store, node_id, events, ConnLimits::default())
    }

    /// Like [`MemoryEngine::new`], with socket limits.
    pub fn with_limits(
        store: MemoryStore,
        node_id: NodeId,
        events: EventSender,
        limits: ConnLimits,
    ) -> Self {
        store.lock().nodes.insert(node_id.clone(), events);
        Self {
            store,
            node_id,
            limits,
            history: HistoryConfig::default(),
        }
    }

    /// The same engine, keeping `history` per user.
    pub fn with_history(mut self, history: HistoryConfig) -> Self {
        self.history = history;
        self
    }
}

impl Drop for MemoryEngine {
    fn drop(&mut self) {
        self.store.lock().nodes.remove(&self.node_id);
    }
}

async fn deliver(outbox: Outbox) {
    for (tx, ev) in outbox {
        // A closed receiver means that node is gone; nothing to deliver to.
        let _ = tx.send(ev).await;
    }
}

fn ended_events(
    st: &State,
    per_node: HashMap<NodeId, Vec<SessionId>>,
    reason: EndReason,
) -> Outbox {
    per_node
        .into_iter()
        .filter_map(|(node, session_ids)| {
            st.sender(&node).map(|tx| {
                (
                    tx,
                    NodeEvent::SessionsEnded {
                        session_ids,
                        reason,
                    },
                )
            })
        })
        .collect()
}

#[async_trait]
impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }

    async fn create_session(&self, new: NewSession) -> Result<CreatedSession, EngineError> {
        let now = now_ms();
        let token = Token::generate(&new.user_id);
        let session = Session {
            session_id: token.session_id().clone(),
            user_id: new.user_id.clone(),
            user_agent: new.user_agent,
            ip: new.ip,
            created_at: now,
            last_seen_at: now,
            expires_at: now + new.ttl.as_millis() as i64,
            idle_expires_at: now + new.idle.as_millis() as i64,
            connections: Vec::new(),
        };
        let _order = self.store.order.lock().await;
        let outbox: Outbox = {
            let mut st = self.store.lock();
            // Past the cap, the oldest sessions end first, like kills.
            let mut live = st.live_sessions_of(&new.user_id, now);
            live.sort_by_key(|sid| st.sessions.get(sid).map(|r| r.session.created_at));
            let cap = self.limits.sessions_per_user.max(1) as usize;
            let excess = (live.len() + 1).saturating_sub(cap);
            let mut per_node: HashMap<NodeId, Vec<SessionId>> = HashMap::new();
            for sid in live.iter().take(excess) {
                for node in st.end_session(sid) {
                    per_node.entry(node).or_default().push(sid.clone());
                }
            }
            let mut outbox = ended_events(&st, per_node, EndReason::Limit);
            let targets = st.targets(&Target::User(new.user_id.clone()), now);
            let frame = ServerFrame::SessionCreated {
                session: &session,
                message: SESSION_CREATED_MESSAGE,
            }
            .to_json();
            let (frame, offset) = if self.history.is_on() {
                let to = Audience::Others(session.session_id.clone());
                let (n, f) = st.history(&self.history, &new.user_id, now).append(
                    &self.history,
                    now,
                    to,
                    &frame,
                );
                (f, Some(n))
            } else {
                (ByteString::from(frame), None)
            };
            outbox.extend(st.message_events(targets, &frame, offset));
            st.sessions.insert(
                session.session_id.clone(),
                Record {
                    session: session.clone(),
                    secret_hash: token.secret_hash(),
                    conns: BTreeSet::new(),
                },
            );
            st.users
                .entry(new.user_id)
                .or_default()
                .insert(session.session_id.clone());
            outbox
        };
        deliver(outbox).await;
        Ok(CreatedSession { session, token })
    }

    async fn authenticate(&self, token: &Token) -> Result<Option<Session>, EngineError> {
        let st = self.store.lock();
        let sid = token.session_id();
        if !st.alive(sid, now_ms()) {
            return Ok(None);
        }
        Ok(st
            .sessions
            .get(sid)
            .filter(|r| r.secret_hash.ct_eq(&token.secret_hash()))
            .map(|r| r.session.clone()))
    }

    async fn get_session(&self, session_id: &SessionId) -> Result<Option<Session>, EngineError> {
        let st = self.store.lock();
        if !st.alive(session_id, now_ms()) {
            return Ok(None);
        }
        Ok(st.sessions.get(session_id).map(|r| st.session_view(r)))
    }

    async fn user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>, EngineError> {
        let st = self.store.lock();
        let sids = st.live_sessions_of(user_id, now_ms());
        let mut out: Vec<Session> = sids
            .iter()
            .filter_map(|sid| st.sessions.get(sid).map(|r| st.session_view(r)))
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(out)
    }

    async fn kill_session(
        &self,
        session_id: &SessionId,
        owner: Option<&UserId>,
        reason: EndReason,
    ) -> Result<bool, EngineError> {
        let outbox = {
            let mut st = self.store.lock();
            if !st.alive(session_id, now_ms()) {
                return Ok(false);
            }
            let user = st
                .sessions
                .get(session_id)
                .map(|r| r.session.user_id.clone());
            if owner.is_some() && owner != user.as_ref() {
                return Ok(false);
            }
            let per_node = st
                .end_session(session_id)
                .into_iter()
                .map(|n| (n, vec![session_id.clone()]))
                .collect();
            ended_events(&st, per_node, reason)
        };
        deliver(outbox).await;
        Ok(true)
    }

    async fn kill_user_sessions(
        &self,
        user_id: &UserId,
        except: Option<&SessionId>,
        reason: EndReason,
    ) -> Result<u64, EngineError> {
        let (n, outbox) = {
            let mut st = self.store.lock();
            let sids: Vec<SessionId> = st
                .live_sessions_of(user_id, now_ms())
                .into_iter()
                .filter(|s| Some(s) != except)
                .collect();
            let mut per_node: HashMap<NodeId, Vec<SessionId>> = HashMap::new();
            for sid in &sids {
                for node in st.end_session(sid) {
                    per_node.entry(node).or_default().push(sid.clone());
                }
            }
            (sids.len() as u64, ended_events(&st, per_node, reason))
        };
        deliver(outbox).await;
        Ok(n)
    }

    async fn register_recovering(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
        recovery: Option<&Recovery>,
    ) -> Result<Option<Registered>, EngineError> {
        let now = now_ms();
        let mut st = self.store.lock();
        let sid = token.session_id();
        if !st.alive(sid, now) {
            return Ok(None);
        }
        let (user, in_session) = match st.sessions.get(sid) {
            Some(r) if r.secret_hash.ct_eq(&token.secret_hash()) => {
                (r.session.user_id.clone(), r.conns.len())
            }
            _ => return Ok(None),
        };
        if in_session >= self.limits.per_session as usize {
            return Err(EngineError::Limit(format!(
                "too many sockets for this session (at most {})",
                self.limits.per_session
            )));
        }
        if st.online.get(&user).copied().unwrap_or(0) >= u64::from(self.limits.per_user) {
            return Err(EngineError::Limit(format!(
                "too many sockets for this user (at most {})",
                self.limits.per_user
            )));
        }
        st.add_conn(connection_id, sid, &self.node_id, now);
        let rec = st
            .sessions
            .get_mut(sid)
            .ok_or_else(|| EngineError::corrupt("session vanished"))?;
        touch(&mut rec.session, now);
        let session = rec.session.clone();
        let history = self.history.is_on().then(|| {
            st.history(&self.history, &user, now)
                .state(&self.history, now, sid, recovery)
        });
        Ok(Some(Registered { session, history }))
    }

    async fn unregister_connection(&self, connection_id: &ConnectionId) -> Result<(), EngineError> {
        self.store.lock().drop_conn(connection_id);
        Ok(())
    }

    async fn publish(&self, target: &Target, frame: &str) -> Result<Delivery, EngineError> {
        let _order = self.store.order.lock().await;
        let (delivery, outbox) = {
            let mut st = self.store.lock();
            let now = now_ms();
            // Messages to a user or a session join the user's history.
            let owner = match target {
                Target::User(u) => Some((u.clone(), Audience::User)),
                Target::Session(sid) if st.alive(sid, now) => st
                    .sessions
                    .get(sid)
                    .map(|r| (r.session.user_id.clone(), Audience::Session(sid.clone()))),
                _ => None,
            };
            let (frame, offset) = match owner {
                Some((user, to)) if self.history.is_on() => {
                    let (n, f) =
                        st.history(&self.history, &user, now)
                            .append(&self.history, now, to, frame);
                    (f, Some(n))
                }
                _ => (ByteString::from(frame), None),
            };
            if *target == Target::All {
                let outbox: Outbox = st
                    .nodes
                    .values()
                    .map(|tx| {
                        (
                            tx.clone(),
                            NodeEvent::Message {
                                connections: None,
                                frame: frame.clone(),
                                offset: None,
                            },
                        )
                    })
                    .collect();
                let d = Delivery {
                    nodes: outbox.len() as u64,
                    connections: None,
                    offset: None,
                };
                (d, outbox)
            } else {
                let per_node = st.targets(target, now);
                let d = Delivery {
                    nodes: per_node.len() as u64,
                    connections: Some(per_node.values().map(|v| v.len() as u64).sum()),
                    offset,
                };
                (d, st.message_events(per_node, &frame, offset))
            }
        };
        deliver(outbox).await;
        Ok(delivery)
    }

    async fn group_add(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError> {
        let mut st = self.store.lock();
        if let Member::Connection(cid) = member {
            let Some(rec) = st.conns.get_mut(cid) else {
                return Ok(false);
            };
            rec.groups.insert(group.clone());
        }
        st.groups
            .entry(group.clone())
            .or_default()
            .insert(member.clone());
        Ok(true)
    }

    async fn group_remove(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError> {
        let mut st = self.store.lock();
        if let Member::Connection(cid) = member
            && let Some(rec) = st.conns.get_mut(cid)
        {
            rec.groups.remove(group);
        }
        let Some(members) = st.groups.get_mut(group) else {
            return Ok(false);
        };
        let was = members.remove(member);
        if members.is_empty() {
            st.groups.remove(group);
        }
        Ok(was)
    }

    async fn group_members(&self, group: &GroupName) -> Result<Vec<Member>, EngineError> {
        let st = self.store.lock();
        Ok(st
            .groups
            .get(group)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn online_users(
        &self,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, EngineError> {
        use std::ops::Bound;
        let st = self.store.lock();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(st
            .online
            .range::<UserId, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(u, n)| OnlineUser {
                user_id: u.clone(),
                connections: *n,
            })
            .collect())
    }

    async fn announce(&self, status: &NodeStatus) -> Result<(), EngineError> {
        self.store
            .lock()
            .statuses
            .insert(self.node_id.clone(), status.clone());
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeView>, EngineError> {
        let st = self.store.lock();
        let mut out: Vec<NodeView> = st
            .nodes
            .keys()
            .map(|n| NodeView {
                node_id: n.clone(),
                lease_expires_at: None,
                status: st.statuses.get(n).cloned(),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }

    async fn presence_counts(&self) -> Result<PresenceCounts, EngineError> {
        let st = self.store.lock();
        Ok(PresenceCounts {
            online_users: st.online.len() as u64,
            connections: st.conns.len() as u64,
            nodes: st.nodes.len() as u64,
        })
    }

    async fn sessions_alive(&self, sessions: &[SessionId]) -> Result<Vec<bool>, EngineError> {
        let now = now_ms();
        let st = self.store.lock();
        Ok(sessions.iter().map(|s| st.alive(s, now)).collect())
    }

    async fn reassert(&self, records: &[LocalRecord]) -> Result<Reasserted, EngineError> {
        let now = now_ms();
        let mut st = self.store.lock();
        let mut out = Reasserted::default();
        for r in records {
            if st.alive(&r.session_id, now) {
                st.add_conn(
                    &r.connection_id,
                    &r.session_id,
                    &self.node_id,
                    r.connected_at,
                );
                // As the Redis engine: a history forgotten meanwhile had nothing
                // published since.
                let missed = self.history.is_on()
                    && r.recovery.as_ref().is_some_and(|point| {
                        st.histories.get(&r.user_id).is_some_and(|h| {
                            !h.forgotten(&self.history, now)
                                && h.missed(&self.history, now, &r.session_id, point)
                        })
                    });
                if missed {
                    out.missed.push(r.connection_id.clone());
                }
            } else {
                out.gone.push(r.session_id.clone());
            }
        }
        Ok(out)
    }

    async fn leave(&self) -> Result<(), EngineError> {
        self.store.lock().drop_node(&self.node_id);
        Ok(())
    }

    async fn touch(&self, session_id: &SessionId) -> Result<(), EngineError> {
        let now = now_ms();
        let mut st = self.store.lock();
        if st.alive(session_id, now)
            && let Some(r) = st.sessions.get_mut(session_id)
        {
            touch(&mut r.session, now);
        }
        Ok(())
    }

    async fn expire_due(&self) -> Result<u64, EngineError> {
        let now = now_ms();
        let (n, outbox) = {
            let mut st = self.store.lock();
            let due: Vec<SessionId> = st
                .sessions
                .iter()
                .filter(|(_, r)| r.session.expired_at(now))
                .map(|(sid, _)| sid.clone())
                .collect();
            let mut per_node: HashMap<NodeId, Vec<SessionId>> = HashMap::new();
            for sid in &due {
                for node in st.end_session(sid) {
                    per_node.entry(node).or_default().push(sid.clone());
                }
            }
            // Expired entries and forgotten histories go, as the Redis keys' TTLs do.
            let cfg = self.history;
            st.histories.retain(|_, h| h.prune(&cfg, now));
            (
                due.len() as u64,
                ended_events(&st, per_node, EndReason::Expired),
            )
        };
        deliver(outbox).await;
        Ok(n)
    }
}

/// Activity at `now`: the idle expiry moves with it.
fn touch(s: &mut Session, now: i64) {
    let idle = s.idle_ms();
    s.last_seen_at = now;
    s.idle_expires_at = now + idle;
}
