//! Prometheus metrics of the worker. Names follow the seed's alert rules
//! (`http_requests_total`, `http_request_duration_seconds`) and `memu_*` for the rest.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::{PoolStats, QueueStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The matched route template (`/api/v3/memory/retrieve`), never the raw path.
    pub route: String,
    pub status: u16,
}

/// Cost per tenant: tenants are few (platform-managed), so the label stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantModelLabels {
    pub tenant: String,
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub provider: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelOutcomeLabels {
    pub provider: String,
    pub model: String,
    /// `ok` or an error class (`rate_limited`, `server_error`, `timeout`, `client_error`, ...).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    pub model: String,
    /// `prompt` or `completion`.
    pub kind: String,
}

/// One LLM step of the pipeline or of retrieve (`extract`, `resolve`, `categorize`, `route`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PromptLabels {
    pub provider: String,
    pub model: String,
    pub prompt: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    /// `in_use`, `idle` or `max`.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    pub db_pool: Family<PoolLabels, Gauge>,
    pub embedding_requests: Family<ModelOutcomeLabels, Counter>,
    pub embedding_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub embedding_texts: Family<ModelLabels, Counter>,
    pub embedding_tokens: Family<ModelLabels, Counter>,
    pub embedding_cache_hits: Counter,
    pub retrieve_cache_hits: Counter,
    /// Requests refused for a missing, malformed, unknown, revoked or expired key.
    pub auth_failures: Counter,
    /// Audit entries that could not be written.
    pub audit_failures: Counter,
    pub llm_requests: Family<ModelOutcomeLabels, Counter>,
    pub llm_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    pub llm_tokens: Family<TokenLabels, Counter>,
    pub llm_prompt_calls: Family<PromptLabels, Counter>,
    pub llm_cost: Family<TenantModelLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub llm_invalid_answers: Family<PromptLabels, Counter>,
    pub vector_search_duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    pub memorize_tasks: Family<StatusLabels, Counter>,
    pub memorize_duration: Histogram,
    pub memory_items_written: Counter,
    pub queue_depth: Family<StatusLabels, Gauge>,
    pub queue_oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration: Family<HttpLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let db_pool = Family::<PoolLabels, Gauge>::default();
        let embedding_requests = Family::<ModelOutcomeLabels, Counter>::default();
        let embedding_duration: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let embedding_texts = Family::<ModelLabels, Counter>::default();
        let embedding_tokens = Family::<ModelLabels, Counter>::default();
        let embedding_cache_hits = Counter::default();
        let retrieve_cache_hits = Counter::default();
        let auth_failures = Counter::default();
        registry.register(
            "memu_auth_failures",
            "API requests refused for want of a valid API key",
            auth_failures.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "memu_audit_write_failures",
            "Audit log entries that could not be written",
            audit_failures.clone(),
        );
        registry.register(
            "memu_retrieve_cache_hits",
            "Retrieve results served from the cache (Redis or in process)",
            retrieve_cache_hits.clone(),
        );
        let llm_requests = Family::<ModelOutcomeLabels, Counter>::default();
        let llm_duration: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let llm_tokens = Family::<TokenLabels, Counter>::default();
        let llm_prompt_calls = Family::<PromptLabels, Counter>::default();
        let llm_cost =
            Family::<TenantModelLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        let llm_invalid_answers = Family::<PromptLabels, Counter>::default();
        let vector_search_duration: Family<BackendLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        let memorize_tasks = Family::<StatusLabels, Counter>::default();
        let memorize_duration = latency_histogram();
        let memory_items_written = Counter::default();
        let queue_depth = Family::<StatusLabels, Gauge>::default();
        let queue_oldest_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "memu_queue_depth",
            "Memorize tasks waiting (PENDING) and running (PROCESSING), across all workers",
            queue_depth.clone(),
        );
        registry.register(
            "memu_queue_oldest_pending_age_seconds",
            "Age of the oldest PENDING memorize task",
            queue_oldest_age.clone(),
        );

        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route and status",
            http_duration.clone(),
        );
        registry.register(
            "memu_db_pool_connections",
            "Database pool connections by state (in_use, idle, max)",
            db_pool.clone(),
        );
        registry.register(
            "memu_embedding_requests",
            "Embedding requests by provider, model and outcome",
            embedding_requests.clone(),
        );
        registry.register(
            "memu_embedding_request_duration_seconds",
            "Embedding request latency",
            embedding_duration.clone(),
        );
        registry.register(
            "memu_embedding_texts",
            "Texts embedded",
            embedding_texts.clone(),
        );
        registry.register(
            "memu_embedding_tokens",
            "Tokens sent to embedding models",
            embedding_tokens.clone(),
        );
        registry.register(
            "memu_embedding_cache_hits",
            "Query embeddings served from the in-process cache",
            embedding_cache_hits.clone(),
        );
        registry.register(
            "memu_llm_requests",
            "Chat completion requests by provider, model and outcome",
            llm_requests.clone(),
        );
        registry.register(
            "memu_llm_request_duration_seconds",
            "Chat completion latency",
            llm_duration.clone(),
        );
        registry.register("memu_llm_tokens", "LLM tokens by kind", llm_tokens.clone());
        registry.register(
            "memu_llm_prompt_calls",
            "LLM calls by pipeline or retrieve step",
            llm_prompt_calls.clone(),
        );
        registry.register(
            "memu_llm_cost_usd",
            "Cost of LLM calls per tenant in US dollars, from llm.prices",
            llm_cost.clone(),
        );
        registry.register(
            "memu_llm_invalid_answers",
            "LLM answers that were not valid JSON for their step (before repair)",
            llm_invalid_answers.clone(),
        );
        registry.register(
            "memu_vector_search_duration_seconds",
            "Vector search latency inside the store",
            vector_search_duration.clone(),
        );
        registry.register(
            "memu_memorize_tasks",
            "Memorize jobs finished, by final status",
            memorize_tasks.clone(),
        );
        registry.register(
            "memu_memorize_duration_seconds",
            "Time to process one memorize job",
            memorize_duration.clone(),
        );
        registry.register(
            "memu_memory_items_written",
            "Memory items written by memorize and the item API",
            memory_items_written.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            http_requests,
            http_duration,
            db_pool,
            embedding_requests,
            embedding_duration,
            embedding_texts,
            embedding_tokens,
            embedding_cache_hits,
            retrieve_cache_hits,
            auth_failures,
            audit_failures,
            llm_requests,
            llm_duration,
            llm_tokens,
            llm_prompt_calls,
            llm_cost,
            llm_invalid_answers,
            vector_search_duration,
            memorize_tasks,
            memorize_duration,
            memory_items_written,
            queue_depth,
            queue_oldest_age,
        }
    }

    pub fn observe_http(&self, labels: HttpLabels, elapsed: Duration) {
        self.http_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.http_requests.get_or_create(&labels).inc();
    }

    pub fn set_pool_stats(&self, stats: &[PoolStats]) {
        for s in stats {
            for (state, value) in [("in_use", s.in_use), ("idle", s.idle), ("max", s.max)] {
                self.db_pool
                    .get_or_create(&PoolLabels {
                        pool: s.pool.to_string(),
                        state: state.to_string(),
                    })
                    .set(value as i64);
            }
        }
    }

    pub fn set_queue_stats(&self, queue: &QueueStats) {
        for (status, n) in [("PENDING", queue.pending), ("PROCESSING", queue.processing)] {
            self.queue_depth
                .get_or_create(&StatusLabels {
                    status: status.to_string(),
                })
                .set(n as i64);
        }
        self.queue_oldest_age.set(queue.oldest_pending_seconds);
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics registry poisoned");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
