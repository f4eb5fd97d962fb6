//! Test harness: real `redis-server` processes, real `sessionhub` node processes,
//! and clients for the HTTP API and `/ws`.
//!
//! Every wait is a poll or a read with a deadline; every port comes from the OS;
//! every process is killed when its handle drops.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod client;
pub mod deployment;
pub mod monitor;
pub mod process;
pub mod proxy;
pub mod redis_cluster;
pub mod script_cluster;
pub mod secrets;
pub mod sentinel;
pub mod tls;
pub mod webhook;

pub use client::{Api, CloseEvent, Created, WsClient, WsError, raw_upgrade, upgrade_head};
pub use deployment::{Deployment, Store, Topology};
pub use monitor::Monitor;
pub use process::{
    FAST_LEASE, FAST_REAP_BOUND, Node, NodeOptions, NotStarted, RedisServer, TestCluster,
};
pub use redis_cluster::RedisCluster;
pub use script_cluster::ScriptCluster;
pub use tls::{Pki, TlsRedis};

use std::time::Duration;

/// Default deadline for anything a test waits for. Generous: CI is a loaded 2-core
/// machine, and a deadline only matters when the test is failing anyway.
pub const WAIT: Duration = Duration::from_secs(10);

/// The service API key the test nodes use.
pub const API_KEY: &str = "test-api-key-0123456789abcdef";

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
