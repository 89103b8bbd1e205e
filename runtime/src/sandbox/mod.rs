//! The tri-sandbox: run one task on three isolated lanes and vote 2-of-3 on the result.
//!
//! Use it for work whose wrong answer costs more than running it three times: a lane with a
//! corrupted agent, a flaky dependency, or a nondeterministic model is outvoted instead of
//! trusted. A sandboxed task goes through the same admission bounds as any task, then a job is
//! sent to lanes A, B and C. The unifier answers as soon as two lanes agree, so the latency is
//! the second-fastest lane's; the third result is still recorded, as agreement or dissent. No
//! quorum (two failures, or three different outputs) is a typed error carrying every lane's
//! result, unless the kind has a fallback that picks one; it is reported once all three lanes
//! have answered or timed out, so the error and the fallback see every result.
//!
//! Lanes are separate failure domains:
//!
//! * **Thread lanes** — each lane is its own OS thread with its own single-threaded Tokio
//!   executor and its own agent instances. A lane that panics rebuilds its instance; a lane that
//!   spins or blocks its thread is timed out by the unifier (which runs elsewhere) and replaced
//!   by a fresh thread, while the other two lanes carry on.
//! * **Process lanes** — each lane runs worker processes (a binary that calls
//!   [`worker_main`]); jobs and results cross a pipe as framed, versioned messages ([`wire`]).
//!   A worker that overruns its job's timeout is killed, one that dies is restarted, and the
//!   lane's result says which (`timeout` or `crashed`). Nothing is shared in memory with the host.

//!
//! This file is the sandbox's public face; the host side lives in `lanes` and `process`, the
//! vocabulary in `model`, the worker side (which starts a runtime of its own) in `worker`.

pub(crate) mod jobs;
pub(crate) mod lanes;
pub(crate) mod model;
mod process;
mod vote;
pub mod wire;
mod worker;

pub use model::Comparator;
pub use model::{
    Fallback, Lane, LaneMode, LaneResult, LaneStats, ProcessConfig, SandboxConfig, SandboxError,
    SandboxKindConfig, SandboxPolicy, SandboxStats, Verdict,
};
pub use vote::VoteResult;
pub use worker::{in_worker_process, serve_worker, worker_main};
