//! The webhook workload: this process is the webhook receiver (a small HTTP/1.1
//! server that verifies every signature); it makes N logins through the nodes, each
//! one `session.created` event, and measures the delay from the change (the event's
//! `at`, Redis's clock on this same machine) to its receipt, and what was lost or
//! duplicated. With a Redis URL it also reads the memory of the 256 event streams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::note;
use crate::stats::{figure, figure_f, latency_figures, now_us};

/// What the workload does.
pub struct Params {
    /// Where the nodes POST (they were started with it as SESSIONHUB_WEBHOOK_URL).
    pub listen: SocketAddr,
    /// SESSIONHUB_WEBHOOK_SECRET of the nodes.
    pub secret: String,
    /// Logins (= events) to make.
    pub events: usize,
    /// Logins in flight.
    pub concurrency: usize,
    /// Longest wait for the last event after the last login.
    pub wait: Duration,
    /// The Redis to read the streams' memory from, and the nodes' key prefix.
    pub redis: Option<(String, String)>,
}

/// One event as received: its id, its `at` (Unix ms), when it arrived (Unix µs).
struct Got {
    id: String,
    session_id: String,
    at_ms: i64,
    received_us: u64,
}

#[derive(Default)]
struct Log {
    got: Vec<Got>,
    posts: u64,
    bad_signatures: u64,
}

/// Runs the workload and prints its figures.
pub async fn run(cluster: &Cluster, tag: &str, p: Params) -> Result<()> {
    let listener = TcpListener::bind(p.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the webhook", p.listen))?;
    let log = Arc::new(Mutex::new(Log::default()));
    let receiver = tokio::spawn(accept(listener, p.secret.clone(), log.clone()));
    note!(
        "webhook: {} logins at concurrency {}, receiving on {}",
        p.events,
        p.concurrency,
        p.listen
    );
    let n = cluster.nodes.len();
    let started = Instant::now();
    let sessions: Vec<String> = futures_util::stream::iter(0..p.events)
        .map(|i| async move {
            cluster
                .create_session(i % n, &format!("{tag}w{i}"))
                .await
                .map(|c| c.session_id)
        })
        .buffer_unordered(p.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    let logins = started.elapsed();
    note!("webhook: {} logins in {:.1?}", sessions.len(), logins);
    let deadline = Instant::now() + p.wait;
    loop {
        let have = {
            let log = log
                .lock()
                .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
            let mut seen: Vec<&str> = log.got.iter().map(|g| g.session_id.as_str()).collect();
            seen.sort_unstable();
            seen.dedup();
            sessions
                .iter()
                .filter(|s| seen.binary_search(&s.as_str()).is_ok())
                .count()
        };
        if have == sessions.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = started.elapsed();
    receiver.abort();
    let log = std::mem::take(
        &mut *log
            .lock()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?,
    );
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    let mut delays = Vec::with_capacity(log.got.len());
    for g in &log.got {
        let n = per_id.entry(g.id.as_str()).or_default();
        *n += 1;
        if *n == 1 {
            delays.push((g.received_us as f64 / 1000.0 - g.at_ms as f64).max(0.0));
        }
    }
    let mut delivered: Vec<&str> = log.got.iter().map(|g| g.session_id.as_str()).collect();
    delivered.sort_unstable();
    delivered.dedup();
    let lost = sessions
        .iter()
        .filter(|s| delivered.binary_search(&s.as_str()).is_err())
        .count();
    figure("webhook_events", sessions.len(), "events");
    figure("webhook_lost", lost, "events");
    figure(
        "webhook_duplicates",
        per_id.values().map(|n| n - 1).sum::<usize>(),
        "events",
    );
    figure("webhook_bad_signatures", log.bad_signatures, "requests");
    figure("webhook_posts", log.posts, "requests");
    figure_f(
        "webhook_events_per_post",
        log.got.len() as f64 / log.posts.max(1) as f64,
        1,
        "events",
    );
    figure_f(
        "webhook_logins_per_sec",
        sessions.len() as f64 / logins.as_secs_f64(),
        0,
        "/s",
    );
    figure_f(
        "webhook_delivered_per_sec",
        per_id.len() as f64 / all.as_secs_f64(),
        0,
        "/s",
    );
    latency_figures("webhook_delay", delays, &["p50", "p90", "p99", "max"]);
    if let Some((url, prefix)) = &p.redis {
        stream_memory(url, prefix).await?;
    }
    if lost > 0 {
        bail!("{lost} events never arrived within {:?}", p.wait);
    }
    Ok(())
}

/// Prints the entries and memory of the 256 event streams.
async fn stream_memory(url: &str, prefix: &str) -> Result<()> {
    let client = redis::Client::open(url).context("bad --redis-url")?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .context("cannot reach Redis")?;
    let (mut entries, mut bytes, mut fullest) = (0u64, 0u64, (0u64, 0u64));
    for b in 0..=255u8 {
        let key = format!("{prefix}{{{b:02x}}}:events");
        let len: u64 = redis::cmd("XLEN").arg(&key).query_async(&mut c).await?;
        let mem: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(&key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut c)
            .await?;
        let mem = mem.unwrap_or(0);
        entries += len;
        bytes += mem;
        if len > fullest.0 {
            fullest = (len, mem);
        }
    }
    figure("events_stream_entries", entries, "entries");
    figure("events_stream_bytes", bytes, "bytes");
    figure_f(
        "events_stream_bytes_per_entry",
        bytes as f64 / entries.max(1) as f64,
        1,
        "bytes",
    );
    figure("events_fullest_stream_entries", fullest.0, "entries");
    figure("events_fullest_stream_bytes", fullest.1, "bytes");
    Ok(())
}

async fn accept(listener: TcpListener, secret: String, log: Arc<Mutex<Log>>) {
    let secret = Arc::new(secret);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let (secret, log) = (secret.clone(), log.clone());
        tokio::spawn(async move {
            let _ = serve(sock, &secret, &log).await;
        });
    }
}

/// Whether `header` is `t=<s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == v1
}

async fn serve(sock: tokio::net::TcpStream, secret: &str, log: &Mutex<Log>) -> Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = String::new();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let (mut length, mut signature) = (0usize, String::new());
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("x-sessionhub-signature") {
                    signature = value.trim().to_owned();
                }
            }
        }
        let mut body = vec![0; length];
        rd.read_exact(&mut body).await?;
        let received_us = now_us();
        let ok = verify(secret, &signature, &body);
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        {
            let mut log = log.lock().map_err(|_| anyhow::anyhow!("log poisoned"))?;
            log.posts += 1;
            if !ok {
                log.bad_signatures += 1;
            }
            for e in parsed["events"].as_array().into_iter().flatten() {
                if e["type"] != "session.created" {
                    continue;
                }
                let at_ms = e["at"]
                    .as_str()
                    .and_then(|s| humantime::parse_rfc3339(s).ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as i64);
                log.got.push(Got {
                    id: e["id"].as_str().unwrap_or_default().to_owned(),
                    session_id: e["session_id"].as_str().unwrap_or_default().to_owned(),
                    at_ms,
                    received_us,
                });
            }
        }
        wr.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}
