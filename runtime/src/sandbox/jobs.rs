//! What flows through a lane: jobs, the channels of each sandbox kind, and what an agent
//! instance on a lane is handed. Shared by the thread lanes, the process lanes and the worker
//! process, so none of them imports another for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::model::{
    Comparator, Fallback, Lane, LaneMode, LaneResult, SandboxKindConfig, SandboxPolicy,
};
use crate::ids::{AgentId, TaskId};
use crate::priority::Priority;
use crate::task::TaskRequest;

/// One job for one lane.
pub(crate) struct Job {
    pub(crate) task: TaskId,
    pub(crate) priority: Priority,
    pub(crate) payload: Bytes,
    /// The task's [`Task::key`](crate::Task::key), for thread lanes.
    pub(crate) key: Option<u64>,
    pub(crate) timeout: Duration,
    pub(crate) reply: oneshot::Sender<LaneResult>,
    /// Shared with the unifier: whoever moves it first decides whether the job runs.
    pub(crate) state: Arc<JobState>,
}

/// Whether a lane's job is still awaited: the unifier marks it once the vote is decided
/// without it; a lane that finds such a job while other jobs wait behind it skips it (answers
/// `Skipped` without running it), so a slow lane never works through a backlog nobody awaits.
#[derive(Default)]
pub(crate) struct JobState(std::sync::atomic::AtomicBool);

impl JobState {
    /// The vote no longer needs this job.
    pub(crate) fn decide(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// True once the vote was decided without this job.
    pub(crate) fn decided(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Answers `job` `Skipped` if the vote no longer needs it and other jobs wait on the lane;
/// otherwise hands it back to run.
pub(crate) fn skip_if_unneeded(job: Job, queue: &async_channel::Receiver<Job>) -> Option<Job> {
    if job.state.decided() && !queue.is_empty() {
        let _ = job.reply.send(LaneResult::Skipped);
        None
    } else {
        Some(job)
    }
}

impl Job {
    /// The request an agent handles, the time it may take, and where its result goes.
    pub(crate) fn into_parts(self) -> (TaskRequest, Duration, oneshot::Sender<LaneResult>) {
        let request = TaskRequest {
            id: self.task,
            priority: self.priority,
            payload: self.payload,
            attempt: 1,
            key: self.key,
        };
        (request, self.timeout, self.reply)
    }
}

/// What one agent instance on a lane is given: who it is and where its jobs come from.
pub(crate) struct LaneJobs {
    pub(crate) kind: Arc<str>,
    pub(crate) lane: Lane,
    pub(crate) id: AgentId,
    pub(crate) params: Arc<toml::Table>,
    jobs: async_channel::Receiver<Job>,
    /// The instance leaves after its current job when this differs from `my_generation`.
    generation: Arc<AtomicU64>,
    my_generation: u64,
}

impl LaneJobs {
    pub(crate) fn new(
        kind: Arc<str>,
        lane: Lane,
        id: AgentId,
        params: Arc<toml::Table>,
        jobs: async_channel::Receiver<Job>,
        generation: Arc<AtomicU64>,
        my_generation: u64,
    ) -> Self {
        LaneJobs {
            kind,
            lane,
            id,
            params,
            jobs,
            generation,
            my_generation,
        }
    }

    /// The next job to run, or `None` once the lane is shut down. A job the vote no longer
    /// needs is answered `Skipped` instead while others wait behind it.
    pub(crate) async fn next(&self) -> Option<Job> {
        loop {
            let job = self.jobs.recv().await.ok()?;
            match skip_if_unneeded(job, &self.jobs) {
                Some(job) => return Some(job),
                None => continue,
            }
        }
    }

    /// True once this instance's lane thread was replaced: it leaves after the job in hand.
    pub(crate) fn replaced(&self) -> bool {
        self.generation.load(Ordering::Acquire) != self.my_generation
    }
}

/// Runs one agent instance on a lane until its jobs end (built by the runtime, per kind).
pub(crate) type LaneSpawnFn = Arc<dyn Fn(LaneJobs) -> BoxFuture<'static, ()> + Send + Sync>;

/// One sandbox kind's channels and judging policy.
pub(crate) struct KindLanes {
    pub(crate) kind: Arc<str>,
    pub(crate) mode: LaneMode,
    pub(crate) instances: usize,
    pub(crate) senders: [async_channel::Sender<Job>; 3],
    pub(crate) receivers: [async_channel::Receiver<Job>; 3],
    pub(crate) comparator: Arc<Comparator>,
    pub(crate) fallback: Option<Arc<Fallback>>,
}

impl KindLanes {
    /// The channels of `kind`, judged by `policy`.
    pub(crate) fn new(kind: &SandboxKindConfig, policy: SandboxPolicy) -> Self {
        // Unbounded by type, bounded in fact: dispatch refuses a lane whose queue holds
        // `sandbox.lane_queue` jobs (a bounded channel would allocate its whole capacity up
        // front), and jobs the vote no longer needs are skipped, not run.
        let channels: [(async_channel::Sender<Job>, async_channel::Receiver<Job>); 3] =
            std::array::from_fn(|_| async_channel::unbounded());
        let [(s0, r0), (s1, r1), (s2, r2)] = channels;
        let comparator: Arc<Comparator> = policy
            .comparator
            .unwrap_or_else(|| Arc::new(|a: &Bytes, b: &Bytes| a == b));
        KindLanes {
            kind: Arc::from(kind.kind.as_str()),
            mode: kind.lanes,
            instances: kind.instances,
            senders: [s0, s1, s2],
            receivers: [r0, r1, r2],
            comparator,
            fallback: policy.fallback,
        }
    }
}
