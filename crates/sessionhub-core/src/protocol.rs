//! The `/ws` protocol: JSON text frames with a `type`, and the close codes.

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::ids::{ConnectionId, NodeId, SessionId, UserId};
use crate::model::{EndReason, Session};

/// Close codes sent by the server.
pub mod close_code {
    /// The session ended (killed, logged out, expired). Do not reconnect.
    pub const SESSION_ENDED: u16 = 4001;
    /// The node is shutting down; reconnect (to another node).
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that breaks RFC 6455 (reserved bits set, a stray continuation, ...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (for example frames of the wrong kind, or too many).
    pub const POLICY: u16 = 1008;
    /// Frame or message too large.
    pub const TOO_LARGE: u16 = 1009;
    /// The node could not hear recoverable frames for a while (it was not
    /// subscribed) and this socket missed some: reconnect with `since` to get them.
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client could not keep up with its outbound queue.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// The text shown with `session_created`.
pub const SESSION_CREATED_MESSAGE: &str = "You logged in to another session";

/// A frame from the server to a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame on every socket, sent once the connection is registered.
    Hello {
        /// This connection.
        connection_id: &'a ConnectionId,
        /// Its session.
        session_id: &'a SessionId,
        /// Its user.
        user_id: &'a UserId,
        /// The node holding the socket.
        node_id: &'a NodeId,
        /// The user's history epoch (absent when the hub keeps no history).
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// The user's last offset when this socket registered: recoverable frames
        /// sent on it live have higher ones. A client with nothing newer reconnects
        /// with `since` set to this.
        #[serde(skip_serializing_if = "Option::is_none", serialize_with = "offset_str")]
        offset: Option<u64>,
        /// Only when the socket asked to recover (`since` and `epoch`): whether
        /// every message after `since` was still in history.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// With `recovered: true`: how many recovered frames follow.
        #[serde(skip_serializing_if = "Option::is_none")]
        missed: Option<usize>,
    },
    /// Another session of the same user was created.
    SessionCreated {
        /// The new session (public fields only).
        session: &'a Session,
        /// Human text for the notification.
        message: &'a str,
    },
    /// This socket's session ended; a close with code 4001 follows.
    SessionEnded {
        /// The session.
        session_id: &'a SessionId,
        /// Why.
        reason: EndReason,
    },
    /// An application message published through the service API.
    Message {
        /// Application event name.
        event: &'a str,
        /// Application payload, any JSON, forwarded as the publisher wrote it.
        data: &'a RawValue,
    },
    /// The client sent something the server could not act on; the socket stays open.
    Error {
        /// Stable machine-readable code.
        code: &'a str,
        /// Human explanation.
        message: &'a str,
    },
    /// Answer to the client's `ping`.
    Pong,
}

fn offset_str<S: serde::Serializer>(o: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match o {
        Some(n) => s.collect_str(n),
        None => s.serialize_none(),
    }
}

impl ServerFrame<'_> {
    /// Serialises the frame to its JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail (no maps with non-string keys,
        // no fallible Serialize impls), so an empty object is never actually sent.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// A frame from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// End one of the caller's own user's sessions (may be the caller's own).
    KillSession {
        /// The session to end.
        session_id: SessionId,
    },
    /// Liveness check; answered with `pong`.
    Ping,
}

/// Why a client frame was refused; becomes an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    /// Stable machine-readable code: `bad_json`, `missing_type`, `unknown_type`,
    /// `bad_field`.
    pub code: &'static str,
    /// Human explanation.
    pub message: String,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl ClientFrame {
    /// Decodes a text frame. Never panics, whatever the input.
    pub fn decode(text: &str) -> Result<Self, FrameError> {
        // serde_json refuses nesting deeper than 128 levels, so hostile depth is an
        // ordinary parse error here.
        let value: Value = serde_json::from_str(text)
            .map_err(|e| FrameError::new("bad_json", format!("frame is not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(FrameError::new("bad_json", "frame must be a JSON object"));
        };
        let Some(kind) = obj.get("type") else {
            return Err(FrameError::new(
                "missing_type",
                "frame has no \"type\" field",
            ));
        };
        let Some(kind) = kind.as_str() else {
            return Err(FrameError::new("missing_type", "\"type\" must be a string"));
        };
        match kind {
            "kill_session" => {
                let sid = obj
                    .get("session_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        FrameError::new("bad_field", "kill_session needs a string \"session_id\"")
                    })?;
                let session_id = SessionId::parse(sid)
                    .map_err(|e| FrameError::new("bad_field", e.to_string()))?;
                Ok(ClientFrame::KillSession { session_id })
            }
            "ping" => Ok(ClientFrame::Ping),
            other => {
                let shown: String = other.chars().take(40).collect();
                Err(FrameError::new(
                    "unknown_type",
                    format!("unknown frame type {shown:?}; expected kill_session or ping"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_frames() {
        let sid = "2bd806c9000000000000000000000000";
        assert_eq!(
            ClientFrame::decode(&format!(
                r#"{{"type":"kill_session","session_id":"{sid}"}}"#
            )),
            Ok(ClientFrame::KillSession {
                session_id: SessionId::parse(sid).unwrap()
            })
        );
        assert_eq!(
            ClientFrame::decode(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping)
        );
    }

    #[test]
    fn refuses_bad_frames_with_codes() {
        let code = |s: &str| ClientFrame::decode(s).unwrap_err().code;
        assert_eq!(code("{"), "bad_json");
        assert_eq!(code("[1]"), "bad_json");
        assert_eq!(code(&"[".repeat(10_000)), "bad_json");
        assert_eq!(code("{}"), "missing_type");
        assert_eq!(code(r#"{"type":7}"#), "missing_type");
        assert_eq!(code(r#"{"type":"nope"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"kill_session"}"#), "bad_field");
        assert_eq!(
            code(r#"{"type":"kill_session","session_id":"x y"}"#),
            "bad_field"
        );
    }
}
