//! The cluster core, end to end: a real redis-server and three real node processes.
#![allow(clippy::unwrap_used, missing_docs)]

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessionhub_tests::{Api, Created, Deployment, Topology, WsClient, WsError};

/// alice: s1 with sockets on A and B; s2 created through C, with a socket on C.
struct Alice {
    cluster: Deployment,
    s1: Created,
    s2: Created,
    s1_on_a: WsClient,
    s1_on_b: WsClient,
    s2_on_c: WsClient,
}

impl Alice {
    fn api(&self, i: usize) -> Api {
        Api::new(&self.cluster.nodes[i])
    }
}

fn assert_session_created(frame: &Value, new: &Created) {
    assert_eq!(frame["type"], "session_created");
    assert_eq!(frame["session"]["session_id"], new.session_id.as_str());
    assert_eq!(frame["session"]["user_id"], "alice");
    assert_eq!(frame["session"]["user_agent"], "Chrome on phone");
    assert_eq!(frame["session"]["ip"], "192.0.2.7");
    assert_eq!(frame["message"], "You logged in to another session");
    let secret = new.token.split_once('.').unwrap().1;
    assert!(
        !frame.to_string().contains(secret),
        "the token must never reach other sessions"
    );
    assert!(frame["session"].get("token").is_none());
}

async fn alice(topology: Topology) -> Alice {
    let cluster = Deployment::start(topology, 3).await;
    let [a, b, c] = [0, 1, 2].map(|i| Api::new(&cluster.nodes[i]));
    let s1 = a.create_session("alice", "Firefox on laptop").await;
    let mut s1_on_a = WsClient::connect(&cluster.nodes[0], &s1.token)
        .await
        .unwrap();
    let mut s1_on_b = WsClient::connect(&cluster.nodes[1], &s1.token)
        .await
        .unwrap();
    assert_eq!(s1_on_a.hello["node_id"], "node-a");
    assert_eq!(s1_on_b.hello["node_id"], "node-b");
    assert_eq!(s1_on_a.hello["session_id"], s1.session_id.as_str());
    assert_eq!(s1_on_a.hello["user_id"], "alice");

    // hello means registered: the connections are visible from any node.
    let res = b
        .service(
            Method::GET,
            &format!("/api/v1/sessions/{}", s1.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let got: Value = res.json().await.unwrap();
    let mut nodes: Vec<&str> = got["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node_id"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);

    let s2 = c.create_session("alice", "Chrome on phone").await;
    for ws in [&mut s1_on_a, &mut s1_on_b] {
        let frame = ws.next_json().await;
        assert_session_created(&frame, &s2);
    }
    let s2_on_c = WsClient::connect(&cluster.nodes[2], &s2.token)
        .await
        .unwrap();
    drop((a, b, c));
    Alice {
        cluster,
        s1,
        s2,
        s1_on_a,
        s1_on_b,
        s2_on_c,
    }
}

/// After s1 was killed: its sockets got session_ended + 4001, its cookie is refused
/// everywhere, s2 lives on.
async fn assert_s1_killed(mut t: Alice) {
    for ws in [&mut t.s1_on_a, &mut t.s1_on_b] {
        let (code, frames) = ws.expect_close().await;
        assert_eq!(
            frames.len(),
            1,
            "exactly session_ended before the close: {frames:?}"
        );
        assert_eq!(frames[0]["type"], "session_ended");
        assert_eq!(frames[0]["session_id"], t.s1.session_id.as_str());
        assert_eq!(frames[0]["reason"], "killed");
        assert_eq!(code, 4001);
    }
    t.s2_on_c.assert_alive().await;
    for i in 0..3 {
        let api = t.api(i);
        assert_eq!(api.me_status(&t.s1.token).await, StatusCode::UNAUTHORIZED);
        assert_eq!(api.me_status(&t.s2.token).await, StatusCode::OK);
        match WsClient::connect(&t.cluster.nodes[i], &t.s1.token).await {
            Err(WsError::Http(401)) => {}
            Err(e) => panic!("upgrade with a killed session: expected 401, got {e:?}"),
            Ok(_) => panic!("upgrade with a killed session was accepted"),
        }
    }
    let res = t
        .api(0)
        .service(
            Method::GET,
            &format!("/api/v1/sessions/{}", t.s1.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

async fn new_session_notifies_every_connection_of_the_other_sessions(topology: Topology) {
    let mut t = alice(topology).await;
    // s2's own socket heard nothing about itself; s1's sockets nothing more.
    t.s2_on_c.assert_alive().await;
    t.s1_on_a.assert_alive().await;
    t.s1_on_b.assert_alive().await;

    let res = t
        .api(1)
        .me(Method::GET, "/api/v1/me/sessions", &t.s2.token)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let list: Vec<Value> = res.json().await.unwrap();
    assert_eq!(list.len(), 2);
    for s in &list {
        let is_s2 = s["session_id"] == t.s2.session_id.as_str();
        assert_eq!(s["current"], is_s2);
        assert!(s.get("secret_hash").is_none() && s.get("token").is_none());
    }
}

async fn kill_through_the_service_api_on_another_node(topology: Topology) {
    let t = alice(topology).await;
    let res = t
        .api(2)
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", t.s1.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_s1_killed(t).await;
}

async fn kill_through_the_self_service_api_with_the_other_sessions_cookie(topology: Topology) {
    let t = alice(topology).await;
    let path = format!("/api/v1/me/sessions/{}", t.s1.session_id);
    let res = t.api(2).me(Method::DELETE, &path, &t.s2.token).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_s1_killed(t).await;
}

async fn kill_through_the_other_sessions_socket(topology: Topology) {
    let mut t = alice(topology).await;
    t.s2_on_c
        .send(json!({ "type": "kill_session", "session_id": t.s1.session_id }))
        .await;
    assert_s1_killed(t).await;
}

async fn bob_cannot_end_alices_sessions(topology: Topology) {
    let mut t = alice(topology).await;
    let bob = t.api(0).create_session("bob", "curl").await;
    let mut bob_ws = WsClient::connect(&t.cluster.nodes[0], &bob.token)
        .await
        .unwrap();

    let path = format!("/api/v1/me/sessions/{}", t.s2.session_id);
    let res = t.api(1).me(Method::DELETE, &path, &bob.token).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: Value = res.json().await.unwrap();
    // Exactly what an unknown id gets: no hint that alice's session exists.
    let unknown = format!(
        "/api/v1/me/sessions/{}ffffffffffffffffffffffff",
        &t.s2.session_id[..8]
    );
    let res2 = t.api(1).me(Method::DELETE, &unknown, &bob.token).await;
    assert_eq!(res2.status(), StatusCode::NOT_FOUND);
    assert_eq!(body, res2.json::<Value>().await.unwrap());

    bob_ws
        .send(json!({ "type": "kill_session", "session_id": t.s2.session_id }))
        .await;
    let err = bob_ws.expect("error").await;
    assert_eq!(err["code"], "not_found");
    bob_ws.assert_alive().await;

    for i in 0..3 {
        assert_eq!(t.api(i).me_status(&t.s2.token).await, StatusCode::OK);
    }
    t.s2_on_c.assert_alive().await;
    t.s1_on_a.assert_alive().await;
}

async fn sign_out_all_other_sessions_and_kill_all_of_a_user(topology: Topology) {
    let mut t = alice(topology).await;
    let res = t
        .api(0)
        .me(Method::DELETE, "/api/v1/me/sessions", &t.s2.token)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({ "killed": 1 }));
    for ws in [&mut t.s1_on_a, &mut t.s1_on_b] {
        assert_eq!(ws.expect_close().await.0, 4001);
    }
    t.s2_on_c.assert_alive().await;

    let res = t
        .api(1)
        .service(Method::GET, "/api/v1/users/alice/sessions", None)
        .await;
    let list: Vec<Value> = res.json().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["connections"][0]["node_id"], "node-c");

    let res = t
        .api(1)
        .service(Method::DELETE, "/api/v1/users/alice/sessions", None)
        .await;
    assert_eq!(res.json::<Value>().await.unwrap(), json!({ "killed": 1 }));
    let (code, frames) = t.s2_on_c.expect_close().await;
    assert_eq!(
        (code, frames[0]["type"].as_str()),
        (4001, Some("session_ended"))
    );
    assert_eq!(
        t.api(2).me_status(&t.s2.token).await,
        StatusCode::UNAUTHORIZED
    );
}

async fn logout_ends_the_current_session(topology: Topology) {
    let mut t = alice(topology).await;
    let res = t
        .api(0)
        .me(Method::POST, "/api/v1/me/logout", &t.s1.token)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let cookie = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("sh_session=;"), "{cookie}");
    for ws in [&mut t.s1_on_a, &mut t.s1_on_b] {
        let (code, frames) = ws.expect_close().await;
        assert_eq!(code, 4001);
        assert_eq!(frames[0]["reason"], "logout");
    }
    assert_eq!(
        t.api(2).me_status(&t.s1.token).await,
        StatusCode::UNAUTHORIZED
    );
    t.s2_on_c.assert_alive().await;
}

sessionhub_tests::on_both_topologies!(
    new_session_notifies_every_connection_of_the_other_sessions,
    kill_through_the_service_api_on_another_node,
    kill_through_the_self_service_api_with_the_other_sessions_cookie,
    kill_through_the_other_sessions_socket,
    bob_cannot_end_alices_sessions,
    sign_out_all_other_sessions_and_kill_all_of_a_user,
    logout_ends_the_current_session,
);
