//! The Redis engine: sessions and connections in Redis hashes, events between nodes
//! over Redis pub/sub.
//!
//! Every state change is one Lua script from the repository's `lua/` folder (the same
//! files operators run with `redis-cli --eval`), so a change is atomic and its events
//! are published in the same step: a script that ends a session also tells exactly
//! the nodes that hold its sockets, found from the connection records. Each node
//! subscribes to one channel of its own, `<prefix>node:<node_id>`; see [`keys`].

pub mod keys;
mod subscriber;
mod wire;

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::{RedisError, Script};
use sessionhub_core::time::now_ms;
use sessionhub_core::{
    ConnectionId, ConnectionInfo, CreatedSession, EndReason, Engine, EngineError, EventSender,
    NewSession, NodeId, SecretHash, Session, SessionId, Token, UserId,
};
use tokio_util::sync::CancellationToken;

pub use keys::Keys;

/// Default time a start-up waits for Redis before giving up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on one Redis operation (including waiting for a pooled connection).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of pooled command connections per node.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// The Lua scripts, loaded from the repository's `lua/` folder at compile time.
struct Scripts {
    create_session: Script,
    register_connection: Script,
    kill_session: Script,
    kill_user_sessions: Script,
    user_sessions: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    create_session: Script::new(include_str!("../../../lua/create_session.lua")),
    register_connection: Script::new(include_str!("../../../lua/register_connection.lua")),
    kill_session: Script::new(include_str!("../../../lua/kill_session.lua")),
    kill_user_sessions: Script::new(include_str!("../../../lua/kill_user_sessions.lua")),
    user_sessions: Script::new(include_str!("../../../lua/user_sessions.lua")),
});

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` or `unix://` URL.
    pub url: String,
    /// Prefix of every key and channel (default `sh:`).
    pub key_prefix: String,
    /// How long start-up keeps retrying an unreachable Redis.
    pub connect_timeout: Duration,
    /// Bound on one operation.
    pub command_timeout: Duration,
    /// Pooled command connections.
    pub pool_size: usize,
}

impl RedisConfig {
    /// A config with defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "sh:".into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            pool_size: DEFAULT_POOL_SIZE,
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

/// One node's handle on the shared Redis state. Dropping it stops its subscriber.
pub struct RedisEngine {
    pool: Pool,
    keys: Keys,
    node_id: NodeId,
    command_timeout: Duration,
    stop: CancellationToken,
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

fn from_redis(e: RedisError) -> EngineError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        EngineError::Unavailable(e.to_string())
    } else {
        EngineError::Corrupt(e.to_string())
    }
}

fn corrupt(e: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt(e.to_string())
}

impl RedisEngine {
    /// Connects, retrying for up to `config.connect_timeout`, and subscribes to this
    /// node's channel before returning, so the node is reachable as soon as it
    /// serves. Events go to `events`.
    pub async fn connect(
        config: RedisConfig,
        node_id: NodeId,
        events: EventSender,
    ) -> Result<Self, ConnectError> {
        let shown = redact_url(&config.url);
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| ConnectError::InvalidUrl {
                url: shown.clone(),
                reason: e.to_string(),
            })?;
        let mut pool_cfg = deadpool_redis::Config::from_url(config.url.clone());
        pool_cfg.pool = Some(PoolConfig {
            max_size: config.pool_size,
            timeouts: Timeouts {
                wait: Some(config.command_timeout),
                create: Some(config.command_timeout),
                recycle: Some(config.command_timeout),
            },
            ..PoolConfig::default()
        });
        let pool =
            pool_cfg
                .create_pool(Some(Runtime::Tokio1))
                .map_err(|e| ConnectError::InvalidUrl {
                    url: shown.clone(),
                    reason: e.to_string(),
                })?;
        let engine = Self {
            pool,
            keys: Keys::new(config.key_prefix),
            node_id,
            command_timeout: config.command_timeout,
            stop: CancellationToken::new(),
        };

        let started = tokio::time::Instant::now();
        let deadline = started + config.connect_timeout;
        let unreachable = |reason: String| ConnectError::Unreachable {
            url: shown.clone(),
            waited: started.elapsed(),
            reason,
        };
        let mut delay = Duration::from_millis(100);
        loop {
            let err = match engine.ping().await {
                Ok(()) => break,
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(unreachable(err.to_string()));
            }
            tracing::warn!(redis = %shown, error = %err, "Redis not reachable yet; retrying");
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }

        let channel = engine.keys.node_channel(&engine.node_id);
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ready = subscriber::spawn(client, channel, events, engine.stop.clone());
        match tokio::time::timeout(remaining.max(config.command_timeout), ready).await {
            Ok(Ok(())) => Ok(engine),
            Ok(Err(_)) => Err(unreachable("subscriber stopped".into())),
            Err(_) => Err(unreachable(
                "could not subscribe to the node channel".into(),
            )),
        }
    }

    /// The key layout in use.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs one Redis operation on a pooled connection, bounded by the command
    /// timeout.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, EngineError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let work = async {
            let conn = self.pool.get().await.map_err(unavailable)?;
            op(conn).await.map_err(from_redis)
        };
        tokio::time::timeout(self.command_timeout, work)
            .await
            .map_err(|_| EngineError::Unavailable("Redis did not answer in time".into()))?
    }

    fn session_from_fields(
        sid: &SessionId,
        user_id: String,
        user_agent: String,
        ip: String,
        created_at: &str,
        last_seen_at: &str,
        expires_at: &str,
    ) -> Result<Session, EngineError> {
        Ok(Session {
            session_id: sid.clone(),
            user_id: UserId::parse(&user_id).map_err(corrupt)?,
            user_agent: wire::non_empty(user_agent),
            ip: wire::non_empty(ip),
            created_at: wire::ms(created_at).map_err(corrupt)?,
            last_seen_at: wire::ms(last_seen_at).map_err(corrupt)?,
            expires_at: wire::ms(expires_at).map_err(corrupt)?,
            connections: Vec::new(),
        })
    }
}

/// Parses a connections hash (`connection_id` → `<node_id>|<connected_at>`),
/// sorted by connection time.
fn parse_conns(pairs: Vec<(String, String)>) -> Result<Vec<ConnectionInfo>, EngineError> {
    let mut out = pairs
        .into_iter()
        .map(|(cid, v)| {
            let (node, at) = v
                .split_once('|')
                .ok_or_else(|| corrupt(format!("bad connection record {v:?}")))?;
            Ok(ConnectionInfo {
                connection_id: ConnectionId::parse(&cid).map_err(corrupt)?,
                node_id: NodeId::parse(node).map_err(corrupt)?,
                connected_at: wire::ms(at).map_err(corrupt)?,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    out.sort_by_key(|c| c.connected_at);
    Ok(out)
}

fn field(map: &mut std::collections::HashMap<String, String>, name: &str) -> String {
    map.remove(name).unwrap_or_default()
}

#[async_trait]
impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    async fn ping(&self) -> Result<(), EngineError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(drop)
    }

    async fn create_session(&self, new: NewSession) -> Result<CreatedSession, EngineError> {
        let now = now_ms();
        let expires_at = now + new.ttl.as_millis() as i64;
        let user_agent = new.user_agent.clone().unwrap_or_default();
        let ip = new.ip.clone().unwrap_or_default();
        // A session id is 96 random bits under the user's tag; a collision is
        // astronomically unlikely, but the script refuses one rather than overwrite.
        for _ in 0..3 {
            let token = Token::generate(&new.user_id);
            let sid = token.session_id().clone();
            let res = self
                .run(|mut c| {
                    let mut inv = SCRIPTS.create_session.key(self.keys.session(&sid));
                    inv.key(self.keys.user_sessions(&new.user_id))
                        .arg(new.user_id.as_str())
                        .arg(token.secret_hash().as_str())
                        .arg(&user_agent)
                        .arg(&ip)
                        .arg(now)
                        .arg(expires_at);
                    async move { inv.invoke_async::<i64>(&mut c).await }
                })
                .await;
            match res {
                Ok(_) => {
                    let session = Session {
                        session_id: sid,
                        user_id: new.user_id.clone(),
                        user_agent: new.user_agent.clone(),
                        ip: new.ip.clone(),
                        created_at: now,
                        last_seen_at: now,
                        expires_at,
                        connections: Vec::new(),
                    };
                    return Ok(CreatedSession { session, token });
                }
                Err(EngineError::Corrupt(msg)) if msg.contains("EXISTS") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::Corrupt(
            "could not find a free session id".into(),
        ))
    }

    async fn authenticate(&self, token: &Token) -> Result<Option<Session>, EngineError> {
        let sid = token.session_id();
        let key = self.keys.session(sid);
        let mut map: std::collections::HashMap<String, String> = self
            .run(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        let Some(stored) = map.remove("secret_hash") else {
            return Ok(None);
        };
        if !SecretHash::from_stored(stored).ct_eq(&token.secret_hash()) {
            return Ok(None);
        }
        let session = Self::session_from_fields(
            sid,
            field(&mut map, "user_id"),
            field(&mut map, "user_agent"),
            field(&mut map, "ip"),
            &field(&mut map, "created_at"),
            &field(&mut map, "last_seen_at"),
            &field(&mut map, "expires_at"),
        )?;
        Ok((session.expires_at > now_ms()).then_some(session))
    }

    async fn get_session(&self, session_id: &SessionId) -> Result<Option<Session>, EngineError> {
        let (key, conns_key) = (self.keys.session(session_id), self.keys.conns(session_id));
        type Reply = (
            std::collections::HashMap<String, String>,
            Vec<(String, String)>,
        );
        let (mut map, conns): Reply = self
            .run(|mut c| async move {
                redis::pipe()
                    .hgetall(key)
                    .hgetall(conns_key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        let mut session = Self::session_from_fields(
            session_id,
            field(&mut map, "user_id"),
            field(&mut map, "user_agent"),
            field(&mut map, "ip"),
            &field(&mut map, "created_at"),
            &field(&mut map, "last_seen_at"),
            &field(&mut map, "expires_at"),
        )?;
        session.connections = parse_conns(conns)?;
        Ok(Some(session))
    }

    async fn user_sessions(&self, user_id: &UserId) -> Result<Vec<Session>, EngineError> {
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            Vec<(String, String)>,
        );
        let key = self.keys.user_sessions(user_id);
        let rows: Vec<Row> = self
            .run(|mut c| {
                let inv = SCRIPTS.user_sessions.key(key);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        let mut out = rows
            .into_iter()
            .map(|(sid, ua, ip, created, seen, expires, conns)| {
                let sid = SessionId::parse(&sid).map_err(corrupt)?;
                let mut s = Self::session_from_fields(
                    &sid,
                    user_id.to_string(),
                    ua,
                    ip,
                    &created,
                    &seen,
                    &expires,
                )?;
                s.connections = parse_conns(conns)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        out.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(out)
    }

    async fn kill_session(
        &self,
        session_id: &SessionId,
        owner: Option<&UserId>,
        reason: EndReason,
    ) -> Result<bool, EngineError> {
        let key = self.keys.session(session_id);
        let owner = owner.map(UserId::as_str).unwrap_or("");
        let n: i64 = self
            .run(|mut c| {
                let mut inv = SCRIPTS.kill_session.key(key);
                inv.arg(reason.as_str()).arg(owner);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(n > 0)
    }

    async fn kill_user_sessions(
        &self,
        user_id: &UserId,
        except: Option<&SessionId>,
        reason: EndReason,
    ) -> Result<u64, EngineError> {
        let key = self.keys.user_sessions(user_id);
        let keep = except.map(SessionId::as_str).unwrap_or("");
        let n: i64 = self
            .run(|mut c| {
                let mut inv = SCRIPTS.kill_user_sessions.key(key);
                inv.arg(reason.as_str()).arg(keep);
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn register_connection(
        &self,
        token: &Token,
        connection_id: &ConnectionId,
    ) -> Result<Option<Session>, EngineError> {
        let sid = token.session_id();
        type Reply = Option<(String, String, String, String, String, String)>;
        let reply: Reply = self
            .run(|mut c| {
                let mut inv = SCRIPTS.register_connection.key(self.keys.session(sid));
                inv.key(self.keys.conns(sid))
                    .arg(token.secret_hash().as_str())
                    .arg(connection_id.as_str())
                    .arg(self.node_id.as_str())
                    .arg(now_ms());
                async move { inv.invoke_async(&mut c).await }
            })
            .await?;
        reply
            .map(|(uid, ua, ip, created, seen, expires)| {
                Self::session_from_fields(sid, uid, ua, ip, &created, &seen, &expires)
            })
            .transpose()
    }

    async fn unregister_connection(
        &self,
        session_id: &SessionId,
        connection_id: &ConnectionId,
    ) -> Result<(), EngineError> {
        let key = self.keys.conns(session_id);
        let cid = connection_id.to_string();
        self.run(|mut c| async move {
            redis::cmd("HDEL")
                .arg(key)
                .arg(cid)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
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
