//! Task sources: the extension point for layers that feed the runtime from somewhere else (the
//! cluster's durable stream, a queue of your own) and must hear every outcome.
//!
//! A [`TaskSource`] hands out tasks one at a time with a receipt (whatever the source needs to
//! acknowledge the task later: a stream message, a row id) and is told each task's outcome.
//! [`RuntimeHandle::pump`] drives it:
//!
//! * it asks for the next task only while fewer than `max_in_flight` of the source's tasks are
//!   unfinished, so a source never hands out more than the runtime holds for it (bounded
//!   outstanding acknowledgements: backpressure reaches the source, there is no prefetch);
//! * it submits each task waiting up to `max_wait` for room in its priority's queue;
//! * it reports each task exactly once: [`TaskSource::finished`] with the one outcome, or
//!   [`TaskSource::refused`] with the task handed back if the runtime would not accept it;
//! * it returns when the source is exhausted (`next` gives `None`) and every task it handed out
//!   has been reported, or, once the runtime is shutting down, after reporting what is in flight.
//!
//! The methods take `&self` because outcomes are reported while the next task is awaited; a
//! source keeps its own state behind whatever synchronisation it needs.

// A refused task is handed back inside `Rejected` by value, as `try_submit` does.
#![allow(clippy::result_large_err)]

use std::future::Future;
use std::time::Duration;

use futures_util::future::{FusedFuture, FutureExt};
use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::error::Rejected;
use crate::handle::RuntimeHandle;
use crate::task::{Outcome, Task};

/// A task handed out by a source, with what the source needs to acknowledge it.
#[derive(Debug)]
pub struct SourcedTask<R> {
    /// The task to run.
    pub task: Task,
    /// Given back with the task's outcome.
    pub receipt: R,
}

/// Where tasks come from and where their outcomes go. See the module docs.
pub trait TaskSource: Send + Sync {
    /// What the source needs to acknowledge a task it handed out.
    type Receipt: Send;

    /// The next task, or `None` when the source has nothing more to give.
    fn next(&self) -> impl Future<Output = Option<SourcedTask<Self::Receipt>>> + Send;

    /// The one outcome of a task the runtime accepted.
    fn finished(&self, receipt: Self::Receipt, outcome: Outcome)
    -> impl Future<Output = ()> + Send;

    /// A task the runtime refused (shutting down, invalid, queue full past `max_wait`), handed
    /// back. The default drops it; a durable source leaves it unacknowledged instead.
    fn refused(
        &self,
        receipt: Self::Receipt,
        rejected: Rejected,
    ) -> impl Future<Output = ()> + Send {
        let _ = (receipt, rejected);
        async {}
    }
}

/// What a pump did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// Tasks the source handed out.
    pub pulled: u64,
    /// Tasks accepted and reported with their outcome.
    pub finished: u64,
    /// Tasks refused and handed back.
    pub refused: u64,
    /// Most of the source's tasks unfinished at once (never above `max_in_flight`).
    pub peak_in_flight: usize,
}

impl RuntimeHandle {
    /// Runs `source` into this runtime until it is exhausted. See the [`TaskSource`] docs for
    /// the contract; `max_in_flight` is at least 1.
    pub async fn pump<S: TaskSource>(
        &self,
        source: &S,
        max_in_flight: usize,
        max_wait: Duration,
    ) -> SourceReport {
        let max = max_in_flight.max(1);
        let mut report = SourceReport::default();
        let mut in_flight = FuturesUnordered::new();
        let pulling = source.next().fuse();
        futures_util::pin_mut!(pulling);
        let mut exhausted = false;
        let mut pull_again = false;
        loop {
            if self.core().phase().is_closed() {
                exhausted = true;
            }
            if pull_again && !exhausted && in_flight.len() < max {
                pulling.set(source.next().fuse());
                pull_again = false;
            }
            let pulling_now = !exhausted && !pulling.is_terminated();
            if !pulling_now && in_flight.is_empty() {
                return report;
            }
            tokio::select! {
                next = &mut pulling, if pulling_now => {
                    pull_again = true;
                    let Some(SourcedTask { task, receipt }) = next else {
                        exhausted = true;
                        continue;
                    };
                    report.pulled += 1;
                    in_flight.push(async move {
                        match self.submit(task, max_wait).await {
                            Ok(handle) => {
                                source.finished(receipt, handle.await).await;
                                true
                            }
                            Err(rejected) => {
                                source.refused(receipt, rejected).await;
                                false
                            }
                        }
                    });
                    report.peak_in_flight = report.peak_in_flight.max(in_flight.len());
                }
                Some(accepted) = in_flight.next(), if !in_flight.is_empty() => {
                    if accepted {
                        report.finished += 1;
                    } else {
                        report.refused += 1;
                    }
                }
            }
        }
    }
}
