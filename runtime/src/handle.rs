//! The runtime's core (its parts, composed) and [`RuntimeHandle`], the cheap handle through which
//! callers and agents use it.
//!
//! [`Core`] holds one of each part, each owning its own state: the pool (agent slots, work
//! groups, capability index), admission (bounds and the shutdown gate), the bus, the ledger
//! (task counts and outcomes), supervision and the sandbox. Submission is the one flow that
//! crosses them, and it is written here, in the order a task meets them: validate against the
//! pool, reserve in admission, count in the ledger, queue in the pool (or dispatch to the
//! sandbox). Nothing here reaches into a part's fields; parts do not know the core.

// A refused submission hands the task back by value inside `Rejected`: boxing it would put an
// allocation on the overload path, exactly where the runtime must stay cheap.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::admission::Admission;
use crate::bound::ShareGuard;
use crate::bus::{Bus, BusCore};
use crate::config::RuntimeConfig;
use crate::error::{Rejected, SubmitError};
use crate::health::{Health, Stats};
use crate::ids::{AgentId, next_task_id};
use crate::ledger::Ledger;
use crate::phase::Phase;
use crate::pool::Pool;
use crate::priority::Priority;
use crate::sandbox::lanes::{Responder, Sandbox};
use crate::sandbox::model::{SandboxError, Verdict};
use crate::supervisor::Supervision;
use crate::task::{Completion, Outcome, QueuedTask, Task, TaskHandle};
use crate::telemetry::{LatencyHistogram, LatencySummary};

/// One runtime's parts.
pub(crate) struct Core {
    parts: Parts,
    /// Lets a retry timer keep the runtime alive without threading an `Arc` everywhere.
    self_ref: Weak<Core>,
}

/// The parts a [`Core`] is made of (built by the runtime builder).
pub(crate) struct Parts {
    pub(crate) config: RuntimeConfig,
    pub(crate) phase: Arc<Phase>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) bus: Arc<BusCore>,
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) supervision: Arc<Supervision>,
    pub(crate) sandbox: Arc<Sandbox>,
    /// Each registered kind's limiter (fixed at start).
    pub(crate) limits: HashMap<String, Arc<crate::limit::KindLimiter>>,
}

impl Core {
    /// Composes `parts`; `self_ref` is the weak reference to the core being built.
    pub(crate) fn new(self_ref: Weak<Core>, parts: Parts) -> Self {
        Core { parts, self_ref }
    }

    /// The config the runtime was started with.
    #[inline]
    pub(crate) fn config(&self) -> &RuntimeConfig {
        &self.parts.config
    }

    /// The lifecycle phase.
    #[inline]
    pub(crate) fn phase(&self) -> &Phase {
        &self.parts.phase
    }

    /// Agent slots, work groups, capability index.
    #[inline]
    pub(crate) fn pool(&self) -> &Pool {
        &self.parts.pool
    }

    /// Bounds and the shutdown gate.
    #[inline]
    pub(crate) fn admission(&self) -> &Admission {
        &self.parts.admission
    }

    /// Mailboxes, topics and their counters.
    #[inline]
    pub(crate) fn bus(&self) -> &Arc<BusCore> {
        &self.parts.bus
    }

    /// Task counts, latencies and outcomes.
    #[inline]
    pub(crate) fn ledger(&self) -> &Ledger {
        &self.parts.ledger
    }

    /// Tiers, root and restarts.
    #[inline]
    pub(crate) fn supervision(&self) -> &Arc<Supervision> {
        &self.parts.supervision
    }

    /// The tri-sandbox.
    #[inline]
    pub(crate) fn sandbox(&self) -> &Arc<Sandbox> {
        &self.parts.sandbox
    }

    /// Retries a failed attempt if its policy and its deadline allow, otherwise finishes with
    /// `outcome`.
    pub(crate) fn retry_or_finish(&self, task: QueuedTask, outcome: Outcome) {
        if task.attempt >= task.retry.max_attempts || self.parts.phase.is_cancelling() {
            self.parts.ledger.finish(task, outcome);
            return;
        }
        let delay = task.retry.delay_before(task.attempt + 1);
        self.attempt_again(task, delay);
    }

    /// A handler said its upstream refused and to come back after `after`: its kind pauses
    /// (`limiter`, the handler's own), and the task is tried again then, whatever its retry
    /// policy, unless its deadline comes first (then it ends `timeout`).
    pub(crate) fn retry_after(
        &self,
        limiter: Option<&crate::limit::KindLimiter>,
        task: QueuedTask,
        after: Duration,
        outcome: Outcome,
    ) {
        if let Some(l) = limiter {
            l.pause_for(after);
        }
        if self.parts.phase.is_cancelling() {
            self.parts.ledger.finish(task, outcome);
            return;
        }
        self.attempt_again(task, after);
    }

    /// Queues the next attempt after `delay`, or ends the task `timeout` if its deadline would
    /// pass first.
    fn attempt_again(&self, mut task: QueuedTask, delay: Duration) {
        if task.deadline.is_some_and(|d| Instant::now() + delay >= d) {
            // No time left for another attempt: the deadline decides.
            self.parts.ledger.finish(task, Outcome::Timeout);
            return;
        }
        task.attempt += 1;
        if delay.is_zero() {
            self.requeue(task);
            return;
        }
        match (
            tokio::runtime::Handle::try_current(),
            self.self_ref.upgrade(),
        ) {
            (Ok(handle), Some(core)) => {
                handle.spawn(async move {
                    tokio::time::sleep(delay).await;
                    core.requeue(task);
                });
            }
            _ => self.requeue(task),
        }
    }

    /// The limiter of `kind`.
    pub(crate) fn limiter(&self, kind: &str) -> Option<Arc<crate::limit::KindLimiter>> {
        self.parts.limits.get(kind).cloned()
    }

    fn requeue(&self, mut task: QueuedTask) {
        if self.parts.phase.is_cancelling() {
            self.parts.ledger.finish(task, Outcome::Cancelled);
            return;
        }
        task.enqueued_at = Instant::now();
        self.parts.admission.force_reserve(task.priority);
        let group = task.group;
        self.parts.pool.push(group, task);
    }

    fn reject(&self, task: Task, error: SubmitError) -> Rejected {
        self.parts.ledger.rejected(task.priority, &error);
        Rejected { error, task }
    }

    /// Checks `task` against the pool (or the sandbox) before any slot is reserved; the group
    /// it will be queued on. `internal`: submitted by an agent.
    fn precheck(&self, task: &Task, internal: bool) -> Result<u32, SubmitError> {
        if !self.parts.phase.admits(internal) {
            return Err(SubmitError::ShuttingDown);
        }
        if task.timeout == Some(Duration::ZERO) {
            return Err(SubmitError::Invalid("timeout must be above zero".into()));
        }
        if task.attempt_timeout == Some(Duration::ZERO) {
            return Err(SubmitError::Invalid(
                "attempt_timeout must be above zero".into(),
            ));
        }
        if task.sandboxed {
            return match self.parts.sandbox.lanes_for(&task.target) {
                Some(_) => Ok(u32::MAX),
                None => Err(SubmitError::Invalid(format!(
                    "{} is not a sandbox kind (see `sandbox.kinds`)",
                    task.target
                ))),
            };
        }
        if task.retry.max_attempts == 0 {
            return Err(SubmitError::Invalid(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        let group = self.parts.pool.resolve(&task.target)?;
        if !self.parts.pool.is_live(group) {
            return Err(SubmitError::Unavailable(task.target.to_string()));
        }
        Ok(group)
    }

    /// When a task accepted at `now` must have its outcome: its timeout (or the default) from
    /// now, or its deadline, whichever is earlier.
    fn deadline_of(&self, task: &Task, now: Instant) -> Option<Instant> {
        let from_timeout = task
            .timeout
            .or(self.parts.config.tasks.default_timeout)
            .and_then(|t| now.checked_add(t));
        match (from_timeout, task.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes the task's place in its target's share of the queue, after its queue slot was
    /// reserved (which this gives back on refusal). Sandboxed tasks have no share.
    fn take_share(&self, task: &Task, group: u32) -> Result<Option<ShareGuard>, SubmitError> {
        if task.sandboxed {
            return Ok(None);
        }
        self.parts
            .pool
            .take_share(group, task.priority)
            .map_err(|(held, capacity)| {
                self.parts.admission.release(task.priority);
                SubmitError::KindFull {
                    target: task.target.to_string(),
                    priority: task.priority,
                    held,
                    capacity,
                }
            })
    }

    /// Admits a task whose queue slot (and share) is already reserved.
    fn admit(
        &self,
        task: Task,
        group: u32,
        share: Option<ShareGuard>,
        internal: bool,
    ) -> Result<TaskHandle, Rejected> {
        let p = task.priority;
        let _pass = match self.parts.admission.enter(internal) {
            Ok(pass) => pass,
            Err(e) => {
                self.parts.admission.release(p);
                return Err(self.reject(task, e));
            }
        };
        let now = Instant::now();
        let id = next_task_id();
        let (tx, rx) = oneshot::channel();
        self.parts.ledger.accepted(id, p, task.key);
        let deadline = self.deadline_of(&task, now);
        let queued = QueuedTask {
            id,
            priority: p,
            payload: task.payload.clone(),
            attempt_timeout: task.attempt_timeout,
            deadline,
            retry: task.retry,
            attempt: 1,
            parent: task.parent,
            key: task.key,
            submitted_at: now,
            enqueued_at: now,
            group,
            share,
            completion: Completion::new(Some(tx)),
        };
        if task.sandboxed {
            match self.parts.sandbox.lanes_for(&task.target) {
                Some(lanes) => {
                    let timeout = self
                        .parts
                        .sandbox
                        .lane_timeout(task.attempt_timeout, deadline);
                    self.parts.sandbox.dispatch(
                        lanes,
                        id,
                        task.payload,
                        timeout,
                        Responder::Task(Box::new(queued)),
                    );
                }
                None => {
                    self.parts.admission.release(p);
                    self.parts.ledger.finish(queued, Outcome::Cancelled);
                }
            }
            return Ok(TaskHandle::new(id, rx));
        }
        self.parts.pool.push(group, queued);
        Ok(TaskHandle::new(id, rx))
    }
}

/// Recent queue wait, window by window; see [`RuntimeHandle::queue_wait_window`].
pub struct QueueWaitWindow {
    core: Arc<Core>,
    priority: Option<Priority>,
    last: Option<hdrhistogram::Histogram<u64>>,
}

impl std::fmt::Debug for QueueWaitWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueWaitWindow")
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl QueueWaitWindow {
    fn snapshot(&self) -> Option<hdrhistogram::Histogram<u64>> {
        let ledger = self.core.ledger();
        match self.priority {
            Some(p) => ledger.queue_wait(p).snapshot(),
            None => {
                let mut all = hdrhistogram::Histogram::<u64>::new(3).ok()?;
                for p in Priority::ALL {
                    if let Some(h) = ledger.queue_wait(p).snapshot() {
                        let _ = all.add(&h);
                    }
                }
                Some(all)
            }
        }
    }

    /// Percentiles of the queue waits recorded since the previous take (or since the window
    /// was made). Empty (count 0) when nothing was picked up, or with latency histograms off.
    pub fn take(&mut self) -> LatencySummary {
        let now = self.snapshot();
        let summary = match (&now, &self.last) {
            (Some(now), Some(last)) => {
                let mut delta = now.clone();
                // The histograms only grow, so the subtraction cannot underflow.
                match delta.subtract(last) {
                    Ok(()) => LatencySummary::from_histogram(&delta),
                    Err(_) => LatencySummary::from_histogram(now),
                }
            }
            (Some(now), None) => LatencySummary::from_histogram(now),
            _ => LatencySummary::default(),
        };
        self.last = now;
        summary
    }
}

/// A cheap, cloneable handle to a running runtime.
///
/// A handle from an agent's context ([`AgentContext::runtime`](crate::AgentContext::runtime))
/// is the agent's own: it may still submit sub-tasks while shutdown drains, when handles held
/// outside the pool are refused with `ShuttingDown`.
#[derive(Clone)]
pub struct RuntimeHandle {
    core: Arc<Core>,
    /// Held by an agent (or a sandbox lane instance) of this runtime.
    internal: bool,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("agents", &self.core.parts.pool.len())
            .finish_non_exhaustive()
    }
}

impl RuntimeHandle {
    /// A handle for callers outside the pool.
    pub(crate) fn new(core: Arc<Core>) -> Self {
        RuntimeHandle {
            core,
            internal: false,
        }
    }

    /// A handle for the runtime's own agents.
    pub(crate) fn internal(core: Arc<Core>) -> Self {
        RuntimeHandle {
            core,
            internal: true,
        }
    }

    /// The core, for the runtime's own modules above it (the agent loop, shutdown, export).
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Submits a task if its priority's queue has room; refuses at once otherwise.
    ///
    /// On refusal the task comes back inside [`Rejected`] with a typed reason (queue full with
    /// its depth and capacity, shutting down, or invalid).
    #[inline]
    pub fn try_submit(&self, task: Task) -> Result<TaskHandle, Rejected> {
        let c = &self.core;
        let group = match c.precheck(&task, self.internal) {
            Ok(g) => g,
            Err(e) => return Err(c.reject(task, e)),
        };
        if let Err(e) = c.parts.admission.try_reserve(task.priority) {
            return Err(c.reject(task, e));
        }
        let share = match c.take_share(&task, group) {
            Ok(s) => s,
            Err(e) => return Err(c.reject(task, e)),
        };
        c.admit(task, group, share, self.internal)
    }

    /// Submits a task, waiting up to `max_wait` for room in its priority's queue.
    pub async fn submit(&self, task: Task, max_wait: Duration) -> Result<TaskHandle, Rejected> {
        let c = &self.core;
        let group = match c.precheck(&task, self.internal) {
            Ok(g) => g,
            Err(e) => return Err(c.reject(task, e)),
        };
        if let Err(e) = c
            .parts
            .admission
            .reserve_until(task.priority, Instant::now() + max_wait)
            .await
        {
            return Err(c.reject(task, e));
        }
        let share = match c.take_share(&task, group) {
            Ok(s) => s,
            Err(e) => return Err(c.reject(task, e)),
        };
        c.admit(task, group, share, self.internal)
    }

    /// Runs `task` in the tri-sandbox and returns the verdict: the output two lanes agreed on
    /// and which lanes they were, or [`SandboxError::NoQuorum`] with every lane's result.
    /// Admission applies as for any task (a full queue is `SandboxError::Rejected`).
    pub async fn run_sandboxed(&self, task: Task) -> Result<Verdict, SandboxError> {
        let c = &self.core;
        let task = task.sandboxed();
        let priority = task.priority;
        let rejected = |e: SubmitError| {
            c.parts.ledger.rejected(priority, &e);
            SandboxError::Rejected(e)
        };
        c.precheck(&task, self.internal).map_err(rejected)?;
        let lanes = c
            .parts
            .sandbox
            .lanes_for(&task.target)
            .ok_or_else(|| rejected(SubmitError::Invalid("not a sandbox kind".into())))?;
        c.parts.admission.try_reserve(priority).map_err(rejected)?;
        let answer = {
            let _pass = match c.parts.admission.enter(self.internal) {
                Ok(pass) => pass,
                Err(e) => {
                    c.parts.admission.release(priority);
                    return Err(rejected(e));
                }
            };
            let id = next_task_id();
            c.parts.ledger.accepted(id, priority, task.key);
            let (reply, answer) = oneshot::channel();
            let deadline = c.deadline_of(&task, Instant::now());
            let timeout = c.parts.sandbox.lane_timeout(task.attempt_timeout, deadline);
            c.parts.sandbox.dispatch(
                lanes,
                id,
                task.payload,
                timeout,
                Responder::Direct {
                    id,
                    priority,
                    submitted_at: Instant::now(),
                    key: task.key,
                    reply,
                },
            );
            answer
        };
        answer.await.unwrap_or(Err(SandboxError::Cancelled))
    }

    /// Pids of the sandbox worker processes alive now.
    pub fn sandbox_worker_pids(&self) -> Vec<u32> {
        self.core.parts.sandbox.worker_pids()
    }

    /// The tri-sandbox (the worker process side reads its lane kinds).
    pub(crate) fn sandbox(&self) -> Arc<Sandbox> {
        self.core.parts.sandbox.clone()
    }

    /// The message bus, sending from outside the pool (or, from an agent's handle,
    /// anonymously but as one of the runtime's own).
    pub fn bus(&self) -> Bus {
        self.bus_as(None)
    }

    /// The bus, sending as `from`.
    pub(crate) fn bus_as(&self, from: Option<AgentId>) -> Bus {
        Bus::new(self.core.parts.bus.clone(), from, self.internal)
    }

    /// The bus for delivering what a [`BusBridge`](crate::BusBridge) brought from another
    /// node: sends and publications through it reach local agents only (they are not handed
    /// back to the bridge), and their messages carry `trace`, the remote sender's context.
    pub fn bridged_bus(&self, trace: crate::TraceContext) -> Bus {
        Bus::inbound(self.core.parts.bus.clone(), trace)
    }

    /// Every capability some agent of this pool serves (every kind is one), in first-seen
    /// config order.
    pub fn capabilities(&self) -> Vec<String> {
        self.core.parts.pool.capabilities()
    }

    /// Ids of the agents of `kind`, in start order.
    pub fn agents_of_kind(&self, kind: &str) -> Vec<AgentId> {
        self.core.parts.pool.agents_of_kind(kind)
    }

    /// Ids of the agents that serve `capability` (every kind is a capability), in start order.
    pub fn agents_with(&self, capability: &str) -> Vec<AgentId> {
        self.core.parts.pool.agents_with(capability)
    }

    /// Number of agents in the pool.
    pub fn agent_count(&self) -> usize {
        self.core.parts.pool.len()
    }

    /// Tasks accepted and not yet finished (queued, running, or waiting to retry).
    pub fn outstanding(&self) -> u64 {
        self.core.parts.ledger.outstanding()
    }

    /// Free room in `priority`'s queue right now (its bound minus what it holds). A task
    /// source uses it to pull only what this runtime can take.
    pub fn room(&self, priority: Priority) -> usize {
        let a = &self.core.parts.admission;
        a.capacity(priority).saturating_sub(a.depth(priority))
    }

    /// A probe of recent queue wait: each [`QueueWaitWindow::take`] summarises the time tasks
    /// spent queued before an agent took them, over every attempt picked up since the previous
    /// take (all priorities, or one). Pure queueing, whatever the handlers cost: the signal an
    /// admission controller above the runtime sheds on.
    pub fn queue_wait_window(&self, priority: Option<Priority>) -> QueueWaitWindow {
        let mut w = QueueWaitWindow {
            core: self.core.clone(),
            priority,
            last: None,
        };
        w.last = w.snapshot();
        w
    }

    /// A snapshot of readiness, agents, queues and supervision.
    pub fn health(&self) -> Health {
        let c = &self.core;
        let mut reasons = Vec::new();
        if c.parts.phase.is_closed() {
            reasons.push("shutting down".to_owned());
        }
        reasons.extend(c.parts.supervision.failures());
        reasons.extend(c.parts.sandbox.failures());
        Health {
            ready: reasons.is_empty(),
            reasons,
            agents: c.parts.pool.len(),
            max_agents: c.parts.config.max_agents,
            tiers: c.parts.supervision.tiers_health(),
            queues: c.parts.admission.queues(),
            outstanding: c.parts.ledger.outstanding(),
        }
    }

    /// Counts and exact latency percentiles per priority, and bus totals.
    pub fn stats(&self) -> Stats {
        let c = &self.core;
        Stats {
            priorities: Priority::ALL
                .iter()
                .map(|&p| c.parts.ledger.stats(p))
                .collect(),
            latency: LatencyHistogram::merged(
                Priority::ALL.iter().map(|&p| c.parts.ledger.latency(p)),
            ),
            bus: c.parts.bus.stats(),
            sandbox: c.parts.sandbox.stats(),
            tiers: c.parts.supervision.tiers_stats(),
        }
    }
}
