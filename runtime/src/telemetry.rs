//! Recording primitives for the hot path.
//!
//! Every event the runtime counts (a task submitted, an outcome, a message sent) lands in a
//! [`StripedCounter`]: one cache-line-padded atomic per stripe, each thread writing its own
//! stripe, so two cores counting the same event never fight over one cache line. Latencies land
//! in a [`LatencyHistogram`]: HDR histograms (3 significant digits, nanoseconds) striped the same
//! way. A writer takes its stripe with `try_lock`, and on the rare collision (a reader merging,
//! or more threads than stripes) moves to the next stripe instead of waiting, so recording never
//! blocks. Readers merge the stripes into exact percentiles.
//!
//! Why not `hdrhistogram::sync::SyncHistogram`: its reader must wait for every recorder to
//! phase-shift, and a recorder only does so when it records again. A Tokio worker that goes idle
//! keeps its last samples invisible indefinitely (or until a refresh timeout drops them from that
//! read), which breaks "the report counts every task". Striping keeps recording wait-free for
//! practical purposes and every sample visible to the next read.
//!
//! Each part of the runtime owns its own set of these (the ledger its task counters, the bus its
//! message counters, supervision its start-up times, the sandbox its votes), resolved once when
//! the runtime starts; nothing here looks anything up by name, and this module imports nothing
//! else of the crate.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use crossbeam_utils::CachePadded;
use hdrhistogram::Histogram;
use serde::Serialize;

const STRIPES: usize = 8;

/// This thread's stripe, assigned round-robin on first use.
#[inline]
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        s.set(v);
        v
    })
}

/// A counter written per thread stripe and summed on read.
pub(crate) struct StripedCounter {
    stripes: [CachePadded<AtomicU64>; STRIPES],
}

impl Default for StripedCounter {
    fn default() -> Self {
        StripedCounter {
            stripes: std::array::from_fn(|_| CachePadded::new(AtomicU64::new(0))),
        }
    }
}

impl StripedCounter {
    #[inline]
    pub(crate) fn increment(&self, n: u64) {
        self.stripes[stripe()].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }
}

/// An HDR latency histogram in nanoseconds, striped per thread.
pub(crate) struct LatencyHistogram {
    stripes: [CachePadded<Mutex<Option<Histogram<u64>>>>; STRIPES],
    /// False when telemetry is switched off: recording is then a single branch.
    enabled: bool,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new(true)
    }
}

fn new_histogram() -> Option<Histogram<u64>> {
    // Auto-resizing from a small range keeps idle memory low; the 3 significant digits make
    // every reported percentile exact to 0.1 %.
    Histogram::new(3).ok()
}

fn lock_any<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LatencyHistogram {
    pub(crate) fn new(enabled: bool) -> Self {
        LatencyHistogram {
            stripes: std::array::from_fn(|_| CachePadded::new(Mutex::new(None))),
            enabled,
        }
    }

    /// Records one sample of `nanos` nanoseconds.
    #[inline]
    pub(crate) fn record(&self, nanos: u64) {
        if !self.enabled {
            return;
        }
        let first = stripe();
        for k in 0..STRIPES {
            let stripe = &self.stripes[(first + k) % STRIPES];
            match stripe.try_lock() {
                Ok(mut h) => return record_into(&mut h, nanos),
                Err(TryLockError::Poisoned(p)) => return record_into(&mut p.into_inner(), nanos),
                Err(TryLockError::WouldBlock) => continue,
            }
        }
        record_into(&mut lock_any(&self.stripes[first]), nanos);
    }

    /// Merges all stripes into one histogram.
    pub(crate) fn snapshot(&self) -> Option<Histogram<u64>> {
        let mut merged = new_histogram()?;
        for stripe in &self.stripes {
            if let Some(h) = lock_any(stripe).as_ref() {
                // Both sides auto-resize, so adding cannot fail for lack of range.
                let _ = merged.add(h);
            }
        }
        Some(merged)
    }

    /// The percentiles of everything recorded so far.
    pub(crate) fn summary(&self) -> LatencySummary {
        self.snapshot()
            .map(|h| LatencySummary::from_histogram(&h))
            .unwrap_or_default()
    }

    /// The percentiles of several histograms together.
    pub(crate) fn merged<'a>(
        all: impl IntoIterator<Item = &'a LatencyHistogram>,
    ) -> LatencySummary {
        let Some(mut merged) = new_histogram() else {
            return LatencySummary::default();
        };
        for h in all {
            if let Some(h) = h.snapshot() {
                let _ = merged.add(&h);
            }
        }
        LatencySummary::from_histogram(&merged)
    }
}

#[inline]
fn record_into(slot: &mut Option<Histogram<u64>>, nanos: u64) {
    if slot.is_none() {
        *slot = new_histogram();
    }
    if let Some(h) = slot.as_mut() {
        // `record` grows an auto-resizing histogram; `saturating_record` would clamp instead.
        if h.record(nanos.max(1)).is_err() {
            h.saturating_record(nanos.max(1));
        }
    }
}

/// Percentiles of one latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

impl LatencySummary {
    /// Summarises a nanosecond histogram.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        LatencySummary {
            count: h.len(),
            mean_us: h.mean() / 1_000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Nanoseconds since `since`, saturating.
#[inline]
pub(crate) fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds from `a` to `b` (0 if `b` is earlier), saturating.
#[inline]
pub(crate) fn nanos_between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn striped_counter_sums_across_threads() {
        let c = Arc::new(StripedCounter::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| c.increment(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(c.get(), 40_000);
    }

    #[test]
    fn histogram_keeps_every_sample_from_every_thread() {
        let h = Arc::new(LatencyHistogram::default());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || (1..=1000u64).for_each(|v| h.record(v * 1000 + t)))
            })
            .collect();
        // Reading while writers run must neither block them nor lose samples.
        let _ = h.snapshot();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let s = LatencySummary::from_histogram(&h.snapshot().unwrap());
        assert_eq!(s.count, 4000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() < 1.0, "{s:?}");
    }
}
