//! The node's pub/sub subscriber, under supervision.
//!
//! It owns one dedicated connection (a pooled connection must never switch into
//! subscribe mode), pings Redis over that link so a dead peer is noticed even without
//! an EOF, reconnects with capped backoff when the link drops, and after every
//! resubscription tells the node to resync ([`NodeEvent::Resync`]): events published
//! while it was away are lost, because Redis pub/sub is at-most-once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sessionhub_core::{EventSender, NodeEvent};
use tokio::sync::oneshot;

use crate::Inner;
use crate::wire::Incoming;

/// First delay before reconnecting.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Bound on connecting and subscribing once.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the subscriber pings Redis over its own link.
const LINK_PING_INTERVAL: Duration = Duration::from_secs(2);
/// A ping unanswered for this long means the link is dead.
const LINK_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the subscriber task for `channels`. The returned receiver fires once the
/// first subscription is in place.
pub(crate) fn spawn(
    client: redis::Client,
    channels: Vec<String>,
    events: EventSender,
    inner: Arc<Inner>,
) -> oneshot::Receiver<()> {
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(run(client, channels, events, inner, ready_tx));
    ready_rx
}

async fn subscribe(
    client: &redis::Client,
    channels: &[String],
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channels).await?;
    Ok(pubsub)
}

async fn run(
    client: redis::Client,
    channels: Vec<String>,
    events: EventSender,
    inner: Arc<Inner>,
    ready: oneshot::Sender<()>,
) {
    let stop = inner.stop.clone();
    let shown = channels.join(",");
    let mut ready = Some(ready);
    let mut delay = RECONNECT_MIN_DELAY;
    loop {
        let attempt = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe(&client, &channels));
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            res = attempt => match res {
                Ok(Ok(p)) => Some(p),
                Ok(Err(e)) => {
                    tracing::warn!(channels = %shown, error = %e, "pub/sub subscribe failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(channels = %shown, "pub/sub subscribe timed out");
                    None
                }
            },
        };
        let Some(pubsub) = pubsub else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            continue;
        };
        delay = RECONNECT_MIN_DELAY;
        if ready.is_none() {
            inner.bump_generation();
        }
        inner.set_subscribed(true);
        match ready.take() {
            Some(tx) => {
                tracing::info!(channels = %shown, "subscribed");
                let _ = tx.send(());
            }
            None => {
                inner.count_reconnect();
                tracing::info!(channels = %shown, "resubscribed; resyncing");
                if events.send(NodeEvent::Resync).await.is_err() {
                    return;
                }
            }
        }
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(LINK_PING_INTERVAL);
        ping.tick().await;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(LINK_PING_TIMEOUT, sink.ping::<()>()).await;
                    if !matches!(pong, Ok(Ok(()))) {
                        tracing::warn!(channels = %shown, "pub/sub link did not answer a ping");
                        break;
                    }
                    continue;
                }
                msg = stream.next() => msg,
            };
            let Some(msg) = msg else { break };
            match crate::wire::decode(msg.get_payload_bytes()) {
                Ok(Incoming::Probe) => inner.probe_received(),
                // Awaiting here is the back-pressure: a slow dispatcher slows this
                // reader, it never drops an event.
                Ok(Incoming::Event(ev)) => {
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(channels = %shown, error = %e, "ignoring undecodable event")
                }
            }
        }
        inner.set_subscribed(false);
        tracing::warn!(channels = %shown, "pub/sub link lost; reconnecting");
    }
}
