//! Identities: which agent, which task. Plain values at the bottom of the crate, so every part
//! can name them without importing the part that hands them out.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Identifies an agent slot in the pool. Stable across restarts: a rebuilt agent keeps its id,
/// its mailbox and its place in its tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentId(pub u32);

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Unique (per runtime) id of an accepted task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Process-wide task id source. Each thread takes ids in blocks so the counter is touched once
/// per 1024 tasks.
pub(crate) fn next_task_id() -> TaskId {
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
