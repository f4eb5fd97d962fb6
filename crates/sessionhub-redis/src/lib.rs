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
mod client;
mod config;
mod conn;
mod engine;
mod error;
pub mod events;
pub mod keys;
mod lease;
mod library;
mod link;
mod reply;
mod resp;
mod sentinel;
mod subscriber;
mod sweep;
mod tls;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use sessionhub_core::{EventSender, NodeId};

use client::{Backoff, Inner, cluster_connection, single_manager};
pub use config::{
    ConnectError, DEFAULT_COMMAND_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, RedisConfig, redact_url,
};
use conn::Conn;
pub use conn::Topology;
pub use events::{EventStreams, LifecycleEvent, StoredEvent, Take};
pub use keys::{BUCKETS, Bucket, Keys};
pub use lease::LeaseConfig;
pub use library::unversioned;
use sentinel::Sentinel;
pub use tls::{ClientCert, RedisTls, TLS_SCHEME, TlsError};

/// How often start-up looks again at a node id claimed by another process.
const CLAIM_POLL: Duration = Duration::from_millis(200);
/// How much later than first seen another process's claim must end for start-up to
/// count it as renewed (that process is running): more than a round trip's jitter.
const CLAIM_RENEWED_BY: Duration = Duration::from_millis(500);

/// The function library, loaded into Redis at start-up and after Redis lost it.
pub const LIBRARY: &str = include_str!("../../../lua/sessionhub.lua");

/// One node's handle on the shared Redis state. Dropping it stops its background
/// tasks (subscriber, lease).
pub struct RedisEngine {
    inner: Arc<Inner>,
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
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
        let mut sentinel = None;
        let (conn, subscribe_with) = match &config.topology {
            Topology::Single(url) => {
                let client = tls::client(url, &config.tls).map_err(invalid)?;
                let conn =
                    single_manager(client.clone(), config.command_timeout).map_err(invalid)?;
                (Conn::Single(conn), subscriber::Source::Single(client))
            }
            Topology::Cluster(seeds) => {
                let conn = cluster_connection(seeds, &config, &shown).await?;
                (
                    Conn::Cluster(conn),
                    subscriber::Source::Cluster(seeds.clone(), config.tls.clone()),
                )
            }
            Topology::Sentinel { sentinels, master } => {
                let found = Arc::new(Sentinel::new(
                    sentinels.clone(),
                    master.clone(),
                    config.tls.clone(),
                ));
                let url = first_master(&found, &config, &shown).await?;
                found.set_current(&url);
                let client = found.client(&url).map_err(invalid)?;
                let conn = single_manager(client, config.command_timeout).map_err(invalid)?;
                sentinel = Some(found);
                (Conn::Single(conn), subscriber::Source::Sentinel)
            }
        };
        let rebuild_from = match &config.topology {
            Topology::Cluster(seeds) => Some((seeds.clone(), config.clone())),
            Topology::Single(_) | Topology::Sentinel { .. } => None,
        };
        let inner = Arc::new(Inner::new(
            conn,
            rebuild_from,
            sentinel.clone(),
            &config,
            node_id,
        ));
        let engine = Self { inner };

        let started = tokio::time::Instant::now();
        let deadline = started + config.connect_timeout;
        let unreachable = |reason: String| ConnectError::Unreachable {
            url: shown.clone(),
            waited: started.elapsed(),
            reason,
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        // When another process's claim on this node's id first seen would lapse, and
        // since when start-up has waited for it.
        let mut id_held: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        loop {
            let err = match engine.inner.startup().await {
                Ok(lease::Startup::Joined) => break,
                Ok(lease::Startup::IdHeld(left_ms)) => {
                    // A previous run that did not leave (killed, crashed) holds the
                    // claim until it lapses; a process still running renews it,
                    // which moves its end. A claim without a TTL (set by hand) is
                    // given a lease and a heartbeat.
                    let now = tokio::time::Instant::now();
                    let left = u64::try_from(left_ms)
                        .map(Duration::from_millis)
                        .unwrap_or(config.lease.ttl + config.lease.heartbeat);
                    let (first_end, since) = *id_held.get_or_insert_with(|| {
                        tracing::info!(
                            node = %engine.inner.node_id,
                            left_ms,
                            "this node id is claimed by another process (a previous run \
                             that did not leave, or a node running under the same id); \
                             waiting for the claim to lapse"
                        );
                        (now + left, now)
                    });
                    if now + left > first_end + CLAIM_RENEWED_BY || now > first_end + CLAIM_POLL {
                        return Err(ConnectError::NodeIdInUse {
                            node: engine.inner.node_id.to_string(),
                            waited: since.elapsed(),
                        });
                    }
                    tokio::time::sleep(CLAIM_POLL).await;
                    continue;
                }
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(unreachable(err.to_string()));
            }
            tracing::warn!(redis = %shown, error = %err, "Redis not reachable yet; retrying");
            tokio::time::sleep(backoff.next_delay().min(left)).await;
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
        if let Some(sentinel) = &sentinel {
            sentinel::watch_switches(&engine.inner, sentinel);
        }
        let tasks = &engine.inner.tasks;
        tasks.spawn(lease::run(engine.inner.clone(), events));
        tasks.spawn(cleanup::run(engine.inner.clone()));
        tasks.spawn(library::forget_unused_later(engine.inner.clone()));
        Ok(engine)
    }

    /// The lifecycle event streams, for a webhook deliverer; `None` unless the
    /// engine was configured to deliver ([`RedisConfig::deliver_events`]), since
    /// only then does it listen for their rings.
    pub fn event_streams(&self) -> Option<EventStreams> {
        self.inner
            .deliver_events
            .then(|| EventStreams::new(self.inner.clone()))
    }
}

/// Asks the sentinels for the master until one is found, for up to the connect
/// timeout.
async fn first_master(
    sentinel: &Sentinel,
    config: &RedisConfig,
    shown: &str,
) -> Result<String, ConnectError> {
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        let err = match sentinel.find_master().await {
            Ok(url) => return Ok(url),
            Err(e) => e,
        };
        if started.elapsed() >= config.connect_timeout {
            return Err(ConnectError::Unreachable {
                url: shown.to_owned(),
                waited: started.elapsed(),
                reason: err,
            });
        }
        tracing::warn!(redis = %shown, error = %err, "no Redis master found yet; retrying");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
