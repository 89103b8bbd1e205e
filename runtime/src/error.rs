//! Every error the runtime returns, as typed enums.
//!
//! Errors carry what a caller needs to act: which queue was full and how full, which config
//! field was wrong and why, which agent did not exist. None of them is a bare string.

use std::time::Duration;

use thiserror::Error;

use crate::ids::AgentId;
use crate::priority::Priority;

/// A configuration that cannot be used. `field` is a path into the config, such as
/// `tiers[2].agents[0].count`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The TOML text does not parse or does not match the schema.
    #[error("config does not parse: {0}")]
    Parse(String),
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Io {
        /// The file that was asked for.
        path: String,
        /// Why reading it failed.
        reason: String,
    },
    /// A field has a value the runtime cannot use.
    #[error("invalid config field `{field}`: {reason}")]
    Invalid {
        /// Path to the field.
        field: String,
        /// Why the value is rejected.
        reason: String,
    },
    /// The tiers ask for more agents than the pool limit allows.
    #[error("the tiers ask for {requested} agents but the pool limit (`max_agents`) is {limit}")]
    TooManyAgents {
        /// Sum of all tier counts.
        requested: usize,
        /// The configured pool limit.
        limit: usize,
    },
    /// A tier names an agent kind that no factory was registered for.
    #[error("config field `{field}` names agent kind `{kind}`, which is not registered")]
    UnknownKind {
        /// Path to the field.
        field: String,
        /// The kind that was named.
        kind: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Why a task was refused at admission. A refused task was never accepted: it has no handle and
/// no outcome, and the payload is handed back inside [`Rejected`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    /// The queue for this priority is at capacity.
    #[error("the {priority} queue is full ({depth} of {capacity} tasks queued)")]
    QueueFull {
        /// The queue that was full.
        priority: Priority,
        /// Tasks queued at that priority when the task was refused.
        depth: usize,
        /// The queue's bound.
        capacity: usize,
    },
    /// The runtime is shutting down and admits nothing new.
    #[error("the runtime is shutting down and accepts no new tasks")]
    ShuttingDown,
    /// The task names a capability no agent has.
    #[error("no agent has capability `{0}`")]
    UnknownCapability(String),
    /// The task names an agent id outside the pool.
    #[error("no agent with id {0}")]
    UnknownAgent(AgentId),
    /// The task is malformed (for example a zero timeout).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The task's target already holds its share of this priority's queue
    /// (`queues.kind_share`): the rest is kept for the other targets.
    #[error(
        "{target} already holds {held} of the {capacity} places it may take in the {priority} queue (`queues.kind_share`)"
    )]
    KindFull {
        /// The target (a capability or an agent).
        target: String,
        /// The priority.
        priority: Priority,
        /// Places it holds (queued and running).
        held: usize,
        /// Its share.
        capacity: usize,
    },
    /// Every agent that could run the task is down (its tier failed for good, or its agents
    /// stopped); queueing it would only hold room other work needs.
    #[error("no live agent serves {0}: every one of them is down")]
    Unavailable(String),
}

impl SubmitError {
    /// The `reason` label used in `troupe_tasks_rejected_total`.
    pub fn reason_label(&self) -> &'static str {
        match self {
            SubmitError::QueueFull { .. } => "queue_full",
            SubmitError::KindFull { .. } => "kind_full",
            SubmitError::ShuttingDown => "shutting_down",
            SubmitError::Unavailable(_) => "unavailable",
            SubmitError::UnknownCapability(_)
            | SubmitError::UnknownAgent(_)
            | SubmitError::Invalid(_) => "invalid",
        }
    }
}

/// A refused submission: the reason and the task, returned intact so nothing is lost.
#[derive(Debug, Error)]
#[error("{error}")]
pub struct Rejected {
    /// Why it was refused.
    pub error: SubmitError,
    /// The task as it was submitted.
    pub task: crate::task::Task,
}

/// Errors from the message bus.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BusError {
    /// The recipient does not exist.
    #[error("no agent with id {0}")]
    NoSuchAgent(AgentId),
    /// The recipient's mailbox is at capacity and the overflow policy is `reject`.
    #[error("mailbox of agent {agent} is full ({depth} of {capacity} messages)")]
    MailboxFull {
        /// The recipient.
        agent: AgentId,
        /// Messages waiting in its mailbox.
        depth: usize,
        /// The mailbox bound.
        capacity: usize,
    },
    /// No reply arrived within the request timeout.
    #[error("no reply from agent {agent} within {timeout:?}")]
    Timeout {
        /// The agent asked.
        agent: AgentId,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// The recipient handled the request without replying (or was restarted while holding it).
    #[error("agent {0} did not reply")]
    NoReply(AgentId),
    /// The runtime is shutting down (closed to outside senders when the drain begins, to
    /// agents when it ends).
    #[error("the runtime is shutting down")]
    ShuttingDown,
    /// The name cannot be a topic name.
    #[error("invalid topic name `{topic}`: {reason}")]
    InvalidTopic {
        /// The name (its first 64 characters).
        topic: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The topic registry is full (`mailbox.max_topics`).
    #[error("the bus already holds {limit} topics (`mailbox.max_topics`)")]
    TooManyTopics {
        /// The bound.
        limit: usize,
    },
    /// A fan-out named a capability no agent (other than the sender) serves.
    #[error("no agent has capability `{0}`")]
    NoSuchCapability(String),
    /// A fan-out to a topic found no subscriber (other than the sender).
    #[error("topic `{0}` has no subscribers")]
    NoSubscribers(String),
    /// No node of that name is known (or this runtime is not part of a cluster).
    #[error("no node `{0}` in the cluster")]
    NoSuchNode(String),
    /// The bridge to the other nodes is down (their messages cannot be carried now).
    #[error("the cluster bus is unavailable: {0}")]
    BridgeDown(String),
}

/// Errors starting a runtime.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An agent's `on_start` hook failed while the pool was being built.
    #[error("agent {agent} (kind `{kind}`) failed to start: {reason}")]
    AgentStart {
        /// The agent that failed.
        agent: AgentId,
        /// Its kind.
        kind: String,
        /// What its hook or factory reported.
        reason: String,
    },
    /// The sandbox lanes could not be started.
    #[error("the sandbox lanes could not start: {0}")]
    Sandbox(String),
    /// `start` was called outside a Tokio runtime.
    #[error("Troupe must be started from within a Tokio multi-thread runtime")]
    NoTokioRuntime,
}
