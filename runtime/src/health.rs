//! Snapshots for operators: [`Health`] (is the pool ready, and if not why; agents per tier and
//! state; queue depths; supervision counters) and [`Stats`] (counts and exact latency
//! percentiles per priority; bus totals). Both are plain data, serialisable to JSON, cheap
//! enough to take on every HTTP probe.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::bus::MessageKind;
use crate::priority::Priority;
use crate::runtime::Shared;
use crate::sandbox::{Lane, LaneResult};
use crate::slot::AgentState;
use crate::task::OutcomeKind;
use crate::telemetry::LatencySummary;

/// Agents in each lifecycle state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AgentCounts {
    /// Building or running `on_start`.
    pub starting: usize,
    /// Taking work.
    pub running: usize,
    /// Waiting to be rebuilt.
    pub restarting: usize,
    /// Down.
    pub stopped: usize,
}

impl AgentCounts {
    fn add(&mut self, s: AgentState) {
        match s {
            AgentState::Starting => self.starting += 1,
            AgentState::Running => self.running += 1,
            AgentState::Restarting => self.restarting += 1,
            AgentState::Stopped => self.stopped += 1,
        }
    }

    /// Sum over all states.
    pub fn total(&self) -> usize {
        self.starting + self.running + self.restarting + self.stopped
    }
}

/// One tier's supervision picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierHealth {
    /// Tier name.
    pub name: String,
    /// Agents by state.
    pub agents: AgentCounts,
    /// Agents busy past their task's deadline (see `liveness.heartbeat`).
    pub unhealthy: usize,
    /// Restarts performed by the tier's supervisor (and by the root for this tier).
    pub restarts: u64,
    /// Times the tier exceeded its restart intensity.
    pub escalations: u64,
    /// True if the tier is down for good (the root gave up on it).
    pub failed: bool,
    /// Agent start-up time (build + hooks).
    pub startup: LatencySummary,
}

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

impl Health {
    pub(crate) fn collect(s: &Shared) -> Health {
        let mut tiers: Vec<TierHealth> = s
            .tiers
            .iter()
            .map(|t| TierHealth {
                name: t.config.name.clone(),
                agents: AgentCounts::default(),
                unhealthy: 0,
                restarts: t.restarts.load(Ordering::Relaxed),
                escalations: t.escalations.load(Ordering::Relaxed),
                failed: t.failed.load(Ordering::Acquire),
                startup: t
                    .startup
                    .snapshot()
                    .map(|h| LatencySummary::from_histogram(&h))
                    .unwrap_or_default(),
            })
            .collect();
        for slot in s.agents.iter() {
            tiers[slot.tier].agents.add(slot.state());
            if slot.is_unhealthy() {
                tiers[slot.tier].unhealthy += 1;
            }
        }
        let mut reasons = Vec::new();
        if s.is_closed() {
            reasons.push("shutting down".to_owned());
        }
        if let Ok(root) = s.root.lock() {
            reasons.extend(root.failures.iter().cloned());
        }
        let queues = Priority::ALL
            .iter()
            .map(|&p| QueueHealth {
                priority: p,
                depth: s.admission.level(p).len(),
                capacity: s.admission.level(p).capacity(),
            })
            .collect();
        Health {
            ready: reasons.is_empty(),
            reasons,
            agents: s.agents.len(),
            max_agents: s.config.max_agents,
            tiers,
            queues,
            outstanding: s.outstanding(),
        }
    }
}

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
}

/// Bus totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BusStats {
    /// Direct sends delivered to a mailbox.
    pub direct: u64,
    /// Publications delivered (one per subscriber reached).
    pub publish: u64,
    /// Requests delivered.
    pub request: u64,
    /// Dropped because a mailbox was full.
    pub dropped_mailbox_full: u64,
    /// Dropped because the recipient did not exist.
    pub dropped_no_such_agent: u64,
    /// Requests whose reply did not come in time.
    pub dropped_timeout: u64,
    /// Send to handler start, over all kinds.
    pub delivery: LatencySummary,
}

/// One sandbox lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneStats {
    /// The lane.
    pub lane: Lane,
    /// Executions by result (`ok`, `error`, `panic`, `timeout`, `crashed`, `unavailable`).
    pub executions: Vec<(&'static str, u64)>,
    /// Times this lane disagreed with (or failed against) a majority of the other two.
    pub dissent: u64,
    /// Executors (instances or worker processes) able to take jobs now.
    pub available: usize,
    /// Executors configured.
    pub total: usize,
}

/// Tri-sandbox totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxStats {
    /// Per lane, A, B, C.
    pub lanes: Vec<LaneStats>,
    /// Votes where all three agreed.
    pub unanimous: u64,
    /// Votes decided by two lanes.
    pub majority: u64,
    /// Votes without a quorum.
    pub no_quorum: u64,
}

impl SandboxStats {
    fn collect(s: &Shared) -> Self {
        let sb = &s.sandbox;
        let t = &sb.telemetry;
        let available = sb.lanes_available();
        SandboxStats {
            lanes: Lane::ALL
                .iter()
                .map(|&lane| {
                    let i = lane.index();
                    LaneStats {
                        lane,
                        executions: LaneResult::LABELS
                            .iter()
                            .enumerate()
                            .map(|(k, &label)| (label, t.executions[i][k].get()))
                            .collect(),
                        dissent: t.dissent[i].get(),
                        available: available[i].0,
                        total: available[i].1,
                    }
                })
                .collect(),
            unanimous: t.votes[0].get(),
            majority: t.votes[1].get(),
            no_quorum: t.votes[2].get(),
        }
    }

    /// Executions of `lane` that ended with `label`.
    pub fn executions(&self, lane: Lane, label: &str) -> u64 {
        self.lanes[lane.index()]
            .executions
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(0, |(_, n)| *n)
    }
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
}

impl Stats {
    pub(crate) fn collect(s: &Shared) -> Stats {
        let t = &s.telemetry;
        let summary = |h: &crate::telemetry::LatencyHistogram| {
            h.snapshot()
                .map(|h| LatencySummary::from_histogram(&h))
                .unwrap_or_default()
        };
        let mut overall = hdrhistogram::Histogram::<u64>::new(3).ok();
        let priorities = Priority::ALL
            .iter()
            .map(|&p| {
                if let (Some(all), Some(h)) = (overall.as_mut(), t.latency[p].snapshot()) {
                    let _ = all.add(&h);
                }
                let c = |k: OutcomeKind| t.completed(p, k);
                PriorityStats {
                    priority: p,
                    submitted: t.submitted[p].get(),
                    rejected: RejectionCounts {
                        queue_full: t.rejected[p][0].get(),
                        shutting_down: t.rejected[p][1].get(),
                        invalid: t.rejected[p][2].get(),
                    },
                    completed: OutcomeCounts {
                        ok: c(OutcomeKind::Ok),
                        error: c(OutcomeKind::Error),
                        timeout: c(OutcomeKind::Timeout),
                        panic: c(OutcomeKind::Panic),
                        cancelled: c(OutcomeKind::Cancelled),
                    },
                    queue_wait: summary(&t.queue_wait[p]),
                    handler: summary(&t.handler[p]),
                    latency: summary(&t.latency[p]),
                }
            })
            .collect();
        let mut delivery = hdrhistogram::Histogram::<u64>::new(3).ok();
        for h in &t.bus_delivery {
            if let (Some(all), Some(h)) = (delivery.as_mut(), h.snapshot()) {
                let _ = all.add(&h);
            }
        }
        Stats {
            priorities,
            latency: overall
                .map(|h| LatencySummary::from_histogram(&h))
                .unwrap_or_default(),
            bus: BusStats {
                direct: t.bus_messages[MessageKind::Direct.index()].get(),
                publish: t.bus_messages[MessageKind::Publish.index()].get(),
                request: t.bus_messages[MessageKind::Request.index()].get(),
                dropped_mailbox_full: t.bus_dropped_mailbox_full.get(),
                dropped_no_such_agent: t.bus_dropped_no_such_agent.get(),
                dropped_timeout: t.bus_dropped_timeout.get(),
                delivery: delivery
                    .map(|h| LatencySummary::from_histogram(&h))
                    .unwrap_or_default(),
            },
            sandbox: SandboxStats::collect(s),
        }
    }

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
