//! The `MemUCluster` custom resource (`memu.dev/v1alpha1`): one memU service per object.
//!
//! The schema carries the validation the API server enforces (OpenAPI types plus CEL rules), so
//! a bad spec is rejected at `kubectl apply` time with a readable message; the tier fills in
//! defaults that every field can override.

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Sizing from the requirements: users, request rate and the resulting defaults.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// ≈1K users, 10–20 req/s: one replica, SQLite allowed.
    #[default]
    Small,
    /// ≈10K users, 100–200 req/s: Postgres, autoscaled api and pipeline.
    Medium,
    /// 100K+ users, 1000+ req/s: Citus, wide autoscaling.
    Large,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// Embedded SQLite on a volume: both roles in one StatefulSet replica.
    #[default]
    Sqlite,
    /// One Postgres primary.
    Single,
    /// A primary plus read replicas (retrieve reads from the replicas).
    Replicas,
    /// A Citus coordinator and workers, tables distributed by user_id.
    Citus,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Deleting the MemUCluster never deletes data or the database (default).
    #[default]
    Retain,
    /// Deleting the MemUCluster deletes its database objects and volumes too.
    Delete,
}

/// A key of a Secret in the MemUCluster's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Defaults from the tier: small → sqlite, medium → single, large → citus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// An existing database: Secret keys holding the DSNs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalDatabase>,
    /// A database the operator creates (CloudNativePG for single/replicas, StatefulSets for Citus).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedDatabase>,
    /// Volume size of the SQLite topology.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalDatabase {
    /// Secret key holding the primary DSN (postgres://...).
    pub primary: SecretKeyRef,
    /// Secret key holding a read-replica DSN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<SecretKeyRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedDatabase {
    /// Postgres instances (1 = primary only; topology replicas needs 2 or more).
    #[x_kube(validation = Rule::new("self >= 1 && self <= 9").message("instances must be between 1 and 9"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<i32>,
    /// Citus worker count (shards); the seed's default is 10.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 128").message("shards must be between 1 and 128"))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("shards cannot be decreased: a Citus worker holds data; drain it explicitly (citus_drain_node) before removing it"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Postgres image with pgvector (and Citus for that topology).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum VectorBackend {
    #[default]
    Pgvector,
    Embedded,
    Milvus,
}

pub use crate::worker::Quantization;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VectorSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<VectorBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimension: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hnsw_m: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hnsw_ef_construction: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hnsw_ef_search: Option<i32>,
    /// `int8` quantizes the search index (embedded store: int8 codes in memory with exact
    /// rescoring; pgvector: a `halfvec` HNSW index); the stored vectors stay exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub milvus: Option<MilvusSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MilvusSpec {
    pub endpoint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
}

/// A model provider for one pipeline role. Keys live in Secrets, never in the spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.apiKey)").message("inline API keys are not allowed: store the key in a Secret and reference it with apiKeySecret"))]
pub struct ProviderSpec {
    /// openai, grok, qwen, doubao, openrouter, voyage or local.
    pub provider: memu_provider::Preset,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Never set: present only so that an inline key is rejected with a clear message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

/// Re-exported preset names so the CRD schema lists them as an enum.
pub mod memu_provider {
    use serde::{Deserialize, Serialize};

    #[derive(
        Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
    )]
    #[serde(rename_all = "lowercase")]
    pub enum Preset {
        #[default]
        Openai,
        Grok,
        Qwen,
        Doubao,
        Openrouter,
        Voyage,
        Local,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extraction: Option<ProviderSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub categorization: Option<ProviderSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<ProviderSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<ProviderSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not exceed maxReplicas"))]
pub struct Autoscaling {
    #[x_kube(validation = Rule::new("self >= 1").message("minReplicas must be at least 1"))]
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// Average CPU utilisation the HPA aims for (the seed recommends 60–70).
    #[x_kube(validation = Rule::new("self >= 10 && self <= 95").message("targetCPUUtilizationPercentage must be between 10 and 95"))]
    #[serde(rename = "targetCPUUtilizationPercentage")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu_utilization_percentage: Option<i32>,
    /// Pipeline with KEDA installed: queued and running memorize jobs per replica that KEDA
    /// scales for (default 10).
    #[x_kube(validation = Rule::new("self >= 1").message("targetQueueDepth must be at least 1"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_queue_depth: Option<i32>,
}

/// One workload (api or pipeline).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("set either replicas or autoscaling, not both"))]
pub struct WorkloadSpec {
    #[x_kube(validation = Rule::new("self >= 0").message("replicas must not be negative"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// Desired state of a memU service.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "memu.dev",
    version = "v1alpha1",
    kind = "MemUCluster",
    plural = "memuclusters",
    shortname = "memu",
    namespaced,
    status = "MemUClusterStatus",
    derive = "PartialEq",
    doc = "A memU memory service: API and pipeline workloads, their database and model providers.",
    printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
    printcolumn = r#"{"name":"Topology","type":"string","jsonPath":".status.topology"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"API","type":"string","jsonPath":".status.api.summary","description":"ready/desired api replicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    scale(
        spec_replicas_path = ".spec.api.replicas",
        status_replicas_path = ".status.api.readyReplicas",
        label_selector_path = ".status.api.selector"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.database) && has(self.database.topology) ? self.database.topology : (self.tier == 'small' ? 'sqlite' : (self.tier == 'medium' ? 'single' : 'citus'))) != 'sqlite' || ((!has(self.api) || !has(self.api.autoscaling)) && (!has(self.pipeline) || !has(self.pipeline.autoscaling)))").message("topology sqlite runs a single replica: autoscaling needs a shared database (topology single, replicas or citus)"))]
#[x_kube(validation = Rule::new("(has(self.database) && has(self.database.topology) ? self.database.topology : (self.tier == 'small' ? 'sqlite' : (self.tier == 'medium' ? 'single' : 'citus'))) != 'citus' || (has(self.database) && (has(self.database.external) || (has(self.database.managed) && has(self.database.managed.shards))))").message("topology citus needs database.managed.shards (the seed's default is 10) or an external database"))]
#[x_kube(validation = Rule::new("!has(self.database) || !(has(self.database.external) && has(self.database.managed))").message("set either database.external or database.managed, not both"))]
pub struct MemUClusterSpec {
    pub tier: Tier,
    /// memu-worker image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub database: DatabaseSpec,
    #[serde(default)]
    pub vector: VectorSpec,
    #[serde(default)]
    pub llm: LlmSpec,
    #[serde(default)]
    pub api: WorkloadSpec,
    #[serde(default)]
    pub pipeline: WorkloadSpec,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Stop reconciling: children are left exactly as they are.
    #[serde(default)]
    pub paused: bool,
    /// Shared cache of the workers (large tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// HTTPS for the worker API: every pod serving the API mounts this certificate Secret and
    /// its API port (8080) speaks HTTPS only; health, readiness and metrics move to plain HTTP
    /// on port 9090. A renewed Secret is served without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// OpenTelemetry tracing of the workers (OTLP over HTTP); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
}

/// Where the workers export their traces: a memorize request is one trace from the API through
/// the queue to every LLM and embedding call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TracingSpec {
    /// OTLP/HTTP base URL of a collector, e.g. `http://otel-collector.observability:4318`.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("otlpEndpoint must be an http:// or https:// URL (OTLP over HTTP)"))]
    #[schemars(length(min = 8, max = 2048))]
    pub otlp_endpoint: String,
    /// Share of new traces sampled, 0–1 (default 1); a request arriving with a sampled
    /// `traceparent` is always traced.
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("sampleRatio must be between 0 and 1"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Option<f64>,
}

/// Redis shared by every worker: query embeddings, retrieve results (invalidated per user on
/// writes) and the per-tenant rate-limit buckets. Either an external Redis or one the operator
/// runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.redisUrlSecret) != has(self.managed)").message("cache needs exactly one of redisUrlSecret (an external Redis) or managed (a Redis the operator runs)"))]
pub struct CacheSpec {
    /// Secret key holding the URL of an external Redis (`redis://[:password@]host:port/db`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url_secret: Option<SecretKeyRef>,
    /// A single-replica Redis StatefulSet run by the operator, password-protected, without
    /// persistence (everything in it can be recomputed); `{}` takes the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedCacheSpec>,
}

/// The Redis the operator runs for a MemUCluster's cache.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedCacheSpec {
    /// Redis image (default `redis:7.4-alpine`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Memory Redis may use for data (`maxmemory`, least recently used keys are evicted beyond
    /// it), in MiB; the container's memory limit adds a quarter for Redis's own overhead.
    /// Default 512.
    #[x_kube(validation = Rule::new("self >= 32 && self <= 262144").message("maxMemoryMiB must be between 32 and 262144"))]
    #[serde(
        default,
        rename = "maxMemoryMiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_memory_mib: Option<u32>,
}

/// The certificate the workers serve their API with. The API port speaks HTTPS only; health,
/// readiness and metrics move to their own plain-HTTP port (9090). A renewed Secret is picked up
/// by the running pods (they re-read the files), without a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Name of a Secret of type `kubernetes.io/tls` in the MemUCluster's namespace (keys
    /// `tls.crt`, the PEM certificate chain, and `tls.key`, the PEM private key), e.g. one that
    /// cert-manager issues. The operator only mounts it by name and never reads it; until it
    /// exists the API pods wait in ContainerCreating.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Observed state, kstatus-compatible (Argo CD and Flux read `Ready`/`Reconciling`/`Stalled`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemUClusterStatus {
    /// Pending, Provisioning, Ready, Degraded, Failed or Paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<WorkloadStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<WorkloadStatus>,
    /// The effective database topology (the tier's default when the spec names none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    /// In-cluster URL of the API service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Managed Citus membership.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub citus: Option<CitusStatus>,
    /// Name of the Secret holding the bootstrap admin API key (key `api-key`); only the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_key_secret: Option<String>,
}

/// Workers registered in the coordinator's `pg_dist_node` against those the spec asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CitusStatus {
    pub registered_workers: i32,
    pub desired_workers: i32,
    /// Value of the `memu.dev/rebalance` annotation of the last rebalance started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rebalance: Option<String>,
}

/// Annotation requesting an explicit Citus shard rebalance: set it to a new value (e.g. a date)
/// to start one; adding workers never rebalances by itself.
pub const REBALANCE_ANNOTATION: &str = "memu.dev/rebalance";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    pub desired_replicas: i32,
    pub ready_replicas: i32,
    /// `ready/desired`, for the printer column.
    pub summary: String,
    /// Label selector of the pods, for the scale subresource.
    pub selector: String,
}

impl MemUClusterSpec {
    /// The database topology: as given, else the tier's.
    pub fn topology(&self) -> Topology {
        self.database.topology.unwrap_or(match self.tier {
            Tier::Small => Topology::Sqlite,
            Tier::Medium => Topology::Single,
            Tier::Large => Topology::Citus,
        })
    }
}
