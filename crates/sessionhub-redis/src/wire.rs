//! Events as the Lua scripts publish them on node channels. The `t` tags are a
//! stable wire format: nodes of different versions must keep understanding them.

use serde::Deserialize;
use sessionhub_core::{EndReason, NodeEvent, Session, SessionId, UserId};

#[derive(Debug, Deserialize)]
#[serde(tag = "t")]
enum WireEvent {
    #[serde(rename = "session_created")]
    SessionCreated { session: WireSession },
    #[serde(rename = "session_ended")]
    SessionEnded {
        session_ids: Vec<SessionId>,
        reason: EndReason,
    },
}

#[derive(Debug, Deserialize)]
struct WireSession {
    session_id: SessionId,
    user_id: UserId,
    user_agent: String,
    ip: String,
    created_at: String,
    last_seen_at: String,
    expires_at: String,
}

/// `""` → `None`.
pub(crate) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Parses a stored Unix-ms time.
pub(crate) fn ms(s: &str) -> Result<i64, String> {
    s.parse().map_err(|_| format!("bad time {s:?}"))
}

/// Decodes one pub/sub payload.
pub(crate) fn decode(payload: &[u8]) -> Result<NodeEvent, String> {
    let ev: WireEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    Ok(match ev {
        WireEvent::SessionCreated { session: s } => NodeEvent::SessionCreated {
            session: Session {
                session_id: s.session_id,
                user_id: s.user_id,
                user_agent: non_empty(s.user_agent),
                ip: non_empty(s.ip),
                created_at: ms(&s.created_at)?,
                last_seen_at: ms(&s.last_seen_at)?,
                expires_at: ms(&s.expires_at)?,
                connections: Vec::new(),
            },
        },
        WireEvent::SessionEnded {
            session_ids,
            reason,
        } => NodeEvent::SessionsEnded {
            session_ids,
            reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_scripts_publish() {
        let ev = decode(br#"{"t":"session_ended","reason":"killed","session_ids":["2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa"]}"#).unwrap();
        assert!(
            matches!(ev, NodeEvent::SessionsEnded { reason: EndReason::Killed, ref session_ids } if session_ids.len() == 1)
        );
        let ev = decode(br#"{"t":"session_created","session":{"session_id":"2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa","user_id":"alice","user_agent":"","ip":"10.0.0.1","created_at":"1","last_seen_at":"1","expires_at":"2"}}"#).unwrap();
        let NodeEvent::SessionCreated { session } = ev else {
            panic!()
        };
        assert_eq!(session.user_agent, None);
        assert_eq!(session.ip.as_deref(), Some("10.0.0.1"));
        assert!(decode(b"{}").is_err());
        // cjson encodes an empty Lua table as an object, never sent but refused cleanly.
        assert!(decode(br#"{"t":"session_ended","reason":"killed","session_ids":{}}"#).is_err());
    }
}
