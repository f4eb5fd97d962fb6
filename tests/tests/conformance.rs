//! One conformance suite of engine behaviour, run on both engines: the in-memory
//! engine and the Redis engine against a real redis-server. Several engine handles
//! with different node ids stand for several nodes.
#![allow(
    clippy::unwrap_used,
    clippy::large_enum_variant,
    clippy::cloned_ref_to_slice_refs,
    missing_docs
)]

use std::sync::Arc;
use std::time::Duration;

use sessionhub_core::memory::{MemoryEngine, MemoryStore};
use sessionhub_core::{
    ConnLimits, ConnectionId, CreatedSession, EndReason, Engine, GroupName, HistoryConfig,
    HistoryState, LocalRecord, Member, NewSession, NodeEvent, NodeId, Recovery, SessionId, Target,
    Token, UserId,
};
use sessionhub_redis::{RedisConfig, RedisEngine, Topology};
use sessionhub_tests::{RedisServer, WAIT, wait_for};
use tokio::sync::mpsc;

enum Backend {
    Memory(MemoryStore),
    Redis(RedisServer),
    /// A Redis Cluster shared by the scenarios, each under a key prefix of its own.
    RedisCluster {
        seeds: Vec<String>,
        prefix: String,
    },
}

struct TestNode {
    engine: Arc<dyn Engine>,
    events: mpsc::Receiver<NodeEvent>,
}

impl Backend {
    async fn node(&self, id: &str) -> TestNode {
        self.node_with(id, ConnLimits::default()).await
    }

    async fn node_with(&self, id: &str, limits: ConnLimits) -> TestNode {
        self.node_full(id, limits, HistoryConfig::default()).await
    }

    async fn node_history(&self, id: &str, history: HistoryConfig) -> TestNode {
        self.node_full(id, ConnLimits::default(), history).await
    }

    async fn node_full(&self, id: &str, limits: ConnLimits, history: HistoryConfig) -> TestNode {
        let (tx, events) = mpsc::channel(64);
        let node_id = NodeId::parse(id).unwrap();
        let engine: Arc<dyn Engine> = match self {
            Backend::Memory(store) => Arc::new(
                MemoryEngine::with_limits(store.clone(), node_id, tx, limits).with_history(history),
            ),
            Backend::Redis(redis) => Arc::new(
                RedisEngine::connect(
                    RedisConfig {
                        limits,
                        history,
                        ..RedisConfig::new(redis.url())
                    },
                    node_id,
                    tx,
                )
                .await
                .unwrap(),
            ),
            Backend::RedisCluster { seeds, prefix } => Arc::new(
                RedisEngine::connect(
                    RedisConfig {
                        limits,
                        history,
                        key_prefix: prefix.clone(),
                        ..RedisConfig::with_topology(Topology::Cluster(seeds.clone()))
                    },
                    node_id,
                    tx,
                )
                .await
                .unwrap(),
            ),
        };
        TestNode { engine, events }
    }
}

impl TestNode {
    async fn next_event(&mut self) -> NodeEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no event in time")
            .expect("event queue closed")
    }
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn new_session(u: &str) -> NewSession {
    NewSession {
        user_id: user(u),
        user_agent: Some("Firefox on laptop".into()),
        ip: Some("192.0.2.1".into()),
        ttl: Duration::from_secs(3600),
        idle: Duration::from_secs(1800),
    }
}

fn cid(token: &Token) -> ConnectionId {
    ConnectionId::generate(token.session_id())
}

async fn create_authenticate_and_get(b: Backend) {
    let a = b.node("a").await;
    let created = a.engine.create_session(new_session("alice")).await.unwrap();
    let s = &created.session;
    assert_eq!(s.user_id.as_str(), "alice");
    assert!(s.expires_at > s.created_at);

    let authed = a
        .engine
        .authenticate(&created.token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(authed.session_id, s.session_id);
    assert_eq!(authed.user_agent.as_deref(), Some("Firefox on laptop"));
    assert_eq!(authed.ip.as_deref(), Some("192.0.2.1"));

    // Same public id, different secret: refused, by the check in Rust and by the
    // registration's own (in the Redis function), which records nothing.
    let forged = Token::parse(&format!("{}.{}", s.session_id, "0".repeat(64))).unwrap();
    assert!(a.engine.authenticate(&forged).await.unwrap().is_none());
    let refused = a.engine.register_connection(&forged, &cid(&forged)).await;
    assert!(refused.unwrap().is_none());
    let got = a.engine.get_session(&s.session_id).await.unwrap().unwrap();
    assert!(got.connections.is_empty());
    // Unknown session: refused.
    let other = Token::generate(&user("alice"));
    assert!(a.engine.authenticate(&other).await.unwrap().is_none());

    let got = a.engine.get_session(&s.session_id).await.unwrap().unwrap();
    assert_eq!(got.session_id, s.session_id);
    assert!(got.connections.is_empty());
    assert!(
        a.engine
            .get_session(other.session_id())
            .await
            .unwrap()
            .is_none()
    );
}

async fn connections_are_listed_with_their_nodes(b: Backend) {
    let a = b.node("a").await;
    let bn = b.node("b").await;
    let s1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let s2 = a.engine.create_session(new_session("alice")).await.unwrap();
    let (c1, c2) = (cid(&s1.token), cid(&s1.token));
    assert!(
        a.engine
            .register_connection(&s1.token, &c1)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        bn.engine
            .register_connection(&s1.token, &c2)
            .await
            .unwrap()
            .is_some()
    );

    let got = a
        .engine
        .get_session(&s1.session.session_id)
        .await
        .unwrap()
        .unwrap();
    let mut seen: Vec<(String, String)> = got
        .connections
        .iter()
        .map(|c| (c.connection_id.to_string(), c.node_id.to_string()))
        .collect();
    seen.sort();
    let mut want = vec![
        (c1.to_string(), "a".to_string()),
        (c2.to_string(), "b".to_string()),
    ];
    want.sort();
    assert_eq!(seen, want);

    let list = bn.engine.user_sessions(&user("alice")).await.unwrap();
    assert!(
        list.windows(2).all(|w| w[0].created_at <= w[1].created_at),
        "oldest first"
    );
    let mut ids: Vec<&SessionId> = list.iter().map(|s| &s.session_id).collect();
    ids.sort();
    let mut want = vec![&s1.session.session_id, &s2.session.session_id];
    want.sort();
    assert_eq!(ids, want);
    let of = |sid: &SessionId| list.iter().find(|s| &s.session_id == sid).unwrap();
    assert_eq!(of(&s1.session.session_id).connections.len(), 2);
    assert!(of(&s2.session.session_id).connections.is_empty());
    assert!(
        a.engine
            .user_sessions(&user("nobody"))
            .await
            .unwrap()
            .is_empty()
    );

    a.engine.unregister_connection(&c1).await.unwrap();
    let got = a
        .engine
        .get_session(&s1.session.session_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.connections.len(), 1);
    assert_eq!(got.connections[0].node_id.as_str(), "b");
}

async fn session_created_reaches_exactly_the_nodes_holding_other_sessions(b: Backend) {
    let mut a = b.node("a").await;
    let mut bn = b.node("b").await;
    let mut c = b.node("c").await;
    let s1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let (on_a, on_b) = (cid(&s1.token), cid(&s1.token));
    a.engine
        .register_connection(&s1.token, &on_a)
        .await
        .unwrap()
        .unwrap();
    bn.engine
        .register_connection(&s1.token, &on_b)
        .await
        .unwrap()
        .unwrap();
    // bob's socket on c must not hear about alice.
    let bob = c.engine.create_session(new_session("bob")).await.unwrap();
    c.engine
        .register_connection(&bob.token, &cid(&bob.token))
        .await
        .unwrap()
        .unwrap();

    let s2 = c.engine.create_session(new_session("alice")).await.unwrap();
    for (node, held) in [(&mut a, on_a), (&mut bn, on_b)] {
        let (cids, frame) = session_created_of(node.next_event().await);
        assert_eq!(cids, [held]);
        assert_eq!(
            frame["session"]["session_id"],
            s2.session.session_id.as_str()
        );
        assert_eq!(frame["session"]["user_agent"], "Firefox on laptop");
        assert_eq!(frame["message"], "You logged in to another session");
    }
    // The first event c gets is the end of bob's session, not alice's news.
    c.engine
        .kill_session(&bob.session.session_id, None, EndReason::Killed)
        .await
        .unwrap();
    match c.next_event().await {
        NodeEvent::SessionsEnded { session_ids, .. } => {
            assert_eq!(session_ids, [bob.session.session_id.clone()]);
        }
        other => panic!("node c should not have heard of alice's session: {other:?}"),
    }
}

async fn kill_session_ends_it_everywhere(b: Backend) {
    let mut a = b.node("a").await;
    let mut bn = b.node("b").await;
    let s1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let s2 = a.engine.create_session(new_session("alice")).await.unwrap();
    a.engine
        .register_connection(&s1.token, &cid(&s1.token))
        .await
        .unwrap()
        .unwrap();
    bn.engine
        .register_connection(&s1.token, &cid(&s1.token))
        .await
        .unwrap()
        .unwrap();
    a.engine
        .register_connection(&s2.token, &cid(&s2.token))
        .await
        .unwrap()
        .unwrap();

    let sid = &s1.session.session_id;
    assert!(
        bn.engine
            .kill_session(sid, None, EndReason::Killed)
            .await
            .unwrap()
    );
    for node in [&mut a, &mut bn] {
        match node.next_event().await {
            NodeEvent::SessionsEnded {
                session_ids,
                reason,
            } => {
                assert_eq!(session_ids, [sid.clone()]);
                assert_eq!(reason, EndReason::Killed);
            }
            other => panic!("expected sessions_ended, got {other:?}"),
        }
    }
    assert!(a.engine.authenticate(&s1.token).await.unwrap().is_none());
    assert!(a.engine.get_session(sid).await.unwrap().is_none());
    assert!(
        a.engine
            .register_connection(&s1.token, &cid(&s1.token))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !a.engine
            .kill_session(sid, None, EndReason::Killed)
            .await
            .unwrap()
    );
    // The other session is untouched.
    assert!(a.engine.authenticate(&s2.token).await.unwrap().is_some());
    let list = a.engine.user_sessions(&user("alice")).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].session_id, s2.session.session_id);
    // Every index shrank by exactly the killed session's two sockets: alice is
    // online with her other session's one socket, and her next login tells node a
    // (that socket) alone, not node b.
    let online = a.engine.online_users(None, 10).await.unwrap();
    assert_eq!(online.len(), 1);
    assert_eq!(online[0].connections, 1);
    let counts = a.engine.presence_counts().await.unwrap();
    assert_eq!((counts.online_users, counts.connections), (1, 1));
    let s3 = bn
        .engine
        .create_session(new_session("alice"))
        .await
        .unwrap();
    let (cids, _) = session_created_of(a.next_event().await);
    assert_eq!(cids, [cid_of_session(&a, &s2.session.session_id).await]);
    // The first event b gets is the end of bob's session, not alice's news.
    let bob = bn.engine.create_session(new_session("bob")).await.unwrap();
    bn.engine
        .register_connection(&bob.token, &cid(&bob.token))
        .await
        .unwrap()
        .unwrap();
    bn.engine
        .kill_session(&bob.session.session_id, None, EndReason::Killed)
        .await
        .unwrap();
    match bn.next_event().await {
        NodeEvent::SessionsEnded { session_ids, .. } => {
            assert_eq!(session_ids, [bob.session.session_id.clone()]);
        }
        other => panic!("node b should not have heard of alice's login: {other:?}"),
    }
    a.engine
        .kill_session(&s3.session.session_id, None, EndReason::Killed)
        .await
        .unwrap();
    a.engine
        .kill_session(&s2.session.session_id, None, EndReason::Killed)
        .await
        .unwrap();
    assert!(matches!(
        a.next_event().await,
        NodeEvent::SessionsEnded { .. }
    ));
    assert!(a.engine.online_users(None, 10).await.unwrap().is_empty());
    let counts = a.engine.presence_counts().await.unwrap();
    assert_eq!((counts.online_users, counts.connections), (0, 0));
}

/// The one connection of `sid` (as listed with the user's sessions).
async fn cid_of_session(node: &TestNode, sid: &SessionId) -> ConnectionId {
    let s = node.engine.get_session(sid).await.unwrap().unwrap();
    assert_eq!(s.connections.len(), 1, "{s:?}");
    s.connections[0].connection_id.clone()
}

async fn a_user_cannot_kill_another_users_session(b: Backend) {
    let a = b.node("a").await;
    let alice = a.engine.create_session(new_session("alice")).await.unwrap();
    let sid = &alice.session.session_id;
    assert!(
        !a.engine
            .kill_session(sid, Some(&user("bob")), EndReason::Killed)
            .await
            .unwrap()
    );
    assert!(a.engine.authenticate(&alice.token).await.unwrap().is_some());
    assert!(
        a.engine
            .kill_session(sid, Some(&user("alice")), EndReason::Logout)
            .await
            .unwrap()
    );
    assert!(a.engine.authenticate(&alice.token).await.unwrap().is_none());
}

async fn kill_user_sessions_keeps_the_excepted_one(b: Backend) {
    let mut a = b.node("a").await;
    let mut bn = b.node("b").await;
    let keep = a.engine.create_session(new_session("alice")).await.unwrap();
    let k1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let k2 = a.engine.create_session(new_session("alice")).await.unwrap();
    let bob = a.engine.create_session(new_session("bob")).await.unwrap();
    a.engine
        .register_connection(&k1.token, &cid(&k1.token))
        .await
        .unwrap()
        .unwrap();
    bn.engine
        .register_connection(&k2.token, &cid(&k2.token))
        .await
        .unwrap()
        .unwrap();

    let n = a
        .engine
        .kill_user_sessions(
            &user("alice"),
            Some(&keep.session.session_id),
            EndReason::Killed,
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    for (node, sid) in [(&mut a, &k1), (&mut bn, &k2)] {
        match node.next_event().await {
            NodeEvent::SessionsEnded { session_ids, .. } => {
                assert_eq!(session_ids, [sid.session.session_id.clone()]);
            }
            other => panic!("expected sessions_ended, got {other:?}"),
        }
    }
    assert!(a.engine.authenticate(&keep.token).await.unwrap().is_some());
    assert!(a.engine.authenticate(&k1.token).await.unwrap().is_none());
    assert!(a.engine.authenticate(&k2.token).await.unwrap().is_none());
    assert!(a.engine.authenticate(&bob.token).await.unwrap().is_some());

    let n = a
        .engine
        .kill_user_sessions(&user("alice"), None, EndReason::Killed)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(
        a.engine
            .user_sessions(&user("alice"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        a.engine
            .kill_user_sessions(&user("alice"), None, EndReason::Killed)
            .await
            .unwrap(),
        0
    );
}

async fn sessions_expire(b: Backend) {
    let a = b.node("a").await;
    let mut ns = new_session("alice");
    ns.ttl = Duration::from_secs(1);
    let s = a.engine.create_session(ns).await.unwrap();
    assert!(a.engine.authenticate(&s.token).await.unwrap().is_some());
    let engine = a.engine.clone();
    wait_for("the session to expire", WAIT, || {
        let (engine, token) = (engine.clone(), s.token.clone());
        async move {
            engine
                .authenticate(&token)
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(
        a.engine
            .register_connection(&s.token, &cid(&s.token))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        a.engine
            .user_sessions(&user("alice"))
            .await
            .unwrap()
            .is_empty()
    );
    // Ran out but not yet ended by the sweep (none runs here): a kill finds nothing,
    // as reading it does, and leaves it to the sweep to end as expired.
    let sid = s.token.session_id();
    assert!(
        !a.engine
            .kill_session(sid, None, EndReason::Killed)
            .await
            .unwrap()
    );
    assert_eq!(
        a.engine
            .kill_user_sessions(&user("alice"), None, EndReason::Killed)
            .await
            .unwrap(),
        0
    );
    assert_eq!(a.engine.expire_due().await.unwrap(), 1, "the sweep ends it");
}

/// Registers a socket of `token` on `node`, asking to recover after `since`.
async fn register_since(
    node: &TestNode,
    token: &Token,
    since: Option<(u64, &str)>,
) -> (ConnectionId, HistoryState) {
    let c = cid(token);
    let ask = since.map(|(since, epoch)| Recovery {
        since,
        epoch: epoch.to_owned(),
    });
    let reg = node
        .engine
        .register_recovering(token, &c, ask.as_ref())
        .await
        .unwrap()
        .expect("live session");
    (c, reg.history.expect("history is on"))
}

/// The offsets and `data` of recovered frames, checking each frame's own offset.
fn recovered(h: &HistoryState) -> (bool, Vec<(u64, String)>) {
    let r = h.recovery.as_ref().expect("recovery was asked");
    let frames = r
        .frames
        .iter()
        .map(|f| {
            let v: serde_json::Value = serde_json::from_str(&f.frame).unwrap();
            assert_eq!(v["offset"], f.offset.to_string(), "{v}");
            let label = match v["type"].as_str() {
                Some("session_created") => format!("created:{}", v["session"]["session_id"]),
                _ => v["data"].as_str().unwrap_or_default().to_owned(),
            };
            (f.offset, label)
        })
        .collect();
    (r.recovered, frames)
}

fn msg(data: &str) -> String {
    format!(r#"{{"type":"message","event":"e","data":"{data}"}}"#)
}

async fn history_recovers_exactly_the_gap_for_each_session(b: Backend) {
    let mut a = b.node("a").await;
    let mut bn = b.node("b").await;
    let s1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let s2 = a.engine.create_session(new_session("alice")).await.unwrap();
    let bob = a.engine.create_session(new_session("bob")).await.unwrap();
    let (c1, h0) = register_since(&a, &s1.token, None).await;
    let (epoch, t0) = (h0.epoch.clone(), h0.offset);
    assert!(h0.recovery.is_none());

    let engine = a.engine.clone();
    let publish = |target: Target, data: &'static str| {
        let engine = engine.clone();
        async move { engine.publish(&target, &msg(data)).await.unwrap().offset }
    };
    assert_eq!(
        publish(Target::User(user("alice")), "m1").await,
        Some(t0 + 1)
    );
    assert_eq!(
        publish(Target::Session(s2.session.session_id.clone()), "m2").await,
        Some(t0 + 2)
    );
    assert_eq!(
        publish(Target::Session(s1.session.session_id.clone()), "m3").await,
        Some(t0 + 3)
    );
    // Another user's numbering is its own; groups and connections are live only.
    publish(Target::User(user("bob")), "b1").await;
    assert_eq!(publish(Target::Connection(c1.clone()), "live").await, None);
    assert_eq!(
        publish(Target::User(user("alice")), "m4").await,
        Some(t0 + 4)
    );
    let s3 = bn
        .engine
        .create_session(new_session("alice"))
        .await
        .unwrap();
    let created = format!("created:\"{}\"", s3.session.session_id);
    // The socket on a got all of them live, each with its offset.
    let mut live = Vec::new();
    for _ in 0..5 {
        match a.next_event().await {
            NodeEvent::Message { offset, .. } => live.push(offset),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    assert_eq!(
        live,
        [Some(t0 + 1), Some(t0 + 3), None, Some(t0 + 4), Some(t0 + 5)]
    );

    // A socket of s1 reconnecting on b gets the user's messages, its own session's
    // and the news of s3, in order; never s2's message.
    let (_, h) = register_since(&bn, &s1.token, Some((t0, &epoch))).await;
    assert_eq!(h.offset, t0 + 5);
    assert_eq!(
        recovered(&h),
        (
            true,
            vec![
                (t0 + 1, "m1".into()),
                (t0 + 3, "m3".into()),
                (t0 + 4, "m4".into()),
                (t0 + 5, created.clone()),
            ]
        )
    );
    let (_, h) = register_since(&bn, &s2.token, Some((t0, &epoch))).await;
    assert_eq!(
        recovered(&h).1,
        [
            (t0 + 1, "m1".into()),
            (t0 + 2, "m2".into()),
            (t0 + 4, "m4".into()),
            (t0 + 5, created)
        ]
    );
    // s3 does not recover its own creation, nor what was sent to other sessions.
    let (_, h) = register_since(&bn, &s3.token, Some((t0 + 1, &epoch))).await;
    assert_eq!(recovered(&h), (true, vec![(t0 + 4, "m4".into())]));
    // Nothing missed; another epoch; an offset never given out.
    let (_, h) = register_since(&a, &s1.token, Some((t0 + 5, &epoch))).await;
    assert_eq!(recovered(&h), (true, vec![]));
    let (_, h) = register_since(&a, &s1.token, Some((t0, "other"))).await;
    assert_eq!(recovered(&h), (false, vec![]));
    let (_, h) = register_since(&a, &s1.token, Some((t0 + 6, &epoch))).await;
    assert_eq!(recovered(&h), (false, vec![]));
    // bob's history has its own numbering: his login's news, then b1.
    let (_, h) = register_since(&a, &bob.token, Some((0, &epoch))).await;
    assert_eq!(h.offset, 2);

    // After a registration, later frames reach the new socket live, above its offset.
    let (c9, h) = register_since(&bn, &s2.token, None).await;
    publish(Target::User(user("alice")), "m6").await;
    let mut seen = false;
    while !seen {
        if let NodeEvent::Message {
            connections: Some(cids),
            offset,
            ..
        } = bn.next_event().await
            && cids.contains(&c9)
        {
            assert_eq!(offset, Some(h.offset + 1));
            seen = true;
        }
    }
}

/// After events may have been lost (a resubscription), reasserting a node's records
/// finds the sockets that missed recoverable frames: those whose session may recover
/// something after the point they reached, or whose user's history was renumbered;
/// not those that got everything, nor one whose user only got frames for another
/// session.
async fn reassert_finds_the_sockets_that_missed_recoverable_frames(b: Backend) {
    let a = b.node("a").await;
    let s1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let s2 = a.engine.create_session(new_session("alice")).await.unwrap();
    let (c1, h1) = register_since(&a, &s1.token, None).await;
    let (c2, h2) = register_since(&a, &s2.token, None).await;
    assert_eq!((h1.epoch.clone(), h1.offset), (h2.epoch.clone(), h2.offset));
    let record = |c: &ConnectionId, s: &CreatedSession, epoch: &str, since: u64| LocalRecord {
        connection_id: c.clone(),
        session_id: s.session.session_id.clone(),
        user_id: user("alice"),
        connected_at: 1,
        recovery: Some(Recovery {
            since,
            epoch: epoch.to_owned(),
        }),
    };
    let t = h1.offset;
    let e = h1.epoch.clone();
    let missed = |records: Vec<LocalRecord>| {
        let engine = a.engine.clone();
        async move { engine.reassert(&records).await.unwrap().missed }
    };
    assert!(
        missed(vec![record(&c1, &s1, &e, t), record(&c2, &s2, &e, t)])
            .await
            .is_empty()
    );

    // A message to s2 alone: s1's socket at t missed nothing, s2's did.
    a.engine
        .publish(
            &Target::Session(s2.session.session_id.clone()),
            &msg("for-s2"),
        )
        .await
        .unwrap();
    let got = missed(vec![record(&c1, &s1, &e, t), record(&c2, &s2, &e, t)]).await;
    assert_eq!(got, [c2.clone()]);
    // Once a socket got it, nothing is missed.
    assert!(missed(vec![record(&c2, &s2, &e, t + 1)]).await.is_empty());
    // A message to the user: both at t missed it; another epoch missed everything.
    a.engine
        .publish(&Target::User(user("alice")), &msg("for-all"))
        .await
        .unwrap();
    let mut got = missed(vec![record(&c1, &s1, &e, t), record(&c2, &s2, &e, t + 1)]).await;
    got.sort();
    let mut want = vec![c1.clone(), c2.clone()];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        missed(vec![record(&c1, &s1, "0other", t + 2)]).await,
        [c1.clone()]
    );
    assert!(missed(vec![record(&c1, &s1, &e, t + 2)]).await.is_empty());
}

async fn history_is_bounded_by_size_and_time(b: Backend) {
    let cfg = HistoryConfig {
        size: 3,
        ttl: Duration::from_secs(1),
        ..HistoryConfig::default()
    };
    let a = b.node_history("a", cfg).await;
    let s1 = a.engine.create_session(new_session("alice")).await.unwrap();
    let (_, h0) = register_since(&a, &s1.token, None).await;
    let (epoch, t0) = (h0.epoch.clone(), h0.offset);
    for i in 1..=5 {
        let d = a
            .engine
            .publish(&Target::User(user("alice")), &msg(&format!("m{i}")))
            .await
            .unwrap();
        assert_eq!(d.offset, Some(t0 + i));
    }
    // Offsets t0+1 and t0+2 were trimmed: a client that has t0 missed them.
    let (_, h) = register_since(&a, &s1.token, Some((t0, &epoch))).await;
    assert_eq!(recovered(&h), (false, vec![]));
    let (_, h) = register_since(&a, &s1.token, Some((t0 + 1, &epoch))).await;
    assert_eq!(recovered(&h), (false, vec![]));
    let (_, h) = register_since(&a, &s1.token, Some((t0 + 2, &epoch))).await;
    assert_eq!(recovered(&h).1.len(), 3);
    // Once they expire, the gap is gone too; a client that missed nothing is fine.
    wait_for("history entries to expire", WAIT, || async {
        let (c, h) = register_since(&a, &s1.token, Some((t0 + 2, &epoch))).await;
        a.engine.unregister_connection(&c).await.unwrap();
        (!h.recovery.unwrap().recovered).then_some(())
    })
    .await;
    let (_, h) = register_since(&a, &s1.token, Some((t0 + 5, &epoch))).await;
    assert_eq!(
        (h.epoch.as_str(), recovered(&h)),
        (epoch.as_str(), (true, vec![]))
    );

    // With history off nothing is numbered and nothing recovers.
    let off = b.node_history("off", HistoryConfig::OFF).await;
    let d = off
        .engine
        .publish(&Target::User(user("alice")), &msg("x"))
        .await
        .unwrap();
    assert_eq!(d.offset, None);
    let reg = off
        .engine
        .register_recovering(&s1.token, &cid(&s1.token), None)
        .await
        .unwrap()
        .unwrap();
    assert!(reg.history.is_none());
}

/// The sockets and the `session_created` frame of an event that must be one.
fn session_created_of(ev: NodeEvent) -> (Vec<ConnectionId>, serde_json::Value) {
    let (cids, frame) = message_targets(ev);
    let frame: serde_json::Value = serde_json::from_str(&frame).unwrap();
    assert_eq!(frame["type"], "session_created", "{frame}");
    (cids.expect("session_created goes to listed sockets"), frame)
}

fn message_targets(ev: NodeEvent) -> (Option<Vec<ConnectionId>>, String) {
    match ev {
        NodeEvent::Message {
            connections, frame, ..
        } => (
            connections.map(|mut c| {
                c.sort();
                c
            }),
            frame.to_string(),
        ),
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn publish_routes_to_exactly_the_nodes_holding_targets(b: Backend) {
    let mut a = b.node("a").await;
    let mut bn = b.node("b").await;
    let mut c = b.node("c").await;
    let alice = a.engine.create_session(new_session("alice")).await.unwrap();
    let bob = a.engine.create_session(new_session("bob")).await.unwrap();
    let (ca, cb) = (cid(&alice.token), cid(&alice.token));
    a.engine
        .register_connection(&alice.token, &ca)
        .await
        .unwrap()
        .unwrap();
    bn.engine
        .register_connection(&alice.token, &cb)
        .await
        .unwrap()
        .unwrap();
    let cbob = cid(&bob.token);
    c.engine
        .register_connection(&bob.token, &cbob)
        .await
        .unwrap()
        .unwrap();

    let d = a
        .engine
        .publish(&Target::User(user("alice")), "f1")
        .await
        .unwrap();
    assert_eq!((d.nodes, d.connections), (2, Some(2)));
    assert_eq!(
        message_targets(a.next_event().await),
        (Some(vec![ca.clone()]), "f1".into())
    );
    assert_eq!(
        message_targets(bn.next_event().await),
        (Some(vec![cb.clone()]), "f1".into())
    );

    let d = c
        .engine
        .publish(&Target::Connection(cb.clone()), "f2")
        .await
        .unwrap();
    assert_eq!((d.nodes, d.connections), (1, Some(1)));
    assert_eq!(
        message_targets(bn.next_event().await),
        (Some(vec![cb.clone()]), "f2".into())
    );

    let group = GroupName::parse("g").unwrap();
    assert!(
        a.engine
            .group_add(&group, &Member::User(user("bob")))
            .await
            .unwrap()
    );
    assert!(
        a.engine
            .group_add(&group, &Member::Connection(ca.clone()))
            .await
            .unwrap()
    );
    let ghost = ConnectionId::generate(alice.token.session_id());
    assert!(
        !a.engine
            .group_add(&group, &Member::Connection(ghost))
            .await
            .unwrap()
    );
    let d = bn
        .engine
        .publish(&Target::Group(group.clone()), "f3")
        .await
        .unwrap();
    assert_eq!((d.nodes, d.connections), (2, Some(2)));
    assert_eq!(
        message_targets(a.next_event().await),
        (Some(vec![ca.clone()]), "f3".into())
    );
    assert_eq!(
        message_targets(c.next_event().await),
        (Some(vec![cbob.clone()]), "f3".into())
    );

    // Closing a connection removes its group membership.
    a.engine.unregister_connection(&ca).await.unwrap();
    assert_eq!(
        a.engine.group_members(&group).await.unwrap(),
        [Member::User(user("bob"))]
    );
    assert!(
        a.engine
            .group_remove(&group, &Member::User(user("bob")))
            .await
            .unwrap()
    );
    assert!(
        !a.engine
            .group_remove(&group, &Member::User(user("bob")))
            .await
            .unwrap()
    );
    assert!(a.engine.group_members(&group).await.unwrap().is_empty());

    let d = a.engine.publish(&Target::All, "f4").await.unwrap();
    assert_eq!((d.nodes, d.connections), (3, None));
    for node in [&mut a, &mut bn, &mut c] {
        assert_eq!(
            message_targets(node.next_event().await),
            (None, "f4".into())
        );
    }
}

async fn presence_counts_each_user_once_and_pages_in_order(b: Backend) {
    let a = b.node("a").await;
    let bn = b.node("b").await;
    let mut conns = Vec::new();
    for u in ["carol", "alice", "bob"] {
        let s = a.engine.create_session(new_session(u)).await.unwrap();
        for node in [&a, &bn] {
            let c = cid(&s.token);
            node.engine
                .register_connection(&s.token, &c)
                .await
                .unwrap()
                .unwrap();
            conns.push(c);
        }
    }
    let counts = a.engine.presence_counts().await.unwrap();
    assert_eq!(
        (counts.online_users, counts.connections, counts.nodes),
        (3, 6, 2)
    );
    let page = a.engine.online_users(None, 2).await.unwrap();
    let ids: Vec<&str> = page.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(ids, ["alice", "bob"]);
    assert_eq!(page[0].connections, 2);
    let rest = a
        .engine
        .online_users(Some(&page[1].user_id), 2)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].user_id.as_str(), "carol");

    // Node b leaves: its connections vanish; users with sockets on a stay.
    bn.engine.leave().await.unwrap();
    let counts = a.engine.presence_counts().await.unwrap();
    assert_eq!((counts.online_users, counts.connections), (3, 3));
    for c in &conns {
        a.engine.unregister_connection(c).await.unwrap();
    }
    assert!(a.engine.online_users(None, 10).await.unwrap().is_empty());
}

async fn reassert_restores_records_of_live_sessions_only(b: Backend) {
    let a = b.node("a").await;
    let live = a.engine.create_session(new_session("alice")).await.unwrap();
    let dead = a.engine.create_session(new_session("alice")).await.unwrap();
    let (c1, c2) = (cid(&live.token), cid(&dead.token));
    a.engine
        .register_connection(&live.token, &c1)
        .await
        .unwrap()
        .unwrap();
    a.engine
        .register_connection(&dead.token, &c2)
        .await
        .unwrap()
        .unwrap();
    // Records lost (as after a Redis restart without them), and one session killed.
    a.engine.unregister_connection(&c1).await.unwrap();
    a.engine
        .kill_session(&dead.session.session_id, None, EndReason::Killed)
        .await
        .unwrap();
    let records: Vec<LocalRecord> = [(&c1, &live), (&c2, &dead)]
        .into_iter()
        .map(|(c, s)| LocalRecord {
            connection_id: c.clone(),
            session_id: s.session.session_id.clone(),
            user_id: user("alice"),
            connected_at: 1,
            recovery: None,
        })
        .collect();
    let found = a.engine.reassert(&records).await.unwrap();
    assert_eq!(found.gone, [dead.session.session_id.clone()]);
    assert!(found.missed.is_empty());
    let s = a
        .engine
        .get_session(&live.session.session_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.connections.len(), 1);
    assert_eq!(s.connections[0].connection_id, c1);
    // On Redis the session's socket list, made afresh, expires as the session does.
    if let Backend::Redis(server) = &b {
        let key = format!(
            "sh:{{{}}}:session:{}:conns",
            &live.session.session_id.as_str()[..2],
            live.session.session_id
        );
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut server.conn().await)
            .await
            .unwrap();
        assert!(ttl > 3_600_000, "{key}: PTTL {ttl}");
    }
    let alive = a
        .engine
        .sessions_alive(&[
            live.session.session_id.clone(),
            dead.session.session_id.clone(),
        ])
        .await
        .unwrap();
    assert_eq!(alive, [true, false]);
}

async fn a_login_past_the_session_cap_ends_the_oldest_session(b: Backend) {
    let limits = ConnLimits {
        sessions_per_user: 3,
        ..ConnLimits::default()
    };
    let mut a = b.node_with("a", limits).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        let created = a.engine.create_session(new_session("alice")).await.unwrap();
        // Different creation times (ms), so "oldest" is well defined: wait for the
        // clock to pass this one's.
        let at = created.session.created_at;
        wait_for("the clock to tick", WAIT, || async {
            (sessionhub_core::time::now_ms() > at).then_some(())
        })
        .await;
        made.push(created);
    }
    for s in &made[..2] {
        a.engine
            .register_connection(&s.token, &cid(&s.token))
            .await
            .unwrap()
            .unwrap();
    }
    let s4 = a.engine.create_session(new_session("alice")).await.unwrap();
    match a.next_event().await {
        NodeEvent::SessionsEnded {
            session_ids,
            reason,
        } => {
            assert_eq!(session_ids, [made[0].session.session_id.clone()]);
            assert_eq!(reason, EndReason::Limit);
        }
        other => panic!("expected the oldest session to end, got {other:?}"),
    }
    let (_, frame) = session_created_of(a.next_event().await);
    assert_eq!(
        frame["session"]["session_id"],
        s4.session.session_id.as_str()
    );
    assert!(
        a.engine
            .authenticate(&made[0].token)
            .await
            .unwrap()
            .is_none()
    );
    let mut left: Vec<SessionId> = a
        .engine
        .user_sessions(&user("alice"))
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    left.sort();
    let mut want: Vec<SessionId> = [&made[1], &made[2], &s4]
        .iter()
        .map(|c| c.session.session_id.clone())
        .collect();
    want.sort();
    assert_eq!(left, want);
    // Another user's sessions do not count.
    a.engine.create_session(new_session("bob")).await.unwrap();
    assert_eq!(
        a.engine.user_sessions(&user("alice")).await.unwrap().len(),
        3
    );
}

/// Reconciliation removes the node's records that it does not hold and that are
/// older than `before`, and only those: the record of a socket it holds in the same
/// bucket stays, as does another node's. Redis only: the in-memory engine's records
/// are its node's sockets, so it has nothing to reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_removes_only_the_records_a_node_does_not_hold() {
    let b = Backend::Redis(RedisServer::start().await);
    let (a, other) = (b.node("a").await, b.node("b").await);
    let s = a.engine.create_session(new_session("alice")).await.unwrap();
    // One session: every socket in one bucket.
    let (held, ghost, elsewhere) = (cid(&s.token), cid(&s.token), cid(&s.token));
    for (node, c) in [(&a, &held), (&a, &ghost), (&other, &elsewhere)] {
        node.engine
            .register_connection(&s.token, c)
            .await
            .unwrap()
            .unwrap();
    }
    let held_list = vec![LocalRecord {
        connection_id: held.clone(),
        session_id: s.session.session_id.clone(),
        user_id: user("alice"),
        connected_at: 1,
        recovery: None,
    }];
    let listed = |a: &TestNode| {
        let (engine, sid) = (a.engine.clone(), s.session.session_id.clone());
        async move {
            let got = engine.get_session(&sid).await.unwrap().unwrap();
            let mut ids: Vec<String> = got
                .connections
                .iter()
                .map(|c| c.connection_id.to_string())
                .collect();
            ids.sort();
            ids
        }
    };
    // Records younger than `before` are left alone.
    let past = sessionhub_core::time::now_ms() - 60_000;
    assert_eq!(a.engine.reconcile(&held_list, past).await.unwrap(), 0);
    assert_eq!(listed(&a).await.len(), 3);
    let future = sessionhub_core::time::now_ms() + 60_000;
    assert_eq!(a.engine.reconcile(&held_list, future).await.unwrap(), 1);
    let mut want = vec![held.to_string(), elsewhere.to_string()];
    want.sort();
    assert_eq!(listed(&a).await, want);
    // As many records as sockets held: nothing more to do.
    assert_eq!(a.engine.reconcile(&held_list, future).await.unwrap(), 0);
    assert_eq!(listed(&a).await, want);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Memory(super::MemoryStore::new())).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let redis = super::RedisServer::start().await;
                    super::$name(super::Backend::Redis(redis)).await
                }
            )*
        }
        /// Every scenario on one 3-master Redis Cluster (six servers are slow to
        /// start), one after the other, each under its own key prefix.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn on_redis_cluster() {
            let cluster = sessionhub_tests::RedisCluster::start().await;
            $(
                eprintln!("on Redis Cluster: {}", stringify!($name));
                $name(Backend::RedisCluster {
                    seeds: cluster.seeds(),
                    prefix: format!("c-{}:", stringify!($name)),
                })
                .await;
            )*
        }
    };
}

conformance!(
    create_authenticate_and_get,
    connections_are_listed_with_their_nodes,
    session_created_reaches_exactly_the_nodes_holding_other_sessions,
    kill_session_ends_it_everywhere,
    a_user_cannot_kill_another_users_session,
    kill_user_sessions_keeps_the_excepted_one,
    sessions_expire,
    publish_routes_to_exactly_the_nodes_holding_targets,
    presence_counts_each_user_once_and_pages_in_order,
    reassert_restores_records_of_live_sessions_only,
    a_login_past_the_session_cap_ends_the_oldest_session,
    history_recovers_exactly_the_gap_for_each_session,
    history_is_bounded_by_size_and_time,
    reassert_finds_the_sockets_that_missed_recoverable_frames,
);
