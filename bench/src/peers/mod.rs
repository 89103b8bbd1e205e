//! The peer comparison: the same workloads written idiomatically for Troupe, actix, ractor and
//! kameo, each measured on its own runtime with two worker threads.
//!
//! Every workload is a plain function per system that builds its runtime, sets up, times only
//! the work, tears down and returns a figure. Completion is detected the same way everywhere:
//! the driver ends a burst with a `Fin` message to each actor; mailboxes are FIFO, so an actor
//! that sees `Fin` has handled everything before it and bumps a shared [`Done`] counter.

pub mod actix;
pub mod kameo;
pub mod ractor;
pub mod troupe;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Notify;

/// Worker threads every system gets.
pub const THREADS: usize = 2;

/// A counter the driver waits on: actors bump it, the one that reaches the target wakes the
/// driver. Same mechanism for every system, so its cost is common to all.
#[derive(Debug, Default)]
pub struct Done {
    count: AtomicU64,
    target: AtomicU64,
    notify: Notify,
}

impl Done {
    /// A shared counter.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Arms the counter for `n` bumps.
    pub fn arm(&self, n: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(n, Ordering::SeqCst);
    }

    /// One bump.
    pub fn bump(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.target.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }

    /// Waits until armed target reached.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.count.load(Ordering::Acquire) >= self.target.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// A multi-threaded Tokio runtime with [`THREADS`] workers, as Troupe, ractor and kameo get.
pub fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs a workload's driver on a fresh [`tokio_rt`], as a task on one of its two workers (not
/// on the calling thread), so the driver shares the two threads with the actors, as actix's
/// driver shares the system arbiter: two threads in all for every system.
pub fn on_worker<F>(driver: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let rt = tokio_rt();
    rt.block_on(async move { tokio::spawn(driver).await.expect("the driver panicked") })
}

/// Resident memory of this process, bytes (Linux `/proc/self/statm`; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// How long a started pool settles before its memory is read.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Bytes of resident memory per actor: read before `n` actors start and after they settled.
pub fn per_actor(before: u64, n: usize) -> f64 {
    rss_bytes().saturating_sub(before) as f64 / n as f64
}

/// Latency recorder in nanoseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Records `d` into `h`.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos() as u64).max(1));
}

/// What a serial-ask or fan-out run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Operations per second.
    pub per_s: f64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
}

impl Latency {
    /// From `n` operations taking `total`, with per-operation latencies in `h`.
    pub fn of(n: u64, total: Duration, h: &Histogram<u64>) -> Self {
        Latency {
            per_s: n as f64 / total.as_secs_f64(),
            p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        }
    }
}

/// What a bounded mailbox does when it is full, as measured.
#[derive(Debug, Clone, Default)]
pub struct MailboxFull {
    /// Messages the driver tried to send.
    pub sent: u64,
    /// Messages the actor handled, counted by its handler.
    pub handled: u64,
    /// Sends refused with an error.
    pub refused: u64,
    /// Messages accepted but dropped.
    pub dropped: u64,
    /// Time for the driver to get through its sends, ms.
    pub send_ms: f64,
    /// Messages accepted but not yet handled when the sends ended, measured the same way for
    /// every system: accepted (sent − refused − dropped) less the handler's count at that moment.
    pub queued_at_end: u64,
    /// What happened, in words.
    pub behaviour: String,
}

/// Messages the mailbox-full workload sends, and the bound it asks for.
pub const MAILBOX_SENDS: u64 = 10_000;
/// See [`MAILBOX_SENDS`].
pub const MAILBOX_BOUND: usize = 1_000;
/// How long the slow consumer spends per message in the mailbox-full workload.
pub const MAILBOX_WORK: Duration = Duration::from_micros(20);

/// The slow consumer of the mailbox-full workload: a CPU-bound handler busy for `work` (a
/// no-op when zero), the same in every system.
pub fn busy(work: Duration) {
    // No clock reads for no work: two per message would be a tenth of a fast tell.
    if work.is_zero() {
        return;
    }
    let t = std::time::Instant::now();
    while t.elapsed() < work {
        std::hint::spin_loop();
    }
}

/// Size of each skynet node's fan-out, and depth: 10^6 leaves.
pub const SKYNET_FANOUT: u64 = 10;
/// See [`SKYNET_FANOUT`].
pub const SKYNET_LEAVES: u64 = 1_000_000;

/// The expected skynet sum: 0 + 1 + … + (leaves − 1).
pub const fn skynet_sum() -> u64 {
    SKYNET_LEAVES * (SKYNET_LEAVES - 1) / 2
}

/// Runs `op` `n` times one after another, after a short warm-up that is not measured (first
/// uses allocate: per-thread buffers, timers, histogram stripes), and returns its rate and
/// latency percentiles.
pub async fn timed_ops<F, Fut>(n: u64, mut op: F) -> Latency
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..(n / 10).clamp(1, 1_000) {
        op().await;
    }
    let mut h = histogram();
    let t = std::time::Instant::now();
    for _ in 0..n {
        let s = std::time::Instant::now();
        op().await;
        record(&mut h, s.elapsed());
    }
    Latency::of(n, t.elapsed(), &h)
}
