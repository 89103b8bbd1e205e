//! Snapshots for operators: [`Health`] (is the pool ready, and if not why; agents per tier and
//! state; queue depths; supervision counters) and [`Stats`] (counts and exact latency
//! percentiles per priority; bus and sandbox totals). Both are plain data, serialisable to JSON,
//! cheap enough to take on every HTTP probe. Each part reports its own piece (the ledger per
//! priority, admission its queues, supervision its tiers, the bus and the sandbox their totals);
//! the runtime puts them together.

use serde::Serialize;

use crate::admission::QueueHealth;
use crate::bus::BusStats;
use crate::ledger::{OutcomeCounts, PriorityStats};
use crate::priority::Priority;
use crate::sandbox::model::SandboxStats;
use crate::supervisor::{TierHealth, TierStats};
use crate::telemetry::LatencySummary;

/// Readiness and the state of the pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    /// True when the runtime takes work and no tier is down for good.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub reasons: Vec<String>,
    /// Agents in the pool.
    pub agents: usize,
    /// The pool limit.
    pub max_agents: usize,
    /// Per tier, in start order.
    pub tiers: Vec<TierHealth>,
    /// Per priority, most urgent first.
    pub queues: Vec<QueueHealth>,
    /// Tasks accepted and not yet finished.
    pub outstanding: u64,
}

/// Counts and percentiles.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Per priority, most urgent first.
    pub priorities: Vec<PriorityStats>,
    /// Submit-to-outcome latency over all priorities.
    pub latency: LatencySummary,
    /// The bus.
    pub bus: BusStats,
    /// The tri-sandbox.
    pub sandbox: SandboxStats,
    /// Supervision per tier, in start order: starts, restarts, escalations, start-up time.
    pub tiers: Vec<TierStats>,
}

impl Stats {
    /// Stats for one priority.
    pub fn priority(&self, p: Priority) -> &PriorityStats {
        &self.priorities[p.index()]
    }

    /// Tasks accepted over all priorities.
    pub fn submitted(&self) -> u64 {
        self.priorities.iter().map(|p| p.submitted).sum()
    }

    /// Outcomes over all priorities.
    pub fn completed(&self) -> OutcomeCounts {
        let mut sum = OutcomeCounts::default();
        for p in &self.priorities {
            sum.ok += p.completed.ok;
            sum.error += p.completed.error;
            sum.timeout += p.completed.timeout;
            sum.panic += p.completed.panic;
            sum.cancelled += p.completed.cancelled;
        }
        sum
    }
}
