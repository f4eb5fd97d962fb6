//! The embedded in-memory engine: what a single node runs on when no Redis is
//! configured, so that `cargo run` works on a bare machine.
//!
//! A [`MemoryStore`] can be shared by several [`MemoryEngine`] handles with different
//! node ids; the conformance suite uses that to check cross-node event routing with
//! the same tests as the Redis engine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use crate::engine::{Engine, EngineError, EventSender, NodeEvent};
use crate::ids::{ConnectionId, NodeId, SessionId, UserId};
use crate::model::{ConnectionInfo, CreatedSession, EndReason, NewSession, Session};
use crate::time::now_ms;
use crate::token::{SecretHash, Token};

#[derive(Debug)]
struct Record {
    session: Session,
    secret_hash: SecretHash,
    /// connection id -> (node, connected_at)
    conns: BTreeMap<ConnectionId, (NodeId, i64)>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<SessionId, Record>,
    users: HashMap<UserId, HashSet<SessionId>>,
    nodes: HashMap<NodeId, EventSender>,
}

impl State {
    /// Drops `sid` if its lifetime is over; returns whether it is alive.
    fn alive(&mut self, sid: &SessionId, now: i64) -> bool {
        match self.sessions.get(sid) {
            Some(r) if r.session.expires_at > now => true,
            Some(_) => {
                self.remove(sid);
                false
            }
            None => false,
        }
    }

    fn remove(&mut self, sid: &SessionId) -> Option<Record> {
        let rec = self.sessions.remove(sid)?;
        if let Some(set) = self.users.get_mut(&rec.session.user_id) {
            set.remove(sid);
            if set.is_empty() {
                self.users.remove(&rec.session.user_id);
            }
        }
        Some(rec)
    }

    fn with_connections(rec: &Record) -> Session {
        let mut s = rec.session.clone();
        s.connections = rec
            .conns
            .iter()
            .map(|(cid, (node, at))| ConnectionInfo {
                connection_id: cid.clone(),
                node_id: node.clone(),
                connected_at: *at,
            })
            .collect();
        s.connections.sort_by_key(|c| c.connected_at);
        s
    }

    /// Removes `sids` and returns, per node, the ended sessions with a socket there.
    fn end_sessions(&mut self, sids: &[SessionId]) -> (u64, Vec<(EventSender, Vec<SessionId>)>) {
        let mut per_node: HashMap<NodeId, Vec<SessionId>> = HashMap::new();
        let mut n = 0;
        for sid in sids {
            if let Some(rec) = self.remove(sid) {
                n += 1;
                let nodes: HashSet<&NodeId> = rec.conns.values().map(|(node, _)| node).collect();
                for node in nodes {
                    per_node.entry(node.clone()).or_default().push(sid.clone());
                }
            }
        }
        let out = per_node
            .into_iter()
            .filter_map(|(node, sids)| self.nodes.get(&node).map(|tx| (tx.clone(), sids)))
            .collect();
        (n, out)
    }
}

/// Shared in-memory state: sessions, connections, and the event queues of the nodes
/// attached to it.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in this module; the state
        // is still consistent between statements, so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One node's handle on a [`MemoryStore`].
pub struct MemoryEngine {
    store: MemoryStore,
    node_id: NodeId,
}

impl MemoryEngine {
    /// Attaches node `node_id` to `store`; its events go to `events`.
    pub fn new(store: MemoryStore, node_id: NodeId, events: EventSender) -> Self {
        store.lock().nodes.insert(node_id.clone(), events);
        Self { store, node_id }
    }
}

impl Drop for MemoryEngine {
    fn drop(&mut self) {
        self.store.lock().nodes.remove(&self.node_id);
    }
}

async fn deliver(batches: Vec<(EventSender, NodeEvent)>) {
    for (tx, ev) in batches {
        // A closed receiver means that node is gone; nothing to deliver to.
        let _ = tx.send(ev).await;
    }
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
            connections: Vec::new(),
        };
        let batches = {
            let mut st = self.store.lock();
            let others: Vec<SessionId> = st
                .users
                .get(&new.user_id)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            let mut nodes = HashSet::new();
            for sid in others {
                if st.alive(&sid, now)
                    && let Some(rec) = st.sessions.get(&sid)
                {
                    nodes.extend(rec.conns.values().map(|(n, _)| n.clone()));
                }
            }
            st.sessions.insert(
                session.session_id.clone(),
                Record {
                    session: session.clone(),
                    secret_hash: token.secret_hash(),
                    conns: BTreeMap::new(),
                },
            );
            st.users
                .entry(new.user_id)
                .or_default()
                .insert(session.session_id.clone());
            nodes
                .into_iter()
                .filter_map(|n| st.nodes.get(&n).cloned())
                .map(|tx| {
                    (
                        tx,
                        NodeEvent::SessionCreated {
                            session: session.clone(),
                        },
                    )
                })
                .collect()
        };
        deliver(batches).await;
        Ok(CreatedSession { session, token })
    }

    async fn authenticate(&self, token: &Token) -> Result<Option<Session>, EngineError> {
        let now = now_ms();
        let mut st = self.store.lock();
        let sid = token.session_id();
        if !st.alive(sid, now) {
            return Ok(None);
        }
        Ok(st
            .sessions
            .get(sid)
            .filter(|r| r.secret_hash.ct_eq(&token.secret_hash()))
            .map(|r| r.session.clone()))
    }

    async fn get_session(&self, session_id: &SessionId) -> Result<Option<Session>, EngineError> {
        let mut st = self.store.lock();
        if !st.alive(session_id, now_ms()) {
            return Ok(None);
        }
        Ok(st.sessions.get(session_id).map(State::with_connections))
    }

    async fn user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>, EngineError> {
        let now = now_ms();
        let mut st = self.store.lock();
        let sids: Vec<SessionId> = st
            .users
            .get(user_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let mut out = Vec::new();
        for sid in sids {
            if st.alive(&sid, now)
                && let Some(rec) = st.sessions.get(&sid)
            {
                out.push(State::with_connections(rec));
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(out)
    }

    async fn kill_session(
        &self,
        session_id: &SessionId,
        owner: Option<&UserId>,
        reason: EndReason,
    ) -> Result<bool, EngineError> {
        let (n, batches) = {
            let mut st = self.store.lock();
            if !st.alive(session_id, now_ms()) {
                return Ok(false);
            }
            if let Some(owner) = owner
                && st.sessions.get(session_id).map(|r| &r.session.user_id) != Some(owner)
            {
                return Ok(false);
            }
            st.end_sessions(std::slice::from_ref(session_id))
        };
        deliver(events(batches, reason)).await;
        Ok(n > 0)
    }

    async fn kill_user_sessions(
        &self,
        user_id: &UserId,
        except: Option<&SessionId>,
        reason: EndReason,
    ) -> Result<u64, EngineError> {
        let now = now_ms();
        let (n, batches) = {
            let mut st = self.store.lock();
            let sids: Vec<SessionId> = st
                .users
                .get(user_id)
                .map(|s| s.iter().filter(|s| Some(*s) != except).cloned().collect())
                .unwrap_or_default();
            let live: Vec<SessionId> = sids.into_iter().filter(|s| st.alive(s, now)).collect();
            st.end_sessions(&live)
        };
        deliver(events(batches, reason)).await;
        Ok(n)
    }

    async fn register_connection(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
    ) -> Result<Option<Session>, EngineError> {
        let now = now_ms();
        let mut st = self.store.lock();
        let sid = token.session_id();
        if !st.alive(sid, now) {
            return Ok(None);
        }
        let Some(rec) = st.sessions.get_mut(sid) else {
            return Ok(None);
        };
        if !rec.secret_hash.ct_eq(&token.secret_hash()) {
            return Ok(None);
        }
        rec.conns
            .insert(connection_id.clone(), (self.node_id.clone(), now));
        rec.session.last_seen_at = now;
        Ok(Some(rec.session.clone()))
    }

    async fn unregister_connection(
        &self,
        session_id: &SessionId,
        connection_id: &ConnectionId,
    ) -> Result<(), EngineError> {
        let mut st = self.store.lock();
        if let Some(rec) = st.sessions.get_mut(session_id) {
            rec.conns.remove(connection_id);
        }
        Ok(())
    }
}

fn events(
    batches: Vec<(EventSender, Vec<SessionId>)>,
    reason: EndReason,
) -> Vec<(EventSender, NodeEvent)> {
    batches
        .into_iter()
        .map(|(tx, session_ids)| {
            (
                tx,
                NodeEvent::SessionsEnded {
                    session_ids,
                    reason,
                },
            )
        })
        .collect()
}
