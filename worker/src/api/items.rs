//! Native API: memory items of one user (list, get, create, update, delete), erase and export.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson, ApiQuery, ErrorBody};
use super::memu::check_id;
use crate::model::{
    DeletedCounts, ItemFilter, ItemPatch, MemoryItem, MemoryType, Scope, UsageTotals,
};
use crate::service::MediaKind;
use crate::store::UserExport;

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemOut {
    pub id: Uuid,
    pub user_id: String,
    pub agent_id: String,
    pub memory_type: MemoryType,
    pub summary: String,
    pub resource_id: Option<Uuid>,
    pub happened_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub extra: serde_json::Value,
}

impl From<MemoryItem> for ItemOut {
    fn from(i: MemoryItem) -> Self {
        Self {
            id: i.id,
            user_id: i.user_id,
            agent_id: i.agent_id,
            memory_type: i.memory_type,
            summary: i.summary,
            resource_id: i.resource_id,
            happened_at: i.happened_at,
            created_at: i.created_at,
            updated_at: i.updated_at,
            extra: i.extra,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub agent_id: Option<String>,
    /// Comma-separated memory types.
    pub memory_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Page size, 1..=500 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ItemPage {
    pub items: Vec<ItemOut>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateItem {
    pub memory_type: MemoryType,
    /// The memory's text (memU 1.x calls it `memory_content`).
    #[serde(alias = "memory_content")]
    pub summary: String,
    pub agent_id: Option<String>,
    pub happened_at: Option<DateTime<Utc>>,
    #[schema(value_type = Object)]
    pub extra: Option<serde_json::Value>,
    /// Names of the user's categories to file the item into (memU 1.x's field).
    pub memory_categories: Option<Vec<String>>,
}

/// Fields to change; absent fields stay. `happened_at: null` clears it.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateItem {
    #[serde(alias = "memory_content")]
    pub summary: Option<String>,
    pub memory_type: Option<MemoryType>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub happened_at: Option<Option<DateTime<Utc>>>,
    #[schema(value_type = Object)]
    pub extra: Option<serde_json::Value>,
    /// File the item into exactly these of the user's categories (memU 1.x's field).
    pub memory_categories: Option<Vec<String>>,
}

/// Distinguishes a field given as `null` (Some(None)) from an absent one (None).
fn present<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<T>::deserialize(de)?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AgentParam {
    /// Only this agent's data.
    pub agent_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteUserResponse {
    pub user_id: String,
    pub deleted: DeletedCounts,
    /// Erasure receipt: when, and the pseudonym that replaced the user's id in the audit log
    /// (absent when only one agent's data was erased).
    pub erased_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_pseudonym: Option<String>,
}

const MAX_SUMMARY_BYTES: usize = 16 * 1024;

fn check_user(state: &AppState, user_id: &str) -> Result<(), ApiError> {
    check_id("user_id", user_id, state.service.config.memory.max_id_len)
}

fn check_summary(summary: &str) -> Result<(), ApiError> {
    if summary.trim().is_empty() {
        return Err(ApiError::invalid("summary", "summary must not be empty"));
    }
    if summary.len() > MAX_SUMMARY_BYTES {
        return Err(ApiError::invalid(
            "summary",
            format!("summary is longer than {MAX_SUMMARY_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn parse_item_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::invalid("item_id", format!("item_id `{raw}` is not a UUID")))
}

/// List a user's memory items, newest first.
#[utoipa::path(get, path = "/api/v1/users/{user_id}/items", tag = "items",
    params(("user_id" = String, Path), ListParams),
    responses((status = 200, body = ItemPage), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<ItemPage>, ApiError> {
    check_user(&state, &user_id)?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 500",
        ));
    }
    let memory_types = match &params.memory_type {
        Some(list) => list
            .split(',')
            .map(|t| {
                MemoryType::parse(t.trim()).ok_or_else(|| {
                    ApiError::invalid("memory_type", format!("unknown memory_type `{}`", t.trim()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let filter = ItemFilter {
        agent_id: params.agent_id,
        memory_types,
        since: params.since,
        until: params.until,
    };
    let page = state
        .service
        .list_items(
            caller.user(&user_id),
            &filter,
            limit,
            params.cursor.as_deref(),
        )
        .await?;
    Ok(Json(ItemPage {
        items: page.items.into_iter().map(ItemOut::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One memory item.
#[utoipa::path(get, path = "/api/v1/users/{user_id}/items/{item_id}", tag = "items",
    params(("user_id" = String, Path), ("item_id" = Uuid, Path)),
    responses((status = 200, body = ItemOut), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((user_id, item_id)): Path<(String, String)>,
) -> Result<Json<ItemOut>, ApiError> {
    check_user(&state, &user_id)?;
    let id = parse_item_id(&item_id)?;
    Ok(Json(
        state
            .service
            .get_item(caller.user(&user_id), id)
            .await?
            .into(),
    ))
}

/// Create a memory item directly (embedded on write).
#[utoipa::path(post, path = "/api/v1/users/{user_id}/items", tag = "items",
    params(("user_id" = String, Path)), request_body = CreateItem,
    responses((status = 201, body = ItemOut), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiJson(req): ApiJson<CreateItem>,
) -> Result<(StatusCode, Json<ItemOut>), ApiError> {
    check_user(&state, &user_id)?;
    check_summary(&req.summary)?;
    if let Some(agent) = &req.agent_id {
        check_id("agent_id", agent, state.service.config.memory.max_id_len)?;
    }
    let extra = req.extra.unwrap_or_else(|| serde_json::json!({}));
    if !extra.is_object() {
        return Err(ApiError::invalid("extra", "extra must be a JSON object"));
    }
    let item = state
        .service
        .create_item(
            Scope::new(caller.user(&user_id), req.agent_id),
            req.memory_type,
            req.summary,
            req.happened_at,
            extra,
            req.memory_categories.as_deref().unwrap_or_default(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(item.into())))
}

/// Change a memory item; a new summary is re-embedded.
#[utoipa::path(patch, path = "/api/v1/users/{user_id}/items/{item_id}", tag = "items",
    params(("user_id" = String, Path), ("item_id" = Uuid, Path)), request_body = UpdateItem,
    responses((status = 200, body = ItemOut), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path((user_id, item_id)): Path<(String, String)>,
    ApiJson(req): ApiJson<UpdateItem>,
) -> Result<Json<ItemOut>, ApiError> {
    check_user(&state, &user_id)?;
    let id = parse_item_id(&item_id)?;
    if let Some(summary) = &req.summary {
        check_summary(summary)?;
    }
    if let Some(extra) = &req.extra
        && !extra.is_object()
    {
        return Err(ApiError::invalid("extra", "extra must be a JSON object"));
    }
    let patch = ItemPatch {
        summary: req.summary,
        embedding: None,
        memory_type: req.memory_type,
        happened_at: req.happened_at,
        extra: req.extra,
    };
    Ok(Json(
        state
            .service
            .update_item(
                caller.user(&user_id),
                id,
                patch,
                req.memory_categories.as_deref(),
            )
            .await?
            .into(),
    ))
}

/// Delete one memory item.
#[utoipa::path(delete, path = "/api/v1/users/{user_id}/items/{item_id}", tag = "items",
    params(("user_id" = String, Path), ("item_id" = Uuid, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((user_id, item_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    check_user(&state, &user_id)?;
    let id = parse_item_id(&item_id)?;
    state.service.delete_item(caller.user(&user_id), id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Erase all of a user's data (or one agent's), including queued jobs and raw resources.
#[utoipa::path(delete, path = "/api/v1/users/{user_id}", tag = "users",
    params(("user_id" = String, Path), AgentParam),
    responses((status = 200, body = DeleteUserResponse), (status = 422, body = ErrorBody)))]
pub async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiQuery(params): ApiQuery<AgentParam>,
) -> Result<Json<DeleteUserResponse>, ApiError> {
    check_user(&state, &user_id)?;
    let erasure = state
        .service
        .delete_user(caller.user(&user_id), params.agent_id.as_deref())
        .await?;
    if let Some(pseudonym) = &erasure.audit_pseudonym {
        caller.retarget(pseudonym);
    }
    Ok(Json(DeleteUserResponse {
        user_id,
        deleted: erasure.deleted,
        erased_at: Utc::now(),
        audit_pseudonym: erasure.audit_pseudonym,
    }))
}

/// Export all of a user's data as JSON.
#[utoipa::path(get, path = "/api/v1/users/{user_id}/export", tag = "users",
    params(("user_id" = String, Path)),
    responses((status = 200, body = UserExport), (status = 422, body = ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
) -> Result<Json<UserExport>, ApiError> {
    check_user(&state, &user_id)?;
    Ok(Json(
        state.service.export_user(caller.user(&user_id)).await?,
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageResponse {
    pub user_id: String,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// From `llm.prices`; models without a price count 0.
    pub cost_usd: f64,
    /// Per operation (`memorize`, `retrieve`), provider and model.
    pub breakdown: Vec<UsageTotals>,
}

/// The user's LLM calls, tokens and cost (the cost log, totalled).
#[utoipa::path(get, path = "/api/v1/users/{user_id}/usage", tag = "users",
    params(("user_id" = String, Path)),
    responses((status = 200, body = UsageResponse), (status = 422, body = ErrorBody)))]
pub async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
) -> Result<Json<UsageResponse>, ApiError> {
    check_user(&state, &user_id)?;
    let breakdown = state.service.usage(caller.user(&user_id)).await?;
    Ok(Json(UsageResponse {
        calls: breakdown.iter().map(|u| u.calls).sum(),
        prompt_tokens: breakdown.iter().map(|u| u.prompt_tokens).sum(),
        completion_tokens: breakdown.iter().map(|u| u.completion_tokens).sum(),
        cost_usd: breakdown.iter().map(|u| u.cost_usd).sum(),
        user_id,
        breakdown,
    }))
}

/// Longest accepted document.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentRequest {
    pub agent_id: Option<String>,
    pub title: Option<String>,
    /// Plain text or Markdown (for `document`); paragraphs (blank-line separated) are segmented
    /// like messages.
    pub text: Option<String>,
    /// `document` (default), `image` or `audio`. Images are described by a vision chat model,
    /// audio transcribed; the text is then memorized like a document.
    pub modality: Option<String>,
    /// Base64 of the image or audio file.
    pub data: Option<String>,
    /// MIME type of `data`, e.g. `image/png`, `audio/mpeg`.
    pub mime_type: Option<String>,
}

/// Longest accepted image or audio file.
const MAX_MEDIA_BYTES: usize = 20 * 1024 * 1024;

/// Memorize a plain-text or Markdown document.
#[utoipa::path(post, path = "/api/v1/users/{user_id}/documents", tag = "memory",
    params(("user_id" = String, Path)),
    request_body = DocumentRequest,
    responses((status = 202, body = super::memu::MemorizeResponse), (status = 422, body = ErrorBody)))]
pub async fn memorize_document(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiJson(req): ApiJson<DocumentRequest>,
) -> Result<(StatusCode, Json<super::memu::MemorizeResponse>), ApiError> {
    check_user(&state, &user_id)?;
    if let Some(agent) = &req.agent_id {
        check_id("agent_id", agent, state.service.config.memory.max_id_len)?;
    }
    let scope = Scope::new(caller.user(&user_id), req.agent_id);
    let kind = match req.modality.as_deref().unwrap_or("document") {
        "document" | "text" | "markdown" => None,
        "image" => Some(MediaKind::Image),
        "audio" => Some(MediaKind::Audio),
        other => {
            return Err(ApiError::invalid(
                "modality",
                format!("unknown modality `{other}`: use document, image or audio"),
            ));
        }
    };
    let (task, repeated) = match kind {
        None => {
            let text = req.text.unwrap_or_default();
            if text.trim().is_empty() {
                return Err(ApiError::invalid("text", "text must not be empty"));
            }
            if text.len() > MAX_DOCUMENT_BYTES {
                return Err(ApiError::invalid(
                    "text",
                    format!("text must be at most {MAX_DOCUMENT_BYTES} bytes"),
                ));
            }
            state
                .service
                .memorize_document(scope, req.title, text)
                .await?
        }
        Some(kind) => {
            use base64::Engine as _;
            let encoded = req.data.ok_or_else(|| {
                ApiError::invalid("data", "data (base64 of the file) is required")
            })?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| ApiError::invalid("data", format!("data is not base64: {e}")))?;
            if data.is_empty() || data.len() > MAX_MEDIA_BYTES {
                return Err(ApiError::invalid(
                    "data",
                    format!("the file must hold 1 to {MAX_MEDIA_BYTES} bytes"),
                ));
            }
            let mime_type = req.mime_type.unwrap_or_default();
            if !mime_type.starts_with(&format!("{}/", kind.as_str())) {
                return Err(ApiError::invalid(
                    "mime_type",
                    format!("mime_type must be an {}/* type", kind.as_str()),
                ));
            }
            state
                .service
                .memorize_media(scope, req.title, kind, mime_type, data)
                .await?
        }
    };
    Ok(super::memu::queued(task, repeated, "document"))
}
