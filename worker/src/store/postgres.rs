//! PostgreSQL + pgvector store: HNSW (cosine) index with iterative scans so that per-user
//! filtering keeps recall, an optional read replica for searches and listings, and a job queue
//! claimed with `FOR UPDATE SKIP LOCKED`.

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use pgvector::Vector;

/// The HNSW index over exact vectors, and the one over their `halfvec` (quantization int8).
const INDEX_F32: &str = "idx_memory_embedding";
const INDEX_HALFVEC: &str = "idx_memory_embedding_halfvec";
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use memu_crds::worker::{CategorySpec, Quantization, VectorConfig, WorkerConfig};

use super::{
    AccessStore, EmbeddingSpace, MemoryStore, PoolStats, QueueStats, StoreError, UserExport,
    check_space, cost_row_from, decode_cursor, duplicate_or, encode_cursor, erase_statements,
    group_by_tenant, text_query_terms, usage_totals_from,
};
use crate::config::read_secret;
use crate::model::{
    Category, CategoryLink, DeletedCounts, ItemFilter, ItemPatch, LlmUsage, MemorizeOutcome,
    MemoryItem, MemoryType, Modality, NewItem, Page, Resource, Scope, ScoredItem, Task, TaskStatus,
    UsageTotals, UserRef,
};
use crate::tenancy::{
    ApiKeyRecord, AuditEntry, CostRow, DailyUsage, Tenant, TenantLimits, parse_scopes,
    scopes_to_text,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Serialises schema changes of concurrent workers (an arbitrary, fixed key).
const SCHEMA_LOCK_KEY: i64 = 0x6d656d75_5f736368;

pub struct PgStore {
    primary: PgPool,
    /// DSN of the schema owner for migrations, when it differs from the primary's role.
    owner_dsn: Option<String>,
    app_role: Option<String>,
    database: memu_crds::worker::DatabaseConfig,
    replica: Option<PgPool>,
    space: EmbeddingSpace,
    vector: VectorConfig,
    max_connections: u32,
    retry_backoff: Duration,
}

fn item_from_row(row: &PgRow) -> Result<MemoryItem, StoreError> {
    let memory_type: String = row.try_get("memory_type")?;
    Ok(MemoryItem {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        resource_id: row.try_get("resource_id")?,
        memory_type: MemoryType::parse(&memory_type)
            .ok_or_else(|| StoreError::Invalid(format!("unknown memory_type {memory_type}")))?,
        summary: row.try_get("summary")?,
        happened_at: row.try_get("happened_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        extra: row.try_get("extra")?,
    })
}

fn category_from_row(row: &PgRow) -> Result<Category, StoreError> {
    let embedding: Option<Vector> = row.try_get("embedding")?;
    Ok(Category {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        summary: row.try_get("summary")?,
        embedding: embedding.map(|v| v.to_vec()).unwrap_or_default(),
        updated_at: row.try_get("updated_at")?,
    })
}

fn task_from_row(row: &PgRow) -> Result<Task, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Task {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        resource_id: row.try_get("resource_id")?,
        status: TaskStatus::parse(&status)
            .ok_or_else(|| StoreError::Invalid(format!("unknown task status {status}")))?,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
        error: row.try_get("error")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        completed_at: row.try_get("completed_at")?,
        trace_parent: row.try_get("trace_parent")?,
    })
}

fn resource_from_row(row: &PgRow) -> Result<Resource, StoreError> {
    let modality: String = row.try_get("modality")?;
    Ok(Resource {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        agent_id: row.try_get("agent_id")?,
        modality: Modality::parse(&modality)
            .ok_or_else(|| StoreError::Invalid(format!("unknown modality {modality}")))?,
        content_hash: row.try_get("content_hash")?,
        content: row.try_get("content")?,
        caption: row.try_get("caption")?,
        created_at: row.try_get("created_at")?,
    })
}

const ITEM_COLUMNS: &str = "tenant_id, user_id, id, agent_id, resource_id, memory_type, summary, happened_at, \
                            created_at, updated_at, extra";

async fn connect(dsn: &str, config: &WorkerConfig, what: &str) -> anyhow::Result<PgPool> {
    connect_pool(dsn, &config.database, what).await
}

async fn connect_pool(
    dsn: &str,
    database: &memu_crds::worker::DatabaseConfig,
    what: &str,
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = dsn
        .parse()
        .map_err(|e| anyhow::anyhow!("the {what} DSN is not a valid postgres:// URL: {e}"))?;
    PgPoolOptions::new()
        .max_connections(database.max_connections)
        .min_connections(database.min_connections)
        .acquire_timeout(Duration::from_secs(database.acquire_timeout_secs))
        .connect_with(options.application_name("memu-worker"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the {what} database: {e}"))
}

/// Tables the worker's role reads and writes, and what it may do with them.
const APP_GRANTS: [(&str, &str); 6] = [
    (
        "SELECT, INSERT, UPDATE, DELETE",
        "users, resources, memory_items, memory_categories, category_items, memorize_tasks, llm_usage",
    ),
    ("SELECT, INSERT, UPDATE, DELETE", "tenants, api_keys"),
    // Append-only: no DELETE, and UPDATE only of the column erase pseudonymises.
    ("SELECT, INSERT", "audit_log"),
    ("UPDATE (target_user)", "audit_log"),
    ("SELECT", "memu_meta, _sqlx_migrations"),
    (
        "EXECUTE",
        "FUNCTION memu_claim_task(text, double precision), memu_queue_stats()",
    ),
];

/// Grants the worker's serving role what it needs and nothing more (no DDL, no BYPASSRLS).
async fn grant_app_role(pool: &PgPool, role: &str) -> Result<(), StoreError> {
    let valid = !role.is_empty()
        && role.len() <= 63
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !role.as_bytes()[0].is_ascii_digit();
    if !valid {
        return Err(StoreError::Invalid(format!(
            "database.app_role `{role}` must be a lower-case SQL identifier"
        )));
    }
    let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(role)
        .fetch_optional(pool)
        .await?;
    if exists.is_none() {
        return Err(StoreError::Incompatible(format!(
            "database.app_role `{role}` does not exist: create it (CREATE ROLE {role} LOGIN PASSWORD …)              or unset database.app_role"
        )));
    }
    let mut tx = pool.begin().await?;
    let (schema,): (String,) = sqlx::query_as("SELECT current_schema()")
        .fetch_one(&mut *tx)
        .await?;
    // Identifiers cannot be bound; `role` is validated above and `schema` quoted.
    let schema = format!("\"{}\"", schema.replace('"', "\"\""));
    sqlx::query(AssertSqlSafe(format!(
        "GRANT USAGE ON SCHEMA {schema} TO {role}"
    )))
    .execute(&mut *tx)
    .await?;
    for (privileges, objects) in APP_GRANTS {
        let on = match objects.starts_with("FUNCTION") {
            true => objects.to_string(),
            false => format!("TABLE {objects}"),
        };
        sqlx::query(AssertSqlSafe(format!(
            "GRANT {privileges} ON {on} TO {role}"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Row-level security binds neither superusers, BYPASSRLS roles nor the tables' owner: say so,
/// since then tenant isolation rests on the application's filters alone.
async fn warn_if_rls_bypassed(pool: &PgPool) {
    let bypass: Result<Option<(String, bool)>, _> = sqlx::query_as(
        "SELECT current_user::text, r.rolsuper OR r.rolbypassrls            OR EXISTS (SELECT 1 FROM pg_tables WHERE tablename = 'memory_items'                       AND schemaname = current_schema() AND tableowner = current_user)          FROM pg_roles r WHERE r.rolname = current_user",
    )
    .fetch_optional(pool)
    .await;
    if let Ok(Some((role, true))) = bypass {
        tracing::warn!(
            %role,
            "this database role bypasses row-level security (superuser, BYPASSRLS or table owner):              serve as database.app_role so the database enforces tenant isolation too"
        );
    }
}

/// Per-user tables in the order Citus must distribute them: `users` first, the rest co-located
/// with it so a user's rows (and the joins between them) live on one worker.
const DISTRIBUTED_TABLES: [&str; 7] = [
    "users",
    "resources",
    "memory_items",
    "memory_categories",
    "category_items",
    "memorize_tasks",
    "llm_usage",
];

/// Small tables every node reads: replicated to all Citus workers.
const REFERENCE_TABLES: [&str; 3] = ["memu_meta", "tenants", "api_keys"];

/// Citus: distributes every per-user table by `user_id`, the audit log by tenant, and makes the
/// control tables reference tables.
/// Idempotent (tables already in `pg_dist_partition` are skipped), so the migrations Job can run
/// it after every migration. Returns the tables it distributed now.
pub async fn distribute_by_user(config: &WorkerConfig) -> anyhow::Result<Vec<String>> {
    let db = &config.database;
    let dsn = read_secret(&db.url_env, db.url_file.as_deref())?
        .ok_or_else(|| anyhow::anyhow!("--distribute needs a Postgres DSN in {}", db.url_env))?;
    let pool = connect(&dsn, config, "primary").await?;
    let citus: Option<(String,)> =
        sqlx::query_as("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
            .fetch_optional(&pool)
            .await?;
    if citus.is_none() {
        anyhow::bail!(
            "--distribute: the citus extension is not installed in this database \
             (topology citus needs a Citus coordinator)"
        );
    }
    let mut done = Vec::new();
    for table in REFERENCE_TABLES
        .into_iter()
        .chain(DISTRIBUTED_TABLES)
        .chain(["audit_log"])
    {
        let distributed: Option<(i32,)> =
            sqlx::query_as("SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass($1)")
                .bind(table)
                .fetch_optional(&pool)
                .await?;
        if distributed.is_some() {
            continue;
        }
        if REFERENCE_TABLES.contains(&table) {
            sqlx::query("SELECT create_reference_table($1)")
                .bind(table)
                .execute(&pool)
                .await?;
        } else if table == "audit_log" {
            // Read per tenant, never joined with a user's rows.
            sqlx::query("SELECT create_distributed_table('audit_log', 'tenant_id', colocate_with => 'none')")
                .execute(&pool)
                .await?;
        } else {
            let colocate = if table == "users" { "default" } else { "users" };
            sqlx::query("SELECT create_distributed_table($1, 'user_id', colocate_with => $2)")
                .bind(table)
                .bind(colocate)
                .execute(&pool)
                .await
                .with_context(|| format!("cannot distribute {table} by user_id"))?;
        }
        done.push(table.to_string());
    }
    Ok(done)
}

impl PgStore {
    pub async fn open(config: &WorkerConfig, space: EmbeddingSpace) -> anyhow::Result<Self> {
        let db = &config.database;
        let dsn = read_secret(&db.url_env, db.url_file.as_deref())?.ok_or_else(|| {
            anyhow::anyhow!(
                "database.backend is postgres but no DSN is set: export {} or set database.url_file",
                db.url_env
            )
        })?;
        let primary = connect(&dsn, config, "primary").await?;
        let replica = match read_secret(&db.read_url_env, db.read_url_file.as_deref())? {
            Some(dsn) => Some(connect(&dsn, config, "read replica").await?),
            None => None,
        };
        let owner_dsn = read_secret(&db.migrate_url_env, db.migrate_url_file.as_deref())?;
        warn_if_rls_bypassed(&primary).await;
        Ok(Self {
            primary,
            owner_dsn,
            app_role: db.app_role.clone(),
            database: db.clone(),
            replica,
            space,
            vector: config.vector.clone(),
            max_connections: db.max_connections,
            retry_backoff: Duration::from_millis(config.pipeline.retry_backoff_ms),
        })
    }

    /// Pool for reads that may lag slightly (search, list).
    fn reader(&self) -> &PgPool {
        self.replica.as_ref().unwrap_or(&self.primary)
    }

    /// The dimension of `memory_items.embedding`, if the column exists.
    async fn column_dimension(
        conn: &mut sqlx::PgConnection,
        table: &str,
    ) -> Result<Option<usize>, StoreError> {
        let typmod: Option<(i32,)> = sqlx::query_as(
            "SELECT atttypmod FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname = 'embedding' AND NOT attisdropped",
        )
        .bind(table)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(typmod.map(|(t,)| t.max(0) as usize))
    }

    async fn stored_space(&self) -> Result<Option<EmbeddingSpace>, StoreError> {
        let mut conn = self.primary.acquire().await?;
        let Some(dimension) = Self::column_dimension(&mut conn, "memory_items").await? else {
            return Ok(None);
        };
        let model: Option<(String,)> =
            sqlx::query_as("SELECT value FROM memu_meta WHERE key = 'embedding_model'")
                .fetch_optional(&mut *conn)
                .await?;
        Ok(model.map(|(model,)| EmbeddingSpace { dimension, model }))
    }

    /// Creates the embedding columns for the configured dimension and the HNSW index.
    async fn ensure_vector_schema(&self, pool: &PgPool) -> Result<(), StoreError> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let dim = self.space.dimension;
        match Self::column_dimension(&mut tx, "memory_items").await? {
            Some(_) => {}
            None => {
                // DDL cannot take bind parameters; `dim` is a validated integer.
                sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE memory_items ADD COLUMN embedding vector({dim})"
                )))
                .execute(&mut *tx)
                .await?;
                sqlx::query(AssertSqlSafe(format!(
                    "ALTER TABLE memory_categories ADD COLUMN embedding vector({dim})"
                )))
                .execute(&mut *tx)
                .await?;
                sqlx::query("INSERT INTO memu_meta (key, value) VALUES ('embedding_model', $1) ON CONFLICT (key) DO NOTHING")
                    .bind(&self.space.model)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // One HNSW index, of the configured precision; the other is dropped once this exists.
        let (index, other, operand, max_dimension) = match self.vector.quantization {
            // HNSW indexes up to 2,000 dimensions of `vector`.
            Quantization::None => (
                INDEX_F32,
                INDEX_HALFVEC,
                "embedding vector_cosine_ops".to_string(),
                2000,
            ),
            // ... and up to 4,000 of `halfvec`, at half the size.
            Quantization::Int8 => (
                INDEX_HALFVEC,
                INDEX_F32,
                format!("(embedding::halfvec({dim})) halfvec_cosine_ops"),
                4000,
            ),
        };
        if dim <= max_dimension {
            sqlx::query(AssertSqlSafe(format!(
                "CREATE INDEX IF NOT EXISTS {index} ON memory_items \
                 USING hnsw ({operand}) WITH (m = {}, ef_construction = {})",
                self.vector.hnsw_m, self.vector.hnsw_ef_construction
            )))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(AssertSqlSafe(format!("DROP INDEX IF EXISTS {other}")))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_links_tx(
        tx: &mut sqlx::PgConnection,
        user: UserRef<'_>,
        links: &[CategoryLink],
    ) -> Result<(), StoreError> {
        for link in links {
            sqlx::query(
                "INSERT INTO category_items (tenant_id, user_id, memory_item_id, category_id, confidence) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (tenant_id, user_id, memory_item_id, category_id) \
                 DO UPDATE SET confidence = EXCLUDED.confidence",
            )
            .bind(user.tenant_id)
            .bind(user.user_id)
            .bind(link.item_id)
            .bind(link.category_id)
            .bind(link.confidence)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn insert_items_tx(
        tx: &mut sqlx::PgConnection,
        items: &[NewItem],
    ) -> Result<(), StoreError> {
        for new in items {
            let item = &new.item;
            sqlx::query(
                "INSERT INTO memory_items (tenant_id, user_id, id, agent_id, resource_id, memory_type, \
                 summary, happened_at, created_at, updated_at, extra, embedding) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(&item.tenant_id)
            .bind(&item.user_id)
            .bind(item.id)
            .bind(&item.agent_id)
            .bind(item.resource_id)
            .bind(item.memory_type.as_str())
            .bind(&item.summary)
            .bind(item.happened_at)
            .bind(item.created_at)
            .bind(item.updated_at)
            .bind(&item.extra)
            .bind(Vector::from(new.embedding.clone()))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn upsert_user(
        tx: &mut sqlx::PgConnection,
        user: UserRef<'_>,
        user_name: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (tenant_id, user_id, user_name) VALUES ($1, $2, $3) \
             ON CONFLICT (tenant_id, user_id) DO UPDATE SET user_name = COALESCE(EXCLUDED.user_name, users.user_name)",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(user_name)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    fn push_filter(qb: &mut QueryBuilder<Postgres>, filter: &ItemFilter) {
        if let Some(agent) = &filter.agent_id {
            qb.push(" AND agent_id = ").push_bind(agent.clone());
        }
        if !filter.memory_types.is_empty() {
            let types: Vec<String> = filter
                .memory_types
                .iter()
                .map(|t| t.as_str().to_string())
                .collect();
            qb.push(" AND memory_type = ANY(")
                .push_bind(types)
                .push(")");
        }
        if let Some(since) = filter.since {
            qb.push(" AND COALESCE(happened_at, created_at) >= ")
                .push_bind(since);
        }
        if let Some(until) = filter.until {
            qb.push(" AND COALESCE(happened_at, created_at) < ")
                .push_bind(until);
        }
    }

    /// Rows of one user as JSON objects; `sql` reads `$1` as the tenant and `$2` as the user.
    async fn rows_as_json(
        tx: &mut sqlx::PgConnection,
        sql: &str,
        user: UserRef<'_>,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let rows: Vec<(serde_json::Value,)> = sqlx::query_as(AssertSqlSafe(sql.to_string()))
            .bind(user.tenant_id)
            .bind(user.user_id)
            .fetch_all(&mut *tx)
            .await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }

    /// A transaction whose row-level-security policies see `tenant_id`: every statement on a
    /// tenant table runs in one, so a query that forgot its tenant filter still finds nothing of
    /// another tenant.
    async fn tenant_tx(
        pool: &PgPool,
        tenant_id: &str,
    ) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT set_config('memu.tenant_id', $1, true)")
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// The query plan of a search, for tests that check the HNSW index is used.
    pub async fn explain_search(
        &self,
        user: UserRef<'_>,
        query: &[f32],
        k: usize,
    ) -> Result<String, StoreError> {
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        self.set_search_params(&mut tx).await?;
        let mut qb =
            QueryBuilder::<Postgres>::new("EXPLAIN SELECT id FROM memory_items WHERE tenant_id = ");
        qb.push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string())
            .push(" ORDER BY ");
        self.push_index_distance(&mut qb, query);
        qb.push(" LIMIT ").push_bind(k as i64);
        let rows: Vec<(String,)> = qb.build_query_as().fetch_all(&mut *tx).await?;
        Ok(rows
            .into_iter()
            .map(|(l,)| l)
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// The distance the HNSW index orders by: exact `vector`, or `halfvec` when quantized (the
    /// expression must match the index's for the planner to use it).
    fn push_index_distance(&self, qb: &mut QueryBuilder<Postgres>, query: &[f32]) {
        match self.vector.quantization {
            Quantization::None => {
                qb.push("embedding <=> ")
                    .push_bind(Vector::from(query.to_vec()));
            }
            Quantization::Int8 => {
                let dim = self.space.dimension;
                qb.push(format!("embedding::halfvec({dim}) <=> "))
                    .push_bind(Vector::from(query.to_vec()))
                    .push(format!("::halfvec({dim})"));
            }
        }
    }

    async fn set_search_params(&self, tx: &mut sqlx::PgConnection) -> Result<(), StoreError> {
        sqlx::query(
            "SELECT set_config('hnsw.ef_search', $1, true), set_config('hnsw.iterative_scan', $2, true), \
             set_config('hnsw.max_scan_tuples', $3, true)",
        )
        .bind(self.vector.hnsw_ef_search.to_string())
        .bind(self.vector.iterative_scan.as_pg_setting())
        .bind(self.vector.max_scan_tuples.to_string())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

#[async_trait]
impl MemoryStore for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let owner = match &self.owner_dsn {
            Some(dsn) => Some(
                connect_pool(dsn, &self.database, "owner")
                    .await
                    .map_err(|e| StoreError::NotReady(e.to_string()))?,
            ),
            None => None,
        };
        let pool = owner.as_ref().unwrap_or(&self.primary);
        MIGRATOR.run(pool).await?;
        self.ensure_vector_schema(pool).await?;
        if let Some(role) = &self.app_role {
            grant_app_role(pool, role).await?;
        }
        if let Some(owner) = owner {
            owner.close().await;
        }
        match self.stored_space().await? {
            Some(stored) => check_space(&stored, &self.space),
            None => Err(StoreError::NotReady(
                "vector schema missing after migration".into(),
            )),
        }
    }

    async fn check_ready(&self) -> Result<(), StoreError> {
        let applied: Vec<(i64,)> =
            sqlx::query_as("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.primary)
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
        if let Some(replica) = &self.replica {
            sqlx::query("SELECT 1").execute(replica).await?;
        }
        match self.stored_space().await? {
            Some(stored) => check_space(&stored, &self.space),
            None => Err(StoreError::NotReady(
                "vector columns missing; run `memu-worker migrate`".into(),
            )),
        }
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        let stats = |name, pool: &PgPool| {
            let size = pool.size();
            let idle = pool.num_idle() as u32;
            PoolStats {
                pool: name,
                in_use: size.saturating_sub(idle),
                idle,
                max: self.max_connections,
            }
        };
        let mut out = vec![stats("primary", &self.primary)];
        if let Some(replica) = &self.replica {
            out.push(stats("replica", replica));
        }
        out
    }

    async fn enqueue_memorize(
        &self,
        resource: &Resource,
        task: &Task,
        user_name: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &resource.tenant_id).await?;
        Self::upsert_user(&mut tx, resource.user(), user_name).await?;
        sqlx::query(
            "INSERT INTO resources (tenant_id, user_id, id, agent_id, modality, content_hash, content, caption, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&resource.tenant_id)
        .bind(&resource.user_id)
        .bind(resource.id)
        .bind(&resource.agent_id)
        .bind(resource.modality.as_str())
        .bind(&resource.content_hash)
        .bind(&resource.content)
        .bind(&resource.caption)
        .bind(resource.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO memorize_tasks (tenant_id, user_id, id, agent_id, resource_id, status, attempts, created_at, idempotency_key, trace_parent) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9)",
        )
        .bind(&task.tenant_id)
        .bind(&task.user_id)
        .bind(task.id)
        .bind(&task.agent_id)
        .bind(task.resource_id)
        .bind(task.status.as_str())
        .bind(task.created_at)
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
        let mut tx = Self::tenant_tx(&self.primary, &scope.tenant_id).await?;
        let row = sqlx::query(
            "SELECT t.* FROM memorize_tasks t JOIN resources r \
               ON r.tenant_id = t.tenant_id AND r.user_id = t.user_id AND r.id = t.resource_id \
             WHERE r.tenant_id = $1 AND r.user_id = $2 AND r.agent_id = $3 AND r.content_hash = $4 \
               AND t.status <> 'FAILED' \
             ORDER BY t.created_at DESC LIMIT 1",
        )
        .bind(&scope.tenant_id)
        .bind(&scope.user_id)
        .bind(&scope.agent_id)
        .bind(content_hash)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    async fn find_task_by_key(
        &self,
        user: UserRef<'_>,
        key: &str,
    ) -> Result<Option<Task>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let row = sqlx::query(
            "SELECT * FROM memorize_tasks WHERE tenant_id = $1 AND user_id = $2 AND idempotency_key = $3",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    async fn retry_task(&self, tenant_id: &str, task_id: Uuid) -> Result<Option<Task>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, tenant_id).await?;
        let row = sqlx::query(
            "UPDATE memorize_tasks SET status = 'PENDING', attempts = 0, error = NULL, \
             completed_at = NULL, lease_until = NULL, worker_id = NULL, not_before = NULL \
             WHERE tenant_id = $1 AND id = $2 AND status = 'FAILED' RETURNING *",
        )
        .bind(tenant_id)
        .bind(task_id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        // Across tenants, through the owner's function (the worker's role sees one tenant).
        let (pending, processing, oldest): (i64, i64, Option<f64>) =
            sqlx::query_as("SELECT pending, processing, oldest_secs FROM memu_queue_stats()")
                .fetch_one(&self.primary)
                .await?;
        Ok(QueueStats {
            pending: pending as u64,
            processing: processing as u64,
            oldest_pending_seconds: oldest.unwrap_or(0.0).max(0.0),
        })
    }

    async fn claim_task(
        &self,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Option<(Task, Resource)>, StoreError> {
        // The queue spans tenants: the claim runs in a SECURITY DEFINER function (see migration
        // 0005); the rest of the job runs under the task's tenant.
        let row = sqlx::query("SELECT * FROM memu_claim_task($1, $2)")
            .bind(worker_id)
            .bind(lease.as_secs_f64())
            .fetch_optional(&self.primary)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let task = task_from_row(&row)?;
        let mut tx = Self::tenant_tx(&self.primary, &task.tenant_id).await?;
        let resource = sqlx::query(
            "SELECT * FROM resources WHERE tenant_id = $1 AND user_id = $2 AND id = $3",
        )
        .bind(&task.tenant_id)
        .bind(&task.user_id)
        .bind(task.resource_id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((task, resource_from_row(&resource)?)))
    }

    async fn heartbeat_task(
        &self,
        task: &Task,
        worker_id: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &task.tenant_id).await?;
        sqlx::query(
            "UPDATE memorize_tasks SET lease_until = now() + make_interval(secs => $1) \
             WHERE tenant_id = $2 AND user_id = $3 AND id = $4 AND worker_id = $5 AND status = 'PROCESSING'",
        )
        .bind(lease.as_secs_f64())
        .bind(&task.tenant_id)
        .bind(&task.user_id)
        .bind(task.id)
        .bind(worker_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn complete_task(&self, task: &Task, outcome: MemorizeOutcome) -> Result<(), StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &task.tenant_id).await?;
        let done = sqlx::query(
            "UPDATE memorize_tasks SET status = 'SUCCESS', completed_at = now(), error = NULL, lease_until = NULL \
             WHERE tenant_id = $1 AND user_id = $2 AND id = $3 AND status = 'PROCESSING' AND attempts = $4",
        )
        .bind(&task.tenant_id)
        .bind(&task.user_id)
        .bind(task.id)
        .bind(task.attempts as i32)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            // The task was deleted (user erased) or taken over while it ran: drop the results.
            tx.rollback().await?;
            return Ok(());
        }
        Self::insert_items_tx(&mut tx, &outcome.items).await?;
        for revision in &outcome.revisions {
            let item = &revision.item;
            sqlx::query(
                "UPDATE memory_items SET summary = $1, embedding = $2, extra = $3, happened_at = $4, \
                 updated_at = $5 WHERE tenant_id = $6 AND user_id = $7 AND id = $8",
            )
            .bind(&item.summary)
            .bind(Vector::from(revision.embedding.clone()))
            .bind(&item.extra)
            .bind(item.happened_at)
            .bind(item.updated_at)
            .bind(&task.tenant_id)
            .bind(&task.user_id)
            .bind(item.id)
            .execute(&mut *tx)
            .await?;
        }
        Self::insert_links_tx(&mut tx, task.user(), &outcome.links).await?;
        for update in &outcome.category_updates {
            sqlx::query(
                "UPDATE memory_categories SET summary = $1, embedding = $2, updated_at = now() \
                 WHERE tenant_id = $3 AND user_id = $4 AND id = $5",
            )
            .bind(&update.summary)
            .bind(Vector::from(update.embedding.clone()))
            .bind(&task.tenant_id)
            .bind(&task.user_id)
            .bind(update.category_id)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(caption) = &outcome.resource_caption {
            sqlx::query(
                "UPDATE resources SET caption = $1 WHERE tenant_id = $2 AND user_id = $3 AND id = $4",
            )
            .bind(caption)
            .bind(&task.tenant_id)
            .bind(&task.user_id)
            .bind(task.resource_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn fail_task(&self, task: &Task, error: &str, retry: bool) -> Result<(), StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &task.tenant_id).await?;
        sqlx::query(
            "UPDATE memorize_tasks SET status = $1, error = $2, lease_until = NULL, worker_id = NULL, \
             completed_at = CASE WHEN $3 THEN NULL ELSE now() END, \
             not_before = CASE WHEN $3 THEN now() + make_interval(secs => $8) END \
             WHERE tenant_id = $4 AND user_id = $5 AND id = $6 AND status = 'PROCESSING' AND attempts = $7",
        )
        .bind(if retry { "PENDING" } else { "FAILED" })
        .bind(error)
        .bind(retry)
        .bind(&task.tenant_id)
        .bind(&task.user_id)
        .bind(task.id)
        .bind(task.attempts as i32)
        .bind(super::retry_delay(self.retry_backoff, task.attempts).as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_task(&self, tenant_id: &str, task_id: Uuid) -> Result<Option<Task>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, tenant_id).await?;
        let row = sqlx::query("SELECT * FROM memorize_tasks WHERE tenant_id = $1 AND id = $2")
            .bind(tenant_id)
            .bind(task_id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(|r| task_from_row(&r)).transpose()
    }

    async fn ensure_categories(
        &self,
        scope: &Scope,
        specs: &[(CategorySpec, Vec<f32>)],
    ) -> Result<Vec<Category>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &scope.tenant_id).await?;
        Self::upsert_user(&mut tx, scope.user(), None).await?;
        for (i, (spec, embedding)) in specs.iter().enumerate() {
            sqlx::query(
                "INSERT INTO memory_categories (tenant_id, user_id, id, agent_id, name, description, summary, embedding, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, '', $7, now() + make_interval(secs => $8)) \
                 ON CONFLICT (tenant_id, user_id, agent_id, name) DO NOTHING",
            )
            .bind(&scope.tenant_id)
            .bind(&scope.user_id)
            .bind(Uuid::new_v4())
            .bind(&scope.agent_id)
            .bind(&spec.name)
            .bind(&spec.description)
            .bind(Vector::from(embedding.clone()))
            .bind(i as f64 * 1e-6)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.list_categories(scope).await
    }

    async fn list_categories(&self, scope: &Scope) -> Result<Vec<Category>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &scope.tenant_id).await?;
        let rows = sqlx::query(
            "SELECT * FROM memory_categories WHERE tenant_id = $1 AND user_id = $2 AND agent_id = $3 \
             ORDER BY created_at, name",
        )
        .bind(&scope.tenant_id)
        .bind(&scope.user_id)
        .bind(&scope.agent_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(category_from_row).collect()
    }

    async fn list_user_categories(
        &self,
        user: UserRef<'_>,
    ) -> Result<Vec<(Category, u64)>, StoreError> {
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        let rows = sqlx::query(
            "SELECT c.*, (SELECT count(*) FROM category_items l \
                WHERE l.tenant_id = c.tenant_id AND l.user_id = c.user_id AND l.category_id = c.id) AS items \
             FROM memory_categories c WHERE c.tenant_id = $1 AND c.user_id = $2 \
             ORDER BY c.agent_id, c.created_at, c.name",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                Ok((
                    category_from_row(row)?,
                    row.try_get::<i64, _>("items")? as u64,
                ))
            })
            .collect()
    }

    async fn file_item(
        &self,
        user: UserRef<'_>,
        item_id: Uuid,
        links: &[CategoryLink],
    ) -> Result<(), StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        sqlx::query(
            "DELETE FROM category_items WHERE tenant_id = $1 AND user_id = $2 AND memory_item_id = $3",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(item_id)
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
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT memory_item_id, category_id FROM category_items \
             WHERE tenant_id = $1 AND user_id = $2 AND memory_item_id = ANY($3) ORDER BY confidence DESC",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(item_ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    async fn category_items(
        &self,
        user: UserRef<'_>,
        category_id: Uuid,
        limit: usize,
    ) -> Result<Vec<MemoryItem>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let rows = sqlx::query(
            "SELECT m.tenant_id, m.user_id, m.id, m.agent_id, m.resource_id, m.memory_type, m.summary, \
                    m.happened_at, m.created_at, m.updated_at, m.extra \
             FROM memory_items m JOIN category_items c \
               ON c.tenant_id = m.tenant_id AND c.user_id = m.user_id AND c.memory_item_id = m.id \
             WHERE m.tenant_id = $1 AND m.user_id = $2 AND c.category_id = $3 \
             ORDER BY COALESCE(m.happened_at, m.created_at) DESC, m.id DESC LIMIT $4",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(category_id)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(item_from_row).collect()
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
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        self.set_search_params(&mut tx).await?;
        // relaxed_order may return rows slightly out of order: re-sort the materialised hits.
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "WITH hits AS MATERIALIZED (SELECT {ITEM_COLUMNS}, embedding <=> "
        ));
        qb.push_bind(Vector::from(query.to_vec()))
            .push(" AS distance FROM memory_items WHERE tenant_id = ")
            .push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string());
        Self::push_filter(&mut qb, filter);
        qb.push(" ORDER BY ");
        self.push_index_distance(&mut qb, query);
        qb.push(" LIMIT ")
            .push_bind(k as i64)
            .push(") SELECT * FROM hits ORDER BY distance, id");
        let rows = qb.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                let distance: f64 = row.try_get("distance")?;
                Ok(ScoredItem {
                    item: item_from_row(row)?,
                    score: (1.0 - distance) as f32,
                })
            })
            .collect()
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
        // Any of the words (`|`): a question rarely shares all its words with the memory.
        let tsquery = terms.join(" | ");
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "SELECT {ITEM_COLUMNS}, ts_rank_cd(summary_tsv, q) AS rank \
             FROM memory_items, to_tsquery('simple', "
        ));
        qb.push_bind(tsquery)
            .push(") AS q WHERE summary_tsv @@ q AND tenant_id = ")
            .push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string());
        Self::push_filter(&mut qb, filter);
        qb.push(" ORDER BY rank DESC, id LIMIT ")
            .push_bind(k as i64);
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        let rows = qb.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| {
                let rank: f32 = row.try_get("rank")?;
                Ok(ScoredItem {
                    item: item_from_row(row)?,
                    score: rank,
                })
            })
            .collect()
    }

    async fn list_items(
        &self,
        user: UserRef<'_>,
        filter: &ItemFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<MemoryItem>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "SELECT {ITEM_COLUMNS} FROM memory_items WHERE tenant_id = "
        ));
        qb.push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string());
        Self::push_filter(&mut qb, filter);
        if let Some(cursor) = cursor {
            let (at, id): (DateTime<Utc>, Uuid) = decode_cursor(cursor)?;
            qb.push(" AND (created_at, id) < (")
                .push_bind(at)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(limit as i64 + 1);
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        let rows = qb.build().fetch_all(&mut *tx).await?;
        tx.commit().await?;
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
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {ITEM_COLUMNS} FROM memory_items WHERE tenant_id = $1 AND user_id = $2 AND id = $3"
        )))
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| item_from_row(&r)).transpose()
    }

    async fn insert_item(&self, item: &NewItem) -> Result<(), StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &item.item.tenant_id).await?;
        Self::upsert_user(&mut tx, item.item.user(), None).await?;
        Self::insert_items_tx(&mut tx, std::slice::from_ref(item)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_item(
        &self,
        user: UserRef<'_>,
        id: Uuid,
        patch: &ItemPatch,
    ) -> Result<Option<MemoryItem>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new("UPDATE memory_items SET updated_at = now()");
        if let Some(summary) = &patch.summary {
            qb.push(", summary = ").push_bind(summary.clone());
        }
        if let Some(embedding) = &patch.embedding {
            qb.push(", embedding = ")
                .push_bind(Vector::from(embedding.clone()));
        }
        if let Some(t) = patch.memory_type {
            qb.push(", memory_type = ").push_bind(t.as_str());
        }
        if let Some(at) = patch.happened_at {
            qb.push(", happened_at = ").push_bind(at);
        }
        if let Some(extra) = &patch.extra {
            qb.push(", extra = ").push_bind(extra.clone());
        }
        qb.push(" WHERE tenant_id = ")
            .push_bind(user.tenant_id.to_string())
            .push(" AND user_id = ")
            .push_bind(user.user_id.to_string())
            .push(" AND id = ")
            .push_bind(id)
            .push(format!(" RETURNING {ITEM_COLUMNS}"));
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let row = qb.build().fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        row.map(|r| item_from_row(&r)).transpose()
    }

    async fn delete_item(&self, user: UserRef<'_>, id: Uuid) -> Result<bool, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let done = sqlx::query(
            "DELETE FROM memory_items WHERE tenant_id = $1 AND user_id = $2 AND id = $3",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn find_identical_item(
        &self,
        scope: &Scope,
        memory_type: MemoryType,
        summary: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, &scope.tenant_id).await?;
        let row: Option<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM memory_items WHERE tenant_id = $1 AND user_id = $2 AND agent_id = $3 \
             AND memory_type = $4 AND md5(summary) = md5($5) AND summary = $5 LIMIT 1",
        )
        .bind(&scope.tenant_id)
        .bind(&scope.user_id)
        .bind(&scope.agent_id)
        .bind(memory_type.as_str())
        .bind(summary)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|(id,)| id))
    }

    async fn get_resources(
        &self,
        user: UserRef<'_>,
        ids: &[Uuid],
    ) -> Result<Vec<Resource>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        let rows = sqlx::query(
            "SELECT * FROM resources WHERE tenant_id = $1 AND user_id = $2 AND id = ANY($3) \
             ORDER BY created_at",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(resource_from_row).collect()
    }

    async fn delete_user(
        &self,
        user: UserRef<'_>,
        agent_id: Option<&str>,
    ) -> Result<DeletedCounts, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
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
        Ok(counts)
    }

    async fn export_user(&self, user: UserRef<'_>) -> Result<UserExport, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let export = UserExport {
            tenant_id: user.tenant_id.to_string(),
            user_id: user.user_id.to_string(),
            exported_at: Utc::now(),
            resources: Self::rows_as_json(&mut tx,
                "SELECT jsonb_build_object('id', id, 'agent_id', agent_id, 'modality', modality, \
                 'content_hash', content_hash, 'content', content, 'caption', caption, 'created_at', created_at) \
                 FROM resources WHERE tenant_id = $1 AND user_id = $2 ORDER BY created_at", user).await?,
            memory_items: Self::rows_as_json(&mut tx,
                "SELECT jsonb_build_object('id', id, 'agent_id', agent_id, 'resource_id', resource_id, \
                 'memory_type', memory_type, 'summary', summary, 'happened_at', happened_at, \
                 'created_at', created_at, 'updated_at', updated_at, 'extra', extra) \
                 FROM memory_items WHERE tenant_id = $1 AND user_id = $2 ORDER BY created_at", user).await?,
            categories: Self::rows_as_json(&mut tx,
                "SELECT jsonb_build_object('id', id, 'agent_id', agent_id, 'name', name, \
                 'description', description, 'summary', summary, 'updated_at', updated_at) \
                 FROM memory_categories WHERE tenant_id = $1 AND user_id = $2 ORDER BY created_at", user).await?,
            category_items: Self::rows_as_json(&mut tx,
                "SELECT jsonb_build_object('memory_item_id', memory_item_id, 'category_id', category_id, \
                 'confidence', confidence) FROM category_items WHERE tenant_id = $1 AND user_id = $2", user).await?,
            tasks: Self::rows_as_json(&mut tx,
                "SELECT jsonb_build_object('task_id', id, 'agent_id', agent_id, 'resource_id', resource_id, \
                 'status', status, 'attempts', attempts, 'error', error, 'created_at', created_at) \
                 FROM memorize_tasks WHERE tenant_id = $1 AND user_id = $2 ORDER BY created_at", user).await?,
            audit: Vec::new(),
        };
        tx.commit().await?;
        Ok(export)
    }

    async fn record_llm_usage(&self, calls: &[LlmUsage]) -> Result<(), StoreError> {
        for (tenant_id, calls) in group_by_tenant(calls, |c| &c.tenant_id) {
            let mut tx = Self::tenant_tx(&self.primary, tenant_id).await?;
            for c in calls {
                sqlx::query(
                    "INSERT INTO llm_usage (tenant_id, user_id, id, task_id, operation, prompt, provider, model, \
                     prompt_tokens, completion_tokens, latency_ms, cost_usd, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                )
                .bind(&c.tenant_id)
                .bind(&c.user_id)
                .bind(c.id)
                .bind(c.task_id)
                .bind(&c.operation)
                .bind(&c.prompt)
                .bind(&c.provider)
                .bind(&c.model)
                .bind(c.prompt_tokens as i64)
                .bind(c.completion_tokens as i64)
                .bind(c.latency_ms as i64)
                .bind(c.cost_usd)
                .bind(c.created_at)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    async fn llm_usage_totals(&self, user: UserRef<'_>) -> Result<Vec<UsageTotals>, StoreError> {
        let mut tx = Self::tenant_tx(self.reader(), user.tenant_id).await?;
        let rows = sqlx::query(
            "SELECT operation, provider, model, count(*) AS calls, sum(prompt_tokens)::bigint AS prompt_tokens, \
             sum(completion_tokens)::bigint AS completion_tokens, sum(cost_usd) AS cost_usd \
             FROM llm_usage WHERE tenant_id = $1 AND user_id = $2 GROUP BY operation, provider, model \
             ORDER BY operation, provider, model",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(usage_totals_from).collect()
    }
}

fn tenant_from_row(row: &PgRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
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

fn key_from_row(row: &PgRow) -> Result<ApiKeyRecord, StoreError> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKeyRecord {
        key_id: row.try_get("key_id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        scopes: parse_scopes(&scopes).map_err(StoreError::Invalid)?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

fn audit_from_row(row: &PgRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        at: row.try_get("at")?,
        key_id: row.try_get("key_id")?,
        method: row.try_get("method")?,
        route: row.try_get("route")?,
        target_user: row.try_get("target_user")?,
        status: row.try_get::<i32, _>("status")? as u16,
    })
}

#[async_trait]
impl AccessStore for PgStore {
    async fn create_tenant(&self, tenant: &Tenant) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenants (tenant_id, name, created_at, rate_limit_rps, memorize_per_day, tokens_per_day) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&tenant.tenant_id)
        .bind(&tenant.name)
        .bind(tenant.created_at)
        .bind(tenant.limits.rate_limit_rps)
        .bind(tenant.limits.memorize_per_day.map(|v| v as i64))
        .bind(tenant.limits.tokens_per_day.map(|v| v as i64))
        .execute(&self.primary)
        .await
        .map_err(|e| duplicate_or(e, "tenant"))?;
        Ok(())
    }

    async fn get_tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, StoreError> {
        sqlx::query("SELECT * FROM tenants WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(&self.primary)
            .await?
            .map(|r| tenant_from_row(&r))
            .transpose()
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        sqlx::query("SELECT * FROM tenants ORDER BY tenant_id")
            .fetch_all(&self.primary)
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
            "UPDATE tenants SET rate_limit_rps = $2, memorize_per_day = $3, tokens_per_day = $4 \
             WHERE tenant_id = $1 RETURNING *",
        )
        .bind(tenant_id)
        .bind(limits.rate_limit_rps)
        .bind(limits.memorize_per_day.map(|v| v as i64))
        .bind(limits.tokens_per_day.map(|v| v as i64))
        .fetch_optional(&self.primary)
        .await?
        .map(|r| tenant_from_row(&r))
        .transpose()
    }

    async fn insert_api_key(&self, key: &ApiKeyRecord, replace: bool) -> Result<(), StoreError> {
        let conflict = match replace {
            true => {
                " ON CONFLICT (key_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, \
                 name = EXCLUDED.name, scopes = EXCLUDED.scopes, secret_hash = EXCLUDED.secret_hash, \
                 expires_at = EXCLUDED.expires_at, revoked_at = NULL"
            }
            false => "",
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO api_keys (key_id, tenant_id, name, scopes, secret_hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7){conflict}"
        )))
        .bind(&key.key_id)
        .bind(&key.tenant_id)
        .bind(&key.name)
        .bind(scopes_to_text(&key.scopes))
        .bind(&key.secret_hash)
        .bind(key.created_at)
        .bind(key.expires_at)
        .execute(&self.primary)
        .await
        .map_err(|e| duplicate_or(e, "api key"))?;
        Ok(())
    }

    async fn find_api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE key_id = $1")
            .bind(key_id)
            .fetch_optional(&self.primary)
            .await?
            .map(|r| key_from_row(&r))
            .transpose()
    }

    async fn list_api_keys(&self, tenant_id: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        sqlx::query("SELECT * FROM api_keys WHERE tenant_id = $1 ORDER BY created_at, key_id")
            .bind(tenant_id)
            .fetch_all(&self.primary)
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_api_key(&self, tenant_id: &str, key_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) \
             WHERE tenant_id = $1 AND key_id = $2",
        )
        .bind(tenant_id)
        .bind(key_id)
        .execute(&self.primary)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn touch_api_key(&self, key_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE key_id = $1")
            .bind(key_id)
            .bind(at)
            .execute(&self.primary)
            .await?;
        Ok(())
    }

    async fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        for (tenant_id, entries) in group_by_tenant(entries, |e| &e.tenant_id) {
            let mut tx = Self::tenant_tx(&self.primary, tenant_id).await?;
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO audit_log (tenant_id, id, at, key_id, method, route, target_user, status) ",
            );
            qb.push_values(entries, |mut row, e| {
                row.push_bind(&e.tenant_id)
                    .push_bind(e.id)
                    .push_bind(e.at)
                    .push_bind(&e.key_id)
                    .push_bind(&e.method)
                    .push_bind(&e.route)
                    .push_bind(&e.target_user)
                    .push_bind(e.status as i32);
            });
            qb.build().execute(&mut *tx).await?;
            tx.commit().await?;
        }
        Ok(())
    }

    async fn list_audit(
        &self,
        tenant_id: &str,
        target_user: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, tenant_id).await?;
        let rows = sqlx::query(
            "SELECT * FROM audit_log WHERE tenant_id = $1 AND ($2::text IS NULL OR target_user = $2) \
             ORDER BY at DESC, id DESC LIMIT $3",
        )
        .bind(tenant_id)
        .bind(target_user)
        .bind(limit.map(|l| l as i64))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn pseudonymise_audit(
        &self,
        user: UserRef<'_>,
        pseudonym: &str,
    ) -> Result<u64, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, user.tenant_id).await?;
        let done = sqlx::query(
            "UPDATE audit_log SET target_user = $3 WHERE tenant_id = $1 AND target_user = $2",
        )
        .bind(user.tenant_id)
        .bind(user.user_id)
        .bind(pseudonym)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn tenant_usage_since(
        &self,
        tenant_id: &str,
        since: DateTime<Utc>,
    ) -> Result<DailyUsage, StoreError> {
        let mut tx = Self::tenant_tx(&self.primary, tenant_id).await?;
        let (jobs, tokens): (i64, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM memorize_tasks WHERE tenant_id = $1 AND created_at >= $2), \
                    (SELECT sum(prompt_tokens + completion_tokens)::bigint FROM llm_usage \
                     WHERE tenant_id = $1 AND created_at >= $2)",
        )
        .bind(tenant_id)
        .bind(since)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
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
        let mut tx = Self::tenant_tx(self.reader(), tenant_id).await?;
        let rows = sqlx::query(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, user_id, provider, model, \
             count(*) AS calls, sum(prompt_tokens)::bigint AS prompt_tokens, \
             sum(completion_tokens)::bigint AS completion_tokens, sum(cost_usd) AS cost_usd \
             FROM llm_usage WHERE tenant_id = $1 AND created_at >= $2 AND created_at < $3 \
             GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        )
        .bind(tenant_id)
        .bind(since)
        .bind(until)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.iter().map(|r| cost_row_from(tenant_id, r)).collect()
    }
}
