//! Many sockets at once: sessions spread over users, sockets spread over nodes and
//! source addresses, each served by its own task.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::{Cluster, Created, Sources};
use crate::note;
use crate::socket::{self, Outcome, Role};
use crate::stats::CpuProbe;

/// Sessions created at once while setting up.
const CREATE_CONCURRENCY: usize = 32;

/// How sockets are spread.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Number of sockets.
    pub sockets: usize,
    /// Sessions per user.
    pub sessions_per_user: usize,
    /// Sockets per session; socket `j` of session `s` goes to node `(s + j) % nodes`.
    pub sockets_per_session: usize,
}

impl Layout {
    /// Number of sessions needed.
    pub fn sessions(&self) -> usize {
        self.sockets.div_ceil(self.sockets_per_session.max(1))
    }
}

/// One planned socket.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Its session (index into the created sessions).
    pub session: usize,
    /// Its user (index).
    pub user: usize,
    /// Its node (index).
    pub node: usize,
}

/// Open sockets, each served by a task, closed together.
pub struct Pool {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Outcome>>,
    /// Where each socket is.
    pub slots: Vec<Slot>,
}

/// How opening the pool went.
#[derive(Debug)]
pub struct Opened {
    /// Time from the first connect to the last `hello`.
    pub elapsed: Duration,
    /// Per-socket time from connect to `hello`, in milliseconds.
    pub latencies_ms: Vec<f64>,
    /// Sockets per node index.
    pub per_node: Vec<usize>,
}

/// The user id of user `u` of pool `tag`.
pub fn user_id(tag: &str, u: usize) -> String {
    format!("bench-{tag}-u{u}")
}

/// Creates the sessions of `layout` (users named by [`user_id`]).
pub async fn create_sessions(cluster: &Cluster, tag: &str, layout: Layout) -> Result<Vec<Created>> {
    let n = cluster.nodes.len();
    let spu = layout.sessions_per_user.max(1);
    stream::iter(0..layout.sessions())
        .map(|s| {
            let user = user_id(tag, s / spu);
            async move { cluster.create_session(s % n, &user).await }
        })
        .buffered(CREATE_CONCURRENCY)
        .try_collect()
        .await
}

/// Opens the sockets of `layout` with `concurrency` upgrades in flight; `role` gives
/// each socket's role by its index.
pub async fn open(
    cluster: &Cluster,
    sources: &Sources,
    tag: &str,
    layout: Layout,
    concurrency: usize,
    role: impl Fn(usize, &Slot) -> Role,
) -> Result<(Pool, Opened)> {
    open_with_cpu(cluster, sources, tag, layout, concurrency, role, None).await
}

/// [`open`], noting the CPU use of the probed processes while the sockets open
/// (after the sessions were created).
pub async fn open_with_cpu(
    cluster: &Cluster,
    sources: &Sources,
    tag: &str,
    layout: Layout,
    concurrency: usize,
    role: impl Fn(usize, &Slot) -> Role,
    cpu: Option<&CpuProbe>,
) -> Result<(Pool, Opened)> {
    let n = cluster.nodes.len();
    let spu = layout.sessions_per_user.max(1);
    let sps = layout.sockets_per_session.max(1);
    let sessions = create_sessions(cluster, tag, layout)
        .await
        .with_context(|| format!("creating {} sessions", layout.sessions()))?;
    let slots: Vec<Slot> = (0..layout.sockets)
        .map(|i| {
            let (s, j) = (i / sps, i % sps);
            Slot {
                session: s,
                user: s / spu,
                node: (s + j) % n,
            }
        })
        .collect();

    let (stop, stop_rx) = watch::channel(false);
    let sessions = Arc::new(sessions);
    let cpu_mark = cpu.map(CpuProbe::mark);
    let started = Instant::now();
    let plan = slots.clone();
    let mut opened = stream::iter(plan.into_iter().enumerate())
        .map(|(i, slot)| {
            let sessions = sessions.clone();
            let src = sources.next();
            async move {
                let t0 = Instant::now();
                let (ws, _) = cluster
                    .open_ws(slot.node, src, &sessions[slot.session].token)
                    .await
                    .with_context(|| format!("socket {i} (node {}, from {src})", slot.node))?;
                anyhow::Ok((i, ws, t0.elapsed()))
            }
        })
        .buffer_unordered(concurrency.max(1));

    let mut tasks: Vec<Option<JoinHandle<Outcome>>> = (0..slots.len()).map(|_| None).collect();
    let mut latencies_ms = Vec::with_capacity(slots.len());
    let mut per_node = vec![0; n];
    let mut last_progress = Instant::now();
    let mut done = 0usize;
    while let Some(r) = opened.next().await {
        let (i, ws, took) = r?;
        let slot = slots[i];
        per_node[slot.node] += 1;
        latencies_ms.push(took.as_secs_f64() * 1e3);
        tasks[i] = Some(tokio::spawn(socket::run(
            ws,
            role(i, &slot),
            stop_rx.clone(),
        )));
        done += 1;
        if last_progress.elapsed() > Duration::from_secs(5) {
            note!("{done}/{} sockets open", slots.len());
            last_progress = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    if let (Some(cpu), Some(mark)) = (cpu, &cpu_mark) {
        cpu.note_since("connect", mark);
    }
    let tasks = tasks
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .context("a planned socket was never opened")?;
    Ok((
        Pool { stop, tasks, slots },
        Opened {
            elapsed,
            latencies_ms,
            per_node,
        },
    ))
}

impl Pool {
    /// Number of sockets.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Sockets whose task already ended (the server closed them or they failed).
    pub fn ended(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_finished()).count()
    }

    /// Closes every socket and returns what each saw, in socket order.
    pub async fn close(self) -> Result<Vec<Outcome>> {
        let _ = self.stop.send(true);
        let mut out = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            out.push(t.await.context("a socket task panicked")?);
        }
        Ok(out)
    }
}

/// Refuses a socket count one process cannot hold: this process's open-files limit
/// (`ulimit -n`) minus room for HTTP connections, and never more than
/// [`MAX_SOCKETS_PER_PROCESS`].
pub fn check_fd_budget(sockets: usize, http_concurrency: usize) -> Result<()> {
    let limit = crate::stats::open_files_limit()?;
    let headroom = 256 + http_concurrency as u64 * 2;
    let allowed = limit
        .saturating_sub(headroom)
        .min(MAX_SOCKETS_PER_PROCESS as u64);
    if sockets as u64 > allowed {
        bail!(
            "{sockets} sockets is too many for one load process: it may hold {allowed} \
             (open-files limit {limit}, minus {headroom} for HTTP and other files, at most \
             {MAX_SOCKETS_PER_PROCESS} per process). Raise `ulimit -n`, or split the load \
             over several processes (`sessionhub-bench hold --source-octet K ...`)."
        );
    }
    Ok(())
}

/// Most sockets one load process opens, whatever its limit: well under the
/// machine's 20,000 open files per process.
pub const MAX_SOCKETS_PER_PROCESS: usize = 16_000;
