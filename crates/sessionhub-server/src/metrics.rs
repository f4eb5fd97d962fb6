//! Prometheus metrics, kept as plain atomics and rendered in the text exposition
//! format at `GET /metrics`: cheap enough to count on every message.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sessionhub_core::{EndReason, EngineStats, NodeId};

use crate::hub::HubStats;

/// Log lines dropped because the log's reader fell behind (see `LOG_QUEUE_LINES` in
/// `main.rs`); set once by the binary, absent in embedded uses (then 0).
pub static LOG_LINES_DROPPED: std::sync::OnceLock<tracing_appender::non_blocking::ErrorCounter> =
    std::sync::OnceLock::new();

/// Upper bounds of the latency histogram buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// This node's counters.
#[derive(Default)]
pub struct Metrics {
    /// Sessions created through this node.
    pub sessions_created: AtomicU64,
    ended: [AtomicU64; 3],
    /// Frames received from clients.
    pub messages_in: AtomicU64,
    /// Frames sent to clients.
    pub messages_out: AtomicU64,
    /// Upgrades refused (bad cookie, origin, limits, store down).
    pub upgrades_refused: AtomicU64,
    /// Sockets that asked to recover and got every message they missed.
    pub recoveries: AtomicU64,
    /// Sockets that asked to recover and could not (`recovered: false`).
    pub recoveries_failed: AtomicU64,
    /// Frames sent from history to recovering sockets.
    pub recovered_messages: AtomicU64,
    /// Sockets closed with 1012 after a resubscription because they missed
    /// recoverable frames meanwhile (they recover them on reconnect).
    pub missed_closes: AtomicU64,
    /// Time of `POST /api/v1/publish` calls into the store.
    pub publish_latency: Histogram,
    /// Time of session kills into the store.
    pub kill_latency: Histogram,
    /// Webhook delivery (all zero on a node without a webhook).
    pub webhook: std::sync::Arc<crate::webhook::WebhookStats>,
}

fn reason_index(r: EndReason) -> usize {
    match r {
        // Sessions over the per-user cap end inside the login's own Redis call,
        // which does not count them; were one counted here, it is a kill.
        EndReason::Killed | EndReason::Limit => 0,
        EndReason::Logout => 1,
        EndReason::Expired => 2,
    }
}

pub(crate) fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

impl Metrics {
    /// Counts sessions ended by this node.
    pub fn ended(&self, reason: EndReason, n: u64) {
        self.ended[reason_index(reason)].fetch_add(n, Ordering::Relaxed);
    }

    /// The counters a node announces with its status.
    pub fn announced(&self) -> sessionhub_core::NodeCounters {
        sessionhub_core::NodeCounters {
            messages_out: self.messages_out.load(Ordering::Relaxed),
            sessions_created: self.sessions_created.load(Ordering::Relaxed),
            sessions_killed: self.ended[reason_index(EndReason::Killed)].load(Ordering::Relaxed),
        }
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The text exposition of node `node`.
    pub fn render(&self, node: &NodeId, hub: HubStats, engine: EngineStats) -> String {
        let mut out = String::with_capacity(4096);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // Which node answered: behind a load balancer, consecutive scrapes of one
        // URL reach different nodes (the admin console keeps them apart by it).
        let _ = writeln!(
            out,
            "# HELP sessionhub_node_info The node that answered.\n\
             # TYPE sessionhub_node_info gauge\nsessionhub_node_info{{node_id=\"{node}\"}} 1"
        );
        let _ = writeln!(
            out,
            "# HELP sessionhub_connections Live WebSocket connections on this node.\n\
             # TYPE sessionhub_connections gauge\nsessionhub_connections {}",
            hub.sockets
        );
        counter(
            &mut out,
            "sessionhub_log_lines_dropped_total",
            "Log lines dropped because the reader of the node's log fell behind.",
            LOG_LINES_DROPPED
                .get()
                .map_or(0, |c| c.dropped_lines() as u64),
        );
        counter(
            &mut out,
            "sessionhub_sessions_created_total",
            "Sessions created through this node.",
            load(&self.sessions_created),
        );
        let _ = writeln!(
            out,
            "# HELP sessionhub_sessions_ended_total Sessions ended by this node, by reason.\n\
             # TYPE sessionhub_sessions_ended_total counter"
        );
        for r in [EndReason::Killed, EndReason::Logout, EndReason::Expired] {
            let _ = writeln!(
                out,
                "sessionhub_sessions_ended_total{{reason=\"{r}\"}} {}",
                load(&self.ended[reason_index(r)])
            );
        }
        counter(
            &mut out,
            "sessionhub_messages_in_total",
            "Frames received from clients.",
            load(&self.messages_in),
        );
        counter(
            &mut out,
            "sessionhub_messages_out_total",
            "Frames sent to clients.",
            load(&self.messages_out),
        );
        counter(
            &mut out,
            "sessionhub_message_events_total",
            "Message events received for this node's sockets.",
            hub.message_events,
        );
        counter(
            &mut out,
            "sessionhub_slow_consumer_closes_total",
            "Sockets closed with 1013 because their queue was full.",
            hub.slow_closes,
        );
        counter(
            &mut out,
            "sessionhub_upgrades_refused_total",
            "WebSocket upgrades refused.",
            load(&self.upgrades_refused),
        );
        counter(
            &mut out,
            "sessionhub_recoveries_total",
            "Reconnected sockets that recovered every message they missed.",
            load(&self.recoveries),
        );
        counter(
            &mut out,
            "sessionhub_recoveries_failed_total",
            "Reconnected sockets told recovered: false (the gap was no longer in history).",
            load(&self.recoveries_failed),
        );
        counter(
            &mut out,
            "sessionhub_recovered_messages_total",
            "Frames sent from history to reconnected sockets.",
            load(&self.recovered_messages),
        );
        counter(
            &mut out,
            "sessionhub_missed_closes_total",
            "Sockets closed with 1012 after the node resubscribed: they missed recoverable messages meanwhile.",
            load(&self.missed_closes),
        );
        counter(
            &mut out,
            "sessionhub_redis_errors_total",
            "Store operations that failed.",
            engine.store_errors,
        );
        counter(
            &mut out,
            "sessionhub_redis_reconnects_total",
            "Pub/sub subscriber reconnections.",
            engine.reconnects,
        );
        counter(
            &mut out,
            "sessionhub_reaped_records_total",
            "Connection records of dead nodes removed by this node.",
            engine.reaped_records,
        );
        let _ = writeln!(
            out,
            "# HELP sessionhub_cleanup_pending Records a failed store call may have left, \
             waiting for the store to answer to be removed.\n\
             # TYPE sessionhub_cleanup_pending gauge\nsessionhub_cleanup_pending {}",
            engine.cleanup_pending
        );
        counter(
            &mut out,
            "sessionhub_cleanup_dropped_total",
            "Clean-ups given up because their queue was full (the records go when their session ends or their node is reaped).",
            engine.cleanup_dropped,
        );
        self.publish_latency.render(
            &mut out,
            "sessionhub_publish_seconds",
            "Time to route a publish through the store.",
        );
        self.kill_latency.render(
            &mut out,
            "sessionhub_kill_seconds",
            "Time to kill a session in the store (it is refused everywhere after).",
        );
        self.webhook.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.kill_latency.observe(Duration::from_micros(700));
        m.ended(EndReason::Expired, 2);
        let text = m.render(
            &NodeId::parse("node-a").unwrap(),
            HubStats {
                sockets: 3,
                message_events: 0,
                slow_closes: 1,
            },
            EngineStats::default(),
        );
        assert!(text.contains("sessionhub_connections 3\n"));
        assert!(text.contains("sessionhub_node_info{node_id=\"node-a\"} 1\n"));
        assert!(text.contains("sessionhub_sessions_ended_total{reason=\"expired\"} 2\n"));
        assert!(text.contains("sessionhub_kill_seconds_bucket{le=\"0.001\"} 1\n"));
        assert!(text.contains("sessionhub_kill_seconds_bucket{le=\"0.0005\"} 0\n"));
        assert!(text.contains("sessionhub_kill_seconds_count 1\n"));
        assert!(text.contains("sessionhub_slow_consumer_closes_total 1\n"));
    }
}
