//! memU Cloud API v1, as memU's published Python SDK (`memu-py`, `MemuClient`) calls it, so its
//! users move here by changing the base URL. Unlike memU Cloud, every call is confined to the
//! caller's tenant and to one `user_id`. Bad input answers 422 with FastAPI's `detail` list next
//! to our `error` body: the SDK raises its validation exception on that status.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ErrorBody, ErrorDetail};
use super::memu::{MemorizeRequest, check_id, memorize_input};
use crate::model::{Category, ItemFilter, MemoryItem, TaskStatus};
use crate::service::{RetrieveInput, RetrieveMethod};

/// Items listed per category when a caller asks for memories instead of the summary.
const CATEGORY_MEMORIES: usize = 50;
/// Deepest search when `include_categories` filters the nearest items.
const MAX_FILTERED_DEPTH: usize = 2_000;

/// An [`ApiError`] answered in both shapes: ours (`error`) and FastAPI's (`detail`), which
/// memU Cloud's clients read.
pub struct CloudError(pub ApiError);

impl From<ApiError> for CloudError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<crate::service::ServiceError> for CloudError {
    fn from(e: crate::service::ServiceError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for CloudError {
    fn into_response(self) -> Response {
        let (status, body) = self.into_body();
        (status, Json(body)).into_response()
    }
}

impl CloudError {
    /// The status and the body: our `error` object and FastAPI's `detail`.
    pub fn into_body(self) -> (StatusCode, serde_json::Value) {
        let ApiError {
            status,
            code,
            message,
            field,
        } = self.0;
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), message = %message, "request failed");
        }
        let detail = if status == StatusCode::UNPROCESSABLE_ENTITY {
            let loc: Vec<&str> = std::iter::once("body").chain(field.as_deref()).collect();
            serde_json::json!([{"loc": loc, "msg": message, "type": code}])
        } else {
            serde_json::json!(message)
        };
        let error = ErrorBody {
            error: ErrorDetail {
                code,
                message,
                field,
            },
        };
        let mut body = serde_json::to_value(error).expect("error bodies serialize");
        body["detail"] = detail;
        (status, body)
    }
}

/// A JSON body whose errors answer in [`CloudError`]'s shape.
pub struct CloudJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for CloudJson<T> {
    type Rejection = CloudError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let ApiJson(value) = ApiJson::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// memU Cloud's task states (Celery's names).
fn cloud_status(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Pending => "PENDING",
        TaskStatus::Processing => "STARTED",
        TaskStatus::Success => "SUCCESS",
        TaskStatus::Failed => "FAILURE",
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CloudMemorizeResponse {
    pub task_id: Uuid,
    /// `PENDING`, `STARTED`, `SUCCESS` or `FAILURE`.
    pub status: &'static str,
    pub message: String,
}

/// Queue a conversation (`conversation` messages or `conversation_text`) for memorization.
#[utoipa::path(post, path = "/api/v1/memory/memorize", tag = "memu-cloud-v1",
    request_body = MemorizeRequest,
    responses((status = 200, body = CloudMemorizeResponse), (status = 422, body = ErrorBody)))]
pub async fn memorize(
    State(state): State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<MemorizeRequest>,
) -> Result<Json<CloudMemorizeResponse>, CloudError> {
    let input = memorize_input(&state, &caller, req)?;
    let (task, repeated) = state.service.memorize(input).await?;
    Ok(Json(CloudMemorizeResponse {
        task_id: task.id,
        status: cloud_status(task.status),
        message: if repeated {
            "this conversation was memorized before for this user and agent: returning its task"
                .into()
        } else {
            "memorize task queued".into()
        },
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CloudTaskStatus {
    pub task_id: Uuid,
    /// `PENDING`, `STARTED`, `SUCCESS` or `FAILURE`.
    pub status: &'static str,
    /// The error of a failed task, or the attempts so far.
    pub detail_info: String,
}

/// Status of a memorize task.
#[utoipa::path(get, path = "/api/v1/memory/memorize/status/{task_id}", tag = "memu-cloud-v1",
    params(("task_id" = Uuid, Path)),
    responses((status = 200, body = CloudTaskStatus), (status = 404, body = ErrorBody)))]
pub async fn memorize_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_id): Path<String>,
) -> Result<Json<CloudTaskStatus>, CloudError> {
    let id = super::memu::parse_task_id(&task_id)?;
    let task = state.service.task(caller.tenant_id(), id).await?;
    let detail_info = match (&task.error, task.status) {
        (Some(error), _) => error.clone(),
        (None, TaskStatus::Success) => "memorized".to_string(),
        (None, _) => format!("attempts: {}", task.attempts),
    };
    Ok(Json(CloudTaskStatus {
        task_id: task.id,
        status: cloud_status(task.status),
        detail_info,
    }))
}

/// A memory as memU Cloud lists it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CloudMemory {
    pub memory_id: Uuid,
    /// The category the item fits best (`uncategorized` when it is filed nowhere).
    pub category: String,
    pub content: String,
    /// When it happened; the creation time when the conversation did not say.
    pub happened_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// memU on Kubernetes: the memory type (`profile`, `event`, ...).
    pub memory_type: crate::model::MemoryType,
}

fn cloud_memory(item: MemoryItem, categories: &HashMap<Uuid, Vec<String>>) -> CloudMemory {
    CloudMemory {
        category: categories
            .get(&item.id)
            .and_then(|names| names.first().cloned())
            .unwrap_or_else(|| "uncategorized".to_string()),
        memory_id: item.id,
        content: item.summary,
        happened_at: item.happened_at.unwrap_or(item.created_at),
        created_at: item.created_at,
        updated_at: item.updated_at,
        memory_type: item.memory_type,
    }
}

/// Checks a similarity search: its scope, size, floor and query text.
fn check_search(
    state: &AppState,
    (user_id, agent_id): (&str, Option<&str>),
    top_k: usize,
    min_similarity: f32,
    (query_field, query): (&str, &str),
) -> Result<(), ApiError> {
    check_scope(state, user_id, agent_id)?;
    check_top_k(state, top_k)?;
    check_range("min_similarity", min_similarity)?;
    if query.trim().is_empty() {
        return Err(ApiError::invalid(
            query_field,
            format!("{query_field} must not be empty"),
        ));
    }
    Ok(())
}

fn check_scope(state: &AppState, user_id: &str, agent_id: Option<&str>) -> Result<(), ApiError> {
    let max = state.service.config.memory.max_id_len;
    check_id("user_id", user_id, max)?;
    if let Some(agent) = agent_id {
        check_id("agent_id", agent, max)?;
    }
    Ok(())
}

fn check_range(field: &str, value: f32) -> Result<(), ApiError> {
    if !(-1.0..=1.0).contains(&value) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be between -1 and 1"),
        ));
    }
    Ok(())
}

fn check_top_k(state: &AppState, top_k: usize) -> Result<(), ApiError> {
    let max = state.service.config.memory.max_top_k;
    if top_k == 0 || top_k > max {
        return Err(ApiError::invalid(
            "top_k",
            format!("top_k must be between 1 and {max}"),
        ));
    }
    Ok(())
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DefaultCategoriesRequest {
    pub user_id: String,
    /// One agent's categories; every agent's when absent.
    pub agent_id: Option<String>,
    /// Also list categories that hold no memory yet.
    #[serde(default)]
    pub include_inactive: bool,
    /// The category summary (true), or its newest memories (false).
    #[serde(default = "default_true")]
    pub want_summary: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CloudCategory {
    pub name: String,
    /// `default` for the configured starting categories, `custom` otherwise.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub user_id: String,
    pub agent_id: String,
    pub description: String,
    /// Whether the category holds memories.
    pub is_active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memories: Option<Vec<CloudMemory>>,
    pub memory_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DefaultCategoriesResponse {
    pub categories: Vec<CloudCategory>,
    pub total_categories: usize,
}

/// Category ids to names, for naming the categories of listed items.
fn category_names(categories: &[(Category, u64)]) -> HashMap<Uuid, String> {
    categories
        .iter()
        .map(|(c, _)| (c.id, c.name.clone()))
        .collect()
}

/// The summary of a category, or its newest memories (`names`: see [`category_names`]).
async fn category_content(
    state: &AppState,
    caller: &Caller,
    category: &Category,
    want_summary: bool,
    names: &HashMap<Uuid, String>,
) -> Result<(Option<String>, Option<Vec<CloudMemory>>), CloudError> {
    if want_summary {
        return Ok((Some(category.summary.clone()), None));
    }
    let user = caller.user(&category.user_id);
    let items = state
        .service
        .store
        .category_items(user, category.id, CATEGORY_MEMORIES)
        .await
        .map_err(ApiError::from)?;
    let ids: Vec<Uuid> = items.iter().map(|i| i.id).collect();
    let names = state.service.item_category_names(user, &ids, names).await?;
    Ok((
        None,
        Some(items.into_iter().map(|i| cloud_memory(i, &names)).collect()),
    ))
}

/// The user's categories with their summaries (or newest memories) and sizes.
#[utoipa::path(post, path = "/api/v1/memory/retrieve/default-categories", tag = "memu-cloud-v1",
    request_body = DefaultCategoriesRequest,
    responses((status = 200, body = DefaultCategoriesResponse), (status = 422, body = ErrorBody)))]
pub async fn default_categories(
    State(state): State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<DefaultCategoriesRequest>,
) -> Result<Json<DefaultCategoriesResponse>, CloudError> {
    check_scope(&state, &req.user_id, req.agent_id.as_deref())?;
    let defaults = &state.service.config.memory.categories;
    let listed = state
        .service
        .user_categories(caller.user(&req.user_id), req.agent_id.as_deref())
        .await?;
    let names = category_names(&listed);
    let mut categories = Vec::new();
    for (category, count) in listed {
        if count == 0 && !req.include_inactive {
            continue;
        }
        let (summary, memories) =
            category_content(&state, &caller, &category, req.want_summary, &names).await?;
        categories.push(CloudCategory {
            kind: if defaults.iter().any(|d| d.name == category.name) {
                "default"
            } else {
                "custom"
            },
            is_active: count > 0,
            memory_count: count,
            summary,
            memories,
            name: category.name,
            user_id: category.user_id,
            agent_id: category.agent_id,
            description: category.description,
        });
    }
    Ok(Json(DefaultCategoriesResponse {
        total_categories: categories.len(),
        categories,
    }))
}

fn default_items_top_k() -> usize {
    10
}

fn default_categories_top_k() -> usize {
    5
}

fn default_min_similarity() -> f32 {
    0.3
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RelatedItemsRequest {
    pub user_id: String,
    pub agent_id: Option<String>,
    pub query: String,
    #[serde(default = "default_items_top_k")]
    pub top_k: usize,
    /// Cosine similarity a memory needs to be listed.
    #[serde(default = "default_min_similarity")]
    pub min_similarity: f32,
    /// Only memories filed in one of these categories.
    pub include_categories: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RelatedMemory {
    pub memory: CloudMemory,
    pub user_id: String,
    pub agent_id: String,
    pub similarity_score: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RelatedItemsResponse {
    pub related_memories: Vec<RelatedMemory>,
    pub query: String,
    pub total_found: usize,
    #[schema(value_type = Object)]
    pub search_params: serde_json::Value,
}

/// The user's memories nearest to a query, above a similarity, optionally within categories.
#[utoipa::path(post, path = "/api/v1/memory/retrieve/related-memory-items", tag = "memu-cloud-v1",
    request_body = RelatedItemsRequest,
    responses((status = 200, body = RelatedItemsResponse), (status = 422, body = ErrorBody)))]
pub async fn related_memory_items(
    State(state): State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<RelatedItemsRequest>,
) -> Result<Json<RelatedItemsResponse>, CloudError> {
    check_search(
        &state,
        (&req.user_id, req.agent_id.as_deref()),
        req.top_k,
        req.min_similarity,
        ("query", &req.query),
    )?;
    let wanted: Option<Vec<String>> = req.include_categories.clone().filter(|c| !c.is_empty());
    let user = caller.user(&req.user_id);
    let vector = state.service.embed_query(&req.query).await?;
    let category_names = category_names(
        &state
            .service
            .user_categories(user, req.agent_id.as_deref())
            .await?,
    );
    let mut input = RetrieveInput {
        tenant_id: caller.tenant_id().to_string(),
        user_id: req.user_id.clone(),
        agent_id: req.agent_id.clone(),
        query: req.query.clone(),
        context: Vec::new(),
        top_k: req.top_k,
        filter: ItemFilter {
            agent_id: req.agent_id.clone(),
            ..ItemFilter::default()
        },
        method: RetrieveMethod::Rag,
    };
    // A category filter is applied to the nearest items, searching deeper until enough pass
    // or nothing more is above the similarity floor.
    let (found, names) = loop {
        let found = state.service.search(&input, &vector, false).await?;
        let ids: Vec<Uuid> = found.iter().map(|s| s.item.id).collect();
        let names = state
            .service
            .item_category_names(user, &ids, &category_names)
            .await?;
        let exhausted = found.len() < input.top_k
            || found.last().is_some_and(|s| s.score < req.min_similarity)
            || input.top_k >= MAX_FILTERED_DEPTH;
        let Some(wanted) = &wanted else {
            break (found, names);
        };
        let passing = found
            .iter()
            .filter(|s| {
                names
                    .get(&s.item.id)
                    .is_some_and(|n| n.iter().any(|n| wanted.contains(n)))
            })
            .count();
        if passing >= req.top_k || exhausted {
            break (found, names);
        }
        input.top_k = (input.top_k * 4).min(MAX_FILTERED_DEPTH);
    };
    let related: Vec<RelatedMemory> = found
        .into_iter()
        .filter(|s| s.score >= req.min_similarity)
        .filter(|s| {
            wanted.as_ref().is_none_or(|wanted| {
                names
                    .get(&s.item.id)
                    .is_some_and(|n| n.iter().any(|n| wanted.contains(n)))
            })
        })
        .take(req.top_k)
        .map(|s| RelatedMemory {
            user_id: req.user_id.clone(),
            agent_id: s.item.agent_id.clone(),
            similarity_score: s.score,
            memory: cloud_memory(s.item, &names),
        })
        .collect();
    Ok(Json(RelatedItemsResponse {
        total_found: related.len(),
        related_memories: related,
        search_params: serde_json::json!({
            "top_k": req.top_k,
            "min_similarity": req.min_similarity,
            "include_categories": req.include_categories,
            "agent_id": req.agent_id,
        }),
        query: req.query,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RelatedCategoriesRequest {
    pub user_id: String,
    pub agent_id: Option<String>,
    pub category_query: String,
    #[serde(default = "default_categories_top_k")]
    pub top_k: usize,
    #[serde(default = "default_min_similarity")]
    pub min_similarity: f32,
    #[serde(default = "default_true")]
    pub want_summary: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusteredCategory {
    pub name: String,
    pub user_id: String,
    pub agent_id: String,
    pub similarity_score: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memories: Option<Vec<CloudMemory>>,
    pub memory_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RelatedCategoriesResponse {
    pub clustered_categories: Vec<ClusteredCategory>,
    pub category_query: String,
    pub total_categories_found: usize,
    #[schema(value_type = Object)]
    pub search_params: serde_json::Value,
}

/// The user's categories nearest to a query, with their summaries (or newest memories).
#[utoipa::path(post, path = "/api/v1/memory/retrieve/related-clustered-categories", tag = "memu-cloud-v1",
    request_body = RelatedCategoriesRequest,
    responses((status = 200, body = RelatedCategoriesResponse), (status = 422, body = ErrorBody)))]
pub async fn related_clustered_categories(
    State(state): State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<RelatedCategoriesRequest>,
) -> Result<Json<RelatedCategoriesResponse>, CloudError> {
    check_search(
        &state,
        (&req.user_id, req.agent_id.as_deref()),
        req.top_k,
        req.min_similarity,
        ("category_query", &req.category_query),
    )?;
    let vector = state.service.embed_query(&req.category_query).await?;
    let listed = state
        .service
        .user_categories(caller.user(&req.user_id), req.agent_id.as_deref())
        .await?;
    let names = category_names(&listed);
    let mut scored: Vec<(Category, u64, f32)> = listed
        .into_iter()
        .filter(|(c, count)| *count > 0 && c.embedding.len() == vector.len())
        .map(|(c, count)| {
            let score = crate::model::dot(&c.embedding, &vector);
            (c, count, score)
        })
        .filter(|(_, _, score)| *score >= req.min_similarity)
        .collect();
    scored.sort_by(|a, b| b.2.total_cmp(&a.2));
    scored.truncate(req.top_k);
    let mut clustered = Vec::with_capacity(scored.len());
    for (category, count, score) in scored {
        let (summary, memories) =
            category_content(&state, &caller, &category, req.want_summary, &names).await?;
        clustered.push(ClusteredCategory {
            name: category.name,
            user_id: category.user_id,
            agent_id: category.agent_id,
            similarity_score: score,
            memories,
            memory_count: count,
            summary,
        });
    }
    Ok(Json(RelatedCategoriesResponse {
        total_categories_found: clustered.len(),
        clustered_categories: clustered,
        search_params: serde_json::json!({
            "top_k": req.top_k,
            "min_similarity": req.min_similarity,
            "want_summary": req.want_summary,
            "agent_id": req.agent_id,
        }),
        category_query: req.category_query,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct DeleteRequest {
    pub user_id: String,
    /// Only this agent's memories; all of the user's when absent.
    pub agent_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteResponse {
    pub success: bool,
    /// Memory items deleted.
    pub deleted_count: u64,
}

/// Delete a user's memories (or one agent's), with their categories, sources and queued jobs.
#[utoipa::path(post, path = "/api/v1/memory/delete", tag = "memu-cloud-v1",
    request_body = DeleteRequest,
    responses((status = 200, body = DeleteResponse), (status = 422, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    CloudJson(req): CloudJson<DeleteRequest>,
) -> Result<Json<DeleteResponse>, CloudError> {
    check_scope(&state, &req.user_id, req.agent_id.as_deref())?;
    let erasure = state
        .service
        .delete_user(caller.user(&req.user_id), req.agent_id.as_deref())
        .await?;
    if let Some(pseudonym) = &erasure.audit_pseudonym {
        caller.retarget(pseudonym);
    }
    Ok(Json(DeleteResponse {
        success: true,
        deleted_count: erasure.deleted.memory_items,
    }))
}
