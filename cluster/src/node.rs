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

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Capabilities served by the live nodes, refreshed every heartbeat.
    served: Mutex<HashSet<String>>,
    leaving: AtomicBool,
    pumps: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
            served: Mutex::new(HashSet::new()),
            leaving: AtomicBool::new(false),
            pumps: Mutex::new(Vec::new()),
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
            for priority in Priority::ALL {
                let consumer = self.consumer(priority, &capability).await?;
                let source = JsSource {
                    cluster: self.clone(),
                    consumer,
                    priority,
                    buffer: Mutex::new(VecDeque::new()),
                    outstanding: AtomicUsize::new(0),
                };
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
        let me = self.clone();
        pumps.push(tokio::spawn(async move { me.heartbeats().await }));
        let me = self.clone();
        pumps.push(tokio::spawn(async move { me.keep_alive().await }));
        let me = self.clone();
        pumps.push(tokio::spawn(async move { me.watch_outcomes().await }));
        pumps.extend(crate::bus::listen(self.clone()).await?);
        *self.pumps.lock().unwrap_or_else(|p| p.into_inner()) = pumps;
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

    /// Leaves the cluster after the runtime's shutdown: withdraws the heartbeat and stops the
    /// background work.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        let _ = self.nodes.delete(&self.config.node).await;
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        for p in pumps {
            p.abort();
        }
        let _ = self.client.flush().await;
    }

    /// Submits `task`: `Ok` once JetStream has stored it.
    pub async fn submit(&self, task: ClusterTask) -> Result<Accepted, ClusterError> {
        if self.leaving.load(Ordering::Acquire) {
            return Err(ClusterError::ShuttingDown);
        }
        if !self.connected() {
            return Err(ClusterError::Unreachable(self.health_reasons().join("; ")));
        }
        if task.target.is_empty() {
            return Err(ClusterError::Invalid("the target is empty".into()));
        }
        if !self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&task.target)
        {
            return Err(ClusterError::NoNode(format!(
                "capability `{}`",
                task.target
            )));
        }
        let envelope = TaskEnvelope {
            target: task.target.clone(),
            priority: task.priority,
            payload: task.payload.to_vec(),
            timeout_ms: task.timeout.map_or(0, |t| t.as_millis() as u64),
            accepted_at_ms: wire::now_ms(),
            retries: task.retries,
            sandboxed: task.sandboxed,
            trace: troupe::TraceContext::default(),
            accepted_by: self.config.node.clone(),
        };
        let body = wire::encode(&envelope).map_err(ClusterError::Invalid)?;
        let subject = self.names.task_subject(task.priority, &task.target);
        let ack = match &task.idempotency_key {
            Some(key) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", key.as_str());
                self.js.publish_with_headers(subject, headers, body).await
            }
            None => self.js.publish(subject, body).await,
        }
        .map_err(ClusterError::js)?
        .await
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("maximum messages exceeded") {
                ClusterError::BacklogFull(self.config.max_backlog)
            } else {
                ClusterError::JetStream(text)
            }
        })?;
        if let Some(m) = self.metrics() {
            m.submitted(task.priority, ack.duplicate);
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

    /// Waits up to `timeout` for task `id`'s outcome, wherever it runs.
    pub async fn wait(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<Option<OutcomeRecord>, ClusterError> {
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(id).or_default().push(tx);
        // The outcome may have been recorded before the waiter was registered.
        if let TaskStatus::Done(r) = self.status(id).await? {
            self.waiters.remove(&id);
            return Ok(Some(r));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(Some(r)),
            _ => {
                self.waiters.remove(&id);
                Ok(None)
            }
        }
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

    /// Tasks waiting in the stream per priority (not yet pulled by any node), most urgent
    /// first.
    pub async fn backlog(&self) -> Result<[u64; Priority::COUNT], ClusterError> {
        let mut out = [0u64; Priority::COUNT];
        let mut names = self.stream.consumer_names();
        let mut seen = Vec::new();
        while let Some(Ok(name)) = names.next().await {
            seen.push(name);
        }
        for name in seen {
            let Some(p) = Priority::ALL
                .into_iter()
                .find(|p| name.starts_with(&format!("{}-", p.as_str())))
            else {
                continue;
            };
            let consumer: Result<consumer::PullConsumer, _> = self.stream.get_consumer(&name).await;
            if let Ok(c) = consumer {
                if let Ok(info) = c.get_info().await {
                    out[p.index()] += info.num_pending;
                }
            }
        }
        Ok(out)
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

    /// What the live nodes serve, for submission to check against.
    async fn refresh_served(&self) {
        let Ok(members) = self.members().await else {
            return;
        };
        let served: HashSet<String> = members
            .iter()
            .filter(|m| m.state == "up")
            .flat_map(|m| m.record.capabilities.iter().cloned())
            .collect();
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
        let mut beats = 0u64;
        loop {
            tick.tick().await;
            if self.leaving.load(Ordering::Acquire) {
                return;
            }
            self.heartbeat_once().await;
            self.refresh_served().await;
            beats += 1;
            // The stream backlog is a handful of requests: every few beats is enough.
            if beats % 5 == 0 {
                if let (Some(m), Ok(b)) = (self.metrics(), self.backlog().await) {
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

    /// Hands recorded outcomes to the `?wait` callers of this node.
    async fn watch_outcomes(&self) {
        loop {
            let from = match self
                .js
                .get_stream(format!("KV_{}", self.names.outcomes()))
                .await
            {
                Ok(mut s) => s
                    .info()
                    .await
                    .map(|i| i.state.last_sequence + 1)
                    .unwrap_or(1),
                Err(_) => 1,
            };
            let Ok(mut watch) = self.outcomes.watch_all_from_revision(from).await else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            while let Some(Ok(entry)) = watch.next().await {
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Ok(id) = entry.key.parse::<u64>() else {
                    continue;
                };
                if let Some((_, waiters)) = self.waiters.remove(&id) {
                    if let Ok(record) = serde_json::from_slice::<OutcomeRecord>(&entry.value) {
                        for w in waiters {
                            let _ = w.send(record.clone());
                        }
                    }
                }
            }
            if self.leaving.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Records `record` as task `id`'s outcome (the first one recorded wins) and acknowledges
    /// the message; retries while NATS is away, for up to half the ack wait (past that another
    /// node will have the task).
    async fn record(&self, msg: &jetstream::Message, record: OutcomeRecord) {
        let id = record.id;
        let Ok(value) = serde_json::to_vec(&record) else {
            return;
        };
        let value = Bytes::from(value);
        let give_up = Instant::now() + self.config.ack_wait / 2;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.outcomes.create(id.to_string(), value.clone()).await {
                Ok(_) => {
                    if let Some(m) = self.metrics() {
                        m.recorded(record.priority, record.outcome);
                    }
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
    }
}

/// What a source hands back with a task: the message to acknowledge.
pub(crate) struct Receipt {
    msg: Arc<jetstream::Message>,
    id: u64,
    priority: Priority,
    attempts: u64,
}

/// A (priority, capability) consumer as a [`TaskSource`].
struct JsSource {
    cluster: Arc<Cluster>,
    consumer: consumer::PullConsumer,
    priority: Priority,
    buffer: Mutex<VecDeque<jetstream::Message>>,
    /// Pulled and not yet reported (buffered, queued or running).
    outstanding: AtomicUsize,
}

impl JsSource {
    fn pop(&self) -> Option<jetstream::Message> {
        self.buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Fetches up to what this source may still hold, waiting at most a second.
    async fn fetch(&self) {
        let room = self
            .cluster
            .config
            .pull_in_flight
            .saturating_sub(self.outstanding.load(Ordering::Acquire))
            .max(1);
        let batch = self
            .consumer
            .fetch()
            .max_messages(room)
            .expires(Duration::from_secs(1))
            .messages()
            .await;
        let Ok(mut batch) = batch else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        };
        let mut got = Vec::new();
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => got.push(m),
                Err(_) => break,
            }
        }
        self.buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(got);
    }

    /// Turns a message into a task, or settles it at once (unreadable, out of attempts, past
    /// its deadline).
    async fn admit(&self, msg: jetstream::Message) -> Option<SourcedTask<Receipt>> {
        let (id, attempts) = match msg.info() {
            Ok(i) => (i.stream_sequence, i.delivered.max(1) as u64),
            Err(_) => return None,
        };
        let msg = Arc::new(msg);
        self.cluster.held.insert(id, msg.clone());
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let c = &self.cluster;
        if attempts > 1 {
            if let Some(m) = c.metrics() {
                m.redelivered();
            }
        }
        let settle = |outcome: OutcomeKind, detail: String| OutcomeRecord {
            id,
            status: "done".into(),
            priority: self.priority,
            outcome,
            detail: Some(detail),
            node: c.config.node.clone(),
            attempts,
        };
        let envelope: TaskEnvelope = match wire::decode(&msg.payload) {
            Ok(e) => e,
            Err(why) => {
                c.record(
                    &msg,
                    settle(OutcomeKind::Error, format!("unreadable task: {why}")),
                )
                .await;
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
        };
        if attempts > u64::from(c.config.max_attempts) {
            if let Some(m) = c.metrics() {
                m.dead_lettered();
            }
            c.record(
                &msg,
                settle(
                    OutcomeKind::Error,
                    format!(
                        "gave up after {} deliveries (`cluster.max_attempts`): the nodes running \
                         it stopped before it ended",
                        attempts - 1
                    ),
                ),
            )
            .await;
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let mut task =
            Task::new(envelope.target, Bytes::from(envelope.payload)).priority(envelope.priority);
        if envelope.timeout_ms > 0 {
            let deadline = envelope.accepted_at_ms + envelope.timeout_ms;
            let left = deadline.saturating_sub(wire::now_ms());
            if left == 0 {
                let mut r = settle(OutcomeKind::Timeout, String::new());
                r.detail = None;
                c.record(&msg, r).await;
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
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
                while let Some(m) = self.pop() {
                    let _ = m.ack_with(AckKind::Nak(None)).await;
                }
                return None;
            }
            if let Some(msg) = self.pop() {
                if let Some(t) = self.admit(msg).await {
                    return Some(t);
                }
                continue;
            }
            if !self.cluster.connected() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            self.fetch().await;
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
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
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
        };
        self.cluster.record(&r.msg, record).await;
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
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
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}
