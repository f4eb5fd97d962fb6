//! Keeping this node's sockets true to the shared state: applying engine events,
//! resyncing after events may have been lost, and revalidating on a fixed interval.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sessionhub_core::time::now_ms;
use sessionhub_core::{EndReason, NodeEvent, Reasserted, SessionId};
use tokio::sync::{Notify, mpsc};

use crate::metrics::Metrics;
use crate::state::AppState;

/// Pause between attempts of a resync that failed (Redis still away).
const RESYNC_RETRY: Duration = Duration::from_millis(500);
/// How often each node ends sessions whose lifetime ran out: it reads which buckets
/// are due (one command when none is) and sweeps those it claims. Every node does
/// it, so expiry works as long as any node runs; the work is idempotent.
pub const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Runs `round` every `interval` (a late round delays the next, none piles up)
/// until the node shuts down.
async fn every<F, Fut>(state: &AppState, interval: Duration, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        round().await;
    }
}

/// Tells the store, every heartbeat, where this node listens, how many sockets it
/// holds and whether it is ready: what operators see of it (`GET /api/v1/nodes`, the
/// admin console).
pub async fn announce_forever(state: AppState, address: String) {
    every(&state, state.config.lease.heartbeat, || async {
        let status = sessionhub_core::NodeStatus {
            address: address.clone(),
            sockets: state.hub.len() as u64,
            ready: state.is_ready().await,
            at: sessionhub_core::time::now_ms(),
            counters: state.metrics.announced(),
        };
        if let Err(e) = state.engine.announce(&status).await {
            tracing::debug!(error = %e, "node status not announced");
        }
    })
    .await
}

/// Ends sessions past their absolute or idle lifetime, with `session_ended`
/// (`expired`) to every node holding their sockets.
pub async fn expire_forever(state: AppState) {
    every(&state, EXPIRY_SWEEP_INTERVAL, || async {
        if let Err(e) = crate::lifecycle::expire_due(&state).await {
            tracing::debug!(error = %e, "expiry sweep skipped");
        }
    })
    .await
}

/// Applies engine events to this node's sockets, in order. Resync requests go to one
/// resync task; a request that arrives while it runs makes it run once more.
pub async fn dispatch(mut events: mpsc::Receiver<NodeEvent>, state: AppState) {
    let wanted = Arc::new(Notify::new());
    actix_web::rt::spawn(
        state
            .tasks
            .track_future(resync_forever(state.clone(), wanted.clone())),
    );
    loop {
        let event = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            NodeEvent::Resync | NodeEvent::Fenced => {
                // Before any event heard after the gap is applied.
                state.hub.note_history_points();
                wanted.notify_one();
            }
            NodeEvent::Superseded => {
                tracing::info!("stopping: this node's id is another process's now");
                state.halt.cancel();
            }
            other => state.hub.apply(&other),
        }
    }
}

async fn resync_forever(state: AppState, wanted: Arc<Notify>) {
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = wanted.notified() => {}
        }
        loop {
            // The generation is read before the attempt: if it moves meanwhile, the
            // node stays unready, and the event that moved it left a permit for
            // another round.
            let generation = state.engine.generation();
            if resync(&state).await {
                state.synced.store(generation, Ordering::Release);
                break;
            }
            // Retry after a pause, or at once when asked again (say, after a rejoin).
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RESYNC_RETRY) => {}
                _ = wanted.notified() => {}
            }
        }
    }
}

/// Why a session that vanished from the store ended, as far as this node can tell.
fn reason_for(expires_at: i64, now: i64) -> EndReason {
    if expires_at <= now {
        EndReason::Expired
    } else {
        EndReason::Killed
    }
}

/// Re-asserts the records of every socket this node holds (the store may have lost
/// them, or this node was fenced), and closes the sockets of sessions that are gone.
/// Returns false if the store could not be reached.
pub async fn resync(state: &AppState) -> bool {
    let (records, points) = state.hub.records_to_resync();
    let Reasserted { mut gone, missed } = match state.engine.reassert(&records).await {
        Ok(found) => found,
        Err(e) => {
            state.hub.keep_history_points(points);
            tracing::warn!(error = %e, "resync failed; retrying");
            return false;
        }
    };
    // One entry per socket of a gone session: each session once.
    gone.sort_unstable();
    gone.dedup();
    end_gone(state, &gone);
    // Frames for them were published while this node heard nothing: they reconnect
    // with `since` and get them from history, in order.
    let closed = state.hub.settle_held(&points, &missed);
    if closed > 0 {
        Metrics::add(&state.metrics.missed_closes, closed as u64);
        tracing::info!(
            sockets = closed,
            "closed sockets that missed messages while unsubscribed; they recover on reconnect"
        );
    }
    // A socket that closed while the resync ran may just have had its record put
    // back; take it out again.
    for r in &records {
        if !state.hub.contains(&r.connection_id) {
            let _ = state.engine.unregister_connection(&r.connection_id).await;
        }
    }
    tracing::info!(sockets = records.len(), "resynced");
    true
}

/// Closes the sockets of sessions the store no longer has (each listed once).
fn end_gone(state: &AppState, gone: &[SessionId]) {
    if gone.is_empty() {
        return;
    }
    let now = now_ms();
    for sid in gone {
        if let Some(expires_at) = state.hub.session_expiry(sid) {
            state.hub.end_session(sid, reason_for(expires_at, now));
        }
    }
    tracing::info!(
        sessions = gone.len(),
        "closed sockets of sessions that ended unseen"
    );
}

/// Records younger than this are left alone by reconciliation: a socket that
/// registered after the list of held sockets was taken is not a ghost.
pub const RECONCILE_GRACE: Duration = Duration::from_secs(5);

/// Every `interval`, removes this node's connection records in the store that it
/// holds no socket for (left by calls whose outcome it never learnt, or restored by
/// an AOF replay), so presence and the socket limits count real sockets.
pub async fn reconcile_forever(state: AppState, interval: Duration) {
    every(&state, interval, || async {
        let before = now_ms() - RECONCILE_GRACE.as_millis() as i64;
        match state.engine.reconcile(state.hub.as_ref(), before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                records = n,
                "removed records of sockets this node does not hold"
            ),
            Err(e) => tracing::debug!(error = %e, "reconciliation skipped"),
        }
    })
    .await
}

/// Revalidation runs in this many slices per interval, each for the sessions of
/// 1/16 of the Redis buckets (the hub keeps its sessions in these slices): a node
/// with N sockets then asks Redis about N/16 sessions every interval/16, not about
/// all N at once. The whole burst held Redis (and the node's thread) for
/// milliseconds every interval, in the way of every kill and publish meanwhile
/// (3,000 sockets: ~5 ms; 100,000: ~0.2 s).
pub const REVALIDATE_SLICES: usize = crate::hub::SESSION_SLICES;

/// Checks, slice by slice, that the sessions of this node's sockets still exist, so
/// a lost kill message never keeps a socket open longer than `interval`: each
/// session is checked once per `interval`.
pub async fn revalidate_forever(state: AppState, interval: Duration) {
    let tick = (interval / REVALIDATE_SLICES as u32).max(Duration::from_millis(1));
    let mut turn = 0;
    every(&state, tick, || {
        let slice = turn;
        turn = (turn + 1) % REVALIDATE_SLICES;
        revalidate_slice_now(&state, slice)
    })
    .await
}

/// Revalidates the sessions of one slice (see [`REVALIDATE_SLICES`]).
async fn revalidate_slice_now(state: &AppState, slice: usize) {
    let sids = state.hub.session_ids_in_slice(slice);
    if sids.is_empty() {
        return;
    }
    match state.engine.sessions_alive(&sids).await {
        Ok(alive) => {
            let gone: Vec<SessionId> = sids
                .into_iter()
                .zip(alive)
                .filter(|(_, a)| !a)
                .map(|(s, _)| s)
                .collect();
            end_gone(state, &gone);
        }
        Err(e) => tracing::debug!(error = %e, "revalidation skipped"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every bucket falls in one slice and every slice holds as many buckets, so
    /// each tick asks about ~1/16 of the sessions and a session is asked about once
    /// per interval.
    #[test]
    fn revalidation_slices_split_the_buckets_evenly() {
        let mut per_slice = [0usize; REVALIDATE_SLICES];
        for b in 0..=255u8 {
            let sid = SessionId::parse(&format!("{b:02x}{}", "0".repeat(30))).unwrap();
            let slice = crate::hub::session_slice(&sid);
            assert_eq!(slice, usize::from(b) % REVALIDATE_SLICES);
            let bucket = sessionhub_redis::Bucket::of(sid.as_str()).index();
            assert_eq!(
                slice,
                bucket % REVALIDATE_SLICES,
                "a slice is whole buckets"
            );
            per_slice[slice] += 1;
        }
        assert!(per_slice.iter().all(|&n| n == 256 / REVALIDATE_SLICES));
    }
}
