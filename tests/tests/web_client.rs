//! The browser client (`web/sessionhub.js`) against a scripted WebSocket in
//! Node.js (`tests/browser/client.mjs`): keepalive, recovery position, reconnect
//! races and backoff, which a real server cannot be made to produce on cue. The
//! real-browser scenarios are in `browser.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use sessionhub_tests::process::{repo_root, require};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_keeps_alive_recovers_and_reconnects_as_documented() {
    let node = require("node", "apt-get install -y nodejs npm");
    let run = tokio::process::Command::new(node)
        .arg("tests/browser/client.mjs")
        .current_dir(repo_root())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("client.mjs did not finish in 60 s")
        .expect("could not run node");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client.mjs failed:\n{text}");
    assert!(
        text.lines().filter(|l| l.starts_with("ok ")).count() >= 5,
        "{text}"
    );
}
