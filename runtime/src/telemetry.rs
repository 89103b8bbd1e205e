//! Recording primitives for the hot path.
//!
//! Every event the runtime counts (a task submitted, an outcome, a message sent) lands in a
//! [`StripedCounter`]: one cache-line-padded atomic per stripe, each thread writing its own
//! stripe, so two cores counting the same event never fight over one cache line. Latencies land
//! in a [`LatencyHistogram`]: the log-linear buckets of an HDR histogram (3 significant digits,
//! nanoseconds) kept as atomic counts, striped the same way. Recording is one `fetch_add` on the
//! sample's bucket and one `fetch_max`: wait-free, no lock anywhere, nothing a reader can hold
//! up. A stripe's bucket blocks are allocated on first use (once per block, by whichever thread
//! gets there first, with a compare-and-swap), so idle histograms cost almost nothing. Readers
//! add the stripes' counts into an `hdrhistogram::Histogram` for exact percentiles.
//!
//! Why not `hdrhistogram::sync::SyncHistogram`: its reader must wait for every recorder to
//! phase-shift, and a recorder only does so when it records again. A Tokio worker that goes idle
//! keeps its last samples invisible indefinitely (or until a refresh timeout drops them from that
//! read), which breaks "the report counts every task". Atomic buckets keep every sample visible
//! to the next read with no cooperation from the writers.
//!
//! Each part of the runtime owns its own set of these (the ledger its task counters, the bus its
//! message counters, supervision its start-up times, the sandbox its votes), resolved once when
//! the runtime starts; nothing here looks anything up by name, and this module imports nothing
//! else of the crate.

use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
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

/// A counter written per thread stripe and summed on read: a [`StripedCounters`] of one.
#[derive(Default)]
pub(crate) struct StripedCounter(StripedCounters<1>);

impl StripedCounter {
    #[inline]
    pub(crate) fn increment(&self, n: u64) {
        self.0.increment(0, n);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.get(0)
    }
}

/// `N` counters written per thread stripe and summed on read, laid out by stripe: each stripe
/// holds all `N` in one cache-padded row, so a set of counters costs `STRIPES` padded rows
/// rather than `STRIPES` padded lines per counter (the ledger's 65 counters: 4 KB, not 65 KB,
/// all of it zeroed at every runtime start). One thread writes its own row, so counters
/// sharing a line never contend.
pub(crate) struct StripedCounters<const N: usize> {
    stripes: [CachePadded<[AtomicU64; N]>; STRIPES],
}

impl<const N: usize> Default for StripedCounters<N> {
    fn default() -> Self {
        StripedCounters {
            stripes: std::array::from_fn(|_| {
                CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
            }),
        }
    }
}

impl<const N: usize> StripedCounters<N> {
    /// Adds `n` to counter `i` (an index the owner computed; out of range is a no-op).
    #[inline]
    pub(crate) fn increment(&self, i: usize, n: u64) {
        if let Some(c) = self.stripes[stripe()].get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counter `i`, summed over the stripes.
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.stripes
            .iter()
            .filter_map(|s| s.get(i))
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }
}

/// Sub-buckets per bucket: 2 048 gives 3 significant digits (HDR's layout for `sigfig = 3`).
const SUB_BUCKET_HALF_MAGNITUDE: u32 = 10;
const SUB_BUCKET_HALF: usize = 1 << SUB_BUCKET_HALF_MAGNITUDE;
const SUB_BUCKET_MASK: u64 = (2 * SUB_BUCKET_HALF as u64) - 1;
/// `64 - log2(sub-bucket count)`: HDR's fast path for the bucket of a value.
const LEADING_ZERO_BASE: u32 = 64 - (SUB_BUCKET_HALF_MAGNITUDE + 1);
/// Counts are kept in blocks of `SUB_BUCKET_HALF`; every u64 value maps into one of these.
const BLOCKS: usize = 55;

/// The count index of `value` in HDR's layout (the same index `hdrhistogram` uses for 3
/// significant digits and a lowest value of 1).
#[inline]
fn index_of(value: u64) -> usize {
    let bucket = LEADING_ZERO_BASE - (value | SUB_BUCKET_MASK).leading_zeros();
    let sub = (value >> bucket) as usize;
    ((bucket as usize + 1) << SUB_BUCKET_HALF_MAGNITUDE) + sub - SUB_BUCKET_HALF
}

/// The lowest value counted at `index` (the inverse of [`index_of`]).
#[inline]
fn value_at(index: usize) -> u64 {
    let mut bucket = (index >> SUB_BUCKET_HALF_MAGNITUDE) as i64 - 1;
    let mut sub = (index & (SUB_BUCKET_HALF - 1)) + SUB_BUCKET_HALF;
    if bucket < 0 {
        sub -= SUB_BUCKET_HALF;
        bucket = 0;
    }
    (sub as u64) << bucket
}

type Block = [AtomicU64; SUB_BUCKET_HALF];

/// One stripe: lazily allocated blocks of atomic counts, plus the largest sample.
struct Stripe {
    blocks: [AtomicPtr<Block>; BLOCKS],
    max: AtomicU64,
}

impl Stripe {
    fn new() -> Self {
        Stripe {
            blocks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            max: AtomicU64::new(0),
        }
    }

    #[inline]
    fn record(&self, nanos: u64) {
        let index = index_of(nanos);
        let block = self.block(index / SUB_BUCKET_HALF);
        block[index % SUB_BUCKET_HALF].fetch_add(1, Ordering::Relaxed);
        // `fetch_max` is a locked compare-and-swap loop even when the sample is no new
        // maximum, which almost every sample is: look first, write only a new maximum.
        if nanos > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(nanos, Ordering::Relaxed);
        }
    }

    /// The block at `b`, allocated on first use.
    #[inline]
    fn block(&self, b: usize) -> &Block {
        let slot = &self.blocks[b];
        let mut ptr = slot.load(Ordering::Acquire);
        if ptr.is_null() {
            let fresh = Box::into_raw(Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
            match slot.compare_exchange(
                std::ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => ptr = fresh,
                Err(winner) => {
                    // SAFETY: `fresh` came from `Box::into_raw` above and was never shared.
                    drop(unsafe { Box::from_raw(fresh) });
                    ptr = winner;
                }
            }
        }
        // SAFETY: a non-null pointer in `blocks` is a leaked `Box<Block>` that lives until the
        // stripe is dropped (only `Drop` frees it, with exclusive access).
        unsafe { &*ptr }
    }

    /// Adds this stripe's counts into `into`.
    fn add_to(&self, into: &mut Histogram<u64>) {
        for (b, slot) in self.blocks.iter().enumerate() {
            let ptr = slot.load(Ordering::Acquire);
            if ptr.is_null() {
                continue;
            }
            // SAFETY: see `block`.
            let block = unsafe { &*ptr };
            for (i, count) in block.iter().enumerate() {
                let n = count.load(Ordering::Relaxed);
                if n > 0 {
                    // Auto-resizing, so recording cannot fail for lack of range.
                    let _ = into.record_n(value_at(b * SUB_BUCKET_HALF + i).max(1), n);
                }
            }
        }
    }
}

impl Drop for Stripe {
    fn drop(&mut self) {
        for slot in &mut self.blocks {
            let ptr = *slot.get_mut();
            if !ptr.is_null() {
                // SAFETY: we own the stripe exclusively; the pointer came from `Box::into_raw`.
                drop(unsafe { Box::from_raw(ptr) });
            }
        }
    }
}

/// An HDR latency histogram in nanoseconds, striped per thread, recorded without locks.
pub(crate) struct LatencyHistogram {
    stripes: [CachePadded<Stripe>; STRIPES],
    /// False when telemetry is switched off: recording is then a single branch.
    enabled: bool,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new(true)
    }
}

fn new_histogram() -> Option<Histogram<u64>> {
    // Auto-resizing from a small range keeps a snapshot small; the 3 significant digits make
    // every reported percentile exact to 0.1 %, and match the recording layout bucket for bucket.
    Histogram::new(3).ok()
}

impl LatencyHistogram {
    pub(crate) fn new(enabled: bool) -> Self {
        LatencyHistogram {
            stripes: std::array::from_fn(|_| CachePadded::new(Stripe::new())),
            enabled,
        }
    }

    /// Records one sample of `nanos` nanoseconds. Wait-free.
    #[inline]
    pub(crate) fn record(&self, nanos: u64) {
        if !self.enabled {
            return;
        }
        self.stripes[stripe()].record(nanos.max(1));
    }

    /// All stripes added into one histogram.
    pub(crate) fn snapshot(&self) -> Option<Histogram<u64>> {
        let mut merged = new_histogram()?;
        for stripe in &self.stripes {
            stripe.add_to(&mut merged);
        }
        Some(merged)
    }

    /// The largest sample recorded, exactly (the buckets know it only to 3 digits).
    pub(crate) fn max(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.max.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The percentiles of everything recorded so far.
    pub(crate) fn summary(&self) -> LatencySummary {
        self.snapshot()
            .map(|h| LatencySummary::from_histogram(&h).with_max(self.max()))
            .unwrap_or_default()
    }

    /// The percentiles of several histograms together.
    pub(crate) fn merged<'a>(
        all: impl IntoIterator<Item = &'a LatencyHistogram>,
    ) -> LatencySummary {
        let Some(mut merged) = new_histogram() else {
            return LatencySummary::default();
        };
        let mut max = 0;
        for h in all {
            for stripe in &h.stripes {
                stripe.add_to(&mut merged);
            }
            max = max.max(h.max());
        }
        LatencySummary::from_histogram(&merged).with_max(max)
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
    /// 95th percentile.
    pub p95_us: f64,
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
            p95_us: us(h.value_at_quantile(0.95)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    /// Replaces the largest sample with the exact one (`nanos`), when there are samples. A
    /// percentile read from the buckets is its bucket's upper edge, which can lie above the
    /// largest sample; such percentiles are the largest sample.
    fn with_max(mut self, nanos: u64) -> Self {
        if self.count > 0 && nanos > 0 {
            let max = nanos as f64 / 1_000.0;
            self.max_us = max;
            for p in [
                &mut self.p50_us,
                &mut self.p90_us,
                &mut self.p95_us,
                &mut self.p99_us,
                &mut self.p999_us,
            ] {
                *p = p.min(max);
            }
        }
        self
    }
}

/// Nanoseconds since `since`, saturating.
#[inline]
pub(crate) fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The process's latency clock (quanta: the CPU's time-stamp counter where it is invariant).
/// Made once: building one asks the CPU what it has (`cpuid`), which in a VM is a trip to the
/// hypervisor, tens of microseconds a runtime start would otherwise pay.
pub(crate) fn latency_clock() -> quanta::Clock {
    static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new).clone()
}

/// Nanoseconds from `a` to `b` (0 if `b` is earlier), saturating.
#[inline]
pub(crate) fn nanos_between(a: Instant, b: Instant) -> u64 {
    u64::try_from(b.saturating_duration_since(a).as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn striped_counters_sum_every_threads_increments() {
        let c = std::sync::Arc::new(StripedCounters::<3>::default());
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.increment(1, 1);
                    }
                    c.increment(2, 5);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(0), 0);
        assert_eq!(c.get(1), 12_000);
        assert_eq!(c.get(2), 60);
        c.increment(3, 1);
        assert_eq!(c.get(3), 0, "out of range is a no-op");
    }

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
    fn the_bucket_layout_is_hdrhistograms_own() {
        // Every sample lands in the bucket hdrhistogram would put it in, so percentiles read
        // from the atomic buckets equal those of a plain HDR histogram of the same samples.
        let mut reference = Histogram::<u64>::new(3).unwrap();
        let ours = LatencyHistogram::default();
        let mut v: u64 = 1;
        while v < u64::MAX / 3 {
            for x in [v, v + 1, v * 2 - 1, v + v / 3] {
                assert_eq!(value_at(index_of(x)), reference.lowest_equivalent(x), "{x}");
                reference.record(x).unwrap();
                ours.record(x);
            }
            v = v.saturating_mul(3);
        }
        let snap = ours.snapshot().unwrap();
        assert_eq!(snap.len(), reference.len());
        for q in [0.0, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            assert_eq!(
                snap.value_at_quantile(q),
                reference.value_at_quantile(q),
                "q {q}"
            );
        }
        assert_eq!(index_of(u64::MAX) / SUB_BUCKET_HALF, BLOCKS - 1);
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
        let s = h.summary();
        assert_eq!(s.count, 4000);
        assert!((s.p50_us - 500.0).abs() < 1.0, "{s:?}");
        assert!(
            (s.max_us - 1000.003).abs() < 1e-9,
            "the max is exact: {s:?}"
        );
        assert!((s.p95_us - 950.0).abs() < 1.0, "{s:?}");
    }
}
