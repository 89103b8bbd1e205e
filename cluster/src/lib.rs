//! # troupe-cluster: Troupe nodes as one cluster, on NATS JetStream
//!
//! A node that joins a cluster stores every task it accepts in a JetStream work-queue stream
//! before answering (so an accepted task survives the node), runs the tasks its pool can run
//! whichever node accepted them, pulling only as its own queues have room, records each task's
//! one outcome in a JetStream key-value bucket readable from every node, announces itself in a
//! second bucket, and carries the bus between nodes. Nothing here is a protocol of its own:
//! JetStream's acknowledgements, redelivery, deduplication and key-value store do the work.
//!
//! It uses only the public API of `troupe` and three of its extension points:
//! [`troupe::TaskSource`] with [`troupe::RuntimeHandle::pump`] (pulling with bounded
//! outstanding acknowledgements), [`troupe::BusBridge`] (the bus across nodes) and
//! [`troupe::RuntimeHandle::bridged_bus`] (delivering what arrives).
//!
//! ## The guarantees
//!
//! * **Accepted means stored**: [`Cluster::submit`] returns once JetStream has the task.
//! * **Executions may repeat** after a crash: a node that dies while running a task never
//!   acknowledges it, and after `ack_wait` another node runs it again (at least once). An agent
//!   with side effects should make them idempotent — key them by `TaskRequest::key` (the
//!   cluster's task id, the same on every delivery), or check before acting.
//! * **Outcomes are recorded once**: the first outcome written for a task id is the one kept
//!   and the one every node reports.
//! * **Ordering is by priority only**: within a priority, tasks start roughly in acceptance
//!   order, but across nodes nothing is promised.
//! * **A task that runs out of deliveries** (`max_attempts`) ends `error` with the reason; one
//!   whose deadline passed ends `timeout`; none ends silently.
//!
//! See the repository's README ("Run a cluster") for the setup and docs/ARCHITECTURE.md for the
//! picture.

#![warn(missing_docs)]

mod bus;
mod config;
mod error;
mod metrics;
mod names;
mod node;
pub mod testing;
mod wire;

pub use bus::NatsBridge;
pub use config::ClusterConfig;
pub use error::ClusterError;
pub use node::{Accepted, Cluster, ClusterTask, Member, TaskStatus};
pub use wire::{NodeRecord, OutcomeRecord};
