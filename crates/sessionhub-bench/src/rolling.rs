//! The **rolling** workload: a rolling restart of every node (SIGTERM, start again,
//! wait until ready, next) while a publisher sends to users at a steady rate and
//! each user's client reconnects with `since` and `epoch` whenever its node goes.
//! Counts what a client of the history contract must never see: a message lost,
//! delivered twice, or out of order.
//!
//! Unlike the other workloads it runs its own nodes (the `sessionhub` binary given),
//! so that it can restart them; they share one Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::COOKIE;

use crate::cluster::{CONNECT_TIMEOUT, HTTP_TIMEOUT, loopback_addr};
use crate::note;
use crate::stats::{figure, figure_f, latency_figures};

/// How long a node may take to start, or to exit after SIGTERM.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before a client tries the next node after a failed connect.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(20);
/// How long the end of the run waits for the last messages to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Publish requests in flight at most.
const PUBLISH_CONCURRENCY: usize = 64;

/// What the workload needs.
#[derive(Debug, Clone)]
pub struct Params {
    /// The `sessionhub` binary.
    pub server_bin: PathBuf,
    /// The Redis the nodes share.
    pub redis_url: String,
    /// The service API key the nodes get.
    pub api_key: String,
    /// Nodes.
    pub nodes: usize,
    /// Users, each with one session and one socket.
    pub users: usize,
    /// Publishes per second.
    pub rate: u32,
    /// Steady time before the first restart, between restarts and after the last.
    pub settle: Duration,
    /// Full passes over the nodes.
    pub rounds: usize,
    /// Extra environment for the nodes.
    pub node_env: Vec<(String, String)>,
    /// Distinct user ids per run.
    pub tag: String,
}

/// A node process this workload started.
struct NodeProc {
    child: Child,
    base: String,
}

async fn start_node(p: &Params, i: usize) -> Result<NodeProc> {
    let mut cmd = Command::new(&p.server_bin);
    cmd.env("SESSIONHUB_LISTEN", "127.0.0.1:0")
        .env("SESSIONHUB_REDIS_URL", &p.redis_url)
        .env("SESSIONHUB_API_KEY", &p.api_key)
        .env("SESSIONHUB_NODE_ID", format!("rolling-{i}"))
        .env("RUST_LOG", "error");
    for (k, v) in &p.node_env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", p.server_bin.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(NODE_TIMEOUT, lines.next_line())
        .await
        .context("the node did not say where it listens in time")??
        .context("the node exited before listening")?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .with_context(|| format!("unexpected first line {line:?}"))?;
    let base = format!("http://{addr}");
    loopback_addr(&base, "http")?;
    Ok(NodeProc { child, base })
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> Result<()> {
    let end = Instant::now() + NODE_TIMEOUT;
    loop {
        let ok = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{base} was not ready within {NODE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The nodes' base URLs; `None` while a node restarts.
type Live = Arc<RwLock<Vec<Option<String>>>>;

fn pick(live: &Live, start: usize) -> Option<String> {
    let nodes = live.read().unwrap_or_else(|p| p.into_inner());
    (0..nodes.len()).find_map(|k| nodes[(start + k) % nodes.len()].clone())
}

/// Counters shared by the clients.
#[derive(Default)]
struct Counts {
    /// Clients that got their first hello.
    started: AtomicUsize,
    reconnects: AtomicU64,
    recovered: AtomicU64,
    recovery_failed: AtomicU64,
    recovered_messages: AtomicU64,
    out_of_order: AtomicU64,
}

/// What one user's client received: the seqs, in arrival order.
type Received = Arc<Mutex<Vec<u64>>>;

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    ty: String,
    offset: Option<String>,
    epoch: Option<String>,
    recovered: Option<bool>,
    missed: Option<u64>,
    data: Option<serde_json::Value>,
}

/// One user's client: reconnects (to the next live node) whenever its socket ends,
/// asking for what it missed.
async fn client(
    index: usize,
    token: String,
    live: Live,
    counts: Arc<Counts>,
    received: Received,
    mut stop: watch::Receiver<bool>,
) {
    let mut point: Option<(u64, String)> = None;
    let mut started = false;
    let mut attempt = index;
    let mut last_offset = 0u64;
    while !*stop.borrow() {
        let Some(base) = pick(&live, attempt) else {
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            continue;
        };
        attempt += 1;
        let query = point
            .as_ref()
            .map(|(o, e)| format!("?since={o}&epoch={e}"))
            .unwrap_or_default();
        let url = format!("{}/ws{query}", base.replacen("http://", "ws://", 1));
        let Ok(mut req) = url.into_client_request() else {
            return;
        };
        let Ok(cookie) = HeaderValue::from_str(&format!("sh_session={token}")) else {
            return;
        };
        req.headers_mut().insert(COOKIE, cookie);
        let ws = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(req)).await;
        let Ok(Ok((mut ws, _))) = ws else {
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            continue;
        };
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = stop.changed() => None,
            };
            let Some(Ok(msg)) = msg else { break };
            let Message::Text(text) = msg else { continue };
            let Ok(f) = serde_json::from_str::<Frame>(&text) else {
                continue;
            };
            let offset = f.offset.as_deref().and_then(|o| o.parse::<u64>().ok());
            match f.ty.as_str() {
                "hello" => {
                    match f.recovered {
                        Some(true) => {
                            counts.recovered.fetch_add(1, Ordering::Relaxed);
                            counts
                                .recovered_messages
                                .fetch_add(f.missed.unwrap_or(0), Ordering::Relaxed);
                        }
                        Some(false) => {
                            counts.recovery_failed.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    }
                    if !started {
                        started = true;
                        counts.started.fetch_add(1, Ordering::Relaxed);
                    }
                    if let (Some(o), Some(e)) = (offset, f.epoch) {
                        // Resume from what was received, unless recovery failed (then
                        // the application reloads: here, from the hub's offset).
                        let resume = match (&point, f.recovered) {
                            (Some((since, _)), Some(true)) => *since,
                            _ => o,
                        };
                        last_offset = resume;
                        point = Some((resume, e));
                    }
                }
                "message" => {
                    if let Some(o) = offset {
                        if o <= last_offset {
                            counts.out_of_order.fetch_add(1, Ordering::Relaxed);
                        }
                        last_offset = last_offset.max(o);
                        if let Some((p, _)) = point.as_mut() {
                            *p = last_offset;
                        }
                    }
                    if let Some(seq) = f.data.as_ref().and_then(|d| d["seq"].as_u64()) {
                        received.lock().unwrap_or_else(|p| p.into_inner()).push(seq);
                    }
                }
                _ => {}
            }
        }
        if *stop.borrow() {
            break;
        }
        counts.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the workload and prints its figures.
pub async fn run(p: Params) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .no_proxy()
        .build()
        .context("cannot build the HTTP client")?;
    let mut procs = Vec::new();
    for i in 0..p.nodes {
        procs.push(start_node(&p, i).await?);
    }
    for n in &procs {
        wait_ready(&http, &n.base).await?;
    }
    let live: Live = Arc::new(RwLock::new(
        procs.iter().map(|n| Some(n.base.clone())).collect(),
    ));
    figure("rolling_nodes", p.nodes, "nodes");
    figure("rolling_users", p.users, "users");

    // One session and one client per user.
    let counts = Arc::new(Counts::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut received = Vec::new();
    let mut clients = Vec::new();
    let users: Vec<String> = (0..p.users).map(|i| format!("{}-{i}", p.tag)).collect();
    for (i, user) in users.iter().enumerate() {
        let base = &procs[i % p.nodes].base;
        let res = http
            .post(format!("{base}/api/v1/sessions"))
            .bearer_auth(&p.api_key)
            .json(&serde_json::json!({ "user_id": user, "user_agent": "sessionhub-bench" }))
            .send()
            .await
            .context("POST /api/v1/sessions")?;
        if res.status() != reqwest::StatusCode::CREATED {
            bail!("creating a session answered {}", res.status());
        }
        let created: serde_json::Value = res.json().await.context("session body")?;
        let token = created["token"].as_str().context("no token")?.to_owned();
        let r: Received = Arc::default();
        received.push(r.clone());
        clients.push(tokio::spawn(client(
            i,
            token,
            live.clone(),
            counts.clone(),
            r,
            stop_rx.clone(),
        )));
    }

    // Every client has its starting point before anything is published.
    let end = Instant::now() + NODE_TIMEOUT;
    while counts.started.load(Ordering::Relaxed) < p.users {
        if Instant::now() > end {
            bail!("not every client got its hello within {NODE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The publisher: a steady rate, each message to one user, never retried (an
    // unanswered request may or may not have been applied: its seq is "uncertain").
    let expected: Arc<Mutex<BTreeMap<usize, BTreeSet<u64>>>> = Arc::default();
    let uncertain = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicUsize::new(0));
    let (pub_stop_tx, mut pub_stop) = watch::channel(false);
    let publisher = {
        let (http, live, expected, uncertain, refused, seq, users, key) = (
            http.clone(),
            live.clone(),
            expected.clone(),
            uncertain.clone(),
            refused.clone(),
            seq.clone(),
            users.clone(),
            p.api_key.clone(),
        );
        let period = Duration::from_secs_f64(1.0 / f64::from(p.rate.max(1)));
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(PUBLISH_CONCURRENCY));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = pub_stop.changed() => break,
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let u = n % users.len();
                let Some(base) = pick(&live, n) else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let body = serde_json::json!({
                    "to": { "user": users[u] }, "event": "bench", "data": { "seq": n }
                });
                let (http, expected, uncertain, refused, key) = (
                    http.clone(),
                    expected.clone(),
                    uncertain.clone(),
                    refused.clone(),
                    key.clone(),
                );
                tokio::spawn(async move {
                    let _permit = permit;
                    let res = http
                        .post(format!("{base}/api/v1/publish"))
                        .bearer_auth(&key)
                        .json(&body)
                        .send()
                        .await;
                    match res {
                        Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                            expected
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(u)
                                .or_default()
                                .insert(n as u64);
                        }
                        // An error answer has no effect: not expected.
                        Ok(_) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            uncertain.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            // Wait for the requests in flight.
            let _ = slots.acquire_many(PUBLISH_CONCURRENCY as u32).await;
        })
    };

    // The rolling restarts.
    tokio::time::sleep(p.settle).await;
    let mut restart_ms = Vec::new();
    for _ in 0..p.rounds {
        #[allow(clippy::needless_range_loop)] // `i` also names the node and its slot
        for i in 0..p.nodes {
            let started = Instant::now();
            if let Some(slot) = live.write().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                *slot = None;
            }
            let proc = &mut procs[i];
            if let Some(pid) = proc.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "TERM", &pid.to_string()])
                    .status();
            }
            tokio::time::timeout(NODE_TIMEOUT, proc.child.wait())
                .await
                .context("a node did not exit within its shutdown bound after SIGTERM")??;
            let fresh = start_node(&p, i).await?;
            wait_ready(&http, &fresh.base).await?;
            restart_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            if let Some(slot) = live.write().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                *slot = Some(fresh.base.clone());
            }
            procs[i] = fresh;
            tokio::time::sleep(p.settle).await;
        }
    }
    let _ = pub_stop_tx.send(true);
    publisher.await.context("the publisher failed")?;

    // Everything acknowledged must arrive; wait for it (bounded).
    let expected = std::mem::take(&mut *expected.lock().unwrap_or_else(|p| p.into_inner()));
    let missing = |received: &[Received]| -> u64 {
        expected
            .iter()
            .map(|(u, want)| {
                let got: BTreeSet<u64> = received[*u]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied()
                    .collect();
                want.difference(&got).count() as u64
            })
            .sum()
    };
    let end = Instant::now() + DRAIN_TIMEOUT;
    while missing(&received) > 0 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    for c in clients {
        let _ = c.await;
    }

    let published: usize = expected.values().map(BTreeSet::len).sum();
    let mut delivered = 0u64;
    let mut duplicated = 0u64;
    for r in &received {
        let seqs = r.lock().unwrap_or_else(|p| p.into_inner());
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        delivered += seqs.len() as u64;
        duplicated += (seqs.len() - unique.len()) as u64;
    }
    figure("rolling_restarts", restart_ms.len(), "restarts");
    latency_figures("rolling_restart", restart_ms, &["p50", "max"]);
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    for (name, value, unit) in [
        ("rolling_published", published as u64, "messages"),
        ("rolling_refused", load(&refused), "messages"),
        ("rolling_uncertain", load(&uncertain), "messages"),
        ("rolling_delivered", delivered, "messages"),
        ("rolling_lost", missing(&received), "messages"),
        ("rolling_duplicated", duplicated, "messages"),
        (
            "rolling_out_of_order",
            load(&counts.out_of_order),
            "messages",
        ),
        ("rolling_reconnects", load(&counts.reconnects), "sockets"),
        ("rolling_recovered", load(&counts.recovered), "sockets"),
        (
            "rolling_recovery_failed",
            load(&counts.recovery_failed),
            "sockets",
        ),
        (
            "rolling_recovered_messages",
            load(&counts.recovered_messages),
            "messages",
        ),
    ] {
        figure(name, value, unit);
    }
    history_memory(&p, &users).await;
    for mut n in procs {
        if let Some(pid) = n.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(NODE_TIMEOUT, n.child.wait()).await;
    }
    Ok(())
}

/// Redis memory of the users' history keys (stream and meta), per user.
async fn history_memory(p: &Params, users: &[String]) {
    let res: Result<(u64, u64)> = async {
        let client = redis::Client::open(p.redis_url.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let (mut bytes, mut entries) = (0u64, 0u64);
        for u in users {
            let key = format!("sh:{{{}}}:user:{u}:history", bucket(u));
            let (a, b, n): (Option<u64>, Option<u64>, u64) = redis::pipe()
                .cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{key}:meta"))
                .cmd("XLEN")
                .arg(&key)
                .query_async(&mut c)
                .await?;
            bytes += a.unwrap_or(0) + b.unwrap_or(0);
            entries += n;
        }
        Ok((bytes, entries))
    }
    .await;
    match res {
        Ok((bytes, entries)) if !users.is_empty() => {
            let n = users.len() as f64;
            figure_f("history_entries_per_user", entries as f64 / n, 1, "entries");
            figure_f("history_bytes_per_user", bytes as f64 / n, 0, "bytes");
        }
        Ok(_) => {}
        Err(e) => note!("could not read the history keys' memory: {e:#}"),
    }
}

/// The bucket of a user id: the first 2 hex digits of SHA-256 of it (see the
/// README's Redis layout).
fn bucket(user: &str) -> String {
    use sha2::Digest;
    format!("{:02x}", sha2::Sha256::digest(user.as_bytes())[0])
}
