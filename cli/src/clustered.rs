//! The HTTP API of a node that joined a cluster (`[cluster]`): tasks go to the cluster's
//! JetStream stream instead of this node's queues, and their status comes from the cluster's
//! outcome bucket, so any node answers for any task.
//!
//! What changes for a client, and only here:
//! * `POST /v1/tasks` answers 202 once JetStream has stored the task (it survives this node);
//!   `idempotency_key` makes a resubmission within `cluster.dedup_window` the same task
//!   (`"duplicate": true`, same id). Agent-addressed tasks are refused: an agent id names a
//!   slot of one node's pool, and a durable task must be free to run on any node.
//! * `?wait=true` waits for the outcome wherever the task runs; if it has none within its
//!   deadline (or `cluster.ack_wait`, when a node running it may have died) the answer is 202
//!   with the id, to poll.
//! * `GET /v1/tasks/{id}` reads the cluster's record: `done` with the node and attempts,
//!   `pending`, or 404.
//! * `GET /v1/cluster` lists the nodes and the stream's backlog.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use troupe_cluster::{Cluster, ClusterError, ClusterTask, TaskStatus};

use crate::server::{
    ApiError, AppState, SubmitBody, check_payload, item_error, priority_of, timeout_of,
};

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let message = e.to_string();
        match e {
            ClusterError::Unreachable(_) | ClusterError::JetStream(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster_unavailable",
                    message,
                )
            },
            ClusterError::NoNode(_) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            },
            ClusterError::BacklogFull { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "backlog_full", message)
            },
            ClusterError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            ClusterError::Invalid(_) | ClusterError::Config { .. } => {
                ApiError::bad_request("invalid_task", message)
            }
        }
    }
}

/// A body as a cluster task.
fn task_of(state: &AppState, b: SubmitBody, wait: bool) -> Result<ClusterTask, ApiError> {
    check_payload(state, &b.payload)?;
    let priority = priority_of(b.priority.as_deref())?;
    let timeout = timeout_of(b.timeout_ms)?.or(state.default_timeout);
    let target = match (b.kind, b.agent) {
        (Some(kind), None) => kind,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_target",
                "in a cluster a task names a `kind` or capability, not an `agent`: an agent id \
                 is a slot of one node's pool, and a durable task must be free to run on any \
                 node (send the agent a bus message instead)",
            ));
        }
        _ => {
            return Err(ApiError::bad_request(
                "invalid_target",
                "give exactly one of `kind` and `agent`",
            ));
        }
    };
    if let Some(key) = &b.idempotency_key {
        if key.is_empty() || key.len() > 256 {
            return Err(ApiError::bad_request(
                "invalid_task",
                "`idempotency_key` must be 1-256 bytes",
            ));
        }
    }
    Ok(ClusterTask {
        target,
        priority,
        payload: Bytes::from(b.payload),
        timeout,
        retries: b.retries,
        sandboxed: b.sandbox,
        idempotency_key: b.idempotency_key,
        wait,
    })
}

/// `POST /v1/tasks` on a clustered node.
pub(crate) async fn submit(
    state: &AppState,
    cluster: &Cluster,
    b: SubmitBody,
    wait: bool,
) -> Result<Response, ApiError> {
    let task = task_of(state, b, wait)?;
    let timeout = task.timeout;
    let accepted = cluster.submit(task).await?;
    let pending = || {
        (
            StatusCode::ACCEPTED,
            Json(json!({
                "id": accepted.id,
                "status": "pending",
                "duplicate": accepted.duplicate,
            })),
        )
            .into_response()
    };
    if !wait {
        return Ok(pending());
    }
    // Long enough for the deadline, or for one redelivery if the running node dies.
    let limit = timeout
        .unwrap_or(Duration::from_secs(30))
        .max(cluster.config().ack_wait)
        + Duration::from_secs(1);
    match cluster.wait(accepted.id, limit, true).await? {
        Some(record) => Ok((StatusCode::OK, Json(record)).into_response()),
        None => Ok(pending()),
    }
}

/// `POST /v1/tasks/batch` on a clustered node: one round trip to JetStream for the batch.
pub(crate) async fn submit_batch(
    state: &AppState,
    cluster: &Cluster,
    items: Vec<Result<SubmitBody, ApiError>>,
) -> Response {
    let mut results: Vec<Option<serde_json::Value>> = Vec::with_capacity(items.len());
    let mut tasks = Vec::new();
    for item in items {
        match item.and_then(|b| task_of(state, b, false)) {
            Ok(t) => {
                tasks.push(t);
                results.push(None);
            }
            Err(e) => results.push(Some(item_error(e))),
        }
    }
    let mut outcomes = cluster.submit_many(tasks).await.into_iter();
    let mut accepted = 0usize;
    let results: Vec<serde_json::Value> = results
        .into_iter()
        .map(|r| match r {
            Some(err) => err,
            None => match outcomes.next() {
                Some(Ok(a)) => {
                    accepted += 1;
                    json!({ "id": a.id, "status": "pending", "duplicate": a.duplicate })
                }
                Some(Err(e)) => item_error(e.into()),
                None => item_error(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "no result for this item",
                )),
            },
        })
        .collect();
    (
        StatusCode::OK,
        Json(json!({ "accepted": accepted, "results": results })),
    )
        .into_response()
}

/// `GET /v1/tasks/{id}` on a clustered node.
pub(crate) async fn status(cluster: &Cluster, id: u64) -> Result<Response, ApiError> {
    match cluster.status(id).await? {
        TaskStatus::Done(record) => Ok(Json(record).into_response()),
        TaskStatus::Pending => Ok(Json(json!({ "id": id, "status": "pending" })).into_response()),
        TaskStatus::Unknown => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_task",
            format!(
                "no task {id} in the cluster (never accepted, or its outcome is older than \
                 `cluster.outcome_retention`)"
            ),
        )),
    }
}

/// `GET /v1/cluster`: this node, every node that announced itself, and the stream's backlog.
pub(crate) async fn view(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let Some(c) = &state.cluster else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_clustered",
            "this node has no `[cluster]` section",
        ));
    };
    let nodes = c.members().await?;
    let backlog = c.backlog().await?;
    let backlog: serde_json::Map<String, serde_json::Value> = troupe::Priority::ALL
        .iter()
        .map(|p| (p.as_str().to_owned(), json!(backlog[p.index()])))
        .collect();
    Ok(Json(json!({
        "node": c.node(),
        "cluster": c.config().name,
        "connected": c.connected(),
        "nodes": nodes,
        "backlog": backlog,
    }))
    .into_response())
}
