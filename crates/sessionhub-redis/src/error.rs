//! Errors of Redis calls, parsed once, and how the engine reports them.
//!
//! A call fails with a [`CallError`] (no answer in time, or Redis's error). A call of
//! a library function may also be refused by the function itself: the functions in
//! `lua/sessionhub.lua` reply errors whose first word is a code (`LIMIT`, `FENCED`,
//! `DEADLINE`, `EXISTS`, `BADKEY`, `BADARG`), which [`FunctionError::parse`] reads,
//! in this one place, into a [`FunctionError`]. Callers match on that, never on a
//! message's text.

use redis::{ErrorKind, RedisError, ServerErrorKind};
use sessionhub_core::EngineError;

/// Why one Redis call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// Redis did not answer within the command timeout.
    #[error("Redis did not answer in time")]
    TimedOut,
    /// Redis answered with an error, or the link failed.
    #[error(transparent)]
    Redis(RedisError),
}

impl CallError {
    /// Whether Redis could not be reached or did not answer (retry later), as
    /// opposed to answering with an error. So do the answers of a Redis that cannot
    /// serve yet and did nothing: a replica's `READONLY` (a master demoted in a
    /// Sentinel failover), `LOADING` (restarting, reading its AOF or RDB),
    /// `MASTERDOWN`, `TRYAGAIN` and `CLUSTERDOWN`.
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            CallError::TimedOut => true,
            CallError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        ErrorKind::Server(
                            ServerErrorKind::ReadOnly
                                | ServerErrorKind::BusyLoading
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::TryAgain
                                | ServerErrorKind::ClusterDown
                        )
                    )
            }
        }
    }

    /// Whether Redis refused a write because it is a replica (`READONLY`).
    pub(crate) fn is_read_only(&self) -> bool {
        matches!(self, CallError::Redis(e) if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly))
    }
}

/// Why a call of a library function failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FunctionError {
    /// `LIMIT`: a configured limit refused the call; the detail says which.
    #[error("LIMIT {0}")]
    Limit(String),
    /// `FENCED`: this node holds no current lease, so the function refused to
    /// record anything under it.
    #[error("FENCED node holds no current lease")]
    Fenced,
    /// `DEADLINE`: the call reached Redis after its deadline; nothing was done.
    #[error("DEADLINE the call arrived after its deadline; nothing was done")]
    Deadline,
    /// `EXISTS`: the key the function was to create is taken.
    #[error("EXISTS {0}")]
    Exists(String),
    /// Redis does not know the function: it lost the library (it restarted empty).
    #[error("function not found")]
    NoSuchFunction,
    /// `BADKEY`: a key of the call is not of the expected kind.
    #[error("BADKEY {0}")]
    BadKey(String),
    /// `BADARG`: an argument of the call is malformed.
    #[error("BADARG {0}")]
    BadArg(String),
    /// Not a refusal by the function: the call itself failed.
    #[error(transparent)]
    Call(CallError),
}

impl FunctionError {
    /// Reads a failed function call: the code of an error reply from the library,
    /// or the failure as it is.
    pub(crate) fn parse(e: CallError) -> Self {
        let CallError::Redis(redis_err) = &e else {
            return FunctionError::Call(e);
        };
        let detail = || redis_err.detail().unwrap_or_default().to_owned();
        match (redis_err.kind(), redis_err.code()) {
            (ErrorKind::Extension, Some("LIMIT")) => FunctionError::Limit(detail()),
            (ErrorKind::Extension, Some("FENCED")) => FunctionError::Fenced,
            (ErrorKind::Extension, Some("DEADLINE")) => FunctionError::Deadline,
            (ErrorKind::Extension, Some("EXISTS")) => FunctionError::Exists(detail()),
            (ErrorKind::Extension, Some("BADKEY")) => FunctionError::BadKey(detail()),
            (ErrorKind::Extension, Some("BADARG")) => FunctionError::BadArg(detail()),
            // Redis gives this one no code of its own: a plain `ERR Function not
            // found` (FCALL of a name no loaded library has).
            (ErrorKind::Server(ServerErrorKind::ResponseError), _)
                if redis_err
                    .detail()
                    .is_some_and(|d| d.starts_with("Function not found")) =>
            {
                FunctionError::NoSuchFunction
            }
            _ => FunctionError::Call(e),
        }
    }
}

impl From<CallError> for EngineError {
    fn from(e: CallError) -> Self {
        let message = e.to_string();
        let kind = if e.is_unavailable() {
            EngineError::unavailable(message)
        } else {
            EngineError::corrupt(message)
        };
        kind.caused_by(e)
    }
}

impl From<FunctionError> for EngineError {
    fn from(e: FunctionError) -> Self {
        match e {
            FunctionError::Limit(which) => EngineError::Limit(which),
            FunctionError::Deadline => EngineError::unavailable(
                "Redis answered after the request's deadline; nothing was done",
            ),
            FunctionError::Fenced => {
                EngineError::unavailable("this node lost its lease; rejoining")
            }
            FunctionError::Call(e) => e.into(),
            e @ (FunctionError::Exists(_)
            | FunctionError::NoSuchFunction
            | FunctionError::BadKey(_)
            | FunctionError::BadArg(_)) => EngineError::corrupt(e.to_string()).caused_by(e),
        }
    }
}

/// A reply this version cannot read.
pub(crate) fn corrupt(e: impl std::fmt::Display) -> EngineError {
    EngineError::corrupt(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a call gets from Redis for an error reply `line`, as read by the
    /// `redis` crate's parser.
    fn reply(line: &str) -> CallError {
        let value = redis::parse_redis_value(format!("-{line}\r\n").as_bytes())
            .expect("an error reply parses");
        CallError::Redis(value.extract_error().expect_err("an error reply"))
    }

    #[test]
    fn a_redis_that_cannot_serve_yet_is_unavailable_not_broken() {
        for line in [
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
        ] {
            assert!(reply(line).is_unavailable(), "{line}");
        }
        assert!(!reply("ERR unknown command").is_unavailable());
    }

    #[test]
    fn reads_the_functions_error_codes() {
        let limit =
            FunctionError::parse(reply("LIMIT too many sockets for this session (at most 2)"));
        assert!(
            matches!(&limit, FunctionError::Limit(d) if d == "too many sockets for this session (at most 2)"),
            "{limit:?}"
        );
        assert!(matches!(
            FunctionError::parse(reply("FENCED node holds no current lease")),
            FunctionError::Fenced
        ));
        assert!(matches!(
            FunctionError::parse(reply(
                "DEADLINE the call arrived after its deadline; nothing was done"
            )),
            FunctionError::Deadline
        ));
        assert!(matches!(
            FunctionError::parse(reply("EXISTS session id taken")),
            FunctionError::Exists(_)
        ));
        assert!(matches!(
            FunctionError::parse(reply("BADKEY expected a session key")),
            FunctionError::BadKey(d) if d == "expected a session key"
        ));
        assert!(matches!(
            FunctionError::parse(reply("BADARG upto must be a number")),
            FunctionError::BadArg(_)
        ));
        assert!(matches!(
            FunctionError::parse(reply("ERR Function not found")),
            FunctionError::NoSuchFunction
        ));
    }

    #[test]
    fn other_failures_stay_as_they_are() {
        // A code is the first word only: a message mentioning one is not it.
        let other = FunctionError::parse(reply("ERR LIMIT FENCED DEADLINE"));
        assert!(matches!(other, FunctionError::Call(_)), "{other:?}");
        assert!(matches!(
            EngineError::from(other),
            EngineError::Corrupt { .. }
        ));
        assert!(matches!(
            EngineError::from(FunctionError::parse(CallError::TimedOut)),
            EngineError::Unavailable { .. }
        ));
    }

    #[test]
    fn maps_to_the_engine_errors() {
        assert!(matches!(
            EngineError::from(FunctionError::Limit("at most 2".into())),
            EngineError::Limit(d) if d == "at most 2"
        ));
        assert!(matches!(
            EngineError::from(FunctionError::Fenced),
            EngineError::Unavailable { .. }
        ));
        assert!(matches!(
            EngineError::from(FunctionError::Deadline),
            EngineError::Unavailable { .. }
        ));
        assert!(matches!(
            EngineError::from(FunctionError::Exists(String::new())),
            EngineError::Corrupt { .. }
        ));
    }
}
