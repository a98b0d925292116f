//! Embedded store: one SQLite file (WAL), vectors searched in process.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use memu_crds::worker::{CategorySpec, Quantization, WorkerConfig};

use super::vector_index::{RowEncoding, RowMeta, UserIndexes, dot_unrolled};
use super::{
    AccessStore, EmbeddingSpace, MemoryStore, PoolStats, QueueStats, StoreError, UserExport,
    check_space, cost_row_from, decode_cursor, duplicate_or, encode_cursor, erase_statements,
    text_query_terms, usage_totals_from,
};
use crate::model::{
    Category, CategoryLink, DeletedCounts, ItemFilter, ItemPatch, LlmUsage, MemorizeOutcome,
    MemoryItem, MemoryType, Modality, NewItem, Page, Resource, Scope, ScoredItem, Task, TaskStatus,
    UsageTotals, UserRef,
};
use crate::tenancy::{
    ApiKeyRecord, AuditEntry, CostRow, DailyUsage, Tenant, TenantLimits, parse_scopes,
    scopes_to_text,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Users whose vectors stay cached in memory.
const CACHED_USERS: usize = 4096;

pub struct SqliteStore {
    pool: SqlitePool,
    space: EmbeddingSpace,
    max_connections: u32,
    index: UserIndexes,
    retry_backoff: Duration,
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(v).unwrap_or_default()
}

fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode_vector(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn uuid_col(row: &SqliteRow, col: &str) -> Result<Uuid, StoreError> {
    let text: String = row.try_get(col)?;
    Uuid::parse_str(&text).map_err(|e| StoreError::Invalid(format!("bad uuid in {col}: {e}")))
}

fn item_from_row(row: &SqliteRow) -> Result<MemoryItem, StoreError> {
    let memory_type: String = row.try_get("memory_type")?;
    let resource_id: Option<String> = row.try_get("resource_id")?;
    let extra: String = row.try_get("extra")?;
    Ok(MemoryItem {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        resource_id: resource_id.and_then(|r| Uuid::parse_str(&r).ok()),
        memory_type: MemoryType::parse(&memory_type)
            .ok_or_else(|| StoreError::Invalid(format!("unknown memory_type {memory_type}")))?,
        summary: row.try_get("summary")?,
        happened_at: row
            .try_get::<Option<i64>, _>("happened_at")?
            .map(from_micros),
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
        extra: serde_json::from_str(&extra).unwrap_or_default(),
    })
}

fn category_from_row(row: &SqliteRow) -> Result<Category, StoreError> {
    let embedding: Vec<u8> = row.try_get("embedding")?;
    Ok(Category {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        summary: row.try_get("summary")?,
        embedding: decode_vector(&embedding),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

fn task_from_row(row: &SqliteRow) -> Result<Task, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Task {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        resource_id: uuid_col(row, "resource_id")?,
        status: TaskStatus::parse(&status)
            .ok_or_else(|| StoreError::Invalid(format!("unknown task status {status}")))?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        error: row.try_get("error")?,
        created_at: from_micros(row.try_get("created_at")?),
        started_at: row
            .try_get::<Option<i64>, _>("started_at")?
            .map(from_micros),
        completed_at: row
            .try_get::<Option<i64>, _>("completed_at")?
            .map(from_micros),
        trace_parent: row.try_get("trace_parent")?,
    })
}

fn resource_from_row(row: &SqliteRow) -> Result<Resource, StoreError> {
    let modality: String = row.try_get("modality")?;
    let content: String = row.try_get("content")?;
    Ok(Resource {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        modality: Modality::parse(&modality)
            .ok_or_else(|| StoreError::Invalid(format!("unknown modality {modality}")))?,
        content_hash: row.try_get("content_hash")?,
        content: serde_json::from_str(&content).unwrap_or_default(),
        caption: row.try_get("caption")?,
        created_at: from_micros(row.try_get("created_at")?),
    })
}

/// Key of a user's vectors in the in-process index.
fn index_key(user: UserRef<'_>) -> String {
    format!("{}\u{0}{}", user.tenant_id, user.user_id)
}

fn row_meta(item: &MemoryItem) -> RowMeta {
    RowMeta {
        agent_id: item.agent_id.as_str().into(),
        memory_type: item.memory_type,
        at_micros: micros(item.happened_at.unwrap_or(item.created_at)),
    }
}

/// Candidates an int8 search hands to exact rescoring per result asked for.
const RESCORED_CANDIDATES_PER_RESULT: usize = 4;

const ITEM_COLUMNS: &str = "tenant_id, user_id, id, agent_id, resource_id, memory_type, summary, happened_at, \
                            created_at, updated_at, extra";

impl SqliteStore {
    pub async fn open(config: &WorkerConfig, space: EmbeddingSpace) -> anyhow::Result<Self> {
        let path = &config.database.sqlite_path;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                anyhow::anyhow!("cannot create database directory {}: {e}", dir.display())
            })?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(config.database.max_connections)
            .min_connections(config.database.min_connections)
            .acquire_timeout(Duration::from_secs(config.database.acquire_timeout_secs))
            .connect_with(options)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        Ok(Self {
            pool,
            index: UserIndexes::new(
                space.dimension,
                match config.vector.quantization {
                    Quantization::None => RowEncoding::F32,
                    Quantization::Int8 => RowEncoding::Int8,
                },
                CACHED_USERS,
            ),
            space,
            max_connections: config.database.max_connections,
            retry_backoff: Duration::from_millis(config.pipeline.retry_backoff_ms),
        })
    }

    async fn stored_space(&self) -> Result<Option<EmbeddingSpace>, StoreError> {
        let rows = sqlx::query("SELECT key, value FROM memu_meta WHERE key IN ('embedding_dimension', 'embedding_model')")
            .fetch_all(&self.pool)
            .await?;
        let get = |k: &str| {
            rows.iter()
                .find(|r| r.get::<String, _>("key") == k)
                .map(|r| r.get::<String, _>("value"))
        };
        Ok(match (get("embedding_dimension"), get("embedding_model")) {
            (Some(dim), Some(model)) => Some(EmbeddingSpace {
                dimension: dim.parse().unwrap_or(0),
                model,
            }),
            _ => None,
        })
    }

    /// Loads the user's vectors into the in-process index unless cached.
    async fn user_index(
        &self,
        user: UserRef<'_>,
    ) -> Result<std::sync::Arc<tokio::sync::RwLock<super::vector_index::UserVectors>>, StoreError>
    {
        let entry = self.index.entry(&index_key(user));
        if entry.read().await.is_loaded() {
            return Ok(entry);
        }
        let mut vectors = entry.write().await;
        if !vectors.is_loaded() {
            let rows = sqlx::query(
                "SELECT id, agent_id, memory_type, happened_at, created_at, embedding \
                 FROM memory_items WHERE tenant_id = ? AND user_id = ?",
            )
            .bind(user.tenant_id)
            .bind(user.user_id)
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                let memory_type: String = row.try_get("memory_type")?;
                let at: Option<i64> = row.try_get("happened_at")?;
                let created: i64 = row.try_get("created_at")?;
                let agent: String = row.try_get("agent_id")?;
                let embedding: Vec<u8> = row.try_get("embedding")?;
                vectors.upsert(
                    uuid_col(&row, "id")?,
                    RowMeta {
                        agent_id: agent.as_str().into(),
                        memory_type: MemoryType::parse(&memory_type).unwrap_or(MemoryType::Event),
                        at_micros: at.unwrap_or(created),
                    },
                    &decode_vector(&embedding),
                );
            }
            vectors.mark_loaded();
        }
        drop(vectors);
        Ok(entry)
    }

    async fn index_upsert(&self, items: &[NewItem]) {
        for new in items {
            if let Some(entry) = self.index.cached(&index_key(new.item.user())) {
                entry
                    .write()
                    .await
                    .upsert(new.item.id, row_meta(&new.item), &new.embedding);
            }
        }
    }

    async fn insert_items_tx(
        tx: &mut sqlx::SqliteConnection,
        items: &[NewItem],
    ) -> Result<(), StoreError> {
        for new in items {
            let item = &new.item;
            sqlx::query(
                "INSERT INTO memory_items (tenant_id, user_id, id, agent_id, resource_id, memory_type, \
                 summary, happened_at, created_at, updated_at, extra, embedding) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&item.tenant_id)
            .bind(&item.user_id)
            .bind(item.id.to_string())
            .bind(&item.agent_id)
            .bind(item.resource_id.map(|r| r.to_string()))
            .bind(item.memory_type.as_str())
            .bind(&item.summary)
            .bind(item.happened_at.map(micros))
            .bind(micros(item.created_at))
            .bind(micros(item.updated_at))
            .bind(item.extra.to_string())
            .bind(encode_vector(&new.embedding))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn insert_links_tx(
        tx: &mut sqlx::SqliteConnection,
        user: UserRef<'_>,
        links: &[CategoryLink],
    ) -> Result<(), StoreError> {
        for link in links {
            sqlx::query(
                "INSERT INTO category_items (tenant_id, user_id, memory_item_id, category_id, confidence) \
                 VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant_id, user_id, memory_item_id, category_id) \
                 DO UPDATE SET confidence = excluded.confidence",
            )
            .bind(user.tenant_id)
            .bind(user.user_id)
            .bind(link.item_id.to_string())
            .bind(link.category_id.to_string())
            .bind(link.confidence)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn upsert_user(
        tx: &mut sqlx::SqliteConnection,
        user: UserRef<'_>,
        user_name: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (tenant_id, user_id, user_name, created_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (tenant_id, user_id) DO UPDATE SET user_name = COALESCE(excluded.user_name, users.user_name)",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(user_name)
        .bind(micros(Utc::now()))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    fn push_filter(qb: &mut QueryBuilder<Sqlite>, filter: &ItemFilter) {
        if let Some(agent) = &filter.agent_id {
            qb.push(" AND agent_id = ").push_bind(agent.clone());
        }
        if !filter.memory_types.is_empty() {
            qb.push(" AND memory_type IN (");
            let mut sep = qb.separated(", ");
            for t in &filter.memory_types {
                sep.push_bind(t.as_str());
            }
            qb.push(")");
        }
        if let Some(since) = filter.since {
            qb.push(" AND COALESCE(happened_at, created_at) >= ")
                .push_bind(micros(since));
        }
        if let Some(until) = filter.until {
            qb.push(" AND COALESCE(happened_at, created_at) < ")
                .push_bind(micros(until));
        }
    }

    /// Rows of one user as JSON objects; `sql` binds the tenant, then the user.
    async fn rows_as_json(
        &self,
        sql: &str,
        user: UserRef<'_>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows: Vec<(String,)> = sqlx::query_as(AssertSqlSafe(sql.to_string()))
            .bind(user.tenant_id)
            .bind(user.user_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(json,)| serde_json::from_str(&json).ok())
            .collect())
    }
}

#[async_trait]
impl MemoryStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        match self.stored_space().await? {
            Some(stored) => check_space(&stored, &self.space)?,
            None => {
                sqlx::query(
                    "INSERT INTO memu_meta (key, value) VALUES ('embedding_dimension', ?), ('embedding_model', ?)",
                )
                .bind(self.space.dimension.to_string())
                .bind(&self.space.model)
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        let applied: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await
                .map_err(|_| {
                    StoreError::NotReady(
                        "migrations have not been applied; run `memu-worker migrate`".into(),
                    )
                })?;
        if let Some(missing) = MIGRATOR
            .iter()
            .find(|m| !applied.iter().any(|(v,)| *v == m.version))
        {
            return Err(StoreError::NotReady(format!(
                "migration {} ({}) is not applied; run `memu-worker migrate`",
                missing.version, missing.description
            )));
        }
        match self.stored_space().await? {
            Some(stored) => check_space(&stored, &self.space),
            None => Err(StoreError::NotReady(
                "embedding space not recorded; run `memu-worker migrate`".into(),
            )),
        }
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        let size = self.pool.size();
        let idle = self.pool.num_idle() as u32;
        vec![PoolStats {
            pool: "primary",
            in_use: size.saturating_sub(idle),
            idle,
            max: self.max_connections,
        }]
    }

    async fn enqueue_memorize(
        &self,
        resource: &Resource,
        task: &Task,
        user_name: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::upsert_user(&mut tx, resource.user(), user_name).await?;
        sqlx::query(
            "INSERT INTO resources (tenant_id, user_id, id, agent_id, modality, content_hash, content, caption, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&resource.tenant_id)
        .bind(&resource.user_id)
        .bind(resource.id.to_string())
        .bind(&resource.agent_id)
        .bind(resource.modality.as_str())
        .bind(&resource.content_hash)
        .bind(resource.content.to_string())
        .bind(&resource.caption)
        .bind(micros(resource.created_at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO memorize_tasks (tenant_id, user_id, id, agent_id, resource_id, status, attempts, created_at, idempotency_key, trace_parent) \
             VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
        )
        .bind(&task.tenant_id)
        .bind(&task.user_id)
        .bind(task.id.to_string())
        .bind(&task.agent_id)
        .bind(task.resource_id.to_string())
        .bind(task.status.as_str())
        .bind(micros(task.created_at))
        .bind(idempotency_key)
        .bind(&task.trace_parent)
        .execute(&mut *tx)
        .await
        .map_err(|e| duplicate_or(e, "idempotency key"))?;
        tx.commit().await?;
        Ok(())
    }

    async fn find_memorized(
        &self,
        scope: &Scope,
        content_hash: &str,
    ) -> Result<Option<Task>, StoreError> {
        sqlx::query(
            "SELECT t.* FROM memorize_tasks t JOIN resources r \
               ON r.tenant_id = t.tenant_id AND r.user_id = t.user_id AND r.id = t.resource_id \
             WHERE r.tenant_id = ? AND r.user_id = ? AND r.agent_id = ? AND r.content_hash = ? \
               AND t.status <> 'FAILED' \
             ORDER BY t.created_at DESC LIMIT 1",
        )
        .bind(&scope.tenant_id)
        .bind(&scope.user_id)
        .bind(&scope.agent_id)
        .bind(content_hash)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| task_from_row(&r))
        .transpose()
    }

    async fn find_task_by_key(
        &self,
        user: UserRef<'_>,
        key: &str,
    ) -> Result<Option<Task>, StoreError> {
        sqlx::query(
            "SELECT * FROM memorize_tasks WHERE tenant_id = ? AND user_id = ? AND idempotency_key = ?",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| task_from_row(&r))
            .transpose()
    }

    async fn retry_task(&self, tenant_id: &str, task_id: Uuid) -> Result<Option<Task>, StoreError> {
        sqlx::query(
            "UPDATE memorize_tasks SET status = 'PENDING', attempts = 0, error = NULL, \
             completed_at = NULL, lease_until = NULL, worker_id = NULL, not_before = NULL \
             WHERE tenant_id = ? AND id = ? AND status = 'FAILED' RETURNING *",
        )
        .bind(tenant_id)
        .bind(task_id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .map(|r| task_from_row(&r))
        .transpose()
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (pending, processing, oldest): (i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT coalesce(sum(status = 'PENDING'), 0), coalesce(sum(status = 'PROCESSING'), 0), \
             min(CASE WHEN status = 'PENDING' THEN created_at END) \
             FROM memorize_tasks WHERE status IN ('PENDING', 'PROCESSING')",
        )
        .fetch_one(&self.pool)
        .await?;
        let now = micros(Utc::now());
        Ok(QueueStats {
            pending: pending as u64,
            processing: processing as u64,
            oldest_pending_seconds: oldest.map(|t| (now - t).max(0) as f64 / 1e6).unwrap_or(0.0),
        })
    }

    async fn claim_task(
        &self,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Option<(Task, Resource)>, StoreError> {
        let now = micros(Utc::now());
        let lease_until = now + lease.as_micros() as i64;
        // One job per user at a time, oldest first: a user's jobs apply in order.
        let row = sqlx::query(
            "UPDATE memorize_tasks SET status = 'PROCESSING', worker_id = ?1, lease_until = ?2, \
                 attempts = attempts + 1, started_at = COALESCE(started_at, ?3) \
             WHERE id = (SELECT t.id FROM memorize_tasks t \
                 WHERE ((t.status = 'PENDING' AND (t.not_before IS NULL OR t.not_before <= ?3)) \
                        OR (t.status = 'PROCESSING' AND t.lease_until < ?3)) \
                   AND NOT EXISTS (SELECT 1 FROM memorize_tasks o WHERE o.tenant_id = t.tenant_id \
                       AND o.user_id = t.user_id \
                       AND o.id <> t.id AND ((o.status = 'PROCESSING' AND o.lease_until >= ?3) \
                           OR (o.status = 'PENDING' AND o.created_at < t.created_at))) \
                 ORDER BY t.created_at LIMIT 1) \
             RETURNING *",
        )
        .bind(worker_id)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let task = task_from_row(&row)?;
        let resource =
            sqlx::query("SELECT * FROM resources WHERE tenant_id = ? AND user_id = ? AND id = ?")
                .bind(&task.tenant_id)
                .bind(&task.user_id)
                .bind(task.resource_id.to_string())
                .fetch_one(&self.pool)
                .await?;
        Ok(Some((task, resource_from_row(&resource)?)))
    }

    async fn heartbeat_task(
        &self,
        task: &Task,
        worker_id: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let until = micros(Utc::now()) + lease.as_micros() as i64;
        sqlx::query(
            "UPDATE memorize_tasks SET lease_until = ? \
             WHERE tenant_id = ? AND id = ? AND worker_id = ? AND status = 'PROCESSING'",
        )
        .bind(until)
        .bind(&task.tenant_id)
        .bind(task.id.to_string())
        .bind(worker_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn complete_task(&self, task: &Task, outcome: MemorizeOutcome) -> Result<(), StoreError> {
        let now = micros(Utc::now());
        let mut tx = self.pool.begin().await?;
        Self::insert_items_tx(&mut tx, &outcome.items).await?;
        for revision in &outcome.revisions {
            let item = &revision.item;
            sqlx::query(
                "UPDATE memory_items SET summary = ?, embedding = ?, extra = ?, happened_at = ?, \
                 updated_at = ? WHERE tenant_id = ? AND user_id = ? AND id = ?",
            )
            .bind(&item.summary)
            .bind(encode_vector(&revision.embedding))
            .bind(item.extra.to_string())
            .bind(item.happened_at.map(micros))
            .bind(micros(item.updated_at))
            .bind(&task.tenant_id)
            .bind(&task.user_id)
            .bind(item.id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        Self::insert_links_tx(&mut tx, task.user(), &outcome.links).await?;
        for update in &outcome.category_updates {
            sqlx::query(
                "UPDATE memory_categories SET summary = ?, embedding = ?, updated_at = ? \
                 WHERE tenant_id = ? AND user_id = ? AND id = ?",
            )
            .bind(&update.summary)
            .bind(encode_vector(&update.embedding))
            .bind(now)
            .bind(&task.tenant_id)
            .bind(&task.user_id)
            .bind(update.category_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        if let Some(caption) = &outcome.resource_caption {
            sqlx::query(
                "UPDATE resources SET caption = ? WHERE tenant_id = ? AND user_id = ? AND id = ?",
            )
            .bind(caption)
            .bind(&task.tenant_id)
            .bind(&task.user_id)
            .bind(task.resource_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        let done = sqlx::query(
            "UPDATE memorize_tasks SET status = 'SUCCESS', completed_at = ?, error = NULL, lease_until = NULL \
             WHERE tenant_id = ? AND id = ? AND status = 'PROCESSING' AND attempts = ?",
        )
        .bind(now)
        .bind(&task.tenant_id)
        .bind(task.id.to_string())
        .bind(task.attempts as i64)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            // The task was deleted (user erased) while it ran: drop the results with it.
            tx.rollback().await?;
            return Ok(());
        }
        tx.commit().await?;
        self.index_upsert(&outcome.items).await;
        self.index_upsert(&outcome.revisions).await;
        Ok(())
    }

    async fn fail_task(&self, task: &Task, error: &str, retry: bool) -> Result<(), StoreError> {
        let now = micros(Utc::now());
        sqlx::query(
            "UPDATE memorize_tasks SET status = ?, error = ?, lease_until = NULL, worker_id = NULL, \
             completed_at = ?, not_before = ? \
             WHERE tenant_id = ? AND id = ? AND status = 'PROCESSING' AND attempts = ?",
        )
        .bind(if retry { "PENDING" } else { "FAILED" })
        .bind(error)
        .bind(if retry { None } else { Some(now) })
        .bind(retry.then(|| now + super::retry_delay(self.retry_backoff, task.attempts).as_micros() as i64))
        .bind(&task.tenant_id)
        .bind(task.id.to_string())
        .bind(task.attempts as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_task(&self, tenant_id: &str, task_id: Uuid) -> Result<Option<Task>, StoreError> {
        sqlx::query("SELECT * FROM memorize_tasks WHERE tenant_id = ? AND id = ?")
            .bind(tenant_id)
            .bind(task_id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .map(|r| task_from_row(&r))
            .transpose()
    }

    async fn ensure_categories(
        &self,
        scope: &Scope,
        specs: &[(CategorySpec, Vec<f32>)],
    ) -> Result<Vec<Category>, StoreError> {
        let now = micros(Utc::now());
        let mut tx = self.pool.begin().await?;
        Self::upsert_user(&mut tx, scope.user(), None).await?;
        for (i, (spec, embedding)) in specs.iter().enumerate() {
            sqlx::query(
                "INSERT OR IGNORE INTO memory_categories \
                 (tenant_id, user_id, id, agent_id, name, description, summary, embedding, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?, ?, '', ?, ?, ?)",
            )
            .bind(&scope.tenant_id)
            .bind(&scope.user_id)
            .bind(Uuid::new_v4().to_string())
            .bind(&scope.agent_id)
            .bind(&spec.name)
            .bind(&spec.description)
            .bind(encode_vector(embedding))
            .bind(now + i as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.list_categories(scope).await
    }

    async fn list_categories(&self, scope: &Scope) -> Result<Vec<Category>, StoreError> {
        sqlx::query(
            "SELECT * FROM memory_categories WHERE tenant_id = ? AND user_id = ? AND agent_id = ? \
             ORDER BY created_at, name",
        )
        .bind(&scope.tenant_id)
        .bind(&scope.user_id)
        .bind(&scope.agent_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(category_from_row)
        .collect()
    }

    async fn list_user_categories(
        &self,
        user: UserRef<'_>,
    ) -> Result<Vec<(Category, u64)>, StoreError> {
        sqlx::query(
            "SELECT c.*, (SELECT count(*) FROM category_items l \
                WHERE l.tenant_id = c.tenant_id AND l.user_id = c.user_id AND l.category_id = c.id) AS items \
             FROM memory_categories c WHERE c.tenant_id = ? AND c.user_id = ? \
             ORDER BY c.agent_id, c.created_at, c.name",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok((category_from_row(row)?, row.try_get::<i64, _>("items")? as u64)))
        .collect()
    }

    async fn file_item(
        &self,
        user: UserRef<'_>,
        item_id: Uuid,
        links: &[CategoryLink],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM category_items WHERE tenant_id = ? AND user_id = ? AND memory_item_id = ?",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(item_id.to_string())
        .execute(&mut *tx)
        .await?;
        Self::insert_links_tx(&mut tx, user, links).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn item_categories(
        &self,
        user: UserRef<'_>,
        item_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, Uuid)>, StoreError> {
        if item_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT memory_item_id, category_id FROM category_items WHERE tenant_id = ",
        );
        qb.push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string())
            .push(" AND memory_item_id IN (");
        let mut sep = qb.separated(", ");
        for id in item_ids {
            sep.push_bind(id.to_string());
        }
        qb.push(") ORDER BY confidence DESC");
        qb.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    uuid_col(row, "memory_item_id")?,
                    uuid_col(row, "category_id")?,
                ))
            })
            .collect()
    }

    async fn category_items(
        &self,
        user: UserRef<'_>,
        category_id: Uuid,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        sqlx::query(
            "SELECT m.* FROM memory_items m JOIN category_items c \
               ON c.tenant_id = m.tenant_id AND c.user_id = m.user_id AND c.memory_item_id = m.id \
             WHERE m.tenant_id = ? AND m.user_id = ? AND c.category_id = ? \
             ORDER BY COALESCE(m.happened_at, m.created_at) DESC, m.id DESC LIMIT ?",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(category_id.to_string())
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(item_from_row)
        .collect()
    }

    async fn search_items(
        &self,
        user: UserRef<'_>,
        query: &[f32],
        filter: &ItemFilter,
        k: usize,
    ) -> Result<Vec<ScoredItem>, StoreError> {
        if query.len() != self.space.dimension {
            return Err(StoreError::Invalid(format!(
                "query vector has {} dimensions, expected {}",
                query.len(),
                self.space.dimension
            )));
        }
        let entry = self.user_index(user).await?;
        let (hits, approximate) = {
            let index = entry.read().await;
            // Approximate scores pick candidates; the exact vectors decide among them.
            let candidates = if index.is_approximate() {
                k * RESCORED_CANDIDATES_PER_RESULT
            } else {
                k
            };
            (
                index.search(query, filter, candidates),
                index.is_approximate(),
            )
        };
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let columns = if approximate {
            format!("{ITEM_COLUMNS}, embedding")
        } else {
            ITEM_COLUMNS.to_string()
        };
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {columns} FROM memory_items WHERE tenant_id = "
        ));
        qb.push_bind(user.tenant_id)
            .push(" AND user_id = ")
            .push_bind(user.user_id)
            .push(" AND id IN (");
        let mut sep = qb.separated(", ");
        for (id, _) in &hits {
            sep.push_bind(id.to_string());
        }
        qb.push(")");
        let rows = qb.build().fetch_all(&self.pool).await?;
        let mut items: std::collections::HashMap<Uuid, (MemoryItem, Option<f32>)> = rows
            .iter()
            .map(|r| {
                let item = item_from_row(r)?;
                let exact = if approximate {
                    let embedding: Vec<u8> = r.try_get("embedding")?;
                    Some(dot_unrolled(&decode_vector(&embedding), query))
                } else {
                    None
                };
                Ok((item.id, (item, exact)))
            })
            .collect::<Result<_, StoreError>>()?;
        let mut scored: Vec<ScoredItem> = hits
            .into_iter()
            .filter_map(|(id, score)| {
                items.remove(&id).map(|(item, exact)| ScoredItem {
                    item,
                    score: exact.unwrap_or(score),
                })
            })
            .collect();
        if approximate {
            scored.sort_by(|a, b| b.score.total_cmp(&a.score));
            scored.truncate(k);
        }
        Ok(scored)
    }

    async fn search_text(
        &self,
        user: UserRef<'_>,
        query: &str,
        filter: &ItemFilter,
        k: usize,
    ) -> Result<Vec<ScoredItem>, StoreError> {
        let terms = text_query_terms(query);
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        // Each word quoted (no FTS syntax gets through), any of them may match.
        let expression = terms
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(" OR ");
        let columns: String = ITEM_COLUMNS
            .split(',')
            .map(|c| format!("m.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        // The filter is applied to the rows read; read enough that it rarely starves the answer.
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {columns}, bm25(memory_fts) AS rank FROM memory_fts \
             JOIN memory_items m ON m.rowid = memory_fts.rowid \
             WHERE memory_fts MATCH ? AND memory_fts.user_id = ? AND m.tenant_id = ? AND m.user_id = ? \
             ORDER BY rank LIMIT ?"
        )))
        .bind(expression)
        .bind(user.user_id)
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind((k * 4 + 32) as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in &rows {
            let item = item_from_row(row)?;
            if !filter.matches(&item) {
                continue;
            }
            // bm25() is lower-is-better and negative: flip it so higher is better.
            let rank: f64 = row.try_get("rank")?;
            out.push(ScoredItem {
                item,
                score: -rank as f32,
            });
            if out.len() == k {
                break;
            }
        }
        Ok(out)
    }

    async fn list_items(
        &self,
        user: UserRef<'_>,
        filter: &ItemFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<MemoryItem>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {ITEM_COLUMNS} FROM memory_items WHERE tenant_id = "
        ));
        qb.push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string());
        Self::push_filter(&mut qb, filter);
        if let Some(cursor) = cursor {
            let (at, id) = decode_cursor(cursor)?;
            qb.push(" AND (created_at < ")
                .push_bind(micros(at))
                .push(" OR (created_at = ")
                .push_bind(micros(at))
                .push(" AND id < ")
                .push_bind(id.to_string())
                .push("))");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(limit as i64 + 1);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let mut items: Vec<MemoryItem> =
            rows.iter().map(item_from_row).collect::<Result<_, _>>()?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|i| encode_cursor(i.created_at, i.id))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn get_item(
        &self,
        user: UserRef<'_>,
        id: Uuid,
    ) -> Result<Option<MemoryItem>, StoreError> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {ITEM_COLUMNS} FROM memory_items WHERE tenant_id = ? AND user_id = ? AND id = ?"
        )))
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .map(|r| item_from_row(&r))
        .transpose()
    }

    async fn insert_item(&self, item: &NewItem) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::upsert_user(&mut tx, item.item.user(), None).await?;
        Self::insert_items_tx(&mut tx, std::slice::from_ref(item)).await?;
        tx.commit().await?;
        self.index_upsert(std::slice::from_ref(item)).await;
        Ok(())
    }

    async fn update_item(
        &self,
        user: UserRef<'_>,
        id: Uuid,
        patch: &ItemPatch,
    ) -> Result<Option<MemoryItem>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new("UPDATE memory_items SET updated_at = ");
        qb.push_bind(micros(Utc::now()));
        if let Some(summary) = &patch.summary {
            qb.push(", summary = ").push_bind(summary.clone());
        }
        if let Some(embedding) = &patch.embedding {
            qb.push(", embedding = ")
                .push_bind(encode_vector(embedding));
        }
        if let Some(t) = patch.memory_type {
            qb.push(", memory_type = ").push_bind(t.as_str());
        }
        if let Some(at) = patch.happened_at {
            qb.push(", happened_at = ").push_bind(at.map(micros));
        }
        if let Some(extra) = &patch.extra {
            qb.push(", extra = ").push_bind(extra.to_string());
        }
        qb.push(" WHERE tenant_id = ")
            .push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string())
            .push(" AND id = ")
            .push_bind(id.to_string())
            .push(format!(" RETURNING {ITEM_COLUMNS}"));
        let Some(row) = qb.build().fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let item = item_from_row(&row)?;
        if let Some(entry) = self.index.cached(&index_key(user)) {
            let mut vectors = entry.write().await;
            match &patch.embedding {
                Some(embedding) => vectors.upsert(id, row_meta(&item), embedding),
                None => vectors.update_meta(id, row_meta(&item)),
            }
        }
        Ok(Some(item))
    }

    async fn delete_item(&self, user: UserRef<'_>, id: Uuid) -> Result<bool, StoreError> {
        let done =
            sqlx::query("DELETE FROM memory_items WHERE tenant_id = ? AND user_id = ? AND id = ?")
                .bind(user.tenant_id)
                .bind(user.user_id)
                .bind(id.to_string())
                .execute(&self.pool)
                .await?;
        if let Some(entry) = self.index.cached(&index_key(user)) {
            entry.write().await.remove(id);
        }
        Ok(done.rows_affected() == 1)
    }

    async fn find_identical_item(
        &self,
        scope: &Scope,
        memory_type: MemoryType,
        summary: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT id FROM memory_items WHERE tenant_id = ? AND user_id = ? AND agent_id = ? \
             AND memory_type = ? AND summary = ? LIMIT 1",
        )
        .bind(&scope.tenant_id)
        .bind(&scope.user_id)
        .bind(&scope.agent_id)
        .bind(memory_type.as_str())
        .bind(summary)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.and_then(|(id,)| Uuid::parse_str(&id).ok()))
    }

    async fn get_resources(
        &self,
        user: UserRef<'_>,
        ids: &[Uuid],
    ) -> Result<Vec<Resource>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT * FROM resources WHERE tenant_id = ");
        qb.push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string())
            .push(" AND id IN (");
        let mut sep = qb.separated(", ");
        for id in ids {
            sep.push_bind(id.to_string());
        }
        qb.push(") ORDER BY created_at");
        qb.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(resource_from_row)
            .collect()
    }

    async fn delete_user(
        &self,
        user: UserRef<'_>,
        agent_id: Option<&str>,
    ) -> Result<DeletedCounts, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut counts = DeletedCounts::default();
        for (sql, slot) in erase_statements(agent_id.is_some()) {
            let mut query = sqlx::query(AssertSqlSafe(sql))
                .bind(user.tenant_id)
                .bind(user.user_id);
            if let Some(agent) = agent_id {
                query = query.bind(agent);
            }
            let done = query.execute(&mut *tx).await?;
            if let Some(slot) = slot {
                *slot(&mut counts) = done.rows_affected();
            }
        }
        tx.commit().await?;
        self.index.forget(&index_key(user));
        Ok(counts)
    }

    async fn export_user(&self, user: UserRef<'_>) -> Result<UserExport, StoreError> {
        let ts =
            |col: &str| format!("strftime('%Y-%m-%dT%H:%M:%fZ', {col} / 1000000.0, 'unixepoch')");
        Ok(UserExport {
            tenant_id: user.tenant_id.to_string(),
            user_id: user.user_id.to_string(),
            exported_at: Utc::now(),
            resources: self.rows_as_json(&format!(
                "SELECT json_object('id', id, 'agent_id', agent_id, 'modality', modality, 'content_hash', content_hash, \
                 'content', json(content), 'caption', caption, 'created_at', {}) FROM resources WHERE tenant_id = ? AND user_id = ? ORDER BY created_at",
                ts("created_at")), user).await?,
            memory_items: self.rows_as_json(&format!(
                "SELECT json_object('id', id, 'agent_id', agent_id, 'resource_id', resource_id, 'memory_type', memory_type, \
                 'summary', summary, 'happened_at', CASE WHEN happened_at IS NULL THEN NULL ELSE {} END, 'created_at', {}, \
                 'updated_at', {}, 'extra', json(extra)) FROM memory_items WHERE tenant_id = ? AND user_id = ? ORDER BY created_at",
                ts("happened_at"), ts("created_at"), ts("updated_at")), user).await?,
            categories: self.rows_as_json(&format!(
                "SELECT json_object('id', id, 'agent_id', agent_id, 'name', name, 'description', description, \
                 'summary', summary, 'updated_at', {}) FROM memory_categories WHERE tenant_id = ? AND user_id = ? ORDER BY created_at",
                ts("updated_at")), user).await?,
            category_items: self.rows_as_json(
                "SELECT json_object('memory_item_id', memory_item_id, 'category_id', category_id, 'confidence', confidence) \
                 FROM category_items WHERE tenant_id = ? AND user_id = ?", user).await?,
            tasks: self.rows_as_json(&format!(
                "SELECT json_object('task_id', id, 'agent_id', agent_id, 'resource_id', resource_id, 'status', status, \
                 'attempts', attempts, 'error', error, 'created_at', {}) FROM memorize_tasks WHERE tenant_id = ? AND user_id = ? ORDER BY created_at",
                ts("created_at")), user).await?,
            audit: Vec::new(),
        })
    }

    async fn record_llm_usage(&self, calls: &[LlmUsage]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for c in calls {
            sqlx::query(
                "INSERT INTO llm_usage (tenant_id, user_id, id, task_id, operation, prompt, provider, \
                 model, prompt_tokens, completion_tokens, latency_ms, cost_usd, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&c.tenant_id)
            .bind(&c.user_id)
            .bind(c.id.to_string())
            .bind(c.task_id.map(|t| t.to_string()))
            .bind(&c.operation)
            .bind(&c.prompt)
            .bind(&c.provider)
            .bind(&c.model)
            .bind(c.prompt_tokens as i64)
            .bind(c.completion_tokens as i64)
            .bind(c.latency_ms as i64)
            .bind(c.cost_usd)
            .bind(micros(c.created_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn llm_usage_totals(&self, user: UserRef<'_>) -> Result<Vec<UsageTotals>, StoreError> {
        let rows = sqlx::query(
            "SELECT operation, provider, model, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens, \
             sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd \
             FROM llm_usage WHERE tenant_id = ? AND user_id = ? GROUP BY operation, provider, model \
             ORDER BY operation, provider, model",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_totals_from).collect()
    }
}

fn opt_micros(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(from_micros))
}

fn tenant_from_row(row: &SqliteRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        created_at: from_micros(row.try_get("created_at")?),
        limits: TenantLimits {
            rate_limit_rps: row.try_get("rate_limit_rps")?,
            memorize_per_day: row
                .try_get::<Option<i64>, _>("memorize_per_day")?
                .map(|v| v.max(0) as u64),
            tokens_per_day: row
                .try_get::<Option<i64>, _>("tokens_per_day")?
                .map(|v| v.max(0) as u64),
        },
    })
}

fn key_from_row(row: &SqliteRow) -> Result<ApiKeyRecord, StoreError> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKeyRecord {
        key_id: row.try_get("key_id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        scopes: parse_scopes(&scopes).map_err(StoreError::Invalid)?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: from_micros(row.try_get("created_at")?),
        expires_at: opt_micros(row, "expires_at")?,
        revoked_at: opt_micros(row, "revoked_at")?,
        last_used_at: opt_micros(row, "last_used_at")?,
    })
}

fn audit_from_row(row: &SqliteRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id: uuid_col(row, "id")?,
        tenant_id: row.try_get("tenant_id")?,
        at: from_micros(row.try_get("at")?),
        key_id: row.try_get("key_id")?,
        method: row.try_get("method")?,
        route: row.try_get("route")?,
        target_user: row.try_get("target_user")?,
        status: row.try_get::<i64, _>("status")? as u16,
    })
}

#[async_trait]
impl AccessStore for SqliteStore {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenants (tenant_id, name, created_at, rate_limit_rps, memorize_per_day, tokens_per_day) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&tenant.tenant_id)
        .bind(&tenant.name)
        .bind(micros(tenant.created_at))
        .bind(tenant.limits.rate_limit_rps)
        .bind(tenant.limits.memorize_per_day.map(|v| v as i64))
        .bind(tenant.limits.tokens_per_day.map(|v| v as i64))
        .execute(&self.pool)
        .await
        .map_err(|e| duplicate_or(e, "tenant"))?;
        Ok(())
    }

    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, StoreError> {
        sqlx::query("SELECT * FROM tenants WHERE tenant_id = ?")
            .bind(tenant_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| tenant_from_row(&r))
            .transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        sqlx::query("SELECT * FROM tenants ORDER BY tenant_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(tenant_from_row)
            .collect()
    }

    async fn set_tenant_limits(
        &self,
        tenant_id: &str,
        limits: &TenantLimits,
    ) -> Result<Option<Tenant>, StoreError> {
        sqlx::query(
            "UPDATE tenants SET rate_limit_rps = ?, memorize_per_day = ?, tokens_per_day = ? \
             WHERE tenant_id = ? RETURNING *",
        )
        .bind(limits.rate_limit_rps)
        .bind(limits.memorize_per_day.map(|v| v as i64))
        .bind(limits.tokens_per_day.map(|v| v as i64))
        .bind(tenant_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| tenant_from_row(&r))
        .transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord, replace: bool) -> Result<(), StoreError> {
        let conflict = match replace {
            true => {
                " ON CONFLICT (key_id) DO UPDATE SET tenant_id = excluded.tenant_id, \
                 name = excluded.name, scopes = excluded.scopes, secret_hash = excluded.secret_hash, \
                 expires_at = excluded.expires_at, revoked_at = NULL"
            }
            false => "",
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO api_keys (key_id, tenant_id, name, scopes, secret_hash, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?){conflict}"
        )))
        .bind(&key.key_id)
        .bind(&key.tenant_id)
        .bind(&key.name)
        .bind(scopes_to_text(&key.scopes))
        .bind(&key.secret_hash)
        .bind(micros(key.created_at))
        .bind(key.expires_at.map(micros))
        .execute(&self.pool)
        .await
        .map_err(|e| duplicate_or(e, "api key"))?;
        Ok(())
    }

    async fn find_api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE key_id = ?")
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| key_from_row(&r))
            .transpose()
    }

    async fn list_api_keys(&self, tenant_id: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE tenant_id = ? ORDER BY created_at, key_id")
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_api_key(&self, tenant_id: &str, key_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE tenant_id = ? AND key_id = ?",
        )
        .bind(micros(Utc::now()))
        .bind(tenant_id)
        .bind(key_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn touch_api_key(&self, key_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?")
            .bind(micros(at))
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO audit_log (tenant_id, id, at, key_id, method, route, target_user, status) ",
        );
        qb.push_values(entries, |mut row, e| {
            row.push_bind(&e.tenant_id)
                .push_bind(e.id.to_string())
                .push_bind(micros(e.at))
                .push_bind(&e.key_id)
                .push_bind(&e.method)
                .push_bind(&e.route)
                .push_bind(&e.target_user)
                .push_bind(e.status as i64);
        });
        qb.build().execute(&self.pool).await?;
        Ok(())
    }

    async fn list_audit(
        &self,
        tenant_id: &str,
        target_user: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        sqlx::query(
            "SELECT * FROM audit_log WHERE tenant_id = ?1 AND (?2 IS NULL OR target_user = ?2) \
             ORDER BY at DESC, id DESC LIMIT ?3",
        )
        .bind(tenant_id)
        .bind(target_user)
        .bind(limit.map_or(-1, |l| l as i64))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_from_row)
        .collect()
    }

    async fn pseudonymise_audit(
        &self,
        user: UserRef<'_>,
        pseudonym: &str,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE audit_log SET target_user = ? WHERE tenant_id = ? AND target_user = ?",
        )
        .bind(pseudonym)
        .bind(user.tenant_id)
        .bind(user.user_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn tenant_usage_since(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
    ) -> Result<DailyUsage, StoreError> {
        let (jobs, tokens): (i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM memorize_tasks WHERE tenant_id = ?1 AND created_at >= ?2), \
                    (SELECT sum(prompt_tokens + completion_tokens) FROM llm_usage \
                     WHERE tenant_id = ?1 AND created_at >= ?2)",
        )
        .bind(tenant_id)
        .bind(micros(since))
        .fetch_one(&self.pool)
        .await?;
        Ok(DailyUsage {
            memorize_jobs: jobs.max(0) as u64,
            tokens: tokens.unwrap_or(0).max(0) as u64,
        })
    }

    async fn cost_report(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<CostRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT strftime('%Y-%m-%d', created_at / 1000000, 'unixepoch') AS day, user_id, provider, \
             model, count(*) AS calls, sum(prompt_tokens) AS prompt_tokens, \
             sum(completion_tokens) AS completion_tokens, sum(cost_usd) AS cost_usd \
             FROM llm_usage WHERE tenant_id = ? AND created_at >= ? AND created_at < ? \
             GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        )
        .bind(tenant_id)
        .bind(micros(since))
        .bind(micros(until))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| cost_row_from(tenant_id, r)).collect()
    }
}
