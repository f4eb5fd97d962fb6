//! What every handler shares.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use sessionhub_core::Engine;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Shared by all handlers and socket tasks of a node.
#[derive(Clone)]
pub struct AppState {
    /// Storage and event bus.
    pub engine: Arc<dyn Engine>,
    /// The sockets this node holds.
    pub hub: Arc<Hub>,
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Cancelled when the node shuts down: every socket closes with 1001, every
    /// background loop returns.
    pub shutdown: CancellationToken,
    /// The socket tasks: shutdown waits for them (each closes and removes itself
    /// from the hub) before the node leaves the cluster.
    pub sockets: TaskTracker,
    /// The background loops (dispatch, resync, revalidation, expiry,
    /// reconciliation): joined last.
    pub tasks: TaskTracker,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The engine generation of this node's last successful resync: while it lags
    /// the engine's (events may have been lost, records may be missing), the node
    /// is not ready.
    pub synced: Arc<AtomicU64>,
}
