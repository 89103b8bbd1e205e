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
//! use bytes::Bytes;
//! use troupe::{Agent, AgentContext, Outcome, Priority, Runtime, RuntimeConfig, Task,
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
//!     .register("shout", |_spec: &troupe::AgentSpec| Shout)
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

mod agent;
mod bound;
mod bus;
mod config;
mod error;
mod export;
mod health;
mod priority;
mod queue;
mod runtime;
pub mod sandbox;
mod slot;
mod supervisor;
mod task;
mod telemetry;
mod trace;
mod worker;

pub use agent::{Agent, AgentContext, AgentError, AgentFactory, AgentId, AgentSpec, ExitReason};
pub use bus::{Bus, Delivery, Message, MessageKind, Overflow, PublishReport, Topic, TraceContext};
pub use config::{
    AgentGroupConfig, BackoffConfig, DEFAULT_MAX_AGENTS, IntensityConfig, LivenessConfig,
    MailboxConfig, QueueConfig, RuntimeConfig, ShutdownConfig, TaskConfig, TelemetryConfig,
    TierConfig,
};
pub use error::{BusError, ConfigError, ParsePriorityError, Rejected, StartError, SubmitError};
pub use export::{BUCKETS, HistogramHandle, MetricsExporter};
pub use health::{
    AgentCounts, BusStats, Health, LaneStats, OutcomeCounts, PriorityStats, QueueHealth,
    RejectionCounts, SandboxStats, Stats, TierHealth,
};
pub use priority::{PerPriority, Priority};
pub use runtime::{Runtime, RuntimeBuilder, RuntimeHandle, ShutdownReport};
pub use slot::AgentState;
pub use supervisor::{RestartPolicy, Strategy};
pub use task::{
    Outcome, OutcomeKind, RetryPolicy, Target, Task, TaskError, TaskHandle, TaskId, TaskRequest,
};
pub use telemetry::LatencySummary;
