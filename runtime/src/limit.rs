//! Per-kind limits on how fast and how many of a kind's agents work: what a pool needs when its
//! agents call a rate-limited upstream (an LLM API answering "rate limit exceeded").
//!
//! Each kind has one [`KindLimiter`], resolved once per agent at start. Before an agent of the
//! kind runs a task it waits, inside the task's deadline, for (1) a pause to pass — set when a
//! handler of the kind answers with a retry-after ([`AgentContext::retry_after`]), so every
//! agent of the kind holds off, not only the one that was told — then (2) its turn under the
//! configured rate (GCRA: a lock-free theoretical arrival time, `burst` turns ahead at most),
//! then (3) a concurrency permit. A kind with no limit configured pays one atomic load per task.
//!
//! [`AgentContext::retry_after`]: crate::AgentContext::retry_after

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

/// One kind's limits and pause.
#[derive(Debug)]
pub(crate) struct KindLimiter {
    epoch: Instant,
    /// Nanoseconds between turns (0: no rate limit).
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run (burst − 1 intervals).
    slack: u64,
    /// The theoretical arrival time of the next turn, ns since `epoch`.
    tat: AtomicU64,
    /// No turn before this, ns since `epoch` (0: not paused).
    paused_until: AtomicU64,
    permits: Option<Semaphore>,
}

impl KindLimiter {
    pub(crate) fn new(rate: Option<f64>, burst: u32, concurrency: Option<usize>) -> Self {
        let interval = rate.map_or(0, |r| (1e9 / r) as u64);
        KindLimiter {
            epoch: Instant::now(),
            interval,
            slack: interval.saturating_mul(u64::from(burst.max(1)) - 1),
            tat: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
            permits: concurrency.map(Semaphore::new),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// True when a turn needs no waiting and no permit: the common case, checked inline.
    #[inline]
    pub(crate) fn is_free(&self) -> bool {
        self.interval == 0
            && self.permits.is_none()
            && self.paused_until.load(Ordering::Acquire) == 0
    }

    /// Holds every agent of the kind off for `d` from now (a longer pause wins).
    pub(crate) fn pause_for(&self, d: Duration) {
        let until = self
            .now()
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.paused_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Waits for this kind's turn; the permit (if the kind has a concurrency limit) is held
    /// while the task runs.
    pub(crate) async fn acquire(&self) -> Option<SemaphorePermit<'_>> {
        loop {
            let paused = self.paused_until.load(Ordering::Acquire);
            let now = self.now();
            if paused > now {
                tokio::time::sleep(Duration::from_nanos(paused - now)).await;
                continue;
            }
            if paused != 0 {
                // Past: clear it (unless a new pause came in meanwhile).
                let _ = self.paused_until.compare_exchange(
                    paused,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            break;
        }
        if self.interval > 0 {
            // GCRA: take the next turn at max(tat, now); wait until it is due.
            let mut wait = 0;
            let _ = self
                .tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                    let now = self.now();
                    let at = tat.max(now);
                    // Within `slack` of now the turn is due at once (the burst).
                    wait = (at - now).saturating_sub(self.slack);
                    Some(at + self.interval)
                });
            if wait > 0 {
                tokio::time::sleep(Duration::from_nanos(wait)).await;
            }
        }
        match &self.permits {
            Some(s) => s.acquire().await.ok(),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_spaced_by_the_rate_after_the_burst() {
        let l = KindLimiter::new(Some(100.0), 3, None);
        let start = Instant::now();
        for _ in 0..8 {
            l.acquire().await;
        }
        // 3 at once, then 5 more at 10 ms each.
        assert!(
            start.elapsed() >= Duration::from_millis(48),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_pause_holds_the_next_turn() {
        let l = KindLimiter::new(None, 1, None);
        assert!(l.is_free());
        l.pause_for(Duration::from_millis(40));
        assert!(!l.is_free());
        let start = Instant::now();
        l.acquire().await;
        assert!(start.elapsed() >= Duration::from_millis(39));
        assert!(l.is_free(), "the pause clears once passed");
    }
}
