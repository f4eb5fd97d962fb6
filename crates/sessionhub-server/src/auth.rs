//! Who is calling: the service API key, the session cookie, and same-origin checks.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use sessionhub_core::{Session, Token};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;

/// Name of the session cookie.
pub const COOKIE_NAME: &str = "sh_session";

/// Proof that the request carries the service API key.
pub struct ServiceAuth;

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or(ApiError::Internal)
}

impl FromRequest for ServiceAuth {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(check_api_key(req))
    }
}

fn check_api_key(req: &HttpRequest) -> Result<ServiceAuth, ApiError> {
    let state = state(req)?;
    // No key configured: the service API does not exist, rather than being open.
    let Some(expected) = state.config.api_key.as_deref() else {
        return Err(ApiError::NotFound);
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::BadApiKey)?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(ServiceAuth)
    } else {
        Err(ApiError::BadApiKey)
    }
}

/// The token in the request's `sh_session` cookie, if well-formed.
pub fn cookie_token(req: &HttpRequest) -> Result<Token, ApiError> {
    let cookie = req.cookie(COOKIE_NAME).ok_or(ApiError::Unauthorized)?;
    Token::parse(cookie.value()).map_err(|_| ApiError::Unauthorized)
}

/// A request authenticated by its session cookie.
pub struct CookieSession {
    /// The caller's session (no connections filled in).
    pub session: Session,
}

impl FromRequest for CookieSession {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let token = cookie_token(&req)?;
            let state = state(&req)?;
            let session = state
                .engine
                .authenticate(&token)
                .await?
                .ok_or(ApiError::Unauthorized)?;
            Ok(CookieSession { session })
        })
    }
}

/// Whether the request's `Origin` (if any) may act: the node's own origin, or one of
/// the configured ones. Requests without `Origin` come from non-browser clients,
/// which no cross-site page can drive, and are allowed.
pub fn origin_allowed(req: &HttpRequest, config: &Config) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if config.allowed_origins.iter().any(|o| o == origin) {
        return true;
    }
    let info = req.connection_info();
    origin
        .split_once("://")
        .is_some_and(|(_, host)| host == info.host())
}

/// Refuses cross-site requests to state-changing cookie calls: the browser's
/// `Sec-Fetch-Site` must not say cross-site, and `Origin` must be allowed.
pub fn check_same_origin(req: &HttpRequest, config: &Config) -> Result<(), ApiError> {
    let site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok());
    if matches!(site, Some("cross-site")) {
        return Err(ApiError::Forbidden("cross-site request refused"));
    }
    if !origin_allowed(req, config) {
        return Err(ApiError::Forbidden("origin not allowed"));
    }
    Ok(())
}
