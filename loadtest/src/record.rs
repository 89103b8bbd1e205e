//! Recording: every request's result flows here as a [`Sample`] and lands in HDR histograms.
//!
//! Requests finish on whatever Tokio worker ran them and send their sample over a bounded
//! channel to one [`Recorder`], which owns every histogram and counter; nothing is shared or
//! locked. Latency is `done - intended`: the time from when the request *should* have been sent
//! (its slot in the open-loop schedule) to its outcome, so a stalled system cannot hide its
//! latency by slowing the generator down (coordinated omission, as wrk2 avoids it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;
use troupe::Priority;

/// Highest latency a histogram holds, in µs (one hour); longer is clamped, not lost.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Why a request was refused before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The priority's queue was at capacity (HTTP 429).
    QueueFull,
    /// The runtime was shutting down (HTTP 503).
    ShuttingDown,
    /// The runtime refused the task as invalid (HTTP 400/404/413).
    Invalid,
    /// The load generator itself had `--max-in-flight` requests outstanding and did not send.
    InFlightLimit,
    /// The node shed the request before admission: it was past its sustainable load
    /// (HTTP 429 `overloaded`).
    Overloaded,
    /// Every agent that could run it was down (HTTP 503 `unavailable`).
    Unavailable,
    /// Its kind already held its share of the priority's queue (HTTP 429 `kind_full`).
    KindFull,
}

impl RejectReason {
    /// Every reason, in report order.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::QueueFull,
        RejectReason::ShuttingDown,
        RejectReason::Invalid,
        RejectReason::InFlightLimit,
        RejectReason::Overloaded,
        RejectReason::Unavailable,
        RejectReason::KindFull,
    ];

    /// The report label.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectReason::QueueFull => "queue_full",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::Invalid => "invalid",
            RejectReason::InFlightLimit => "in_flight_limit",
            RejectReason::Overloaded => "overloaded",
            RejectReason::Unavailable => "unavailable",
            RejectReason::KindFull => "kind_full",
        }
    }

    /// True for a refusal the client caused (a bad request), false for one the service did
    /// (overload, shutdown, or this tester's own in-flight cap standing in for either).
    pub const fn is_client_mistake(self) -> bool {
        matches!(self, RejectReason::Invalid)
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Outcome `ok`.
    Ok,
    /// Outcome `error`, or the HTTP exchange itself failed.
    Error,
    /// Outcome `timeout`.
    Timeout,
    /// Outcome `panic`.
    Panic,
    /// Outcome `cancelled`.
    Cancelled,
    /// Refused at admission.
    Rejected(RejectReason),
    /// The HTTP exchange itself failed (connect, timeout, unreadable answer): the client never
    /// learnt the task's outcome.
    Transport,
}

/// Number of [`Class`] slots in the counters.
const CLASSES: usize = 7;

impl Class {
    fn slot(self) -> usize {
        match self {
            Class::Ok => 0,
            Class::Error => 1,
            Class::Timeout => 2,
            Class::Panic => 3,
            Class::Cancelled => 4,
            Class::Rejected(_) => 5,
            Class::Transport => 6,
        }
    }

    /// The runtime outcome's class.
    pub fn of(outcome: troupe::OutcomeKind) -> Self {
        match outcome {
            troupe::OutcomeKind::Ok => Class::Ok,
            troupe::OutcomeKind::Error => Class::Error,
            troupe::OutcomeKind::Timeout => Class::Timeout,
            troupe::OutcomeKind::Panic => Class::Panic,
            troupe::OutcomeKind::Cancelled => Class::Cancelled,
        }
    }
}

/// One finished request. Times are nanoseconds since the run's start.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Index of the mix entry.
    pub entry: u32,
    /// When the schedule said to send it.
    pub intended_ns: u64,
    /// When its outcome arrived.
    pub done_ns: u64,
    /// How it ended.
    pub class: Class,
    /// Which of the target's nodes it went to (0 for an embedded pool or a single node;
    /// [`NOT_SENT`] for a request this tool did not send).
    pub node: u16,
}

/// [`Sample::node`] of a request that never left this tool (its own in-flight cap).
pub const NOT_SENT: u16 = u16::MAX;

/// Counts of outcomes, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// Requests the schedule sent: ok + error + timeout + panic + cancelled + rejected +
    /// transport_error.
    pub offered: u64,
    /// Outcome ok.
    pub ok: u64,
    /// Outcome error.
    pub error: u64,
    /// Outcome timeout.
    pub timeout: u64,
    /// Outcome panic.
    pub panic: u64,
    /// Outcome cancelled.
    pub cancelled: u64,
    /// Refused at admission, in all.
    pub rejected: u64,
    /// Refusals by reason.
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// HTTP exchanges that failed before an outcome arrived (HTTP target only).
    pub transport_error: u64,
}

impl Outcomes {
    fn from_counts(c: &Counts) -> Self {
        let rejected_by_reason = RejectReason::ALL
            .iter()
            .zip(c.reasons)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.as_str(), n))
            .collect();
        Outcomes {
            offered: c.classes.iter().sum(),
            ok: c.classes[0],
            error: c.classes[1],
            timeout: c.classes[2],
            panic: c.classes[3],
            cancelled: c.classes[4],
            rejected: c.classes[5],
            rejected_by_reason,
            transport_error: c.classes[6],
        }
    }

    /// Tasks that ran and ended in any outcome (everything but rejections).
    pub fn completed(&self) -> u64 {
        self.ok + self.error + self.timeout + self.panic + self.cancelled
    }

    /// Refusals of the client's own mistakes (invalid requests).
    pub fn refused_invalid(&self) -> u64 {
        self.rejected_by_reason
            .get(RejectReason::Invalid.as_str())
            .copied()
            .unwrap_or(0)
    }

    /// Refusals for overload or shutdown: queue full, shutting down, shed by the node, or held
    /// back by this tester's in-flight cap. The work was asked for and not done.
    pub fn refused_overload(&self) -> u64 {
        self.rejected - self.refused_invalid()
    }

    /// What the availability objective counts as bad: error, timeout and panic, every refusal
    /// for overload or shutdown, and failed HTTP exchanges (the client got no answer, which is
    /// no better).
    pub fn bad(&self) -> u64 {
        self.error + self.timeout + self.panic + self.transport_error + self.refused_overload()
    }

    /// What the availability objective judges: everything offered but cancellations (only at
    /// shutdown) and refusals of invalid requests (the client's mistake).
    pub fn judged(&self) -> u64 {
        self.offered
            .saturating_sub(self.cancelled)
            .saturating_sub(self.refused_invalid())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    classes: [u64; CLASSES],
    reasons: [u64; RejectReason::ALL.len()],
}

impl Counts {
    fn add(&mut self, class: Class) {
        self.classes[class.slot()] += 1;
        if let Class::Rejected(r) = class {
            self.reasons[r as usize] += 1;
        }
    }
}

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// A latency histogram in microseconds, three significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts; failure would be a bug in this line.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

impl Percentiles {
    /// Summarises `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: us_to_ms(h.value_at_quantile(0.50)),
            p90_ms: us_to_ms(h.value_at_quantile(0.90)),
            p95_ms: us_to_ms(h.value_at_quantile(0.95)),
            p99_ms: us_to_ms(h.value_at_quantile(0.99)),
            p999_ms: us_to_ms(h.value_at_quantile(0.999)),
            max_ms: us_to_ms(h.max()),
        }
    }

    /// The value at `percentile` (0–100) of `h`, in ms.
    pub fn at(h: &Histogram<u64>, percentile: f64) -> f64 {
        if h.is_empty() {
            return 0.0;
        }
        us_to_ms(h.value_at_quantile(percentile / 100.0))
    }
}

/// One point of a latency-by-percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Percentile, 0–100.
    pub percentile: f64,
    /// Latency at it, ms.
    pub latency_ms: f64,
}

/// The percentiles a curve is drawn through: dense near the tail, where latency lives.
const CURVE_PERCENTILES: [f64; 19] = [
    0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 99.95, 99.975, 99.99,
    99.995, 99.999, 99.9995, 100.0,
];

/// The latency-by-percentile curve of `h`.
pub fn curve(h: &Histogram<u64>) -> Vec<CurvePoint> {
    if h.is_empty() {
        return Vec::new();
    }
    CURVE_PERCENTILES
        .iter()
        .map(|&p| CurvePoint {
            percentile: p,
            latency_ms: if p >= 100.0 {
                us_to_ms(h.max())
            } else {
                Percentiles::at(h, p)
            },
        })
        .collect()
}

/// One second of the run, by completion time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tick {
    /// Start of this second, in seconds since measurement started (negative in warm-up).
    pub t_s: f64,
    /// Starts inside the warm-up (its samples may still count: results go by intended time).
    pub warmup: bool,
    /// Tasks that ended (any outcome but rejected) in this second.
    pub completed: u64,
    /// Of those, ok.
    pub ok: u64,
    /// Of those, error, timeout or panic.
    pub bad: u64,
    /// Requests refused in this second.
    pub rejected: u64,
    /// Median latency of the tasks that ended in this second.
    pub p50_ms: f64,
    /// 99th percentile latency of the tasks that ended in this second.
    pub p99_ms: f64,
}

struct Second {
    counts: Counts,
    hist: Histogram<u64>,
}

/// Bus traffic counters, written by the bus generator (one writer per field; relaxed is enough
/// because they are read after the generator has stopped, or only for a progress line).
#[derive(Debug, Default)]
pub struct BusCounters {
    /// Messages the schedule sent in the measured window.
    pub offered: AtomicU64,
    /// Accepted by the bus (delivered to at least one mailbox, or published).
    pub accepted: AtomicU64,
    /// Deliveries into mailboxes (a publish delivers to every subscriber).
    pub delivered: AtomicU64,
    /// Deliveries dropped because a mailbox was full.
    pub dropped: AtomicU64,
    /// Sends that failed outright (no such agent, shutting down, HTTP failure).
    pub failed: AtomicU64,
    /// Every message sent, warm-up included (for the progress line).
    pub sent_all: AtomicU64,
}

impl BusCounters {
    /// A shared, zeroed set.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

/// What the run measured, ready for the report.
#[derive(Debug, Clone)]
pub struct Measured {
    /// All measured requests.
    pub total: Outcomes,
    /// Per mix entry, in mix order.
    pub by_entry: Vec<Outcomes>,
    /// Latency of completed tasks, all together.
    pub overall: Histogram<u64>,
    /// How long refusals by the target took to arrive (intended send → refusal), for
    /// refusals that reached the target (not this tool's own in-flight cap).
    pub refusal: Histogram<u64>,
    /// Per priority, in [`Priority::ALL`] order.
    pub by_priority: Vec<Histogram<u64>>,
    /// Per mix entry.
    pub entry_latency: Vec<Histogram<u64>>,
    /// Per node of the target, in the order given.
    pub by_node: Vec<Outcomes>,
    /// Latency per node of the target.
    pub node_latency: Vec<Histogram<u64>>,
    /// Completions (not rejections) whose outcome arrived inside the measured window.
    pub completed_in_window: u64,
    /// Per second.
    pub timeline: Vec<Tick>,
}

/// The window results count in, and what the live progress line needs.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Start of measurement (end of warm-up), ns since the run's start.
    pub from_ns: u64,
    /// End of measurement, ns since the run's start.
    pub to_ns: u64,
}

/// Owns every histogram and counter of one run.
pub struct Recorder {
    window: Window,
    priorities: Vec<Priority>,
    counts: Vec<Counts>,
    overall: Histogram<u64>,
    refusal: Histogram<u64>,
    by_priority: Vec<Histogram<u64>>,
    entry_latency: Vec<Histogram<u64>>,
    node_counts: Vec<Counts>,
    node_latency: Vec<Histogram<u64>>,
    completed_in_window: u64,
    seconds: Vec<Second>,
}

impl Recorder {
    /// A recorder for a mix whose entries have `priorities`, against a target of `nodes`
    /// nodes, measuring `window`.
    pub fn new(priorities: Vec<Priority>, nodes: usize, window: Window) -> Self {
        let n = priorities.len();
        let nodes = nodes.max(1);
        Recorder {
            window,
            priorities,
            counts: vec![Counts::default(); n],
            overall: latency_histogram(),
            refusal: latency_histogram(),
            by_priority: (0..Priority::COUNT).map(|_| latency_histogram()).collect(),
            entry_latency: (0..n).map(|_| latency_histogram()).collect(),
            node_counts: vec![Counts::default(); nodes],
            node_latency: (0..nodes).map(|_| latency_histogram()).collect(),
            completed_in_window: 0,
            seconds: Vec::new(),
        }
    }

    /// Records one sample.
    pub fn record(&mut self, s: &Sample) {
        let latency_us = (s.done_ns.saturating_sub(s.intended_ns) / 1000).clamp(1, MAX_LATENCY_US);
        // Neither a refusal nor a failed exchange has a latency worth recording.
        let rejected = matches!(s.class, Class::Rejected(_) | Class::Transport);
        let second = (s.done_ns / 1_000_000_000) as usize;
        while self.seconds.len() <= second {
            self.seconds.push(Second {
                counts: Counts::default(),
                // Per-second curves need two digits, not three: 10× less memory per second.
                hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid bounds"),
            });
        }
        let sec = &mut self.seconds[second];
        sec.counts.add(s.class);
        if !rejected {
            let _ = sec.hist.record(latency_us);
            if (self.window.from_ns..self.window.to_ns).contains(&s.done_ns) {
                self.completed_in_window += 1;
            }
        }
        if !(self.window.from_ns..self.window.to_ns).contains(&s.intended_ns) {
            return;
        }
        let i = s.entry as usize;
        self.counts[i].add(s.class);
        let node = self
            .node_counts
            .get(s.node as usize)
            .is_some()
            .then_some(s.node as usize);
        if let Some(n) = node {
            self.node_counts[n].add(s.class);
        }
        if let Class::Rejected(r) = s.class {
            if r != RejectReason::InFlightLimit {
                let _ = self.refusal.record(latency_us);
            }
        }
        if !rejected {
            // `record` only fails above the histogram's bound, which the clamp rules out.
            let _ = self.overall.record(latency_us);
            let _ = self.by_priority[self.priorities[i].index()].record(latency_us);
            let _ = self.entry_latency[i].record(latency_us);
            if let Some(n) = node {
                let _ = self.node_latency[n].record(latency_us);
            }
        }
    }

    /// Measured requests so far: (offered, bad + rejected).
    pub fn progress(&self) -> (u64, u64, u64) {
        let mut c = Counts::default();
        for e in &self.counts {
            for k in 0..CLASSES {
                c.classes[k] += e.classes[k];
            }
        }
        let o = Outcomes::from_counts(&c);
        (o.offered, o.bad(), o.rejected)
    }

    /// Completions and p99 (ms) of the tasks that ended in second `s` of the run.
    pub fn second(&self, s: usize) -> Option<(u64, f64)> {
        self.seconds.get(s).map(|sec| {
            let completed = sec.counts.classes[..5].iter().sum();
            (completed, Percentiles::at(&sec.hist, 99.0))
        })
    }

    /// p99 of the measured window so far, in ms.
    pub fn p99_so_far(&self) -> f64 {
        Percentiles::at(&self.overall, 99.0)
    }

    /// Everything, for the report.
    pub fn finish(self) -> Measured {
        let mut total = Counts::default();
        for c in &self.counts {
            for k in 0..CLASSES {
                total.classes[k] += c.classes[k];
            }
            for k in 0..RejectReason::ALL.len() {
                total.reasons[k] += c.reasons[k];
            }
        }
        let from_s = self.window.from_ns as f64 / 1e9;
        let to_s = self.window.to_ns.div_ceil(1_000_000_000);
        let timeline = self
            .seconds
            .iter()
            .enumerate()
            .filter(|(i, _)| (*i as u64) < to_s)
            .map(|(i, sec)| {
                let o = Outcomes::from_counts(&sec.counts);
                Tick {
                    t_s: i as f64 - from_s,
                    warmup: (i as u64) * 1_000_000_000 < self.window.from_ns,
                    completed: o.completed(),
                    ok: o.ok,
                    bad: o.bad(),
                    rejected: o.rejected,
                    p50_ms: Percentiles::at(&sec.hist, 50.0),
                    p99_ms: Percentiles::at(&sec.hist, 99.0),
                }
            })
            .collect();
        Measured {
            total: Outcomes::from_counts(&total),
            by_entry: self.counts.iter().map(Outcomes::from_counts).collect(),
            overall: self.overall,
            refusal: self.refusal,
            by_priority: self.by_priority,
            entry_latency: self.entry_latency,
            by_node: self.node_counts.iter().map(Outcomes::from_counts).collect(),
            node_latency: self.node_latency,
            completed_in_window: self.completed_in_window,
            timeline,
        }
    }
}

/// Reads a counter.
pub fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(entry: u32, intended_ms: u64, latency_ms: u64, class: Class) -> Sample {
        Sample {
            entry,
            intended_ns: intended_ms * 1_000_000,
            done_ns: (intended_ms + latency_ms) * 1_000_000,
            class,
            node: entry as u16 % 2,
        }
    }

    #[test]
    fn warm_up_is_excluded_and_latency_counts_from_the_intended_time() {
        let window = Window {
            from_ns: 1_000_000_000,
            to_ns: 3_000_000_000,
        };
        let mut r = Recorder::new(vec![Priority::High, Priority::Low], 2, window);
        r.record(&sample(0, 500, 5, Class::Ok)); // warm-up
        r.record(&sample(0, 1500, 5, Class::Ok));
        r.record(&sample(1, 1600, 400, Class::Error));
        r.record(&sample(
            1,
            1700,
            0,
            Class::Rejected(RejectReason::QueueFull),
        ));
        r.record(&sample(0, 2900, 200, Class::Ok)); // ends after the window: counted, not "in window"
        let m = r.finish();
        assert_eq!(m.total.offered, 4);
        assert_eq!((m.total.ok, m.total.error, m.total.rejected), (2, 1, 1));
        assert_eq!(m.total.rejected_by_reason.get("queue_full"), Some(&1));
        assert_eq!(m.total.offered, m.total.completed() + m.total.rejected);
        assert_eq!(m.overall.len(), 3, "rejections have no latency");
        assert_eq!(m.by_priority[Priority::Low.index()].len(), 1);
        assert!(
            (Percentiles::of(&m.by_priority[Priority::Low.index()]).max_ms - 400.0).abs() < 1.0
        );
        assert_eq!(m.completed_in_window, 2);
        assert!(m.timeline[0].warmup && !m.timeline[1].warmup);
        assert_eq!(m.timeline[1].t_s, 0.0);
        // Entry 0 went to node 0, entry 1 to node 1 (see `sample`).
        assert_eq!((m.by_node[0].offered, m.by_node[0].ok), (2, 2));
        assert_eq!((m.by_node[1].error, m.by_node[1].rejected), (1, 1));
        assert_eq!(m.node_latency[1].len(), 1);
    }
}
