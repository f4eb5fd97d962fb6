//! The README's redis-cli commands, run as written, against a live cluster.
#![allow(clippy::unwrap_used, missing_docs)]

use std::os::unix::fs::PermissionsExt;

use reqwest::StatusCode;
use sessionhub_tests::process::{repo_root, require};
use sessionhub_tests::{Api, TestCluster, WsClient};

/// The body of the README code block whose info string is `sh <name>`.
fn readme_block(name: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let fence = format!("```sh {name}\n");
    let start = readme
        .find(&fence)
        .unwrap_or_else(|| panic!("README has no block {name}"))
        + fence.len();
    let len = readme[start..].find("```").unwrap();
    readme[start..start + len].to_owned()
}

/// Runs a README block with bash from the repository root, with `redis-cli` pointed
/// at `port`; returns stdout.
async fn run_block(name: &str, port: u16, session_id: &str) -> String {
    let real = require("redis-cli", "apt-get install -y redis-server");
    let bin = tempfile::tempdir().unwrap();
    let wrapper = bin.path().join("redis-cli");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {} -p {port} \"$@\"\n", real.display()),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = readme_block(name).replace("<session_id>", session_id);
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(repo_root())
        .env("PATH", path)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "block {name} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_redis_cli_commands_list_and_kill() {
    let cluster = TestCluster::start(3).await;
    let port = cluster.redis.port();
    let api = Api::new(&cluster.nodes[0]);
    let s1 = api.create_session("alice", "Firefox on laptop").await;
    let mut on_a = WsClient::connect(&cluster.nodes[0], &s1.token)
        .await
        .unwrap();
    let mut on_b = WsClient::connect(&cluster.nodes[1], &s1.token)
        .await
        .unwrap();
    let s2 = api.create_session("alice", "Chrome on phone").await;
    on_a.expect("session_created").await;
    on_b.expect("session_created").await;
    let mut s2_on_c = WsClient::connect(&cluster.nodes[2], &s2.token)
        .await
        .unwrap();

    let listing = run_block("ops:list-sessions", port, "").await;
    for needle in [
        s1.session_id.as_str(),
        s2.session_id.as_str(),
        on_a.connection_id(),
        on_b.connection_id(),
        s2_on_c.connection_id(),
        "Firefox on laptop",
    ] {
        assert!(
            listing.contains(needle),
            "{needle} missing from:\n{listing}"
        );
    }

    // A message to alice joins her history, which the block shows.
    let res = api
        .service(
            reqwest::Method::POST,
            "/api/v1/publish",
            Some(serde_json::json!({
                "to": { "user": "alice" }, "event": "note", "data": "from-ops-test"
            })),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let offset = res.json::<serde_json::Value>().await.unwrap()["offset"]
        .as_str()
        .unwrap()
        .to_owned();
    for ws in [&mut on_a, &mut on_b, &mut s2_on_c] {
        assert_eq!(ws.expect("message").await["offset"], offset.as_str());
    }
    let history = run_block("ops:history", port, "").await;
    for needle in [
        "epoch".to_owned(),
        format!("{offset}-0"),
        format!(r#""data":"from-ops-test","offset":"{offset}""#),
        "session_created".to_owned(),
    ] {
        assert!(
            history.contains(&needle),
            "{needle} missing from:\n{history}"
        );
    }

    let online = run_block("ops:online", port, "").await;
    assert!(online.contains("alice\t3"), "{online}");
    assert!(online.contains("users 1 connections 3"), "{online}");

    let conns = run_block("ops:list-connections", port, &s1.session_id).await;
    assert!(
        conns.contains(&format!("{}\nnode-a|", on_a.connection_id())),
        "{conns}"
    );
    assert!(
        conns.contains(&format!("{}\nnode-b|", on_b.connection_id())),
        "{conns}"
    );
    assert!(conns.contains("secret_hash"), "{conns}");
    let secret = s1.token.split_once('.').unwrap().1;
    assert!(
        !conns.contains(secret),
        "Redis must never hold the raw token"
    );

    let killed = run_block("ops:kill-session", port, &s1.session_id).await;
    assert_eq!(killed.trim(), "1");
    for ws in [&mut on_a, &mut on_b] {
        let (code, frames) = ws.expect_close().await;
        assert_eq!(code, 4001);
        assert_eq!(frames[0]["type"], "session_ended");
        assert_eq!(frames[0]["session_id"], s1.session_id.as_str());
    }
    for node in &cluster.nodes {
        assert_eq!(
            Api::new(node).me_status(&s1.token).await,
            StatusCode::UNAUTHORIZED
        );
    }
    s2_on_c.assert_alive().await;
    assert_eq!(
        run_block("ops:kill-session", port, &s1.session_id)
            .await
            .trim(),
        "0"
    );

    let killed = run_block("ops:kill-user", port, "").await;
    assert_eq!(killed.trim(), "1");
    assert_eq!(s2_on_c.expect_close().await.0, 4001);
    assert_eq!(api.me_status(&s2.token).await, StatusCode::UNAUTHORIZED);

    // alice's bucket's events, newest first: the kill above is there.
    let events = run_block("ops:events", port, "").await;
    let newest = events.find("session.ended").unwrap_or(usize::MAX);
    let oldest = events.find("session.created").unwrap_or(usize::MAX);
    assert!(newest < oldest, "newest first: {events}");
    for needle in [
        s2.session_id.as_str(),
        "user.offline",
        "connection.closed",
        "session_ended",
    ] {
        assert!(events.contains(needle), "{needle} not in {events}");
    }
    assert!(!events.contains(secret), "never a token in the stream");
}
