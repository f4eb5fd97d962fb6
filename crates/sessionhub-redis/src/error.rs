//! Errors of Redis calls, as the engine reports them.

use redis::RedisError;
use sessionhub_core::EngineError;

pub(crate) fn from_redis(e: RedisError) -> EngineError {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        EngineError::Unavailable(e.to_string())
    } else {
        EngineError::Corrupt(e.to_string())
    }
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt(e.to_string())
}
