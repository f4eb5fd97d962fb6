//! Session lifecycle: every session is created and ended through here, whoever
//! asks (the service API, the session's own cookie calls, a socket's `kill_session`
//! frame, the demo login, the expiry sweep), so each change is validated, timed,
//! counted in the metrics and logged in one place.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use sessionhub_core::model::{MAX_SESSION_TTL, MAX_USER_AGENT_LEN};
use sessionhub_core::{CreatedSession, EndReason, EngineError, NewSession, SessionId, UserId};

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::state::AppState;

/// Body of `POST /api/v1/sessions`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// Owner.
    pub user_id: String,
    /// Device user agent.
    pub user_agent: Option<String>,
    /// Device address.
    pub ip: Option<String>,
    /// Absolute lifetime (default `SESSIONHUB_SESSION_TTL_SECS`).
    pub ttl_secs: Option<u64>,
    /// Idle timeout (default `SESSIONHUB_IDLE_TIMEOUT_SECS`).
    pub idle_timeout_secs: Option<u64>,
}

/// A user id from a request; a malformed one is a bad request.
pub fn parse_uid(s: &str) -> Result<UserId, ApiError> {
    UserId::parse(s).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Validates what a caller asks for and fills in the configured defaults.
pub fn new_session(config: &Config, req: CreateSession) -> Result<NewSession, ApiError> {
    let user_id = parse_uid(&req.user_id)?;
    let max = MAX_SESSION_TTL.as_secs();
    let secs = |v: Option<u64>, default: Duration, name: &str| match v {
        None => Ok(default),
        Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
        Some(_) => Err(ApiError::BadRequest(format!(
            "{name} must be between 1 and {max}"
        ))),
    };
    let policy = &config.sessions;
    let ttl = secs(req.ttl_secs, policy.ttl, "ttl_secs")?;
    let idle = secs(req.idle_timeout_secs, policy.idle, "idle_timeout_secs")?;
    let user_agent = req.user_agent.filter(|s| !s.is_empty());
    if let Some(ua) = &user_agent
        && (ua.len() > MAX_USER_AGENT_LEN || ua.chars().any(char::is_control))
    {
        return Err(ApiError::BadRequest(format!(
            "user_agent must be at most {MAX_USER_AGENT_LEN} bytes without control characters"
        )));
    }
    let ip = match req.ip.filter(|s| !s.is_empty()) {
        None => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| ApiError::BadRequest(format!("ip {ip:?} is not an IP address")))?
                .to_string(),
        ),
    };
    Ok(NewSession {
        user_id,
        user_agent,
        ip,
        ttl,
        idle,
    })
}

/// Kills a session, timing it and counting it.
pub async fn kill(
    state: &AppState,
    sid: &SessionId,
    owner: Option<&UserId>,
    reason: EndReason,
) -> Result<bool, EngineError> {
    let started = std::time::Instant::now();
    let killed = state.engine.kill_session(sid, owner, reason).await?;
    state.metrics.kill_latency.observe(started.elapsed());
    if killed {
        state.metrics.ended(reason, 1);
        // This node's own sockets of the session close now, not after the engine's
        // event has come back to it; the event then finds them gone (closing is
        // idempotent). Only after the kill is stored: a failed kill closes nothing.
        state.hub.end_session(sid, reason);
    }
    Ok(killed)
}

/// Creates a session (which tells the user's other sessions) and logs it.
pub async fn create(state: &AppState, new: NewSession) -> Result<CreatedSession, ApiError> {
    let created = state.engine.create_session(new).await?;
    Metrics::inc(&state.metrics.sessions_created);
    let s = &created.session;
    tracing::info!(session_id = %s.session_id, user_id = %s.user_id, "session created");
    Ok(created)
}

/// Ends every session of a user but `except`, counting them.
pub async fn kill_user(
    state: &AppState,
    user: &UserId,
    except: Option<&SessionId>,
    reason: EndReason,
) -> Result<u64, EngineError> {
    let killed = state
        .engine
        .kill_user_sessions(user, except, reason)
        .await?;
    state.metrics.ended(reason, killed);
    Ok(killed)
}

/// Ends the sessions whose lifetime ran out (in every bucket), counting them.
pub async fn expire_due(state: &AppState) -> Result<u64, EngineError> {
    let n = state.engine.expire_due().await?;
    if n > 0 {
        state.metrics.ended(EndReason::Expired, n);
        tracing::info!(sessions = n, "expired sessions ended");
    }
    Ok(n)
}
