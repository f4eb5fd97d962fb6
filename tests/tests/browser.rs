//! The browser client and the demo app in a real headless Chromium: a real
//! redis-server, a real 2-node cluster with the demo on, the harness's TCP proxy in
//! front of both nodes (for the scenarios that pick a node or kill one), the
//! deployment of scripts/cluster.sh (Redis, three nodes, the shipped nginx config)
//! for the ones that go through nginx as users do, and `tests/browser/demo.mjs`
//! driving Debian's Chromium with playwright-core. The scenarios are described in
//! that script.
//!
//! Needs node, /usr/bin/chromium and the script's npm packages; without them this
//! test fails with the command that installs them (`scripts/test.sh` runs them all).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sessionhub_tests::process::{free_port, repo_root, require};
use sessionhub_tests::proxy::Proxy;
use sessionhub_tests::{ScriptCluster, TestCluster, secrets};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";
const SCRIPT: &str = "demo.mjs";
/// The whole browser run; it takes well under a minute when it passes.
const DEADLINE: Duration = Duration::from_secs(150);

/// The browser tests' folder, after checking that everything it needs is there.
/// Returns the `node` binary.
fn prerequisites(dir: &Path) -> PathBuf {
    let node = require("node", "apt-get install -y nodejs npm");
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is not installed; install it with: apt-get install -y chromium"
    );
    let npm_ci = format!(
        "(cd {} && npm ci --no-audit --no-fund)",
        dir.strip_prefix(repo_root()).unwrap_or(dir).display()
    );
    let read = |p: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    };
    let locked = read(dir.join("package-lock.json")).expect("tests/browser/package-lock.json");
    let want = locked["packages"]["node_modules/playwright-core"]["version"].clone();
    let have = read(dir.join("node_modules/playwright-core/package.json"))
        .map(|p| p["version"].clone())
        .unwrap_or_else(|| {
            panic!("the browser tests' npm packages are not installed; install them with: {npm_ci}")
        });
    assert_eq!(
        have, want,
        "installed playwright-core is not the locked version; reinstall with: {npm_ci}"
    );
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_app_in_headless_chromium() {
    let dir = repo_root().join("tests/browser");
    let node_bin = prerequisites(&dir);

    let mut cluster = TestCluster::start_with(2, &[("SESSIONHUB_DEMO", "true")]).await;
    let proxy = Proxy::for_bases(cluster.nodes.iter().map(|n| n.base.as_str())).await;
    let deployment = ScriptCluster::start_with(&[("SESSIONHUB_DEMO", "true")]);
    let artifacts = repo_root().join("artifacts/browser");

    let mut child = Command::new(node_bin)
        .arg(SCRIPT)
        .current_dir(&dir)
        .env("SESSIONHUB_NODE_A", &cluster.nodes[0].base)
        .env("SESSIONHUB_NODE_B", &cluster.nodes[1].base)
        .env("SESSIONHUB_PROXY", proxy.base())
        .env("SESSIONHUB_NGINX", deployment.nginx())
        .env("SESSIONHUB_ARTIFACTS", &artifacts)
        .env("SESSIONHUB_CLOSED_PORT", free_port().to_string())
        .env("SESSIONHUB_API_KEY", sessionhub_tests::API_KEY)
        .env("CHROMIUM_PATH", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let err_text = Arc::new(Mutex::new(String::new()));
    let err_task = tokio::spawn({
        let err_text = err_text.clone();
        async move {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf).await;
            err_text
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf));
        }
    });

    // The script's output, and its requests: "@@token <cookie>" (remember it for the
    // leak scan), "@@kill <node-id>" (SIGKILL that node, then answer "ok"),
    // "@@deafen <node-id>" (SIGSTOP it and have Redis drop the pub/sub links, so that
    // what is published meanwhile never reaches it) and "@@resume <node-id>"
    // (SIGCONT it).
    let mut out = String::new();
    let run = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(token) = line.strip_prefix("@@token ") {
                secrets::remember(token);
            } else if let Some((verb, id)) = line
                .strip_prefix("@@")
                .and_then(|c| c.split_once(' '))
                .filter(|(verb, _)| matches!(*verb, "kill" | "deafen" | "resume"))
            {
                let node = cluster
                    .nodes
                    .iter_mut()
                    .find(|n| n.id == id)
                    .unwrap_or_else(|| panic!("the script asked to {verb} unknown node {id}"));
                let done = match verb {
                    "kill" => {
                        node.signal("KILL");
                        node.wait().await;
                        "SIGKILLed"
                    }
                    "deafen" => {
                        node.pause().await;
                        // Every subscriber's link: the stopped node's stays down, the
                        // other node subscribes again at once.
                        let _: i64 = redis::cmd("CLIENT")
                            .arg("KILL")
                            .arg("TYPE")
                            .arg("pubsub")
                            .query_async(&mut cluster.redis.conn().await)
                            .await
                            .unwrap();
                        "SIGSTOPped, pub/sub links dropped"
                    }
                    _ => {
                        node.signal("CONT");
                        "SIGCONTed"
                    }
                };
                out.push_str(&format!("[test] {id} {done}\n"));
                stdin.write_all(b"ok\n").await.unwrap();
                stdin.flush().await.unwrap();
            } else {
                out.push_str(&line);
                out.push('\n');
            }
        }
        child.wait().await.unwrap()
    };
    let finished = tokio::time::timeout(DEADLINE, run).await;
    let status = match finished {
        Ok(status) => Some(status),
        Err(_) => {
            // SIGTERM first: playwright closes Chromium on it.
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            None
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), err_task).await;
    let report = format!(
        "---- {SCRIPT} stdout ----\n{out}---- {SCRIPT} stderr ----\n{}\n(screenshots in {})",
        err_text.lock().unwrap(),
        artifacts.display()
    );
    match status {
        None => panic!("{SCRIPT} did not finish within {DEADLINE:?}\n{report}"),
        Some(s) if !s.success() => panic!("{SCRIPT} failed ({s})\n{report}"),
        Some(_) => println!("{report}"),
    }
    assert!(
        out.contains("12 passed, 0 failed"),
        "{SCRIPT} did not run every scenario\n{report}"
    );
    drop(proxy);
    drop(deployment);
}
