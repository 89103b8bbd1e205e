//! The cluster's errors.

use thiserror::Error;

/// What can go wrong joining or using a cluster.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// A `[cluster]` field is unusable.
    #[error("invalid config field `{field}`: {reason}")]
    Config {
        /// The field's path.
        field: String,
        /// Why.
        reason: String,
    },
    /// NATS could not be reached (at join, or now).
    #[error("NATS is unreachable: {0}")]
    Unreachable(String),
    /// A JetStream call failed.
    #[error("JetStream: {0}")]
    JetStream(String),
    /// No live node of the cluster serves the task's target.
    #[error("no node of the cluster serves {0}")]
    NoNode(String),
    /// The task cannot be carried (bad target name, payload too large).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The cluster's stream holds as many unfinished tasks as this priority may fill of
    /// `cluster.max_backlog`: the cluster is past its capacity.
    #[error(
        "the cluster is past its capacity: {backlog} tasks unfinished, {priority} tasks are \
         refused from {limit} (its share of `cluster.max_backlog`)"
    )]
    BacklogFull {
        /// Unfinished tasks in the stream.
        backlog: u64,
        /// Where this priority is refused.
        limit: u64,
        /// The refused task's priority.
        priority: troupe::Priority,
    },
    /// This node is leaving the cluster.
    #[error("this node is shutting down")]
    ShuttingDown,
}

impl ClusterError {
    pub(crate) fn js(e: impl std::fmt::Display) -> Self {
        ClusterError::JetStream(e.to_string())
    }
}
