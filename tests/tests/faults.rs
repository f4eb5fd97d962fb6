//! Fault injection against real processes: node crashes and pauses, lost pub/sub
//! links and messages, Redis restarts and outages, shutdown, slow clients. Each test
//! asserts a bound, not just "eventually".
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessionhub_tests::{
    Api, Created, FAST_LEASE, FAST_REAP_BOUND, Node, NodeOptions, RedisServer, TestCluster, WAIT,
    WsClient, wait_for,
};
use tokio::io::AsyncWriteExt;

/// Revalidation interval of FAST_LEASE plus slack for a loaded machine.
const REVALIDATE_BOUND: Duration = Duration::from_millis(1000 + 1500);

async fn kill(api: &Api, sid: &str) {
    let res = api
        .service(Method::DELETE, &format!("/api/v1/sessions/{sid}"), None)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}

/// Waits, within [`FAST_REAP_BOUND`], until session `sid` has no connection left: the
/// paused or killed `node` holding them was reaped.
async fn reaped(api: &Api, sid: &str, node: &str) {
    wait_for(&format!("{node} to be reaped"), FAST_REAP_BOUND, || async {
        api.connection_nodes(sid)
            .await
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
}

/// Reads until the socket closes; returns the close code and how long it took.
async fn closed_within(ws: &mut WsClient, started: Instant) -> (u16, Duration) {
    let (code, _) = ws.expect_close().await;
    (code, started.elapsed())
}

async fn redis_exists(redis: &RedisServer, key: &str) -> bool {
    let mut c = redis.conn().await;
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut c)
        .await
        .unwrap()
        == 1
}

/// A node's connection records, from its index in every bucket.
async fn node_records(redis: &RedisServer, node: &str) -> Vec<String> {
    let mut c = redis.conn().await;
    let mut pipe = redis::pipe();
    for b in 0..=255u8 {
        pipe.cmd("HKEYS")
            .arg(format!("sh:{{{b:02x}}}:node:{node}:conns"));
    }
    let per_bucket: Vec<Vec<String>> = pipe.query_async(&mut c).await.unwrap();
    per_bucket.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_records_are_reaped_and_its_sessions_can_still_be_killed() {
    let cluster = TestCluster::start_with(3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    // Three sessions, each with a socket on B (the victim) and one on A or C.
    let mut survivors = Vec::new();
    let mut sessions = Vec::new();
    for (i, user) in ["alice", "bob", "carol"].iter().enumerate() {
        let s = api.create_session(user, "test").await;
        let _on_b = WsClient::connect(&cluster.nodes[1], &s.token)
            .await
            .unwrap();
        std::mem::forget(_on_b); // its node dies with it; no clean close from here
        let other = if i % 2 == 0 { 0 } else { 2 };
        survivors.push(
            WsClient::connect(&cluster.nodes[other], &s.token)
                .await
                .unwrap(),
        );
        sessions.push(s);
    }
    cluster.nodes[1].signal("KILL");
    let started = Instant::now();
    for s in &sessions {
        let sid = s.session_id.clone();
        wait_for("B's records to be reaped", FAST_REAP_BOUND, || {
            let (api, sid) = (api.clone(), sid.clone());
            async move {
                let nodes = api.connection_nodes(&sid).await.unwrap();
                (!nodes.iter().any(|n| n == "node-b")).then_some(())
            }
        })
        .await;
    }
    assert!(started.elapsed() <= FAST_REAP_BOUND);
    assert!(node_records(&cluster.redis, "node-b").await.is_empty());
    let res = api.service(Method::GET, "/api/v1/presence", None).await;
    assert_eq!(res.json::<Value>().await.unwrap()["connections"], 3);

    for (s, ws) in sessions.iter().zip(survivors.iter_mut()) {
        kill(&Api::new(&cluster.nodes[2]), &s.session_id).await;
        assert_eq!(ws.expect_close().await.0, 4001);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_fences_itself_and_closes_a_session_killed_meanwhile() {
    let cluster = TestCluster::start_with(3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let victim = api.create_session("alice", "test").await;
    let keeper = api.create_session("bob", "test").await;
    let mut victim_on_b = WsClient::connect(&cluster.nodes[1], &victim.token)
        .await
        .unwrap();
    let mut keeper_on_b = WsClient::connect(&cluster.nodes[1], &keeper.token)
        .await
        .unwrap();
    let victim_cid = victim_on_b.connection_id().to_owned();

    cluster.nodes[1].signal("STOP");
    // Past its lease: the others reap its records.
    reaped(&api, &keeper.session_id, "B").await;
    kill(&api, &victim.session_id).await;
    // Upgrades that reach B while it is paused: registered under the lease it lost,
    // they are answered FENCED once it resumes, after (or while) it rejoins.
    let late: Vec<_> = (0..2)
        .map(|_| {
            let (url, token) = (cluster.nodes[1].ws_url(), keeper.token.clone());
            tokio::spawn(async move { WsClient::connect_url(&url, &token).await.map(drop) })
        })
        .collect();

    cluster.nodes[1].signal("CONT");
    let resumed = Instant::now();
    let (code, took) = closed_within(&mut victim_on_b, resumed).await;
    assert_eq!(code, 4001);
    assert!(
        took <= Duration::from_secs(1),
        "closed {took:?} after resuming"
    );

    // Nothing of the killed session was written back; the live one is re-registered.
    let tag = &victim.session_id[..2];
    assert!(!redis_exists(&cluster.redis, &format!("sh:{{{tag}}}:conn:{victim_cid}")).await);
    assert!(
        !redis_exists(
            &cluster.redis,
            &format!("sh:{{{tag}}}:session:{}", victim.session_id)
        )
        .await
    );
    wait_for("bob's socket on B to be re-registered", WAIT, || {
        let (api, sid) = (api.clone(), keeper.session_id.clone());
        async move { (api.connection_nodes(&sid).await.unwrap() == ["node-b"]).then_some(()) }
    })
    .await;
    for upgrade in late {
        let _ = upgrade.await.unwrap();
    }
    // One rejoin: a FENCED answer to a call made under the old lease does not make
    // B rejoin again (which dropped the records the first rejoin restored). Three
    // heartbeats for a second one to show.
    cluster.nodes[1]
        .wait_log("rejoined under a new lease", WAIT)
        .await;
    let rejoins = || {
        cluster.nodes[1]
            .log()
            .matches("rejoined under a new lease")
            .count()
    };
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(rejoins(), 1, "node-b rejoined again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut live = node_records(&cluster.redis, "node-b").await;
    live.retain(|c| c == keeper_on_b.connection_id());
    assert_eq!(live, [keeper_on_b.connection_id()]);
    keeper_on_b.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_during_a_pubsub_outage_still_close_their_sockets() {
    let cluster = TestCluster::start_with(3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let mut victims: Vec<(Created, WsClient)> = Vec::new();
    for (i, user) in ["alice", "bob", "carol", "dave"].iter().enumerate() {
        let s = api.create_session(user, "test").await;
        let ws = WsClient::connect(&cluster.nodes[i % 3], &s.token)
            .await
            .unwrap();
        victims.push((s, ws));
    }
    let killed = cluster.redis.kill_pubsub_clients().await;
    assert!(killed >= 3, "every node's subscriber was cut ({killed})");
    let started = Instant::now();
    for (s, _) in &victims {
        kill(&api, &s.session_id).await;
    }
    for (_, ws) in &mut victims {
        let (code, took) = closed_within(ws, started).await;
        assert_eq!(code, 4001);
        assert!(took <= REVALIDATE_BOUND, "closed after {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_misses_a_kill_message_closes_the_socket_on_revalidation() {
    let redis = RedisServer::start().await;
    let node = TestCluster::node(&redis, 0, FAST_LEASE).await;
    let other = TestCluster::node(&redis, 1, FAST_LEASE).await;
    let api = Api::new(&other);
    let s = api.create_session("alice", "test").await;
    let mut ws = WsClient::connect(&node, &s.token).await.unwrap();

    // A kill whose pub/sub message is lost: the session's keys go, and no node hears
    // of it.
    let started = Instant::now();
    let key = format!("sh:{{{}}}:session:{}", &s.session_id[..2], s.session_id);
    let mut c = redis.conn().await;
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .arg(format!("{key}:conns"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    // Refused everywhere at once, whatever the nodes heard.
    for n in [&node, &other] {
        assert_eq!(
            Api::new(n).me_status(&s.token).await,
            StatusCode::UNAUTHORIZED
        );
    }
    let (code, took) = closed_within(&mut ws, started).await;
    assert_eq!(code, 4001);
    assert!(took <= REVALIDATE_BOUND, "closed after {took:?}");
}

async fn status_of_create(api: &Api) -> reqwest::Response {
    api.service(
        Method::POST,
        "/api/v1/sessions",
        Some(json!({ "user_id": "zoe" })),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_then_restart_with_aof_keeps_sessions_and_sockets() {
    let mut cluster =
        TestCluster::start_on(RedisServer::start_with(true).await, 3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let s = api.create_session("alice", "test").await;
    let mut sockets = Vec::new();
    for n in &cluster.nodes {
        sockets.push(WsClient::connect(n, &s.token).await.unwrap());
    }
    // Load: a publisher that keeps going through the outage.
    let load_api = Api::new(&cluster.nodes[1]);
    let load = tokio::spawn(async move {
        let mut accepted = 0;
        for _ in 0..400 {
            let res = load_api
                .service(
                    Method::POST,
                    "/api/v1/publish",
                    Some(json!({ "to": { "user": "bob" }, "event": "load" })),
                )
                .await;
            if res.status() == StatusCode::ACCEPTED {
                accepted += 1;
            }
        }
        accepted
    });

    cluster.redis.stop().await;
    // While Redis is down: unready, 503 with Retry-After, sockets open.
    for n in &cluster.nodes {
        let node_api = Api::new(n);
        let res = status_of_create(&node_api).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key("retry-after"));
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "unavailable");
        let ready = reqwest::get(format!("{}/readyz", n.base)).await.unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            reqwest::get(format!("{}/healthz", n.base))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
        match WsClient::connect(n, &s.token).await {
            Err(sessionhub_tests::WsError::Http(503)) => {}
            other => panic!("upgrade during the outage: {:?}", other.map(|_| ())),
        }
    }
    for ws in &mut sockets {
        ws.assert_alive().await;
    }

    cluster.redis.start_again(false).await;
    // The nodes recover on their own: records come back, everything works again.
    let sid = s.session_id.clone();
    wait_for("the connection records to come back", WAIT, || {
        let (api, sid) = (api.clone(), sid.clone());
        async move {
            let mut nodes = api.connection_nodes(&sid).await?;
            nodes.sort();
            (nodes == ["node-a", "node-b", "node-c"]).then_some(())
        }
    })
    .await;
    for n in &cluster.nodes {
        let url = format!("{}/readyz", n.base);
        wait_for("readiness", WAIT, || {
            let url = url.clone();
            async move {
                reqwest::get(&url)
                    .await
                    .ok()?
                    .status()
                    .is_success()
                    .then_some(())
            }
        })
        .await;
    }
    for ws in &mut sockets {
        ws.assert_alive().await;
    }
    assert_eq!(api.me_status(&s.token).await, StatusCode::OK);
    let fresh = api.create_session("alice", "after").await;
    for ws in &mut sockets {
        assert_eq!(
            ws.expect("session_created").await["session"]["session_id"],
            fresh.session_id.as_str()
        );
    }
    kill(&api, &s.session_id).await;
    for ws in &mut sockets {
        assert_eq!(ws.expect_close().await.0, 4001);
    }
    assert!(load.await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_closes_every_socket_and_refuses_every_token() {
    let mut cluster =
        TestCluster::start_on(RedisServer::start_with(true).await, 3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let mut all = Vec::new();
    for user in ["alice", "bob"] {
        let s = api.create_session(user, "test").await;
        for n in &cluster.nodes {
            all.push((
                s.token.clone(),
                WsClient::connect(n, &s.token).await.unwrap(),
            ));
        }
    }
    cluster.redis.stop().await;
    cluster.redis.start_again(true).await;
    let started = Instant::now();
    for (_, ws) in &mut all {
        let (code, took) = closed_within(ws, started).await;
        assert_eq!(code, 4001);
        assert!(took <= WAIT);
    }
    for (token, _) in &all {
        for n in &cluster.nodes {
            assert_eq!(Api::new(n).me_status(token).await, StatusCode::UNAUTHORIZED);
        }
    }
    // Every node is alive and serving.
    for n in &cluster.nodes {
        assert_eq!(n.health().await["status"], "ok");
        let s = Api::new(n).create_session("carol", "again").await;
        let mut ws = WsClient::connect(n, &s.token).await.unwrap();
        ws.assert_alive().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1001_removes_the_nodes_records_and_exits_in_time() {
    let mut cluster = TestCluster::start_with(3, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let mut on_b = Vec::new();
    for i in 0..40 {
        let s = api.create_session(&format!("user{i}"), "test").await;
        on_b.push(
            WsClient::connect(&cluster.nodes[1], &s.token)
                .await
                .unwrap(),
        );
        if i % 10 == 0 {
            // A socket of the same session on another node must survive.
            let mut keep = WsClient::connect(&cluster.nodes[2], &s.token)
                .await
                .unwrap();
            keep.assert_alive().await;
            std::mem::forget(keep);
        }
    }
    let started = Instant::now();
    cluster.nodes[1].signal("TERM");
    for ws in &mut on_b {
        assert_eq!(ws.expect_close().await.0, 1001);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), cluster.nodes[1].wait())
        .await
        .expect("the node must exit within 10 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() <= Duration::from_secs(10));
    assert!(node_records(&cluster.redis, "node-b").await.is_empty());
    assert_eq!(
        lease_of(&cluster.redis, "node-b").await,
        None,
        "the node's lease is gone"
    );
    let counts: Value = api
        .service(Method::GET, "/api/v1/presence", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        counts,
        json!({ "online_users": 4, "connections": 4, "nodes": 2 })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_1013_and_nobody_else_waits() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let slow_s = api.create_session("slow", "test").await;
    let good_s = api.create_session("good", "test").await;
    let mut slow = WsClient::connect(node, &slow_s.token).await.unwrap();
    let mut good = WsClient::connect(node, &good_s.token).await.unwrap();
    let big = "x".repeat(60 * 1024);
    let publish = |to: Value, data: Value| {
        let api = api.clone();
        async move {
            let res = api
                .service(
                    Method::POST,
                    "/api/v1/publish",
                    Some(json!({ "to": to, "event": "e", "data": data })),
                )
                .await;
            assert_eq!(res.status(), StatusCode::ACCEPTED);
        }
    };
    let mut i = 0;
    loop {
        // 20 large frames to the client that never reads, one small to the good one.
        for _ in 0..20 {
            publish(json!({ "user": "slow" }), json!(big)).await;
        }
        let sent = Instant::now();
        publish(json!({ "user": "good" }), json!(i)).await;
        let f = good.expect("message").await;
        assert_eq!(f["data"], i);
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "good client waited {:?}",
            sent.elapsed()
        );
        i += 1;
        if node.health().await["hub"]["slow_closes"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(i < 100, "the slow client was never closed");
    }
    // The slow client, reading again, finds the close after what was already queued.
    let (code, frames) = slow.expect_close().await;
    assert_eq!(code, 1013);
    assert!(!frames.is_empty());
    good.assert_alive().await;
}

/// A client that stops reading is closed within the pong timeout even while the
/// node waits to write to it (every send is bounded): before, its task waited in
/// that write for good, deaf to its own ping timeout, while its queue stayed under
/// the 1013 limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_within_the_pong_timeout() {
    let env = [
        ("SESSIONHUB_PING_INTERVAL_MS", "500"),
        ("SESSIONHUB_PONG_TIMEOUT_MS", "1500"),
    ];
    let cluster = TestCluster::start_with(1, &env).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let (s, _deaf) = deaf_client(node, &api).await;
    assert_eq!(node.health().await["hub"]["slow_closes"], 0);
    api.wait_no_connections(
        &s.session_id,
        "the client that stopped reading to be closed",
    )
    .await;
    assert_eq!(node.health().await["hub"]["sockets"], 0);
}

/// A socket on `node` whose client never reads (a 4 KiB window), sent far more than
/// TCP and actix-ws take: the node's writes to it wait. 150 frames of 60 KiB, under
/// the 256 that close a socket with 1013 when its queue overflows.
async fn deaf_client(node: &Node, api: &Api) -> (Created, tokio::net::TcpStream) {
    let s = api.create_session("deaf", "test").await;
    let deaf = sessionhub_tests::raw_upgrade(node, &s.token, Some(4096)).await;
    let big = "x".repeat(60 * 1024);
    for _ in 0..150 {
        let res = api
            .service(
                Method::POST,
                "/api/v1/publish",
                Some(json!({ "to": { "session": s.session_id }, "event": "e", "data": big })),
            )
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    (s, deaf)
}

/// Clients that reset the connection while their socket registers leave nothing in
/// the node's hub or in Redis: actix drops the upgrade's handler mid-call then, and
/// the socket stayed listed (counted in `/healthz` and `/metrics`, queued for by
/// broadcasts) for good, its record until reconciliation (refusing the session's
/// next sockets with 429 meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_reset_while_registering_leave_no_socket_in_the_hub() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("flaky", "test").await;
    let addr: std::net::SocketAddr = node.base.trim_start_matches("http://").parse().unwrap();
    let head = sessionhub_tests::upgrade_head(&addr.to_string(), &s.token);
    for i in 0..300u64 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Closing with a zero linger sends a reset instead of a FIN.
        socket.set_zero_linger().unwrap();
        let mut tcp = socket.connect(addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        // Spread over the registration's time: 0 to ~3 ms after the request.
        tokio::time::sleep(Duration::from_micros(i * 397 % 3000)).await;
        drop(tcp);
    }
    wait_for("the hub to hold no socket", WAIT, || async {
        (node.health().await["hub"]["sockets"] == 0).then_some(())
    })
    .await;
    // Nor in Redis: a registration whose handler was dropped may still have run,
    // and its record would count against the session's 32 sockets.
    // Well before reconciliation (~10 s here) would find them.
    wait_for(
        "the reset upgrades' records to go",
        Duration::from_secs(5),
        || async {
            api.connection_nodes(&s.session_id)
                .await
                .is_some_and(|n| n.is_empty())
                .then_some(())
        },
    )
    .await;
    // The node still serves the session.
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    ws.assert_alive().await;
}

/// A node that leaves while one of its heartbeats waits in a paused Redis leaves no
/// lease behind: the heartbeat lands first and extended the lease past what the
/// node then removed, so it stayed listed (and counted) until reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaving_while_a_heartbeat_waits_in_redis_leaves_no_lease() {
    let mut cluster = TestCluster::start_with(2, FAST_LEASE).await;
    cluster.redis.signal("STOP");
    // Longer than the heartbeat (500 ms): node-b's next one is sent into the pause.
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.nodes[1].signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.redis.signal("CONT");
    let status = tokio::time::timeout(Duration::from_secs(15), cluster.nodes[1].wait())
        .await
        .expect("the node must exit");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        lease_of(&cluster.redis, "node-b").await,
        None,
        "the node's lease outlived it"
    );
}

/// A metric's value in the node's `/metrics`; panics if it has none.
async fn metric(node: &Node, name: &str) -> f64 {
    node.metric(name)
        .await
        .unwrap_or_else(|| panic!("no {name} in {}'s /metrics", node.id))
}

/// The node's lease in `sh:nodes`, if it has one.
async fn lease_of(redis: &RedisServer, node: &str) -> Option<f64> {
    let mut c = redis.conn().await;
    redis::cmd("ZSCORE")
        .arg("sh:nodes")
        .arg(node)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Every key of the test Redis matching `pattern`.
async fn redis_keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let mut c = redis.conn().await;
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_answered_503_during_a_redis_pause_have_no_later_effect() {
    let env = [("SESSIONHUB_MAX_SOCKETS_PER_SESSION", "4")];
    let cluster = TestCluster::start_on(RedisServer::start().await, 1, &env).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s0 = api.create_session("alice", "laptop").await;
    let s = api.create_session("alice", "phone").await;
    let mut watcher = WsClient::connect(node, &s0.token).await.unwrap();

    // Redis pauses longer than the command timeout (2 s) but shorter than a lease.
    cluster.redis.signal("STOP");
    let upgrades: Vec<_> = (0..12)
        .map(|_| {
            let url = node.ws_url();
            let token = s.token.clone();
            tokio::spawn(async move { WsClient::connect_url(&url, &token).await.map(drop) })
        })
        .collect();
    let create = tokio::spawn({
        let api = api.clone();
        async move {
            api.service(
                Method::POST,
                "/api/v1/sessions",
                Some(json!({ "user_id": "alice", "user_agent": "ghost" })),
            )
            .await
            .status()
        }
    });
    let kill = tokio::spawn({
        let api = api.clone();
        let sid = s0.session_id.clone();
        async move {
            api.service(Method::DELETE, &format!("/api/v1/sessions/{sid}"), None)
                .await
                .status()
        }
    });
    // A message and a batch to alice: neither may reach her socket or her history.
    let publishes: Vec<_> = [
        json!({ "to": { "user": "alice" }, "event": "ghost", "data": 1 }),
        json!([
            { "to": { "user": "alice" }, "event": "ghost", "data": 2 },
            { "to": { "session": &s0.session_id }, "event": "ghost", "data": 3 },
        ]),
    ]
    .into_iter()
    .map(|body| {
        let api = api.clone();
        tokio::spawn(async move {
            let res = api
                .service(Method::POST, "/api/v1/publish", Some(body))
                .await;
            let status = res.status();
            (status, res.text().await.unwrap_or_default())
        })
    })
    .collect();
    for u in upgrades {
        match u.await.unwrap() {
            Err(sessionhub_tests::WsError::Http(503)) => {}
            other => panic!("an upgrade during the pause: {other:?}"),
        }
    }
    assert_eq!(create.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(kill.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    for p in publishes {
        let (status, body) = p.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    // What the failed calls may have left waits in the node's clean-up queue, in
    // view on /metrics.
    let pending = metric(node, "sessionhub_cleanup_pending").await;
    assert!(
        pending >= 1.0,
        "clean-ups pending during the pause: {pending}"
    );
    let resumed = Instant::now();
    cluster.redis.signal("CONT");

    // No connection record of s survives the failed upgrades, within the stated
    // bound; the refused kill did not happen later; no phantom session was made.
    api.wait_no_connections(&s.session_id, "the failed upgrades' records to go")
        .await;
    wait_for("the clean-up queue to empty", WAIT, || async {
        (metric(node, "sessionhub_cleanup_pending").await == 0.0).then_some(())
    })
    .await;
    assert_eq!(metric(node, "sessionhub_cleanup_dropped_total").await, 0.0);
    assert!(
        resumed.elapsed() < Duration::from_secs(10),
        "{:?}",
        resumed.elapsed()
    );
    assert_eq!(redis_keys(&cluster.redis, "sh:{*}:conn:*").await.len(), 1);
    let res = api
        .service(Method::GET, "/api/v1/users/alice/sessions", None)
        .await;
    let sessions: Vec<Value> = res.json().await.unwrap();
    let mut ids: Vec<&str> = sessions
        .iter()
        .map(|x| x["session_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want = vec![s0.session_id.as_str(), s.session_id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "no session from the refused login, none killed");
    // The watcher saw no "You logged in to another session" for the refused login,
    // and none of the refused messages: the next message is the next offset.
    watcher.assert_alive().await;
    let res = api
        .publish(json!({ "user": "alice" }), "after", json!(4))
        .await;
    let next = watcher.expect("message").await;
    assert_eq!(next["event"], "after", "{next}");
    let top: u64 = watcher.hello["offset"].as_str().unwrap().parse().unwrap();
    assert_eq!(res["offset"], json!((top + 1).to_string()), "{res}");
    // The session is not locked out by its socket cap.
    for _ in 0..4 {
        let mut ws = WsClient::connect(node, &s.token).await.unwrap();
        ws.assert_alive().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_closed_while_redis_restarts_lose_their_records_when_it_is_back() {
    let mut cluster =
        TestCluster::start_on(RedisServer::start_with(true).await, 1, FAST_LEASE).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("alice", "test").await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(WsClient::connect(node, &s.token).await.unwrap());
    }
    let mut keep = WsClient::connect(node, &s.token).await.unwrap();
    cluster.redis.stop().await;
    // Closed while Redis is down: their unregistrations fail.
    for mut ws in sockets {
        ws.close_and_wait().await;
    }
    cluster.redis.start_again(false).await;
    // The AOF brought back their records; the node removes them again.
    wait_for("the closed sockets' records to go", WAIT, || async {
        let res = api
            .service(
                Method::GET,
                &format!("/api/v1/sessions/{}", s.session_id),
                None,
            )
            .await;
        let v: Value = res.json().await.ok()?;
        (v["connections"].as_array()?.len() == 1).then_some(())
    })
    .await;
    keep.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_node_does_not_hold_are_removed_by_reconciliation() {
    let cluster = TestCluster::start_on(RedisServer::start().await, 1, FAST_LEASE).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("alice", "test").await;
    let mut live = WsClient::connect(node, &s.token).await.unwrap();
    // A record of node-a for a socket it does not hold, a minute old, put in as the
    // node itself would (a late registration, or an AOF replay).
    let bucket = &s.session_id[..2];
    let ghost = format!("{}{}", &s.session_id[..8], "0123456789abcdef01234567");
    let mut c = cluster.redis.conn().await;
    let lease: f64 = redis::cmd("ZSCORE")
        .arg("sh:nodes")
        .arg("node-a")
        .query_async(&mut c)
        .await
        .unwrap();
    let now = sessionhub_core::time::now_ms();
    // In the form of a 0.2 node (in a rolling upgrade from 0.2 it calls the shared
    // library's plain names): still read, and answered as then.
    let gone: Vec<String> = redis::cmd("FCALL")
        .arg("sh_reassert")
        .arg(1)
        .arg(format!("sh:{{{bucket}}}:node:node-a:conns"))
        .arg(lease as i64)
        .arg(now)
        .arg(&ghost)
        .arg(&s.session_id)
        .arg("alice")
        .arg(now - 60_000)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(gone.is_empty());
    let conns = |api: Api, sid: String| async move {
        let res = api
            .service(Method::GET, &format!("/api/v1/sessions/{sid}"), None)
            .await;
        let v: Value = res.json().await.unwrap();
        v["connections"].as_array().unwrap().len()
    };
    assert_eq!(conns(api.clone(), s.session_id.clone()).await, 2);
    // Reconciliation runs every 2 revalidation intervals (FAST_LEASE: 1 s).
    let started = Instant::now();
    wait_for("the ghost record to go", WAIT, || {
        let (api, sid) = (api.clone(), s.session_id.clone());
        async move { (conns(api, sid).await == 1).then_some(()) }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2 + 3),
        "{:?}",
        started.elapsed()
    );
    assert!(!redis_exists(&cluster.redis, &format!("sh:{{{bucket}}}:conn:{ghost}")).await);
    live.assert_alive().await;
}

/// A node that falls behind its pub/sub messages (paused here; overloaded alike) is
/// not queued for without bound: Redis keeps at most its `client-output-buffer-limit
/// pubsub` for the subscriber, then drops the link, and the node subscribes again,
/// resyncs and serves as before. A socket that missed a recoverable message while
/// its node was not subscribed is closed with 1012 and gets it on reconnecting with
/// `since`; a socket that missed nothing stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_its_pubsub_messages_is_dropped_by_redis_and_subscribes_again() {
    let redis = RedisServer::start().await;
    let mut c = redis.conn().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("client-output-buffer-limit")
        .arg("pubsub 64kb 0 0")
        .query_async(&mut c)
        .await
        .unwrap();
    let slow = TestCluster::node(&redis, 0, &[]).await;
    let other = TestCluster::node(&redis, 1, &[]).await;
    let api = Api::new(&other);
    let s = api.create_session("alice", "test").await;
    let mut ws = WsClient::connect(&slow, &s.token).await.unwrap();
    let bob = api.create_session("bob", "test").await;
    let mut bob_ws = WsClient::connect(&slow, &bob.token).await.unwrap();
    let pubsub_clients = || async {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut redis.conn().await)
            .await
            .unwrap();
        list.lines().count()
    };
    assert_eq!(pubsub_clients().await, 2);

    // 16 MiB for the paused node's channel: more than the sockets' buffers (at
    // most 6 + 4 MiB on Linux) and the limit. Each is a message for a socket it does not hold (ignored when read).
    slow.pause().await;
    let payload = format!(
        "{{\"t\":\"message\",\"cids\":[\"{}\"]}}\n{{\"type\":\"message\",\"data\":\"{}\"}}",
        "0".repeat(32),
        "x".repeat(8 * 1024)
    );
    let channel = format!("sh:{{00}}:node:{}", slow.id);
    let mut pipe = redis::pipe();
    for _ in 0..2048 {
        pipe.cmd("PUBLISH").arg(&channel).arg(&payload).ignore();
    }
    let _: () = pipe.query_async(&mut c).await.unwrap();
    wait_for("Redis to drop the paused subscriber", WAIT, || async {
        (pubsub_clients().await == 1).then_some(())
    })
    .await;
    // Published while nobody listens for the paused node: in alice's history only.
    api.publish(json!({ "user": "alice" }), "unheard", json!(1))
        .await;
    slow.signal("CONT");
    let log = std::fs::read_to_string(redis.dir().join("redis.log")).unwrap();
    assert!(
        log.contains("scheduled to be closed ASAP for overcoming of output buffer limits"),
        "{log}"
    );

    slow.wait_log("resubscribed; resyncing", WAIT).await;
    wait_for("the node to subscribe again", WAIT, || async {
        (pubsub_clients().await == 2).then_some(())
    })
    .await;
    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 1012, "alice's socket missed a message");
    slow.wait_log("closed sockets that missed messages", WAIT)
        .await;
    let (since, epoch) = (
        ws.hello["offset"].as_str().unwrap().to_owned(),
        ws.hello["epoch"].as_str().unwrap().to_owned(),
    );
    let mut ws = WsClient::connect_url(
        &format!("{}?since={since}&epoch={epoch}", slow.ws_url()),
        &s.token,
    )
    .await
    .unwrap();
    assert_eq!(ws.hello["recovered"], true, "{}", ws.hello);
    assert_eq!(ws.hello["missed"], 1, "{}", ws.hello);
    assert_eq!(ws.expect("message").await["event"], "unheard");
    // Bob missed nothing: his socket stayed open.
    api.publish(json!({ "user": "bob" }), "still", json!(1))
        .await;
    assert_eq!(bob_ws.expect("message").await["event"], "still");
    let metrics = reqwest::get(format!("{}/metrics", slow.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sessionhub_missed_closes_total 1\n"),
        "{metrics}"
    );
    // The sockets are served: a message and a kill through the other node.
    api.publish(json!({ "user": "alice" }), "after", json!(1))
        .await;
    assert_eq!(ws.expect("message").await["event"], "after");
    kill(&api, &s.session_id).await;
    assert_eq!(ws.expect_close().await.0, 4001);
}

/// Options for another process under node id `id`, with [`FAST_LEASE`], on `redis`.
fn same_id(redis: &RedisServer, id: &str) -> NodeOptions {
    let mut opts = NodeOptions::numbered(0, FAST_LEASE);
    opts.node_id = id.to_owned();
    opts.redis_url = Some(redis.url());
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_under_a_running_nodes_id_refuses_to_start_and_harms_nothing() {
    let cluster = TestCluster::start_with(1, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let bob = api.create_session("bob", "test").await;
    let mut ws = WsClient::connect(&cluster.nodes[0], &bob.token)
        .await
        .unwrap();

    // Its claim is renewed: the second process gives up once it sees that, with
    // the reason.
    let started = Instant::now();
    let refused = Node::try_start(same_id(&cluster.redis, "node-a"))
        .await
        .err()
        .expect("a second node-a started beside the running one");
    let status = refused.status.expect("the second node-a did not exit");
    assert!(!status.success(), "{status:?}");
    assert!(
        refused
            .log
            .contains("node id node-a is in use by another running node"),
        "{}",
        refused.log
    );
    // It waited, and gave up once it saw the claim renewed: well before a crashed
    // run's claim would have lapsed twice.
    assert!(
        refused.log.contains("waiting for the claim to lapse"),
        "{}",
        refused.log
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        started.elapsed()
    );

    // The running node-a is untouched: its socket, its record, its lease.
    ws.assert_alive().await;
    assert_eq!(
        api.connection_nodes(&bob.session_id).await.unwrap(),
        ["node-a"]
    );
    let lease = lease_of(&cluster.redis, "node-a").await.unwrap();
    let redis = &cluster.redis;
    wait_for("node-a's lease to be renewed", WAIT, || async move {
        lease_of(redis, "node-a")
            .await
            .filter(|l| *l > lease)
            .map(drop)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_a_crash_takes_its_id_back_within_a_lease() {
    let mut cluster = TestCluster::start_with(1, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[0]);
    let bob = api.create_session("bob", "test").await;
    let _ws = WsClient::connect(&cluster.nodes[0], &bob.token)
        .await
        .unwrap();
    cluster.nodes[0].signal("KILL");
    cluster.nodes[0].wait().await;

    // The dead run's claim is still there; the new run waits for it to lapse.
    let restarted = Node::start(same_id(&cluster.redis, "node-a")).await;
    assert!(
        restarted.log().contains("waiting for the claim to lapse"),
        "{}",
        restarted.log()
    );
    let api = Api::new(&restarted);
    // The dead run's record went at start-up; the new run serves.
    assert_eq!(
        api.connection_nodes(&bob.session_id).await.unwrap(),
        Vec::<String>::new()
    );
    let mut ws = WsClient::connect(&restarted, &bob.token).await.unwrap();
    ws.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resuming_after_its_id_was_taken_stops_and_leaves_the_new_runs_records() {
    let mut cluster = TestCluster::start_with(2, FAST_LEASE).await;
    let api = Api::new(&cluster.nodes[1]);
    let alice = api.create_session("alice", "test").await;
    let bob = api.create_session("bob", "test").await;
    let mut alice_ws = WsClient::connect(&cluster.nodes[0], &alice.token)
        .await
        .unwrap();

    // node-a pauses past its lease; a new process takes the id meanwhile.
    cluster.nodes[0].pause().await;
    reaped(&api, &alice.session_id, "node-a").await;
    let successor = Node::start(same_id(&cluster.redis, "node-a")).await;
    let mut bob_ws = WsClient::connect(&successor, &bob.token).await.unwrap();
    let bob_cid = bob_ws.connection_id().to_owned();

    // The paused run resumes: it finds its id taken, and stops.
    cluster.nodes[0].signal("CONT");
    let status = tokio::time::timeout(WAIT, cluster.nodes[0].wait())
        .await
        .expect("the superseded node-a did not exit");
    assert!(!status.success(), "{status:?}");
    let log = cluster.nodes[0].log();
    assert!(
        log.contains("another process runs under this node's id"),
        "{log}"
    );
    let (code, _) = alice_ws.expect_close().await;
    assert_eq!(code, 1001);

    // The new run's record, lease and socket are all still there.
    let tag = &bob.session_id[..2];
    assert!(redis_exists(&cluster.redis, &format!("sh:{{{tag}}}:conn:{bob_cid}")).await);
    assert_eq!(
        api.connection_nodes(&bob.session_id).await.unwrap(),
        ["node-a"]
    );
    assert!(lease_of(&cluster.redis, "node-a").await.is_some());
    bob_ws.assert_alive().await;
}

/// Whether this machine has an established TCP connection to `port` on loopback
/// (from `/proc/net/tcp`: the remote address's port, state 01).
fn connected_to(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[2] == remote && f[3] == "01"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_refuses_connections_until_it_has_reached_redis() {
    let redis = RedisServer::start().await;
    redis.signal("STOP");
    let port = sessionhub_tests::process::free_port();
    let mut opts = NodeOptions::numbered(0, &[]);
    opts.redis_url = Some(redis.url());
    opts.env
        .push(("SESSIONHUB_LISTEN".into(), format!("127.0.0.1:{port}")));
    let starting = tokio::spawn(Node::try_start(opts));

    // The node has reached Redis's socket (the kernel took the connection; Redis,
    // paused, does not answer): its own port must refuse, so that a load balancer
    // tries another node at once rather than waiting on this one.
    wait_for("the node to connect to Redis", WAIT, || async {
        connected_to(redis.port()).then_some(())
    })
    .await;
    let refused = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert_eq!(
        refused.map(drop).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the node took connections before it could answer them"
    );

    redis.signal("CONT");
    let node = starting.await.unwrap().expect("the node did not start");
    assert_eq!(node.base, format!("http://127.0.0.1:{port}"));
    sessionhub_tests::process::wait_ready(&node).await;
}

/// Shutdown's worst case: a client that stopped reading (its socket cannot take its
/// close frame) and a Redis that does not answer (the node cannot leave). Each step
/// gives up in time, and the node exits within the README's 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_10_s_with_a_deaf_client_and_redis_paused() {
    let mut cluster = TestCluster::start(1).await;
    let api = Api::new(&cluster.nodes[0]);
    let (_, _deaf) = deaf_client(&cluster.nodes[0], &api).await;
    cluster.redis.signal("STOP");
    let started = Instant::now();
    cluster.nodes[0].signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), cluster.nodes[0].wait())
        .await
        .expect("the node did not exit within 30 s of SIGTERM");
    let took = started.elapsed();
    cluster.redis.signal("CONT");
    assert!(status.success(), "{status:?}");
    assert!(
        took <= Duration::from_secs(10),
        "exited {took:?} after SIGTERM"
    );
}
