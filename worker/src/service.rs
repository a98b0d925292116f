//! Service layer: the memory operations the API exposes, independent of HTTP and of the store.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OnceCell};
use uuid::Uuid;

use memu_crds::worker::WorkerConfig;

use crate::cache::{Cache, MemoryCache, decode_vector, encode_vector, generation_key};
use crate::metrics::{BackendLabels, Metrics};
use crate::model::{
    Category, CategoryLink, DeletedCounts, ItemFilter, ItemPatch, JobOverrides, MemoryItem,
    MemoryType, Message, Modality, NewItem, Page, Resource, Scope, ScoredItem, Task, TaskStatus,
    UsageTotals, UserRef, dot,
};
use crate::providers::{ChatModel, Embedder, MediaReader, ProviderError, build_chat, build_media};
use crate::store::{EmbeddingSpace, MemoryStore, StoreError, UserExport};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is wrong; `field` names the offending field.
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An LLM answered, but not with anything usable (after the repair attempt).
    #[error("{0}")]
    ModelOutput(String),
    /// A job ran out of its time budget.
    #[error("{0}")]
    Budget(String),
}

/// Chat models per pipeline role; all `None` in offline mode.
#[derive(Clone, Default)]
pub struct LlmModels {
    pub extraction: Option<Arc<dyn ChatModel>>,
    pub categorization: Option<Arc<dyn ChatModel>>,
    pub retrieval: Option<Arc<dyn ChatModel>>,
    /// Reads images and audio into text for memorize.
    pub media: Option<Arc<dyn MediaReader>>,
}

impl LlmModels {
    /// The models of `config.llm` (each role falls back to `llm.provider`).
    pub fn from_config(config: &WorkerConfig, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let llm = &config.llm;
        Ok(Self {
            extraction: build_chat(config, llm.extraction.as_deref(), metrics.clone())?,
            categorization: build_chat(config, llm.categorization.as_deref(), metrics.clone())?,
            retrieval: build_chat(config, llm.retrieval.as_deref(), metrics.clone())?,
            media: build_media(config, metrics)?,
        })
    }
}

pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ServiceError {
    ServiceError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A validated memorize request.
#[derive(Clone, Debug)]
pub struct MemorizeInput {
    pub scope: Scope,
    /// The client's `Idempotency-Key`: the same key returns the same task.
    pub idempotency_key: Option<String>,
    pub user_name: Option<String>,
    pub agent_name: Option<String>,
    pub session_date: Option<DateTime<Utc>>,
    pub messages: Vec<Message>,
    /// The request's own memory types and categories.
    pub overrides: JobOverrides,
}

/// Media that memorize reads into text first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Audio,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Audio => "audio",
        }
    }
}

/// How retrieve ranks memories.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetrieveMethod {
    /// Vector similarity only: one embedding request (none when cached), no LLM call.
    #[default]
    Rag,
    /// Vector and full-text ranks fused (RRF): finds names and numbers vectors miss.
    Hybrid,
    /// memU's LLM flow: route, rewrite, and stop at the first tier that suffices.
    Llm,
}

impl RetrieveInput {
    pub fn user(&self) -> UserRef<'_> {
        UserRef::new(&self.tenant_id, &self.user_id)
    }
}

/// A validated retrieve request.
#[derive(Clone, Debug)]
pub struct RetrieveInput {
    pub tenant_id: String,
    pub user_id: String,
    pub agent_id: Option<String>,
    pub query: String,
    /// Earlier messages of a conversation query, oldest first (`role`, `content`).
    pub context: Vec<(String, String)>,
    pub top_k: usize,
    pub filter: ItemFilter,
    pub method: RetrieveMethod,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ScoredCategory {
    pub category: Category,
    pub score: f32,
}

#[derive(Clone, Debug)]
pub struct RetrieveOutput {
    /// The query searched with (rewritten in `llm` mode).
    pub query: String,
    /// `llm` mode: false when the router decided the message needs no memories.
    pub needs_memory: bool,
    /// `llm` mode: the tier after which the recall was judged sufficient
    /// (`categories`, `items`, or `resources` when every tier was searched).
    pub sufficient_after: Option<&'static str>,
    pub llm_calls: usize,
    pub categories: Vec<ScoredCategory>,
    pub items: Vec<ScoredItem>,
    pub resources: Vec<Resource>,
}

impl RetrieveOutput {
    /// An answer found by search alone (`rag`, `hybrid`): no LLM was asked.
    pub fn searched(
        query: String,
        categories: Vec<ScoredCategory>,
        items: Vec<ScoredItem>,
        resources: Vec<Resource>,
    ) -> Self {
        Self {
            query,
            needs_memory: true,
            sufficient_after: None,
            llm_calls: 0,
            categories,
            items,
            resources,
        }
    }
}

/// Categories shown by retrieve at most.
const RETRIEVE_CATEGORIES: usize = 3;

pub struct MemoryService {
    pub config: Arc<WorkerConfig>,
    pub store: Arc<dyn MemoryStore>,
    pub embedder: Arc<dyn Embedder>,
    pub llm: LlmModels,
    pub metrics: Arc<Metrics>,
    /// Wakes this process's pipeline as soon as a job is enqueued.
    pub new_work: Arc<Notify>,
    query_cache: Mutex<lru::LruCache<String, Arc<Vec<f32>>>>,
    /// Redis, shared by every replica: query embeddings and retrieve results.
    shared_cache: Option<Arc<dyn Cache>>,
    /// Where retrieve results are cached (Redis, or this process when allowed), with the TTL.
    result_cache: Option<(Arc<dyn Cache>, Duration)>,
    category_spec_vectors: OnceCell<Vec<Vec<f32>>>,
    /// API keys, tenants, rate limits and quotas.
    pub access: crate::access::Access,
}

/// The embedding space a configured embedder writes into.
pub fn embedding_space(config: &WorkerConfig, embedder: &dyn Embedder) -> EmbeddingSpace {
    EmbeddingSpace {
        dimension: config.vector.dimension,
        model: format!("{}/{}", embedder.provider(), embedder.model()),
    }
}

impl MemoryService {
    pub fn new(
        config: Arc<WorkerConfig>,
        store: Arc<dyn MemoryStore>,
        embedder: Arc<dyn Embedder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = NonZeroUsize::new(config.embedding.query_cache_size.max(1)).expect("nonzero");
        Self {
            access: crate::access::Access::new(
                store.clone(),
                config.auth.clone(),
                Arc::new(MemoryCache::new(1)),
            ),
            config,
            store,
            embedder,
            llm: LlmModels::default(),
            metrics,
            new_work: Arc::new(Notify::new()),
            query_cache: Mutex::new(lru::LruCache::new(cache)),
            shared_cache: None,
            result_cache: None,
            category_spec_vectors: OnceCell::new(),
        }
    }

    /// Caches in Redis when given; else, when `cache.local_retrieve_ttl_secs` is set, retrieve
    /// results in this process.
    pub fn with_cache(mut self, redis: Option<Arc<dyn Cache>>) -> Self {
        let config = &self.config.cache;
        self.result_cache = match &redis {
            Some(shared) => Some((
                shared.clone(),
                Duration::from_secs(config.retrieve_ttl_secs),
            )),
            None if config.local_retrieve_ttl_secs > 0 => Some((
                Arc::new(MemoryCache::new(10_000)) as Arc<dyn Cache>,
                Duration::from_secs(config.local_retrieve_ttl_secs),
            )),
            None => None,
        };
        if let Some(shared) = &redis {
            // Tenants' request rates are counted once for all replicas.
            self.access = crate::access::Access::new(
                self.store.clone(),
                self.config.auth.clone(),
                shared.clone(),
            );
        }
        self.shared_cache = redis;
        self
    }

    /// Drops every cached retrieve result of the user (after any write of theirs).
    pub async fn invalidate(&self, user: UserRef<'_>) {
        if let Some((cache, _)) = &self.result_cache {
            cache.bump(&generation_key(user)).await;
        }
    }

    /// Uses these chat models for memorize and `llm` retrieve.
    pub fn with_llm(mut self, llm: LlmModels) -> Self {
        self.llm = llm;
        self
    }

    /// Stores the conversation and queues it; the pipeline extracts memories from it. The same
    /// conversation memorized again for the same scope is not extracted twice: the earlier task
    /// is returned, with `true`.
    pub async fn memorize(&self, input: MemorizeInput) -> Result<(Task, bool), ServiceError> {
        let key = input.idempotency_key.as_deref();
        if let Some(key) = key
            && let Some(task) = self.store.find_task_by_key(input.scope.user(), key).await?
        {
            return Ok((task, true));
        }
        // The same conversation is memorized once per scope, unless it asks for other types or
        // categories.
        let hash = if input.overrides.is_empty() {
            content_hash(&serde_json::json!(input.messages))
        } else {
            content_hash(&serde_json::json!([input.messages, input.overrides]))
        };
        if let Some(task) = self.store.find_memorized(&input.scope, &hash).await? {
            return Ok((task, true));
        }
        let now = Utc::now();
        let mut content = serde_json::json!({
            "messages": input.messages,
            "user_name": input.user_name,
            "agent_name": input.agent_name,
            "session_date": input.session_date,
        });
        if !input.overrides.is_empty() {
            content["override_config"] = serde_json::json!(input.overrides);
        }
        let resource = Resource {
            id: Uuid::now_v7(),
            tenant_id: input.scope.tenant_id.clone(),
            user_id: input.scope.user_id.clone(),
            agent_id: input.scope.agent_id.clone(),
            modality: Modality::Conversation,
            content_hash: hash,
            content,
            caption: None,
            created_at: now,
        };
        let task = pending_task(&resource);
        match self
            .store
            .enqueue_memorize(&resource, &task, input.user_name.as_deref(), key)
            .await
        {
            Ok(()) => {}
            // A concurrent request with the same key won the race: answer with its task.
            Err(StoreError::Duplicate(_)) if key.is_some() => {
                let task = self
                    .store
                    .find_task_by_key(input.scope.user(), key.expect("checked"))
                    .await?
                    .ok_or_else(|| ServiceError::NotFound("task of the idempotency key".into()))?;
                return Ok((task, true));
            }
            Err(e) => return Err(e.into()),
        }
        self.new_work.notify_one();
        Ok((task, false))
    }

    /// Stores a plain-text or Markdown document and queues it (content-addressed like
    /// conversations: the same text again for the same scope returns the earlier task).
    pub async fn memorize_document(
        &self,
        scope: Scope,
        title: Option<String>,
        text: String,
    ) -> Result<(Task, bool), ServiceError> {
        let hash = content_hash(&serde_json::json!({"document": text}));
        if let Some(task) = self.store.find_memorized(&scope, &hash).await? {
            return Ok((task, true));
        }
        self.enqueue_document(scope, title, serde_json::json!({"text": text}), hash)
            .await
    }

    /// Reads an image (vision chat) or audio (transcription) into text and memorizes that text
    /// as a document that remembers its source. Recognised by the SHA-256 of the raw bytes, so
    /// the same file is never sent to the provider twice.
    pub async fn memorize_media(
        &self,
        scope: Scope,
        title: Option<String>,
        kind: MediaKind,
        mime_type: String,
        data: Vec<u8>,
    ) -> Result<(Task, bool), ServiceError> {
        let reader = self.llm.media.as_ref().filter(|m| match kind {
            MediaKind::Image => m.reads_images(),
            MediaKind::Audio => m.reads_audio(),
        });
        let Some(reader) = reader else {
            let what = match kind {
                MediaKind::Image => {
                    "an image needs a provider profile with vision (providers.NAME.vision: true, chosen by llm.media or llm.provider)"
                }
                MediaKind::Audio => {
                    "audio needs a provider profile with a transcription_model (chosen by llm.media or llm.provider)"
                }
            };
            return Err(invalid("modality", format!("{what}; this worker has none")));
        };
        let raw_hash = hex::encode(Sha256::digest(&data));
        let hash = content_hash(&serde_json::json!({"media": raw_hash}));
        if let Some(task) = self.store.find_memorized(&scope, &hash).await? {
            return Ok((task, true));
        }
        let text = match kind {
            MediaKind::Image => reader.describe_image(&mime_type, &data).await?,
            MediaKind::Audio => reader.transcribe(&mime_type, &data).await?,
        };
        if text.trim().is_empty() {
            return Err(ServiceError::ModelOutput(format!(
                "{} returned no text for this {}",
                reader.provider(),
                kind.as_str()
            )));
        }
        let content = serde_json::json!({
            "text": text,
            "source": {"modality": kind.as_str(), "mime_type": mime_type, "sha256": raw_hash, "bytes": data.len(), "read_by": reader.provider()},
        });
        self.enqueue_document(scope, title, content, hash).await
    }

    async fn enqueue_document(
        &self,
        scope: Scope,
        title: Option<String>,
        mut content: serde_json::Value,
        hash: String,
    ) -> Result<(Task, bool), ServiceError> {
        content["title"] = serde_json::json!(title);
        let now = Utc::now();
        let resource = Resource {
            id: Uuid::now_v7(),
            tenant_id: scope.tenant_id.clone(),
            user_id: scope.user_id.clone(),
            agent_id: scope.agent_id.clone(),
            modality: Modality::Document,
            content_hash: hash,
            content,
            caption: title,
            created_at: now,
        };
        let task = pending_task(&resource);
        self.store
            .enqueue_memorize(&resource, &task, None, None)
            .await?;
        self.new_work.notify_one();
        Ok((task, false))
    }

    /// Puts a FAILED task back in the queue (its resource was kept).
    pub async fn retry_task(&self, tenant_id: &str, id: Uuid) -> Result<Task, ServiceError> {
        if let Some(task) = self.store.retry_task(tenant_id, id).await? {
            self.new_work.notify_one();
            return Ok(task);
        }
        let task = self.task(tenant_id, id).await?;
        Err(invalid(
            "task_id",
            format!(
                "task {id} is {}: only FAILED tasks can be retried",
                task.status.as_str()
            ),
        ))
    }

    /// A task of the tenant; another tenant's id is simply not found.
    pub async fn task(&self, tenant_id: &str, id: Uuid) -> Result<Task, ServiceError> {
        self.store
            .get_task(tenant_id, id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("task {id}")))
    }

    /// Embeds a query, from the LRU cache when the same text was embedded before.
    #[tracing::instrument(name = "embed query", skip_all)]
    pub async fn embed_query(&self, text: &str) -> Result<Arc<Vec<f32>>, ServiceError> {
        let key = format!("{}\u{0}{}", self.embedder.model(), text);
        if let Some(hit) = self
            .query_cache
            .lock()
            .expect("cache lock")
            .get(&key)
            .cloned()
        {
            self.metrics.embedding_cache_hits.inc();
            return Ok(hit);
        }
        let shared_key = format!(
            "memu:emb:{}/{}:{}",
            self.embedder.provider(),
            self.embedder.model(),
            hex::encode(Sha256::digest(text.as_bytes()))
        );
        let shared = match &self.shared_cache {
            Some(cache) => cache.get(&shared_key).await.and_then(|b| decode_vector(&b)),
            None => None,
        };
        let vector = match shared {
            Some(v) => {
                self.metrics.embedding_cache_hits.inc();
                Arc::new(v)
            }
            None => {
                let v = self
                    .embedder
                    .embed(&[text.to_string()])
                    .await?
                    .pop()
                    .ok_or_else(|| ProviderError::Model("no embedding returned".into()))?;
                if let Some(cache) = &self.shared_cache {
                    let ttl = Duration::from_secs(self.config.cache.embedding_ttl_secs);
                    cache.set(&shared_key, &encode_vector(&v), ttl).await;
                }
                Arc::new(v)
            }
        };
        self.query_cache
            .lock()
            .expect("cache lock")
            .put(key, vector.clone());
        Ok(vector)
    }

    /// Embeddings of the configured default categories ("name: description"), computed once.
    pub async fn category_spec_vectors(&self) -> Result<&Vec<Vec<f32>>, ServiceError> {
        self.category_spec_vectors
            .get_or_try_init(|| async {
                let texts: Vec<String> = self
                    .config
                    .memory
                    .categories
                    .iter()
                    .map(|c| format!("{}: {}", c.name.replace('_', " "), c.description))
                    .collect();
                Ok::<_, ServiceError>(self.embedder.embed(&texts).await?)
            })
            .await
    }

    /// The categories a job files into: the request's own (`override_config`), created for the
    /// scope on first use with their descriptions embedded, or the scope's configured ones.
    pub async fn job_categories(
        &self,
        scope: &Scope,
        overrides: &JobOverrides,
    ) -> Result<Vec<Category>, ServiceError> {
        let Some(specs) = &overrides.memory_categories else {
            return self.ensure_categories(scope).await;
        };
        let existing = self.store.list_categories(scope).await?;
        let missing: Vec<_> = specs
            .iter()
            .filter(|s| !existing.iter().any(|c| c.name == s.name))
            .cloned()
            .collect();
        let all = if missing.is_empty() {
            existing
        } else {
            let texts: Vec<String> = missing
                .iter()
                .map(|s| format!("{}: {}", s.name.replace('_', " "), s.description))
                .collect();
            let vectors = self.embedder.embed(&texts).await?;
            let pairs: Vec<_> = missing.into_iter().zip(vectors).collect();
            self.store.ensure_categories(scope, &pairs).await?
        };
        Ok(all
            .into_iter()
            .filter(|c| specs.iter().any(|s| s.name == c.name))
            .collect())
    }

    /// The scope's categories, created from the configured defaults on first use.
    pub async fn ensure_categories(&self, scope: &Scope) -> Result<Vec<Category>, ServiceError> {
        let existing = self.store.list_categories(scope).await?;
        let specs = &self.config.memory.categories;
        if specs
            .iter()
            .all(|s| existing.iter().any(|c| c.name == s.name))
        {
            return Ok(existing);
        }
        let vectors = self.category_spec_vectors().await?;
        let pairs: Vec<_> = specs.iter().cloned().zip(vectors.iter().cloned()).collect();
        Ok(self.store.ensure_categories(scope, &pairs).await?)
    }

    pub async fn retrieve(&self, input: RetrieveInput) -> Result<RetrieveOutput, ServiceError> {
        if input.method == RetrieveMethod::Llm {
            return crate::retrieval::retrieve_llm(self, input).await;
        }
        let cached = self.result_cache_key(&input).await;
        if let Some((cache, _, key)) = &cached
            && let Some(hit) = cache.get(key).await
            && let Ok((categories, items, resources)) = serde_json::from_slice(&hit)
        {
            self.metrics.retrieve_cache_hits.inc();
            return Ok(RetrieveOutput::searched(
                input.query,
                categories,
                items,
                resources,
            ));
        }
        let query = self.embed_query(&input.query).await?;
        let items = self
            .search(&input, &query, input.method == RetrieveMethod::Hybrid)
            .await?;
        let scope = Scope::new(input.user(), input.agent_id.clone());
        let categories = self.rank_categories(&scope, &query).await?;
        let resources = self.sources(input.user(), &items).await?;
        if let Some((cache, ttl, key)) = &cached
            && let Ok(bytes) = serde_json::to_vec(&(&categories, &items, &resources))
        {
            cache.set(key, &bytes, *ttl).await;
        }
        Ok(RetrieveOutput::searched(
            input.query,
            categories,
            items,
            resources,
        ))
    }

    /// Where a `rag`/`hybrid` answer is cached: the cache, its TTL and a key under the user's
    /// current generation (so any write of the user retires it).
    async fn result_cache_key(
        &self,
        input: &RetrieveInput,
    ) -> Option<(&Arc<dyn Cache>, Duration, String)> {
        let (cache, ttl) = self.result_cache.as_ref()?;
        let generation = cache.counter(&generation_key(input.user())).await;
        let request = serde_json::json!([
            input.method == RetrieveMethod::Hybrid,
            input.agent_id,
            input.query,
            input.top_k,
            input.filter.memory_types,
            input.filter.since,
            input.filter.until,
        ]);
        let key = format!(
            "memu:ret:{}:{}:{generation}:{}",
            input.tenant_id,
            input.user_id,
            content_hash(&request)
        );
        Some((cache, *ttl, key))
    }

    /// The top items for a query vector; with `hybrid`, fused with the full-text ranking.
    #[tracing::instrument(name = "vector search", skip_all)]
    pub async fn search(
        &self,
        input: &RetrieveInput,
        query: &[f32],
        hybrid: bool,
    ) -> Result<Vec<ScoredItem>, ServiceError> {
        let started = Instant::now();
        // Fusion needs candidates beyond the final k from both lists.
        let depth = if hybrid {
            (input.top_k * 3).max(20)
        } else {
            input.top_k
        };
        let by_vector = self
            .store
            .search_items(input.user(), query, &input.filter, depth)
            .await?;
        self.metrics
            .vector_search_duration
            .get_or_create(&BackendLabels {
                backend: self.store.backend().to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        if !hybrid {
            return Ok(by_vector);
        }
        let by_text = self
            .store
            .search_text(input.user(), &input.query, &input.filter, depth)
            .await?;
        Ok(crate::retrieval::fuse_ranks(
            &[by_vector, by_text],
            input.top_k,
        ))
    }

    /// The scope's categories that have a summary, most similar to the query first.
    #[tracing::instrument(name = "rank categories", skip_all)]
    pub async fn rank_categories(
        &self,
        scope: &Scope,
        query: &[f32],
    ) -> Result<Vec<ScoredCategory>, ServiceError> {
        let mut categories: Vec<ScoredCategory> = self
            .store
            .list_categories(scope)
            .await?
            .into_iter()
            .filter(|c| !c.summary.is_empty() && c.embedding.len() == query.len())
            .map(|c| ScoredCategory {
                score: dot(&c.embedding, query),
                category: c,
            })
            .collect();
        categories.sort_by(|a, b| b.score.total_cmp(&a.score));
        categories.truncate(RETRIEVE_CATEGORIES);
        Ok(categories)
    }

    /// The resources the items were extracted from.
    pub async fn sources(
        &self,
        user: UserRef<'_>,
        items: &[ScoredItem],
    ) -> Result<Vec<Resource>, ServiceError> {
        let mut ids: Vec<Uuid> = items.iter().filter_map(|i| i.item.resource_id).collect();
        ids.sort();
        ids.dedup();
        Ok(self.store.get_resources(user, &ids).await?)
    }

    /// The user's LLM cost log, totalled.
    pub async fn usage(&self, user: UserRef<'_>) -> Result<Vec<UsageTotals>, ServiceError> {
        Ok(self.store.llm_usage_totals(user).await?)
    }

    pub async fn categories(&self, scope: &Scope) -> Result<Vec<Category>, ServiceError> {
        Ok(self.store.list_categories(scope).await?)
    }

    /// The user's categories of every agent, or of one, with how many items each holds.
    pub async fn user_categories(
        &self,
        user: UserRef<'_>,
        agent_id: Option<&str>,
    ) -> Result<Vec<(Category, u64)>, ServiceError> {
        let mut categories = self.store.list_user_categories(user).await?;
        if let Some(agent) = agent_id {
            categories.retain(|(c, _)| c.agent_id == agent);
        }
        Ok(categories)
    }

    /// The names of the categories each item is filed in, best fit first; `names` maps the
    /// user's category ids to names (the caller has listed them already).
    pub async fn item_category_names(
        &self,
        user: UserRef<'_>,
        items: &[Uuid],
        names: &HashMap<Uuid, String>,
    ) -> Result<HashMap<Uuid, Vec<String>>, ServiceError> {
        let mut by_item: HashMap<Uuid, Vec<String>> = HashMap::new();
        for (item, category) in self.store.item_categories(user, items).await? {
            if let Some(name) = names.get(&category) {
                by_item.entry(item).or_default().push(name.clone());
            }
        }
        Ok(by_item)
    }

    pub async fn list_items(
        &self,
        user: UserRef<'_>,
        filter: &ItemFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<MemoryItem>, ServiceError> {
        self.store
            .list_items(user, filter, limit, cursor)
            .await
            .map_err(|e| match e {
                StoreError::Invalid(message) => invalid("cursor", message),
                other => other.into(),
            })
    }

    pub async fn get_item(&self, user: UserRef<'_>, id: Uuid) -> Result<MemoryItem, ServiceError> {
        self.store
            .get_item(user, id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("memory item {id}")))
    }

    /// Writes an item by hand; with `categories`, files it into those of its scope.
    pub async fn create_item(
        &self,
        scope: Scope,
        memory_type: MemoryType,
        summary: String,
        happened_at: Option<DateTime<Utc>>,
        extra: serde_json::Value,
        categories: &[String],
    ) -> Result<MemoryItem, ServiceError> {
        let id = Uuid::now_v7();
        let links = match categories.is_empty() {
            true => Vec::new(),
            false => self.category_links(&scope, id, categories).await?,
        };
        let embedding = self.embed_one(&summary).await?;
        let now = Utc::now();
        let item = MemoryItem {
            id,
            tenant_id: scope.tenant_id,
            user_id: scope.user_id,
            agent_id: scope.agent_id,
            resource_id: None,
            memory_type,
            summary,
            happened_at,
            created_at: now,
            updated_at: now,
            extra,
        };
        self.store
            .insert_item(&NewItem {
                item: item.clone(),
                embedding,
            })
            .await?;
        if !links.is_empty() {
            self.store.file_item(item.user(), item.id, &links).await?;
        }
        self.metrics.memory_items_written.inc();
        self.invalidate(item.user()).await;
        Ok(item)
    }

    /// Changes an item; with `categories`, files it into exactly those (memU's
    /// `memory_categories`), checked before anything is written.
    pub async fn update_item(
        &self,
        user: UserRef<'_>,
        id: Uuid,
        mut patch: ItemPatch,
        categories: Option<&[String]>,
    ) -> Result<MemoryItem, ServiceError> {
        let links = match categories {
            Some(names) => {
                let item = self.get_item(user, id).await?;
                let scope = Scope::new(user, Some(item.agent_id));
                Some(self.category_links(&scope, id, names).await?)
            }
            None => None,
        };
        if let Some(summary) = &patch.summary {
            patch.embedding = Some(self.embed_one(summary).await?);
        }
        let item = self
            .store
            .update_item(user, id, &patch)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("memory item {id}")))?;
        if let Some(links) = links {
            self.store.file_item(user, id, &links).await?;
        }
        self.invalidate(user).await;
        Ok(item)
    }

    /// Links of an item to the scope's categories named (case-insensitively, as memU matches
    /// them); an unknown name is refused, naming it and the known ones.
    async fn category_links(
        &self,
        scope: &Scope,
        item_id: Uuid,
        names: &[String],
    ) -> Result<Vec<CategoryLink>, ServiceError> {
        let categories = self.ensure_categories(scope).await?;
        let mut links: Vec<CategoryLink> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let category = categories
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(name.trim()))
                .ok_or_else(|| {
                    let known: Vec<&str> = categories.iter().map(|c| c.name.as_str()).collect();
                    invalid(
                        format!("memory_categories[{i}]"),
                        format!(
                            "no category `{name}` for this user and agent; known: {}",
                            known.join(", ")
                        ),
                    )
                })?;
            if !links.iter().any(|l| l.category_id == category.id) {
                links.push(CategoryLink {
                    item_id,
                    category_id: category.id,
                    confidence: 1.0,
                });
            }
        }
        Ok(links)
    }

    pub async fn delete_item(&self, user: UserRef<'_>, id: Uuid) -> Result<(), ServiceError> {
        if self.store.delete_item(user, id).await? {
            self.invalidate(user).await;
            Ok(())
        } else {
            Err(ServiceError::NotFound(format!("memory item {id}")))
        }
    }

    pub async fn delete_user(
        &self,
        user: UserRef<'_>,
        agent_id: Option<&str>,
    ) -> Result<Erasure, ServiceError> {
        let deleted = self.store.delete_user(user, agent_id).await?;
        let mut audit_pseudonym = None;
        if agent_id.is_none() {
            // The audit trail stays countable, but no longer names the erased user.
            let pseudonym = crate::tenancy::erased_user_pseudonym(user.tenant_id, user.user_id);
            self.store.pseudonymise_audit(user, &pseudonym).await?;
            audit_pseudonym = Some(pseudonym);
        }
        self.invalidate(user).await;
        Ok(Erasure {
            deleted,
            audit_pseudonym,
        })
    }

    /// Everything stored about the user, audit entries included (GDPR access request).
    pub async fn export_user(&self, user: UserRef<'_>) -> Result<UserExport, ServiceError> {
        let mut export = self.store.export_user(user).await?;
        export.audit = self
            .store
            .list_audit(user.tenant_id, Some(user.user_id), None)
            .await?;
        Ok(export)
    }

    async fn embed_one(&self, text: &str) -> Result<Vec<f32>, ServiceError> {
        Ok(self
            .embedder
            .embed(&[text.to_string()])
            .await?
            .pop()
            .ok_or_else(|| ProviderError::Model("no embedding returned".into()))?)
    }
}

/// What erasing a user removed; the pseudonym now standing for them in the audit log (none when
/// only one agent's data was erased).
#[derive(Clone, Debug)]
pub struct Erasure {
    pub deleted: DeletedCounts,
    pub audit_pseudonym: Option<String>,
}

/// The PENDING memorize task of a new resource.
fn pending_task(resource: &Resource) -> Task {
    Task {
        id: Uuid::now_v7(),
        tenant_id: resource.tenant_id.clone(),
        user_id: resource.user_id.clone(),
        agent_id: resource.agent_id.clone(),
        resource_id: resource.id,
        status: TaskStatus::Pending,
        attempts: 0,
        error: None,
        created_at: resource.created_at,
        started_at: None,
        completed_at: None,
        // The job's spans continue the trace of the request that queued it.
        trace_parent: crate::telemetry::current_trace_parent(),
    }
}

/// SHA-256 of the canonical JSON (serde_json writes object keys in sorted order).
pub fn content_hash(content: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(content.to_string().as_bytes()))
}
