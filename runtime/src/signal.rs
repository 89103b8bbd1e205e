//! The wake-up flag of one agent: how anyone who gives an agent work (a task queued on one of
//! its groups, a message in its mailbox, a stop or cancel request) wakes it without a lock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

const RUNNING: u8 = 0;
const IDLE: u8 = 1;
const NOTIFIED: u8 = 2;

/// Wakes a parked agent without locks: a three-state flag plus an [`AtomicWaker`].
///
/// The agent announces `IDLE` before its last look for work, and anyone who gives it work
/// afterwards flips the flag to `NOTIFIED` and wakes it, so a wake-up is never lost.
#[derive(Default)]
pub(crate) struct Signal {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the agent whatever it is doing (a busy agent will look again before parking).
    #[inline]
    pub(crate) fn notify(&self) {
        if self.state.swap(NOTIFIED, Ordering::SeqCst) == IDLE {
            self.waker.wake();
        }
    }

    /// Wakes the agent only if it is parked; returns whether it was.
    #[inline]
    pub(crate) fn wake_if_idle(&self) -> bool {
        if self
            .state
            .compare_exchange(IDLE, NOTIFIED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.waker.wake();
            true
        } else {
            false
        }
    }

    /// Wakes the agent's task even mid-handler (used to deliver a cancel or a stop).
    pub(crate) fn force_wake(&self) {
        self.state.store(NOTIFIED, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Announces the agent is about to park. Returns false if a notification is already
    /// pending (the agent should look for work again instead).
    #[inline]
    pub(crate) fn begin_idle(&self) -> bool {
        match self
            .state
            .compare_exchange(RUNNING, IDLE, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(_) => {
                self.state.store(RUNNING, Ordering::SeqCst);
                false
            }
        }
    }

    /// Leaves the idle state without parking (work was found on the last look).
    #[inline]
    pub(crate) fn cancel_idle(&self) {
        self.state.store(RUNNING, Ordering::SeqCst);
    }

    /// Parks until notified.
    pub(crate) fn parked(&self) -> Parked<'_> {
        Parked { signal: self }
    }

    /// Registers the current task to be woken by [`notify`](Self::notify) without changing
    /// state; used while a handler runs so a cancel request reaches it.
    pub(crate) fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }
}

pub(crate) struct Parked<'a> {
    signal: &'a Signal,
}

impl Future for Parked<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.signal.waker.register(cx.waker());
        if self.signal.state.load(Ordering::SeqCst) == NOTIFIED {
            self.signal.state.store(RUNNING, Ordering::SeqCst);
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
