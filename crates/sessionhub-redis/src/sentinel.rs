//! Redis Sentinel: finding the master, and following it after a failover.
//!
//! The node asks the sentinels in turn (`SENTINEL get-master-addr-by-name`) and
//! believes an answer only once the server it names says `ROLE` master: during a
//! failover a sentinel can still name the old master, or a replica not promoted yet.
//! The master is reached with the scheme (`redis://`/`rediss://`), user, password and
//! database of the sentinel URL that named it.
//!
//! The node asks again ([`Inner::follow_master`]) when a sentinel announces
//! `+switch-master` on its pub/sub (one listener per sentinel, [`watch_switches`]),
//! when commands keep failing, and when the server answers `READONLY` (a master
//! demoted to replica). A new master replaces the command connection, and the
//! subscriber, which watches [`Sentinel::changes`], subscribes on the new master and
//! resyncs, as after a Redis restart.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::{RedisError, RedisResult, Value};
use tokio::sync::watch;

use crate::client::{Backoff, Inner};
use crate::config::redact_url;
use crate::tls::RedisTls;

/// Bound on one question to one sentinel, and on checking a master's role.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// First delay before a `+switch-master` listener reconnects to its sentinel.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest delay between a listener's reconnection attempts.
const WATCH_RETRY_MAX: Duration = Duration::from_secs(2);
/// How often a listener pings its sentinel (a dead link is noticed without an EOF).
const WATCH_PING_INTERVAL: Duration = Duration::from_secs(2);
/// The sentinels' pub/sub channel that announces a new master.
const SWITCH_CHANNEL: &str = "+switch-master";

/// The sentinels, the master's name, and the master as last found.
pub(crate) struct Sentinel {
    sentinels: Vec<String>,
    master: String,
    tls: RedisTls,
    /// The master's URL as last found (`None` before the first answer).
    current: watch::Sender<Option<String>>,
}

impl Sentinel {
    pub(crate) fn new(sentinels: Vec<String>, master: String, tls: RedisTls) -> Self {
        Self {
            sentinels,
            master,
            tls,
            current: watch::Sender::new(None),
        }
    }

    /// Asks the sentinels in turn for the master, and checks that it is one.
    pub(crate) async fn find_master(&self) -> Result<String, String> {
        let mut last = "no sentinel answered".to_owned();
        for sentinel in &self.sentinels {
            let shown = redact_url(sentinel);
            let named = match tokio::time::timeout(ASK_TIMEOUT, self.ask(sentinel)).await {
                Ok(Ok(Some(url))) => url,
                Ok(Ok(None)) => {
                    last = format!("sentinel {shown} knows no master {:?}", self.master);
                    continue;
                }
                Ok(Err(e)) => {
                    last = format!("sentinel {shown}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("sentinel {shown} did not answer in time");
                    continue;
                }
            };
            let shown_master = redact_url(&named);
            match tokio::time::timeout(ASK_TIMEOUT, self.is_master(&named)).await {
                Ok(Ok(true)) => return Ok(named),
                Ok(Ok(false)) => {
                    last = format!("{shown_master} (named by {shown}) is not a master")
                }
                Ok(Err(e)) => last = format!("master {shown_master} (named by {shown}): {e}"),
                Err(_) => last = format!("master {shown_master} did not answer in time"),
            }
        }
        Err(last)
    }

    /// The master a sentinel announced (`+switch-master`), if it says it is one
    /// already; else whatever [`Sentinel::find_master`] finds. Believing the
    /// announcement first matters: the other sentinels may name the old master for a
    /// second or two more.
    pub(crate) async fn announced_master(
        &self,
        sentinel: &str,
        host: &str,
        port: u16,
    ) -> Result<String, String> {
        let url = master_url(sentinel, host, port);
        match tokio::time::timeout(ASK_TIMEOUT, self.is_master(&url)).await {
            Ok(Ok(true)) => Ok(url),
            _ => self.find_master().await,
        }
    }

    /// One sentinel's answer: the master's URL, or `None` if it knows no such master.
    async fn ask(&self, sentinel: &str) -> RedisResult<Option<String>> {
        let client = crate::tls::client(sentinel, &self.tls)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        Ok(addr.map(|(host, port)| master_url(sentinel, &host, port)))
    }

    /// Whether the server at `url` says it is a master.
    async fn is_master(&self, url: &str) -> RedisResult<bool> {
        let mut conn = self.client(url)?.get_multiplexed_async_connection().await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        Ok(matches!(role.first(), Some(Value::BulkString(r)) if r == b"master"))
    }

    /// A client for `url` (a master found through the sentinels).
    pub(crate) fn client(&self, url: &str) -> RedisResult<redis::Client> {
        crate::tls::client(url, &self.tls)
    }

    /// Whether `url` is the master as last found.
    pub(crate) fn is_current(&self, url: &str) -> bool {
        self.current.borrow().as_deref() == Some(url)
    }

    /// Records the master found; true if it is a different one.
    pub(crate) fn set_current(&self, url: &str) -> bool {
        self.current.send_if_modified(|cur| {
            if cur.as_deref() == Some(url) {
                return false;
            }
            *cur = Some(url.to_owned());
            true
        })
    }

    /// Notified whenever the master changes.
    pub(crate) fn changes(&self) -> watch::Receiver<Option<String>> {
        self.current.subscribe()
    }

    /// The sentinels, with passwords hidden, for logs and errors.
    pub(crate) fn shown(&self) -> String {
        shown(&self.sentinels, &self.master)
    }
}

/// `master <name> via <sentinels>`, with passwords hidden.
pub(crate) fn shown(sentinels: &[String], master: &str) -> String {
    let list = sentinels
        .iter()
        .map(|s| redact_url(s))
        .collect::<Vec<_>>()
        .join(",");
    format!("master {master:?} via sentinels {list}")
}

/// The URL of `host:port` with the scheme, credentials and path of `template` (a
/// sentinel URL).
fn master_url(template: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = template.split_once("://").unwrap_or(("redis", template));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    format!("{scheme}://{userinfo}{host}:{port}{path}")
}

/// Listens for `+switch-master` on every sentinel and has the node follow the new
/// master at once (the nodes would also find it by failing commands, later).
pub(crate) fn watch_switches(inner: &Arc<Inner>, sentinel: &Arc<Sentinel>) {
    for url in &sentinel.sentinels {
        let (inner, sentinel, url) = (inner.clone(), sentinel.clone(), url.clone());
        inner.tasks.clone().spawn(async move {
            let mut backoff = Backoff::new(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
            loop {
                let listened = tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    r = listen(&inner, &sentinel, &url, &mut backoff) => r,
                };
                if let Err(e) = listened {
                    tracing::debug!(sentinel = %redact_url(&url), error = %e, "sentinel listener lost");
                }
                tokio::select! {
                    _ = inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        });
    }
}

/// One subscription to a sentinel's `+switch-master`, until its link fails.
async fn listen(
    inner: &Inner,
    sentinel: &Sentinel,
    url: &str,
    backoff: &mut Backoff,
) -> RedisResult<()> {
    let client = crate::tls::client(url, &sentinel.tls)?;
    let mut pubsub = tokio::time::timeout(ASK_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| timed_out())??;
    pubsub.subscribe(SWITCH_CHANNEL).await?;
    backoff.reset();
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = sessionhub_core::time::interval_from_now(WATCH_PING_INTERVAL);
    loop {
        let msg = tokio::select! {
            _ = ping.tick() => {
                tokio::time::timeout(ASK_TIMEOUT, sink.ping::<()>())
                    .await
                    .map_err(|_| timed_out())??;
                continue;
            }
            msg = stream.next() => msg,
        };
        let Some(msg) = msg else {
            return Err(RedisError::from(std::io::Error::other(
                "sentinel closed the link",
            )));
        };
        // `<master name> <old ip> <old port> <new ip> <new port>`
        let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
        let words: Vec<&str> = payload.split_whitespace().collect();
        if let [name, _, _, host, port] = words[..]
            && name == sentinel.master
            && let Ok(port) = port.parse::<u16>()
        {
            tracing::warn!(sentinel = %redact_url(url), switch = %payload, "sentinel announced a new master");
            inner.follow_master_to(Some((url, host, port))).await;
        }
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "timed out",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_url_keeps_the_sentinels_scheme_and_credentials() {
        assert_eq!(
            master_url("redis://127.0.0.1:26379", "10.0.0.5", 6380),
            "redis://10.0.0.5:6380"
        );
        assert_eq!(
            master_url("rediss://u:p@s1:26379/2", "10.0.0.5", 6380),
            "rediss://u:p@10.0.0.5:6380/2"
        );
        assert_eq!(
            master_url("redis://s1:26379", "::1", 6380),
            "redis://[::1]:6380"
        );
    }
}
