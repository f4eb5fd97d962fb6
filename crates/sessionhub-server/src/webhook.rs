//! Webhook delivery of the session lifecycle events.
//!
//! Each node that has `SESSIONHUB_WEBHOOK_URL` runs one small task per bucket (256,
//! idle ones cost nothing: they wait for the bucket's ring). A task takes its
//! bucket's next batch from the stream through the shared consumer group
//! ([`EventStreams::take`]: one consumer at a time per bucket, so each user's events
//! go out in order), POSTs it as one signed JSON body, and acknowledges it on a 2xx.
//! A non-2xx answer, a timeout or a transport error is retried with exponential
//! backoff and jitter, for as long as the events are younger than
//! `SESSIONHUB_WEBHOOK_MAX_AGE_SECS`; older ones are acknowledged without delivery,
//! counted as dropped and logged (they stay in the stream). A node killed
//! mid-delivery leaves its batch pending; any node takes it over once it has been
//! idle for `SESSIONHUB_WEBHOOK_CLAIM_MS`.
//!
//! Nothing here is on a request's path: the tasks share one bounded number of
//! in-flight POSTs (`SESSIONHUB_WEBHOOK_MAX_IN_FLIGHT`), each holds at most one batch,
//! and a slow receiver only makes them wait.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sessionhub_core::time::now_ms;
use sessionhub_redis::{BUCKETS, Bucket, EventStreams, LifecycleEvent, StoredEvent, Take};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::{Histogram, counter};

/// The consumer group the nodes share for webhook delivery.
pub const WEBHOOK_GROUP: &str = "sessionhub-webhook";
/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Sessionhub-Signature";
/// Shortest accepted webhook secret.
pub const MIN_SECRET_LEN: usize = 16;
/// First retry delay after a failed delivery (doubles with each failure).
pub const RETRY_MIN_DELAY: Duration = Duration::from_millis(250);
/// Longest retry delay; also at most a quarter of the claim bound, so that a
/// retrying node touches its batch well before another node may take it over.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(10);
/// How long a task waits after Redis failed before trying again.
pub const STORE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Margin added to a busy bucket's claim delay before looking again.
pub const CLAIM_MARGIN: Duration = Duration::from_millis(100);

/// The webhook secret; never printed (its `Debug` is redacted, it has no
/// `Display`).
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// Wraps a secret that has been checked for length.
    pub fn new(secret: String) -> Self {
        Self(secret)
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Validated webhook settings. Its `Debug` shows the URL's origin only, and never
/// the secret.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Where events are POSTed (http or https).
    pub url: reqwest::Url,
    /// The HMAC key.
    pub secret: WebhookSecret,
    /// Bound on one POST, connecting included.
    pub timeout: Duration,
    /// Events older than this are no longer retried: dropped.
    pub max_age: Duration,
    /// A batch pending this long without its node touching it is taken over.
    pub claim_idle: Duration,
    /// Most events per POST.
    pub batch: usize,
    /// Most POSTs in flight from this node.
    pub max_in_flight: usize,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.shown_url())
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("max_age", &self.max_age)
            .field("claim_idle", &self.claim_idle)
            .field("batch", &self.batch)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

impl WebhookConfig {
    /// The URL as logs may show it: scheme, host and port only (a path or query
    /// can hold a receiver's token).
    pub fn shown_url(&self) -> String {
        self.url.origin().ascii_serialization()
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &WebhookSecret, t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.0.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// Delivery counters and gauges, for `/metrics`.
pub struct WebhookStats {
    /// Events delivered (2xx).
    pub delivered: AtomicU64,
    /// POSTs that failed (non-2xx, timeout, transport error).
    pub failures: AtomicU64,
    /// Events given up on: too old to retry.
    pub dropped_age: AtomicU64,
    /// Pending events the stream's cap trimmed away before delivery.
    pub dropped_trimmed: AtomicU64,
    /// Stream entries that are not events (written by hand, say).
    pub dropped_invalid: AtomicU64,
    /// POSTs in flight now.
    pub in_flight: AtomicI64,
    /// Time from a change to its event's delivery (2xx received).
    pub delay: Histogram,
    /// Per bucket: when the oldest event this node holds undelivered happened (Unix
    /// ms; 0: none).
    oldest: Vec<AtomicI64>,
}

impl Default for WebhookStats {
    fn default() -> Self {
        Self {
            delivered: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            dropped_age: AtomicU64::new(0),
            dropped_trimmed: AtomicU64::new(0),
            dropped_invalid: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            delay: Histogram::default(),
            oldest: (0..BUCKETS).map(|_| AtomicI64::new(0)).collect(),
        }
    }
}

impl WebhookStats {
    /// Age of the oldest event this node holds undelivered (the delivery lag).
    pub fn lag(&self) -> Duration {
        let now = now_ms();
        let age = self
            .oldest
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
            .map(|t| now - t)
            .max()
            .unwrap_or(0);
        Duration::from_millis(age.max(0) as u64)
    }

    /// Appends the webhook metrics to a text exposition.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            out,
            "sessionhub_webhook_delivered_total",
            "Lifecycle events delivered to the webhook (2xx) by this node.",
            load(&self.delivered),
        );
        counter(
            out,
            "sessionhub_webhook_failures_total",
            "Webhook POSTs that failed (non-2xx, timeout, transport error); retried.",
            load(&self.failures),
        );
        let _ = writeln!(
            out,
            "# HELP sessionhub_webhook_dropped_total Lifecycle events given up on, by cause.\n\
             # TYPE sessionhub_webhook_dropped_total counter\n\
             sessionhub_webhook_dropped_total{{cause=\"age\"}} {}\n\
             sessionhub_webhook_dropped_total{{cause=\"trimmed\"}} {}\n\
             sessionhub_webhook_dropped_total{{cause=\"invalid\"}} {}",
            load(&self.dropped_age),
            load(&self.dropped_trimmed),
            load(&self.dropped_invalid),
        );
        let _ = writeln!(
            out,
            "# HELP sessionhub_webhook_in_flight Webhook POSTs in flight from this node.\n\
             # TYPE sessionhub_webhook_in_flight gauge\nsessionhub_webhook_in_flight {}\n\
             # HELP sessionhub_webhook_lag_seconds Age of the oldest event this node holds undelivered.\n\
             # TYPE sessionhub_webhook_lag_seconds gauge\nsessionhub_webhook_lag_seconds {}",
            self.in_flight.load(Ordering::Relaxed),
            self.lag().as_secs_f64(),
        );
        self.delay.render(
            out,
            "sessionhub_webhook_delay_seconds",
            "Time from a change to the webhook's 2xx for its event.",
        );
    }
}

/// Why one POST failed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("receiver answered {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("could not reach the receiver: {0}")]
    Transport(String),
}

/// Why the deliverer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The HTTP client could not be built.
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
    /// The consumer groups could not be created.
    #[error("cannot create the webhook consumer groups in Redis: {0}")]
    Groups(#[source] sessionhub_core::EngineError),
}

/// The shared parts of the bucket tasks.
struct Deliverer {
    streams: EventStreams,
    config: WebhookConfig,
    client: reqwest::Client,
    permits: Semaphore,
    stats: Arc<WebhookStats>,
    stop: CancellationToken,
}

/// Creates the consumer groups (so that every event written from now on is
/// delivered), then starts one delivery task per bucket; they return when `stop` is
/// cancelled.
pub async fn start(
    streams: EventStreams,
    config: WebhookConfig,
    stats: Arc<WebhookStats>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), StartError> {
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .redirect(reqwest::redirect::Policy::none())
        // reqwest's default too; said here since every other link sets it itself
        // (tests/tests/nodelay.rs checks the connection).
        .tcp_nodelay(true)
        .user_agent(concat!("sessionhub/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StartError::Client(e.to_string()))?;
    streams
        .ensure_groups(WEBHOOK_GROUP)
        .await
        .map_err(StartError::Groups)?;
    tracing::info!(
        url = %config.shown_url(),
        max_in_flight = config.max_in_flight,
        "delivering lifecycle events to the webhook"
    );
    let deliverer = Arc::new(Deliverer {
        streams,
        permits: Semaphore::new(config.max_in_flight),
        config,
        client,
        stats,
        stop,
    });
    for b in Bucket::all() {
        let span = tracing::info_span!("webhook", bucket = %b);
        actix_web::rt::spawn(tasks.track_future(deliverer.clone().run_bucket(b).instrument(span)));
    }
    Ok(())
}

/// A random duration in `[d/2, d]` (equal jitter: retries of many nodes spread out,
/// and still grow).
fn jittered(d: Duration) -> Duration {
    let r = getrandom::u64().unwrap_or(0) % 1000;
    d / 2 + d / 2 * (r as u32) / 1000
}

impl Deliverer {
    /// Sleeps `d` unless the node stops first (false).
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn retry_cap(&self) -> Duration {
        RETRY_MAX_DELAY.min(self.config.claim_idle / 4)
    }

    async fn run_bucket(self: Arc<Self>, b: Bucket) {
        // When another node holds the bucket's batch: when that batch becomes
        // claimable. Until then rings are left to that node, which drains the bucket
        // (its own next takes find them), so each event costs one take, not one per
        // node; if that node dies, this one claims its batch and any newer entries
        // then.
        let mut look_at: Option<tokio::time::Instant> = None;
        loop {
            let due = async {
                match look_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.streams.woken(b) => {
                    if look_at.is_some_and(|t| t > tokio::time::Instant::now()) {
                        continue;
                    }
                }
                _ = due => {}
            }
            look_at = None;
            match self.drain(b).await {
                Drained::Empty => {}
                Drained::Busy(d) => look_at = Some(tokio::time::Instant::now() + d + CLAIM_MARGIN),
                Drained::Stopped => return,
            }
        }
    }

    /// Delivers bucket `b`'s events until there are none left for this node.
    async fn drain(&self, b: Bucket) -> Drained {
        let mut failures: u32 = 0;
        let mut last_head: Option<String> = None;
        loop {
            // A POST slot first, then the batch: taking a batch restarts its idle
            // time, which is what keeps other nodes off it, so a batch must not be
            // taken and then wait for a slot (behind a slow receiver, longer than
            // the claim bound: another node took it over and both posted it).
            let permit = tokio::select! {
                _ = self.stop.cancelled() => return Drained::Stopped,
                p = self.permits.acquire() => match p {
                    Ok(p) => p,
                    Err(_) => return Drained::Stopped,
                },
            };
            let take = self
                .streams
                .take(b, WEBHOOK_GROUP, self.config.batch, self.config.claim_idle)
                .await;
            let (events, trimmed, pending) = match take {
                Ok(Take::Busy(d)) => {
                    self.stats.oldest[b.index()].store(0, Ordering::Relaxed);
                    return Drained::Busy(d);
                }
                Ok(Take::Batch {
                    events,
                    trimmed,
                    pending,
                }) => (events, trimmed, pending),
                Err(e) => {
                    tracing::warn!(bucket = %b, error = %e, "could not read lifecycle events");
                    // Not kept through the pause: other buckets may post meanwhile.
                    drop(permit);
                    if !self.pause(STORE_RETRY_DELAY).await {
                        return Drained::Stopped;
                    }
                    continue;
                }
            };
            if trimmed > 0 {
                self.stats
                    .dropped_trimmed
                    .fetch_add(trimmed as u64, Ordering::Relaxed);
                tracing::warn!(
                    bucket = %b, events = trimmed,
                    "lifecycle events trimmed from the stream before delivery: dropped \
                     (raise SESSIONHUB_EVENTS_MAXLEN)"
                );
            }
            if events.is_empty() {
                self.stats.oldest[b.index()].store(0, Ordering::Relaxed);
                return Drained::Empty;
            }
            let head = events[0].entry_id.clone();
            if last_head.as_ref() != Some(&head) {
                failures = 0;
                last_head = Some(head);
                if pending {
                    tracing::info!(bucket = %b, "taking over pending lifecycle events");
                }
            }
            let (send, give_up) = self.sort(b, events);
            if !give_up.is_empty() && !self.ack(b, &give_up).await {
                return Drained::Stopped;
            }
            let Some(oldest) = send.first().map(|e| e.at_ms) else {
                continue;
            };
            self.stats.oldest[b.index()].store(oldest, Ordering::Relaxed);
            match self.post(&send, permit).await {
                Ok(()) => {
                    let now = now_ms();
                    for e in &send {
                        let d = Duration::from_millis((now - e.at_ms).max(0) as u64);
                        self.stats.delay.observe(d);
                    }
                    self.stats
                        .delivered
                        .fetch_add(send.len() as u64, Ordering::Relaxed);
                    let ids: Vec<String> = send.iter().map(|e| e.entry_id.clone()).collect();
                    if !self.ack(b, &ids).await {
                        return Drained::Stopped;
                    }
                }
                Err(Some(e)) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let delay = jittered(
                        RETRY_MIN_DELAY
                            .saturating_mul(1 << failures.min(16))
                            .min(self.retry_cap()),
                    );
                    failures += 1;
                    tracing::warn!(
                        bucket = %b, events = send.len(), first_event = %send[0].event.id,
                        attempt = failures, retry_in_ms = delay.as_millis() as u64, error = %e,
                        "webhook delivery failed; retrying"
                    );
                    if !self.pause(delay).await {
                        return Drained::Stopped;
                    }
                }
                Err(None) => return Drained::Stopped,
            }
        }
    }

    /// Splits a batch into what is still worth sending (in order) and the entry ids
    /// to give up on (too old, or not events), counting and logging the latter.
    fn sort(&self, b: Bucket, batch: Vec<StoredEvent>) -> (Vec<Ready>, Vec<String>) {
        let oldest_ok = now_ms() - self.config.max_age.as_millis() as i64;
        let mut send = Vec::with_capacity(batch.len());
        let mut give_up = Vec::new();
        for stored in batch {
            match stored.event {
                Ok(event) if event.at_ms >= oldest_ok => send.push(Ready {
                    entry_id: stored.entry_id,
                    at_ms: event.at_ms,
                    event,
                }),
                Ok(event) => {
                    self.stats.dropped_age.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        bucket = %b, event_id = %event.id, event_type = %event.kind,
                        user_id = %event.user_id,
                        "lifecycle event older than SESSIONHUB_WEBHOOK_MAX_AGE_SECS: dropped \
                         (it stays in the stream)"
                    );
                    give_up.push(stored.entry_id);
                }
                Err(why) => {
                    self.stats.dropped_invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        bucket = %b, entry_id = %stored.entry_id, reason = %why,
                        "stream entry is not a lifecycle event: skipped"
                    );
                    give_up.push(stored.entry_id);
                }
            }
        }
        (send, give_up)
    }

    /// Acknowledges entries, retrying while Redis fails; false if the node stopped.
    async fn ack(&self, b: Bucket, ids: &[String]) -> bool {
        loop {
            match self.streams.ack(b, WEBHOOK_GROUP, ids).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(bucket = %b, error = %e, "could not acknowledge lifecycle events");
                    if !self.pause(STORE_RETRY_DELAY).await {
                        return false;
                    }
                }
            }
        }
    }

    /// POSTs one batch in the slot `permit`, given up when the answer is in.
    /// `Err(None)`: the node is stopping.
    async fn post(
        &self,
        batch: &[Ready],
        permit: tokio::sync::SemaphorePermit<'_>,
    ) -> Result<(), Option<PostError>> {
        let events: Vec<&LifecycleEvent> = batch.iter().map(|r| &r.event).collect();
        let body = match serde_json::to_vec(&serde_json::json!({ "events": events })) {
            Ok(b) => b,
            Err(e) => return Err(Some(PostError::Transport(e.to_string()))),
        };
        let t = (now_ms() / 1000) as u64;
        let request = self
            .client
            .post(self.config.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(&self.config.secret, t, &body))
            .body(body)
            .send();
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let res = tokio::select! {
            _ = self.stop.cancelled() => None,
            r = request => Some(r),
        };
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
        match res {
            None => Err(None),
            Some(Ok(r)) if r.status().is_success() => Ok(()),
            Some(Ok(r)) => Err(Some(PostError::Status(r.status().as_u16()))),
            Some(Err(e)) if e.is_timeout() => Err(Some(PostError::Timeout(self.config.timeout))),
            Some(Err(e)) => Err(Some(PostError::Transport(e.without_url().to_string()))),
        }
    }
}

/// An event on its way out.
struct Ready {
    entry_id: String,
    at_ms: i64,
    event: LifecycleEvent,
}

/// How a drain ended.
enum Drained {
    /// Nothing left for this node.
    Empty,
    /// Another node holds the bucket's batch; look again after this long.
    Busy(Duration),
    /// The node is stopping.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_readme_says() {
        // printf '%s' '1700000000.{"events":[]}' | openssl dgst -sha256 -hmac 0123456789abcdef
        let s = signature(
            &WebhookSecret::new("0123456789abcdef".into()),
            1_700_000_000,
            br#"{"events":[]}"#,
        );
        assert_eq!(
            s,
            "t=1700000000,v1=1f1c43683e76ee83b09613ab56fa5bdd3ce55f3ee41db00a92e22eea0376899e"
        );
    }

    #[test]
    fn the_secret_never_prints() {
        let s = WebhookSecret::new("0123456789abcdef".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(500) && d <= Duration::from_millis(1000));
        }
    }
}
