//! The sandbox's vocabulary: lanes, what a lane returns, the verdict, its errors, its config
//! and its stats. Plain values, so the config and the reports can name them without importing
//! the lanes themselves.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::{ConfigError, SubmitError};

/// One of the three lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Lane {
    /// Lane A.
    A,
    /// Lane B.
    B,
    /// Lane C.
    C,
}

impl Lane {
    /// All three lanes.
    pub const ALL: [Lane; 3] = [Lane::A, Lane::B, Lane::C];

    /// Position in [`Lane::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Lane::A => "A",
            Lane::B => "B",
            Lane::C => "C",
        }
    }

    pub(crate) fn from_index(i: usize) -> Option<Lane> {
        Lane::ALL.get(i).copied()
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one lane returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum LaneResult {
    /// The handler's output.
    Ok(Bytes),
    /// The handler returned an error.
    Error(String),
    /// The handler panicked (the lane rebuilt its agent).
    Panic(String),
    /// The lane did not answer in time (a process lane's worker was killed).
    Timeout,
    /// The lane's worker process died while running the job.
    Crashed(String),
    /// The lane could not take the job (its agent failed to start, its queue is full, it has
    /// too many stuck threads, or it is shutting down).
    Unavailable(String),
    /// The vote was decided before the lane started the job, so it was not run.
    Skipped,
}

impl LaneResult {
    /// All outcome labels, in counter order.
    pub const LABELS: [&'static str; 7] = [
        "ok",
        "error",
        "panic",
        "timeout",
        "crashed",
        "unavailable",
        "skipped",
    ];

    /// The `outcome` label of `troupe_sandbox_lane_executions_total`.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.label_index()]
    }

    pub(crate) fn label_index(&self) -> usize {
        match self {
            LaneResult::Ok(_) => 0,
            LaneResult::Error(_) => 1,
            LaneResult::Panic(_) => 2,
            LaneResult::Timeout => 3,
            LaneResult::Crashed(_) => 4,
            LaneResult::Unavailable(_) => 5,
            LaneResult::Skipped => 6,
        }
    }
}

impl fmt::Display for LaneResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaneResult::Ok(b) => write!(f, "ok ({} bytes)", b.len()),
            LaneResult::Error(e) => write!(f, "error: {e}"),
            LaneResult::Panic(p) => write!(f, "panic: {p}"),
            LaneResult::Timeout => f.write_str("timeout"),
            LaneResult::Crashed(c) => write!(f, "crashed: {c}"),
            LaneResult::Unavailable(u) => write!(f, "unavailable: {u}"),
            LaneResult::Skipped => f.write_str("skipped (the vote was decided without it)"),
        }
    }
}

/// The answer of a sandboxed run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The agreed output (or the fallback's pick).
    pub output: Bytes,
    /// The lanes whose agreement decided it (empty when a fallback picked).
    pub agreed: Vec<Lane>,
    /// True if no two lanes agreed and the kind's fallback picked the output.
    pub fallback: bool,
}

/// Why a sandboxed run has no answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SandboxError {
    /// No two lanes agreed (and no fallback picked). Carries every lane's result, A, B, C.
    #[error("no quorum: A {}, B {}, C {}", .results[0], .results[1], .results[2])]
    NoQuorum {
        /// Each lane's result, indexed by [`Lane::index`].
        results: [LaneResult; 3],
    },
    /// Admission refused the task.
    #[error(transparent)]
    Rejected(#[from] SubmitError),
    /// Shutdown cancelled the run before a verdict.
    #[error("cancelled by shutdown")]
    Cancelled,
}

/// How a kind's lanes execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaneMode {
    /// One dedicated thread per lane, shared by every thread-mode kind.
    #[default]
    Threads,
    /// Worker processes per lane, started from `sandbox.process.command`.
    Process,
}

/// A kind that can run sandboxed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxKindConfig {
    /// The registered agent kind.
    pub kind: String,
    /// Threads or processes.
    #[serde(default)]
    pub lanes: LaneMode,
    /// Agent instances per lane (threads), or worker processes per lane (process): how many
    /// jobs one lane runs at once.
    #[serde(default = "default_instances")]
    pub instances: usize,
}

fn default_instances() -> usize {
    4
}

/// How to start a sandbox worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Program and arguments. The program must call [`worker_main`](crate::sandbox::worker_main) (the agents crate ships
    /// `troupe-worker`; the `troupe` node runs itself with `sandbox-worker`).
    pub command: Vec<String>,
}

/// The `[sandbox]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Time a lane may take on one job unless the task sets its own timeout.
    #[serde(with = "humantime_serde")]
    pub lane_timeout: Duration,
    /// Kinds that can run sandboxed, and how.
    pub kinds: Vec<SandboxKindConfig>,
    /// Worker command for process lanes.
    pub process: Option<ProcessConfig>,
    /// Most jobs waiting on one lane of one kind; past it the lane answers `unavailable` at
    /// once (the other two lanes can still agree).
    pub lane_queue: usize,
    /// Most threads of one thread lane left blocked in a handler: past it no replacement is
    /// started, the lane is unavailable (health says why) until one of them comes back.
    pub max_stuck_threads: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            lane_timeout: Duration::from_secs(5),
            kinds: Vec::new(),
            process: None,
            lane_queue: 1024,
            max_stuck_threads: 4,
        }
    }
}

impl SandboxConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.lane_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "sandbox.lane_timeout",
                "must be above zero",
            ));
        }
        if self.lane_queue == 0 {
            return Err(ConfigError::invalid(
                "sandbox.lane_queue",
                "must be at least 1",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.kinds.iter().enumerate() {
            if !seen.insert(k.kind.as_str()) {
                return Err(ConfigError::invalid(
                    format!("sandbox.kinds[{i}].kind"),
                    format!("`{}` is listed twice", k.kind),
                ));
            }
            if k.instances == 0 {
                return Err(ConfigError::invalid(
                    format!("sandbox.kinds[{i}].instances"),
                    "must be at least 1",
                ));
            }
            if k.lanes == LaneMode::Process
                && self.process.as_ref().is_none_or(|p| p.command.is_empty())
            {
                return Err(ConfigError::invalid(
                    format!("sandbox.kinds[{i}].lanes"),
                    "process lanes need `sandbox.process.command`",
                ));
            }
        }
        Ok(())
    }
}

/// Compares two lane outputs.
pub type Comparator = dyn Fn(&Bytes, &Bytes) -> bool + Send + Sync;

/// Picks an output when no two lanes agree; `None` leaves the no-quorum error.
pub type Fallback = dyn Fn(&[LaneResult; 3]) -> Option<Bytes> + Send + Sync;

/// How one kind's lane results are judged.
#[derive(Clone, Default)]
pub struct SandboxPolicy {
    /// When two outputs agree; byte equality if `None`.
    pub comparator: Option<Arc<Comparator>>,
    /// What to answer without a quorum.
    pub fallback: Option<Arc<Fallback>>,
}

impl fmt::Debug for SandboxPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxPolicy")
            .field("comparator", &self.comparator.is_some())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

impl SandboxPolicy {
    /// Agreement decided by `f` instead of byte equality.
    pub fn comparator(
        mut self,
        f: impl Fn(&Bytes, &Bytes) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.comparator = Some(Arc::new(f));
        self
    }

    /// A picker for when no two lanes agree.
    pub fn fallback(
        mut self,
        f: impl Fn(&[LaneResult; 3]) -> Option<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.fallback = Some(Arc::new(f));
        self
    }
}

pub(crate) type Policies = HashMap<String, SandboxPolicy>;

/// One sandbox lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaneStats {
    /// The lane.
    pub lane: Lane,
    /// Executions by result (`ok`, `error`, `panic`, `timeout`, `crashed`, `unavailable`).
    pub executions: Vec<(&'static str, u64)>,
    /// Times this lane disagreed with (or failed against) a majority of the other two.
    pub dissent: u64,
    /// Executors (instances or worker processes) able to take jobs now.
    pub available: usize,
    /// Executors configured.
    pub total: usize,
}

/// Tri-sandbox totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SandboxStats {
    /// Per lane, A, B, C.
    pub lanes: Vec<LaneStats>,
    /// Votes where all three agreed.
    pub unanimous: u64,
    /// Votes decided by two lanes.
    pub majority: u64,
    /// Votes without a quorum.
    pub no_quorum: u64,
}

impl SandboxStats {
    /// Executions of `lane` that ended with `label`.
    pub fn executions(&self, lane: Lane, label: &str) -> u64 {
        self.lanes[lane.index()]
            .executions
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(0, |(_, n)| *n)
    }
}
