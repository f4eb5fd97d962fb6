//! Property tests (the fuzzing suite, run in CI for a bounded number of cases) for
//! the two parsers that see hostile input first: the client-frame decoder and the
//! token parser. Neither may panic, and each accepts exactly what it should.
#![allow(clippy::unwrap_used, missing_docs)]

use proptest::prelude::*;
use sessionhub_core::protocol::ClientFrame;
use sessionhub_core::{SessionId, Token, UserId};

/// Cases per property: enough to find shallow bugs, bounded for CI (well under a
/// second each).
const CASES: u32 = 4096;

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        prop_oneof![Just("kill_session"), Just("ping"), Just("type")]
            .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("session_id".to_owned()),
                    ".{0,10}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Any text at all: a frame or a clear error, never a panic.
    #[test]
    fn decoder_never_panics_on_any_text(text in ".{0,300}") {
        let _ = ClientFrame::decode(&text);
    }

    /// Any bytes that happen to be UTF-8, including control characters.
    #[test]
    fn decoder_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = ClientFrame::decode(text);
        }
    }

    /// Any JSON: only the two known shapes are accepted, and errors carry a code.
    #[test]
    fn decoder_accepts_exactly_the_known_frames(value in json_value()) {
        let text = value.to_string();
        match ClientFrame::decode(&text) {
            Ok(ClientFrame::Ping) => prop_assert_eq!(&value["type"], "ping"),
            Ok(ClientFrame::KillSession { session_id }) => {
                prop_assert_eq!(&value["type"], "kill_session");
                prop_assert_eq!(value["session_id"].as_str(), Some(session_id.as_str()));
            }
            Err(e) => prop_assert!(
                ["bad_json", "missing_type", "unknown_type", "bad_field"].contains(&e.code)
            ),
        }
    }

    /// Well-formed frames round-trip.
    #[test]
    fn kill_session_frames_round_trip(user in "[a-z0-9._@+:-]{1,40}") {
        let sid = SessionId::generate(&UserId::parse(&user).unwrap());
        let text = serde_json::json!({ "type": "kill_session", "session_id": sid.as_str() }).to_string();
        prop_assert_eq!(ClientFrame::decode(&text).unwrap(), ClientFrame::KillSession { session_id: sid });
    }

    /// The token parser never panics and accepts only `<32 hex>.<64 hex>`.
    #[test]
    fn token_parser_accepts_only_well_formed_tokens(text in ".{0,120}") {
        let well_formed = text.len() == 97
            && text.as_bytes()[32] == b'.'
            && text.bytes().enumerate().all(|(i, b)| i == 32 || b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        prop_assert_eq!(Token::parse(&text).is_ok(), well_formed);
    }

    /// Near misses of a real token are refused.
    #[test]
    fn token_parser_refuses_mutations(user in "[a-z]{1,10}", pos in 0usize..97, byte in any::<u8>()) {
        let token = Token::generate(&UserId::parse(&user).unwrap()).expose();
        prop_assert!(Token::parse(&token).is_ok());
        let mut bytes = token.into_bytes();
        let original = bytes[pos];
        bytes[pos] = byte;
        if let Ok(mutated) = String::from_utf8(bytes) {
            let still_valid = byte == original
                || (pos != 32 && (byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)));
            prop_assert_eq!(Token::parse(&mutated).is_ok(), still_valid);
        }
    }
}
