//! The node's configuration: one struct, every field an environment variable and a
//! command-line flag, validated before anything starts.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sessionhub_core::NodeId;
use sessionhub_redis::LeaseConfig;

/// Shortest service API key accepted: a guessable key is worse than none.
pub const MIN_API_KEY_LEN: usize = 16;

/// Raw command line / environment, as clap reads it.
#[derive(Parser, Clone)]
#[command(
    name = "sessionhub",
    version,
    about = "Live login sessions and WebSocket connections for load-balanced web apps"
)]
pub struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "SESSIONHUB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Redis URL (redis://, rediss://, unix://). Unset: embedded in-memory engine
    /// (single node only).
    #[arg(long, env = "SESSIONHUB_REDIS_URL")]
    pub redis_url: Option<String>,

    /// This node's id (letters, digits, . _ -). Default: random.
    #[arg(long, env = "SESSIONHUB_NODE_ID")]
    pub node_id: Option<String>,

    /// Bearer key of the service API. Unset: the service API answers 404.
    #[arg(long, env = "SESSIONHUB_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Comma-separated origins allowed to open /ws and make cookie calls, e.g.
    /// `https://app.example.com`. Requests from the node's own origin are always allowed.
    #[arg(long, env = "SESSIONHUB_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Serve the demo login page.
    #[arg(long, env = "SESSIONHUB_DEMO", default_value_t = false)]
    pub demo: bool,

    /// Prefix of every Redis key and channel.
    #[arg(long, env = "SESSIONHUB_KEY_PREFIX", default_value = "sh:")]
    pub key_prefix: String,

    /// Seconds to keep retrying an unreachable Redis at start-up before giving up.
    #[arg(long, env = "SESSIONHUB_REDIS_CONNECT_TIMEOUT", default_value_t = 30)]
    pub redis_connect_timeout: u64,

    /// Largest `data` of a published message, in bytes (larger: 413).
    #[arg(long, env = "SESSIONHUB_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Node lease lifetime in ms: a node silent this long is reaped.
    #[arg(long, env = "SESSIONHUB_LEASE_TTL_MS", default_value_t = 6000)]
    pub lease_ttl_ms: u64,

    /// Lease renewal (heartbeat) interval in ms.
    #[arg(long, env = "SESSIONHUB_HEARTBEAT_MS", default_value_t = 2000)]
    pub heartbeat_ms: u64,

    /// Interval in ms at which each node reaps the records of dead nodes.
    #[arg(long, env = "SESSIONHUB_REAP_INTERVAL_MS", default_value_t = 2000)]
    pub reap_interval_ms: u64,

    /// Interval in ms at which a node re-checks the sessions of its sockets.
    #[arg(long, env = "SESSIONHUB_REVALIDATE_MS", default_value_t = 5000)]
    pub revalidate_ms: u64,

    /// Testing only: drop every `session_ended` event this node receives, to prove
    /// that revalidation alone closes killed sessions' sockets.
    #[arg(
        long,
        env = "SESSIONHUB_TEST_DROP_KILL_EVENTS",
        default_value_t = false,
        hide = true
    )]
    pub test_drop_kill_events: bool,

    /// Log format: `text` or `json`. Levels come from RUST_LOG (default info).
    #[arg(long, env = "SESSIONHUB_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// A validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Redis URL, if any.
    pub redis_url: Option<String>,
    /// This node.
    pub node_id: NodeId,
    /// Service API key, if enabled.
    pub api_key: Option<String>,
    /// Extra allowed origins (exact `scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
    /// Serve the demo page.
    pub demo: bool,
    /// Redis key prefix.
    pub key_prefix: String,
    /// Start-up retry bound for Redis.
    pub redis_connect_timeout: Duration,
    /// `json` logs.
    pub json_logs: bool,
    /// Largest published `data`, in bytes.
    pub max_message_bytes: usize,
    /// Node lease timing.
    pub lease: LeaseConfig,
    /// Session re-check interval.
    pub revalidate_interval: Duration,
    /// Testing only: ignore `session_ended` events.
    pub test_drop_kill_events: bool,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(sessionhub_redis::redact_url),
            )
            .field("node_id", &self.node_id)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("allowed_origins", &self.allowed_origins)
            .field("demo", &self.demo)
            .field("key_prefix", &self.key_prefix)
            .field("redis_connect_timeout", &self.redis_connect_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("lease", &self.lease)
            .field("revalidate_interval", &self.revalidate_interval)
            .finish()
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting}: {reason}")]
pub struct ConfigError {
    /// The variable and flag.
    pub setting: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn bad(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

/// Checks an origin is exactly `scheme://host[:port]`.
fn valid_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

impl Config {
    /// Validates raw settings.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let node_id = match cli.node_id.as_deref() {
            None | Some("") => NodeId::generate(),
            Some(s) => NodeId::parse(s)
                .map_err(|e| bad("SESSIONHUB_NODE_ID (--node-id)", e.to_string()))?,
        };
        let redis_url = cli.redis_url.filter(|u| !u.is_empty());
        if let Some(url) = &redis_url
            && !["redis://", "rediss://", "unix://", "redis+unix://"]
                .iter()
                .any(|s| url.starts_with(s))
        {
            return Err(bad(
                "SESSIONHUB_REDIS_URL (--redis-url)",
                format!(
                    "{:?} must start with redis://, rediss:// or unix://",
                    sessionhub_redis::redact_url(url)
                ),
            ));
        }
        let api_key = cli.api_key.filter(|k| !k.is_empty());
        if let Some(k) = &api_key
            && k.len() < MIN_API_KEY_LEN
        {
            return Err(bad(
                "SESSIONHUB_API_KEY (--api-key)",
                format!("must be at least {MIN_API_KEY_LEN} characters"),
            ));
        }
        let allowed_origins: Vec<String> = cli
            .allowed_origins
            .into_iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        if let Some(o) = allowed_origins.iter().find(|o| !valid_origin(o)) {
            return Err(bad(
                "SESSIONHUB_ALLOWED_ORIGINS (--allowed-origins)",
                format!("{o:?} is not an origin like https://app.example.com"),
            ));
        }
        if cli.key_prefix.len() > 64
            || !cli
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b":_.-".contains(&b))
        {
            return Err(bad(
                "SESSIONHUB_KEY_PREFIX (--key-prefix)",
                "at most 64 characters of letters, digits and : _ . -",
            ));
        }
        if cli.redis_connect_timeout == 0 {
            return Err(bad(
                "SESSIONHUB_REDIS_CONNECT_TIMEOUT (--redis-connect-timeout)",
                "must be at least 1 second",
            ));
        }
        if cli.max_message_bytes == 0 || cli.max_message_bytes > 16 * 1024 * 1024 {
            return Err(bad(
                "SESSIONHUB_MAX_MESSAGE_BYTES (--max-message-bytes)",
                "must be between 1 and 16777216",
            ));
        }
        if cli.heartbeat_ms == 0 || cli.lease_ttl_ms < 2 * cli.heartbeat_ms {
            return Err(bad(
                "SESSIONHUB_LEASE_TTL_MS (--lease-ttl-ms)",
                "must be at least twice SESSIONHUB_HEARTBEAT_MS, which must be positive",
            ));
        }
        if cli.reap_interval_ms == 0 || cli.revalidate_ms == 0 {
            return Err(bad(
                "SESSIONHUB_REAP_INTERVAL_MS / SESSIONHUB_REVALIDATE_MS",
                "must be positive",
            ));
        }
        Ok(Config {
            max_message_bytes: cli.max_message_bytes,
            lease: LeaseConfig {
                ttl: Duration::from_millis(cli.lease_ttl_ms),
                heartbeat: Duration::from_millis(cli.heartbeat_ms),
                reap_interval: Duration::from_millis(cli.reap_interval_ms),
            },
            revalidate_interval: Duration::from_millis(cli.revalidate_ms),
            test_drop_kill_events: cli.test_drop_kill_events,
            listen: cli.listen,
            redis_url,
            node_id,
            api_key,
            allowed_origins,
            demo: cli.demo,
            key_prefix: cli.key_prefix,
            redis_connect_timeout: Duration::from_secs(cli.redis_connect_timeout),
            json_logs: cli.log_format == "json",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["sessionhub"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        Config::from_cli(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.key_prefix, "sh:");
        assert!(c.redis_url.is_none() && c.api_key.is_none());
    }

    #[test]
    fn refuses_bad_values() {
        assert!(
            parse(&["--node-id", "a b"])
                .unwrap_err()
                .contains("node_id")
        );
        assert!(
            parse(&["--redis-url", "http://x"])
                .unwrap_err()
                .contains("redis://")
        );
        assert!(parse(&["--api-key", "short"]).unwrap_err().contains("16"));
        assert!(
            parse(&["--allowed-origins", "example.com"])
                .unwrap_err()
                .contains("origin")
        );
        assert!(parse(&["--key-prefix", "a{b}"]).is_err());
        assert!(parse(&["--listen", "nope"]).is_err());
        let c = parse(&[
            "--allowed-origins",
            "https://a.example, http://localhost:3000/",
        ])
        .unwrap();
        assert_eq!(
            c.allowed_origins,
            ["https://a.example", "http://localhost:3000"]
        );
    }
}
