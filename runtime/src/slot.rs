//! The per-agent slot: everything about an agent that outlives one incarnation of it.
//!
//! A slot holds the agent's identity, its bounded mailbox, the work groups it pulls tasks from,
//! its lifecycle state and the [`Signal`] that wakes it. When a supervisor rebuilds a crashed
//! agent, the new instance moves into the same slot, so messages and queued tasks addressed to
//! it are still there.

use std::cell::UnsafeCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use crossbeam_queue::SegQueue;
use futures_util::task::AtomicWaker;

use crate::agent::AgentSpec;
use crate::bound::Bound;
use crate::bus::Message;
use crate::queue::WorkGroup;
use crate::task::QueuedTask;

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

const RUNNING: u8 = 0;
const IDLE: u8 = 1;
const NOTIFIED: u8 = 2;

/// Wakes a parked agent without locks: a three-state flag plus an [`AtomicWaker`].
///
/// The agent announces `IDLE` before its last look for work, and anyone who gives it work
/// afterwards flips the flag to `NOTIFIED` and wakes it, so a wake-up is never lost.
#[derive(Default)]
pub(crate) struct Signal {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the agent whatever it is doing (a busy agent will look again before parking).
    #[inline]
    pub(crate) fn notify(&self) {
        if self.state.swap(NOTIFIED, Ordering::SeqCst) == IDLE {
            self.waker.wake();
        }
    }

    /// Wakes the agent only if it is parked; returns whether it was.
    #[inline]
    pub(crate) fn wake_if_idle(&self) -> bool {
        if self
            .state
            .compare_exchange(IDLE, NOTIFIED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.waker.wake();
            true
        } else {
            false
        }
    }

    /// Wakes the agent's task even mid-handler (used to deliver a cancel or a stop).
    pub(crate) fn force_wake(&self) {
        self.state.store(NOTIFIED, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Announces the agent is about to park. Returns false if a notification is already
    /// pending (the agent should look for work again instead).
    #[inline]
    pub(crate) fn begin_idle(&self) -> bool {
        match self
            .state
            .compare_exchange(RUNNING, IDLE, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(_) => {
                self.state.store(RUNNING, Ordering::SeqCst);
                false
            }
        }
    }

    /// Leaves the idle state without parking (work was found on the last look).
    #[inline]
    pub(crate) fn cancel_idle(&self) {
        self.state.store(RUNNING, Ordering::SeqCst);
    }

    /// Parks until notified.
    pub(crate) fn parked(&self) -> Parked<'_> {
        Parked { signal: self }
    }

    /// Registers the current task to be woken by [`notify`](Self::notify) without changing
    /// state; used while a handler runs so a cancel request reaches it.
    pub(crate) fn register(&self, cx: &Context<'_>) {
        self.waker.register(cx.waker());
    }
}

pub(crate) struct Parked<'a> {
    signal: &'a Signal,
}

impl Future for Parked<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.signal.waker.register(cx.waker());
        if self.signal.state.load(Ordering::SeqCst) == NOTIFIED {
            self.signal.state.store(RUNNING, Ordering::SeqCst);
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
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

/// A bounded mailbox of bus messages.
pub(crate) struct Mailbox {
    pub(crate) queue: SegQueue<Message>,
    pub(crate) bound: Bound,
}

impl Mailbox {
    fn new(capacity: usize) -> Self {
        Mailbox {
            queue: SegQueue::new(),
            bound: Bound::new(capacity),
        }
    }

    #[inline]
    pub(crate) fn pop(&self) -> Option<Message> {
        let msg = self.queue.pop()?;
        self.bound.release();
        Some(msg)
    }

    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

pub(crate) struct AgentSlot {
    pub(crate) spec: AgentSpec,
    pub(crate) tier: usize,
    pub(crate) signal: Signal,
    pub(crate) mailbox: Mailbox,
    /// Groups this agent pulls from; index 0 is its own (tasks sent to its id).
    pub(crate) groups: Box<[Arc<WorkGroup>]>,
    /// Whether the agent is listed in the matching group's idle list.
    pub(crate) in_idle: Box<[AtomicBool]>,
    state: AtomicU8,
    /// Asks the current incarnation to stop after the work in hand.
    pub(crate) stop: AtomicBool,
    /// Cancels the work in hand (a stop that overran `shutdown.stop_timeout`).
    pub(crate) kill: AtomicBool,
    pub(crate) starts: AtomicU64,
    pub(crate) restarts: AtomicU32,
    pub(crate) in_flight: InFlight,
    /// Deadline of the running task, in ms since the runtime's epoch; 0 when idle or unbounded.
    pub(crate) deadline_ms: AtomicU64,
    pub(crate) liveness: AtomicU8,
    /// Bumped by each incarnation at start; an older incarnation that sees a newer number has
    /// been replaced and leaves.
    pub(crate) incarnation: AtomicU64,
}

impl AgentSlot {
    pub(crate) fn new(
        spec: AgentSpec,
        tier: usize,
        mailbox_capacity: usize,
        groups: Box<[Arc<WorkGroup>]>,
    ) -> Self {
        let in_idle = groups.iter().map(|_| AtomicBool::new(false)).collect();
        AgentSlot {
            spec,
            tier,
            signal: Signal::default(),
            mailbox: Mailbox::new(mailbox_capacity),
            groups,
            in_idle,
            state: AtomicU8::new(AgentState::Starting as u8),
            stop: AtomicBool::new(false),
            kill: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            restarts: AtomicU32::new(0),
            in_flight: InFlight::new(),
            deadline_ms: AtomicU64::new(0),
            liveness: AtomicU8::new(Liveness::Healthy as u8),
            incarnation: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> AgentState {
        AgentState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, s: AgentState) {
        self.state.store(s as u8, Ordering::Release);
    }

    /// True if the agent has been busy on one task past its liveness limit.
    pub(crate) fn is_unhealthy(&self) -> bool {
        self.liveness.load(Ordering::Acquire) != Liveness::Healthy as u8
    }

    pub(crate) fn set_liveness(&self, l: Liveness) {
        self.liveness.store(l as u8, Ordering::Release);
    }

    /// True if any of its groups holds a task.
    #[inline]
    pub(crate) fn has_work(&self) -> bool {
        self.groups.iter().any(|g| !g.is_empty())
    }
}
