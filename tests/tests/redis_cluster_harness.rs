//! The Redis Cluster harness itself: it forms a 3 x (master + replica) cluster,
//! computes hash slots like the server, follows a manual failover and a killed
//! master's replacement.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Instant;

use sessionhub_tests::{RedisCluster, WAIT, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEYS: &[&str] = &[
    "sh:{2b}:session:abc",
    "foo",
    "{}x",
    "a{b}c",
    "{user1000}.following",
    "foo{{bar}}zap",
    "",
    "sh:{tenant-ünïcode}:x",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_fails_over_and_survives_a_killed_master() {
    let t0 = Instant::now();
    let mut cluster = RedisCluster::start().await;
    eprintln!("cluster up in {:?}", t0.elapsed());

    let seeds = cluster.seeds();
    assert_eq!(seeds.len(), 6);
    assert!(seeds.iter().all(|s| s.starts_with("redis://127.0.0.1:")));
    assert_eq!(cluster.cluster_env(), seeds.join(","));

    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    let shards = cluster.shards().await;
    assert_eq!(shards[0].slots[0].0, 0);
    assert!(shards.iter().all(|s| s.replicas.len() == 1), "{shards:?}");
    assert_eq!(cluster.master_for_slot(0).await, masters[0]);
    assert_eq!(cluster.master_for_slot(16383).await, masters[2]);

    // key_slot agrees with the server.
    let mut c = cluster.conn(masters[0]).await;
    for key in KEYS {
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(*key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(RedisCluster::key_slot(key), server, "key {key:?}");
    }

    // The computed owner accepts the key; another master redirects.
    let key = "sh:{2b}:session:abc";
    let owner = cluster.master_for_key(key).await;
    let mut oc = cluster.conn(owner).await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg("v")
        .query_async(&mut oc)
        .await
        .unwrap();
    let other = *masters.iter().find(|&&m| m != owner).unwrap();
    let err = redis::cmd("GET")
        .arg(key)
        .query_async::<Option<String>>(&mut cluster.conn(other).await)
        .await
        .unwrap_err();
    assert!(err.to_string().to_uppercase().contains("MOVED"), "{err}");

    // Sharded pub/sub and command statistics on the owner of a channel.
    let channel = "sh:{2b}:events";
    let owner = cluster.master_for_key(channel).await;
    let mut sub = tokio::net::TcpStream::connect(("127.0.0.1", owner))
        .await
        .unwrap();
    sub.write_all(format!("SSUBSCRIBE {channel}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, sub.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("ssubscribe"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(cluster.shard_numsub(owner, channel).await, 1);
    cluster.reset_stats().await;
    assert_eq!(cluster.command_calls(owner, "spublish").await, 0);
    let receivers: u64 = redis::cmd("SPUBLISH")
        .arg(channel)
        .arg("hi")
        .query_async(&mut cluster.conn(owner).await)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    assert_eq!(cluster.command_calls(owner, "SPUBLISH").await, 1);
    let per_master = cluster.command_calls_per_master("spublish").await;
    assert_eq!(per_master.len(), 3);
    assert!(
        per_master.iter().all(|&(m, n)| n == u64::from(m == owner)),
        "{per_master:?}"
    );
    let stats = cluster.stats_per_master().await;
    assert_eq!(stats.iter().map(|s| s.0).collect::<Vec<_>>(), masters);
    assert!(
        stats.iter().any(|&(m, n)| m == owner && n >= 1),
        "{stats:?}"
    );
    drop(sub);

    // A manual failover swaps one master for its replica.
    let t1 = Instant::now();
    let old = masters[1];
    let replica = cluster.replicas_of(old).await[0];
    let new = cluster.failover(old).await;
    eprintln!("failover in {:?}", t1.elapsed());
    assert_eq!(new, replica);
    let after = cluster.masters().await;
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(after, vec![masters[0], new, masters[2]]);
    assert_eq!(cluster.replicas_of(new).await, vec![old]);
    assert_eq!(cluster.master_for_slot(shards[1].slots[0].0).await, new);
    // The data followed (the key's slot may or may not be in this shard).
    let owner = cluster.master_for_key(key).await;
    let got: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut cluster.conn(owner).await)
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("v"));

    // A killed master is replaced by its replica.
    let t2 = Instant::now();
    let victim = after[0];
    let heir = cluster.replicas_of(victim).await[0];
    let taken_over = cluster.kill_master(victim).await;
    eprintln!("takeover in {:?}", t2.elapsed());
    assert_eq!(taken_over, heir);
    assert_eq!(cluster.alive_ports().len(), 5);
    let last = cluster.masters().await;
    assert_eq!(last, vec![heir, after[1], after[2]]);
    assert_eq!(cluster.master_for_slot(0).await, heir);
    let slot0_key = "{06S}";
    assert_eq!(RedisCluster::key_slot(slot0_key), 0);
    wait_for("the new master to accept writes", WAIT, || {
        let cluster = &cluster;
        async move {
            let mut c = cluster.conn(heir).await;
            redis::cmd("SET")
                .arg(slot0_key)
                .arg("x")
                .query_async::<()>(&mut c)
                .await
                .ok()
        }
    })
    .await;
    let stats = cluster.stats_per_master().await;
    assert_eq!(stats.iter().map(|s| s.0).collect::<Vec<_>>(), last);
    eprintln!("whole test {:?}", t0.elapsed());
}
