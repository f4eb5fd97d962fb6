//! The README's first command: one node on the embedded in-memory engine.
#![allow(clippy::unwrap_used, missing_docs)]

use reqwest::{Method, StatusCode};
use serde_json::Value;
use sessionhub_tests::{Api, Node, NodeOptions, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_on_the_memory_engine_does_the_whole_flow() {
    let node = Node::start(NodeOptions {
        node_id: "solo".into(),
        ..Default::default()
    })
    .await;
    let api = Api::new(&node);
    let health: Value = reqwest::get(format!("{}/healthz", node.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["engine"], "memory");
    let ready = reqwest::get(format!("{}/readyz", node.base)).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let s1 = api.create_session("alice", "Firefox on laptop").await;
    let mut ws1 = WsClient::connect(&node, &s1.token).await.unwrap();
    let mut ws1b = WsClient::connect(&node, &s1.token).await.unwrap();
    let s2 = api.create_session("alice", "Chrome on phone").await;
    for ws in [&mut ws1, &mut ws1b] {
        let f = ws.expect("session_created").await;
        assert_eq!(f["session"]["session_id"], s2.session_id.as_str());
    }
    let mut ws2 = WsClient::connect(&node, &s2.token).await.unwrap();

    let res = api.me(Method::GET, "/api/v1/me", &s2.token).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-sessionhub-user"], "alice");
    assert_eq!(
        res.headers()["x-sessionhub-session"],
        s2.session_id.as_str()
    );

    let path = format!("/api/v1/me/sessions/{}", s1.session_id);
    assert_eq!(
        api.me(Method::DELETE, &path, &s2.token).await.status(),
        StatusCode::NO_CONTENT
    );
    for ws in [&mut ws1, &mut ws1b] {
        let (code, frames) = ws.expect_close().await;
        assert_eq!(code, 4001);
        assert_eq!(frames[0]["type"], "session_ended");
    }
    assert_eq!(api.me_status(&s1.token).await, StatusCode::UNAUTHORIZED);
    ws2.assert_alive().await;
}

/// The scheduling policy of every thread of a process (`/proc/<pid>/task/*/stat`,
/// field 41: 0 SCHED_OTHER, 3 SCHED_BATCH).
fn thread_policies(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
        // The command name (field 2) is in parentheses and may hold spaces.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        out.push(
            after_name
                .split_whitespace()
                .nth(38)
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    out
}

/// A node's threads run under SCHED_BATCH unless SESSIONHUB_SCHED_BATCH=false: a
/// node woken by Redis does not preempt it halfway through writing an event to
/// every node (BENCHMARKS.md, "SCHED_BATCH").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_threads_run_under_sched_batch_unless_turned_off() {
    let node = Node::start(NodeOptions {
        node_id: "batch".into(),
        ..Default::default()
    })
    .await;
    let policies = thread_policies(node.pid().unwrap());
    assert!(policies.len() >= 2, "{policies:?}");
    assert!(policies.iter().all(|&p| p == 3), "{policies:?}");
    // The node serves as before.
    let s = Api::new(&node).create_session("alice", "a").await;
    WsClient::connect(&node, &s.token).await.unwrap();

    let node = Node::start(NodeOptions {
        node_id: "other".into(),
        env: vec![("SESSIONHUB_SCHED_BATCH".into(), "false".into())],
        ..Default::default()
    })
    .await;
    let policies = thread_policies(node.pid().unwrap());
    assert!(policies.iter().all(|&p| p == 0), "{policies:?}");
}

/// A node whose log nobody reads (a stopped terminal, a log collector that fell
/// behind: its stderr pipe fills) keeps serving: log lines wait in a bounded queue
/// for the log's own thread, and past it they are dropped and counted, never
/// written from the thread that serves every socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_log_nobody_reads_keeps_serving() {
    let node = Node::start(NodeOptions {
        node_id: "unread".into(),
        // Every request logs a few lines at debug.
        env: vec![("RUST_LOG".into(), "debug".into())],
        stderr_unread: true,
        ..Default::default()
    })
    .await;
    let api = Api::new(&node);
    let dropped = |api: Api| async move {
        let res = api.service(Method::GET, "/metrics", None).await;
        let text = res.text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("sessionhub_log_lines_dropped_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("sessionhub_log_lines_dropped_total in /metrics")
    };
    // Far more than the pipe (64 KiB) and the queue (16,384 lines) hold. A node
    // that wrote its log itself would stop answering after the first few hundred.
    let started = std::time::Instant::now();
    let mut round = 0;
    while dropped(api.clone()).await == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no log line dropped after {round} rounds of 500 logins"
        );
        let logins = (0..500).map(|i| {
            let api = api.clone();
            async move {
                let res = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    api.service(
                        Method::POST,
                        "/api/v1/sessions",
                        Some(serde_json::json!({ "user_id": format!("u{round}-{i}") })),
                    ),
                )
                .await
                .expect("the node stopped answering while its log was not read");
                assert_eq!(res.status(), StatusCode::CREATED);
            }
        });
        futures_util::StreamExt::collect::<Vec<()>>(futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(logins),
            32,
        ))
        .await;
        round += 1;
    }
    // And it still serves: a login and a socket.
    let s = api.create_session("alice", "a").await;
    WsClient::connect(&node, &s.token).await.unwrap();
}

/// A log that is not a terminal (a file here; a pipe to journald or a collector in
/// production) is plain text: no colour escape codes for a parser to trip on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_is_not_a_terminal_has_no_colour_codes() {
    let node = Node::start(NodeOptions {
        node_id: "plain-log".into(),
        ..Default::default()
    })
    .await;
    let s = Api::new(&node).create_session("alice", "test").await;
    let log = sessionhub_tests::wait_for("the session's log line", sessionhub_tests::WAIT, || {
        let log = node.log();
        let sid = s.session_id.clone();
        async move { log.contains(&sid).then_some(log) }
    })
    .await;
    assert!(log.contains("session created"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log}");
}
