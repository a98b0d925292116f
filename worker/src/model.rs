//! Domain types shared by the store, the pipeline and the API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

pub use memu_crds::worker::MemoryType;

/// One end user: `user_id` is namespaced inside the tenant that owns it, so the same id in two
/// tenants names two users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserRef<'a> {
    pub tenant_id: &'a str,
    pub user_id: &'a str,
}

impl<'a> UserRef<'a> {
    pub fn new(tenant_id: &'a str, user_id: &'a str) -> Self {
        Self { tenant_id, user_id }
    }
}

/// Identifies one end user's memory space. `agent_id` is empty when the caller gave none.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scope {
    pub tenant_id: String,
    pub user_id: String,
    pub agent_id: String,
}

impl Scope {
    pub fn new(user: UserRef<'_>, agent_id: Option<String>) -> Self {
        Self {
            tenant_id: user.tenant_id.to_string(),
            user_id: user.user_id.to_string(),
            agent_id: agent_id.unwrap_or_default(),
        }
    }
    pub fn user(&self) -> UserRef<'_> {
        UserRef::new(&self.tenant_id, &self.user_id)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Conversation,
    Document,
}

impl Modality {
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Conversation => "conversation",
            Modality::Document => "document",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "conversation" => Some(Modality::Conversation),
            "document" => Some(Modality::Document),
            _ => None,
        }
    }
}

/// One message of a conversation resource, normalised from the request shapes we accept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

/// Raw input of memorize, kept so a job can be re-run and sources can be shown by retrieve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub id: Uuid,
    pub tenant_id: String,
    pub user_id: String,
    pub agent_id: String,
    pub modality: Modality,
    /// SHA-256 of the canonical JSON of `content`.
    pub content_hash: String,
    pub content: serde_json::Value,
    pub caption: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Resource {
    pub fn user(&self) -> UserRef<'_> {
        UserRef::new(&self.tenant_id, &self.user_id)
    }
    /// The messages of a conversation resource (empty for other modalities).
    pub fn messages(&self) -> Vec<Message> {
        serde_json::from_value(self.content.get("messages").cloned().unwrap_or_default())
            .unwrap_or_default()
    }
    /// The resource as text: `role: content` lines of a conversation, or the document.
    pub fn as_text(&self) -> String {
        match self.modality {
            Modality::Document => self.document_text(),
            Modality::Conversation => self
                .messages()
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
    /// The text of a document resource (empty for other modalities).
    pub fn document_text(&self) -> String {
        self.content
            .get("text")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    }
    pub fn session_date(&self) -> Option<DateTime<Utc>> {
        self.content
            .get("session_date")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }
    pub fn user_name(&self) -> Option<String> {
        self.content
            .get("user_name")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }
    /// What the memorize request changed for its own job.
    pub fn overrides(&self) -> JobOverrides {
        self.content
            .get("override_config")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }
}

/// A memorize request's own memory types and categories (memU's `override_config`): its job
/// extracts only these types and files only into these categories, which are created for the
/// user and agent on first use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOverrides {
    pub memory_types: Option<Vec<MemoryType>>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub memory_categories: Option<Vec<memu_crds::worker::CategorySpec>>,
}

impl JobOverrides {
    pub fn is_empty(&self) -> bool {
        self.memory_types.is_none() && self.memory_categories.is_none()
    }
    /// The memory types the job extracts.
    pub fn memory_types<'a>(&'a self, configured: &'a [MemoryType]) -> &'a [MemoryType] {
        self.memory_types.as_deref().unwrap_or(configured)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskStatus {
    Pending,
    Processing,
    Success,
    Failed,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "PENDING",
            TaskStatus::Processing => "PROCESSING",
            TaskStatus::Success => "SUCCESS",
            TaskStatus::Failed => "FAILED",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PENDING" => Some(TaskStatus::Pending),
            "PROCESSING" => Some(TaskStatus::Processing),
            "SUCCESS" => Some(TaskStatus::Success),
            "FAILED" => Some(TaskStatus::Failed),
            _ => None,
        }
    }
}

/// A memorize job.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub id: Uuid,
    pub tenant_id: String,
    pub user_id: String,
    pub agent_id: String,
    pub resource_id: Uuid,
    pub status: TaskStatus,
    pub attempts: u32,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    /// W3C `traceparent` of the request that queued the job (tracing on and sampled).
    pub trace_parent: Option<String>,
}

impl Task {
    pub fn user(&self) -> UserRef<'_> {
        UserRef::new(&self.tenant_id, &self.user_id)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryItem {
    pub id: Uuid,
    pub tenant_id: String,
    pub user_id: String,
    pub agent_id: String,
    pub resource_id: Option<Uuid>,
    pub memory_type: MemoryType,
    pub summary: String,
    pub happened_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub extra: serde_json::Value,
}

impl MemoryItem {
    pub fn user(&self) -> UserRef<'_> {
        UserRef::new(&self.tenant_id, &self.user_id)
    }
}

/// A memory item as written, with its embedding.
#[derive(Clone, Debug)]
pub struct NewItem {
    pub item: MemoryItem,
    pub embedding: Vec<f32>,
}

/// A user's category. Categories are private to one user (and agent): memU shares them across
/// users, which leaks one user's summaries into another's retrieve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Category {
    pub id: Uuid,
    pub tenant_id: String,
    pub user_id: String,
    pub agent_id: String,
    pub name: String,
    pub description: String,
    pub summary: String,
    pub embedding: Vec<f32>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CategoryLink {
    pub item_id: Uuid,
    pub category_id: Uuid,
    pub confidence: f32,
}

/// A category summary rewritten by a memorize job.
#[derive(Clone, Debug, PartialEq)]
pub struct CategoryUpdate {
    pub category_id: Uuid,
    pub summary: String,
    pub embedding: Vec<f32>,
}

/// Everything one memorize job writes, applied in one transaction together with the task's
/// completion so a crash never leaves half a job behind.
#[derive(Clone, Debug, Default)]
pub struct MemorizeOutcome {
    pub items: Vec<NewItem>,
    /// Existing items rewritten by dedupe (same id; new text, embedding and history in `extra`).
    pub revisions: Vec<NewItem>,
    pub links: Vec<CategoryLink>,
    pub category_updates: Vec<CategoryUpdate>,
    pub resource_caption: Option<String>,
}

/// Filters of a vector search or listing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemFilter {
    pub agent_id: Option<String>,
    pub memory_types: Vec<MemoryType>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl ItemFilter {
    /// Whether an item passes the filter; the time range applies to `happened_at`, falling back
    /// to `created_at` for items without one.
    pub fn matches(&self, item: &MemoryItem) -> bool {
        if let Some(agent) = &self.agent_id
            && &item.agent_id != agent
        {
            return false;
        }
        if !self.memory_types.is_empty() && !self.memory_types.contains(&item.memory_type) {
            return false;
        }
        let at = item.happened_at.unwrap_or(item.created_at);
        self.since.is_none_or(|s| at >= s) && self.until.is_none_or(|u| at < u)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredItem {
    pub item: MemoryItem,
    /// Cosine similarity to the query, in [-1, 1].
    pub score: f32,
}

/// Changes to an existing item; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct ItemPatch {
    pub summary: Option<String>,
    pub embedding: Option<Vec<f32>>,
    pub memory_type: Option<MemoryType>,
    pub happened_at: Option<Option<DateTime<Utc>>>,
    pub extra: Option<serde_json::Value>,
}

/// One page of a listing; `next_cursor` continues it.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// What deleting a user's data removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct DeletedCounts {
    pub memory_items: u64,
    pub categories: u64,
    pub resources: u64,
    pub tasks: u64,
}

/// Cosine similarity of two L2-normalised vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scales a vector to unit length (leaves a zero vector as it is).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// One LLM call, as written to the cost log.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlmUsage {
    pub id: Uuid,
    pub tenant_id: String,
    pub user_id: String,
    pub task_id: Option<Uuid>,
    /// `memorize` or `retrieve`.
    pub operation: String,
    /// The step: `extract`, `resolve`, `categorize`, `route`, `sufficient`.
    pub prompt: String,
    pub provider: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    pub cost_usd: f64,
    pub created_at: DateTime<Utc>,
}

/// Totals of a user's LLM calls for one provider, model and operation.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct UsageTotals {
    pub operation: String,
    pub provider: String,
    pub model: String,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}
