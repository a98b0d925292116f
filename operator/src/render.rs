//! Desired state: pure functions from a MemUCluster (and what the cluster offers) to every child
//! object. No API calls here, so everything is unit-tested against the spec.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetSpec,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Secret, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use sha2::{Digest, Sha256};

use memu_crds::cluster::{
    DeletionPolicy, MemUCluster, MemUClusterStatus, ProviderSpec, SecretKeyRef, Tier, Topology,
    WorkloadSpec, memu_provider::Preset,
};
use memu_crds::worker::{
    DatabaseBackend, LogFormat, ProviderPreset, ProviderProfile, Role, TlsConfig, WorkerConfig,
};

use crate::admin_key;

mod cache;
pub use cache::{cache_name, cache_secret, managed_cache, redis_args};

/// Field manager of every server-side apply.
pub const MANAGER: &str = "memu-operator";
/// Label that ties a child to its MemUCluster (orphan cleanup lists by it).
pub const CLUSTER_LABEL: &str = "memu.dev/cluster";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const CONFIG_HASH: &str = "memu.dev/config-hash";
/// Pod label naming the database node a pod runs (selects a Citus node's pod).
pub const DATABASE_LABEL: &str = "memu.dev/database";
/// Pod label on every Citus node of a cluster (the headless service selects by it).
pub const CITUS_LABEL: &str = "memu.dev/citus";
/// Postgres with the Citus and pgvector extensions.
pub const DEFAULT_CITUS_IMAGE: &str = "ghcr.io/memu-k8s/citus-pgvector:12.1-pg15";
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/memu-k8s/memu-worker:", env!("CARGO_PKG_VERSION"));
const PORT: i32 = 8080;
/// Health, readiness and metrics when the API speaks HTTPS (`server.metrics_listen`, plain HTTP).
pub const METRICS_PORT: i32 = 9090;
/// Where the pods serving the API mount the `spec.tls` Secret. Beside the config directory, not
/// in it: a mount point inside the read-only config volume could not be created.
pub const TLS_DIR: &str = "/etc/memu-tls";
const TLS_VOLUME: &str = "tls";
/// How often the workers re-read the certificate files (the worker's default).
pub const TLS_RELOAD_SECS: u64 = 300;
const CONFIG_PATH: &str = "/etc/memu/worker.yaml";
const DATA_DIR: &str = "/var/lib/memu";
/// Where the worker image keeps its local embedding model.
const MODEL_DIR: &str = "/opt/memu/model";

/// What the cluster offers beyond core Kubernetes (found by discovery).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// CloudNativePG's `postgresql.cnpg.io/v1` Cluster CRD is installed.
    pub cnpg: bool,
    /// prometheus-operator's `monitoring.coreos.com/v1` ServiceMonitor CRD is installed.
    pub service_monitor: bool,
    /// KEDA's `keda.sh/v1alpha1` ScaledObject CRD is installed: the pipeline scales on the queue.
    pub keda: bool,
}

/// A spec the operator cannot realise, with the reason for the `Stalled` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct SpecError {
    pub reason: &'static str,
    pub message: String,
}

/// Every child object of one MemUCluster.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub service_account: Option<ServiceAccount>,
    pub config_map: Option<ConfigMap>,
    pub deployments: Vec<Deployment>,
    pub stateful_sets: Vec<StatefulSet>,
    pub services: Vec<Service>,
    pub hpas: Vec<HorizontalPodAutoscaler>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub jobs: Vec<Job>,
    /// CloudNativePG Cluster, ServiceMonitor.
    pub dynamic: Vec<(ApiResource, DynamicObject)>,
}

/// Sizing a tier gives a workload unless the spec says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierDefaults {
    pub replicas: i32,
    /// (min, max) of the HPA; `None` = fixed replicas.
    pub autoscaling: Option<(i32, i32)>,
    pub cpu_request: &'static str,
    pub memory_request: &'static str,
    pub cpu_limit: &'static str,
    pub memory_limit: &'static str,
}

/// The seed's tiers: small 2–4 vCPU / 4–8 GB in one process; medium 8–16 vCPU / 16–32 GB over
/// a few pods; large 64+ vCPU / 256+ GB.
pub fn tier_defaults(tier: Tier, role: Role) -> TierDefaults {
    match (tier, role) {
        (Tier::Small, _) => TierDefaults {
            replicas: 1,
            autoscaling: None,
            cpu_request: "1",
            memory_request: "2Gi",
            cpu_limit: "4",
            memory_limit: "8Gi",
        },
        (Tier::Medium, Role::Pipeline) => TierDefaults {
            replicas: 2,
            autoscaling: Some((1, 6)),
            cpu_request: "500m",
            memory_request: "1Gi",
            cpu_limit: "2",
            memory_limit: "2Gi",
        },
        (Tier::Medium, _) => TierDefaults {
            replicas: 3,
            autoscaling: Some((2, 10)),
            cpu_request: "500m",
            memory_request: "1Gi",
            cpu_limit: "2",
            memory_limit: "2Gi",
        },
        (Tier::Large, Role::Pipeline) => TierDefaults {
            replicas: 8,
            autoscaling: Some((4, 40)),
            cpu_request: "1",
            memory_request: "2Gi",
            cpu_limit: "4",
            memory_limit: "4Gi",
        },
        (Tier::Large, _) => TierDefaults {
            replicas: 12,
            autoscaling: Some((6, 60)),
            cpu_request: "1",
            memory_request: "2Gi",
            cpu_limit: "4",
            memory_limit: "4Gi",
        },
    }
}

/// Default HPA CPU target: the seed asks for 60–70 %.
pub const DEFAULT_CPU_TARGET: i32 = 65;

fn name(cluster: &MemUCluster) -> String {
    cluster.metadata.name.clone().unwrap_or_default()
}

pub fn labels(cluster: &MemUCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "memu".to_string()),
        ("app.kubernetes.io/instance".to_string(), name(cluster)),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
        (COMPONENT_LABEL.to_string(), component.to_string()),
        (CLUSTER_LABEL.to_string(), name(cluster)),
    ])
}

fn selector(cluster: &MemUCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CLUSTER_LABEL.to_string(), name(cluster)),
        (COMPONENT_LABEL.to_string(), component.to_string()),
    ])
}

/// The selector string of a component's pods (status and the scale subresource).
pub fn selector_string(cluster: &MemUCluster, component: &str) -> String {
    selector(cluster, component)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn owner(cluster: &MemUCluster) -> OwnerReference {
    cluster
        .controller_owner_ref(&())
        .expect("a stored MemUCluster has a name and uid")
}

fn meta(cluster: &MemUCluster, object_name: String, component: &str, owned: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(object_name),
        namespace: cluster.metadata.namespace.clone(),
        labels: Some(labels(cluster, component)),
        owner_references: owned.then(|| vec![owner(cluster)]),
        ..Default::default()
    }
}

/// The worker's own configuration type, rendered from the spec.
pub fn worker_config(cluster: &MemUCluster) -> Result<WorkerConfig, SpecError> {
    let spec = &cluster.spec;
    let mut config = WorkerConfig::default();
    config.server.listen = format!("0.0.0.0:{PORT}");
    if spec.tls.is_some() {
        // HTTPS on the API port only: probes and scrapes keep plain HTTP on a port of their own.
        config.server.metrics_listen = Some(format!("0.0.0.0:{METRICS_PORT}"));
        config.server.tls = Some(TlsConfig {
            cert_file: format!("{TLS_DIR}/tls.crt").into(),
            key_file: format!("{TLS_DIR}/tls.key").into(),
            reload_secs: TLS_RELOAD_SECS,
        });
    }
    config.logging.format = LogFormat::Json;
    if let Some(tracing) = &spec.tracing {
        config.tracing.otlp_endpoint = Some(tracing.otlp_endpoint.clone());
        config.tracing.service_name = format!("memu-worker.{}", name(cluster));
        if let Some(ratio) = tracing.sample_ratio {
            config.tracing.sample_ratio = ratio;
        }
    }
    match spec.topology() {
        Topology::Sqlite => {
            config.database.backend = DatabaseBackend::Sqlite;
            config.database.sqlite_path = format!("{DATA_DIR}/memu.db").into();
            config.database.auto_migrate = true;
        }
        _ => {
            config.database.backend = DatabaseBackend::Postgres;
            // The migrations Job applies the schema before new pods serve.
            config.database.auto_migrate = false;
            if uses_cnpg(cluster) {
                config.database.app_role = Some(APP_ROLE.into());
            }
        }
    }
    let local = config.providers.get_mut("local").expect("built-in profile");
    local.model_dir = Some(MODEL_DIR.into());
    let vector = &spec.vector;
    let embedding = spec.llm.embedding.as_ref();
    config.vector.dimension = match (vector.dimension, embedding) {
        (Some(d), _) => d as usize,
        (None, None)
        | (
            None,
            Some(ProviderSpec {
                provider: Preset::Local,
                ..
            }),
        ) => 384,
        (None, Some(p)) if p.provider == Preset::Voyage => 1024,
        (None, Some(_)) => 1536,
    };
    if let Some(m) = vector.hnsw_m {
        config.vector.hnsw_m = m as u32;
    }
    if let Some(ef) = vector.hnsw_ef_construction {
        config.vector.hnsw_ef_construction = ef as u32;
    }
    if let Some(ef) = vector.hnsw_ef_search {
        config.vector.hnsw_ef_search = ef as u32;
    }
    if let Some(quantization) = vector.quantization {
        config.vector.quantization = quantization;
    }
    let roles = [
        ("embedding", embedding),
        ("extraction", spec.llm.extraction.as_ref()),
        ("categorization", spec.llm.categorization.as_ref()),
        ("retrieval", spec.llm.retrieval.as_ref()),
    ];
    for (role, provider) in roles {
        let Some(p) = provider else { continue };
        let profile_name = if p.provider == Preset::Local {
            "local".to_string()
        } else {
            role.to_string()
        };
        if p.provider != Preset::Local {
            config.providers.insert(
                role.to_string(),
                ProviderProfile {
                    preset: preset(p.provider),
                    base_url: p.base_url.clone(),
                    // The key arrives as an environment variable from the referenced Secret.
                    api_key_env: Some(key_env(role)),
                    chat_model: (role != "embedding").then(|| p.model.clone()).flatten(),
                    embed_model: (role == "embedding").then(|| p.model.clone()).flatten(),
                    ..Default::default()
                },
            );
        }
        match role {
            "embedding" => config.embedding.provider = profile_name,
            "extraction" => config.llm.extraction = Some(profile_name),
            "categorization" => config.llm.categorization = Some(profile_name),
            _ => config.llm.retrieval = Some(profile_name),
        }
    }
    config.validate().map_err(|e| SpecError {
        reason: "InvalidWorkerConfig",
        message: e.to_string(),
    })?;
    Ok(config)
}

fn preset(p: Preset) -> ProviderPreset {
    match p {
        Preset::Openai => ProviderPreset::Openai,
        Preset::Grok => ProviderPreset::Grok,
        Preset::Qwen => ProviderPreset::Qwen,
        Preset::Doubao => ProviderPreset::Doubao,
        Preset::Openrouter => ProviderPreset::Openrouter,
        Preset::Voyage => ProviderPreset::Voyage,
        Preset::Local => ProviderPreset::Local,
    }
}

fn key_env(role: &str) -> String {
    format!("MEMU_{}_API_KEY", role.to_ascii_uppercase())
}

fn secret_env(name: &str, secret: &SecretKeyRef, optional: bool) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: optional.then_some(true),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Name of the CloudNativePG Cluster a managed database gets.
pub fn cnpg_name(cluster: &MemUCluster) -> String {
    format!("{}-db", name(cluster))
}

/// DB_USER, DB_PASSWORD and DB_NAME from a credentials Secret (CloudNativePG's or ours).
fn credential_env(secret: &str) -> Vec<EnvVar> {
    [
        ("DB_USER", "username"),
        ("DB_PASSWORD", "password"),
        ("DB_NAME", "dbname"),
    ]
    .into_iter()
    .map(|(var, key)| {
        secret_env(
            var,
            &SecretKeyRef {
                name: secret.into(),
                key: key.into(),
            },
            false,
        )
    })
    .collect()
}

/// A DSN assembled by Kubernetes from the credential variables (never rendered in clear).
fn dsn_env(var: &str, host: &str) -> EnvVar {
    EnvVar {
        name: var.into(),
        value: Some(format!(
            "postgres://$(DB_USER):$(DB_PASSWORD)@{host}:5432/$(DB_NAME)"
        )),
        ..Default::default()
    }
}

fn namespace(cluster: &MemUCluster) -> String {
    cluster
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

/// Names of the managed Citus objects: `<cluster>-citus-<part>`.
pub fn citus_name(cluster: &MemUCluster, part: &str) -> String {
    format!("{}-citus-{part}", name(cluster))
}

/// Citus workers of a managed Citus database (seed: 10).
pub fn citus_shards(cluster: &MemUCluster) -> i32 {
    cluster
        .spec
        .database
        .managed
        .as_ref()
        .and_then(|m| m.shards)
        .unwrap_or(10)
}

/// The workers the coordinator's `pg_dist_node` must list: pod 0 of each worker StatefulSet,
/// addressed through the headless service.
pub fn citus_workers(cluster: &MemUCluster) -> Vec<crate::citus::Node> {
    (0..citus_shards(cluster))
        .map(|i| crate::citus::Node {
            host: format!(
                "{}-0.{}.{}.svc",
                citus_name(cluster, &format!("worker-{i}")),
                citus_name(cluster, "nodes"),
                namespace(cluster)
            ),
            port: 5432,
        })
        .collect()
}

/// A generated database login: `username`, `password`, `dbname` and the whole `uri` (for
/// consumers that take one string, like KEDA's postgresql scaler). Created once by the
/// reconciler, never rewritten (that would lock the running workers out).
fn login_secret(
    cluster: &MemUCluster,
    secret: String,
    user: &str,
    host: &str,
    password: &str,
) -> Secret {
    Secret {
        metadata: meta(
            cluster,
            secret,
            "database",
            cluster.spec.deletion_policy == DeletionPolicy::Delete,
        ),
        string_data: Some(BTreeMap::from([
            ("username".into(), user.into()),
            ("password".into(), password.into()),
            ("dbname".into(), "memu".into()),
            (
                "uri".into(),
                format!("postgres://{user}:{password}@{host}:5432/memu"),
            ),
        ])),
        ..Default::default()
    }
}

/// The generated credentials of a managed Citus database.
pub fn citus_credentials(cluster: &MemUCluster, password: &str) -> Secret {
    let host = format!(
        "{}.{}.svc",
        citus_name(cluster, "coordinator"),
        namespace(cluster)
    );
    login_secret(
        cluster,
        citus_name(cluster, "credentials"),
        "memu",
        &host,
        password,
    )
}

/// The role the workers of a CloudNativePG database serve as: a plain LOGIN role (no
/// BYPASSRLS, not the tables' owner), so row-level security binds it. CloudNativePG creates it
/// from `managed.roles`; the migrations Job (as the owner) grants it what the worker needs.
pub const APP_ROLE: &str = "memu_app";

/// Name of the Secret holding the [`APP_ROLE`] login: `<cluster>-db-app-role`.
pub fn app_role_secret_name(cluster: &MemUCluster) -> String {
    format!("{}-app-role", cnpg_name(cluster))
}

/// Whether the workers connect to a CloudNativePG database the operator manages.
pub fn uses_cnpg(cluster: &MemUCluster) -> bool {
    let spec = &cluster.spec;
    spec.database.external.is_none()
        && !matches!(spec.topology(), Topology::Sqlite | Topology::Citus)
}

/// The generated login of [`APP_ROLE`], in the `kubernetes.io/basic-auth` shape CloudNativePG
/// reads a managed role's password from.
pub fn app_role_secret(cluster: &MemUCluster, password: &str) -> Secret {
    let host = format!("{}-rw.{}.svc", cnpg_name(cluster), namespace(cluster));
    let mut secret = login_secret(
        cluster,
        app_role_secret_name(cluster),
        APP_ROLE,
        &host,
        password,
    );
    secret.type_ = Some("kubernetes.io/basic-auth".into());
    // CloudNativePG re-reads the password when a labelled Secret changes (rotation).
    secret
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("cnpg.io/reload".into(), "true".into());
    secret
}

/// Name of the Secret holding the cluster's bootstrap admin API key: `<cluster>-admin-key`.
pub fn admin_key_name(cluster: &MemUCluster) -> String {
    format!("{}-admin-key", name(cluster))
}

/// The bootstrap admin API key Secret (see `admin_key.rs`); created once, never rewritten.
/// Owned by the MemUCluster whatever the deletion policy: a cluster created again under the same
/// name gets a new key with the same id, which replaces the old one in the database.
pub fn admin_key_secret(cluster: &MemUCluster, api_key: &str) -> Secret {
    Secret {
        metadata: meta(cluster, admin_key_name(cluster), "admin-key", true),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            admin_key::SECRET_KEY.to_string(),
            api_key.to_string(),
        )])),
        ..Default::default()
    }
}

/// `MEMU_BOOTSTRAP_ADMIN_KEY` from the admin-key Secret.
fn admin_key_env(cluster: &MemUCluster) -> EnvVar {
    secret_env(
        admin_key::ENV,
        &SecretKeyRef {
            name: admin_key_name(cluster),
            key: admin_key::SECRET_KEY.into(),
        },
        false,
    )
}

/// The status fields that follow from the spec alone: the effective topology, the API
/// endpoint and the admin-key Secret's name (only its name).
pub fn identify(cluster: &MemUCluster, status: &mut MemUClusterStatus) {
    status.topology = Some(cluster.spec.topology());
    let scheme = if cluster.spec.tls.is_some() {
        "https"
    } else {
        "http"
    };
    status.endpoint = Some(format!(
        "{scheme}://{}-api.{}.svc:{PORT}",
        name(cluster),
        namespace(cluster)
    ));
    status.admin_key_secret = Some(admin_key_name(cluster));
}

/// The `spec.tls` Secret the pods serving the API mount (by name only: never read).
pub fn tls_secret_name(cluster: &MemUCluster) -> Option<&str> {
    cluster.spec.tls.as_ref().map(|t| t.secret_name.as_str())
}

/// `Ready=False` reason and message while the `spec.tls` Secret does not exist (the pods that
/// mount it cannot start); `None` when there is no `spec.tls` or the Secret exists. The message
/// names the Secret only.
pub fn tls_secret_condition(cluster: &MemUCluster, exists: bool) -> Option<(&'static str, String)> {
    let secret = tls_secret_name(cluster).filter(|_| !exists)?;
    Some((
        "TlsSecretMissing",
        format!(
            "the Secret {secret} named by spec.tls.secretName does not exist in namespace {}: \
             the pods serving the API wait for it",
            namespace(cluster)
        ),
    ))
}

/// Pod-template annotation carrying the admin-key Secret's version, so that replacing the
/// Secret rolls the pods that read it.
pub const ADMIN_KEY_VERSION: &str = "memu.dev/admin-key-version";

/// A stored Secret's version: a digest of its uid and resourceVersion, never of its data. It
/// changes when the Secret is recreated or edited.
pub fn secret_version(secret: &Secret) -> String {
    hash(&format!(
        "{}/{}",
        secret.metadata.uid.as_deref().unwrap_or_default(),
        secret
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default()
    ))[..16]
        .to_string()
}

/// Stamps `version` (see [`secret_version`]) on every pod template whose containers read the
/// admin key (the worker Deployments, or the SQLite StatefulSet): a rotated key rolls them and
/// the new pods install it. The migrations Job and the database nodes do not read it.
pub fn stamp_admin_key_version(d: &mut Desired, version: &str) {
    let templates = d
        .deployments
        .iter_mut()
        .filter_map(|x| x.spec.as_mut().map(|s| &mut s.template))
        .chain(
            d.stateful_sets
                .iter_mut()
                .filter_map(|x| x.spec.as_mut().map(|s| &mut s.template)),
        );
    for template in templates {
        let reads_key = template.spec.as_ref().is_some_and(|pod| {
            pod.containers
                .iter()
                .flat_map(|c| c.env.iter().flatten())
                .any(|e| e.name == admin_key::ENV)
        });
        if reads_key {
            template
                .metadata
                .get_or_insert_with(Default::default)
                .annotations
                .get_or_insert_with(Default::default)
                .insert(ADMIN_KEY_VERSION.into(), version.into());
        }
    }
}

/// One Citus node (coordinator or worker): a single-replica StatefulSet with its own volume.
fn citus_node(cluster: &MemUCluster, part: &str, component: &str) -> StatefulSet {
    let managed = cluster.spec.database.managed.clone().unwrap_or_default();
    let mut pod_selector = selector(cluster, component);
    pod_selector.insert(DATABASE_LABEL.into(), citus_name(cluster, part));
    let mut pod_labels = labels(cluster, component);
    pod_labels.extend(pod_selector.clone());
    pod_labels.insert(CITUS_LABEL.into(), name(cluster));
    let owned = cluster.spec.deletion_policy == DeletionPolicy::Delete;
    let credentials = citus_name(cluster, "credentials");
    let env = [
        ("POSTGRES_USER", "username"),
        ("POSTGRES_PASSWORD", "password"),
        ("POSTGRES_DB", "dbname"),
    ]
    .into_iter()
    .map(|(var, key)| {
        secret_env(
            var,
            &SecretKeyRef {
                name: credentials.clone(),
                key: key.into(),
            },
            false,
        )
    })
    .chain([EnvVar {
        name: "PGDATA".into(),
        value: Some("/var/lib/postgresql/data/pgdata".into()),
        ..Default::default()
    }])
    .collect();
    let readiness = Probe {
        exec: Some(k8s_openapi::api::core::v1::ExecAction {
            command: Some(vec![
                "pg_isready".into(),
                "-U".into(),
                "memu".into(),
                "-d".into(),
                "memu".into(),
            ]),
        }),
        period_seconds: Some(10),
        ..Default::default()
    };
    StatefulSet {
        metadata: meta(cluster, citus_name(cluster, part), component, owned),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(citus_name(cluster, "nodes")),
            selector: LabelSelector {
                match_labels: Some(pod_selector),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "postgres".into(),
                        image: Some(
                            managed
                                .image
                                .clone()
                                .unwrap_or_else(|| DEFAULT_CITUS_IMAGE.into()),
                        ),
                        args: Some(vec![
                            "postgres".into(),
                            "-c".into(),
                            "shared_preload_libraries=citus".into(),
                        ]),
                        env: Some(env),
                        ports: Some(vec![ContainerPort {
                            name: Some("postgres".into()),
                            container_port: 5432,
                            ..Default::default()
                        }]),
                        readiness_probe: Some(readiness),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "data".into(),
                            mount_path: "/var/lib/postgresql/data".into(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    termination_grace_period_seconds: Some(60),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![data_claim(
                cluster,
                component,
                managed.storage_size.unwrap_or_else(|| "50Gi".into()),
                managed.storage_class_name,
            )]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `data` volume claim template of a StatefulSet.
fn data_claim(
    cluster: &MemUCluster,
    component: &str,
    size: String,
    storage_class_name: Option<String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels(cluster, component)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".into(), Quantity(size))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Service on 5432: headless over every Citus node (stable pod DNS names) or ClusterIP on the
/// coordinator (what the workers connect to).
fn citus_service(cluster: &MemUCluster, part: &str, headless: bool) -> Service {
    let selector = if headless {
        BTreeMap::from([(CITUS_LABEL.to_string(), name(cluster))])
    } else {
        BTreeMap::from([(
            DATABASE_LABEL.to_string(),
            citus_name(cluster, "coordinator"),
        )])
    };
    Service {
        metadata: meta(cluster, citus_name(cluster, part), "database", true),
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".into()),
            publish_not_ready_addresses: headless.then_some(true),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: 5432,
                target_port: Some(IntOrString::String("postgres".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Environment of every worker container: DSNs and API keys, all from Secrets.
fn worker_env(cluster: &MemUCluster) -> Vec<EnvVar> {
    let spec = &cluster.spec;
    let mut env = Vec::new();
    if spec.topology() != Topology::Sqlite {
        if let Some(external) = &spec.database.external {
            env.push(secret_env("DATABASE_URL", &external.primary, false));
            if let Some(read) = &external.read {
                env.push(secret_env("DATABASE_READ_URL", read, false));
            }
        } else if spec.topology() == Topology::Citus {
            env.extend(credential_env(&citus_name(cluster, "credentials")));
            env.push(dsn_env(
                "DATABASE_URL",
                &format!(
                    "{}.{}.svc",
                    citus_name(cluster, "coordinator"),
                    namespace(cluster)
                ),
            ));
        } else {
            // Serve as the RLS-bound app role, never as the database owner (`<db>-app`).
            env.extend(credential_env(&app_role_secret_name(cluster)));
            env.push(dsn_env(
                "DATABASE_URL",
                &format!("{}-rw.{}.svc", cnpg_name(cluster), namespace(cluster)),
            ));
            if spec.topology() == Topology::Replicas {
                env.push(dsn_env(
                    "DATABASE_READ_URL",
                    &format!("{}-ro.{}.svc", cnpg_name(cluster), namespace(cluster)),
                ));
            }
        }
    }
    if let Some(url) = cache::redis_url_secret(cluster) {
        // The worker reads REDIS_URL (cache.redis_url_env); the URL may carry a password.
        env.push(secret_env("REDIS_URL", &url, false));
    }
    for (role, provider) in [
        ("embedding", &spec.llm.embedding),
        ("extraction", &spec.llm.extraction),
        ("categorization", &spec.llm.categorization),
        ("retrieval", &spec.llm.retrieval),
    ] {
        if let Some(ProviderSpec {
            api_key_secret: Some(secret),
            ..
        }) = provider
        {
            env.push(secret_env(&key_env(role), secret, false));
        }
    }
    env
}

fn resources(tier: Tier, role: Role, spec: &WorkloadSpec) -> ResourceRequirements {
    if let Some(r) = &spec.resources {
        return r.clone();
    }
    let d = tier_defaults(tier, role);
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), q(d.cpu_request)),
            ("memory".into(), q(d.memory_request)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".into(), q(d.cpu_limit)),
            ("memory".into(), q(d.memory_limit)),
        ])),
        ..Default::default()
    }
}

/// The port serving health, readiness and metrics over plain HTTP, by name and number: the API
/// port (`http`), or with `spec.tls` the separate `metrics` port.
pub fn ops_port(cluster: &MemUCluster) -> (&'static str, i32) {
    if cluster.spec.tls.is_some() {
        ("metrics", METRICS_PORT)
    } else {
        ("http", PORT)
    }
}

/// Name of the API port: `https` with `spec.tls`, else `http`.
fn api_port_name(cluster: &MemUCluster) -> &'static str {
    if cluster.spec.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// The API Service's ports: the API, plus the plain-HTTP metrics port when the API is HTTPS
/// (the ServiceMonitor scrapes it by name).
fn api_service_ports(cluster: &MemUCluster) -> Vec<ServicePort> {
    let api = api_port_name(cluster);
    let mut ports = vec![ServicePort {
        name: Some(api.into()),
        port: PORT,
        target_port: Some(IntOrString::String(api.into())),
        app_protocol: cluster.spec.tls.is_some().then(|| "https".into()),
        ..Default::default()
    }];
    if cluster.spec.tls.is_some() {
        ports.push(ServicePort {
            name: Some("metrics".into()),
            port: METRICS_PORT,
            target_port: Some(IntOrString::String("metrics".into())),
            app_protocol: Some("http".into()),
            ..Default::default()
        });
    }
    ports
}

/// The `spec.tls` Secret as a volume: only the two files the worker reads (a Secret without one
/// of the keys fails the mount with an event naming it), readable by the worker's group only.
/// No subPath anywhere, so the kubelet updates the files in place when the Secret is renewed.
fn tls_volume(secret_name: &str) -> Volume {
    Volume {
        name: TLS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            items: Some(
                ["tls.crt", "tls.key"]
                    .into_iter()
                    .map(|key| KeyToPath {
                        key: key.into(),
                        path: key.into(),
                        mode: None,
                    })
                    .collect(),
            ),
            default_mode: Some(0o440),
            optional: None,
        }),
        ..Default::default()
    }
}

fn probe(path: &str, port: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn image(cluster: &MemUCluster) -> String {
    cluster
        .spec
        .image
        .clone()
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string())
}

fn container(
    cluster: &MemUCluster,
    role: Role,
    args: Vec<String>,
    workload: &WorkloadSpec,
) -> Container {
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: "/etc/memu".into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    if cluster.spec.topology() == Topology::Sqlite {
        mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..Default::default()
        });
    }
    let serving = args.first().is_some_and(|a| a == "serve");
    let tls = cluster.spec.tls.is_some();
    // Pipeline-only workers serve no API: they need no certificate.
    let serves_api = serving && role.serves_api();
    if serves_api && tls {
        mounts.push(VolumeMount {
            name: TLS_VOLUME.into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let (ops_name, ops_number) = ops_port(cluster);
    Container {
        name: "worker".into(),
        image: Some(image(cluster)),
        image_pull_policy: cluster.spec.image_pull_policy.clone(),
        args: Some(args),
        env: Some(
            [EnvVar {
                name: "MEMU_CONFIG".into(),
                value: Some(CONFIG_PATH.into()),
                ..Default::default()
            }]
            .into_iter()
            .chain(worker_env(cluster))
            // Serving workers install the bootstrap admin key on start; migrations need none.
            .chain(serving.then(|| admin_key_env(cluster)))
            // `server.tls` of the shared configuration applies only where the worker serves
            // the API: pipeline-only workers need no certificate mounted.
            .collect(),
        ),
        ports: serving.then(|| {
            let api = (serves_api || !tls).then(|| ContainerPort {
                name: Some(api_port_name(cluster).into()),
                container_port: PORT,
                ..Default::default()
            });
            let ops = tls.then(|| ContainerPort {
                name: Some(ops_name.into()),
                container_port: ops_number,
                ..Default::default()
            });
            api.into_iter().chain(ops).collect()
        }),
        // Probes speak plain HTTP: to the API port, or with TLS to the metrics port.
        readiness_probe: serving.then(|| probe("/readyz", ops_number)),
        liveness_probe: serving.then(|| probe("/healthz", ops_number)),
        resources: Some(resources(cluster.spec.tier, role, workload)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

fn pod_template(
    cluster: &MemUCluster,
    component: &str,
    role: Role,
    workload: &WorkloadSpec,
    config_hash: &str,
) -> PodTemplateSpec {
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: format!("{}-config", name(cluster)),
            ..Default::default()
        }),
        ..Default::default()
    }];
    // The root filesystem is read-only: scratch space (SQLite temp files among others) is here.
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    });
    let worker = container(
        cluster,
        role,
        vec!["serve".into(), "--role".into(), role.to_string()],
        workload,
    );
    // The certificate volume exactly where the container mounts it (the API-serving roles).
    if let Some(tls) = &cluster.spec.tls
        && worker
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == TLS_VOLUME)
    {
        volumes.push(tls_volume(&tls.secret_name));
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(cluster, component)),
            // A new configuration rolls the pods.
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH.to_string(),
                config_hash.to_string(),
            )])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(format!("{}-worker", name(cluster))),
            automount_service_account_token: Some(false),
            containers: vec![worker],
            volumes: Some(volumes),
            node_selector: workload.node_selector.clone(),
            tolerations: workload.tolerations.clone(),
            affinity: workload.affinity.clone(),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                fs_group: Some(65532),
                ..Default::default()
            }),
            termination_grace_period_seconds: Some(45),
            ..Default::default()
        }),
    }
}

/// Replicas of a workload, `None` when an HPA owns the count (so operator and HPA never fight).
pub fn replicas(tier: Tier, role: Role, workload: &WorkloadSpec) -> Option<i32> {
    if autoscaling(tier, role, workload).is_some() {
        return None;
    }
    Some(
        workload
            .replicas
            .unwrap_or(tier_defaults(tier, role).replicas),
    )
}

/// Queued and running jobs per pipeline replica that KEDA aims for.
pub const DEFAULT_QUEUE_TARGET: i32 = 10;

/// The Secret key holding the primary DSN, for KEDA's postgresql scaler.
fn primary_dsn_secret(cluster: &MemUCluster) -> Option<SecretKeyRef> {
    let spec = &cluster.spec;
    match (spec.topology(), &spec.database.external) {
        (Topology::Sqlite, _) => None,
        (_, Some(external)) => Some(external.primary.clone()),
        (Topology::Citus, None) => Some(SecretKeyRef {
            name: citus_name(cluster, "credentials"),
            key: "uri".into(),
        }),
        // The app role: the queue figures come from a SECURITY DEFINER function.
        (_, None) => Some(SecretKeyRef {
            name: app_role_secret_name(cluster),
            key: "uri".into(),
        }),
    }
}

/// A KEDA ScaledObject on the memorize queue depth (postgresql trigger; CPU too) and the
/// TriggerAuthentication that hands it the DSN from its Secret.
fn queue_scaler(
    cluster: &MemUCluster,
    component: &str,
    (min, max, cpu): (i32, i32, i32),
    target: i32,
    dsn: &SecretKeyRef,
) -> Vec<(ApiResource, DynamicObject)> {
    let n = name(cluster);
    let target_name = format!("{n}-{component}");
    let auth_ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "keda.sh",
        "v1alpha1",
        "TriggerAuthentication",
    ));
    let mut auth = DynamicObject::new(&format!("{target_name}-queue"), &auth_ar).data(json!({
        "spec": {"secretTargetRef": [{"parameter": "connection", "name": dsn.name, "key": dsn.key}]}
    }));
    auth.metadata = meta(cluster, format!("{target_name}-queue"), component, true);
    let scaled_ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "keda.sh",
        "v1alpha1",
        "ScaledObject",
    ));
    let mut scaled = DynamicObject::new(&target_name, &scaled_ar).data(json!({
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target_name},
            "minReplicaCount": min,
            "maxReplicaCount": max,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "postgresql",
                    "metadata": {
                        // Through the SECURITY DEFINER function: row-level security hides the tasks
                        // from a role without a tenant setting.
                        "query": "SELECT pending + processing FROM memu_queue_stats()",
                        "targetQueryValue": target.to_string(),
                        "activationTargetQueryValue": "0",
                    },
                    "authenticationRef": {"name": format!("{target_name}-queue")},
                },
                {"type": "cpu", "metricType": "Utilization", "metadata": {"value": cpu.to_string()}},
            ],
        }
    }));
    scaled.metadata = meta(cluster, target_name, component, true);
    vec![(auth_ar, auth), (scaled_ar, scaled)]
}

/// (min, max, cpu target) when the workload autoscales.
pub fn autoscaling(tier: Tier, role: Role, workload: &WorkloadSpec) -> Option<(i32, i32, i32)> {
    match (&workload.autoscaling, workload.replicas) {
        (Some(a), _) => Some((
            a.min_replicas,
            a.max_replicas,
            a.target_cpu_utilization_percentage
                .unwrap_or(DEFAULT_CPU_TARGET),
        )),
        (None, Some(_)) => None,
        (None, None) => tier_defaults(tier, role)
            .autoscaling
            .map(|(min, max)| (min, max, DEFAULT_CPU_TARGET)),
    }
}

fn hash(data: &str) -> String {
    hex::encode(Sha256::digest(data.as_bytes()))
}

/// Builds every child of the cluster.
pub fn desired(cluster: &MemUCluster, caps: Capabilities) -> Result<Desired, SpecError> {
    let spec = &cluster.spec;
    let n = name(cluster);
    let topology = spec.topology();
    if matches!(topology, Topology::Single | Topology::Replicas)
        && spec.database.external.is_none()
        && !caps.cnpg
    {
        return Err(SpecError {
            reason: "CloudNativePGMissing",
            message: "a managed database needs the CloudNativePG operator (postgresql.cnpg.io/v1 Cluster CRD); \
                      install it or set database.external"
                .into(),
        });
    }
    let config = worker_config(cluster)?;
    let config_yaml = serde_norway::to_string(&config).expect("config serialises");
    // The hash covers what pods read: configuration, image and the secret references.
    let config_hash = hash(&format!(
        "{config_yaml}{}{:?}",
        image(cluster),
        worker_env(cluster)
    ));
    let mut out = Desired {
        service_account: Some(ServiceAccount {
            metadata: meta(cluster, format!("{n}-worker"), "worker", true),
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        config_map: Some(ConfigMap {
            metadata: meta(cluster, format!("{n}-config"), "worker", true),
            data: Some(BTreeMap::from([("worker.yaml".to_string(), config_yaml)])),
            ..Default::default()
        }),
        ..Default::default()
    };

    let api_component = if topology == Topology::Sqlite {
        "worker"
    } else {
        "api"
    };
    out.services.push(Service {
        metadata: meta(cluster, format!("{n}-api"), api_component, true),
        spec: Some(ServiceSpec {
            selector: Some(selector(cluster, api_component)),
            ports: Some(api_service_ports(cluster)),
            ..Default::default()
        }),
        ..Default::default()
    });

    if topology == Topology::Sqlite {
        // Both roles in one replica that owns the SQLite volume.
        let workload = &spec.api;
        let storage = spec
            .database
            .storage_size
            .clone()
            .unwrap_or_else(|| "10Gi".into());
        out.stateful_sets.push(StatefulSet {
            metadata: meta(cluster, format!("{n}-worker"), "worker", true),
            spec: Some(StatefulSetSpec {
                replicas: Some(workload.replicas.unwrap_or(1).min(1)),
                service_name: Some(format!("{n}-api")),
                selector: LabelSelector {
                    match_labels: Some(selector(cluster, "worker")),
                    ..Default::default()
                },
                template: pod_template(cluster, "worker", Role::All, workload, &config_hash),
                volume_claim_templates: Some(vec![data_claim(
                    cluster,
                    "worker",
                    storage,
                    spec.database.storage_class_name.clone(),
                )]),
                ..Default::default()
            }),
            ..Default::default()
        });
    } else {
        for (component, role, workload) in [
            ("api", Role::Api, &spec.api),
            ("pipeline", Role::Pipeline, &spec.pipeline),
        ] {
            out.deployments.push(Deployment {
                metadata: meta(cluster, format!("{n}-{component}"), component, true),
                spec: Some(DeploymentSpec {
                    replicas: replicas(spec.tier, role, workload),
                    selector: LabelSelector {
                        match_labels: Some(selector(cluster, component)),
                        ..Default::default()
                    },
                    template: pod_template(cluster, component, role, workload, &config_hash),
                    strategy: Some(DeploymentStrategy {
                        type_: Some("RollingUpdate".into()),
                        rolling_update: Some(RollingUpdateDeployment {
                            max_unavailable: Some(IntOrString::Int(0)),
                            max_surge: Some(IntOrString::String("25%".into())),
                        }),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            let queue_scaled = caps.keda && role == Role::Pipeline;
            if let Some((min, max, cpu)) = autoscaling(spec.tier, role, workload)
                && queue_scaled
                && let Some(dsn) = primary_dsn_secret(cluster)
            {
                // KEDA owns the pipeline's HPA: scale on the memorize queue, CPU as a floor.
                let target = workload
                    .autoscaling
                    .as_ref()
                    .and_then(|a| a.target_queue_depth)
                    .unwrap_or(DEFAULT_QUEUE_TARGET);
                out.dynamic.extend(queue_scaler(
                    cluster,
                    component,
                    (min, max, cpu),
                    target,
                    &dsn,
                ));
            } else if let Some((min, max, cpu)) = autoscaling(spec.tier, role, workload) {
                out.hpas.push(HorizontalPodAutoscaler {
                    metadata: meta(cluster, format!("{n}-{component}"), component, true),
                    spec: Some(HorizontalPodAutoscalerSpec {
                        scale_target_ref: CrossVersionObjectReference {
                            api_version: Some("apps/v1".into()),
                            kind: "Deployment".into(),
                            name: format!("{n}-{component}"),
                        },
                        min_replicas: Some(min),
                        max_replicas: max,
                        metrics: Some(vec![MetricSpec {
                            type_: "Resource".into(),
                            resource: Some(ResourceMetricSource {
                                name: "cpu".into(),
                                target: MetricTarget {
                                    type_: "Utilization".into(),
                                    average_utilization: Some(cpu),
                                    ..Default::default()
                                },
                            }),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            out.pdbs.push(PodDisruptionBudget {
                metadata: meta(cluster, format!("{n}-{component}"), component, true),
                spec: Some(PodDisruptionBudgetSpec {
                    max_unavailable: Some(IntOrString::Int(1)),
                    selector: Some(LabelSelector {
                        match_labels: Some(selector(cluster, component)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        // Schema migrations run once per worker version and configuration.
        // Rendered as a pipeline pod (no API, so no certificate volume), then given its command.
        let mut template = pod_template(
            cluster,
            "migrate",
            Role::Pipeline,
            &spec.pipeline,
            &config_hash,
        );
        if let Some(pod) = template.spec.as_mut() {
            pod.restart_policy = Some("OnFailure".into());
            // On Citus the same Job then distributes the tables by user_id (after migrating).
            let args = if topology == Topology::Citus {
                vec!["migrate".into(), "--distribute".into()]
            } else {
                vec!["migrate".into()]
            };
            let mut migrate = container(cluster, Role::Pipeline, args, &spec.pipeline);
            if uses_cnpg(cluster) {
                // Only this Job gets the owner's login: it migrates and grants the app role.
                migrate.env.get_or_insert_with(Vec::new).push(secret_env(
                    "DATABASE_MIGRATE_URL",
                    &SecretKeyRef {
                        name: format!("{}-app", cnpg_name(cluster)),
                        key: "uri".into(),
                    },
                    false,
                ));
            }
            pod.containers = vec![migrate];
        }
        out.jobs.push(Job {
            metadata: meta(
                cluster,
                format!("{n}-migrate-{}", &config_hash[..10]),
                "migrate",
                true,
            ),
            spec: Some(JobSpec {
                backoff_limit: Some(6),
                ttl_seconds_after_finished: Some(86_400),
                template,
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    // Managed Citus: a coordinator and N workers, each a one-pod StatefulSet with its own volume;
    // membership in pg_dist_node is converged by the reconciler (see citus.rs).
    if topology == Topology::Citus && spec.database.external.is_none() {
        out.services.push(citus_service(cluster, "nodes", true));
        out.services
            .push(citus_service(cluster, "coordinator", false));
        out.stateful_sets
            .push(citus_node(cluster, "coordinator", "citus-coordinator"));
        for i in 0..citus_shards(cluster) {
            out.stateful_sets
                .push(citus_node(cluster, &format!("worker-{i}"), "citus-worker"));
        }
    }

    if let Some(managed) = cache::managed_cache(cluster) {
        out.services.push(cache::cache_service(cluster));
        out.stateful_sets
            .push(cache::cache_stateful_set(cluster, managed));
    }

    // Managed Postgres: a CloudNativePG Cluster with pgvector. With deletionPolicy Retain it has
    // no owner reference, so deleting the MemUCluster never deletes the database.
    if matches!(topology, Topology::Single | Topology::Replicas) && spec.database.external.is_none()
    {
        let managed = spec.database.managed.clone().unwrap_or_default();
        let instances = managed
            .instances
            .unwrap_or(if topology == Topology::Replicas { 3 } else { 1 });
        if topology == Topology::Replicas && instances < 2 {
            return Err(SpecError {
                reason: "InvalidDatabase",
                message: "topology replicas needs database.managed.instances of 2 or more".into(),
            });
        }
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "postgresql.cnpg.io",
            "v1",
            "Cluster",
        ));
        let mut object = DynamicObject::new(&cnpg_name(cluster), &ar).data(json!({
            "spec": {
                "instances": instances,
                "imageName": managed.image.clone().unwrap_or_else(|| "ghcr.io/cloudnative-pg/postgresql:15".into()),
                "storage": {
                    "size": managed.storage_size.clone().unwrap_or_else(|| "20Gi".into()),
                    "storageClass": managed.storage_class_name,
                },
                "bootstrap": {"initdb": {"database": "memu", "owner": "memu", "postInitApplicationSQL": ["CREATE EXTENSION IF NOT EXISTS vector"]}},
                "managed": {"roles": [{
                    "name": APP_ROLE,
                    "ensure": "present",
                    "comment": "memU workers: serve under row-level security",
                    "login": true,
                    "superuser": false,
                    "createdb": false,
                    "createrole": false,
                    "bypassrls": false,
                    "replication": false,
                    "inherit": true,
                    "passwordSecret": {"name": app_role_secret_name(cluster)},
                }]},
            }
        }));
        object.metadata = meta(
            cluster,
            cnpg_name(cluster),
            "database",
            spec.deletion_policy == DeletionPolicy::Delete,
        );
        out.dynamic.push((ar, object));
    }
    if caps.service_monitor {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "monitoring.coreos.com",
            "v1",
            "ServiceMonitor",
        ));
        // Metrics are plain HTTP on their port, also when the API speaks HTTPS.
        let (metrics_port, _) = ops_port(cluster);
        let mut object = DynamicObject::new(&format!("{n}-worker"), &ar).data(json!({
            "spec": {
                "selector": {"matchLabels": {CLUSTER_LABEL: n}},
                "endpoints": [{"port": metrics_port, "path": "/metrics", "interval": "30s"}],
            }
        }));
        object.metadata = meta(cluster, format!("{n}-worker"), "worker", true);
        out.dynamic.push((ar, object));
    }
    Ok(out)
}
