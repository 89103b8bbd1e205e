//! # troupe-workflow: workflows over a Troupe pool
//!
//! A workflow is a named DAG of steps ([`Workflow`], [`Step`]), each done by an agent kind or
//! capability of the pool, with dependencies, conditions, deadlines, retries and a fallback.
//! The [`Engine`] runs executions of registered workflows through the runtime's public API —
//! each step is an ordinary task — and keeps a durable history in SQLite: per execution and
//! per step the status, attempts, queue and handler time, the agent, output size and error,
//! plus every event. A restarted engine resumes the executions that were running (steps that
//! were running are run again: a step is executed at least once, like a task in a cluster).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use troupe_workflow::{Engine, EngineConfig, Step, StepTimings, Workflow};
//! let timings = StepTimings::new();
//! let runtime = troupe::Runtime::builder(troupe::RuntimeConfig::default())
//!     .observe(timings.clone())
//!     .start()
//!     .await?;
//! let engine = Engine::open(runtime.handle(), timings, EngineConfig::default()).await?;
//! engine.register(
//!     Workflow::new("research")
//!         .step(Step::new("plan", "llm"))
//!         .step(Step::new("search", "fetch").after(["plan"]).retries(1).fallback("llm"))
//!         .step(Step::new("write", "llm").after(["search"])),
//! )?;
//! let id = engine.start("research", "what is troupe?").await?;
//! let done = engine.wait(id, std::time::Duration::from_secs(60)).await?;
//! println!("{}: {:?}", done.execution.status, done.steps);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod definition;
mod engine;
mod error;
mod metrics;
mod store;
mod webhook;

pub use definition::{Condition, DEFAULT_STEP_TIMEOUT, Format, Input, Step, StepResult, Workflow};
pub use engine::{Engine, EngineConfig, ExecutionView, Progress, StepTimings};
pub use error::WorkflowError;
pub use metrics::MAX_WORKFLOWS;
pub use store::{Event, ExecutionRecord, Filter, Page, StepRecord};
pub use webhook::{
    ATTEMPTS as WEBHOOK_ATTEMPTS, QUEUE as WEBHOOK_QUEUE, check_url as check_webhook_url,
};
