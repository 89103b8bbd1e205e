//! Admission: the per-priority bounds every task reserves before it is queued, and the gate
//! that shutdown closes.
//!
//! One bounded depth counter per priority, across all targets. A task is admitted only if it can
//! reserve a slot at its priority: `try_submit` fails at once when it cannot, `submit` waits for
//! a slot up to a deadline. This is the runtime's backpressure: the queued work, and so the
//! memory it holds, never exceeds the configured capacities. A slot is held from admission until
//! an agent picks the task up (or, for a sandboxed task, until its verdict).
//!
//! The gates: a submission enters one before its last phase check and leaves it after its task is
//! queued. There are two, because shutdown closes the runtime in two steps: to callers outside
//! the pool when the drain begins (agents may still submit sub-tasks of the work they hold), and
//! to agents when the drain deadline passes. At each step shutdown moves the phase, then waits
//! until as many have left that side's gate as entered, so no task can slip into a queue after
//! the step has counted what is outstanding or swept the queues.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use serde::Serialize;

use crate::bound::Bound;
use crate::error::SubmitError;
use crate::phase::Phase;
use crate::priority::{PerPriority, Priority};
use crate::telemetry::StripedCounter;

/// One priority's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueHealth {
    /// The priority.
    pub priority: Priority,
    /// Tasks waiting.
    pub depth: usize,
    /// The bound.
    pub capacity: usize,
}

/// One side's gate: submissions that entered and left.
#[derive(Default)]
struct Gate {
    entered: StripedCounter,
    left: StripedCounter,
}

/// Per-priority bounds plus the shutdown gates.
pub(crate) struct Admission {
    levels: [CachePadded<Bound>; Priority::COUNT],
    phase: Arc<Phase>,
    /// Callers outside the pool.
    outside: Gate,
    /// Agents (sub-tasks).
    inside: Gate,
}

/// A submission inside a gate; leaving it (drop) lets a waiting shutdown proceed.
pub(crate) struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    #[inline]
    fn drop(&mut self) {
        self.0.left.increment(1);
    }
}

impl Admission {
    pub(crate) fn new(capacity: &PerPriority<usize>, phase: Arc<Phase>) -> Self {
        Admission {
            levels: std::array::from_fn(|i| CachePadded::new(Bound::new(capacity.0[i]))),
            phase,
            outside: Gate::default(),
            inside: Gate::default(),
        }
    }

    #[inline]
    fn level(&self, p: Priority) -> &Bound {
        &self.levels[p.index()]
    }

    fn full(&self, p: Priority, depth: usize) -> SubmitError {
        SubmitError::QueueFull {
            priority: p,
            depth,
            capacity: self.level(p).capacity(),
        }
    }

    /// Reserves a slot at `p` or refuses at once with the queue's depth and bound.
    #[inline]
    pub(crate) fn try_reserve(&self, p: Priority) -> Result<(), SubmitError> {
        self.level(p)
            .try_reserve()
            .map_err(|depth| self.full(p, depth))
    }

    /// Reserves a slot at `p`, waiting for one until `until`.
    pub(crate) async fn reserve_until(
        &self,
        p: Priority,
        until: Instant,
    ) -> Result<(), SubmitError> {
        self.level(p)
            .reserve_until(until)
            .await
            .map_err(|depth| self.full(p, depth))
    }

    /// Takes a slot even past the bound: a retry re-enters the queue of a task already admitted.
    #[inline]
    pub(crate) fn force_reserve(&self, p: Priority) {
        self.level(p).force_reserve();
    }

    /// Gives a slot back (the task left the queue).
    #[inline]
    pub(crate) fn release(&self, p: Priority) {
        self.level(p).release();
    }

    /// Enters the gate of its side (`internal`: an agent's submission), or refuses with
    /// `ShuttingDown` if that side is closed.
    #[inline]
    pub(crate) fn enter(&self, internal: bool) -> Result<Pass<'_>, SubmitError> {
        let gate = if internal {
            &self.inside
        } else {
            &self.outside
        };
        gate.entered.increment(1);
        let pass = Pass(gate);
        if !self.phase.admits(internal) {
            return Err(SubmitError::ShuttingDown);
        }
        Ok(pass)
    }

    /// Waits until every submission that entered the gate of callers outside the pool has
    /// left it.
    pub(crate) async fn quiesce_outside(&self) {
        Self::quiesce(&self.outside).await
    }

    /// Waits until every agent submission that entered its gate has left it.
    pub(crate) async fn quiesce_inside(&self) {
        Self::quiesce(&self.inside).await
    }

    async fn quiesce(gate: &Gate) {
        loop {
            let left = gate.left.get();
            if gate.entered.get() == left {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Tasks holding a slot at `p`.
    pub(crate) fn depth(&self, p: Priority) -> usize {
        self.level(p).len()
    }

    /// The bound at `p`.
    pub(crate) fn capacity(&self, p: Priority) -> usize {
        self.level(p).capacity()
    }

    /// Every priority's depth and bound, most urgent first.
    pub(crate) fn queues(&self) -> Vec<QueueHealth> {
        Priority::ALL
            .iter()
            .map(|&p| QueueHealth {
                priority: p,
                depth: self.depth(p),
                capacity: self.capacity(p),
            })
            .collect()
    }
}
