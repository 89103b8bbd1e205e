//! The host side of the sandbox: lane executors, dispatch and the unifier.
//!
//! Each sandbox kind has one bounded job channel per lane. Thread lanes consume it from three
//! dedicated threads (one per lane, each with its own current-thread Tokio executor); process
//! lanes from worker-slot tasks that each own a child process. The unifier for a task runs on
//! the main runtime, so a lane that wedges its thread cannot stop the vote.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::vote::{Ballot, Comparator, Decision, VoteResult};
use super::{Lane, LaneMode, LaneResult, Policies, SandboxConfig, SandboxError, Verdict};
use crate::agent::{Agent, AgentContext, AgentFactory, AgentId, AgentSpec};
use crate::priority::Priority;
use crate::runtime::Shared;
use crate::task::{Outcome, QueuedTask, TaskError, TaskId, TaskRequest};
use crate::telemetry::StripedCounter;
use crate::worker::panic_message;

/// One job for one lane.
pub(crate) struct Job {
    pub(crate) task: TaskId,
    pub(crate) priority: Priority,
    pub(crate) payload: Bytes,
    pub(crate) timeout: Duration,
    pub(crate) reply: oneshot::Sender<LaneResult>,
}

/// Everything a lane worker loop needs; the factory comes from the kind's registration.
pub(crate) struct LaneWorker {
    pub(crate) shared: Arc<Shared>,
    pub(crate) kind: Arc<str>,
    pub(crate) lane: Lane,
    pub(crate) id: AgentId,
    pub(crate) params: Arc<toml::Table>,
    pub(crate) jobs: async_channel::Receiver<Job>,
    /// The worker leaves after its current job when this differs from `my_generation`.
    pub(crate) generation: Arc<AtomicU64>,
    pub(crate) my_generation: u64,
}

pub(crate) type LaneSpawnFn = Arc<dyn Fn(LaneWorker) -> BoxFuture<'static, ()> + Send + Sync>;

/// Runs jobs on one agent instance, rebuilding it after a panic.
pub(crate) async fn lane_worker<F: AgentFactory>(factory: Arc<F>, w: LaneWorker) {
    let ctx = AgentContext::for_lane(w.shared.clone(), w.id, w.kind.clone(), w.lane);
    let spec = AgentSpec {
        id: w.id,
        kind: w.kind.clone(),
        tier: Arc::from("sandbox"),
        capabilities: Arc::from(vec![w.kind.clone()]),
        params: w.params.clone(),
        restarts: 0,
    };
    let mut agent: Option<F::Agent> = None;
    while let Ok(job) = w.jobs.recv().await {
        if agent.is_none() {
            match build(&*factory, &spec, &ctx).await {
                Ok(a) => agent = Some(a),
                Err(e) => {
                    let _ = job.reply.send(LaneResult::Unavailable(e));
                    continue;
                }
            }
        }
        let Some(a) = agent.as_mut() else { continue };
        let request = TaskRequest {
            id: job.task,
            priority: job.priority,
            payload: job.payload,
            attempt: 1,
        };
        let ran = tokio::time::timeout(
            job.timeout,
            AssertUnwindSafe(a.handle(request, &ctx)).catch_unwind(),
        )
        .await;
        let result = match ran {
            Err(_) => LaneResult::Timeout,
            Ok(Ok(Ok(out))) => LaneResult::Ok(out),
            Ok(Ok(Err(e))) => LaneResult::Error(e.to_string()),
            Ok(Err(p)) => {
                agent = None;
                LaneResult::Panic(panic_message(p.as_ref()))
            }
        };
        let _ = job.reply.send(result);
        if w.generation.load(Ordering::Acquire) != w.my_generation {
            break;
        }
    }
}

async fn build<F: AgentFactory>(
    factory: &F,
    spec: &AgentSpec,
    ctx: &AgentContext,
) -> Result<F::Agent, String> {
    let mut agent = std::panic::catch_unwind(AssertUnwindSafe(|| factory.build(spec)))
        .map_err(|p| format!("factory panicked: {}", panic_message(p.as_ref())))?
        .map_err(|e| format!("factory failed: {e}"))?;
    match AssertUnwindSafe(agent.on_start(ctx)).catch_unwind().await {
        Ok(Ok(())) => Ok(agent),
        Ok(Err(e)) => Err(format!("on_start failed: {e}")),
        Err(p) => Err(format!("on_start panicked: {}", panic_message(p.as_ref()))),
    }
}

/// One sandbox kind's channels and judging policy.
pub(crate) struct KindLanes {
    pub(crate) kind: Arc<str>,
    pub(crate) mode: LaneMode,
    pub(crate) instances: usize,
    senders: [async_channel::Sender<Job>; 3],
    pub(crate) receivers: [async_channel::Receiver<Job>; 3],
    comparator: Arc<Comparator>,
    fallback: Option<Arc<super::Fallback>>,
}

/// Counters of the sandbox, resolved once.
#[derive(Default)]
pub(crate) struct SandboxTelemetry {
    pub(crate) executions: [[StripedCounter; 6]; 3],
    pub(crate) votes: [StripedCounter; 3],
    pub(crate) dissent: [StripedCounter; 3],
}

/// Liveness of one lane's thread.
struct LaneThread {
    /// Milliseconds since `Sandbox::epoch` at the last tick of the lane's executor.
    heartbeat: AtomicU64,
    generation: Arc<AtomicU64>,
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

pub(crate) struct Sandbox {
    pub(crate) config: SandboxConfig,
    pub(crate) kinds: HashMap<String, Arc<KindLanes>>,
    threads: [LaneThread; 3],
    epoch: Instant,
    pub(crate) telemetry: SandboxTelemetry,
    pub(crate) cancel: CancellationToken,
    /// Worker processes alive now, per lane.
    pub(crate) live_workers: [AtomicUsize; 3],
    /// Pids of live worker processes.
    pub(crate) pids: Mutex<HashSet<u32>>,
    slots: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    started: AtomicBool,
}

const TICK: Duration = Duration::from_millis(10);

impl Sandbox {
    pub(crate) fn new(config: SandboxConfig, policies: &Policies) -> Self {
        let kinds = config
            .kinds
            .iter()
            .map(|k| {
                // Unbounded by type, bounded in fact: a lane queue holds at most one job per
                // admitted sandboxed task, and admission caps those per priority. (A bounded
                // channel would allocate its whole capacity up front: ~20 MB per kind.)
                let channels: [(async_channel::Sender<Job>, async_channel::Receiver<Job>); 3] =
                    std::array::from_fn(|_| async_channel::unbounded());
                let [(s0, r0), (s1, r1), (s2, r2)] = channels;
                let policy = policies.get(&k.kind).cloned().unwrap_or_default();
                let comparator: Arc<Comparator> = policy
                    .comparator
                    .unwrap_or_else(|| Arc::new(|a: &Bytes, b: &Bytes| a == b));
                let lanes = KindLanes {
                    kind: Arc::from(k.kind.as_str()),
                    mode: k.lanes,
                    instances: k.instances,
                    senders: [s0, s1, s2],
                    receivers: [r0, r1, r2],
                    comparator,
                    fallback: policy.fallback,
                };
                (k.kind.clone(), Arc::new(lanes))
            })
            .collect();
        Sandbox {
            config,
            kinds,
            threads: std::array::from_fn(|_| LaneThread {
                heartbeat: AtomicU64::new(0),
                generation: Arc::new(AtomicU64::new(0)),
                handles: Mutex::new(Vec::new()),
            }),
            epoch: Instant::now(),
            telemetry: SandboxTelemetry::default(),
            cancel: CancellationToken::new(),
            live_workers: Default::default(),
            pids: Mutex::new(HashSet::new()),
            slots: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn has_thread_kinds(&self) -> bool {
        self.kinds.values().any(|k| k.mode == LaneMode::Threads)
    }

    /// Starts lane threads and process worker slots.
    pub(crate) fn start(shared: &Arc<Shared>) -> std::io::Result<()> {
        let sb = &shared.sandbox;
        if sb.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if sb.has_thread_kinds() {
            for lane in Lane::ALL {
                spawn_lane_thread(shared.clone(), lane)?;
            }
        }
        let mut slots = sb.slots.lock().unwrap_or_else(|p| p.into_inner());
        for k in sb.kinds.values().filter(|k| k.mode == LaneMode::Process) {
            let command = sb
                .config
                .process
                .as_ref()
                .map(|p| p.command.clone())
                .unwrap_or_default();
            for lane in Lane::ALL {
                for _ in 0..k.instances {
                    slots.push(tokio::spawn(super::process::slot(
                        shared.clone(),
                        k.clone(),
                        lane,
                        command.clone(),
                    )));
                }
            }
        }
        Ok(())
    }

    /// Lane executors available / configured, per lane.
    pub(crate) fn lanes_available(&self) -> [(usize, usize); 3] {
        let thread_total: usize = self
            .kinds
            .values()
            .filter(|k| k.mode == LaneMode::Threads)
            .map(|k| k.instances)
            .sum();
        let process_total: usize = self
            .kinds
            .values()
            .filter(|k| k.mode == LaneMode::Process)
            .map(|k| k.instances)
            .sum();
        let now = self.now_ms();
        std::array::from_fn(|i| {
            let fresh = now.saturating_sub(self.threads[i].heartbeat.load(Ordering::Acquire))
                < 10 * TICK.as_millis() as u64;
            let threads_up =
                if fresh && self.started.load(Ordering::Acquire) && !self.cancel.is_cancelled() {
                    thread_total
                } else {
                    0
                };
            (
                threads_up + self.live_workers[i].load(Ordering::Acquire),
                thread_total + process_total,
            )
        })
    }

    /// Replaces lane `lane`'s thread if its executor has not ticked for `stale`.
    fn replace_if_stuck(shared: &Arc<Shared>, lane: Lane, stale: Duration) {
        let sb = &shared.sandbox;
        if sb.cancel.is_cancelled() || !sb.has_thread_kinds() {
            return;
        }
        let t = &sb.threads[lane.index()];
        let last = t.heartbeat.load(Ordering::Acquire);
        let age = sb.now_ms().saturating_sub(last);
        if age < stale.as_millis() as u64 {
            return;
        }
        // Claim the replacement by bumping the heartbeat, so concurrent unifiers spawn one.
        if t.heartbeat
            .compare_exchange(last, sb.now_ms(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        tracing::error!(lane = %lane, stalled_ms = age, "sandbox lane thread is stuck; starting a replacement");
        t.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = spawn_lane_thread(shared.clone(), lane) {
            tracing::error!(lane = %lane, error = %e, "could not start a replacement lane thread");
        }
    }

    /// Stops the lanes: cancels pending votes, closes job channels, ends workers and threads.
    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        for k in self.kinds.values() {
            for s in &k.senders {
                s.close();
            }
        }
        let slots: Vec<_> =
            std::mem::take(&mut *self.slots.lock().unwrap_or_else(|p| p.into_inner()));
        for slot in slots {
            let _ = tokio::time::timeout(Duration::from_secs(5), slot).await;
        }
        for t in &self.threads {
            let handles: Vec<_> =
                std::mem::take(&mut *t.handles.lock().unwrap_or_else(|p| p.into_inner()));
            for h in handles {
                // A stuck (abandoned) thread may never finish; do not wait on it forever.
                let deadline = Instant::now() + Duration::from_secs(1);
                while !h.is_finished() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if h.is_finished() {
                    let _ = h.join();
                }
            }
        }
    }
}

fn spawn_lane_thread(shared: Arc<Shared>, lane: Lane) -> std::io::Result<()> {
    let sb = &shared.sandbox;
    let t = &sb.threads[lane.index()];
    let generation = t.generation.clone();
    let my_generation = generation.load(Ordering::Acquire);
    t.heartbeat.store(sb.now_ms(), Ordering::Release);
    let shared2 = shared.clone();
    let handle = std::thread::Builder::new()
        .name(format!("troupe-lane-{lane}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(lane = %lane, error = %e, "cannot build lane executor");
                    return;
                }
            };
            rt.block_on(run_lane(shared2, lane, generation, my_generation));
        })?;
    t.handles
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(handle);
    Ok(())
}

async fn run_lane(shared: Arc<Shared>, lane: Lane, generation: Arc<AtomicU64>, my_generation: u64) {
    let sb = &shared.sandbox;
    let mut workers = tokio::task::JoinSet::new();
    let mut next_id = 0u32;
    for k in sb.kinds.values().filter(|k| k.mode == LaneMode::Threads) {
        let Some(spawn) = shared.lane_spawners.get(&*k.kind) else {
            continue;
        };
        let params = shared.params_of(&k.kind);
        for _ in 0..k.instances {
            // Lane instances are not pool members: their ids count down from the top.
            next_id += 1;
            let id = AgentId(u32::MAX - (lane.index() as u32) * 65_536 - next_id);
            workers.spawn(spawn(LaneWorker {
                shared: shared.clone(),
                kind: k.kind.clone(),
                lane,
                id,
                params: params.clone(),
                jobs: k.receivers[lane.index()].clone(),
                generation: generation.clone(),
                my_generation,
            }));
        }
    }
    let heartbeat = &sb.threads[lane.index()].heartbeat;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if generation.load(Ordering::Acquire) != my_generation {
                    // Replaced while stuck: leave the job channels to the new thread.
                    workers.abort_all();
                    return;
                }
                heartbeat.store(sb.now_ms(), Ordering::Release);
            }
            joined = workers.join_next() => {
                match joined {
                    None => return,
                    Some(Err(e)) if e.is_panic() => {
                        tracing::error!(lane = %lane, "a sandbox lane worker died; its instance is gone");
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// Where a sandboxed run's answer goes.
pub(crate) enum Responder {
    /// A task submitted with `try_submit` / `submit`: answers its handle with an `Outcome`.
    Task(QueuedTask),
    /// `run_sandboxed`: answers with a `Verdict` or a `SandboxError`.
    Direct {
        priority: Priority,
        submitted_at: Instant,
        reply: oneshot::Sender<Result<Verdict, SandboxError>>,
    },
}

impl Responder {
    fn priority(&self) -> Priority {
        match self {
            Responder::Task(t) => t.priority,
            Responder::Direct { priority, .. } => *priority,
        }
    }

    fn answer(self, shared: &Shared, answer: Result<Verdict, SandboxError>) {
        shared.admission.level(self.priority()).release();
        match self {
            Responder::Task(task) => {
                let outcome = match answer {
                    Ok(v) => Outcome::Ok(v.output),
                    Err(SandboxError::Cancelled) => Outcome::Cancelled,
                    Err(e) => Outcome::Error(TaskError::new(e.to_string())),
                };
                shared.finish(task, outcome);
            }
            Responder::Direct {
                priority,
                submitted_at,
                reply,
            } => {
                // Counted like a task, so the outcome counters and latency cover every run.
                let kind = match &answer {
                    Ok(_) => crate::task::OutcomeKind::Ok,
                    Err(SandboxError::Cancelled) => crate::task::OutcomeKind::Cancelled,
                    Err(_) => crate::task::OutcomeKind::Error,
                };
                let t = &shared.telemetry;
                t.completed[priority][kind.index()].increment(1);
                t.latency[priority].record(crate::worker::elapsed_ns(submitted_at));
                let _ = reply.send(answer);
            }
        }
    }
}

/// Sends the job to all three lanes and runs the vote. The admission slot of the task is held
/// until the answer, so in-flight sandboxed work stays within the queue bounds.
pub(crate) fn dispatch(
    shared: &Arc<Shared>,
    lanes: Arc<KindLanes>,
    id: TaskId,
    payload: Bytes,
    timeout: Duration,
    responder: Responder,
) {
    let priority = responder.priority();
    let mut receivers: [Option<oneshot::Receiver<LaneResult>>; 3] = [None, None, None];
    let mut immediate: Vec<(Lane, LaneResult)> = Vec::new();
    for lane in Lane::ALL {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            task: id,
            priority,
            payload: payload.clone(),
            timeout,
            reply: tx,
        };
        match lanes.senders[lane.index()].try_send(job) {
            Ok(()) => receivers[lane.index()] = Some(rx),
            Err(e) => {
                let why = if e.is_closed() {
                    "lane is shut down"
                } else {
                    "lane job queue is full"
                };
                immediate.push((lane, LaneResult::Unavailable(why.into())));
            }
        }
    }
    let shared = shared.clone();
    shared.rt.clone().spawn(async move {
        unify(shared, lanes, receivers, immediate, timeout, responder).await;
    });
}

async fn unify(
    shared: Arc<Shared>,
    lanes: Arc<KindLanes>,
    mut receivers: [Option<oneshot::Receiver<LaneResult>>; 3],
    immediate: Vec<(Lane, LaneResult)>,
    timeout: Duration,
    responder: Responder,
) {
    let sb = &shared.sandbox;
    let eq: &Comparator = &*lanes.comparator;
    let mut ballot = Ballot::default();
    let mut responder = Some(responder);
    let mut agreed_at_decision: Vec<Lane> = Vec::new();

    let mut settle =
        |ballot: &mut Ballot, lane: Lane, result: LaneResult, responder: &mut Option<Responder>| {
            sb.telemetry.executions[lane.index()][result.label_index()].increment(1);
            if let Some(decision) = ballot.add(lane, result, eq) {
                let answer = match decision {
                    Decision::Agreed { output, lanes: l } => {
                        agreed_at_decision = l.to_vec();
                        Ok(Verdict {
                            output,
                            agreed: l.to_vec(),
                            fallback: false,
                        })
                    }
                    // Reported once every lane has answered or timed out (below), so the
                    // error and the fallback see all three results.
                    Decision::NoQuorum => return,
                };
                if let Some(r) = responder.take() {
                    r.answer(&shared, answer);
                }
            }
        };

    for (lane, result) in immediate {
        settle(&mut ballot, lane, result, &mut responder);
    }
    // The lane enforces `timeout` itself; the grace covers a lane too stuck to do so.
    let grace = (timeout / 10).max(Duration::from_millis(20));
    let deadline = tokio::time::sleep(timeout + grace);
    tokio::pin!(deadline);
    let [mut ra, mut rb, mut rc] = std::mem::take(&mut receivers);
    while !ballot.complete() {
        async fn recv(r: &mut Option<oneshot::Receiver<LaneResult>>) -> LaneResult {
            match r.as_mut() {
                Some(rx) => rx
                    .await
                    .unwrap_or_else(|_| LaneResult::Unavailable("lane dropped the job".into())),
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            r = recv(&mut ra) => { ra = None; settle(&mut ballot, Lane::A, r, &mut responder); }
            r = recv(&mut rb) => { rb = None; settle(&mut ballot, Lane::B, r, &mut responder); }
            r = recv(&mut rc) => { rc = None; settle(&mut ballot, Lane::C, r, &mut responder); }
            _ = &mut deadline => {
                let missing: Vec<Lane> = Lane::ALL
                    .into_iter()
                    .filter(|l| [&ra, &rb, &rc][l.index()].is_some())
                    .collect();
                for lane in missing {
                    Sandbox::replace_if_stuck(&shared, lane, timeout);
                    settle(&mut ballot, lane, LaneResult::Timeout, &mut responder);
                }
                let _ = ballot.time_out_missing();
            }
            _ = sb.cancel.cancelled(), if responder.is_some() => {
                if let Some(r) = responder.take() {
                    r.answer(&shared, Err(SandboxError::Cancelled));
                }
                return;
            }
        }
    }
    if let Some(r) = responder.take() {
        // Every lane has answered and no two agreed.
        let answer = no_quorum(&lanes, &ballot);
        r.answer(&shared, answer);
    }
    let (result, dissent) = ballot.tally(eq);
    let vote_index = match result {
        VoteResult::Unanimous => 0,
        VoteResult::Majority => 1,
        VoteResult::NoQuorum => 2,
    };
    sb.telemetry.votes[vote_index].increment(1);
    for lane in dissent {
        sb.telemetry.dissent[lane.index()].increment(1);
        tracing::warn!(kind = %lanes.kind, lane = %lane, agreed = ?agreed_at_decision, "sandbox lane dissented");
    }
}

fn no_quorum(lanes: &KindLanes, ballot: &Ballot) -> Result<Verdict, SandboxError> {
    let results = ballot.results();
    if let Some(pick) = lanes.fallback.as_ref().and_then(|f| f(&results)) {
        return Ok(Verdict {
            output: pick,
            agreed: Vec::new(),
            fallback: true,
        });
    }
    Err(SandboxError::NoQuorum { results })
}
