//! The HTTP API: service calls (API key) and self-service calls (session cookie).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use sessionhub_core::time::rfc3339;
use sessionhub_core::{EndReason, Session, SessionId, UserId};

use crate::auth::{CookieSession, ServiceAuth, removal_cookies};
use crate::error::ApiError;
use crate::lifecycle::{self, CreateSession, create, kill, new_session};
use crate::state::AppState;

/// Registers every API route.
///
/// A path with several methods is one resource, and the group routes sit in their
/// own scope, so a request is tried against fewer patterns: a kill
/// (`DELETE /sessions/{id}`) against one with a `{segment}` instead of five (each
/// was a regex run before the vendored actix-router; BENCHMARKS.md, "A kill request
/// without regexes"). A method a path does not have answers 404, as before.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .configure(crate::messaging::routes)
            .route("/nodes", web::get().to(nodes))
            .route("/metrics", web::get().to(service_metrics))
            .route("/sessions", web::post().to(create_session))
            .service(
                resource("/sessions/{session_id}")
                    .route(web::get().to(get_session))
                    .route(web::delete().to(kill_session)),
            )
            .service(
                resource("/users/{user_id}/sessions")
                    .route(web::get().to(user_sessions))
                    .route(web::delete().to(kill_user_sessions)),
            )
            .route("/me", web::get().to(me))
            .service(
                resource("/me/sessions")
                    .route(web::get().to(my_sessions))
                    .route(web::delete().to(kill_my_other_sessions)),
            )
            .route(
                "/me/sessions/{session_id}",
                web::delete().to(kill_my_session),
            )
            .route("/me/logout", web::post().to(logout)),
    );
}

/// A resource for a path with several methods; a method it does not have is not
/// found (404, as for any unknown route) rather than actix's bare 405.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async {
        Err::<HttpResponse, _>(ApiError::NotFound)
    }))
}

#[derive(Serialize)]
struct Created<'a> {
    session_id: &'a SessionId,
    user_id: &'a UserId,
    token: String,
    created_at: String,
    expires_at: String,
}

#[derive(Serialize)]
struct Killed {
    killed: u64,
}

/// An unknown or malformed id is simply not found.
fn parse_sid(s: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(s).map_err(|_| ApiError::NotFound)
}

fn parse_uid(s: &str) -> Result<UserId, ApiError> {
    lifecycle::parse_uid(s)
}

/// `GET /api/v1/nodes`: every node with a lease (live, or dead and not yet reaped),
/// its lease and its last announced status, with times made relative to now.
/// `/metrics` through the service API, with the key: for the admin console behind a
/// load balancer that keeps the nodes' own `/metrics` private.
async fn service_metrics(_: ServiceAuth, state: web::Data<AppState>) -> HttpResponse {
    crate::app::metrics(state).await
}

async fn nodes(_: ServiceAuth, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let now = sessionhub_core::time::now_ms();
    let nodes = state.engine.nodes().await?;
    let out: Vec<serde_json::Value> = nodes
        .into_iter()
        .map(|n| {
            let lease_left = n.lease_expires_at.map(|e| e - now);
            serde_json::json!({
                "node_id": n.node_id,
                "alive": lease_left.is_none_or(|l| l > 0),
                "lease_expires_at": n.lease_expires_at.map(sessionhub_core::time::rfc3339),
                "lease_ms_left": lease_left,
                "address": n.status.as_ref().map(|s| s.address.clone()),
                "sockets": n.status.as_ref().map(|s| s.sockets),
                "ready": n.status.as_ref().map(|s| s.ready),
                "status_age_ms": n.status.as_ref().map(|s| now - s.at),
                "status_at": n.status.as_ref().map(|s| s.at),
                "counters": n.status.as_ref().map(|s| s.counters),
                "this_node": &n.node_id == state.engine.node_id(),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "nodes": out })))
}

async fn create_session(
    _: ServiceAuth,
    state: web::Data<AppState>,
    body: web::Json<CreateSession>,
) -> Result<HttpResponse, ApiError> {
    let new = new_session(&state.config, body.into_inner())?;
    let created = create(&state, new).await?;
    let s = &created.session;
    Ok(HttpResponse::Created().json(Created {
        session_id: &s.session_id,
        user_id: &s.user_id,
        token: created.token.expose(),
        created_at: rfc3339(s.created_at),
        expires_at: rfc3339(s.expires_at),
    }))
}

async fn get_session(
    _: ServiceAuth,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let sid = parse_sid(&path)?;
    let session = state
        .engine
        .get_session(&sid)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(HttpResponse::Ok().json(session))
}

async fn kill_session(
    _: ServiceAuth,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let sid = parse_sid(&path)?;
    if !kill(&state, &sid, None, EndReason::Killed).await? {
        return Err(ApiError::NotFound);
    }
    tracing::info!(session_id = %sid, "session killed by the application");
    Ok(HttpResponse::NoContent().finish())
}

async fn user_sessions(
    _: ServiceAuth,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let uid = parse_uid(&path)?;
    Ok(HttpResponse::Ok().json(state.engine.user_sessions(&uid).await?))
}

async fn kill_user_sessions(
    _: ServiceAuth,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let uid = parse_uid(&path)?;
    let killed = lifecycle::kill_user(&state, &uid, None, EndReason::Killed).await?;
    tracing::info!(user_id = %uid, killed, "user's sessions killed by the application");
    Ok(HttpResponse::Ok().json(Killed { killed }))
}

#[derive(Serialize)]
struct Me<'a> {
    user_id: &'a UserId,
    session_id: &'a SessionId,
    expires_at: String,
}

/// `GET /api/v1/me`; also the target of nginx `auth_request`, hence the headers.
async fn me(caller: CookieSession) -> HttpResponse {
    let s = &caller.session;
    HttpResponse::Ok()
        .insert_header(("X-Sessionhub-User", s.user_id.as_str()))
        .insert_header(("X-Sessionhub-Session", s.session_id.as_str()))
        .insert_header(("Cache-Control", "no-store"))
        .json(Me {
            user_id: &s.user_id,
            session_id: &s.session_id,
            expires_at: rfc3339(s.expires_at),
        })
}

#[derive(Serialize)]
struct MySession<'a> {
    #[serde(flatten)]
    session: &'a Session,
    current: bool,
}

async fn my_sessions(
    caller: CookieSession,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let sessions = state.engine.user_sessions(&caller.session.user_id).await?;
    let out: Vec<MySession<'_>> = sessions
        .iter()
        .map(|s| MySession {
            session: s,
            current: s.session_id == caller.session.session_id,
        })
        .collect();
    Ok(HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(out))
}

async fn kill_my_session(
    caller: CookieSession,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let sid = parse_sid(&path)?;
    let user = &caller.session.user_id;
    // Another user's session is "not found", exactly like an unknown id.
    if !kill(&state, &sid, Some(user), EndReason::Killed).await? {
        return Err(ApiError::NotFound);
    }
    tracing::info!(session_id = %sid, by = %caller.session.session_id, "session killed by its user");
    Ok(HttpResponse::NoContent().finish())
}

async fn kill_my_other_sessions(
    caller: CookieSession,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let s = &caller.session;
    let killed =
        lifecycle::kill_user(&state, &s.user_id, Some(&s.session_id), EndReason::Killed).await?;
    tracing::info!(by = %s.session_id, killed, "user signed out their other sessions");
    Ok(HttpResponse::Ok().json(Killed { killed }))
}

async fn logout(
    caller: CookieSession,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let s = &caller.session;
    kill(&state, &s.session_id, Some(&s.user_id), EndReason::Logout).await?;
    tracing::info!(session_id = %s.session_id, "session logged out");
    let mut res = HttpResponse::NoContent();
    for gone in removal_cookies() {
        res.cookie(gone);
    }
    Ok(res.finish())
}

#[cfg(test)]
mod tests {
    use actix_web::dev::{Path, ResourceDef};

    /// The vendored actix-router matches plain `{segment}` patterns by scanning
    /// instead of running their regex (vendor/README.md); in a debug build (this
    /// test's) it also runs the regex and panics on any difference, so every match
    /// below is checked against the regex, segments and matched length included.
    #[test]
    fn plain_patterns_match_as_their_regex_would() {
        let patterns = [
            "/sessions/{session_id}",
            "/users/{user_id}/sessions",
            "/{group}/members/{member}",
            "/{a}",
            "/a/{b}/c/{d}/",
            "{x}/y",
            // Not plain (the regex answers): custom regex, tail, adjacent segments,
            // a literal right after a segment.
            "/n/{id:\\d+}",
            "/files/{rest}*",
            "/{a}{b}",
            "/{name}.json",
        ];
        let paths = [
            "",
            "/",
            "/sessions",
            "/sessions/",
            "/sessions/2bd806c9000000000000000000000000",
            "/sessions/2bd806c9000000000000000000000000/",
            "/sessions/abc/def",
            "/sessions//",
            "/users/al%20ice/sessions",
            "/users/ålice/sessions",
            "/users//sessions",
            "/users/alice/sessions/x",
            "/g/members/user:alice",
            "/g/members/",
            "/a/1/c/2/",
            "/a/1/c/2",
            "/a/1/c//",
            "x/y",
            "/y",
            "/n/42",
            "/files/a/b",
            "/ab",
            "/report.json",
            "/line\nbreak",
        ];
        for pattern in patterns {
            for def in [ResourceDef::new(pattern), ResourceDef::prefix(pattern)] {
                for path in paths {
                    let matched = def.is_match(path);
                    assert_eq!(def.find_match(path).is_some(), matched, "{pattern} {path}");
                    let mut p = Path::new(path);
                    assert_eq!(def.capture_match_info(&mut p), matched, "{pattern} {path}");
                }
            }
        }
        let kill = ResourceDef::new("/sessions/{session_id}");
        let mut p = Path::new("/sessions/2bd806c9000000000000000000000000");
        assert!(kill.capture_match_info(&mut p));
        assert_eq!(
            p.get("session_id"),
            Some("2bd806c9000000000000000000000000")
        );
        assert!(!kill.is_match("/sessions/"));
        assert!(!kill.is_match("/sessions/a/"));
        let scope = ResourceDef::prefix("/users/{user_id}");
        let mut p = Path::new("/users/alice/sessions");
        assert!(scope.capture_match_info(&mut p));
        assert_eq!(p.get("user_id"), Some("alice"));
        assert_eq!(p.unprocessed(), "/sessions");
    }

    proptest::proptest! {
        /// Random patterns of literal parts and `{segments}`, against random paths:
        /// whatever the scan or the regex answers, the debug build compares the two.
        #[test]
        fn random_patterns_match_as_their_regex_would(
            parts in proptest::collection::vec(0usize..6, 1..5),
            path in "[/ab.é%x]{0,12}",
        ) {
            let mut pattern = String::new();
            for (i, part) in parts.iter().enumerate() {
                match part {
                    0 => pattern.push_str("/a"),
                    1 => pattern.push('/'),
                    2 => pattern.push_str("/x."),
                    3 => pattern.push_str(&format!("/{{s{i}}}")),
                    4 => pattern.push_str(&format!("{{s{i}}}")),
                    _ => pattern.push_str(".b"),
                }
            }
            for def in [ResourceDef::new(pattern.as_str()), ResourceDef::prefix(pattern.as_str())] {
                let matched = def.is_match(&path);
                proptest::prop_assert_eq!(def.find_match(&path).is_some(), matched);
                let mut p = Path::new(path.as_str());
                proptest::prop_assert_eq!(def.capture_match_info(&mut p), matched);
            }
        }
    }
}
