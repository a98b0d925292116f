//! memU-server's routes (`/memorize`, `/memorize/status/{task_id}`, `/retrieve`, `/categories`,
//! `/clear`), answered in its envelope `{"status": "success", "result": ...}` with its task
//! states, so its clients parse us. Unlike memU-server, every call needs a key and names its
//! user: `/retrieve` without `user_id` is refused instead of searching every user.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::cloud_v1::{CloudError, CloudJson};
use super::error::{ApiError, ApiJson, ErrorBody};
use super::memu::{self, MemorizeRequest, RetrieveRequest, ScopeRequest};
use crate::model::TaskStatus;

/// A success in memU-server's envelope.
pub struct Envelope<T>(T);

impl<T: Serialize> IntoResponse for Envelope<T> {
    fn into_response(self) -> Response {
        Json(serde_json::json!({"status": "success", "result": self.0})).into_response()
    }
}

/// An error in memU-server's shape (FastAPI's `detail`), with `status: error` and our `error`.
pub struct EnvelopeError(ApiError);

impl<E: Into<ApiError>> From<E> for EnvelopeError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for EnvelopeError {
    fn into_response(self) -> Response {
        let (status, mut body) = CloudError(self.0).into_body();
        body["status"] = "error".into();
        (status, Json(body)).into_response()
    }
}

impl From<CloudError> for EnvelopeError {
    fn from(e: CloudError) -> Self {
        Self(e.0)
    }
}

type Answer<T> = Result<Envelope<T>, EnvelopeError>;

/// memU-server's task ids look like `memorize-<32 hex>`; ours are UUIDs, shown in that form.
fn server_task_id(id: Uuid) -> String {
    format!("memorize-{}", id.simple())
}

/// memU-server's workflow states.
fn server_status(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Pending | TaskStatus::Processing => "RUNNING",
        TaskStatus::Success => "COMPLETED",
        TaskStatus::Failed => "FAILED",
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Queued {
    pub task_id: String,
    pub status: &'static str,
    pub message: String,
}

/// memU-server: queue a conversation.
#[utoipa::path(post, path = "/memorize", tag = "memu-server",
    request_body = MemorizeRequest,
    responses((status = 200, description = "`{status: success, result: {task_id, status, message}}`"),
        (status = 422, body = ErrorBody)))]
pub async fn memorize(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    CloudJson(req): CloudJson<MemorizeRequest>,
) -> Answer<Queued> {
    let user = req.user_id.clone();
    let (_, Json(queued)) = memu::memorize(State(state), caller, headers, ApiJson(req)).await?;
    Ok(Envelope(Queued {
        task_id: server_task_id(queued.task_id),
        status: "PENDING",
        message: format!("Memorization task submitted for user {user}"),
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Status {
    pub task_id: String,
    /// `RUNNING`, `COMPLETED` or `FAILED`.
    pub status: &'static str,
    /// `SUCCESS` when completed, the error when failed.
    pub detail: Option<String>,
}

/// memU-server: the state of a memorize task (`RUNNING`, `COMPLETED` or `FAILED`).
#[utoipa::path(get, path = "/memorize/status/{task_id}", tag = "memu-server",
    params(("task_id" = String, Path, description = "memorize-<32 hex digits>, or the UUID")),
    responses((status = 200, description = "`{status: success, result: {task_id, status, detail}}`"),
        (status = 404, body = ErrorBody)))]
pub async fn memorize_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_id): Path<String>,
) -> Answer<Status> {
    let Json(task) = memu::memorize_status(State(state), caller, Path(task_id)).await?;
    Ok(Envelope(Status {
        task_id: server_task_id(task.task_id),
        status: server_status(task.status),
        detail: match task.status {
            TaskStatus::Success => Some("SUCCESS".into()),
            TaskStatus::Failed => task.error.or_else(|| Some("Task execution failed".into())),
            _ => None,
        },
    }))
}

/// memU-server: retrieve, scoped by `user_id` (memU-server's searches every user).
#[utoipa::path(post, path = "/retrieve", tag = "memu-server",
    request_body = RetrieveRequest,
    responses((status = 200, description = "`{status: success, result: <memU retrieve result>}`"),
        (status = 422, body = ErrorBody)))]
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<RetrieveRequest>,
) -> Answer<serde_json::Value> {
    let original = match &req.query {
        Some(memu::Query::Text(text)) => Some(text.clone()),
        _ => None,
    };
    let Json(found) = memu::retrieve(State(state), caller, ApiJson(req)).await?;
    let mut result = serde_json::to_value(found)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    // memU's own names for what the answer already says.
    result["needs_retrieval"] = result["needs_memory"].clone();
    result["original_query"] = original.map_or(result["rewritten_query"].clone(), Into::into);
    result["next_step_query"] = serde_json::Value::Null;
    Ok(Envelope(result))
}

/// memU-server: the user's categories.
#[utoipa::path(post, path = "/categories", tag = "memu-server",
    request_body = ScopeRequest,
    responses((status = 200, description = "`{status: success, result: {categories}}`"),
        (status = 422, body = ErrorBody)))]
pub async fn categories(
    state: State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<ScopeRequest>,
) -> Answer<memu::CategoriesResponse> {
    let Json(categories) = memu::categories(state, caller, ApiJson(req)).await?;
    Ok(Envelope(categories))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Purged {
    pub purged_categories: u64,
    pub purged_items: u64,
    pub purged_resources: u64,
}

/// memU-server: delete a user's memories (or one agent's).
#[utoipa::path(post, path = "/clear", tag = "memu-server",
    request_body = ScopeRequest,
    responses((status = 200, description = "`{status: success, result: {purged_categories, purged_items, purged_resources}}`"),
        (status = 422, body = ErrorBody)))]
pub async fn clear(
    state: State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<ScopeRequest>,
) -> Answer<Purged> {
    let Json(cleared) = memu::clear(state, caller, ApiJson(req)).await?;
    Ok(Envelope(Purged {
        purged_categories: cleared.deleted.categories,
        purged_items: cleared.deleted.memory_items,
        purged_resources: cleared.deleted.resources,
    }))
}
