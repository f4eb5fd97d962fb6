//! `sessionhub-bench`: drives a real sessionhub cluster over real sockets on loopback
//! and prints one line per figure, `name: value unit`, on stdout (progress goes to
//! stderr).
//!
//! Workloads (each bounded in count and time):
//!
//! - **connect** — opens N sockets (many users, sessions, nodes and 127.x.y.z source
//!   addresses) and reports sockets established per second; with `--node-pid`, the
//!   nodes' resident memory before and after, per socket.
//! - **kill** — with N background sockets open, kills fresh sessions holding one
//!   socket per node and times DELETE → the last close 4001.
//! - **deliver** — users with one socket per node; messages published to single
//!   users at a fixed concurrency; deliveries/s, latency, lost and duplicated. The
//!   cluster may run on one Redis or on a Redis Cluster (nothing here talks to
//!   Redis; give one `--redis-pid` per server for CPU use).
//! - **redis-cost** — Redis commands per connect, disconnect, kill and publish.
//! - **all** — every workload above, in that order: redis-cost (on a quiet cluster),
//!   connect + memory (the N sockets stay open), kill (with them as background),
//!   then deliver (after closing them).
//! - **hold** — opens N sockets and holds them, for load split over processes.
//! - **rolling** — starts its own nodes, restarts each in turn (SIGTERM, start,
//!   ready) while a publisher sends to users at a steady rate and the users'
//!   clients reconnect with `since`: messages lost, duplicated, out of order.
//! - **webhook** — this process is the nodes' webhook receiver (it verifies every
//!   signature); N logins, one `session.created` event each; delay from change to
//!   receipt, lost and duplicated events, and the event streams' Redis memory.

mod cluster;
mod cost;
mod deliver;
mod kill;
mod pool;
mod rolling;
mod socket;
mod stats;
mod webhook;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio::time::Instant;

use crate::cluster::{Cluster, Sources};
use crate::pool::{Layout, Pool};
use crate::socket::Role;
use crate::stats::{CpuProbe, figure, figure_f, latency_figures, now_us, rss_kib};

/// Load and benchmark tool for a sessionhub cluster (loopback only).
#[derive(Debug, Parser)]
#[command(name = "sessionhub-bench", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: Command,
}

/// The cluster and where the load comes from.
#[derive(Debug, Args)]
struct Target {
    /// A node's base URL, `http://127.x.y.z:PORT` (repeat for each node).
    #[arg(long = "node", global = true)]
    nodes: Vec<String>,
    /// The service API key of the nodes.
    #[arg(
        long,
        env = "SESSIONHUB_API_KEY",
        global = true,
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Client sockets are bound to source addresses 127.<OCTET>.x.y; give each load
    /// process its own.
    #[arg(long, default_value_t = 1, global = true)]
    source_octet: u8,
    /// How many source addresses to spread client sockets over.
    #[arg(long, default_value_t = 64, global = true)]
    source_addrs: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every workload, in order: redis-cost, connect + memory, kill, deliver.
    All {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        memory: MemoryArgs,
        #[command(flatten)]
        kill: KillArgs,
        #[command(flatten)]
        deliver: DeliverArgs,
        #[command(flatten)]
        cost: CostArgs,
    },
    /// Sockets established per second (and memory per socket with --node-pid).
    Connect {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        memory: MemoryArgs,
    },
    /// Kill latency with N background sockets open.
    Kill {
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        kill: KillArgs,
    },
    /// Targeted delivery through the HTTP publish endpoint.
    Deliver {
        #[command(flatten)]
        deliver: DeliverArgs,
        #[command(flatten)]
        procs: ProcArgs,
        /// Upgrades in flight while opening the sockets.
        #[arg(long, default_value_t = 128)]
        connect_concurrency: usize,
    },
    /// Redis commands per connect, disconnect, kill and targeted publish.
    RedisCost {
        #[command(flatten)]
        cost: CostArgs,
    },
    /// A rolling restart of nodes this tool starts, under a steady publish rate,
    /// with clients that recover what they missed.
    Rolling {
        /// The `sessionhub` binary to run the nodes from.
        #[arg(long)]
        server_bin: PathBuf,
        /// The Redis the nodes share, `redis://127.x.y.z:PORT`.
        #[arg(long)]
        redis_url: String,
        /// Nodes to start.
        #[arg(long = "nodes", default_value_t = 3)]
        node_count: usize,
        /// Users, each with one session and one socket.
        #[arg(long, default_value_t = 300)]
        users: usize,
        /// Publishes per second, each to one user.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Steady time (ms) before, between and after the restarts.
        #[arg(long, default_value_t = 2000)]
        settle_ms: u64,
        /// Passes over all nodes.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Extra environment for the nodes, `KEY=VALUE` (repeat).
        #[arg(long = "node-env")]
        node_env: Vec<String>,
    },
    /// Lifecycle events through the webhook: this process receives them (the nodes
    /// run with SESSIONHUB_WEBHOOK_URL=http://<--listen>/ and the same secret).
    Webhook {
        /// Where to receive the webhook POSTs.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The nodes' SESSIONHUB_WEBHOOK_SECRET.
        #[arg(long, env = "SESSIONHUB_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// Logins to make (one event each).
        #[arg(long, default_value_t = 10_000)]
        events: usize,
        /// Logins in flight.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Longest wait for the last event after the last login, in seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        /// Redis URL, to read the event streams' memory.
        #[arg(long)]
        redis_url: Option<String>,
        /// The nodes' key prefix.
        #[arg(long, default_value = "sh:")]
        key_prefix: String,
    },
    /// Opens N sockets and holds them (to spread load over several processes).
    Hold {
        #[command(flatten)]
        pool: PoolArgs,
        /// Hold them this long, then close them and exit.
        #[arg(long, default_value_t = 600)]
        hold_secs: u64,
    },
}

/// The background sockets.
#[derive(Debug, Args)]
struct PoolArgs {
    /// Number of background sockets this process opens.
    #[arg(long, default_value_t = 1000)]
    sockets: usize,
    /// Sessions per user.
    #[arg(long, default_value_t = 2)]
    sessions_per_user: usize,
    /// Sockets per session (each on another node); default: one per node.
    #[arg(long)]
    sockets_per_session: Option<usize>,
    /// Upgrades in flight while opening sockets.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
}

/// The processes under test, for CPU use per workload (on stderr).
#[derive(Debug, Args)]
struct ProcArgs {
    /// PID of each node, in the order of --node (also for resident memory).
    #[arg(long = "node-pid")]
    node_pids: Vec<u32>,
    /// PID of a Redis server (repeat for each server of a Redis Cluster).
    #[arg(long = "redis-pid")]
    redis_pids: Vec<u32>,
}

#[derive(Debug, Args)]
struct MemoryArgs {
    #[command(flatten)]
    procs: ProcArgs,
    /// Wait this long after the sockets opened before reading memory again.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
}

#[derive(Debug, Args)]
struct KillArgs {
    /// Number of kills.
    #[arg(long, default_value_t = 300)]
    kills: usize,
    /// Stop starting kills after this many seconds.
    #[arg(long, default_value_t = 60)]
    kill_secs: u64,
}

#[derive(Debug, Args)]
struct DeliverArgs {
    /// Users, each with one socket on every node.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 30_000)]
    messages: usize,
    /// Publish requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Stop publishing after this many seconds.
    #[arg(long, default_value_t = 30)]
    deliver_secs: u64,
}

#[derive(Debug, Args)]
struct CostArgs {
    /// Redis URL, `redis://127.x.y.z:PORT` (the redis-cost workload needs it).
    #[arg(long)]
    redis_url: Option<String>,
    /// The nodes' key prefix.
    #[arg(long, default_value = "sh:")]
    key_prefix: String,
    /// Operations of each kind for the Redis cost.
    #[arg(long, default_value_t = 100)]
    cost_ops: usize,
    /// Idle window (ms) that learns the nodes' periodic Redis commands (the default
    /// covers a reconciliation round of default settings).
    #[arg(long, default_value_t = 11000)]
    cost_idle_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sessionhub-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sessionhub-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let t = cli.target;
    let api_key = t
        .api_key
        .context("the service API key is needed: --api-key or SESSIONHUB_API_KEY")?;
    if let Command::Rolling {
        server_bin,
        redis_url,
        node_count,
        users,
        rate,
        settle_ms,
        rounds,
        node_env,
    } = cli.command
    {
        cluster::loopback_addr(&redis_url, "redis")?;
        if node_count < 2 || users == 0 {
            bail!("rolling needs --nodes 2 or more and --users 1 or more");
        }
        let node_env = node_env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .with_context(|| format!("--node-env {kv:?}: expected KEY=VALUE"))
            })
            .collect::<Result<Vec<_>>>()?;
        return rolling::run(rolling::Params {
            server_bin,
            redis_url,
            api_key,
            nodes: node_count,
            users,
            rate,
            settle: Duration::from_millis(settle_ms),
            rounds,
            node_env,
            tag: format!("rl{:x}", now_us() % 0xffff_ffff),
        })
        .await;
    }
    let cluster = Cluster::new(&t.nodes, api_key)?;
    let sources = Sources::new(t.source_octet, t.source_addrs)?;
    // Distinct user ids per run and per process.
    let tag = format!("{:x}{}", now_us() % 0xffff_ffff, t.source_octet);
    let n = cluster.nodes.len();
    figure("nodes", n, "nodes");

    match cli.command {
        Command::All {
            pool,
            memory,
            kill,
            deliver,
            cost,
        } => {
            pool::check_fd_budget(pool.sockets.max(deliver.users * n) + n, deliver.concurrency)?;
            check_pids(&memory.procs, n)?;
            let cpu = memory.procs.cpu_probe();
            match cost.cost_params()? {
                Some(p) => {
                    let t = cpu.mark();
                    cost::run(&cluster, &sources, &format!("{tag}c"), &p).await?;
                    cpu.note_since("redis cost", &t);
                }
                None => note!(
                    "no --redis-url: skipping the Redis cost (it watches one server with \
                     MONITOR, so it is not run against a Redis Cluster)"
                ),
            }
            let background =
                connect(&cluster, &sources, &format!("{tag}b"), &pool, &memory).await?;
            let t = cpu.mark();
            kill::run(&cluster, &sources, &tag, kill.params()).await?;
            cpu.note_since("kill", &t);
            let ended = background.ended();
            close_background(background).await?;
            if ended > 0 {
                bail!("{ended} background sockets were closed by the nodes during the run");
            }
            deliver::run(
                &cluster,
                &sources,
                &format!("{tag}d"),
                deliver.params(pool.connect_concurrency),
                Some(&cpu),
            )
            .await?;
        }
        Command::Connect { pool, memory } => {
            pool::check_fd_budget(pool.sockets, 0)?;
            check_pids(&memory.procs, n)?;
            let p = connect(&cluster, &sources, &tag, &pool, &memory).await?;
            close_background(p).await?;
        }
        Command::Kill { pool, kill } => {
            pool::check_fd_budget(pool.sockets + n, 0)?;
            let memory = MemoryArgs {
                procs: ProcArgs {
                    node_pids: Vec::new(),
                    redis_pids: Vec::new(),
                },
                settle_ms: 0,
            };
            let background = connect(&cluster, &sources, &tag, &pool, &memory).await?;
            kill::run(&cluster, &sources, &tag, kill.params()).await?;
            close_background(background).await?;
        }
        Command::Deliver {
            deliver,
            procs,
            connect_concurrency,
        } => {
            pool::check_fd_budget(deliver.users * n, deliver.concurrency)?;
            check_pids(&procs, n)?;
            let cpu = procs.cpu_probe();
            deliver::run(
                &cluster,
                &sources,
                &tag,
                deliver.params(connect_concurrency),
                Some(&cpu),
            )
            .await?;
        }
        Command::RedisCost { cost } => {
            let p = cost
                .cost_params()?
                .context("redis-cost needs --redis-url redis://127.0.0.1:PORT")?;
            cost::run(&cluster, &sources, &tag, &p).await?;
        }
        // Handled above: it runs nodes of its own.
        Command::Rolling { .. } => {}
        Command::Webhook {
            listen,
            secret,
            events,
            concurrency,
            wait_secs,
            redis_url,
            key_prefix,
        } => {
            let params = webhook::Params {
                listen,
                secret,
                events,
                concurrency,
                wait: Duration::from_secs(wait_secs),
                redis: redis_url.map(|u| (u, key_prefix)),
            };
            webhook::run(&cluster, &tag, params).await?;
        }
        Command::Hold { pool, hold_secs } => {
            pool::check_fd_budget(pool.sockets, 0)?;
            let (p, opened) = pool::open(
                &cluster,
                &sources,
                &tag,
                pool.layout(n),
                pool.connect_concurrency,
                |_, _| Role::Idle,
            )
            .await?;
            figure("held", opened.latencies_ms.len(), "sockets");
            tokio::time::sleep(Duration::from_secs(hold_secs)).await;
            close_background(p).await?;
        }
    }
    Ok(())
}

impl PoolArgs {
    fn layout(&self, nodes: usize) -> Layout {
        Layout {
            sockets: self.sockets,
            sessions_per_user: self.sessions_per_user,
            sockets_per_session: self.sockets_per_session.unwrap_or(nodes),
        }
    }
}

impl KillArgs {
    fn params(&self) -> kill::KillParams {
        kill::KillParams {
            kills: self.kills,
            max_time: Duration::from_secs(self.kill_secs),
        }
    }
}

impl DeliverArgs {
    fn params(&self, connect_concurrency: usize) -> deliver::DeliverParams {
        deliver::DeliverParams {
            users: self.users,
            messages: self.messages,
            concurrency: self.concurrency,
            max_time: Duration::from_secs(self.deliver_secs),
            connect_concurrency,
        }
    }
}

impl ProcArgs {
    /// Watches the nodes, the Redis servers and this process.
    fn cpu_probe(&self) -> CpuProbe {
        let mut pids: Vec<(String, u32)> = self
            .node_pids
            .iter()
            .enumerate()
            .map(|(i, &p)| (format!("node{i}"), p))
            .collect();
        let one = self.redis_pids.len() == 1;
        pids.extend(self.redis_pids.iter().enumerate().map(|(i, &p)| {
            let name = if one {
                "redis".to_owned()
            } else {
                format!("redis{i}")
            };
            (name, p)
        }));
        pids.push(("bench".to_owned(), std::process::id()));
        CpuProbe::new(pids)
    }
}

impl CostArgs {
    fn cost_params(&self) -> Result<Option<cost::CostParams>> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        cluster::loopback_addr(url, "redis")?;
        Ok(Some(cost::CostParams {
            redis_url: url.clone(),
            key_prefix: self.key_prefix.clone(),
            ops: self.cost_ops,
            idle: Duration::from_millis(self.cost_idle_ms),
        }))
    }
}

fn check_pids(procs: &ProcArgs, nodes: usize) -> Result<()> {
    if !procs.node_pids.is_empty() && procs.node_pids.len() != nodes {
        bail!(
            "{} --node-pid for {nodes} --node: give one PID per node, in the same order",
            procs.node_pids.len()
        );
    }
    for &pid in procs.node_pids.iter().chain(&procs.redis_pids) {
        rss_kib(pid)?;
    }
    Ok(())
}

/// Opens the background sockets: prints the connect rate and, with PIDs, memory.
async fn connect(
    cluster: &Cluster,
    sources: &Sources,
    tag: &str,
    args: &PoolArgs,
    memory: &MemoryArgs,
) -> Result<Pool> {
    let n = cluster.nodes.len();
    let before = memory
        .procs
        .node_pids
        .iter()
        .map(|&p| rss_kib(p))
        .collect::<Result<Vec<_>>>()?;
    note!("opening {} background sockets", args.sockets);
    let cpu = memory.procs.cpu_probe();
    let (p, opened) = pool::open_with_cpu(
        cluster,
        sources,
        tag,
        args.layout(n),
        args.connect_concurrency,
        |_, _| Role::Idle,
        Some(&cpu),
    )
    .await?;
    figure("background_sockets", p.len(), "sockets");
    figure_f(
        "connect_rate",
        p.len() as f64 / opened.elapsed.as_secs_f64().max(1e-9),
        0,
        "sockets/s",
    );
    latency_figures("connect_latency", opened.latencies_ms, &["p50", "p99"]);
    if !before.is_empty() {
        tokio::time::sleep(Duration::from_millis(memory.settle_ms)).await;
        let mut total_delta = 0i64;
        for (i, (&pid, &b)) in memory.procs.node_pids.iter().zip(&before).enumerate() {
            let a = rss_kib(pid)?;
            let delta = a as i64 - b as i64;
            total_delta += delta;
            figure(&format!("memory_rss_before_node{i}"), b, "KiB");
            figure(&format!("memory_rss_after_node{i}"), a, "KiB");
            let on_node = opened.per_node[i].max(1);
            figure_f(
                &format!("memory_per_socket_node{i}"),
                delta as f64 / on_node as f64,
                2,
                "KiB",
            );
        }
        figure_f(
            "memory_per_socket",
            total_delta as f64 / p.len().max(1) as f64,
            2,
            "KiB",
        );
    }
    Ok(p)
}

/// Closes the background sockets and checks none was closed by a node.
async fn close_background(p: Pool) -> Result<()> {
    let t0 = Instant::now();
    let total = p.len();
    let outcomes = p.close().await?;
    let by_server = outcomes
        .iter()
        .filter(|o| o.close_code.is_some() && !o.closed_by_us)
        .count();
    note!(
        "closed {total} background sockets in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if by_server > 0 {
        note!("{by_server} background sockets had been closed by a node");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    /// `bench.sh` passes its defaults first and the caller's arguments after them:
    /// a later value wins, and repeatable arguments still add up.
    #[test]
    fn a_later_argument_overrides_an_earlier_one() {
        let cli = Cli::try_parse_from([
            "sessionhub-bench",
            "--node",
            "http://127.0.0.1:1",
            "--node",
            "http://127.0.0.1:2",
            "deliver",
            "--redis-pid",
            "7",
            "--messages",
            "30000",
            "--redis-pid",
            "8",
            "--messages",
            "90000",
        ])
        .expect("parses");
        assert_eq!(cli.target.nodes.len(), 2);
        let Command::Deliver { deliver, procs, .. } = cli.command else {
            panic!("not deliver: {:?}", cli.command);
        };
        assert_eq!(deliver.messages, 90_000);
        assert_eq!(procs.redis_pids, [7, 8]);
    }
}
