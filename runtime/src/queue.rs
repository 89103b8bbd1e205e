//! Per-priority task queues: the work groups agents pull from.
//!
//! A [`WorkGroup`] is the set of queues for one capability (every agent kind is one) or for one
//! agent (tasks sent to an agent id). Agents *pull* from the groups they serve, so a task is
//! never owned by a particular agent while queued: an agent that crashes or restarts loses
//! nothing but the task in its hands. How many tasks may be queued is not decided here but by
//! admission (`admission`), which every task passes before it reaches a group.
//!
//! Picking is priority-first. `critical` is strict: while a critical task is queued it is taken
//! before anything else, and passing over the other levels for it does not count against
//! them. Below critical a starvation guard applies: a non-empty level that has been passed over
//! `starvation_limit` times in a row by a *non-critical* pick takes the next turn. Under
//! sustained load a level therefore gets at least `1 / (limit + 1)` of the non-critical picks
//! (weighted, configurable per level), while a single urgent task still overtakes everything
//! queued below it.
//!
//! Everything on this path is lock-free (crossbeam `SegQueue` plus atomics); the only wait is
//! the `submit` slow path, which lives in admission.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crossbeam_queue::SegQueue;
use once_cell::race::OnceBox;

use crate::bound::{ShareGuard, Shares};
use crate::priority::{PerPriority, Priority};
use crate::task::QueuedTask;

struct Level {
    queue: SegQueue<QueuedTask>,
    len: AtomicUsize,
    skips: AtomicU32,
}

/// The queues of one capability or one agent, plus the agents idle on it.
pub(crate) struct WorkGroup {
    /// Allocated by the first push: a level is a cache-padded queue (about 2 KB for the five),
    /// and most agents' own groups never see a task, so a pool of idle agents starts without
    /// touching that memory. Set once, without a lock (a racing first push frees its copy).
    levels: OnceBox<[Level; Priority::COUNT]>,
    /// Idle agents to wake, packed as `(agent index << 8) | position of this group in the
    /// agent's group list`. Each agent appears at most once (see `AgentSlot::in_idle`). An
    /// agent's own group leaves it empty: its one member is listed by a flag in its slot.
    idle: SegQueue<u64>,
    /// Members not stopped (starting, running or restarting): while 0, nobody will ever take
    /// a task queued here.
    live: AtomicUsize,
    /// Its share of each priority's queue: tasks queued or running, against a bound. `None`
    /// when no level is bounded (one capability: nothing to share), which costs nothing.
    shares: Option<std::sync::Arc<Shares>>,
}

impl WorkGroup {
    /// A group whose tasks may hold at most `share[p]` places at priority `p`
    /// (`usize::MAX`: no bound).
    pub(crate) fn new(share: [usize; Priority::COUNT]) -> Self {
        WorkGroup {
            levels: OnceBox::new(),
            idle: SegQueue::new(),
            live: AtomicUsize::new(0),
            shares: share
                .iter()
                .any(|&b| b != usize::MAX)
                .then(|| std::sync::Arc::new(Shares::new(share))),
        }
    }

    /// Takes a place in this group's share at `p`; `Err((held, bound))` if it is used up.
    /// `None` when no share applies (nothing to give back).
    #[inline]
    pub(crate) fn take_share(&self, p: Priority) -> Result<Option<ShareGuard>, (usize, usize)> {
        match &self.shares {
            Some(shares) => shares.take(p),
            None => Ok(None),
        }
    }

    /// Counts a member coming to life (or joining, at start).
    #[inline]
    pub(crate) fn member_up(&self) {
        self.live.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a member stopping.
    #[inline]
    pub(crate) fn member_down(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// True if some member is not stopped.
    #[inline]
    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire) > 0
    }

    /// Queues a task. The caller has reserved its slot in admission and wakes an agent after.
    #[inline]
    pub(crate) fn push(&self, task: QueuedTask) {
        let levels = self.levels.get_or_init(|| {
            Box::new(std::array::from_fn(|_| Level {
                queue: SegQueue::new(),
                len: AtomicUsize::new(0),
                skips: AtomicU32::new(0),
            }))
        });
        let level = &levels[task.priority.index()];
        level.queue.push(task);
        level.len.fetch_add(1, Ordering::SeqCst);
    }

    /// The most urgent non-empty level, if any.
    #[inline]
    pub(crate) fn first_nonempty(&self) -> Option<usize> {
        Self::first_in(self.levels.get()?)
    }

    #[inline]
    fn first_in(levels: &[Level; Priority::COUNT]) -> Option<usize> {
        levels.iter().position(|l| l.len.load(Ordering::SeqCst) > 0)
    }

    /// True if no task is queued here.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.first_nonempty().is_none()
    }

    /// Takes the next task by priority: critical strictly first, then the starvation guard.
    pub(crate) fn pop(&self, limits: &PerPriority<u32>) -> Option<QueuedTask> {
        const CRITICAL: usize = Priority::Critical.index();
        let levels = self.levels.get()?;
        loop {
            let first = Self::first_in(levels)?;
            if first == CRITICAL {
                // Strict: no guard overtakes critical work, and serving it is not "passing
                // over" the levels below (their turn is owed among non-critical picks).
                let level = &levels[CRITICAL];
                let Some(task) = level.queue.pop() else {
                    std::hint::spin_loop();
                    continue;
                };
                level.len.fetch_sub(1, Ordering::SeqCst);
                return Some(task);
            }
            // A passed-over lower level that reached its limit goes first.
            let chosen = (first + 1..Priority::COUNT)
                .find(|&i| {
                    levels[i].len.load(Ordering::Relaxed) > 0
                        && levels[i].skips.load(Ordering::Relaxed) >= limits.0[i]
                })
                .unwrap_or(first);
            let level = &levels[chosen];
            let Some(task) = level.queue.pop() else {
                // Another agent took it between the length check and the pop.
                std::hint::spin_loop();
                continue;
            };
            level.len.fetch_sub(1, Ordering::SeqCst);
            level.skips.store(0, Ordering::Relaxed);
            for lower in &levels[chosen + 1..] {
                if lower.len.load(Ordering::Relaxed) > 0 {
                    lower.skips.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Some(task);
        }
    }

    /// Takes any queued task regardless of fairness (used to cancel everything at shutdown).
    pub(crate) fn pop_any(&self) -> Option<QueuedTask> {
        for level in self.levels.get()? {
            if let Some(task) = level.queue.pop() {
                level.len.fetch_sub(1, Ordering::SeqCst);
                return Some(task);
            }
        }
        None
    }

    pub(crate) fn push_idle(&self, agent: u32, position: u8) {
        self.idle
            .push((u64::from(agent) << 8) | u64::from(position));
    }

    pub(crate) fn pop_idle(&self) -> Option<(u32, u8)> {
        self.idle
            .pop()
            .map(|packed| ((packed >> 8) as u32, (packed & 0xff) as u8))
    }
}
