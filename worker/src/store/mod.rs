//! Storage layer: one narrow trait, implemented by the embedded SQLite store and the
//! Postgres + pgvector store (which is also the Citus data path: every key includes `user_id`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use memu_crds::worker::{CategorySpec, DatabaseBackend, WorkerConfig};

use crate::model::{
    Category, CategoryLink, DeletedCounts, ItemFilter, ItemPatch, LlmUsage, MemorizeOutcome,
    MemoryItem, MemoryType, NewItem, Page, Resource, Scope, ScoredItem, Task, UsageTotals, UserRef,
};
use crate::tenancy::{ApiKeyRecord, AuditEntry, CostRow, DailyUsage, Tenant, TenantLimits};

pub mod postgres;
pub mod sqlite;
mod vector_index;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database does not fit this worker (dimension, model, schema version); says how to fix.
    #[error("{0}")]
    Incompatible(String),
    #[error("database not ready: {0}")]
    NotReady(String),
    #[error("{0}")]
    Invalid(String),
    /// A unique key is taken (an idempotency key used before).
    #[error("already exists: {0}")]
    Duplicate(String),
}

/// Memorize queue figures, exported on `/metrics` for queue-driven autoscaling.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueStats {
    pub pending: u64,
    pub processing: u64,
    /// Age of the oldest PENDING task (0 when none).
    pub oldest_pending_seconds: f64,
}

/// Wait before retry `attempt` (1-based) of a job: `base` × 2^(attempt-1), at most 5 minutes.
pub(crate) fn retry_delay(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(300))
}

/// Splits records by tenant, keeping their order (each tenant's rows go in one transaction bound
/// to that tenant).
pub(crate) fn group_by_tenant<'a, T>(
    records: &'a [T],
    tenant: impl Fn(&'a T) -> &'a String,
) -> Vec<(&'a str, Vec<&'a T>)> {
    let mut groups: Vec<(&'a str, Vec<&'a T>)> = Vec::new();
    for record in records {
        let id = tenant(record).as_str();
        match groups.iter_mut().find(|(t, _)| *t == id) {
            Some((_, members)) => members.push(record),
            None => groups.push((id, vec![record])),
        }
    }
    groups
}

/// A column type both stores decode the same way.
pub(crate) trait Column<'r, R: sqlx::Row>:
    sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>
{
}
impl<'r, R: sqlx::Row, T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>> Column<'r, R>
    for T
{
}

/// A row of LLM usage totals (`operation`, `provider`, `model`, `calls`, token sums, cost).
pub(crate) fn usage_totals_from<'r, R>(r: &'r R) -> Result<UsageTotals, StoreError>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: Column<'r, R>,
    i64: Column<'r, R>,
    f64: Column<'r, R>,
{
    Ok(UsageTotals {
        operation: r.try_get("operation")?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        calls: r.try_get::<i64, _>("calls")? as u64,
        prompt_tokens: r.try_get::<i64, _>("prompt_tokens")? as u64,
        completion_tokens: r.try_get::<i64, _>("completion_tokens")? as u64,
        cost_usd: r.try_get("cost_usd")?,
    })
}

/// A row of the cost report (`day`, `user_id`, `provider`, `model` and the usage sums).
pub(crate) fn cost_row_from<'r, R>(tenant_id: &str, r: &'r R) -> Result<CostRow, StoreError>
where
    R: sqlx::Row,
    &'static str: sqlx::ColumnIndex<R>,
    String: Column<'r, R>,
    i64: Column<'r, R>,
    f64: Column<'r, R>,
{
    Ok(CostRow {
        day: r.try_get("day")?,
        tenant_id: tenant_id.to_string(),
        user_id: r.try_get("user_id")?,
        provider: r.try_get("provider")?,
        model: r.try_get("model")?,
        calls: r.try_get::<i64, _>("calls")? as u64,
        prompt_tokens: r.try_get::<i64, _>("prompt_tokens")? as u64,
        completion_tokens: r.try_get::<i64, _>("completion_tokens")? as u64,
        cost_usd: r.try_get("cost_usd")?,
    })
}

/// Maps a unique-key violation to [`StoreError::Duplicate`].
pub(crate) fn duplicate_or(e: sqlx::Error, what: &str) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Duplicate(what.to_string())
        }
        _ => StoreError::Database(e),
    }
}

/// Connection pool figures for the metrics endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// `primary` or `replica`.
    pub pool: &'static str,
    pub in_use: u32,
    pub idle: u32,
    pub max: u32,
}

/// Embedding space the stored vectors belong to; checked on start-up so that a worker with a
/// different model never mixes incomparable vectors into one index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingSpace {
    pub dimension: usize,
    pub model: String,
}

/// All of one user's data, for GDPR export.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct UserExport {
    pub tenant_id: String,
    pub user_id: String,
    pub exported_at: DateTime<Utc>,
    #[schema(value_type = Vec<Object>)]
    pub resources: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub memory_items: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub categories: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub category_items: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<serde_json::Value>,
    /// Authenticated requests about this user (the service fills it in).
    pub audit: Vec<AuditEntry>,
}

/// Tenants, keys, audit log and cost report: the control records of authentication.
#[async_trait]
pub trait AccessStore: Send + Sync + 'static {
    /// [`StoreError::Duplicate`] when the id is taken.
    async fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError>;
    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, StoreError>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    async fn set_tenant_limits(
        &self,
        tenant_id: &str,
        limits: &TenantLimits,
    ) -> Result<Option<Tenant>, StoreError>;
    /// Stores a key; with `replace`, an existing key of the same id is overwritten (bootstrap).
    async fn insert_api_key(&self, key: &ApiKeyRecord, replace: bool) -> Result<(), StoreError>;
    async fn find_api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    async fn list_api_keys(&self, tenant_id: &str) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Revokes a key of the tenant; false when it has no such key.
    async fn revoke_api_key(&self, tenant_id: &str, key_id: &str) -> Result<bool, StoreError>;
    async fn touch_api_key(&self, key_id: &str, at: DateTime<Utc>) -> Result<(), StoreError>;

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError>;
    /// Newest first; only entries about `target_user` when given; all of them without `limit`.
    async fn list_audit(
        &self,
        tenant_id: &str,
        target_user: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// Replaces an erased user's id in the audit log by a pseudonym; returns the entries changed.
    async fn pseudonymise_audit(
        &self,
        user: UserRef<'_>,
        pseudonym: &str,
    ) -> Result<u64, StoreError>;

    /// Memorize jobs created and LLM tokens used by the tenant since `since`.
    async fn tenant_usage_since(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
    ) -> Result<DailyUsage, StoreError>;
    /// LLM cost per day, user, provider and model of the tenant in `[since, until)`.
    async fn cost_report(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<CostRow>, StoreError>;
}

#[async_trait]
pub trait MemoryStore: AccessStore {
    fn backend(&self) -> &'static str;

    /// Applies pending migrations and creates the vector columns and indexes for the space.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Database reachable, migrations applied, embedding space as configured.
    async fn check_ready(&self) -> Result<(), StoreError>;
    fn pool_stats(&self) -> Vec<PoolStats>;

    /// Stores the resource and its PENDING task atomically (and the user, if new). With an
    /// idempotency key already used by this user, nothing is written and
    /// [`StoreError::Duplicate`] is returned.
    async fn enqueue_memorize(
        &self,
        resource: &Resource,
        task: &Task,
        user_name: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<(), StoreError>;
    /// The task a memorize with this idempotency key created.
    async fn find_task_by_key(
        &self,
        user: UserRef<'_>,
        key: &str,
    ) -> Result<Option<Task>, StoreError>;
    /// Puts a FAILED task of the tenant back in the queue with a fresh attempt budget; None when
    /// the tenant has no such task or it is not FAILED.
    async fn retry_task(&self, tenant_id: &str, task_id: Uuid) -> Result<Option<Task>, StoreError>;
    /// Queue figures for autoscaling.
    async fn queue_stats(&self) -> Result<QueueStats, StoreError>;
    /// Takes the oldest runnable task (PENDING, or PROCESSING with an expired lease).
    async fn claim_task(
        &self,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Option<(Task, Resource)>, StoreError>;
    /// Extends the lease of a task this worker holds.
    async fn heartbeat_task(
        &self,
        task: &Task,
        worker_id: &str,
        lease: Duration,
    ) -> Result<(), StoreError>;
    /// The newest task of the scope whose resource has this content hash and that has not
    /// FAILED: the same resource memorized again is recognised instead of extracted twice.
    async fn find_memorized(
        &self,
        scope: &Scope,
        content_hash: &str,
    ) -> Result<Option<Task>, StoreError>;
    /// Writes the job's results (new items, revised items, links, summaries) and marks the task
    /// SUCCESS, in one transaction — only while this claim (its `attempts`) still holds the
    /// task: a worker whose lease expired and was taken over writes nothing.
    async fn complete_task(&self, task: &Task, outcome: MemorizeOutcome) -> Result<(), StoreError>;
    /// Records a failure: back to PENDING when `retry`, else FAILED for good (ignored when
    /// the claim was taken over, like `complete_task`).
    async fn fail_task(&self, task: &Task, error: &str, retry: bool) -> Result<(), StoreError>;
    /// A task of the tenant (None for another tenant's id).
    async fn get_task(&self, tenant_id: &str, task_id: Uuid) -> Result<Option<Task>, StoreError>;

    /// Creates the scope's missing categories (embeddings given) and returns all of them.
    async fn ensure_categories(
        &self,
        scope: &Scope,
        specs: &[(CategorySpec, Vec<f32>)],
    ) -> Result<Vec<Category>, StoreError>;
    async fn list_categories(&self, scope: &Scope) -> Result<Vec<Category>, StoreError>;
    /// The user's categories of every agent, with how many items each holds.
    async fn list_user_categories(
        &self,
        user: UserRef<'_>,
    ) -> Result<Vec<(Category, u64)>, StoreError>;
    /// Files an item into exactly these categories (its earlier links go).
    async fn file_item(
        &self,
        user: UserRef<'_>,
        item_id: Uuid,
        links: &[CategoryLink],
    ) -> Result<(), StoreError>;
    /// The categories the given items are filed in, as `(item, category)` pairs.
    async fn item_categories(
        &self,
        user: UserRef<'_>,
        item_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, Uuid)>, StoreError>;
    /// Newest items of a category, for summaries.
    async fn category_items(
        &self,
        user: UserRef<'_>,
        category_id: Uuid,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError>;

    /// The `k` items of the user nearest to `query` (unit-length) that pass the filter.
    async fn search_items(
        &self,
        user: UserRef<'_>,
        query: &[f32],
        filter: &ItemFilter,
        k: usize,
    ) -> Result<Vec<ScoredItem>, StoreError>;
    /// Up to `k` items of the user matching the words of `query` (full text), best first; the
    /// score is the backend's text rank (higher is better), comparable only within one answer.
    async fn search_text(
        &self,
        user: UserRef<'_>,
        query: &str,
        filter: &ItemFilter,
        k: usize,
    ) -> Result<Vec<ScoredItem>, StoreError>;
    /// Newest first; `cursor` comes from the previous page.
    async fn list_items(
        &self,
        user: UserRef<'_>,
        filter: &ItemFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<MemoryItem>, StoreError>;
    async fn get_item(&self, user: UserRef<'_>, id: Uuid)
    -> Result<Option<MemoryItem>, StoreError>;
    /// Inserts one item (creating the user if new).
    async fn insert_item(&self, item: &NewItem) -> Result<(), StoreError>;
    async fn update_item(
        &self,
        user: UserRef<'_>,
        id: Uuid,
        patch: &ItemPatch,
    ) -> Result<Option<MemoryItem>, StoreError>;
    async fn delete_item(&self, user: UserRef<'_>, id: Uuid) -> Result<bool, StoreError>;
    /// Id of an item of the scope with exactly this type and text, if any (cheap dedupe).
    async fn find_identical_item(
        &self,
        scope: &Scope,
        memory_type: MemoryType,
        summary: &str,
    ) -> Result<Option<Uuid>, StoreError>;
    async fn get_resources(
        &self,
        user: UserRef<'_>,
        ids: &[Uuid],
    ) -> Result<Vec<Resource>, StoreError>;

    /// Removes every row of the user (or of one agent of the user).
    async fn delete_user(
        &self,
        user: UserRef<'_>,
        agent_id: Option<&str>,
    ) -> Result<DeletedCounts, StoreError>;
    async fn export_user(&self, user: UserRef<'_>) -> Result<UserExport, StoreError>;

    /// Appends to the LLM cost log.
    async fn record_llm_usage(&self, calls: &[LlmUsage]) -> Result<(), StoreError>;
    /// The user's LLM calls, totalled per operation, provider and model.
    async fn llm_usage_totals(&self, user: UserRef<'_>) -> Result<Vec<UsageTotals>, StoreError>;
}

/// Words of a full-text query: letters and digits only (so no query syntax gets through),
/// lower-cased, without common English function words, at most 32.
pub(crate) fn text_query_terms(query: &str) -> Vec<String> {
    const STOP: &[&str] = &[
        "a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "has",
        "have", "how", "i", "in", "is", "it", "its", "me", "my", "of", "on", "or", "that", "the",
        "their", "there", "this", "to", "was", "were", "what", "when", "where", "which", "who",
        "why", "will", "with", "you", "your",
    ];
    let mut terms: Vec<String> = Vec::new();
    for word in query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let word = word.to_lowercase();
        if !STOP.contains(&word.as_str()) && !terms.contains(&word) {
            terms.push(word);
        }
    }
    terms.truncate(32);
    terms
}

/// Opens the configured store. `space` is the embedding space of the configured model.
pub async fn open(
    config: &WorkerConfig,
    space: EmbeddingSpace,
) -> anyhow::Result<Arc<dyn MemoryStore>> {
    Ok(match config.database.backend {
        DatabaseBackend::Sqlite => Arc::new(sqlite::SqliteStore::open(config, space).await?),
        DatabaseBackend::Postgres => Arc::new(postgres::PgStore::open(config, space).await?),
    })
}

/// Paging cursor: the (created_at, id) of the last row of the previous page.
pub(crate) fn encode_cursor(created_at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", created_at.timestamp_micros(), id.simple())
}

pub(crate) fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), StoreError> {
    let bad = || StoreError::Invalid("cursor is not one this service returned".into());
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// Which count an erase statement adds to.
pub(crate) type CountSlot = fn(&mut DeletedCounts) -> &mut u64;

/// The statements that erase a user's rows (or one agent's), children first so the counts are
/// exact whatever cascades exist. `$1` is the tenant, `$2` the user and `$3` the agent, always
/// first used in that order: SQLite reads `$n` as a named parameter numbered by first
/// appearance, so one text serves both stores.
pub(crate) fn erase_statements(by_agent: bool) -> Vec<(String, Option<CountSlot>)> {
    let scoped = |table: &str| match by_agent {
        true => {
            format!("DELETE FROM {table} WHERE tenant_id = $1 AND user_id = $2 AND agent_id = $3")
        }
        false => format!("DELETE FROM {table} WHERE tenant_id = $1 AND user_id = $2"),
    };
    let links = match by_agent {
        true => "DELETE FROM category_items WHERE tenant_id = $1 AND user_id = $2 AND memory_item_id IN \
                 (SELECT id FROM memory_items WHERE tenant_id = $1 AND user_id = $2 AND agent_id = $3)"
            .to_string(),
        false => "DELETE FROM category_items WHERE tenant_id = $1 AND user_id = $2".to_string(),
    };
    let mut statements: Vec<(String, Option<CountSlot>)> = vec![
        (links, None),
        (scoped("memory_items"), Some(|c| &mut c.memory_items)),
        (scoped("memory_categories"), Some(|c| &mut c.categories)),
        (scoped("memorize_tasks"), Some(|c| &mut c.tasks)),
        (scoped("resources"), Some(|c| &mut c.resources)),
    ];
    if !by_agent {
        statements.push((scoped("llm_usage"), None));
        statements.push((scoped("users"), None));
    }
    statements
}

/// Mismatch message shared by both stores.
pub(crate) fn check_space(
    stored: &EmbeddingSpace,
    wanted: &EmbeddingSpace,
) -> Result<(), StoreError> {
    if stored.dimension != wanted.dimension {
        return Err(StoreError::Incompatible(format!(
            "the database holds {}-dimensional embeddings but vector.dimension is {}: \
             set vector.dimension to {} or point the worker at a new database",
            stored.dimension, wanted.dimension, stored.dimension
        )));
    }
    if stored.model != wanted.model {
        return Err(StoreError::Incompatible(format!(
            "the database holds embeddings of model `{}` but the configured model is `{}`: \
             their vectors are not comparable; use the same model or a new database",
            stored.model, wanted.model
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let at = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::new_v4();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).unwrap(), (at, id));
        assert!(decode_cursor("nope").is_err());
        assert!(decode_cursor("12_notauuid").is_err());
    }

    #[test]
    fn job_retries_back_off_exponentially_and_cap() {
        let base = Duration::from_secs(2);
        assert_eq!(retry_delay(base, 1), Duration::from_secs(2));
        assert_eq!(retry_delay(base, 3), Duration::from_secs(8));
        assert_eq!(retry_delay(base, 40), Duration::from_secs(300));
        assert_eq!(retry_delay(Duration::ZERO, 5), Duration::ZERO);
    }

    #[test]
    fn text_queries_keep_names_and_numbers_only() {
        assert_eq!(
            text_query_terms("What is Maria's order number? #48213 \"OR\" NEAR(x)"),
            ["maria", "s", "order", "number", "48213", "near", "x"]
        );
        assert!(text_query_terms("?? !!").is_empty());
    }
}
