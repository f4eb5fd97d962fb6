//! A real Redis Cluster on loopback: six `redis-server` processes (three masters,
//! three replicas), each on its own port and directory, killed on drop.
//!
//! Every wait polls the nodes' own view of the cluster (`CLUSTER INFO`, `CLUSTER
//! NODES`, `CLUSTER SLOTS`) with a deadline; nothing sleeps to synchronise.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::join_all;
use redis::Value;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::WAIT;
use crate::process::require;

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// `--cluster-node-timeout` of every node, in milliseconds.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// How many `redis-server` processes [`RedisCluster::start`] runs.
const NODES: usize = 6;

/// How many of them are masters.
const MASTERS: usize = 3;

/// How long a plain `CLUSTER FAILOVER` may take before the harness retries it with
/// `FORCE` (Redis itself gives up a manual failover after 5 s).
const PLAIN_FAILOVER_GRACE: Duration = Duration::from_secs(6);

/// Pause between two polls of the nodes.
const POLL: Duration = Duration::from_millis(50);

/// One master and the slots it serves, as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Port of the master.
    pub master: u16,
    /// Inclusive slot ranges it owns, ascending.
    pub slots: Vec<(u16, u16)>,
    /// Ports of its replicas not flagged `fail`, ascending.
    pub replicas: Vec<u16>,
}

/// One node's view of the cluster, without the parts that differ per observer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    /// Masters owning slots, ordered by their first slot.
    shards: Vec<Shard>,
    /// Ports of nodes flagged `fail` (not `fail?`), ascending.
    failed: Vec<u16>,
    /// How many nodes the table holds.
    nodes: usize,
    /// Nodes still in handshake or without an address: the table is in flux.
    unsettled: Vec<String>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    port: u16,
    flags: Vec<String>,
    master_id: Option<String>,
    slots: Vec<(u16, u16)>,
}

impl Entry {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// One `redis-server` of the cluster.
struct ClusterNode {
    port: u16,
    /// `None` once killed.
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// Six `redis-server` processes on loopback forming a Redis Cluster of three
/// masters with one replica each; every process is killed on drop.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    /// Slot ranges of masters killed by [`RedisCluster::kill_node`].
    killed_slots: HashMap<u16, Vec<(u16, u16)>>,
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create` (three
    /// masters, one replica each), and waits until every node reports
    /// `cluster_state:ok` and all agree on who serves all 16384 slots.
    pub async fn start() -> Self {
        let bin = require("redis-server", "apt-get install -y redis-server");
        let cli = require("redis-cli", "apt-get install -y redis-tools");
        let nodes = join_all((0..NODES).map(|_| start_node(&bin))).await;
        let cluster = Self {
            nodes,
            killed_slots: HashMap::new(),
        };

        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(3 * WAIT, create.output())
            .await
            .expect("`redis-cli --cluster create` timed out")
            .expect("could not run redis-cli");
        assert!(
            out.status.success(),
            "`redis-cli --cluster create` failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        cluster
            .wait_settled("the cluster to form", 2 * WAIT, |s| {
                if s.nodes != NODES {
                    return Err(format!("{} nodes known, want {NODES}", s.nodes));
                }
                if !s.failed.is_empty() {
                    return Err(format!("nodes flagged fail: {:?}", s.failed));
                }
                if s.shards.len() != MASTERS {
                    return Err(format!("{} masters, want {MASTERS}", s.shards.len()));
                }
                if let Some(sh) = s.shards.iter().find(|sh| sh.replicas.len() != 1) {
                    return Err(format!(
                        "master {} has replicas {:?}",
                        sh.master, sh.replicas
                    ));
                }
                Ok(())
            })
            .await;
        cluster
    }

    /// Ports of all six nodes, in start order (killed ones included).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Ports of the nodes not killed.
    pub fn alive_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `redis://127.0.0.1:<port>` for all six nodes.
    pub fn seeds(&self) -> Vec<String> {
        self.ports().iter().map(|p| url(*p)).collect()
    }

    /// The comma-joined [`seeds`](Self::seeds): the value for
    /// `SESSIONHUB_REDIS_CLUSTER`.
    pub fn cluster_env(&self) -> String {
        self.seeds().join(",")
    }

    /// The data directory of the node on `port` (holds `redis.log` and `nodes.conf`).
    pub fn dir(&self, port: u16) -> &Path {
        self.node(port).dir.path()
    }

    /// The shards (masters owning slots, with their replicas) as one live node sees
    /// them, ordered by slot. Reflects failovers; may be mid-change while one is in
    /// progress.
    pub async fn shards(&self) -> Vec<Shard> {
        self.any_snapshot().await.shards
    }

    /// Ports of the current masters, ordered by the slots they own.
    pub async fn masters(&self) -> Vec<u16> {
        self.shards().await.iter().map(|s| s.master).collect()
    }

    /// Ports of the replicas of the master on `master` (not flagged `fail`).
    pub async fn replicas_of(&self, master: u16) -> Vec<u16> {
        self.shards()
            .await
            .into_iter()
            .find(|s| s.master == master)
            .map(|s| s.replicas)
            .unwrap_or_default()
    }

    /// Port of the master currently serving `slot`.
    pub async fn master_for_slot(&self, slot: u16) -> u16 {
        assert!(slot < SLOTS, "slot {slot} out of range");
        let shards = self.shards().await;
        owner(&shards, slot).unwrap_or_else(|| panic!("no master serves slot {slot}: {shards:?}"))
    }

    /// Port of the master currently serving `key`.
    pub async fn master_for_key(&self, key: &str) -> u16 {
        self.master_for_slot(Self::key_slot(key)).await
    }

    /// The hash slot of `key`: CRC16/XMODEM of the key, or of its hash tag (the
    /// text between the first `{` and the next `}`, when not empty), mod 16384.
    pub fn key_slot(key: &str) -> u16 {
        let b = key.as_bytes();
        let hashed = b
            .iter()
            .position(|&c| c == b'{')
            .and_then(|open| {
                let rest = &b[open + 1..];
                rest.iter()
                    .position(|&c| c == b'}')
                    .filter(|&close| close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(b);
        crc16(hashed) % SLOTS
    }

    /// A plain (non-cluster) connection to the node on `port`.
    pub async fn conn(&self, port: u16) -> redis::aio::MultiplexedConnection {
        connect(port, WAIT)
            .await
            .unwrap_or_else(|e| panic!("could not connect to 127.0.0.1:{port}: {e}"))
    }

    /// `PUBSUB SHARDNUMSUB channel` on the node on `port`.
    pub async fn shard_numsub(&self, port: u16, channel: &str) -> u64 {
        let mut c = self.conn(port).await;
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .unwrap();
        n
    }

    /// `calls` of `cmdstat_<command>` in `INFO commandstats` of the node on `port`
    /// (0 when the command never ran there). `command` is case-insensitive;
    /// subcommands are written `cluster|info`.
    pub async fn command_calls(&self, port: u16, command: &str) -> u64 {
        let info = self.info(port, "commandstats").await;
        let prefix = format!("cmdstat_{}:", command.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|fields| fields.split(',').find_map(|f| f.strip_prefix("calls=")))
            .map(|n| n.trim().parse().expect("calls=<number>"))
            .unwrap_or(0)
    }

    /// [`command_calls`](Self::command_calls) of `command` on each current master,
    /// in [`masters`](Self::masters) order.
    pub async fn command_calls_per_master(&self, command: &str) -> Vec<(u16, u64)> {
        let mut out = Vec::new();
        for m in self.masters().await {
            out.push((m, self.command_calls(m, command).await));
        }
        out
    }

    /// `total_commands_processed` from `INFO stats` of each current master, in
    /// [`masters`](Self::masters) order.
    pub async fn stats_per_master(&self) -> Vec<(u16, u64)> {
        let mut out = Vec::new();
        for m in self.masters().await {
            let info = self.info(m, "stats").await;
            let n = info
                .lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .map(|n| n.trim().parse().expect("total_commands_processed:<number>"))
                .expect("INFO stats has total_commands_processed");
            out.push((m, n));
        }
        out
    }

    /// `CONFIG RESETSTAT` on every live node (zeroes `INFO stats` and
    /// `INFO commandstats`).
    pub async fn reset_stats(&self) {
        for p in self.alive_ports() {
            let mut c = self.conn(p).await;
            let () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }

    /// Promotes a replica of the master on `master_port` with `CLUSTER FAILOVER`
    /// (retried with `FORCE` if the plain one has not happened after a few
    /// seconds), waits until every node agrees that it serves the old master's
    /// slots, that the old master is its replica and that `cluster_state` is `ok`,
    /// and returns the new master's port.
    pub async fn failover(&self, master_port: u16) -> u16 {
        let before = self.settled_now("a failover").await;
        let shard = before
            .shards
            .iter()
            .find(|s| s.master == master_port)
            .unwrap_or_else(|| panic!("{master_port} is not a master: {:?}", before.shards))
            .clone();
        let replica = *shard
            .replicas
            .first()
            .unwrap_or_else(|| panic!("master {master_port} has no replica to fail over to"));
        self.cluster_failover(replica, false).await;

        let started = Instant::now();
        let deadline = PLAIN_FAILOVER_GRACE + 2 * WAIT;
        let mut forced = false;
        loop {
            let result = self.settled().await.and_then(|s| {
                let now = owner(&s.shards, shard.slots[0].0);
                if now != Some(replica) {
                    return Err(format!("slot {} served by {now:?}", shard.slots[0].0));
                }
                let new = s.shards.iter().find(|sh| sh.master == replica);
                if !new.is_some_and(|sh| sh.replicas.contains(&master_port)) {
                    return Err(format!("{master_port} is not yet a replica of {replica}"));
                }
                Ok(())
            });
            let last = match result {
                Ok(()) => return replica,
                Err(e) => e,
            };
            if started.elapsed() >= deadline {
                self.panic_with_views(&format!(
                    "failover of {master_port} to {replica} (forced: {forced}) after {deadline:?}: {last}"
                ))
                .await;
            }
            if !forced && started.elapsed() >= PLAIN_FAILOVER_GRACE {
                let promoted = self
                    .snapshot(replica)
                    .await
                    .is_ok_and(|s| s.shards.iter().any(|sh| sh.master == replica));
                if !promoted {
                    self.cluster_failover(replica, true).await;
                    forced = true;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILLs the master on `port`, then waits for one of its replicas to take
    /// over ([`wait_takeover`](Self::wait_takeover)); returns the new master's port.
    pub async fn kill_master(&mut self, port: u16) -> u16 {
        self.kill_node(port).await;
        self.wait_takeover(port).await
    }

    /// SIGKILLs the node on `port` (master or replica) and reaps it; if it was a
    /// master, remembers its slots for [`wait_takeover`](Self::wait_takeover).
    pub async fn kill_node(&mut self, port: u16) {
        let slots = self
            .any_snapshot()
            .await
            .shards
            .into_iter()
            .find(|s| s.master == port)
            .map(|s| s.slots);
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"));
        let mut child = node.child.take().expect("node already killed");
        child.start_kill().unwrap();
        tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("redis-server did not die of SIGKILL")
            .unwrap();
        if let Some(slots) = slots {
            self.killed_slots.insert(port, slots);
        }
    }

    /// Waits until, on every live node, `cluster_state` is `ok`, the master killed
    /// on `dead_port` is flagged `fail`, and another master (its former replica)
    /// serves its slots; returns that master's port.
    pub async fn wait_takeover(&self, dead_port: u16) -> u16 {
        let slots = self
            .killed_slots
            .get(&dead_port)
            .unwrap_or_else(|| panic!("{dead_port} is not a master killed by kill_node"))
            .clone();
        let first = slots[0].0;
        self.wait_settled(
            &format!("a replica to take over from the killed {dead_port}"),
            2 * WAIT,
            |s| {
                if !s.failed.contains(&dead_port) {
                    return Err(format!("{dead_port} not flagged fail"));
                }
                let shard =
                    owner(&s.shards, first).and_then(|m| s.shards.iter().find(|sh| sh.master == m));
                match shard {
                    Some(sh) if sh.master != dead_port && sh.slots == slots => Ok(sh.master),
                    other => Err(format!("slots {slots:?} served by {other:?}")),
                }
            },
        )
        .await
    }

    fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    async fn info(&self, port: u16, section: &str) -> String {
        let mut c = self.conn(port).await;
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    async fn cluster_failover(&self, replica: u16, force: bool) {
        let mut c = self.conn(replica).await;
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("FAILOVER");
        if force {
            cmd.arg("FORCE");
        }
        let () = cmd
            .query_async(&mut c)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER FAILOVER on {replica}: {e}"));
    }

    /// The `CLUSTER NODES` view of the first live node that answers.
    async fn any_snapshot(&self) -> Snapshot {
        let end = Instant::now() + WAIT;
        loop {
            let mut errors = Vec::new();
            for p in self.alive_ports() {
                match self.snapshot(p).await {
                    Ok(s) => return s,
                    Err(e) => errors.push(format!("{p}: {e}")),
                }
            }
            if Instant::now() >= end {
                panic!("no live cluster node answered CLUSTER NODES: {errors:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A settled view right now (waiting briefly for one, in case the cluster is
    /// still converging).
    async fn settled_now(&self, what: &str) -> Snapshot {
        self.wait_settled(&format!("a settled cluster before {what}"), WAIT, |s| {
            Ok(s.clone())
        })
        .await
    }

    /// Polls until [`settled`](Self::settled) holds and `expect` accepts the view.
    async fn wait_settled<T>(
        &self,
        what: &str,
        deadline: Duration,
        expect: impl Fn(&Snapshot) -> Result<T, String>,
    ) -> T {
        let end = Instant::now() + deadline;
        loop {
            let last = match self.settled().await.and_then(|s| expect(&s)) {
                Ok(v) => return v,
                Err(e) => e,
            };
            if Instant::now() >= end {
                self.panic_with_views(&format!(
                    "timed out after {deadline:?} waiting for {what}: {last}"
                ))
                .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every live node reports `cluster_state:ok`, all slots covered, `CLUSTER
    /// SLOTS` consistent with `CLUSTER NODES`, and all live nodes see the same
    /// topology.
    async fn settled(&self) -> Result<Snapshot, String> {
        let ports = self.alive_ports();
        let views = join_all(ports.iter().map(|&p| self.checked_view(p))).await;
        let mut first: Option<(u16, Snapshot)> = None;
        for (&p, v) in ports.iter().zip(views) {
            let v = v.map_err(|e| format!("127.0.0.1:{p}: {e}"))?;
            match &first {
                None => first = Some((p, v)),
                Some((q, f)) if *f != v => {
                    return Err(format!("views differ: {p} sees {v:?}; {q} sees {f:?}"));
                }
                Some(_) => {}
            }
        }
        first.map(|(_, s)| s).ok_or_else(|| "no live node".into())
    }

    /// One node's view, if it is consistent and says the cluster is ok.
    async fn checked_view(&self, port: u16) -> Result<Snapshot, String> {
        let mut c = connect(port, Duration::from_secs(2)).await?;
        let info: String = query(&mut c, redis::cmd("CLUSTER").arg("INFO")).await?;
        if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
            let state = info.lines().find(|l| l.starts_with("cluster_state:"));
            return Err(state.unwrap_or("no cluster_state").to_owned());
        }
        let nodes: String = query(&mut c, redis::cmd("CLUSTER").arg("NODES")).await?;
        let snap = snapshot_of(&parse_nodes(&nodes)?);
        if !snap.unsettled.is_empty() {
            return Err(format!("nodes in flux: {:?}", snap.unsettled));
        }
        check_coverage(&snap.shards)?;
        let slots: Value = query(&mut c, redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let mut from_slots = parse_slots(&slots)?;
        from_slots.sort();
        let mut from_nodes: Vec<_> = snap
            .shards
            .iter()
            .flat_map(|sh| {
                sh.slots
                    .iter()
                    .map(|&(a, b)| (a, b, sh.master, sh.replicas.clone()))
            })
            .collect();
        from_nodes.sort();
        if from_slots != from_nodes {
            return Err(format!(
                "CLUSTER SLOTS {from_slots:?} disagrees with CLUSTER NODES {from_nodes:?}"
            ));
        }
        Ok(snap)
    }

    /// One node's `CLUSTER NODES`, unchecked.
    async fn snapshot(&self, port: u16) -> Result<Snapshot, String> {
        let mut c = connect(port, Duration::from_secs(2)).await?;
        let nodes: String = query(&mut c, redis::cmd("CLUSTER").arg("NODES")).await?;
        Ok(snapshot_of(&parse_nodes(&nodes)?))
    }

    /// Panics with `msg` and every live node's `CLUSTER INFO` state and `CLUSTER
    /// NODES`.
    async fn panic_with_views(&self, msg: &str) -> ! {
        let mut out = String::new();
        for p in self.alive_ports() {
            let Ok(mut c) = connect(p, Duration::from_secs(2)).await else {
                let _ = writeln!(out, "---- {p}: unreachable");
                continue;
            };
            let info: String = query(&mut c, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .unwrap_or_default();
            let nodes: String = query(&mut c, redis::cmd("CLUSTER").arg("NODES"))
                .await
                .unwrap_or_default();
            let state = info.lines().find(|l| l.starts_with("cluster_state:"));
            let _ = writeln!(out, "---- {p}: {}\n{nodes}", state.unwrap_or("?"));
        }
        panic!("{msg}\n{out}");
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        for n in &mut self.nodes {
            if let Some(child) = n.child.as_mut() {
                let _ = child.start_kill();
            }
            if panicking {
                let log =
                    std::fs::read_to_string(n.dir.path().join("redis.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                eprintln!(
                    "---- tail of redis.log of cluster node {} ----\n{tail}",
                    n.port
                );
            }
        }
    }
}

/// Starts one cluster-enabled redis-server on fresh ports, retrying on collisions.
async fn start_node(bin: &Path) -> ClusterNode {
    let dir = tempfile::Builder::new()
        .prefix("redis-cluster-")
        .tempdir()
        .unwrap();
    for _ in 0..5 {
        let (port, bus) = two_free_ports();
        if let Some(child) = spawn_node(bin, port, bus, dir.path()).await {
            return ClusterNode {
                port,
                child: Some(child),
                dir,
            };
        }
    }
    panic!(
        "cluster redis-server did not start; see its log in {}",
        dir.path().display()
    );
}

/// Two distinct ports the OS says are free right now: the client port and the
/// cluster bus port (passed with `--cluster-port`, so it need not be port + 10000).
fn two_free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("no free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("no free port");
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// Spawns one node; `None` if it exits (a port taken) or never answers PING.
async fn spawn_node(bin: &Path, port: u16, bus: u16, dir: &Path) -> Option<Child> {
    let mut child = Command::new(bin)
        .args(["--port", &port.to_string()])
        .args(["--cluster-port", &bus.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        // A replica may always be promoted, however long it lost its master.
        .args(["--cluster-replica-validity-factor", "0"])
        // Keep the 3 x (master + replica) layout: no replica wanders off.
        .args(["--cluster-allow-replica-migration", "no"])
        // A new or promoted master serves its replicas at once, not after 5 s.
        .args(["--repl-diskless-sync-delay", "0"])
        // CLUSTER SLOTS lists a replica only once its replication offset is not 0;
        // on an idle master the offset moves with these pings (default: every 10 s).
        .args(["--repl-ping-replica-period", "1"])
        .args(["--appendonly", "no"])
        .args(["--save", ""])
        .arg("--dir")
        .arg(dir)
        .args(["--logfile", "redis.log"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        // INFO, not PING: the server answering must be this process, not another
        // one that won the port.
        if let Ok(mut c) = connect(port, Duration::from_secs(1)).await
            && let Ok(info) = query::<String>(&mut c, redis::cmd("INFO").arg("server")).await
        {
            let pid = info
                .lines()
                .find_map(|l| l.strip_prefix("process_id:"))
                .and_then(|p| p.trim().parse::<u32>().ok());
            if pid.is_some() && pid == child.id() {
                return Some(child);
            }
            let _ = child.kill().await;
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill().await;
    None
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

async fn connect(
    port: u16,
    timeout: Duration,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    redis::Client::open(url(port))
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())
}

async fn query<T: redis::FromRedisValue>(
    c: &mut redis::aio::MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<T, String> {
    cmd.query_async(c).await.map_err(|e| e.to_string())
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The master serving `slot` in `shards`.
fn owner(shards: &[Shard], slot: u16) -> Option<u16> {
    shards
        .iter()
        .find(|s| s.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
        .map(|s| s.master)
}

/// All slots served exactly once.
fn check_coverage(shards: &[Shard]) -> Result<(), String> {
    let mut ranges: Vec<(u16, u16)> = shards.iter().flat_map(|s| s.slots.clone()).collect();
    ranges.sort_unstable();
    let mut next = 0u32;
    for &(a, b) in &ranges {
        if u32::from(a) != next {
            return Err(format!("slots not covered exactly once: {ranges:?}"));
        }
        next = u32::from(b) + 1;
    }
    if next != u32::from(SLOTS) {
        return Err(format!("slots not all covered: {ranges:?}"));
    }
    Ok(())
}

/// Parses `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`.
fn parse_nodes(text: &str) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return Err(format!("bad CLUSTER NODES line {line:?}"));
        }
        let addr = f[1].split(['@', ',']).next().unwrap_or_default();
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("bad address in {line:?}"))?;
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue; // a slot being migrated or imported
            }
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let parse = |x: &str| {
                x.parse::<u16>()
                    .map_err(|_| format!("bad slot in {line:?}"))
            };
            slots.push((parse(a)?, parse(b)?));
        }
        out.push(Entry {
            id: f[0].to_owned(),
            port,
            flags: f[2].split(',').map(str::to_owned).collect(),
            master_id: (f[3] != "-").then(|| f[3].to_owned()),
            slots,
        });
    }
    Ok(out)
}

fn snapshot_of(entries: &[Entry]) -> Snapshot {
    let port_of: HashMap<&str, u16> = entries.iter().map(|e| (e.id.as_str(), e.port)).collect();
    let mut shards: Vec<Shard> = entries
        .iter()
        .filter(|e| e.has("master") && !e.slots.is_empty())
        .map(|m| {
            let mut slots = m.slots.clone();
            slots.sort_unstable();
            let mut replicas: Vec<u16> = entries
                .iter()
                .filter(|r| {
                    r.has("slave") && !r.has("fail") && r.master_id.as_deref() == Some(&m.id)
                })
                .map(|r| r.port)
                .collect();
            replicas.sort_unstable();
            Shard {
                master: m.port,
                slots,
                replicas,
            }
        })
        .collect();
    shards.sort_by_key(|s| s.slots[0]);
    let mut failed: Vec<u16> = entries
        .iter()
        .filter(|e| e.has("fail"))
        .map(|e| e.port)
        .collect();
    failed.sort_unstable();
    let unsettled = entries
        .iter()
        .filter(|e| {
            e.has("handshake")
                || e.has("noaddr")
                || e.port == 0
                || e.master_id
                    .as_deref()
                    .is_some_and(|m| !port_of.contains_key(m))
        })
        .map(|e| format!("{} {} {}", e.id, e.port, e.flags.join(",")))
        .collect();
    Snapshot {
        shards,
        failed,
        nodes: entries.len(),
        unsettled,
    }
}

/// `(first slot, last slot, master port, sorted replica ports)`.
type SlotRange = (u16, u16, u16, Vec<u16>);

/// Parses `CLUSTER SLOTS` (RESP2): `[[start, end, [ip, port, id, ..], ..], ..]`
/// into `(start, end, master port, sorted replica ports)`.
fn parse_slots(v: &Value) -> Result<Vec<SlotRange>, String> {
    let bad = || format!("unexpected CLUSTER SLOTS reply {v:?}");
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let Value::Array(ranges) = v else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for r in ranges {
        let Value::Array(r) = r else {
            return Err(bad());
        };
        let (Some(a), Some(b)) = (r.first().and_then(int), r.get(1).and_then(int)) else {
            return Err(bad());
        };
        let mut ports = Vec::new();
        for n in &r[2..] {
            let Value::Array(n) = n else {
                return Err(bad());
            };
            ports.push(n.get(1).and_then(int).ok_or_else(bad)?);
        }
        let Some((&master, replicas)) = ports.split_first() else {
            return Err(bad());
        };
        let mut replicas = replicas.to_vec();
        replicas.sort_unstable();
        out.push((a, b, master, replicas));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_xmodem_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn hash_tags() {
        let slot = RedisCluster::key_slot;
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("a{b}c"), slot("b"));
        assert_eq!(slot("{}x"), crc16(b"{}x") % SLOTS);
        assert_eq!(slot("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"));
        assert_eq!(slot("foo{bar}{zap}"), slot("bar"));
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
c035 127.0.0.1:21704@23704 slave 4947 0 1795297314569 5 connected
31d4 127.0.0.1:21701@23701,host myself,master - 0 1795297314000 2 connected 5461-10922
4947 127.0.0.1:21700@23700 master - 0 1795297314065 1 connected 0-5460 [5460->-31d4]
166e 127.0.0.1:21702@23702 master,fail - 0 1795297314367 3 connected 10923-16383
af09 127.0.0.1:21703@23703 slave,fail 31d4 0 1795297314367 4 connected
";
        let s = snapshot_of(&parse_nodes(text).unwrap());
        assert_eq!(s.nodes, 5);
        assert!(s.unsettled.is_empty());
        assert_eq!(s.failed, vec![21702, 21703]);
        assert_eq!(
            s.shards,
            vec![
                Shard {
                    master: 21700,
                    slots: vec![(0, 5460)],
                    replicas: vec![21704]
                },
                Shard {
                    master: 21701,
                    slots: vec![(5461, 10922)],
                    replicas: vec![]
                },
                Shard {
                    master: 21702,
                    slots: vec![(10923, 16383)],
                    replicas: vec![]
                },
            ]
        );
        check_coverage(&s.shards).unwrap();
        assert!(check_coverage(&s.shards[..2]).is_err());
    }
}
