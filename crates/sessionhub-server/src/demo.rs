//! The demo app's login (with `SESSIONHUB_DEMO`): a user name is all it takes, which
//! is exactly why it is only a demo. It is also the one place where sessionhub itself
//! issues the session cookie, so the cookie's attributes are set here.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use sessionhub_core::model::MAX_USER_AGENT_LEN;

use crate::auth::{check_same_origin, client_ip, is_secure, session_cookie};
use crate::error::ApiError;
use crate::lifecycle::{CreateSession, create, new_session};
use crate::state::AppState;

/// Registers the demo routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/demo/login", web::post().to(login));
}

#[derive(Deserialize)]
struct Login {
    user_id: String,
}

/// The request's user agent, made safe to store and show.
fn user_agent(req: &HttpRequest) -> Option<String> {
    let ua = req.headers().get("user-agent")?.to_str().ok()?;
    let mut clean = String::with_capacity(ua.len().min(MAX_USER_AGENT_LEN));
    for c in ua.chars().filter(|c| !c.is_control()) {
        if clean.len() + c.len_utf8() > MAX_USER_AGENT_LEN {
            break;
        }
        clean.push(c);
    }
    (!clean.is_empty()).then_some(clean)
}

/// `POST /demo/login` with `{"user_id"}` (JSON or form): creates a session, tells the
/// user's other sessions, and sets the cookie. JSON callers get `{user_id,
/// session_id}`; a form post is redirected to `/`.
async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Either<web::Json<Login>, web::Form<Login>>,
) -> Result<HttpResponse, ApiError> {
    check_same_origin(&req, &state.config)?;
    let (user_id, form) = match body {
        web::Either::Left(j) => (j.into_inner().user_id, false),
        web::Either::Right(f) => (f.into_inner().user_id, true),
    };
    let new = new_session(
        &state.config,
        CreateSession {
            user_id: user_id.trim().to_owned(),
            user_agent: user_agent(&req),
            ip: client_ip(&req, &state.config).map(|ip| ip.to_string()),
            ..CreateSession::default()
        },
    )?;
    let created = create(&state, new).await?;
    let cookie = session_cookie(created.token.expose(), is_secure(&req, &state.config));
    let s = &created.session;
    if form {
        return Ok(HttpResponse::SeeOther()
            .cookie(cookie)
            .insert_header(("Location", "/"))
            .finish());
    }
    Ok(HttpResponse::Ok()
        .cookie(cookie)
        .insert_header(("Cache-Control", "no-store"))
        .json(serde_json::json!({ "user_id": s.user_id, "session_id": s.session_id })))
}
