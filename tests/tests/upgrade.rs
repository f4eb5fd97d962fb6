//! Rolling upgrades: every node calls its own copy of the function library
//! (`sessionhub_<version>`), whatever another release or another setting loaded
//! since, and operators keep calling the plain names of the shared `sessionhub`.
#![allow(clippy::unwrap_used, missing_docs)]

use sessionhub_tests::process::{Node, NodeOptions, RedisServer};
use sessionhub_tests::{Api, WsClient};

/// The library as another release would load it: its own copy under `version`, with
/// `sh_kill_session` ending nothing (a contract this node does not expect).
fn other_release(version: Option<&str>) -> String {
    let broken = sessionhub_redis::LIBRARY.replacen(
        "register('sh_kill_session', function(keys, args)\n",
        "register('sh_kill_session', function(keys, args)\n  if true then return 0 end\n",
        1,
    );
    assert_ne!(broken, sessionhub_redis::LIBRARY, "sh_kill_session moved");
    match version {
        None => broken,
        Some(v) => broken
            .replacen(
                "#!lua name=sessionhub\n",
                &format!("#!lua name=sessionhub_{v}\n"),
                1,
            )
            .replacen(
                "local FUNCTION_SUFFIX = ''\n",
                &format!("local FUNCTION_SUFFIX = '_{v}'\n"),
                1,
            ),
    }
}

async fn load(redis: &RedisServer, text: &str) {
    let mut c = redis.conn().await;
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(text)
        .query_async::<String>(&mut c)
        .await
        .unwrap();
}

/// The names of the libraries loaded.
async fn libraries(redis: &RedisServer) -> Vec<String> {
    let mut c = redis.conn().await;
    let list: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut names: Vec<String> = list
        .into_iter()
        .map(|lib| {
            let fields: Vec<redis::Value> = redis::from_redis_value(lib).unwrap();
            let i = fields
                .iter()
                .position(|f| {
                    redis::from_redis_value::<String>(f.clone()).ok().as_deref()
                        == Some("library_name")
                })
                .unwrap();
            redis::from_redis_value(fields[i + 1].clone()).unwrap()
        })
        .collect();
    names.sort();
    names
}

/// A node of another release as the store sees it: a lease an hour long and a
/// status naming its copy of the library (it serves nothing here).
async fn pretend_live_node(redis: &RedisServer, id: &str, version: &str) {
    let mut c = redis.conn().await;
    let until = sessionhub_core::time::now_ms() + 3_600_000;
    let _: () = redis::cmd("ZADD")
        .arg("sh:nodes")
        .arg(until)
        .arg(id)
        .query_async(&mut c)
        .await
        .unwrap();
    let status = format!(
        r#"{{"address":"127.0.0.1:1","sockets":0,"ready":true,"at":0,"library":"sessionhub_{version}"}}"#
    );
    let _: () = redis::cmd("SET")
        .arg(format!("sh:node-status:{id}"))
        .arg(status)
        .query_async(&mut c)
        .await
        .unwrap();
}

fn redis_node(id: &str, redis: &RedisServer, env: &[(&str, &str)]) -> NodeOptions {
    NodeOptions {
        node_id: id.into(),
        redis_url: Some(redis.url()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A node of another release loaded its copy and, last, the shared library: this
/// node's kill still ends the session everywhere (it calls its own copy), the other
/// release's copy stays for the nodes of that release, and an operator's plain
/// `FCALL sh_kill_session` runs the code of whichever node loaded last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_calls_its_own_library_whichever_release_loaded_last() {
    let redis = RedisServer::start().await;
    let older = "00000000000000aa";
    pretend_live_node(&redis, "older-node", older).await;
    let node = Node::start(redis_node("new", &redis, &[])).await;
    load(&redis, &other_release(Some(older))).await;
    load(&redis, &other_release(None)).await;
    let loaded = libraries(&redis).await;
    assert_eq!(loaded.len(), 3, "{loaded:?}");
    assert!(loaded.contains(&"sessionhub".to_owned()), "{loaded:?}");
    assert!(
        loaded.contains(&format!("sessionhub_{older}")),
        "{loaded:?}"
    );
    let own = loaded
        .iter()
        .find(|n| n.starts_with("sessionhub_") && !n.ends_with(older))
        .unwrap()
        .clone();

    let api = Api::new(&node);
    let s = api.create_session("alice", "laptop").await;
    let mut ws = WsClient::connect(&node, &s.token).await.unwrap();
    let res = api
        .service(
            reqwest::Method::DELETE,
            &format!("/api/v1/sessions/{}", s.session_id),
            None,
        )
        .await;
    assert_eq!(res.status(), 204, "the node's kill ran its own function");
    assert_eq!(ws.expect_close().await.0, 4001);
    assert_eq!(api.me_status(&s.token).await, 401);

    // The other release's copy is still there, as it was loaded.
    let mut c = redis.conn().await;
    let s2 = api.create_session("bob", "phone").await;
    let key = format!("sh:{{{}}}:session:{}", &s2.session_id[..2], s2.session_id);
    let kill_as = |function: String| {
        let (mut c, key) = (c.clone(), key.clone());
        async move {
            redis::cmd("FCALL")
                .arg(function)
                .arg(1)
                .arg(key)
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    let ended = kill_as(format!("sh_kill_session_{older}")).await;
    assert_eq!(ended, 0, "the other release's function, unchanged");
    // The plain name is the shared library's: the other release loaded it last.
    assert_eq!(kill_as("sh_kill_session".into()).await, 0);
    assert_eq!(api.me_status(&s2.token).await, 200);

    // A node starting now loads the shared library again (its own copy is there
    // already, the same text under the same name): the plain name ends sessions.
    let again = Node::start(redis_node("again", &redis, &[])).await;
    let loaded = libraries(&redis).await;
    assert_eq!(loaded.len(), 3, "{loaded:?}");
    assert!(loaded.contains(&own), "{loaded:?}");
    assert_eq!(
        kill_as("sh_kill_session".into()).await,
        1,
        "an operator's kill with the plain name"
    );
    assert_eq!(Api::new(&again).me_status(&s2.token).await, 401);

    // An operator deletes the copy while its nodes run: the next call loads it
    // again and goes through.
    redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(&own)
        .query_async::<String>(&mut c)
        .await
        .unwrap();
    assert!(!libraries(&redis).await.contains(&own));
    let s3 = Api::new(&again).create_session("erin", "tablet").await;
    assert_eq!(Api::new(&node).me_status(&s3.token).await, 200);
    assert!(libraries(&redis).await.contains(&own));
}

/// Two nodes with different event stream caps each keep theirs: one that writes no
/// events (`SESSIONHUB_EVENTS_MAXLEN=0`) and one that does, whichever started last.
/// With one library for all, the last node to load it set the cap of every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_settings_do_not_overwrite_each_others_library() {
    let redis = RedisServer::start().await;
    let quiet = Node::start(redis_node(
        "quiet",
        &redis,
        &[("SESSIONHUB_EVENTS_MAXLEN", "0")],
    ))
    .await;
    let loud = Node::start(redis_node("loud", &redis, &[])).await;
    let c = redis.conn().await;
    let created = |node: &Node, user: &str| {
        let api = Api::new(node);
        let user = user.to_owned();
        async move { api.create_session(&user, "ua").await }
    };
    // Both logins after both nodes loaded their libraries, each through one node.
    let silent = created(&quiet, "carol").await;
    let heard = created(&loud, "dave").await;
    let events_of = |sid: String| {
        let mut c = c.clone();
        async move {
            let key = format!("sh:{{{}}}:events", &sid[..2]);
            let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .unwrap();
            entries
                .into_iter()
                .filter(|(_, fields)| fields.contains(&sid))
                .count()
        }
    };
    assert_eq!(
        events_of(silent.session_id.clone()).await,
        0,
        "the quiet node's login wrote no event"
    );
    assert_eq!(
        events_of(heard.session_id.clone()).await,
        1,
        "the other node's login wrote session.created"
    );
    let loaded = libraries(&redis).await;
    assert_eq!(
        loaded.len(),
        3,
        "the shared library and one copy per setting: {loaded:?}"
    );
}

/// A release's copy of the library stays while a live node names it in its status
/// and is deleted once none does: a node deletes such leftovers a few heartbeats
/// after it starts. The shared library and the node's own copy stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_no_live_node_calls_are_deleted() {
    let redis = RedisServer::start().await;
    let (gone, kept) = ("00000000000000aa", "00000000000000bb");
    load(&redis, &other_release(Some(gone))).await;
    load(&redis, &other_release(Some(kept))).await;
    pretend_live_node(&redis, "kept-node", kept).await;
    let node = Node::start(redis_node("new", &redis, sessionhub_tests::FAST_LEASE)).await;
    let gone_name = format!("sessionhub_{gone}");
    sessionhub_tests::wait_for(
        "the unused copy to be deleted",
        sessionhub_tests::WAIT,
        || async { (!libraries(&redis).await.contains(&gone_name)).then_some(()) },
    )
    .await;
    let loaded = libraries(&redis).await;
    assert_eq!(loaded.len(), 3, "{loaded:?}");
    assert!(loaded.contains(&format!("sessionhub_{kept}")), "{loaded:?}");
    assert!(loaded.contains(&"sessionhub".to_owned()), "{loaded:?}");
    node.wait_log(
        "deleted a function library no live node calls",
        sessionhub_tests::WAIT,
    )
    .await;
    // The node works on.
    let s = Api::new(&node).create_session("frank", "laptop").await;
    assert_eq!(Api::new(&node).me_status(&s.token).await, 200);
}
