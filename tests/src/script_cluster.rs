//! A cluster started by `scripts/cluster.sh`, as users run it: redis-server, three
//! nodes and the shipped nginx config, all on loopback.

use std::collections::HashMap;
use std::path::Path;

use crate::process::{node_binary, repo_root, require};
use crate::secrets;

/// A cluster started by scripts/cluster.sh, stopped on drop (which also checks that
/// no node log holds a raw token).
pub struct ScriptCluster {
    run: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl ScriptCluster {
    /// Starts the cluster with the script's defaults.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts the cluster with extra `SESSIONHUB_*` settings for the nodes.
    pub fn start_with(env: &[(&str, &str)]) -> Self {
        require("redis-server", "apt-get install -y redis-server");
        require("nginx", "apt-get install -y nginx");
        let run = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(repo_root().join("scripts/cluster.sh"))
            .arg("start")
            .arg(run.path())
            .env("SESSIONHUB_BIN", node_binary())
            .env("SESSIONHUB_API_KEY", crate::API_KEY)
            // A test switch, not a setting: the nodes refuse unknown SESSIONHUB_* names.
            .env_remove("SESSIONHUB_UPDATE_DOCS")
            .env(
                "PATH",
                format!("/usr/sbin:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(run.path().join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        Self { run, env }
    }

    /// The nginx URL, `http://127.0.0.1:<port>`.
    pub fn nginx(&self) -> &str {
        &self.env["NGINX_URL"]
    }

    /// The nodes' own URLs, in order (node-1 first).
    pub fn node_urls(&self) -> Vec<String> {
        self.env["NODE_URLS"]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Redis's port.
    pub fn redis_port(&self) -> &str {
        &self.env["REDIS_PORT"]
    }

    /// The run directory (logs, generated nginx config, env).
    pub fn run_dir(&self) -> &Path {
        self.run.path()
    }

    /// Runs a deploy/ops script as documented; returns its stdout.
    pub fn ops(&self, script: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(repo_root().join("deploy/ops").join(script))
            .args(args)
            .env("REDIS_CLI_ARGS", format!("-p {}", self.redis_port()))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Every node's log.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for i in 1..=self.node_urls().len() {
            all.push_str(
                &std::fs::read_to_string(self.run.path().join(format!("node-{i}.log")))
                    .unwrap_or_default(),
            );
        }
        all
    }
}

impl Drop for ScriptCluster {
    fn drop(&mut self) {
        // Stopped first: a node writes out its queued log lines as it exits.
        let stopped = std::process::Command::new(repo_root().join("scripts/cluster.sh"))
            .arg("stop")
            .arg(self.run.path())
            .status();
        let logs = self.logs();
        if std::thread::panicking() {
            eprintln!("---- node logs ----\n{logs}");
            return;
        }
        assert!(stopped.is_ok_and(|s| s.success()), "cluster.sh stop failed");
        assert_eq!(
            secrets::leaked_in(&logs),
            None,
            "a node log holds a raw token"
        );
    }
}
