//! The Redis layout is written three times: in the README's table (the operators'
//! interface), in the Rust key builders (`sessionhub_redis::Keys`) and in the Lua
//! functions. This test ties them: after a scenario that touches every kind of
//! state, every key in Redis is a row of the README's table with the type it says,
//! and every Rust builder names a key (or channel) the functions really made.
#![allow(clippy::unwrap_used, missing_docs)]

use reqwest::{Method, StatusCode};
use serde_json::json;
use sessionhub_core::{ConnectionId, GroupName, NodeId, SessionId, UserId};
use sessionhub_redis::{Bucket, Keys};
use sessionhub_tests::process::repo_root;
use sessionhub_tests::{Api, TestCluster, WsClient};

/// One row of the README's layout table: the key pattern and its type.
struct Row {
    pattern: String,
    kind: String,
}

/// Whether `key` fits `pattern`, where `{B}` stands for a bucket's hash tag (two hex
/// digits in braces) and `<name>` for one or more characters.
fn fits(pattern: &str, key: &str) -> bool {
    if let Some(rest) = pattern.strip_prefix("{B}") {
        let b = key.as_bytes();
        return b.len() >= 4
            && b[0] == b'{'
            && b[3] == b'}'
            && b[1..3].iter().all(|c| c.is_ascii_hexdigit())
            && fits(rest, &key[4..]);
    }
    if pattern.starts_with('<') {
        let rest = &pattern[pattern.find('>').map_or(pattern.len(), |i| i + 1)..];
        return (1..=key.len())
            .filter(|&i| key.is_char_boundary(i))
            .any(|i| fits(rest, &key[i..]));
    }
    match (pattern.chars().next(), key.chars().next()) {
        (None, None) => true,
        (Some(p), Some(k)) if p == k => fits(&pattern[p.len_utf8()..], &key[k.len_utf8()..]),
        _ => false,
    }
}

fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let table = readme
        .split("| key / channel | type | content |")
        .nth(1)
        .expect("README has the layout table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            Row {
                pattern: cells[0]
                    .trim_start_matches("| ")
                    .trim_matches('`')
                    .to_owned(),
                kind: cells[1].trim().to_owned(),
            }
        })
        .collect()
}

/// The most specific row `key` fits (`…:conn:<id>:groups` over `…:conn:<id>`).
fn row_of<'a>(rows: &'a [Row], key: &str) -> &'a Row {
    let literal = |p: &str| {
        p.split('<')
            .map(|part| part.split_once('>').map_or(part, |(_, l)| l).len())
            .sum::<usize>()
    };
    rows.iter()
        .filter(|r| fits(&r.pattern, key))
        .max_by_key(|r| literal(&r.pattern))
        .unwrap_or_else(|| panic!("{key} is in Redis but in no row of the README's layout table"))
}

#[test]
fn the_pattern_matcher_matches_what_it_should() {
    assert!(fits(
        "sh:{B}:session:<session_id>",
        "sh:{2b}:session:2bd806c9aa"
    ));
    assert!(fits(
        "sh:{B}:user:<user_id>:sessions",
        "sh:{2b}:user:a:b:sessions"
    ));
    assert!(!fits("sh:{B}:online", "sh:{2b}:online:conns"));
    assert!(!fits("sh:nodes", "sh:{2b}:nodes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_documented_and_every_rust_builder_names_a_real_key() {
    let rows = readme_rows();
    assert!(rows.len() >= 15, "parsed {} rows", rows.len());
    let cluster = TestCluster::start(1).await;
    let node = &cluster.nodes[0];
    let api = Api::new(node);
    let a1 = api.create_session("alice", "laptop").await;
    let a2 = api.create_session("alice", "phone").await;
    let b1 = api.create_session("bob", "laptop").await;
    let mut ws_a1 = WsClient::connect(node, &a1.token).await.unwrap();
    let _ws_a2 = WsClient::connect(node, &a2.token).await.unwrap();
    let mut ws_b1 = WsClient::connect(node, &b1.token).await.unwrap();
    let cid = ws_a1.connection_id().to_owned();
    for path in [
        format!("/api/v1/groups/room/members/{cid}"),
        "/api/v1/groups/team/members/user:bob".to_owned(),
    ] {
        assert_eq!(
            api.service(Method::PUT, &path, None).await.status(),
            StatusCode::NO_CONTENT
        );
    }
    for to in [json!({ "group": "room" }), json!({ "group": "team" })] {
        let res = api
            .service(
                Method::POST,
                "/api/v1/publish",
                Some(json!({ "to": to, "event": "e" })),
            )
            .await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    ws_a1.expect("message").await;
    ws_b1.expect("message").await;

    // Every key is a documented row, of the documented type.
    let mut c = cluster.redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    for key in &keys {
        let row = row_of(&rows, key);
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(kind, row.kind, "{key} (README row {})", row.pattern);
    }

    // Every Rust builder names a key the functions made, or a channel a node holds.
    let k = Keys::new("sh:");
    let (alice, bob) = (
        UserId::parse("alice").unwrap(),
        UserId::parse("bob").unwrap(),
    );
    let s1 = SessionId::parse(&a1.session_id).unwrap();
    let conn = ConnectionId::parse(&cid).unwrap();
    let node_id = NodeId::parse("node-a").unwrap();
    let ba = Bucket::of(&a1.session_id);
    let bb = Bucket::of(&b1.session_id);
    let room = GroupName::parse("room").unwrap();
    let team = GroupName::parse("team").unwrap();
    let built = [
        k.session(&s1),
        k.conns(&s1),
        k.user_sessions(&alice),
        k.user_sessions(&bob),
        k.conn(&conn),
        k.node_conns(ba, &node_id),
        k.group(ba, &room),
        k.group(bb, &team),
        k.group_buckets(&room),
        k.group_buckets(&team),
        k.online(ba),
        k.expiry(ba),
        k.events(ba),
        k.events(bb),
        k.nodes(),
        k.sweep(),
    ];
    for key in &built {
        row_of(&rows, key);
        assert!(
            keys.contains(key),
            "the Rust builder's {key} is not a key the functions made"
        );
    }
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut c)
        .await
        .unwrap();
    for ch in [k.node_channel(ba, &node_id), k.all_channel()] {
        let row = row_of(&rows, &ch);
        assert_eq!(row.kind, "pub/sub channel", "{ch}");
        assert!(channels.contains(&ch), "nobody subscribes to {ch}");
    }
    // The bucket of a session id is the hash tag of its keys.
    assert_eq!(k.bucket_of_key(&k.session(&s1)), Some(ba));
}
