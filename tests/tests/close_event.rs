//! What a standard WebSocket client sees when a socket closes: not only the close
//! frame, but its close event, which fires once the server has closed the TCP
//! connection (RFC 6455 §7.1.1: the server closes TCP first). A node that kept the
//! connection after the closing handshake made every browser and library see a kill
//! a second late.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use reqwest::Method;
use sessionhub_tests::{Api, TestCluster, WsClient};

/// The bound from the `session_ended` frame (or the client's close call) to
/// the close event.
const CLOSE_EVENT_BOUND: Duration = Duration::from_millis(50);

/// A socket of a new session of `user` on node A (`a`), whose session is then
/// killed through node B (`b`).
async fn killed_through_b(cluster: &TestCluster, a: &Api, b: &Api, user: &str) -> WsClient {
    let s = a.create_session(user, "laptop").await;
    let ws = WsClient::connect(&cluster.nodes[0], &s.token)
        .await
        .unwrap();
    let res = b
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_close_event_follows_the_close_frame_at_once() {
    let mut cluster = TestCluster::start(2).await;
    let [a, b] = [0, 1].map(|i| Api::new(&cluster.nodes[i]));

    // A kill through node B closes a socket on node A: 4001, then TCP closes.
    let mut ws = killed_through_b(&cluster, &a, &b, "alice").await;
    let ev = ws.expect_close_event().await;
    assert_eq!(ev.code, 4001);
    assert_eq!(ev.frames.last().unwrap()["type"], "session_ended");
    assert!(
        ev.after_last_frame < CLOSE_EVENT_BOUND,
        "close event {:?} after session_ended",
        ev.after_last_frame
    );

    // The close frame follows session_ended after a few milliseconds
    // (SESSION_ENDED_CLOSE_DELAY); a client that closes on the frame is answered at
    // once.
    let mut ws = killed_through_b(&cluster, &a, &b, "dave").await;
    assert_eq!(ws.expect("session_ended").await["reason"], "killed");
    let took = ws.close_and_wait().await;
    assert!(
        took < CLOSE_EVENT_BOUND,
        "close event {took:?} after close() on session_ended"
    );

    // The client closes: the server answers and closes TCP at once.
    let s = a.create_session("bob", "laptop").await;
    let mut ws = WsClient::connect(&cluster.nodes[0], &s.token)
        .await
        .unwrap();
    let took = ws.close_and_wait().await;
    assert!(
        took < CLOSE_EVENT_BOUND,
        "close event {took:?} after close()"
    );
    a.wait_no_connections(&s.session_id, "the closed socket's record to go")
        .await;

    // SIGTERM: 1001, then TCP closes, on every socket of the node.
    let s = a.create_session("carol", "laptop").await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(
            WsClient::connect(&cluster.nodes[1], &s.token)
                .await
                .unwrap(),
        );
    }
    cluster.nodes[1].signal("TERM");
    for ws in &mut sockets {
        let ev = ws.expect_close_event().await;
        assert_eq!(ev.code, 1001);
        assert!(
            ev.after_close_frame < CLOSE_EVENT_BOUND,
            "close event {:?} after the 1001 frame",
            ev.after_close_frame
        );
    }
    let status = cluster.nodes[1].wait().await;
    assert!(status.success(), "{status:?}");
}
