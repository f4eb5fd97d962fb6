//! sessionhub: a small bounded channel from the `Session` handles to the response
//! body, in place of a tokio mpsc channel and tokio-util's `PollSender`.
//!
//! A tokio channel allocates a block of 32 slots when it is made, and `PollSender`
//! a boxed future: ~1 KiB that every idle WebSocket keeps. This one is a mutex-guarded
//! deque that holds nothing while it is empty. Both ends live on one worker thread
//! in practice; the mutex is never contended.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use actix_http::ws::Message;

struct State {
    queue: VecDeque<Message>,
    /// How many messages may wait before senders wait.
    capacity: usize,
    /// Live `Sender`s; at 0 the receiver sees the end.
    senders: usize,
    /// The receiver closed or went away: sends fail.
    rx_closed: bool,
    rx_waker: Option<Waker>,
    /// Senders waiting for room (empty, so not allocated, unless one waits).
    tx_wakers: Vec<Waker>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in this module panics while holding the lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiver is gone or closed.
#[derive(Debug)]
pub(crate) struct SendError;

/// A bounded channel of `capacity` messages.
pub(crate) fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            capacity,
            senders: 1,
            rx_closed: false,
            rx_waker: None,
            tx_wakers: Vec::new(),
        }),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The sending end; clones share the channel.
pub(crate) struct Sender {
    shared: Arc<Shared>,
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.senders -= 1;
        if st.senders == 0 {
            if let Some(w) = st.rx_waker.take() {
                drop(st);
                w.wake();
            }
        }
    }
}

impl Sender {
    /// Ready when there is room for one more message.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        let mut st = self.shared.lock();
        if st.rx_closed {
            return Poll::Ready(Err(SendError));
        }
        if st.queue.len() < st.capacity {
            return Poll::Ready(Ok(()));
        }
        if !st.tx_wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.tx_wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Queues a message (after `poll_ready`; a message past the capacity is still
    /// taken, as a reserved slot would have been).
    pub(crate) fn start_send(&self, msg: Message) -> Result<(), SendError> {
        let mut st = self.shared.lock();
        if st.rx_closed {
            return Err(SendError);
        }
        st.queue.push_back(msg);
        if let Some(w) = st.rx_waker.take() {
            drop(st);
            w.wake();
        }
        Ok(())
    }
}

/// The receiving end.
pub(crate) struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// The next message; `None` once every sender is gone (or after `close`) and
    /// the queue is empty.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let mut st = self.shared.lock();
        if let Some(msg) = st.queue.pop_front() {
            if st.queue.is_empty() {
                // An idle socket's queue holds nothing.
                st.queue = VecDeque::new();
            }
            let waiting = std::mem::take(&mut st.tx_wakers);
            drop(st);
            for w in waiting {
                w.wake();
            }
            return Poll::Ready(Some(msg));
        }
        if st.senders == 0 || st.rx_closed {
            return Poll::Ready(None);
        }
        match &st.rx_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.rx_waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Refuses further messages; those already queued can still be received.
    pub(crate) fn close(&mut self) {
        let mut st = self.shared.lock();
        st.rx_closed = true;
        let waiting = std::mem::take(&mut st.tx_wakers);
        drop(st);
        for w in waiting {
            w.wake();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.close();
        self.shared.lock().queue = VecDeque::new();
    }
}
