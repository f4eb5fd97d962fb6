//! What every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sessionhub_core::Engine;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::ApiError;
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
    /// Cancelled when the node must stop on its own (another process took its
    /// node id): [`crate::app::Application::run_until`] then shuts down as on a
    /// signal and returns an error.
    pub halt: CancellationToken,
}

impl AppState {
    /// Whether this node should get traffic (`/readyz`), all in one place: not
    /// shutting down; resynced since the engine last asked for it (after a
    /// resubscription or a new lease, records may be missing and events lost); and
    /// the engine's own check (Redis answers, the subscriber holds its channels and
    /// its probes come back).
    pub async fn check_ready(&self) -> Result<(), ApiError> {
        match self.readiness().await {
            Ok(()) => Ok(()),
            Err(Some(e)) => Err(e.into()),
            Err(None) => Err(ApiError::Unavailable),
        }
    }

    /// [`AppState::check_ready`] without the answer: for the node's own status
    /// reports, which must not log an error every heartbeat while it is not ready.
    pub async fn is_ready(&self) -> bool {
        match self.readiness().await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = ?e, "not ready");
                false
            }
        }
    }

    /// The checks of readiness; the store's error, if that is what failed.
    async fn readiness(&self) -> Result<(), Option<sessionhub_core::EngineError>> {
        if self.shutdown.is_cancelled() {
            return Err(None);
        }
        if self.synced.load(Ordering::Acquire) != self.engine.generation() {
            tracing::debug!("not ready: re-asserting this node's records");
            return Err(None);
        }
        self.engine.ping().await.map_err(Some)
    }
}
