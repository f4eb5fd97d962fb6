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
    ConnectionId, EndReason, Engine, NewSession, NodeEvent, NodeId, SessionId, Token, UserId,
};
use sessionhub_redis::{RedisConfig, RedisEngine};
use sessionhub_tests::{RedisServer, WAIT, wait_for};
use tokio::sync::mpsc;

enum Backend {
    Memory(MemoryStore),
    Redis(RedisServer),
}

struct TestNode {
    engine: Arc<dyn Engine>,
    events: mpsc::Receiver<NodeEvent>,
}

impl Backend {
    async fn node(&self, id: &str) -> TestNode {
        let (tx, events) = mpsc::channel(64);
        let node_id = NodeId::parse(id).unwrap();
        let engine: Arc<dyn Engine> = match self {
            Backend::Memory(store) => Arc::new(MemoryEngine::new(store.clone(), node_id, tx)),
            Backend::Redis(redis) => Arc::new(
                RedisEngine::connect(RedisConfig::new(redis.url()), node_id, tx)
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

    // Same public id, different secret: refused.
    let forged = Token::parse(&format!("{}.{}", s.session_id, "0".repeat(64))).unwrap();
    assert!(a.engine.authenticate(&forged).await.unwrap().is_none());
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
    // bob's socket on c must not hear about alice.
    let bob = c.engine.create_session(new_session("bob")).await.unwrap();
    c.engine
        .register_connection(&bob.token, &cid(&bob.token))
        .await
        .unwrap()
        .unwrap();

    let s2 = c.engine.create_session(new_session("alice")).await.unwrap();
    for node in [&mut a, &mut bn] {
        match node.next_event().await {
            NodeEvent::SessionCreated { session } => {
                assert_eq!(session.session_id, s2.session.session_id);
                assert_eq!(session.user_agent.as_deref(), Some("Firefox on laptop"));
            }
            other => panic!("expected session_created, got {other:?}"),
        }
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
);
