//! Session lifecycle events (issue 17): the per-bucket Redis Streams the functions
//! write, and their signed webhook delivery, against real redis-server and node
//! processes and a real HTTP receiver that verifies every signature.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sessionhub_tests::webhook::{EVENT_WAIT, Receiver, webhook_env};
use sessionhub_tests::{Api, RedisServer, TestCluster, WAIT, WsClient, wait_for};

fn env_of(receiver: &Receiver, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = webhook_env(receiver);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

async fn cluster(n: usize, env: &[(String, String)]) -> TestCluster {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestCluster::start_with(n, &env).await
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the receiver has accepted events of `user` of all of `want` types
/// (in this order, possibly among others), and returns the user's events.
async fn wait_types(
    receiver: &Receiver,
    user: &str,
    want: &[&str],
    deadline: Duration,
) -> Vec<Value> {
    wait_for(&format!("{user}'s events {want:?}"), deadline, || async {
        let got = receiver.accepted_of(user);
        let t = types(&got);
        (t.len() >= want.len() && t.iter().map(String::as_str).eq(want.iter().copied()))
            .then_some(got)
    })
    .await
}

async fn stream_len(redis: &RedisServer, key: &str) -> i64 {
    let mut c = redis.conn().await;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_socket_kill_flow_on_three_nodes_delivers_every_event_type_in_order() {
    let receiver = Receiver::start().await;
    let cluster = cluster(3, &env_of(&receiver, &[])).await;
    let (a, b, c) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let s1 = Api::new(a)
        .create_session("alice", "Firefox on Linux")
        .await;
    let mut ws = WsClient::connect(b, &s1.token).await.unwrap();
    let cid = ws.connection_id().to_owned();
    let res = Api::new(c)
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s1.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 4001);

    let want = [
        "session.created",
        "connection.opened",
        "user.online",
        "session.ended",
        "connection.closed",
        "user.offline",
    ];
    let got = wait_types(&receiver, "alice", &want, WAIT).await;
    let created = &got[0];
    assert_eq!(created["session_id"], s1.session_id.as_str());
    assert_eq!(created["session"]["user_agent"], "Firefox on Linux");
    assert_eq!(created["session"]["session_id"], s1.session_id.as_str());
    assert_eq!(got[1]["connection_id"], cid.as_str());
    assert_eq!(got[1]["node_id"], b.id.as_str());
    assert_eq!(got[3]["reason"], "killed");
    assert_eq!(got[4]["reason"], "session_ended");
    assert_eq!(got[4]["connection_id"], cid.as_str());
    for e in &got {
        assert!(e["id"].as_str().unwrap().starts_with(&s1.session_id[..2]));
        assert!(e["at"].as_str().unwrap().ends_with('Z'));
    }
    let ids: HashSet<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), got.len(), "every event has its own id");
    // Never a token, nor its secret half, in a webhook body or in the stream.
    let secret = s1.token.split_once('.').unwrap().1;
    for r in receiver.received() {
        assert!(!r.body.contains(secret), "a webhook body holds the token");
    }
    let stream = format!("sh:{{{}}}:events", &s1.session_id[..2]);
    let dump = sessionhub_tests::secrets::dump_redis(&cluster.redis.url()).unwrap();
    assert!(!dump.contains(secret));
    // The same events are in the bucket's stream, for XREAD.
    assert!(stream_len(&cluster.redis, &stream).await >= want.len() as i64);
    // A closed socket whose record the kill removed writes no second closed event;
    // nothing else comes for alice.
    let before = receiver.accepted_of("alice").len();
    let s2 = Api::new(a).create_session("alice", "phone").await;
    wait_for("alice's next event", WAIT, || async {
        (receiver.accepted_of("alice").len() > before).then_some(())
    })
    .await;
    let after = receiver.accepted_of("alice");
    assert_eq!(after.len(), before + 1, "{:?}", types(&after));
    assert_eq!(after[before]["session_id"], s2.session_id.as_str());
    receiver.assert_all_signed();
    // Each event was delivered once here (no failures), by one node or another.
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for e in receiver.accepted() {
        *per_id
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_redis_cli_kill_produces_session_ended() {
    let receiver = Receiver::start().await;
    let cluster = cluster(2, &env_of(&receiver, &[])).await;
    let s = Api::new(&cluster.nodes[0])
        .create_session("olga", "laptop")
        .await;
    wait_types(&receiver, "olga", &["session.created"], WAIT).await;
    let key = format!("sh:{{{}}}:session:{}", &s.session_id[..2], s.session_id);
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &cluster.redis.port().to_string(),
            "FCALL",
            "sh_kill_session",
            "1",
            &key,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let got = wait_types(
        &receiver,
        "olga",
        &["session.created", "session.ended"],
        WAIT,
    )
    .await;
    assert_eq!(got[1]["reason"], "killed");
    assert_eq!(got[1]["session_id"], s.session_id.as_str());
    receiver.assert_all_signed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_three_times_gets_the_event_again_with_the_same_id() {
    let receiver = Receiver::start().await;
    let cluster = cluster(2, &env_of(&receiver, &[])).await;
    receiver.fail_next(3);
    let s = Api::new(&cluster.nodes[1])
        .create_session("rita", "laptop")
        .await;
    let got = wait_types(&receiver, "rita", &["session.created"], EVENT_WAIT).await;
    let id = got[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(got[0]["session_id"], s.session_id.as_str());
    let attempts: Vec<u16> = receiver
        .received()
        .iter()
        .filter(|r| r.events.iter().any(|e| e["id"] == id.as_str()))
        .map(|r| r.status)
        .collect();
    assert_eq!(
        attempts,
        [500, 500, 500, 200],
        "the same event, by id, each time"
    );
    receiver.assert_all_signed();
    // The failures are counted by the node(s) that retried.
    let mut failures = 0.0;
    for node in &cluster.nodes {
        let text = reqwest::get(format!("{}/metrics", node.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        failures += metric(&text, "sessionhub_webhook_failures_total");
    }
    assert!(failures >= 3.0, "failures counted: {failures}");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_the_receiver_is_down_loses_no_event() {
    let receiver = Receiver::start().await;
    receiver.set_down(true);
    let cluster = cluster(2, &env_of(&receiver, &[])).await;
    let users: Vec<String> = (0..20).map(|i| format!("user{i}")).collect();
    let mut sessions = HashSet::new();
    for (i, u) in users.iter().enumerate() {
        let node = &cluster.nodes[i % 2];
        sessions.insert(Api::new(node).create_session(u, "laptop").await.session_id);
    }
    // Wait until node-a holds undelivered batches (pending in the group).
    let c = cluster.redis.conn().await;
    let held_by_a = wait_for("node-a to hold pending events", WAIT, || {
        let mut c = c.clone();
        let sessions = sessions.clone();
        async move {
            let mut held = 0;
            for sid in &sessions {
                let key = format!("sh:{{{}}}:events", &sid[..2]);
                let pending: Value = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg("sessionhub-webhook")
                    .query_async::<redis::Value>(&mut c)
                    .await
                    .map(|v| Value::String(format!("{v:?}")))
                    .unwrap_or(Value::Null);
                if pending.as_str().is_some_and(|p| p.contains("node-a")) {
                    held += 1;
                }
            }
            (held > 0).then_some(held)
        }
    })
    .await;
    assert!(held_by_a > 0);
    let killed_at = Instant::now();
    cluster.nodes[0].signal("KILL");
    receiver.set_down(false);
    let delivered = wait_for(
        "every session.created after the kill",
        EVENT_WAIT,
        || async {
            let got: HashSet<String> = receiver
                .accepted()
                .iter()
                .filter(|e| e["type"] == "session.created")
                .map(|e| e["session_id"].as_str().unwrap().to_owned())
                .collect();
            (got == sessions).then_some(got)
        },
    )
    .await;
    assert_eq!(delivered.len(), users.len());
    eprintln!(
        "all events delivered {:?} after the SIGKILL",
        killed_at.elapsed()
    );
    // node-a's batches went out through node-b's takeover (XAUTOCLAIM).
    // node-b's log says so (its log thread writes the line a moment later).
    cluster.nodes[1]
        .wait_log("taking over pending lifecycle events", WAIT)
        .await;
    receiver.assert_all_signed();
    // And the dead node's consumer is forgotten once its buckets are idle: every
    // node start names a new one, and the groups' lists must not keep them all.
    let streams: HashSet<String> = sessions
        .iter()
        .map(|sid| format!("sh:{{{}}}:events", &sid[..2]))
        .collect();
    wait_for("node-a's consumers to be forgotten", EVENT_WAIT, || {
        let mut c = c.clone();
        let streams = streams.clone();
        async move {
            for key in &streams {
                let consumers: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(key)
                    .arg("sessionhub-webhook")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                let named_a = consumers.iter().any(|m| {
                    m.get("name")
                        .is_some_and(|n| matches!(n, redis::Value::BulkString(b) if b == b"node-a"))
                });
                if named_a {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_delivering_node_sends_redis_no_event_commands() {
    let receiver = Receiver::start().await;
    let cluster = cluster(1, &env_of(&receiver, &[])).await;
    let c = cluster.redis.conn().await;
    // Commands the delivery runs inside sh_events_take (Redis counts commands run
    // by functions too), and its acknowledgements.
    let delivery_calls = |c: redis::aio::MultiplexedConnection| async move {
        let mut c = c;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        stats
            .lines()
            .filter(|l| {
                [
                    "cmdstat_xpending:",
                    "cmdstat_xreadgroup:",
                    "cmdstat_xautoclaim:",
                    "cmdstat_xack:",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum::<u64>()
    };
    // The node looks at every bucket once at start-up (sh_events_take: one
    // XPENDING and one XREADGROUP each, nothing pending).
    wait_for("the start-up look at the 256 buckets", WAIT, || {
        let c = c.clone();
        async move { (delivery_calls(c).await >= 2 * 256).then_some(()) }
    })
    .await;
    let before = delivery_calls(c.clone()).await;
    // An idle period to measure, not a synchronisation: nothing may happen in it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = delivery_calls(c.clone()).await;
    assert_eq!(after - before, 0, "an idle deliverer polled Redis");
    // One change costs one look at its bucket.
    Api::new(&cluster.nodes[0])
        .create_session("ivan", "laptop")
        .await;
    wait_types(&receiver, "ivan", &["session.created"], WAIT).await;
    receiver.assert_all_signed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_cluster_every_event_is_written_on_its_buckets_shard_and_delivered() {
    use sessionhub_tests::{Deployment, Store, Topology};
    let receiver = Receiver::start().await;
    let env = env_of(&receiver, &[]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let d = Deployment::start_with(Topology::Cluster, 3, &env).await;
    let (a, b, c) = (&d.nodes[0], &d.nodes[1], &d.nodes[2]);
    let s = Api::new(a).create_session("carol", "laptop").await;
    let mut ws = WsClient::connect(b, &s.token).await.unwrap();
    let res = Api::new(c)
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(ws.expect_close().await.0, 4001);
    let want = [
        "session.created",
        "connection.opened",
        "user.online",
        "session.ended",
        "connection.closed",
        "user.offline",
    ];
    wait_types(&receiver, "carol", &want, WAIT).await;
    receiver.assert_all_signed();
    // The stream lives on the master that owns the user's bucket.
    let Store::Cluster(rc) = &d.store else {
        unreachable!()
    };
    let key = format!("sh:{{{}}}:events", &s.session_id[..2]);
    let master = rc.master_for_key(&key).await;
    let mut conn = rc.conn(master).await;
    let len: i64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(len >= want.len() as i64, "{key} on :{master} holds {len}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_hangs_slows_no_login_kill_or_message_and_times_out_into_a_retry() {
    const LOGINS: usize = 40;
    let receiver = Receiver::start().await;
    receiver.set_hang(true);
    let cluster = cluster(2, &env_of(&receiver, &[])).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    // Logins in many buckets, while every POST hangs (1 s timeout each).
    let started = Instant::now();
    let mut created = Vec::new();
    for i in 0..LOGINS {
        created.push(
            Api::new(&cluster.nodes[i % 2])
                .create_session(&format!("h{i}"), "x")
                .await,
        );
    }
    // Had a login waited for its event's POST (1 s timeout each), they would take
    // 40 s; half of that is a bound no loaded machine reaches otherwise.
    let logins = started.elapsed();
    assert!(
        logins < Duration::from_secs(LOGINS as u64 / 2),
        "{LOGINS} logins took {logins:?}"
    );
    wait_for("POSTs to hang", WAIT, || async {
        (receiver.hung() > 0).then_some(())
    })
    .await;
    // Sockets, messages and kills work as usual meanwhile.
    let s = Api::new(a).create_session("hank", "laptop").await;
    let mut ws = WsClient::connect(b, &s.token).await.unwrap();
    let res = Api::new(a)
        .service(
            Method::POST,
            "/api/v1/publish",
            Some(serde_json::json!({ "to": { "user": "hank" }, "event": "hello" })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(ws.expect("message").await["event"], "hello");
    let res = Api::new(a)
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(ws.expect_close().await.0, 4001);
    eprintln!(
        "40 logins, a socket, a message and a kill took {:?} with the receiver hanging",
        started.elapsed()
    );
    // The hung POSTs time out and are retried; once the receiver answers, every
    // event arrives, once per id among the accepted ones.
    wait_for("webhook timeouts counted", WAIT, || async {
        let mut failures = 0.0;
        for node in &cluster.nodes {
            let text = reqwest::get(format!("{}/metrics", node.base))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            failures += metric(&text, "sessionhub_webhook_failures_total");
        }
        (failures > 0.0).then_some(())
    })
    .await;
    receiver.set_hang(false);
    let want: HashSet<String> = created.iter().map(|c| c.session_id.clone()).collect();
    wait_for("every session.created", EVENT_WAIT, || async {
        let got: HashSet<String> = receiver
            .accepted()
            .iter()
            .filter(|e| e["type"] == "session.created")
            .map(|e| e["session_id"].as_str().unwrap().to_owned())
            .collect();
        want.is_subset(&got).then_some(())
    })
    .await;
    receiver.assert_all_signed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_the_max_age_are_dropped_counted_and_left_in_the_stream() {
    let receiver = Receiver::start().await;
    receiver.set_down(true);
    let cluster = cluster(
        1,
        &env_of(&receiver, &[("SESSIONHUB_WEBHOOK_MAX_AGE_SECS", "3")]),
    )
    .await;
    let node = &cluster.nodes[0];
    let s = Api::new(node).create_session("dora", "laptop").await;
    let dropped = wait_for("the event to be dropped", EVENT_WAIT, || async {
        let text = reqwest::get(format!("{}/metrics", node.base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let n = metric(&text, "sessionhub_webhook_dropped_total{cause=\"age\"}");
        (n >= 1.0).then_some(n)
    })
    .await;
    assert_eq!(dropped, 1.0);
    node.wait_log("older than SESSIONHUB_WEBHOOK_MAX_AGE_SECS", WAIT)
        .await;
    // The receiver comes back: the dropped event is not sent; a new one is.
    receiver.set_down(false);
    let s2 = Api::new(node).create_session("dora", "phone").await;
    let got = wait_types(&receiver, "dora", &["session.created"], WAIT).await;
    assert_eq!(got[0]["session_id"], s2.session_id.as_str());
    // The dropped one is still in the stream, acknowledged (nothing pending).
    let key = format!("sh:{{{}}}:events", &s.session_id[..2]);
    let mut c = cluster.redis.conn().await;
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        entries.iter().any(|(_, f)| f.contains(&s.session_id)),
        "the dropped event stays in {key}"
    );
    receiver.assert_all_signed();
}

/// A slow receiver and few POST slots: a batch is taken only once its node has a
/// slot for it. Taken first, batches waited for a slot past the claim bound, were
/// taken over by the other node and posted by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_waiting_behind_a_slow_receiver_are_not_taken_over_and_posted_twice() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(700));
    let env = env_of(&receiver, &[("SESSIONHUB_WEBHOOK_MAX_IN_FLIGHT", "1")]);
    let cluster = cluster(2, &env).await;
    let api = Api::new(&cluster.nodes[0]);
    let users: Vec<String> = (0..12).map(|i| format!("slow-{i}")).collect();
    for u in &users {
        api.create_session(u, "test").await;
    }
    for u in &users {
        wait_types(&receiver, u, &["session.created"], EVENT_WAIT).await;
    }
    let ids: Vec<String> = receiver
        .accepted()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "events posted twice: {ids:?}");
    receiver.assert_all_signed();
}

/// Events the stream's cap trims away while the receiver is down are counted as
/// dropped whether or not a node had read them: delivered plus counted is every
/// event written (only the batch a node held was counted; the unread ones
/// vanished without a count or a log line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_trimmed_before_any_node_read_them_are_counted() {
    let receiver = Receiver::start().await;
    receiver.set_down(true);
    let env = env_of(&receiver, &[("SESSIONHUB_EVENTS_MAXLEN", "10")]);
    let cluster = cluster(1, &env).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let first = api.create_session("flood", "0").await;
    for i in 1..150 {
        api.create_session("flood", &i.to_string()).await;
    }
    let key = format!("sh:{{{}}}:events", &first.session_id[..2]);
    let mut c = cluster.redis.conn().await;
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    let written: i64 = redis::from_redis_value_ref(&info["entries-added"]).unwrap();
    // 150 logins, and 50 sessions ended by the per-user cap of 100.
    assert_eq!(written, 200);

    receiver.set_down(false);
    wait_for("every event delivered or counted", EVENT_WAIT, || async {
        let trimmed = node
            .metric("sessionhub_webhook_dropped_total{cause=\"trimmed\"}")
            .await
            .unwrap_or(0.0);
        let delivered = receiver.accepted_of("flood").len() as f64;
        (delivered + trimmed == written as f64).then_some(())
    })
    .await;
    node.wait_log("trimmed from the stream before delivery", WAIT)
        .await;
}
