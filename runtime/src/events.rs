//! Task lifecycle events: the extension point for layers that follow tasks without owning
//! them (the workflow engine's history, an audit log, a tracer of your own).
//!
//! Register a [`TaskObserver`] with [`RuntimeBuilder::observe`](crate::RuntimeBuilder::observe)
//! before the runtime starts. It is called synchronously, on the thread where the event
//! happens, for every task the runtime accepts: `Accepted` once, `Started` once per attempt on a
//! pool agent, `Finished` once with the task's one outcome. Sandboxed tasks report `Accepted`
//! and `Finished` only (their attempts run on lanes, not agents).
//!
//! The observer list is fixed at start, so with none registered an event costs one branch,
//! and with some it costs what the observers do: keep `on_event` short and non-blocking (count,
//! or push into a channel you drain elsewhere). A panicking observer is not caught.

use std::time::Instant;

use crate::ids::{AgentId, TaskId};
use crate::priority::Priority;
use crate::task::OutcomeKind;

/// What happened to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEventKind {
    /// Admission accepted it: it will end in exactly one `Finished`.
    Accepted,
    /// An agent picked up attempt `attempt` (from 1) after it waited in its queue.
    Started {
        /// The agent running it.
        agent: AgentId,
        /// Which attempt, from 1.
        attempt: u32,
    },
    /// It ended with this outcome (after any retries).
    Finished {
        /// The outcome's kind; the output itself goes to the task's handle.
        outcome: OutcomeKind,
    },
}

/// One event in a task's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskEvent {
    /// The task (the id its [`TaskHandle`](crate::TaskHandle) reports).
    pub task: TaskId,
    /// Its priority.
    pub priority: Priority,
    /// When it happened.
    pub at: Instant,
    /// The submitter's key for the task ([`Task::key`](crate::Task::key)): how a layer above
    /// tells its own tasks from the others without a lookup per task.
    pub key: Option<u64>,
    /// What happened.
    pub kind: TaskEventKind,
}

/// Receives every task event of one runtime. See the module docs for when it is called.
pub trait TaskObserver: Send + Sync + 'static {
    /// Called once per event, synchronously; must not block.
    fn on_event(&self, event: &TaskEvent);
}

impl<F> TaskObserver for F
where
    F: Fn(&TaskEvent) + Send + Sync + 'static,
{
    fn on_event(&self, event: &TaskEvent) {
        self(event)
    }
}
