//! memU Cloud v3-compatible routes and memU-server aliases. Unlike memU-server, every read is
//! scoped by `user_id`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiJson};
use crate::model::{ItemFilter, JobOverrides, MemoryType, Message, Scope, Task, TaskStatus};
use crate::service::{MemorizeInput, RetrieveInput, RetrieveOutput};

/// Message content: a string, or memU 1.x's `{text}` object.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Object { text: String },
}

impl MessageContent {
    fn into_text(self) -> String {
        match self {
            MessageContent::Text(t) | MessageContent::Object { text: t } => t,
        }
    }
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ConversationMessage {
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    pub content: MessageContent,
    pub name: Option<String>,
    /// RFC 3339 timestamp, or a date `YYYY-MM-DD`.
    pub created_at: Option<String>,
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct MemorizeRequest {
    pub user_id: String,
    pub agent_id: Option<String>,
    pub user_name: Option<String>,
    pub agent_name: Option<String>,
    /// RFC 3339 timestamp, or a date `YYYY-MM-DD`.
    pub session_date: Option<String>,
    /// The conversation as messages; or give `conversation_text`.
    pub conversation: Option<Vec<ConversationMessage>>,
    /// The conversation as one text: lines `speaker: text`, where the speaker is a role
    /// (`user`, `assistant`, `system`, `tool`), `user_name` or `agent_name`; lines without a
    /// speaker continue the message before them, and a text without speakers is one user
    /// message.
    pub conversation_text: Option<String>,
    /// This job's own `memory_types` and `memory_categories` (`[{name, description}]`): it
    /// extracts only those types and files only into those categories, created for the user
    /// and agent on first use. Other memU settings (prompts, models) are not taken.
    pub override_config: Option<serde_json::Value>,
}

/// Longest list of categories one request may bring.
const MAX_OVERRIDE_CATEGORIES: usize = 50;

/// Checks memU's `override_config`, naming the offending key.
fn job_overrides(value: Option<serde_json::Value>) -> Result<JobOverrides, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(JobOverrides::default());
    };
    let overrides: JobOverrides = serde_json::from_value(value).map_err(|e| {
        ApiError::invalid(
            "override_config",
            format!(
                "override_config: {e} (memory_types and memory_categories are the settings a                  request may change)"
            ),
        )
    })?;
    if overrides.memory_types.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::invalid(
            "override_config.memory_types",
            "override_config.memory_types must name at least one type",
        ));
    }
    if let Some(categories) = &overrides.memory_categories {
        if categories.is_empty() || categories.len() > MAX_OVERRIDE_CATEGORIES {
            return Err(ApiError::invalid(
                "override_config.memory_categories",
                format!(
                    "override_config.memory_categories must hold 1 to {MAX_OVERRIDE_CATEGORIES} categories"
                ),
            ));
        }
        for (i, c) in categories.iter().enumerate() {
            let field = format!("override_config.memory_categories[{i}]");
            let valid_name = !c.name.is_empty()
                && c.name.len() <= 64
                && c.name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_');
            if !valid_name {
                return Err(ApiError::invalid(
                    format!("{field}.name"),
                    format!("{field}.name must be 1 to 64 of a-z, 0-9 and _"),
                ));
            }
            if c.description.trim().is_empty() || c.description.len() > 1000 {
                return Err(ApiError::invalid(
                    format!("{field}.description"),
                    format!("{field}.description must be 1 to 1000 bytes"),
                ));
            }
            if categories[..i].iter().any(|o| o.name == c.name) {
                return Err(ApiError::invalid(
                    format!("{field}.name"),
                    format!("category `{}` is listed twice", c.name),
                ));
            }
        }
    }
    Ok(overrides)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemorizeResponse {
    pub task_id: Uuid,
    pub status: TaskStatus,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TaskStatusResponse {
    pub task_id: Uuid,
    pub status: TaskStatus,
    pub user_id: String,
    pub agent_id: String,
    pub attempts: u32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<Task> for TaskStatusResponse {
    fn from(t: Task) -> Self {
        Self {
            task_id: t.id,
            status: t.status,
            user_id: t.user_id,
            agent_id: t.agent_id,
            attempts: t.attempts,
            created_at: t.created_at,
            started_at: t.started_at,
            completed_at: t.completed_at,
            error: t.error,
        }
    }
}

/// A query: one string, or a conversation whose last user message is the query.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Query {
    Text(String),
    Conversation(Vec<QueryMessage>),
}

#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct QueryMessage {
    pub role: String,
    pub content: MessageContent,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RetrieveMethod {
    /// Vector similarity: no LLM call, one embedding request (none when cached).
    #[default]
    Rag,
    /// Vector and full-text ranks fused: finds names and numbers that vectors miss.
    Hybrid,
    /// memU's LLM flow: route and rewrite the query, stop at the first sufficient tier.
    Llm,
}

impl From<RetrieveMethod> for crate::service::RetrieveMethod {
    fn from(m: RetrieveMethod) -> Self {
        match m {
            RetrieveMethod::Rag => Self::Rag,
            RetrieveMethod::Hybrid => Self::Hybrid,
            RetrieveMethod::Llm => Self::Llm,
        }
    }
}

/// memU 1.x's `where`: the scope (and memory types) of a call.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WhereFilter {
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    pub memory_type: Option<MemoryType>,
    #[serde(rename = "memory_type__in")]
    pub memory_type_in: Option<Vec<MemoryType>>,
}

/// One of two places a value may be given (top level or `where`), never two different ones.
fn one_of<T: PartialEq>(
    field: &str,
    top: Option<T>,
    nested: Option<T>,
) -> Result<Option<T>, ApiError> {
    match (top, nested) {
        (Some(a), Some(b)) if a != b => Err(ApiError::invalid(
            format!("where.{field}"),
            format!("{field} and where.{field} differ: give it once"),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// The user and agent of a request from its top-level fields or its `where`.
pub fn resolve_scope(
    user_id: Option<String>,
    agent_id: Option<String>,
    filter: Option<&WhereFilter>,
) -> Result<(String, Option<String>), ApiError> {
    let filter = filter.cloned().unwrap_or_default();
    let user = one_of("user_id", user_id, filter.user_id)?.ok_or_else(|| {
        ApiError::invalid(
            "user_id",
            "user_id is required (at the top level or in where): memories belong to one user",
        )
    })?;
    Ok((user, one_of("agent_id", agent_id, filter.agent_id)?))
}

/// A retrieve request, in memU Cloud v3's shape (`user_id`, `query`) or memU 1.x's (`queries`,
/// `where`, `method`).
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct RetrieveRequest {
    /// The user whose memories are searched (or `where.user_id`).
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    /// A string, or a conversation whose last user message is the query.
    pub query: Option<Query>,
    /// memU 1.x: the conversation `[{role, content: {text}}]`; its last user message is the
    /// query and the ones before it are context for the `llm` method.
    pub queries: Option<Vec<QueryMessage>>,
    /// memU 1.x: `user_id`, `agent_id`, `memory_type` or `memory_type__in`.
    #[serde(rename = "where")]
    pub filter: Option<WhereFilter>,
    pub top_k: Option<usize>,
    pub memory_types: Option<Vec<MemoryType>>,
    pub method: Option<RetrieveMethod>,
    /// Only memories that happened at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Only memories that happened before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetrievedCategory {
    pub name: String,
    pub description: String,
    pub summary: String,
    pub score: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetrievedItem {
    pub id: Uuid,
    pub memory_type: MemoryType,
    pub summary: String,
    /// The same text as `summary` (memU clients read either).
    pub content: String,
    pub score: f32,
    pub agent_id: String,
    pub resource_id: Option<Uuid>,
    pub happened_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetrievedResource {
    pub id: Uuid,
    pub modality: crate::model::Modality,
    pub caption: Option<String>,
    /// The resource as text (`role: content` lines for a conversation).
    pub content: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RetrieveResponse {
    pub rewritten_query: String,
    /// `llm` method: false when the message needs no memories (nothing is searched).
    pub needs_memory: bool,
    /// `llm` method: the tier after which the recall sufficed (`categories`, `items`,
    /// `resources`); tiers after it are left empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sufficient_after: Option<String>,
    /// LLM calls this retrieve made (0 for `rag` and `hybrid`).
    pub llm_calls: usize,
    pub categories: Vec<RetrievedCategory>,
    pub items: Vec<RetrievedItem>,
    pub resources: Vec<RetrievedResource>,
}

impl From<RetrieveOutput> for RetrieveResponse {
    fn from(out: RetrieveOutput) -> Self {
        Self {
            rewritten_query: out.query,
            needs_memory: out.needs_memory,
            sufficient_after: out.sufficient_after.map(str::to_string),
            llm_calls: out.llm_calls,
            categories: out
                .categories
                .into_iter()
                .map(|c| RetrievedCategory {
                    name: c.category.name,
                    description: c.category.description,
                    summary: c.category.summary,
                    score: c.score,
                })
                .collect(),
            items: out
                .items
                .into_iter()
                .map(|s| RetrievedItem {
                    id: s.item.id,
                    memory_type: s.item.memory_type,
                    content: s.item.summary.clone(),
                    summary: s.item.summary,
                    score: s.score,
                    agent_id: s.item.agent_id,
                    resource_id: s.item.resource_id,
                    happened_at: s.item.happened_at,
                    created_at: s.item.created_at,
                })
                .collect(),
            resources: out
                .resources
                .into_iter()
                .map(|r| RetrievedResource {
                    id: r.id,
                    modality: r.modality,
                    content: r.as_text(),
                    caption: r.caption,
                    created_at: r.created_at,
                })
                .collect(),
        }
    }
}

/// A user (and agent), at the top level or in memU 1.x's `where`.
#[derive(Clone, Debug, Default, Deserialize, ToSchema)]
pub struct ScopeRequest {
    pub user_id: Option<String>,
    pub agent_id: Option<String>,
    /// memU 1.x: `user_id` and `agent_id`.
    #[serde(rename = "where")]
    pub filter: Option<WhereFilter>,
}

impl ScopeRequest {
    /// The checked user and agent.
    pub fn scope(self, state: &AppState) -> Result<(String, Option<String>), ApiError> {
        if let Some(f) = &self.filter
            && (f.memory_type.is_some() || f.memory_type_in.is_some())
        {
            return Err(ApiError::invalid(
                "where.memory_type",
                "memory types do not apply here: categories and erasure cover every type",
            ));
        }
        let (user, agent) = resolve_scope(self.user_id, self.agent_id, self.filter.as_ref())?;
        let max = state.service.config.memory.max_id_len;
        check_id("user_id", &user, max)?;
        if let Some(agent) = &agent {
            check_id("agent_id", agent, max)?;
        }
        Ok((user, agent))
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryOut {
    pub name: String,
    pub description: String,
    pub user_id: String,
    pub agent_id: String,
    pub summary: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CategoriesResponse {
    pub categories: Vec<CategoryOut>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClearResponse {
    pub deleted: crate::model::DeletedCounts,
}

const ROLES: &[&str] = &["user", "assistant", "system", "tool"];

/// Checks an id field: non-empty, not too long, no control characters.
pub fn check_id(field: &str, value: &str, max_len: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > max_len {
        return Err(ApiError::invalid(
            field,
            format!("{field} is longer than {max_len} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

/// A task id: the UUID, or memU-server's `memorize-<32 hex digits>` form of it.
pub fn parse_task_id(raw: &str) -> Result<Uuid, ApiError> {
    let hex = raw.strip_prefix("memorize-").unwrap_or(raw);
    Uuid::parse_str(hex).map_err(|_| {
        ApiError::invalid(
            "task_id",
            format!("task_id `{raw}` is neither a UUID nor memorize-<32 hex digits>"),
        )
    })
}

pub fn parse_time(field: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(ApiError::invalid(
        field,
        format!("{field}: `{value}` is neither an RFC 3339 time nor a YYYY-MM-DD date"),
    ))
}

/// Splits a flattened conversation into messages (see `MemorizeRequest::conversation_text`).
pub fn conversation_from_text(
    text: &str,
    user_name: Option<&str>,
    agent_name: Option<&str>,
) -> Vec<ConversationMessage> {
    let speaker_role = |speaker: &str| -> Option<&'static str> {
        let speaker = speaker.trim();
        if let Some(role) = ROLES.iter().find(|r| r.eq_ignore_ascii_case(speaker)) {
            return Some(role);
        }
        let named =
            |name: Option<&str>| name.is_some_and(|n| !n.trim().is_empty() && n.trim() == speaker);
        if named(user_name) {
            Some("user")
        } else if named(agent_name) {
            Some("assistant")
        } else {
            None
        }
    };
    let mut messages: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let spoken = line
            .split_once(':')
            .and_then(|(speaker, rest)| Some((speaker_role(speaker)?, rest.trim())));
        match (spoken, messages.last_mut()) {
            (Some((role, rest)), _) => messages.push((role.to_string(), rest.to_string())),
            (None, Some((_, content))) => {
                content.push('\n');
                content.push_str(line);
            }
            (None, None) if line.trim().is_empty() => {}
            (None, None) => messages.push(("user".to_string(), line.to_string())),
        }
    }
    messages
        .into_iter()
        .map(|(role, content)| ConversationMessage {
            role,
            content: MessageContent::Text(content.trim().to_string()),
            name: None,
            created_at: None,
        })
        .collect()
}

pub(super) fn memorize_input(
    state: &AppState,
    caller: &Caller,
    req: MemorizeRequest,
) -> Result<MemorizeInput, ApiError> {
    let max = state.service.config.memory.max_id_len;
    check_id("user_id", &req.user_id, max)?;
    if let Some(agent) = &req.agent_id {
        check_id("agent_id", agent, max)?;
    }
    let conversation = match (req.conversation, req.conversation_text) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "conversation_text",
                "give either conversation or conversation_text, not both",
            ));
        }
        (Some(messages), None) => messages,
        (None, Some(text)) => {
            conversation_from_text(&text, req.user_name.as_deref(), req.agent_name.as_deref())
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "conversation",
                "conversation (a list of messages) or conversation_text is required",
            ));
        }
    };
    if conversation.is_empty() {
        return Err(ApiError::invalid(
            "conversation",
            "conversation must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(conversation.len());
    for (i, m) in conversation.into_iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("conversation[{i}].role"),
                format!("conversation[{i}].role must be one of {}", ROLES.join(", ")),
            ));
        }
        let content = m.content.into_text();
        if content.trim().is_empty() {
            return Err(ApiError::invalid(
                format!("conversation[{i}].content"),
                format!("conversation[{i}].content must not be empty"),
            ));
        }
        let created_at = m
            .created_at
            .as_deref()
            .map(|t| parse_time(&format!("conversation[{i}].created_at"), t))
            .transpose()?;
        messages.push(Message {
            role: m.role,
            content,
            name: m.name,
            created_at,
        });
    }
    Ok(MemorizeInput {
        overrides: job_overrides(req.override_config)?,
        idempotency_key: None,
        scope: Scope::new(caller.user(&req.user_id), req.agent_id),
        user_name: req.user_name,
        agent_name: req.agent_name,
        session_date: req
            .session_date
            .as_deref()
            .map(|t| parse_time("session_date", t))
            .transpose()?,
        messages,
    })
}

/// Queue a conversation for memorization. An `Idempotency-Key` header makes a retried request
/// return the task the first one created.
#[utoipa::path(post, path = "/api/v3/memory/memorize", tag = "memory",
    request_body = MemorizeRequest,
    responses((status = 202, body = MemorizeResponse), (status = 422, body = super::error::ErrorBody)))]
pub async fn memorize(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<MemorizeRequest>,
) -> Result<(StatusCode, Json<MemorizeResponse>), ApiError> {
    let mut input = memorize_input(&state, &caller, req)?;
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|k| !k.is_empty() && k.len() <= 255)
            .ok_or_else(|| {
                ApiError::invalid(
                    "Idempotency-Key",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                )
            })?;
        input.idempotency_key = Some(key.to_string());
    }
    let (task, repeated) = state.service.memorize(input).await?;
    Ok(queued(task, repeated, "conversation"))
}

/// 202 for a new task; 200 with the earlier task when the same resource was memorized before.
pub fn queued(
    task: crate::model::Task,
    repeated: bool,
    what: &str,
) -> (StatusCode, Json<MemorizeResponse>) {
    let (status, message) = if repeated {
        (
            StatusCode::OK,
            format!("this {what} was memorized before for this user and agent: returning its task"),
        )
    } else {
        (StatusCode::ACCEPTED, "memorize task queued".to_string())
    };
    (
        status,
        Json(MemorizeResponse {
            task_id: task.id,
            status: task.status,
            message,
        }),
    )
}

/// Status of a memorize task.
#[utoipa::path(get, path = "/api/v3/memory/memorize/status/{task_id}", tag = "memory",
    params(("task_id" = Uuid, Path)),
    responses((status = 200, body = TaskStatusResponse), (status = 404, body = super::error::ErrorBody)))]
pub async fn memorize_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_id): Path<String>,
) -> Result<Json<TaskStatusResponse>, ApiError> {
    let id = parse_task_id(&task_id)?;
    Ok(Json(
        state.service.task(caller.tenant_id(), id).await?.into(),
    ))
}

/// The query text and, for a conversation, the messages before it (the `llm` router's context).
/// Put a FAILED memorize task back in the queue with a fresh attempt budget.
#[utoipa::path(post, path = "/api/v3/memory/memorize/{task_id}/retry", tag = "memory",
    params(("task_id" = Uuid, Path)),
    responses((status = 202, body = TaskStatusResponse), (status = 404, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)))]
pub async fn memorize_retry(
    State(state): State<AppState>,
    caller: Caller,
    Path(task_id): Path<String>,
) -> Result<(StatusCode, Json<TaskStatusResponse>), ApiError> {
    let id = parse_task_id(&task_id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            state
                .service
                .retry_task(caller.tenant_id(), id)
                .await?
                .into(),
        ),
    ))
}

fn query_text(query: Query) -> Result<(String, Vec<(String, String)>), ApiError> {
    let (text, context) = match query {
        Query::Text(t) => (t, Vec::new()),
        Query::Conversation(messages) => {
            let last_user = messages.iter().rposition(|m| m.role == "user");
            let index = last_user.or(messages.len().checked_sub(1)).ok_or_else(|| {
                ApiError::invalid(
                    "query",
                    "query must be a string or a non-empty list of messages",
                )
            })?;
            let mut texts: Vec<(String, String)> = messages
                .into_iter()
                .take(index + 1)
                .map(|m| (m.role, m.content.into_text()))
                .collect();
            let (_, text) = texts.pop().expect("index in range");
            (text, texts)
        }
    };
    if text.trim().is_empty() {
        return Err(ApiError::invalid("query", "query must not be empty"));
    }
    Ok((text, context))
}

/// Retrieve the memories of one user that matter for a query.
#[utoipa::path(post, path = "/api/v3/memory/retrieve", tag = "memory",
    request_body = RetrieveRequest,
    responses((status = 200, body = RetrieveResponse), (status = 422, body = super::error::ErrorBody)))]
pub async fn retrieve(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RetrieveRequest>,
) -> Result<Json<RetrieveResponse>, ApiError> {
    let memory = &state.service.config.memory;
    let (user_id, agent_id) = resolve_scope(req.user_id, req.agent_id, req.filter.as_ref())?;
    check_id("user_id", &user_id, memory.max_id_len)?;
    if let Some(agent) = &agent_id {
        check_id("agent_id", agent, memory.max_id_len)?;
    }
    let where_types = req.filter.as_ref().and_then(|f| {
        f.memory_type_in
            .clone()
            .or_else(|| f.memory_type.map(|t| vec![t]))
    });
    let memory_types = one_of("memory_type", req.memory_types, where_types)?;
    let query = match (req.query, req.queries) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "queries",
                "give either query or queries, not both",
            ));
        }
        (Some(query), None) => query,
        (None, Some(messages)) => Query::Conversation(messages),
        (None, None) => {
            return Err(ApiError::invalid(
                "query",
                "query (a string or messages) or queries is required",
            ));
        }
    };
    let top_k = req.top_k.unwrap_or(memory.default_top_k);
    if top_k == 0 || top_k > memory.max_top_k {
        return Err(ApiError::invalid(
            "top_k",
            format!("top_k must be between 1 and {}", memory.max_top_k),
        ));
    }
    let method = req.method.unwrap_or_default();
    if method == RetrieveMethod::Llm && state.service.config.llm.is_offline() {
        return Err(ApiError::invalid(
            "method",
            "method `llm` needs an LLM provider (set llm.provider); this worker runs offline, use `rag`",
        ));
    }
    if let (Some(since), Some(until)) = (req.since, req.until)
        && since >= until
    {
        return Err(ApiError::invalid(
            "since",
            "since must be earlier than until",
        ));
    }
    let (query, context) = query_text(query)?;
    let input = RetrieveInput {
        method: method.into(),
        context,
        filter: ItemFilter {
            agent_id: agent_id.clone(),
            memory_types: memory_types.unwrap_or_default(),
            since: req.since,
            until: req.until,
        },
        tenant_id: caller.tenant_id().to_string(),
        user_id: caller.user(&user_id).user_id.to_string(),
        agent_id,
        query,
        top_k,
    };
    Ok(Json(state.service.retrieve(input).await?.into()))
}

/// The user's categories with their summaries.
#[utoipa::path(post, path = "/api/v3/memory/categories", tag = "memory",
    request_body = ScopeRequest,
    responses((status = 200, body = CategoriesResponse), (status = 422, body = super::error::ErrorBody)))]
pub async fn categories(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ScopeRequest>,
) -> Result<Json<CategoriesResponse>, ApiError> {
    let (user_id, agent_id) = req.scope(&state)?;
    let categories = state
        .service
        .categories(&Scope::new(caller.user(&user_id), agent_id))
        .await?;
    Ok(Json(CategoriesResponse {
        categories: categories
            .into_iter()
            .map(|c| CategoryOut {
                name: c.name,
                description: c.description,
                user_id: c.user_id,
                agent_id: c.agent_id,
                summary: c.summary,
                updated_at: c.updated_at,
            })
            .collect(),
    }))
}

/// Delete all memories of a user (or of one agent of the user): memU Cloud v3's delete.
#[utoipa::path(post, path = "/api/v3/memory/delete", tag = "memory",
    request_body = ScopeRequest,
    responses((status = 200, body = ClearResponse), (status = 422, body = super::error::ErrorBody)))]
pub async fn delete(
    state: State<AppState>,
    caller: Caller,
    req: ApiJson<ScopeRequest>,
) -> Result<Json<ClearResponse>, ApiError> {
    clear(state, caller, req).await
}

/// Delete all memories of a user (or of one agent of the user).
pub async fn clear(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ScopeRequest>,
) -> Result<Json<ClearResponse>, ApiError> {
    let (user_id, agent_id) = req.scope(&state)?;
    let erasure = state
        .service
        .delete_user(caller.user(&user_id), agent_id.as_deref())
        .await?;
    if let Some(pseudonym) = &erasure.audit_pseudonym {
        caller.retarget(pseudonym);
    }
    Ok(Json(ClearResponse {
        deleted: erasure.deleted,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spoken(text: &str) -> Vec<(String, String)> {
        conversation_from_text(text, Some("Maria"), Some("Coach"))
            .into_iter()
            .map(|m| (m.role, m.content.into_text()))
            .collect()
    }

    #[test]
    fn flattened_conversations_split_by_speaker() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(r, c)| (r.to_string(), c.to_string()))
                .collect()
        };
        assert_eq!(
            spoken("Maria: hi\nCoach: hello\nSYSTEM: be brief\nuser: a: b"),
            pairs(&[
                ("user", "hi"),
                ("assistant", "hello"),
                ("system", "be brief"),
                ("user", "a: b")
            ])
        );
        // Lines without a speaker continue the message; text before any speaker is the user's.
        assert_eq!(
            spoken("\nfirst words\nMaria: one\ntwo: three\n\nCoach: ok"),
            pairs(&[
                ("user", "first words"),
                ("user", "one\ntwo: three"),
                ("assistant", "ok")
            ])
        );
        assert_eq!(
            spoken("no speaker at all"),
            pairs(&[("user", "no speaker at all")])
        );
        assert!(spoken("  \n ").is_empty());
    }

    #[test]
    fn override_config_takes_types_and_categories_only() {
        assert!(job_overrides(None).unwrap().is_empty());
        assert!(
            job_overrides(Some(serde_json::Value::Null))
                .unwrap()
                .is_empty()
        );
        let ok = job_overrides(Some(serde_json::json!({
            "memory_types": ["profile", "skill"],
            "memory_categories": [{"name": "music_2", "description": "songs"}]
        })))
        .unwrap();
        assert_eq!(
            ok.memory_types(&[MemoryType::Event]),
            [MemoryType::Profile, MemoryType::Skill]
        );
        assert_eq!(
            JobOverrides::default().memory_types(&[MemoryType::Event]),
            [MemoryType::Event]
        );
        let field = |v: serde_json::Value| job_overrides(Some(v)).unwrap_err().field.unwrap();
        assert_eq!(
            field(serde_json::json!({"memory_types": ["nope"]})),
            "override_config"
        );
        assert_eq!(
            field(serde_json::json!({"memory_categories": []})),
            "override_config.memory_categories"
        );
        assert_eq!(
            field(serde_json::json!({"memory_categories": [{"name": "x", "description": " "}]})),
            "override_config.memory_categories[0].description"
        );
    }

    #[test]
    fn task_ids_in_both_forms() {
        let id = Uuid::now_v7();
        assert_eq!(parse_task_id(&id.to_string()).unwrap(), id);
        assert_eq!(
            parse_task_id(&format!("memorize-{}", id.simple())).unwrap(),
            id
        );
        assert_eq!(
            parse_task_id("memorize-xyz").unwrap_err().field.as_deref(),
            Some("task_id")
        );
    }
}
