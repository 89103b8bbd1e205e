//! The task ledger: every task the runtime accepts is counted here, and here it gets its one
//! outcome.
//!
//! Admission reports what it accepted and refused, agents report when they start an attempt
//! and how long the handler ran, and whoever ends a task (an agent, the liveness watchdog, the
//! sandbox's unifier, shutdown's sweep) ends it through [`Ledger::finish`], which counts the
//! outcome, records the submit-to-outcome latency, tells the observers and answers the handle.
//! So "accepted = sum of outcomes" is one module's arithmetic, and `outstanding` is exact.
//!
//! The [`TaskObserver`]s registered at start hear every event (see `events`).

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::SubmitError;
use crate::events::{TaskEvent, TaskEventKind, TaskObserver};
use crate::ids::{AgentId, TaskId};
use crate::priority::{PerPriority, Priority};
use crate::task::{Outcome, OutcomeKind, QueuedTask};
use crate::telemetry::{
    LatencyHistogram, LatencySummary, StripedCounters, elapsed_ns, nanos_between,
};

/// Outcome counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    /// Outcome `ok`.
    pub ok: u64,
    /// Outcome `error`.
    pub error: u64,
    /// Outcome `timeout`.
    pub timeout: u64,
    /// Outcome `panic`.
    pub panic: u64,
    /// Outcome `cancelled`.
    pub cancelled: u64,
}

impl OutcomeCounts {
    /// Sum over all outcomes.
    pub fn total(&self) -> u64 {
        self.ok + self.error + self.timeout + self.panic + self.cancelled
    }
}

/// Rejection counts by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RejectionCounts {
    /// The queue was full.
    pub queue_full: u64,
    /// The runtime was shutting down.
    pub shutting_down: u64,
    /// The task was invalid (unknown target, bad timeout).
    pub invalid: u64,
    /// Every agent that could run it was down.
    pub unavailable: u64,
    /// Its target already held its share of the queue (`queues.kind_share`).
    pub kind_full: u64,
}

/// One priority's counts and latencies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PriorityStats {
    /// The priority.
    pub priority: Priority,
    /// Tasks accepted.
    pub submitted: u64,
    /// Tasks refused at admission.
    pub rejected: RejectionCounts,
    /// Tasks finished, by outcome.
    pub completed: OutcomeCounts,
    /// Time from queueing to an agent picking the task up (per attempt).
    pub queue_wait: LatencySummary,
    /// Handler time (per attempt).
    pub handler: LatencySummary,
    /// Submit to outcome.
    pub latency: LatencySummary,
    /// Attempts whose handler returned after the deadline (it held its thread past it): the
    /// result was discarded and the attempt ended `timeout`.
    pub late_results: u64,
}

/// Counters and latency histograms of every task, per priority, plus the observers.
pub(crate) struct Ledger {
    /// Submitted, completed (by outcome), rejected (by reason) and late results, per
    /// priority, in one striped block: see [`Counter`] for the layout.
    counts: StripedCounters<COUNTERS>,
    queue_wait: PerPriority<LatencyHistogram>,
    handler: PerPriority<LatencyHistogram>,
    latency: PerPriority<LatencyHistogram>,
    observers: Box<[Arc<dyn TaskObserver>]>,
}

const OUTCOMES: usize = OutcomeKind::ALL.len();
/// Rejection reasons: queue_full, shutting_down, invalid, unavailable, kind_full.
const REASONS: usize = 5;
const PRIORITIES: usize = Priority::COUNT;
const COUNTERS: usize = PRIORITIES * (1 + OUTCOMES + REASONS + 1);

/// Where each of the ledger's counters sits in its block.
enum Counter {
    Submitted(Priority),
    Completed(Priority, usize),
    Rejected(Priority, usize),
    Late(Priority),
}

impl Counter {
    #[inline]
    const fn at(self) -> usize {
        match self {
            Counter::Submitted(p) => p.index(),
            Counter::Completed(p, k) => PRIORITIES + p.index() * OUTCOMES + k,
            Counter::Rejected(p, r) => PRIORITIES * (1 + OUTCOMES) + p.index() * REASONS + r,
            Counter::Late(p) => PRIORITIES * (1 + OUTCOMES + REASONS) + p.index(),
        }
    }
}

fn rejected_index(error: &SubmitError) -> usize {
    match error.reason_label() {
        "queue_full" => 0,
        "shutting_down" => 1,
        "unavailable" => 3,
        "kind_full" => 4,
        _ => 2,
    }
}

impl Ledger {
    /// `latency` switches the latency histograms on or off (counters always run).
    pub(crate) fn new(latency: bool, observers: Vec<Arc<dyn TaskObserver>>) -> Self {
        Ledger {
            counts: StripedCounters::default(),
            queue_wait: PerPriority::from_fn(|_| LatencyHistogram::new(latency)),
            handler: PerPriority::from_fn(|_| LatencyHistogram::new(latency)),
            latency: PerPriority::from_fn(|_| LatencyHistogram::new(latency)),
            observers: observers.into_boxed_slice(),
        }
    }

    #[inline]
    fn emit(&self, task: TaskId, priority: Priority, key: Option<u64>, kind: TaskEventKind) {
        if self.observers.is_empty() {
            return;
        }
        let event = TaskEvent {
            task,
            priority,
            at: Instant::now(),
            key,
            kind,
        };
        for o in self.observers.iter() {
            o.on_event(&event);
        }
    }

    /// Counts an accepted task.
    #[inline]
    pub(crate) fn accepted(&self, task: TaskId, priority: Priority, key: Option<u64>) {
        self.counts.increment(Counter::Submitted(priority).at(), 1);
        self.emit(task, priority, key, TaskEventKind::Accepted);
    }

    /// Counts a refused submission.
    pub(crate) fn rejected(&self, priority: Priority, error: &SubmitError) {
        self.counts
            .increment(Counter::Rejected(priority, rejected_index(error)).at(), 1);
    }

    /// Counts an attempt picked up by `agent` at `now`.
    #[inline]
    pub(crate) fn started(&self, task: &QueuedTask, agent: AgentId, now: Instant) {
        self.queue_wait[task.priority].record(nanos_between(task.enqueued_at, now));
        self.emit(
            task.id,
            task.priority,
            task.key,
            TaskEventKind::Started {
                agent,
                attempt: task.attempt,
            },
        );
    }

    /// Counts a result that came back after its deadline and was discarded.
    pub(crate) fn late_result(&self, priority: Priority) {
        self.counts.increment(Counter::Late(priority).at(), 1);
    }

    /// Late results discarded at `p`.
    pub(crate) fn late_results(&self, p: Priority) -> u64 {
        self.counts.get(Counter::Late(p).at())
    }

    /// Records one attempt's handler time.
    #[inline]
    pub(crate) fn handled(&self, priority: Priority, since: Instant) {
        self.handler[priority].record(elapsed_ns(since));
    }

    /// Ends a task: counts and records the outcome, then answers its handle.
    #[inline]
    pub(crate) fn finish(&self, task: QueuedTask, outcome: Outcome) {
        let p = task.priority;
        let kind = outcome.kind();
        self.counts
            .increment(Counter::Completed(p, kind.index()).at(), 1);
        self.latency[p].record(elapsed_ns(task.submitted_at));
        self.emit(
            task.id,
            p,
            task.key,
            TaskEventKind::Finished { outcome: kind },
        );
        task.completion.send(outcome);
    }

    /// Ends a task that has no handle of its own (a direct sandboxed run answers its caller).
    pub(crate) fn finish_direct(
        &self,
        task: TaskId,
        priority: Priority,
        outcome: OutcomeKind,
        submitted_at: Instant,
        key: Option<u64>,
    ) {
        self.counts
            .increment(Counter::Completed(priority, outcome.index()).at(), 1);
        self.latency[priority].record(elapsed_ns(submitted_at));
        self.emit(task, priority, key, TaskEventKind::Finished { outcome });
    }

    /// Tasks accepted at `p`.
    pub(crate) fn submitted(&self, p: Priority) -> u64 {
        self.counts.get(Counter::Submitted(p).at())
    }

    /// Tasks at `p` that ended with `kind`.
    pub(crate) fn completed(&self, p: Priority, kind: OutcomeKind) -> u64 {
        self.counts.get(Counter::Completed(p, kind.index()).at())
    }

    /// Refusals at `p`, by reason.
    pub(crate) fn rejections(&self, p: Priority) -> RejectionCounts {
        RejectionCounts {
            queue_full: self.counts.get(Counter::Rejected(p, 0).at()),
            shutting_down: self.counts.get(Counter::Rejected(p, 1).at()),
            invalid: self.counts.get(Counter::Rejected(p, 2).at()),
            unavailable: self.counts.get(Counter::Rejected(p, 3).at()),
            kind_full: self.counts.get(Counter::Rejected(p, 4).at()),
        }
    }

    /// Outcomes of `kind` over all priorities.
    pub(crate) fn completed_total(&self, kind: OutcomeKind) -> u64 {
        Priority::ALL.iter().map(|&p| self.completed(p, kind)).sum()
    }

    /// Tasks accepted and not yet finished (queued, running, or waiting to retry).
    pub(crate) fn outstanding(&self) -> u64 {
        // Finished first: every task finished by the time of the second read was accepted
        // before it, so the difference never goes below the truth's floor.
        let done = self.finished_total();
        self.accepted_total().saturating_sub(done)
    }

    /// Tasks accepted, over all priorities.
    pub(crate) fn accepted_total(&self) -> u64 {
        Priority::ALL.iter().map(|&p| self.submitted(p)).sum()
    }

    /// Tasks finished (any outcome), over all priorities.
    pub(crate) fn finished_total(&self) -> u64 {
        Priority::ALL
            .iter()
            .flat_map(|&p| OutcomeKind::ALL.map(|k| Counter::Completed(p, k.index()).at()))
            .map(|i| self.counts.get(i))
            .sum()
    }

    /// Queue wait per attempt at `p`.
    pub(crate) fn queue_wait(&self, p: Priority) -> &LatencyHistogram {
        &self.queue_wait[p]
    }

    /// Handler time per attempt at `p`.
    pub(crate) fn handler(&self, p: Priority) -> &LatencyHistogram {
        &self.handler[p]
    }

    /// Submit to outcome at `p`.
    pub(crate) fn latency(&self, p: Priority) -> &LatencyHistogram {
        &self.latency[p]
    }

    /// One priority's counts and percentiles.
    pub(crate) fn stats(&self, p: Priority) -> PriorityStats {
        let c = |k: OutcomeKind| self.completed(p, k);
        PriorityStats {
            priority: p,
            submitted: self.submitted(p),
            rejected: self.rejections(p),
            completed: OutcomeCounts {
                ok: c(OutcomeKind::Ok),
                error: c(OutcomeKind::Error),
                timeout: c(OutcomeKind::Timeout),
                panic: c(OutcomeKind::Panic),
                cancelled: c(OutcomeKind::Cancelled),
            },
            queue_wait: self.queue_wait[p].summary(),
            handler: self.handler[p].summary(),
            latency: self.latency[p].summary(),
            late_results: self.counts.get(Counter::Late(p).at()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_place_in_the_block() {
        let mut at = Vec::new();
        for p in Priority::ALL {
            at.push(Counter::Submitted(p).at());
            at.push(Counter::Late(p).at());
            at.extend((0..OUTCOMES).map(|k| Counter::Completed(p, k).at()));
            at.extend((0..REASONS).map(|r| Counter::Rejected(p, r).at()));
        }
        assert_eq!(at.len(), COUNTERS);
        assert!(at.iter().all(|&i| i < COUNTERS));
        at.sort_unstable();
        at.dedup();
        assert_eq!(at.len(), COUNTERS, "two counters share a place");
    }
}
