//! The node's pub/sub subscriber, under supervision.
//!
//! It owns one dedicated connection (a pooled connection must never switch into
//! subscribe mode), reconnects with capped backoff when the link drops, and after
//! every resubscription tells the node to resync ([`NodeEvent::Resync`]): events
//! published while it was away are lost, because Redis pub/sub is at-most-once.

use std::time::Duration;

use futures_util::StreamExt;
use sessionhub_core::{EventSender, NodeEvent};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// First delay before reconnecting.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// Bound on connecting and subscribing once.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts the subscriber task for `channel`. The returned receiver fires once the
/// first subscription is in place.
pub(crate) fn spawn(
    client: redis::Client,
    channel: String,
    events: EventSender,
    stop: CancellationToken,
) -> oneshot::Receiver<()> {
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(run(client, channel, events, stop, ready_tx));
    ready_rx
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

async fn run(
    client: redis::Client,
    channel: String,
    events: EventSender,
    stop: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut delay = RECONNECT_MIN_DELAY;
    loop {
        let attempt = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe(&client, &channel));
        let pubsub = tokio::select! {
            _ = stop.cancelled() => return,
            res = attempt => match res {
                Ok(Ok(p)) => Some(p),
                Ok(Err(e)) => { tracing::warn!(%channel, error = %e, "pub/sub subscribe failed"); None }
                Err(_) => { tracing::warn!(%channel, "pub/sub subscribe timed out"); None }
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
        match ready.take() {
            Some(tx) => {
                tracing::info!(%channel, "subscribed");
                let _ = tx.send(());
            }
            None => {
                tracing::info!(%channel, "resubscribed; resyncing");
                if events.send(NodeEvent::Resync).await.is_err() {
                    return;
                }
            }
        }
        let mut stream = pubsub.into_on_message();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                msg = stream.next() => msg,
            };
            let Some(msg) = msg else { break };
            match crate::wire::decode(msg.get_payload_bytes()) {
                // Awaiting here is the back-pressure: a slow dispatcher slows this
                // reader, it never drops an event.
                Ok(ev) => {
                    if events.send(ev).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(%channel, error = %e, "ignoring undecodable event"),
            }
        }
        tracing::warn!(%channel, "pub/sub link lost; reconnecting");
    }
}
