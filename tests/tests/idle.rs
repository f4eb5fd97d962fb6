//! An idle node costs Redis almost nothing (issue 21): six nodes that hold no
//! sockets and serve no requests, on one Redis and on a 3-master Redis Cluster; every
//! command Redis runs over 10 s is counted with `INFO commandstats` (which counts the
//! commands run inside functions too), and the rate per node is bounded.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use sessionhub_core::time::now_ms;
use sessionhub_tests::{Deployment, Store, Topology, process, wait_for};

const NODES: usize = 6;
/// The measuring window.
const WINDOW: Duration = Duration::from_secs(10);
/// Issue 21's bound: commands per second per idle node, whatever runs them.
const MOST_PER_NODE_PER_SEC: f64 = 20.0;
/// How long to wait for the start-up sweeps to settle. A node's start marks every
/// bucket due (a full sweep) and, ten lease lifetimes later, the fences its start
/// wrote become forgettable: work of the start, not of idling, so the window is
/// placed where none is due.
const SETTLE: Duration = Duration::from_secs(120);
/// How long the sweep must have been still before the window opens.
const QUIET: Duration = Duration::from_millis(1500);

/// A connection to each master (one Redis: to it).
async fn masters(d: &Deployment) -> Vec<redis::aio::MultiplexedConnection> {
    match &d.store {
        Store::Single(r) => vec![r.conn().await],
        Store::Cluster(c) => {
            let mut out = Vec::new();
            for m in c.masters().await {
                out.push(c.conn(m).await);
            }
            out
        }
    }
}

/// `calls` per command of `INFO commandstats`, summed over `conns`, leaving out the
/// test's own `INFO`.
async fn command_calls(conns: &mut [redis::aio::MultiplexedConnection]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in conns {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(c)
            .await
            .unwrap();
        for line in info.lines() {
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            if name == "info" {
                continue;
            }
            let calls: u64 = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap();
            *out.entry(name.to_owned()).or_default() += calls;
        }
    }
    out
}

/// Waits until no bucket of the sweep index is due before the window would end and
/// no sweep visit is still running: `sh_sweep_next` (each visit calls it twice) is
/// the only idle caller of `EXISTS`, so its count must hold still for [`QUIET`].
/// (Two nodes may visit one bucket at once, one raising its score past the other's
/// claim: an empty index alone does not mean the visits are over.)
async fn settle(d: &Deployment) {
    let index = match &d.store {
        Store::Single(r) => r.conn().await,
        Store::Cluster(c) => c.conn(c.master_for_key("sh:sweep").await).await,
    };
    let masters = masters(d).await;
    let last: std::sync::Arc<std::sync::Mutex<(u64, tokio::time::Instant)>> = std::sync::Arc::new(
        std::sync::Mutex::new((u64::MAX, tokio::time::Instant::now())),
    );
    wait_for("the start-up sweeps to settle", SETTLE, || {
        let (mut c, mut masters, last) = (index.clone(), masters.clone(), last.clone());
        async move {
            let horizon = now_ms() + WINDOW.as_millis() as i64 + 2000;
            let due: u64 = redis::cmd("ZCOUNT")
                .arg("sh:sweep")
                .arg("-inf")
                .arg(horizon)
                .query_async(&mut c)
                .await
                .unwrap();
            let visits = command_calls(&mut masters)
                .await
                .get("exists")
                .copied()
                .unwrap_or(0);
            let mut last = last.lock().unwrap();
            if due > 0 || visits != last.0 {
                *last = (visits, tokio::time::Instant::now());
                return None;
            }
            (last.1.elapsed() >= QUIET).then_some(())
        }
    })
    .await;
}

async fn idle_nodes_cost_little(topology: Topology) {
    let d = Deployment::start(topology, NODES).await;
    for node in &d.nodes {
        process::wait_ready(node).await;
    }
    settle(&d).await;
    let mut conns = masters(&d).await;
    let before = command_calls(&mut conns).await;
    let started = tokio::time::Instant::now();
    // The measuring window itself: nothing is waited for, the nodes just idle.
    tokio::time::sleep(WINDOW).await;
    let after = command_calls(&mut conns).await;
    let secs = started.elapsed().as_secs_f64();
    let delta: BTreeMap<&str, u64> = after
        .iter()
        .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let total: u64 = delta.values().sum();
    let per_node = total as f64 / secs / NODES as f64;
    eprintln!(
        "{topology:?}: {NODES} idle nodes, {total} Redis commands in {secs:.1} s = {per_node:.2}/s \
         per node; by command: {delta:?}"
    );
    assert!(
        per_node <= MOST_PER_NODE_PER_SEC,
        "an idle node costs Redis {per_node:.2} commands/s (at most {MOST_PER_NODE_PER_SEC}): {delta:?}"
    );
    // Still ready: the probes that do go out come back.
    for node in &d.nodes {
        process::wait_ready(node).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_idle_nodes_cost_one_redis_at_most_20_commands_a_second_each() {
    idle_nodes_cost_little(Topology::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_idle_nodes_cost_a_redis_cluster_at_most_20_commands_a_second_each() {
    idle_nodes_cost_little(Topology::Cluster).await;
}
