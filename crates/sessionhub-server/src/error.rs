//! The HTTP boundary's error type. Every handler returns it; it is logged here, once,
//! and turned into a JSON body `{"error": code, "message": text}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use sessionhub_core::EngineError;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; the message says how.
    #[error("{0}")]
    BadRequest(String),
    /// No valid session cookie.
    #[error("no valid session: log in again")]
    Unauthorized,
    /// Missing or wrong service API key.
    #[error("missing or invalid API key")]
    BadApiKey,
    /// Refused by policy (origin, cross-site request).
    #[error("{0}")]
    Forbidden(&'static str),
    /// Unknown, or not the caller's (the two are deliberately indistinguishable).
    #[error("not found")]
    NotFound,
    /// The request body or message is over a limit; the message says which.
    #[error("{0}")]
    TooLarge(String),
    /// The request's headers are over the limit.
    #[error("request headers are over {0} bytes")]
    HeadersTooLarge(usize),
    /// A rate or count limit refused the request; the message says which.
    #[error("{0}")]
    TooMany(String),
    /// The session store is unreachable; retry later.
    #[error("session store unavailable, retry later")]
    Unavailable,
    /// A bug or corrupt data; details are logged, not shown.
    #[error("internal error")]
    Internal,
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unavailable { message, cause } => {
                tracing::warn!(error = %message, cause = ?cause, "session store unavailable");
                ApiError::Unavailable
            }
            EngineError::Limit(msg) => ApiError::TooMany(msg),
            EngineError::Corrupt { message, cause } => {
                tracing::error!(
                    error = %message,
                    cause = ?cause,
                    "session store returned an unexpected reply"
                );
                ApiError::Internal
            }
        }
    }
}

impl ApiError {
    /// The same error about item `i` of a batch (its message names the item).
    pub fn for_item(self, i: usize) -> Self {
        match self {
            ApiError::BadRequest(m) => ApiError::BadRequest(format!("message {i}: {m}")),
            ApiError::TooLarge(m) => ApiError::TooLarge(format!("message {i}: {m}")),
            other => other,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadApiKey => "bad_api_key",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::TooLarge(_) => "too_large",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::TooMany(_) => "too_many",
            ApiError::Unavailable => "unavailable",
            ApiError::Internal => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::BadApiKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unavailable => {
                res.insert_header(("Retry-After", RETRY_AFTER_SECS.to_string()));
            }
            ApiError::BadApiKey => {
                res.insert_header(("WWW-Authenticate", "Bearer"));
            }
            _ => {}
        }
        res.json(serde_json::json!({ "error": self.code(), "message": self.to_string() }))
    }
}
