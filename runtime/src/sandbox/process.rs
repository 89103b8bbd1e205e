//! Process lanes, host side: one task per worker slot, each owning one child process that runs
//! one job at a time over the [`wire`](super::wire) protocol.
//!
//! A job that overruns its timeout gets the child killed (result `timeout`); a child that dies
//! mid-job gives `crashed` with its exit status; either way the next job starts a fresh child.
//! Children are killed when their slot ends, and `kill_on_drop` covers a slot that is dropped,
//! so no worker outlives the runtime.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::jobs::{Job, KindLanes};
use super::model::{Lane, LaneResult};
use super::wire::{self, Frame, JobResult, Run};

/// The worker processes alive now, per lane, with their pids.
#[derive(Default)]
pub(crate) struct Census {
    live: [AtomicUsize; 3],
    pids: Mutex<HashSet<u32>>,
}

impl Census {
    fn worker_started(&self, lane: Lane, pid: u32) {
        self.live[lane.index()].fetch_add(1, Ordering::AcqRel);
        lock(&self.pids).insert(pid);
    }

    fn worker_ended(&self, lane: Lane, pid: u32) {
        self.live[lane.index()].fetch_sub(1, Ordering::AcqRel);
        lock(&self.pids).remove(&pid);
    }

    /// Workers alive on `lane`.
    pub(crate) fn live(&self, lane: Lane) -> usize {
        self.live[lane.index()].load(Ordering::Acquire)
    }

    /// Pids alive now, sorted.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = lock(&self.pids).iter().copied().collect();
        pids.sort_unstable();
        pids
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    pid: u32,
}

const HANDSHAKE: Duration = Duration::from_secs(10);

async fn spawn_worker(command: &[String], kind: &str) -> Result<Worker, String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "sandbox.process.command is empty".to_string())?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start worker `{program}`: {e}"))?;
    let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("worker pipes missing".into());
    };
    let pid = child.id().unwrap_or(0);
    match tokio::time::timeout(HANDSHAKE, wire::read_frame(&mut stdout)).await {
        Ok(Ok(Some(Frame::Ready(ready)))) if ready.kinds.iter().any(|k| k == kind) => Ok(Worker {
            child,
            stdin,
            stdout,
            pid,
        }),
        Ok(Ok(Some(Frame::Ready(ready)))) => {
            let _ = child.kill().await;
            Err(format!(
                "worker does not serve kind `{kind}` (it serves {:?})",
                ready.kinds
            ))
        }
        other => {
            let _ = child.kill().await;
            Err(format!("worker handshake failed: {other:?}"))
        }
    }
}

/// Serves jobs of `lanes` on `lane` with one child process at a time.
pub(crate) async fn slot(sb: Arc<Census>, lanes: Arc<KindLanes>, lane: Lane, command: Vec<String>) {
    let jobs = lanes.receivers[lane.index()].clone();
    let mut worker: Option<Worker> = None;
    let mut job_no = 0u64;
    while let Ok(job) = jobs.recv().await {
        // The vote was decided without this lane and others wait: nobody awaits this answer.
        let Some(job) = super::jobs::skip_if_unneeded(job, &jobs) else {
            continue;
        };
        if worker.is_none() {
            match spawn_worker(&command, &lanes.kind).await {
                Ok(w) => {
                    sb.worker_started(lane, w.pid);
                    worker = Some(w);
                }
                Err(e) => {
                    tracing::error!(lane = %lane, error = %e, "sandbox worker did not start");
                    let _ = job.reply.send(LaneResult::Unavailable(e));
                    // Do not spin on a broken command.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(w) = worker.as_mut() else { continue };
        job_no += 1;
        let (result, keep) = run_job(w, job_no, lane, &lanes.kind, &job).await;
        let _ = job.reply.send(result);
        if !keep {
            if let Some(w) = worker.take() {
                retire(&sb, lane, w, false).await;
            }
        }
    }
    if let Some(w) = worker.take() {
        retire(&sb, lane, w, true).await;
    }
}

/// Runs one job; the bool says whether the worker is still usable.
async fn run_job(
    w: &mut Worker,
    job_no: u64,
    lane: Lane,
    kind: &str,
    job: &Job,
) -> (LaneResult, bool) {
    let run = Frame::Run(Run {
        job: job_no,
        kind: kind.to_owned(),
        lane: lane.index() as u8,
        timeout_ms: u64::try_from(job.timeout.as_millis()).unwrap_or(u64::MAX),
        payload: job.payload.clone(),
    });
    if let Err(e) = wire::write_frame(&mut w.stdin, &run).await {
        return (
            LaneResult::Crashed(exit_note(w, &e.to_string()).await),
            false,
        );
    }
    // The worker enforces the timeout itself; the margin only matters if it cannot (a worker
    // that blocks its own thread), and then it is killed.
    let margin = job.timeout + (job.timeout / 10).max(Duration::from_millis(50));
    match tokio::time::timeout(margin, wire::read_frame(&mut w.stdout)).await {
        Err(_) => {
            let _ = w.child.kill().await;
            (LaneResult::Timeout, false)
        }
        Ok(Ok(Some(Frame::Done(done)))) if done.job == job_no => match done.result {
            JobResult::Ok(b) => (LaneResult::Ok(b), true),
            JobResult::Error(e) => (LaneResult::Error(e), true),
            JobResult::Panic(p) => (LaneResult::Panic(p), true),
            JobResult::Timeout => (LaneResult::Timeout, true),
            JobResult::UnknownKind(k) => (
                LaneResult::Unavailable(format!("worker has no kind `{k}`")),
                true,
            ),
        },
        Ok(Ok(Some(other))) => {
            let _ = w.child.kill().await;
            (
                LaneResult::Crashed(format!("protocol violation: unexpected {other:?}")),
                false,
            )
        }
        Ok(Ok(None)) => (
            LaneResult::Crashed(exit_note(w, "closed its output").await),
            false,
        ),
        Ok(Err(e)) => {
            let _ = w.child.kill().await;
            (
                LaneResult::Crashed(exit_note(w, &e.to_string()).await),
                false,
            )
        }
    }
}

async fn exit_note(w: &mut Worker, what: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(1), w.child.wait()).await {
        Ok(Ok(status)) => format!("worker {what}; it exited with {status}"),
        _ => {
            let _ = w.child.kill().await;
            format!("worker {what}; it was killed")
        }
    }
}

/// Ends a worker: politely when `graceful` (a shutdown frame, a short wait), then by kill.
async fn retire(sb: &Census, lane: Lane, mut w: Worker, graceful: bool) {
    if graceful {
        let _ = wire::write_frame(&mut w.stdin, &Frame::Shutdown).await;
        if tokio::time::timeout(Duration::from_millis(500), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.kill().await;
        }
    } else {
        let _ = w.child.kill().await;
    }
    let _ = w.child.wait().await;
    sb.worker_ended(lane, w.pid);
}
