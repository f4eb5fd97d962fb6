//! How to reach Redis, and why connecting failed.

use std::time::Duration;

use crate::conn::Topology;
use crate::lease::LeaseConfig;
use crate::tls::RedisTls;
use sessionhub_core::{ConnLimits, HistoryConfig};

/// Default time a start-up waits for Redis before giving up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on one Redis operation (including reconnecting).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One Redis or a Redis Cluster.
    pub topology: Topology,
    /// Certificates for `rediss://` links (a private CA, a client certificate).
    pub tls: RedisTls,
    /// Prefix of every key and channel (default `sh:`).
    pub key_prefix: String,
    /// How long start-up keeps retrying an unreachable Redis.
    pub connect_timeout: Duration,
    /// Bound on one operation.
    pub command_timeout: Duration,
    /// Node lease and reaper timing.
    pub lease: LeaseConfig,
    /// Socket limits per session and per user.
    pub limits: ConnLimits,
    /// Message history kept per user (the same on every node).
    pub history: HistoryConfig,
    /// Cap of each bucket's lifecycle event stream (0: the functions write no
    /// events); the library is loaded with it.
    pub events_maxlen: u32,
    /// Whether this node delivers events (it then listens for the streams' rings).
    pub deliver_events: bool,
}

impl RedisConfig {
    /// A config for one Redis at `url`, with defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        Self::with_topology(Topology::Single(url.into()))
    }

    /// A config for `topology`, with defaults for everything else.
    pub fn with_topology(topology: Topology) -> Self {
        Self {
            topology,
            tls: RedisTls::default(),
            key_prefix: "sh:".into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            lease: LeaseConfig::default(),
            limits: ConnLimits::default(),
            history: HistoryConfig::default(),
            events_maxlen: crate::events::DEFAULT_EVENTS_MAXLEN,
            deliver_events: false,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not a Redis URL.
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password hidden.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis did not answer within the connect timeout.
    #[error("Redis at {url} is unreachable after {:.1}s: {reason}", waited.as_secs_f64())]
    Unreachable {
        /// The URL with any password hidden.
        url: String,
        /// How long start-up kept trying.
        waited: Duration,
        /// The last error.
        reason: String,
    },
    /// Another running node holds this node's id.
    #[error(
        "node id {node} is in use by another running node (its claim in Redis was \
         renewed while this one waited {:.1}s): give every node its own node id",
        waited.as_secs_f64()
    )]
    NodeIdInUse {
        /// The node id.
        node: String,
        /// How long start-up waited for the claim to lapse.
        waited: Duration,
    },
}

/// Hides the password of a Redis URL, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
