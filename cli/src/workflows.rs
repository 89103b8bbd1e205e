//! The node's workflow API (`[workflows]`): register and list workflows, start, read, list and
//! cancel executions, and follow their events live as Server-Sent Events. The engine is
//! troupe-workflow's; this module only maps HTTP onto it.
//!
//! * `GET /v1/workflows`, `POST /v1/workflows` (a definition as JSON, or TOML / YAML with
//!   `Content-Type: application/toml` / `application/yaml`) → 201, or 400 `invalid_workflow`
//!   naming the step and field.
//! * `POST /v1/workflows/{name}/executions` `{"input": "..."}` → 202 `{"id"}` once stored.
//! * `GET /v1/executions?workflow=&status=&since_ms=&until_ms=&limit=&offset=`, newest first.
//! * `GET /v1/executions/{id}` (steps, timings, progress), `POST /v1/executions/{id}/cancel`.
//! * `GET /v1/executions/{id}/events`: the events so far, then live ones until `finished`.
//! * `GET /v1/events`: every execution's events from now on.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use troupe_workflow::{Engine, Event, Filter, Format, Workflow, WorkflowError};

use crate::server::{ApiError, AppState};

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        let message = e.to_string();
        match e {
            WorkflowError::Definition { .. } => ApiError::bad_request("invalid_workflow", message),
            WorkflowError::UnknownWorkflow(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_workflow", message)
            }
            WorkflowError::UnknownExecution(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_execution", message)
            }
            WorkflowError::Ended(_) => ApiError::new(StatusCode::CONFLICT, "ended", message),
            WorkflowError::Store(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "history", message)
            }
            // Only `Engine::open` refuses a setting, and the node checks its config first.
            WorkflowError::Config { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "engine_config", message)
            }
        }
    }
}

fn engine(state: &AppState) -> Result<&Arc<Engine>, ApiError> {
    state.workflows().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_workflows",
            "this node has no `[workflows]` section",
        )
    })
}

pub(crate) async fn list_workflows(
    State(state): State<Arc<AppState>>,
) -> Result<Response, ApiError> {
    let all = engine(&state)?.workflows();
    let all: Vec<&Workflow> = all.iter().map(AsRef::as_ref).collect();
    Ok(Json(json!({ "workflows": all })).into_response())
}

pub(crate) async fn register(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let engine = engine(&state)?;
    let format = match headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim())
    {
        Some("application/json") => Format::Json,
        Some("application/toml") => Format::Toml,
        Some("application/yaml" | "application/x-yaml") => Format::Yaml,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the definition as application/json, application/toml or application/yaml",
            ));
        }
    };
    let bytes = state.read_small_body(body).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::bad_request("invalid_workflow", "the definition is not UTF-8"))?;
    let workflow = Workflow::parse(text, format)?;
    let name = workflow.name.clone();
    engine.register(workflow)?;
    Ok((StatusCode::CREATED, Json(json!({ "workflow": name }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    #[serde(default)]
    input: String,
}

/// `?wait=true` holds the answer until the execution ends, up to `wait_ms` (default
/// [`DEFAULT_WAIT`]): for scripts and the load tester, which need how it ended, not its steps.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartQuery {
    #[serde(default)]
    wait: bool,
    wait_ms: Option<u64>,
}

/// How long `?wait=true` waits when `wait_ms` is not given.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

pub(crate) async fn start(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: Result<Query<StartQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let engine = engine(&state)?;
    let b: StartBody = state.read_json_body(&headers, body).await?;
    let id = engine.start(&name, &b.input).await?;
    if q.wait {
        let limit = q.wait_ms.map_or(DEFAULT_WAIT, Duration::from_millis);
        let r = engine.finished(id, limit).await?;
        // Still running at the limit: the same answer as without `wait`.
        let code = if r.status == "running" {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        return Ok((code, Json(r)).into_response());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": "running" })),
    )
        .into_response())
}

pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    filter: Result<Query<Filter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(filter) =
        filter.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    Ok(Json(engine(&state)?.list(filter).await?).into_response())
}

pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    Ok(Json(engine(&state)?.get(id).await?).into_response())
}

pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Response, ApiError> {
    let engine = engine(&state)?;
    engine.get(id).await?;
    engine.cancel(id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": "cancelling" })),
    )
        .into_response())
}

fn sse_event(e: &Event) -> SseEvent {
    SseEvent::default()
        .event(e.kind.clone())
        .id(e.seq.to_string())
        .json_data(e)
        .unwrap_or_default()
}

/// The events of one execution: those stored so far, then live ones, until `finished`.
pub(crate) async fn execution_events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let engine = engine(&state)?.clone();
    // Subscribe before reading the stored ones, so nothing falls between the two.
    let live = engine.subscribe();
    engine.get(id).await?;
    let stored = engine.events(id).await?;
    let last = stored.last().map_or(0, |e| e.seq);
    let done = stored.iter().any(|e| e.kind == "finished");
    struct S {
        stored: std::vec::IntoIter<Event>,
        live: Option<tokio::sync::broadcast::Receiver<Event>>,
        engine: Arc<Engine>,
        id: u64,
        last: u64,
    }
    let s = S {
        stored: stored.into_iter(),
        live: (!done).then_some(live),
        engine,
        id,
        last,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        if let Some(e) = s.stored.next() {
            return Some((Ok(sse_event(&e)), s));
        }
        loop {
            let rx = s.live.as_mut()?;
            match rx.recv().await {
                Ok(e) if e.execution == s.id && e.seq > s.last => {
                    s.last = e.seq;
                    if e.kind == "finished" {
                        s.live = None;
                    }
                    return Some((Ok(sse_event(&e)), s));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the broadcast: catch up from the history, in order.
                    let missed = s.engine.events(s.id).await.unwrap_or_default();
                    let rest: Vec<Event> = missed.into_iter().filter(|e| e.seq > s.last).collect();
                    if let Some(l) = rest.last() {
                        s.last = l.seq;
                        if rest.iter().any(|e| e.kind == "finished") {
                            s.live = None;
                        }
                    }
                    s.stored = rest.into_iter();
                    if let Some(e) = s.stored.next() {
                        return Some((Ok(sse_event(&e)), s));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Every execution's events from now on.
pub(crate) async fn all_events(
    State(state): State<Arc<AppState>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let rx = engine(&state)?.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = match rx.recv().await {
            Ok(e) => sse_event(&e),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                SseEvent::default().event("lagged").data(format!(
                    "{n} events missed; read them from /v1/executions/{{id}}/events"
                ))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(item), rx))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
