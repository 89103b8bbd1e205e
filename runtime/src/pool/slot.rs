//! The per-agent slot: everything about an agent that outlives one incarnation of it.
//!
//! A slot holds the agent's identity, the work groups it pulls tasks from, its lifecycle state
//! and the [`Signal`] that wakes it. When a supervisor rebuilds a crashed agent, the new
//! instance moves into the same slot, so queued tasks addressed to it are still there (its
//! mailbox, kept by the bus under the same id, survives too). Everything here is atomics: the
//! agent, its supervisor, the watchdog and senders all touch a slot without a lock.

use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use crate::ids::AgentId;
use crate::priority::PerPriority;
use crate::queue::WorkGroup;
use crate::signal::Signal;
use crate::task::QueuedTask;

/// What a factory knows about the agent it builds.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// The slot's id.
    pub id: AgentId,
    /// The agent kind, as named in the config.
    pub kind: Arc<str>,
    /// The tier the agent belongs to.
    pub tier: Arc<str>,
    /// Capabilities the agent serves (its kind is always one of them).
    pub capabilities: Arc<[Arc<str>]>,
    /// Kind-specific parameters from the config (`[tiers.agents.params]`).
    pub params: Arc<toml::Table>,
    /// How many times this slot has been started before (0 for the first build).
    pub restarts: u32,
}

const EMPTY: u8 = 0;
const FULL: u8 = 1;
const BUSY: u8 = 2;

/// The task an agent is running, reachable from outside so the liveness watchdog can answer
/// it when the agent's thread is stuck. A one-slot handoff: the agent puts, then whoever takes
/// first (the agent when the handler returns, or the watchdog) gets the task.
pub(crate) struct InFlight {
    state: AtomicU8,
    task: UnsafeCell<Option<QueuedTask>>,
    /// The incarnation that put the task (a replaced incarnation must not take its successor's).
    owner: AtomicU64,
}

// SAFETY: `task` is only touched by the party that moved `state` to FULL-in-progress (the
// owner, in `put`, while no one else can take) or won the FULL→BUSY exchange (in `take`);
// those accesses are ordered by the Release stores and Acquire exchanges on `state`.
unsafe impl Sync for InFlight {}

impl InFlight {
    fn new() -> Self {
        InFlight {
            state: AtomicU8::new(EMPTY),
            task: UnsafeCell::new(None),
            owner: AtomicU64::new(0),
        }
    }

    /// Stores the running task. Only the owning agent calls this, and only after taking (or
    /// losing) the previous one.
    pub(crate) fn put(&self, task: QueuedTask, incarnation: u64) {
        // A watchdog take may still be moving the previous task out.
        while self.state.load(Ordering::Acquire) != EMPTY {
            std::hint::spin_loop();
        }
        // SAFETY: state is EMPTY and only the owner moves it out of EMPTY.
        unsafe { *self.task.get() = Some(task) };
        self.owner.store(incarnation, Ordering::Relaxed);
        self.state.store(FULL, Ordering::Release);
    }

    /// Takes the task if nobody has yet and `incarnation` put it.
    pub(crate) fn take_own(&self, incarnation: u64) -> Option<QueuedTask> {
        self.state
            .compare_exchange(FULL, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        if self.owner.load(Ordering::Relaxed) != incarnation {
            self.state.store(FULL, Ordering::Release);
            return None;
        }
        // SAFETY: winning FULL→BUSY gives exclusive access until the store below.
        let task = unsafe { (*self.task.get()).take() };
        self.state.store(EMPTY, Ordering::Release);
        task
    }

    /// Takes the task if nobody has yet, whoever put it (the watchdog).
    pub(crate) fn take(&self) -> Option<QueuedTask> {
        self.state
            .compare_exchange(FULL, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        // SAFETY: winning FULL→BUSY gives exclusive access until the store below.
        let task = unsafe { (*self.task.get()).take() };
        self.state.store(EMPTY, Ordering::Release);
        task
    }
}

/// Liveness of an agent, judged against the deadline of the task it is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Healthy = 0,
    /// Busy 2 heartbeats past its task's deadline.
    Warning = 1,
    /// Busy 3 heartbeats past: its task was answered `timeout` and it is being replaced.
    Dead = 2,
}

/// Lifecycle of a slot, as reported in health and the `troupe_agents` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Being built or running `on_start`.
    Starting,
    /// Taking work.
    Running,
    /// Crashed and waiting (backoff) to be rebuilt.
    Restarting,
    /// Stopped: by shutdown, or left down by its supervisor.
    Stopped,
}

impl AgentState {
    /// The label value used in metrics and health.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Starting => "starting",
            AgentState::Running => "running",
            AgentState::Restarting => "restarting",
            AgentState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> AgentState {
        match v {
            0 => AgentState::Starting,
            1 => AgentState::Running,
            2 => AgentState::Restarting,
            _ => AgentState::Stopped,
        }
    }
}

/// One agent's place in the pool.
pub(crate) struct AgentSlot {
    spec: AgentSpec,
    tier: usize,
    signal: Signal,
    /// Groups this agent pulls from; index 0 is its own (tasks sent to its id).
    groups: Box<[Arc<WorkGroup>]>,
    /// Whether the agent is listed in the matching group's idle list.
    in_idle: Box<[AtomicBool]>,
    state: AtomicU8,
    /// Asks the current incarnation to stop after the work in hand.
    stop: AtomicBool,
    /// Cancels the work in hand (a stop that overran `shutdown.stop_timeout`).
    kill: AtomicBool,
    /// Down for good: no incarnation will start again (see `set_down`).
    down: AtomicBool,
    starts: AtomicU64,
    restarts: AtomicU32,
    in_flight: InFlight,
    /// Deadline of the running task, in ms since the pool's epoch; 0 when idle or unbounded.
    deadline_ms: AtomicU64,
    liveness: AtomicU8,
    /// Bumped by each incarnation at start; an older incarnation that sees a newer number has
    /// been replaced and leaves.
    incarnation: AtomicU64,
}

impl AgentSlot {
    pub(crate) fn new(spec: AgentSpec, tier: usize, groups: Box<[Arc<WorkGroup>]>) -> Self {
        let in_idle = groups.iter().map(|_| AtomicBool::new(false)).collect();
        // A new slot is live (about to start) in every group it serves.
        groups.iter().for_each(|g| g.member_up());
        AgentSlot {
            spec,
            tier,
            signal: Signal::default(),
            groups,
            in_idle,
            state: AtomicU8::new(AgentState::Starting as u8),
            stop: AtomicBool::new(false),
            kill: AtomicBool::new(false),
            down: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            restarts: AtomicU32::new(0),
            in_flight: InFlight::new(),
            deadline_ms: AtomicU64::new(0),
            liveness: AtomicU8::new(Liveness::Healthy as u8),
            incarnation: AtomicU64::new(0),
        }
    }

    /// Who the agent is.
    #[inline]
    pub(crate) fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    /// Index of its tier in the config.
    #[inline]
    pub(crate) fn tier(&self) -> usize {
        self.tier
    }

    /// Its wake-up flag.
    #[inline]
    pub(crate) fn signal(&self) -> &Signal {
        &self.signal
    }

    pub(crate) fn state(&self) -> AgentState {
        AgentState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, s: AgentState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// Marks the agent down for good (its supervisor will not start it again: a temporary
    /// child that exited, a tier the root gave up on) or back (a new incarnation starts),
    /// keeping each of its groups' count of live members right. A stop that is followed by a
    /// restart (a sibling's group restart) is not "down".
    pub(crate) fn set_down(&self, down: bool) {
        if self.down.swap(down, Ordering::AcqRel) == down {
            return;
        }
        if down {
            self.groups.iter().for_each(|g| g.member_down());
        } else {
            self.groups.iter().for_each(|g| g.member_up());
        }
    }

    /// True if the agent has been busy on one task past its liveness limit.
    pub(crate) fn is_unhealthy(&self) -> bool {
        self.liveness.load(Ordering::Acquire) != Liveness::Healthy as u8
    }

    pub(crate) fn set_liveness(&self, l: Liveness) {
        self.liveness.store(l as u8, Ordering::Release);
    }

    /// Clears stop and kill requests before a new incarnation starts.
    pub(crate) fn clear_requests(&self) {
        self.stop.store(false, Ordering::Release);
        self.kill.store(false, Ordering::Release);
    }

    /// Asks the agent to stop after the work in hand, and wakes it to notice.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.signal.force_wake();
    }

    /// True once a stop was requested.
    #[inline]
    pub(crate) fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Cancels the work in hand (a stop overran its timeout), and wakes the agent to notice.
    pub(crate) fn kill(&self) {
        self.kill.store(true, Ordering::Release);
        self.signal.force_wake();
    }

    /// True once the work in hand is to be cancelled.
    #[inline]
    pub(crate) fn killed(&self) -> bool {
        self.kill.load(Ordering::Acquire)
    }

    /// Counts a finished start; true for the slot's first.
    pub(crate) fn record_start(&self) -> bool {
        self.starts.fetch_add(1, Ordering::AcqRel) == 0
    }

    /// Starts so far (first starts and restarts).
    pub(crate) fn starts(&self) -> u64 {
        self.starts.load(Ordering::Acquire)
    }

    /// Counts a restart by the supervisor.
    pub(crate) fn record_restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Restarts so far.
    pub(crate) fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Begins a new incarnation and returns its number.
    pub(crate) fn next_incarnation(&self) -> u64 {
        self.incarnation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The current incarnation.
    #[inline]
    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Publishes the running task and its deadline (ms since the pool epoch, 0 for none), so
    /// the watchdog can answer it if the agent's thread gets stuck.
    #[inline]
    pub(crate) fn begin_task(&self, task: QueuedTask, incarnation: u64, deadline_ms: u64) {
        if deadline_ms != 0 {
            self.deadline_ms.store(deadline_ms, Ordering::Release);
        }
        self.in_flight.put(task, incarnation);
    }

    /// Takes the running task back when its handler returns; `None` if the watchdog took it.
    #[inline]
    pub(crate) fn end_task(&self, incarnation: u64) -> Option<QueuedTask> {
        let task = self.in_flight.take_own(incarnation)?;
        self.deadline_ms.store(0, Ordering::Release);
        Some(task)
    }

    /// The running task's deadline in ms since the pool epoch; 0 when idle or unbounded.
    pub(crate) fn deadline_ms(&self) -> u64 {
        self.deadline_ms.load(Ordering::Acquire)
    }

    /// Takes the running task away from a stuck agent (the watchdog).
    pub(crate) fn seize_task(&self) -> Option<QueuedTask> {
        let task = self.in_flight.take()?;
        self.deadline_ms.store(0, Ordering::Release);
        Some(task)
    }

    /// True if any of its groups holds a task.
    #[inline]
    pub(crate) fn has_work(&self) -> bool {
        self.groups.iter().any(|g| !g.is_empty())
    }

    /// Lists the agent as idle on each of its groups (once per group), so whoever queues work
    /// there wakes it.
    pub(crate) fn list_idle(&self) {
        // Its own group has one member, so the flag alone is the listing (see
        // `take_own_listing`): no queue entry, and no queue block allocated per agent.
        self.in_idle[0].store(true, Ordering::SeqCst);
        for (position, group) in self.groups.iter().enumerate().skip(1) {
            if !self.in_idle[position].swap(true, Ordering::SeqCst) {
                group.push_idle(self.spec.id.0, position as u8);
            }
        }
    }

    /// Takes the agent's listing as idle on its own group: true if it was listed (whoever
    /// queued work there then wakes it).
    #[inline]
    pub(crate) fn take_own_listing(&self) -> bool {
        self.in_idle[0].swap(false, Ordering::SeqCst)
    }

    /// Marks the agent as no longer listed on its group at `position` (a waker took it).
    #[inline]
    pub(crate) fn unlist_idle(&self, position: u8) {
        self.in_idle[position as usize].store(false, Ordering::SeqCst);
    }

    /// Takes the next task from the agent's groups: the group with the most urgent queued task
    /// wins, and within it the group's fair pick applies.
    #[inline]
    pub(crate) fn pick(&self, limits: &PerPriority<u32>) -> Option<QueuedTask> {
        loop {
            let mut best: Option<(usize, usize)> = None;
            for (gi, g) in self.groups.iter().enumerate() {
                if let Some(level) = g.first_nonempty() {
                    if best.is_none_or(|(b, _)| level < b) {
                        best = Some((level, gi));
                    }
                    if level == 0 {
                        break;
                    }
                }
            }
            let (_, gi) = best?;
            if let Some(task) = self.groups[gi].pop(limits) {
                return Some(task);
            }
        }
    }
}
