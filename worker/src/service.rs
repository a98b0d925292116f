//! Service layer: the memory operations the API exposes, independent of HTTP and of the store.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OnceCell};
use uuid::Uuid;

use memu_crds::worker::WorkerConfig;

use crate::metrics::{BackendLabels, Metrics};
use crate::model::{
    Category, DeletedCounts, ItemFilter, ItemPatch, MemoryItem, MemoryType, Message, Modality,
    NewItem, Page, Resource, Scope, ScoredItem, Task, TaskStatus, dot,
};
use crate::providers::{Embedder, ProviderError};
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
    pub user_name: Option<String>,
    pub agent_name: Option<String>,
    pub session_date: Option<DateTime<Utc>>,
    pub messages: Vec<Message>,
}

/// A validated retrieve request.
#[derive(Clone, Debug)]
pub struct RetrieveInput {
    pub user_id: String,
    pub agent_id: Option<String>,
    pub query: String,
    pub top_k: usize,
    pub filter: ItemFilter,
}

#[derive(Clone, Debug)]
pub struct ScoredCategory {
    pub category: Category,
    pub score: f32,
}

#[derive(Clone, Debug)]
pub struct RetrieveOutput {
    pub query: String,
    pub categories: Vec<ScoredCategory>,
    pub items: Vec<ScoredItem>,
    pub resources: Vec<Resource>,
}

/// Categories shown by retrieve at most.
const RETRIEVE_CATEGORIES: usize = 3;

pub struct MemoryService {
    pub config: Arc<WorkerConfig>,
    pub store: Arc<dyn MemoryStore>,
    pub embedder: Arc<dyn Embedder>,
    pub metrics: Arc<Metrics>,
    /// Wakes this process's pipeline as soon as a job is enqueued.
    pub new_work: Arc<Notify>,
    query_cache: Mutex<lru::LruCache<String, Arc<Vec<f32>>>>,
    category_spec_vectors: OnceCell<Vec<Vec<f32>>>,
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
            config,
            store,
            embedder,
            metrics,
            new_work: Arc::new(Notify::new()),
            query_cache: Mutex::new(lru::LruCache::new(cache)),
            category_spec_vectors: OnceCell::new(),
        }
    }

    /// Stores the conversation and queues it; the pipeline extracts memories from it.
    pub async fn memorize(&self, input: MemorizeInput) -> Result<Task, ServiceError> {
        let now = Utc::now();
        let content = serde_json::json!({
            "messages": input.messages,
            "user_name": input.user_name,
            "agent_name": input.agent_name,
            "session_date": input.session_date,
        });
        let resource = Resource {
            id: Uuid::now_v7(),
            user_id: input.scope.user_id.clone(),
            agent_id: input.scope.agent_id.clone(),
            modality: Modality::Conversation,
            content_hash: content_hash(&content["messages"]),
            content,
            caption: None,
            created_at: now,
        };
        let task = Task {
            id: Uuid::now_v7(),
            user_id: resource.user_id.clone(),
            agent_id: resource.agent_id.clone(),
            resource_id: resource.id,
            status: TaskStatus::Pending,
            attempts: 0,
            error: None,
            created_at: now,
            started_at: None,
            completed_at: None,
        };
        self.store
            .enqueue_memorize(&resource, &task, input.user_name.as_deref())
            .await?;
        self.new_work.notify_one();
        Ok(task)
    }

    pub async fn task(&self, id: Uuid) -> Result<Task, ServiceError> {
        self.store
            .get_task(id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("task {id}")))
    }

    /// Embeds a query, from the LRU cache when the same text was embedded before.
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
        let vector = Arc::new(
            self.embedder
                .embed(&[text.to_string()])
                .await?
                .pop()
                .ok_or_else(|| ProviderError::Model("no embedding returned".into()))?,
        );
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
        let query = self.embed_query(&input.query).await?;
        let started = Instant::now();
        let items = self
            .store
            .search_items(&input.user_id, &query, &input.filter, input.top_k)
            .await?;
        self.metrics
            .vector_search_duration
            .get_or_create(&BackendLabels {
                backend: self.store.backend().to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
        let scope = Scope::new(&input.user_id, input.agent_id.clone());
        let mut categories: Vec<ScoredCategory> = self
            .store
            .list_categories(&scope)
            .await?
            .into_iter()
            .filter(|c| !c.summary.is_empty() && c.embedding.len() == query.len())
            .map(|c| ScoredCategory {
                score: dot(&c.embedding, &query),
                category: c,
            })
            .collect();
        categories.sort_by(|a, b| b.score.total_cmp(&a.score));
        categories.truncate(RETRIEVE_CATEGORIES);
        let mut resource_ids: Vec<Uuid> = items.iter().filter_map(|i| i.item.resource_id).collect();
        resource_ids.sort();
        resource_ids.dedup();
        let resources = self
            .store
            .get_resources(&input.user_id, &resource_ids)
            .await?;
        Ok(RetrieveOutput {
            query: input.query,
            categories,
            items,
            resources,
        })
    }

    pub async fn categories(&self, scope: &Scope) -> Result<Vec<Category>, ServiceError> {
        Ok(self.store.list_categories(scope).await?)
    }

    pub async fn list_items(
        &self,
        user_id: &str,
        filter: &ItemFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<MemoryItem>, ServiceError> {
        self.store
            .list_items(user_id, filter, limit, cursor)
            .await
            .map_err(|e| match e {
                StoreError::Invalid(message) => invalid("cursor", message),
                other => other.into(),
            })
    }

    pub async fn get_item(&self, user_id: &str, id: Uuid) -> Result<MemoryItem, ServiceError> {
        self.store
            .get_item(user_id, id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("memory item {id}")))
    }

    pub async fn create_item(
        &self,
        scope: Scope,
        memory_type: MemoryType,
        summary: String,
        happened_at: Option<DateTime<Utc>>,
        extra: serde_json::Value,
    ) -> Result<MemoryItem, ServiceError> {
        let embedding = self.embed_one(&summary).await?;
        let now = Utc::now();
        let item = MemoryItem {
            id: Uuid::now_v7(),
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
        self.metrics.memory_items_written.inc();
        Ok(item)
    }

    pub async fn update_item(
        &self,
        user_id: &str,
        id: Uuid,
        mut patch: ItemPatch,
    ) -> Result<MemoryItem, ServiceError> {
        if let Some(summary) = &patch.summary {
            patch.embedding = Some(self.embed_one(summary).await?);
        }
        self.store
            .update_item(user_id, id, &patch)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("memory item {id}")))
    }

    pub async fn delete_item(&self, user_id: &str, id: Uuid) -> Result<(), ServiceError> {
        if self.store.delete_item(user_id, id).await? {
            Ok(())
        } else {
            Err(ServiceError::NotFound(format!("memory item {id}")))
        }
    }

    pub async fn delete_user(
        &self,
        user_id: &str,
        agent_id: Option<&str>,
    ) -> Result<DeletedCounts, ServiceError> {
        Ok(self.store.delete_user(user_id, agent_id).await?)
    }

    pub async fn export_user(&self, user_id: &str) -> Result<UserExport, ServiceError> {
        Ok(self.store.export_user(user_id).await?)
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

/// SHA-256 of the canonical JSON (serde_json writes object keys in sorted order).
pub fn content_hash(content: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(content.to_string().as_bytes()))
}
