//! Session lifecycle events: the per-bucket Redis Streams the functions write, and
//! what a webhook deliverer needs to read them through a consumer group.
//!
//! Every state-changing function appends its events to `<prefix>{B}:events` in the
//! same atomic call (see the header of `lua/sessionhub.lua`), and rings
//! `<prefix>{B}:events:new`. A node that delivers webhooks subscribes to the 256
//! rings (sharded pub/sub on Redis Cluster) and, per bucket, takes a batch with
//! `sh_events_take`, which hands one bucket's events to one consumer at a time: so
//! each bucket's events, and so each user's (a user lives in one bucket), go out in
//! stream order. A consumer that stops acknowledging (a node SIGKILLed mid-delivery)
//! loses its batch to the next taker once the batch has been idle for the claim
//! bound (XAUTOCLAIM inside the function).

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use serde::Serialize;
use sessionhub_core::time::rfc3339;
use sessionhub_core::{ConnectionId, EngineError, NodeId, SessionId, UserId};
use tokio::sync::Notify;

use crate::client::Inner;
use crate::keys::{BUCKETS, Bucket};

/// Default cap of each bucket's stream (entries; `XADD MAXLEN ~`).
pub const DEFAULT_EVENTS_MAXLEN: u32 = 1000;

/// The line of the library that sets the cap; nodes load the library with their
/// own value in it.
const MAXLEN_LINE: &str = "local EVENTS_MAXLEN = 1000\n";

/// The function library with `maxlen` as each stream's cap (0: no events).
pub(crate) fn library(maxlen: u32) -> String {
    crate::LIBRARY.replacen(MAXLEN_LINE, &format!("local EVENTS_MAXLEN = {maxlen}\n"), 1)
}

/// One wake-up per bucket: a ring on `<prefix>{B}:events:new` (or a resubscription,
/// which may have missed rings) wakes that bucket's deliverer. A wake-up that finds
/// nobody waiting is kept (one), so none is lost between two waits.
pub(crate) struct Wakes {
    buckets: Vec<Notify>,
}

impl Default for Wakes {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| Notify::new()).collect(),
        }
    }
}

impl Wakes {
    pub(crate) fn wake(&self, b: Bucket) {
        self.buckets[b.index()].notify_one();
    }

    pub(crate) fn wake_all(&self) {
        for n in &self.buckets {
            n.notify_one();
        }
    }
}

/// A lifecycle event's id: `<bucket>-<stream entry id>`, the same for every copy of
/// one change (receivers deduplicate by it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct EventId(String);

impl EventId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The session a `session.created` event describes (never its token).
#[derive(Debug, Clone, Serialize)]
pub struct EventSession {
    /// Its id.
    pub session_id: SessionId,
    /// Its user.
    pub user_id: UserId,
    /// The browser's user agent, as the application gave it.
    pub user_agent: String,
    /// The browser's address, as the application gave it.
    pub ip: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it ends at the latest (RFC 3339).
    pub expires_at: String,
    /// Its idle timeout, in seconds.
    pub idle_timeout_secs: u64,
}

/// One lifecycle event, as webhooks carry it.
#[derive(Debug, Clone, Serialize)]
pub struct LifecycleEvent {
    /// Unique; the same for every delivery of this event.
    pub id: EventId,
    /// `session.created`, `session.ended`, `connection.opened`, `connection.closed`,
    /// `user.online` or `user.offline`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the change happened (RFC 3339, Redis's clock).
    pub at: String,
    /// The user concerned.
    pub user_id: UserId,
    /// The session concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// The connection concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<ConnectionId>,
    /// The node holding the connection, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// Why a session ended or a connection closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The new session, for `session.created`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<EventSession>,
    /// When the change happened, Unix ms (the stream entry's time).
    #[serde(skip)]
    pub at_ms: i64,
}

/// A stream entry as the deliverer holds it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The stream entry id (to acknowledge).
    pub entry_id: String,
    /// The event, or why the entry is not one (written by hand, say).
    pub event: Result<LifecycleEvent, String>,
}

/// What [`EventStreams::take`] got.
#[derive(Debug)]
pub enum Take {
    /// Entries this consumer now holds (possibly none), in stream order; `trimmed`:
    /// entries the stream's cap removed before they were delivered (pending ones,
    /// and ones no consumer had read yet).
    Batch {
        /// The entries.
        events: Vec<StoredEvent>,
        /// How many were trimmed away.
        trimmed: usize,
        /// Whether the batch was pending already (a retry or a claim).
        pending: bool,
    },
    /// Another consumer holds the bucket's batch; it becomes claimable after this
    /// long if that consumer stays silent.
    Busy(Duration),
}

/// A handle on the event streams, for the node's webhook deliverer.
#[derive(Clone)]
pub struct EventStreams {
    inner: Arc<Inner>,
}

impl EventStreams {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
    }

    /// Waits until bucket `b` may have new events (a ring, or a resubscription).
    pub async fn woken(&self, b: Bucket) {
        self.inner.event_wakes.buckets[b.index()].notified().await;
    }

    /// This node's consumer name in the groups (its node id).
    pub fn consumer(&self) -> &NodeId {
        &self.inner.node_id
    }

    /// Takes bucket `b`'s next batch for consumer group `group` (see
    /// `sh_events_take`).
    pub async fn take(
        &self,
        b: Bucket,
        group: &str,
        count: usize,
        claim_idle: Duration,
    ) -> Result<Take, EngineError> {
        let key = self.inner.keys.events(b);
        let reply: Value = self
            .inner
            .fcall(
                "sh_events_take",
                std::slice::from_ref(&key),
                (
                    group,
                    self.inner.node_id.as_str(),
                    count,
                    claim_idle.as_millis() as u64,
                ),
            )
            .await?;
        parse_take(b, reply).map_err(|e| EngineError::corrupt(format!("sh_events_take: {e}")))
    }

    /// Creates consumer group `group` at the end of every bucket's stream where it
    /// does not exist yet (the streams too), so that every event written from now on
    /// is delivered. Idempotent; one call per bucket, concurrently.
    pub async fn ensure_groups(&self, group: &str) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner
            .each_bucket(|b| async move {
                let key = inner.keys.events(b);
                let res = inner
                    .call(|mut c| async move {
                        redis::cmd("XGROUP")
                            .arg("CREATE")
                            .arg(key)
                            .arg(group)
                            .arg("$")
                            .arg("MKSTREAM")
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await;
                match res {
                    Ok(()) => Ok(()),
                    Err(crate::error::CallError::Redis(e)) if e.code() == Some("BUSYGROUP") => {
                        Ok(())
                    }
                    Err(e) => Err(EngineError::from(e)),
                }
            })
            .await
            .map(drop)
    }

    /// Acknowledges delivered (or given up) entries of bucket `b`: they leave the
    /// group's pending list and stay in the stream.
    pub async fn ack(
        &self,
        b: Bucket,
        group: &str,
        entry_ids: &[String],
    ) -> Result<(), EngineError> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        let key = self.inner.keys.events(b);
        self.inner
            .run(|mut c| async move {
                redis::cmd("XACK")
                    .arg(key)
                    .arg(group)
                    .arg(entry_ids)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(drop)
    }
}

fn text(v: &Value) -> Result<String, String> {
    redis::from_redis_value_ref::<String>(v).map_err(|e| e.to_string())
}

fn array(v: &Value) -> Result<&[Value], String> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(&[]),
        other => Err(format!("expected an array, got {other:?}")),
    }
}

fn parse_take(b: Bucket, reply: Value) -> Result<Take, String> {
    let parts = array(&reply)?;
    let kind = parts.first().map(text).transpose()?.unwrap_or_default();
    match kind.as_str() {
        "busy" => {
            let ms: i64 = parts
                .get(1)
                .map(|v| redis::from_redis_value_ref(v).map_err(|e| e.to_string()))
                .transpose()?
                .unwrap_or(0);
            Ok(Take::Busy(Duration::from_millis(ms.max(0) as u64)))
        }
        "new" | "mine" => {
            let entries = parts.get(1).map(array).transpose()?.unwrap_or(&[]);
            let trimmed_pending = parts.get(2).map(array).transpose()?.map_or(0, <[_]>::len);
            // Unread entries the cap trimmed away (not sent by older libraries).
            let trimmed_unread: i64 = parts
                .get(3)
                .map(|v| redis::from_redis_value_ref(v).map_err(|e| e.to_string()))
                .transpose()?
                .unwrap_or(0);
            let trimmed = trimmed_pending + usize::try_from(trimmed_unread).unwrap_or(0);
            let events = entries
                .iter()
                .map(|e| parse_entry(b, e))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Take::Batch {
                events,
                trimmed,
                pending: kind == "mine",
            })
        }
        other => Err(format!("unknown reply kind {other:?}")),
    }
}

fn parse_entry(b: Bucket, entry: &Value) -> Result<StoredEvent, String> {
    let parts = array(entry)?;
    let entry_id = parts
        .first()
        .map(text)
        .transpose()?
        .ok_or("entry without id")?;
    let flat = parts.get(1).map(array).transpose()?.unwrap_or(&[]);
    let fields: Vec<String> = flat.iter().map(text).collect::<Result<_, _>>()?;
    let pairs: Vec<(&str, &str)> = fields
        .chunks(2)
        .filter_map(|c| match c {
            [k, v] => Some((k.as_str(), v.as_str())),
            _ => None,
        })
        .collect();
    Ok(StoredEvent {
        event: event_of(b, &entry_id, &pairs),
        entry_id,
    })
}

/// The event of one stream entry.
pub(crate) fn event_of(
    b: Bucket,
    entry_id: &str,
    fields: &[(&str, &str)],
) -> Result<LifecycleEvent, String> {
    let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let at_ms: i64 = entry_id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .ok_or_else(|| format!("entry id {entry_id:?} is not <ms>-<seq>"))?;
    let kind = get("type").ok_or("no type")?.to_owned();
    let user_id = UserId::parse(get("user_id").ok_or("no user_id")?).map_err(|e| e.to_string())?;
    let session_id = get("session_id")
        .map(SessionId::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let connection_id = get("connection_id")
        .map(ConnectionId::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let node_id = get("node_id")
        .map(NodeId::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let session = match (&session_id, kind.as_str()) {
        (Some(sid), "session.created") => {
            let ms = |name: &str| get(name).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            Some(EventSession {
                session_id: sid.clone(),
                user_id: user_id.clone(),
                user_agent: get("user_agent").unwrap_or_default().to_owned(),
                ip: get("ip").unwrap_or_default().to_owned(),
                created_at: rfc3339(at_ms),
                expires_at: rfc3339(ms("expires_at")),
                idle_timeout_secs: (ms("idle_ms").max(0) / 1000) as u64,
            })
        }
        _ => None,
    };
    Ok(LifecycleEvent {
        id: EventId(format!("{b}-{entry_id}")),
        kind,
        at: rfc3339(at_ms),
        user_id,
        session_id,
        connection_id,
        node_id,
        reason: get("reason").map(str::to_owned),
        session,
        at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_takes_the_cap() {
        assert!(crate::LIBRARY.contains(MAXLEN_LINE));
        let lib = library(50);
        assert!(lib.contains("local EVENTS_MAXLEN = 50\n"));
        assert!(!lib.contains(MAXLEN_LINE));
    }

    #[test]
    fn entries_become_events() {
        let b = Bucket::of("2b");
        let ev = event_of(
            b,
            "1764633600000-3",
            &[
                ("type", "session.created"),
                ("user_id", "alice"),
                ("session_id", "2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa"),
                ("user_agent", "Firefox"),
                ("ip", "192.0.2.7"),
                ("expires_at", "1764720000000"),
                ("idle_ms", "1800000"),
            ],
        )
        .unwrap();
        assert_eq!(ev.id.as_str(), "2b-1764633600000-3");
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["type"], "session.created");
        assert_eq!(json["at"], "2025-12-02T00:00:00.000Z");
        assert_eq!(json["session"]["idle_timeout_secs"], 1800);
        assert!(json.get("connection_id").is_none());
        assert!(json.get("at_ms").is_none());
        assert!(event_of(b, "x", &[("type", "user.online")]).is_err());
    }
}
