//! The vocabulary of supervision: how a tier restarts its children ([`Strategy`]), which exits
//! a child is restarted after ([`RestartPolicy`]), and why a child exited ([`ExitReason`]).
//! Plain values, so the config can name them without importing the supervisors.

use std::any::Any;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What a supervisor restarts when a child exits and is to be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that exited.
    #[default]
    OneForOne,
    /// Every child of the tier: the others are stopped, then all are started again in order.
    OneForAll,
    /// The child and every child started after it.
    RestForOne,
}

/// Which exits a child is restarted after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Always (the child should always run).
    #[default]
    Permanent,
    /// Only after an abnormal exit (panic, failed start).
    Transient,
    /// Never.
    Temporary,
}

impl Strategy {
    /// The config name (`one_for_one`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        }
    }
}

impl RestartPolicy {
    /// The config name (`permanent`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Permanent => "permanent",
            RestartPolicy::Transient => "transient",
            RestartPolicy::Temporary => "temporary",
        }
    }

    pub(crate) fn restarts_after(self, reason: &ExitReason) -> bool {
        match self {
            RestartPolicy::Permanent => true,
            RestartPolicy::Transient => reason.is_abnormal(),
            RestartPolicy::Temporary => false,
        }
    }
}

/// Why an agent incarnation ended. The supervisor decides from this whether to restart it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// It was asked to stop (shutdown, or a sibling restart under one_for_all / rest_for_one).
    Stopped,
    /// A handler or hook panicked; the message is the panic payload.
    Panicked(String),
    /// Its factory or `on_start` / `on_restart` hook returned an error.
    StartFailed(String),
    /// It stayed busy past its task's deadline by three heartbeats (a handler that blocks its
    /// thread): its task was answered `timeout` and a new instance replaced it.
    Unresponsive(String),
}

impl ExitReason {
    /// True for exits a `transient` child is restarted after.
    pub fn is_abnormal(&self) -> bool {
        !matches!(self, ExitReason::Stopped)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Stopped => f.write_str("stopped"),
            ExitReason::Panicked(m) => write!(f, "panicked: {m}"),
            ExitReason::StartFailed(m) => write!(f, "failed to start: {m}"),
            ExitReason::Unresponsive(m) => write!(f, "unresponsive: {m}"),
        }
    }
}

/// The message of a caught panic (its payload when that is a string).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
