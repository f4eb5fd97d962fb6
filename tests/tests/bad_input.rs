//! Bad input gets a clear answer for that peer alone; bad configuration a clear line.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sessionhub_tests::process::{free_port, node_binary};
use sessionhub_tests::{Api, Node, NodeOptions, TestCluster, WsClient, WsError};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_frames_and_the_socket_stays_usable() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let s = Api::new(node).create_session("alice", "test").await;
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    let mut other = WsClient::connect(node, &s.token).await.unwrap();

    let cases: &[(&str, &str)] = &[
        ("{", "bad_json"),
        ("[1,2]", "bad_json"),
        (&"[".repeat(5000), "bad_json"),
        ("{}", "missing_type"),
        (r#"{"type":"fly"}"#, "unknown_type"),
        (r#"{"type":"kill_session"}"#, "bad_field"),
        (
            r#"{"type":"kill_session","session_id":"../../etc"}"#,
            "bad_field",
        ),
        (r#"{"type":"kill_session","session_id":1e999}"#, "bad_json"),
    ];
    for (text, code) in cases {
        ws.send_raw(Message::text(*text)).await;
        let err = ws.expect("error").await;
        assert_eq!(err["code"], *code, "for {text:.40}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    ws.send_raw(Message::binary(vec![0u8, 1, 2])).await;
    assert_eq!(ws.expect("error").await["code"], "binary_unsupported");
    ws.assert_alive().await;
    other.assert_alive().await;

    // A message over the limit closes that socket alone, with 1009.
    ws.send_raw(Message::text("x".repeat(70 * 1024))).await;
    assert_eq!(ws.expect_close().await.0, 1009);
    other.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_garbled_or_unknown_cookies_get_401() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let unknown = format!(
        "{}.{}",
        "2bd806c9".to_owned() + &"0".repeat(24),
        "a".repeat(64)
    );
    let bad_cookies = [
        None,
        Some("garbage".to_owned()),
        Some("%00%ff".to_owned()),
        Some(unknown.clone()),
        Some(format!("{unknown}x")),
    ];
    for cookie in &bad_cookies {
        let mut req = api.request(Method::GET, "/api/v1/me");
        let mut headers = Vec::new();
        if let Some(c) = cookie {
            req = req.header("Cookie", format!("sh_session={c}"));
            headers.push(("Cookie", format!("sh_session={c}")));
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "cookie {cookie:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
        match WsClient::connect_with(node, &headers).await {
            Err(WsError::Http(401)) => {}
            other => panic!("upgrade with cookie {cookie:?}: {:?}", other.map(|_| ())),
        }
    }
    // The node still serves good clients.
    let s = api.create_session("alice", "test").await;
    assert_eq!(api.me_status(&s.token).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_api_errors_are_clear() {
    let cluster = TestCluster::start(1).await;
    let api = Api::new(&cluster.nodes[0]);
    let res = api
        .request(Method::POST, "/api/v1/sessions")
        .json(&json!({"user_id": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = api
        .request(Method::GET, "/api/v1/users/alice/sessions")
        .bearer_auth("wrong-key-wrong-key-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    for (body, needle) in [
        (json!({}), "user_id"),
        (json!({"user_id": "has space"}), "user_id"),
        (json!({"user_id": "a", "ttl_secs": 0}), "ttl_secs"),
        (json!({"user_id": "a", "ip": "not-an-ip"}), "ip"),
        (json!({"user_id": "a", "extra": 1}), "extra"),
    ] {
        let res = api
            .service(Method::POST, "/api/v1/sessions", Some(body.clone()))
            .await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{body}");
        let err: Value = res.json().await.unwrap();
        assert!(
            err["message"].as_str().unwrap().contains(needle),
            "{body} -> {err}"
        );
    }
    let res = api
        .request(Method::POST, "/api/v1/sessions")
        .bearer_auth(sessionhub_tests::API_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // Every answer below is the API's JSON error, with a status that says what.
    let error = |res: reqwest::Response| async move {
        let status = res.status();
        let err: Value = res.json().await.expect("a JSON error body");
        (
            status,
            err["error"].as_str().unwrap().to_owned(),
            err["message"].as_str().unwrap().to_owned(),
        )
    };
    let huge = json!({ "user_id": "a", "user_agent": "x".repeat(70 * 1024) });
    let (status, code, message) = error(
        api.service(Method::POST, "/api/v1/sessions", Some(huge))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        "{message}"
    );
    let res = api
        .request(Method::POST, "/api/v1/sessions")
        .bearer_auth(sessionhub_tests::API_KEY)
        .body(r#"{"user_id":"a"}"#)
        .send()
        .await
        .unwrap();
    let (status, _, message) = error(res).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        message.contains("Content-Type: application/json"),
        "{message}"
    );
    for query in ["online=yes", "limit=abc"] {
        let path = format!("/api/v1/users?{query}");
        let (status, code, message) = error(api.service(Method::GET, &path, None).await).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{query}"
        );
        assert!(
            message.starts_with("invalid query string"),
            "{query}: {message}"
        );
    }
    // A batch names its message that is not one (counting from 0).
    let batch = json!([
        { "to": "all", "event": "a" },
        { "to": "all", "event": "b", "foo": 1 },
    ]);
    let (status, _, message) = error(
        api.service(Method::POST, "/api/v1/publish", Some(batch))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        message.starts_with("message 1: ") && message.contains("foo"),
        "{message}"
    );
    let res = api
        .service(Method::GET, "/api/v1/sessions/not-a-session", None)
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = api
        .service(
            Method::DELETE,
            "/api/v1/sessions/2bd806c9000000000000000000000000",
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // A method a path does not have is not found, with the API's error body (a path
    // with several methods is one actix resource, whose own answer would be a bare
    // 405), on every such path.
    for (method, path) in [
        (
            Method::PATCH,
            "/api/v1/sessions/2bd806c9000000000000000000000000",
        ),
        (Method::POST, "/api/v1/users/alice/sessions"),
        (Method::POST, "/api/v1/groups/g/members/user:alice"),
        (Method::PUT, "/api/v1/me/sessions"),
        (Method::DELETE, "/api/v1/groups/g"),
    ] {
        let res = api.service(method.clone(), path, None).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{method} {path}");
        let err: Value = res.json().await.unwrap();
        assert_eq!(err["error"], "not_found", "{method} {path}: {err}");
    }
    // A cross-site page cannot use a victim's cookie to end sessions.
    let s = api.create_session("alice", "test").await;
    let res = api
        .request(Method::POST, "/api/v1/me/logout")
        .header("Cookie", format!("sh_session={}", s.token))
        .header("Origin", "https://evil.example")
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    match WsClient::connect_with(
        &cluster.nodes[0],
        &[
            ("Cookie", format!("sh_session={}", s.token)),
            ("Origin", "https://evil.example".into()),
        ],
    )
    .await
    {
        Err(WsError::Http(403)) => {}
        other => panic!("cross-origin upgrade: {:?}", other.map(|_| ())),
    }
    assert_eq!(api.me_status(&s.token).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_api_key_the_service_api_does_not_exist() {
    let node = Node::start(NodeOptions {
        node_id: "solo".into(),
        env: vec![("SESSIONHUB_API_KEY".into(), String::new())],
        ..Default::default()
    })
    .await;
    let res = Api::new(&node)
        .service(Method::GET, "/api/v1/users/alice/sessions", None)
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

/// Runs the binary to completion with `args` and `env`; returns (exit code, stderr).
async fn run_to_exit(args: &[&str], env: &[(&str, String)], bound: Duration) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(node_binary());
    cmd.env_clear()
        .args(args)
        .env("SESSIONHUB_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(bound, cmd.stdin(Stdio::null()).kill_on_drop(true).output())
        .await
        .expect("the node should have exited")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "no panic trace: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

/// Flags, environment, and the text the error line must contain.
type ConfigCase<'a> = (Vec<&'a str>, Vec<(&'a str, String)>, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_one_clear_line() {
    let cases: Vec<ConfigCase<'_>> = vec![
        (vec!["--bogus"], vec![], "--bogus"),
        (vec!["--listen", "nowhere"], vec![], "--listen"),
        (
            vec![],
            vec![("SESSIONHUB_NODE_ID", "a b".into())],
            "SESSIONHUB_NODE_ID",
        ),
        (
            vec![],
            vec![("SESSIONHUB_REDIS_URL", "http://x".into())],
            "SESSIONHUB_REDIS_URL",
        ),
        (
            vec![],
            vec![("SESSIONHUB_API_KEY", "short".into())],
            "SESSIONHUB_API_KEY",
        ),
        (
            vec![],
            vec![("SESSIONHUB_ALLOWED_ORIGINS", "evil".into())],
            "SESSIONHUB_ALLOWED_ORIGINS",
        ),
        // A misspelt setting would leave the node alone on the embedded engine.
        (
            vec![],
            vec![("SESSIONHUB_REDIS_ULR", "redis://127.0.0.1:1".into())],
            "unknown setting SESSIONHUB_REDIS_ULR (did you mean SESSIONHUB_REDIS_URL?)",
        ),
        (
            vec![],
            vec![("SESSIONHUB_DEMO", "maybe".into())],
            "SESSIONHUB_DEMO",
        ),
        // Webhooks: URL and secret together, an http(s) URL, a long secret, Redis.
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "redis://127.0.0.1:1".into()),
                ("SESSIONHUB_WEBHOOK_URL", "ftp://hooks.example.com/x".into()),
                ("SESSIONHUB_WEBHOOK_SECRET", "0123456789abcdef".into()),
            ],
            "SESSIONHUB_WEBHOOK_URL (--webhook-url): must be an http:// or https:// URL",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "redis://127.0.0.1:1".into()),
                (
                    "SESSIONHUB_WEBHOOK_URL",
                    "https://hooks.example.com/x".into(),
                ),
                ("SESSIONHUB_WEBHOOK_SECRET", "short-secret".into()),
            ],
            "SESSIONHUB_WEBHOOK_SECRET (--webhook-secret): must be at least 16 characters",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "redis://127.0.0.1:1".into()),
                ("SESSIONHUB_WEBHOOK_SECRET", "0123456789abcdef".into()),
            ],
            "SESSIONHUB_WEBHOOK_SECRET (--webhook-secret): is set but SESSIONHUB_WEBHOOK_URL is not",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "redis://127.0.0.1:1".into()),
                (
                    "SESSIONHUB_WEBHOOK_URL",
                    "https://hooks.example.com/x".into(),
                ),
            ],
            "needs SESSIONHUB_WEBHOOK_SECRET",
        ),
        (
            vec![],
            vec![
                (
                    "SESSIONHUB_WEBHOOK_URL",
                    "https://hooks.example.com/x".into(),
                ),
                ("SESSIONHUB_WEBHOOK_SECRET", "0123456789abcdef".into()),
            ],
            "needs Redis",
        ),
        // TLS files: readable, a certificate with its key, only with rediss://.
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "rediss://127.0.0.1:1".into()),
                ("SESSIONHUB_REDIS_CA_FILE", "/nonexistent/ca.crt".into()),
            ],
            "SESSIONHUB_REDIS_CA_FILE (--redis-ca-file): cannot read /nonexistent/ca.crt",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "rediss://127.0.0.1:1".into()),
                ("SESSIONHUB_REDIS_CLIENT_CERT_FILE", "/etc/hostname".into()),
            ],
            "SESSIONHUB_REDIS_CLIENT_CERT_FILE (--redis-client-cert-file): needs SESSIONHUB_REDIS_CLIENT_KEY_FILE",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "redis://127.0.0.1:1".into()),
                ("SESSIONHUB_REDIS_CA_FILE", "/etc/hostname".into()),
            ],
            "SESSIONHUB_REDIS_CA_FILE (--redis-ca-file): is set but no Redis URL is rediss://",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "rediss://127.0.0.1:1".into()),
                ("SESSIONHUB_REDIS_CA_FILE", "/etc/hostname".into()),
            ],
            "holds no PEM certificate",
        ),
        // Sentinel: with its master's name, and alone.
        (
            vec![],
            vec![(
                "SESSIONHUB_REDIS_SENTINELS",
                "redis://127.0.0.1:26379".into(),
            )],
            "SESSIONHUB_REDIS_SENTINELS (--redis-sentinels): needs SESSIONHUB_REDIS_SENTINEL_MASTER",
        ),
        (
            vec![],
            vec![("SESSIONHUB_REDIS_SENTINEL_MASTER", "mymaster".into())],
            "SESSIONHUB_REDIS_SENTINEL_MASTER (--redis-sentinel-master): is set but SESSIONHUB_REDIS_SENTINELS is not",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_URL", "redis://127.0.0.1:1".into()),
                (
                    "SESSIONHUB_REDIS_SENTINELS",
                    "redis://127.0.0.1:26379".into(),
                ),
                ("SESSIONHUB_REDIS_SENTINEL_MASTER", "mymaster".into()),
            ],
            "SESSIONHUB_REDIS_SENTINELS (--redis-sentinels): set one of",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_CLUSTER", "redis://127.0.0.1:7001".into()),
                (
                    "SESSIONHUB_REDIS_SENTINELS",
                    "redis://127.0.0.1:26379".into(),
                ),
                ("SESSIONHUB_REDIS_SENTINEL_MASTER", "mymaster".into()),
            ],
            "not several",
        ),
        (
            vec![],
            vec![
                ("SESSIONHUB_REDIS_SENTINELS", "127.0.0.1:26379".into()),
                ("SESSIONHUB_REDIS_SENTINEL_MASTER", "mymaster".into()),
            ],
            "must start with redis:// or rediss://",
        ),
    ];
    for (args, env, needle) in cases {
        let (code, stderr) = run_to_exit(&args, &env, Duration::from_secs(20)).await;
        assert_ne!(code, 0, "{args:?} {env:?}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "one line for {args:?} {env:?}: {stderr}"
        );
        assert!(
            stderr.starts_with("sessionhub: ") && stderr.contains(needle),
            "{stderr}"
        );
        assert!(
            !stderr.contains("0123456789abcdef"),
            "the secret is never printed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_retried_for_a_bounded_time_then_a_clear_error() {
    let port = free_port(); // nothing listens here
    let started = Instant::now();
    let (code, stderr) = run_to_exit(
        &[],
        &[
            ("SESSIONHUB_REDIS_URL", format!("redis://127.0.0.1:{port}")),
            ("SESSIONHUB_REDIS_CONNECT_TIMEOUT", "2".into()),
            ("RUST_LOG", "warn".into()),
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it should have retried"
    );
    assert_ne!(code, 0);
    let retries = stderr.lines().filter(|l| l.contains("retrying")).count();
    assert!(retries >= 2, "retries are logged: {stderr}");
    let last = stderr.lines().last().unwrap();
    assert!(
        last.starts_with("sessionhub: cannot start: Redis at redis://127.0.0.1:")
            && last.contains("unreachable"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_close_is_answered_and_its_record_removed() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let s = api.create_session("alice", "test").await;
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    let started = Instant::now();
    ws.send_raw(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await;
    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 1000, "the server echoes the client's close code");
    assert!(started.elapsed() < Duration::from_secs(1));
    api.wait_no_connections(&s.session_id, "the record to go")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_edges_get_the_documented_answers() {
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let http = reqwest::Client::new();

    // HEAD answers like GET, without a body.
    for path in ["/healthz", "/sessionhub.js"] {
        let res = http
            .head(format!("{}{path}", node.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "HEAD {path}");
        assert!(
            res.bytes().await.unwrap().is_empty(),
            "HEAD {path} has no body"
        );
    }
    let res = http
        .head(format!("{}/api/v1/me", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "HEAD /api/v1/me");

    // One 64 KiB header: 431, and the node keeps serving.
    let res = http
        .get(format!("{}/healthz", node.base))
        .header("X-Big", "a".repeat(64 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let ok = http
        .get(format!("{}/healthz", node.base))
        .header("X-Fine", "a".repeat(4 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    // data nested 10,000 levels deep is refused; 64 levels are delivered.
    let s = api.create_session("alice", "test").await;
    let mut ws = WsClient::connect(node, &s.token).await.unwrap();
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let body = |n: usize| {
        format!(
            r#"{{"to":{{"user":"alice"}},"event":"e","data":{}}}"#,
            nested(n)
        )
    };
    let publish = |b: String| {
        api.request(Method::POST, "/api/v1/publish")
            .bearer_auth(sessionhub_tests::API_KEY)
            .header("Content-Type", "application/json")
            .body(b)
            .send()
    };
    let res = publish(body(10_000)).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let err: Value = res.json().await.unwrap();
    assert!(
        err["message"].as_str().unwrap().contains("64 levels"),
        "{err}"
    );
    let res = publish(body(64)).await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let frame = ws.expect("message").await;
    assert_eq!(frame["data"].to_string(), nested(64));
}
