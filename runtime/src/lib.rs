//! # Troupe: an actor runtime for pools of agents
//!
//! Troupe hosts hundreds of cooperating agents in one process: a supervision tree that rebuilds
//! what crashes, bounded per-priority task queues with backpressure, a message bus between
//! agents, and exact latency percentiles.
//!
//! ## Embedding in five steps
//!
//! 1. Write an [`Agent`]: state plus an async [`Agent::handle`] that owns `&mut self`.
//! 2. Describe the pool in a [`RuntimeConfig`]: tiers of agents, each tier under a supervisor
//!    with a [`Strategy`], a [`RestartPolicy`] and a restart intensity.
//! 3. Register a factory per agent kind and [`start`](RuntimeBuilder::start) the runtime.
//! 4. Submit [`Task`]s with a priority; each [`TaskHandle`] resolves to exactly one
//!    [`Outcome`]. Agents talk over the [`Bus`].
//! 5. [`shutdown`](Runtime::shutdown): drain, cancel what is left, stop agents in reverse order.
//!
//! ```
//! use std::time::Duration;
//! use troupe::{Agent, AgentContext, Bytes, Outcome, Priority, Runtime, RuntimeConfig, Task,
//!              TaskError, TaskRequest, TierConfig};
//!
//! /// Replies with the payload upper-cased, after "calling a model" for 20 ms.
//! struct Shout;
//!
//! impl Agent for Shout {
//!     async fn handle(&mut self, task: TaskRequest, _ctx: &AgentContext) -> Result<Bytes, TaskError> {
//!         tokio::time::sleep(Duration::from_millis(20)).await; // other agents keep running
//!         Ok(Bytes::from(task.payload.to_ascii_uppercase()))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RuntimeConfig::default()
//!     .tier(TierConfig::new("workers").agents("shout", 8));
//! let runtime = Runtime::builder(config)
//!     .register("shout", |_spec| Shout)
//!     .start()
//!     .await?;
//!
//! let handle = runtime
//!     .try_submit(Task::new("shout", "hello").priority(Priority::High))
//!     .map_err(|r| r.error)?;
//! assert_eq!(handle.await, Outcome::Ok(Bytes::from("HELLO")));
//!
//! let report = runtime.shutdown().await;
//! assert_eq!(report.abandoned, 0);
//! # Ok(())
//! # }
//! ```
//!
//! ## Building on it
//!
//! A layer above the runtime (a workflow engine, a durable queue) follows every task with a
//! [`TaskObserver`] registered through [`RuntimeBuilder::observe`], and feeds the pool by pull
//! with a [`TaskSource`] driven by [`RuntimeHandle::pump`] (bounded in flight, every task
//! reported once). The repository's `docs/ARCHITECTURE.md` shows the parts and where these plug in.
//!
//! ## Guarantees
//!
//! * Every accepted task ends in exactly one [`Outcome`]: `ok`, `error`, `timeout`, `panic`
//!   or `cancelled`, whatever happens to the agent running it.
//! * A refused task is refused at once with a typed [`SubmitError`], and handed back.
//! * Queues, mailboxes and in-flight work are bounded; overload is refused, not buffered.
//! * A higher priority overtakes queued lower ones, and lower ones still get a configurable
//!   share under sustained load.

#![warn(missing_docs)]

/// The README's code blocks, compiled and run as doc tests so the embedding guide stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

// The parts, bottom up. Each owns its state behind a narrow API; arrows point down only.
// Primitives and vocabulary (import nothing above them):
mod bound;
mod error;
mod ids;
mod limit;
mod panics;
mod phase;
mod priority;
mod signal;
mod task;
mod telemetry;
mod trace;
// The parts:
mod admission;
mod bridge;
mod bus;
mod config;
mod events;
mod gather;
mod ledger;
mod mailq;
mod pool;
mod queue;
pub mod sandbox;
mod supervisor;
// Composition, and what sits on it:
mod agent;
mod export;
mod handle;
mod health;
mod runtime;
mod source;
mod worker;

pub use admission::QueueHealth;
pub use agent::{Agent, AgentContext, AgentError, AgentFactory};
pub use bridge::{BridgeFuture, BusBridge, RemoteDelivery};
pub use bus::{
    Bus, BusStats, Delivery, FanOut, MAX_TOPIC_NAME, Message, MessageKind, PublishReport,
    Recipients, Reply, Topic, Want,
};
/// The byte buffer of payloads and outputs (re-exported from the `bytes` crate, so embedders
/// need not depend on it).
pub use bytes::Bytes;
pub use config::{
    AgentGroupConfig, BackoffConfig, DEFAULT_MAX_AGENTS, IntensityConfig, KindLimit,
    LivenessConfig, MailboxConfig, Overflow, QueueConfig, RuntimeConfig, ShutdownConfig,
    TaskConfig, TelemetryConfig, TierConfig, parse_toml,
};
pub use error::{BusError, ConfigError, Rejected, StartError, SubmitError};
pub use events::{TaskEvent, TaskEventKind, TaskObserver};
pub use export::{BUCKETS, HistogramHandle, MetricsExporter};
pub use handle::{QueueWaitWindow, RuntimeHandle};
pub use health::{Health, Stats};
pub use ids::{AgentId, TaskId};
pub use ledger::{OutcomeCounts, PriorityStats, RejectionCounts};
pub use panics::log_all_panics;
pub use pool::{AgentSpec, AgentState};
pub use priority::{ParsePriorityError, PerPriority, Priority};
pub use runtime::{Runtime, RuntimeBuilder, ShutdownReport};
pub use sandbox::{LaneStats, SandboxStats};
pub use source::{SourceReport, SourcedTask, TaskSource};
pub use supervisor::policy::{ExitReason, RestartPolicy, Strategy};
pub use supervisor::{AgentCounts, TierHealth, TierStats};
pub use task::{
    Outcome, OutcomeKind, RetryPolicy, Target, Task, TaskError, TaskHandle, TaskRequest,
};
pub use telemetry::LatencySummary;
pub use trace::TraceContext;
