//! Expiry through the sweep index `sh:sweep` (issue 21): sessions in many buckets,
//! made through several nodes, end on time with the index deciding which buckets
//! are swept; and a session the index never heard of (made with an operator's
//! `FCALL`) is still ended, by the full sweep a node runs when it takes its lease.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use sessionhub_core::time::now_ms;
use sessionhub_core::{Token, UserId};
use sessionhub_tests::{Api, RedisServer, TestCluster, WsClient, secrets};

/// Stated bound (README): a session ends within the sweep interval (1 s) of its
/// deadline; slack for a loaded 2-core machine on top.
const ON_TIME: Duration = Duration::from_secs(1 + 3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_many_buckets_end_on_time() {
    let cluster = TestCluster::start(3).await;
    let mut open = Vec::new();
    for i in 0..24 {
        let node = &cluster.nodes[i % 3];
        let res = Api::new(node)
            .service(
                Method::POST,
                "/api/v1/sessions",
                Some(json!({ "user_id": format!("user-{i}"), "ttl_secs": 1 + i % 2 })),
            )
            .await;
        let s: Value = res.json().await.unwrap();
        let token = s["token"].as_str().unwrap().to_owned();
        secrets::remember(&token);
        let expires_at = s["expires_at"].as_str().unwrap().to_owned();
        let ws = WsClient::connect(&cluster.nodes[(i + 1) % 3], &token)
            .await
            .unwrap();
        open.push((expires_at, ws));
    }
    let started = Instant::now();
    for (_, ws) in &mut open {
        let (code, frames) = ws.expect_close().await;
        assert_eq!(code, 4001);
        assert_eq!(frames[0]["reason"], "expired");
    }
    // The longest TTL is 2 s.
    assert!(
        started.elapsed() < Duration::from_secs(2) + ON_TIME,
        "the last session ended {:?} after the logins",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_index_never_heard_of_ends_with_the_next_full_sweep() {
    let redis = RedisServer::start().await;
    let a = TestCluster::node(&redis, 0, &[]).await;

    // An operator makes a session with redis-cli, as a node would but without
    // telling the sweep index: it runs out 1.5 s from now.
    let user = UserId::parse("olga").unwrap();
    let token = Token::generate(&user);
    secrets::remember(&token.expose());
    let sid = token.session_id().to_string();
    let b = &sid[..2];
    let now = now_ms();
    let mut c = redis.conn().await;
    let _: i64 = redis::cmd("FCALL")
        .arg("sh_create_session")
        .arg(2)
        .arg(format!("sh:{{{b}}}:session:{sid}"))
        .arg(format!("sh:{{{b}}}:user:olga:sessions"))
        .arg((
            "olga",
            token.secret_hash().as_str(),
            "redis-cli",
            "",
            now,
            now + 1500,
            1_800_000,
        ))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut ws = WsClient::connect(&a, &token.expose()).await.unwrap();

    // A node that takes its lease marks every bucket due: the sweep finds the
    // session once it has run out.
    let _b = TestCluster::node(&redis, 1, &[]).await;
    let started = Instant::now();
    let (code, frames) = ws.expect_close().await;
    assert_eq!(code, 4001);
    assert_eq!(frames[0]["reason"], "expired");
    assert!(
        started.elapsed() < Duration::from_millis(1500) + ON_TIME,
        "ended {:?} after the second node started",
        started.elapsed()
    );
}

/// A session given an idle timeout shorter than the node's refresh interval (60 s)
/// does not idle out while its socket is in use: its activity is recorded at least
/// every half of its own idle timeout (it was written once a minute, and such a
/// session ended at its idle timeout however busy its socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_idle_timeout_is_kept_alive_by_activity() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api
        .create_session_with(json!({ "user_id": "busy", "idle_timeout_secs": 2 }))
        .await;
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    // Activity every 0.4 s for 6 s: three idle timeouts.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        ws.assert_alive().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        api.connection_nodes(&s.session_id).await.is_some(),
        "the session idled out while its socket was in use"
    );
    // Left alone, it ends by its idle timeout.
    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 4001);
}

/// The sweep index lost with Redis's link (a restart or failover that lost its
/// latest writes; here deleted by hand, then the node's subscriber link cut): on
/// resubscribing the node marks every bucket due, so sessions still end on time
/// (they waited for the ten-minute full sweep, their sockets open meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_index_lost_with_the_link_is_rebuilt_on_resubscription() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let started = Instant::now();
    let s = api
        .create_session_with(json!({ "user_id": "short", "ttl_secs": 3 }))
        .await;
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    let mut c = cluster.redis.conn().await;
    let gone: u64 = redis::cmd("DEL")
        .arg("sh:sweep")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(gone, 1);
    assert!(cluster.redis.kill_pubsub_clients().await >= 1);
    node.wait_log("resubscribed", Duration::from_secs(10)).await;
    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 4001);
    assert!(
        started.elapsed() <= Duration::from_secs(3) + ON_TIME,
        "ended {:?} after its login, its lifetime 3 s",
        started.elapsed()
    );
}
