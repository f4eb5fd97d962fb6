//! Security rules, each through real nodes over real sockets: origins, cross-site
//! requests, cookies, lifetimes, limits, hostile input, and no token anywhere.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessionhub_tests::process::{Node, NodeOptions};
use sessionhub_tests::{
    Api, Monitor, RedisServer, TestCluster, WAIT, WsClient, WsError, raw_upgrade, secrets,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

async fn cluster_with(env: &[(&str, &str)]) -> (RedisServer, Node) {
    let redis = RedisServer::start().await;
    let node = TestCluster::node(&redis, 0, env).await;
    (redis, node)
}

fn cookie(token: &str) -> (&'static str, String) {
    ("Cookie", format!("sh_session={token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_need_an_allowed_origin() {
    let (_redis, node) =
        cluster_with(&[("SESSIONHUB_ALLOWED_ORIGINS", "https://app.example")]).await;
    let s = Api::new(&node).create_session("alice", "test").await;
    let with_origin = |o: &str| vec![cookie(&s.token), ("Origin", o.to_owned())];
    let mut ok = WsClient::connect_with(&node, &with_origin("https://app.example"))
        .await
        .unwrap();
    ok.assert_alive().await;
    for bad in [
        "https://evil.example",
        "https://app.example.evil",
        "http://app.example",
        "null",
    ] {
        match WsClient::connect_with(&node, &with_origin(bad)).await {
            Err(WsError::Http(403)) => {}
            other => panic!("origin {bad}: {:?}", other.map(|_| ())),
        }
    }
    // Forwarding headers from a client that is no trusted proxy do not make a
    // foreign origin the node's own.
    for (name, value) in [
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "host=evil.example"),
        ("Forwarded", "for=192.0.2.1;host=evil.example;proto=https"),
    ] {
        let mut headers = with_origin("https://evil.example");
        headers.push((name, value.to_owned()));
        match WsClient::connect_with(&node, &headers).await {
            Err(WsError::Http(403)) => {}
            other => panic!("{name}: {value}: {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_host_counts_from_a_trusted_proxy_only() {
    let (_redis, node) = cluster_with(&[("SESSIONHUB_TRUSTED_PROXIES", "127.0.0.1")]).await;
    let s = Api::new(&node).create_session("alice", "test").await;
    let headers = vec![
        cookie(&s.token),
        ("Origin", "https://hub.example".to_owned()),
        ("X-Forwarded-Host", "hub.example".to_owned()),
    ];
    // The test client is on 127.0.0.1, here a trusted proxy: its word counts.
    let mut ws = WsClient::connect_with(&node, &headers).await.unwrap();
    ws.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_cookie_calls_are_refused() {
    // Activity is recorded on every call, so a refused call that recorded it shows.
    let (_redis, node) = cluster_with(&[
        ("SESSIONHUB_ALLOWED_ORIGINS", "https://app.example"),
        ("SESSIONHUB_IDLE_REFRESH_SECS", "0"),
    ])
    .await;
    let api = Api::new(&node);
    let a = api.create_session("alice", "test").await;
    let b = api.create_session("alice", "test").await;
    let path = format!("/api/v1/me/sessions/{}", b.session_id);
    let last_seen = || async {
        let res = api
            .service(
                Method::GET,
                &format!("/api/v1/sessions/{}", a.session_id),
                None,
            )
            .await;
        let s: Value = res.json().await.unwrap();
        s["last_seen_at"].as_str().unwrap().to_owned()
    };
    let seen = last_seen().await;
    for (origin, site) in [
        (Some("https://evil.example"), None),
        (None, Some("cross-site")),
        (Some("https://app.example"), Some("cross-site")),
    ] {
        let mut req = api
            .request(Method::DELETE, &path)
            .header("Cookie", format!("sh_session={}", a.token));
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if let Some(s) = site {
            req = req.header("Sec-Fetch-Site", s);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{origin:?} {site:?}");
    }
    assert_eq!(
        api.me_status(&b.token).await,
        StatusCode::OK,
        "nothing was ended"
    );
    assert_eq!(last_seen().await, seen, "a refused call recorded activity");
    let res = api
        .request(Method::DELETE, &path)
        .header("Cookie", format!("sh_session={}", a.token))
        .header("Origin", "https://app.example")
        .header("Sec-Fetch-Site", "same-site")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
}

async fn demo_login(node: &Node, user: &str, headers: &[(&str, &str)]) -> (String, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/demo/login", node.base))
        .json(&json!({ "user_id": user }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let set = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    let value = set
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_owned();
    secrets::remember(&value);
    (set, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_has_safe_attributes() {
    let demo = [
        ("SESSIONHUB_DEMO", "true"),
        ("SESSIONHUB_TRUSTED_PROXIES", "127.0.0.1"),
    ];
    let (_redis, node) = cluster_with(&demo).await;
    let (plain, token) = demo_login(&node, "alice", &[]).await;
    assert!(plain.starts_with("sh_session="), "{plain}");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(plain.contains(attr), "{attr} missing: {plain}");
    }
    assert!(!plain.contains("Secure") && !plain.contains("Domain") && !plain.contains("Max-Age"));
    assert_eq!(Api::new(&node).me_status(&token).await, StatusCode::OK);

    // Behind a trusted TLS proxy: Secure, with the __Host- name, which is accepted.
    let (secure, token) = demo_login(&node, "alice", &[("X-Forwarded-Proto", "https")]).await;
    assert!(
        secure.starts_with("__Host-sh_session=") && secure.contains("Secure"),
        "{secure}"
    );
    let res = Api::new(&node)
        .request(Method::GET, "/api/v1/me")
        .header("Cookie", format!("__Host-sh_session={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // The same header from an untrusted peer is ignored.
    let (_redis2, untrusting) = cluster_with(&[("SESSIONHUB_DEMO", "true")]).await;
    let (set, _) = demo_login(&untrusting, "bob", &[("X-Forwarded-Proto", "https")]).await;
    assert!(
        set.starts_with("sh_session=") && !set.contains("Secure"),
        "{set}"
    );
    // And the switch forces it.
    let (_redis3, forced) = cluster_with(&[
        ("SESSIONHUB_DEMO", "true"),
        ("SESSIONHUB_COOKIE_SECURE", "true"),
    ])
    .await;
    let (set, _) = demo_login(&forced, "carol", &[]).await;
    assert!(
        set.starts_with("__Host-sh_session=") && set.contains("Secure"),
        "{set}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_expiry_ends_the_session_like_a_kill() {
    let redis = RedisServer::start().await;
    let a = TestCluster::node(&redis, 0, &[]).await;
    let b = TestCluster::node(&redis, 1, &[]).await;
    let api = Api::new(&a);
    let res = api
        .service(
            Method::POST,
            "/api/v1/sessions",
            Some(json!({ "user_id": "alice", "ttl_secs": 1 })),
        )
        .await;
    let s: Value = res.json().await.unwrap();
    let token = s["token"].as_str().unwrap().to_owned();
    secrets::remember(&token);
    let mut on_a = WsClient::connect(&a, &token).await.unwrap();
    let mut on_b = WsClient::connect(&b, &token).await.unwrap();
    let started = Instant::now();
    for ws in [&mut on_a, &mut on_b] {
        let (code, frames) = ws.expect_close().await;
        assert_eq!(code, 4001);
        assert_eq!(frames[0]["type"], "session_ended");
        assert_eq!(frames[0]["reason"], "expired");
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    for n in [&a, &b] {
        assert_eq!(
            Api::new(n).me_status(&token).await,
            StatusCode::UNAUTHORIZED
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_expire_and_active_ones_do_not() {
    let env = [
        ("SESSIONHUB_IDLE_TIMEOUT_SECS", "2"),
        ("SESSIONHUB_IDLE_REFRESH_SECS", "1"),
    ];
    let (_redis, node) = cluster_with(&env).await;
    let api = Api::new(&node);
    let idle = api.create_session("alice", "idle").await;
    let busy = api.create_session("bob", "busy").await;
    let mut idle_ws = WsClient::connect(&node, &idle.token).await.unwrap();
    let started = Instant::now();
    // bob keeps using his session for twice the idle timeout.
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            api.me_status(&busy.token).await,
            StatusCode::OK,
            "at {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // pacing of the activity, not a wait
    }
    let (code, frames) = idle_ws.expect_close().await;
    assert_eq!(code, 4001);
    assert_eq!(frames[0]["reason"], "expired");
    assert_eq!(api.me_status(&idle.token).await, StatusCode::UNAUTHORIZED);
    assert_eq!(api.me_status(&busy.token).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_is_closed_with_1008() {
    let (_redis, node) =
        cluster_with(&[("SESSIONHUB_WS_RATE", "5"), ("SESSIONHUB_WS_BURST", "10")]).await;
    let s = Api::new(&node).create_session("alice", "test").await;
    let mut flooder = WsClient::connect(&node, &s.token).await.unwrap();
    let mut calm = WsClient::connect(&node, &s.token).await.unwrap();
    for _ in 0..50 {
        flooder.send_raw(Message::text(r#"{"type":"ping"}"#)).await;
    }
    let (code, _) = flooder.expect_close().await;
    assert_eq!(code, 1008);
    // Every frame counts: pings (answered), unsolicited pongs, binary frames and
    // empty continuation fragments cost work too.
    for kind in [
        Flood::Ping,
        Flood::Pong,
        Flood::Binary,
        Flood::EmptyContinuation,
    ] {
        let (code, sent) = flood(&node.ws_url(), &s.token, kind, u64::MAX).await;
        assert_eq!(code, Some(1008), "{kind:?} flood closed with 1008");
        assert!(sent < 10_000, "{kind:?} flood closed after {sent} frames");
    }
    calm.assert_alive().await;
}

/// A kind of frame a hostile client repeats.
#[derive(Debug, Clone, Copy)]
enum Flood {
    Text,
    Ping,
    Pong,
    Binary,
    /// A text message opened with one fragment, then empty continuations forever.
    EmptyContinuation,
}

impl Flood {
    fn frame(self, i: u64) -> Message {
        match self {
            Flood::Text => Message::text(if i.is_multiple_of(2) { "{" } else { "[[[[[[" }),
            Flood::Ping => Message::Ping(vec![1, 2, 3].into()),
            Flood::Pong => Message::Pong(vec![].into()),
            Flood::Binary => Message::binary(vec![0u8; 4]),
            Flood::EmptyContinuation if i == 0 => Message::Frame(Frame::message(
                b"{".to_vec(),
                OpCode::Data(Data::Text),
                false,
            )),
            Flood::EmptyContinuation => Message::Frame(Frame::message(
                Vec::new(),
                OpCode::Data(Data::Continue),
                false,
            )),
        }
    }
}

/// Sends `kind` frames on a new socket as fast as it can, up to `max` of them or
/// until the server closes it (frames that arrived are looked at between batches, so
/// the close frame is read before the server gives up on the connection). Returns
/// the close code, if one came, and the number of frames sent.
async fn flood(url: &str, token: &str, kind: Flood, max: u64) -> (Option<u16>, u64) {
    let mut ws = WsClient::connect_url(url, token).await.unwrap();
    let mut sent = 0u64;
    while sent < max {
        if ws.try_send_raw(kind.frame(sent)).await.is_err() {
            break;
        }
        sent += 1;
        if sent.is_multiple_of(32) {
            while let Some(m) = ws.try_next_now() {
                if let Message::Close(f) = m {
                    return (f.map(|f| f.code.into()), sent);
                }
            }
        }
    }
    if sent == max {
        return (None, sent);
    }
    while let Some(m) = ws.try_next().await {
        if let Message::Close(f) = m {
            return (f.map(|f| f.code.into()), sent);
        }
    }
    (None, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sockets_are_refused() {
    let env = [
        ("SESSIONHUB_MAX_SOCKETS_PER_SESSION", "2"),
        ("SESSIONHUB_MAX_SOCKETS_PER_USER", "3"),
    ];
    let (_redis, node) = cluster_with(&env).await;
    let api = Api::new(&node);
    let s1 = api.create_session("alice", "a").await;
    let s2 = api.create_session("alice", "b").await;
    let _k1 = WsClient::connect(&node, &s1.token).await.unwrap();
    let _k2 = WsClient::connect(&node, &s1.token).await.unwrap();
    let refused = |r: Result<WsClient, WsError>| match r {
        Err(WsError::Http(429)) => {}
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    };
    refused(WsClient::connect(&node, &s1.token).await);
    let _k3 = WsClient::connect(&node, &s2.token).await.unwrap();
    refused(WsClient::connect(&node, &s2.token).await);
    // Another user is not affected.
    let bob = api.create_session("bob", "b").await;
    WsClient::connect(&node, &bob.token)
        .await
        .unwrap()
        .assert_alive()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_socket_is_closed_within_the_ping_timeout() {
    let env = [
        ("SESSIONHUB_PING_INTERVAL_MS", "200"),
        ("SESSIONHUB_PONG_TIMEOUT_MS", "600"),
    ];
    let (_redis, node) = cluster_with(&env).await;
    let api = Api::new(&node);
    let s = api.create_session("alice", "test").await;
    // This client never reads again, so it never answers a ping.
    let _silent = WsClient::connect(&node, &s.token).await.unwrap();
    let started = Instant::now();
    api.wait_no_connections(&s.session_id, "the half-open socket to be dropped")
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(600 + 200 + 1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_upgrade_is_dropped_within_the_request_timeout() {
    let (_redis, node) = cluster_with(&[("SESSIONHUB_REQUEST_TIMEOUT_MS", "1000")]).await;
    let addr = node.base.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1024];
    // The head never completes; the server must give up on us.
    let n = tokio::time::timeout(WAIT, async {
        let mut total = 0;
        loop {
            match tcp.read(&mut buf[total..]).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the server kept the slow connection open");
    assert!(
        started.elapsed() < Duration::from_millis(500 + 1500),
        "{:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    // The node still serves everyone else.
    assert_eq!(node.health().await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_a_clear_answer_for_that_socket_alone() {
    let (_redis, node) = cluster_with(&[]).await;
    let s = Api::new(&node).create_session("alice", "test").await;
    let mut good = WsClient::connect(&node, &s.token).await.unwrap();

    // Invalid UTF-8 in a text frame: that socket is closed with a protocol code.
    let mut bad = WsClient::connect(&node, &s.token).await.unwrap();
    let frame = Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true);
    bad.send_raw(Message::Frame(frame)).await;
    let (code, _) = bad.expect_close().await;
    assert_eq!(code, 1007, "bad UTF-8 closes with 1007");

    // A message over the limit in fragments, each under it: 1009, as if whole.
    let mut big = WsClient::connect(&node, &s.token).await.unwrap();
    let part = vec![b' '; 40 * 1024];
    big.send_raw(Message::Frame(Frame::message(
        part.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    big.send_raw(Message::Frame(Frame::message(
        part,
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(
        big.expect_close().await.0,
        1009,
        "fragmented oversize message"
    );

    // Reserved bits without an extension, a continuation with nothing to continue,
    // a new message inside a fragmented one: protocol errors, 1002.
    let mut rsv = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
    rsv.header_mut().rsv1 = true;
    let stray = Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true);
    let opened = Frame::message(b"{".to_vec(), OpCode::Data(Data::Text), false);
    let interleaved = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
    for (what, frames) in [
        ("RSV1 set", vec![rsv]),
        ("stray continuation", vec![stray]),
        ("interleaved message", vec![opened, interleaved]),
    ] {
        let mut ws = WsClient::connect(&node, &s.token).await.unwrap();
        for f in frames {
            ws.send_raw(Message::Frame(f)).await;
        }
        assert_eq!(ws.expect_close().await.0, 1002, "{what}");
    }

    // Deep nesting, truncated JSON, huge numbers: error frames, socket usable.
    let mut odd = WsClient::connect(&node, &s.token).await.unwrap();
    let deep = format!("{}{}", "{\"a\":".repeat(2000), "}".repeat(2000));
    for text in [
        deep.as_str(),
        r#"{"type":"kill_ses"#,
        r#"{"type":"ping","n":1e400}"#,
        "\u{0}",
    ] {
        odd.send_raw(Message::text(text)).await;
        assert_eq!(odd.expect("error").await["code"], "bad_json", "{text:.30}");
    }
    odd.assert_alive().await;
    good.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_socket_does_not_delay_a_well_behaved_one() {
    // Generous rate limits, so the hostile socket keeps flooding for the whole test.
    let env = [
        ("SESSIONHUB_WS_RATE", "100000"),
        ("SESSIONHUB_WS_BURST", "100000"),
    ];
    let (_redis, node) = cluster_with(&env).await;
    let api = Api::new(&node);
    let hostile = api.create_session("mallory", "test").await;
    let good = api.create_session("alice", "test").await;
    let mut good_ws = WsClient::connect(&node, &good.token).await.unwrap();
    let url = node.ws_url();
    let token = hostile.token.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    // One flooder at a time, of each kind in turn, for the whole measurement.
    let flooder = tokio::spawn(async move {
        let kinds = [
            Flood::Text,
            Flood::Ping,
            Flood::Pong,
            Flood::Binary,
            Flood::EmptyContinuation,
        ];
        let mut sent = 0u64;
        for kind in kinds.iter().cycle() {
            if flag.load(std::sync::atomic::Ordering::Relaxed) || sent >= 1_000_000 {
                break;
            }
            let (code, n) = flood(&url, &token, *kind, 20_000).await;
            assert_eq!(
                code, None,
                "{kind:?} flood under a generous limit stays open"
            );
            sent += n;
        }
        sent
    });
    let mut latencies = Vec::new();
    for i in 0..200 {
        let sent = Instant::now();
        let res = api
            .service(
                Method::POST,
                "/api/v1/publish",
                Some(json!({ "to": { "user": "alice" }, "event": "m", "data": i })),
            )
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let f = good_ws.expect("message").await;
        assert_eq!(f["data"], i);
        latencies.push(sent.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded = flooder.await.unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    // Stated bound: publish round trip plus delivery stays under 250 ms at p99
    // (a debug build on a loaded 2-core machine).
    assert!(
        p99 < Duration::from_millis(250),
        "p99 {p99:?} while {flooded} hostile frames were sent"
    );
    assert!(
        flooded > 1000,
        "the hostile socket really flooded ({flooded})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_token_reaches_redis_commands_pubsub_or_logs() {
    let cluster = TestCluster::start(2).await;
    // Watch every command Redis receives (this includes every PUBLISH payload).
    let mut monitor = Monitor::attach(&cluster.redis).await;

    let api = Api::new(&cluster.nodes[0]);
    let a = api.create_session("alice", "a").await;
    let mut ws = WsClient::connect(&cluster.nodes[1], &a.token)
        .await
        .unwrap();
    let b = api.create_session("alice", "b").await;
    ws.expect("session_created").await;
    let ws_b = WsClient::connect(&cluster.nodes[0], &b.token)
        .await
        .unwrap();
    api.me(Method::GET, "/api/v1/me/sessions", &a.token).await;
    api.me(
        Method::DELETE,
        &format!("/api/v1/me/sessions/{}", b.session_id),
        &a.token,
    )
    .await;
    api.me(Method::POST, "/api/v1/me/logout", &a.token).await;
    ws.expect_close().await;
    drop(ws_b);
    let text = monitor.seen(&cluster.redis, "end-of-workload").await;
    assert!(
        text.contains("sh_create_session") && text.contains("PUBLISH"),
        "monitor saw the workload"
    );
    assert_eq!(secrets::leaked_in(&text), None, "a raw token went to Redis");

    // The scanner itself works: a planted secret is found.
    let mut c = cluster.redis.conn().await;
    redis::cmd("SET")
        .arg("planted")
        .arg(&a.token)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let dump = secrets::dump_redis(&cluster.redis.url()).unwrap();
    assert!(secrets::leaked_in(&dump).is_some());
    redis::cmd("DEL")
        .arg("planted")
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    // Logs and Redis are scanned again when the nodes and Redis are dropped.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_node_engine_enforces_the_same_limits() {
    let node = Node::start(NodeOptions {
        node_id: "solo".into(),
        env: vec![("SESSIONHUB_MAX_SOCKETS_PER_SESSION".into(), "1".into())],
        ..Default::default()
    })
    .await;
    let s = Api::new(&node).create_session("alice", "a").await;
    let _one = WsClient::connect(&node, &s.token).await.unwrap();
    match WsClient::connect(&node, &s.token).await {
        Err(WsError::Http(429)) => {}
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
}

/// Reads server frames (unmasked) until a close frame, and returns its code.
async fn read_close_code(tcp: &mut tokio::net::tcp::OwnedReadHalf) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Whole frames at the front of `buf`.
        while buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if buf[0] & 0x0f == 0x8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[at], buf[at + 1]]));
            }
            buf.drain(..at + len);
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A frame is refused as soon as its header declares more than the limit: the node
/// does not buffer a declared gigabyte while a client sends it (it did, until the
/// ping timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_declared_over_the_limit_is_refused_from_its_header() {
    let (_redis, node) = cluster_with(&[]).await;
    let s = Api::new(&node).create_session("alice", "test").await;
    let tcp = raw_upgrade(&node, &s.token, None).await;
    let (mut rx, mut tx) = tcp.into_split();
    // A masked binary frame of 1 GiB, then its first 8 MiB, slowly.
    let writer = tokio::spawn(async move {
        let mut header = vec![0x82, 0xff];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        if tx.write_all(&header).await.is_err() {
            return;
        }
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..128 {
            if tx.write_all(&chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Kept open: only the node may end it.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tx);
    });
    let code = tokio::time::timeout(WAIT, read_close_code(&mut rx))
        .await
        .expect("no close frame while the oversized frame was being sent");
    assert_eq!(code, Some(1009));
    writer.abort();
    // The node still serves everyone else.
    assert_eq!(node.health().await["status"], "ok");
}
