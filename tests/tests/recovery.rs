//! Message history and recovery through real node processes: a socket that comes
//! back with `since` and `epoch` gets exactly what it missed, in order, then live
//! frames; never another session's; `recovered: false` when the gap is gone.
#![allow(clippy::unwrap_used, missing_docs)]

use serde_json::{Value, json};
use sessionhub_tests::process::wait_ready;
use sessionhub_tests::{
    Api, Deployment, Node, NodeOptions, RedisServer, TestCluster, Topology, WsClient,
};

/// Publishes `data` to `to`; returns the offset the hub gave it.
async fn publish(api: &Api, to: Value, data: &str) -> u64 {
    let body = api.publish(to, "e", json!(data)).await;
    body["offset"].as_str().unwrap().parse().unwrap()
}

/// Opens `/ws` on `node` with `?<query>`.
async fn connect_with_query(node: &Node, token: &str, query: &str) -> WsClient {
    WsClient::connect_url(&format!("{}?{query}", node.ws_url()), token)
        .await
        .unwrap()
}

/// The next `n` frames' (data, offset), checking they are messages.
async fn messages(ws: &mut WsClient, n: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let f = ws.expect("message").await;
        let offset = f["offset"].as_str().unwrap().parse().unwrap();
        out.push((f["data"].as_str().unwrap().to_owned(), offset));
    }
    out
}

fn hello_point(ws: &WsClient) -> (u64, String) {
    let h = &ws.hello;
    (
        h["offset"].as_str().unwrap().parse().unwrap(),
        h["epoch"].as_str().unwrap().to_owned(),
    )
}

async fn a_socket_that_reconnects_elsewhere_gets_exactly_what_it_missed_then_live_frames(
    topology: Topology,
) {
    let cluster = Deployment::start(topology, 3).await;
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let api = Api::new(b);
    let s1 = api.create_session("alice", "laptop").await;
    let s2 = api.create_session("alice", "phone").await;
    let mut ws1 = WsClient::connect(a, &s1.token).await.unwrap();
    let mut ws2 = WsClient::connect(b, &s2.token).await.unwrap();
    let (t, epoch) = hello_point(&ws1);
    assert_eq!(hello_point(&ws2), (t, epoch.clone()));
    ws1.close_and_wait().await;

    // Missed by s1 (mixed user and session targets), and one for s2 alone.
    let mut sent = Vec::new();
    for (to, data) in [
        (json!({ "user": "alice" }), "m1"),
        (json!({ "session": s1.session_id }), "m2"),
        (json!({ "session": s2.session_id }), "x"),
        (json!({ "user": "alice" }), "m3"),
        (json!({ "session": s1.session_id }), "m4"),
        (json!({ "user": "alice" }), "m5"),
    ] {
        sent.push((data.to_owned(), publish(&api, to, data).await));
    }
    let offsets: Vec<u64> = sent.iter().map(|(_, o)| *o).collect();
    assert_eq!(offsets, (t + 1..=t + 6).collect::<Vec<_>>());
    let for_s1: Vec<(String, u64)> = sent.iter().filter(|(d, _)| d != "x").cloned().collect();

    let mut back = connect_with_query(c, &s1.token, &format!("since={t}&epoch={epoch}")).await;
    assert_eq!(back.hello["recovered"], true, "{}", back.hello);
    assert_eq!(back.hello["missed"], 5);
    assert_eq!(back.hello["offset"], (t + 6).to_string());
    assert_eq!(messages(&mut back, 5).await, for_s1);
    // Then live ones, right after.
    let live = publish(&Api::new(a), json!({ "user": "alice" }), "m6").await;
    assert_eq!(live, t + 7);
    assert_eq!(messages(&mut back, 1).await, [("m6".to_owned(), t + 7)]);

    // s2 never left: it got its own and the user's, live, with the same offsets.
    let want: Vec<(String, u64)> = sent
        .iter()
        .filter(|(d, _)| !matches!(d.as_str(), "m2" | "m4"))
        .cloned()
        .chain([("m6".to_owned(), t + 7)])
        .collect();
    assert_eq!(messages(&mut ws2, 5).await, want);
    // And a socket of s2 recovering from t sees none of s1's session messages.
    let mut again = connect_with_query(a, &s2.token, &format!("since={t}&epoch={epoch}")).await;
    assert_eq!(again.hello["missed"], 5);
    assert_eq!(messages(&mut again, 5).await, want);
}

sessionhub_tests::on_both_topologies!(
    a_socket_that_reconnects_elsewhere_gets_exactly_what_it_missed_then_live_frames,
);

#[tokio::test]
async fn recovery_fails_cleanly_once_the_gap_is_trimmed_and_when_history_is_off() {
    let cluster = TestCluster::start_with(2, &[("SESSIONHUB_HISTORY_SIZE", "2")]).await;
    let api = Api::new(&cluster.nodes[0]);
    let s = api.create_session("alice", "laptop").await;
    let ws = WsClient::connect(&cluster.nodes[0], &s.token)
        .await
        .unwrap();
    let (t, epoch) = hello_point(&ws);
    for d in ["m1", "m2", "m3"] {
        publish(&api, json!({ "user": "alice" }), d).await;
    }
    // m1 is trimmed: nothing old is sent, the client is told to reload.
    let mut back = connect_with_query(
        &cluster.nodes[1],
        &s.token,
        &format!("since={t}&epoch={epoch}"),
    )
    .await;
    assert_eq!(back.hello["recovered"], false, "{}", back.hello);
    assert!(back.hello.get("missed").is_none());
    publish(&api, json!({ "user": "alice" }), "m4").await;
    assert_eq!(messages(&mut back, 1).await[0].0, "m4");
    // Two are kept (m3, m4): from t + 2 the gap is whole, from t + 1 it is not.
    let mut back = connect_with_query(
        &cluster.nodes[1],
        &s.token,
        &format!("since={}&epoch={epoch}", t + 2),
    )
    .await;
    assert_eq!(back.hello["recovered"], true);
    let got: Vec<String> = messages(&mut back, 2)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(got, ["m3", "m4"]);
    let back = connect_with_query(
        &cluster.nodes[1],
        &s.token,
        &format!("since={}&epoch={epoch}", t + 1),
    )
    .await;
    assert_eq!(back.hello["recovered"], false);

    // A node with history off numbers nothing and recovers nothing.
    let mut opts = NodeOptions::numbered(2, &[("SESSIONHUB_HISTORY_SIZE", "0")]);
    opts.redis_url = Some(cluster.redis.url());
    let off = Node::start(opts).await;
    wait_ready(&off).await;
    let ws = connect_with_query(&off, &s.token, &format!("since={t}&epoch={epoch}")).await;
    assert!(ws.hello.get("epoch").is_none(), "{}", ws.hello);
    assert_eq!(ws.hello["recovered"], false);
}

#[tokio::test]
async fn bad_recovery_parameters_get_an_error_frame_and_a_working_socket() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("alice", "laptop").await;
    let (_, epoch) = hello_point(&WsClient::connect(node, &s.token).await.unwrap());
    for query in [
        format!("since=abc&epoch={epoch}"),
        format!("since=-1&epoch={epoch}"),
        format!("since=99999999999999999999999&epoch={epoch}"),
        "since=1".to_owned(),
        format!("epoch={epoch}"),
        format!("since=1&epoch={}", "e".repeat(65)),
        "since=1&epoch=%00%ff".to_owned(),
        "since=1&epoch=a&since=2".to_owned(),
    ] {
        let mut ws = connect_with_query(node, &s.token, &query).await;
        assert_eq!(ws.hello["recovered"], false, "{query}: {}", ws.hello);
        let err = ws.expect("error").await;
        assert_eq!(err["code"], "bad_recovery", "{query}: {err}");
        // The socket works: live messages arrive.
        publish(&api, json!({ "user": "alice" }), "live").await;
        assert_eq!(messages(&mut ws, 1).await[0].0, "live", "{query}");
    }
    // A well-formed request for an epoch the hub never gave: just not recovered.
    let mut ws = connect_with_query(node, &s.token, "since=1&epoch=nope").await;
    assert_eq!(ws.hello["recovered"], false);
    publish(&api, json!({ "user": "alice" }), "live").await;
    assert_eq!(ws.expect("message").await["data"], "live");
    assert_eq!(node.health().await["status"], "ok");
}

#[tokio::test]
async fn an_empty_redis_restart_starts_a_new_epoch() {
    let mut redis = RedisServer::start().await;
    let mut opts = NodeOptions::numbered(0, &[]);
    opts.redis_url = Some(redis.url());
    let node = Node::start(opts).await;
    wait_ready(&node).await;
    let api = Api::new(&node);
    let s = api.create_session("alice", "laptop").await;
    let ws = WsClient::connect(&node, &s.token).await.unwrap();
    let (t, epoch) = hello_point(&ws);
    publish(&api, json!({ "user": "alice" }), "m1").await;
    drop(ws);

    redis.stop().await;
    redis.start_again(true).await;
    wait_ready(&node).await;
    // Everything was lost, the session too; the user logs in again.
    let s = api.create_session("alice", "laptop").await;
    let ws = connect_with_query(&node, &s.token, &format!("since={}&epoch={epoch}", t + 1)).await;
    assert_eq!(ws.hello["recovered"], false, "{}", ws.hello);
    assert_ne!(ws.hello["epoch"], epoch.as_str());
}

/// A socket that stays open while its user's history numbering restarts (the
/// history's meta key expired, or Redis lost it) gets the messages numbered afresh:
/// their offsets are at or below the one it registered at, and it dropped them as
/// already sent from history, reporting them delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_socket_gets_messages_after_its_users_numbering_restarts() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("alice", "laptop").await;
    for data in ["a", "b", "c"] {
        publish(&api, json!({ "user": "alice" }), data).await;
    }
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    // The three messages (and the login's notice): the new numbering's first
    // offsets are at or below where the socket registered.
    assert!(hello_point(&ws).0 >= 3, "{}", ws.hello);

    let tag = &s.session_id[..2];
    let mut c = cluster.redis.conn().await;
    let gone: u64 = redis::cmd("DEL")
        .arg(format!("sh:{{{tag}}}:user:alice:history:meta"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(gone, 1);

    let mut sent = Vec::new();
    for data in ["x", "y", "z"] {
        sent.push((
            data.to_owned(),
            publish(&api, json!({ "user": "alice" }), data).await,
        ));
    }
    assert_eq!(sent.iter().map(|(_, o)| *o).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(messages(&mut ws, 3).await, sent);
}

/// Redis loses its newest history writes (it restarted from an AOF that was behind,
/// or failed over to a replica that was): here the last two offsets are removed by
/// hand and the node's link cut. The node's resync finds its socket holding offsets
/// Redis no longer knows: the user's numbering restarts (the lost offsets would
/// otherwise be given again to other frames, and a client recovering from one of
/// them would skip the new ones) and the socket is closed 1012 to recover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_lost_by_redis_restart_the_numbering_instead_of_being_reused() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("alice", "laptop").await;
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    let (_, epoch) = hello_point(&ws);
    let mut top = 0;
    for data in ["a", "b", "c"] {
        top = publish(&api, json!({ "user": "alice" }), data).await;
    }
    assert_eq!(messages(&mut ws, 3).await.last().unwrap().1, top);

    // The last two writes are lost.
    let tag = &s.session_id[..2];
    let hk = format!("sh:{{{tag}}}:user:alice:history");
    let mut c = cluster.redis.conn().await;
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(format!("{hk}:meta"))
        .arg("offset")
        .arg(top - 2)
        .cmd("XDEL")
        .arg(&hk)
        .arg(format!("{}-0", top - 1))
        .arg(format!("{top}-0"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(cluster.redis.kill_pubsub_clients().await >= 1);

    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 1012, "the socket holds offsets Redis lost");
    let next = publish(&api, json!({ "user": "alice" }), "d").await;
    assert_eq!(next, 1, "a new numbering, not offset {} again", top - 1);
    // Coming back from where it was, in the old numbering: not recoverable.
    let back = connect_with_query(node, &s.token, &format!("since={top}&epoch={epoch}")).await;
    assert_eq!(back.hello["recovered"], false, "{}", back.hello);
    assert_ne!(back.hello["epoch"], epoch.as_str());
}
