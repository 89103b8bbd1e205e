//! Starting, using and stopping a runtime.
//!
//! [`RuntimeBuilder`] takes a [`RuntimeConfig`] and one factory per agent kind, builds the pool
//! (slots, work groups, supervisors) and starts every agent. The resulting [`Runtime`]
//! dereferences to a [`RuntimeHandle`], the cheap, cloneable handle used to submit tasks, reach
//! the bus and read health and stats. [`Runtime::shutdown`] drains, cancels and stops.

// A refused submission hands the task back by value inside `Rejected`: boxing it would put an
// allocation on the overload path, exactly where the runtime must stay cheap.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::FutureExt;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::agent::{AgentFactory, AgentId, AgentSpec, ExitReason};
use crate::bus::{Bus, TopicInner};
use crate::config::RuntimeConfig;
use crate::error::{ConfigError, Rejected, StartError, SubmitError};
use crate::priority::Priority;
use crate::queue::{Admission, WorkGroup};
use crate::sandbox::{
    LaneSpawnFn, Policies, Responder, Sandbox, SandboxError, SandboxPolicy, Verdict, lane_worker,
};
use crate::slot::AgentSlot;
use crate::supervisor::{Control, RootState, SpawnFn, TierState, TierSupervisor};
use crate::task::{Completion, Outcome, QueuedTask, Target, Task, TaskHandle, TaskId};
use crate::telemetry::{StripedCounter, Telemetry};
use crate::worker;

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CANCELLING: u8 = 2;
const STOPPED: u8 = 3;

/// State shared by every handle, agent and supervisor of one runtime.
pub(crate) struct Shared {
    pub(crate) config: RuntimeConfig,
    pub(crate) agents: Box<[AgentSlot]>,
    /// Capability groups first, then one group per agent (at `capabilities + agent index`).
    pub(crate) groups: Box<[Arc<WorkGroup>]>,
    pub(crate) capability_index: HashMap<String, u32>,
    pub(crate) admission: Admission,
    pub(crate) telemetry: Telemetry,
    pub(crate) topics: DashMap<String, Arc<TopicInner>>,
    pub(crate) tiers: Box<[TierState]>,
    pub(crate) root: Mutex<RootState>,
    spawners: HashMap<String, SpawnFn>,
    pub(crate) lane_spawners: HashMap<String, LaneSpawnFn>,
    pub(crate) sandbox: Sandbox,
    phase: AtomicU8,
    /// Entered / left the admission critical section; equal sums mean no admission in flight.
    admit_enter: StripedCounter,
    admit_exit: StripedCounter,
    /// Agents whose first start has not finished yet; `starts_done` fires when it reaches 0.
    pub(crate) pending_starts: std::sync::atomic::AtomicUsize,
    pub(crate) starts_done: tokio::sync::Notify,
    /// The first agent that failed its first start, and why.
    pub(crate) start_failure: Mutex<Option<(u32, String)>>,
    /// Origin of the millisecond clock used for agent deadlines.
    pub(crate) epoch: Instant,
    /// Lets a retry timer keep the runtime alive without threading an `Arc` everywhere.
    self_ref: std::sync::Weak<Shared>,
    /// The Tokio runtime the pool was started on. Sync entry points (`try_submit`) may be
    /// called from threads outside it and must spawn here, not on "the current runtime".
    pub(crate) rt: tokio::runtime::Handle,
}

/// Process-wide task id source. Each thread takes ids in blocks so the counter is touched once
/// per 1024 tasks.
fn next_task_id() -> TaskId {
    use std::cell::Cell;
    static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);
    const BLOCK: u64 = 1024;
    thread_local! {
        static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    RANGE.with(|r| {
        let (mut next, mut end) = r.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        r.set((next + 1, end));
        TaskId(next)
    })
}

impl Shared {
    /// `at` as milliseconds since the runtime's epoch.
    #[inline]
    pub(crate) fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Parameters of the first agent group of `kind` in the config (empty if none).
    pub(crate) fn params_of(&self, kind: &str) -> Arc<toml::Table> {
        self.agents
            .iter()
            .find(|s| &*s.spec.kind == kind)
            .map(|s| s.spec.params.clone())
            .unwrap_or_default()
    }

    #[inline]
    pub(crate) fn slot(&self, id: AgentId) -> Option<&AgentSlot> {
        self.agents.get(id.0 as usize)
    }

    /// True once shutdown has begun (admission closed).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.phase.load(Ordering::SeqCst) != RUNNING
    }

    /// True once shutdown has finished.
    #[inline]
    pub(crate) fn is_stopped(&self) -> bool {
        self.phase.load(Ordering::Acquire) == STOPPED
    }

    /// True once shutdown has given up draining and cancels what is left.
    #[inline]
    pub(crate) fn is_cancelling(&self) -> bool {
        self.phase.load(Ordering::Acquire) >= CANCELLING
    }

    pub(crate) fn spawner_for(&self, index: u32) -> SpawnFn {
        let kind = &self.agents[index as usize].spec.kind;
        // Kinds are checked against the registered factories before any slot is built.
        self.spawners[&**kind].clone()
    }

    pub(crate) fn root_allows_restart(&self, tier: usize, reason: &ExitReason) -> bool {
        let name = &self.tiers[tier].config.name;
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        root.on_escalation(
            name,
            reason,
            self.config.root.max_restarts,
            self.config.root.period,
        )
    }

    /// Counts one agent's first start as finished (`failure` says why it did not succeed).
    pub(crate) fn first_start_finished(&self, index: u32, failure: Option<String>) {
        if let Some(reason) = failure {
            let mut f = self.start_failure.lock().unwrap_or_else(|p| p.into_inner());
            f.get_or_insert((index, reason));
        }
        if self.pending_starts.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.starts_done.notify_one();
        }
    }

    /// Records the outcome and answers the task's handle.
    #[inline]
    pub(crate) fn finish(&self, task: QueuedTask, outcome: Outcome) {
        let p = task.priority;
        let t = &self.telemetry;
        t.completed[p][outcome.kind().index()].increment(1);
        t.latency[p].record(worker::elapsed_ns(task.submitted_at));
        task.completion.send(outcome);
    }

    /// Retries a failed attempt if its policy allows, otherwise finishes with `outcome`.
    pub(crate) fn retry_or_finish(self: &Shared, mut task: QueuedTask, outcome: Outcome) {
        if task.attempt >= task.retry.max_attempts || self.is_cancelling() {
            self.finish(task, outcome);
            return;
        }
        task.attempt += 1;
        let delay = task.retry.delay_before(task.attempt);
        if delay.is_zero() {
            self.requeue(task);
            return;
        }
        match (
            tokio::runtime::Handle::try_current(),
            self.self_ref.upgrade(),
        ) {
            (Ok(handle), Some(shared)) => {
                handle.spawn(async move {
                    tokio::time::sleep(delay).await;
                    shared.requeue(task);
                });
            }
            _ => self.requeue(task),
        }
    }

    fn requeue(&self, mut task: QueuedTask) {
        if self.is_cancelling() {
            self.finish(task, Outcome::Cancelled);
            return;
        }
        task.enqueued_at = Instant::now();
        self.admission.level(task.priority).force_reserve();
        let group = task.group;
        self.groups[group as usize].push(task);
        self.wake_one(group);
    }

    /// Wakes one idle agent of `group`, skipping stale idle entries.
    #[inline]
    fn wake_one(&self, group: u32) {
        let g = &self.groups[group as usize];
        while let Some((agent, position)) = g.pop_idle() {
            let slot = &self.agents[agent as usize];
            slot.in_idle[position as usize].store(false, Ordering::SeqCst);
            if slot.signal.wake_if_idle() {
                return;
            }
        }
    }

    fn resolve(&self, target: &Target) -> Result<u32, SubmitError> {
        match target {
            Target::Capability(c) => self
                .capability_index
                .get(&**c)
                .copied()
                .ok_or_else(|| SubmitError::UnknownCapability(c.to_string())),
            Target::Agent(id) => {
                if (id.0 as usize) < self.agents.len() {
                    Ok(self.capability_index.len() as u32 + id.0)
                } else {
                    Err(SubmitError::UnknownAgent(*id))
                }
            }
        }
    }

    fn queue_full(&self, priority: Priority, depth: usize) -> SubmitError {
        SubmitError::QueueFull {
            priority,
            depth,
            capacity: self.admission.level(priority).capacity(),
        }
    }

    fn reject(&self, task: Task, error: SubmitError) -> Rejected {
        self.telemetry.rejected[task.priority][Telemetry::rejected_index(error.reason_label())]
            .increment(1);
        Rejected { error, task }
    }

    /// Admits a task whose queue slot is already reserved.
    fn admit(&self, task: Task, group: u32) -> Result<TaskHandle, Rejected> {
        self.admit_enter.increment(1);
        if self.is_closed() {
            self.admission.level(task.priority).release();
            self.admit_exit.increment(1);
            return Err(self.reject(task, SubmitError::ShuttingDown));
        }
        let now = Instant::now();
        let id = next_task_id();
        let (tx, rx) = oneshot::channel();
        let p = task.priority;
        self.telemetry.submitted[p].increment(1);
        let queued = QueuedTask {
            id,
            priority: p,
            payload: task.payload.clone(),
            timeout: task.timeout,
            deadline: task.deadline,
            retry: task.retry,
            attempt: 1,
            submitted_at: now,
            enqueued_at: now,
            group,
            completion: Completion::new(Some(tx)),
        };
        if task.sandboxed {
            let lanes = self.sandbox_lanes(&task.target);
            let timeout = self.lane_timeout(&task);
            match (lanes, self.self_ref.upgrade()) {
                (Some(lanes), Some(me)) => crate::sandbox::dispatch(
                    &me,
                    lanes,
                    id,
                    task.payload,
                    timeout,
                    Responder::Task(queued),
                ),
                _ => {
                    self.admission.level(p).release();
                    self.finish(queued, Outcome::Cancelled);
                }
            }
            self.admit_exit.increment(1);
            return Ok(TaskHandle::new(id, rx));
        }
        self.groups[group as usize].push(queued);
        self.wake_one(group);
        self.admit_exit.increment(1);
        Ok(TaskHandle::new(id, rx))
    }

    pub(crate) fn sandbox_lanes(&self, target: &Target) -> Option<Arc<crate::sandbox::KindLanes>> {
        match target {
            Target::Capability(c) => self.sandbox.kinds.get(&**c).cloned(),
            Target::Agent(_) => None,
        }
    }

    fn lane_timeout(&self, task: &Task) -> Duration {
        let mut t = task.timeout.unwrap_or(self.sandbox.config.lane_timeout);
        if let Some(d) = task.deadline {
            t = t.min(d.saturating_duration_since(Instant::now()));
        }
        t.max(Duration::from_millis(1))
    }

    fn precheck(&self, task: &Task) -> Result<u32, SubmitError> {
        if task.sandboxed {
            if self.is_closed() {
                return Err(SubmitError::ShuttingDown);
            }
            if task.timeout == Some(Duration::ZERO) {
                return Err(SubmitError::Invalid("timeout must be above zero".into()));
            }
            return match self.sandbox_lanes(&task.target) {
                Some(_) => Ok(u32::MAX),
                None => Err(SubmitError::Invalid(format!(
                    "{} is not a sandbox kind (see `sandbox.kinds`)",
                    task.target
                ))),
            };
        }
        if self.is_closed() {
            return Err(SubmitError::ShuttingDown);
        }
        if task.timeout == Some(Duration::ZERO) {
            return Err(SubmitError::Invalid("timeout must be above zero".into()));
        }
        if task.retry.max_attempts == 0 {
            return Err(SubmitError::Invalid(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        self.resolve(&task.target)
    }

    pub(crate) fn outstanding(&self) -> u64 {
        let done: u64 = Priority::ALL
            .iter()
            .flat_map(|&p| self.telemetry.completed[p].iter())
            .map(StripedCounter::get)
            .sum();
        let accepted: u64 = Priority::ALL
            .iter()
            .map(|&p| self.telemetry.submitted[p].get())
            .sum();
        accepted.saturating_sub(done)
    }
}

/// A cheap, cloneable handle to a running runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("agents", &self.shared.agents.len())
            .finish_non_exhaustive()
    }
}

impl RuntimeHandle {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        RuntimeHandle { shared }
    }

    /// Submits a task if its priority's queue has room; refuses at once otherwise.
    ///
    /// On refusal the task comes back inside [`Rejected`] with a typed reason (queue full with
    /// its depth and capacity, shutting down, or invalid).
    #[inline]
    pub fn try_submit(&self, task: Task) -> Result<TaskHandle, Rejected> {
        let s = &self.shared;
        let group = match s.precheck(&task) {
            Ok(g) => g,
            Err(e) => return Err(s.reject(task, e)),
        };
        if let Err(depth) = s.admission.level(task.priority).try_reserve() {
            let error = s.queue_full(task.priority, depth);
            return Err(s.reject(task, error));
        }
        s.admit(task, group)
    }

    /// Submits a task, waiting up to `max_wait` for room in its priority's queue.
    pub async fn submit(&self, task: Task, max_wait: Duration) -> Result<TaskHandle, Rejected> {
        let s = &self.shared;
        let group = match s.precheck(&task) {
            Ok(g) => g,
            Err(e) => return Err(s.reject(task, e)),
        };
        let level = s.admission.level(task.priority);
        if let Err(depth) = level.reserve_until(Instant::now() + max_wait).await {
            let error = s.queue_full(task.priority, depth);
            return Err(s.reject(task, error));
        }
        s.admit(task, group)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs `task` in the tri-sandbox and returns the verdict: the output two lanes agreed on
    /// and which lanes they were, or [`SandboxError::NoQuorum`] with every lane's result.
    /// Admission applies as for any task (a full queue is `SandboxError::Rejected`).
    pub async fn run_sandboxed(&self, task: Task) -> Result<Verdict, SandboxError> {
        let s = &self.shared;
        let task = task.sandboxed();
        let priority = task.priority;
        let rejected = |e: SubmitError| {
            s.telemetry.rejected[priority][Telemetry::rejected_index(e.reason_label())]
                .increment(1);
            SandboxError::Rejected(e)
        };
        s.precheck(&task).map_err(rejected)?;
        let lanes = s
            .sandbox_lanes(&task.target)
            .ok_or_else(|| rejected(SubmitError::Invalid("not a sandbox kind".into())))?;
        let level = s.admission.level(priority);
        if let Err(depth) = level.try_reserve() {
            return Err(rejected(s.queue_full(priority, depth)));
        }
        s.admit_enter.increment(1);
        if s.is_closed() {
            level.release();
            s.admit_exit.increment(1);
            return Err(rejected(SubmitError::ShuttingDown));
        }
        s.telemetry.submitted[priority].increment(1);
        let (reply, answer) = oneshot::channel();
        let timeout = s.lane_timeout(&task);
        crate::sandbox::dispatch(
            s,
            lanes,
            next_task_id(),
            task.payload,
            timeout,
            Responder::Direct {
                priority,
                submitted_at: Instant::now(),
                reply,
            },
        );
        s.admit_exit.increment(1);
        answer.await.unwrap_or(Err(SandboxError::Cancelled))
    }

    /// Pids of the sandbox worker processes alive now.
    pub fn sandbox_worker_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .shared
            .sandbox
            .pids
            .lock()
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default();
        pids.sort_unstable();
        pids
    }

    /// The message bus, sending from outside the pool.
    pub fn bus(&self) -> Bus {
        Bus::new(self.shared.clone(), None)
    }

    /// Ids of the agents of `kind`, in start order.
    pub fn agents_of_kind(&self, kind: &str) -> Vec<AgentId> {
        self.shared
            .agents
            .iter()
            .enumerate()
            .filter(|(_, s)| &*s.spec.kind == kind)
            .map(|(i, _)| AgentId(i as u32))
            .collect()
    }

    /// Ids of the agents that serve `capability` (every kind is a capability), in start order.
    pub fn agents_with(&self, capability: &str) -> Vec<AgentId> {
        self.shared
            .agents
            .iter()
            .enumerate()
            .filter(|(_, s)| s.spec.capabilities.iter().any(|c| &**c == capability))
            .map(|(i, _)| AgentId(i as u32))
            .collect()
    }

    /// Number of agents in the pool.
    pub fn agent_count(&self) -> usize {
        self.shared.agents.len()
    }

    /// Tasks accepted and not yet finished (queued, running, or waiting to retry).
    pub fn outstanding(&self) -> u64 {
        self.shared.outstanding()
    }

    /// A snapshot of readiness, agents, queues and supervision.
    pub fn health(&self) -> crate::health::Health {
        crate::health::Health::collect(&self.shared)
    }

    /// Counts and exact latency percentiles per priority, and bus totals.
    pub fn stats(&self) -> crate::health::Stats {
        crate::health::Stats::collect(&self.shared)
    }
}

/// Builds and starts a runtime.
pub struct RuntimeBuilder {
    config: RuntimeConfig,
    spawners: HashMap<String, SpawnFn>,
    lane_spawners: HashMap<String, LaneSpawnFn>,
    policies: Policies,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("config", &self.config)
            .field("kinds", &self.spawners.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl RuntimeBuilder {
    /// A builder for `config`.
    pub fn new(config: RuntimeConfig) -> Self {
        RuntimeBuilder {
            config,
            spawners: HashMap::new(),
            lane_spawners: HashMap::new(),
            policies: Policies::new(),
        }
    }

    /// Registers the factory for agent kind `kind`. Registering a kind twice replaces it.
    pub fn register<F: AgentFactory>(mut self, kind: impl Into<String>, factory: F) -> Self {
        let factory = Arc::new(factory);
        let kind = kind.into();
        let f = factory.clone();
        let spawn: SpawnFn =
            Arc::new(move |shared, start| worker::run(f.clone(), shared, start).boxed());
        let lane: LaneSpawnFn = Arc::new(move |w| lane_worker(factory.clone(), w).boxed());
        self.spawners.insert(kind.clone(), spawn);
        self.lane_spawners.insert(kind, lane);
        self
    }

    /// Sets how sandboxed results of `kind` are compared, and what to answer without a quorum.
    pub fn sandbox_policy(mut self, kind: impl Into<String>, policy: SandboxPolicy) -> Self {
        self.policies.insert(kind.into(), policy);
        self
    }

    /// The config this builder will start.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Validates the config, builds the pool and starts every agent. Returns once every agent
    /// has run its `on_start`, or with the first start failure (the pool is stopped again).
    pub async fn start(self) -> Result<Runtime, StartError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StartError::NoTokioRuntime);
        }
        let RuntimeBuilder {
            config,
            spawners,
            lane_spawners,
            policies,
        } = self;
        config.validate()?;
        for (i, k) in config.sandbox.kinds.iter().enumerate() {
            if !spawners.contains_key(&k.kind) {
                return Err(ConfigError::UnknownKind {
                    field: format!("sandbox.kinds[{i}].kind"),
                    kind: k.kind.clone(),
                }
                .into());
            }
        }
        for (i, tier) in config.tiers.iter().enumerate() {
            for (j, group) in tier.agents.iter().enumerate() {
                if !spawners.contains_key(&group.kind) {
                    return Err(ConfigError::UnknownKind {
                        field: format!("tiers[{i}].agents[{j}].kind"),
                        kind: group.kind.clone(),
                    }
                    .into());
                }
            }
        }

        // Capability groups: each kind and each extra capability, in first-seen order.
        let mut capability_index: HashMap<String, u32> = HashMap::new();
        let mut capability_names: Vec<Arc<str>> = Vec::new();
        for group in config.tiers.iter().flat_map(|t| &t.agents) {
            for name in std::iter::once(&group.kind).chain(&group.capabilities) {
                if !capability_index.contains_key(name) {
                    capability_index.insert(name.clone(), capability_names.len() as u32);
                    capability_names.push(Arc::from(name.as_str()));
                }
            }
        }
        let mut groups: Vec<Arc<WorkGroup>> = capability_names
            .iter()
            .map(|_| Arc::new(WorkGroup::new()))
            .collect();

        let mut agents = Vec::with_capacity(config.total_agents());
        let mut tiers = Vec::with_capacity(config.tiers.len());
        for (tier_index, tier) in config.tiers.iter().enumerate() {
            let tier_name: Arc<str> = Arc::from(tier.name.as_str());
            let mut children = Vec::new();
            for group in &tier.agents {
                let kind: Arc<str> =
                    capability_names[capability_index[&group.kind] as usize].clone();
                let mut caps: Vec<Arc<str>> = vec![kind.clone()];
                for c in &group.capabilities {
                    let name = &capability_names[capability_index[c] as usize];
                    if !caps.contains(name) {
                        caps.push(name.clone());
                    }
                }
                let capabilities: Arc<[Arc<str>]> = Arc::from(caps);
                let params = Arc::new(group.params.clone());
                for _ in 0..group.count {
                    let index = agents.len() as u32;
                    let id = AgentId(index);
                    let own = Arc::new(WorkGroup::new());
                    groups.push(own.clone());
                    let mut member_of = vec![own];
                    member_of.extend(
                        capabilities
                            .iter()
                            .map(|c| groups[capability_index[&**c] as usize].clone()),
                    );
                    let spec = AgentSpec {
                        id,
                        kind: kind.clone(),
                        tier: tier_name.clone(),
                        capabilities: capabilities.clone(),
                        params: params.clone(),
                        restarts: 0,
                    };
                    agents.push(AgentSlot::new(
                        spec,
                        tier_index,
                        config.mailbox.capacity,
                        member_of.into_boxed_slice(),
                    ));
                    children.push(index);
                }
            }
            tiers.push(TierState {
                config: tier.clone(),
                children,
                restarts: AtomicU64::new(0),
                escalations: AtomicU64::new(0),
                failed: Default::default(),
                startup: Default::default(),
                control: Mutex::new(None),
            });
        }
        // Own groups were pushed in agent order after the capability groups.
        debug_assert_eq!(groups.len(), capability_names.len() + agents.len());

        let agent_count = agents.len();
        let latency_histograms = config.telemetry.latency_histograms;
        let sandbox = Sandbox::new(config.sandbox.clone(), &policies);
        let shared = Arc::new_cyclic(|weak| Shared {
            lane_spawners,
            sandbox,
            admission: Admission::new(&config.queues.capacity),
            config,
            agents: agents.into_boxed_slice(),
            groups: groups.into_boxed_slice(),
            capability_index,
            telemetry: Telemetry::new(latency_histograms),
            topics: DashMap::new(),
            tiers: tiers.into_boxed_slice(),
            root: Mutex::new(RootState::default()),
            spawners,
            phase: AtomicU8::new(RUNNING),
            admit_enter: StripedCounter::default(),
            admit_exit: StripedCounter::default(),
            pending_starts: std::sync::atomic::AtomicUsize::new(agent_count),
            starts_done: tokio::sync::Notify::new(),
            start_failure: Mutex::new(None),
            epoch: Instant::now(),
            self_ref: weak.clone(),
            rt: tokio::runtime::Handle::current(),
        });

        Sandbox::start(&shared).map_err(|e| StartError::Sandbox(e.to_string()))?;
        tokio::spawn(crate::supervisor::watchdog(Arc::downgrade(&shared)));
        for tier in 0..shared.tiers.len() {
            TierSupervisor::spawn(shared.clone(), tier);
        }
        let runtime = Runtime {
            handle: RuntimeHandle {
                shared: shared.clone(),
            },
        };
        // Wait for every agent's first start to finish, successfully or not.
        loop {
            let notified = shared.starts_done.notified();
            if shared.pending_starts.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
        let failure = shared
            .start_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((index, reason)) = failure {
            let kind = shared.agents[index as usize].spec.kind.to_string();
            runtime.shutdown_with(Duration::ZERO).await;
            return Err(StartError::AgentStart {
                agent: AgentId(index),
                kind,
                reason,
            });
        }
        Ok(runtime)
    }
}

/// A running runtime. Dereferences to [`RuntimeHandle`]; call [`Runtime::shutdown`] to stop it.
///
/// Dropping a `Runtime` without shutting it down leaves its agents running until the Tokio
/// runtime ends; tasks still queued then answer `cancelled`.
#[derive(Debug)]
pub struct Runtime {
    handle: RuntimeHandle,
}

impl Deref for Runtime {
    type Target = RuntimeHandle;
    fn deref(&self) -> &RuntimeHandle {
        &self.handle
    }
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShutdownReport {
    /// Tasks that finished during the drain.
    pub drained: u64,
    /// Tasks cancelled after the drain deadline.
    pub cancelled: u64,
    /// Tasks still without an outcome when shutdown gave up (handlers that ignore
    /// cancellation by never yielding). Zero for cooperative handlers.
    pub abandoned: u64,
    /// Time the whole shutdown took.
    #[serde(with = "humantime_serde")]
    pub took: Duration,
}

impl Runtime {
    /// A builder for `config`.
    pub fn builder(config: RuntimeConfig) -> RuntimeBuilder {
        RuntimeBuilder::new(config)
    }

    /// A handle that outlives borrows of the runtime.
    pub fn handle(&self) -> RuntimeHandle {
        self.handle.clone()
    }

    /// Graceful shutdown with the configured drain timeout. See [`Runtime::shutdown_with`].
    pub async fn shutdown(self) -> ShutdownReport {
        let drain = self.handle.shared.config.shutdown.drain_timeout;
        self.shutdown_with(drain).await
    }

    /// Graceful shutdown:
    ///
    /// 1. stop admitting (submissions fail with `ShuttingDown`);
    /// 2. let queued and in-flight tasks finish, for up to `drain`;
    /// 3. cancel the rest: running handlers are dropped and every remaining task ends with
    ///    outcome `cancelled`;
    /// 4. stop agents in reverse start order (tiers in reverse, agents in reverse within each).
    ///
    /// Afterwards every accepted task has exactly one outcome.
    pub async fn shutdown_with(self, drain: Duration) -> ShutdownReport {
        let s = &self.handle.shared;
        let began = Instant::now();
        s.phase.store(DRAINING, Ordering::SeqCst);
        // Wait until no submission is between its phase check and its push.
        loop {
            let left = s.admit_exit.get();
            if s.admit_enter.get() == left {
                break;
            }
            tokio::task::yield_now().await;
        }
        let before = s.outstanding();
        let deadline = began + drain;
        while s.outstanding() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let drained = before - s.outstanding();

        let cancelled_before = self.cancelled_total();
        s.phase.store(CANCELLING, Ordering::SeqCst);
        s.sandbox.cancel.cancel();
        for slot in s.agents.iter() {
            slot.signal.force_wake();
        }
        // Agents cancel what they hold and pick; sweep the queues too, for groups whose agents
        // are down (a failed tier) and for retries that land late.
        let hard = Instant::now() + Duration::from_secs(5).max(drain);
        while s.outstanding() > 0 && Instant::now() < hard {
            for g in s.groups.iter() {
                while let Some(task) = g.pop_any() {
                    s.admission.level(task.priority).release();
                    s.finish(task, Outcome::Cancelled);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let abandoned = s.outstanding();
        let cancelled = self.cancelled_total() - cancelled_before;

        for tier in s.tiers.iter().rev() {
            let control = tier.control.lock().ok().and_then(|mut c| c.take());
            if let Some(control) = control {
                let (ack, done) = oneshot::channel();
                if control.send(Control::Stop(ack)).is_ok() {
                    let _ = done.await;
                }
            }
        }
        s.sandbox.shutdown().await;
        s.phase.store(STOPPED, Ordering::SeqCst);
        ShutdownReport {
            drained,
            cancelled,
            abandoned,
            took: began.elapsed(),
        }
    }

    fn cancelled_total(&self) -> u64 {
        let t = &self.handle.shared.telemetry;
        Priority::ALL
            .iter()
            .map(|&p| t.completed(p, crate::task::OutcomeKind::Cancelled))
            .sum()
    }
}
