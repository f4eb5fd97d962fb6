//! One command connection for either topology: a single Redis (one multiplexed
//! connection, re-established on failure) or Redis Cluster (the `redis` crate's
//! cluster connection, which routes each command to the master owning its key's
//! slot, follows MOVED/ASK redirections and refreshes the slot map after a failover).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Where the nodes' shared state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One Redis server (`redis://`, `rediss://` or `unix://` URL).
    Single(String),
    /// A Redis Cluster, reached through any of these seed URLs.
    Cluster(Vec<String>),
    /// One Redis master (with replicas) watched by Redis Sentinel: the sentinels'
    /// URLs and the master's name in their configuration.
    Sentinel {
        /// The sentinels' URLs (`redis://host:26379`).
        sentinels: Vec<String>,
        /// The master's name (`sentinel monitor <name> ...`).
        master: String,
    },
}

impl Topology {
    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Topology::Cluster(_))
    }

    /// Whether any URL is `rediss://` (TLS).
    pub fn uses_tls(&self) -> bool {
        match self {
            Topology::Single(url) => crate::tls::is_tls(url),
            Topology::Cluster(seeds)
            | Topology::Sentinel {
                sentinels: seeds, ..
            } => seeds.iter().any(|s| crate::tls::is_tls(s)),
        }
    }

    /// The URLs with passwords hidden, for logs and errors.
    pub fn shown(&self) -> String {
        match self {
            Topology::Single(url) => crate::config::redact_url(url),
            Topology::Cluster(seeds) => seeds
                .iter()
                .map(|s| crate::config::redact_url(s))
                .collect::<Vec<_>>()
                .join(","),
            Topology::Sentinel { sentinels, master } => crate::sentinel::shown(sentinels, master),
        }
    }
}

/// A command connection; cheap to clone (clones share the link).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}
