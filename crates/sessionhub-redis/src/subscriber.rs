//! The node's pub/sub subscriber, under supervision.
//!
//! It owns dedicated connections (a command connection must never switch into
//! subscribe mode), subscribes to this node's channel of every bucket and to the
//! `all` channel, pings Redis over its own link so a dead peer is noticed even
//! without an EOF, and reconnects with capped backoff when the link drops. After
//! every resubscription it tells the node to resync ([`NodeEvent::Resync`]): events
//! published while it was away are lost, because Redis pub/sub is at-most-once.
//!
//! On one Redis it holds one classic connection. On Redis Cluster it holds a cluster
//! connection (RESP3) with a sharded subscription (SSUBSCRIBE) per bucket channel,
//! each on the master that owns the bucket's slot. A failover or a slot migration
//! shows up as a dropped link or a server-sent SUNSUBSCRIBE; either is handled like
//! a Redis restart: subscribe afresh (the slot map is read again) and resync. A
//! bucket whose probe stops coming back is a lost subscription too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{PushInfo, PushKind, Value};
use sessionhub_core::{EventSender, NodeEvent};
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::{Backoff, Inner};
use crate::config::redact_url;
use crate::keys::Bucket;
use crate::wire::Incoming;

/// First delay before reconnecting.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Bound on connecting and subscribing once.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the subscriber pings Redis over its own link.
const LINK_PING_INTERVAL: Duration = Duration::from_secs(2);
/// A ping unanswered for this long means the link is dead.
const LINK_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Pushes buffered between the cluster connection and this task. Past it the
/// subscription counts as lost (resubscribe and resync), never silently short.
const PUSH_QUEUE: usize = 4096;

/// Where to subscribe.
pub(crate) enum Source {
    /// One Redis.
    Single(redis::Client),
    /// A Redis Cluster, through these seed URLs (with these certificates).
    Cluster(Vec<String>, crate::tls::RedisTls),
    /// The master the sentinels name ([`Inner::sentinel`]); a new master ends the
    /// subscription.
    Sentinel,
}

/// Starts the subscriber task. The returned receiver fires once the first
/// subscription is in place.
pub(crate) fn spawn(
    source: Source,
    events: EventSender,
    inner: Arc<Inner>,
) -> oneshot::Receiver<()> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let tasks = inner.tasks.clone();
    tasks.spawn(run(source, events, inner, ready_tx));
    ready_rx
}

/// The bucket channels of this node (with the event streams' rings if it delivers
/// events).
fn bucket_channels(inner: &Inner) -> Vec<String> {
    let rings = Bucket::all()
        .filter(|_| inner.deliver_events)
        .map(|b| inner.keys.events_ring(b));
    Bucket::all()
        .map(|b| inner.keys.node_channel(b, &inner.node_id))
        .chain(rings)
        .collect()
}

/// Why a subscribed session ended.
enum Ended {
    /// The node is stopping.
    Stop,
    /// The link or a subscription was lost: subscribe again.
    Lost,
}

async fn run(source: Source, events: EventSender, inner: Arc<Inner>, ready: oneshot::Sender<()>) {
    let stop = inner.stop.clone();
    let shown = match &source {
        Source::Single(c) => redact_url(&c.get_connection_info().addr().to_string()),
        Source::Sentinel => inner
            .sentinel
            .as_ref()
            .map(|s| s.shown())
            .unwrap_or_default(),
        Source::Cluster(seeds, _) => seeds
            .iter()
            .map(|s| redact_url(s))
            .collect::<Vec<_>>()
            .join(","),
    };
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY);
    loop {
        let attempt = tokio::time::timeout(SUBSCRIBE_TIMEOUT, connect(&source, &inner));
        let link = tokio::select! {
            _ = stop.cancelled() => return,
            res = attempt => match res {
                Ok(Ok(link)) => Some(link),
                Ok(Err(e)) => {
                    tracing::warn!(redis = %shown, error = %e, "pub/sub subscribe failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(redis = %shown, "pub/sub subscribe timed out");
                    None
                }
            },
        };
        let Some(link) = link else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
            continue;
        };
        backoff.reset();
        if ready.is_none() {
            inner.bump_generation();
        }
        inner.set_subscribed(true);
        // Rings may have been missed while unsubscribed: every bucket looks once.
        inner.event_wakes.wake_all();
        match ready.take() {
            Some(tx) => {
                tracing::info!(redis = %shown, "subscribed");
                let _ = tx.send(());
            }
            None => {
                inner.count_reconnect();
                // The link dropped: Redis may have restarted or failed over and lost
                // the sweep index's latest marks with it. The next sweep round marks
                // every bucket due (the backstop, otherwise every 10 minutes).
                inner.marks.full_sweep_soon();
                tracing::info!(redis = %shown, "resubscribed; resyncing");
                if events.send(NodeEvent::Resync).await.is_err() {
                    return;
                }
            }
        }
        let ended = match link {
            Link::Single(pubsub, moved) => listen_single(pubsub, moved, &events, &inner).await,
            Link::Plain(link, moved) => listen_plain(link, moved, &events, &inner).await,
            Link::Cluster(conn, pushes, overflow) => {
                listen_cluster(conn, pushes, overflow, &events, &inner).await
            }
        };
        inner.set_subscribed(false);
        if matches!(ended, Ended::Stop) {
            return;
        }
        tracing::warn!(redis = %shown, "pub/sub link lost; subscribing again");
    }
}

/// Tells that the sentinels named a new master (see [`master_moved`]).
type Moved = Option<watch::Receiver<Option<String>>>;

/// A subscribed link.
enum Link {
    /// One Redis over TLS or a Unix socket, through redis-rs; with Sentinel, the
    /// receiver that tells the master changed.
    Single(redis::aio::PubSub, Moved),
    /// One Redis over plain TCP, through the subscriber's own link.
    Plain(crate::link::Link, Moved),
    Cluster(
        redis::cluster_async::ClusterConnection,
        mpsc::Receiver<PushInfo>,
        Arc<AtomicBool>,
    ),
}

/// Subscribes to one Redis: over plain TCP with the subscriber's own link
/// ([`crate::link`]), else (TLS, a Unix socket) with redis-rs's.
async fn subscribe_single(
    client: &redis::Client,
    channels: &[String],
    moved: Moved,
) -> redis::RedisResult<Link> {
    let info = client.get_connection_info();
    if let redis::ConnectionAddr::Tcp(host, port) = info.addr() {
        let auth = info.redis_settings();
        let link =
            crate::link::Link::connect(host, *port, auth.username(), auth.password(), channels)
                .await?;
        return Ok(Link::Plain(link, moved));
    }
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channels).await?;
    Ok(Link::Single(pubsub, moved))
}

async fn connect(source: &Source, inner: &Inner) -> redis::RedisResult<Link> {
    let mut channels = bucket_channels(inner);
    match source {
        Source::Single(client) => {
            channels.push(inner.keys.all_channel());
            subscribe_single(client, &channels, None).await
        }
        Source::Sentinel => {
            let Some(sentinel) = &inner.sentinel else {
                return Err(redis::RedisError::from(std::io::Error::other(
                    "no sentinels configured",
                )));
            };
            // Ask again: after a lost link the master may have changed.
            inner.follow_master().await;
            let mut moved = sentinel.changes();
            let Some(url) = moved.borrow_and_update().clone() else {
                return Err(redis::RedisError::from(std::io::Error::other(
                    "no Redis master found yet",
                )));
            };
            channels.push(inner.keys.all_channel());
            subscribe_single(&sentinel.client(&url)?, &channels, Some(moved)).await
        }
        Source::Cluster(seeds, tls) => {
            let (tx, rx) = mpsc::channel(PUSH_QUEUE);
            let overflow = Arc::new(AtomicBool::new(false));
            let flag = overflow.clone();
            // Called by the cluster connection for every push; never blocks it.
            let sender = move |push: PushInfo| {
                if tx.try_send(push).is_err() {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok::<(), std::convert::Infallible>(())
            };
            let client = crate::tls::cluster_builder(seeds, tls)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(sender)
                .connection_timeout(LINK_PING_TIMEOUT)
                .response_timeout(LINK_PING_TIMEOUT)
                .build()?;
            let mut conn = client.get_async_connection().await?;
            // One SSUBSCRIBE per bucket: a sharded subscription names channels of
            // one slot, and goes to the master that owns it.
            futures_util::future::try_join_all(channels.iter().map(|ch| {
                let mut c = conn.clone();
                async move { c.ssubscribe(ch).await }
            }))
            .await?;
            conn.subscribe(inner.keys.all_channel()).await?;
            Ok(Link::Cluster(conn, rx, overflow))
        }
    }
}

/// Hands one payload to the node. Awaiting the send is the back-pressure: a slow
/// dispatcher slows this reader, it never drops an event. False: the node stopped.
async fn deliver(channel: &[u8], payload: &[u8], events: &EventSender, inner: &Inner) -> bool {
    if channel.ends_with(b":events:new") {
        if let Some(b) = inner.keys.bucket_of_key(&String::from_utf8_lossy(channel)) {
            inner.event_wakes.wake(b);
        }
        return true;
    }
    match crate::wire::decode(payload) {
        Ok(Incoming::Probe) => {
            let channel = String::from_utf8_lossy(channel);
            if let Some(b) = inner.keys.bucket_of_key(&channel) {
                inner.probe_received(b);
            }
            true
        }
        Ok(Incoming::Event(ev)) => events.send(ev).await.is_ok(),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring undecodable event");
            true
        }
    }
}

/// Whether a bucket's probe has stopped coming back although the subscription is
/// old enough to have carried one on every channel: the subscription was lost
/// without notice.
fn probes_stale(inner: &Inner) -> bool {
    let max_age = inner.lease.probe_max_age().as_millis() as i64;
    let max_lag = inner.lease.probe_max_lag().as_millis() as i64;
    inner.subscribed_for() > max_age && (!inner.probes_proven() || inner.probe_lag() > max_lag)
}

/// Resolves when the sentinels name a new master; never without Sentinel.
async fn master_moved(moved: Moved) {
    match moved {
        Some(mut rx) => {
            // A closed channel (the engine is going) is no move.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn listen_plain(
    mut link: crate::link::Link,
    moved: Moved,
    events: &EventSender,
    inner: &Inner,
) -> Ended {
    use crate::link::Push;
    let master_moved = master_moved(moved);
    tokio::pin!(master_moved);
    let mut ping = sessionhub_core::time::interval_from_now(LINK_PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The ping sent last is due back by this time, unless pushes keep coming: the
    // link is reading Redis's output in order, and a node slow to take its pushes
    // reads the pong late while the link is alive (a link that sends nothing at all
    // for LINK_PING_TIMEOUT after a ping is lost).
    let pong_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(pong_due);
    let mut awaiting_pong = false;
    let (mut pushes, mut pushes_at_ping) = (0u64, 0u64);
    loop {
        // Biased: what was read before a timer is looked at (after a pause of the
        // whole node, the pong is there to read before its deadline is).
        let push = tokio::select! {
            biased;
            _ = inner.stop.cancelled() => return Ended::Stop,
            _ = &mut master_moved => {
                tracing::warn!("the sentinels named a new Redis master");
                return Ended::Lost;
            }
            push = link.reader.next() => push,
            _ = &mut pong_due, if awaiting_pong => {
                if pushes == pushes_at_ping {
                    tracing::warn!("pub/sub link did not answer a ping");
                    return Ended::Lost;
                }
                pushes_at_ping = pushes;
                pong_due.as_mut().reset(tokio::time::Instant::now() + LINK_PING_TIMEOUT);
                continue;
            }
            _ = ping.tick(), if !awaiting_pong => {
                if let Err(e) = link.ping().await {
                    tracing::warn!(error = %e, "pub/sub link lost");
                    return Ended::Lost;
                }
                awaiting_pong = true;
                pushes_at_ping = pushes;
                pong_due.as_mut().reset(tokio::time::Instant::now() + LINK_PING_TIMEOUT);
                continue;
            }
        };
        pushes += 1;
        match push {
            Ok(Push::Message(channel, payload)) => {
                let bytes = link.reader.bytes();
                if !deliver(&bytes[channel], &bytes[payload], events, inner).await {
                    return Ended::Stop;
                }
            }
            Ok(Push::Pong) => awaiting_pong = false,
            Ok(Push::Other) => {}
            Ok(Push::Lost(why)) => {
                tracing::warn!(%why, "pub/sub link lost");
                return Ended::Lost;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pub/sub link lost");
                return Ended::Lost;
            }
        }
    }
}

async fn listen_single(
    pubsub: redis::aio::PubSub,
    moved: Moved,
    events: &EventSender,
    inner: &Inner,
) -> Ended {
    let (mut sink, mut stream) = pubsub.split();
    let master_moved = master_moved(moved);
    tokio::pin!(master_moved);
    let mut ping = sessionhub_core::time::interval_from_now(LINK_PING_INTERVAL);
    loop {
        let msg = tokio::select! {
            _ = inner.stop.cancelled() => return Ended::Stop,
            _ = &mut master_moved => {
                tracing::warn!("the sentinels named a new Redis master");
                return Ended::Lost;
            }
            _ = ping.tick() => {
                let pong = tokio::time::timeout(LINK_PING_TIMEOUT, sink.ping::<()>()).await;
                if !matches!(pong, Ok(Ok(()))) {
                    tracing::warn!("pub/sub link did not answer a ping");
                    return Ended::Lost;
                }
                continue;
            }
            msg = stream.next() => msg,
        };
        let Some(msg) = msg else { return Ended::Lost };
        if !deliver(
            msg.get_channel_name().as_bytes(),
            msg.get_payload_bytes(),
            events,
            inner,
        )
        .await
        {
            return Ended::Stop;
        }
    }
}

async fn listen_cluster(
    mut conn: redis::cluster_async::ClusterConnection,
    mut pushes: mpsc::Receiver<PushInfo>,
    overflow: Arc<AtomicBool>,
    events: &EventSender,
    inner: &Inner,
) -> Ended {
    let mut ping = sessionhub_core::time::interval_from_now(LINK_PING_INTERVAL);
    loop {
        let push = tokio::select! {
            _ = inner.stop.cancelled() => return Ended::Stop,
            _ = ping.tick() => {
                // PING goes to every master: one that stopped answering takes its
                // buckets' subscriptions with it.
                let pong = tokio::time::timeout(
                    LINK_PING_TIMEOUT,
                    redis::cmd("PING").query_async::<Value>(&mut conn),
                )
                .await;
                if !matches!(pong, Ok(Ok(_))) {
                    tracing::warn!("a Redis Cluster master did not answer the subscriber's ping");
                    return Ended::Lost;
                }
                if probes_stale(inner) {
                    tracing::warn!("a bucket channel stopped carrying this node's probe");
                    return Ended::Lost;
                }
                continue;
            }
            push = pushes.recv() => push,
        };
        if overflow.load(Ordering::Relaxed) {
            tracing::warn!("pub/sub push queue overflowed");
            return Ended::Lost;
        }
        let Some(push) = push else { return Ended::Lost };
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (push.data.first(), push.data.get(1))
                else {
                    continue;
                };
                if !deliver(channel, payload, events, inner).await {
                    return Ended::Stop;
                }
            }
            // A link to a master dropped, or a slot moved away from the master we
            // subscribed on (it sends SUNSUBSCRIBE): events may have been missed.
            PushKind::Disconnection | PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                tracing::warn!(kind = ?push.kind, "a sharded subscription was lost");
                return Ended::Lost;
            }
            _ => {}
        }
    }
}
