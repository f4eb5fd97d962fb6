//! Events as the Redis functions publish them on node channels. The `t` tags are a
//! stable wire format: nodes of different versions must keep understanding them.
//!
//! A payload is one JSON object, except `message`: a JSON header line, `\n`, then the
//! client frame verbatim, so that the frame is never re-encoded on its way.

use bytestring::ByteString;
use serde::Deserialize;
use sessionhub_core::{ConnectionId, EndReason, NodeEvent, Session, SessionId, UserId};

/// Header of a `message` payload.
#[derive(Debug, Deserialize)]
struct MessageHeader {
    t: String,
    /// Target sockets on the receiving node; absent: all of them.
    cids: Option<Vec<ConnectionId>>,
    /// The frame's offset in its user's history, for a recoverable frame.
    o: Option<u64>,
}

/// The payload a node publishes to itself to prove its pub/sub path works.
pub(crate) const PROBE: &[u8] = br#"{"t":"probe"}"#;

/// What arrived on a channel.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// An event for the node.
    Event(NodeEvent),
    /// The node's own probe came back.
    Probe,
}

/// The payload of a message for every socket (published on the `all` channel).
pub(crate) fn broadcast_payload(frame: &str) -> String {
    format!("{{\"t\":\"message\"}}\n{frame}")
}

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
    #[serde(flatten)]
    fields: Fields,
}

/// A session's stored fields, as strings: the session hash, the functions'
/// replies, and `session_created` events all carry these.
#[derive(Debug, Deserialize)]
pub(crate) struct Fields {
    pub(crate) user_id: String,
    pub(crate) user_agent: String,
    pub(crate) ip: String,
    pub(crate) created_at: String,
    pub(crate) last_seen_at: String,
    pub(crate) expires_at: String,
    pub(crate) idle_ms: String,
}

/// What the functions return of a session besides its user id, in this order:
/// user_agent, ip, created_at, last_seen_at, expires_at, idle_ms.
pub(crate) type StoredRow = (String, String, String, String, String, String);

impl Fields {
    /// Fields from a function's reply.
    pub(crate) fn from_row(user_id: String, row: StoredRow) -> Self {
        let (user_agent, ip, created_at, last_seen_at, expires_at, idle_ms) = row;
        Self {
            user_id,
            user_agent,
            ip,
            created_at,
            last_seen_at,
            expires_at,
            idle_ms,
        }
    }

    /// The session these fields describe (with no connections filled in).
    pub(crate) fn into_session(self, session_id: SessionId) -> Result<Session, String> {
        let last_seen_at = ms(&self.last_seen_at)?;
        Ok(Session {
            session_id,
            user_id: UserId::parse(&self.user_id).map_err(|e| e.to_string())?,
            user_agent: non_empty(self.user_agent),
            ip: non_empty(self.ip),
            created_at: ms(&self.created_at)?,
            last_seen_at,
            expires_at: ms(&self.expires_at)?,
            idle_expires_at: last_seen_at + ms(&self.idle_ms)?,
            connections: Vec::new(),
        })
    }
}

/// `""` → `None`.
pub(crate) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Parses a stored Unix-ms time.
pub(crate) fn ms(s: &str) -> Result<i64, String> {
    s.parse().map_err(|_| format!("bad time {s:?}"))
}

/// What a `message` header says: its target sockets and its offset.
type Header = (Option<Vec<ConnectionId>>, Option<u64>);

/// Reads a `message` header in the one form the functions write it,
/// `{"t":"message"[,"cids":["<id>",...]][,"o":<offset>]}` with no spaces, without
/// serde: every message a node delivers has one, and JSON decoding was a fifth of
/// what the subscriber spent on it. Anything else (other spacing or key order, an
/// escape, an id that is not one, an offset past `u64`) is `None`, and the caller
/// decodes it with serde, which gives this answer for every header this accepts.
fn scan_header(h: &[u8]) -> Option<Header> {
    let mut rest = h.strip_prefix(br#"{"t":"message""#)?;
    let mut cids = None;
    if let Some(list) = rest.strip_prefix(br#","cids":["#) {
        let mut ids = Vec::new();
        rest = match list.strip_prefix(b"]") {
            Some(after) => after,
            None => {
                let mut list = list;
                loop {
                    let body = list.strip_prefix(b"\"")?;
                    let end = body.iter().position(|&b| b == b'"')?;
                    let id = std::str::from_utf8(&body[..end]).ok()?;
                    ids.push(ConnectionId::parse(id).ok()?);
                    let after = &body[end + 1..];
                    if let Some(next) = after.strip_prefix(b",") {
                        list = next;
                    } else {
                        break after.strip_prefix(b"]")?;
                    }
                }
            }
        };
        cids = Some(ids);
    }
    let mut offset = None;
    if let Some(digits) = rest.strip_prefix(br#","o":"#) {
        let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        // JSON has no leading zeros; serde refuses them, and so must this.
        if n == 0 || (n > 1 && digits[0] == b'0') {
            return None;
        }
        offset = Some(std::str::from_utf8(&digits[..n]).ok()?.parse().ok()?);
        rest = &digits[n..];
    }
    (rest == b"}").then_some((cids, offset))
}

/// Decodes one pub/sub payload.
pub(crate) fn decode(payload: &[u8]) -> Result<Incoming, String> {
    if payload == PROBE {
        return Ok(Incoming::Probe);
    }
    if let Some(nl) = payload.iter().position(|&b| b == b'\n') {
        let (connections, offset) = match scan_header(&payload[..nl]) {
            Some(header) => header,
            None => {
                let header: MessageHeader =
                    serde_json::from_slice(&payload[..nl]).map_err(|e| e.to_string())?;
                if header.t != "message" {
                    return Err(format!("unknown framed event {:?}", header.t));
                }
                (header.cids, header.o)
            }
        };
        let frame = std::str::from_utf8(&payload[nl + 1..]).map_err(|e| e.to_string())?;
        return Ok(Incoming::Event(NodeEvent::Message {
            connections,
            frame: ByteString::from(frame),
            offset,
        }));
    }
    let ev: WireEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    Ok(Incoming::Event(match ev {
        WireEvent::SessionCreated { session: s } => NodeEvent::SessionCreated {
            session: s.fields.into_session(s.session_id)?,
        },
        WireEvent::SessionEnded {
            session_ids,
            reason,
        } => NodeEvent::SessionsEnded {
            session_ids,
            reason,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(p: &[u8]) -> NodeEvent {
        match decode(p).unwrap() {
            Incoming::Event(e) => e,
            Incoming::Probe => panic!("probe"),
        }
    }

    #[test]
    fn decodes_messages_without_touching_the_frame() {
        let ev = event(b"{\"t\":\"message\",\"cids\":[\"2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa\"]}\n{\"type\":\"message\",\"x\":\"a\\nb\"}");
        let NodeEvent::Message {
            connections, frame, ..
        } = ev
        else {
            panic!()
        };
        assert_eq!(connections.unwrap().len(), 1);
        assert_eq!(&*frame, "{\"type\":\"message\",\"x\":\"a\\nb\"}");
        let ev = event(broadcast_payload("{}").as_bytes());
        assert!(matches!(
            ev,
            NodeEvent::Message {
                connections: None,
                ..
            }
        ));
        assert!(matches!(decode(PROBE).unwrap(), Incoming::Probe));
    }

    #[test]
    fn decodes_what_the_scripts_publish() {
        let ev = event(br#"{"t":"session_ended","reason":"killed","session_ids":["2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa"]}"#);
        assert!(
            matches!(ev, NodeEvent::SessionsEnded { reason: EndReason::Killed, ref session_ids } if session_ids.len() == 1)
        );
        let ev = event(br#"{"t":"session_created","session":{"session_id":"2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa","user_id":"alice","user_agent":"","ip":"10.0.0.1","created_at":"1","last_seen_at":"1","expires_at":"2","idle_ms":"5"}}"#);
        let NodeEvent::SessionCreated { session } = ev else {
            panic!()
        };
        assert_eq!(session.user_agent, None);
        assert_eq!(session.ip.as_deref(), Some("10.0.0.1"));
        assert!(decode(b"{}").is_err());
        // cjson encodes an empty Lua table as an object, never sent but refused cleanly.
        assert!(decode(br#"{"t":"session_ended","reason":"killed","session_ids":{}}"#).is_err());
    }

    /// serde's answer for a header: what decode gave before `scan_header`.
    fn by_serde(h: &[u8]) -> Option<Header> {
        let header: MessageHeader = serde_json::from_slice(h).ok()?;
        (header.t == "message").then_some((header.cids, header.o))
    }

    fn header(cids: &Option<Vec<String>>, offset: Option<u64>) -> String {
        let mut h = String::from(r#"{"t":"message""#);
        if let Some(cids) = cids {
            let quoted: Vec<String> = cids.iter().map(|c| format!("\"{c}\"")).collect();
            h.push_str(&format!(r#","cids":[{}]"#, quoted.join(",")));
        }
        if let Some(o) = offset {
            h.push_str(&format!(r#","o":{o}"#));
        }
        h.push('}');
        h
    }

    #[test]
    fn headers_in_other_forms_go_to_serde() {
        let id = "2bd806c9aaaaaaaaaaaaaaaaaaaaaaaa";
        for h in [
            format!(r#"{{ "t":"message","cids":["{id}"]}}"#),
            format!(r#"{{"cids":["{id}"],"t":"message"}}"#),
            format!(r#"{{"t":"message","o":7,"cids":["{id}"]}}"#),
            format!(r#"{{"t":"message","cids":["{}"]}}"#, id.to_uppercase()),
            format!(r#"{{"t":"message","cids":["{id}"],"o":07}}"#),
            r#"{"t":"message","o":18446744073709551616}"#.to_owned(),
            r#"{"t":"message","o":1.5}"#.to_owned(),
            r#"{"t":"message","x":1}"#.to_owned(),
            r#"{"t":"messages"}"#.to_owned(),
        ] {
            assert_eq!(scan_header(h.as_bytes()), None, "{h}");
        }
        // Of those, serde reads the ones that are valid headers.
        let swapped = format!(r#"{{"t":"message","o":7,"cids":["{id}"]}}"#);
        assert!(by_serde(swapped.as_bytes()).is_some());
        assert!(by_serde(br#"{"t":"message","x":1}"#).is_some());
        assert_eq!(by_serde(br#"{"t":"message","o":07}"#), None);
    }

    proptest::proptest! {
        /// Every header the functions write is read without serde, with serde's
        /// answer; any header changed by a byte is read with serde's answer or left
        /// to serde.
        #[test]
        fn scanned_headers_read_as_serde_reads_them(
            cids in proptest::option::of(proptest::collection::vec("[0-9a-f]{32}", 0..4)),
            offset in proptest::option::of(proptest::num::u64::ANY),
            at in 0usize..200,
            byte in proptest::sample::select(b"\" ,:[]{}0159afAF\\ -.e".to_vec()),
            change in 0u8..3,
        ) {
            let h = header(&cids, offset);
            let want = (
                cids.as_ref().map(|c| c.iter().map(|c| ConnectionId::parse(c).unwrap()).collect()),
                offset,
            );
            proptest::prop_assert_eq!(scan_header(h.as_bytes()), Some(want.clone()));
            proptest::prop_assert_eq!(by_serde(h.as_bytes()), Some(want));
            let mut changed = h.into_bytes();
            let at = at % (changed.len() + 1);
            match change {
                0 => changed.insert(at, byte),
                1 if at < changed.len() => { changed.remove(at); }
                _ if at < changed.len() => changed[at] = byte,
                _ => changed.push(byte),
            }
            if let Some(got) = scan_header(&changed) {
                proptest::prop_assert_eq!(Some(got), by_serde(&changed));
            }
        }
    }
}
