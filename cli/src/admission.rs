//! Load shedding at the node: an adaptive bound on the tasks HTTP clients have in the pool at
//! once, so an overloaded node refuses the excess at once (429 `overloaded` with `Retry-After`)
//! instead of queueing it until every request is slow.
//!
//! Why a bound on tasks in flight: past the pool's capacity every accepted task waits behind the
//! others, so latency grows with the backlog while goodput does not; and each waiting request
//! holds a connection, so clients open more, and connection churn eats the CPU the pool needed.
//! By Little's law, at capacity `C` tasks/s a bound of `L` tasks in flight keeps the total time in
//! the node near `L / C`.
//!
//! The bound adapts (additive increase, multiplicative decrease) to two signals of overload,
//! measured every 100 ms:
//!
//! * **queueing in the pool**: the p90 time tasks waited in a queue before an agent took them
//!   ([`troupe::QueueWaitWindow`]), over the last period. Handler time does not enter it, so a
//!   mix of 20 ms calls and microsecond tasks reads the same as one of either;
//! * **a saturated CPU**: how late a 5 ms timer on the node's runtime fires, the median over the
//!   period. When the CPU is the bottleneck, requests queue in sockets before any handler sees
//!   them, where the pool's queues cannot show it.
//!
//! Past either target (10 ms of queue wait, 2 ms of timer lag) the bound drops by 10 %; below
//! both, with the bound nearly reached, it grows by 5 % (at least one). It stays between `MIN_LIMIT` and
//! `http.max_in_flight_tasks`.
//!
//! The bound is shared by priority, most urgent last to go: `critical` is never shed here (only
//! its queue bound refuses it); `high` is shed at the full bound, `normal` at 90 % of it, `low` at
//! 75 %, `background` at 60 %. Under overload the least urgent work is refused first, and a
//! burst of critical work always finds room.
//!
//! A permit is taken after the request is parsed (its priority is in the body) and held until the
//! task's outcome is known — the response for `?wait=true`, the background waiter for a 202 — so
//! asynchronous tasks count too. Taking one is two atomic operations; nothing here locks or
//! allocates. (tower's `ConcurrencyLimit` and `LoadShed` bound requests in flight, not tasks,
//! and cannot see a priority in the body; this is the same idea at the level that matters here.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use troupe::{PerPriority, Priority, QueueWaitWindow};

/// The share of the bound each priority may use, in percent; `critical` is never shed.
const SHARE_PERCENT: PerPriority<usize> = PerPriority([usize::MAX, 100, 90, 75, 60]);

/// The bound never adapts below this.
const MIN_LIMIT: usize = 16;

/// How often the bound adapts.
const PERIOD: Duration = Duration::from_millis(100);

/// Overload: tasks waited longer than this in the pool's queues (p90 over a period)...
const QUEUE_WAIT_TARGET: Duration = Duration::from_millis(10);

/// ...or the node's own timers fired this late, as the median of a period (the CPU is
/// saturated).
const LAG_TARGET: Duration = Duration::from_millis(2);

/// Tasks in flight from HTTP clients, against an adaptive bound.
#[derive(Debug)]
pub struct Admission {
    in_flight: AtomicUsize,
    /// The bound now.
    limit: AtomicUsize,
    /// The configured ceiling (`usize::MAX` for none).
    max: usize,
    /// Largest in-flight count seen since the controller last looked.
    peak: AtomicUsize,
    /// Last period's signals, for `/stats`.
    last_queue_wait_us: AtomicU64,
    last_lag_us: AtomicU64,
    shed: PerPriority<metrics::Counter>,
}

/// A task's place under the bound, given back on drop.
#[derive(Debug)]
pub struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The node is past its bound for this priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    /// Tasks in flight when the request was refused.
    pub in_flight: usize,
    /// The bound for the request's priority.
    pub limit: usize,
}

/// What `/stats` shows of the controller.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct AdmissionStats {
    /// Tasks from HTTP clients in the pool now.
    pub in_flight: usize,
    /// The adaptive bound now (`null`: no bound).
    pub limit: Option<usize>,
    /// The configured ceiling (`null`: no bound).
    pub max: Option<usize>,
    /// The p90 queue wait of the last period, µs.
    pub queue_wait_p90_us: u64,
    /// How late the node's timer fired in the last period, µs.
    pub timer_lag_us: u64,
}

fn threshold(limit: usize, p: Priority) -> usize {
    let pct = SHARE_PERCENT[p];
    if pct == usize::MAX || limit == usize::MAX {
        usize::MAX
    } else {
        (limit.saturating_mul(pct) / 100).max(1)
    }
}

impl Admission {
    /// A bound of at most `max` tasks in flight (0: no bound). It starts at `max` and adapts
    /// once [`Admission::control`] runs. `shed` counts refusals per priority.
    pub fn new(max: usize, shed: PerPriority<metrics::Counter>) -> Arc<Self> {
        let max = if max == 0 { usize::MAX } else { max };
        Arc::new(Admission {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(max),
            max,
            peak: AtomicUsize::new(0),
            last_queue_wait_us: AtomicU64::new(0),
            last_lag_us: AtomicU64::new(0),
            shed,
        })
    }

    /// Takes a permit for a task of `priority`, or refuses at once.
    #[inline]
    pub fn try_enter(self: &Arc<Self>, priority: Priority) -> Result<Permit, Overloaded> {
        let limit = threshold(self.limit.load(Ordering::Relaxed), priority);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed[priority].increment(1);
            return Err(Overloaded {
                in_flight: before,
                limit,
            });
        }
        self.peak.fetch_max(before + 1, Ordering::Relaxed);
        Ok(Permit(self.clone()))
    }

    /// The controller's view now.
    pub fn stats(&self) -> AdmissionStats {
        let bound = |v: usize| (v != usize::MAX).then_some(v);
        AdmissionStats {
            in_flight: self.in_flight.load(Ordering::Acquire),
            limit: bound(self.limit.load(Ordering::Relaxed)),
            max: bound(self.max),
            queue_wait_p90_us: self.last_queue_wait_us.load(Ordering::Relaxed),
            timer_lag_us: self.last_lag_us.load(Ordering::Relaxed),
        }
    }

    /// One period's decision, from its signals.
    fn adapt(&self, queue_wait_p90: Duration, lag: Duration) {
        if self.max == usize::MAX {
            return;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let peak = self.peak.swap(0, Ordering::Relaxed);
        let next = if queue_wait_p90 > QUEUE_WAIT_TARGET || lag > LAG_TARGET {
            limit * 9 / 10
        } else if peak * 10 >= limit * 8 {
            // Healthy and using the room it has: grow.
            limit + (limit / 20).max(1)
        } else {
            limit
        };
        self.limit.store(
            next.clamp(MIN_LIMIT.min(self.max), self.max),
            Ordering::Relaxed,
        );
    }

    /// Adapts the bound every 100 ms until the node stops; run it on the node's runtime (its
    /// timer lag is one of the signals).
    pub async fn control(self: Arc<Self>, mut queue_wait: QueueWaitWindow) {
        const BEAT: Duration = Duration::from_millis(5);
        let mut tick = tokio::time::interval(BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut period_start = Instant::now();
        let mut lags: Vec<Duration> = Vec::with_capacity(64);
        let mut expected = Instant::now() + BEAT;
        loop {
            tick.tick().await;
            let now = Instant::now();
            lags.push(now.saturating_duration_since(expected));
            expected = now + BEAT;
            if now.duration_since(period_start) < PERIOD {
                continue;
            }
            // The median, not the worst: one long poll (a CPU-heavy handler sharing the
            // thread) is not a saturated CPU; most beats firing late is.
            lags.sort_unstable();
            let lag = lags.get(lags.len() / 2).copied().unwrap_or_default();
            lags.clear();
            let wait = queue_wait.take();
            let wait_p90 = Duration::from_nanos((wait.p90_us * 1_000.0) as u64);
            self.last_queue_wait_us
                .store(wait_p90.as_micros() as u64, Ordering::Relaxed);
            self.last_lag_us
                .store(lag.as_micros() as u64, Ordering::Relaxed);
            self.adapt(wait_p90, lag);
            period_start = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limit: usize) -> Arc<Admission> {
        Admission::new(limit, PerPriority::from_fn(|_| metrics::Counter::noop()))
    }

    #[test]
    fn lower_priorities_are_shed_first_and_critical_never() {
        let a = admission(100);
        let mut held = Vec::new();
        // Background stops at 60 in flight.
        while let Ok(p) = a.try_enter(Priority::Background) {
            held.push(p);
        }
        assert_eq!(held.len(), 60);
        assert_eq!(
            a.try_enter(Priority::Background).unwrap_err(),
            Overloaded {
                in_flight: 60,
                limit: 60
            }
        );
        // Normal still gets in up to 90, high up to 100.
        while let Ok(p) = a.try_enter(Priority::Normal) {
            held.push(p);
        }
        assert_eq!(held.len(), 90);
        while let Ok(p) = a.try_enter(Priority::High) {
            held.push(p);
        }
        assert_eq!(held.len(), 100);
        // Critical is never refused by the limiter.
        for _ in 0..1000 {
            held.push(a.try_enter(Priority::Critical).unwrap());
        }
        // Permits give their place back.
        held.clear();
        assert_eq!(a.stats().in_flight, 0);
        assert!(a.try_enter(Priority::Background).is_ok());
    }

    #[test]
    fn the_bound_shrinks_under_overload_and_grows_back_when_used() {
        let a = admission(1000);
        let held: Vec<_> = (0..500)
            .map(|_| a.try_enter(Priority::High).unwrap())
            .collect();
        // Queueing past the target: down by 10 %.
        a.adapt(Duration::from_millis(50), Duration::ZERO);
        assert_eq!(a.stats().limit, Some(900));
        // A saturated CPU alone is overload too.
        a.adapt(Duration::ZERO, Duration::from_millis(20));
        assert_eq!(a.stats().limit, Some(810));
        a.adapt(Duration::ZERO, Duration::from_millis(20));
        a.adapt(Duration::ZERO, Duration::from_millis(20));
        assert_eq!(a.stats().limit, Some(656));
        // Healthy, but the room is not used (peak 0 since): it stays.
        drop(held);
        a.adapt(Duration::ZERO, Duration::ZERO);
        assert_eq!(a.stats().limit, Some(656));
        // Healthy and nearly full: it grows by 5 %.
        let held: Vec<_> = (0..600)
            .map(|_| a.try_enter(Priority::High).unwrap())
            .collect();
        a.adapt(Duration::ZERO, Duration::ZERO);
        assert_eq!(a.stats().limit, Some(688));
        drop(held);
        // Never below the floor, never above the ceiling.
        for _ in 0..100 {
            a.adapt(Duration::from_secs(1), Duration::ZERO);
        }
        assert_eq!(a.stats().limit, Some(MIN_LIMIT));
    }

    #[test]
    fn zero_means_no_limit() {
        let a = admission(0);
        let held: Vec<_> = (0..10_000)
            .map(|_| a.try_enter(Priority::Background).unwrap())
            .collect();
        assert_eq!(a.stats().in_flight, 10_000);
        assert_eq!(a.stats().limit, None);
        a.adapt(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(a.stats().limit, None);
        drop(held);
    }
}
