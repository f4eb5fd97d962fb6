//! Nodes on either Redis topology, so that one scenario runs on one Redis and on
//! Redis Cluster unchanged.

use crate::process::{Node, NodeOptions, RedisServer};
use crate::redis_cluster::RedisCluster;

/// Which Redis the nodes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One redis-server (`SESSIONHUB_REDIS_URL`).
    Single,
    /// A 3-master Redis Cluster with one replica each (`SESSIONHUB_REDIS_CLUSTER`).
    Cluster,
}

/// The running store.
pub enum Store {
    /// One redis-server.
    Single(RedisServer),
    /// A Redis Cluster.
    Cluster(RedisCluster),
}

/// A store and N nodes on it, named `node-a`, `node-b`, ...
pub struct Deployment {
    /// The shared Redis.
    pub store: Store,
    /// The nodes.
    pub nodes: Vec<Node>,
}

impl Deployment {
    /// Starts the store and `n` nodes.
    pub async fn start(topology: Topology, n: usize) -> Self {
        Self::start_with(topology, n, &[]).await
    }

    /// Starts the store and `n` nodes with extra environment.
    pub async fn start_with(topology: Topology, n: usize, env: &[(&str, &str)]) -> Self {
        let store = match topology {
            Topology::Single => Store::Single(RedisServer::start().await),
            Topology::Cluster => Store::Cluster(RedisCluster::start().await),
        };
        let mut d = Self {
            store,
            nodes: Vec::new(),
        };
        for i in 0..n {
            let node = d.node(i, env).await;
            d.nodes.push(node);
        }
        d
    }

    /// Starts node number `i` (`node-a`, `node-b`, ...) on this store.
    pub async fn node(&self, i: usize, env: &[(&str, &str)]) -> Node {
        let mut opts = NodeOptions::numbered(i, env);
        match &self.store {
            Store::Single(r) => opts.redis_url = Some(r.url()),
            Store::Cluster(c) => opts
                .env
                .push(("SESSIONHUB_REDIS_CLUSTER".into(), c.cluster_env())),
        }
        Node::start(opts).await
    }

    /// A connection to the Redis that holds `key` (on Redis Cluster, the master that
    /// owns its slot).
    pub async fn conn_for(&self, key: &str) -> redis::aio::MultiplexedConnection {
        match &self.store {
            Store::Single(r) => r.conn().await,
            Store::Cluster(c) => c.conn(c.master_for_key(key).await).await,
        }
    }

    /// How many subscribers each channel has: `PUBSUB NUMSUB` on one Redis, `PUBSUB
    /// SHARDNUMSUB` on the master that owns the channel's slot on Redis Cluster.
    pub async fn numsub(&self, channels: &[String]) -> Vec<u64> {
        match &self.store {
            Store::Single(r) => {
                let mut c = r.conn().await;
                let pairs: Vec<(String, u64)> = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(channels)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                pairs.into_iter().map(|(_, n)| n).collect()
            }
            Store::Cluster(c) => {
                let mut out = Vec::new();
                for ch in channels {
                    let owner = c.master_for_key(ch).await;
                    out.push(c.shard_numsub(owner, ch).await);
                }
                out
            }
        }
    }
}

/// Runs each named `async fn name(topology: Topology)` of the calling test file as
/// two tests: `single::name` (one Redis) and `redis_cluster::name` (Redis Cluster).
#[macro_export]
macro_rules! on_both_topologies {
    ($($name:ident),* $(,)?) => {
        mod single {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Topology::Single).await
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Topology::Cluster).await
                }
            )*
        }
    };
}
