//! One node's membership of a cluster: it connects to NATS, makes sure the cluster's stream
//! and buckets exist, pulls the tasks its pool can run, records their outcomes, announces
//! itself, and offers submission and lookup to the node's API.
//!
//! ## How a task goes
//!
//! 1. [`Cluster::submit`] publishes it to `<cluster>.tasks.<priority>.<capability>` on the
//!    work-queue stream and returns once JetStream has it stored (its stream sequence is the
//!    task's id). An idempotency key becomes the message id, so a resubmission within
//!    `dedup_window` is the same task (same id, `duplicate: true`).
//! 2. Every node serving the capability pulls from the (priority, capability) consumer through
//!    [`troupe::RuntimeHandle::pump`], at most `pull_in_flight` at a time and only as its own
//!    queue has room: JetStream hands each task to one of them, and a full node simply stops
//!    asking. While a task runs, the node tells JetStream it is still at it every third of
//!    `ack_wait`.
//! 3. On the outcome, the node writes the outcome record (`create`, so the first outcome of a
//!    task is the one kept) and then acknowledges the message. A node that dies before that
//!    stops telling JetStream; after `ack_wait` the task goes to another node, with its delivery
//!    count. So execution is at least once, and the recorded outcome exactly one.
//! 4. A task delivered more than `max_attempts` times is not run again: it is recorded `error`
//!    with the reason. A task whose deadline (from acceptance) passed is recorded `timeout`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use troupe::{
    Outcome, OutcomeKind, Priority, Rejected, RetryPolicy, RuntimeHandle, SourcedTask, SubmitError,
    Task, TaskSource,
};

use crate::config::ClusterConfig;
use crate::error::ClusterError;
use crate::metrics::Metrics;
use crate::names::Names;
use crate::wire::{self, NodeRecord, OutcomeRecord, TaskEnvelope};

/// The part of `cluster.max_backlog` each priority may fill (critical first): past it, new
/// tasks of that priority are refused.
const BACKLOG_SHARE: [f64; Priority::COUNT] = [1.0, 0.9, 0.8, 0.7, 0.6];

/// The least a node may hold of one capability (below `pull_in_flight`), however few agents
/// serve it: a task's next pull costs a NATS round trip, so a capability with few fast agents
/// bounded at twice its agents would idle them waiting on the network.
const PULL_FLOOR: usize = 32;

/// A task to submit to the cluster.
#[derive(Debug, Clone)]
pub struct ClusterTask {
    /// The capability (or kind) that runs it.
    pub target: String,
    /// Its priority.
    pub priority: Priority,
    /// Its payload.
    pub payload: Bytes,
    /// Total time from acceptance to outcome (the runtime's default when `None`).
    pub timeout: Option<Duration>,
    /// Extra attempts after a failure, on the node that runs it.
    pub retries: u32,
    /// Run it in the tri-sandbox.
    pub sandboxed: bool,
    /// Submissions with the same key within `dedup_window` are one task.
    pub idempotency_key: Option<String>,
    /// A caller will [`Cluster::wait`] for it on this node: the node that records the outcome
    /// pushes it here, instead of this node polling for it.
    pub wait: bool,
}

impl ClusterTask {
    /// A normal-priority task for `target` (a kind or capability some node serves), with the
    /// runtime's default timeout counted from acceptance.
    pub fn new(target: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        ClusterTask {
            target: target.into(),
            priority: Priority::Normal,
            payload: payload.into(),
            timeout: None,
            retries: 0,
            sandboxed: false,
            idempotency_key: None,
            wait: false,
        }
    }

    /// Sets the priority.
    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = p;
        self
    }

    /// Sets the total time from acceptance to outcome.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Makes a resubmission with the same `key` within `dedup_window` the same task.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Says a caller will [`Cluster::wait`] for it on this node.
    pub fn waited(mut self) -> Self {
        self.wait = true;
        self
    }
}

/// A submission JetStream has stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The task's id in the cluster.
    pub id: u64,
    /// True if the idempotency key was seen before: this is the earlier task.
    pub duplicate: bool,
}

/// What the cluster knows of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskStatus {
    /// Its one recorded outcome.
    Done(OutcomeRecord),
    /// Accepted, without an outcome yet.
    Pending,
    /// Never accepted, or its outcome is past the retention.
    Unknown,
}

/// A node as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    /// `up`, or `gone` after three heartbeats of silence.
    pub state: &'static str,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
    /// What it announced.
    #[serde(flatten)]
    pub record: NodeRecord,
}

/// One node's part in a cluster. See the module docs.
pub struct Cluster {
    config: ClusterConfig,
    names: Names,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    outcomes: kv::Store,
    nodes: kv::Store,
    runtime: OnceLock<RuntimeHandle>,
    metrics: OnceLock<Metrics>,
    /// Messages this node holds (pulled, not yet acknowledged), kept alive by progress pings.
    held: DashMap<u64, Arc<jetstream::Message>>,
    /// `?wait` callers, by task id.
    waiters: DashMap<u64, Vec<oneshot::Sender<OutcomeRecord>>>,
    /// Outcomes pushed here before their waiter arrived (the task finished between its
    /// acceptance and the `wait` call), kept a few seconds.
    early: DashMap<u64, (Instant, OutcomeRecord)>,
    /// The stream's backlog per priority at the last heartbeat.
    backlog_seen: [AtomicU64; Priority::COUNT],
    /// Capabilities served by the live nodes, refreshed every heartbeat.
    served: Mutex<HashSet<String>>,
    /// When a submission last looked at the members for a capability it did not know.
    served_at: Mutex<Instant>,
    leaving: AtomicBool,
    /// The pumps pulling tasks (left to finish on leaving).
    pumps: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Heartbeats, keep-alive, listeners (stopped on leaving).
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.config.node)
            .field("cluster", &self.config.name)
            .finish_non_exhaustive()
    }
}

fn kv_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::JetStream(e.to_string())
}

impl Cluster {
    /// Connects to NATS (waiting up to `connect_timeout`) and makes sure the cluster's stream
    /// and buckets exist. The node joins with [`Cluster::join`] once its runtime runs; the
    /// bus bridge ([`Cluster::bridge`]) goes to the runtime builder before that.
    pub async fn connect(config: ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        config.validate()?;
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("troupe-{}", config.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(config.connect_timeout);
        if let Some(t) = &config.token {
            opts = opts.token(t.clone());
        }
        if let Some(c) = &config.credentials {
            opts = opts
                .credentials_file(c)
                .await
                .map_err(|e| ClusterError::Config {
                    field: "cluster.credentials".into(),
                    reason: e.to_string(),
                })?;
        }
        let urls = config.urls.join(",");
        let client = tokio::time::timeout(config.connect_timeout, opts.connect(urls.as_str()))
            .await
            .map_err(|_| {
                ClusterError::Unreachable(format!(
                    "no answer from {urls} within {:?} (`cluster.connect_timeout`)",
                    config.connect_timeout
                ))
            })?
            .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
        // `retry_on_initial_connect` returns before the first connection: wait for it.
        let started = Instant::now();
        while client.connection_state() != async_nats::connection::State::Connected {
            if started.elapsed() > config.connect_timeout {
                return Err(ClusterError::Unreachable(format!(
                    "could not connect to {urls} within {:?}",
                    config.connect_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let js = jetstream::new(client.clone());
        let names = Names::new(&config.name);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: names.task_stream(),
                subjects: vec![names.task_subjects()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: config.dedup_window,
                // Bounded like every queue of Troupe's: past it, submissions are refused.
                max_messages: config.max_backlog as i64,
                discard: stream::DiscardPolicy::New,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(ClusterError::js)?;
        let outcomes = js
            .create_or_update_key_value(kv::Config {
                bucket: names.outcomes(),
                history: 1,
                max_age: config.outcome_retention,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(ClusterError::js)?;
        let nodes = js
            .create_or_update_key_value(kv::Config {
                bucket: names.nodes(),
                history: 1,
                // Long enough to show a node as gone for a while, short enough to forget it.
                max_age: Duration::from_secs(600).max(config.heartbeat * 60),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(ClusterError::js)?;
        Ok(Arc::new(Cluster {
            config,
            names,
            client,
            js,
            stream,
            outcomes,
            nodes,
            runtime: OnceLock::new(),
            metrics: OnceLock::new(),
            held: DashMap::new(),
            waiters: DashMap::new(),
            early: DashMap::new(),
            backlog_seen: Default::default(),
            served: Mutex::new(HashSet::new()),
            // So the first miss looks at once.
            served_at: Mutex::new(
                Instant::now()
                    .checked_sub(Duration::from_secs(1))
                    .unwrap_or_else(Instant::now),
            ),
            leaving: AtomicBool::new(false),
            pumps: Mutex::new(Vec::new()),
            background: Mutex::new(Vec::new()),
        }))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// The config it joined with.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub(crate) fn runtime(&self) -> Option<&RuntimeHandle> {
        self.runtime.get()
    }

    pub(crate) fn metrics(&self) -> Option<&Metrics> {
        self.metrics.get()
    }

    /// True while the connection to NATS is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Why this node cannot take cluster work now (empty when it can).
    pub fn health_reasons(&self) -> Vec<String> {
        if self.connected() {
            Vec::new()
        } else {
            vec![format!(
                "NATS is unreachable ({}): new tasks are refused until it is back",
                self.config.urls.join(", ")
            )]
        }
    }

    /// Joins: starts pulling the tasks `runtime` can run, announcing this node, keeping held
    /// tasks alive, recording outcomes, and carrying the bus (with `exporter`, the cluster's
    /// metrics are rendered with the runtime's).
    pub async fn join(
        self: &Arc<Self>,
        runtime: RuntimeHandle,
        exporter: Option<&troupe::MetricsExporter>,
    ) -> Result<(), ClusterError> {
        if let Some(e) = exporter {
            let _ = self.metrics.set(Metrics::new(e));
        }
        let _ = self.runtime.set(runtime.clone());
        self.heartbeat_once().await;
        self.refresh_served().await;
        let mut pumps = Vec::new();
        for capability in runtime.capabilities() {
            // Enough for every agent of the capability to have its next task here, no more:
            // what this node cannot start soon stays in the stream for the others.
            let agents = runtime.agents_with(&capability).len();
            let gate = Gate::new(self.config.pull_in_flight.min((2 * agents).max(PULL_FLOOR)));
            for priority in Priority::ALL {
                let consumer = self.consumer(priority, &capability).await?;
                let source = JsSource::new(self.clone(), consumer, priority, gate.clone());
                let rt = runtime.clone();
                let max = self.config.pull_in_flight;
                let me = self.clone();
                pumps.push(tokio::spawn(async move {
                    while !me.leaving.load(Ordering::Acquire) {
                        rt.pump(&source, max, Duration::from_millis(100)).await;
                        if rt.health().reasons.iter().any(|r| r == "shutting down") {
                            break;
                        }
                    }
                }));
            }
        }
        *self.pumps.lock().unwrap_or_else(|p| p.into_inner()) = pumps;
        let mut background = Vec::new();
        let me = self.clone();
        background.push(tokio::spawn(async move { me.heartbeats().await }));
        let me = self.clone();
        background.push(tokio::spawn(async move { me.keep_alive().await }));
        background.push(self.listen_done().await?);
        background.extend(crate::bus::listen(self.clone()).await?);
        *self.background.lock().unwrap_or_else(|p| p.into_inner()) = background;
        Ok(())
    }

    /// The durable consumer of (`priority`, `capability`), shared by every node serving it.
    async fn consumer(
        &self,
        priority: Priority,
        capability: &str,
    ) -> Result<consumer::PullConsumer, ClusterError> {
        let name = self.names.consumer(priority, capability);
        self.stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.names.task_subject(priority, capability),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.config.ack_wait,
                    // Attempts are counted by the nodes (so the last one still gets an outcome).
                    max_deliver: -1,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(ClusterError::js)
    }

    /// Stops pulling new tasks: what this node already runs finishes (and is recorded), what
    /// it pulled but did not start goes back to the stream for the others at once. Call it
    /// before the runtime's shutdown.
    pub fn stop_pulling(&self) {
        self.leaving.store(true, Ordering::Release);
    }

    /// Leaves the cluster after the runtime's shutdown: lets the pumps record the outcomes
    /// of what ran (up to `ack_wait`; what they could not record is redelivered), withdraws
    /// the heartbeat and stops the background work.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = tokio::time::Instant::now() + self.config.ack_wait;
        for mut p in pumps {
            if tokio::time::timeout_at(deadline, &mut p).await.is_err() {
                p.abort();
            }
        }
        let _ = self.nodes.delete(&self.config.node).await;
        let background =
            std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        for p in background {
            p.abort();
        }
        let _ = self.client.flush().await;
    }

    /// Submits `task`: `Ok` once JetStream has stored it.
    pub async fn submit(&self, task: ClusterTask) -> Result<Accepted, ClusterError> {
        let priority = task.priority;
        let ack = self
            .publish(task)
            .await
            .inspect_err(|e| self.count_refusal(priority, e))?;
        self.confirmed(priority, ack.await)
    }

    /// Counts a refusal the operator should see (capacity, topology, NATS); a client's
    /// mistake is not counted here.
    fn count_refusal(&self, priority: Priority, e: &ClusterError) {
        let reason = match e {
            ClusterError::BacklogFull { .. } => 0,
            ClusterError::NoNode(_) => 1,
            ClusterError::Unreachable(_) | ClusterError::JetStream(_) => 2,
            _ => return,
        };
        if let Some(m) = self.metrics() {
            m.refused(priority, reason);
        }
    }

    /// Submits many tasks at once: every one is handed to JetStream before any confirmation
    /// is awaited, so a batch costs about one round trip, not one per task. One result per
    /// task, in order.
    pub async fn submit_many(
        &self,
        tasks: Vec<ClusterTask>,
    ) -> Vec<Result<Accepted, ClusterError>> {
        let mut pending = Vec::with_capacity(tasks.len());
        for task in tasks {
            let priority = task.priority;
            let published = self.publish(task).await;
            if let Err(e) = &published {
                self.count_refusal(priority, e);
            }
            pending.push((priority, published));
        }
        let mut out = Vec::with_capacity(pending.len());
        for (priority, p) in pending {
            out.push(match p {
                Ok(ack) => self.confirmed(priority, ack.await),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Checks `task` and hands it to JetStream; the returned future is its confirmation.
    async fn publish(
        &self,
        task: ClusterTask,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, ClusterError> {
        if self.leaving.load(Ordering::Acquire) {
            return Err(ClusterError::ShuttingDown);
        }
        if !self.connected() {
            return Err(ClusterError::Unreachable(self.health_reasons().join("; ")));
        }
        if task.target.is_empty() {
            return Err(ClusterError::Invalid("the target is empty".into()));
        }
        self.check_backlog(task.priority)?;
        if !self.serves(&task.target).await {
            return Err(ClusterError::NoNode(format!(
                "capability `{}`",
                task.target
            )));
        }
        let subject = self.names.task_subject(task.priority, &task.target);
        // The run, on whichever node, joins this span's trace (with the `otel` feature).
        let span = tracing::debug_span!(
            "troupe.cluster.submit",
            target = %task.target,
            priority = task.priority.as_str(),
            node = %self.config.node
        );
        let trace = span.in_scope(troupe::TraceContext::current);
        let envelope = TaskEnvelope {
            target: task.target,
            priority: task.priority,
            payload: task.payload.to_vec(),
            timeout_ms: task.timeout.map_or(0, |t| t.as_millis() as u64),
            accepted_at_ms: wire::now_ms(),
            retries: task.retries,
            sandboxed: task.sandboxed,
            trace,
            accepted_by: self.config.node.clone(),
            notify: task.wait,
        };
        let body = wire::encode(&envelope).map_err(ClusterError::Invalid)?;
        if body.len() > self.client.server_info().max_payload {
            return Err(ClusterError::Invalid(format!(
                "the task is {} bytes on the wire; NATS takes at most {} (its `max_payload`)",
                body.len(),
                self.client.server_info().max_payload
            )));
        }
        match &task.idempotency_key {
            Some(key) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", key.as_str());
                self.js.publish_with_headers(subject, headers, body).await
            }
            None => self.js.publish(subject, body).await,
        }
        .map_err(ClusterError::js)
    }

    /// Turns JetStream's confirmation into the submission's result.
    fn confirmed(
        &self,
        priority: Priority,
        ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
    ) -> Result<Accepted, ClusterError> {
        let ack = ack
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("maximum messages exceeded") {
                    ClusterError::BacklogFull {
                        backlog: self.config.max_backlog,
                        limit: self.config.max_backlog,
                        priority,
                    }
                } else {
                    ClusterError::JetStream(text)
                }
            })
            .inspect_err(|e| self.count_refusal(priority, e))?;
        if let Some(m) = self.metrics() {
            m.submitted(priority, ack.duplicate);
        }
        Ok(Accepted {
            id: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// What the cluster knows of task `id`.
    pub async fn status(&self, id: u64) -> Result<TaskStatus, ClusterError> {
        if let Some(bytes) = self.outcomes.get(id.to_string()).await.map_err(kv_err)? {
            let record: OutcomeRecord = serde_json::from_slice(&bytes)
                .map_err(|e| ClusterError::JetStream(e.to_string()))?;
            return Ok(TaskStatus::Done(record));
        }
        // A work queue keeps a task until it is acknowledged, which comes after its outcome.
        match self.stream.get_raw_message(id).await {
            Ok(_) => Ok(TaskStatus::Pending),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                // Acknowledged between the two reads: its outcome is there now.
                match self.outcomes.get(id.to_string()).await.map_err(kv_err)? {
                    Some(bytes) => Ok(TaskStatus::Done(
                        serde_json::from_slice(&bytes)
                            .map_err(|e| ClusterError::JetStream(e.to_string()))?,
                    )),
                    None => Ok(TaskStatus::Unknown),
                }
            }
            Err(e) => Err(ClusterError::js(e)),
        }
    }

    /// Waits up to `timeout` for task `id`'s outcome, wherever it runs (`None` when it has
    /// none yet). For a task submitted here with [`ClusterTask::wait`] the node that records
    /// the outcome pushes it here, and the bucket is read only every second as a fallback; any
    /// other task is looked up in the bucket every 200 ms.
    pub async fn wait(
        &self,
        id: u64,
        timeout: Duration,
        pushed: bool,
    ) -> Result<Option<OutcomeRecord>, ClusterError> {
        let (tx, mut rx) = oneshot::channel();
        self.waiters.entry(id).or_default().push(tx);
        // Pushed before the waiter was registered.
        if let Some((_, (_, r))) = self.early.remove(&id) {
            self.forget_waiter(id, rx);
            return Ok(Some(r));
        }
        let every = if pushed {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut look = !pushed;
        let result = loop {
            if look {
                match self.status(id).await {
                    Ok(TaskStatus::Done(r)) => break Ok(Some(r)),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            }
            look = true;
            let next = (tokio::time::Instant::now() + every).min(deadline);
            tokio::select! {
                r = &mut rx => break Ok(r.ok()),
                _ = tokio::time::sleep_until(next) => {
                    if next >= deadline {
                        break Ok(None);
                    }
                }
            }
        };
        self.forget_waiter(id, rx);
        result
    }

    /// Forgets one waiter (and any other gone one), not the others still waiting on `id`.
    fn forget_waiter(&self, id: u64, rx: oneshot::Receiver<OutcomeRecord>) {
        drop(rx);
        if let Some(mut w) = self.waiters.get_mut(&id) {
            w.retain(|tx| !tx.is_closed());
        }
        self.waiters.remove_if(&id, |_, w| w.is_empty());
    }

    /// Every node that announced itself, with its state.
    pub async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let mut keys = self.nodes.keys().await.map_err(kv_err)?;
        let mut out = Vec::new();
        while let Some(Ok(key)) = keys.next().await {
            if let Ok(Some(bytes)) = self.nodes.get(key).await {
                if let Ok(record) = serde_json::from_slice::<NodeRecord>(&bytes) {
                    let ago = wire::now_ms().saturating_sub(record.at_ms);
                    let gone = ago > 3 * self.config.heartbeat.as_millis() as u64;
                    out.push(Member {
                        state: if gone { "gone" } else { "up" },
                        last_heartbeat_ms_ago: ago,
                        record,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.record.node.cmp(&b.record.node));
        Ok(out)
    }

    /// Accepted tasks without an outcome yet (waiting in the stream or running on a node),
    /// per priority, most urgent first: one request to JetStream.
    pub async fn backlog(&self) -> Result<[u64; Priority::COUNT], ClusterError> {
        let mut out = [0u64; Priority::COUNT];
        let mut subjects = self
            .stream
            .info_with_subjects(self.names.task_subjects())
            .await
            .map_err(ClusterError::js)?;
        while let Some(Ok((subject, count))) = subjects.next().await {
            if let Some(p) = self.names.priority_of(&subject) {
                out[p.index()] += count as u64;
            }
        }
        for (seen, &n) in self.backlog_seen.iter().zip(&out) {
            seen.store(n, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Refuses a submission of `priority` when the stream is past that priority's share of
    /// `max_backlog` (as of the last heartbeat): less urgent work is refused first, so a
    /// cluster past its capacity keeps room for the urgent.
    fn check_backlog(&self, priority: Priority) -> Result<(), ClusterError> {
        let total: u64 = self
            .backlog_seen
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        let limit = (self.config.max_backlog as f64 * BACKLOG_SHARE[priority.index()]) as u64;
        if total >= limit {
            return Err(ClusterError::BacklogFull {
                backlog: total,
                limit,
                priority,
            });
        }
        Ok(())
    }

    async fn heartbeat_once(&self) {
        let Some(rt) = self.runtime() else { return };
        let h = rt.health();
        let record = NodeRecord {
            node: self.config.node.clone(),
            capabilities: rt.capabilities(),
            agents: h.agents,
            queue_depths: h.queues.iter().map(|q| q.depth).collect(),
            outstanding: h.outstanding,
            ready: h.ready,
            at_ms: wire::now_ms(),
        };
        if let Ok(bytes) = serde_json::to_vec(&record) {
            let _ = self.nodes.put(&self.config.node, Bytes::from(bytes)).await;
        }
    }

    /// True if a live node serves `target`. A miss looks at the members again (at most every
    /// 100 ms) before it is believed: a node that joined since the last heartbeat counts.
    async fn serves(&self, target: &str) -> bool {
        let known = |c: &Self| {
            c.served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(target)
        };
        if known(self) {
            return true;
        }
        let stale = {
            let mut at = self.served_at.lock().unwrap_or_else(|p| p.into_inner());
            let stale = at.elapsed() >= Duration::from_millis(100);
            if stale {
                *at = Instant::now();
            }
            stale
        };
        if stale {
            self.refresh_served().await;
        }
        known(self)
    }

    /// What the live nodes serve, for submission to check against.
    async fn refresh_served(&self) {
        let Ok(members) = self.members().await else {
            return;
        };
        let mut served: HashSet<String> = members
            .iter()
            .filter(|m| m.state == "up")
            .flat_map(|m| m.record.capabilities.iter().cloned())
            .collect();
        // This node pulls what its own pool serves: count that even while its heartbeat is
        // not (yet, or no longer) in the bucket — right after NATS came back, the records
        // lag, and refusing work this node itself would run is wrong.
        if let Some(rt) = self
            .runtime()
            .filter(|_| !self.leaving.load(Ordering::Acquire))
        {
            served.extend(rt.capabilities());
        }
        if let Some(m) = self.metrics() {
            let up = members.iter().filter(|m| m.state == "up").count();
            m.nodes(up, members.len() - up);
            m.connected(self.connected());
        }
        *self.served.lock().unwrap_or_else(|p| p.into_inner()) = served;
    }

    async fn heartbeats(&self) {
        let mut tick = tokio::time::interval(self.config.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.leaving.load(Ordering::Acquire) {
                return;
            }
            self.heartbeat_once().await;
            self.refresh_served().await;
            self.prune_early();
            if let Ok(b) = self.backlog().await {
                if let Some(m) = self.metrics() {
                    m.backlog(&b);
                }
            }
        }
    }

    /// Tells JetStream the tasks this node holds are still being worked on.
    async fn keep_alive(&self) {
        let mut tick = tokio::time::interval(self.config.ack_wait / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let held: Vec<Arc<jetstream::Message>> =
                self.held.iter().map(|e| e.value().clone()).collect();
            for m in held {
                let _ = m.ack_with(AckKind::Progress).await;
            }
        }
    }

    /// Hands a pushed outcome to its waiters, or keeps it for the waiter still to come.
    fn deliver(&self, record: OutcomeRecord) {
        match self.waiters.remove(&record.id) {
            Some((_, waiters)) => {
                for w in waiters {
                    let _ = w.send(record.clone());
                }
            }
            None => {
                self.early.insert(record.id, (Instant::now(), record));
            }
        }
    }

    /// Forgets pushed outcomes nobody came to wait for.
    fn prune_early(&self) {
        self.early
            .retain(|_, (at, _)| at.elapsed() < Duration::from_secs(10));
    }

    /// Hands the outcomes other nodes recorded for tasks submitted here with a waiter to
    /// the `?wait` callers. (A caller waiting on another node than the one it submitted to
    /// polls the bucket instead: see [`Cluster::wait`].)
    async fn listen_done(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, ClusterError> {
        let mut done = self
            .client
            .subscribe(self.names.done(&self.config.node))
            .await
            .map_err(|e| ClusterError::Unreachable(e.to_string()))?;
        let me = self.clone();
        Ok(tokio::spawn(async move {
            while let Some(msg) = done.next().await {
                let Ok(record) = serde_json::from_slice::<OutcomeRecord>(&msg.payload) else {
                    continue;
                };
                me.deliver(record);
            }
        }))
    }

    /// Records `record` as task `id`'s outcome (the first one recorded wins) and acknowledges
    /// the message; retries while NATS is away, for up to half the ack wait (past that another
    /// node will have the task).
    async fn record(&self, msg: &jetstream::Message, record: OutcomeRecord, notify: Option<&str>) {
        let id = record.id;
        let Ok(value) = serde_json::to_vec(&record) else {
            return;
        };
        let value = Bytes::from(value);
        let mut first = false;
        let give_up = Instant::now() + self.config.ack_wait / 2;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.outcomes.create(id.to_string(), value.clone()).await {
                Ok(_) => {
                    if let Some(m) = self.metrics() {
                        m.recorded(record.priority, record.outcome);
                    }
                    first = true;
                    break;
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // An earlier delivery (on a node that died before acknowledging) recorded
                    // it: that outcome stands.
                    if let Some(m) = self.metrics() {
                        m.duplicate_outcome();
                    }
                    break;
                }
                Err(e) => {
                    if Instant::now() >= give_up {
                        tracing::warn!(task = id, error = %e, "could not record the outcome; leaving the task to be redelivered");
                        self.held.remove(&id);
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
        self.held.remove(&id);
        let _ = msg.ack().await;
        if let (true, Some(node)) = (first, notify) {
            if node == self.config.node {
                self.deliver(record);
            } else {
                let _ = self.client.publish(self.names.done(node), value).await;
            }
        }
    }
}

/// What a source hands back with a task: the message to acknowledge.
pub(crate) struct Receipt {
    msg: Arc<jetstream::Message>,
    id: u64,
    priority: Priority,
    attempts: u64,
    /// The node to tell when the outcome is recorded (a `?wait` caller waits there).
    notify: Option<String>,
}

/// How much of one capability's work this node holds (pulled, not yet finished), shared by
/// the five priority sources of the capability.
///
/// Room is reserved when a pull request goes out (for as many tasks as it asks) and given back
/// for what the request did not bring, so requests of the five priorities cannot together ask
/// for more than `limit`. Each priority may fill only its share of the limit
/// ([`BACKLOG_SHARE`]), so background work never takes all the room critical work would need.
/// A priority that found nothing last time only probes (asks for one task, unreserved), so an
/// idle priority holds no room: the node holds at most `limit` plus one task per priority.
struct Gate {
    limit: usize,
    used: AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Gate {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Gate {
            limit: limit.max(1),
            used: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        })
    }

    /// The room `priority` may still reserve.
    fn room(&self, priority: Priority) -> usize {
        let share = ((self.limit as f64) * BACKLOG_SHARE[priority.index()]).ceil() as usize;
        share
            .max(1)
            .saturating_sub(self.used.load(Ordering::Acquire))
    }

    /// Reserves up to `want`; returns what it got.
    fn reserve(&self, priority: Priority, want: usize) -> usize {
        let share = ((self.limit as f64) * BACKLOG_SHARE[priority.index()]).ceil() as usize;
        let share = share.max(1);
        let mut got = 0;
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                got = want.min(share.saturating_sub(used));
                Some(used + got)
            });
        got
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }
}

/// A (priority, capability) consumer as a [`TaskSource`].
///
/// It keeps one pull request open at a time, for the room its [`Gate`] gives, and takes its
/// messages as they arrive. A new request goes out once a quarter of the priority's room is
/// free (or the capability holds nothing), so a busy node asks for tasks in batches rather
/// than one round trip per task, and an idle one asks at once.
struct JsSource {
    cluster: Arc<Cluster>,
    consumer: consumer::PullConsumer,
    priority: Priority,
    gate: Arc<Gate>,
    /// The open pull request. Only the one pump of this source calls `next`, so the lock is
    /// never contended; it is async because a message is awaited while holding it.
    batch: tokio::sync::Mutex<Option<consumer::pull::Batch>>,
    /// Room the open request reserved and has not yet brought.
    reserved: AtomicUsize,
    /// Tasks the open request brought so far.
    brought: AtomicUsize,
    /// Tasks the previous request brought: the next asks for twice as many (0: a probe).
    last: AtomicUsize,
}

impl JsSource {
    fn new(
        cluster: Arc<Cluster>,
        consumer: consumer::PullConsumer,
        priority: Priority,
        gate: Arc<Gate>,
    ) -> Self {
        JsSource {
            cluster,
            consumer,
            priority,
            gate,
            batch: tokio::sync::Mutex::new(None),
            reserved: AtomicUsize::new(0),
            brought: AtomicUsize::new(0),
            last: AtomicUsize::new(0),
        }
    }

    /// A held task was reported.
    fn release(&self) {
        self.gate.give_back(1);
    }

    /// The open request ended: what it reserved and did not bring is free again.
    fn end_batch(&self) {
        self.gate.give_back(self.reserved.swap(0, Ordering::AcqRel));
        self.last
            .store(self.brought.swap(0, Ordering::AcqRel), Ordering::Release);
    }

    /// Opens a pull request for the room left, waiting first until enough is free.
    async fn open_batch(&self) -> Option<consumer::pull::Batch> {
        let last = self.last.load(Ordering::Acquire);
        let want = if last == 0 {
            // Nothing came last time: probe for one, holding no room.
            self.reserved.store(0, Ordering::Release);
            1
        } else {
            let target = last.saturating_mul(2);
            let want = loop {
                let room = self.gate.room(self.priority);
                let enough = target.min((self.gate.limit / 4).max(1));
                if room >= enough || (room > 0 && self.gate.used.load(Ordering::Acquire) == 0) {
                    let got = self.gate.reserve(self.priority, room.min(target));
                    if got > 0 {
                        break got;
                    }
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), self.gate.freed.notified())
                    .await;
                if self.cluster.leaving.load(Ordering::Acquire) {
                    return None;
                }
            };
            self.reserved.store(want, Ordering::Release);
            want
        };
        match self
            .consumer
            .batch()
            .max_messages(want)
            .expires(Duration::from_secs(1))
            .messages()
            .await
        {
            Ok(b) => Some(b),
            Err(e) => {
                self.end_batch();
                tracing::debug!(error = %e, "pull request failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        }
    }

    /// Hands back whatever the open pull request still brings: this node is leaving.
    async fn hand_back(&self) {
        let Some(mut batch) = self.batch.lock().await.take() else {
            return;
        };
        while let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_millis(20), batch.next()).await
        {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        self.end_batch();
    }

    /// Turns a message into a task, or settles it at once (unreadable, out of attempts, past
    /// its deadline).
    async fn admit(&self, msg: jetstream::Message) -> Option<SourcedTask<Receipt>> {
        let (id, attempts) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.delivered.max(1) as u64),
            Err(_) => return None,
        };
        let msg = Arc::new(msg);
        let c = &self.cluster;
        c.held.insert(id, msg.clone());
        // Its room was reserved by the request that brought it, unless a probe brought it.
        self.brought.fetch_add(1, Ordering::AcqRel);
        if self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
            .is_err()
        {
            self.gate.used.fetch_add(1, Ordering::AcqRel);
        }
        if attempts > 1 {
            if let Some(m) = c.metrics() {
                m.redelivered();
            }
        }
        let settle = |outcome: OutcomeKind, detail: Option<String>| OutcomeRecord {
            id,
            status: "done".into(),
            priority: self.priority,
            outcome,
            detail,
            node: c.config.node.clone(),
            attempts,
            at_ms: wire::now_ms(),
        };
        let envelope: TaskEnvelope = match wire::decode(&msg.payload) {
            Ok(e) => e,
            Err(why) => {
                let r = settle(OutcomeKind::Error, Some(format!("unreadable task: {why}")));
                c.record(&msg, r, None).await;
                self.release();
                return None;
            }
        };
        let notify = envelope.notify.then(|| envelope.accepted_by.clone());
        if attempts > u64::from(c.config.max_attempts) {
            if let Some(m) = c.metrics() {
                m.dead_lettered();
            }
            let why = format!(
                "gave up after {} deliveries (`cluster.max_attempts`): the nodes running it \
                 stopped before it ended",
                attempts - 1
            );
            c.record(
                &msg,
                settle(OutcomeKind::Error, Some(why)),
                notify.as_deref(),
            )
            .await;
            self.release();
            return None;
        }
        let mut task = Task::new(envelope.target, Bytes::from(envelope.payload))
            .priority(envelope.priority)
            .parent(envelope.trace)
            .key(id);
        if envelope.timeout_ms > 0 {
            let deadline = envelope.accepted_at_ms + envelope.timeout_ms;
            let left = deadline.saturating_sub(wire::now_ms());
            if left == 0 {
                c.record(&msg, settle(OutcomeKind::Timeout, None), notify.as_deref())
                    .await;
                self.release();
                return None;
            }
            task = task.timeout(Duration::from_millis(left));
        }
        if envelope.retries > 0 {
            task = task.retry(RetryPolicy::attempts(
                envelope.retries.saturating_add(1),
                Duration::from_millis(10),
            ));
        }
        if envelope.sandboxed {
            task = task.sandboxed();
        }
        Some(SourcedTask {
            task,
            receipt: Receipt {
                msg,
                id,
                priority: self.priority,
                attempts,
                notify,
            },
        })
    }
}

impl TaskSource for JsSource {
    type Receipt = Receipt;

    async fn next(&self) -> Option<SourcedTask<Receipt>> {
        loop {
            if self.cluster.leaving.load(Ordering::Acquire) {
                // Pulled but never started: hand them straight back.
                self.hand_back().await;
                return None;
            }
            if !self.cluster.connected() {
                if self.batch.lock().await.take().is_some() {
                    self.end_batch();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let mut batch = self.batch.lock().await;
            if batch.is_none() {
                *batch = self.open_batch().await;
                if batch.is_none() {
                    continue;
                }
            }
            let Some(open) = batch.as_mut() else { continue };
            // Wake now and then to notice leaving or a lost connection.
            match tokio::time::timeout(Duration::from_millis(250), open.next()).await {
                Ok(Some(Ok(msg))) => {
                    drop(batch);
                    if let Some(t) = self.admit(msg).await {
                        return Some(t);
                    }
                }
                // The request expired, was filled, or failed: the next turn opens another.
                Ok(Some(Err(_)) | None) => {
                    *batch = None;
                    self.end_batch();
                }
                Err(_) => {}
            }
        }
    }

    async fn finished(&self, r: Receipt, outcome: Outcome) {
        let detail = match &outcome {
            Outcome::Ok(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Outcome::Error(e) => Some(e.to_string()),
            Outcome::Panic(m) => Some(m.clone()),
            Outcome::Timeout | Outcome::Cancelled => None,
        };
        if outcome.kind() == OutcomeKind::Cancelled {
            // Cancelled here means this node is shutting down: the task is not over; another
            // node takes it.
            self.cluster.held.remove(&r.id);
            let _ = r.msg.ack_with(AckKind::Nak(None)).await;
            self.release();
            return;
        }
        let record = OutcomeRecord {
            id: r.id,
            status: "done".into(),
            priority: r.priority,
            outcome: outcome.kind(),
            detail,
            node: self.cluster.config.node.clone(),
            attempts: r.attempts,
            at_ms: wire::now_ms(),
        };
        self.cluster
            .record(&r.msg, record, r.notify.as_deref())
            .await;
        self.release();
    }

    async fn refused(&self, r: Receipt, rejected: Rejected) {
        self.cluster.held.remove(&r.id);
        // Not this node's to run now (shutting down, or its queue stayed full): back to the
        // stream, for whichever node asks next.
        let delay = match rejected.error {
            SubmitError::ShuttingDown => None,
            _ => Some(Duration::from_millis(50)),
        };
        let _ = r.msg.ack_with(AckKind::Nak(delay)).await;
        self.release();
    }
}
