//! What only Redis Cluster shows: targeted events travel within the shard that owns
//! their bucket, and a master failover under load loses no acknowledged kill.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::json;
use sessionhub_core::UserId;
use sessionhub_tests::{
    Api, Created, Deployment, FAST_LEASE, RedisCluster, Store, Topology, WsClient, process,
};

fn cluster(d: &Deployment) -> &RedisCluster {
    match &d.store {
        Store::Cluster(c) => c,
        Store::Single(_) => unreachable!("these tests run on Redis Cluster"),
    }
}

/// The bucket (hash tag) of a user's keys.
fn bucket(user: &str) -> String {
    UserId::parse(user).unwrap().tag()[..2].to_owned()
}

/// The master that owns a user's bucket.
async fn owner(c: &RedisCluster, user: &str) -> u16 {
    c.master_for_slot(RedisCluster::key_slot(&format!(
        "sh:{{{}}}:x",
        bucket(user)
    )))
    .await
}

/// One user per master: `user-<i>` names whose buckets fall on each master.
async fn one_user_per_master(c: &RedisCluster) -> BTreeMap<u16, String> {
    let masters = c.masters().await;
    let mut found = BTreeMap::new();
    for i in 0.. {
        let user = format!("user-{i}");
        found.entry(owner(c, &user).await).or_insert(user);
        if found.len() == masters.len() {
            return found;
        }
    }
    unreachable!()
}

async fn spublish_per_master(c: &RedisCluster) -> BTreeMap<u16, u64> {
    c.command_calls_per_master("spublish")
        .await
        .into_iter()
        .collect()
}

async fn wait_ready(d: &Deployment) {
    for node in &d.nodes {
        process::wait_ready(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_publishes_travel_only_on_the_shard_that_owns_the_target() {
    // Heartbeats (whose probes go to every bucket channel) far apart, so that during
    // the measurement the only SPUBLISHes are the messages'.
    let quiet = [
        ("SESSIONHUB_LEASE_TTL_MS", "120000"),
        ("SESSIONHUB_HEARTBEAT_MS", "40000"),
    ];
    let d = Deployment::start_with(Topology::Cluster, 3, &quiet).await;
    let c = cluster(&d);
    wait_ready(&d).await;
    let api = Api::new(&d.nodes[0]);
    let users = one_user_per_master(c).await;
    assert_eq!(users.len(), 3);

    // Each user gets a socket on node-a and node-c.
    let mut sockets = BTreeMap::new();
    for (master, user) in &users {
        let s = api.create_session(user, "test").await;
        let mut pair = Vec::new();
        for n in [&d.nodes[0], &d.nodes[2]] {
            pair.push(WsClient::connect(n, &s.token).await.unwrap());
        }
        sockets.insert(*master, pair);
    }

    // Each node is subscribed to its channel of the bucket on the owning master.
    for (master, user) in &users {
        for node in ["node-a", "node-b", "node-c"] {
            let ch = format!("sh:{{{}}}:node:{node}", bucket(user));
            assert_eq!(c.shard_numsub(*master, &ch).await, 1, "{ch} on {master}");
        }
    }

    for (target, user) in &users {
        let before = spublish_per_master(c).await;
        for i in 0..10 {
            let res = api
                .service(
                    Method::POST,
                    "/api/v1/publish",
                    Some(json!({ "to": { "user": user }, "event": "e", "data": i })),
                )
                .await;
            assert_eq!(res.status(), StatusCode::ACCEPTED);
        }
        for ws in sockets.get_mut(target).unwrap() {
            for i in 0..10 {
                let f = ws.expect("message").await;
                assert_eq!(f["data"], i);
            }
        }
        let after = spublish_per_master(c).await;
        for (master, n) in &after {
            let delta = n - before.get(master).copied().unwrap_or(0);
            if master == target {
                // One SPUBLISH per publish per node holding a socket (A and C).
                assert_eq!(delta, 20, "{user}'s shard {master}");
            } else {
                assert_eq!(delta, 0, "shard {master} must not carry {user}'s messages");
            }
        }
    }
}

/// Kills a session, retrying while the cluster fails over. Ok once the kill is
/// acknowledged (204; or 404 after an unanswered attempt, which did reach Redis);
/// else the last answer.
async fn kill_acknowledged(api: &Api, sid: &str, deadline: Instant) -> Result<(), String> {
    let mut retried = false;
    let mut last = String::new();
    while Instant::now() < deadline {
        let res = api
            .request(Method::DELETE, &format!("/api/v1/sessions/{sid}"))
            .bearer_auth(sessionhub_tests::API_KEY)
            .send()
            .await;
        match res {
            Ok(r) if r.status() == StatusCode::NO_CONTENT => return Ok(()),
            Ok(r) if r.status() == StatusCode::NOT_FOUND && retried => return Ok(()),
            Ok(r) if r.status().is_server_error() => {
                retried = true;
                last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
            }
            Ok(r) => panic!("kill answered {}", r.status()),
            Err(e) => {
                retried = true;
                last = e.to_string();
            }
        }
        // Back off a little between attempts while the slot moves.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_under_load_loses_no_acknowledged_kill() {
    let d = Deployment::start_with(Topology::Cluster, 3, FAST_LEASE).await;
    let c = cluster(&d);
    wait_ready(&d).await;
    let apis: Vec<Api> = d.nodes.iter().map(Api::new).collect();

    // Sessions of many users (so every shard holds some), one socket each.
    const SESSIONS: usize = 300;
    const KILL_RATE: Duration = Duration::from_millis(10);
    let mut victims: Vec<(Created, WsClient)> = Vec::new();
    for i in 0..SESSIONS {
        let s = apis[i % 3]
            .create_session(&format!("load-{i}"), "test")
            .await;
        let ws = WsClient::connect(&d.nodes[(i + 1) % 3], &s.token)
            .await
            .unwrap();
        victims.push((s, ws));
    }
    let target = c.masters().await[0];

    // Kill sessions at a steady rate, through every node, while the master fails
    // over; keep going for a while after it has.
    let done = AtomicBool::new(false);
    let failover = async {
        let m = c.failover(target).await;
        done.store(true, Ordering::SeqCst);
        m
    };
    let kills = async {
        let mut acknowledged = Vec::new();
        let (mut before, mut after) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pace = tokio::time::interval(KILL_RATE);
        for (i, (s, _)) in victims.iter().enumerate().take(SESSIONS - 20) {
            pace.tick().await;
            let finished = done.load(Ordering::SeqCst);
            if finished && after >= 20 {
                break;
            }
            if let Err(e) = kill_acknowledged(&apis[i % 3], &s.session_id, deadline).await {
                panic!(
                    "kill of {} through {} never acknowledged: {e}\n{}",
                    s.session_id,
                    d.nodes[i % 3].id,
                    d.nodes[i % 3].log()
                );
            }
            acknowledged.push(i);
            if finished { after += 1 } else { before += 1 }
        }
        (acknowledged, before, after)
    };
    let (new_master, (acknowledged, before, after)) = tokio::join!(failover, kills);
    assert_ne!(new_master, target);
    assert!(
        before >= 3 && after >= 10,
        "the kills must span the failover ({before} before it completed, {after} after)"
    );
    let mut on_target = 0;
    for &i in &acknowledged {
        let key = format!("sh:{{{}}}:x", &victims[i].0.session_id[..2]);
        if c.master_for_slot(RedisCluster::key_slot(&key)).await == new_master {
            on_target += 1;
        }
    }
    assert!(
        on_target > 0,
        "some killed sessions lived on the failed-over shard"
    );
    eprintln!(
        "{} kills acknowledged ({before} before the failover completed, {after} after; \
         {on_target} on the failed-over shard)",
        acknowledged.len()
    );

    // Every acknowledged kill holds: the token is refused everywhere and the socket
    // closes 4001 within the resync bound.
    let bound = Duration::from_secs(10);
    let started = Instant::now();
    for &i in &acknowledged {
        let (s, ws) = &mut victims[i];
        let (code, _) = tokio::time::timeout(bound, ws.expect_close())
            .await
            .unwrap_or_else(|_| panic!("session {} still open after {bound:?}", s.session_id));
        assert_eq!(code, 4001, "session {}", s.session_id);
        for api in &apis {
            assert_eq!(api.me_status(&s.token).await, StatusCode::UNAUTHORIZED);
        }
    }
    assert!(started.elapsed() <= bound);
    // The nodes are ready again, and the sessions not killed are untouched.
    wait_ready(&d).await;
    let rebuilt: usize = d
        .nodes
        .iter()
        .map(|n| n.log().matches("reconnected afresh").count())
        .sum();
    eprintln!("cluster connections rebuilt after the failover: {rebuilt}");
    let killed = acknowledged.len();
    for (s, ws) in victims.iter_mut().skip(killed) {
        ws.assert_alive().await;
        assert_eq!(apis[0].me_status(&s.token).await, StatusCode::OK);
    }
}
