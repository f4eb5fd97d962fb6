//! Records whose fate is unknown, removed once Redis confirms.
//!
//! A call that failed or timed out may still run in Redis (it waited in the socket
//! while Redis was paused) or may have run with its answer lost. The deadline each
//! function gets refuses the late ones; this queue covers the rest, and the
//! unregistrations that failed outright (Redis restarting while a socket closed):
//! each item is retried until Redis answers, so no record of a socket this node does
//! not hold outlives a Redis blip by more than about [`RETRY_INTERVAL`] once Redis
//! answers again. Items are idempotent: removing a record that is not there does
//! nothing. Calls to one key go over one connection, in order, so an item runs after
//! the call it cleans up after.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sessionhub_core::{ConnectionId, EngineError, SessionId};
use tokio::sync::Notify;

use crate::client::Inner;
use crate::keys::Bucket;

/// How often the queue is retried while Redis does not answer.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Most items held; past it the oldest are dropped (and counted): a record they
/// leave behind still goes when its session ends or its node is reaped.
pub const CAPACITY: usize = 100_000;

/// Something to undo.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// A connection record that must not exist (the socket is gone).
    Connection(ConnectionId),
    /// A session whose creation was answered with an error, so no one has its token.
    Session(SessionId),
    /// A bucket the sweep index must learn is due at this time (a login's session,
    /// whose `ZADD` did not get through).
    Due(Bucket, i64),
}

/// Queues its item when dropped, unless disarmed: for a call whose future may be
/// dropped before its answer is seen.
pub(crate) struct OnDrop<'a> {
    queue: &'a Queue,
    item: Option<Item>,
}

impl<'a> OnDrop<'a> {
    /// Armed with `item`.
    pub(crate) fn new(queue: &'a Queue, item: Item) -> Self {
        Self {
            queue,
            item: Some(item),
        }
    }

    /// The answer was seen: nothing to undo.
    pub(crate) fn disarm(mut self) {
        self.item = None;
    }
}

impl Drop for OnDrop<'_> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.queue.push(item);
        }
    }
}

/// The queue, shared by the engine's calls and the retry task.
#[derive(Default)]
pub(crate) struct Queue {
    items: Mutex<VecDeque<Item>>,
    wake: Notify,
    dropped: AtomicU64,
    /// Items taken out by the retry task and not yet done or put back.
    working: AtomicU64,
}

impl Queue {
    /// Queues an item and wakes the retry task.
    pub(crate) fn push(&self, item: Item) {
        let mut items = match self.items.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if items.len() >= CAPACITY {
            items.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        items.push_back(item);
        drop(items);
        self.wake.notify_one();
    }

    /// Takes every item out to be retried (they count as pending until done or
    /// put back).
    fn take(&self) -> Vec<Item> {
        let mut items = match self.items.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let taken: Vec<Item> = items.drain(..).collect();
        self.working.store(taken.len() as u64, Ordering::Relaxed);
        taken
    }

    /// One taken item is done.
    fn done_one(&self) {
        self.working.fetch_sub(1, Ordering::Relaxed);
    }

    fn put_back(&self, rest: Vec<Item>) {
        let mut items = match self.items.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        self.working.store(0, Ordering::Relaxed);
        for item in rest.into_iter().rev() {
            if items.len() >= CAPACITY {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            items.push_front(item);
        }
    }

    /// Items not done yet: waiting, or being retried.
    pub(crate) fn pending(&self) -> u64 {
        let items = match self.items.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        items.len() as u64 + self.working.load(Ordering::Relaxed)
    }

    /// Items given up because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Items waiting.
    pub(crate) fn len(&self) -> usize {
        match self.items.lock() {
            Ok(g) => g.len(),
            Err(poisoned) => poisoned.into_inner().len(),
        }
    }
}

/// Works the queue until the engine stops: at once when an item comes, then every
/// [`RETRY_INTERVAL`] while items wait.
pub(crate) async fn run(inner: Arc<Inner>) {
    loop {
        let waiting = inner.cleanup.len() > 0;
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = inner.cleanup.wake.notified(), if !waiting => {}
            _ = tokio::time::sleep(RETRY_INTERVAL), if waiting => {}
        }
        let items = inner.cleanup.take();
        let mut done = 0usize;
        for item in &items {
            match undo(&inner, item).await {
                Ok(()) => {
                    done += 1;
                    inner.cleanup.done_one();
                }
                Err(e) => {
                    tracing::debug!(error = %e, left = items.len() - done, "cleanup waits for Redis");
                    break;
                }
            }
        }
        if done > 0 {
            tracing::info!(items = done, "removed records of failed calls");
        }
        inner
            .cleanup
            .put_back(items.into_iter().skip(done).collect());
    }
}

async fn undo(inner: &Inner, item: &Item) -> Result<(), EngineError> {
    match item {
        Item::Connection(cid) => inner.unregister(cid).await,
        Item::Session(sid) => inner.end_unseen_session(sid).await,
        Item::Due(b, at) => inner.note_due(&[(*b, *at)]).await,
    }
}
