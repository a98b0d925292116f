//! The pure rendering of desired objects, from the committed sample MemUClusters.

use k8s_openapi::api::core::v1::{
    Container, EnvVar, PodTemplateSpec, ServicePort, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use memu_crds::cluster::MemUCluster;
use memu_crds::worker::{DatabaseBackend, Quantization, WorkerConfig};
use memu_operator::admin_key;
use memu_operator::render::{self, CONFIG_HASH, Capabilities, desired};

fn sample(name: &str) -> MemUCluster {
    let path = format!(
        "{}/../config/samples/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut cluster: MemUCluster =
        serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cluster.metadata.namespace = Some("apps".into());
    cluster.metadata.uid = Some("0000-uid".into());
    cluster
}

const ALL: Capabilities = Capabilities {
    cnpg: true,
    service_monitor: true,
    keda: false,
};

/// The configuration hash stamped on the first Deployment's pod template.
fn config_hash(d: &render::Desired) -> String {
    d.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH]
        .clone()
}

fn config_of(d: &render::Desired) -> WorkerConfig {
    let yaml = &d.config_map.as_ref().unwrap().data.as_ref().unwrap()["worker.yaml"];
    let config: WorkerConfig = serde_norway::from_str(yaml).unwrap();
    config.validate().unwrap();
    config
}

/// The Secret key a variable is read from; a secret value never stands in the spec.
fn from_secret(var: &EnvVar) -> &k8s_openapi::api::core::v1::SecretKeySelector {
    assert!(var.value.is_none(), "{} never in clear", var.name);
    var.value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap_or_else(|| panic!("{} is not read from a Secret", var.name))
}

fn env_of(d: &render::Desired) -> Vec<EnvVar> {
    let pod = d
        .deployments
        .first()
        .map(|x| x.spec.as_ref().unwrap().template.clone())
        .or_else(|| {
            d.stateful_sets
                .first()
                .map(|x| x.spec.as_ref().unwrap().template.clone())
        })
        .unwrap();
    pod.spec.unwrap().containers[0].env.clone().unwrap()
}

#[test]
fn small_runs_one_sqlite_statefulset_without_autoscaling() {
    let d = desired(&sample("small"), Capabilities::default()).unwrap();
    assert!(d.deployments.is_empty() && d.hpas.is_empty() && d.jobs.is_empty());
    let sts = &d.stateful_sets[0];
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.volume_claim_templates.as_ref().unwrap()[0]
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "10Gi"
    );
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        container.args.as_ref().unwrap(),
        &["serve", "--role", "all"]
    );
    let config = config_of(&d);
    assert_eq!(config.database.backend, DatabaseBackend::Sqlite);
    assert!(config.llm.is_offline());
    assert_eq!(config.vector.dimension, 384);
    // Every child is owned by the MemUCluster, labelled for orphan cleanup.
    for meta in [
        &sts.metadata,
        &d.services[0].metadata,
        &d.config_map.as_ref().unwrap().metadata,
    ] {
        assert_eq!(
            meta.owner_references.as_ref().unwrap()[0].kind,
            "MemUCluster"
        );
        assert_eq!(
            meta.labels.as_ref().unwrap()[render::CLUSTER_LABEL],
            "memu-small"
        );
        assert_eq!(meta.namespace.as_deref(), Some("apps"));
    }
}

#[test]
fn medium_autoscales_and_wires_cnpg_and_secrets() {
    let cluster = sample("medium");
    let d = desired(&cluster, ALL).unwrap();
    assert_eq!(d.deployments.len(), 2);
    for dep in &d.deployments {
        // The HPA owns the replica count.
        assert_eq!(dep.spec.as_ref().unwrap().replicas, None);
    }
    let hpa = d
        .hpas
        .iter()
        .find(|h| h.metadata.name.as_deref() == Some("memu-medium-api"))
        .unwrap();
    let spec = hpa.spec.as_ref().unwrap();
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 10));
    assert_eq!(
        spec.metrics.as_ref().unwrap()[0]
            .resource
            .as_ref()
            .unwrap()
            .target
            .average_utilization,
        Some(65)
    );
    assert_eq!(d.pdbs.len(), 2);
    assert_eq!(d.jobs.len(), 1, "migrations job");
    assert_eq!(
        d.jobs[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .args
            .as_ref()
            .unwrap(),
        &["migrate"]
    );
    let (ar, db) = d
        .dynamic
        .iter()
        .find(|(ar, _)| ar.kind == "Cluster")
        .unwrap();
    assert_eq!(ar.group, "postgresql.cnpg.io");
    assert_eq!(db.data["spec"]["instances"], 1);
    // Retain: the database is not owned, so deleting the MemUCluster keeps it.
    assert!(db.metadata.owner_references.is_none());
    assert!(d.dynamic.iter().any(|(ar, _)| ar.kind == "ServiceMonitor"));
    let config = config_of(&d);
    assert_eq!(config.database.backend, DatabaseBackend::Postgres);
    assert!(!config.database.auto_migrate);
    assert_eq!(config.vector.dimension, 1536);
    assert_eq!(config.embedding.provider, "embedding");
    assert_eq!(config.llm.extraction.as_deref(), Some("extraction"));
    assert_eq!(
        config.providers["extraction"].chat_model.as_deref(),
        Some("gpt-4o-mini")
    );
    let env = env_of(&d);
    let dsn = env.iter().find(|e| e.name == "DATABASE_URL").unwrap();
    assert_eq!(
        dsn.value.as_deref(),
        Some("postgres://$(DB_USER):$(DB_PASSWORD)@memu-medium-db-rw.apps.svc:5432/$(DB_NAME)")
    );
    let key = env
        .iter()
        .find(|e| e.name == "MEMU_EXTRACTION_API_KEY")
        .unwrap();
    assert_eq!(
        key.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "openai"
    );
    // No secret value ever appears in a rendered object.
    assert!(
        env.iter()
            .all(|e| e.value.as_deref().is_none_or(|v| !v.contains("sk-")))
    );
}

#[test]
fn large_uses_the_external_citus_coordinator() {
    let d = desired(&sample("large"), ALL).unwrap();
    assert!(d.dynamic.iter().all(|(ar, _)| ar.kind != "Cluster"));
    let env = env_of(&d);
    assert_eq!(
        env.iter()
            .find(|e| e.name == "DATABASE_URL")
            .unwrap()
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .key,
        "coordinator-dsn"
    );
    assert_eq!(config_of(&d).vector.dimension, 1024);
    let hpa = d
        .hpas
        .iter()
        .find(|h| h.metadata.name.as_deref() == Some("memu-large-pipeline"))
        .unwrap();
    assert_eq!(hpa.spec.as_ref().unwrap().max_replicas, 40);
}

#[test]
fn spec_changes_roll_pods_through_the_config_hash() {
    let mut cluster = sample("medium");
    let hash = |c: &MemUCluster| config_hash(&desired(c, ALL).unwrap());
    let before = hash(&cluster);
    assert_eq!(before, hash(&cluster), "rendering is deterministic");
    cluster.spec.llm.extraction.as_mut().unwrap().model = Some("gpt-4o".into());
    let after_model = hash(&cluster);
    assert_ne!(before, after_model);
    cluster.spec.image = Some("registry.local/memu-worker:2".into());
    assert_ne!(after_model, hash(&cluster));
    // Replica bounds do not touch the pods.
    let mut scaled = sample("medium");
    scaled.spec.api.autoscaling.as_mut().unwrap().max_replicas = 20;
    assert_eq!(before, hash(&scaled));
}

#[test]
fn vector_settings_reach_the_worker_config() {
    let mut cluster = sample("medium");
    assert_eq!(
        config_of(&desired(&cluster, ALL).unwrap())
            .vector
            .quantization,
        Quantization::None
    );
    cluster.spec.vector.quantization = Some(Quantization::Int8);
    cluster.spec.vector.hnsw_ef_search = Some(64);
    let config = config_of(&desired(&cluster, ALL).unwrap());
    assert_eq!(config.vector.quantization, Quantization::Int8);
    assert_eq!(config.vector.hnsw_ef_search, 64);
}

#[test]
fn unrealisable_specs_give_a_stalled_reason() {
    let medium = sample("medium");
    let err = desired(&medium, Capabilities::default()).unwrap_err();
    assert_eq!(err.reason, "CloudNativePGMissing");
    let mut replicas = sample("medium");
    replicas.spec.database.topology = Some(memu_crds::cluster::Topology::Replicas);
    replicas.spec.database.managed.as_mut().unwrap().instances = Some(1);
    assert_eq!(
        desired(&replicas, ALL).unwrap_err().reason,
        "InvalidDatabase"
    );
}

#[test]
fn fixed_replicas_replace_the_tier_autoscaling() {
    let mut cluster = sample("medium");
    cluster.spec.api.autoscaling = None;
    cluster.spec.api.replicas = Some(4);
    let d = desired(&cluster, ALL).unwrap();
    let api = d
        .deployments
        .iter()
        .find(|x| x.metadata.name.as_deref() == Some("memu-medium-api"))
        .unwrap();
    assert_eq!(api.spec.as_ref().unwrap().replicas, Some(4));
    assert!(
        d.hpas
            .iter()
            .all(|h| h.metadata.name.as_deref() != Some("memu-medium-api"))
    );
}

#[test]
fn managed_citus_is_a_coordinator_and_one_statefulset_per_worker() {
    let mut cluster = sample("large");
    cluster.spec.database.external = None;
    cluster.spec.database.managed = Some(memu_crds::cluster::ManagedDatabase {
        shards: Some(4),
        ..Default::default()
    });
    let d = desired(&cluster, ALL).unwrap();
    let names: Vec<_> = d
        .stateful_sets
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "memu-large-citus-coordinator",
            "memu-large-citus-worker-0",
            "memu-large-citus-worker-1",
            "memu-large-citus-worker-2",
            "memu-large-citus-worker-3",
            "memu-large-redis"
        ]
    );
    // The managed Redis holds nothing to keep: it is owned whatever the deletion policy.
    for sts in d
        .stateful_sets
        .iter()
        .filter(|s| s.metadata.name.as_deref().unwrap().contains("-citus-"))
    {
        // Retain: the database outlives the MemUCluster.
        assert!(sts.metadata.owner_references.is_none());
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("memu-large-citus-nodes"));
        // Each StatefulSet selects only its own pod.
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(
            selector["memu.dev/database"],
            sts.metadata.name.clone().unwrap()
        );
    }
    let headless = d
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("memu-large-citus-nodes"))
        .unwrap();
    assert_eq!(
        headless.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    // Workers reach the coordinator with generated credentials, never a clear-text password.
    let env = env_of(&d);
    let url = env.iter().find(|e| e.name == "DATABASE_URL").unwrap();
    assert_eq!(
        url.value.as_deref(),
        Some(
            "postgres://$(DB_USER):$(DB_PASSWORD)@memu-large-citus-coordinator.apps.svc:5432/$(DB_NAME)"
        )
    );
    let password = env.iter().find(|e| e.name == "DB_PASSWORD").unwrap();
    assert_eq!(
        password
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "memu-large-citus-credentials"
    );
    // The migrations Job also distributes the tables by user_id.
    let args = d.jobs[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(args, ["migrate", "--distribute"]);
    // pg_dist_node must list pod 0 of every worker StatefulSet.
    let workers = render::citus_workers(&cluster);
    assert_eq!(workers.len(), 4);
    assert_eq!(
        workers[3].host,
        "memu-large-citus-worker-3-0.memu-large-citus-nodes.apps.svc"
    );
    let secret = render::citus_credentials(&cluster, "pw");
    assert_eq!(secret.string_data.unwrap()["password"], "pw");
}

#[test]
fn with_keda_the_pipeline_scales_on_the_queue_and_the_api_on_cpu() {
    let medium = sample("medium");
    let keda = Capabilities { keda: true, ..ALL };
    let d = desired(&medium, keda).unwrap();
    let hpas: Vec<_> = d
        .hpas
        .iter()
        .map(|h| h.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(hpas, ["memu-medium-api"], "KEDA owns the pipeline's HPA");
    let scaled = d
        .dynamic
        .iter()
        .find(|(ar, _)| ar.kind == "ScaledObject")
        .map(|(_, o)| o)
        .unwrap();
    assert_eq!(
        scaled.metadata.name.as_deref(),
        Some("memu-medium-pipeline")
    );
    let spec = &scaled.data["spec"];
    assert_eq!(spec["scaleTargetRef"]["name"], "memu-medium-pipeline");
    assert_eq!(spec["minReplicaCount"], 1);
    assert_eq!(spec["maxReplicaCount"], 6);
    let queue = &spec["triggers"][0];
    assert_eq!(queue["type"], "postgresql");
    assert_eq!(queue["metadata"]["targetQueryValue"], "10");
    // RLS hides tasks from a role without a tenant: the count comes from the definer function.
    assert!(
        queue["metadata"]["query"]
            .as_str()
            .unwrap()
            .contains("memu_queue_stats()")
    );
    let auth = d
        .dynamic
        .iter()
        .find(|(ar, _)| ar.kind == "TriggerAuthentication")
        .map(|(_, o)| o)
        .unwrap();
    // The DSN stays in CloudNativePG's Secret: only its name and key are rendered.
    assert_eq!(
        auth.data["spec"]["secretTargetRef"][0],
        serde_json::json!({"parameter": "connection", "name": "memu-medium-db-app-role", "key": "uri"})
    );
    let pipeline = d
        .deployments
        .iter()
        .find(|x| x.metadata.name.as_deref() == Some("memu-medium-pipeline"))
        .unwrap();
    assert_eq!(pipeline.spec.as_ref().unwrap().replicas, None);
    // Without KEDA: a CPU HPA for both workloads.
    let plain = desired(&medium, ALL).unwrap();
    assert_eq!(plain.hpas.len(), 2);
    assert!(plain.dynamic.iter().all(|(ar, _)| ar.group != "keda.sh"));
}

#[test]
fn a_redis_secret_reaches_every_worker_as_redis_url() {
    // The large sample runs a managed Redis; an external one is named by its Secret.
    let mut large = sample("large");
    let managed = desired(&large, ALL).unwrap();
    let redis_sts = managed
        .stateful_sets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("memu-large-redis"))
        .expect("the managed Redis StatefulSet");
    assert_eq!(redis_sts.spec.as_ref().unwrap().replicas, Some(1));
    assert!(
        managed
            .services
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some("memu-large-redis"))
    );
    let mut external = large.clone();
    external.spec.cache = Some(memu_crds::cluster::CacheSpec {
        redis_url_secret: Some(memu_crds::cluster::SecretKeyRef {
            name: "memu-redis".into(),
            key: "url".into(),
        }),
        managed: None,
    });
    let external = desired(&external, ALL).unwrap();
    assert!(
        external.stateful_sets.iter().all(|s| !s
            .metadata
            .name
            .as_deref()
            .unwrap()
            .ends_with("-redis")),
        "an external Redis runs nothing"
    );
    for (d, want) in [(&managed, "memu-large-redis"), (&external, "memu-redis")] {
        let mut workers = 0;
        for (object, template) in templates(d)
            .into_iter()
            .filter(|(o, _)| o.ends_with("-api") || o.ends_with("-pipeline"))
        {
            let env = template.spec.as_ref().unwrap().containers[0]
                .env
                .clone()
                .unwrap_or_else(|| panic!("{object} has no environment"));
            let secret = from_secret(env.iter().find(|e| e.name == "REDIS_URL").unwrap());
            assert_eq!((secret.name.as_str(), secret.key.as_str()), (want, "url"));
            workers += 1;
        }
        assert_eq!(workers, 2, "api and pipeline");
    }
    large.spec.cache = None;
    assert!(
        env_of(&desired(&large, ALL).unwrap())
            .iter()
            .all(|e| e.name != "REDIS_URL")
    );
}

/// The pod templates of a rendering: (object name, template), Deployments, StatefulSets, Jobs.
fn templates(d: &render::Desired) -> Vec<(String, &k8s_openapi::api::core::v1::PodTemplateSpec)> {
    let deployments = d
        .deployments
        .iter()
        .map(|x| (&x.metadata, &x.spec.as_ref().unwrap().template));
    let stateful_sets = d
        .stateful_sets
        .iter()
        .map(|x| (&x.metadata, &x.spec.as_ref().unwrap().template));
    let jobs = d
        .jobs
        .iter()
        .map(|x| (&x.metadata, &x.spec.as_ref().unwrap().template));
    deployments
        .chain(stateful_sets)
        .chain(jobs)
        .map(|(m, t)| (m.name.clone().unwrap(), t))
        .collect()
}

/// The Secret as the API server stores it: `stringData` folded into `data`, uid and version set.
fn stored(
    secret: &k8s_openapi::api::core::v1::Secret,
    uid: &str,
) -> k8s_openapi::api::core::v1::Secret {
    let mut s = secret.clone();
    s.data = s.string_data.take().map(|d| {
        d.into_iter()
            .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
            .collect()
    });
    s.metadata.uid = Some(uid.into());
    s.metadata.resource_version = Some("1".into());
    s
}

fn created(plan: admin_key::Plan) -> k8s_openapi::api::core::v1::Secret {
    match plan {
        admin_key::Plan::Create(s) => s,
        other => panic!("expected a Secret to create, got {other:?}"),
    }
}

#[test]
fn the_admin_key_secret_is_generated_once_and_owned_by_the_cluster() {
    let cluster = sample("medium");
    let secret = created(admin_key::plan(&cluster, None, admin_key::generate));
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("memu-medium-admin-key")
    );
    assert_eq!(secret.metadata.namespace.as_deref(), Some("apps"));
    // Owned even under Retain (the sample's policy), labelled like every child.
    assert_eq!(
        cluster.spec.deletion_policy,
        memu_crds::cluster::DeletionPolicy::Retain
    );
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("MemUCluster", Some(true))
    );
    let labels = secret.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[render::CLUSTER_LABEL], "memu-medium");
    assert_eq!(labels["app.kubernetes.io/managed-by"], render::MANAGER);
    let key = admin_key::token_of(&secret).unwrap();
    assert!(admin_key::is_well_formed(&key), "{} chars", key.len());
    let id = admin_key::key_id("apps", "memu-medium");
    assert!(key.starts_with(&format!("memu_{id}_")));

    // Later reconciles find it stored and keep it: nothing is generated or rewritten.
    let on_server = stored(&secret, "secret-uid-1");
    for _ in 0..2 {
        match admin_key::plan(&cluster, Some(on_server.clone()), |_| {
            panic!("an existing admin key must not be regenerated")
        }) {
            admin_key::Plan::Keep(kept) => {
                assert_eq!(admin_key::token_of(&kept).as_deref(), Some(key.as_str()))
            }
            other => panic!("expected Keep, got {other:?}"),
        }
    }

    // Deleted (rotation): a new secret part under the same key id, which the worker replaces.
    let rotated = admin_key::token_of(&created(admin_key::plan(
        &cluster,
        None,
        admin_key::generate,
    )))
    .unwrap();
    assert!(admin_key::is_well_formed(&rotated));
    assert_ne!(rotated, key);
    assert!(rotated.starts_with(&format!("memu_{id}_")));
}

#[test]
fn an_unusable_admin_key_secret_is_kept_and_reported() {
    let cluster = sample("medium");
    let mut secret = stored(
        &render::admin_key_secret(&cluster, "hunter2-not-a-key"),
        "uid",
    );
    let never = |_: &str| -> String { panic!("an existing Secret is never overwritten") };
    let plan = admin_key::plan(&cluster, Some(secret.clone()), never);
    assert!(matches!(plan, admin_key::Plan::KeepUnusable(_)), "{plan:?}");
    let (type_, reason, note) = plan.event("memu-medium-admin-key").unwrap();
    assert_eq!(type_, kube::runtime::events::EventType::Warning);
    assert_eq!(reason, "AdminKeyUnusable");
    assert!(note.contains("memu-medium-admin-key") && !note.contains("hunter2"));
    secret.data = None;
    assert!(matches!(
        admin_key::plan(&cluster, Some(secret), never),
        admin_key::Plan::KeepUnusable(_)
    ));
}

#[test]
fn every_worker_container_reads_the_admin_key_and_the_migrations_job_does_not() {
    let mut citus = sample("large");
    citus.spec.database.external = None;
    citus.spec.database.managed = Some(memu_crds::cluster::ManagedDatabase {
        shards: Some(2),
        ..Default::default()
    });
    for (cluster, workers) in [
        (sample("small"), 1),
        (sample("medium"), 2),
        (sample("large"), 2),
        (citus, 2),
    ] {
        let n = cluster.metadata.name.clone().unwrap();
        let d = desired(&cluster, ALL).unwrap();
        // The rendered worker configuration reads the key from the variable the pods get.
        assert_eq!(config_of(&d).auth.bootstrap_admin_key_env, admin_key::ENV);
        let mut reading = 0;
        for (object, template) in templates(&d) {
            let component = &template.metadata.as_ref().unwrap().labels.as_ref().unwrap()
                [render::COMPONENT_LABEL];
            let is_worker = ["worker", "api", "pipeline"].contains(&component.as_str());
            for c in &template.spec.as_ref().unwrap().containers {
                let env = c.env.clone().unwrap_or_default();
                let keys: Vec<_> = env.iter().filter(|e| e.name == admin_key::ENV).collect();
                if !is_worker {
                    // The migrations Job and the Citus nodes never see it.
                    assert!(
                        keys.is_empty(),
                        "{object} ({component}) reads the admin key"
                    );
                    continue;
                }
                assert_eq!(keys.len(), 1, "{object}: {env:?}");
                let r = from_secret(keys[0]);
                assert_eq!(
                    (r.name.as_str(), r.key.as_str(), r.optional),
                    (format!("{n}-admin-key").as_str(), "api-key", None)
                );
                reading += 1;
            }
        }
        assert_eq!(reading, workers, "{n}");
        assert!(
            cluster.spec.topology() == memu_crds::cluster::Topology::Sqlite || !d.jobs.is_empty(),
            "{n} has a migrations Job"
        );
    }
}

#[test]
fn a_replaced_admin_key_secret_rolls_the_workers_only() {
    let mut citus = sample("large");
    citus.spec.database.external = None;
    citus.spec.database.managed = Some(memu_crds::cluster::ManagedDatabase {
        shards: Some(2),
        ..Default::default()
    });
    for cluster in [sample("small"), citus] {
        let n = cluster.metadata.name.clone().unwrap();
        let secret = created(admin_key::plan(&cluster, None, admin_key::generate));
        let first = render::secret_version(&stored(&secret, "uid-1"));
        assert_eq!(first, render::secret_version(&stored(&secret, "uid-1")));
        let recreated = render::secret_version(&stored(&secret, "uid-2"));
        assert_ne!(first, recreated);
        let mut edited = stored(&secret, "uid-1");
        edited.metadata.resource_version = Some("2".into());
        assert_ne!(first, render::secret_version(&edited));
        let versions = |version: &str| {
            let mut d = desired(&cluster, ALL).unwrap();
            render::stamp_admin_key_version(&mut d, version);
            templates(&d)
                .into_iter()
                .map(|(object, t)| {
                    let annotations = t.metadata.clone().unwrap().annotations.unwrap_or_default();
                    (
                        object,
                        annotations.get(render::ADMIN_KEY_VERSION).cloned(),
                        annotations.get(CONFIG_HASH).cloned(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let before = versions(&first);
        let after = versions(&recreated);
        let workers = [
            format!("{n}-worker"),
            format!("{n}-api"),
            format!("{n}-pipeline"),
        ];
        let mut stamped = 0;
        for ((object, version, hash), (_, version_after, hash_after)) in before.iter().zip(&after) {
            if workers.contains(object) {
                assert_eq!(version.as_deref(), Some(first.as_str()), "{object}");
                assert_eq!(
                    version_after.as_deref(),
                    Some(recreated.as_str()),
                    "{object}"
                );
                stamped += 1;
            } else {
                // The Citus nodes and the migrations Job keep their templates.
                assert_eq!((version, version_after), (&None, &None), "{object}");
            }
            assert_eq!(
                hash, hash_after,
                "the config hash (and the Job's name) stay"
            );
        }
        assert!(stamped > 0, "{n}");
        // The version says nothing about the key.
        let key = admin_key::token_of(&secret).unwrap();
        assert!(!key.contains(&first));
    }
}

#[test]
fn the_admin_key_stays_out_of_status_events_and_rendered_objects() {
    let cluster = sample("medium");
    let plan = admin_key::plan(&cluster, None, admin_key::generate);
    let name = render::admin_key_name(&cluster);
    let (_, reason, note) = plan.event(&name).unwrap();
    let debug = format!("{plan:?}");
    let secret = created(plan);
    let key = admin_key::token_of(&secret).unwrap();
    // The random part alone (it may itself contain `_`).
    let secret_part = &key[key.len() - 43..];
    let mut status = memu_crds::cluster::MemUClusterStatus::default();
    render::identify(&cluster, &mut status);
    let status_json = serde_json::to_string(&status).unwrap();
    assert!(status_json.contains(r#""adminKeySecret":"memu-medium-admin-key""#));
    let mut d = desired(&cluster, ALL).unwrap();
    render::stamp_admin_key_version(&mut d, &render::secret_version(&stored(&secret, "u")));
    let rendered = format!("{d:?}");
    for text in [&status_json, reason, &note, &debug, &rendered] {
        assert!(!text.contains(&key), "key leaked into {text}");
        assert!(!text.contains(secret_part), "key leaked into {text}");
    }
    assert!(note.contains(&name));
    // The Secret's own Debug would show it: hence the Plan's redacting Debug.
    assert!(format!("{secret:?}").contains(&key));
}

/// The port number of a `host:port` listen address.
fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

fn with_tls(mut cluster: MemUCluster, secret: &str) -> MemUCluster {
    cluster.spec.tls = Some(memu_crds::cluster::TlsSpec {
        secret_name: secret.into(),
    });
    cluster
}

fn without_tls(mut cluster: MemUCluster) -> MemUCluster {
    cluster.spec.tls = None;
    cluster
}

/// Every probe of a serving container speaks the protocol of the port it hits: plain HTTP on a
/// port the worker serves without TLS, HTTPS only on the API port when TLS is on. The port is
/// also one the container declares.
fn assert_probes_match_the_listeners(object: &str, c: &Container, config: &WorkerConfig) {
    let listen = port_of(&config.server.listen);
    let metrics = config.server.metrics_listen.as_deref().map(port_of);
    let declared: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    for (kind, probe) in [
        ("readiness", c.readiness_probe.as_ref()),
        ("liveness", c.liveness_probe.as_ref()),
    ] {
        let get = probe
            .unwrap_or_else(|| panic!("{object}: no {kind} probe"))
            .http_get
            .as_ref()
            .unwrap();
        let port = match &get.port {
            IntOrString::Int(p) => *p,
            IntOrString::String(name) => {
                c.ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name))
                    .unwrap_or_else(|| panic!("{object}: no port named {name}"))
                    .container_port
            }
        };
        assert!(declared.contains(&port), "{object}: {kind} probe on {port}");
        // Health is served on metrics_listen when set, else beside the API.
        assert_eq!(port, metrics.unwrap_or(listen), "{object}: {kind} probe");
        let https = get.scheme.as_deref() == Some("HTTPS");
        let tls_port = config.server.tls.is_some() && port == listen && metrics.is_none();
        assert_eq!(
            https, tls_port,
            "{object}: {kind} probe scheme {:?}",
            get.scheme
        );
    }
}

fn component_of(template: &PodTemplateSpec) -> String {
    template.metadata.as_ref().unwrap().labels.as_ref().unwrap()[render::COMPONENT_LABEL].clone()
}

fn mounts_of(c: &Container) -> Vec<VolumeMount> {
    c.volume_mounts.clone().unwrap_or_default()
}

#[test]
fn spec_tls_mounts_the_certificate_into_the_api_pods_and_the_worker_serves_https() {
    // The large sample names its certificate Secret; medium and small get one here.
    let large = sample("large");
    assert_eq!(render::tls_secret_name(&large), Some("memu-large-tls"));
    for cluster in [
        large,
        with_tls(sample("medium"), "medium-cert"),
        with_tls(sample("small"), "small-cert"),
    ] {
        let n = cluster.metadata.name.clone().unwrap();
        let secret = render::tls_secret_name(&cluster).unwrap().to_string();
        let d = desired(&cluster, ALL).unwrap();
        let config = config_of(&d);
        let tls = config.server.tls.clone().expect("server.tls rendered");
        assert_eq!(tls.reload_secs, render::TLS_RELOAD_SECS);
        let metrics = config
            .server
            .metrics_listen
            .clone()
            .expect("metrics_listen");
        assert_ne!(port_of(&metrics), port_of(&config.server.listen));
        let mut serving_api = 0;
        for (object, template) in templates(&d) {
            let component = component_of(template);
            let pod = template.spec.as_ref().unwrap();
            let volumes = pod.volumes.clone().unwrap_or_default();
            let tls_volumes: Vec<&Volume> = volumes
                .iter()
                .filter(|v| {
                    v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(&secret)
                })
                .collect();
            for c in &pod.containers {
                // subPath mounts are never updated by the kubelet: none anywhere.
                for m in mounts_of(c) {
                    assert!(
                        m.sub_path.is_none() && m.sub_path_expr.is_none(),
                        "{object}: {m:?}"
                    );
                }
            }
            if !["api", "worker"].contains(&component.as_str()) {
                // Pipeline, migrations and database pods have neither the volume nor the files.
                assert!(
                    tls_volumes.is_empty(),
                    "{object} ({component}) mounts the certificate"
                );
                for c in &pod.containers {
                    assert!(
                        mounts_of(c).iter().all(|m| m.mount_path != render::TLS_DIR),
                        "{object}"
                    );
                }
                continue;
            }
            serving_api += 1;
            assert_eq!(tls_volumes.len(), 1, "{object}: {volumes:?}");
            let source = tls_volumes[0].secret.as_ref().unwrap();
            assert_eq!(
                source.optional, None,
                "a missing Secret must hold the pod back"
            );
            let files: Vec<(&str, &str)> = source
                .items
                .iter()
                .flatten()
                .map(|i| (i.key.as_str(), i.path.as_str()))
                .collect();
            assert_eq!(files, [("tls.crt", "tls.crt"), ("tls.key", "tls.key")]);
            let c = &pod.containers[0];
            let mount = mounts_of(c)
                .into_iter()
                .find(|m| m.name == tls_volumes[0].name)
                .unwrap_or_else(|| panic!("{object}: the certificate volume is not mounted"));
            assert_eq!(mount.read_only, Some(true));
            // The configuration points at the files of that mount.
            let dir = std::path::Path::new(&mount.mount_path);
            assert_eq!(tls.cert_file, dir.join("tls.crt"), "{object}");
            assert_eq!(tls.key_file, dir.join("tls.key"), "{object}");
            // Not nested in another mount (the read-only config volume).
            for other in mounts_of(c).iter().filter(|m| m.name != mount.name) {
                assert!(
                    !dir.starts_with(&other.mount_path),
                    "{object}: {} inside {}",
                    mount.mount_path,
                    other.mount_path
                );
            }
            assert!(
                c.env
                    .iter()
                    .flatten()
                    .all(|e| !e.name.starts_with("MEMU_SERVER__"))
            );
            let ports: Vec<_> = c
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone().unwrap(), p.container_port))
                .collect();
            assert_eq!(
                ports,
                [
                    ("https".to_string(), 8080),
                    ("metrics".to_string(), port_of(&metrics))
                ],
                "{object}"
            );
            assert_probes_match_the_listeners(&object, c, &config);
        }
        assert_eq!(
            serving_api, 1,
            "{n}: the api Deployment or the SQLite StatefulSet"
        );

        // The API Service advertises HTTPS and also exposes the plain metrics port.
        let service = d
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(&format!("{n}-api")))
            .unwrap();
        let ports = service.spec.as_ref().unwrap().ports.clone().unwrap();
        let https = ports.iter().find(|p| p.port == 8080).unwrap();
        assert_eq!(
            (https.name.as_deref(), https.app_protocol.as_deref()),
            (Some("https"), Some("https"))
        );
        let metrics_port = ports.iter().find(|p| p.port == port_of(&metrics)).unwrap();
        assert_eq!(metrics_port.app_protocol.as_deref(), Some("http"));
        // The ServiceMonitor scrapes the Service port that leads to the plain metrics listener.
        let (_, monitor) = d
            .dynamic
            .iter()
            .find(|(ar, _)| ar.kind == "ServiceMonitor")
            .unwrap();
        let endpoint = &monitor.data["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], metrics_port.name.clone().unwrap());
        assert!(endpoint.get("scheme").is_none_or(|s| s == "http"));
        assert_eq!(
            metrics_port.target_port,
            Some(IntOrString::String("metrics".into()))
        );

        let mut status = memu_crds::cluster::MemUClusterStatus::default();
        render::identify(&cluster, &mut status);
        assert_eq!(
            status.endpoint.as_deref(),
            Some(format!("https://{n}-api.apps.svc:8080").as_str())
        );
    }
}

#[test]
fn pipeline_workers_and_migrations_stay_without_the_certificate() {
    let tls = desired(&sample("large"), ALL).unwrap();
    let plain = desired(&without_tls(sample("large")), ALL).unwrap();
    let pipeline = |d: &render::Desired| -> PodTemplateSpec {
        d.deployments
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some("memu-large-pipeline"))
            .unwrap()
            .spec
            .clone()
            .unwrap()
            .template
    };
    let migrate = |d: &render::Desired| d.jobs[0].spec.clone().unwrap().template;
    // The pipeline reads the shared configuration without `server.tls` (it has no files), and
    // probes the plain health port.
    let with = pipeline(&tls);
    let c = &with.spec.as_ref().unwrap().containers[0];
    let mut config = config_of(&tls);
    config.server.tls = None;
    assert_probes_match_the_listeners("memu-large-pipeline", c, &config);
    // Apart from that, the pod templates are the same as without TLS (the configuration hash,
    // health port and that variable aside): no volume, no mount, nothing else.
    let normalise = |mut t: PodTemplateSpec| {
        t.metadata
            .as_mut()
            .unwrap()
            .annotations
            .as_mut()
            .unwrap()
            .remove(CONFIG_HASH);
        for c in &mut t.spec.as_mut().unwrap().containers {
            c.ports = None;
            c.readiness_probe = None;
            c.liveness_probe = None;
        }
        t
    };
    assert_eq!(normalise(pipeline(&tls)), normalise(pipeline(&plain)));
    assert_eq!(normalise(migrate(&tls)), normalise(migrate(&plain)));
}

#[test]
fn without_spec_tls_nothing_changes() {
    for cluster in [
        sample("small"),
        sample("medium"),
        without_tls(sample("large")),
    ] {
        let n = cluster.metadata.name.clone().unwrap();
        let d = desired(&cluster, ALL).unwrap();
        let config = config_of(&d);
        assert_eq!(config.server.tls, None, "{n}");
        assert_eq!(config.server.metrics_listen, None, "{n}");
        assert_eq!(config.server.listen, "0.0.0.0:8080");
        // The managed Redis mounts its own auth Secret; it serves no HTTPS either way.
        for (object, template) in templates(&d)
            .into_iter()
            .filter(|(o, _)| !o.ends_with("-redis"))
        {
            let pod = template.spec.as_ref().unwrap();
            assert!(
                pod.volumes.iter().flatten().all(|v| v.secret.is_none()),
                "{object}: a Secret volume"
            );
            for c in &pod.containers {
                assert!(mounts_of(c).iter().all(|m| m.mount_path != render::TLS_DIR));
                assert!(
                    c.env
                        .iter()
                        .flatten()
                        .all(|e| !e.name.starts_with("MEMU_SERVER__"))
                );
                if c.readiness_probe.is_some() {
                    let ports: Vec<_> = c
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| (p.name.as_deref().unwrap(), p.container_port))
                        .collect();
                    assert_eq!(ports, [("http", 8080)], "{object}");
                    assert_probes_match_the_listeners(&object, c, &config);
                }
            }
        }
        let service = &d.services[0];
        assert_eq!(
            service.spec.as_ref().unwrap().ports.clone().unwrap(),
            [ServicePort {
                name: Some("http".into()),
                port: 8080,
                target_port: Some(IntOrString::String("http".into())),
                ..Default::default()
            }]
        );
        let (_, monitor) = d
            .dynamic
            .iter()
            .find(|(ar, _)| ar.kind == "ServiceMonitor")
            .unwrap();
        assert_eq!(monitor.data["spec"]["endpoints"][0]["port"], "http");
        let mut status = memu_crds::cluster::MemUClusterStatus::default();
        render::identify(&cluster, &mut status);
        assert_eq!(
            status.endpoint.as_deref(),
            Some(format!("http://{n}-api.apps.svc:8080").as_str())
        );
        assert_eq!(render::tls_secret_condition(&cluster, false), None);
    }
}

#[test]
fn a_missing_certificate_secret_is_reported_by_name() {
    let cluster = sample("large");
    assert_eq!(render::tls_secret_condition(&cluster, true), None);
    let (reason, message) = render::tls_secret_condition(&cluster, false).unwrap();
    assert_eq!(reason, "TlsSecretMissing");
    assert!(
        message.contains("memu-large-tls") && message.contains("apps"),
        "{message}"
    );
    // Turning TLS on or off rolls the pods (the configuration changes).
    let hash = |c: &MemUCluster| config_hash(&desired(c, ALL).unwrap());
    assert_ne!(hash(&cluster), hash(&without_tls(cluster.clone())));
}

/// Every worker container starts with what the operator gives it: the rendered configuration
/// file and its environment (Secret references stand for their values) load in the worker's own
/// configuration loader.
#[test]
fn every_worker_container_loads_its_rendered_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.yaml");
    let mut checked = 0;
    for name in ["small", "medium", "large"] {
        let d = desired(&sample(name), ALL).unwrap();
        let yaml = &d.config_map.as_ref().unwrap().data.as_ref().unwrap()["worker.yaml"];
        std::fs::write(&file, yaml).unwrap();
        let pods = d
            .deployments
            .iter()
            .map(|x| x.spec.as_ref().unwrap().template.clone())
            .chain(
                d.stateful_sets
                    .iter()
                    .filter(|s| {
                        s.metadata
                            .name
                            .as_deref()
                            .is_some_and(|n| !n.contains("citus"))
                    })
                    .map(|x| x.spec.as_ref().unwrap().template.clone()),
            )
            .chain(
                d.jobs
                    .iter()
                    .map(|j| j.spec.as_ref().unwrap().template.clone()),
            );
        for pod in pods {
            for c in pod.spec.unwrap().containers {
                let env: Vec<(String, String)> = c
                    .env
                    .iter()
                    .flatten()
                    .map(|e| {
                        let value = e.value.clone().unwrap_or_else(|| "from-a-secret".into());
                        (e.name.clone(), value)
                    })
                    .collect();
                memu_worker::config::load_from(Some(&file), env).unwrap_or_else(|e| {
                    panic!("{name}: container {} does not start: {e:#}", c.name)
                });
                checked += 1;
            }
        }
    }
    assert!(checked >= 6, "only {checked} containers");
}

/// The secret names every `secretKeyRef` of a container's environment points at.
fn secret_refs(c: &Container) -> Vec<(String, String, String)> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| {
            let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
            Some((e.name.clone(), r.name.clone(), r.key.clone()))
        })
        .collect()
}

#[test]
fn cnpg_workers_serve_as_the_rls_bound_app_role_and_only_migrations_get_the_owner() {
    for tier in ["medium", "replicas"] {
        let mut cluster = sample("medium");
        if tier == "replicas" {
            cluster.spec.database.topology = Some(memu_crds::cluster::Topology::Replicas);
            cluster.spec.database.managed.as_mut().unwrap().instances = Some(3);
        }
        let d = desired(&cluster, ALL).unwrap();
        // CloudNativePG creates the role from its Secret: a plain login, no BYPASSRLS.
        let (_, db) = d
            .dynamic
            .iter()
            .find(|(ar, _)| ar.kind == "Cluster")
            .unwrap();
        let roles = db.data["spec"]["managed"]["roles"].as_array().unwrap();
        assert_eq!(roles.len(), 1);
        let role = &roles[0];
        assert_eq!(role["name"], render::APP_ROLE);
        assert_eq!(role["login"], true);
        for power in [
            "superuser",
            "bypassrls",
            "createrole",
            "createdb",
            "replication",
        ] {
            assert_eq!(role[power], false, "{power}");
        }
        assert_eq!(role["passwordSecret"]["name"], "memu-medium-db-app-role");
        // The owner (`bootstrap.initdb.owner`) is another role: RLS binds the app role.
        assert_ne!(
            db.data["spec"]["bootstrap"]["initdb"]["owner"],
            role["name"]
        );
        assert_eq!(
            config_of(&d).database.app_role.as_deref(),
            Some(render::APP_ROLE)
        );
        for (object, template) in templates(&d) {
            let pod = template.spec.as_ref().unwrap();
            for c in &pod.containers {
                let refs = secret_refs(c);
                let owner: Vec<_> = refs
                    .iter()
                    .filter(|(_, name, _)| name == "memu-medium-db-app")
                    .collect();
                let credentials: Vec<_> = refs
                    .iter()
                    .filter(|(var, _, _)| var.starts_with("DB_"))
                    .map(|(var, name, key)| (var.as_str(), name.as_str(), key.as_str()))
                    .collect();
                assert_eq!(
                    credentials,
                    [
                        ("DB_USER", "memu-medium-db-app-role", "username"),
                        ("DB_PASSWORD", "memu-medium-db-app-role", "password"),
                        ("DB_NAME", "memu-medium-db-app-role", "dbname"),
                    ],
                    "{object}"
                );
                let dsns: Vec<_> = c
                    .env
                    .iter()
                    .flatten()
                    .filter(|e| e.name.starts_with("DATABASE_") && e.value.is_some())
                    .map(|e| (e.name.as_str(), e.value.as_deref().unwrap()))
                    .collect();
                let mut expected = vec![(
                    "DATABASE_URL",
                    "postgres://$(DB_USER):$(DB_PASSWORD)@memu-medium-db-rw.apps.svc:5432/$(DB_NAME)",
                )];
                if tier == "replicas" {
                    expected.push((
                        "DATABASE_READ_URL",
                        "postgres://$(DB_USER):$(DB_PASSWORD)@memu-medium-db-ro.apps.svc:5432/$(DB_NAME)",
                    ));
                }
                assert_eq!(dsns, expected, "{object}");
                if object.starts_with("memu-medium-migrate-") {
                    assert_eq!(
                        owner,
                        [&(
                            "DATABASE_MIGRATE_URL".to_string(),
                            "memu-medium-db-app".to_string(),
                            "uri".to_string()
                        )],
                        "the migrations Job runs as the owner"
                    );
                } else {
                    assert!(
                        owner.is_empty(),
                        "{object} must not see the owner: {owner:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_app_role_secret_is_basic_auth_with_a_dsn_for_keda() {
    let cluster = sample("medium");
    let secret = render::app_role_secret(&cluster, "pw0123456789");
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("memu-medium-db-app-role")
    );
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/basic-auth"));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()["cnpg.io/reload"],
        "true"
    );
    let data = secret.string_data.as_ref().unwrap();
    assert_eq!(data["username"], render::APP_ROLE);
    assert_eq!(data["password"], "pw0123456789");
    assert_eq!(
        data["uri"],
        "postgres://memu_app:pw0123456789@memu-medium-db-rw.apps.svc:5432/memu"
    );
    // Neither SQLite, Citus nor an external database gets a CloudNativePG role.
    for name in ["small", "large"] {
        assert!(!render::uses_cnpg(&sample(name)), "{name}");
    }
}

#[test]
fn spec_tracing_reaches_every_worker_configuration() {
    let mut cluster = sample("medium");
    assert_eq!(
        config_of(&desired(&cluster, ALL).unwrap())
            .tracing
            .otlp_endpoint,
        None
    );
    cluster.spec.tracing = Some(memu_crds::cluster::TracingSpec {
        otlp_endpoint: "http://otel-collector.observability:4318".into(),
        sample_ratio: Some(0.25),
    });
    let d = desired(&cluster, ALL).unwrap();
    let tracing = config_of(&d).tracing;
    assert_eq!(
        tracing.otlp_endpoint.as_deref(),
        Some("http://otel-collector.observability:4318")
    );
    assert_eq!(tracing.sample_ratio, 0.25);
    assert_eq!(tracing.service_name, "memu-worker.memu-medium");
    // A changed tracing target rolls the pods like any other configuration change.
    assert_ne!(
        config_hash(&desired(&sample("medium"), ALL).unwrap()),
        config_hash(&d)
    );
}

#[test]
fn every_volume_is_mounted_and_every_mount_has_a_volume() {
    for name in ["small", "medium", "large"] {
        for tls in [false, true] {
            let mut cluster = sample(name);
            if tls {
                cluster = with_tls(cluster, "memu-tls");
            }
            let d = desired(&cluster, ALL).unwrap();
            let claims: Vec<String> = d
                .stateful_sets
                .iter()
                .flat_map(|s| {
                    s.spec
                        .as_ref()
                        .unwrap()
                        .volume_claim_templates
                        .iter()
                        .flatten()
                })
                .filter_map(|c| c.metadata.name.clone())
                .collect();
            for (object, template) in templates(&d) {
                let pod = template.spec.as_ref().unwrap();
                let volumes: Vec<&str> = pod
                    .volumes
                    .iter()
                    .flatten()
                    .map(|v| v.name.as_str())
                    .chain(claims.iter().map(String::as_str))
                    .collect();
                let mounted: Vec<String> = pod
                    .containers
                    .iter()
                    .flat_map(mounts_of)
                    .map(|m| m.name)
                    .collect();
                for m in &mounted {
                    assert!(volumes.contains(&m.as_str()), "{object}: {m} has no volume");
                }
                for v in pod.volumes.iter().flatten() {
                    assert!(
                        mounted.contains(&v.name),
                        "{object}: volume {} is never mounted",
                        v.name
                    );
                }
                // Read-only root filesystem: /tmp is the writable scratch space.
                for c in &pod.containers {
                    assert!(
                        mounts_of(c)
                            .iter()
                            .any(|m| m.mount_path == "/tmp" && m.read_only != Some(true)),
                        "{object}: no writable /tmp"
                    );
                }
            }
        }
    }
}
