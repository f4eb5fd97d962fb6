//! Redis cost per operation: connect, disconnect, kill and targeted publish.
//!
//! Each operation runs alone in its own measuring window, on a cluster that holds no
//! other sockets. Everything is counted from a `MONITOR` stream, where the commands a
//! function runs (`redis.call`) are tagged `lua` and follow the `FCALL` they belong
//! to (Redis runs a function atomically), so each is attributed to its call:
//!
//! - `calls`: the commands clients sent (round trips, if nothing is pipelined);
//! - `cmds`: every command Redis executed for them, each client command plus the
//!   commands run inside it.
//!
//! Net of the nodes' background: an idle window first records which commands the
//! nodes send on their own (heartbeat, sweep, probes, reaper, pings, revalidation).
//! A window's commands of a kind the idle window never showed are the operation's
//! and count in full; those of a background kind are subtracted at the idle rate
//! and what is left is reported apart (`background`), never in the figure. So the
//! figure does not move with how bursty the background is.
//! `INFO commandstats` deltas over the same windows are printed as a check (they
//! include the background).
//!
//! Windows are delimited by `ECHO <marker>` + `INFO commandstats` pipelined on the
//! tool's own connection; the tool's own commands are left out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::future::join_all;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::{Cluster, Sources, Ws, loopback_addr};
use crate::note;
use crate::socket::{self, read_until_close, read_until_seq};
use crate::stats::{figure_f, now_us};

/// Counts per command (`FCALL` split by function name).
type Counts = BTreeMap<String, f64>;

/// Sockets per session in the connect windows (nodes cap sockets per session).
const SOCKETS_PER_SESSION: usize = 8;
const OP_WAIT: Duration = Duration::from_secs(10);
const MARKER: &str = "sessionhub-bench-mark-";

/// Parameters.
#[derive(Debug, Clone)]
pub struct CostParams {
    /// `redis://127.x.y.z:port`.
    pub redis_url: String,
    /// The nodes' key prefix.
    pub key_prefix: String,
    /// Operations of each kind.
    pub ops: usize,
    /// Length of the idle window that measures the nodes' background commands.
    pub idle: Duration,
}

enum MonEvent {
    /// A client's command.
    Cmd {
        key: String,
    },
    /// A command run inside the function called by the last client command.
    Inner,
    Marker(u64),
}

/// The measuring connection and the `MONITOR` stream.
struct Meter {
    conn: redis::aio::MultiplexedConnection,
    events: mpsc::UnboundedReceiver<MonEvent>,
    next_marker: u64,
    /// The last client command seen (the one whose function the next `lua`
    /// commands run in).
    last: Option<String>,
    /// Commands of ours to take off the `cmds` count of the current window.
    own: BTreeMap<String, f64>,
    monitor: tokio::task::JoinHandle<()>,
}

/// An open measuring window.
struct Window {
    before: Counts,
    t0: Instant,
}

/// What one window (or a sum of windows) cost.
#[derive(Debug, Default, Clone)]
struct Cost {
    /// Client commands (MONITOR), by command (`FCALL` by function).
    calls: Counts,
    /// Client commands with the commands run inside them (MONITOR), by client
    /// command.
    cmds: Counts,
    /// All commands by name (`INFO commandstats`), background included.
    stats: Counts,
    /// Total window time.
    secs: f64,
}

fn add_counts(to: &mut Counts, from: &Counts) {
    for (k, v) in from {
        *to.entry(k.clone()).or_default() += v;
    }
}

impl Cost {
    fn add(&mut self, other: &Cost) {
        add_counts(&mut self.calls, &other.calls);
        add_counts(&mut self.cmds, &other.cmds);
        add_counts(&mut self.stats, &other.stats);
        self.secs += other.secs;
    }

    /// This cost split into the operation's (kinds the idle window never showed, in
    /// full) and the rest (background kinds, less `idle`'s rate over the same time,
    /// at least 0).
    fn split(&self, idle: &Cost) -> (Cost, Cost) {
        let split = |m: &Counts, base: &Counts| {
            let (mut own, mut rest) = (Counts::new(), Counts::new());
            for (k, v) in m {
                match base.get(k) {
                    None => {
                        own.insert(k.clone(), *v);
                    }
                    Some(b) => {
                        let left = v - b / idle.secs.max(1e-9) * self.secs;
                        if left > 0.0 {
                            rest.insert(k.clone(), left);
                        }
                    }
                }
            }
            (own, rest)
        };
        let (calls, calls_bg) = split(&self.calls, &idle.calls);
        let (cmds, cmds_bg) = split(&self.cmds, &idle.cmds);
        let own = Cost {
            calls,
            cmds,
            stats: self.stats.clone(),
            secs: self.secs,
        };
        let background = Cost {
            calls: calls_bg,
            cmds: cmds_bg,
            stats: Counts::new(),
            secs: self.secs,
        };
        (own, background)
    }
}

fn parse_commandstats(info: &str) -> Counts {
    info.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("cmdstat_")?;
            let (name, fields) = rest.split_once(':')?;
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))?
                .parse::<f64>()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The first two double-quoted strings after `]` in a MONITOR line.
fn quoted_args(line: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let Some(start) = line.find("] ") else {
        return out;
    };
    let mut chars = line[start + 2..].chars();
    while out.len() < max {
        if !chars.by_ref().any(|c| c == '"') {
            break;
        }
        let mut s = String::new();
        let mut escaped = false;
        for c in chars.by_ref() {
            match (escaped, c) {
                (true, c) => {
                    s.push(c);
                    escaped = false;
                }
                (false, '\\') => escaped = true,
                (false, '"') => break,
                (false, c) => s.push(c),
            }
        }
        out.push(s);
    }
    out
}

/// Parses one MONITOR line: `None` for lines run inside functions or sent by
/// `own_addr` (other than our markers).
fn parse_monitor_line(line: &str, own_addr: &str) -> Option<MonEvent> {
    let inside = line.split_once('[')?.1.split_once(']')?.0;
    let addr = inside.split_whitespace().nth(1)?;
    if addr == "lua" {
        return Some(MonEvent::Inner);
    }
    let args = quoted_args(line, 2);
    let cmd = args.first()?.to_ascii_uppercase();
    if addr == own_addr {
        if cmd == "ECHO" {
            return args
                .get(1)?
                .strip_prefix(MARKER)?
                .parse()
                .ok()
                .map(MonEvent::Marker);
        }
        return None;
    }
    let key = match (cmd.as_str(), args.get(1)) {
        ("FCALL" | "FCALL_RO", Some(f)) => format!("{cmd} {}", unversioned(f)),
        _ => cmd,
    };
    Some(MonEvent::Cmd { key })
}

/// A function's name as operators call it: a node calls `sh_publish_<version>`, its
/// own copy of the library (16 hex digits; see `lua/sessionhub.lua`).
fn unversioned(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((base, v))
            if v.len() == 16
                && v.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            base
        }
        _ => name,
    }
}

impl Meter {
    async fn connect(url: &str) -> Result<Self> {
        let addr: SocketAddr = loopback_addr(url, "redis")?;
        let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("cannot connect to Redis at {url}"))?;
        let info: String = redis::cmd("CLIENT")
            .arg("INFO")
            .query_async(&mut conn)
            .await
            .context("CLIENT INFO")?;
        let own_addr = info
            .split_whitespace()
            .find_map(|f| f.strip_prefix("addr="))
            .context("no addr= in CLIENT INFO")?
            .to_owned();

        // MONITOR speaks plain RESP simple strings, one line per command.
        let mut mon = TcpStream::connect(addr)
            .await
            .with_context(|| format!("MONITOR connection to {addr}"))?;
        mon.write_all(b"MONITOR\r\n").await.context("MONITOR")?;
        let mut lines = BufReader::new(mon).lines();
        let first = lines
            .next_line()
            .await
            .context("MONITOR reply")?
            .unwrap_or_default();
        if first != "+OK" {
            bail!("MONITOR answered {first:?}");
        }
        let (tx, events) = mpsc::unbounded_channel();
        let monitor = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(ev) = parse_monitor_line(&line, &own_addr)
                    && tx.send(ev).is_err()
                {
                    return;
                }
            }
        });
        Ok(Self {
            conn,
            events,
            next_marker: 0,
            last: None,
            own: BTreeMap::new(),
            monitor,
        })
    }

    /// Ends the current window: returns the client calls and the commands with
    /// those run inside them, counted since the previous marker, and the
    /// commandstats now.
    async fn mark(&mut self) -> Result<(Counts, Counts, Counts)> {
        let id = self.next_marker;
        self.next_marker += 1;
        let (_, info): (String, String) = redis::pipe()
            .cmd("ECHO")
            .arg(format!("{MARKER}{id}"))
            .cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .context("ECHO + INFO commandstats")?;
        let mut calls = Counts::new();
        let mut cmds = Counts::new();
        let end = Instant::now() + OP_WAIT;
        loop {
            match tokio::time::timeout_at(end, self.events.recv()).await {
                Ok(Some(MonEvent::Marker(m))) if m == id => break,
                Ok(Some(MonEvent::Marker(_))) => self.last = None,
                Ok(Some(MonEvent::Cmd { key })) => {
                    *calls.entry(key.clone()).or_default() += 1.0;
                    *cmds.entry(key.clone()).or_default() += 1.0;
                    self.last = Some(key);
                }
                Ok(Some(MonEvent::Inner)) => {
                    // Inside the last client command (a function runs atomically).
                    let key = self.last.clone().unwrap_or_else(|| "(before)".into());
                    *cmds.entry(key).or_default() += 1.0;
                }
                Ok(None) => bail!("the MONITOR connection ended"),
                Err(_) => bail!("marker {id} never showed in MONITOR"),
            }
        }
        Ok((calls, cmds, parse_commandstats(&info)))
    }

    /// Starts a window.
    async fn begin(&mut self) -> Result<Window> {
        let (_, _, before) = self.mark().await?;
        self.own.clear();
        Ok(Window {
            before,
            t0: Instant::now(),
        })
    }

    /// Ends a window and returns what it cost.
    async fn end(&mut self, w: Window) -> Result<Cost> {
        let secs = w.t0.elapsed().as_secs_f64();
        let (calls, cmds, after) = self.mark().await?;
        // Ours in the window: the first mark's INFO, the second mark's ECHO, polls.
        *self.own.entry("info".into()).or_default() += 1.0;
        *self.own.entry("echo".into()).or_default() += 1.0;
        let mut stats = Counts::new();
        for (k, v) in &after {
            let d = v
                - w.before.get(k).copied().unwrap_or(0.0)
                - self.own.get(k).copied().unwrap_or(0.0);
            if d > 0.0 {
                stats.insert(k.clone(), d);
            }
        }
        Ok(Cost {
            calls,
            cmds,
            stats,
            secs,
        })
    }

    /// Measures `op` in its own window.
    async fn window<T>(&mut self, op: impl Future<Output = Result<T>>) -> Result<(T, Cost)> {
        let w = self.begin().await?;
        let value = op.await?;
        Ok((value, self.end(w).await?))
    }

    /// Waits until the hash `key` has `len` fields (polls count as our commands).
    async fn wait_hlen(&mut self, key: &str, len: u64) -> Result<()> {
        let end = Instant::now() + OP_WAIT;
        loop {
            let n: u64 = redis::cmd("HLEN")
                .arg(key)
                .query_async(&mut self.conn)
                .await
                .context("HLEN")?;
            *self.own.entry("hlen".into()).or_default() += 1.0;
            if n == len {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!("{key} still has {n} fields, not {len}, after {OP_WAIT:?}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }

    async fn hlen(&mut self, key: &str) -> Result<u64> {
        redis::cmd("HLEN")
            .arg(key)
            .query_async(&mut self.conn)
            .await
            .context("HLEN")
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

fn total(m: &Counts) -> f64 {
    // + 0.0: an empty sum of f64 is -0.0, which would print as "-0.00".
    m.values().sum::<f64>() + 0.0
}

fn breakdown(m: &Counts, ops: f64) -> String {
    m.iter()
        .filter(|(_, v)| **v / ops >= 0.005)
        .map(|(k, v)| format!("{k}={:.2}", v / ops))
        .collect::<Vec<_>>()
        .join(" ")
}

fn report(what: &str, cost: &Cost, idle: &Cost, ops: usize) {
    let (own, background) = cost.split(idle);
    let ops = ops.max(1) as f64;
    figure_f(
        &format!("redis_calls_per_{what}"),
        total(&own.calls) / ops,
        2,
        "calls",
    );
    figure_f(
        &format!("redis_cmds_per_{what}"),
        total(&own.cmds) / ops,
        2,
        "cmds",
    );
    note!(
        "redis cost per {what}: {:.2} ms per window; calls [{}]; cmds (with those inside) [{}]",
        cost.secs * 1e3 / ops,
        breakdown(&own.calls, ops),
        breakdown(&own.cmds, ops)
    );
    note!(
        "redis cost per {what}: background left after its idle rate, not counted: calls {:.2} \
         cmds {:.2} [{}]",
        total(&background.calls) / ops,
        total(&background.cmds) / ops,
        breakdown(&background.cmds, ops)
    );
    note!(
        "redis cost per {what}: INFO commandstats (background included) {:.2} [{}]",
        total(&own.stats) / ops,
        breakdown(&own.stats, ops)
    );
}

/// Runs connect, disconnect, kill and publish `p.ops` times each, each in its own
/// window, and prints `redis_calls_per_*` and `redis_cmds_per_*`. The cluster must
/// hold no other sockets meanwhile.
pub async fn run(cluster: &Cluster, sources: &Sources, tag: &str, p: &CostParams) -> Result<()> {
    let n = cluster.nodes.len();
    let ops = p.ops.max(1);
    let mut meter = Meter::connect(&p.redis_url).await?;

    // Setup outside any window: sessions for the connects, and the publish target.
    // Few sockets per session and user: nodes limit them (429 past the limit).
    let conn_sessions = join_all((0..ops.div_ceil(SOCKETS_PER_SESSION)).map(|i| async move {
        cluster
            .create_session(i % n, &format!("bench-{tag}-cost-c{i}"))
            .await
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let pub_user = format!("bench-{tag}-cost-pub");
    let pub_session = cluster.create_session(0, &pub_user).await?;
    let mut pub_sockets = Vec::new();
    for node in 0..n {
        pub_sockets.push(
            cluster
                .open_ws(node, sources.next(), &pub_session.token)
                .await?,
        );
    }
    let node_ids: Vec<String> = pub_sockets.iter().map(|(_, h)| h.node_id.clone()).collect();
    let mut pub_sockets: Vec<Ws> = pub_sockets.into_iter().map(|(ws, _)| ws).collect();

    // The nodes' background: heartbeats, sweep, probes, reaper, pings, revalidation
    // and reconciliation (every 2 revalidations: the default idle window covers one).
    note!("redis cost: measuring {:?} of idle background", p.idle);
    let ((), idle) = meter
        .window(async {
            tokio::time::sleep(p.idle).await;
            Ok(())
        })
        .await?;

    // Connect: one socket at a time, spread over nodes and the sessions.
    let mut connect = Cost::default();
    let mut open: Vec<(usize, Ws, String)> = Vec::with_capacity(ops);
    for i in 0..ops {
        let node = i % n;
        let token = &conn_sessions[i / SOCKETS_PER_SESSION].token;
        let src = sources.next();
        let ((ws, hello), cost) = meter.window(cluster.open_ws(node, src, token)).await?;
        connect.add(&cost);
        open.push((node, ws, hello.connection_id));
    }
    report("connect", &connect, &idle, ops);

    // Disconnect: the client closes; the window ends when the node's record is gone.
    let mut disconnect = Cost::default();
    let mut closing = Vec::with_capacity(open.len());
    for (node, mut ws, cid) in open {
        // The node's records of the socket's bucket.
        let bucket = cid.get(..2).context("hello without a connection id")?;
        let key = &format!("{}{{{bucket}}}:node:{}:conns", p.key_prefix, node_ids[node]);
        let len = meter.hlen(key).await?;
        if len == 0 {
            bail!("{key} is empty although node {node} holds sockets: wrong --key-prefix?");
        }
        let w = meter.begin().await?;
        socket::send_close(&mut ws).await;
        meter.wait_hlen(key, len - 1).await?;
        disconnect.add(&meter.end(w).await?);
        closing.push(ws);
    }
    join_all(closing.into_iter().map(socket::finish_close)).await;
    report("disconnect", &disconnect, &idle, ops);

    // Kill: a fresh session with one socket per node, killed through node i % n.
    let mut kill = Cost::default();
    let mut finishing = Vec::with_capacity(ops * n);
    for i in 0..ops {
        let created = cluster
            .create_session(i % n, &format!("bench-{tag}-cost-k{i}"))
            .await?;
        let mut sockets = Vec::new();
        for node in 0..n {
            sockets.push(
                cluster
                    .open_ws(node, sources.next(), &created.token)
                    .await?
                    .0,
            );
        }
        let sid = created.session_id.clone();
        let ((), cost) = meter
            .window(async {
                let status = cluster.kill_session(i % n, &sid).await?;
                if status != 204 {
                    bail!("kill answered {status}");
                }
                let closes =
                    join_all(sockets.iter_mut().map(|ws| read_until_close(ws, OP_WAIT))).await;
                if let Some((code, _)) = closes
                    .iter()
                    .find(|(c, _)| *c != Some(crate::kill::SESSION_ENDED))
                {
                    bail!("a killed session's socket closed with {code:?}, not 4001");
                }
                Ok(())
            })
            .await?;
        kill.add(&cost);
        // Their close handshakes finish in the background, outside the windows.
        finishing.extend(
            sockets
                .into_iter()
                .map(|ws| tokio::spawn(socket::finish_close(ws))),
        );
    }
    report("kill", &kill, &idle, ops);
    join_all(finishing).await;

    // Targeted publish to a user with one socket per node.
    let mut publish = Cost::default();
    for seq in 0..ops as u64 {
        let body = format!(
            r#"{{"to":{{"user":"{pub_user}"}},"event":"bench","data":{{"t":{},"seq":{seq}}}}}"#,
            now_us()
        );
        let ((), cost) = meter
            .window(async {
                let status = cluster.publish(seq as usize % n, body).await?;
                if status != 202 {
                    bail!("publish answered {status}");
                }
                let got = join_all(
                    pub_sockets
                        .iter_mut()
                        .map(|ws| read_until_seq(ws, seq, OP_WAIT)),
                )
                .await;
                if !got.iter().all(|g| *g) {
                    bail!("publish {seq} did not reach every socket of its user");
                }
                Ok(())
            })
            .await?;
        publish.add(&cost);
    }
    report("publish", &publish, &idle, ops);

    for ws in pub_sockets {
        socket::close(ws).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, f64)]) -> Counts {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn monitor_lines_are_client_commands_inner_commands_or_ours() {
        let own = "127.0.0.1:5000";
        let call = r#"1796169933.881529 [0 127.0.0.1:57742] "FCALL" "sh_publish_0123456789abcdef" "1" "k""#;
        assert!(matches!(
            parse_monitor_line(call, own),
            Some(MonEvent::Cmd { key }) if key == "FCALL sh_publish"
        ));
        let inner = r#"1796169933.881605 [0 lua] "HGETALL" "sh:{00}:x""#;
        assert!(matches!(
            parse_monitor_line(inner, own),
            Some(MonEvent::Inner)
        ));
        let mark = format!(r#"1.0 [0 {own}] "ECHO" "{MARKER}7""#);
        assert!(matches!(
            parse_monitor_line(&mark, own),
            Some(MonEvent::Marker(7))
        ));
        let ours = format!(r#"1.0 [0 {own}] "HLEN" "k""#);
        assert!(parse_monitor_line(&ours, own).is_none());
    }

    #[test]
    fn background_kinds_are_left_out_of_the_figure_whatever_their_burst() {
        let idle = Cost {
            calls: counts(&[("PUBLISH", 20.0), ("FCALL sh_node_heartbeat", 2.0)]),
            cmds: counts(&[("PUBLISH", 20.0), ("FCALL sh_node_heartbeat", 6.0)]),
            stats: Counts::new(),
            secs: 10.0,
        };
        // One publish window that caught a burst of 12 probes.
        let window = Cost {
            calls: counts(&[("FCALL sh_publish", 1.0), ("PUBLISH", 12.0)]),
            cmds: counts(&[("FCALL sh_publish", 7.0), ("PUBLISH", 12.0)]),
            stats: Counts::new(),
            secs: 0.5,
        };
        let (own, background) = window.split(&idle);
        assert_eq!(total(&own.calls), 1.0);
        assert_eq!(total(&own.cmds), 7.0);
        assert_eq!(background.calls.get("PUBLISH"), Some(&11.0));
    }
}
