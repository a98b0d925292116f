//! Configuration schema of `memu-worker`.
//!
//! One serde type with defaults: the worker loads it from YAML plus `MEMU_*` environment variables,
//! the operator renders it into a ConfigMap. Secrets are never part of it: API keys and DSN
//! passwords are referenced by environment variable or file, so the rendered ConfigMap holds none.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Top-level worker configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct WorkerConfig {
    /// Which parts of the worker run in this process.
    pub role: Role,
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub vector: VectorConfig,
    pub embedding: EmbeddingConfig,
    pub llm: LlmConfig,
    /// Named provider profiles; `embedding.provider` and `llm.*` refer to them by name.
    pub providers: BTreeMap<String, ProviderProfile>,
    pub memory: MemoryConfig,
    pub pipeline: PipelineConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub logging: LoggingConfig,
    pub tracing: TracingConfig,
}

/// How callers authenticate: `api_keys` (every API route needs `Authorization: Bearer`), or
/// `disabled` (every request acts as tenant `default` with all scopes; refused unless the API
/// listens on loopback only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    #[default]
    ApiKeys,
    Disabled,
}

/// API keys, and the limits that apply to tenants without their own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Environment variable holding an admin key (tenant `system`) that the worker installs on
    /// start; the operator fills it from the cluster's admin-key Secret.
    pub bootstrap_admin_key_env: String,
    /// File holding the bootstrap admin key, read when the variable is unset.
    pub bootstrap_admin_key_file: Option<PathBuf>,
    /// How long a verified key (and its tenant's limits) is trusted without a database read;
    /// a key revoked on another replica stops working within this time.
    pub key_cache_secs: u64,
    /// Requests per second per tenant (token bucket, burst of 2 s); 0 = unlimited.
    pub default_rate_limit_rps: f64,
    /// Memorize jobs per tenant per UTC day; 0 = unlimited.
    pub default_memorize_per_day: u64,
    /// LLM tokens per tenant per UTC day; 0 = unlimited.
    pub default_tokens_per_day: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::ApiKeys,
            bootstrap_admin_key_env: "MEMU_BOOTSTRAP_ADMIN_KEY".into(),
            bootstrap_admin_key_file: None,
            key_cache_secs: 5,
            default_rate_limit_rps: 0.0,
            default_memorize_per_day: 0,
            default_tokens_per_day: 0,
        }
    }
}

/// Shared cache (Redis) for query embeddings and retrieve results. Without Redis, query
/// embeddings are still cached per process; retrieve results only when
/// `local_retrieve_ttl_secs` is set (safe when one process makes every write).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Environment variable holding the Redis URL (`redis://[:password@]host:port/db`).
    pub redis_url_env: String,
    /// File holding the Redis URL (a mounted Secret), read when the variable is unset.
    pub redis_url_file: Option<PathBuf>,
    /// How long a retrieve result is served from Redis (writes of the user invalidate it).
    pub retrieve_ttl_secs: u64,
    /// How long query embeddings stay in Redis.
    pub embedding_ttl_secs: u64,
    /// Retrieve results cached in process when there is no Redis (0 = off).
    pub local_retrieve_ttl_secs: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            redis_url_env: "REDIS_URL".into(),
            redis_url_file: None,
            retrieve_ttl_secs: 60,
            embedding_ttl_secs: 86_400,
            local_retrieve_ttl_secs: 0,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let mut providers = BTreeMap::new();
        providers.insert(
            "local".to_string(),
            ProviderProfile {
                preset: ProviderPreset::Local,
                ..ProviderProfile::default()
            },
        );
        Self {
            role: Role::All,
            server: ServerConfig::default(),
            database: DatabaseConfig::default(),
            vector: VectorConfig::default(),
            embedding: EmbeddingConfig::default(),
            llm: LlmConfig::default(),
            providers,
            memory: MemoryConfig::default(),
            pipeline: PipelineConfig::default(),
            cache: CacheConfig::default(),
            auth: AuthConfig::default(),
            logging: LoggingConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

/// The roles one worker binary can play.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Query and ingest HTTP API only; memorize jobs are left for pipeline workers.
    Api,
    /// Memorize jobs only; serves health and metrics but not the memory API.
    Pipeline,
    /// Both, in one process (the embedded default).
    #[default]
    All,
}

impl Role {
    pub fn serves_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }
    pub fn runs_pipeline(self) -> bool {
        matches!(self, Role::Pipeline | Role::All)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Api => "api",
            Role::Pipeline => "pipeline",
            Role::All => "all",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the HTTP API (and of health and metrics unless `metrics_listen` is set).
    pub listen: String,
    /// Optional separate address for `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<String>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Requests running longer than this are answered 503.
    pub request_timeout_secs: u64,
    /// How long SIGTERM waits for in-flight requests and the current memorize job.
    pub shutdown_grace_secs: u64,
    /// Serve the API over HTTPS (health and metrics on `metrics_listen` stay plain HTTP).
    pub tls: Option<TlsConfig>,
}

/// A PEM certificate chain and private key (a mounted `kubernetes.io/tls` Secret), re-read
/// periodically so a renewed certificate is served without a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// How often the files are re-read (0 = never).
    #[serde(default = "default_tls_reload_secs")]
    pub reload_secs: u64,
}

fn default_tls_reload_secs() -> u64 {
    300
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            metrics_listen: None,
            max_body_bytes: 4 * 1024 * 1024,
            request_timeout_secs: 60,
            shutdown_grace_secs: 30,
            tls: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseBackend {
    /// Embedded SQLite file; vectors searched in process. Small tier.
    #[default]
    Sqlite,
    /// PostgreSQL with pgvector (single, with read replicas, or Citus).
    Postgres,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    pub backend: DatabaseBackend,
    /// SQLite database file, created on first run.
    pub sqlite_path: PathBuf,
    /// Name of the environment variable holding the primary Postgres DSN.
    pub url_env: String,
    /// File holding the primary Postgres DSN (a mounted Secret); read when the variable is unset.
    pub url_file: Option<PathBuf>,
    /// Environment variable holding an optional read-replica DSN used for retrieve and list.
    pub read_url_env: String,
    /// File holding the optional read-replica DSN.
    pub read_url_file: Option<PathBuf>,
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout_secs: u64,
    /// Apply migrations when `serve` starts. The operator turns it off and runs a migrations Job.
    pub auto_migrate: bool,
    /// Environment variable holding the DSN of the schema owner, used by migrations and the
    /// admin CLI; the primary DSN when unset. Serving as a role that does not own the tables
    /// is what makes Postgres row-level security bind the worker.
    pub migrate_url_env: String,
    /// File holding the owner DSN (a mounted Secret), read when the variable is unset.
    pub migrate_url_file: Option<PathBuf>,
    /// Role the worker serves as: `migrate` grants it exactly what the worker needs (no DDL, no
    /// deletes on the audit log). The role itself is created by the database administrator.
    pub app_role: Option<String>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            backend: DatabaseBackend::Sqlite,
            sqlite_path: PathBuf::from("data/memu.db"),
            url_env: "DATABASE_URL".into(),
            url_file: None,
            read_url_env: "DATABASE_READ_URL".into(),
            read_url_file: None,
            max_connections: 16,
            min_connections: 1,
            acquire_timeout_secs: 10,
            auto_migrate: true,
            migrate_url_env: "DATABASE_MIGRATE_URL".into(),
            migrate_url_file: None,
            app_role: None,
        }
    }
}

/// pgvector's iterative index scan modes (pgvector >= 0.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IterativeScan {
    Off,
    StrictOrder,
    #[default]
    RelaxedOrder,
}

impl IterativeScan {
    pub fn as_pg_setting(self) -> &'static str {
        match self {
            IterativeScan::Off => "off",
            IterativeScan::StrictOrder => "strict_order",
            IterativeScan::RelaxedOrder => "relaxed_order",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
/// How vectors are held in the search index: `none` (exact `f32`) or `int8` (int8 codes in the
/// embedded store's memory; a `halfvec` HNSW index in pgvector). Stored vectors stay exact.
pub enum Quantization {
    #[default]
    None,
    Int8,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VectorConfig {
    /// Embedding dimension; must match the embedding model and the database.
    pub dimension: usize,
    pub hnsw_m: u32,
    pub hnsw_ef_construction: u32,
    pub hnsw_ef_search: u32,
    /// Keep scanning the HNSW graph until enough rows pass the per-user filter.
    pub iterative_scan: IterativeScan,
    /// Upper bound of tuples an iterative scan visits (pgvector `hnsw.max_scan_tuples`).
    pub max_scan_tuples: u32,
    /// `int8`: the embedded store keeps int8 codes in memory (a quarter of the bytes) and
    /// rescores its best candidates exactly; pgvector, which has no int8 type, indexes
    /// `halfvec` instead (half the index). Stored vectors stay exact either way.
    pub quantization: Quantization,
}

impl Default for VectorConfig {
    fn default() -> Self {
        Self {
            dimension: 384,
            hnsw_m: 16,
            hnsw_ef_construction: 200,
            hnsw_ef_search: 100,
            iterative_scan: IterativeScan::RelaxedOrder,
            max_scan_tuples: 20_000,
            quantization: Quantization::None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// Name of the provider profile that computes embeddings.
    pub provider: String,
    /// Query embeddings kept in the in-process LRU cache.
    pub query_cache_size: usize,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            provider: "local".into(),
            query_cache_size: 10_000,
        }
    }
}

/// Chat-model profile per pipeline role. All unset = offline mode (no LLM, no key needed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Default profile for every role below that is unset.
    pub provider: Option<String>,
    pub extraction: Option<String>,
    pub categorization: Option<String>,
    pub retrieval: Option<String>,
    /// Profile that reads images (vision chat) and audio (transcription) into text for
    /// memorize; defaults to `llm.provider`.
    pub media: Option<String>,
    /// Price per million tokens by model name, for the cost log (models not listed cost 0).
    pub prices: BTreeMap<String, ModelPrice>,
}

/// What one million tokens of a model cost, in US dollars.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ModelPrice {
    pub prompt_per_million: f64,
    pub completion_per_million: f64,
}

impl ModelPrice {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.prompt_per_million
            + completion_tokens as f64 * self.completion_per_million)
            / 1_000_000.0
    }
}

/// How a provider is asked for JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StructuredOutput {
    /// `response_format: json_schema` (strict structured outputs).
    JsonSchema,
    /// `response_format: json_object`; the schema goes into the prompt.
    JsonObject,
    /// No `response_format` at all; the schema goes into the prompt.
    Prompt,
}

impl LlmConfig {
    pub fn is_offline(&self) -> bool {
        self.provider.is_none()
            && self.extraction.is_none()
            && self.categorization.is_none()
            && self.retrieval.is_none()
    }
}

/// Well-known providers; a preset fills in the base URL, default models and the key variable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderPreset {
    #[default]
    Openai,
    Grok,
    Qwen,
    Doubao,
    Openrouter,
    Voyage,
    /// A BERT-family model run in process with candle.
    Local,
}

/// Defaults a preset supplies when the profile leaves them unset.
pub struct PresetDefaults {
    pub base_url: &'static str,
    pub api_key_env: &'static str,
    pub chat_model: Option<&'static str>,
    pub embed_model: Option<&'static str>,
}

impl ProviderPreset {
    pub fn defaults(self) -> PresetDefaults {
        match self {
            ProviderPreset::Openai => PresetDefaults {
                base_url: "https://api.openai.com/v1",
                api_key_env: "OPENAI_API_KEY",
                chat_model: Some("gpt-4o-mini"),
                embed_model: Some("text-embedding-3-small"),
            },
            ProviderPreset::Grok => PresetDefaults {
                base_url: "https://api.x.ai/v1",
                api_key_env: "XAI_API_KEY",
                chat_model: Some("grok-3-mini"),
                embed_model: None,
            },
            ProviderPreset::Qwen => PresetDefaults {
                base_url: "https://dashscope.aliyuncs.com/compatible-mode/v1",
                api_key_env: "DASHSCOPE_API_KEY",
                chat_model: Some("qwen-plus"),
                embed_model: Some("text-embedding-v3"),
            },
            ProviderPreset::Doubao => PresetDefaults {
                base_url: "https://ark.cn-beijing.volces.com/api/v3",
                api_key_env: "ARK_API_KEY",
                // Ark addresses models by the endpoint id of the caller's deployment.
                chat_model: None,
                embed_model: None,
            },
            ProviderPreset::Openrouter => PresetDefaults {
                base_url: "https://openrouter.ai/api/v1",
                api_key_env: "OPENROUTER_API_KEY",
                chat_model: Some("openai/gpt-4o-mini"),
                embed_model: Some("openai/text-embedding-3-small"),
            },
            ProviderPreset::Voyage => PresetDefaults {
                base_url: "https://api.voyageai.com/v1",
                api_key_env: "VOYAGE_API_KEY",
                chat_model: None,
                embed_model: Some("voyage-3.5-lite"),
            },
            ProviderPreset::Local => PresetDefaults {
                base_url: "",
                api_key_env: "",
                chat_model: None,
                embed_model: None,
            },
        }
    }
}

/// One provider profile: where to send requests and with which models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderProfile {
    pub preset: ProviderPreset,
    /// Overrides the preset's base URL (OpenAI-compatible `/chat/completions`, `/embeddings`).
    pub base_url: Option<String>,
    /// Environment variable holding the API key (defaults to the preset's, e.g. OPENAI_API_KEY).
    pub api_key_env: Option<String>,
    /// File holding the API key (a mounted Secret); read when the variable is unset.
    pub api_key_file: Option<PathBuf>,
    pub chat_model: Option<String>,
    pub embed_model: Option<String>,
    /// Ask the embeddings endpoint for this many dimensions (text-embedding-3 supports it).
    pub embed_dimensions: Option<usize>,
    /// Texts per embeddings request.
    pub embed_batch_size: usize,
    pub timeout_secs: u64,
    /// Requests in flight to this provider from one process.
    pub max_concurrency: usize,
    /// Retries of 429, 5xx and timeouts, with exponential backoff and jitter.
    pub max_retries: u32,
    /// Local model directory holding `config.json`, `tokenizer.json`, `model.safetensors`.
    pub model_dir: Option<PathBuf>,
    /// Longest input, in tokens, of the local model; longer texts are truncated.
    pub max_input_tokens: usize,
    /// How JSON answers are requested (default from the preset; a provider that rejects
    /// `json_schema` is asked again with `json_object`).
    pub structured_output: Option<StructuredOutput>,
    /// The chat model accepts images (OpenAI-style `image_url` content parts).
    pub vision: Option<bool>,
    /// Model of the `/audio/transcriptions` endpoint (openai preset: whisper-1); an empty
    /// string turns audio off.
    pub transcription_model: Option<String>,
}

impl Default for ProviderProfile {
    fn default() -> Self {
        Self {
            preset: ProviderPreset::Openai,
            base_url: None,
            api_key_env: None,
            api_key_file: None,
            chat_model: None,
            embed_model: None,
            embed_dimensions: None,
            embed_batch_size: 64,
            timeout_secs: 60,
            max_concurrency: 8,
            max_retries: 3,
            model_dir: None,
            max_input_tokens: 256,
            structured_output: None,
            vision: None,
            transcription_model: None,
        }
    }
}

impl ProviderProfile {
    pub fn base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| self.preset.defaults().base_url.to_string())
            .trim_end_matches('/')
            .to_string()
    }
    pub fn api_key_env(&self) -> String {
        self.api_key_env
            .clone()
            .unwrap_or_else(|| self.preset.defaults().api_key_env.to_string())
    }
    pub fn chat_model(&self) -> Option<String> {
        self.chat_model
            .clone()
            .or_else(|| self.preset.defaults().chat_model.map(str::to_string))
    }
    /// Whether images can be sent (default: the presets whose default chat model has vision).
    pub fn vision(&self) -> bool {
        self.vision.unwrap_or(matches!(
            self.preset,
            ProviderPreset::Openai | ProviderPreset::Openrouter
        ))
    }
    pub fn transcription_model(&self) -> Option<String> {
        self.transcription_model
            .clone()
            .or_else(|| (self.preset == ProviderPreset::Openai).then(|| "whisper-1".to_string()))
            .filter(|m| !m.is_empty())
    }
    pub fn structured_output(&self) -> StructuredOutput {
        self.structured_output.unwrap_or(match self.preset {
            ProviderPreset::Openai | ProviderPreset::Grok | ProviderPreset::Openrouter => {
                StructuredOutput::JsonSchema
            }
            _ => StructuredOutput::JsonObject,
        })
    }
    pub fn embed_model(&self) -> Option<String> {
        self.embed_model
            .clone()
            .or_else(|| self.preset.defaults().embed_model.map(str::to_string))
    }
}

/// memU's six memory types.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MemoryType {
    Profile,
    Event,
    Knowledge,
    Behavior,
    Skill,
    Tool,
}

impl MemoryType {
    pub const ALL: [MemoryType; 6] = [
        MemoryType::Profile,
        MemoryType::Event,
        MemoryType::Knowledge,
        MemoryType::Behavior,
        MemoryType::Skill,
        MemoryType::Tool,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MemoryType::Profile => "profile",
            MemoryType::Event => "event",
            MemoryType::Knowledge => "knowledge",
            MemoryType::Behavior => "behavior",
            MemoryType::Skill => "skill",
            MemoryType::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for MemoryType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A category every user starts with; each user gets a private copy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    pub name: String,
    pub description: String,
}

fn category(name: &str, description: &str) -> CategorySpec {
    CategorySpec {
        name: name.into(),
        description: description.into(),
    }
}

/// memU's ten default categories (names from memU; descriptions are ours).
pub fn default_categories() -> Vec<CategorySpec> {
    vec![
        category(
            "personal_info",
            "Who the user is: name, age, home, family background, identity",
        ),
        category(
            "preferences",
            "What the user likes, dislikes and prefers: food, style, tools, media",
        ),
        category(
            "relationships",
            "People in the user's life: family, friends, partners, colleagues",
        ),
        category(
            "activities",
            "Things the user does: hobbies, sports, trips, recent events",
        ),
        category(
            "goals",
            "What the user wants to achieve: plans, ambitions, targets",
        ),
        category(
            "experiences",
            "Things that happened to the user and how they felt about them",
        ),
        category(
            "knowledge",
            "Facts, skills and subjects the user knows or is learning",
        ),
        category(
            "opinions",
            "The user's views, beliefs and judgements on topics",
        ),
        category(
            "habits",
            "The user's routines, recurring behaviour and daily patterns",
        ),
        category(
            "work_life",
            "The user's job, employer, projects, colleagues and career",
        ),
    ]
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Memory types extracted by memorize.
    pub memory_types: Vec<MemoryType>,
    /// Categories each user starts with.
    pub categories: Vec<CategorySpec>,
    /// Token budget of one conversation segment.
    pub segment_max_tokens: usize,
    /// Items with at least this cosine similarity to a category join it (the best one always does).
    pub category_min_similarity: f32,
    /// Items listed in an offline category summary.
    pub category_summary_items: usize,
    /// `top_k` of retrieve when the request leaves it out.
    pub default_top_k: usize,
    pub max_top_k: usize,
    /// Longest accepted `user_id` / `agent_id`.
    pub max_id_len: usize,
    /// Token budget of one segment sent to the extraction LLM (one call per segment).
    pub extraction_segment_max_tokens: usize,
    /// New items at least this similar to an existing item of the same type are checked by the
    /// LLM: duplicate, update or contradiction.
    pub dedupe_similarity: f32,
    /// Existing items compared with each new one.
    pub dedupe_candidates: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            memory_types: vec![
                MemoryType::Profile,
                MemoryType::Event,
                MemoryType::Knowledge,
            ],
            categories: default_categories(),
            segment_max_tokens: 200,
            category_min_similarity: 0.35,
            category_summary_items: 10,
            default_top_k: 5,
            max_top_k: 100,
            max_id_len: 256,
            extraction_segment_max_tokens: 3000,
            dedupe_similarity: 0.8,
            dedupe_candidates: 3,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Memorize jobs one pipeline process works on at once.
    pub concurrency: usize,
    /// How often an idle pipeline looks for new jobs (new jobs of this process wake it at once).
    pub poll_interval_ms: u64,
    /// A claimed job whose worker stops heartbeating is given to another worker after this.
    pub lease_secs: u64,
    /// Attempts before a job is marked FAILED.
    pub max_attempts: u32,
    /// Time budget of one attempt of a job, provider retries included.
    pub job_timeout_secs: u64,
    /// Wait before the first retry of a failed job; doubles per attempt, at most 5 minutes.
    pub retry_backoff_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            concurrency: 2,
            poll_interval_ms: 1000,
            lease_secs: 120,
            max_attempts: 3,
            job_timeout_secs: 600,
            retry_backoff_ms: 2000,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// `tracing` filter, e.g. `info,memu_worker=debug`.
    pub filter: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// OpenTelemetry tracing: off unless an OTLP endpoint is set. A memorize request is one trace
/// from the API through the queue and the pipeline's steps to every LLM and embedding call;
/// W3C `traceparent` is taken from requests and sent on provider calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP base URL of a collector, e.g. `http://otel-collector:4318` (spans go to
    /// `/v1/traces` below it, protobuf-encoded).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Share of new traces sampled (0–1); a request that arrives with a sampled
    /// `traceparent` is always traced.
    pub sample_ratio: f64,
    /// How often batched spans are exported.
    pub export_interval_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "memu-worker".into(),
            sample_ratio: 1.0,
            export_interval_ms: 5000,
        }
    }
}

/// A configuration error that names the offending key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at `{}`: {}",
            self.key, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl WorkerConfig {
    /// Checks what serde cannot: references between sections, ranges, addresses.
    pub fn validate(&self) -> Result<(), ConfigError> {
        parse_addr("server.listen", &self.server.listen)?;
        if let Some(endpoint) = &self.tracing.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "tracing.otlp_endpoint",
                "must be an http:// or https:// URL (OTLP over HTTP)",
            ));
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(invalid("tracing.sample_ratio", "must be between 0 and 1"));
        }
        if self.tracing.export_interval_ms == 0 {
            return Err(invalid("tracing.export_interval_ms", "must be at least 1"));
        }
        if let Some(addr) = &self.server.metrics_listen {
            parse_addr("server.metrics_listen", addr)?;
        }
        if self.server.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.database.min_connections > self.database.max_connections {
            return Err(invalid(
                "database.min_connections",
                "must not exceed database.max_connections",
            ));
        }
        if !(1..=16_000).contains(&self.vector.dimension) {
            return Err(invalid("vector.dimension", "must be between 1 and 16000"));
        }
        if !(2..=100).contains(&self.vector.hnsw_m) {
            return Err(invalid("vector.hnsw_m", "must be between 2 and 100"));
        }
        if self.vector.hnsw_ef_construction < 2 * self.vector.hnsw_m {
            return Err(invalid(
                "vector.hnsw_ef_construction",
                "must be at least twice vector.hnsw_m",
            ));
        }
        if !(1..=1000).contains(&self.vector.hnsw_ef_search) {
            return Err(invalid(
                "vector.hnsw_ef_search",
                "must be between 1 and 1000",
            ));
        }
        self.profile("embedding.provider", &self.embedding.provider)?;
        for (key, name) in [
            ("llm.provider", &self.llm.provider),
            ("llm.extraction", &self.llm.extraction),
            ("llm.categorization", &self.llm.categorization),
            ("llm.retrieval", &self.llm.retrieval),
            ("llm.media", &self.llm.media),
        ] {
            if let Some(name) = name {
                let profile = self.profile(key, name)?;
                if profile.preset == ProviderPreset::Local || profile.chat_model().is_none() {
                    return Err(invalid(
                        key,
                        format!("provider profile `{name}` has no chat model (set chat_model)"),
                    ));
                }
            }
        }
        for (name, profile) in &self.providers {
            let key = format!("providers.{name}");
            if profile.embed_batch_size == 0 {
                return Err(invalid(
                    format!("{key}.embed_batch_size"),
                    "must be at least 1",
                ));
            }
            if profile.max_concurrency == 0 {
                return Err(invalid(
                    format!("{key}.max_concurrency"),
                    "must be at least 1",
                ));
            }
            if let Some(url) = &profile.base_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(invalid(
                    format!("{key}.base_url"),
                    "must start with http:// or https://",
                ));
            }
        }
        if self.memory.memory_types.is_empty() {
            return Err(invalid(
                "memory.memory_types",
                "must name at least one type",
            ));
        }
        if self.memory.categories.is_empty() {
            return Err(invalid(
                "memory.categories",
                "must name at least one category",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.memory.categories.iter().enumerate() {
            if c.name.trim().is_empty() {
                return Err(invalid(
                    format!("memory.categories[{i}].name"),
                    "must not be empty",
                ));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(invalid(
                    format!("memory.categories[{i}].name"),
                    format!("duplicate category `{}`", c.name),
                ));
            }
        }
        if self.memory.segment_max_tokens < 16 {
            return Err(invalid("memory.segment_max_tokens", "must be at least 16"));
        }
        if self.memory.default_top_k == 0 || self.memory.default_top_k > self.memory.max_top_k {
            return Err(invalid(
                "memory.default_top_k",
                "must be between 1 and memory.max_top_k",
            ));
        }
        if self.pipeline.concurrency == 0 {
            return Err(invalid("pipeline.concurrency", "must be at least 1"));
        }
        if self.memory.extraction_segment_max_tokens < 64 {
            return Err(invalid(
                "memory.extraction_segment_max_tokens",
                "must be at least 64",
            ));
        }
        if !(0.0..=1.0).contains(&self.memory.dedupe_similarity) {
            return Err(invalid(
                "memory.dedupe_similarity",
                "must be between 0 and 1",
            ));
        }
        if self.pipeline.job_timeout_secs == 0 {
            return Err(invalid("pipeline.job_timeout_secs", "must be at least 1"));
        }
        for (model, price) in &self.llm.prices {
            if price.prompt_per_million < 0.0 || price.completion_per_million < 0.0 {
                return Err(invalid(
                    format!("llm.prices.{model}"),
                    "prices must not be negative",
                ));
            }
        }
        if self.pipeline.max_attempts == 0 {
            return Err(invalid("pipeline.max_attempts", "must be at least 1"));
        }
        Ok(())
    }

    fn profile(&self, key: &str, name: &str) -> Result<&ProviderProfile, ConfigError> {
        self.providers.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            invalid(
                key,
                format!(
                    "no provider profile named `{name}` (known: {})",
                    known.join(", ")
                ),
            )
        })
    }

    /// The profile used for embeddings (validated to exist).
    pub fn embedding_profile(&self) -> Result<&ProviderProfile, ConfigError> {
        self.profile("embedding.provider", &self.embedding.provider)
    }
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address like 127.0.0.1:8080"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_offline() {
        let config = WorkerConfig::default();
        config.validate().unwrap();
        assert!(config.llm.is_offline());
        assert_eq!(config.database.backend, DatabaseBackend::Sqlite);
        assert_eq!(config.memory.categories.len(), 10);
    }

    #[test]
    fn yaml_round_trip_keeps_every_field() {
        let config = WorkerConfig::default();
        let yaml = serde_norway::to_string(&config).unwrap();
        let back: WorkerConfig = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(config, back);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = serde_norway::from_str::<WorkerConfig>("server:\n  lisen: 1\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut config = WorkerConfig::default();
        config.llm.extraction = Some("missing".into());
        assert_eq!(config.validate().unwrap_err().key, "llm.extraction");

        let mut config = WorkerConfig::default();
        config.server.listen = "localhost".into();
        assert_eq!(config.validate().unwrap_err().key, "server.listen");

        let mut config = WorkerConfig::default();
        config
            .memory
            .categories
            .push(config.memory.categories[0].clone());
        assert_eq!(
            config.validate().unwrap_err().key,
            "memory.categories[10].name"
        );

        let mut config = WorkerConfig::default();
        config.llm.provider = Some("local".into());
        assert_eq!(config.validate().unwrap_err().key, "llm.provider");
    }

    #[test]
    fn presets_fill_in_defaults_and_overrides_win() {
        let mut profile = ProviderProfile {
            preset: ProviderPreset::Qwen,
            ..Default::default()
        };
        assert_eq!(profile.api_key_env(), "DASHSCOPE_API_KEY");
        assert_eq!(profile.chat_model().as_deref(), Some("qwen-plus"));
        profile.base_url = Some("http://127.0.0.1:9/v1/".into());
        profile.chat_model = Some("qwen-max".into());
        assert_eq!(profile.base_url(), "http://127.0.0.1:9/v1");
        assert_eq!(profile.chat_model().as_deref(), Some("qwen-max"));
    }
}
