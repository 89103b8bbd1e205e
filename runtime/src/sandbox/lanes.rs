//! The host side of the sandbox: lane executors, dispatch and the unifier.
//!
//! Each sandbox kind has one bounded job channel per lane. Thread lanes consume it from three
//! dedicated threads (one per lane, each with its own current-thread Tokio executor); process
//! lanes from worker-slot tasks that each own a child process. The unifier for a task runs on
//! the main runtime, so a lane that wedges its thread cannot stop the vote.
//!
//! [`Sandbox`] owns all of it and answers sandboxed tasks itself: it releases their admission
//! slot and ends them through the ledger. How an agent instance runs jobs on a thread lane is
//! not known here: the runtime hands in one [`LaneSpawnFn`] per kind.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::jobs::{Job, JobState, KindLanes, LaneJobs, LaneSpawnFn};
use super::model::{
    Comparator, Lane, LaneMode, LaneResult, LaneStats, Policies, SandboxConfig, SandboxError,
    SandboxStats, Verdict,
};
use super::process::Census;
use super::vote::{Ballot, Decision, VoteResult};
use crate::admission::Admission;
use crate::ids::{AgentId, TaskId};
use crate::ledger::Ledger;
use crate::priority::Priority;
use crate::task::{Outcome, OutcomeKind, QueuedTask, Target, TaskError};
use crate::telemetry::StripedCounter;

/// Counters of the sandbox, resolved once.
#[derive(Default)]
struct SandboxTelemetry {
    executions: [[StripedCounter; 7]; 3],
    votes: [StripedCounter; 3],
    dissent: [StripedCounter; 3],
}

/// Liveness of one lane's thread.
struct LaneThread {
    /// Milliseconds since `Sandbox::epoch` at the last tick of the lane's executor.
    heartbeat: AtomicU64,
    generation: Arc<AtomicU64>,
    handles: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Set while the lane has `sandbox.max_stuck_threads` threads blocked and no live one.
    out: AtomicBool,
}

/// The tri-sandbox: lanes, their executors, and the counters of its votes.
pub(crate) struct Sandbox {
    config: SandboxConfig,
    kinds: HashMap<String, Arc<KindLanes>>,
    threads: [LaneThread; 3],
    epoch: Instant,
    telemetry: SandboxTelemetry,
    cancel: CancellationToken,
    /// Worker processes alive now.
    census: Arc<Census>,
    slots: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    started: AtomicBool,
    admission: Arc<Admission>,
    ledger: Arc<Ledger>,
    /// How an agent instance of each kind runs on a thread lane.
    lane_spawners: HashMap<String, LaneSpawnFn>,
    /// Parameters per kind, from the config's agent groups.
    params: HashMap<String, Arc<toml::Table>>,
    /// The Tokio runtime the pool runs on: unifiers are spawned there, whatever thread
    /// dispatches.
    rt: tokio::runtime::Handle,
}

const TICK: Duration = Duration::from_millis(10);

impl Sandbox {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: SandboxConfig,
        policies: &Policies,
        admission: Arc<Admission>,
        ledger: Arc<Ledger>,
        lane_spawners: HashMap<String, LaneSpawnFn>,
        params: HashMap<String, Arc<toml::Table>>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        let kinds = config
            .kinds
            .iter()
            .map(|k| {
                let policy = policies.get(&k.kind).cloned().unwrap_or_default();
                (k.kind.clone(), Arc::new(KindLanes::new(k, policy)))
            })
            .collect();
        Sandbox {
            config,
            kinds,
            threads: std::array::from_fn(|_| LaneThread {
                heartbeat: AtomicU64::new(0),
                generation: Arc::new(AtomicU64::new(0)),
                handles: Mutex::new(Vec::new()),
                out: AtomicBool::new(false),
            }),
            epoch: Instant::now(),
            telemetry: SandboxTelemetry::default(),
            cancel: CancellationToken::new(),
            census: Arc::default(),
            slots: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            admission,
            ledger,
            lane_spawners,
            params,
            rt,
        }
    }

    /// The lanes of `target`'s kind, if it is a sandbox kind.
    pub(crate) fn lanes_for(&self, target: &Target) -> Option<Arc<KindLanes>> {
        match target {
            Target::Capability(c) => self.kinds.get(&**c).cloned(),
            Target::Agent(_) => None,
        }
    }

    /// How long each lane may take on a task with this per-attempt timeout and deadline.
    pub(crate) fn lane_timeout(
        &self,
        attempt_timeout: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Duration {
        let mut t = attempt_timeout.unwrap_or(self.config.lane_timeout);
        if let Some(d) = deadline {
            t = t.min(d.saturating_duration_since(Instant::now()));
        }
        t.max(Duration::from_millis(1))
    }

    /// How an instance of `kind` runs on a lane (the worker process side uses it too).
    pub(crate) fn lane_spawner(&self, kind: &str) -> Option<&LaneSpawnFn> {
        self.lane_spawners.get(kind)
    }

    /// Kinds that can run on lanes, sorted.
    pub(crate) fn lane_kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.lane_spawners.keys().cloned().collect();
        kinds.sort();
        kinds
    }

    /// Parameters of `kind`'s agents.
    pub(crate) fn params_of(&self, kind: &str) -> Arc<toml::Table> {
        self.params.get(kind).cloned().unwrap_or_default()
    }

    /// Pids of the worker processes alive now, sorted.
    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.census.pids()
    }

    /// Executions of `lane` by result label index.
    pub(crate) fn executions(&self, lane: Lane, label: usize) -> u64 {
        self.telemetry.executions[lane.index()][label].get()
    }

    /// Votes by result (unanimous, majority, no quorum).
    pub(crate) fn votes(&self, result: usize) -> u64 {
        self.telemetry.votes[result].get()
    }

    /// Totals since start.
    pub(crate) fn stats(&self) -> SandboxStats {
        let t = &self.telemetry;
        let available = self.lanes_available();
        SandboxStats {
            lanes: Lane::ALL
                .iter()
                .map(|&lane| {
                    let i = lane.index();
                    LaneStats {
                        lane,
                        executions: LaneResult::LABELS
                            .iter()
                            .enumerate()
                            .map(|(k, &label)| (label, t.executions[i][k].get()))
                            .collect(),
                        dissent: t.dissent[i].get(),
                        available: available[i].0,
                        total: available[i].1,
                    }
                })
                .collect(),
            unanimous: t.votes[0].get(),
            majority: t.votes[1].get(),
            no_quorum: t.votes[2].get(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn has_thread_kinds(&self) -> bool {
        self.kinds.values().any(|k| k.mode == LaneMode::Threads)
    }

    /// Starts lane threads and process worker slots.
    pub(crate) fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let sb = self;
        if sb.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if sb.has_thread_kinds() {
            for lane in Lane::ALL {
                spawn_lane_thread(self.clone(), lane)?;
            }
        }
        let mut slots = lock(&sb.slots);
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
                        self.census.clone(),
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
                threads_up + self.census.live(Lane::ALL[i]),
                thread_total + process_total,
            )
        })
    }

    /// Replaces lane `lane`'s thread if its executor has not ticked for `stale`.
    fn replace_if_stuck(self: &Arc<Self>, lane: Lane, stale: Duration) {
        let sb = self;
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
        // Threads left blocked in handlers cost a thread each, forever if the handler never
        // returns: past the cap, stop replacing and take the lane out instead.
        let stuck = {
            let mut handles = lock(&t.handles);
            handles.retain(|h| !h.is_finished());
            handles.len()
        };
        if stuck >= self.config.max_stuck_threads {
            if !t.out.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    lane = %lane,
                    stuck,
                    "sandbox lane has {stuck} threads stuck in handlers (sandbox.max_stuck_threads); \
                     the lane is unavailable until one comes back"
                );
            }
            return;
        }
        t.out.store(false, Ordering::Release);
        tracing::error!(lane = %lane, stalled_ms = age, "sandbox lane thread is stuck; starting a replacement");
        t.generation.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = spawn_lane_thread(self.clone(), lane) {
            tracing::error!(lane = %lane, error = %e, "could not start a replacement lane thread");
        }
    }

    /// Why lanes are down, for health: a thread lane out of threads (and not back yet).
    pub(crate) fn failures(&self) -> Vec<String> {
        let now = self.now_ms();
        Lane::ALL
            .iter()
            .filter(|l| {
                let t = &self.threads[l.index()];
                t.out.load(Ordering::Acquire)
                    && now.saturating_sub(t.heartbeat.load(Ordering::Acquire))
                        >= 10 * TICK.as_millis() as u64
            })
            .map(|l| {
                format!(
                    "sandbox lane {l} is unavailable: {} of its threads are stuck in handlers \
                     (sandbox.max_stuck_threads)",
                    self.config.max_stuck_threads
                )
            })
            .collect()
    }

    /// True if `lane` takes no jobs (out of threads); checked at dispatch. A lane whose live
    /// thread ticks again (its handler came back) is back in.
    fn lane_out(&self, lane: Lane, lanes: &KindLanes) -> bool {
        let t = &self.threads[lane.index()];
        if lanes.mode != LaneMode::Threads || !t.out.load(Ordering::Acquire) {
            return false;
        }
        let age = self
            .now_ms()
            .saturating_sub(t.heartbeat.load(Ordering::Acquire));
        if age < 10 * TICK.as_millis() as u64 {
            t.out.store(false, Ordering::Release);
            tracing::info!(lane = %lane, "sandbox lane thread is back; the lane takes jobs again");
            return false;
        }
        true
    }

    /// Cancels pending votes (shutdown's cancel phase): each answers `cancelled`.
    pub(crate) fn cancel_pending(&self) {
        self.cancel.cancel();
    }

    /// Stops the lanes: cancels pending votes, closes job channels, ends workers and threads.
    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        for k in self.kinds.values() {
            for s in &k.senders {
                s.close();
            }
        }
        let slots: Vec<_> = std::mem::take(&mut *lock(&self.slots));
        for slot in slots {
            let _ = tokio::time::timeout(Duration::from_secs(5), slot).await;
        }
        for t in &self.threads {
            let handles: Vec<_> = std::mem::take(&mut *lock(&t.handles));
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_lane_thread(sb: Arc<Sandbox>, lane: Lane) -> std::io::Result<()> {
    let t = &sb.threads[lane.index()];
    let generation = t.generation.clone();
    let my_generation = generation.load(Ordering::Acquire);
    t.heartbeat.store(sb.now_ms(), Ordering::Release);
    let sb2 = sb.clone();
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
            rt.block_on(run_lane(sb2, lane, generation, my_generation));
        })?;
    lock(&t.handles).push(handle);
    Ok(())
}

async fn run_lane(sb: Arc<Sandbox>, lane: Lane, generation: Arc<AtomicU64>, my_generation: u64) {
    let mut workers = tokio::task::JoinSet::new();
    let mut next_id = 0u32;
    for k in sb.kinds.values().filter(|k| k.mode == LaneMode::Threads) {
        let Some(spawn) = sb.lane_spawners.get(&*k.kind) else {
            continue;
        };
        let params = sb.params_of(&k.kind);
        for _ in 0..k.instances {
            // Lane instances are not pool members: their ids count down from the top.
            next_id += 1;
            let id = AgentId(u32::MAX - (lane.index() as u32) * 65_536 - next_id);
            workers.spawn(spawn(LaneJobs::new(
                k.kind.clone(),
                lane,
                id,
                params.clone(),
                k.receivers[lane.index()].clone(),
                generation.clone(),
                my_generation,
            )));
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
    /// Boxed: a queued task is several times the size of the other variant, and a sandboxed
    /// task already allocates per lane.
    Task(Box<QueuedTask>),
    /// `run_sandboxed`: answers with a `Verdict` or a `SandboxError`.
    Direct {
        id: TaskId,
        priority: Priority,
        submitted_at: Instant,
        key: Option<u64>,
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

    fn key(&self) -> Option<u64> {
        match self {
            Responder::Task(t) => t.key,
            Responder::Direct { key, .. } => *key,
        }
    }

    fn answer(self, sb: &Sandbox, answer: Result<Verdict, SandboxError>) {
        sb.admission.release(self.priority());
        match self {
            Responder::Task(task) => {
                let outcome = match answer {
                    Ok(v) => Outcome::Ok(v.output),
                    Err(SandboxError::Cancelled) => Outcome::Cancelled,
                    Err(e) => Outcome::Error(TaskError::new(e.to_string())),
                };
                sb.ledger.finish(*task, outcome);
            }
            Responder::Direct {
                id,
                priority,
                submitted_at,
                key,
                reply,
            } => {
                // Counted like a task, so the outcome counters and latency cover every run.
                let kind = match &answer {
                    Ok(_) => OutcomeKind::Ok,
                    Err(SandboxError::Cancelled) => OutcomeKind::Cancelled,
                    Err(_) => OutcomeKind::Error,
                };
                sb.ledger
                    .finish_direct(id, priority, kind, submitted_at, key);
                let _ = reply.send(answer);
            }
        }
    }
}

impl Sandbox {
    /// Sends the job to all three lanes and runs the vote. The admission slot of the task is held
    /// until the answer, so in-flight sandboxed work stays within the queue bounds.
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        lanes: Arc<KindLanes>,
        id: TaskId,
        payload: Bytes,
        timeout: Duration,
        responder: Responder,
    ) {
        let priority = responder.priority();
        let key = responder.key();
        let mut receivers: [Option<oneshot::Receiver<LaneResult>>; 3] = [None, None, None];
        let mut immediate: Vec<(Lane, LaneResult)> = Vec::new();
        let mut states: [Option<Arc<JobState>>; 3] = [None, None, None];
        for lane in Lane::ALL {
            let sender = &lanes.senders[lane.index()];
            if self.lane_out(lane, &lanes) {
                immediate.push((
                    lane,
                    LaneResult::Unavailable("lane is out of threads".into()),
                ));
                continue;
            }
            if sender.len() >= self.config.lane_queue {
                immediate.push((
                    lane,
                    LaneResult::Unavailable("lane job queue is full".into()),
                ));
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let state = Arc::new(JobState::default());
            let job = Job {
                task: id,
                priority,
                payload: payload.clone(),
                key,
                timeout,
                reply: tx,
                state: state.clone(),
            };
            match sender.try_send(job) {
                Ok(()) => {
                    receivers[lane.index()] = Some(rx);
                    states[lane.index()] = Some(state);
                }
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
        let sb = self.clone();
        self.rt.spawn(async move {
            unify(sb, lanes, receivers, states, immediate, timeout, responder).await;
        });
    }
}

async fn unify(
    sb: Arc<Sandbox>,
    lanes: Arc<KindLanes>,
    mut receivers: [Option<oneshot::Receiver<LaneResult>>; 3],
    states: [Option<Arc<JobState>>; 3],
    immediate: Vec<(Lane, LaneResult)>,
    timeout: Duration,
    responder: Responder,
) {
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
                    r.answer(&sb, answer);
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
    let mut marked = false;
    while !ballot.complete() {
        if responder.is_none() && !marked {
            // Decided: a lane still holding its job in a backlog may skip it.
            for s in states.iter().flatten() {
                s.decide();
            }
            marked = true;
        }
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
                    sb.replace_if_stuck(lane, timeout);
                    settle(&mut ballot, lane, LaneResult::Timeout, &mut responder);
                }
                let _ = ballot.time_out_missing();
            }
            _ = sb.cancel.cancelled(), if responder.is_some() => {
                if let Some(r) = responder.take() {
                    r.answer(&sb, Err(SandboxError::Cancelled));
                }
                return;
            }
        }
    }
    if let Some(r) = responder.take() {
        // Every lane has answered and no two agreed.
        let answer = no_quorum(&lanes, &ballot);
        r.answer(&sb, answer);
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
