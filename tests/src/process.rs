//! Real processes: redis-server and sessionhub nodes.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{API_KEY, WAIT, wait_for};

/// Fails the test with the command that installs a missing program.
pub fn require(program: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{program}` is not installed; install it with: {install}"))
}

/// A port the OS says is free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// The repository root (for `lua/` and `README.md`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `sessionhub` binary built by `cargo build` (or `$SESSIONHUB_BIN`).
pub fn node_binary() -> PathBuf {
    built_binary("sessionhub", "SESSIONHUB_BIN")
}

/// A workspace binary built by `cargo build --workspace --bins` (the README's test
/// command does), or the path in `$env_override`.
pub fn built_binary(name: &str, env_override: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_override) {
        return PathBuf::from(p);
    }
    // This test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins` (the README's test command does)",
        bin.display()
    );
    bin
}

/// A redis-server on its own port and directory, killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    aof: bool,
}

impl RedisServer {
    /// Starts one (no persistence) and waits until it answers PING.
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts one, with AOF persistence (`appendfsync always`) if `aof`.
    pub async fn start_with(aof: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn_redis(port, dir.path(), aof).await {
                return Self {
                    child,
                    port,
                    dir,
                    aof,
                };
            }
        }
        panic!(
            "redis-server did not start; see its log in {}",
            dir.path().display()
        );
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection for assertions.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends it a signal (`STOP` pauses it, `CONT` resumes it).
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.child.id() {
            let ok = std::process::Command::new("kill")
                .args(["-s", sig, &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "could not send SIG{sig} to redis-server");
        }
    }

    /// Stops it cleanly (SIGTERM: it flushes its AOF) and waits for the exit.
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
        let _ = self.child.kill().await;
    }

    /// Starts it again on the same port and directory (so with its AOF, if any);
    /// with `wipe`, from an empty directory.
    pub async fn start_again(&mut self, wipe: bool) {
        if wipe {
            for entry in std::fs::read_dir(self.dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    std::fs::remove_dir_all(path).unwrap();
                } else if path.file_name().is_some_and(|n| n != "redis.log") {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
        self.child = spawn_redis(self.port, self.dir.path(), self.aof)
            .await
            .expect("redis-server did not restart on its port");
    }

    /// Cuts every pub/sub client's link (the nodes' subscribers).
    pub async fn kill_pubsub_clients(&self) -> u64 {
        let mut c = self.conn().await;
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut c)
            .await
            .unwrap()
    }
}

/// Spawns redis-server on `port`; `None` if it exits (port taken) or never answers.
async fn spawn_redis(port: u16, dir: &Path, aof: bool) -> Option<Child> {
    let bin = require("redis-server", "apt-get install -y redis-server");
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .arg("--dir")
    .arg(dir)
    .args(["--logfile", "redis.log"]);
    if aof {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    let end = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if ping(&url).await {
            return Some(child);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill().await;
    None
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut c)
        .await
        .is_ok()
}

/// How to start a node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Node id.
    pub node_id: String,
    /// Redis URL (none: in-memory engine).
    pub redis_url: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Its log (stderr) goes to a pipe that nobody reads, as when a log collector
    /// stops reading; [`Node::log`] is then empty.
    pub stderr_unread: bool,
}

/// A node that did not start: what its stdout gave instead of the "listening"
/// line, how it exited, and its log.
#[derive(Debug)]
pub struct NotStarted {
    /// The first line's read, as it failed (end of output, timeout).
    pub line: String,
    /// Its exit status (`None`: it had to be killed).
    pub status: Option<std::process::ExitStatus>,
    /// Its log.
    pub log: String,
}

/// A running sessionhub node process, killed on drop.
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Its node id.
    pub id: String,
    log: PathBuf,
    _logdir: tempfile::TempDir,
    /// The unread end of the log's pipe (`NodeOptions::stderr_unread`), kept open.
    _stderr: Option<tokio::process::ChildStderr>,
}

impl Node {
    /// Starts a node on a free port and waits for its "listening" line.
    pub async fn start(opts: NodeOptions) -> Self {
        let id = opts.node_id.clone();
        match Self::try_start(opts).await {
            Ok(node) => node,
            Err(NotStarted { line, log, .. }) => {
                panic!("node {id} did not start ({line:?}); its log:\n{log}")
            }
        }
    }

    /// Starts a node on a free port; if it exits (or stays silent for 30 s) before
    /// its "listening" line, says how, with its log.
    pub async fn try_start(opts: NodeOptions) -> Result<Self, NotStarted> {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("node.log");
        let mut cmd = Command::new(node_binary());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SESSIONHUB_LISTEN", "127.0.0.1:0")
            .env("SESSIONHUB_NODE_ID", &opts.node_id)
            .env("SESSIONHUB_API_KEY", API_KEY)
            .env("RUST_LOG", "info,sessionhub_server=debug");
        if let Some(url) = &opts.redis_url {
            cmd.env("SESSIONHUB_REDIS_URL", url);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let stderr = if opts.stderr_unread {
            Stdio::piped()
        } else {
            Stdio::from(std::fs::File::create(&log).unwrap())
        };
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let unread = child.stderr.take();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let line = match line {
            Ok(Ok(Some(l))) => l,
            other => {
                // Its stdout closed: it is exiting. Otherwise it is stuck.
                let status = match &other {
                    Ok(Ok(None)) => tokio::time::timeout(WAIT, child.wait())
                        .await
                        .ok()
                        .and_then(Result::ok),
                    _ => None,
                };
                if status.is_none() {
                    let _ = child.kill().await;
                }
                return Err(NotStarted {
                    line: format!("{other:?}"),
                    status,
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
        };
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Ok(Self {
            child,
            base: format!("http://{addr}"),
            id: opts.node_id,
            log,
            _logdir: logdir,
            _stderr: unread,
        })
    }

    /// `ws://…/ws` of this node.
    pub fn ws_url(&self) -> String {
        format!("{}/ws", self.base.replacen("http://", "ws://", 1))
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the node's log holds `needle` (a thread of the node's own writes
    /// it, a moment after the event), or panics with the log after `deadline`.
    pub async fn wait_log(&self, needle: &str, deadline: Duration) {
        let end = tokio::time::Instant::now() + deadline;
        while !self.log().contains(needle) {
            if tokio::time::Instant::now() >= end {
                panic!(
                    "node {}'s log has no {needle:?} after {deadline:?}:\n{}",
                    self.id,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the node (SIGTERM) and returns its whole log: on exit the node writes
    /// out every line still queued, so a check that a line is absent sees all.
    pub async fn stop_and_log(&mut self) -> String {
        self.signal("TERM");
        tokio::time::timeout(Duration::from_secs(30), self.wait())
            .await
            .expect("the node did not exit within 30 s of SIGTERM");
        self.log()
    }

    /// The process, for signals.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().await.unwrap()
    }

    /// Sends SIGSTOP and waits until every thread of the process has stopped: the
    /// signal is only pending when `kill` returns, and a thread not yet stopped can
    /// still act (read a closed link, subscribe again) on a loaded machine.
    pub async fn pause(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.pid().expect("node already reaped"));
        wait_for("the node's threads to stop", WAIT, || {
            let tasks = tasks.clone();
            async move {
                let all_stopped = std::fs::read_dir(&tasks).ok()?.all(|t| {
                    t.ok()
                        .and_then(|t| std::fs::read_to_string(t.path().join("stat")).ok())
                        .and_then(|stat| {
                            // The state follows the command name, which is in parentheses.
                            stat.rsplit_once(')').and_then(|(_, rest)| {
                                rest.split_whitespace().next().map(str::to_owned)
                            })
                        })
                        .is_some_and(|state| state == "T" || state == "t")
                });
                all_stopped.then_some(())
            }
        })
        .await;
    }

    /// Sends a signal (`KILL`, `TERM`, `STOP`, `CONT`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("node already reaped").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {sig} {pid}");
    }

    /// A metric's value in the node's `/metrics` (a line `<name> <value>`), if the
    /// node answers and has it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// `GET /healthz` as JSON.
    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(format!("{}/healthz", self.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log of node {} ----\n{}", self.id, self.log());
            return;
        }
        if let Some(secret) = crate::secrets::leaked_in(&self.log()) {
            panic!(
                "node {}'s log contains the raw token secret {secret}",
                self.id
            );
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let dump = crate::secrets::dump_redis(&self.url())
            .unwrap_or_else(|e| panic!("could not scan Redis for tokens: {e}"));
        if let Some(secret) = crate::secrets::leaked_in(&dump) {
            panic!("Redis holds the raw token secret {secret}");
        }
    }
}

/// One redis-server and N nodes on it, named `node-a`, `node-b`, ...
pub struct TestCluster {
    /// The shared Redis.
    pub redis: RedisServer,
    /// The nodes.
    pub nodes: Vec<Node>,
}

/// Short lease timing for fault tests: a dead node is reaped within
/// `FAST_REAP_BOUND`.
pub const FAST_LEASE: &[(&str, &str)] = &[
    ("SESSIONHUB_LEASE_TTL_MS", "1500"),
    ("SESSIONHUB_HEARTBEAT_MS", "500"),
    ("SESSIONHUB_REAP_INTERVAL_MS", "500"),
    ("SESSIONHUB_REVALIDATE_MS", "1000"),
];

/// Lease TTL + reap interval of [`FAST_LEASE`], plus slack for a loaded machine.
pub const FAST_REAP_BOUND: Duration = Duration::from_millis(1500 + 500 + 2000);

impl TestCluster {
    /// Starts Redis and `n` nodes.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, &[]).await
    }

    /// Starts Redis and `n` nodes with extra environment.
    pub async fn start_with(n: usize, env: &[(&str, &str)]) -> Self {
        Self::start_on(RedisServer::start().await, n, env).await
    }

    /// Starts `n` nodes with extra environment on a Redis already running.
    pub async fn start_on(redis: RedisServer, n: usize, env: &[(&str, &str)]) -> Self {
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(Self::node(&redis, i, env).await);
        }
        Self { redis, nodes }
    }

    /// Starts node number `i` (`node-a`, `node-b`, ...) on `redis`.
    pub async fn node(redis: &RedisServer, i: usize, env: &[(&str, &str)]) -> Node {
        let mut opts = NodeOptions::numbered(i, env);
        opts.redis_url = Some(redis.url());
        Node::start(opts).await
    }
}

impl NodeOptions {
    /// Options for node number `i` (`node-a`, `node-b`, ...) with extra environment
    /// and no store yet.
    pub fn numbered(i: usize, env: &[(&str, &str)]) -> Self {
        Self {
            node_id: format!("node-{}", (b'a' + i as u8) as char),
            redis_url: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            stderr_unread: false,
        }
    }
}

/// Waits until `node` answers `/readyz` (connected, subscribed, resynced).
pub async fn wait_ready(node: &Node) {
    wait_ok(node, "/readyz").await
}

/// Waits until `node` answers 2xx on `path`.
async fn wait_ok(node: &Node, path: &str) {
    let url = format!("{}{path}", node.base);
    wait_for(&format!("{} {path}", node.id), WAIT, || {
        let url = url.clone();
        async move {
            reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        }
    })
    .await
}
