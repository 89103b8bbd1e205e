//! Tasks: what a caller submits, what an agent receives, and the one outcome each task ends with.
//!
//! A [`Task`] names a target (a capability, which every agent kind is, or one agent), a
//! priority, a payload, an optional timeout and a retry policy. Submitting it returns a
//! [`TaskHandle`]; the handle resolves to exactly one [`Outcome`]. That "exactly one" is held by
//! [`Completion`], which travels with the task through queues and agents and, if it is ever
//! dropped unanswered, answers `cancelled` itself.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::ids::{AgentId, TaskId};
use crate::priority::Priority;
use crate::trace::TraceContext;

/// Who should run a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Any agent with this capability. Every agent kind is also a capability of its agents.
    Capability(Cow<'static, str>),
    /// Exactly this agent.
    Agent(AgentId),
}

impl From<&'static str> for Target {
    fn from(s: &'static str) -> Self {
        Target::Capability(Cow::Borrowed(s))
    }
}

impl From<String> for Target {
    fn from(s: String) -> Self {
        Target::Capability(Cow::Owned(s))
    }
}

impl From<AgentId> for Target {
    fn from(id: AgentId) -> Self {
        Target::Agent(id)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Capability(c) => write!(f, "capability `{c}`"),
            Target::Agent(a) => write!(f, "agent {a}"),
        }
    }
}

/// When a failed attempt is run again.
///
/// An attempt that ends in `error`, `timeout` or `panic` is retried while attempts remain; the
/// task's outcome is that of its last attempt. Retries wait `backoff`, doubled per attempt and
/// capped at `max_backoff`, then re-enter the queue of the same priority (they do not count
/// against its capacity a second time: the task was already admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total attempts, including the first. 1 means no retry.
    pub max_attempts: u32,
    /// Wait before the first retry.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Upper bound on the wait between attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// No retries: one attempt.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };

    /// Up to `max_attempts` attempts with exponential backoff from `backoff`.
    pub fn attempts(max_attempts: u32, backoff: Duration) -> Self {
        RetryPolicy {
            max_attempts,
            backoff,
            max_backoff: backoff.saturating_mul(64),
        }
    }

    /// The wait before attempt number `next_attempt` (2 for the first retry).
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        let doublings = next_attempt.saturating_sub(2).min(31);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff.max(self.backoff))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::NONE
    }
}

/// A task to submit. Build with [`Task::new`] and the chained setters.
///
/// ```
/// use std::time::Duration;
/// use troupe::{Priority, RetryPolicy, Task};
///
/// let task = Task::new("summarize", "the text")
///     .priority(Priority::High)
///     .timeout(Duration::from_secs(2))
///     .retry(RetryPolicy::attempts(3, Duration::from_millis(10)));
/// assert_eq!(task.get_priority(), Priority::High);
/// ```
#[derive(Debug, Clone)]
pub struct Task {
    pub(crate) target: Target,
    pub(crate) priority: Priority,
    pub(crate) payload: Bytes,
    pub(crate) timeout: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) retry: RetryPolicy,
    pub(crate) sandboxed: bool,
    pub(crate) parent: TraceContext,
    pub(crate) key: Option<u64>,
}

impl Task {
    /// A normal-priority task for `target` carrying `payload`, with the runtime's default timeout.
    pub fn new(target: impl Into<Target>, payload: impl Into<Bytes>) -> Self {
        Task {
            target: target.into(),
            priority: Priority::Normal,
            payload: payload.into(),
            timeout: None,
            attempt_timeout: None,
            deadline: None,
            retry: RetryPolicy::NONE,
            sandboxed: false,
            parent: TraceContext::default(),
            key: None,
        }
    }

    /// Gives the task a key its handler sees as [`TaskRequest::key`]: the id a layer above
    /// the runtime knows it by. A clustered node sets the cluster's task id, which stays the
    /// same on every delivery and every node, while [`TaskRequest::id`] is this runtime's own
    /// and differs after a redelivery; so an agent with side effects keys them by `key` to make
    /// a repeated execution harmless.
    pub fn key(mut self, key: u64) -> Self {
        self.key = Some(key);
        self
    }

    /// Makes the task's `troupe.task` span a child of `parent`: the span of whoever submitted
    /// it in another process (a cluster node carries it with the task), so one trace shows the
    /// submission and the run. Without the `otel` feature it is carried and ignored.
    pub fn parent(mut self, parent: TraceContext) -> Self {
        self.parent = parent;
        self
    }

    /// Runs the task in the tri-sandbox: on lanes A, B and C, answering with the output two of
    /// them agree on. The target must be a kind listed in `sandbox.kinds`; the timeout applies
    /// per lane; retries do not apply (the vote is the redundancy).
    pub fn sandboxed(mut self) -> Self {
        self.sandboxed = true;
        self
    }

    /// True if the task runs in the tri-sandbox.
    pub fn is_sandboxed(&self) -> bool {
        self.sandboxed
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The task must have its outcome within `timeout` of being accepted, time in the queue
    /// included: past it the task ends `timeout` — still queued, it never runs; running, its
    /// attempt is cut off; and a handler that returns late (one that blocked its thread past
    /// the deadline) has its result discarded and counted. Retries happen only within it.
    /// Without it the runtime's `tasks.default_timeout` applies.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Limits each attempt's handler time on its own (the whole task still ends by its
    /// `timeout`): an attempt past it ends `timeout`, and is retried if the policy and the
    /// time left allow.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// A point in time by which the task must have its outcome, as [`Task::timeout`] but
    /// absolute; with both, the earlier holds.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The task's priority.
    pub fn get_priority(&self) -> Priority {
        self.priority
    }

    /// The task's target.
    pub fn get_target(&self) -> &Target {
        &self.target
    }

    /// The task's payload.
    pub fn get_payload(&self) -> &Bytes {
        &self.payload
    }
}

/// What an agent's handler receives.
#[derive(Debug, Clone)]
pub struct TaskRequest {
    /// The task's id.
    pub id: TaskId,
    /// Its priority.
    pub priority: Priority,
    /// Its payload.
    pub payload: Bytes,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// The key the submitter gave the task ([`Task::key`]): on a clustered node, the cluster's
    /// task id, the same on every delivery. `None` when none was given, and on process
    /// sandbox lanes (a worker process sees only its job).
    pub key: Option<u64>,
}

/// An error returned by a handler. It becomes outcome `error` (after retries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError(pub Cow<'static, str>);

impl TaskError {
    /// An error with this message.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        TaskError(message.into())
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TaskError {}

impl From<&'static str> for TaskError {
    fn from(s: &'static str) -> Self {
        TaskError(Cow::Borrowed(s))
    }
}

impl From<String> for TaskError {
    fn from(s: String) -> Self {
        TaskError(Cow::Owned(s))
    }
}

/// How a task ended. Every accepted task ends with exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// The handler returned this output.
    Ok(Bytes),
    /// The handler returned an error.
    Error(TaskError),
    /// The task's deadline passed (queued, running, or with a late result), or an attempt
    /// overran its `attempt_timeout` with no retry left.
    Timeout,
    /// The handler panicked; the message is the panic payload. The agent was rebuilt.
    Panic(String),
    /// The task was cancelled: by shutdown past its drain deadline, or because its agent was
    /// stopped (a sibling restart) and the task overran `shutdown.stop_timeout`.
    Cancelled,
}

impl Outcome {
    /// The outcome's kind, without its data.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok(_) => OutcomeKind::Ok,
            Outcome::Error(_) => OutcomeKind::Error,
            Outcome::Timeout => OutcomeKind::Timeout,
            Outcome::Panic(_) => OutcomeKind::Panic,
            Outcome::Cancelled => OutcomeKind::Cancelled,
        }
    }

    /// True for `Ok`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

/// The kind of an [`Outcome`]; also the `outcome` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// See [`Outcome::Ok`].
    Ok,
    /// See [`Outcome::Error`].
    Error,
    /// See [`Outcome::Timeout`].
    Timeout,
    /// See [`Outcome::Panic`].
    Panic,
    /// See [`Outcome::Cancelled`].
    Cancelled,
}

impl OutcomeKind {
    /// All kinds, in label order.
    pub const ALL: [OutcomeKind; 5] = [
        OutcomeKind::Ok,
        OutcomeKind::Error,
        OutcomeKind::Timeout,
        OutcomeKind::Panic,
        OutcomeKind::Cancelled,
    ];

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Ok => "ok",
            OutcomeKind::Error => "error",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::Panic => "panic",
            OutcomeKind::Cancelled => "cancelled",
        }
    }

    /// Position in [`OutcomeKind::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resolves to the task's outcome. Dropping the handle does not cancel the task: it runs and its
/// outcome is still counted.
#[derive(Debug)]
pub struct TaskHandle {
    id: TaskId,
    rx: oneshot::Receiver<Outcome>,
}

impl TaskHandle {
    pub(crate) fn new(id: TaskId, rx: oneshot::Receiver<Outcome>) -> Self {
        TaskHandle { id, rx }
    }

    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The outcome if the task has finished, without waiting.
    pub fn try_outcome(&mut self) -> Option<Outcome> {
        match self.rx.try_recv() {
            Ok(o) => Some(o),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Outcome::Cancelled),
        }
    }
}

impl Future for TaskHandle {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        // The sender is only ever dropped after sending (see `Completion`), so a closed channel
        // cannot happen; map it to `Cancelled` rather than panic.
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Outcome::Cancelled))
    }
}

/// The answering end of a task: sends its one outcome. Dropped unanswered (which only happens if
/// the runtime itself is dropped without a shutdown), it answers `Cancelled`.
#[derive(Debug)]
pub(crate) struct Completion {
    tx: Option<oneshot::Sender<Outcome>>,
}

impl Completion {
    pub(crate) fn new(tx: Option<oneshot::Sender<Outcome>>) -> Self {
        Completion { tx }
    }

    pub(crate) fn send(mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            // The receiver may be gone (the caller dropped its handle); the outcome is still
            // counted by the caller of `send`.
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Outcome::Cancelled);
        }
    }
}

/// An accepted task on its way through queues and agents.
#[derive(Debug)]
pub(crate) struct QueuedTask {
    pub(crate) id: TaskId,
    pub(crate) priority: Priority,
    pub(crate) payload: Bytes,
    /// Per-attempt handler limit, if the task set one.
    pub(crate) attempt_timeout: Option<Duration>,
    /// When the task must have its outcome (from its timeout and deadline, set at admission).
    pub(crate) deadline: Option<Instant>,
    pub(crate) retry: RetryPolicy,
    pub(crate) attempt: u32,
    /// The submitter's trace, for the task's span to join.
    pub(crate) parent: TraceContext,
    /// The submitter's key ([`Task::key`]).
    pub(crate) key: Option<u64>,
    pub(crate) submitted_at: Instant,
    pub(crate) enqueued_at: Instant,
    /// Index of the work group it was queued on (retries go back there).
    pub(crate) group: u32,
    /// Its place in the group's share of the priority queue: held, never read, until the task
    /// is dropped after its outcome.
    #[allow(dead_code)]
    pub(crate) share: Option<crate::bound::ShareGuard>,
    pub(crate) completion: Completion,
}
