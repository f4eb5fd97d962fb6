//! Just enough RESP2 for the subscriber's own link ([`crate::link`]): replies are
//! parsed in place, as ranges of the read buffer, so a pub/sub message's channel and
//! payload reach the node without a copy or a `redis::Value`. redis-rs's general
//! parser (built on `combine`) cost ~6,000 instructions per message there, a quarter
//! of what a node spent to deliver one (BENCHMARKS.md, "What a node spends per
//! delivered message").

use std::ops::Range;

/// Longest bulk string taken: Redis's own default `proto-max-bulk-len` (512 MiB).
/// A longer one is a protocol error, not a reason to grow the buffer without end.
pub(crate) const MAX_BULK: usize = 512 * 1024 * 1024;
/// Most elements in an array: a subscribed link's replies have two to four.
pub(crate) const MAX_ARRAY: usize = 64;
/// Deepest nesting of arrays: a subscribed link's replies are flat.
const MAX_DEPTH: usize = 2;
/// Longest header line (`*`, `$`, `:`, …) before its CRLF, and of a simple string
/// or an error.
const MAX_LINE: usize = 64 * 1024;

/// One reply; its strings are ranges of the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+...`
    Simple(Range<usize>),
    /// `-...`
    Error(Range<usize>),
    /// `:...`
    Int(i64),
    /// `$...`; `None` for the null bulk string.
    Bulk(Option<Range<usize>>),
    /// `*...`; `None` for the null array.
    Array(Option<Vec<Reply>>),
}

/// Bytes that are not RESP2, or past a limit above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Redis sent what is not a RESP2 reply: {0}")]
pub(crate) struct ProtocolError(pub(crate) &'static str);

/// Parses the reply that starts at `buf[from]`. `Ok(None)`: not all of it is in `buf`
/// yet. Else the reply and the index just past it.
pub(crate) fn parse(buf: &[u8], from: usize) -> Result<Option<(Reply, usize)>, ProtocolError> {
    parse_at(buf, from, 0)
}

fn parse_at(
    buf: &[u8],
    from: usize,
    depth: usize,
) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some(&kind) = buf.get(from) else {
        return Ok(None);
    };
    let Some((line, next)) = line(buf, from + 1)? else {
        return Ok(None);
    };
    match kind {
        b'+' => Ok(Some((Reply::Simple(line), next))),
        b'-' => Ok(Some((Reply::Error(line), next))),
        b':' => Ok(Some((Reply::Int(int(&buf[line])?), next))),
        b'$' => {
            let Some(len) = length(&buf[line])? else {
                return Ok(Some((Reply::Bulk(None), next)));
            };
            if len > MAX_BULK {
                return Err(ProtocolError("a bulk string over 512 MiB"));
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError("a bulk string without its CRLF"));
            }
            Ok(Some((Reply::Bulk(Some(next..end)), end + 2)))
        }
        b'*' => {
            let Some(len) = length(&buf[line])? else {
                return Ok(Some((Reply::Array(None), next)));
            };
            if len > MAX_ARRAY {
                return Err(ProtocolError("an array of over 64 elements"));
            }
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("arrays nested too deep"));
            }
            let mut items = Vec::with_capacity(len);
            let mut at = next;
            for _ in 0..len {
                let Some((item, after)) = parse_at(buf, at, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                at = after;
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        _ => Err(ProtocolError("an unknown type byte")),
    }
}

/// The line that starts at `buf[from]`, without its CRLF, and the index after it.
fn line(buf: &[u8], from: usize) -> Result<Option<(Range<usize>, usize)>, ProtocolError> {
    let rest = buf.get(from..).unwrap_or_default();
    match rest.iter().take(MAX_LINE + 1).position(|&b| b == b'\r') {
        Some(i) => match rest.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some((from..from + i, from + i + 2))),
            Some(_) => Err(ProtocolError("a CR without LF")),
        },
        None if rest.len() > MAX_LINE => Err(ProtocolError("a line over 64 KiB")),
        None => Ok(None),
    }
}

/// A bulk string's or an array's length; `None` for -1 (the null one).
fn length(s: &[u8]) -> Result<Option<usize>, ProtocolError> {
    match int(s)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .map(Some)
            .map_err(|_| ProtocolError("a negative length")),
    }
}

/// A decimal integer as RESP writes it (an optional `-`, then digits).
fn int(s: &[u8]) -> Result<i64, ProtocolError> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProtocolError("a bad integer"));
    }
    let n = digits
        .iter()
        .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
    Ok(if neg { -n } else { n })
}

/// A command as RESP2: an array of bulk strings.
pub(crate) fn command<'a>(args: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(buf: &[u8]) -> Reply {
        let (reply, end) = parse(buf, 0).unwrap().unwrap();
        assert_eq!(end, buf.len());
        reply
    }

    #[test]
    fn parses_what_a_subscribed_link_gets() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\na\r\nbc\r\n";
        let Reply::Array(Some(items)) = whole(msg) else {
            panic!()
        };
        assert_eq!(items[0], Reply::Bulk(Some(8..15)));
        assert_eq!(items[1], Reply::Bulk(Some(21..23)));
        assert_eq!(&msg[21..23], b"ch");
        let Reply::Bulk(Some(payload)) = &items[2] else {
            panic!()
        };
        assert_eq!(&msg[payload.clone()], b"a\r\nbc");
        assert_eq!(
            whole(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nx\r\n:257\r\n"),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(8..17)),
                Reply::Bulk(Some(23..24)),
                Reply::Int(257)
            ]))
        );
        assert_eq!(
            whole(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(8..12)),
                Reply::Bulk(Some(18..18))
            ]))
        );
        assert_eq!(whole(b"+OK\r\n"), Reply::Simple(1..3));
        assert_eq!(whole(b"-ERR no\r\n"), Reply::Error(1..7));
        assert_eq!(whole(b":-12\r\n"), Reply::Int(-12));
        assert_eq!(whole(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(whole(b"*-1\r\n"), Reply::Array(None));
        assert_eq!(whole(b"*0\r\n"), Reply::Array(Some(vec![])));
    }

    #[test]
    fn refuses_what_is_not_resp2_or_past_a_limit() {
        for bad in [
            &b"?x\r\n"[..],
            b"$abc\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"$536870913\r\n",
            b":\r\n",
            b":1234567890123456789\r\n",
            b"+a\rb\r\n",
            b"*65\r\n",
            b"*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad, 0).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = vec![b'+'; MAX_LINE + 2];
        assert!(parse(&long, 0).is_err());
        assert_eq!(parse(&long[..MAX_LINE], 0), Ok(None));
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            command([&b"PING"[..]].into_iter()),
            b"*1\r\n$4\r\nPING\r\n".to_vec()
        );
        assert_eq!(
            command([&b"AUTH"[..], b"u", b""].into_iter()),
            b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$0\r\n\r\n".to_vec()
        );
    }

    proptest::proptest! {
        /// Replies that came in several reads: every prefix is incomplete, and the
        /// whole parses to the same reply wherever in the buffer it starts.
        #[test]
        fn every_prefix_of_a_reply_is_incomplete(
            channel in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            lead in proptest::collection::vec(proptest::num::u8::ANY, 0..10),
        ) {
            let msg = command([&b"message"[..], &channel, &payload].into_iter());
            let (reply, end) = parse(&msg, 0).unwrap().unwrap();
            proptest::prop_assert_eq!(end, msg.len());
            let Reply::Array(Some(items)) = &reply else { panic!() };
            let Reply::Bulk(Some(p)) = &items[2] else { panic!() };
            proptest::prop_assert_eq!(&msg[p.clone()], &payload[..]);
            for cut in 0..msg.len() {
                proptest::prop_assert_eq!(parse(&msg[..cut], 0), Ok(None));
            }
            let mut shifted = lead.clone();
            shifted.extend_from_slice(&msg);
            let (again, end) = parse(&shifted, lead.len()).unwrap().unwrap();
            proptest::prop_assert_eq!(end, shifted.len());
            let Reply::Array(Some(items)) = &again else { panic!() };
            let Reply::Bulk(Some(q)) = &items[2] else { panic!() };
            proptest::prop_assert_eq!(&shifted[q.clone()], &payload[..]);
        }
    }
}
