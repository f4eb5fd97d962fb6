//! Message history and recovery: what a reconnecting socket gets back.
//!
//! Messages for a user or a session, and `session_created` events, are
//! *recoverable*: the engine call that routes one also appends it to the user's
//! bounded history and numbers it with the user's next *offset* (1, 2, 3, ... in
//! delivery order; opaque to clients). Every history has an *epoch*, a string that
//! changes whenever the numbering starts again (the history was lost, say a Redis
//! restarted empty, or it lay unused past its keep time).
//!
//! A socket that opens with `since=<offset>&epoch=<epoch>` is registered and given,
//! in the same atomic engine step, every entry after `offset` that its session may
//! see: so messages published while it registers are either in that answer (offset
//! up to the answer's top) or delivered live (offset above it), never both, never
//! neither. If any entry after `offset` is gone (trimmed, expired, other epoch), it
//! gets none of them: `recovered: false`.

use std::collections::VecDeque;
use std::time::Duration;

use bytestring::ByteString;

use crate::ids::SessionId;

/// Default [`HistoryConfig::size`].
pub const DEFAULT_HISTORY_SIZE: u32 = 100;
/// Default [`HistoryConfig::ttl`].
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);
/// Largest [`HistoryConfig::size`] accepted.
pub const MAX_HISTORY_SIZE: u32 = 10_000;
/// Default [`HistoryConfig::meta_ttl`].
pub const DEFAULT_HISTORY_META_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest `epoch` a client may send back (ours are much shorter).
pub const MAX_EPOCH_LEN: usize = 64;

/// How much history each user keeps. `size == 0` or a zero `ttl` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Most entries kept per user; older ones are trimmed.
    pub size: u32,
    /// How long an entry stays recoverable.
    pub ttl: Duration,
    /// How long a user's epoch and last offset are kept after the last message or
    /// socket registration (at least `ttl`): a client that comes back within it with
    /// nothing missed is told `recovered: true` even when the entries have expired.
    pub meta_ttl: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_HISTORY_SIZE,
            ttl: DEFAULT_HISTORY_TTL,
            meta_ttl: DEFAULT_HISTORY_META_TTL,
        }
    }
}

impl HistoryConfig {
    /// No history: every message is live only.
    pub const OFF: HistoryConfig = HistoryConfig {
        size: 0,
        ttl: Duration::ZERO,
        meta_ttl: Duration::ZERO,
    };

    /// Whether history is kept at all.
    pub fn is_on(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero()
    }

    /// The keep time in milliseconds.
    pub fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis().min(i64::MAX as u128) as i64
    }

    /// The meta keep time in milliseconds (at least the keep time).
    pub fn meta_ttl_ms(&self) -> i64 {
        (self.meta_ttl.as_millis().min(i64::MAX as u128) as i64).max(self.ttl_ms())
    }
}

/// What a reconnecting client asks for: everything after `since` in history `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The last offset the client received (0: none yet in this epoch).
    pub since: u64,
    /// The epoch that offset belongs to.
    pub epoch: String,
}

impl Recovery {
    /// Parses the `since` and `epoch` query parameters. `Ok(None)` when neither is
    /// given; an error (a message for the client) when they are malformed.
    pub fn from_query(since: Option<&str>, epoch: Option<&str>) -> Result<Option<Self>, String> {
        match (since, epoch) {
            (None, None) => Ok(None),
            (Some(_), None) | (None, Some(_)) => {
                Err("since and epoch go together: send both from the last hello and frames".into())
            }
            (Some(since), Some(epoch)) => {
                let since = since
                    .parse::<u64>()
                    .map_err(|_| "since must be an offset this hub sent (a decimal number)")?;
                if epoch.is_empty()
                    || epoch.len() > MAX_EPOCH_LEN
                    || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
                {
                    return Err("epoch must be the epoch this hub sent in hello".into());
                }
                Ok(Some(Self {
                    since,
                    epoch: epoch.to_owned(),
                }))
            }
        }
    }
}

/// Who may recover a history entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every session of the user (a message to the user).
    User,
    /// One session (a message to that session).
    Session(SessionId),
    /// Every session but this one (its `session_created`).
    Others(SessionId),
}

impl Audience {
    /// The form stored in the history entry's `to` field: `user`, `session:<sid>`,
    /// `others:<sid>`.
    pub fn encode(&self) -> String {
        match self {
            Audience::User => "user".to_owned(),
            Audience::Session(s) => format!("session:{s}"),
            Audience::Others(s) => format!("others:{s}"),
        }
    }

    /// Whether a socket of session `sid` may recover the entry.
    pub fn includes(&self, sid: &SessionId) -> bool {
        match self {
            Audience::User => true,
            Audience::Session(s) => s == sid,
            Audience::Others(s) => s != sid,
        }
    }
}

/// One recovered frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryFrame {
    /// Its offset.
    pub offset: u64,
    /// The client frame, `offset` included, as it was delivered live.
    pub frame: ByteString,
}

/// The outcome of a recovery request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Whether every entry after the client's offset was still there (when false,
    /// `frames` is empty and the application should reload its state).
    pub recovered: bool,
    /// The entries after the client's offset that its session may see, in order.
    pub frames: Vec<HistoryFrame>,
}

/// The user's history as a new socket sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryState {
    /// The current epoch.
    pub epoch: String,
    /// The last offset given out: every recoverable frame the socket is sent live
    /// has a higher one.
    pub offset: u64,
    /// The answer to the socket's recovery request, if it made one.
    pub recovery: Option<Recovered>,
}

/// A registered connection.
#[derive(Debug, Clone)]
pub struct Registered {
    /// Its session.
    pub session: crate::model::Session,
    /// The user's history, when the engine keeps one.
    pub history: Option<HistoryState>,
}

/// Adds `"offset":"<n>"` to a client frame (a JSON object). The frames the node
/// builds always end with `}`; anything else is returned unchanged.
pub fn with_offset(frame: &str, offset: u64) -> String {
    match frame.strip_suffix('}') {
        Some(head) if head.trim_end().ends_with('{') => format!("{head}\"offset\":\"{offset}\"}}"),
        Some(head) => format!("{head},\"offset\":\"{offset}\"}}"),
        None => frame.to_owned(),
    }
}

/// A fresh epoch: the time in microseconds and some randomness, base 36.
pub fn new_epoch() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let salt: [u8; 2] = crate::ids::random_bytes();
    format!(
        "{}{}",
        base36(micros),
        base36(u64::from(u16::from_le_bytes(salt)))
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// One user's history, as the in-memory engine keeps it (the Redis engine keeps
/// the same in a stream; see `lua/sessionhub.lua`).
#[derive(Debug)]
pub struct UserHistory {
    epoch: String,
    top: u64,
    /// When the epoch and top were last used (Unix ms).
    used_at: i64,
    entries: VecDeque<Entry>,
}

#[derive(Debug)]
struct Entry {
    offset: u64,
    at: i64,
    to: Audience,
    frame: ByteString,
}

impl UserHistory {
    /// An empty history with a fresh epoch.
    pub fn new(now: i64) -> Self {
        Self {
            epoch: new_epoch(),
            top: 0,
            used_at: now,
            entries: VecDeque::new(),
        }
    }

    /// Whether the history has lain unused so long that it is forgotten.
    pub fn forgotten(&self, cfg: &HistoryConfig, now: i64) -> bool {
        now - self.used_at > cfg.meta_ttl_ms()
    }

    /// Drops expired entries; returns whether the history is still worth keeping.
    pub fn prune(&mut self, cfg: &HistoryConfig, now: i64) -> bool {
        while self
            .entries
            .front()
            .is_some_and(|e| e.at < now - cfg.ttl_ms())
        {
            self.entries.pop_front();
        }
        !self.forgotten(cfg, now)
    }

    /// Appends a frame; returns the frame with its offset.
    pub fn append(
        &mut self,
        cfg: &HistoryConfig,
        now: i64,
        to: Audience,
        frame: &str,
    ) -> (u64, ByteString) {
        self.top += 1;
        self.used_at = now;
        let frame = ByteString::from(with_offset(frame, self.top));
        self.entries.push_back(Entry {
            offset: self.top,
            at: now,
            to,
            frame: frame.clone(),
        });
        while self.entries.len() > cfg.size as usize {
            self.entries.pop_front();
        }
        (self.top, frame)
    }

    /// The state a new socket of `sid` sees, answering `recovery` if given.
    pub fn state(
        &mut self,
        cfg: &HistoryConfig,
        now: i64,
        sid: &SessionId,
        recovery: Option<&Recovery>,
    ) -> HistoryState {
        self.used_at = now;
        let recovery = recovery.map(|r| self.recover(cfg, now, sid, r));
        HistoryState {
            epoch: self.epoch.clone(),
            offset: self.top,
            recovery,
        }
    }

    /// Whether a socket of `sid` at point `r` missed frames: its session may
    /// recover some after `r.since`, or the frames after it are gone (another
    /// epoch, trimmed, expired).
    pub fn missed(&self, cfg: &HistoryConfig, now: i64, sid: &SessionId, r: &Recovery) -> bool {
        if r.epoch == self.epoch && r.since == self.top {
            return false;
        }
        let got = self.recover(cfg, now, sid, r);
        !got.recovered || !got.frames.is_empty()
    }

    fn recover(&self, cfg: &HistoryConfig, now: i64, sid: &SessionId, r: &Recovery) -> Recovered {
        let lost = Recovered {
            recovered: false,
            frames: Vec::new(),
        };
        if r.epoch != self.epoch || r.since > self.top {
            return lost;
        }
        let after: Vec<&Entry> = self.entries.iter().filter(|e| e.offset > r.since).collect();
        let complete = r.since == self.top
            || after
                .first()
                .is_some_and(|e| e.offset == r.since + 1 && e.at >= now - cfg.ttl_ms());
        if !complete {
            return lost;
        }
        Recovered {
            recovered: true,
            frames: after
                .into_iter()
                .filter(|e| e.to.includes(sid))
                .map(|e| HistoryFrame {
                    offset: e.offset,
                    frame: e.frame.clone(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(c: char) -> SessionId {
        SessionId::parse(&format!("2bd806c9{}", c.to_string().repeat(24))).unwrap()
    }

    #[test]
    fn offsets_are_spliced_into_frames() {
        assert_eq!(
            with_offset(r#"{"type":"message","data":1}"#, 7),
            r#"{"type":"message","data":1,"offset":"7"}"#
        );
        assert_eq!(with_offset("{}", 1), r#"{"offset":"1"}"#);
        assert_eq!(with_offset("[1]", 1), "[1]");
    }

    #[test]
    fn query_parameters_are_checked() {
        assert_eq!(Recovery::from_query(None, None), Ok(None));
        assert!(Recovery::from_query(Some("1"), None).is_err());
        assert!(Recovery::from_query(Some("x"), Some("e1")).is_err());
        assert!(Recovery::from_query(Some("-1"), Some("e1")).is_err());
        assert!(Recovery::from_query(Some("1"), Some("a b")).is_err());
        assert!(Recovery::from_query(Some("1"), Some(&"a".repeat(65))).is_err());
        assert_eq!(
            Recovery::from_query(Some("12"), Some("e1")),
            Ok(Some(Recovery {
                since: 12,
                epoch: "e1".into()
            }))
        );
    }

    #[test]
    fn recovers_exactly_the_gap_for_the_right_sessions() {
        let cfg = HistoryConfig {
            size: 3,
            ttl: Duration::from_secs(10),
            meta_ttl: Duration::from_secs(60),
        };
        let (a, b) = (sid('a'), sid('b'));
        let mut h = UserHistory::new(0);
        let epoch = h.state(&cfg, 0, &a, None).epoch;
        h.append(&cfg, 1, Audience::User, "{}");
        h.append(&cfg, 2, Audience::Session(b.clone()), "{}");
        h.append(&cfg, 3, Audience::Others(a.clone()), "{}");
        let ask = |since| Recovery {
            since,
            epoch: epoch.clone(),
        };
        let got = h.state(&cfg, 4, &a, Some(&ask(0))).recovery.unwrap();
        assert!(got.recovered);
        assert_eq!(got.frames.iter().map(|f| f.offset).collect::<Vec<_>>(), [1]);
        let got = h.state(&cfg, 4, &b, Some(&ask(1))).recovery.unwrap();
        assert_eq!(
            got.frames.iter().map(|f| f.offset).collect::<Vec<_>>(),
            [2, 3]
        );
        // Nothing missed: recovered, even with nothing left to send.
        let got = h.state(&cfg, 4, &a, Some(&ask(3))).recovery.unwrap();
        assert!(got.recovered && got.frames.is_empty());
        // Trimmed: offset 1 is gone once a fourth entry comes.
        h.append(&cfg, 5, Audience::User, "{}");
        assert!(
            !h.state(&cfg, 6, &a, Some(&ask(0)))
                .recovery
                .unwrap()
                .recovered
        );
        assert!(
            h.state(&cfg, 6, &a, Some(&ask(1)))
                .recovery
                .unwrap()
                .recovered
        );
        // Expired, another epoch, an offset from the future.
        assert!(
            !h.state(&cfg, 20_000, &a, Some(&ask(1)))
                .recovery
                .unwrap()
                .recovered
        );
        let other = Recovery {
            since: 1,
            epoch: "other".into(),
        };
        assert!(
            !h.state(&cfg, 6, &a, Some(&other))
                .recovery
                .unwrap()
                .recovered
        );
        assert!(
            !h.state(&cfg, 6, &a, Some(&ask(99)))
                .recovery
                .unwrap()
                .recovered
        );
    }
}
