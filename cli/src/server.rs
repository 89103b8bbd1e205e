//! The node's HTTP API (axum): metrics, health, stats, tasks, messages, agents.
//!
//! Every error is JSON, `{"error": "<code>", "message": "<what and why>"}`, with a 4xx status
//! for anything the client can fix (a full queue is 429 with `Retry-After`; shutting down is
//! 503). Mutating endpoints (POST) require `Authorization: Bearer <token>` when a token is
//! configured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use dashmap::DashMap;
use serde::Deserialize;
use serde_json::json;
use troupe::{
    AgentId, BusError, HistogramHandle, MetricsExporter, Priority, RetryPolicy, RuntimeHandle,
    SubmitError, Task,
};

use crate::admission::Admission;
use crate::store::{TaskRecord, TaskStore};

/// The `method` label values: the methods the API knows, and `other` for anything a client
/// invents (the label set stays bounded).
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];

fn method_index(m: &Method) -> usize {
    METHODS[..7]
        .iter()
        .position(|k| *k == m.as_str())
        .unwrap_or(7)
}

/// One route's metric handles, resolved on its first request.
struct RouteMetrics {
    duration: HistogramHandle,
    requests: DashMap<(usize, u16), metrics::Counter>,
}

/// Shared state of the HTTP layer.
pub struct AppState {
    pub(crate) runtime: RuntimeHandle,
    /// The cluster this node joined, if any: tasks go through it (see `clustered`).
    pub(crate) cluster: Option<Arc<troupe_cluster::Cluster>>,
    /// The runtime's `tasks.default_timeout`: a clustered task's deadline counts from its
    /// acceptance here, whichever node runs it.
    pub(crate) default_timeout: Option<Duration>,
    exporter: Arc<MetricsExporter>,
    store: TaskStore,
    token: Option<String>,
    read_token: Option<String>,
    max_payload: usize,
    body_timeout: Duration,
    admission: Arc<Admission>,
    routes: DashMap<Arc<str>, Arc<RouteMetrics>>,
    /// The workflow engine, with `[workflows]` (set once at start).
    workflows: std::sync::OnceLock<Arc<troupe_workflow::Engine>>,
}

impl AppState {
    /// State for `runtime` with the node's HTTP settings.
    pub fn new(
        runtime: RuntimeHandle,
        http: &crate::config::HttpConfig,
        cluster: Option<Arc<troupe_cluster::Cluster>>,
        default_timeout: Option<Duration>,
    ) -> Arc<Self> {
        let exporter = MetricsExporter::new(&runtime);
        let shed = troupe::PerPriority::from_fn(|p| {
            exporter.counter(
                "troupe_tasks_rejected_total",
                "Tasks refused at admission, by reason.",
                &[
                    ("priority", p.as_str().to_owned()),
                    ("reason", "overloaded".to_owned()),
                ],
            )
        });
        Arc::new(AppState {
            admission: Admission::new(http.max_in_flight_tasks, shed),
            runtime,
            cluster,
            default_timeout,
            exporter: Arc::new(exporter),
            store: TaskStore::new(
                http.task_records,
                http.task_record_bytes,
                http.max_record_output_bytes,
            ),
            token: http.token.clone(),
            read_token: http.read_token.clone(),
            max_payload: http.max_payload_bytes,
            body_timeout: http.body_timeout,
            routes: DashMap::new(),
            workflows: std::sync::OnceLock::new(),
        })
    }

    /// Serves the workflow API with `engine` (once; later calls are ignored).
    pub fn set_workflows(&self, engine: Arc<troupe_workflow::Engine>) {
        let _ = self.workflows.set(engine);
    }

    /// The workflow engine, if the node has `[workflows]`.
    pub(crate) fn workflows(&self) -> Option<&Arc<troupe_workflow::Engine>> {
        self.workflows.get()
    }

    /// A JSON body, with the node's limits and errors.
    pub(crate) async fn read_json_body<T: serde::de::DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<T, ApiError> {
        read_json(self, headers, body).await
    }

    /// A body of at most the payload limit plus an envelope, within `http.body_timeout`.
    pub(crate) async fn read_small_body(&self, body: Body) -> Result<Bytes, ApiError> {
        read_body(self, body, self.max_payload.saturating_add(64 * 1024)).await
    }

    /// The node's load shedding.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The task records.
    pub fn store(&self) -> &TaskStore {
        &self.store
    }

    /// The exporter, for metrics of layers around the HTTP API (connections).
    pub fn exporter(&self) -> &MetricsExporter {
        &self.exporter
    }

    /// The exporter, shared (the workflow engine registers per-workflow metrics as workflows
    /// are registered, long after start).
    pub fn shared_exporter(&self) -> Arc<MetricsExporter> {
        self.exporter.clone()
    }

    /// The handles of `route`, created on its first request.
    fn route(&self, route: &Arc<str>) -> Arc<RouteMetrics> {
        if let Some(r) = self.routes.get(route) {
            return r.clone();
        }
        self.routes
            .entry(route.clone())
            .or_insert_with(|| {
                Arc::new(RouteMetrics {
                    duration: self.exporter.histogram(
                        "troupe_http_request_duration_seconds",
                        "HTTP request handling time.",
                        &[("route", route.to_string())],
                    ),
                    requests: DashMap::new(),
                })
            })
            .clone()
    }
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<crate::admission::Overloaded> for ApiError {
    fn from(o: crate::admission::Overloaded) -> Self {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "the node is at its load limit ({} tasks in flight, {} allowed at this \
                     priority; `http.max_in_flight_tasks`): retry later",
                    o.in_flight, o.limit
                ),
            )
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::QueueFull { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
            },
            SubmitError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            SubmitError::KindFull { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "kind_full", message)
            },
            SubmitError::Unavailable(_) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            },
            SubmitError::UnknownCapability(_) => ApiError::bad_request("unknown_kind", message),
            SubmitError::UnknownAgent(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_agent", message)
            }
            SubmitError::Invalid(_) => ApiError::bad_request("invalid_task", message),
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        let message = e.to_string();
        match e {
            BusError::NoSuchAgent(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_agent", message)
            }
            BusError::MailboxFull { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "mailbox_full", message)
            },
            BusError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            BusError::Timeout { .. } | BusError::NoReply(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "no_reply", message)
            }
            BusError::InvalidTopic { .. } => ApiError::bad_request("invalid_topic", message),
            BusError::TooManyTopics { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_topics", message)
            }
            BusError::NoSuchCapability(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_kind", message)
            }
            BusError::NoSubscribers(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "no_subscribers", message)
            }
            BusError::NoSuchNode(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_node", message)
            }
            BusError::BridgeDown(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                message,
            ),
        }
    }
}

/// The router with every route, auth and HTTP metrics.
pub fn router(state: Arc<AppState>) -> Router {
    // With a token set, everything but liveness, readiness and metrics needs it; reads also
    // take the read token.
    let mutating = Router::new()
        .route("/v1/tasks", post(submit_task))
        .route("/v1/tasks/batch", post(submit_batch))
        .route("/v1/messages", post(send_message))
        .route("/v1/messages/batch", post(send_batch))
        .route("/v1/requests", post(send_request))
        .route("/v1/workflows", post(crate::workflows::register))
        .route(
            "/v1/workflows/{name}/executions",
            post(crate::workflows::start),
        )
        .route("/v1/executions/{id}/cancel", post(crate::workflows::cancel))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let reads = Router::new()
        .route("/stats", get(stats))
        .route("/v1/tasks/{id}", get(task_status))
        .route("/v1/agents", get(agents))
        .route("/v1/workflows", get(crate::workflows::list_workflows))
        .route("/v1/executions", get(crate::workflows::list))
        .route("/v1/executions/{id}", get(crate::workflows::get))
        .route(
            "/v1/executions/{id}/events",
            get(crate::workflows::execution_events),
        )
        .route("/v1/events", get(crate::workflows::all_events))
        .route("/v1/cluster", get(crate::clustered::view))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_read_token,
        ));
    Router::new()
        .route("/metrics", get(metrics_text))
        .route(
            "/health",
            get(|| async { Json(json!({ "status": "alive" })) }),
        )
        .route("/health/ready", get(ready))
        .merge(reads)
        .merge(mutating)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), record_http))
        .with_state(state)
}

async fn record_http(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    static UNMATCHED: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from("unmatched"));
    let route: Arc<str> = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| Arc::from(p.as_str()))
        .unwrap_or_else(|| UNMATCHED.clone());
    let method = method_index(req.method());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let metrics = state.route(&route);
    metrics.duration.record(started.elapsed());
    if let Some(c) = metrics.requests.get(&(method, status)) {
        c.increment(1);
    } else {
        metrics
            .requests
            .entry((method, status))
            .or_insert_with(|| {
                state.exporter.counter(
                    "troupe_http_requests_total",
                    "HTTP requests served.",
                    &[
                        ("route", route.to_string()),
                        ("method", METHODS[method].to_owned()),
                        ("status", status.to_string()),
                    ],
                )
            })
            .increment(1);
    }
    resp
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

fn unauthorized(what: &str) -> Response {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!("this endpoint needs `Authorization: Bearer <{what}>`"),
    )
    .into_response()
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        if bearer(&headers) != Some(token.as_str()) {
            return unauthorized("token");
        }
    }
    next.run(req).await
}

async fn require_read_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = bearer(&headers);
        let ok = given == Some(token.as_str())
            || (state.read_token.is_some() && given == state.read_token.as_deref());
        if !ok {
            return unauthorized("token or read token");
        }
    }
    next.run(req).await
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.exporter.render(),
    )
        .into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let mut health = state.runtime.health();
    if let Some(c) = &state.cluster {
        // Without NATS this node cannot accept work durably: not ready, with the reason.
        let reasons = c.health_reasons();
        if !reasons.is_empty() {
            health.ready = false;
            health.reasons.extend(reasons);
        }
    }
    let status = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health)).into_response()
}

async fn stats(State(state): State<Arc<AppState>>) -> Response {
    let mut v = serde_json::to_value(state.runtime.stats()).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("admission".into(), json!(state.admission.stats()));
        o.insert(
            "records".into(),
            json!({
                "count": state.store.count(),
                "pending": state.store.pending(),
                "bytes": state.store.bytes(),
            }),
        );
    }
    Json(v).into_response()
}

async fn agents(State(state): State<Arc<AppState>>) -> Response {
    let h = state.runtime.health();
    Json(json!({ "agents": h.agents, "max_agents": h.max_agents, "tiers": h.tiers }))
        .into_response()
}

async fn task_status(
    State(state): State<Arc<AppState>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    // A path that is not valid UTF-8 after percent-decoding is refused by the extractor; answer
    // it like any other bad id, with the JSON error body.
    let Path(id) = id.map_err(|e| ApiError::bad_request("invalid_id", e.body_text()))?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_id", format!("`{id}` is not a task id")))?;
    if let Some(c) = &state.cluster {
        return crate::clustered::status(c, id).await;
    }
    state
        .store
        .get(id)
        .map(|r| Json(r).into_response())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_task",
                format!("no task {id} (unknown, or forgotten after many newer tasks)"),
            )
        })
}

/// True if the request's content type starts with `prefix`.
fn content_type_is(headers: &HeaderMap, prefix: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(prefix))
}

fn unsupported_media_type(message: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        message,
    )
}

/// Reads a JSON body within the payload limit, with JSON errors for every failure.
async fn read_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    if !content_type_is(headers, "application/json") {
        return Err(unsupported_media_type(
            "send the body as `Content-Type: application/json`",
        ));
    }
    // The envelope around the payload is small; allow it on top of the payload limit.
    let limit = state.max_payload.saturating_add(64 * 1024);
    let bytes = read_body(state, body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("request body: {e}")))
}

/// Reads a body of at most `limit` bytes within `http.body_timeout`.
async fn read_body(state: &AppState, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {:?} (`http.body_timeout`)",
                    state.body_timeout
                ),
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body exceeds {limit} bytes"),
            )
        })
}

pub(crate) fn check_payload(state: &AppState, payload: &str) -> Result<(), ApiError> {
    if payload.len() > state.max_payload {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "payload is {} bytes; the limit (`http.max_payload_bytes`) is {}",
                payload.len(),
                state.max_payload
            ),
        ));
    }
    Ok(())
}

/// `POST /v1/tasks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubmitBody {
    /// Target kind or capability.
    pub(crate) kind: Option<String>,
    /// Target agent id.
    pub(crate) agent: Option<u32>,
    #[serde(default)]
    pub(crate) priority: Option<String>,
    #[serde(default)]
    pub(crate) payload: String,
    pub(crate) timeout_ms: Option<u64>,
    #[serde(default)]
    pub(crate) sandbox: bool,
    /// Extra attempts after a failure.
    #[serde(default)]
    pub(crate) retries: u32,
    /// Submissions with the same key are one task (cluster only: JetStream deduplicates).
    pub(crate) idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    #[serde(default)]
    wait: bool,
}

/// The priority a body names (normal when it names none).
pub(crate) fn priority_of(p: Option<&str>) -> Result<Priority, ApiError> {
    match p {
        None => Ok(Priority::Normal),
        Some(p) => p
            .parse::<Priority>()
            .map_err(|e| ApiError::bad_request("unknown_priority", e.to_string())),
    }
}

/// A body's `timeout_ms`, checked.
pub(crate) fn timeout_of(ms: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match ms {
        Some(0) => Err(ApiError::bad_request(
            "invalid_task",
            "`timeout_ms` must be above zero",
        )),
        Some(ms) => Ok(Some(Duration::from_millis(ms))),
        None => Ok(None),
    }
}

/// Validates and submits one task: its handle, priority and load permit.
fn submit_one(
    state: &AppState,
    b: SubmitBody,
) -> Result<(troupe::TaskHandle, Priority, crate::admission::Permit), ApiError> {
    check_payload(state, &b.payload)?;
    let priority = priority_of(b.priority.as_deref())?;
    if b.idempotency_key.is_some() {
        return Err(ApiError::bad_request(
            "unsupported",
            "`idempotency_key` needs a cluster (`[cluster]`): a single node keeps no record \
             of keys",
        ));
    }
    let timeout = timeout_of(b.timeout_ms)?;
    // Shed before anything else is built when the node is past its load limit; the permit is
    // held until the task's outcome is known.
    let permit = state.admission.try_enter(priority)?;
    let mut task = match (b.kind, b.agent) {
        (Some(kind), None) => Task::new(kind, b.payload),
        (None, Some(agent)) => Task::new(AgentId(agent), b.payload),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_target",
                "give exactly one of `kind` and `agent`",
            ));
        }
    }
    .priority(priority);
    if let Some(t) = timeout {
        task = task.timeout(t);
    }
    if b.retries > 0 {
        task = task.retry(RetryPolicy::attempts(
            b.retries.saturating_add(1),
            Duration::from_millis(10),
        ));
    }
    if b.sandbox {
        task = task.sandboxed();
    }
    let handle = state
        .runtime
        .try_submit(task)
        .map_err(|r| ApiError::from(r.error))?;
    state
        .store
        .insert(TaskRecord::pending(handle.id(), priority));
    Ok((handle, priority, permit))
}

/// Records the outcome of an accepted task in the background.
fn record_when_done(
    state: &Arc<AppState>,
    handle: troupe::TaskHandle,
    priority: Priority,
    permit: crate::admission::Permit,
) {
    let st = state.clone();
    let id = handle.id();
    tokio::spawn(async move {
        let outcome = handle.await;
        drop(permit);
        st.store.update(TaskRecord::done(id, priority, &outcome));
    });
}

async fn submit_task(
    State(state): State<Arc<AppState>>,
    query: Result<Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let b: SubmitBody = read_json(&state, &headers, body).await?;
    if let Some(c) = &state.cluster {
        return crate::clustered::submit(&state, c, b, query.wait).await;
    }
    let (handle, priority, permit) = submit_one(&state, b)?;
    let id = handle.id();
    if query.wait {
        let outcome = handle.await;
        drop(permit);
        // The response carries the whole output; the stored record may not (its cap).
        let record = TaskRecord::done(id, priority, &outcome);
        state.store.update(record.clone());
        return Ok((StatusCode::OK, Json(record)).into_response());
    }
    record_when_done(&state, handle, priority, permit);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id.0, "status": "pending" })),
    )
        .into_response())
}

/// Most items one batch request may carry.
const MAX_BATCH: usize = 10_000;

/// One item's result in a batch: what the single endpoint would have answered.
pub(crate) fn item_error(e: ApiError) -> serde_json::Value {
    json!({ "status": e.status.as_u16(), "error": e.code, "message": e.message })
}

/// Reads a batch body: a JSON array of items, or NDJSON (one item per line).
async fn read_batch<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<Result<T, ApiError>>, ApiError> {
    let ndjson = content_type_is(headers, "application/x-ndjson");
    // A batch may carry many payloads: up to MAX_BATCH of them within the size limit.
    let limit = state
        .max_payload
        .saturating_add(64 * 1024)
        .saturating_mul(16);
    let bytes = read_body(state, body, limit).await?;
    let items: Vec<Result<T, ApiError>> = if ndjson {
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(|l| {
                serde_json::from_slice(l)
                    .map_err(|e| ApiError::bad_request("invalid_json", format!("item: {e}")))
            })
            .collect()
    } else {
        if !content_type_is(headers, "application/json") {
            return Err(unsupported_media_type(
                "send a batch as `application/json` (an array) or `application/x-ndjson`",
            ));
        }
        let values: Vec<serde_json::Value> = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("a batch is a JSON array: {e}"))
        })?;
        values
            .into_iter()
            .map(|v| {
                serde_json::from_value(v)
                    .map_err(|e| ApiError::bad_request("invalid_json", format!("item: {e}")))
            })
            .collect()
    };
    if items.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "batch_too_large",
            format!(
                "a batch carries at most {MAX_BATCH} items, this one {}",
                items.len()
            ),
        ));
    }
    Ok(items)
}

/// `POST /v1/tasks/batch`: many submissions in one request; one result per item, in order
/// (`{"id", "status": "pending"}` or the error the single endpoint would have answered).
async fn submit_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let items: Vec<Result<SubmitBody, ApiError>> = read_batch(&state, &headers, body).await?;
    if let Some(c) = &state.cluster {
        return Ok(crate::clustered::submit_batch(&state, c, items).await);
    }
    let mut accepted = 0usize;
    let results: Vec<serde_json::Value> = items
        .into_iter()
        .map(|item| match item.and_then(|b| submit_one(&state, b)) {
            Ok((handle, priority, permit)) => {
                accepted += 1;
                let id = handle.id();
                record_when_done(&state, handle, priority, permit);
                json!({ "id": id.0, "status": "pending" })
            }
            Err(e) => item_error(e),
        })
        .collect();
    Ok((
        StatusCode::OK,
        Json(json!({ "accepted": accepted, "results": results })),
    )
        .into_response())
}

/// `POST /v1/messages` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    topic: Option<String>,
    agent: Option<u32>,
    /// The node of `agent`, in a cluster (this node when absent).
    node: Option<String>,
    #[serde(default)]
    payload: String,
}

/// Sends one message; (delivered, dropped).
async fn send_one(state: &AppState, b: MessageBody) -> Result<(usize, usize), ApiError> {
    check_payload(state, &b.payload)?;
    let bus = state.runtime.bus();
    if b.node.is_some() && b.topic.is_some() {
        return Err(ApiError::bad_request(
            "invalid_target",
            "`node` goes with `agent`; a topic reaches its subscribers on every node",
        ));
    }
    match (b.topic, b.agent) {
        (Some(topic), None) => {
            // Invalid names (empty, too long, odd characters) are a 400 `invalid_topic`.
            let r = bus.publish(&topic, b.payload).await?;
            Ok((r.delivered, r.dropped))
        }
        (None, Some(agent)) => {
            let delivery = match &b.node {
                Some(node) => bus.remote(node).send(AgentId(agent), b.payload).await?,
                None => bus.send(AgentId(agent), b.payload).await?,
            };
            match delivery {
                troupe::Delivery::Delivered => Ok((1, 0)),
                troupe::Delivery::Dropped => Ok((0, 1)),
            }
        }
        _ => Err(ApiError::bad_request(
            "invalid_target",
            "give exactly one of `topic` and `agent`",
        )),
    }
}

async fn send_message(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: MessageBody = read_json(&state, &headers, body).await?;
    let (delivered, dropped) = send_one(&state, b).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "delivered": delivered, "dropped": dropped })),
    )
        .into_response())
}

/// `POST /v1/messages/batch`: many messages in one request; one result per item, in order.
async fn send_batch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let items: Vec<Result<MessageBody, ApiError>> = read_batch(&state, &headers, body).await?;
    let (mut delivered, mut dropped, mut failed) = (0usize, 0usize, 0usize);
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let r = match item {
            Ok(b) => send_one(&state, b).await,
            Err(e) => Err(e),
        };
        results.push(match r {
            Ok((d, x)) => {
                delivered += d;
                dropped += x;
                json!({ "delivered": d, "dropped": x })
            }
            Err(e) => {
                failed += 1;
                item_error(e)
            }
        });
    }
    Ok((
        StatusCode::OK,
        Json(json!({
            "delivered": delivered,
            "dropped": dropped,
            "failed": failed,
            "results": results,
        })),
    )
        .into_response())
}

/// `POST /v1/requests` body: ask one agent (on this node or, with `node`, another) and wait.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestBody {
    agent: u32,
    node: Option<String>,
    #[serde(default)]
    payload: String,
    /// How long to wait for the reply (1 s when absent).
    timeout_ms: Option<u64>,
}

/// `POST /v1/requests`: a bus request/reply; 200 `{"reply"}`, 504 when the agent did not answer
/// in time.
async fn send_request(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let b: RequestBody = read_json(&state, &headers, body).await?;
    check_payload(&state, &b.payload)?;
    let timeout = timeout_of(b.timeout_ms)?.unwrap_or(Duration::from_secs(1));
    let bus = state.runtime.bus();
    let reply = match &b.node {
        Some(node) => {
            bus.remote(node)
                .request(AgentId(b.agent), b.payload, timeout)
                .await
        }
        None => bus.request(AgentId(b.agent), b.payload, timeout).await,
    };
    // A timeout or no reply is 504 `no_reply`, like every bus error mapped below.
    let reply = reply?;
    Ok(Json(json!({ "reply": String::from_utf8_lossy(&reply) })).into_response())
}
