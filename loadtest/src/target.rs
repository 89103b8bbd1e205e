//! What the load is sent to: a runtime embedded in this process, or a `troupe` node over HTTP.
//!
//! Both answer the same two questions for the generator: send this entry's request now (and
//! report its [`Class`] when it ends), and send one bus message. Everything a request needs that
//! does not change between requests (task targets, payloads, HTTP bodies) is built once in
//! [`Target::new_embedded`] / [`Target::new_http`], so a request costs a clone of shared bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::mpsc;
use troupe::{AgentId, Bus, RuntimeHandle, SubmitError, Task, Topic};

use crate::mix::Mix;
use crate::record::{Class, RejectReason, Sample};

/// Why a target cannot be load-tested.
#[derive(Debug, Error)]
pub enum TargetError {
    /// The node did not answer or answered nonsense.
    #[error("node at {url}: {reason}")]
    Node {
        /// Base URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A mix entry cannot run on this target (the check request was refused).
    #[error("mix entry `{entry}` (task[{index}]) cannot run on the target: {reason}")]
    Entry {
        /// Entry name.
        entry: String,
        /// Position in the mix.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// Where finished requests go, and the generator's own bound on requests outstanding.
#[derive(Clone)]
pub struct Sink {
    /// Samples to the recorder.
    pub tx: mpsc::Sender<Sample>,
    /// The run's time zero.
    pub start: Instant,
    /// Requests sent and not yet ended.
    pub in_flight: Arc<AtomicUsize>,
    /// Above this many outstanding, the generator does not send (counted as `in_flight_limit`).
    pub max_in_flight: usize,
    /// The Tokio runtime requests run on.
    pub rt: tokio::runtime::Handle,
}

impl Sink {
    /// Nanoseconds since the run's start.
    pub fn now_ns(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos() as u64
    }

    fn sample(&self, entry: usize, intended_ns: u64, class: Class, node: u16) -> Sample {
        Sample {
            entry: entry as u32,
            intended_ns,
            done_ns: self.now_ns(),
            class,
            node,
        }
    }

    /// Records a sample from a thread outside the Tokio runtime (the generator).
    fn record_blocking(&self, s: Sample) {
        // Fails only once the recorder has stopped, i.e. after the run: nothing left to count.
        let _ = self.tx.blocking_send(s);
    }
}

/// How one bus message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusResult {
    /// Accepted; `delivered` mailboxes got it and `dropped` were full.
    Accepted {
        /// Mailboxes it reached.
        delivered: u64,
        /// Mailboxes that were full.
        dropped: u64,
    },
    /// Refused outright.
    Failed,
}

struct EmbeddedEntry {
    target: &'static str,
    priority: troupe::Priority,
    payload: Bytes,
    timeout: Duration,
    sandbox: bool,
    /// A workflow entry: its input (the name is `target`).
    workflow: Option<String>,
}

/// A runtime in this process.
pub struct Embedded {
    runtime: RuntimeHandle,
    /// Runs the mix's workflow entries.
    engine: Option<Arc<troupe_workflow::Engine>>,
    entries: Vec<EmbeddedEntry>,
    bus: Bus,
    topic: Option<Topic>,
    bus_payload: Bytes,
    agents: u32,
}

/// A node over HTTP, or several (a cluster): requests go to them in turn.
pub struct Http {
    client: reqwest::Client,
    /// Base URLs.
    nodes: Vec<String>,
    /// The next request's node (round-robin).
    next: AtomicUsize,
    token: Option<String>,
    bodies: Vec<Bytes>,
    /// Where each entry is POSTed: `/v1/tasks?wait=true`, or a workflow's executions.
    paths: Vec<String>,
    topic_body: Option<Bytes>,
    bus_payload: String,
    agents: u32,
    first_transport_error: std::sync::OnceLock<String>,
}

/// The system under test.
pub enum Target {
    /// See [`Embedded`].
    Embedded(Embedded),
    /// See [`Http`].
    Http(Http),
}

/// A task's answer (`outcome`) or a workflow execution's (`status`).
#[derive(Deserialize)]
struct TaskReply {
    outcome: Option<String>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct AgentsReply {
    agents: u32,
}

fn class_of_submit_error(e: &SubmitError) -> Class {
    Class::Rejected(match e {
        SubmitError::QueueFull { .. } => RejectReason::QueueFull,
        SubmitError::KindFull { .. } => RejectReason::KindFull,
        SubmitError::ShuttingDown => RejectReason::ShuttingDown,
        SubmitError::Unavailable(_) => RejectReason::Unavailable,
        _ => RejectReason::Invalid,
    })
}

/// How a refusal with `status` (and the JSON body's `error` code, if read) classifies.
fn class_of_refusal(status: u16, code: Option<&str>) -> Class {
    match (status, code) {
        (429 | 503, Some("overloaded")) => Class::Rejected(RejectReason::Overloaded),
        (503, Some("unavailable")) => Class::Rejected(RejectReason::Unavailable),
        (429, Some("kind_full")) => Class::Rejected(RejectReason::KindFull),
        _ => class_of_status(status),
    }
}

fn class_of_status(status: u16) -> Class {
    match status {
        429 => Class::Rejected(RejectReason::QueueFull),
        503 => Class::Rejected(RejectReason::ShuttingDown),
        400..=499 => Class::Rejected(RejectReason::Invalid),
        _ => Class::Error,
    }
}

/// How an execution that ended `status` classifies (`running`: still running when the wait
/// ended, so past the entry's timeout).
fn class_of_execution(status: &str) -> Class {
    match status {
        "succeeded" => Class::Ok,
        "timed_out" | "running" => Class::Timeout,
        "cancelled" => Class::Cancelled,
        _ => Class::Error,
    }
}

fn class_of_outcome(label: &str) -> Class {
    match label {
        "ok" => Class::Ok,
        "timeout" => Class::Timeout,
        "panic" => Class::Panic,
        "cancelled" => Class::Cancelled,
        _ => Class::Error,
    }
}

impl Target {
    /// Load against `runtime`; `engine` runs the mix's workflow entries (registered here).
    /// `request_timeout` applies to entries without their own.
    pub fn new_embedded(
        runtime: RuntimeHandle,
        engine: Option<Arc<troupe_workflow::Engine>>,
        mix: &Mix,
        request_timeout: Duration,
    ) -> Result<Self, TargetError> {
        for (i, e) in mix.entries.iter().enumerate() {
            let Some(w) = &e.workflow else { continue };
            let refused = |reason: String| TargetError::Entry {
                entry: e.name.clone(),
                index: i,
                reason,
            };
            match &engine {
                Some(engine) => engine
                    .register((**w).clone())
                    .map_err(|err| refused(err.to_string()))?,
                None => return Err(refused("no workflow engine on this pool".into())),
            }
        }
        let entries = mix
            .entries
            .iter()
            .map(|e| EmbeddedEntry {
                // Leaked once per mix entry so every task's target is a borrowed `&'static str`
                // and building a task allocates nothing for it.
                target: Box::leak(e.target.clone().into_boxed_str()),
                priority: e.priority,
                payload: e.payload.clone(),
                timeout: e.timeout.unwrap_or(request_timeout),
                sandbox: e.sandbox,
                workflow: e
                    .workflow
                    .as_ref()
                    .map(|_| String::from_utf8_lossy(&e.payload).into_owned()),
            })
            .collect();
        let bus = runtime.bus();
        // The mix checked the name; a fresh pool has room for one topic.
        let topic = mix.bus.as_ref().and_then(|b| bus.topic(&b.topic).ok());
        Ok(Target::Embedded(Embedded {
            engine,
            agents: runtime.agent_count() as u32,
            bus,
            topic,
            bus_payload: mix
                .bus
                .as_ref()
                .map(|b| b.payload.clone())
                .unwrap_or_default(),
            entries,
            runtime,
        }))
    }

    /// Load against the node at `base` (e.g. `http://127.0.0.1:9464`), or against several
    /// nodes of a cluster given as a comma-separated list: requests are spread over them
    /// round-robin and the report shows each node's share.
    pub async fn new_http(
        base: &str,
        token: Option<String>,
        mix: &Mix,
        request_timeout: Duration,
    ) -> Result<Self, TargetError> {
        let nodes: Vec<String> = base
            .split(',')
            .map(|b| b.trim().trim_end_matches('/').to_owned())
            .filter(|b| !b.is_empty())
            .collect();
        if nodes.is_empty() {
            return Err(TargetError::Node {
                url: base.to_owned(),
                reason: "no node URL given".into(),
            });
        }
        if nodes.len() > usize::from(u16::MAX) {
            return Err(TargetError::Node {
                url: base.to_owned(),
                reason: format!("{} nodes; at most {}", nodes.len(), u16::MAX),
            });
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(4096)
            .tcp_nodelay(true)
            // Past the task's own timeout plus a margin the exchange has failed, and the
            // request ends as `error` rather than hanging the run.
            .timeout(request_timeout + Duration::from_secs(5))
            .build()
            .map_err(|e| TargetError::Node {
                url: base.to_owned(),
                reason: e.to_string(),
            })?;
        // Direct bus messages address agent ids every node has: the smallest pool's.
        let mut agents = u32::MAX;
        for node in &nodes {
            agents = agents.min(agents_of(&client, node, token.as_deref()).await?);
        }
        for (i, e) in mix.entries.iter().enumerate() {
            if let Some(w) = &e.workflow {
                for node in &nodes {
                    register_workflow(&client, node, token.as_deref(), w)
                        .await
                        .map_err(|reason| TargetError::Entry {
                            entry: e.name.clone(),
                            index: i,
                            reason,
                        })?;
                }
            }
        }
        let paths = mix
            .entries
            .iter()
            .map(|e| match &e.workflow {
                Some(w) => format!(
                    "/v1/workflows/{}/executions?wait=true&wait_ms={}",
                    w.name,
                    e.timeout.unwrap_or(request_timeout).as_millis()
                ),
                None => "/v1/tasks?wait=true".to_owned(),
            })
            .collect();
        let bodies = mix
            .entries
            .iter()
            .map(|e| {
                if e.workflow.is_some() {
                    return Bytes::from(
                        serde_json::json!({ "input": String::from_utf8_lossy(&e.payload) })
                            .to_string(),
                    );
                }
                let mut v = serde_json::json!({
                    "kind": e.target,
                    "priority": e.priority.as_str(),
                    // Mix payloads are built from ASCII (see mix.rs), so this is lossless.
                    "payload": String::from_utf8_lossy(&e.payload),
                    "timeout_ms": e.timeout.unwrap_or(request_timeout).as_millis() as u64,
                });
                if e.sandbox {
                    v["sandbox"] = true.into();
                }
                Bytes::from(v.to_string())
            })
            .collect();
        let topic_body = mix.bus.as_ref().map(|b| {
            Bytes::from(
                serde_json::json!({ "topic": b.topic, "payload": String::from_utf8_lossy(&b.payload) })
                    .to_string(),
            )
        });
        Ok(Target::Http(Http {
            client,
            nodes,
            next: AtomicUsize::new(0),
            token,
            bodies,
            paths,
            topic_body,
            bus_payload: mix
                .bus
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b.payload).into_owned())
                .unwrap_or_default(),
            agents,
            first_transport_error: std::sync::OnceLock::new(),
        }))
    }

    /// "embedded" or the node's URL (the nodes' URLs, comma-separated).
    pub fn describe(&self) -> String {
        match self {
            Target::Embedded(e) => format!("embedded {}-agent pool", e.agents),
            Target::Http(h) => h.nodes.join(", "),
        }
    }

    /// The nodes requests go to, in order (one name for an embedded pool).
    pub fn nodes(&self) -> Vec<String> {
        match self {
            Target::Embedded(_) => vec!["embedded".to_owned()],
            Target::Http(h) => h.nodes.clone(),
        }
    }

    /// The first HTTP exchange that failed, if any did (the report shows it).
    pub fn first_transport_error(&self) -> Option<String> {
        match self {
            Target::Embedded(_) => None,
            Target::Http(h) => h.first_transport_error.get().cloned(),
        }
    }

    /// Agents in the pool (direct bus messages go to each in turn).
    pub fn agents(&self) -> u32 {
        match self {
            Target::Embedded(e) => e.agents,
            Target::Http(h) => h.agents,
        }
    }

    /// Sends one request of every entry and fails if the target refuses any as invalid (an
    /// unknown capability, a kind without a sandbox policy): better at once than as a
    /// run full of rejections.
    pub async fn check(&self, mix: &Mix) -> Result<(), TargetError> {
        for (i, e) in mix.entries.iter().enumerate() {
            let class = self.call(i).await;
            let reason = match (self, class) {
                (_, Class::Rejected(RejectReason::Invalid)) => match self {
                    Target::Embedded(emb) => emb.refusal(i),
                    Target::Http(h) => h.refusal(i).await,
                },
                _ => continue,
            };
            return Err(TargetError::Entry {
                entry: e.name.clone(),
                index: i,
                reason,
            });
        }
        Ok(())
    }

    /// Sends entry `entry`'s request and waits for how it ends.
    pub async fn call(&self, entry: usize) -> Class {
        self.call_at(entry).await.0
    }

    /// Sends entry `entry`'s request (to the next node in turn) and waits for how it ends;
    /// with the node's index.
    pub async fn call_at(&self, entry: usize) -> (Class, u16) {
        match self {
            Target::Embedded(e) if e.entries[entry].workflow.is_some() => {
                (e.run_workflow(entry).await, 0)
            }
            Target::Embedded(e) => match e.runtime.try_submit(e.task(entry)) {
                Ok(handle) => (Class::of(handle.await.kind()), 0),
                Err(r) => (class_of_submit_error(&r.error), 0),
            },
            Target::Http(h) => {
                let node = h.pick();
                (h.call(entry, node).await, node as u16)
            }
        }
    }

    /// Sends entry `entry`'s request now, from the generator thread; its sample reaches
    /// `sink` when it ends. Never waits for the request.
    pub fn issue(self: &Arc<Self>, entry: usize, intended_ns: u64, sink: &Sink) {
        if sink.in_flight.load(Ordering::Relaxed) >= sink.max_in_flight {
            sink.record_blocking(sink.sample(
                entry,
                intended_ns,
                Class::Rejected(RejectReason::InFlightLimit),
                crate::record::NOT_SENT,
            ));
            return;
        }
        match &**self {
            Target::Embedded(e) if e.entries[entry].workflow.is_none() => {
                match e.runtime.try_submit(e.task(entry)) {
                    Ok(handle) => {
                        sink.in_flight.fetch_add(1, Ordering::Relaxed);
                        let sink2 = sink.clone();
                        sink.rt.spawn(async move {
                            let class = Class::of(handle.await.kind());
                            sink2.in_flight.fetch_sub(1, Ordering::Relaxed);
                            let _ = sink2
                                .tx
                                .send(sink2.sample(entry, intended_ns, class, 0))
                                .await;
                        });
                    }
                    Err(r) => sink.record_blocking(sink.sample(
                        entry,
                        intended_ns,
                        class_of_submit_error(&r.error),
                        0,
                    )),
                }
            }
            // A workflow's start awaits its commit to the history, so it runs as a task.
            Target::Http(_) | Target::Embedded(_) => {
                sink.in_flight.fetch_add(1, Ordering::Relaxed);
                let sink2 = sink.clone();
                let me = self.clone();
                sink.rt.spawn(async move {
                    let (class, node) = me.call_at(entry).await;
                    sink2.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let _ = sink2
                        .tx
                        .send(sink2.sample(entry, intended_ns, class, node))
                        .await;
                });
            }
        }
    }

    /// True if bus messages go out in batches (a node: one HTTP request per message would cost
    /// more than the message).
    pub fn batches_bus(&self) -> bool {
        matches!(self, Target::Http(_))
    }

    /// Sends many bus messages in one request (`POST /v1/messages/batch`); `done` gets one
    /// result per message, in order. Embedded targets send them one by one.
    pub fn send_messages(
        self: &Arc<Self>,
        items: Vec<(bool, u32)>,
        rt: &tokio::runtime::Handle,
        done: impl FnOnce(Vec<BusResult>) + Send + 'static,
    ) {
        match &**self {
            Target::Embedded(e) => done(
                items
                    .iter()
                    .map(|&(publish, to)| e.send_message(publish, to))
                    .collect(),
            ),
            Target::Http(_) => {
                let me = self.clone();
                rt.spawn(async move {
                    let Target::Http(h) = &*me else { return };
                    done(h.send_messages(&items).await);
                });
            }
        }
    }

    /// Sends one bus message: published to the mix's topic if `publish`, else sent directly
    /// to agent `to`. Embedded sends never wait (a full mailbox counts as dropped); HTTP sends
    /// are spawned and report through `done`.
    pub fn send_message(
        self: &Arc<Self>,
        publish: bool,
        to: u32,
        rt: &tokio::runtime::Handle,
        done: impl FnOnce(BusResult) + Send + 'static,
    ) {
        match &**self {
            Target::Embedded(e) => done(e.send_message(publish, to)),
            Target::Http(_) => {
                let me = self.clone();
                rt.spawn(async move {
                    let Target::Http(h) = &*me else { return };
                    done(h.send_message(publish, to).await);
                });
            }
        }
    }
}

impl Embedded {
    fn task(&self, entry: usize) -> Task {
        let e = &self.entries[entry];
        let t = Task::new(e.target, e.payload.clone())
            .priority(e.priority)
            .timeout(e.timeout);
        if e.sandbox { t.sandboxed() } else { t }
    }

    /// Starts entry `entry`'s workflow and waits for its end.
    async fn run_workflow(&self, entry: usize) -> Class {
        let e = &self.entries[entry];
        let (Some(engine), Some(input)) = (&self.engine, &e.workflow) else {
            return Class::Rejected(RejectReason::Invalid);
        };
        match engine.start(e.target, input).await {
            Ok(id) => match engine.finished(id, e.timeout).await {
                Ok(r) => class_of_execution(&r.status),
                Err(_) => Class::Error,
            },
            Err(troupe_workflow::WorkflowError::UnknownWorkflow(_)) => {
                Class::Rejected(RejectReason::Invalid)
            }
            Err(_) => Class::Error,
        }
    }

    fn refusal(&self, entry: usize) -> String {
        if self.entries[entry].workflow.is_some() {
            return format!(
                "workflow `{}` is not registered",
                self.entries[entry].target
            );
        }
        match self.runtime.try_submit(self.task(entry)) {
            Err(r) => r.error.to_string(),
            Ok(_) => "refused as invalid once, accepted on a second try".to_owned(),
        }
    }

    fn send_message(&self, publish: bool, to: u32) -> BusResult {
        let r = if publish {
            match &self.topic {
                Some(t) => t
                    .try_publish(self.bus_payload.clone())
                    .map(|r| (r.delivered, r.dropped)),
                None => return BusResult::Failed,
            }
        } else {
            self.bus
                .try_send(AgentId(to), self.bus_payload.clone())
                .map(|d| match d {
                    troupe::Delivery::Delivered => (1, 0),
                    troupe::Delivery::Dropped => (0, 1),
                })
        };
        match r {
            Ok((delivered, dropped)) => BusResult::Accepted {
                delivered: delivered as u64,
                dropped: dropped as u64,
            },
            Err(troupe::BusError::MailboxFull { .. }) => BusResult::Accepted {
                delivered: 0,
                dropped: 1,
            },
            Err(_) => BusResult::Failed,
        }
    }
}

/// The node's JSON error body.
#[derive(Deserialize)]
struct ErrorReply {
    error: String,
}

/// `POST /v1/workflows` of `w` to the node at `base`; why not, when refused.
async fn register_workflow(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    w: &troupe_workflow::Workflow,
) -> Result<(), String> {
    let body = serde_json::to_vec(w).map_err(|e| e.to_string())?;
    let mut req = client
        .post(format!("{base}/v1/workflows"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{base}: POST /v1/workflows failed: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = resp.bytes().await.unwrap_or_default();
    Err(format!(
        "{base}: POST /v1/workflows answered {status}: {}",
        String::from_utf8_lossy(&body)
    ))
}

/// `GET /v1/agents` of the node at `base`: how many agents it has.
async fn agents_of(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
) -> Result<u32, TargetError> {
    let node_err = |reason: String| TargetError::Node {
        url: base.to_owned(),
        reason,
    };
    let mut req = client.get(format!("{base}/v1/agents"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| node_err(format!("GET /v1/agents failed: {e}")))?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| node_err(format!("GET /v1/agents: {e}")))?;
    if !status.is_success() {
        return Err(node_err(format!(
            "GET /v1/agents answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let agents: AgentsReply = serde_json::from_slice(&body)
        .map_err(|e| node_err(format!("GET /v1/agents: unexpected body: {e}")))?;
    Ok(agents.agents)
}

impl Http {
    /// The next node in turn.
    fn pick(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len()
    }

    fn post(&self, node: usize, path: &str, body: Bytes) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .post(format!("{}{path}", self.nodes[node]))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        req
    }

    async fn call(&self, entry: usize, node: usize) -> Class {
        let resp = match self
            .post(node, &self.paths[entry], self.bodies[entry].clone())
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return self.transport(error_chain(&e)),
        };
        let status = resp.status().as_u16();
        // 202 to a workflow's `?wait=true`: still running when the wait ended.
        if status == 202 && self.paths[entry].starts_with("/v1/workflows/") {
            return Class::Timeout;
        }
        if status != 200 {
            let code = match status {
                429 | 503 => resp
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ErrorReply>(&b).ok())
                    .map(|e| e.error),
                _ => None,
            };
            return class_of_refusal(status, code.as_deref());
        }
        match resp
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<TaskReply>(&b))
        {
            Ok(Ok(TaskReply {
                outcome: Some(o), ..
            })) => class_of_outcome(&o),
            Ok(Ok(TaskReply {
                status: Some(s), ..
            })) => class_of_execution(&s),
            Ok(Ok(_)) => self.transport("an answer without an outcome".to_owned()),
            Ok(Err(e)) => self.transport(format!("an unreadable answer: {e}")),
            Err(e) => self.transport(error_chain(&e)),
        }
    }

    /// Keeps the first transport failure's text for the report; the rest are only counted.
    fn transport(&self, why: String) -> Class {
        let _ = self.first_transport_error.set(why);
        Class::Transport
    }

    async fn refusal(&self, entry: usize) -> String {
        match self
            .post(0, &self.paths[entry], self.bodies[entry].clone())
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status();
                let body = r.bytes().await.unwrap_or_default();
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body))
            }
            Err(e) => e.to_string(),
        }
    }

    async fn send_messages(&self, items: &[(bool, u32)]) -> Vec<BusResult> {
        let failed = || vec![BusResult::Failed; items.len()];
        let mut body = Vec::with_capacity(items.len() * 48);
        for &(publish, to) in items {
            match (&self.topic_body, publish) {
                (Some(b), true) => body.extend_from_slice(b),
                _ => body.extend_from_slice(
                    serde_json::json!({ "agent": to, "payload": self.bus_payload })
                        .to_string()
                        .as_bytes(),
                ),
            }
            body.push(b'\n');
        }
        let mut req = self
            .client
            .post(format!("{}/v1/messages/batch", self.nodes[self.pick()]))
            .header("content-type", "application/x-ndjson")
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let Ok(resp) = req.send().await else {
            return failed();
        };
        if !resp.status().is_success() {
            return failed();
        }
        #[derive(Deserialize)]
        struct Item {
            delivered: Option<u64>,
            dropped: Option<u64>,
            error: Option<String>,
        }
        #[derive(Deserialize)]
        struct Batch {
            results: Vec<Item>,
        }
        let Ok(Ok(batch)) = resp
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<Batch>(&b))
        else {
            return failed();
        };
        let mut out: Vec<BusResult> = batch
            .results
            .into_iter()
            .map(|i| match (i.delivered, i.dropped, i.error.as_deref()) {
                (Some(delivered), Some(dropped), _) => BusResult::Accepted { delivered, dropped },
                // A full mailbox refused the message: it was offered and not delivered.
                (_, _, Some("mailbox_full")) => BusResult::Accepted {
                    delivered: 0,
                    dropped: 1,
                },
                _ => BusResult::Failed,
            })
            .collect();
        out.resize(items.len(), BusResult::Failed);
        out
    }

    async fn send_message(&self, publish: bool, to: u32) -> BusResult {
        let body = match (&self.topic_body, publish) {
            (Some(b), true) => b.clone(),
            _ => Bytes::from(
                serde_json::json!({ "agent": to, "payload": self.bus_payload }).to_string(),
            ),
        };
        #[derive(Deserialize)]
        struct Sent {
            delivered: u64,
            dropped: u64,
        }
        let Ok(resp) = self.post(self.pick(), "/v1/messages", body).send().await else {
            return BusResult::Failed;
        };
        if resp.status().as_u16() == 429 {
            return BusResult::Accepted {
                delivered: 0,
                dropped: 1,
            };
        }
        if !resp.status().is_success() {
            return BusResult::Failed;
        }
        match resp
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<Sent>(&b))
        {
            Ok(Ok(s)) => BusResult::Accepted {
                delivered: s.delivered,
                dropped: s.dropped,
            },
            _ => BusResult::Failed,
        }
    }
}

/// An error with its causes: reqwest's own text ("error sending request") hides the reason
/// (connection refused, reset, no free ports) in its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_transport_error_names_its_cause() {
        let e = Outer(std::io::Error::other("tcp open error: Too many open files"));
        assert_eq!(
            error_chain(&e),
            "error sending request: tcp open error: Too many open files"
        );
    }

    #[test]
    fn http_statuses_and_outcomes_map_to_the_runtime_s_classes() {
        assert_eq!(
            class_of_status(429),
            Class::Rejected(RejectReason::QueueFull)
        );
        assert_eq!(
            class_of_status(503),
            Class::Rejected(RejectReason::ShuttingDown)
        );
        assert_eq!(class_of_status(404), Class::Rejected(RejectReason::Invalid));
        assert_eq!(class_of_status(500), Class::Error);
        assert_eq!(class_of_outcome("ok"), Class::Ok);
        assert_eq!(class_of_outcome("panic"), Class::Panic);
        assert_eq!(class_of_outcome("timeout"), Class::Timeout);
        assert_eq!(class_of_outcome("cancelled"), Class::Cancelled);
        assert_eq!(class_of_outcome("error"), Class::Error);
    }
}
