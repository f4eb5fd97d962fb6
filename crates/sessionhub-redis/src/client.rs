//! The command client: one shared connection, bounded calls, function calls,
//! publishing, and Redis's clock.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, ToRedisArgs};
use sessionhub_core::time::now_ms;
use sessionhub_core::{ConnLimits, EngineError, HistoryConfig, NodeId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cleanup;
use crate::config::{ConnectError, RedisConfig};
use crate::conn::{Conn, Topology};
use crate::error::{CallError, FunctionError};
use crate::keys::{BUCKETS, Bucket, Keys};
use crate::lease::LeaseConfig;
use crate::sentinel::Sentinel;
use crate::sweep;

/// Commands failing in a row (Redis unavailable) after which a cluster connection
/// is rebuilt from scratch.
const REBUILD_AFTER_FAILURES: u64 = 3;
/// Bucket channels probed per heartbeat (all of them after a (re)subscription).
pub const PROBES_PER_HEARTBEAT: usize = 8;
/// How much earlier than its command timeout a call's deadline is: covers the
/// error of the clock offset and the reply's way back.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// Counts a call as under way until dropped (also when the call is cancelled).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The FCALL's own error out of a failed `PING`, `FCALL` pipeline, as the FCALL alone
/// would have failed (FunctionError::parse reads its code); any other failure as
/// it is.
fn fcall_error_of_pipeline(e: redis::RedisError) -> redis::RedisError {
    let fcall = e.clone().into_server_errors().and_then(|errors| {
        errors
            .iter()
            .find(|(i, _)| *i == 1)
            .map(|(_, err)| err.clone())
    });
    match fcall {
        Some(err) => err.into(),
        None => e,
    }
}

/// The functions after whose call the other nodes' sockets matter more than the
/// caller's answer: a targeted publish. On one Redis (or Sentinel), when no other
/// call is under way on the connection, [`Inner::try_fcall`] sends a `PING` in the
/// same write before it, so that Redis writes the message to the other nodes
/// before this call's answer: Redis writes its pending answers newest client first,
/// and a client already holding an answer (the `PONG`) stays where it was, behind
/// the nodes that got messages during the call. Otherwise the calling node,
/// answered first, takes the CPU before Redis reaches the others (as
/// `SESSIONHUB_SCHED_BATCH` explains). Only the order of writes depends on this,
/// never a result. Not under load (calls in flight: the caller is then usually
/// waiting for answers already, and a `PING` a call cost CPU), and not on Redis
/// Cluster, whose pipelines are routed by key. Kills, logins and batches go as
/// they are: measured, their answers came later and their sockets no sooner
/// (BENCHMARKS.md, "Other nodes first").
const OTHERS_FIRST: &[&str] = &["sh_publish"];

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
    /// With Redis Sentinel: the sentinels, and the master as last found.
    pub(crate) sentinel: Option<Arc<Sentinel>>,
    /// Held while a call asks the sentinels for the master.
    following: tokio::sync::Mutex<()>,
    /// Consecutive commands that found Redis unavailable.
    failures_in_a_row: AtomicU64,
    /// Calls under way on the command connection (see [`OTHERS_FIRST`]).
    in_flight: AtomicU64,
    /// Whether a call is rebuilding the cluster connection right now.
    rebuilding: AtomicBool,
    /// Whether the store is a Redis Cluster (sharded pub/sub).
    cluster: bool,
    /// The expiry of this node's lease as of its last successful renewal (Unix
    /// ms); registrations carry it, so that a fenced node's are refused.
    pub(crate) lease_until: AtomicI64,
    pub(crate) keys: Keys,
    pub(crate) node_id: NodeId,
    /// This process's random nonce in its node id's claim (`sh_node_claim`).
    pub(crate) claim_nonce: String,
    /// Another process took this node's id (it was paused past its lease, and a
    /// node started under the same id meanwhile): the records under the id are that
    /// process's now, so this one must stop without touching them.
    pub(crate) superseded: AtomicBool,
    command_timeout: Duration,
    pub(crate) lease: LeaseConfig,
    pub(crate) limits: ConnLimits,
    pub(crate) history: HistoryConfig,
    pub(crate) stop: CancellationToken,
    /// The engine's tasks (subscriber, lease and reaper, cleanup): they return when
    /// `stop` is cancelled, and [`Engine::leave`](sessionhub_core::Engine::leave)
    /// waits for them.
    pub(crate) tasks: TaskTracker,
    /// What the sweep index must learn from this node, and its chores' times; see
    /// [`crate::sweep`].
    pub(crate) marks: sweep::Marks,
    /// Wakes the lease task to rejoin at once (a call found the node fenced).
    pub(crate) rejoin: Notify,
    /// When this node last sent its probe on each bucket channel (Unix ms).
    probe_sent: Vec<AtomicI64>,
    /// When this node's own probe last came back through pub/sub, per bucket
    /// channel (Unix ms).
    probe_back: Vec<AtomicI64>,
    /// Which slice of the buckets the next heartbeat probes.
    probe_turn: AtomicUsize,
    /// Whether the next heartbeat probes every bucket channel (set on every
    /// (re)subscription).
    probe_all: AtomicBool,
    /// When the subscriber last (re)subscribed (Unix ms).
    subscribed_at: AtomicI64,
    /// Whether the subscriber holds its subscriptions right now.
    pub(crate) subscribed: AtomicBool,
    /// Failed store operations.
    pub(crate) errors: AtomicU64,
    /// Subscriber re-subscriptions.
    pub(crate) reconnects: AtomicU64,
    /// Records of dead nodes reaped by this node.
    pub(crate) reaped: AtomicU64,
    /// See [`sessionhub_core::Engine::generation`].
    pub(crate) generation: AtomicU64,
    /// Redis's clock minus this node's (ms), as of the last lease renewal: the
    /// functions check deadlines against Redis's clock.
    clock_offset: AtomicI64,
    /// Records whose fate is unknown (their call failed or timed out), to remove
    /// until Redis confirms; see [`cleanup`].
    pub(crate) cleanup: cleanup::Queue,
    /// The function library as loaded (with this node's event stream cap): the
    /// shared `sessionhub` and the node's own `sessionhub_<V>`, which it calls.
    pub(crate) library: crate::library::Library,
    /// Whether this node delivers lifecycle events (subscribes to their rings).
    pub(crate) deliver_events: bool,
    /// Per-bucket wake-ups of the event deliverer.
    pub(crate) event_wakes: crate::events::Wakes,
}

impl Inner {
    /// The shared state of a node that has not joined yet: no lease, no probe back.
    pub(crate) fn new(
        conn: Conn,
        rebuild_from: Option<(Vec<String>, RedisConfig)>,
        sentinel: Option<Arc<Sentinel>>,
        config: &RedisConfig,
        node_id: NodeId,
    ) -> Self {
        Self {
            conn: std::sync::RwLock::new(conn),
            rebuild_from,
            sentinel,
            following: tokio::sync::Mutex::new(()),
            failures_in_a_row: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            rebuilding: AtomicBool::new(false),
            cluster: config.topology.is_cluster(),
            lease_until: AtomicI64::new(0),
            keys: Keys::new(config.key_prefix.clone()),
            node_id,
            claim_nonce: sessionhub_core::ids::random_bytes::<8>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            superseded: AtomicBool::new(false),
            command_timeout: config.command_timeout,
            lease: config.lease,
            limits: config.limits,
            history: config.history,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            marks: sweep::Marks::new(),
            rejoin: Notify::new(),
            probe_sent: (0..BUCKETS).map(|_| AtomicI64::new(0)).collect(),
            probe_back: (0..BUCKETS).map(|_| AtomicI64::new(0)).collect(),
            probe_turn: AtomicUsize::new(0),
            probe_all: AtomicBool::new(true),
            subscribed_at: AtomicI64::new(0),
            subscribed: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            clock_offset: AtomicI64::new(0),
            cleanup: cleanup::Queue::default(),
            library: crate::library::Library::new(config.events_maxlen),
            deliver_events: config.deliver_events,
            event_wakes: crate::events::Wakes::default(),
        }
    }
}

/// Capped exponential backoff between retries: each delay twice the last, up to
/// `max`.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; the next one is twice as long, up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Starts again from the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Clears a flag when dropped.
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The command connection to one Redis: multiplexed, re-established on failure,
/// every wait bounded by `timeout`.
pub(crate) fn single_manager(
    client: redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let manager_cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, manager_cfg)
}

/// Connects to a Redis Cluster, retrying until the connect timeout: the cluster
/// client needs the slot map before it can route anything.
pub(crate) async fn cluster_connection(
    seeds: &[String],
    config: &RedisConfig,
    shown: &str,
) -> Result<redis::cluster_async::ClusterConnection, ConnectError> {
    let client = crate::tls::cluster_builder(seeds, &config.tls)
        .connection_timeout(config.command_timeout)
        .response_timeout(config.command_timeout)
        .retries(2)
        .build()
        .map_err(|e| ConnectError::InvalidUrl {
            url: shown.to_owned(),
            reason: e.to_string(),
        })?;
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
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
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

impl Inner {
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

    /// Loads the library twice: the node's own copy (the names it calls), then the
    /// shared one operators call (see [`crate::library`]).
    pub(crate) async fn load_library(&self) -> Result<(), CallError> {
        for text in self.library.texts() {
            self.call(|mut c| async move {
                redis::cmd("FUNCTION")
                    .arg("LOAD")
                    .arg("REPLACE")
                    .arg(text)
                    .query_async::<String>(&mut c)
                    .await
            })
            .await?;
        }
        tracing::debug!(library = %self.library.own_name(), "function library loaded");
        Ok(())
    }

    /// Runs one Redis operation on the shared connection, bounded by the command
    /// timeout.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, EngineError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.call(op).await.map_err(EngineError::from)
    }

    /// As [`Inner::run`], with the failure as it is.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, CallError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let conn = match self.conn.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let under_way = InFlight::enter(&self.in_flight);
        let res = tokio::time::timeout(self.command_timeout, op(conn)).await;
        drop(under_way);
        let res = match res {
            Ok(r) => r.map_err(CallError::Redis),
            Err(_) => Err(CallError::TimedOut),
        };
        if res.as_ref().is_err_and(CallError::is_unavailable) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let n = self.failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= REBUILD_AFTER_FAILURES {
                self.rebuild_cluster_connection().await;
            }
            // A master demoted to replica: the sentinels know the new one.
            if n >= REBUILD_AFTER_FAILURES || res.as_ref().is_err_and(CallError::is_read_only) {
                self.follow_master().await;
            }
        } else {
            self.failures_in_a_row.store(0, Ordering::Release);
        }
        res
    }

    /// With Redis Sentinel: asks the sentinels for the master and, if it is another
    /// server than the one in use, moves the command connection to it (the
    /// subscriber follows, see [`Sentinel::changes`]). Bounded by the command
    /// timeout; one caller asks, the others go on meanwhile.
    pub(crate) async fn follow_master(&self) {
        self.follow_master_to(None).await;
    }

    /// As [`Inner::follow_master`], trying first the master a sentinel announced
    /// (the sentinel's URL, the new master's host and port).
    pub(crate) async fn follow_master_to(&self, announced: Option<(&str, &str, u16)>) {
        let Some(sentinel) = &self.sentinel else {
            return;
        };
        // A sentinel's announcement waits its turn (it must not be lost); any other
        // caller leaves it to the one asking already.
        let _following = match announced {
            Some(_) => self.following.lock().await,
            None => match self.following.try_lock() {
                Ok(guard) => guard,
                Err(_) => return,
            },
        };
        let find = async {
            match announced {
                Some((from, host, port)) => sentinel.announced_master(from, host, port).await,
                None => sentinel.find_master().await,
            }
        };
        let found = tokio::time::timeout(self.command_timeout, find).await;
        match found {
            // The master is recorded (which moves the subscriber too) only once a
            // client for it is built (the connection itself is made lazily):
            // recorded first, a client that could not be built (its URL, the TLS
            // setup) left every later look finding it "current" and the commands
            // on the old master.
            Ok(Ok(url)) if !sentinel.is_current(&url) => match sentinel
                .client(&url)
                .and_then(|c| single_manager(c, self.command_timeout))
            {
                Ok(fresh) => {
                    self.replace_conn(Conn::Single(fresh));
                    sentinel.set_current(&url);
                    self.failures_in_a_row.store(0, Ordering::Release);
                    tracing::warn!(redis = %crate::config::redact_url(&url), "following the new Redis master");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to the new Redis master")
                }
            },
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(redis = %sentinel.shown(), error = %e, "no Redis master found yet")
            }
            Err(_) => {
                tracing::warn!(redis = %sentinel.shown(), "the sentinels did not answer in time")
            }
        }
    }

    fn replace_conn(&self, fresh: Conn) {
        match self.conn.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
    }

    /// Replaces the cluster connection with a fresh one (a new slot map, new links
    /// to every master). The `redis` crate's cluster connection recovers from MOVED
    /// and dropped links by itself, but after a failover it can stay stuck refreshing
    /// its slot map; several failed commands in a row are the sign. One caller
    /// rebuilds, the others keep failing fast meanwhile.
    pub(crate) async fn rebuild_cluster_connection(&self) {
        let Some((seeds, config)) = &self.rebuild_from else {
            return;
        };
        if self.rebuilding.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared however this ends (the caller's future may be dropped midway).
        let _rebuilding = ClearOnDrop(&self.rebuilding);
        let shown = Topology::Cluster(seeds.clone()).shown();
        let quick = RedisConfig {
            connect_timeout: config.command_timeout,
            ..config.clone()
        };
        match cluster_connection(seeds, &quick, &shown).await {
            Ok(fresh) => {
                self.replace_conn(Conn::Cluster(fresh));
                self.failures_in_a_row.store(0, Ordering::Release);
                tracing::warn!(redis = %shown, "Redis Cluster kept failing; reconnected afresh");
            }
            Err(e) => tracing::warn!(error = %e, "could not reconnect to Redis Cluster"),
        }
    }

    /// Calls a library function. If Redis lost the library (it restarted empty),
    /// loads it again and retries once. A FENCED reply wakes the lease task.
    pub(crate) async fn fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        keys: &[String],
        args: impl ToRedisArgs + Clone,
    ) -> Result<T, EngineError> {
        self.try_fcall(name, keys, args)
            .await
            .map_err(EngineError::from)
    }

    /// As [`Inner::fcall`], with the function's refusal as it is.
    pub(crate) async fn try_fcall<T: redis::FromRedisValue>(
        &self,
        name: &str,
        keys: &[String],
        args: impl ToRedisArgs + Clone,
    ) -> Result<T, FunctionError> {
        let others_first = !self.cluster
            && OTHERS_FIRST.contains(&name)
            && self.in_flight.load(Ordering::Relaxed) == 0;
        let mut reloaded = false;
        let function = self.library.function(name);
        let function = function.as_str();
        loop {
            let args = args.clone();
            let res = self
                .call(|mut c| async move {
                    let mut fcall = redis::cmd("FCALL");
                    fcall.arg(function).arg(keys.len()).arg(keys).arg(args);
                    if others_first {
                        let (v,): (T,) = redis::pipe()
                            .cmd("PING")
                            .ignore()
                            .add_command(fcall)
                            .query_async(&mut c)
                            .await
                            .map_err(fcall_error_of_pipeline)?;
                        Ok(v)
                    } else {
                        fcall.query_async::<T>(&mut c).await
                    }
                })
                .await;
            let err = match res {
                Ok(v) => return Ok(v),
                Err(e) => FunctionError::parse(e),
            };
            match err {
                FunctionError::NoSuchFunction if !reloaded => {
                    tracing::warn!("Redis lost the function library; loading it again");
                    self.load_library().await.map_err(FunctionError::Call)?;
                    reloaded = true;
                }
                FunctionError::Fenced => {
                    self.rejoin.notify_one();
                    return Err(err);
                }
                _ => return Err(err),
            }
        }
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

    /// The bucket channels the next heartbeat probes: all of them after a
    /// (re)subscription, else the next [`PROBES_PER_HEARTBEAT`] in turn, spread
    /// evenly over the buckets (so every channel is probed every
    /// `BUCKETS / PROBES_PER_HEARTBEAT` heartbeats). Each is marked sent now.
    pub(crate) fn buckets_to_probe(&self) -> Vec<Bucket> {
        let picked: Vec<Bucket> = if self.probe_all.swap(false, Ordering::AcqRel) {
            Bucket::all().collect()
        } else {
            let stride = BUCKETS / PROBES_PER_HEARTBEAT;
            let turn = self.probe_turn.fetch_add(1, Ordering::Relaxed) % stride;
            Bucket::all().skip(turn).step_by(stride).collect()
        };
        let now = now_ms();
        for b in &picked {
            self.probe_sent[b.index()].store(now, Ordering::Relaxed);
        }
        picked
    }

    pub(crate) fn probe_received(&self, bucket: Bucket) {
        self.probe_back[bucket.index()].store(now_ms(), Ordering::Relaxed);
    }

    /// Whether every bucket channel has carried this node's probe since the
    /// subscriber last (re)subscribed.
    pub(crate) fn probes_proven(&self) -> bool {
        let since = self.subscribed_at.load(Ordering::Relaxed);
        self.probe_back
            .iter()
            .all(|t| t.load(Ordering::Relaxed) >= since)
    }

    /// How long the oldest probe still out has been waiting to come back (ms; 0
    /// when none is out).
    pub(crate) fn probe_lag(&self) -> i64 {
        let now = now_ms();
        self.probe_sent
            .iter()
            .zip(&self.probe_back)
            .map(|(sent, back)| {
                let (sent, back) = (sent.load(Ordering::Relaxed), back.load(Ordering::Relaxed));
                if back >= sent { 0 } else { now - sent }
            })
            .max()
            .unwrap_or(0)
    }

    pub(crate) fn set_subscribed(&self, on: bool) {
        if on {
            self.subscribed_at.store(now_ms(), Ordering::Relaxed);
            self.probe_all.store(true, Ordering::Release);
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

    /// Marks that events may have been lost; see [`sessionhub_core::Engine::generation`].
    pub(crate) fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the store is a Redis Cluster: a call's keys must then share a slot.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }

    pub(crate) fn count_reaped(&self, records: u64) {
        self.reaped.fetch_add(records, Ordering::Relaxed);
    }

    /// Publishes on a classic channel (the `all` channel; on Redis Cluster it
    /// reaches every shard).
    pub(crate) async fn publish_raw(
        &self,
        channel: String,
        payload: String,
    ) -> Result<i64, EngineError> {
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

    pub(crate) async fn publish_with(
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
