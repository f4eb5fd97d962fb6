//! The Redis engine: sessions and connections in Redis hashes, events between nodes
//! over Redis pub/sub.
//!
//! Every state change is one call of a Redis function from `lua/sessionhub.lua`
//! (the same library operators call with `redis-cli FCALL`), so a change is atomic
//! and its events are published in the same step: a function that ends a session
//! also tells exactly the nodes that hold its sockets, found from the connection
//! records. Every function touches the keys of one bucket (hash slot) only, so the
//! same library and layout run on one Redis and on Redis Cluster; see [`keys`].
//! Each node subscribes to a channel of its own per bucket, `<prefix>{B}:node:<id>`
//! (sharded pub/sub on Redis Cluster, so an event travels only within the shard that
//! owns its bucket), and to `<prefix>all`.
//!
//! Each node also holds a lease in `<prefix>nodes`, renewed by [`lease`]; the records
//! of a node whose lease expires are reaped by the others, bucket by bucket.

mod cleanup;
mod conn;
pub mod keys;
mod lease;
mod subscriber;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, ToRedisArgs};
use sessionhub_core::time::now_ms;
use sessionhub_core::{
    ConnLimits, ConnectionId, ConnectionInfo, CreatedSession, Delivery, EndReason, Engine,
    EngineError, EngineStats, EventSender, GroupName, LocalRecord, Member, NewSession, NodeId,
    OnlineUser, PresenceCounts, SecretHash, Session, SessionId, Target, Token, UserId,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use conn::Conn;
pub use conn::Topology;
pub use keys::{BUCKETS, Bucket, Keys};
pub use lease::LeaseConfig;
use wire::Fields;

/// Default time a start-up waits for Redis before giving up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on one Redis operation (including reconnecting).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// No arguments for a function call.
const NO_ARGS: &[&str] = &[];
/// Sessions `sh_expire` ends per call, to keep each call short.
const EXPIRE_BATCH: usize = 500;
/// Commands failing in a row (Redis unavailable) after which a cluster connection
/// is rebuilt from scratch.
const REBUILD_AFTER_FAILURES: u64 = 3;
/// Sockets re-asserted per function call, to keep each call short.
const REASSERT_BATCH: usize = 1000;
/// How much earlier than its command timeout a call's deadline is: covers the
/// error of the clock offset and the reply's way back.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);
/// Lease fields of a bucket (`P{B}:leases`) are forgotten this many lease lifetimes
/// after the lease they name ran out.
const LEASE_FORGET_AFTER_TTLS: u32 = 10;

/// The function library, loaded into Redis at start-up and after Redis lost it.
pub const LIBRARY: &str = include_str!("../../../lua/sessionhub.lua");

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One Redis or a Redis Cluster.
    pub topology: Topology,
    /// Prefix of every key and channel (default `sh:`).
    pub key_prefix: String,
    /// How long start-up keeps retrying an unreachable Redis.
    pub connect_timeout: Duration,
    /// Bound on one operation.
    pub command_timeout: Duration,
    /// Node lease and reaper timing.
    pub lease: LeaseConfig,
    /// Socket limits per session and per user.
    pub limits: ConnLimits,
}

impl RedisConfig {
    /// A config for one Redis at `url`, with defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_topology(Topology::Single(url.into()))
    }

    /// A config for a Redis Cluster reached through `seeds`.
    pub fn cluster(seeds: Vec<String>) -> Self {
        Self::with_topology(Topology::Cluster(seeds))
    }

    /// A config for `topology`, with defaults for everything else.
    pub fn with_topology(topology: Topology) -> Self {
        Self {
            topology,
            key_prefix: "sh:".into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            lease: LeaseConfig::default(),
            limits: ConnLimits::default(),
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not a Redis URL.
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password hidden.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis did not answer within the connect timeout.
    #[error("Redis at {url} is unreachable after {:.1}s: {reason}", waited.as_secs_f64())]
    Unreachable {
        /// The URL with any password hidden.
        url: String,
        /// How long start-up kept trying.
        waited: Duration,
        /// The last error.
        reason: String,
    },
}

/// Hides the password of a Redis URL, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// One node's handle on the shared Redis state. Dropping it stops its background
/// tasks (subscriber, lease).
pub struct RedisEngine {
    inner: Arc<Inner>,
}

/// What the engine and its background tasks share.
pub(crate) struct Inner {
    /// One multiplexed connection for every command, re-established on failure
    /// (on Redis Cluster: one per master, routed by slot). Commands are pipelined on
    /// it, so no pool is needed, and unlike a pool it costs no health-check round
    /// trip per command.
    conn: std::sync::RwLock<Conn>,
    /// On Redis Cluster: the seeds and timeouts to build a fresh cluster connection
    /// with, when the current one stops answering (see [`Inner::run`]).
    rebuild_from: Option<(Vec<String>, RedisConfig)>,
    /// Consecutive commands that found Redis unavailable.
    failures_in_a_row: AtomicU64,
    /// Whether a call is rebuilding the cluster connection right now.
    rebuilding: AtomicBool,
    /// Whether the store is a Redis Cluster (sharded pub/sub).
    cluster: bool,
    /// The expiry of this node's lease as of its last successful renewal (Unix
    /// ms); registrations carry it, so that a fenced node's are refused.
    lease_until: AtomicI64,
    keys: Keys,
    node_id: NodeId,
    command_timeout: Duration,
    lease: LeaseConfig,
    limits: ConnLimits,
    stop: CancellationToken,
    /// Wakes the lease task to rejoin at once (a call found the node fenced).
    rejoin: Notify,
    /// When this node's own probe last came back through pub/sub, per bucket
    /// channel (Unix ms).
    last_probe: Vec<AtomicI64>,
    /// When the subscriber last (re)subscribed (Unix ms).
    subscribed_at: AtomicI64,
    /// Whether the subscriber holds its subscriptions right now.
    subscribed: AtomicBool,
    /// Failed store operations.
    errors: AtomicU64,
    /// Subscriber re-subscriptions.
    reconnects: AtomicU64,
    /// Records of dead nodes reaped by this node.
    reaped: AtomicU64,
    /// See [`Engine::generation`].
    generation: AtomicU64,
    /// Redis's clock minus this node's (ms), as of the last lease renewal: the
    /// functions check deadlines against Redis's clock.
    clock_offset: AtomicI64,
    /// Records whose fate is unknown (their call failed or timed out), to remove
    /// until Redis confirms; see [`cleanup`].
    pub(crate) cleanup: cleanup::Queue,
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

fn from_redis(e: RedisError) -> EngineError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        EngineError::Unavailable(e.to_string())
    } else {
        EngineError::Corrupt(e.to_string())
    }
}

fn corrupt(e: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt(e.to_string())
}

impl RedisEngine {
    /// Connects, retrying for up to `config.connect_timeout`, loads the function
    /// library, takes this node's lease and subscribes to its channels before
    /// returning, so the node is reachable as soon as it serves. Events go to
    /// `events`.
    pub async fn connect(
        config: RedisConfig,
        node_id: NodeId,
        events: EventSender,
    ) -> Result<Self, ConnectError> {
        let shown = config.topology.shown();
        let invalid = |e: RedisError| ConnectError::InvalidUrl {
            url: shown.clone(),
            reason: e.to_string(),
        };
        let (conn, subscribe_with) = match &config.topology {
            Topology::Single(url) => {
                let client = redis::Client::open(url.as_str()).map_err(invalid)?;
                let manager_cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(config.command_timeout))
                    .set_response_timeout(Some(config.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg)
                    .map_err(invalid)?;
                (Conn::Single(conn), subscriber::Source::Single(client))
            }
            Topology::Cluster(seeds) => {
                let conn = cluster_connection(seeds, &config, &shown).await?;
                (
                    Conn::Cluster(conn),
                    subscriber::Source::Cluster(seeds.clone()),
                )
            }
        };
        let rebuild_from = match &config.topology {
            Topology::Cluster(seeds) => Some((seeds.clone(), config.clone())),
            Topology::Single(_) => None,
        };
        let inner = Arc::new(Inner {
            conn: std::sync::RwLock::new(conn),
            rebuild_from,
            failures_in_a_row: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
            cluster: config.topology.is_cluster(),
            lease_until: AtomicI64::new(0),
            keys: Keys::new(config.key_prefix),
            node_id,
            command_timeout: config.command_timeout,
            lease: config.lease,
            limits: config.limits,
            stop: CancellationToken::new(),
            rejoin: Notify::new(),
            last_probe: (0..BUCKETS).map(|_| AtomicI64::new(0)).collect(),
            subscribed_at: AtomicI64::new(0),
            subscribed: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            clock_offset: AtomicI64::new(0),
            cleanup: cleanup::Queue::default(),
        });
        let engine = Self { inner };

        let started = tokio::time::Instant::now();
        let deadline = started + config.connect_timeout;
        let unreachable = |reason: String| ConnectError::Unreachable {
            url: shown.clone(),
            waited: started.elapsed(),
            reason,
        };
        let mut delay = Duration::from_millis(100);
        loop {
            let err = match engine.inner.startup().await {
                Ok(()) => break,
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(unreachable(err.to_string()));
            }
            tracing::warn!(redis = %shown, error = %err, "Redis not reachable yet; retrying");
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }

        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ready = subscriber::spawn(subscribe_with, events.clone(), engine.inner.clone());
        match tokio::time::timeout(remaining.max(config.command_timeout), ready).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(unreachable("subscriber stopped".into())),
            Err(_) => {
                return Err(unreachable(
                    "could not subscribe to the node channel".into(),
                ));
            }
        }
        tokio::spawn(lease::run(engine.inner.clone(), events));
        tokio::spawn(cleanup::run(engine.inner.clone()));
        Ok(engine)
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }
}

/// Connects to a Redis Cluster, retrying until the connect timeout: the cluster
/// client needs the slot map before it can route anything.
async fn cluster_connection(
    seeds: &[String],
    config: &RedisConfig,
    shown: &str,
) -> Result<redis::cluster_async::ClusterConnection, ConnectError> {
    let client = redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
        .connection_timeout(config.command_timeout)
        .response_timeout(config.command_timeout)
        .retries(2)
        .build()
        .map_err(|e| ConnectError::InvalidUrl {
            url: shown.to_owned(),
            reason: e.to_string(),
        })?;
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        let err = match tokio::time::timeout(config.command_timeout, client.get_async_connection())
            .await
        {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if started.elapsed() >= config.connect_timeout {
            return Err(ConnectError::Unreachable {
                url: shown.to_owned(),
                waited: started.elapsed(),
                reason: err,
            });
        }
        tracing::warn!(redis = %shown, error = %err, "Redis Cluster not reachable yet; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

impl Inner {
    /// Loads the library and takes this node's lease, first dropping every record
    /// left under its id (by a previous run, or by this process before it was
    /// fenced) and fencing off the old lease in every bucket.
    async fn startup(&self) -> Result<(), EngineError> {
        self.load_library().await?;
        self.measure_clock().await?;
        let nodes = self.keys.nodes();
        let id = self.node_id.as_str();
        let old: Option<f64> = self
            .run(|mut c| async move {
                redis::cmd("ZSCORE")
                    .arg(nodes)
                    .arg(id)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let now = now_ms();
        let upto = (old.unwrap_or(0.0) as i64)
            .max(self.lease_until.load(Ordering::Acquire))
            .max(now);
        let dropped = self.drop_node(&self.node_id, upto).await?;
        if dropped > 0 {
            tracing::info!(dropped, "dropped records left under this node's id");
        }
        let lease: i64 = self
            .fcall(
                "sh_node_join",
                &[self.keys.nodes()],
                (id, now, self.lease.ttl_ms(), upto),
            )
            .await?;
        self.lease_until.fetch_max(lease, Ordering::AcqRel);
        Ok(())
    }

    /// Drops a node's records from every bucket and fences off its leases up to
    /// `upto`. Returns the number of connection records dropped.
    pub(crate) async fn drop_node(&self, node: &NodeId, upto: i64) -> Result<u64, EngineError> {
        let counts = self
            .each_bucket(|b| async move {
                self.fcall::<i64>("sh_drop_node", &[self.keys.node_conns(b, node)], upto)
                    .await
            })
            .await?;
        Ok(counts.into_iter().map(|n| n.max(0) as u64).sum())
    }

    /// Runs `op` for every bucket concurrently (the calls share the multiplexed
    /// connection, so they go out pipelined), and collects the results in bucket
    /// order. Fails if any call fails.
    pub(crate) async fn each_bucket<'a, T, F, Fut>(&'a self, op: F) -> Result<Vec<T>, EngineError>
    where
        F: Fn(Bucket) -> Fut,
        Fut: Future<Output = Result<T, EngineError>> + 'a,
    {
        try_join_all(Bucket::all().map(op)).await
    }

    /// The node ids holding a lease entry, live or not yet reaped.
    async fn node_ids(&self) -> Result<Vec<String>, EngineError> {
        let key = self.keys.nodes();
        self.run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn load_library(&self) -> Result<(), EngineError> {
        self.run(|mut c| async move {
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg(LIBRARY)
                .query_async::<String>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// Runs one Redis operation on the shared connection, bounded by the command
    /// timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, EngineError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let conn = match self.conn.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let work = async { op(conn).await.map_err(from_redis) };
        let res = tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| EngineError::Unavailable("Redis did not answer in time".into()))
            .and_then(|r| r);
        if matches!(res, Err(EngineError::Unavailable(_))) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let n = self.failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= REBUILD_AFTER_FAILURES {
                self.rebuild_cluster_connection().await;
            }
        } else {
            self.failures_in_a_row.store(0, Ordering::Release);
        }
        res
    }

    /// Replaces the cluster connection with a fresh one (a new slot map, new links
    /// to every master). The `redis` crate's cluster connection recovers from MOVED
    /// and dropped links by itself, but after a failover it can stay stuck refreshing
    /// its slot map; several failed commands in a row are the sign. One caller
    /// rebuilds, the others keep failing fast meanwhile.
    async fn rebuild_cluster_connection(&self) {
        let Some((seeds, config)) = &self.rebuild_from else {
            return;
        };
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        let shown = Topology::Cluster(seeds.clone()).shown();
        let quick = RedisConfig {
            connect_timeout: config.command_timeout,
            ..config.clone()
        };
        match cluster_connection(seeds, &quick, &shown).await {
            Ok(fresh) => {
                match self.conn.write() {
                    Ok(mut c) => *c = Conn::Cluster(fresh),
                    Err(poisoned) => *poisoned.into_inner() = Conn::Cluster(fresh),
                }
                self.failures_in_a_row.store(0, Ordering::Release);
                tracing::warn!(redis = %shown, "Redis Cluster kept failing; reconnected afresh");
            }
            Err(e) => tracing::warn!(error = %e, "could not reconnect to Redis Cluster"),
        }
        self.rebuilding.store(false, Ordering::Release);
    }

    /// Calls a library function. If Redis lost the library (it restarted empty),
    /// loads it again and retries once. A FENCED reply wakes the lease task.
    pub(crate) async fn fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        keys: &[String],
        args: impl ToRedisArgs + Clone,
    ) -> Result<T, EngineError> {
        for attempt in 0..2 {
            let args = args.clone();
            let res = self
                .run(|mut c| async move {
                    redis::cmd("FCALL")
                        .arg(name)
                        .arg(keys.len())
                        .arg(keys)
                        .arg(args)
                        .query_async::<T>(&mut c)
                        .await
                })
                .await;
            match res {
                Err(EngineError::Corrupt(msg))
                    if attempt == 0 && msg.contains("Function not found") =>
                {
                    tracing::warn!("Redis lost the function library; loading it again");
                    self.load_library().await?;
                }
                Err(EngineError::Corrupt(msg)) if msg.contains("LIMIT") => {
                    let detail = msg.split("LIMIT").nth(1).unwrap_or("");
                    return Err(EngineError::Limit(
                        detail.trim_start_matches([':', ' ']).to_owned(),
                    ));
                }
                Err(EngineError::Corrupt(msg)) if msg.contains("DEADLINE") => {
                    return Err(EngineError::Unavailable(
                        "Redis answered after the request's deadline; nothing was done".into(),
                    ));
                }
                Err(EngineError::Corrupt(msg)) if msg.contains("FENCED") => {
                    self.rejoin.notify_one();
                    return Err(EngineError::Unavailable(
                        "this node lost its lease; rejoining".into(),
                    ));
                }
                other => return other,
            }
        }
        Err(EngineError::Unavailable(
            "function library could not be loaded".into(),
        ))
    }

    /// Removes a connection's records (idempotent).
    pub(crate) async fn unregister(&self, cid: &ConnectionId) -> Result<(), EngineError> {
        self.fcall::<i64>("sh_unregister_connection", &[self.keys.conn(cid)], NO_ARGS)
            .await
            .map(drop)
    }

    /// Ends a session whose creation was answered with an error (if it exists).
    pub(crate) async fn end_unseen_session(&self, sid: &SessionId) -> Result<(), EngineError> {
        self.fcall::<i64>(
            "sh_kill_session",
            &[self.keys.session(sid)],
            (EndReason::Killed.as_str(), ""),
        )
        .await
        .map(drop)
    }

    /// The deadline to pass to a function called now, in Redis's clock: a little
    /// before this call's own timeout, so that a call Redis runs after the node gave
    /// up on it (and answered its client with an error) does nothing.
    pub(crate) fn deadline(&self) -> i64 {
        let timeout = self.command_timeout.saturating_sub(DEADLINE_MARGIN);
        now_ms() + self.clock_offset.load(Ordering::Relaxed) + timeout.as_millis() as i64
    }

    /// Records Redis's clock against this node's (`TIME`, halfway through the round
    /// trip).
    pub(crate) async fn measure_clock(&self) -> Result<(), EngineError> {
        let sent = now_ms();
        let (secs, micros): (i64, i64) = self
            .run(|mut c| async move { redis::cmd("TIME").query_async(&mut c).await })
            .await?;
        let received = now_ms();
        let redis_ms = secs * 1000 + micros / 1000;
        self.clock_offset
            .store(redis_ms - (sent + received) / 2, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn probe_received(&self, bucket: Bucket) {
        self.last_probe[bucket.index()].store(now_ms(), Ordering::Relaxed);
    }

    /// How long ago the stalest bucket channel last carried this node's probe (ms).
    pub(crate) fn probe_age(&self) -> i64 {
        let oldest = self
            .last_probe
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        now_ms() - oldest
    }

    pub(crate) fn set_subscribed(&self, on: bool) {
        if on {
            self.subscribed_at.store(now_ms(), Ordering::Relaxed);
        }
        self.subscribed.store(on, Ordering::Relaxed);
    }

    /// How long ago the subscriber last (re)subscribed (ms).
    pub(crate) fn subscribed_for(&self) -> i64 {
        now_ms() - self.subscribed_at.load(Ordering::Relaxed)
    }

    pub(crate) fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks that events may have been lost; see [`Engine::generation`].
    pub(crate) fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn count_reaped(&self, records: u64) {
        self.reaped.fetch_add(records, Ordering::Relaxed);
    }

    /// Publishes on a classic channel (the `all` channel; on Redis Cluster it
    /// reaches every shard).
    async fn publish_raw(&self, channel: String, payload: String) -> Result<i64, EngineError> {
        self.publish_with("PUBLISH", channel, payload).await
    }

    /// Publishes on one of this node's bucket channels, as the functions do:
    /// SPUBLISH on Redis Cluster, PUBLISH on one Redis.
    pub(crate) async fn publish_bucket(
        &self,
        channel: String,
        payload: &str,
    ) -> Result<i64, EngineError> {
        let command = if self.cluster { "SPUBLISH" } else { "PUBLISH" };
        self.publish_with(command, channel, payload.to_owned())
            .await
    }

    async fn publish_with(
        &self,
        command: &'static str,
        channel: String,
        payload: String,
    ) -> Result<i64, EngineError> {
        self.run(|mut c| async move {
            redis::cmd(command)
                .arg(channel)
                .arg(payload)
                .query_async(&mut c)
                .await
        })
        .await
    }
}

fn session_from_fields(sid: &SessionId, f: Fields) -> Result<Session, EngineError> {
    f.into_session(sid.clone()).map_err(corrupt)
}

/// Parses a connections hash (`connection_id` → `<node_id>|<connected_at>`),
/// sorted by connection time.
fn parse_conns(pairs: Vec<(String, String)>) -> Result<Vec<ConnectionInfo>, EngineError> {
    let mut out = pairs
        .into_iter()
        .map(|(cid, v)| {
            let (node, at) = v
                .split_once('|')
                .ok_or_else(|| corrupt(format!("bad connection record {v:?}")))?;
            Ok(ConnectionInfo {
                connection_id: ConnectionId::parse(&cid).map_err(corrupt)?,
                node_id: NodeId::parse(node).map_err(corrupt)?,
                connected_at: wire::ms(at).map_err(corrupt)?,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    out.sort_by_key(|c| c.connected_at);
    Ok(out)
}

fn field(map: &mut std::collections::HashMap<String, String>, name: &str) -> String {
    map.remove(name).unwrap_or_default()
}

fn session_from_map(
    sid: &SessionId,
    mut map: std::collections::HashMap<String, String>,
) -> Result<Session, EngineError> {
    session_from_fields(
        sid,
        Fields {
            user_id: field(&mut map, "user_id"),
            user_agent: field(&mut map, "user_agent"),
            ip: field(&mut map, "ip"),
            created_at: field(&mut map, "created_at"),
            last_seen_at: field(&mut map, "last_seen_at"),
            expires_at: field(&mut map, "expires_at"),
            idle_ms: field(&mut map, "idle_ms"),
        },
    )
}

fn member_key(member: &Member) -> (&'static str, &str) {
    match member {
        Member::Connection(c) => ("conn", c.as_str()),
        Member::User(u) => ("user", u.as_str()),
    }
}

#[async_trait]
impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn node_id(&self) -> &NodeId {
        &self.inner.node_id
    }

    fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            store_errors: self.inner.errors.load(Ordering::Relaxed),
            reconnects: self.inner.reconnects.load(Ordering::Relaxed),
            reaped_records: self.inner.reaped.load(Ordering::Relaxed),
        }
    }

    /// Ready when Redis answers, the subscriber holds its subscriptions, and this
    /// node's own probe came back through pub/sub recently: a node that is connected
    /// but deaf is not ready.
    async fn ping(&self) -> Result<(), EngineError> {
        self.inner
            .run(
                |mut c| async move { redis::cmd("PING").query_async::<redis::Value>(&mut c).await },
            )
            .await?;
        if !self.inner.subscribed.load(Ordering::Relaxed) {
            return Err(EngineError::Unavailable(
                "this node's pub/sub subscriber is reconnecting".into(),
            ));
        }
        let age = self.inner.probe_age();
        if age > self.inner.lease.probe_max_age().as_millis() as i64 {
            return Err(EngineError::Unavailable(format!(
                "this node's pub/sub probe has not come back on every bucket channel for {age} ms"
            )));
        }
        Ok(())
    }

    async fn create_session(&self, new: NewSession) -> Result<CreatedSession, EngineError> {
        let now = now_ms();
        let expires_at = now + new.ttl.as_millis() as i64;
        let idle_ms = new.idle.as_millis() as i64;
        let user_agent = new.user_agent.clone().unwrap_or_default();
        let ip = new.ip.clone().unwrap_or_default();
        let keys = &self.inner.keys;
        // A session id is 96 random bits under the user's tag; a collision is
        // astronomically unlikely, but the function refuses one rather than overwrite.
        for _ in 0..3 {
            let token = Token::generate(&new.user_id);
            let sid = token.session_id().clone();
            let res: Result<i64, _> = self
                .inner
                .fcall(
                    "sh_create_session",
                    &[keys.session(&sid), keys.user_sessions(&new.user_id)],
                    (
                        new.user_id.as_str(),
                        token.secret_hash().as_str(),
                        user_agent.as_str(),
                        ip.as_str(),
                        now,
                        expires_at,
                        idle_ms,
                        self.inner.limits.sessions_per_user,
                        self.inner.deadline(),
                    ),
                )
                .await;
            match res {
                Ok(_) => {
                    let session = Session {
                        session_id: sid,
                        user_id: new.user_id.clone(),
                        user_agent: new.user_agent.clone(),
                        ip: new.ip.clone(),
                        created_at: now,
                        last_seen_at: now,
                        expires_at,
                        idle_expires_at: now + idle_ms,
                        connections: Vec::new(),
                    };
                    return Ok(CreatedSession { session, token });
                }
                Err(EngineError::Corrupt(msg)) if msg.contains("EXISTS") => continue,
                Err(e @ EngineError::Unavailable(_)) => {
                    // The caller never gets this token: if the call ran after all
                    // (its answer lost), end the session it made.
                    self.inner.cleanup.push(cleanup::Item::Session(sid));
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Corrupt(
            "could not find a free session id".into(),
        ))
    }

    async fn authenticate(&self, token: &Token) -> Result<Option<Session>, EngineError> {
        let sid = token.session_id();
        let key = self.inner.keys.session(sid);
        let mut map: std::collections::HashMap<String, String> = self
            .inner
            .run(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        let Some(stored) = map.remove("secret_hash") else {
            return Ok(None);
        };
        if !SecretHash::from_stored(stored).ct_eq(&token.secret_hash()) {
            return Ok(None);
        }
        let session = session_from_map(sid, map)?;
        Ok((!session.expired_at(now_ms())).then_some(session))
    }

    async fn get_session(&self, session_id: &SessionId) -> Result<Option<Session>, EngineError> {
        let keys = &self.inner.keys;
        let (key, conns_key) = (keys.session(session_id), keys.conns(session_id));
        type Reply = (
            std::collections::HashMap<String, String>,
            Vec<(String, String)>,
        );
        let (map, conns): Reply = self
            .inner
            .run(|mut c| async move {
                redis::pipe()
                    .hgetall(key)
                    .hgetall(conns_key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        let mut session = session_from_map(session_id, map)?;
        if session.expired_at(now_ms()) {
            return Ok(None);
        }
        session.connections = parse_conns(conns)?;
        Ok(Some(session))
    }

    async fn user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>, EngineError> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            String,
            Vec<(String, String)>,
        );
        let rows: Vec<Row> = self
            .inner
            .fcall(
                "sh_user_sessions",
                &[self.inner.keys.user_sessions(user_id)],
                NO_ARGS,
            )
            .await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(rows.len());
        for (sid, user_agent, ip, created_at, last_seen_at, expires_at, idle_ms, conns) in rows {
            let sid = SessionId::parse(&sid).map_err(corrupt)?;
            let row = (
                user_agent,
                ip,
                created_at,
                last_seen_at,
                expires_at,
                idle_ms,
            );
            let fields = Fields::from_row(user_id.to_string(), row);
            let mut s = session_from_fields(&sid, fields)?;
            if s.expired_at(now) {
                continue;
            }
            s.connections = parse_conns(conns)?;
            out.push(s);
        }
        out.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(out)
    }

    async fn kill_session(
        &self,
        session_id: &SessionId,
        owner: Option<&UserId>,
        reason: EndReason,
    ) -> Result<bool, EngineError> {
        let owner = owner.map(UserId::as_str).unwrap_or("");
        let n: i64 = self
            .inner
            .fcall(
                "sh_kill_session",
                &[self.inner.keys.session(session_id)],
                (reason.as_str(), owner, self.inner.deadline()),
            )
            .await?;
        Ok(n > 0)
    }

    async fn kill_user_sessions(
        &self,
        user_id: &UserId,
        except: Option<&SessionId>,
        reason: EndReason,
    ) -> Result<u64, EngineError> {
        let keep = except.map(SessionId::as_str).unwrap_or("");
        let n: i64 = self
            .inner
            .fcall(
                "sh_kill_user_sessions",
                &[self.inner.keys.user_sessions(user_id)],
                (reason.as_str(), keep, self.inner.deadline()),
            )
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn register_connection(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
    ) -> Result<Option<Session>, EngineError> {
        let sid = token.session_id();
        type Reply = Option<(String, String, String, String, String, String, String)>;
        let limits = self.inner.limits;
        let reply: Result<Reply, _> = self
            .inner
            .fcall(
                "sh_register_connection",
                &[self.inner.keys.session(sid)],
                (
                    token.secret_hash().as_str(),
                    connection_id.as_str(),
                    self.inner.node_id.as_str(),
                    now_ms(),
                    limits.per_session,
                    limits.per_user,
                    self.inner.lease_until.load(Ordering::Acquire),
                    self.inner.deadline(),
                ),
            )
            .await;
        let reply = match reply {
            Err(e @ EngineError::Unavailable(_)) => {
                // It may still run (before its deadline) or have run with the
                // answer lost: make sure no record outlives this failed upgrade.
                self.inner
                    .cleanup
                    .push(cleanup::Item::Connection(connection_id.clone()));
                return Err(e);
            }
            other => other?,
        };
        let Some((user_id, user_agent, ip, created_at, last_seen_at, expires_at, idle_ms)) = reply
        else {
            return Ok(None);
        };
        let row = (
            user_agent,
            ip,
            created_at,
            last_seen_at,
            expires_at,
            idle_ms,
        );
        let fields = Fields::from_row(user_id, row);
        session_from_fields(sid, fields).map(Some)
    }

    async fn unregister_connection(&self, connection_id: &ConnectionId) -> Result<(), EngineError> {
        let res = self.inner.unregister(connection_id).await;
        if res.is_err() {
            // Retried until Redis confirms: a record left behind would count
            // against presence and the socket limits.
            self.inner
                .cleanup
                .push(cleanup::Item::Connection(connection_id.clone()));
        }
        res
    }

    async fn publish(&self, target: &Target, frame: &str) -> Result<Delivery, EngineError> {
        let keys = &self.inner.keys;
        let key = match target {
            Target::User(u) => keys.user_sessions(u),
            Target::Session(s) => keys.session(s),
            Target::Connection(c) => keys.conn(c),
            Target::Group(g) => return self.publish_group(g, frame).await,
            Target::All => {
                let nodes = self
                    .inner
                    .publish_raw(keys.all_channel(), wire::broadcast_payload(frame))
                    .await?;
                return Ok(Delivery {
                    nodes: nodes.max(0) as u64,
                    connections: None,
                });
            }
        };
        let (nodes, conns): (i64, i64) = self
            .inner
            .fcall("sh_publish", &[key], (frame, self.inner.deadline()))
            .await?;
        Ok(Delivery {
            nodes: nodes.max(0) as u64,
            connections: Some(conns.max(0) as u64),
        })
    }

    async fn group_add(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError> {
        let inner = &self.inner;
        let b = member_bucket(member);
        let key = [inner.keys.group(b, group)];
        let add = async {
            match member {
                Member::Connection(c) => {
                    inner
                        .fcall::<i64>(
                            "sh_group_add",
                            &key,
                            ("conn", c.as_str(), now_ms(), inner.deadline()),
                        )
                        .await
                }
                Member::User(u) => {
                    inner
                        .fcall::<i64>(
                            "sh_group_add",
                            &key,
                            ("user", u.as_str(), now_ms(), inner.deadline()),
                        )
                        .await
                }
            }
        };
        // Both must hold before the add is acknowledged, in this order: the sweep
        // that forgets emptied buckets relies on the count moving after the add.
        let n = add.await?;
        let buckets = inner.keys.group_buckets(group);
        inner
            .run(|mut c| async move {
                redis::cmd("HINCRBY")
                    .arg(buckets)
                    .arg(b.hex())
                    .arg(1)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await?;
        Ok(n > 0)
    }

    async fn group_remove(&self, group: &GroupName, member: &Member) -> Result<bool, EngineError> {
        let (kind, id) = member_key(member);
        let key = self.inner.keys.group(member_bucket(member), group);
        let n: i64 = self
            .inner
            .fcall("sh_group_remove", &[key], (kind, id, self.inner.deadline()))
            .await?;
        Ok(n > 0)
    }

    async fn group_members(&self, group: &GroupName) -> Result<Vec<Member>, EngineError> {
        let inner = &self.inner;
        let buckets = inner.group_buckets(group).await?;
        let per_bucket = try_join_all(buckets.into_iter().map(|b| {
            let key = inner.keys.group(b, group);
            inner.run(|mut c| async move {
                redis::cmd("HKEYS")
                    .arg(key)
                    .query_async::<Vec<String>>(&mut c)
                    .await
            })
        }))
        .await?;
        let mut out = per_bucket
            .iter()
            .flatten()
            .map(|f| match f.split_once(':') {
                Some(("conn", id)) => ConnectionId::parse(id)
                    .map(Member::Connection)
                    .map_err(corrupt),
                Some(("user", id)) => UserId::parse(id).map(Member::User).map_err(corrupt),
                _ => Err(corrupt(format!("bad group member {f:?}"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.sort();
        Ok(out)
    }

    /// Merges one page from every bucket (each in lexical order) into one page.
    async fn online_users(
        &self,
        after: Option<&UserId>,
        limit: usize,
    ) -> Result<Vec<OnlineUser>, EngineError> {
        let inner = &self.inner;
        let after = after.map(UserId::as_str).unwrap_or("");
        let pages = inner
            .each_bucket(|b| async move {
                inner
                    .fcall::<Vec<(String, u64)>>(
                        "sh_online_users",
                        &[inner.keys.online(b)],
                        (after, limit),
                    )
                    .await
            })
            .await?;
        let mut all: Vec<(String, u64)> = pages.into_iter().flatten().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.truncate(limit);
        all.into_iter()
            .map(|(u, n)| {
                Ok(OnlineUser {
                    user_id: UserId::parse(&u).map_err(corrupt)?,
                    connections: n,
                })
            })
            .collect()
    }

    async fn presence_counts(&self) -> Result<PresenceCounts, EngineError> {
        let inner = &self.inner;
        let nodes = inner.node_ids().await?;
        let nodes = &nodes;
        let counts = inner
            .each_bucket(|b| async move {
                inner
                    .fcall::<(u64, u64)>("sh_presence_counts", &[inner.keys.online(b)], nodes)
                    .await
            })
            .await?;
        let (online_users, connections) = counts
            .into_iter()
            .fold((0, 0), |(u, c), (bu, bc)| (u + bu, c + bc));
        Ok(PresenceCounts {
            online_users,
            connections,
            nodes: nodes.len() as u64,
        })
    }

    /// Cheap first: the number of this node's records in each bucket; only buckets
    /// holding more records than sockets get a full look (`sh_reconcile`).
    async fn reconcile(&self, held: &[LocalRecord], before: i64) -> Result<u64, EngineError> {
        let inner = &self.inner;
        let mut by_bucket: HashMap<Bucket, Vec<&str>> = HashMap::new();
        for r in held {
            by_bucket
                .entry(Bucket::of(r.connection_id.as_str()))
                .or_default()
                .push(r.connection_id.as_str());
        }
        let by_bucket = &by_bucket;
        let lens = inner
            .each_bucket(|b| async move {
                let key = inner.keys.node_conns(b, &inner.node_id);
                let n: usize =
                    inner
                        .run(|mut c| async move {
                            redis::cmd("HLEN").arg(key).query_async(&mut c).await
                        })
                        .await?;
                Ok((b, n))
            })
            .await?;
        let calls = lens
            .into_iter()
            .filter(|(b, n)| *n > by_bucket.get(b).map_or(0, Vec::len))
            .map(|(b, _)| {
                let mut args = vec![before.to_string()];
                args.extend(
                    by_bucket
                        .get(&b)
                        .into_iter()
                        .flatten()
                        .map(|c| c.to_string()),
                );
                let key = inner.keys.node_conns(b, &inner.node_id);
                async move { inner.fcall::<i64>("sh_reconcile", &[key], args).await }
            });
        let removed: i64 = try_join_all(calls).await?.into_iter().sum();
        Ok(removed.max(0) as u64)
    }

    /// One pipeline per bucket (a pipeline must stay within one hash slot on Redis
    /// Cluster), all sent at once.
    async fn sessions_alive(&self, sessions: &[SessionId]) -> Result<Vec<bool>, EngineError> {
        let inner = &self.inner;
        let mut by_bucket: HashMap<Bucket, Vec<usize>> = HashMap::new();
        for (i, sid) in sessions.iter().enumerate() {
            by_bucket
                .entry(Bucket::of(sid.as_str()))
                .or_default()
                .push(i);
        }
        let replies = try_join_all(by_bucket.into_values().map(|idx| {
            let mut pipe = redis::pipe();
            for &i in &idx {
                pipe.exists(inner.keys.session(&sessions[i]));
            }
            async move {
                let alive: Vec<bool> = inner
                    .run(|mut c| async move { pipe.query_async(&mut c).await })
                    .await?;
                Ok::<_, EngineError>((idx, alive))
            }
        }))
        .await?;
        let mut out = vec![false; sessions.len()];
        for (idx, alive) in replies {
            for (i, a) in idx.into_iter().zip(alive) {
                out[i] = a;
            }
        }
        Ok(out)
    }

    async fn reassert(&self, records: &[LocalRecord]) -> Result<Vec<SessionId>, EngineError> {
        let inner = &self.inner;
        let mut by_bucket: HashMap<Bucket, Vec<&LocalRecord>> = HashMap::new();
        for r in records {
            by_bucket
                .entry(Bucket::of(r.connection_id.as_str()))
                .or_default()
                .push(r);
        }
        let lease = inner.lease_until.load(Ordering::Acquire);
        let calls = by_bucket.iter().flat_map(|(b, recs)| {
            recs.chunks(REASSERT_BATCH).map(move |chunk| {
                let mut args: Vec<String> = Vec::with_capacity(2 + chunk.len() * 4);
                args.push(lease.to_string());
                args.push(now_ms().to_string());
                for r in chunk {
                    args.push(r.connection_id.to_string());
                    args.push(r.session_id.to_string());
                    args.push(r.user_id.to_string());
                    args.push(r.connected_at.to_string());
                }
                let key = inner.keys.node_conns(*b, &inner.node_id);
                async move {
                    inner
                        .fcall::<Vec<String>>("sh_reassert", &[key], args)
                        .await
                }
            })
        });
        let mut gone = Vec::new();
        for s in try_join_all(calls).await?.into_iter().flatten() {
            gone.push(SessionId::parse(&s).map_err(corrupt)?);
        }
        Ok(gone)
    }

    async fn touch(&self, session_id: &SessionId) -> Result<(), EngineError> {
        self.inner
            .fcall::<i64>(
                "sh_touch",
                &[self.inner.keys.session(session_id)],
                (now_ms(), self.inner.deadline()),
            )
            .await
            .map(drop)
    }

    async fn expire_due(&self) -> Result<u64, EngineError> {
        let inner = &self.inner;
        let forget_after = inner.lease.ttl_ms() * u64::from(LEASE_FORGET_AFTER_TTLS);
        let ended = inner
            .each_bucket(|b| async move {
                let key = [inner.keys.expiry(b)];
                // The first call of a round also takes the groups emptied in b.
                let reply: redis::Value = inner
                    .fcall(
                        "sh_expire",
                        &key,
                        (now_ms(), EXPIRE_BATCH, forget_after, "1"),
                    )
                    .await?;
                let (mut n, emptied) = expire_reply(reply)?;
                for (group, count) in emptied {
                    inner.forget_group_bucket(&group, b).await?;
                    inner
                        .fcall::<i64>(
                            "sh_group_emptied_done",
                            &[inner.keys.groups_emptied(b)],
                            (group.as_str(), count.as_str()),
                        )
                        .await?;
                }
                let mut total = 0;
                loop {
                    total += n.max(0) as u64;
                    if (n.max(0) as usize) < EXPIRE_BATCH {
                        return Ok(total);
                    }
                    n = inner
                        .fcall("sh_expire", &key, (now_ms(), EXPIRE_BATCH, forget_after))
                        .await?;
                }
            })
            .await?;
        Ok(ended.into_iter().sum())
    }

    async fn leave(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner.stop.cancel();
        let upto = inner.lease_until.load(Ordering::Acquire).max(now_ms());
        let n = inner.drop_node(&inner.node_id, upto).await?;
        inner
            .fcall::<i64>(
                "sh_node_forget",
                &[inner.keys.nodes()],
                (inner.node_id.as_str(), upto),
            )
            .await?;
        tracing::info!(records = n, "left the cluster");
        Ok(())
    }
}

impl RedisEngine {
    /// A group publish: one `sh_publish` per bucket that may hold members. The node
    /// count is the sum over buckets (a node reached from two buckets counts twice).
    async fn publish_group(&self, group: &GroupName, frame: &str) -> Result<Delivery, EngineError> {
        let inner = &self.inner;
        let buckets = inner.group_buckets(group).await?;
        let replies = try_join_all(buckets.into_iter().map(|b| {
            let key = inner.keys.group(b, group);
            async move {
                inner
                    .fcall::<(i64, i64)>("sh_publish", &[key], (frame, inner.deadline()))
                    .await
            }
        }))
        .await?;
        let (nodes, conns) = replies
            .into_iter()
            .fold((0, 0), |(n, c), (bn, bc)| (n + bn.max(0), c + bc.max(0)));
        Ok(Delivery {
            nodes: nodes as u64,
            connections: Some(conns as u64),
        })
    }
}

/// `sh_expire`'s reply: the sessions ended and, when asked, the groups emptied with
/// their counts (a library older than the node answers the number alone).
fn expire_reply(v: redis::Value) -> Result<(i64, Vec<(String, String)>), EngineError> {
    if let redis::Value::Int(n) = v {
        return Ok((n, Vec::new()));
    }
    let (n, flat): (i64, Vec<String>) = redis::from_redis_value(v).map_err(corrupt)?;
    let pairs = flat
        .chunks_exact(2)
        .map(|p| (p[0].clone(), p[1].clone()))
        .collect();
    Ok((n, pairs))
}

impl Inner {
    /// The buckets that may hold members of a group (and those a 0.2.0 node wrote
    /// in the older set).
    async fn group_buckets(&self, group: &GroupName) -> Result<Vec<Bucket>, EngineError> {
        let key = self.keys.group_buckets(group);
        let legacy = self.keys.legacy_group_buckets(group);
        let current =
            self.run(|mut c| async move { redis::cmd("HKEYS").arg(key).query_async(&mut c).await });
        let old = self.run(|mut c| async move {
            redis::cmd("SMEMBERS").arg(legacy).query_async(&mut c).await
        });
        let (current, old): (Vec<String>, Vec<String>) = tokio::try_join!(current, old)?;
        let mut buckets: Vec<Bucket> = current.iter().chain(&old).map(|h| Bucket::of(h)).collect();
        buckets.sort_unstable();
        buckets.dedup();
        Ok(buckets)
    }

    /// Forgets bucket `b` in a group's bucket index if its members there are gone
    /// and none was added meanwhile. The count is read before the members are
    /// looked at: see `sh_group_forget_bucket`.
    async fn forget_group_bucket(&self, group: &str, b: Bucket) -> Result<(), EngineError> {
        let Ok(group) = GroupName::parse(group) else {
            tracing::warn!(
                group,
                "ignoring a malformed group name in an emptied-groups set"
            );
            return Ok(());
        };
        let index = self.keys.group_buckets(&group);
        let idx = index.clone();
        let adds: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("HGET")
                    .arg(idx)
                    .arg(b.hex())
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let Some(adds) = adds else { return Ok(()) };
        let members = self.keys.group(b, &group);
        let exists: i64 = self
            .run(|mut c| async move { redis::cmd("EXISTS").arg(members).query_async(&mut c).await })
            .await?;
        if exists == 0 {
            self.fcall::<i64>("sh_group_forget_bucket", &[index], (b.hex(), adds))
                .await?;
        }
        Ok(())
    }
}

/// The bucket a group member's entry lives in.
fn member_bucket(member: &Member) -> Bucket {
    match member {
        Member::Connection(c) => Bucket::of(c.as_str()),
        Member::User(u) => Bucket::of(&u.tag()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
