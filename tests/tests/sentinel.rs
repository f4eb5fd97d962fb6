//! Redis Sentinel with real processes: a master, a replica, three sentinels and
//! three nodes. The master is SIGKILLed while kills run through every node; the
//! sentinels promote the replica and the nodes follow it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sessionhub_tests::process::{NodeOptions, wait_ready};
use sessionhub_tests::sentinel::{MASTER_NAME, SentinelSet};
use sessionhub_tests::{API_KEY, Api, FAST_LEASE, Node, WsClient, wait_for};

/// Sessions made before the failover, each with a socket on another node than the
/// one that kills it.
const SESSIONS: usize = 60;
/// Pace of the kills (one every this long, round-robin over the nodes), so that they
/// run before, during and after the failover.
const KILL_PACE: Duration = Duration::from_millis(150);
/// Kills acknowledged before the master is killed.
const KILLS_BEFORE: usize = 8;
/// Bound from the SIGKILL to the sentinels naming the replica: down-after 1 s, then
/// an election and the promotion; generous for a loaded 2-core machine.
const PROMOTE_BOUND: Duration = Duration::from_secs(30);
/// Stated bound: every node is ready again within this of the sentinels naming the
/// new master.
const READY_BOUND: Duration = Duration::from_secs(10);

async fn ready(node: &Node) -> bool {
    reqwest::get(format!("{}/readyz", node.base))
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_the_new_master_and_acknowledged_kills_that_reached_the_replica_hold() {
    let mut set = SentinelSet::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut opts = NodeOptions::numbered(i, FAST_LEASE);
        opts.env.extend(set.env());
        let node = Node::start(opts).await;
        wait_ready(&node).await;
        nodes.push(node);
    }
    let apis: Vec<Api> = nodes.iter().map(Api::new).collect();

    let mut sessions = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..SESSIONS {
        let s = apis[i % 3]
            .create_session(&format!("user{i}"), "sentinel-test")
            .await;
        sockets.push(
            WsClient::connect(&nodes[(i + 1) % 3], &s.token)
                .await
                .unwrap(),
        );
        sessions.push(s);
    }

    // Kills run through every node, paced, while the master dies.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let killer = {
        let (apis, acked) = (apis.clone(), acked.clone());
        let sids: Vec<String> = sessions.iter().map(|s| s.session_id.clone()).collect();
        tokio::spawn(async move {
            let mut pace = tokio::time::interval(KILL_PACE);
            for (i, sid) in sids.iter().enumerate() {
                pace.tick().await;
                let res = apis[i % 3]
                    .request(Method::DELETE, &format!("/api/v1/sessions/{sid}"))
                    .bearer_auth(API_KEY)
                    .send()
                    .await;
                if res.is_ok_and(|r| r.status() == StatusCode::NO_CONTENT) {
                    acked.lock().unwrap().push(i);
                }
            }
        })
    };
    wait_for("the first kills", Duration::from_secs(10), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= KILLS_BEFORE).then_some(()) }
    })
    .await;
    set.master.kill();
    let killed_at = Instant::now();
    // While no master answers, the nodes are not ready (the subscriber's link to the
    // dead master ends at once; promotion takes at least down-after-milliseconds).
    for node in &nodes {
        wait_for(
            &format!("{} not ready without a master", node.id),
            PROMOTE_BOUND,
            || async move { (!ready(node).await).then_some(()) },
        )
        .await;
    }

    let replica_port = set.replica.port;
    wait_for(
        "the sentinels to promote the replica",
        PROMOTE_BOUND,
        || {
            let set = &set;
            async move { (set.named_master_port().await == Some(replica_port)).then_some(()) }
        },
    )
    .await;
    let promoted_at = Instant::now();
    for node in &nodes {
        wait_for(
            &format!("{} ready on the new master", node.id),
            READY_BOUND,
            || async move { ready(node).await.then_some(()) },
        )
        .await;
    }
    let all_ready = promoted_at.elapsed();
    killer.await.unwrap();
    let acked = acked.lock().unwrap().clone();

    // Which acknowledged kills reached the replica: their session is gone from it.
    let mut c = set.replica.conn().await;
    let mut lost = Vec::new();
    for &i in &acked {
        let sid = &sessions[i].session_id;
        let left: Vec<String> = redis::cmd("KEYS")
            .arg(format!("sh:*session:{sid}"))
            .query_async(&mut c)
            .await
            .unwrap();
        if !left.is_empty() {
            lost.push(i);
            continue;
        }
        for api in &apis {
            assert_eq!(
                api.me_status(&sessions[i].token).await,
                StatusCode::UNAUTHORIZED,
                "session {i}'s token is refused on every node"
            );
        }
        assert_eq!(
            sockets[i].expect_close().await.0,
            4001,
            "session {i}'s socket is closed as killed"
        );
    }
    eprintln!(
        "sentinel failover: {} of {SESSIONS} kills acknowledged, {} of them lost with the \
         old master (not yet replicated); promoted {:.1}s after the SIGKILL; all nodes \
         ready {:.1}s after the promotion",
        acked.len(),
        lost.len(),
        (promoted_at - killed_at).as_secs_f64(),
        all_ready.as_secs_f64()
    );

    // New logins work on every node, and their kills reach sockets elsewhere.
    for (i, api) in apis.iter().enumerate() {
        let s = api
            .create_session(&format!("after{i}"), "sentinel-test")
            .await;
        let mut ws = WsClient::connect(&nodes[(i + 1) % 3], &s.token)
            .await
            .unwrap();
        let res = api
            .service(
                Method::DELETE,
                &format!("/api/v1/sessions/{}", s.session_id),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::NO_CONTENT);
        assert_eq!(ws.expect_close().await.0, 4001);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_demotes_the_master_and_the_nodes_move_to_the_new_one() {
    let set = SentinelSet::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut opts = NodeOptions::numbered(i, FAST_LEASE);
        opts.env.extend(set.env());
        let node = Node::start(opts).await;
        wait_ready(&node).await;
        nodes.push(node);
    }
    let apis: Vec<Api> = nodes.iter().map(Api::new).collect();
    let mut sessions = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..6 {
        let s = apis[i % 3]
            .create_session(&format!("user{i}"), "sentinel-test")
            .await;
        sockets.push(
            WsClient::connect(&nodes[(i + 1) % 3], &s.token)
                .await
                .unwrap(),
        );
        sessions.push(s);
    }

    // The old master stays up, demoted to replica: writes to it answer READONLY.
    let mut c = set.sentinels[0].conn().await;
    let _: String = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER_NAME)
        .query_async(&mut c)
        .await
        .unwrap();
    let replica_port = set.replica.port;
    wait_for(
        "the sentinels to promote the replica",
        PROMOTE_BOUND,
        || {
            let set = &set;
            async move { (set.named_master_port().await == Some(replica_port)).then_some(()) }
        },
    )
    .await;
    let promoted_at = Instant::now();

    // The nodes follow the new master: their subscriptions leave the demoted one.
    // Until a node has followed, a write the old master took before its demotion is
    // lost with it, as the README says; from then on every kill holds.
    let old = set.master.url();
    wait_for(
        "no node subscribed on the demoted master",
        READY_BOUND,
        || {
            let old = old.clone();
            async move {
                let mut c = redis::Client::open(old)
                    .ok()?
                    .get_multiplexed_async_connection()
                    .await
                    .ok()?;
                let channels: Vec<String> = redis::cmd("PUBSUB")
                    .arg("CHANNELS")
                    .arg("sh:*")
                    .query_async(&mut c)
                    .await
                    .ok()?;
                channels.is_empty().then_some(())
            }
        },
    )
    .await;
    let followed = promoted_at.elapsed();

    // Every node writes to the new master: a kill through each node succeeds, ends
    // the session in the new master and closes its socket on another node.
    for (i, s) in sessions.iter().enumerate() {
        let api = &apis[i % 3];
        wait_for(
            "a kill through every node after the failover",
            READY_BOUND,
            || {
                let path = format!("/api/v1/sessions/{}", s.session_id);
                async move {
                    let res = api
                        .request(Method::DELETE, &path)
                        .bearer_auth(API_KEY)
                        .send()
                        .await
                        .ok()?;
                    (res.status() == StatusCode::NO_CONTENT).then_some(())
                }
            },
        )
        .await;
        assert_eq!(sockets[i].expect_close().await.0, 4001);
        for api in &apis {
            assert_eq!(api.me_status(&s.token).await, StatusCode::UNAUTHORIZED);
        }
    }
    for node in &nodes {
        wait_for(
            &format!("{} ready on the new master", node.id),
            READY_BOUND,
            || async move { ready(node).await.then_some(()) },
        )
        .await;
    }
    eprintln!(
        "planned sentinel failover: every node followed {:.1}s after the promotion; kills \
         through every node held; all nodes ready {:.1}s after the promotion",
        followed.as_secs_f64(),
        promoted_at.elapsed().as_secs_f64()
    );
}
