//! Indexes shrink back: after any churn (logins, sockets, groups, nodes that came
//! and went under fresh ids), an idle cluster's Redis holds a bounded set of keys,
//! checked by scanning the whole keyspace.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use sessionhub_tests::{Api, FAST_LEASE, RedisServer, TestCluster, WsClient};

/// Lease fields are forgotten ten lease lifetimes (FAST_LEASE: 1.5 s) after they
/// ran out; slack for a loaded machine on top.
const SHRINK_BOUND: Duration = Duration::from_secs(15 + 25);

async fn all_keys(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.conn().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.sort();
    keys
}

/// A redis-server with the function library loaded (no node), and a connection.
async fn redis_with_library() -> (RedisServer, redis::aio::MultiplexedConnection) {
    let redis = RedisServer::start().await;
    let mut c = redis.conn().await;
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(sessionhub_redis::LIBRARY)
        .query_async::<String>(&mut c)
        .await
        .unwrap();
    (redis, c)
}

async fn status(api: &Api, method: Method, path: &str) -> StatusCode {
    api.service(method, path, None).await.status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_returns_to_a_bounded_key_count_after_churn() {
    // Message history is data with a keep time: short here, so that the bound below
    // covers it (its keys go when their TTLs run out).
    let mut env = FAST_LEASE.to_vec();
    env.extend([
        ("SESSIONHUB_HISTORY_TTL_SECS", "5"),
        ("SESSIONHUB_HISTORY_META_TTL_SECS", "10"),
    ]);
    let cluster = TestCluster::start_on(RedisServer::start().await, 2, &env).await;
    let api = Api::new(&cluster.nodes[0]);

    // Groups: members by connection and by user, added, published to, removed or
    // gone with their sockets; users with several sessions and sockets on both nodes.
    for i in 0..24 {
        let user = format!("user{i}");
        let s1 = api.create_session(&user, "a").await;
        let s2 = api.create_session(&user, "b").await;
        let mut ws1 = WsClient::connect(&cluster.nodes[0], &s1.token)
            .await
            .unwrap();
        let mut ws2 = WsClient::connect(&cluster.nodes[1], &s2.token)
            .await
            .unwrap();
        let (g, h) = (format!("room-{i}"), format!("team-{i}"));
        let path = format!("/api/v1/groups/{g}/members/{}", ws1.connection_id());
        assert_eq!(
            status(&api, Method::PUT, &path).await,
            StatusCode::NO_CONTENT
        );
        let upath = format!("/api/v1/groups/{h}/members/user:{user}");
        assert_eq!(
            status(&api, Method::PUT, &upath).await,
            StatusCode::NO_CONTENT
        );
        for group in [&g, &h] {
            let res = api
                .service(
                    Method::POST,
                    "/api/v1/publish",
                    Some(json!({ "to": { "group": group }, "event": "e" })),
                )
                .await;
            assert_eq!(res.status(), StatusCode::ACCEPTED);
        }
        ws1.expect("message").await;
        ws1.expect("message").await;
        ws2.expect("message").await;
        assert_eq!(
            status(&api, Method::DELETE, &upath).await,
            StatusCode::NO_CONTENT
        );
        // The connection member goes with its socket; the sessions with a kill.
        ws1.close_and_wait().await;
        api.wait_no_connections(&s1.session_id, "the closed socket's record")
            .await;
        let res = api
            .service(
                Method::DELETE,
                &format!("/api/v1/users/{user}/sessions"),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(ws2.expect_close().await.0, 4001);
    }

    // Nodes that come and go under fresh ids, each after registering sockets.
    for i in 0..3 {
        let node = TestCluster::node(&cluster.redis, 10 + i, &env).await;
        let s = Api::new(&node).create_session("visitor", "x").await;
        let _ws = WsClient::connect(&node, &s.token).await.unwrap();
        node.signal("KILL");
        let res = api
            .service(Method::DELETE, "/api/v1/users/visitor/sessions", None)
            .await;
        assert_eq!(res.status(), StatusCode::OK);
    }

    // Idle: only the live nodes' lease set and their claim and status keys stay (one
    // each, gone with the lease), and the lifecycle event streams, which are bounded
    // by their cap, not by activity.
    let mut last = Vec::new();
    let settled = tokio::time::timeout(SHRINK_BOUND, async {
        loop {
            last = all_keys(&cluster.redis).await;
            last.retain(|k| !is_event_stream(k));
            if last
                == [
                    "sh:node-claim:node-a",
                    "sh:node-claim:node-b",
                    "sh:node-status:node-a",
                    "sh:node-status:node-b",
                    "sh:nodes",
                ]
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "after {SHRINK_BOUND:?} idle, {} keys remain: {:?}",
        last.len(),
        &last[..last.len().min(40)]
    );
    let mut c = cluster.redis.conn().await;
    let mut nodes: Vec<String> = redis::cmd("ZRANGE")
        .arg("sh:nodes")
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await
        .unwrap();
    // The set is ordered by lease expiry, i.e. by which node renewed last: compare
    // the members, not that order.
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"], "dead nodes are forgotten");
    for key in all_keys(&cluster.redis).await {
        if is_event_stream(&key) {
            let len: u64 = redis::cmd("XLEN")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            assert!(len <= EVENTS_CAP_SLACK, "{key} holds {len} entries");
        }
    }
}

/// A bucket's lifecycle event stream, `sh:{B}:events`.
fn is_event_stream(key: &str) -> bool {
    key.len() == "sh:{00}:events".len() && key.starts_with("sh:{") && key.ends_with("}:events")
}

/// Most entries an event stream may hold at the default cap (1000): `MAXLEN ~` trims
/// whole stream nodes (100 entries each by default), so it may run one node over.
const EVENTS_CAP_SLACK: u64 = 1000 + 100;

/// Commands Redis ran (those inside functions included) for one call of `f`, from
/// `INFO commandstats` around it. No node runs against this Redis, so nothing else
/// is counted.
async fn commands_for<F, Fut>(c: &mut redis::aio::MultiplexedConnection, f: F) -> u64
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(c)
        .await
        .unwrap();
    f().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_"))
        .filter(|l| !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_config"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logins_redis_cost_does_not_grow_with_the_users_sessions() {
    let (_redis, mut c) = redis_with_library().await;
    const CAP: usize = 300;
    let bucket = "3f";
    let mut n = 0usize;
    // One login of alice, as a node makes it (sh_create_session with the cap, no
    // deadline, the session_created frame and the default history).
    let login = |c: redis::aio::MultiplexedConnection, n: usize| async move {
        let mut c = c;
        let sid = format!("{bucket}{n:030x}");
        let now = sessionhub_core::time::now_ms() + n as i64;
        redis::cmd("FCALL")
            .arg("sh_create_session")
            .arg(2)
            .arg(format!("sh:{{{bucket}}}:session:{sid}"))
            .arg(format!("sh:{{{bucket}}}:user:alice:sessions"))
            .arg((
                "alice",
                "hash",
                "ua",
                "192.0.2.1",
                now,
                now + 3_600_000,
                1_800_000,
            ))
            .arg(CAP)
            .arg((
                "",
                r#"{"type":"session_created","session":{},"message":"m"}"#,
            ))
            .arg((100, 300_000, 86_400_000))
            .query_async::<i64>(&mut c)
            .await
            .unwrap();
    };
    let mut figures = Vec::new();
    for sessions in [1, 100, CAP] {
        while n < sessions {
            login(c.clone(), n).await;
            n += 1;
        }
        let conn = c.clone();
        let cost = commands_for(&mut c, || login(conn, n)).await;
        n += 1;
        figures.push((sessions, cost));
    }
    eprintln!("Redis commands for one login, by the user's sessions before it: {figures:?}");
    let (_, base) = figures[0];
    assert_eq!(
        figures[1].1, base,
        "100 sessions cost what 1 does: {figures:?}"
    );
    // At the cap the oldest session ends in the same call: a fixed extra.
    assert!(figures[2].1 <= base + 16, "at the cap: {figures:?}");
    let count: usize = redis::cmd("HLEN")
        .arg(format!("sh:{{{bucket}}}:user:alice:sessions"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(count, CAP, "the cap holds");
}

/// The bucket's lifecycle events as (type, fields) pairs, oldest first.
async fn events_of(redis: &RedisServer, bucket: &str) -> Vec<HashMap<String, String>> {
    let mut c = redis.conn().await;
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("sh:{{{bucket}}}:events"))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, flat)| {
            flat.chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect()
        })
        .collect()
}

async fn hkeys(c: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("HKEYS").arg(key).query_async(c).await.unwrap();
    keys.sort();
    keys
}

/// A kill drops each of the session's connections from every index it is in (the
/// node's, the user's, the online counts, its groups), whichever way the function
/// finds them: at once when every record is there, one by one when one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_drops_every_socket_of_the_session_from_every_index_on_three_nodes() {
    let cluster = TestCluster::start(3).await;
    let api = Api::new(&cluster.nodes[0]);
    let s1 = api.create_session("alice", "laptop").await;
    let s2 = api.create_session("alice", "phone").await;
    let b = s1.session_id[..2].to_owned();
    let mut w = Vec::new();
    for node in &cluster.nodes {
        w.push(WsClient::connect(node, &s1.token).await.unwrap());
    }
    let mut v = WsClient::connect(&cluster.nodes[1], &s2.token)
        .await
        .unwrap();
    let cids: Vec<String> = w.iter().map(|x| x.connection_id().to_owned()).collect();
    let vid = v.connection_id().to_owned();
    for path in [
        format!("/api/v1/groups/room/members/{}", cids[0]),
        format!("/api/v1/groups/room/members/{}", cids[1]),
        "/api/v1/groups/team/members/user:alice".to_owned(),
    ] {
        assert_eq!(
            status(&api, Method::PUT, &path).await,
            StatusCode::NO_CONTENT
        );
    }
    let before = events_of(&cluster.redis, &b).await.len();

    let kill = format!("/api/v1/sessions/{}", s1.session_id);
    assert_eq!(
        status(&Api::new(&cluster.nodes[2]), Method::DELETE, &kill).await,
        StatusCode::NO_CONTENT
    );
    // The kill is one atomic call: its answer means every index is updated.
    let mut c = cluster.redis.conn().await;
    for cid in &cids {
        for key in [
            format!("sh:{{{b}}}:conn:{cid}"),
            format!("sh:{{{b}}}:conn:{cid}:groups"),
        ] {
            let n: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            assert_eq!(n, 0, "{key} outlived the kill");
        }
    }
    let room: i64 = redis::cmd("EXISTS")
        .arg(format!("sh:{{{b}}}:group:room"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        room, 0,
        "the group's connection members went with their sockets"
    );
    assert_eq!(
        hkeys(&mut c, &format!("sh:{{{b}}}:group:team")).await,
        ["user:alice"],
        "a user member stays"
    );
    assert_eq!(
        hkeys(&mut c, &format!("sh:{{{b}}}:user:alice:conns")).await,
        [vid.as_str()]
    );
    let per_node: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("sh:{{{b}}}:user:alice:nodes"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        per_node,
        HashMap::from([(cluster.nodes[1].id.clone(), "1".to_owned())])
    );
    let online: String = redis::cmd("HGET")
        .arg(format!("sh:{{{b}}}:online:conns"))
        .arg("alice")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(online, "1");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let held = hkeys(&mut c, &format!("sh:{{{b}}}:node:{}:conns", node.id)).await;
        let want: Vec<String> = if i == 1 { vec![vid.clone()] } else { vec![] };
        assert_eq!(held, want, "{}'s index", node.id);
    }
    let events = events_of(&cluster.redis, &b).await;
    let kinds: Vec<&str> = events[before..]
        .iter()
        .map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "session.ended",
            "connection.closed",
            "connection.closed",
            "connection.closed"
        ],
        "alice keeps a socket, so no user.offline"
    );
    for e in &events[before + 1..] {
        let i = cids.iter().position(|c| *c == e["connection_id"]).unwrap();
        assert_eq!(e["node_id"], cluster.nodes[i].id);
        assert_eq!(e["session_id"], s1.session_id);
        assert_eq!(e["user_id"], "alice");
        assert_eq!(e["reason"], "session_ended");
    }
    for ws in &mut w {
        assert_eq!(ws.expect_close().await.0, 4001);
    }
    v.assert_alive().await;

    // A listed connection whose record an operator deleted: the kill reads the
    // records one by one, still tells that socket's node, and drops the other.
    let s3 = api.create_session("alice", "tablet").await;
    v.expect("session_created").await;
    let mut x0 = WsClient::connect(&cluster.nodes[0], &s3.token)
        .await
        .unwrap();
    let mut x2 = WsClient::connect(&cluster.nodes[2], &s3.token)
        .await
        .unwrap();
    let (x0id, x2id) = (x0.connection_id().to_owned(), x2.connection_id().to_owned());
    let _: i64 = redis::cmd("DEL")
        .arg(format!("sh:{{{b}}}:conn:{x0id}"))
        .query_async(&mut c)
        .await
        .unwrap();
    let before = events_of(&cluster.redis, &b).await.len();
    let kill = format!("/api/v1/sessions/{}", s3.session_id);
    assert_eq!(
        status(&api, Method::DELETE, &kill).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(x0.expect_close().await.0, 4001);
    assert_eq!(x2.expect_close().await.0, 4001);
    let n: i64 = redis::cmd("EXISTS")
        .arg(format!("sh:{{{b}}}:conn:{x2id}"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let events = events_of(&cluster.redis, &b).await;
    let closed: Vec<&str> = events[before..]
        .iter()
        .filter(|e| e["type"] == "connection.closed")
        .map(|e| e["connection_id"].as_str())
        .collect();
    assert_eq!(closed, [x2id.as_str()]);
    assert_eq!(
        hkeys(
            &mut c,
            &format!("sh:{{{b}}}:node:{}:conns", cluster.nodes[2].id)
        )
        .await,
        Vec::<String>::new()
    );
    v.assert_alive().await;
}

/// A function called wrongly (as only an operator's `FCALL` can) answers an error
/// and writes nothing: its arguments and keys are checked before its first write,
/// since a Redis function's writes are not undone by a later error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_called_wrongly_writes_nothing() {
    let (redis, mut c) = redis_with_library().await;
    let cid = "2bd806c9000000000000000000000000";
    let conn = format!("sh:{{2b}}:conn:{cid}");
    let _: i64 = redis::cmd("HSET")
        .arg(&conn)
        .arg("node_id")
        .arg("node-a")
        .query_async(&mut c)
        .await
        .unwrap();
    // A group add without the time.
    let err = redis::cmd("FCALL")
        .arg("sh_group_add")
        .arg(1)
        .arg("sh:{2b}:group:g")
        .arg(("conn", cid))
        .query_async::<i64>(&mut c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("BADARG"), "{err}");
    // A batch whose second key is not a target: the first is not published either.
    let err = redis::cmd("FCALL")
        .arg("sh_publish_batch")
        .arg(2)
        .arg("sh:{2b}:user:alice:sessions")
        .arg("sh:{2b}:online")
        .arg((0, 100, 300_000, 86_400_000))
        .arg((r#"{"type":"message","event":"e","data":1}"#, "{}"))
        .query_async::<redis::Value>(&mut c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("BADKEY"), "{err}");
    assert_eq!(all_keys(&redis).await, vec![conn]);
}
