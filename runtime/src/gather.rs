//! Fan-in for a fan-out: the replies of N recipients gathered into N write-once cells, with
//! one wake-up for the caller when the last one is in.
//!
//! A fan-out used to gather its replies on a bounded channel: every reply took the channel's
//! contended path (a permit, a block slot, a wake of the caller), and every
//! recipient held a cloned sender. Here each recipient owns one cell and fills it once, and a
//! countdown wakes the caller only when it reaches zero, so a round of 928 replies costs the
//! caller one wake instead of 928. A recipient that drops its slot unanswered fills its cell
//! with `None` (so a refused, dropped or crashed request still counts down), and a reply that
//! comes after the caller gave up fills a cell nobody reads.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;

/// The cells of one fan-out.
#[derive(Debug)]
pub(crate) struct Gather {
    cells: Box<[OnceLock<Option<Bytes>>]>,
    /// Cells not yet filled.
    remaining: AtomicUsize,
    waker: AtomicWaker,
}

impl Gather {
    /// Cells for `n` recipients.
    pub(crate) fn new(n: usize) -> Arc<Gather> {
        Arc::new(Gather {
            cells: (0..n).map(|_| OnceLock::new()).collect(),
            remaining: AtomicUsize::new(n),
            waker: AtomicWaker::new(),
        })
    }

    /// The slot of recipient `index` (each index is handed out once).
    pub(crate) fn slot(self: &Arc<Self>, index: u32) -> GatherSlot {
        GatherSlot {
            gather: self.clone(),
            index,
            answered: false,
        }
    }

    /// Waits until every cell is filled. Cancel-safe: dropping the wait loses nothing, the
    /// cells keep what arrives.
    pub(crate) async fn all(&self) {
        poll_fn(|cx| {
            if self.remaining.load(Ordering::Acquire) == 0 {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A last fill between the check and the registration woke nobody: look again.
            if self.remaining.load(Ordering::Acquire) == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// What cell `index` holds: `None` if not filled yet, `Some(None)` if its recipient
    /// dropped the request unanswered, `Some(Some(reply))` for a reply.
    pub(crate) fn get(&self, index: usize) -> Option<Option<Bytes>> {
        self.cells.get(index)?.get().cloned()
    }

    fn fill(&self, index: u32, answer: Option<Bytes>) {
        let Some(cell) = self.cells.get(index as usize) else {
            return;
        };
        // Each index has one slot, so the cell is always empty here and `set` never waits.
        if cell.set(answer).is_ok() && self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }
}

/// One recipient's place in a [`Gather`]: answered once, or filled with `None` on drop.
#[derive(Debug)]
pub(crate) struct GatherSlot {
    gather: Arc<Gather>,
    index: u32,
    answered: bool,
}

impl GatherSlot {
    /// Fills the cell with the reply.
    pub(crate) fn send(mut self, answer: Bytes) {
        self.answered = true;
        self.gather.fill(self.index, Some(answer));
    }
}

impl Drop for GatherSlot {
    fn drop(&mut self) {
        if !self.answered {
            self.gather.fill(self.index, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_once_every_cell_is_filled_answered_or_dropped() {
        let g = Gather::new(3);
        let (a, b, c) = (g.slot(0), g.slot(1), g.slot(2));
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.all().await }
        });
        a.send(Bytes::from_static(b"a"));
        drop(b);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one cell is still empty");
        c.send(Bytes::from_static(b"c"));
        waiter.await.expect("woken");
        assert_eq!(g.get(0), Some(Some(Bytes::from_static(b"a"))));
        assert_eq!(g.get(1), Some(None));
        assert_eq!(g.get(2), Some(Some(Bytes::from_static(b"c"))));
    }

    #[tokio::test]
    async fn an_unfilled_cell_reads_as_nothing_yet() {
        let g = Gather::new(2);
        let a = g.slot(0);
        let _late = g.slot(1);
        a.send(Bytes::from_static(b"a"));
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(20), g.all()).await;
        assert!(timed_out.is_err());
        assert_eq!(g.get(1), None);
        assert_eq!(g.get(7), None);
    }
}
