//! A counting bound with an async wait for room: the one backpressure primitive behind both the
//! per-priority task queues and the agent mailboxes; and [`Shares`], the per-holder variant that
//! keeps one kind from taking all of a priority's queue.
//!
//! Reserving is a compare-and-swap; releasing is a subtraction plus, only when someone is
//! waiting, a [`Notify`]. A full bound never grows: callers either give up at once
//! ([`Bound::try_reserve`]) or wait for a release up to a deadline ([`Bound::reserve_until`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

use crate::priority::Priority;

/// One holder's share of each priority's places (a kind's share of the task queues): a count
/// per priority against a bound, taken at admission and given back when the [`ShareGuard`]
/// drops. No wait: a share used up refuses at once.
pub(crate) struct Shares {
    held: [AtomicUsize; Priority::COUNT],
    bound: [usize; Priority::COUNT],
}

/// A place in a [`Shares`], given back on drop.
pub(crate) struct ShareGuard {
    shares: Arc<Shares>,
    priority: usize,
}

impl std::fmt::Debug for ShareGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareGuard")
            .field("priority", &self.priority)
            .finish()
    }
}

impl Drop for ShareGuard {
    #[inline]
    fn drop(&mut self) {
        self.shares.held[self.priority].fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shares {
    /// Bounds per priority (`usize::MAX`: none).
    pub(crate) fn new(bound: [usize; Priority::COUNT]) -> Self {
        Shares {
            held: std::array::from_fn(|_| AtomicUsize::new(0)),
            bound,
        }
    }

    /// Takes a place at `p`: `Ok(None)` when no bound applies, `Err((held, bound))` when the
    /// share is used up.
    #[inline]
    pub(crate) fn take(
        self: &Arc<Self>,
        p: Priority,
    ) -> Result<Option<ShareGuard>, (usize, usize)> {
        let i = p.index();
        let bound = self.bound[i];
        if bound == usize::MAX {
            return Ok(None);
        }
        let before = self.held[i].fetch_add(1, Ordering::AcqRel);
        if before >= bound {
            self.held[i].fetch_sub(1, Ordering::AcqRel);
            return Err((before, bound));
        }
        Ok(Some(ShareGuard {
            shares: self.clone(),
            priority: i,
        }))
    }
}

pub(crate) struct Bound {
    count: AtomicUsize,
    capacity: usize,
    space: Notify,
    waiters: AtomicUsize,
}

impl Bound {
    pub(crate) fn new(capacity: usize) -> Self {
        Bound {
            count: AtomicUsize::new(0),
            capacity,
            space: Notify::new(),
            waiters: AtomicUsize::new(0),
        }
    }

    /// Slots in use.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The bound.
    #[inline]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Takes one slot, or returns how many were in use when it could not.
    #[inline]
    pub(crate) fn try_reserve(&self) -> Result<(), usize> {
        let mut current = self.count.load(Ordering::Relaxed);
        loop {
            if current >= self.capacity {
                return Err(current);
            }
            match self.count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => current = now,
            }
        }
    }

    /// Takes one slot even past the bound (for work that was admitted once already).
    #[inline]
    pub(crate) fn force_reserve(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns one slot.
    #[inline]
    pub(crate) fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// Takes one slot, waiting for a release until `until`; on timeout returns the count in use.
    pub(crate) async fn reserve_until(&self, until: Instant) -> Result<(), usize> {
        loop {
            if self.try_reserve().is_ok() {
                return Ok(());
            }
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiters.fetch_add(1, Ordering::SeqCst);
            // Re-check after announcing ourselves: a release between the first check and the
            // announcement would otherwise be missed.
            if self.try_reserve().is_ok() {
                self.waiters.fetch_sub(1, Ordering::SeqCst);
                return Ok(());
            }
            let woke = tokio::time::timeout_at(until.into(), notified).await;
            self.waiters.fetch_sub(1, Ordering::SeqCst);
            if woke.is_err() {
                return self.try_reserve();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn refuses_past_capacity_and_reports_depth() {
        let b = Bound::new(2);
        assert!(b.try_reserve().is_ok());
        assert!(b.try_reserve().is_ok());
        assert_eq!(b.try_reserve(), Err(2));
        b.release();
        assert!(b.try_reserve().is_ok());
    }

    #[tokio::test]
    async fn waiter_gets_the_released_slot() {
        let b = Arc::new(Bound::new(1));
        b.try_reserve().unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            b2.reserve_until(Instant::now() + Duration::from_secs(5))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        b.release();
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(b.len(), 1);
    }

    #[tokio::test]
    async fn waiter_times_out_with_depth() {
        let b = Bound::new(1);
        b.try_reserve().unwrap();
        let r = b
            .reserve_until(Instant::now() + Duration::from_millis(20))
            .await;
        assert_eq!(r, Err(1));
    }
}
