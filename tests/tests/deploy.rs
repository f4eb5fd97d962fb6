//! The deployment as users run it: scripts/cluster.sh brings up Redis, three nodes and
//! nginx; everything here goes through nginx only, plus the deploy/ops scripts as
//! documented, /metrics, browser-like `Origin` headers and forwarded headers through
//! nginx (and not around it), and the docker-compose file's validation.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use sessionhub_tests::process::{free_port, repo_root, require};
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

    // A batch as large as the API takes gets through nginx (its body limit once
    // refused anything over 128 KiB: a batch of 1,000 messages is about 250 KB).
    let batch: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            serde_json::json!({ "to": { "user": "alice" }, "event": "e", "data": format!("{i:0>200}") })
        })
        .collect();
    let res = api
        .service(
            Method::POST,
            "/api/v1/publish",
            Some(serde_json::Value::Array(batch)),
        )
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);

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

    // The nodes' /metrics is private behind nginx; the service API serves it with
    // the key, naming the node that answered.
    let res = reqwest::get(format!("{nginx}/metrics")).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    let res = reqwest::get(format!("{nginx}/api/v1/metrics"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = api.service(Method::GET, "/api/v1/metrics", None).await;
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.unwrap();
    assert!(
        ["node-1", "node-2", "node-3"]
            .iter()
            .any(|n| text.contains(&format!("sessionhub_node_info{{node_id=\"{n}\"}} 1"))),
        "{text}"
    );
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
    // The monitoring profile (Prometheus and Grafana) is valid too.
    let out = std::process::Command::new(&cmd[0])
        .args(&cmd[1..])
        .args([
            "-f",
            "docker-compose.yml",
            "--profile",
            "monitoring",
            "config",
        ])
        .current_dir(&root)
        .output()
        .unwrap();
    let monitored = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "compose --profile monitoring config: {monitored}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in ["prometheus:", "grafana:"] {
        assert!(
            monitored.contains(service),
            "{service} missing from:\n{monitored}"
        );
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

/// Copies `from` (a file or a directory) to `to`, leaving out what .dockerignore
/// leaves out of the build context (`target`, `artifacts`, `.git`, any
/// `node_modules`).
fn copy_as_docker_would(from: &Path, to: &Path) {
    let name = from.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if ["target", "artifacts", ".git", "node_modules"].contains(&name) {
        return;
    }
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_as_docker_would(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

/// Every `include_str!`/`include_bytes!` path in the Rust files below `dir`, resolved
/// against the including file.
fn included_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            included_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for macro_name in ["include_str!(\"", "include_bytes!(\""] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = &text[at + macro_name.len()..];
                    let target = &rest[..rest.find('"').unwrap()];
                    out.push(path.parent().unwrap().join(target));
                }
            }
        }
    }
}

/// The Dockerfile's build stage sees what `cargo build --locked` reads: the image's
/// build context is assembled from its `COPY` lines (as .dockerignore filters it),
/// and cargo must resolve the workspace there (every member, every patched crate in
/// vendor/, the lock file) and every file a crate includes must be in it; the runtime
/// stage must have the root certificates a `rediss://` URL trusts. (Building the image
/// needs a Docker daemon, which this machine has not.)
#[test]
fn the_docker_build_stage_has_everything_the_build_reads() {
    let root = repo_root();
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let context = tempfile::tempdir().unwrap();
    let mut stage = 0;
    for line in dockerfile.lines() {
        if line.starts_with("FROM ") {
            stage += 1;
        }
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if stage != 1 || args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        let (sources, dest) = parts.split_at(parts.len() - 1);
        for src in sources {
            let to = if dest[0] == "./" {
                context.path().join(src)
            } else {
                context.path().join(dest[0])
            };
            copy_as_docker_would(&root.join(src), &to);
        }
    }
    // Offline, cargo has the crates this machine's builds downloaded: those of its own
    // platform, so the resolve is filtered to it.
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    let rustc = String::from_utf8(rustc.stdout).unwrap();
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(context.path())
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", host])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot resolve the workspace in the Dockerfile's build context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node trusts the system's root certificates for a rediss:// URL without a CA
    // file (rustls-native-certs reads /etc/ssl/certs); the slim runtime image has none
    // unless it installs them.
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").unwrap()..];
    assert!(
        runtime.contains("install -y --no-install-recommends ca-certificates"),
        "the runtime stage has no root certificates for rediss://:\n{runtime}"
    );
    let mut included = Vec::new();
    included_files(&context.path().join("crates"), &mut included);
    assert!(!included.is_empty());
    for file in included {
        assert!(
            file.exists(),
            "{} is included by a crate but not copied into the build stage",
            file.display()
        );
    }
}

/// A session for `user` through the demo login, as a browser on `base` would make it
/// (its Origin, JSON body), sent from address `from`, with extra or replaced
/// headers; returns the response's status, the session id and the Set-Cookie header.
async fn demo_login(
    base: &str,
    from: &str,
    user: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<String>, String) {
    let http = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut given = reqwest::header::HeaderMap::new();
    given.insert("origin", base.parse().unwrap());
    for (k, v) in headers {
        given.insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let req = http
        .post(format!("{base}/demo/login"))
        .headers(given)
        .json(&serde_json::json!({ "user_id": user }));
    let res = req.send().await.unwrap();
    let status = res.status();
    let cookie = res
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    if let Some(token) = cookie
        .split(';')
        .next()
        .and_then(|c| c.split_once('='))
        .map(|(_, t)| t)
    {
        sessionhub_tests::secrets::remember(token);
    }
    let sid = if status.is_success() {
        let body: serde_json::Value = res.json().await.unwrap();
        body["session_id"].as_str().map(str::to_owned)
    } else {
        None
    };
    (status, sid, cookie)
}

/// The client address a session was recorded with.
async fn recorded_ip(api: &Api, session_id: &str) -> String {
    let res = api
        .service(Method::GET, &format!("/api/v1/sessions/{session_id}"), None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let s: serde_json::Value = res.json().await.unwrap();
    s["ip"].as_str().unwrap().to_owned()
}

/// Browsers send `Origin` on every /ws upgrade and cookie call: through the shipped
/// nginx, the nginx URL's own origin is allowed (nginx passes the Host the browser
/// used), any other is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_through_nginx() {
    let cluster = ScriptCluster::start_with(&[("SESSIONHUB_DEMO", "true")]);
    let nginx = cluster.nginx().to_owned();
    let api = Api::at(&nginx);
    let port = nginx.rsplit(':').next().unwrap();
    let me = api.create_session("olive", "Firefox on laptop").await;
    let other = api.create_session("olive", "Chrome on phone").await;
    let cookie = format!("sh_session={}", me.token);

    // Each request also carries an X-Forwarded-Host that matches its Origin: nginx
    // must replace it (the nodes believe that header from nginx).
    let forwarded_host = |origin: &str| origin.split_once("://").map_or("", |(_, h)| h).to_owned();
    let ws = |origin: String| {
        let url = ws_url(&nginx);
        let headers = [
            ("Cookie", cookie.clone()),
            ("X-Forwarded-Host", forwarded_host(&origin)),
            ("Origin", origin),
        ];
        async move { WsClient::connect_url_with(&url, &headers).await }
    };
    let kill_other = |origin: String| {
        let api = api.clone();
        let cookie = cookie.clone();
        let path = format!("/api/v1/me/sessions/{}", other.session_id);
        async move {
            api.request(Method::DELETE, &path)
                .header("Cookie", cookie)
                .header("X-Forwarded-Host", forwarded_host(&origin))
                .header("Origin", origin)
                .header("Sec-Fetch-Site", "same-origin")
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // Foreign origins first (they must change nothing), each refused by every node
    // nginx picks: a few tries apiece.
    let foreign = [
        "http://evil.example".to_owned(),
        format!("http://127.0.0.1:{}", port.parse::<u16>().unwrap() ^ 1),
        format!("http://localhost:{port}"),
        "null".to_owned(),
    ];
    for origin in &foreign {
        for _ in 0..3 {
            match ws(origin.clone()).await {
                Err(sessionhub_tests::WsError::Http(403)) => {}
                Err(e) => panic!("upgrade with Origin {origin}: {e:?}, not 403"),
                Ok(_) => panic!("upgrade with Origin {origin} was accepted"),
            }
            assert_eq!(
                kill_other(origin.clone()).await,
                StatusCode::FORBIDDEN,
                "cookie call with Origin {origin}"
            );
            let (status, _, _) = demo_login(
                &nginx,
                "127.0.0.1",
                "mallory",
                &[
                    ("Origin", origin),
                    ("X-Forwarded-Host", &forwarded_host(origin)),
                ],
            )
            .await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "demo login with Origin {origin}"
            );
        }
    }
    assert_eq!(api.me_status(&other.token).await, StatusCode::OK);

    // The nginx URL's own origin: the upgrade (101, then hello) on every node and the
    // cookie call.
    let mut nodes = BTreeSet::new();
    let mut sockets = Vec::new();
    for _ in 0..6 {
        let mut s = ws(nginx.clone())
            .await
            .expect("same-origin upgrade through nginx");
        s.assert_alive().await;
        nodes.insert(s.hello["node_id"].as_str().unwrap().to_owned());
        sockets.push(s);
    }
    assert!(nodes.len() >= 2, "nginx spread the upgrades: {nodes:?}");
    assert_eq!(kill_other(nginx.clone()).await, StatusCode::NO_CONTENT);
    assert_eq!(api.me_status(&other.token).await, StatusCode::UNAUTHORIZED);
    let (status, sid, _) = demo_login(&nginx, "127.0.0.1", "olive", &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "same-origin demo login through nginx"
    );
    for s in &mut sockets {
        let f = s.expect("session_created").await;
        assert_eq!(f["session"]["session_id"].as_str(), sid.as_deref());
    }
}

/// `X-Forwarded-For` and `-Proto` are believed from nginx only: sent straight to a
/// node from another address, they are ignored (the session records the real peer,
/// the cookie is not made Secure); through nginx, whatever the client sent is
/// replaced by what nginx saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_believed_from_nginx_only() {
    let cluster = ScriptCluster::start_with(&[("SESSIONHUB_DEMO", "true")]);
    let nginx = cluster.nginx().to_owned();
    let node = cluster.node_urls()[0].clone();
    let api = Api::at(&nginx);
    let spoof = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
    ];

    // 127.0.0.2 is loopback too, but not the trusted proxy (127.0.0.1).
    for (base, from, want) in [
        (&node, "127.0.0.2", "127.0.0.2"),
        (&nginx, "127.0.0.1", "127.0.0.1"),
        (&nginx, "127.0.0.2", "127.0.0.2"),
    ] {
        let (status, sid, cookie) = demo_login(base, from, "peggy", &spoof).await;
        assert_eq!(status, StatusCode::OK, "demo login at {base} from {from}");
        assert_eq!(
            recorded_ip(&api, &sid.unwrap()).await,
            want,
            "the address recorded for a login at {base} from {from}"
        );
        assert!(
            cookie.starts_with("sh_session=") && !cookie.contains("Secure"),
            "a plain-http login at {base} from {from} got {cookie}"
        );
    }

    // Without a spoofed header, nginx's own X-Forwarded-For reaches the node: the
    // client's address, not nginx's.
    let (status, sid, _) = demo_login(&nginx, "127.0.0.2", "peggy", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(recorded_ip(&api, &sid.unwrap()).await, "127.0.0.2");
}

/// An nginx master process, stopped on drop with SIGTERM (it stops its workers;
/// SIGKILL would leave them running) and waited for.
struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < end {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The nginx files docker-compose.yml mounts into the nginx container, as
/// (repository path, path under /etc/nginx/).
fn compose_nginx_mounts() -> Vec<(PathBuf, String)> {
    let compose = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    compose
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ./"))
        .filter_map(|l| {
            let mut parts = l.split(':');
            let src = parts.next()?;
            let dst = parts.next()?.strip_prefix("/etc/nginx/")?;
            Some((repo_root().join(src), dst.to_owned()))
        })
        .collect()
}

/// The docker-compose load balancer, as far as it runs without Docker: the host's
/// nginx with exactly the files the compose file mounts into /etc/nginx/, except
/// the two that name the nodes and the port, in front of the cluster.sh nodes
/// (which trust 127.0.0.1, where compose's trust nginx's fixed address). A browser's
/// calls work through it, foreign origins are refused, and a spoofed
/// X-Forwarded-For is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_nginx_config_serves_browsers() {
    let cluster = ScriptCluster::start_with(&[("SESSIONHUB_DEMO", "true")]);
    let mounts = compose_nginx_mounts();
    let names: BTreeSet<&str> = mounts.iter().map(|(_, d)| d.as_str()).collect();
    for want in [
        "nginx.conf",
        "sessionhub.conf",
        "sessionhub-proxy-headers.conf",
        "sessionhub-upstreams.conf",
        "sessionhub-listen.conf",
    ] {
        assert!(
            names.contains(want),
            "compose does not mount {want}: {names:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    for (src, dst) in &mounts {
        std::fs::copy(src, dir.path().join(dst)).unwrap();
    }
    let upstreams: String = cluster
        .node_urls()
        .iter()
        .map(|u| {
            format!(
                "server {} max_fails=2 fail_timeout=5s;\n",
                u.trim_start_matches("http://")
            )
        })
        .collect();
    std::fs::write(dir.path().join("sessionhub-upstreams.conf"), upstreams).unwrap();
    let port = free_port();
    std::fs::write(
        dir.path().join("sessionhub-listen.conf"),
        format!("listen 127.0.0.1:{port};\n"),
    )
    .unwrap();

    let nginx_bin = require("nginx", "apt-get install -y nginx");
    let prefix = dir.path().to_str().unwrap();
    let mut globals = format!("daemon off; pid {prefix}/nginx.pid; worker_processes 1;");
    if std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        globals.push_str(" user root;"); // its workers write the temp files under prefix
    }
    // Two changes to the container's nginx.conf, neither in sessionhub's part: one
    // worker (-g may not repeat `worker_processes auto`), and the access log in the
    // temp dir rather than the host's /var/log/nginx/.
    let conf = dir.path().join("nginx.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("worker_processes auto;") && text.contains("http {"));
    let text = text.replace("worker_processes auto;", "").replacen(
        "http {",
        &format!("http {{\n    access_log {prefix}/access.log;"),
        1,
    );
    std::fs::write(&conf, text).unwrap();
    let nginx = Nginx(
        std::process::Command::new(nginx_bin)
            .args(["-p", prefix, "-e", &format!("{prefix}/error.log"), "-c"])
            .arg(&conf)
            .args(["-g", &globals])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let health = format!("{base}/healthz");
    wait_for("the compose nginx config to answer", WAIT, || {
        let health = health.clone();
        async move {
            let res = reqwest::get(&health).await.ok()?;
            let server = res.headers().get("server")?.to_str().ok()?.to_owned();
            (res.status().is_success() && server.starts_with("nginx")).then_some(())
        }
    })
    .await;

    let api = Api::at(&base);
    let (status, sid, _) = demo_login(
        &base,
        "127.0.0.1",
        "quinn",
        &[("X-Forwarded-For", "203.0.113.9")],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "same-origin demo login through the compose nginx"
    );
    assert_eq!(recorded_ip(&api, &sid.unwrap()).await, "127.0.0.1");
    let (status, _, _) = demo_login(
        &base,
        "127.0.0.1",
        "quinn",
        &[
            ("Origin", "http://evil.example"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "foreign origin through the compose nginx"
    );

    let s = api.create_session("quinn", "Firefox on laptop").await;
    let cookie = format!("sh_session={}", s.token);
    let mut ws = WsClient::connect_url_with(
        &ws_url(&base),
        &[("Cookie", cookie.clone()), ("Origin", base.clone())],
    )
    .await
    .expect("same-origin upgrade through the compose nginx");
    ws.assert_alive().await;
    assert!(matches!(
        WsClient::connect_url_with(
            &ws_url(&base),
            &[("Cookie", cookie), ("Origin", "http://evil.example".into())],
        )
        .await,
        Err(sessionhub_tests::WsError::Http(403))
    ));
    drop(ws);
    drop(nginx);
}

/// With no node able to answer, nginx answers as a node would: 503, the API's JSON
/// error and `Retry-After` (it answered its own 502 HTML page, through a Redis
/// outage too, once every node was marked failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_node_left_nginx_answers_the_apis_503() {
    let cluster = ScriptCluster::start();
    let nginx = cluster.nginx().to_owned();
    let pids = std::fs::read_to_string(cluster.run_dir().join("pids")).unwrap();
    let nodes: Vec<&str> = pids
        .lines()
        .filter(|l| l.starts_with("node-"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(nodes.len(), 3, "{pids}");
    for pid in &nodes {
        let ok = std::process::Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    for path in ["/api/v1/presence", "/healthz"] {
        let res = reqwest::get(format!("{nginx}{path}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(res.headers()["retry-after"], "1", "{path}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"], "unavailable", "{path}: {body}");
    }
}

/// `scripts/cluster.sh` with an `NGINX_PORT` somebody else's server answers on:
/// an error naming the port, and nothing left running (it reported the cluster up
/// behind the other server, which answered while its own nginx retried the bind).
#[test]
fn cluster_sh_refuses_a_busy_nginx_port() {
    require("redis-server", "apt-get install -y redis-server");
    require("nginx", "apt-get install -y nginx");
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Write;
        for stream in other.incoming() {
            let Ok(mut s) = stream else { break };
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let run = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(repo_root().join("scripts/cluster.sh"))
        .arg("start")
        .arg(run.path())
        .env("SESSIONHUB_BIN", sessionhub_tests::process::node_binary())
        .env("NGINX_PORT", port.to_string())
        .env_remove("SESSIONHUB_UPDATE_DOCS")
        .env(
            "PATH",
            format!("/usr/sbin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started behind another server: {stderr}"
    );
    assert!(
        stderr.contains(&format!("NGINX_PORT {port} is in use")),
        "{stderr}"
    );
    assert!(
        !run.path().join("pids").exists(),
        "a failed start left its PID file"
    );
    // The nodes it had started are stopped: their ports refuse.
    let mut nodes = 0;
    for i in 1..=3 {
        let out = std::fs::read_to_string(run.path().join(format!("node-{i}.out"))).unwrap();
        let addr = out
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .unwrap_or_else(|| panic!("node-{i}.out: {out:?}"));
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "node-{i} ({addr}) still runs after the failed start"
        );
        nodes += 1;
    }
    assert_eq!(nodes, 3);
}

/// `scripts/cluster.sh stop` signals only the processes its `start` started: a
/// recorded PID that another program holds now (the process exited, the PID was
/// reused) is left alone.
#[test]
fn cluster_sh_stop_leaves_a_reused_pid_alone() {
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = bystander.id();
    let run = tempfile::tempdir().unwrap();
    let node = sessionhub_tests::process::node_binary();
    std::fs::write(
        run.path().join("pids"),
        format!("node-1 {pid} {}\nredis {pid}\n", node.display()),
    )
    .unwrap();
    let out = std::process::Command::new(repo_root().join("scripts/cluster.sh"))
        .arg("stop")
        .arg(run.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "cluster.sh stop killed PID {pid}, a process it did not start"
    );
    assert!(
        stderr.contains(&format!("node-1 (PID {pid}) is not running any more")),
        "{stderr}"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// The kill scripts against a Redis that answers with an error (here: no function
/// library loaded; equally a replica's READONLY, NOAUTH, a forgotten `-c`): they
/// fail with Redis's answer. redis-cli exits 0 on an error reply, and they printed
/// "killed READONLY ... session(s)" or "no such session", exit 0 for the former.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_kill_scripts_fail_on_an_error_reply() {
    require("redis-cli", "apt-get install -y redis-tools");
    let redis = sessionhub_tests::RedisServer::start().await;
    let run = |script: &str, arg: &str| {
        let out = std::process::Command::new(repo_root().join("deploy/ops").join(script))
            .arg(arg)
            .env("REDIS_CLI_ARGS", format!("-p {}", redis.port()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run("kill-user.sh", "alice");
    assert!(!ok, "kill-user.sh succeeded: {stdout}");
    assert!(!stdout.contains("killed"), "{stdout}");
    assert!(stderr.contains("Function not found"), "{stderr}");
    let (ok, stdout, stderr) = run("kill-session.sh", &"ab".repeat(16));
    assert!(!ok, "kill-session.sh succeeded: {stdout}");
    assert!(stderr.contains("Function not found"), "{stderr}");
    assert!(!stderr.contains("no such session"), "{stderr}");
    let (ok, _, stderr) = run("kill-session.sh", "not-a-session");
    assert!(!ok);
    assert!(stderr.contains("not a session id"), "{stderr}");
    let (ok, _, stderr) = run("nodes.sh", "");
    assert!(!ok);
    assert!(
        stderr.contains("no live node under key prefix sh:"),
        "{stderr}"
    );
}

/// A body over the shipped nginx config's limit gets the API's JSON 413, not
/// nginx's HTML page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_refuses_an_oversized_body_with_the_apis_json() {
    let cluster = ScriptCluster::start();
    let body = format!(
        r#"{{"user_id":"alice","user_agent":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    let res = reqwest::Client::new()
        .post(format!("{}/api/v1/sessions", cluster.nginx()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "too_large", "{body}");
}
