//! The node's configuration: one struct, every field an environment variable and a
//! command-line flag, validated before anything starts.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{BoolishValueParser, RangedU64ValueParser};
use clap::{ArgAction, CommandFactory, Parser};
use sessionhub_core::history::MAX_HISTORY_SIZE;
use sessionhub_core::model::MAX_SESSION_TTL;
use sessionhub_core::{ConnLimits, HistoryConfig, NodeId};
use sessionhub_redis::{LeaseConfig, RedisTls, TLS_SCHEME, Topology};

use crate::webhook::{MIN_SECRET_LEN, WebhookConfig, WebhookSecret};

/// Highest accepted `SESSIONHUB_MAX_SESSIONS_PER_USER`: a login past the cap ends
/// the oldest sessions in the same atomic call, so the cap bounds that call's work.
pub const MAX_SESSIONS_CAP: u32 = 10_000;

/// Shortest service API key accepted: a guessable key is worse than none.
pub const MIN_API_KEY_LEN: usize = 16;

/// Highest accepted `SESSIONHUB_EVENTS_MAXLEN` (entries per bucket's stream).
pub const MAX_EVENTS_MAXLEN: i64 = 1_000_000;

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

    /// Redis URL (redis://, rediss:// for TLS, unix://). Unset: embedded in-memory
    /// engine (single node only).
    #[arg(long, env = "SESSIONHUB_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Cluster seed URLs, comma-separated (`redis://host:port,...`; any
    /// masters or replicas of the cluster, the rest is discovered). Exclusive with
    /// SESSIONHUB_REDIS_URL.
    #[arg(long, env = "SESSIONHUB_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,

    /// Redis Sentinel URLs, comma-separated (`redis://host:26379,...`): the node
    /// asks them for the master and follows it after a failover. Needs
    /// SESSIONHUB_REDIS_SENTINEL_MASTER; exclusive with SESSIONHUB_REDIS_URL and
    /// SESSIONHUB_REDIS_CLUSTER.
    #[arg(long, env = "SESSIONHUB_REDIS_SENTINELS", value_delimiter = ',')]
    pub redis_sentinels: Vec<String>,

    /// The master's name in the sentinels' configuration (`sentinel monitor <name>`).
    #[arg(long, env = "SESSIONHUB_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// PEM file of the CA that signs the Redis servers' certificates (rediss://).
    /// Unset: the system's root certificates.
    #[arg(long, env = "SESSIONHUB_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM file of this node's client certificate, for Redis servers that require
    /// mutual TLS; needs SESSIONHUB_REDIS_CLIENT_KEY_FILE.
    #[arg(long, env = "SESSIONHUB_REDIS_CLIENT_CERT_FILE")]
    pub redis_client_cert_file: Option<PathBuf>,

    /// PEM file of the private key of SESSIONHUB_REDIS_CLIENT_CERT_FILE.
    #[arg(long, env = "SESSIONHUB_REDIS_CLIENT_KEY_FILE")]
    pub redis_client_key_file: Option<PathBuf>,

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

    /// Serve the demo app (a login by bare user name: never in production). Default:
    /// on with the embedded engine (no Redis URL), off otherwise.
    #[arg(long, env = "SESSIONHUB_DEMO", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub demo: Option<bool>,

    /// Serve the admin console at /admin (it asks for the service API key). Default:
    /// on when SESSIONHUB_API_KEY is set.
    #[arg(long, env = "SESSIONHUB_ADMIN", num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub admin: Option<bool>,

    /// Prefix of every Redis key and channel.
    #[arg(long, env = "SESSIONHUB_KEY_PREFIX", default_value = "sh:")]
    pub key_prefix: String,

    /// Seconds to keep retrying an unreachable Redis at start-up before giving up.
    #[arg(long, env = "SESSIONHUB_REDIS_CONNECT_TIMEOUT", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_connect_timeout: u64,

    /// Largest `data` of a published message, in bytes (larger: 413).
    #[arg(long, env = "SESSIONHUB_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=16 * 1024 * 1024))]
    pub max_message_bytes: usize,

    /// Node lease lifetime in ms: a node silent this long is reaped.
    #[arg(long, env = "SESSIONHUB_LEASE_TTL_MS", default_value_t = 6000)]
    pub lease_ttl_ms: u64,

    /// Lease renewal (heartbeat) interval in ms.
    #[arg(long, env = "SESSIONHUB_HEARTBEAT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: u64,

    /// Interval in ms at which each node reaps the records of dead nodes.
    #[arg(long, env = "SESSIONHUB_REAP_INTERVAL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub reap_interval_ms: u64,

    /// Interval in ms at which a node re-checks the sessions of its sockets.
    #[arg(long, env = "SESSIONHUB_REVALIDATE_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub revalidate_ms: u64,

    /// Issue the session cookie with `Secure` (named `__Host-sh_session`): set this
    /// when clients reach the node over TLS.
    #[arg(long, env = "SESSIONHUB_COOKIE_SECURE", default_value_t = false,
          action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    pub cookie_secure: bool,

    /// Comma-separated IPs or CIDR ranges of proxies whose `X-Forwarded-Proto` and
    /// `X-Forwarded-For` are believed (e.g. `127.0.0.1`, `10.0.0.0/8`).
    #[arg(long, env = "SESSIONHUB_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,

    /// Absolute session lifetime in seconds when the caller gives none.
    #[arg(long, env = "SESSIONHUB_SESSION_TTL_SECS", default_value_t = 24 * 3600,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SESSION_TTL.as_secs()))]
    pub session_ttl_secs: u64,

    /// Idle timeout in seconds: a session without activity this long ends.
    #[arg(long, env = "SESSIONHUB_IDLE_TIMEOUT_SECS", default_value_t = 30 * 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_secs: u64,

    /// Activity refreshes the idle timeout at most this often (seconds), so Redis is
    /// not written on every request.
    #[arg(long, env = "SESSIONHUB_IDLE_REFRESH_SECS", default_value_t = 60)]
    pub idle_refresh_secs: u64,

    /// Largest WebSocket frame or message a client may send, in bytes (close 1009).
    #[arg(long, env = "SESSIONHUB_MAX_FRAME_BYTES", default_value_t = 64 * 1024,
          value_parser = RangedU64ValueParser::<usize>::new().range(1024..))]
    pub max_frame_bytes: usize,

    /// Client messages per second a socket may sustain (close 1008 past it).
    #[arg(long, env = "SESSIONHUB_WS_RATE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_rate: u32,

    /// Burst of client messages a socket may send at once.
    #[arg(long, env = "SESSIONHUB_WS_BURST", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ws_burst: u32,

    /// Most live sockets of one session.
    #[arg(long, env = "SESSIONHUB_MAX_SOCKETS_PER_SESSION", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sockets_per_session: u32,

    /// Most live sockets of one user.
    #[arg(long, env = "SESSIONHUB_MAX_SOCKETS_PER_USER", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sockets_per_user: u32,

    /// Most sessions of one user: a login past it ends the user's oldest session
    /// (`session_ended` with reason `limit`).
    #[arg(long, env = "SESSIONHUB_MAX_SESSIONS_PER_USER", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SESSIONS_CAP)))]
    pub max_sessions_per_user: u32,

    /// Recoverable messages kept per user for sockets that reconnect with `since`
    /// (messages to a user or a session, and `session_created`); 0 turns history off.
    #[arg(long, env = "SESSIONHUB_HISTORY_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_HISTORY_SIZE)))]
    pub history_size: u32,

    /// Seconds a user's history epoch and last offset are kept after the last message
    /// or socket registration (at least the history TTL).
    #[arg(long, env = "SESSIONHUB_HISTORY_META_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=90 * 24 * 3600))]
    pub history_meta_ttl_secs: u64,

    /// Seconds a message stays recoverable; 0 turns history off.
    #[arg(long, env = "SESSIONHUB_HISTORY_TTL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(0..=30 * 24 * 3600))]
    pub history_ttl_secs: u64,

    /// Time in ms a client has to send a request head, upgrades included (slowloris).
    #[arg(long, env = "SESSIONHUB_REQUEST_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    // 25 s, as in Socket.IO, socketioxide and Centrifugo: well inside the idle
    // timeouts of common proxies and load balancers (60 s and up), and with the 45 s
    // pong timeout a half-open socket is closed when the second ping after its last
    // pong falls due (50 s after it; 60 s with the 20 s of earlier releases).
    /// Interval in ms between the server's pings on each socket.
    #[arg(long, env = "SESSIONHUB_PING_INTERVAL_MS", default_value_t = 25_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ping_interval_ms: u64,

    /// A socket that answers no ping for this many ms is closed (half-open).
    #[arg(long, env = "SESSIONHUB_PONG_TIMEOUT_MS", default_value_t = 45_000)]
    pub pong_timeout_ms: u64,

    /// HTTP worker threads (default: one per CPU but one, at least one; the first
    /// also drives the Redis connections, the subscriber and the dispatcher).
    #[arg(long, env = "SESSIONHUB_WORKERS")]
    pub workers: Option<usize>,

    /// Run the node's threads under Linux's SCHED_BATCH policy (default on): a node
    /// woken by a socket then waits for the running thread's turn to end instead of
    /// preempting it, so Redis finishes writing one event to every node before the
    /// first of them runs. Off: the default policy (SCHED_OTHER).
    #[arg(long, env = "SESSIONHUB_SCHED_BATCH", num_args = 0..=1, default_missing_value = "true",
          default_value = "true", value_parser = BoolishValueParser::new())]
    pub sched_batch: bool,

    /// Log format: `text` or `json`. Levels come from RUST_LOG (default info).
    #[arg(long, env = "SESSIONHUB_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Entries kept in each bucket's lifecycle event stream (XADD MAXLEN ~); 0: no
    /// events are written.
    #[arg(long, env = "SESSIONHUB_EVENTS_MAXLEN", default_value_t = sessionhub_redis::events::DEFAULT_EVENTS_MAXLEN,
          value_parser = clap::value_parser!(u32).range(0..=MAX_EVENTS_MAXLEN))]
    pub events_maxlen: u32,

    /// Where to POST lifecycle events (http:// or https://); needs
    /// SESSIONHUB_WEBHOOK_SECRET.
    #[arg(long, env = "SESSIONHUB_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// HMAC-SHA256 key of the webhook signature, at least 16 characters.
    #[arg(long, env = "SESSIONHUB_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Bound in ms on one webhook POST, connecting included.
    #[arg(long, env = "SESSIONHUB_WEBHOOK_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_timeout_ms: u64,

    /// Events are retried until they are this old (seconds), then dropped.
    #[arg(long, env = "SESSIONHUB_WEBHOOK_MAX_AGE_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_max_age_secs: u64,

    /// A batch a node took and left untouched this long (ms) is taken over by
    /// another node (a node that died mid-delivery).
    #[arg(long, env = "SESSIONHUB_WEBHOOK_CLAIM_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub webhook_claim_ms: u64,

    /// Most events in one webhook POST.
    #[arg(long, env = "SESSIONHUB_WEBHOOK_BATCH", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub webhook_batch: u64,

    /// Most webhook POSTs in flight from one node.
    #[arg(long, env = "SESSIONHUB_WEBHOOK_MAX_IN_FLIGHT", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub webhook_max_in_flight: u64,
}

/// A validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Where the shared state lives: one Redis or a Redis Cluster; `None` for the
    /// embedded engine.
    pub redis: Option<Topology>,
    /// Certificates for `rediss://` links.
    pub redis_tls: RedisTls,
    /// This node.
    pub node_id: NodeId,
    /// Service API key, if enabled.
    pub api_key: Option<String>,
    /// Extra allowed origins (exact `scheme://host[:port]`).
    pub allowed_origins: Vec<String>,
    /// Serve the demo page.
    pub demo: bool,
    /// Serve the admin console.
    pub admin: bool,
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
    /// HTTP worker threads.
    pub workers: usize,
    /// Whether `main` puts the process's threads under SCHED_BATCH.
    pub sched_batch: bool,
    /// Session lifetimes and cookies.
    pub sessions: SessionPolicy,
    /// Per-socket limits.
    pub ws: WsLimits,
    /// Sockets per session and per user.
    pub conn_limits: ConnLimits,
    /// Message history kept per user.
    pub history: HistoryConfig,
    /// Time a client has to send its request head.
    pub request_timeout: Duration,
    /// Cap of each bucket's lifecycle event stream (0: none written).
    pub events_maxlen: u32,
    /// Webhook delivery of the lifecycle events, if configured.
    pub webhook: Option<WebhookConfig>,
}

/// Session lifetimes and cookie settings.
#[derive(Debug, Clone)]
pub struct SessionPolicy {
    /// Default absolute lifetime.
    pub ttl: Duration,
    /// Idle timeout.
    pub idle: Duration,
    /// Shortest interval between two activity refreshes of one session.
    pub idle_refresh: Duration,
    /// Always issue `Secure` cookies.
    pub cookie_secure: bool,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<crate::auth::ProxyRange>,
}

/// Limits on one WebSocket.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// Largest frame or message from a client.
    pub max_frame: usize,
    /// Sustained client messages per second.
    pub rate: u32,
    /// Burst of client messages.
    pub burst: u32,
    /// Server ping interval.
    pub ping_interval: Duration,
    /// Silence after which a socket is considered half-open.
    pub pong_timeout: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("redis", &self.redis.as_ref().map(Topology::shown))
            .field("redis_tls", &self.redis_tls)
            .field("node_id", &self.node_id)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("allowed_origins", &self.allowed_origins)
            .field("demo", &self.demo)
            .field("admin", &self.admin)
            .field("key_prefix", &self.key_prefix)
            .field("redis_connect_timeout", &self.redis_connect_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("lease", &self.lease)
            .field("revalidate_interval", &self.revalidate_interval)
            .field("sessions", &self.sessions)
            .field("ws", &self.ws)
            .field("conn_limits", &self.conn_limits)
            .field("history", &self.history)
            .field("request_timeout", &self.request_timeout)
            .field("events_maxlen", &self.events_maxlen)
            .field(
                "webhook",
                &self.webhook.as_ref().map(WebhookConfig::shown_url),
            )
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

/// HTTP workers for `cpus` CPUs: one per CPU but one (Redis, the load balancer and
/// the rest of the machine keep a core), at least one. On 2 CPUs one worker
/// answered faster and with less CPU per publish than two (BENCHMARKS.md, "fewer
/// thread hops"); the first worker also drives the Redis links and the dispatcher.
fn default_workers(cpus: usize) -> usize {
    cpus.saturating_sub(1).max(1)
}

fn bad(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

/// Prefix of every environment variable the node reads.
pub const ENV_PREFIX: &str = "SESSIONHUB_";

/// An environment variable named like a setting but not one: a misspelt
/// `SESSIONHUB_REDIS_ULR` would otherwise leave a node running alone on the
/// embedded engine (a split brain in a cluster), without a word.
#[derive(Debug, thiserror::Error)]
#[error("unknown setting {name}{}", .closest.as_ref().map(|c| format!(" (did you mean {c}?)")).unwrap_or_default())]
pub struct UnknownSetting {
    /// The variable.
    pub name: String,
    /// The known variable nearest to it, if any is near.
    pub closest: Option<String>,
}

/// Checks that every `SESSIONHUB_*` variable in `vars` is a setting of [`Cli`].
pub fn check_environment<I>(vars: I) -> Result<(), UnknownSetting>
where
    I: IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
{
    let cmd = Cli::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    let mut unknown: Vec<String> = vars
        .into_iter()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .filter(|k| k.starts_with(ENV_PREFIX) && !known.contains(k) && !k8s_service_link(k))
        .collect();
    unknown.sort();
    let Some(name) = unknown.into_iter().next() else {
        return Ok(());
    };
    let closest = known
        .iter()
        .map(|k| (edit_distance(k, &name), k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k.clone());
    Err(UnknownSetting { name, closest })
}

/// Whether `name` is one of the variables Kubernetes sets in every pod for a Service
/// named `sessionhub` (`SESSIONHUB_SERVICE_HOST`, `SESSIONHUB_PORT_8080_TCP`, ...).
fn k8s_service_link(name: &str) -> bool {
    name == "SESSIONHUB_PORT"
        || name.starts_with("SESSIONHUB_PORT_")
        || name.starts_with("SESSIONHUB_SERVICE_")
}

/// Levenshtein distance, for suggesting the setting a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
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
        let embedded = cli.redis_url.as_deref().is_none_or(str::is_empty)
            && cli.redis_cluster.iter().all(|s| s.trim().is_empty())
            && cli.redis_sentinels.iter().all(|s| s.trim().is_empty());
        let webhook = webhook_config(&cli, embedded)?;
        let node_id = match cli.node_id.as_deref() {
            None | Some("") => NodeId::generate(),
            Some(s) => NodeId::parse(s)
                .map_err(|e| bad("SESSIONHUB_NODE_ID (--node-id)", e.to_string()))?,
        };
        let redis_url = cli.redis_url.filter(|u| !u.is_empty());
        let seeds: Vec<String> = cli
            .redis_cluster
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let redis = match (redis_url, seeds.is_empty()) {
            (Some(_), false) => {
                return Err(bad(
                    "SESSIONHUB_REDIS_CLUSTER (--redis-cluster)",
                    "set either SESSIONHUB_REDIS_URL (one Redis) or SESSIONHUB_REDIS_CLUSTER \
                     (Redis Cluster), not both"
                        .to_owned(),
                ));
            }
            (Some(url), true) => {
                check_redis_url("SESSIONHUB_REDIS_URL (--redis-url)", &url, true)?;
                Some(Topology::Single(url))
            }
            (None, false) => {
                for url in &seeds {
                    check_redis_url("SESSIONHUB_REDIS_CLUSTER (--redis-cluster)", url, false)?;
                }
                Some(Topology::Cluster(seeds))
            }
            (None, true) => None,
        };
        let redis = sentinel_topology(
            &cli.redis_sentinels,
            cli.redis_sentinel_master.as_deref(),
            redis,
        )?;
        let redis_tls = redis_tls(
            cli.redis_ca_file.clone(),
            cli.redis_client_cert_file.clone(),
            cli.redis_client_key_file.clone(),
            redis.as_ref(),
        )?;
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
        // Ranges of single values are clap's (value_parser); what relates two
        // settings is checked here.
        if cli.lease_ttl_ms < 2 * cli.heartbeat_ms {
            return Err(bad(
                "SESSIONHUB_LEASE_TTL_MS (--lease-ttl-ms)",
                "must be at least twice SESSIONHUB_HEARTBEAT_MS",
            ));
        }
        let trusted_proxies = cli
            .trusted_proxies
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                crate::auth::ProxyRange::parse(p)
                    .map_err(|e| bad("SESSIONHUB_TRUSTED_PROXIES (--trusted-proxies)", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cli.idle_refresh_secs > cli.idle_timeout_secs {
            return Err(bad(
                "SESSIONHUB_IDLE_REFRESH_SECS (--idle-refresh-secs)",
                "must be at most SESSIONHUB_IDLE_TIMEOUT_SECS",
            ));
        }
        if cli.pong_timeout_ms <= cli.ping_interval_ms {
            // Both values: the interval may be the default, which the user never wrote.
            return Err(bad(
                "SESSIONHUB_PONG_TIMEOUT_MS (--pong-timeout-ms)",
                format!(
                    "{} ms must be longer than SESSIONHUB_PING_INTERVAL_MS ({} ms)",
                    cli.pong_timeout_ms, cli.ping_interval_ms
                ),
            ));
        }
        let admin = match cli.admin {
            Some(true) if api_key.is_none() => {
                return Err(bad(
                    "SESSIONHUB_ADMIN (--admin)",
                    "the admin console needs SESSIONHUB_API_KEY: operators sign in with it",
                ));
            }
            Some(on) => on,
            None => api_key.is_some(),
        };
        Ok(Config {
            events_maxlen: cli.events_maxlen,
            webhook,
            sessions: SessionPolicy {
                ttl: Duration::from_secs(cli.session_ttl_secs),
                idle: Duration::from_secs(cli.idle_timeout_secs),
                idle_refresh: Duration::from_secs(cli.idle_refresh_secs),
                cookie_secure: cli.cookie_secure,
                trusted_proxies,
            },
            ws: WsLimits {
                max_frame: cli.max_frame_bytes,
                rate: cli.ws_rate,
                burst: cli.ws_burst,
                ping_interval: Duration::from_millis(cli.ping_interval_ms),
                pong_timeout: Duration::from_millis(cli.pong_timeout_ms),
            },
            conn_limits: ConnLimits {
                per_session: cli.max_sockets_per_session,
                per_user: cli.max_sockets_per_user,
                sessions_per_user: cli.max_sessions_per_user,
            },
            history: Some(HistoryConfig {
                size: cli.history_size,
                ttl: Duration::from_secs(cli.history_ttl_secs),
                meta_ttl: Duration::from_secs(cli.history_meta_ttl_secs),
            })
            .filter(HistoryConfig::is_on)
            .unwrap_or(HistoryConfig::OFF),
            request_timeout: Duration::from_millis(cli.request_timeout_ms),
            max_message_bytes: cli.max_message_bytes,
            lease: LeaseConfig {
                ttl: Duration::from_millis(cli.lease_ttl_ms),
                heartbeat: Duration::from_millis(cli.heartbeat_ms),
                reap_interval: Duration::from_millis(cli.reap_interval_ms),
            },
            revalidate_interval: Duration::from_millis(cli.revalidate_ms),
            workers: match cli.workers {
                Some(0) => {
                    return Err(bad("SESSIONHUB_WORKERS (--workers)", "must be at least 1"));
                }
                Some(n) => n,
                None => {
                    default_workers(std::thread::available_parallelism().map_or(1, usize::from))
                }
            },
            sched_batch: cli.sched_batch,
            listen: cli.listen,
            redis,
            redis_tls,
            node_id,
            api_key,
            allowed_origins,
            demo: cli.demo.unwrap_or(embedded),
            admin,
            key_prefix: cli.key_prefix,
            redis_connect_timeout: Duration::from_secs(cli.redis_connect_timeout),
            json_logs: cli.log_format == "json",
        })
    }
}

/// The webhook settings: URL and secret together, an http(s) URL, a long enough
/// secret, Redis (the embedded engine keeps no event stream), events on, and a
/// claim bound that leaves a retrying node time to touch its batch.
fn webhook_config(cli: &Cli, embedded: bool) -> Result<Option<WebhookConfig>, ConfigError> {
    const URL: &str = "SESSIONHUB_WEBHOOK_URL (--webhook-url)";
    const SECRET: &str = "SESSIONHUB_WEBHOOK_SECRET (--webhook-secret)";
    let url = cli.webhook_url.as_deref().filter(|u| !u.is_empty());
    let secret = cli.webhook_secret.as_deref().filter(|s| !s.is_empty());
    let (url, secret) = match (url, secret) {
        (None, None) => return Ok(None),
        (None, Some(_)) => return Err(bad(SECRET, "is set but SESSIONHUB_WEBHOOK_URL is not")),
        (Some(_), None) => return Err(bad(URL, "needs SESSIONHUB_WEBHOOK_SECRET as well")),
        (Some(u), Some(s)) => (u, s),
    };
    if secret.chars().count() < MIN_SECRET_LEN {
        return Err(bad(
            SECRET,
            format!("must be at least {MIN_SECRET_LEN} characters"),
        ));
    }
    let parsed = reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| bad(URL, "must be an http:// or https:// URL"))?;
    if embedded {
        return Err(bad(
            URL,
            "needs Redis (SESSIONHUB_REDIS_URL or SESSIONHUB_REDIS_CLUSTER): the embedded \
             engine keeps no event stream",
        ));
    }
    if cli.events_maxlen == 0 {
        return Err(bad(
            "SESSIONHUB_EVENTS_MAXLEN (--events-maxlen)",
            "must be above 0 when SESSIONHUB_WEBHOOK_URL is set",
        ));
    }
    if cli.webhook_claim_ms < 2 * cli.webhook_timeout_ms {
        return Err(bad(
            "SESSIONHUB_WEBHOOK_CLAIM_MS (--webhook-claim-ms)",
            "must be at least twice SESSIONHUB_WEBHOOK_TIMEOUT_MS",
        ));
    }
    Ok(Some(WebhookConfig {
        url: parsed,
        secret: WebhookSecret::new(secret.to_owned()),
        timeout: Duration::from_millis(cli.webhook_timeout_ms),
        max_age: Duration::from_secs(cli.webhook_max_age_secs),
        claim_idle: Duration::from_millis(cli.webhook_claim_ms),
        batch: cli.webhook_batch as usize,
        max_in_flight: cli.webhook_max_in_flight as usize,
    }))
}

/// With sentinels (and their master's name) the topology is Redis Sentinel, and
/// neither a Redis URL nor a cluster may be set; `direct` is the topology from those.
fn sentinel_topology(
    sentinels: &[String],
    master: Option<&str>,
    direct: Option<Topology>,
) -> Result<Option<Topology>, ConfigError> {
    const SENTINELS: &str = "SESSIONHUB_REDIS_SENTINELS (--redis-sentinels)";
    const MASTER: &str = "SESSIONHUB_REDIS_SENTINEL_MASTER (--redis-sentinel-master)";
    let sentinels: Vec<String> = sentinels
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let master = master.map(str::trim).filter(|m| !m.is_empty());
    match (sentinels.is_empty(), master) {
        (true, None) => return Ok(direct),
        (true, Some(_)) => return Err(bad(MASTER, "is set but SESSIONHUB_REDIS_SENTINELS is not")),
        (false, None) => {
            return Err(bad(
                SENTINELS,
                "needs SESSIONHUB_REDIS_SENTINEL_MASTER (the master's name in `sentinel monitor`)",
            ));
        }
        (false, Some(_)) => {}
    }
    if direct.is_some() {
        return Err(bad(
            SENTINELS,
            "set one of SESSIONHUB_REDIS_URL (one Redis), SESSIONHUB_REDIS_CLUSTER (Redis \
             Cluster) or SESSIONHUB_REDIS_SENTINELS (Redis Sentinel), not several",
        ));
    }
    for url in &sentinels {
        check_redis_url(SENTINELS, url, false)?;
    }
    Ok(Some(Topology::Sentinel {
        sentinels,
        master: master.unwrap_or_default().to_owned(),
    }))
}

/// Checks one Redis URL: `redis://` or `rediss://` (or, for one Redis, `unix://`).
fn check_redis_url(setting: &'static str, url: &str, unix_ok: bool) -> Result<(), ConfigError> {
    let schemes: &[&str] = if unix_ok {
        &["redis://", TLS_SCHEME, "unix://", "redis+unix://"]
    } else {
        &["redis://", TLS_SCHEME]
    };
    if schemes.iter().any(|s| url.starts_with(s)) {
        return Ok(());
    }
    Err(bad(
        setting,
        format!(
            "{:?} must start with {}",
            sessionhub_redis::redact_url(url),
            if unix_ok {
                "redis://, rediss:// or unix://"
            } else {
                "redis:// or rediss://"
            }
        ),
    ))
}

/// The TLS files: read now (an unreadable file stops the node here), a client
/// certificate only with its key, and only for `rediss://` URLs (a CA file next to
/// plain `redis://` would be silently unused).
fn redis_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    topology: Option<&Topology>,
) -> Result<RedisTls, ConfigError> {
    const CA: &str = "SESSIONHUB_REDIS_CA_FILE (--redis-ca-file)";
    const CERT: &str = "SESSIONHUB_REDIS_CLIENT_CERT_FILE (--redis-client-cert-file)";
    const KEY: &str = "SESSIONHUB_REDIS_CLIENT_KEY_FILE (--redis-client-key-file)";
    let set = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
    let (ca, cert, key) = (set(ca), set(cert), set(key));
    let client = match (&cert, &key) {
        (None, None) => None,
        (Some(_), None) => return Err(bad(CERT, "needs SESSIONHUB_REDIS_CLIENT_KEY_FILE as well")),
        (None, Some(_)) => {
            return Err(bad(
                KEY,
                "is set but SESSIONHUB_REDIS_CLIENT_CERT_FILE is not",
            ));
        }
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
    };
    let first = if ca.is_some() { CA } else { CERT };
    if ca.is_none() && client.is_none() {
        return Ok(RedisTls::default());
    }
    if !topology.is_some_and(Topology::uses_tls) {
        return Err(bad(first, "is set but no Redis URL is rediss://"));
    }
    RedisTls::load(ca.as_deref(), client).map_err(|e| {
        let setting = match &e {
            sessionhub_redis::TlsError::Unreadable { path, .. }
            | sessionhub_redis::TlsError::NoCertificate { path }
                if ca.as_ref() == Some(path) =>
            {
                CA
            }
            sessionhub_redis::TlsError::NoKey { .. } => KEY,
            sessionhub_redis::TlsError::Unreadable { path, .. } if key.as_ref() == Some(path) => {
                KEY
            }
            _ => CERT,
        };
        bad(setting, e.to_string())
    })
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
    fn unknown_settings_are_named_with_the_closest_known_one() {
        let vars = |names: &[&str]| -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
            names.iter().map(|n| ((*n).into(), "x".into())).collect()
        };
        assert!(check_environment(vars(&["SESSIONHUB_REDIS_URL", "PATH", "HOME"])).is_ok());
        // Kubernetes' service links for a Service named sessionhub.
        let links = [
            "SESSIONHUB_SERVICE_HOST",
            "SESSIONHUB_SERVICE_PORT",
            "SESSIONHUB_PORT",
            "SESSIONHUB_PORT_80_TCP_ADDR",
        ];
        assert!(check_environment(vars(&links)).is_ok());
        let e = check_environment(vars(&["SESSIONHUB_REDIS_ULR"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown setting SESSIONHUB_REDIS_ULR (did you mean SESSIONHUB_REDIS_URL?)"
        );
        let e = check_environment(vars(&["SESSIONHUB_FLUX_CAPACITOR"])).unwrap_err();
        assert_eq!(e.to_string(), "unknown setting SESSIONHUB_FLUX_CAPACITOR");
    }

    #[test]
    fn a_pong_timeout_within_the_ping_interval_names_both_values() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.ws.ping_interval, Duration::from_secs(25));
        assert!(c.ws.pong_timeout > c.ws.ping_interval);
        // The interval is the default here: the message says what it is.
        assert_eq!(
            parse(&["--pong-timeout-ms", "21000"]).unwrap_err(),
            "invalid SESSIONHUB_PONG_TIMEOUT_MS (--pong-timeout-ms): 21000 ms must be longer \
             than SESSIONHUB_PING_INTERVAL_MS (25000 ms)"
        );
        let c = parse(&["--pong-timeout-ms", "21000", "--ping-interval-ms", "20000"]).unwrap();
        assert_eq!(c.ws.pong_timeout, Duration::from_millis(21_000));
    }

    #[test]
    fn booleans_take_the_usual_spellings() {
        for (v, want) in [
            ("1", true),
            ("0", false),
            ("yes", true),
            ("no", false),
            ("on", true),
            ("off", false),
            ("true", true),
            ("false", false),
        ] {
            let c = parse(&[&format!("--demo={v}"), &format!("--cookie-secure={v}")]).unwrap();
            assert_eq!((c.demo, c.sessions.cookie_secure), (want, want), "{v}");
        }
        assert!(parse(&["--demo=maybe"]).is_err());
        let c = parse(&["--demo", "--cookie-secure"]).unwrap();
        assert!(c.demo && c.sessions.cookie_secure);
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.key_prefix, "sh:");
        assert!(c.redis.is_none() && c.api_key.is_none());
    }

    #[test]
    fn workers_default_to_one_per_cpu_but_one() {
        assert_eq!(default_workers(1), 1);
        assert_eq!(default_workers(2), 1);
        assert_eq!(default_workers(8), 7);
        assert_eq!(parse(&["--workers", "3"]).unwrap().workers, 3);
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

    #[test]
    fn webhook_settings_are_checked_together() {
        const SECRET: &str = "0123456789abcdef";
        let redis = ["--redis-url", "redis://127.0.0.1:6379"];
        let with = |extra: &[&str]| {
            let mut args = redis.to_vec();
            args.extend_from_slice(extra);
            parse(&args)
        };
        let ok = with(&[
            "--webhook-url",
            "https://hooks.example/x?k=v",
            "--webhook-secret",
            SECRET,
        ])
        .unwrap();
        let w = ok.webhook.as_ref().unwrap();
        assert_eq!(w.shown_url(), "https://hooks.example");
        let shown = format!("{ok:?} {w:?}");
        assert!(!shown.contains(SECRET) && !shown.contains("k=v"), "{shown}");
        assert!(with(&[]).unwrap().webhook.is_none());
        for (args, needle) in [
            (
                vec!["--webhook-url", "ftp://h/x", "--webhook-secret", SECRET],
                "http",
            ),
            (
                vec!["--webhook-url", "not a url", "--webhook-secret", SECRET],
                "http",
            ),
            (
                vec!["--webhook-url", "https://h/x", "--webhook-secret", "short"],
                "16",
            ),
            (
                vec!["--webhook-secret", SECRET],
                "SESSIONHUB_WEBHOOK_URL is not",
            ),
            (
                vec!["--webhook-url", "https://h/x"],
                "needs SESSIONHUB_WEBHOOK_SECRET",
            ),
            (
                vec![
                    "--webhook-url",
                    "https://h/x",
                    "--webhook-secret",
                    SECRET,
                    "--events-maxlen",
                    "0",
                ],
                "SESSIONHUB_EVENTS_MAXLEN",
            ),
            (
                vec![
                    "--webhook-url",
                    "https://h/x",
                    "--webhook-secret",
                    SECRET,
                    "--webhook-timeout-ms",
                    "5000",
                    "--webhook-claim-ms",
                    "6000",
                ],
                "SESSIONHUB_WEBHOOK_CLAIM_MS",
            ),
        ] {
            let err = with(&args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains(SECRET), "{err}");
        }
        let embedded = parse(&["--webhook-url", "https://h/x", "--webhook-secret", SECRET]);
        assert!(embedded.unwrap_err().contains("needs Redis"));
    }

    /// The `SESSIONHUB_*` names in `text` (upper-case letters, digits, `_`).
    fn env_names(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for (at, _) in text.match_indices(ENV_PREFIX) {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            out.insert(name.trim_end_matches('_').to_owned());
        }
        out
    }

    fn repo_file(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        std::fs::read_to_string(root.join(path)).unwrap()
    }

    /// The README's settings table names every setting and nothing else, and every
    /// variable the shipped deployments set is a setting: a node refuses one it does
    /// not know, so a typo there would stop every node of that deployment.
    #[test]
    fn the_readme_and_the_shipped_deployments_name_exactly_the_settings() {
        let known: std::collections::BTreeSet<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        let readme = repo_file("README.md");
        let table: String = readme
            .lines()
            .filter(|l| l.starts_with("| `SESSIONHUB_"))
            .map(|l| l.split(" | ").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            env_names(&table),
            known,
            "README's settings table against Cli"
        );
        for file in ["docker-compose.yml", "deploy/k8s/sessionhub.yaml"] {
            let text = repo_file(file);
            // Only what the file sets: YAML keys and `name:` entries, not comments.
            let set: String = text
                .lines()
                .map(str::trim_start)
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n");
            let names = env_names(&set);
            assert!(!names.is_empty(), "{file} sets no SESSIONHUB_ variable");
            let vars = names.iter().map(|n| (n.into(), "x".into()));
            if let Err(e) = check_environment(vars) {
                panic!("{file}: {e}");
            }
        }
    }
}
