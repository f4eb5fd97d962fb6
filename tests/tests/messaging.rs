//! Targeted messaging, groups and presence across a real three-node cluster.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessionhub_tests::{
    Api, Deployment, FAST_LEASE, FAST_REAP_BOUND, Monitor, Node, Topology, WAIT, WsClient, wait_for,
};

async fn publish(api: &Api, to: Value, event: &str, data: Value) -> Value {
    let res = api
        .service(
            Method::POST,
            "/api/v1/publish",
            Some(json!({ "to": &to, "event": event, "data": data })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let mut res: Value = res.json().await.unwrap();
    // Messages to a user or a session join the user's history and say their offset.
    let recoverable = to.get("user").is_some() || to.get("session").is_some();
    let offset = res.as_object_mut().unwrap().remove("offset");
    match offset {
        Some(Value::String(o)) if recoverable => assert!(o.parse::<u64>().is_ok(), "{o}"),
        None if !recoverable => {}
        other => panic!("publish to {to} answered offset {other:?}"),
    }
    res
}

/// A user with one session and a socket on each of `nodes`.
async fn user_on(api: &Api, user: &str, nodes: &[&Node]) -> (String, Vec<WsClient>) {
    let s = api.create_session(user, "test").await;
    let mut sockets = Vec::new();
    for n in nodes {
        sockets.push(WsClient::connect(n, &s.token).await.unwrap());
    }
    (s.session_id, sockets)
}

/// Asserts the next frame is message `event`, and returns its data.
async fn expect_message(ws: &mut WsClient, event: &str) -> Value {
    let f = ws.expect("message").await;
    assert_eq!(f["event"], event, "{f}");
    f["data"].clone()
}

/// Broadcasts a marker and checks that it is the next frame on every socket: nothing
/// else (no duplicate, no stray message) arrived before it.
async fn assert_nothing_else(api: &Api, sockets: &mut [&mut WsClient]) {
    publish(api, json!("all"), "marker", json!(null)).await;
    for ws in sockets.iter_mut() {
        expect_message(ws, "marker").await;
    }
}

async fn message_events(node: &Node) -> u64 {
    node.health().await["hub"]["message_events"]
        .as_u64()
        .unwrap()
}

async fn a_users_sockets_on_two_nodes_get_a_message_published_through_a_third_exactly_once(
    topology: Topology,
) {
    let cluster = Deployment::start(topology, 3).await;
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let api_b = Api::new(b);
    let (_, mut alice) = user_on(&api_b, "alice", &[a, c]).await;
    let (_, mut bob) = user_on(&api_b, "bob", &[a, b, c]).await;

    let res = publish(
        &api_b,
        json!({ "user": "alice" }),
        "greeting",
        json!({ "text": "hi", "n": [1, 2] }),
    )
    .await;
    assert_eq!(res, json!({ "nodes": 2, "connections": 2 }));
    for ws in &mut alice {
        assert_eq!(
            expect_message(ws, "greeting").await,
            json!({ "text": "hi", "n": [1, 2] })
        );
    }
    let mut all: Vec<&mut WsClient> = alice.iter_mut().chain(bob.iter_mut()).collect();
    assert_nothing_else(&api_b, &mut all).await;
}

async fn session_connection_group_and_all_publishes_reach_exactly_their_sockets(
    topology: Topology,
) {
    let cluster = Deployment::start(topology, 3).await;
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let api = Api::new(a);
    // alice: s1 on A and B, s2 on C. bob: one socket on B.
    let (s1, mut s1_ws) = user_on(&api, "alice", &[a, b]).await;
    let s2 = api.create_session("alice", "phone").await;
    for ws in &mut s1_ws {
        ws.expect("session_created").await;
    }
    let mut s2_ws = WsClient::connect(c, &s2.token).await.unwrap();
    let (_, mut bob) = user_on(&api, "bob", &[b]).await;

    // Session.
    let res = publish(
        &Api::new(c),
        json!({ "session": s1 }),
        "to-session",
        json!(1),
    )
    .await;
    assert_eq!(res, json!({ "nodes": 2, "connections": 2 }));
    for ws in &mut s1_ws {
        expect_message(ws, "to-session").await;
    }
    // Connection: only s1's socket on B.
    let cid = s1_ws[1].connection_id().to_owned();
    let res = publish(&api, json!({ "connection": cid }), "to-conn", json!(2)).await;
    assert_eq!(res, json!({ "nodes": 1, "connections": 1 }));
    expect_message(&mut s1_ws[1], "to-conn").await;
    // Group: bob as a user, plus s1's socket on A.
    let g = "/api/v1/groups/team/members";
    let ok = |r: reqwest::Response| assert_eq!(r.status(), StatusCode::NO_CONTENT);
    ok(api
        .service(Method::PUT, &format!("{g}/user:bob"), None)
        .await);
    ok(api
        .service(
            Method::PUT,
            &format!("{g}/{}", s1_ws[0].connection_id()),
            None,
        )
        .await);
    let res = publish(
        &Api::new(b),
        json!({ "group": "team" }),
        "to-group",
        json!(3),
    )
    .await;
    assert_eq!(res, json!({ "nodes": 2, "connections": 2 }));
    expect_message(&mut s1_ws[0], "to-group").await;
    expect_message(&mut bob[0], "to-group").await;
    // All.
    let res = publish(&api, json!("all"), "to-all", json!(4)).await;
    assert_eq!(res["nodes"], 3);
    let mut every: Vec<&mut WsClient> = s1_ws
        .iter_mut()
        .chain(bob.iter_mut())
        .chain(std::iter::once(&mut s2_ws))
        .collect();
    for ws in every.iter_mut() {
        expect_message(ws, "to-all").await;
    }
    assert_nothing_else(&api, &mut every).await;
}

async fn a_targeted_publish_reaches_only_the_node_holding_the_user(topology: Topology) {
    let cluster = Deployment::start(topology, 3).await;
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let api = Api::new(b);
    let (_, mut alice) = user_on(&api, "alice", &[a]).await;
    let (_, _carol) = user_on(&api, "carol", &[b, c]).await;
    let before = [
        message_events(a).await,
        message_events(b).await,
        message_events(c).await,
    ];
    for i in 0..20 {
        publish(&api, json!({ "user": "alice" }), "only-a", json!(i)).await;
    }
    for i in 0..20 {
        assert_eq!(expect_message(&mut alice[0], "only-a").await, json!(i));
    }
    let after = [
        message_events(a).await,
        message_events(b).await,
        message_events(c).await,
    ];
    assert_eq!(after[0] - before[0], 20, "node A got each message once");
    assert_eq!(
        after[1], before[1],
        "node B must not receive alice's messages"
    );
    assert_eq!(
        after[2], before[2],
        "node C must not receive alice's messages"
    );
    // Redis agrees: each node listens on its own channels only.
    let b = &alice[0].connection_id()[..2];
    let channels: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("sh:{{{b}}}:node:node-{n}"))
        .collect();
    let numsub = cluster.numsub(&channels).await;
    assert_eq!(numsub, [1, 1, 1], "{channels:?}");
}

async fn a_thousand_messages_from_one_publisher_arrive_in_order(topology: Topology) {
    let cluster = Deployment::start(topology, 3).await;
    let api = Api::new(&cluster.nodes[1]);
    let (_, mut ws) = user_on(&api, "alice", &[&cluster.nodes[0]]).await;
    let cid = ws[0].connection_id().to_owned();
    let reader = tokio::spawn(async move {
        for i in 0..1000 {
            assert_eq!(
                expect_message(&mut ws[0], "seq").await,
                json!(i),
                "message {i}"
            );
        }
    });
    for i in 0..1000 {
        publish(&api, json!({ "connection": cid }), "seq", json!(i)).await;
    }
    reader.await.unwrap();
}

async fn oversized_and_malformed_publishes_are_refused_clearly(topology: Topology) {
    let cluster = Deployment::start(topology, 1).await;
    let api = Api::new(&cluster.nodes[0]);
    let big = "x".repeat(64 * 1024);
    let res = api
        .service(
            Method::POST,
            "/api/v1/publish",
            Some(json!({ "to": "all", "event": "e", "data": big })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let err: Value = res.json().await.unwrap();
    assert!(
        err["message"].as_str().unwrap().contains("limit is 65536"),
        "{err}"
    );
    let huge = "x".repeat(1024 * 1024);
    let res = api
        .service(
            Method::POST,
            "/api/v1/publish",
            Some(json!({ "to": "all", "event": "e", "data": huge })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    for body in [
        json!({ "to": "everyone", "event": "e" }),
        json!({ "to": { "user": "a", "group": "b" }, "event": "e" }),
        json!({ "to": { "planet": "mars" }, "event": "e" }),
        json!({ "to": "all", "event": "" }),
        json!({ "to": { "session": "nope" }, "event": "e" }),
    ] {
        let res = api
            .service(Method::POST, "/api/v1/publish", Some(body.clone()))
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
    }
    let res = api
        .service(
            Method::PUT,
            "/api/v1/groups/g/members/2bd806c9000000000000000000000000",
            None,
        )
        .await;
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "a connection that is not live"
    );
}

async fn online(api: &Api, after: Option<&str>, limit: usize) -> Value {
    let mut path = format!("/api/v1/users?online=true&limit={limit}");
    if let Some(a) = after {
        path.push_str(&format!("&after={a}"));
    }
    let res = api.service(Method::GET, &path, None).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json().await.unwrap()
}

async fn online_ids(api: &Api) -> Vec<String> {
    online(api, None, 1000).await["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn presence(api: &Api) -> Value {
    api.service(Method::GET, "/api/v1/presence", None)
        .await
        .json()
        .await
        .unwrap()
}

async fn presence_follows_connects_disconnects_and_a_killed_node(topology: Topology) {
    let cluster = Deployment::start_with(topology, 3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let (_, alice) = user_on(&api, "alice", &[&cluster.nodes[0], &cluster.nodes[1]]).await;
    let (_, bob) = user_on(&api, "bob", &[&cluster.nodes[2]]).await;
    let (_, mut carol) = user_on(&api, "carol", &[&cluster.nodes[1]]).await;
    assert_eq!(online_ids(&api).await, ["alice", "bob", "carol"]);
    let page = online(&api, None, 10).await;
    assert_eq!(
        page["users"][0],
        json!({ "user_id": "alice", "connections": 2 })
    );
    assert_eq!(
        presence(&api).await,
        json!({ "online_users": 3, "connections": 4, "nodes": 3 }),
        "alice counts once"
    );

    drop(carol.pop());
    wait_for("carol to go offline", WAIT, || {
        let api = api.clone();
        async move { (online_ids(&api).await == ["alice", "bob"]).then_some(()) }
    })
    .await;

    // kill -9 node C: bob vanishes within the reaping bound, alice stays.
    cluster.nodes[2].signal("KILL");
    let started = std::time::Instant::now();
    wait_for("node C's records to be reaped", FAST_REAP_BOUND, || {
        let api = api.clone();
        async move { (online_ids(&api).await == ["alice"]).then_some(()) }
    })
    .await;
    assert!(started.elapsed() <= FAST_REAP_BOUND);
    assert_eq!(
        presence(&api).await,
        json!({ "online_users": 1, "connections": 2, "nodes": 2 })
    );
    let res = api
        .service(Method::GET, "/api/v1/users/bob/sessions", None)
        .await;
    let sessions: Vec<Value> = res.json().await.unwrap();
    assert_eq!(
        sessions[0]["connections"],
        json!([]),
        "bob's record on C is gone"
    );
    drop((alice, bob));
}

async fn pagination_walks_2500_online_users_exactly_once(topology: Topology) {
    let cluster = Deployment::start(topology, 3).await;
    let apis: Vec<Api> = cluster.nodes.iter().map(Api::new).collect();
    let mut sockets = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..25 {
        let api = apis[chunk % 3].clone();
        let ws_urls: Vec<String> = cluster.nodes.iter().map(Node::ws_url).collect();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for i in 0..100 {
                let user = format!("user{:05}", chunk * 100 + i);
                let s = api.create_session(&user, "bulk").await;
                out.push(
                    WsClient::connect_url(&ws_urls[i % 3], &s.token)
                        .await
                        .unwrap(),
                );
            }
            out
        });
    }
    while let Some(r) = tasks.join_next().await {
        sockets.extend(r.unwrap());
    }
    assert_eq!(sockets.len(), 2500);

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = online(&apis[pages % 3], after.as_deref(), 300).await;
        pages += 1;
        for u in page["users"].as_array().unwrap() {
            seen.push(u["user_id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    let want: Vec<String> = (0..2500).map(|i| format!("user{i:05}")).collect();
    assert_eq!(seen, want, "every user exactly once, in order");
    assert_eq!(pages, 9);
    assert_eq!(presence(&apis[0]).await["online_users"], 2500);
}

async fn group_membership_follows_new_connections_and_vanishes_with_closed_ones(
    topology: Topology,
) {
    let cluster = Deployment::start(topology, 3).await;
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let api = Api::new(a);
    let g = "/api/v1/groups/ops/members";
    let (_, mut alice) = user_on(&api, "alice", &[a]).await;
    let (_, mut bob) = user_on(&api, "bob", &[b]).await;
    assert_eq!(
        api.service(Method::PUT, &format!("{g}/user:alice"), None)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    let bob_cid = bob[0].connection_id().to_owned();
    assert_eq!(
        api.service(Method::PUT, &format!("{g}/{bob_cid}"), None)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );

    // alice opens a new socket on C after joining: it is in the group too.
    let alice_s2 = api.create_session("alice", "tablet").await;
    alice[0].expect("session_created").await;
    let mut alice_c = WsClient::connect(c, &alice_s2.token).await.unwrap();
    let res = publish(&api, json!({ "group": "ops" }), "g1", json!(1)).await;
    assert_eq!(res, json!({ "nodes": 3, "connections": 3 }));
    expect_message(&mut alice[0], "g1").await;
    expect_message(&mut alice_c, "g1").await;
    expect_message(&mut bob[0], "g1").await;

    let members: Value = api
        .service(Method::GET, g, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        members["members"],
        json!([{ "connection_id": bob_cid }, { "user_id": "alice" }])
    );

    // bob's socket closes: its membership goes with it.
    drop(bob);
    wait_for("bob's membership to vanish", WAIT, || {
        let api = api.clone();
        async move {
            let m: Value = api
                .service(Method::GET, g, None)
                .await
                .json()
                .await
                .unwrap();
            (m["members"] == json!([{ "user_id": "alice" }])).then_some(())
        }
    })
    .await;
    let res = publish(&api, json!({ "group": "ops" }), "g2", json!(2)).await;
    assert_eq!(res, json!({ "nodes": 2, "connections": 2 }));

    // Removing the user stops delivery to all of alice's sockets.
    assert_eq!(
        api.service(Method::DELETE, &format!("{g}/user:alice"), None)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.service(Method::DELETE, &format!("{g}/user:alice"), None)
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
    let res = publish(&api, json!({ "group": "ops" }), "g3", json!(3)).await;
    assert_eq!(res, json!({ "nodes": 0, "connections": 0 }));
    expect_message(&mut alice[0], "g2").await;
    expect_message(&mut alice_c, "g2").await;
    assert_nothing_else(&api, &mut [&mut alice[0], &mut alice_c]).await;
}

/// A group's bucket index (`Pgroup:<g>:in_buckets`, no TTL) shrinks back: a refused
/// add (404, the connection is not live) writes nothing, and a bucket whose count
/// outlived its members (a socket closed between `sh_group_add` and the count's
/// `HINCRBY`, with a sweep in between) is forgotten by the node that added them.
async fn a_groups_bucket_index_keeps_no_bucket_without_members(topology: Topology) {
    let cluster = Deployment::start(topology, 1).await;
    let api = Api::new(&cluster.nodes[0]);
    let res = api
        .service(
            Method::PUT,
            "/api/v1/groups/ghost/members/2bd806c9000000000000000000000000",
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let ghost = "sh:group:ghost:in_buckets";
    let mut c = cluster.conn_for(ghost).await;
    let n: i64 = redis::cmd("EXISTS")
        .arg(ghost)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0, "a refused add wrote {ghost}");

    let (_, ws) = user_on(&api, "alice", &[&cluster.nodes[0]]).await;
    let cid = ws[0].connection_id().to_owned();
    let path = format!("/api/v1/groups/room/members/{cid}");
    assert_eq!(
        api.service(Method::PUT, &path, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let index = "sh:group:room:in_buckets";
    let mut c = cluster.conn_for(index).await;
    let buckets: Vec<String> = redis::cmd("HKEYS")
        .arg(index)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(buckets.len(), 1, "{buckets:?}");
    // The race's outcome: the member gone from its bucket with no `groups:emptied`
    // entry to tell the sweep, and the count still there.
    let members = format!("sh:{{{}}}:group:room", buckets[0]);
    let mut m = cluster.conn_for(&members).await;
    let _: i64 = redis::cmd("HDEL")
        .arg(&members)
        .arg(format!("conn:{cid}"))
        .query_async(&mut m)
        .await
        .unwrap();
    wait_for(
        "the node to forget the bucket left without members",
        Duration::from_secs(40),
        || {
            let mut c = c.clone();
            async move {
                let n: i64 = redis::cmd("EXISTS")
                    .arg(index)
                    .query_async(&mut c)
                    .await
                    .ok()?;
                (n == 0).then_some(())
            }
        },
    )
    .await;
}

async fn a_batch_publish_answers_in_order_and_refuses_bad_batches_whole(topology: Topology) {
    let cluster = Deployment::start(topology, 2).await;
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let api = Api::new(a);
    // Users in different buckets, one with sockets on both nodes.
    let (s_alice, mut alice) = user_on(&api, "alice", &[a, b]).await;
    let (_, mut bob) = user_on(&api, "bob", &[b]).await;
    let (_, mut carol) = user_on(&api, "carol", &[a]).await;
    let group = format!("/api/v1/groups/g/members/{}", carol[0].connection_id());
    assert_eq!(
        api.service(Method::PUT, &group, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let cid = bob[0].connection_id().to_owned();

    let mut batch = vec![
        json!({ "to": { "user": "alice" }, "event": "e", "data": 0 }),
        json!({ "to": { "user": "bob" }, "event": "e", "data": 1 }),
        json!({ "to": { "session": s_alice }, "event": "e", "data": 2 }),
        json!({ "to": { "connection": cid }, "event": "e", "data": 3 }),
        json!({ "to": { "group": "g" }, "event": "e", "data": 4 }),
        json!({ "to": { "user": "nobody" }, "event": "e", "data": 5 }),
    ];
    for i in 6..40 {
        batch.push(json!({ "to": { "user": "alice" }, "event": "e", "data": i }));
    }
    let res = api
        .service(Method::POST, "/api/v1/publish", Some(Value::Array(batch)))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let body: Value = res.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 40, "{body}");
    let counts: Vec<(u64, u64)> = results
        .iter()
        .map(|r| {
            (
                r["nodes"].as_u64().unwrap(),
                r["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        &counts[..6],
        [(2, 2), (1, 1), (2, 2), (1, 1), (1, 1), (0, 0)],
        "{body}"
    );
    // User and session messages are numbered; connection and group ones are not.
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.get("offset").is_some(), !matches!(i, 3 | 4), "{i}: {r}");
    }
    // alice's sockets get hers in the batch's order.
    for ws in &mut alice {
        let mut got = Vec::new();
        for _ in 0..36 {
            got.push(expect_message(ws, "e").await.as_u64().unwrap());
        }
        let want: Vec<u64> = [0, 2].into_iter().chain(6..40).collect();
        assert_eq!(got, want);
    }
    assert_eq!(expect_message(&mut bob[0], "e").await, 1);
    assert_eq!(expect_message(&mut bob[0], "e").await, 3);
    assert_eq!(expect_message(&mut carol[0], "e").await, 4);

    // One bad message refuses the whole batch, naming it, and nothing is sent.
    let bad = json!([
        { "to": { "user": "alice" }, "event": "e", "data": "not sent" },
        { "to": { "planet": "mars" }, "event": "e" },
    ]);
    let res = api
        .service(Method::POST, "/api/v1/publish", Some(bad))
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let err: Value = res.json().await.unwrap();
    assert!(
        err["message"].as_str().unwrap().starts_with("message 1:"),
        "{err}"
    );
    // More than 1,000: 413. None: nothing to do.
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({ "to": { "user": "alice" }, "event": "e" }))
        .collect();
    let res = api
        .service(Method::POST, "/api/v1/publish", Some(Value::Array(many)))
        .await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let res = api
        .service(Method::POST, "/api/v1/publish", Some(json!([])))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({ "results": [] }));
    let mut all: Vec<&mut WsClient> = alice
        .iter_mut()
        .chain(bob.iter_mut())
        .chain(carol.iter_mut())
        .collect();
    assert_nothing_else(&api, &mut all).await;
}

/// Publishes `n` messages `event` in one batch, message i to user i mod the number of
/// users, and checks the answer (one socket each) and that each user's socket gets
/// its own in order.
async fn round_robin_batch(
    api: &Api,
    users: &mut [(String, Vec<WsClient>)],
    n: usize,
    event: &str,
) {
    let batch: Vec<Value> = (0..n)
        .map(|i| json!({ "to": { "user": users[i % users.len()].0 }, "event": event, "data": i }))
        .collect();
    let res = api
        .service(Method::POST, "/api/v1/publish", Some(Value::Array(batch)))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let body: Value = res.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), n, "{body}");
    assert!(
        results
            .iter()
            .all(|r| r["nodes"] == 1 && r["connections"] == 1),
        "{body}"
    );
    let len = users.len();
    for (k, (_, sockets)) in users.iter_mut().enumerate() {
        for i in (k..n).step_by(len) {
            assert_eq!(expect_message(&mut sockets[0], event).await, i);
        }
    }
}

/// On one Redis a batch publish groups its user, session and connection targets into
/// calls of up to 64, whatever their buckets (on Redis Cluster a call's keys must
/// share a slot, so there it makes one per bucket): 150 messages to users of ten
/// buckets take three calls, and every socket gets its own in the batch's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_one_redis_takes_one_call_per_64_targets_of_any_buckets() {
    let cluster = Deployment::start(Topology::Single, 2).await;
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let sessionhub_tests::Store::Single(redis) = &cluster.store else {
        unreachable!()
    };
    let api = Api::new(a);
    // Ten users of ten different buckets, each with a socket on node b.
    let mut users = Vec::new();
    let mut buckets = std::collections::HashSet::new();
    let mut n = 0;
    while users.len() < 10 {
        let user = format!("batch-user-{n}");
        n += 1;
        let (sid, sockets) = user_on(&api, &user, &[b]).await;
        if buckets.insert(sid[..2].to_owned()) {
            users.push((user, sockets));
        }
    }
    let mut monitor = Monitor::attach(redis).await;

    round_robin_batch(&api, &mut users, 150, "e").await;
    let text = monitor.seen(redis, "end-of-batch").await;
    assert_eq!(
        text.matches("\"sh_publish_batch\"").count(),
        3,
        "150 targets, 64 a call: {text}"
    );

    // In a rolling upgrade a node of another release may load the shared library
    // last, here one that takes a batch's targets from one bucket only: this node
    // calls its own copy (`sessionhub_<version>`), so the batch still takes one call.
    let older = sessionhub_redis::LIBRARY.replacen(
        "local one_bucket = in_cluster()",
        "local one_bucket = true",
        1,
    );
    assert_ne!(older, sessionhub_redis::LIBRARY, "the bucket rule moved");
    let mut c = redis.conn().await;
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&older)
        .query_async::<String>(&mut c)
        .await
        .unwrap();
    round_robin_batch(&api, &mut users, 20, "f").await;
    let text = monitor.seen_raw(redis, "end-of-older-batch").await;
    let after = &text[text.find("end-of-batch").unwrap()..];
    let calls: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("\"FCALL\" \"sh_publish_batch"))
        .collect();
    assert_eq!(calls.len(), 1, "one call of the node's own copy: {after}");
    assert!(
        !calls[0].contains("\"sh_publish_batch\""),
        "the node calls its versioned name: {}",
        calls[0]
    );
    let mut all: Vec<&mut WsClient> = users.iter_mut().flat_map(|(_, s)| s.iter_mut()).collect();
    assert_nothing_else(&api, &mut all).await;
}

/// The MONITOR lines of `text` for `FCALL <function>`, each with the command the same
/// client sent just before it (MONITOR prints "<time> [<db> <client>] <command>").
fn calls_with_previous<'a>(text: &'a str, function: &str) -> Vec<(&'a str, Option<&'a str>)> {
    let lines: Vec<&str> = text.lines().collect();
    let client = |line: &'a str| {
        line.split(']')
            .next()
            .and_then(|h| h.split_whitespace().last())
    };
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !line.contains(&format!("\"FCALL\" \"{function}\"")) {
            continue;
        }
        let me = client(line);
        let previous = lines[..i]
            .iter()
            .rev()
            .find(|l| client(l) == me)
            .map(|l| l.split("] ").nth(1).unwrap_or(""));
        out.push((*line, previous));
    }
    out
}

/// On one Redis, a targeted publish made while no other call is under way goes out
/// after a PING in the same write, so that Redis writes the message to the other
/// nodes before the caller's answer (Redis writes its answers newest client first;
/// BENCHMARKS.md, "Other nodes first"). Kills, logins, batches and registrations go
/// alone. Every call still does its work: the sockets get their frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_nodes_publish_follows_a_ping_on_one_redis() {
    let cluster = Deployment::start(Topology::Single, 2).await;
    let [a, b] = [&cluster.nodes[0], &cluster.nodes[1]];
    let sessionhub_tests::Store::Single(redis) = &cluster.store else {
        unreachable!()
    };
    let api = Api::new(a);
    let mut monitor = Monitor::attach(redis).await;
    let (sid, mut sockets) = user_on(&api, "ping-first", &[b]).await;
    for i in 0..5 {
        publish(&api, json!({ "user": "ping-first" }), "one", json!(i)).await;
        assert_eq!(expect_message(&mut sockets[0], "one").await, i);
    }
    let batch = json!([{ "to": { "user": "ping-first" }, "event": "two", "data": 2 }]);
    let res = api
        .service(Method::POST, "/api/v1/publish", Some(batch))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(expect_message(&mut sockets[0], "two").await, 2);
    api.create_session("ping-first", "second device").await;
    sockets[0].expect("session_created").await;
    let res = api
        .service(Method::DELETE, &format!("/api/v1/sessions/{sid}"), None)
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    sockets[0].expect("session_ended").await;
    let text = monitor.seen(redis, "end-of-calls").await;
    // A background call of the node (its heartbeat, the sweep) may be under way at
    // the moment of one publish: that one goes alone.
    let publishes = calls_with_previous(&text, "sh_publish");
    assert_eq!(publishes.len(), 5, "{text}");
    assert!(
        publishes.iter().any(|(_, p)| *p == Some("\"PING\"")),
        "no publish after a PING: {text}"
    );
    for function in [
        "sh_create_session",
        "sh_publish_batch",
        "sh_kill_session",
        "sh_register_connection",
    ] {
        let calls = calls_with_previous(&text, function);
        assert!(!calls.is_empty(), "no {function} call: {text}");
        for (call, previous) in calls {
            assert_ne!(previous, Some("\"PING\""), "{function}: {call}");
        }
    }
}

sessionhub_tests::on_both_topologies!(
    a_users_sockets_on_two_nodes_get_a_message_published_through_a_third_exactly_once,
    session_connection_group_and_all_publishes_reach_exactly_their_sockets,
    a_targeted_publish_reaches_only_the_node_holding_the_user,
    a_thousand_messages_from_one_publisher_arrive_in_order,
    oversized_and_malformed_publishes_are_refused_clearly,
    presence_follows_connects_disconnects_and_a_killed_node,
    pagination_walks_2500_online_users_exactly_once,
    group_membership_follows_new_connections_and_vanishes_with_closed_ones,
    a_batch_publish_answers_in_order_and_refuses_bad_batches_whole,
    a_groups_bucket_index_keeps_no_bucket_without_members,
);

/// A message to a user finds its sockets through the user's connection index
/// (`{B}:user:<uid>:conns`), one read whatever the number of its sessions; a socket
/// missing from that index (recorded by a version before it, 0.2.0 in a rolling
/// upgrade, which counted it in `{B}:online:conns` only) is still reached, through
/// the user's sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_user_reaches_every_socket_of_every_session_exactly_once() {
    let cluster = Deployment::start(Topology::Single, 3).await;
    let [a, b, c] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let sessionhub_tests::Store::Single(redis) = &cluster.store else {
        unreachable!()
    };
    let api = Api::new(a);
    let (laptop, mut sockets) = user_on(&api, "carol", &[a, b]).await;
    for (i, n) in [b, c].into_iter().enumerate() {
        let (_, mut more) = user_on(&api, "carol", &[n]).await;
        // Each login tells the sockets already there.
        for ws in sockets.iter_mut() {
            ws.expect("session_created").await;
        }
        sockets.append(&mut more);
        assert_eq!(sockets.len(), 3 + i);
    }
    let res = publish(&api, json!({ "user": "carol" }), "one", json!(1)).await;
    assert_eq!(res, json!({ "nodes": 3, "connections": 4 }));
    for ws in sockets.iter_mut() {
        assert_eq!(expect_message(ws, "one").await, 1);
    }

    // The first socket (on node a) leaves the user's indexes that 0.2.0 did not
    // keep, as if a 0.2.0 node had recorded it: only the user's count of live
    // sockets says one is missing.
    let mut conn = redis.conn().await;
    let b_ = &laptop[..2];
    let removed: i64 = redis::cmd("HDEL")
        .arg(format!("sh:{{{b_}}}:user:carol:conns"))
        .arg(sockets[0].connection_id())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    // Node a holds only that socket of the user's.
    let removed: i64 = redis::cmd("HDEL")
        .arg(format!("sh:{{{b_}}}:user:carol:nodes"))
        .arg(&a.id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let res = publish(&api, json!({ "user": "carol" }), "two", json!(2)).await;
    assert_eq!(res, json!({ "nodes": 3, "connections": 4 }));
    for ws in sockets.iter_mut() {
        assert_eq!(expect_message(ws, "two").await, 2);
    }
    let mut all: Vec<&mut WsClient> = sockets.iter_mut().collect();
    assert_nothing_else(&api, &mut all).await;
}
