//! Wall-clock helpers. Storage keeps Unix milliseconds; the API shows RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An interval whose first tick is one `period` from now.
///
/// Not `tokio::time::interval` and an awaited first tick: that tick is "at once" but
/// is a timer like any other, which the runtime fires at its next millisecond
/// boundary. A loop that awaited it before its `select!` was deaf for up to 1 ms; a
/// socket task doing so after its `hello` missed a kill's close that came meanwhile
/// until then (in the peers' harness, a third of the kills had one socket ~1 ms late:
/// BENCHMARKS.md, "A millisecond a kill's socket waited").
pub fn interval_from_now(period: Duration) -> tokio::time::Interval {
    tokio::time::interval_at(tokio::time::Instant::now() + period, period)
}

/// RFC 3339 (UTC, millisecond precision) of a Unix-milliseconds time.
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Serde helper: serialise Unix milliseconds as an RFC 3339 string.
pub mod as_rfc3339 {
    /// Serialises `ms` as RFC 3339.
    pub fn serialize<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::rfc3339(*ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tokio's own interval is ready at once (after its first timer fires); this
    /// one first ticks a period from now, so a loop needs no await before its
    /// `select!`.
    #[tokio::test]
    async fn an_interval_from_now_does_not_tick_at_once() {
        const HOUR: Duration = Duration::from_secs(3600);
        const BOUND: Duration = Duration::from_millis(200);
        let mut theirs = tokio::time::interval(HOUR);
        assert!(tokio::time::timeout(BOUND, theirs.tick()).await.is_ok());
        let mut ours = interval_from_now(HOUR);
        assert!(tokio::time::timeout(BOUND, ours.tick()).await.is_err());
    }
}
