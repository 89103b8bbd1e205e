//! Process lanes, worker side: the loop a sandbox worker binary runs.
//!
//! It sits above the runtime (it starts one, so its agents get a full context), which is why
//! the rest of the sandbox never imports this file; only the sandbox's public face re-exports it.
//!
//! A worker binary registers its agent kinds on a [`RuntimeBuilder`] (no tiers needed) and
//! calls [`worker_main`]. It answers `Ready`, then runs one job per `Run` frame on an agent
//! instance of the requested kind (built on first use, rebuilt after a panic) and answers
//! `Done`. Standard output carries the protocol, so the worker logs to standard error only.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::jobs::{Job, LaneJobs};
use super::model::{Lane, LaneResult};
use super::wire::{self, Done, Frame, JobResult, Ready, WireError};
use crate::ids::{AgentId, TaskId};
use crate::priority::Priority;
use crate::runtime::RuntimeBuilder;

static IN_WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True inside a process started as a sandbox worker (after [`worker_main`] began). Agents use
/// it to refuse what would be fatal to a host, such as exiting the process.
pub fn in_worker_process() -> bool {
    IN_WORKER.load(std::sync::atomic::Ordering::Acquire)
}

/// Serves the protocol on `input` / `output` until `Shutdown` or end of input.
pub async fn serve_worker<R, W>(
    builder: RuntimeBuilder,
    mut input: R,
    mut output: W,
) -> Result<(), WireError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let runtime = builder
        .start()
        .await
        .map_err(|e| WireError::Io(format!("worker runtime did not start: {e}")))?;
    let sandbox = runtime.handle().sandbox();
    let kinds = sandbox.lane_kinds();
    wire::write_frame(&mut output, &Frame::Ready(Ready { kinds })).await?;

    let mut lanes: HashMap<(String, u8), async_channel::Sender<Job>> = HashMap::new();
    let generation = Arc::new(AtomicU64::new(0));
    let result = loop {
        let frame = match wire::read_frame(&mut input).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let run = match frame {
            Frame::Run(run) => run,
            Frame::Shutdown => break Ok(()),
            other => break Err(WireError::Body(format!("unexpected frame {other:?}"))),
        };
        let key = (run.kind.clone(), run.lane);
        let sender = match lanes.get(&key) {
            Some(s) => Some(s.clone()),
            None => match (
                sandbox.lane_spawner(&run.kind),
                Lane::from_index(run.lane as usize),
            ) {
                (Some(spawn), Some(lane)) => {
                    let (tx, rx) = async_channel::bounded(1);
                    tokio::spawn(spawn(LaneJobs::new(
                        Arc::from(run.kind.as_str()),
                        lane,
                        AgentId(u32::MAX - run.lane as u32),
                        sandbox.params_of(&run.kind),
                        rx,
                        generation.clone(),
                        0,
                    )));
                    lanes.insert(key, tx.clone());
                    Some(tx)
                }
                _ => None,
            },
        };
        let result = match sender {
            None => JobResult::UnknownKind(run.kind.clone()),
            Some(tx) => {
                let (reply, answer) = oneshot::channel();
                let job = Job {
                    task: TaskId(run.job),
                    priority: Priority::Normal,
                    payload: run.payload,
                    key: None,
                    timeout: Duration::from_millis(run.timeout_ms),
                    reply,
                    state: Default::default(),
                };
                if tx.send(job).await.is_err() {
                    JobResult::Error("lane worker is gone".into())
                } else {
                    match answer.await {
                        Ok(LaneResult::Ok(b)) => JobResult::Ok(b),
                        Ok(LaneResult::Error(e)) => JobResult::Error(e),
                        Ok(LaneResult::Panic(p)) => JobResult::Panic(p),
                        Ok(LaneResult::Timeout) => JobResult::Timeout,
                        Ok(other) => JobResult::Error(other.to_string()),
                        Err(_) => JobResult::Error("lane worker dropped the job".into()),
                    }
                }
            }
        };
        let done = Frame::Done(Done {
            job: run.job,
            result,
        });
        if let Err(e) = wire::write_frame(&mut output, &done).await {
            break Err(e);
        }
    };
    drop(lanes);
    runtime.shutdown_with(Duration::from_millis(100)).await;
    result
}

/// Runs a sandbox worker on standard input and output. Call it from a worker binary's `main`:
///
/// ```no_run
/// use troupe::{AgentSpec, RuntimeBuilder, RuntimeConfig};
/// # struct Echo;
/// # impl troupe::Agent for Echo {
/// #     async fn handle(&mut self, t: troupe::TaskRequest, _: &troupe::AgentContext)
/// #         -> Result<bytes::Bytes, troupe::TaskError> { Ok(t.payload) }
/// # }
/// fn main() -> std::process::ExitCode {
///     let builder = RuntimeBuilder::new(RuntimeConfig::default())
///         .register("echo", |_: &AgentSpec| Echo);
///     troupe::sandbox::worker_main(builder)
/// }
/// ```
pub fn worker_main(builder: RuntimeBuilder) -> ExitCode {
    IN_WORKER.store(true, std::sync::atomic::Ordering::Release);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("troupe worker: cannot build executor: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve_worker(
        builder,
        tokio::io::stdin(),
        tokio::io::stdout(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("troupe worker: {e}");
            ExitCode::FAILURE
        }
    }
}
