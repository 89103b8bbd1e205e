//! # troupe-agents: built-in agent kinds and the default pool
//!
//! * [`kinds`]: `echo`, `compute`, `io`, `router`, `aggregator` and `faulty`, each documented
//!   with what its payload means.
//! * [`catalogue`]: the pool catalogue format and the default 928-agent pool.
//! * [`start_default_pool`]: the default pool running in one call.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use troupe::{Outcome, Task};
//!
//! let runtime = troupe_agents::start_default_pool().await?;
//! assert_eq!(runtime.agent_count(), 928);
//! let out = runtime.try_submit(Task::new("reply", "hi")).map_err(|r| r.error)?.await;
//! assert_eq!(out, Outcome::Ok("hi".into()));
//! runtime.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod catalogue;
pub mod kinds;

pub use catalogue::{Catalogue, CatalogueError, DEFAULT_CATALOGUE};

use thiserror::Error;
use troupe::{AgentSpec, Runtime, RuntimeBuilder, RuntimeConfig, StartError};

/// Registers every built-in kind on `builder`.
pub fn register_kinds(builder: RuntimeBuilder) -> RuntimeBuilder {
    builder
        .register("echo", |_: &AgentSpec| kinds::Echo)
        .register("compute", kinds::Compute::new)
        .register("io", kinds::Io::new)
        .register("router", kinds::Router::new)
        .register("aggregator", kinds::Aggregator::new)
        .register("faulty", |_: &AgentSpec| kinds::Faulty)
}

/// Why a pool did not start.
#[derive(Debug, Error)]
pub enum PoolError {
    /// The catalogue is invalid.
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    /// The runtime did not start.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// A builder for `catalogue` on top of `base` (queues, mailboxes, timeouts), with every
/// built-in kind registered; add policies or kinds before starting.
pub fn builder(catalogue: &Catalogue, base: RuntimeConfig) -> RuntimeBuilder {
    register_kinds(Runtime::builder(catalogue.apply(base)))
}

/// Starts the default 928-agent pool with default runtime settings.
pub async fn start_default_pool() -> Result<Runtime, PoolError> {
    let catalogue = Catalogue::default_pool()?;
    Ok(builder(&catalogue, RuntimeConfig::default())
        .start()
        .await?)
}
