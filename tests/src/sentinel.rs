//! Redis Sentinel in tests: a master, a replica and three sentinels
//! (`redis-server <conf> --sentinel`), each its own process with its own temporary
//! directory and port from the OS, with failure detection tuned short.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::process::{free_port, require};
use crate::{WAIT, wait_for};

/// The master's name in the sentinels' configuration.
pub const MASTER_NAME: &str = "sh-master";
/// A master silent this long is down for a sentinel (`down-after-milliseconds`).
pub const DOWN_AFTER_MS: u64 = 1000;
/// `failover-timeout`: bound on one failover attempt before another may start.
pub const FAILOVER_TIMEOUT_MS: u64 = 4000;
/// Bound on the sentinels finding each other and the replica after start-up (hello
/// messages every 2 s, INFO every 10 s at worst), on a loaded machine.
const SETTLE_BOUND: Duration = Duration::from_secs(40);

/// One redis-server process (a data node or a sentinel), killed on drop.
pub struct Proc {
    child: Child,
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Proc {
    /// Its `redis://` URL.
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

    /// Its directory (logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL: no goodbye to replicas or sentinels.
    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts redis-server with `args(port, dir)` on a free port; retries on a taken port.
async fn spawn(what: &str, args: impl Fn(u16, &Path) -> Vec<OsString>) -> Proc {
    let bin = require("redis-server", "apt-get install -y redis-server");
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(args(port, dir.path()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("redis://127.0.0.1:{port}");
        let end = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < end {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if ping(&url).await {
                return Proc { child, port, dir };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill().await;
    }
    panic!("{what} did not start; see {}", dir.path().display());
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut c)) = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut c)
        .await
        .is_ok()
}

fn data_args(port: u16, dir: &Path, replica_of: Option<u16>) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--logfile",
        "redis.log",
    ]
    .map(OsString::from)
    .to_vec();
    args.extend(["--dir".into(), dir.as_os_str().to_owned()]);
    if let Some(master) = replica_of {
        args.extend(["--replicaof", "127.0.0.1", &master.to_string()].map(OsString::from));
    }
    args
}

/// A master, a replica and three sentinels watching them.
pub struct SentinelSet {
    /// The first master.
    pub master: Proc,
    /// Its replica, to be promoted.
    pub replica: Proc,
    /// The sentinels.
    pub sentinels: Vec<Proc>,
}

impl SentinelSet {
    /// Starts them all and waits until every sentinel knows the replica and the
    /// two other sentinels (so a failover can be agreed).
    pub async fn start() -> Self {
        let master = spawn("the master", |p, d| data_args(p, d, None)).await;
        let mport = master.port;
        let replica = spawn("the replica", |p, d| data_args(p, d, Some(mport))).await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(
                spawn("a sentinel", |port, dir| {
                    let conf = dir.join("sentinel.conf");
                    std::fs::write(
                        &conf,
                        format!(
                            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile sentinel.log\n\
                             sentinel monitor {MASTER_NAME} 127.0.0.1 {mport} 2\n\
                             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                             sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
                             sentinel parallel-syncs {MASTER_NAME} 1\n",
                            dir = dir.display()
                        ),
                    )
                    .unwrap();
                    vec![conf.into_os_string(), "--sentinel".into()]
                })
                .await,
            );
        }
        let set = Self {
            master,
            replica,
            sentinels,
        };
        set.wait_settled().await;
        set
    }

    /// The sentinels' URLs, comma-separated.
    pub fn sentinel_urls(&self) -> String {
        self.sentinels
            .iter()
            .map(Proc::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The environment that points a node at these sentinels.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SESSIONHUB_REDIS_SENTINELS".into(), self.sentinel_urls()),
            (
                "SESSIONHUB_REDIS_SENTINEL_MASTER".into(),
                MASTER_NAME.into(),
            ),
        ]
    }

    async fn wait_settled(&self) {
        for s in &self.sentinels {
            let url = s.url();
            wait_for(
                "every sentinel to know the replica and the other sentinels",
                SETTLE_BOUND,
                || {
                    let url = url.clone();
                    async move {
                        let client = redis::Client::open(url).ok()?;
                        let mut c = client.get_multiplexed_async_connection().await.ok()?;
                        let replicas: Vec<Vec<String>> = redis::cmd("SENTINEL")
                            .arg("replicas")
                            .arg(MASTER_NAME)
                            .query_async(&mut c)
                            .await
                            .ok()?;
                        let peers: Vec<Vec<String>> = redis::cmd("SENTINEL")
                            .arg("sentinels")
                            .arg(MASTER_NAME)
                            .query_async(&mut c)
                            .await
                            .ok()?;
                        let linked = replicas.iter().any(|r| {
                            field(r, "flags") == Some("slave")
                                && field(r, "master-link-status") == Some("ok")
                        });
                        (linked && peers.len() == 2).then_some(())
                    }
                },
            )
            .await;
        }
    }

    /// The master's port as the first answering sentinel names it.
    pub async fn named_master_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            let Ok(client) = redis::Client::open(s.url()) else {
                continue;
            };
            let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let addr: Result<Option<(String, u16)>, _> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(MASTER_NAME)
                .query_async(&mut c)
                .await;
            if let Ok(Some((_, port))) = addr {
                return Some(port);
            }
        }
        None
    }
}

/// A field of a `SENTINEL replicas`/`sentinels` entry (flat name, value pairs).
fn field<'a>(entry: &'a [String], name: &str) -> Option<&'a str> {
    entry
        .chunks(2)
        .find(|kv| kv[0] == name)
        .and_then(|kv| kv.get(1))
        .map(String::as_str)
}
