//! The node's lease in `<prefix>nodes`, and the reaper.
//!
//! Every `heartbeat` the node renews its lease to `now + ttl` and publishes a probe
//! to a share of its bucket channels in turn (all of them after a (re)subscription;
//! readiness requires every channel to have carried one since, and no probe to be
//! late). A
//! node that finds its lease expired (it was paused, or cut off longer than the
//! lease) is fenced: it drops its records from every bucket (which also refuses any
//! late registration under the old lease), takes a new lease, and tells its
//! dispatcher ([`NodeEvent::Fenced`]) to re-assert the records of the sockets whose
//! sessions are still alive. Every `reap_interval` each node also drops, bucket by
//! bucket, the records of nodes whose lease expired (`sh_drop_node`, then
//! `sh_node_forget`), so a `kill -9`ed node vanishes from presence within
//! `ttl + reap_interval`.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use sessionhub_core::time::now_ms;
use sessionhub_core::{EngineError, EventSender, NodeEvent, NodeId};
use tokio::time::MissedTickBehavior;

use crate::client::Inner;

/// Default lease lifetime.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);
/// Default renewal interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// Default reaper interval.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(2);

/// Lease and reaper timing.
#[derive(Debug, Clone, Copy)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// How often it is renewed (and the pub/sub probe sent).
    pub heartbeat: Duration,
    /// How often dead nodes' records are reaped.
    pub reap_interval: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_LEASE_TTL,
            heartbeat: DEFAULT_HEARTBEAT,
            reap_interval: DEFAULT_REAP_INTERVAL,
        }
    }
}

impl LeaseConfig {
    pub(crate) fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// How long after subscribing every bucket channel must have carried a probe.
    pub(crate) fn probe_max_age(&self) -> Duration {
        self.heartbeat * 3
    }

    /// Longest a probe may take to come back: past it the subscription counts as
    /// deaf. Probes go out every heartbeat, so a subscription that goes deaf is
    /// noticed within `heartbeat + probe_max_lag` = [`LeaseConfig::probe_max_age`]
    /// for the channels probed next (a whole link: any of them).
    pub(crate) fn probe_max_lag(&self) -> Duration {
        self.heartbeat * 2
    }
}

pub(crate) async fn run(inner: Arc<Inner>, events: EventSender) {
    let mut heartbeat = tokio::time::interval(inner.lease.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reap = tokio::time::interval(inner.lease.reap_interval);
    reap.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = heartbeat.tick() => {
                if !renew_or_rejoin(&inner, &events).await {
                    return;
                }
                probe(&inner).await;
            }
            // A call was answered FENCED. It may have been made under the lease a
            // rejoin just replaced (calls sent while the node was paused come back
            // after it), and a second rejoin would fence the new lease and drop the
            // records the first one restored: rejoin only if the lease is gone.
            _ = inner.rejoin.notified() => {
                if !renew_or_rejoin(&inner, &events).await {
                    return;
                }
            }
            _ = reap.tick() => reap_dead(&inner).await,
        }
    }
}

/// Renews, and rejoins if the lease was lost; false once the node's id turned out
/// to be another process's (the lease task ends).
async fn renew_or_rejoin(inner: &Inner, events: &EventSender) -> bool {
    match renew(inner).await {
        Renewal::Held => true,
        Renewal::Lost => rejoin(inner, events).await,
        Renewal::Superseded => {
            supersede(inner, events).await;
            false
        }
    }
}

/// What a renewal found.
enum Renewal {
    /// The lease is renewed, or could not be (Redis unreachable: try again).
    Held,
    /// The lease had run out: the node is fenced and must rejoin.
    Lost,
    /// Another process holds the node's id.
    Superseded,
}

/// Renews the node id's claim and the lease. Also re-measures Redis's clock,
/// which the functions' deadlines are in.
async fn renew(inner: &Inner) -> Renewal {
    if let Err(e) = inner.measure_clock().await {
        tracing::debug!(error = %e, "could not read Redis's clock");
    }
    // Nor a claim, which would outlive the node's release of it.
    if inner.stop.is_cancelled() {
        return Renewal::Held;
    }
    match inner.claim_id().await {
        Ok(None) => {}
        Ok(Some(_)) => return Renewal::Superseded,
        // Still renew the lease: on Redis Cluster the claim may live on a shard
        // that is failing over while `Pnodes`'s answers, and the lease must not
        // lapse for that.
        Err(e) => tracing::warn!(error = %e, "node id claim renewal failed"),
    }
    // The node may have left while the clock was read or the claim renewed (Redis
    // paused): a heartbeat sent now would come after its leaving and list it again.
    if inner.stop.is_cancelled() {
        return Renewal::Held;
    }
    let res: Result<i64, _> = inner
        .fcall(
            "sh_node_heartbeat",
            &[inner.keys.nodes()],
            (inner.node_id.as_str(), now_ms(), inner.lease.ttl_ms()),
        )
        .await;
    match res {
        Ok(0) => {
            tracing::warn!("lease lost (paused or cut off too long); fencing and rejoining");
            Renewal::Lost
        }
        Ok(lease) => {
            inner.lease_until.fetch_max(lease, Ordering::AcqRel);
            Renewal::Held
        }
        Err(e) => {
            tracing::warn!(error = %e, "lease renewal failed");
            Renewal::Held
        }
    }
}

/// Takes a new lease after the old one ran out; false if the node's id turned out
/// to be another process's (the node is superseded, and told so).
async fn rejoin(inner: &Inner, events: &EventSender) -> bool {
    match inner.startup().await {
        Ok(Startup::Joined) => {
            tracing::info!("rejoined under a new lease");
            inner.bump_generation();
            let _ = events.send(NodeEvent::Fenced).await;
        }
        Ok(Startup::IdHeld(_)) => {
            supersede(inner, events).await;
            return false;
        }
        Err(e) => tracing::warn!(error = %e, "rejoin failed; will retry"),
    }
    true
}

/// Another process runs under this node's id: stop renewing, leave its records
/// alone (they are that process's now), and tell the node to stop.
async fn supersede(inner: &Inner, events: &EventSender) {
    inner.superseded.store(true, Ordering::Release);
    tracing::error!(
        node = %inner.node_id,
        "another process runs under this node's id (started while this one was paused \
         or cut off past its lease); stopping without touching the id's records"
    );
    let _ = events.send(NodeEvent::Superseded).await;
}

/// Sends this node's probe on this heartbeat's share of its bucket channels (all
/// of them after a (re)subscription; see [`Inner::buckets_to_probe`]).
async fn probe(inner: &Inner) {
    let payload = String::from_utf8_lossy(crate::wire::PROBE);
    let payload = &*payload;
    let sent = futures_util::future::try_join_all(inner.buckets_to_probe().into_iter().map(
        |b| async move {
            let channel = inner.keys.node_channel(b, &inner.node_id);
            inner.publish_bucket(channel, payload).await
        },
    ))
    .await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, "probe not sent");
    }
}

async fn reap_dead(inner: &Inner) {
    match reap_once(inner).await {
        Ok((0, _)) => {}
        Ok((nodes, records)) => {
            inner.count_reaped(records);
            tracing::info!(nodes, records, "reaped dead nodes' records");
        }
        Err(e) => tracing::debug!(error = %e, "reaper round failed"),
    }
}

/// Drops the records of every node whose lease has expired from every bucket,
/// then its lease. Returns (nodes reaped, records dropped).
async fn reap_once(inner: &Inner) -> Result<(u64, u64), EngineError> {
    let key = inner.keys.nodes();
    let expired: Vec<(String, f64)> = inner
        .run(|mut c| async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg("-inf")
                .arg(format!("({}", now_ms()))
                .arg("BYSCORE")
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await
        })
        .await?;
    let (mut nodes, mut records) = (0, 0);
    for (node, lease) in expired {
        let Ok(id) = NodeId::parse(&node) else {
            tracing::warn!(node, "ignoring a malformed node id in the lease set");
            continue;
        };
        let lease = lease as i64;
        records += inner.drop_node(&id, lease).await?;
        let forgot: i64 = inner
            .fcall(
                "sh_node_forget",
                &[inner.keys.nodes()],
                (node.as_str(), lease),
            )
            .await?;
        nodes += forgot.max(0) as u64;
    }
    Ok((nodes, records))
}

/// What [`Inner::startup`] did.
pub(crate) enum Startup {
    /// The node holds its id and a new lease.
    Joined,
    /// Another process holds the node's id, for this many ms yet (-1: without
    /// expiry); nothing was changed.
    IdHeld(i64),
}

impl Inner {
    /// Takes or renews this process's claim on its node id (`sh_node_claim`):
    /// `None` if it holds the id now, else the ms left on another process's claim.
    pub(crate) async fn claim_id(&self) -> Result<Option<i64>, EngineError> {
        let left: i64 = self
            .fcall(
                "sh_node_claim",
                &[self.keys.node_claim(&self.node_id)],
                (self.claim_nonce.as_str(), self.lease.ttl_ms()),
            )
            .await?;
        Ok((left != 0).then_some(left))
    }

    /// Gives up this process's claim on its node id, when it leaves.
    pub(crate) async fn release_id(&self) -> Result<(), EngineError> {
        self.fcall::<i64>(
            "sh_node_release",
            &[self.keys.node_claim(&self.node_id)],
            self.claim_nonce.as_str(),
        )
        .await
        .map(drop)
    }

    /// Loads the library, claims the node's id and takes its lease, first dropping
    /// every record left under its id (by a previous run, or by this process before
    /// it was fenced) and fencing off the old lease in every bucket. Changes nothing
    /// if another process holds the id.
    pub(crate) async fn startup(&self) -> Result<Startup, EngineError> {
        self.load_library().await?;
        self.measure_clock().await?;
        if let Some(left) = self.claim_id().await? {
            return Ok(Startup::IdHeld(left));
        }
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
        // The sweep's backstop: whatever its index missed while no node ran (or
        // before this version) is looked at once now.
        self.note_all_due().await?;
        Ok(Startup::Joined)
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
        let counts: Vec<u64> = counts.into_iter().map(|n| n.max(0) as u64).collect();
        // The fences just written (and any group emptied with the records) are work
        // for the sweep: tell its index.
        self.note_dropped(upto, &counts).await?;
        Ok(counts.into_iter().sum())
    }
}
