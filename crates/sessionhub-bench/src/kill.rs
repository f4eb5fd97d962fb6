//! Kill latency: a fresh session with one socket on each node is killed through a
//! randomly chosen node; the time from sending the DELETE to the last of its sockets
//! seeing its close event (close 4001, then the connection closed by the server:
//! what a browser's `onclose` waits for). `kill_frame` is the same up to the close
//! frame alone, and `kill_notice` up to the `session_ended` frame, which the server
//! sends first (the close frame follows 5 ms later) and the web client acts on.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::future::try_join_all;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::cluster::{Cluster, Sources};
use crate::note;
use crate::socket::{self, Role};
use crate::stats::{Rng, figure, latency_figures};

/// The close code of an ended session.
pub const SESSION_ENDED: u16 = 4001;
/// How long one kill may take to reach all of its sockets.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Parameters.
#[derive(Debug, Clone, Copy)]
pub struct KillParams {
    /// Number of kills.
    pub kills: usize,
    /// Stop starting new kills after this long.
    pub max_time: Duration,
}

/// Runs the workload and prints `kill_latency_{p50,p90,p99,max}` and `kills`.
pub async fn run(cluster: &Cluster, sources: &Sources, tag: &str, p: KillParams) -> Result<()> {
    let n = cluster.nodes.len();
    let mut rng = Rng::new(0x4b11);
    let mut latencies = Vec::with_capacity(p.kills);
    let mut http_ms = Vec::with_capacity(p.kills);
    let mut frame_ms = Vec::with_capacity(p.kills);
    let mut notice_ms = Vec::with_capacity(p.kills);
    let mut noticed = 0usize;
    let started = Instant::now();
    let mut finishing = Vec::new();
    for i in 0..p.kills {
        if started.elapsed() > p.max_time {
            note!(
                "kill: stopping after {i} kills (time bound {:?})",
                p.max_time
            );
            break;
        }
        let user = format!("bench-{tag}-kill{i}");
        let created = cluster
            .create_session(rng.below(n), &user)
            .await
            .context("kill: creating the session")?;
        let sockets = try_join_all((0..n).map(|node| {
            let src = sources.next();
            let token = &created.token;
            async move { cluster.open_ws(node, src, token).await }
        }))
        .await
        .context("kill: opening the session's sockets")?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_stop, stop_rx) = watch::channel(false);
        let tasks: Vec<_> = sockets
            .into_iter()
            .enumerate()
            .map(|(index, (ws, _))| {
                let role = Role::Probe {
                    index,
                    tx: tx.clone(),
                };
                tokio::spawn(socket::run(ws, role, stop_rx.clone()))
            })
            .collect();
        drop(tx);

        let via = rng.below(n);
        let t0 = Instant::now();
        let status = cluster.kill_session(via, &created.session_id).await?;
        http_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if status != 204 {
            bail!("kill {i}: DELETE through node {via} answered {status}, not 204");
        }
        let (mut last, mut last_frame, mut last_notice) = (t0, t0, t0);
        for _ in 0..n {
            let closed = tokio::time::timeout(KILL_WAIT, rx.recv())
                .await
                .ok()
                .flatten()
                .with_context(|| format!("kill {i}: a socket got no close within {KILL_WAIT:?}"))?;
            if closed.code != Some(SESSION_ENDED) {
                bail!(
                    "kill {i}: the socket on node {} closed with {:?}, not {SESSION_ENDED}",
                    closed.index,
                    closed.code
                );
            }
            last = last.max(closed.at);
            last_frame = last_frame.max(closed.frame_at);
            last_notice = last_notice.max(closed.notice_at);
            noticed += usize::from(closed.noticed);
        }
        latencies.push((last - t0).as_secs_f64() * 1e3);
        frame_ms.push((last_frame - t0).as_secs_f64() * 1e3);
        notice_ms.push((last_notice - t0).as_secs_f64() * 1e3);
        // Their close handshakes finish in the background.
        finishing.extend(tasks);
        if finishing.len() > 64 * n {
            for t in finishing.drain(..) {
                t.await.context("a probe socket task panicked")?;
            }
        }
    }
    for t in finishing {
        t.await.context("a probe socket task panicked")?;
    }
    note!(
        "kill: {} kills in {:.1} s",
        latencies.len(),
        started.elapsed().as_secs_f64()
    );
    figure("kills", latencies.len(), "kills");
    latency_figures("kill_latency", latencies, &["p50", "p90", "p99", "max"]);
    latency_figures("kill_frame", frame_ms, &["p50", "p99"]);
    latency_figures("kill_notice", notice_ms, &["p50", "p99"]);
    figure("kill_notices", noticed, "sockets");
    latency_figures("kill_http", http_ms, &["p50", "p99"]);
    Ok(())
}
