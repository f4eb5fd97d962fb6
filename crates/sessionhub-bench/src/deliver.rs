//! Targeted delivery: users with one socket on each node; messages published to
//! single users through `POST /api/v1/publish` at a fixed concurrency. Every socket
//! checks what it got against what was published to its user.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;

use crate::cluster::{Cluster, Sources};
use crate::note;
use crate::pool::{self, Layout};
use crate::socket::Role;
use crate::stats::{CpuProbe, Rng, figure, figure_f, latency_figures, now_us};

/// How long to wait for the last deliveries once publishing is done.
const DRAIN_WAIT: Duration = Duration::from_secs(15);

/// Parameters.
#[derive(Debug, Clone, Copy)]
pub struct DeliverParams {
    /// Users, each with one socket on every node.
    pub users: usize,
    /// Messages to publish (at most).
    pub messages: usize,
    /// Publish requests in flight.
    pub concurrency: usize,
    /// Stop publishing after this long.
    pub max_time: Duration,
    /// Upgrades in flight while opening the sockets.
    pub connect_concurrency: usize,
}

/// What one publisher did.
#[derive(Default)]
struct Published {
    /// `(user, seq)` of every publish answered 202.
    ok: Vec<(usize, u64)>,
    errors: u64,
    last_error: Option<String>,
}

/// Runs the workload and prints the `deliver_*` figures (and CPU use while
/// publishing, with a probe).
pub async fn run(
    cluster: &Cluster,
    sources: &Sources,
    tag: &str,
    p: DeliverParams,
    cpu: Option<&CpuProbe>,
) -> Result<()> {
    let n = cluster.nodes.len();
    let delivered = Arc::new(AtomicU64::new(0));
    let layout = Layout {
        sockets: p.users * n,
        sessions_per_user: 1,
        sockets_per_session: n,
    };
    let d = delivered.clone();
    let (pool, _) = pool::open(
        cluster,
        sources,
        tag,
        layout,
        p.connect_concurrency,
        |_, _| Role::Sink {
            delivered: d.clone(),
        },
    )
    .await
    .context("deliver: opening the sockets")?;
    note!("deliver: {} sockets open; publishing", pool.len());

    let cpu_mark = cpu.map(CpuProbe::mark);
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + p.max_time;
    let started = Instant::now();
    let workers: Vec<_> = (0..p.concurrency.max(1))
        .map(|w| {
            let cluster = cluster.clone();
            let next = next.clone();
            let tag = tag.to_owned();
            let (users, messages) = (p.users, p.messages as u64);
            tokio::spawn(async move {
                let mut rng = Rng::new(w as u64);
                let mut out = Published::default();
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= messages || Instant::now() >= deadline {
                        break;
                    }
                    let user = rng.below(users);
                    let body = format!(
                        r#"{{"to":{{"user":"{}"}},"event":"bench","data":{{"t":{},"seq":{seq}}}}}"#,
                        pool::user_id(&tag, user),
                        now_us()
                    );
                    match cluster.publish(rng.below(n), body).await {
                        Ok(202) => out.ok.push((user, seq)),
                        Ok(status) => {
                            out.errors += 1;
                            out.last_error = Some(format!("HTTP {status}"));
                        }
                        Err(e) => {
                            out.errors += 1;
                            out.last_error = Some(format!("{e:#}"));
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut expected: Vec<Vec<u64>> = vec![Vec::new(); p.users];
    let mut errors = 0;
    let mut published = 0u64;
    for w in workers {
        let out = w.await.context("a publisher task panicked")?;
        errors += out.errors;
        if let Some(e) = out.last_error {
            note!("deliver: a publish failed: {e}");
        }
        for (user, seq) in out.ok {
            expected[user].push(seq);
            published += 1;
        }
    }
    let publish_time = started.elapsed();

    // Wait (bounded) for every delivery that should come.
    let want = published * n as u64;
    let drain_end = Instant::now() + DRAIN_WAIT;
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if delivered.load(Ordering::Relaxed) < want {
        note!(
            "deliver: only {} of {want} deliveries after waiting {DRAIN_WAIT:?}",
            delivered.load(Ordering::Relaxed)
        );
    }
    if let (Some(cpu), Some(mark)) = (cpu, &cpu_mark) {
        cpu.note_since("deliver (publishing)", mark);
    }
    let slots = pool.slots.clone();
    let outcomes = pool.close().await?;

    for e in &mut expected {
        e.sort_unstable();
    }
    let (mut lost, mut dup, mut misrouted, mut deliveries, mut unexpected_close) = (0, 0, 0, 0, 0);
    let mut latencies = Vec::new();
    let mut last_rx = started;
    for (slot, o) in slots.iter().zip(outcomes) {
        let exp = &expected[slot.user];
        let mut got = o.seqs;
        deliveries += got.len() as u64;
        got.sort_unstable();
        let before = got.len();
        got.dedup();
        dup += (before - got.len()) as u64;
        // Both sorted: count what is missing and what was never sent to this user.
        let (mut i, mut j) = (0, 0);
        while i < exp.len() || j < got.len() {
            match (exp.get(i), got.get(j)) {
                (Some(a), Some(b)) if a == b => (i, j) = (i + 1, j + 1),
                (Some(a), Some(b)) if a < b => (lost, i) = (lost + 1, i + 1),
                (Some(_), None) => (lost, i) = (lost + 1, i + 1),
                _ => (misrouted, j) = (misrouted + 1, j + 1),
            }
        }
        if o.close_code.is_some() && !o.closed_by_us {
            unexpected_close += 1;
        }
        latencies.extend(o.latencies_us.iter().map(|&us| us as f64 / 1e3));
        if let Some(t) = o.last_rx {
            last_rx = last_rx.max(t);
        }
    }
    let span = (last_rx - started).max(publish_time).as_secs_f64();
    figure("deliver_published", published, "msgs");
    figure("deliver_deliveries", deliveries, "deliveries");
    figure_f(
        "deliver_rate",
        deliveries as f64 / span.max(1e-9),
        0,
        "deliveries/s",
    );
    latency_figures("deliver_latency", latencies, &["p50", "p90", "p99", "max"]);
    figure("deliver_lost", lost, "msgs");
    figure("deliver_duplicated", dup, "msgs");
    figure("deliver_misrouted", misrouted, "msgs");
    figure("deliver_publish_errors", errors, "requests");
    if unexpected_close > 0 {
        note!("deliver: {unexpected_close} sockets were closed by the server during the run");
    }
    Ok(())
}
