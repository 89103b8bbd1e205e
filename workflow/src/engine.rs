//! The engine: runs executions of registered workflows on a Troupe pool, through its public
//! API only.
//!
//! Each execution is one Tokio task that submits a step's task as soon as the steps it comes
//! after have ended (independent steps run in parallel), passes outputs on, applies the
//! conditions, and keeps the decision tree for a step: its retries on its own target, then its
//! fallback once, then `escalated`. A step's deadline spans all of that; at `warn_at` of it the
//! engine sends `warned`, past it `escalated`. Everything that happens is an event, written to
//! the history and broadcast to subscribers (the node streams them as Server-Sent Events).
//!
//! Queue time, handler time and the agent of each attempt come from the runtime's task events:
//! [`StepTimings`] is the [`TaskObserver`] to register on the runtime's builder, and it only
//! looks at tasks carrying the engine's key tag, so other work costs it one branch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::task::JoinSet;
use troupe::{Outcome, RuntimeHandle, Task, TaskEvent, TaskEventKind, TaskObserver};

use crate::definition::{Input, Source, Step, StepResult, Workflow, source};
use crate::error::WorkflowError;
use crate::metrics::WorkflowMetrics;
use crate::store::{self, Event, ExecutionRecord, Filter, Op, Page, StepRecord, Store};

/// Keys of the engine's tasks carry this bit, so [`StepTimings`] can skip every other task.
const KEY_TAG: u64 = 1 << 63;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The engine's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// The SQLite file of the history (created if missing).
    pub history: std::path::PathBuf,
    /// Ended executions older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention_age: Duration,
    /// At most this many executions are kept (the oldest ended ones go first).
    pub retention_count: u64,
    /// Where `escalated` events are POSTed as JSON, for workflows that name no URL of their own.
    pub escalation_webhook: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            history: "troupe-workflows.sqlite".into(),
            retention_age: Duration::from_secs(7 * 24 * 3600),
            retention_count: 100_000,
            escalation_webhook: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    accepted: Option<Instant>,
    started: Option<Instant>,
    agent: Option<u32>,
    finished: Option<Instant>,
}

/// The task observer that gives steps their queue time, handler time and agent. Register a
/// clone with `RuntimeBuilder::observe` and hand one to [`Engine::open`].
#[derive(Clone, Default)]
pub struct StepTimings {
    inner: Arc<TimingsInner>,
}

#[derive(Default)]
struct TimingsInner {
    by_key: DashMap<u64, Timing>,
    started: std::sync::OnceLock<mpsc::UnboundedSender<(u64, u32)>>,
}

impl StepTimings {
    /// A new, empty one.
    pub fn new() -> Self {
        Self::default()
    }

    fn take(&self, key: u64) -> Timing {
        self.inner
            .by_key
            .remove(&key)
            .map(|(_, t)| t)
            .unwrap_or_default()
    }
}

impl TaskObserver for StepTimings {
    fn on_event(&self, e: &TaskEvent) {
        let Some(key) = e.key.filter(|k| k & KEY_TAG != 0) else {
            return;
        };
        if let TaskEventKind::Accepted = e.kind {
            self.inner.by_key.entry(key).or_default().accepted = Some(e.at);
            return;
        }
        // Only an accepted task has an entry: one the engine stopped waiting for (its step
        // past its deadline, its execution cancelled) must not grow the map again.
        let Some(mut t) = self.inner.by_key.get_mut(&key) else {
            return;
        };
        match e.kind {
            TaskEventKind::Accepted => {}
            TaskEventKind::Started { agent, .. } => {
                t.started = Some(e.at);
                t.agent = Some(agent.0);
                if let Some(tx) = self.inner.started.get() {
                    let _ = tx.send((key, agent.0));
                }
            }
            TaskEventKind::Finished { .. } => t.finished = Some(e.at),
        }
    }
}

/// How a step ended, in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Succeeded(String),
    Failed(String),
    Skipped(String),
}

struct Execution {
    id: u64,
    workflow: Arc<Workflow>,
    input: String,
    /// Unix ms it first started (kept across a resume).
    started_ms: u64,
    cancel: Notify,
    cancelled: std::sync::atomic::AtomicBool,
    seq: AtomicU64,
    /// The clock events' `elapsed_ms` counts from (start, or resume).
    epoch: tokio::time::Instant,
    done: tokio::sync::watch::Sender<Option<ExecutionRecord>>,
    metrics: Option<Arc<WorkflowMetrics>>,
}

/// A step's task in flight: its `step_started` is sent once, by whichever comes first of the
/// runtime's event and the task's end (a fast task may end before the event is handled). The
/// lock is held while sending, so `step_started` always precedes the step's later events.
struct InFlight {
    execution: u64,
    step: String,
    started_sent: std::sync::Mutex<bool>,
}

impl InFlight {
    fn send_started(&self, engine: &Engine, exec: &Execution, agent: u32) {
        let mut sent = self.started_sent.lock().unwrap_or_else(|p| p.into_inner());
        if !*sent {
            *sent = true;
            engine.emit(
                exec,
                "step_started",
                Some(&self.step),
                Some(format!("agent {agent}")),
            );
        }
    }
}

/// Forgets a step task's key when its attempt ends, or is dropped: an attempt cut off by the
/// step's deadline or the execution's end never reaches the line after its `await`.
struct KeyGuard<'a> {
    engine: &'a Engine,
    key: u64,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.engine.keys.remove(&self.key);
        self.engine.timings.inner.by_key.remove(&self.key);
    }
}

/// The workflow engine. See the module docs.
pub struct Engine {
    runtime: RuntimeHandle,
    store: Store,
    config: EngineConfig,
    workflows: DashMap<String, Arc<Workflow>>,
    known: HashSet<String>,
    running: DashMap<u64, Arc<Execution>>,
    /// Step tasks in flight, by key, for their `step_started` event.
    keys: DashMap<u64, Arc<InFlight>>,
    next_id: AtomicU64,
    next_key: AtomicU64,
    events: broadcast::Sender<Event>,
    timings: StepTimings,
    exporter: std::sync::OnceLock<Arc<troupe::MetricsExporter>>,
    metrics: DashMap<String, Arc<WorkflowMetrics>>,
    webhooks: crate::webhook::Webhooks,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("history", &self.store.path)
            .field("running", &self.running.len())
            .finish()
    }
}

/// One execution with its steps and progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionView {
    /// The execution.
    #[serde(flatten)]
    pub execution: ExecutionRecord,
    /// Its steps, in definition order.
    pub steps: Vec<StepRecord>,
    /// Steps ended (succeeded, failed or skipped) out of all.
    pub progress: Progress,
}

/// How far an execution is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps ended.
    pub done: usize,
    /// Steps in the workflow.
    pub total: usize,
    /// When it should end at the rate its steps have ended so far (Unix ms), while running.
    pub expected_end_ms: Option<u64>,
}

impl Engine {
    /// Opens the history, resumes every execution it holds as running (steps that were running
    /// when the process stopped are run again), and enforces retention.
    pub async fn open(
        runtime: RuntimeHandle,
        timings: StepTimings,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, WorkflowError> {
        if let Some(url) = &config.escalation_webhook {
            crate::webhook::check_url(url).map_err(|reason| WorkflowError::Config {
                field: "escalation_webhook",
                reason,
            })?;
        }
        let webhooks =
            crate::webhook::Webhooks::start().map_err(|reason| WorkflowError::Config {
                field: "escalation_webhook",
                reason,
            })?;
        let path = config.history.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&path))
            .await
            .map_err(|e| WorkflowError::Store(e.to_string()))??;
        let max_id = store.read(store::max_id).await?;
        let (events, _) = broadcast::channel(4096);
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let _ = timings.inner.started.set(started_tx);
        let engine = Arc::new(Engine {
            known: runtime.capabilities().into_iter().collect(),
            runtime,
            store,
            config,
            workflows: DashMap::new(),
            running: DashMap::new(),
            keys: DashMap::new(),
            next_id: AtomicU64::new(max_id + 1),
            next_key: AtomicU64::new(1),
            events,
            timings,
            exporter: std::sync::OnceLock::new(),
            metrics: DashMap::new(),
            webhooks,
        });
        engine.prune();
        let me = Arc::downgrade(&engine);
        tokio::spawn(step_started_events(me, started_rx));
        let me = Arc::downgrade(&engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.upgrade() {
                    Some(e) => e.prune(),
                    None => return,
                }
            }
        });
        Ok(engine)
    }

    /// Resumes the executions the history holds as running. Register their workflows first
    /// (a resumed execution runs the definition it started with, stored in the history).
    pub async fn resume(self: &Arc<Self>) -> Result<Vec<u64>, WorkflowError> {
        let ids = self.store.read(store::running).await?;
        for &id in &ids {
            if self.running.contains_key(&id) {
                continue;
            }
            let (record, definition, steps, seq) = self
                .store
                .read(move |c| {
                    let (r, d) =
                        store::get_execution(c, id)?.ok_or(WorkflowError::UnknownExecution(id))?;
                    Ok((r, d, store::get_steps(c, id)?, store::max_seq(c, id)?))
                })
                .await?;
            let workflow: Workflow = serde_json::from_str(&definition)
                .map_err(|e| WorkflowError::Store(format!("execution {id}: {e}")))?;
            let exec = self.execution(
                id,
                Arc::new(workflow),
                record.input.clone(),
                record.started_ms,
                seq,
            );
            let mut state: HashMap<String, StepRecord> =
                steps.into_iter().map(|s| (s.name.clone(), s)).collect();
            for s in state.values_mut() {
                if s.status == "running" {
                    s.status = "pending".into();
                }
            }
            self.emit(&exec, "resumed", None, None);
            self.spawn(exec, state);
        }
        Ok(ids)
    }

    /// Exports the workflow metrics (troupe_workflow_*) with `exporter`, for every workflow
    /// registered so far and from now on. Once; later calls are ignored.
    pub fn export_to(&self, exporter: Arc<troupe::MetricsExporter>) {
        self.webhooks.export_to(&exporter);
        if self.exporter.set(exporter).is_ok() {
            for w in self.workflows.iter() {
                self.metrics_for(w.key());
            }
        }
    }

    fn metrics_for(&self, workflow: &str) -> Option<Arc<WorkflowMetrics>> {
        let e = self.exporter.get()?;
        Some(
            self.metrics
                .entry(workflow.to_owned())
                .or_insert_with(|| Arc::new(WorkflowMetrics::new(e, workflow)))
                .clone(),
        )
    }

    /// Registers (or replaces) a workflow after checking it against the pool. An engine holds
    /// at most [`MAX_WORKFLOWS`](crate::MAX_WORKFLOWS) (the bound on the metrics' label).
    pub fn register(&self, workflow: Workflow) -> Result<(), WorkflowError> {
        workflow.check(&self.known)?;
        if !self.workflows.contains_key(&workflow.name)
            && self.workflows.len() >= crate::metrics::MAX_WORKFLOWS
        {
            return Err(WorkflowError::Definition {
                workflow: workflow.name.clone(),
                at: "name".into(),
                reason: format!(
                    "this engine holds {} workflows already, the most it registers",
                    crate::metrics::MAX_WORKFLOWS
                ),
            });
        }
        self.metrics_for(&workflow.name);
        self.workflows
            .insert(workflow.name.clone(), Arc::new(workflow));
        Ok(())
    }

    /// The registered workflows, by name.
    pub fn workflows(&self) -> Vec<Arc<Workflow>> {
        let mut all: Vec<_> = self.workflows.iter().map(|w| w.value().clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Starts an execution of `workflow` with `input`; returns its id once the history has it
    /// (so it survives the process), without waiting for any step.
    pub async fn start(
        self: &Arc<Self>,
        workflow: &str,
        input: &str,
    ) -> Result<u64, WorkflowError> {
        let w = self
            .workflows
            .get(workflow)
            .map(|w| w.value().clone())
            .ok_or_else(|| WorkflowError::UnknownWorkflow(workflow.to_owned()))?;
        let id = self.next_id.fetch_add(1, Ordering::AcqRel);
        let started_ms = now_ms();
        let record = ExecutionRecord {
            id,
            workflow: w.name.clone(),
            status: "running".into(),
            input: input.to_owned(),
            started_ms,
            ended_ms: None,
            failed_step: None,
            error: None,
        };
        let definition =
            serde_json::to_string(&*w).map_err(|e| WorkflowError::Store(e.to_string()))?;
        let (done, committed) = tokio::sync::oneshot::channel();
        self.store.send(Op::Start {
            record,
            definition,
            steps: w.steps.iter().map(|s| s.name.clone()).collect(),
            done,
        });
        committed
            .await
            .map_err(|_| WorkflowError::Store("the history writer stopped".into()))??;
        let exec = self.execution(id, w.clone(), input.to_owned(), started_ms, 0);
        self.emit(&exec, "started", None, None);
        let state = w
            .steps
            .iter()
            .map(|s| (s.name.clone(), StepRecord::pending(&s.name)))
            .collect();
        self.spawn(exec, state);
        Ok(id)
    }

    /// Cancels a running execution: no new step starts, it ends `cancelled`.
    pub fn cancel(&self, id: u64) -> Result<(), WorkflowError> {
        let exec = self
            .running
            .get(&id)
            .map(|e| e.value().clone())
            .ok_or(WorkflowError::Ended(id))?;
        exec.cancelled.store(true, Ordering::Release);
        exec.cancel.notify_one();
        Ok(())
    }

    /// Waits until execution `id` ends (or `limit` passes); its record, without its steps. While
    /// the execution runs here this reads nothing from the store: the cheap wait, for callers
    /// that need only how it ended (the load tester, `?wait=true`).
    pub async fn finished(
        &self,
        id: u64,
        limit: Duration,
    ) -> Result<ExecutionRecord, WorkflowError> {
        if let Some(r) = self.until_done(id, limit).await {
            return Ok(r);
        }
        // Ended before we looked, or still running at the limit: the stored record says which.
        self.store
            .read(move |c| {
                store::get_execution(c, id)?
                    .map(|(r, _)| r)
                    .ok_or(WorkflowError::UnknownExecution(id))
            })
            .await
    }

    /// Waits until execution `id` ends (or `limit` passes); its final record.
    pub async fn wait(&self, id: u64, limit: Duration) -> Result<ExecutionView, WorkflowError> {
        self.until_done(id, limit).await;
        self.get(id).await
    }

    /// Waits for execution `id` to end here, up to `limit`: its final record, or `None` when it
    /// was not running here (ended before, or another process's) or the limit came first.
    async fn until_done(&self, id: u64, limit: Duration) -> Option<ExecutionRecord> {
        let mut rx = self.running.get(&id).map(|e| e.done.subscribe())?;
        let done = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
        done.ok()?.ok()?.as_ref().cloned()
    }

    /// One execution with its steps and progress.
    pub async fn get(&self, id: u64) -> Result<ExecutionView, WorkflowError> {
        let (execution, definition, steps) = self
            .store
            .read(move |c| {
                let (r, d) =
                    store::get_execution(c, id)?.ok_or(WorkflowError::UnknownExecution(id))?;
                Ok((r, d, store::get_steps(c, id)?))
            })
            .await?;
        let total =
            serde_json::from_str::<Workflow>(&definition).map_or(steps.len(), |w| w.steps.len());
        let done = steps
            .iter()
            .filter(|s| matches!(s.status.as_str(), "succeeded" | "failed" | "skipped"))
            .count();
        let expected_end_ms = (execution.status == "running" && done > 0).then(|| {
            let elapsed = now_ms().saturating_sub(execution.started_ms);
            execution.started_ms + elapsed * total as u64 / done as u64
        });
        Ok(ExecutionView {
            execution,
            steps,
            progress: Progress {
                done,
                total,
                expected_end_ms,
            },
        })
    }

    /// Executions by workflow, status and start time, newest first, a page at a time.
    pub async fn list(&self, filter: Filter) -> Result<Page, WorkflowError> {
        self.store.read(move |c| store::list(c, &filter)).await
    }

    /// Every event of an execution so far, in order.
    pub async fn events(&self, id: u64) -> Result<Vec<Event>, WorkflowError> {
        self.store.flush().await;
        self.store.read(move |c| store::get_events(c, id)).await
    }

    /// Live events of every execution from now on (a slow receiver misses the oldest and is
    /// told how many; read the rest with [`Engine::events`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Waits until everything so far is in the history file.
    pub async fn flush(&self) {
        self.store.flush().await;
    }

    fn prune(&self) {
        self.store.send(Op::Prune {
            max_age: self.config.retention_age,
            max_count: self.config.retention_count,
            now_ms: now_ms(),
        });
    }

    fn execution(
        &self,
        id: u64,
        workflow: Arc<Workflow>,
        input: String,
        started_ms: u64,
        seq: u64,
    ) -> Arc<Execution> {
        let (done, _) = tokio::sync::watch::channel(None);
        let metrics = self.metrics_for(&workflow.name);
        if let Some(m) = &metrics {
            m.started.increment(1);
            m.running.increment(1.0);
        }
        let exec = Arc::new(Execution {
            id,
            workflow,
            input,
            started_ms,
            cancel: Notify::new(),
            cancelled: false.into(),
            seq: AtomicU64::new(seq),
            epoch: tokio::time::Instant::now(),
            done,
            metrics,
        });
        self.running.insert(id, exec.clone());
        exec
    }

    fn emit(&self, exec: &Execution, kind: &str, step: Option<&str>, detail: Option<String>) {
        let e = self.record(exec, kind, step, detail);
        let _ = self.events.send(e);
    }

    /// Numbers, counts and stores an event (and posts an escalation), without streaming it.
    fn record(
        &self,
        exec: &Execution,
        kind: &str,
        step: Option<&str>,
        detail: Option<String>,
    ) -> Event {
        if let Some(m) = &exec.metrics {
            match kind {
                "warned" => m.warnings.increment(1),
                "escalated" => m.escalations.increment(1),
                "step_skipped" => m.step("skipped"),
                _ => {}
            }
        }
        let e = Event {
            execution: exec.id,
            seq: exec.seq.fetch_add(1, Ordering::AcqRel) + 1,
            at_ms: now_ms(),
            elapsed_ms: u64::try_from(exec.epoch.elapsed().as_millis()).unwrap_or(u64::MAX),
            kind: kind.to_owned(),
            step: step.map(str::to_owned),
            detail,
        };
        if kind == "escalated" {
            let url = exec
                .workflow
                .escalation_webhook
                .as_deref()
                .or(self.config.escalation_webhook.as_deref());
            if let Some(url) = url {
                let esc = crate::webhook::Escalation::of(&exec.workflow.name, &e);
                self.webhooks.send(Arc::from(url), esc);
            }
        }
        self.store.send(Op::Event(e.clone()));
        e
    }

    fn spawn(self: &Arc<Self>, exec: Arc<Execution>, state: HashMap<String, StepRecord>) {
        let me = self.clone();
        tokio::spawn(async move {
            let record = me.drive(&exec, state).await;
            if let Some(m) = &exec.metrics {
                m.running.decrement(1.0);
                m.finished(&record.status);
                m.execution_duration.record(exec.epoch.elapsed());
            }
            // `finished` goes out only once the execution's record, its steps and the event
            // itself are committed: whoever reads the history on seeing it finds it ended.
            me.store.send(Op::End(record.clone()));
            let finished = me.record(
                &exec,
                "finished",
                None,
                Some(match &record.error {
                    Some(e) => format!("{}: {e}", record.status),
                    None => record.status.clone(),
                }),
            );
            me.store.flush().await;
            let _ = me.events.send(finished);
            me.running.remove(&exec.id);
            let _ = exec.done.send(Some(record));
        });
    }

    /// Runs an execution to its end.
    async fn drive(
        self: &Arc<Self>,
        exec: &Arc<Execution>,
        mut state: HashMap<String, StepRecord>,
    ) -> ExecutionRecord {
        let w = exec.workflow.clone();
        let mut ended: HashMap<String, Ended> = HashMap::new();
        for s in state.values() {
            match s.status.as_str() {
                "succeeded" => {
                    ended.insert(
                        s.name.clone(),
                        Ended::Succeeded(s.output.clone().unwrap_or_default()),
                    );
                }
                "failed" => {
                    ended.insert(
                        s.name.clone(),
                        Ended::Failed(s.error.clone().unwrap_or_default()),
                    );
                }
                "skipped" => {
                    ended.insert(
                        s.name.clone(),
                        Ended::Skipped(s.error.clone().unwrap_or_default()),
                    );
                }
                _ => {}
            }
        }
        let mut running: JoinSet<(String, StepRecord, Ended)> = JoinSet::new();
        let mut started: HashSet<String> = HashSet::new();
        let deadline = w
            .deadline
            .map(|d| (exec.epoch + d, exec.epoch + d.mul_f64(w.warn_at)));
        let mut warned = false;
        let mut outcome: Option<(&str, Option<String>, Option<String>)> = None;
        loop {
            // Submit every step whose predecessors have all ended.
            if outcome.is_none() {
                for step in &w.steps {
                    if ended.contains_key(&step.name) || started.contains(&step.name) {
                        continue;
                    }
                    if !step.after.iter().all(|d| ended.contains_key(d)) {
                        continue;
                    }
                    match self.decide(step, &ended, &exec.input) {
                        Err(why) => {
                            let rec = state
                                .entry(step.name.clone())
                                .or_insert_with(|| StepRecord::pending(&step.name));
                            rec.status = "skipped".into();
                            rec.error = Some(why.clone());
                            rec.ended_ms = Some(now_ms());
                            self.store.send(Op::Step(exec.id, rec.clone()));
                            self.emit(exec, "step_skipped", Some(&step.name), Some(why.clone()));
                            ended.insert(step.name.clone(), Ended::Skipped(why));
                        }
                        Ok(payload) => {
                            started.insert(step.name.clone());
                            let rec = state
                                .remove(&step.name)
                                .unwrap_or_else(|| StepRecord::pending(&step.name));
                            let me = self.clone();
                            let exec = exec.clone();
                            let step = step.clone();
                            running.spawn(async move {
                                let (rec, end) = me.run_step(&exec, &step, payload, rec).await;
                                (step.name.clone(), rec, end)
                            });
                        }
                    }
                }
                if running.is_empty() {
                    break;
                }
            } else if running.is_empty() {
                break;
            }
            let warn_at = deadline.filter(|_| !warned).map(|(_, w)| w);
            tokio::select! {
                joined = running.join_next() => {
                    let Some(joined) = joined else { continue };
                    match joined {
                        Ok((name, rec, end)) => {
                            state.insert(name.clone(), rec);
                            ended.insert(name, end);
                        }
                        Err(e) => {
                            tracing::error!(execution = exec.id, error = %e, "a step's task failed");
                        }
                    }
                }
                _ = exec.cancel.notified(), if outcome.is_none() => {
                    outcome = Some(("cancelled", None, Some("cancelled".into())));
                    running.abort_all();
                }
                _ = sleep_until_opt(warn_at), if warn_at.is_some() => {
                    warned = true;
                    self.emit(exec, "warned", None, Some(format!("{:.0} % of the workflow's deadline", w.warn_at * 100.0)));
                }
                _ = sleep_until_opt(deadline.map(|(d, _)| d)), if deadline.is_some() && outcome.is_none() => {
                    self.emit(exec, "escalated", None, Some("past the workflow's deadline".into()));
                    outcome = Some(("timed_out", None, Some("past the workflow's deadline".into())));
                    running.abort_all();
                }
            }
        }
        // Steps that never ended (aborted, or never started) are recorded as cancelled.
        if outcome.is_some() {
            for step in &w.steps {
                if !ended.contains_key(&step.name) {
                    let rec = state
                        .entry(step.name.clone())
                        .or_insert_with(|| StepRecord::pending(&step.name));
                    rec.status = "cancelled".into();
                    rec.ended_ms = Some(now_ms());
                    self.store.send(Op::Step(exec.id, rec.clone()));
                }
            }
        }
        let (status, failed_step, error) = outcome.unwrap_or_else(|| {
            // Failed, unless a step was there to handle the failure (`when.is = failed`).
            let handled = |name: &str| {
                w.steps.iter().any(|s| {
                    s.when
                        .as_ref()
                        .is_some_and(|c| c.step == name && c.is == Some(StepResult::Failed))
                })
            };
            let failed = w.steps.iter().find_map(|s| match ended.get(&s.name) {
                Some(Ended::Failed(e)) if !handled(&s.name) => Some((s.name.clone(), e.clone())),
                _ => None,
            });
            match failed {
                Some((step, e)) => ("failed", Some(step), Some(e)),
                None => ("succeeded", None, None),
            }
        });
        ExecutionRecord {
            id: exec.id,
            workflow: w.name.clone(),
            status: status.to_owned(),
            input: exec.input.clone(),
            started_ms: exec.started_ms,
            ended_ms: Some(now_ms()),
            failed_step,
            error,
        }
    }

    /// Whether `step` runs, and its payload; `Err` says why it is skipped.
    fn decide(
        &self,
        step: &Step,
        ended: &HashMap<String, Ended>,
        input: &str,
    ) -> Result<String, String> {
        match &step.when {
            None => {
                for d in &step.after {
                    match ended.get(d) {
                        Some(Ended::Succeeded(_)) => {}
                        _ => return Err(format!("`{d}` did not succeed")),
                    }
                }
            }
            Some(c) => {
                let e = ended.get(&c.step);
                let ok = match (c.is, &c.contains, e) {
                    (Some(StepResult::Succeeded), _, Some(Ended::Succeeded(_))) => true,
                    (Some(StepResult::Failed), _, Some(Ended::Failed(_))) => true,
                    (None, Some(text), Some(Ended::Succeeded(out))) => out.contains(text.as_str()),
                    _ => false,
                };
                if !ok {
                    return Err(format!("condition on `{}` not met", c.step));
                }
            }
        }
        let output = |name: &str| match ended.get(name) {
            Some(Ended::Succeeded(o)) => o.clone(),
            Some(Ended::Failed(e) | Ended::Skipped(e)) => e.clone(),
            None => String::new(),
        };
        // (key in a several-input object, value) of one reference.
        let resolve = |r: &str| match source(r) {
            Source::Input => ("input".to_owned(), input.to_owned()),
            Source::Step(s) => (s.to_owned(), output(s)),
            Source::Literal(t) => (t.to_owned(), t.to_owned()),
        };
        // Without `input`: the workflow's input, or what the steps it comes after produced.
        let defaulted: Vec<String>;
        let refs: &[String] = match &step.input {
            Some(Input::One(r)) => return Ok(resolve(r).1),
            Some(Input::Many(rs)) => rs,
            None if step.after.is_empty() => return Ok(input.to_owned()),
            None => {
                defaulted = step.after.iter().map(|d| format!("$steps.{d}")).collect();
                &defaulted
            }
        };
        Ok(match refs {
            [one] if step.input.is_none() => resolve(one).1,
            many => {
                let map: serde_json::Map<String, serde_json::Value> = many
                    .iter()
                    .map(|r| {
                        let (k, v) = resolve(r);
                        (k, serde_json::Value::String(v))
                    })
                    .collect();
                serde_json::Value::Object(map).to_string()
            }
        })
    }

    /// Runs one step: attempts on its target, then its fallback, under its deadline.
    async fn run_step(
        self: &Arc<Self>,
        exec: &Arc<Execution>,
        step: &Step,
        payload: String,
        mut rec: StepRecord,
    ) -> (StepRecord, Ended) {
        let began = tokio::time::Instant::now();
        let deadline = began + step.deadline();
        let warn = began + step.deadline().mul_f64(exec.workflow.warn_at);
        rec.status = "running".into();
        rec.started_ms.get_or_insert_with(now_ms);
        self.store.send(Op::Step(exec.id, rec.clone()));
        let mut targets: Vec<&str> = vec![step.target.as_str(); 1 + step.retries as usize];
        if let Some(f) = &step.fallback {
            targets.push(f);
        }
        let attempts = async {
            let mut last = String::from("no attempt");
            for (i, target) in targets.iter().enumerate() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err((last, true));
                }
                if i > 0 {
                    let kind =
                        if Some(*target) == step.fallback.as_deref() && i == targets.len() - 1 {
                            "step_fallback"
                        } else {
                            "step_retried"
                        };
                    self.emit(
                        exec,
                        kind,
                        Some(&step.name),
                        Some(format!("{target}: after {last}")),
                    );
                }
                let key = KEY_TAG | self.next_key.fetch_add(1, Ordering::AcqRel);
                let flight = Arc::new(InFlight {
                    execution: exec.id,
                    step: step.name.clone(),
                    started_sent: std::sync::Mutex::new(false),
                });
                self.keys.insert(key, flight.clone());
                let _forget = KeyGuard { engine: self, key };
                let mut task = Task::new(target.to_string(), payload.clone())
                    .priority(step.priority)
                    .timeout(left)
                    .key(key);
                if step.sandbox {
                    task = task.sandboxed();
                }
                self.emit(
                    exec,
                    "step_queued",
                    Some(&step.name),
                    Some((*target).to_owned()),
                );
                // Counted when submitted, so one cut off by the deadline counts too.
                rec.attempts += 1;
                rec.target = Some((*target).to_owned());
                let outcome = match self.runtime.submit(task, left).await {
                    Ok(h) => h.await,
                    Err(rejected) => {
                        Outcome::Error(troupe::TaskError::new(rejected.error.to_string()))
                    }
                };
                let t = self.timings.take(key);
                if let Some(agent) = t.agent {
                    flight.send_started(self, exec, agent);
                }
                rec.agent = t.agent;
                rec.queue_us = t.started.zip(t.accepted).map(|(s, a)| micros(s - a));
                rec.exec_us = t.finished.zip(t.started).map(|(f, s)| micros(f - s));
                match outcome {
                    Outcome::Ok(out) => return Ok(String::from_utf8_lossy(&out).into_owned()),
                    // Each attempt is given what is left of the step's deadline, so its
                    // timeout is the step's.
                    // The runtime cuts the attempt off on the std clock; the step's events
                    // are timed on Tokio's, so escalation waits for the step's own deadline
                    // (a few µs at most on a real clock) and lands where `warned` promised.
                    Outcome::Timeout => {
                        tokio::time::sleep_until(deadline).await;
                        return Err(("timeout".into(), true));
                    }
                    other => last = describe(&other),
                }
            }
            Err((last, false))
        };
        let result = {
            tokio::pin!(attempts);
            let mut warned = false;
            loop {
                tokio::select! {
                    r = &mut attempts => break r,
                    _ = tokio::time::sleep_until(warn), if !warned => {
                        warned = true;
                        self.emit(exec, "warned", Some(&step.name), Some(format!("{:.0} % of its deadline", exec.workflow.warn_at * 100.0)));
                    }
                    // The engine keeps the step's deadline itself rather than trusting the
                    // task's timeout alone: a task still queued behind others, or an agent
                    // that never yields, must not hold the step past it. The runtime ends the
                    // abandoned task at the same deadline.
                    _ = tokio::time::sleep_until(deadline) => {
                        break Err(("an attempt still running".to_owned(), true));
                    }
                }
            }
        };
        rec.ended_ms = Some(now_ms());
        let end = match result {
            Ok(out) => {
                rec.status = "succeeded".into();
                rec.output_bytes = Some(out.len() as u64);
                rec.output = Some(out.clone());
                rec.error = None;
                self.emit(
                    exec,
                    "step_finished",
                    Some(&step.name),
                    Some("succeeded".into()),
                );
                Ended::Succeeded(out)
            }
            Err((why, past_deadline)) => {
                let why = if past_deadline {
                    format!("past its deadline ({:?}) after {why}", step.deadline())
                } else {
                    format!("failed after {} attempts: {why}", rec.attempts)
                };
                self.emit(exec, "escalated", Some(&step.name), Some(why.clone()));
                rec.status = "failed".into();
                rec.error = Some(why.clone());
                self.emit(
                    exec,
                    "step_finished",
                    Some(&step.name),
                    Some(format!("failed: {why}")),
                );
                Ended::Failed(why)
            }
        };
        self.store.send(Op::Step(exec.id, rec.clone()));
        if let Some(m) = &exec.metrics {
            m.step(&rec.status);
            m.step_duration.record(began.elapsed());
        }
        (rec, end)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Ok(_) => "ok".into(),
        Outcome::Error(e) => format!("error: {e}"),
        Outcome::Timeout => "timeout".into(),
        Outcome::Panic(m) => format!("panic: {m}"),
        Outcome::Cancelled => "cancelled".into(),
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Turns the observer's "an agent picked it up" into `step_started` events.
async fn step_started_events(
    engine: std::sync::Weak<Engine>,
    mut rx: mpsc::UnboundedReceiver<(u64, u32)>,
) {
    while let Some((key, agent)) = rx.recv().await {
        let Some(e) = engine.upgrade() else { return };
        let Some(flight) = e.keys.get(&key).map(|k| k.value().clone()) else {
            continue;
        };
        if let Some(exec) = e.running.get(&flight.execution).map(|x| x.value().clone()) {
            flight.send_started(&e, &exec, agent);
        }
    }
}
