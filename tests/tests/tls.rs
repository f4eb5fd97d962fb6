//! TLS to Redis (`rediss://`) and Redis credentials in the URL, against a real
//! redis-server that listens only on a TLS port, with a CA, a server certificate and
//! a client certificate made by `openssl` in the test.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Stdio;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use sessionhub_tests::process::{NodeOptions, node_binary, wait_ready};
use sessionhub_tests::{Api, Node, Pki, RedisServer, TlsRedis, WsClient};

/// How long a node whose Redis refuses it keeps retrying before it gives up.
const CONNECT_TIMEOUT_SECS: &str = "2";
/// Bound on such a node's whole run (retrying, then the error line).
const FAIL_BOUND: Duration = Duration::from_secs(30);

/// Starts a node on `url` with extra environment.
async fn node(url: String, env: Vec<(String, String)>) -> Node {
    let mut opts = NodeOptions::numbered(0, &[]);
    opts.redis_url = Some(url);
    opts.env = env;
    let node = Node::start(opts).await;
    wait_ready(&node).await;
    node
}

/// A login, a socket, a kill: the socket closes 4001 and the token is refused.
async fn serves(node: &Node) {
    serves_across(node, node).await;
}

/// [`serves`] with the login and the kill through `api_node` and the socket on
/// `socket_node`: with two nodes, the kill reaches the socket over pub/sub.
async fn serves_across(api_node: &Node, socket_node: &Node) {
    let api = Api::new(api_node);
    let s = api.create_session("alice", "tls-test").await;
    let mut ws = WsClient::connect(socket_node, &s.token).await.unwrap();
    let res = api
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(ws.expect_close().await.0, 4001);
    assert_eq!(api.me_status(&s.token).await, StatusCode::UNAUTHORIZED);
}

/// Runs a node that cannot reach its Redis over TLS to its exit; returns its stderr.
async fn fails_to_start(url: String, env: Vec<(String, String)>) -> String {
    fails_to_start_at("rediss://", url, env).await
}

/// Runs a node that cannot use its Redis (at a URL that starts with `scheme`) to
/// its exit; returns its stderr.
async fn fails_to_start_at(scheme: &str, url: String, env: Vec<(String, String)>) -> String {
    let mut cmd = tokio::process::Command::new(node_binary());
    cmd.env_clear()
        .env("SESSIONHUB_LISTEN", "127.0.0.1:0")
        .env("SESSIONHUB_REDIS_URL", url)
        .env("SESSIONHUB_REDIS_CONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS)
        .env("RUST_LOG", "warn")
        .envs(env);
    let out = tokio::time::timeout(
        FAIL_BOUND,
        cmd.stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .expect("the node should have given up")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("sessionhub: cannot start: Redis at {scheme}"))
            && last.contains("unreachable"),
        "one clear last line: {stderr}"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_redis_over_tls_with_a_private_ca_and_a_password() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, false, &["--requirepass", "tls-test-pw-0451"]).await;
    let mut node = node(redis.url(":tls-test-pw-0451@"), vec![pki.ca_env()]).await;
    serves(&node).await;
    assert!(
        !node.stop_and_log().await.contains("tls-test-pw-0451"),
        "the password is never logged"
    );

    // Without the private CA the server's certificate is not trusted.
    let stderr = fails_to_start(redis.url(":tls-test-pw-0451@"), vec![]).await;
    assert!(!stderr.contains("tls-test-pw-0451"), "{stderr}");
    // A wrong password is refused, and not printed either.
    let stderr = fails_to_start(redis.url(":not-the-pw-7730@"), vec![pki.ca_env()]).await;
    assert!(!stderr.contains("not-the-pw-7730"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, true, &[]).await;
    fails_to_start(redis.url(""), vec![pki.ca_env()]).await;
    let mut env = pki.client_env();
    env.push(pki.ca_env());
    let node = node(redis.url(""), env).await;
    serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_and_password_in_the_url() {
    let pki = Pki::generate();
    // `default` is off: only alice, with her password, gets in.
    let redis = TlsRedis::start(
        &pki,
        false,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "alice",
            "on",
            ">alice-pw-9182",
            "~*",
            "&*",
            "+@all",
        ],
    )
    .await;
    let mut node = node(redis.url("alice:alice-pw-9182@"), vec![pki.ca_env()]).await;
    serves(&node).await;
    assert!(!node.stop_and_log().await.contains("alice-pw-9182"));
    let stderr = fails_to_start(redis.url("alice:wrong-pw-2231@"), vec![pki.ca_env()]).await;
    assert!(!stderr.contains("wrong-pw-2231"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_a_redis_cluster_over_tls() {
    let pki = Pki::generate();
    let cluster = TlsRedis::start_cluster(&pki).await;
    let seeds: Vec<String> = cluster.iter().map(|n| n.url("")).collect();
    let mut opts = NodeOptions::numbered(0, &[]);
    opts.env = vec![
        pki.ca_env(),
        ("SESSIONHUB_REDIS_CLUSTER".into(), seeds.join(",")),
    ];
    // `redis-cli --cluster create` returns before every node agrees on the slots;
    // the node retries until the cluster answers (its connect timeout).
    let node = Node::start(opts).await;
    wait_ready(&node).await;
    serves(&node).await;
}

/// Over plain TCP the subscriber has its own link to Redis (not redis-rs's): it
/// must authenticate as the URL's user, with the URL's password, like the command
/// connection, and a user that may not subscribe must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_plain_tcp_the_subscriber_authenticates_as_the_urls_user() {
    let redis = RedisServer::start().await;
    let mut c = redis.conn().await;
    for acl in [
        &["alice", "on", ">alice-pw-3318", "~*", "&*", "+@all"][..],
        // carol may run every command on every key, but use no channel.
        &[
            "carol",
            "on",
            ">carol-pw-5120",
            "~*",
            "resetchannels",
            "+@all",
        ],
        // From now on a client without a password is refused.
        &["default", "on", ">default-pw-7741"],
    ] {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(acl)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let url = |cred: &str| format!("redis://{cred}@127.0.0.1:{}", redis.port());
    let mut a = node(url("alice:alice-pw-3318"), vec![]).await;
    let mut opts = NodeOptions::numbered(1, &[]);
    opts.redis_url = Some(url(":default-pw-7741"));
    let mut b = Node::start(opts).await;
    wait_ready(&b).await;

    // The two subscribers are in, one as alice and one as default.
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut users: Vec<&str> = clients
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["alice", "default"], "{clients}");

    // A kill through node a reaches node b's socket over b's subscription.
    serves_across(&a, &b).await;
    for node in [&mut a, &mut b] {
        let log = node.stop_and_log().await;
        assert!(
            !log.contains("alice-pw-3318") && !log.contains("default-pw-7741"),
            "a password was logged: {log}"
        );
    }

    // carol's commands work, her SUBSCRIBE is refused: the node says why, and does
    // not start.
    let stderr = fails_to_start_at("redis://", url("carol:carol-pw-5120"), vec![]).await;
    assert!(
        stderr.contains("Redis refused SUBSCRIBE: NOPERM")
            && stderr.contains("could not subscribe"),
        "{stderr}"
    );
    assert!(!stderr.contains("carol-pw-5120"), "{stderr}");
    // Open again for the check, on drop, that no raw token is stored.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&["default", "nopass"])
        .query_async(&mut c)
        .await
        .unwrap();
}
