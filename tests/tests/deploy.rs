//! The deployment as users run it: scripts/cluster.sh brings up Redis, three nodes and
//! nginx; everything here goes through nginx only, plus the deploy/ops scripts as
//! documented, /metrics, and the docker-compose file's validation.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use sessionhub_tests::process::repo_root;
use sessionhub_tests::{Api, ScriptCluster, WAIT, WsClient, wait_for};

fn ws_url(base: &str) -> String {
    format!("{}/ws", base.replacen("http://", "ws://", 1))
}

async fn app_status(nginx: &str, token: &str) -> (StatusCode, Option<String>) {
    let res = reqwest::Client::new()
        .get(format!("{nginx}/app/"))
        .header("Cookie", format!("sh_session={token}"))
        .send()
        .await
        .unwrap();
    let user = res
        .headers()
        .get("x-sessionhub-user")
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status(), user)
}

/// Sum of one metric over the nodes.
async fn metric(urls: &[String], line_prefix: &str) -> f64 {
    let mut total = 0.0;
    for u in urls {
        let text = reqwest::get(format!("{u}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        total += text
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no metric {line_prefix} in:\n{text}"));
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_through_nginx_ops_scripts_and_metrics() {
    let cluster = ScriptCluster::start();
    let nginx = cluster.nginx().to_owned();
    let nodes = cluster.node_urls();
    assert_eq!(nodes.len(), 3);
    let api = Api::at(&nginx);
    let created_before = metric(&nodes, "sessionhub_sessions_created_total").await;

    // Login notification across nodes, through the load balancer only.
    let s1 = api.create_session("alice", "Firefox on laptop").await;
    let mut s1_ws = Vec::new();
    for _ in 0..3 {
        s1_ws.push(
            WsClient::connect_url(&ws_url(&nginx), &s1.token)
                .await
                .unwrap(),
        );
    }
    let spread: BTreeSet<String> = s1_ws
        .iter()
        .map(|w| w.hello["node_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        spread.len() >= 2,
        "nginx spreads sockets over the nodes: {spread:?}"
    );
    assert_eq!(metric(&nodes, "sessionhub_connections").await, 3.0);
    let s2 = api.create_session("alice", "Chrome on phone").await;
    for ws in &mut s1_ws {
        let f = ws.expect("session_created").await;
        assert_eq!(f["session"]["session_id"], s2.session_id.as_str());
    }

    // auth_request: the app behind nginx sees the user, until the session is killed.
    assert_eq!(
        app_status(&nginx, &s1.token).await,
        (StatusCode::OK, Some("alice".into()))
    );
    let res = api
        .service(
            Method::DELETE,
            &format!("/api/v1/sessions/{}", s1.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    for ws in &mut s1_ws {
        assert_eq!(ws.expect_close().await.0, 4001);
    }
    assert_eq!(
        app_status(&nginx, &s1.token).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app_status(&nginx, "garbage").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app_status(&nginx, &s2.token).await.0, StatusCode::OK);

    // The ops scripts, as documented, against the same cluster.
    let mut s2_ws = Vec::new();
    for _ in 0..3 {
        s2_ws.push(
            WsClient::connect_url(&ws_url(&nginx), &s2.token)
                .await
                .unwrap(),
        );
    }
    let nodes_out = cluster.ops("nodes.sh", &[]);
    assert_eq!(nodes_out.lines().count(), 3, "{nodes_out}");
    assert!(
        nodes_out.contains("node-1 ") && nodes_out.contains("seconds_left="),
        "{nodes_out}"
    );
    let online = cluster.ops("online-users.sh", &[]);
    assert!(
        online.contains("alice 3") && online.contains("online_users=1 connections=3"),
        "{online}"
    );
    let listing = cluster.ops("user-sessions.sh", &["alice"]);
    assert!(
        listing.contains(&s2.session_id) && !listing.contains(&s1.session_id),
        "{listing}"
    );
    let conns = cluster.ops("session-connections.sh", &[&s2.session_id]);
    for ws in &s2_ws {
        assert!(conns.contains(ws.connection_id()), "{conns}");
    }
    assert!(
        !conns.contains("secret_hash"),
        "the script hides the hash too: {conns}"
    );
    assert!(
        cluster
            .ops("kill-session.sh", &[&s2.session_id])
            .contains("killed")
    );
    for ws in &mut s2_ws {
        let (code, frames) = ws.expect_close().await;
        assert_eq!((code, frames[0]["reason"].as_str()), (4001, Some("killed")));
    }
    assert_eq!(
        app_status(&nginx, &s2.token).await.0,
        StatusCode::UNAUTHORIZED
    );

    let b1 = api.create_session("bob", "a").await;
    let b2 = api.create_session("bob", "b").await;
    let mut bob_ws = WsClient::connect_url(&ws_url(&nginx), &b2.token)
        .await
        .unwrap();
    assert_eq!(
        cluster.ops("kill-user.sh", &["bob"]).trim(),
        "killed 2 session(s) of bob"
    );
    assert_eq!(bob_ws.expect_close().await.0, 4001);
    for t in [&b1.token, &b2.token] {
        assert_eq!(api.me_status(t).await, StatusCode::UNAUTHORIZED);
    }

    // Metrics moved with all of that.
    let urls = nodes.clone();
    wait_for("the connection gauge to fall to zero", WAIT, || {
        let urls = urls.clone();
        async move { (metric(&urls, "sessionhub_connections").await == 0.0).then_some(()) }
    })
    .await;
    assert_eq!(
        metric(&nodes, "sessionhub_sessions_created_total").await - created_before,
        4.0
    );
    assert!(metric(&nodes, "sessionhub_sessions_ended_total{reason=\"killed\"}").await >= 1.0);
    assert!(metric(&nodes, "sessionhub_kill_seconds_count").await >= 1.0);
    // 7 hellos, 3 session_created, 7 session_ended.
    assert!(metric(&nodes, "sessionhub_messages_out_total").await >= 17.0);
}

fn compose_command() -> Option<Vec<String>> {
    let ok = |cmd: &[&str]| {
        std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ok(&["docker", "compose", "version"]) {
        Some(vec!["docker".into(), "compose".into()])
    } else if ok(&["docker-compose", "version"]) {
        Some(vec!["docker-compose".into()])
    } else {
        None
    }
}

#[test]
fn the_compose_file_is_valid_and_mounts_files_that_exist() {
    let cmd = compose_command().unwrap_or_else(|| {
        panic!("neither `docker compose` nor `docker-compose` is installed; install it with: apt-get install -y docker-compose")
    });
    let root = repo_root();
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(&root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "compose config: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in ["redis:", "node1:", "node2:", "node3:", "nginx:"] {
        assert!(text.contains(service), "{service} missing from:\n{text}");
    }
    // Every file the compose file and the Dockerfile refer to is in the repository.
    let compose = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    for line in compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
    {
        let path: PathBuf = root.join(line.split(':').next().unwrap());
        assert!(path.exists(), "{} is mounted but missing", path.display());
    }
    assert!(Path::new(&root.join("deploy/Dockerfile")).exists());
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    for line in dockerfile.lines().filter_map(|l| l.strip_prefix("COPY ")) {
        if line.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                root.join(src).exists(),
                "Dockerfile copies {src}, which is missing"
            );
        }
    }
    // The nginx config the compose file mounts is the one the cluster test runs.
    assert!(compose.contains("./deploy/nginx/sessionhub.conf:/etc/nginx/sessionhub.conf"));
}
