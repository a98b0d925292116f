//! The operator against a real kube-apiserver (+ controller manager, scheduler and kwok nodes)
//! started by `e2e/k8s/start.sh`; the test script exports its kubeconfig.

mod common;

use common::{
    Operator, apply_yaml_file, client, create_namespace, eventually, free_port, sample,
    service_account_kubeconfig, small_sample_volume,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use memu_crds::cluster::MemUCluster;
use memu_crds::worker::WorkerConfig;
use serde_json::json;

/// An operator process that leads through a Lease in `ns` and reconciles only `ns`, so that
/// tests running side by side never reconcile each other's objects.
/// `lease` is the Lease duration in seconds: short where a test waits for a takeover, longer
/// elsewhere so a loaded CI machine never makes both replicas give up.
fn start_operator(kubeconfig: &str, ns: &str, identity: &str, lease: &str) -> Operator {
    let metrics = format!("127.0.0.1:{}", free_port());
    Operator::spawn(
        [
            "--lease-namespace",
            ns,
            "--watch-namespace",
            ns,
            "--lease-seconds",
            lease,
            "--identity",
            identity,
            "--metrics-addr",
            &metrics,
        ],
        [("KUBECONFIG", kubeconfig), ("RUST_LOG", "info,kube=warn")],
        &format!("memu-e2e-{ns}-{identity}"),
    )
}

/// A kubeconfig for a ServiceAccount of `ns` bound to exactly the generated ClusterRole
/// (`memu_operator::rbac`): the operator runs with the permissions an install grants it, so a
/// permission the code needs but the role lacks fails the test.
async fn operator_kubeconfig(client: &Client, ns: &str, dir: &std::path::Path) -> String {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let ssa = PatchParams::apply("memu-e2e").force();
    let role = memu_operator::rbac::cluster_role();
    Api::<ClusterRole>::all(client.clone())
        .patch(memu_operator::rbac::ROLE_NAME, &ssa, &Patch::Apply(&role))
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "memu-operator"}})).unwrap(),
        )
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("memu-operator-{ns}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": memu_operator::rbac::ROLE_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": "memu-operator", "namespace": ns}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            &format!("memu-operator-{ns}"),
            &ssa,
            &Patch::Apply(&binding),
        )
        .await
        .unwrap();
    service_account_kubeconfig(client, ns, "memu-operator", dir).await
}

/// A namespaced API of a custom resource the test cluster knows (CNPG, KEDA, …).
fn dynamic_api(
    client: &Client,
    ns: &str,
    group: &str,
    version: &str,
    kind: &str,
) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind)),
    )
}

fn lease_holder(lease: Option<k8s_openapi::api::coordination::v1::Lease>) -> Option<String> {
    lease?.spec?.holder_identity
}

/// The leader is killed right after a change; the standby takes the lease over and finishes the
/// work without duplicating or losing objects. Then: managed Citus objects and status, and the
/// Delete policy removing the database.
#[tokio::test]
async fn failover_managed_citus_and_delete_policy() {
    let client = client().await;
    apply_yaml_file(&client, "crds/yaml/memucluster.yaml").await;
    apply_yaml_file(&client, "e2e/k8s/crds/optional-crds.yaml").await;
    let ns = format!("e2e-fo-{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;
    let clusters: Api<MemUCluster> = Api::namespaced(client.clone(), &ns);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let ssa = PatchParams::apply("memu-e2e").force();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = operator_kubeconfig(&client, &ns, dir.path()).await;
    let leader = start_operator(&kubeconfig, &ns, "op-a", "4");
    eventually("op-a leads", || async {
        lease_holder(leases.get_opt("memu-operator").await.ok().flatten()).as_deref()
            == Some("op-a")
    })
    .await;
    let standby = start_operator(&kubeconfig, &ns, "op-b", "4");

    // A managed Citus cluster with three workers, and a medium cluster with deletionPolicy Delete.
    let mut citus = sample("large");
    citus["metadata"] = json!({"name": "memu-citus", "namespace": ns});
    citus["spec"]["database"] = json!({"topology": "citus", "managed": {"shards": 3}});
    // One replica each: the fake nodes' capacity is shared with the test running beside this one.
    citus["spec"]["api"] = json!({"replicas": 1});
    citus["spec"]["pipeline"] = json!({"replicas": 1});
    let mut doomed = sample("medium");
    doomed["metadata"] = json!({"name": "memu-doomed", "namespace": ns});
    doomed["spec"]["deletionPolicy"] = json!("Delete");
    for object in [&citus, &doomed] {
        let object: MemUCluster = serde_json::from_value(object.clone()).unwrap();
        let name = object.metadata.name.clone().unwrap();
        clusters
            .patch(&name, &ssa, &Patch::Apply(&object))
            .await
            .unwrap();
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("op-a starts on the doomed cluster", || async {
        deployments
            .get_opt("memu-doomed-api")
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    // Kill the leader mid-work (no graceful release of the lease).
    drop(leader);
    eventually("op-b takes the lease over", || async {
        lease_holder(leases.get_opt("memu-operator").await.ok().flatten()).as_deref()
            == Some("op-b")
    })
    .await;

    // The standby finishes: every Citus node, the credentials, the status; nothing twice.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    eventually("citus status from op-b", || async {
        clusters
            .get("memu-citus")
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.citus)
            .is_some_and(|c| c.desired_workers == 3)
    })
    .await;
    let nodes = sts
        .list(&ListParams::default().labels("memu.dev/cluster=memu-citus"))
        .await
        .unwrap();
    let mut names: Vec<String> = nodes
        .items
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "memu-citus-citus-coordinator",
            "memu-citus-citus-worker-0",
            "memu-citus-citus-worker-1",
            "memu-citus-citus-worker-2",
            "memu-citus-redis"
        ]
    );
    // The large sample's managed Redis: its password only in its Secret, the workers' REDIS_URL
    // from that Secret.
    let redis = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .get("memu-citus-redis")
        .await
        .unwrap();
    let redis_password = String::from_utf8(redis.data.unwrap()["password"].0.clone()).unwrap();
    assert_eq!(redis_password.len(), 32);
    let api_env = deployments
        .get("memu-citus-api")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap();
    let redis_url = api_env.iter().find(|e| e.name == "REDIS_URL").unwrap();
    let from = redis_url
        .value_from
        .clone()
        .unwrap()
        .secret_key_ref
        .unwrap();
    assert_eq!(
        (from.name.as_str(), from.key.as_str()),
        ("memu-citus-redis", "url")
    );
    let redis_sts = serde_json::to_string(&sts.get("memu-citus-redis").await.unwrap()).unwrap();
    assert!(
        !redis_sts.contains(&redis_password),
        "no password in the StatefulSet"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let credentials = secrets.get("memu-citus-citus-credentials").await.unwrap();
    let password = String::from_utf8(credentials.data.unwrap()["password"].0.clone()).unwrap();
    assert_eq!(password.len(), 32);
    let citus_now = clusters.get("memu-citus").await.unwrap();
    let status_text = serde_json::to_string(&citus_now.status).unwrap();
    assert!(!status_text.contains(&password), "no secret in status");
    assert!(
        !status_text.contains(&redis_password),
        "no Redis password in status"
    );
    let db = citus_now
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "DatabaseReady")
        .unwrap();
    assert_eq!(db.status, "False");
    assert!(
        ["NodesNotReady", "CoordinatorUnreachable"].contains(&db.reason.as_str()),
        "{db:?}"
    );
    let doomed_deployments = deployments
        .list(&ListParams::default().labels("memu.dev/cluster=memu-doomed"))
        .await
        .unwrap();
    assert_eq!(
        doomed_deployments.items.len(),
        2,
        "api and pipeline, once each"
    );

    // KEDA is installed in the test cluster: the pipeline scales on the queue, the api on CPU.
    let scaled: Api<DynamicObject> =
        dynamic_api(&client, &ns, "keda.sh", "v1alpha1", "ScaledObject");
    let queue = scaled.get("memu-doomed-pipeline").await.unwrap();
    assert_eq!(queue.data["spec"]["triggers"][0]["type"], "postgresql");
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
    assert!(
        hpas.get_opt("memu-doomed-pipeline")
            .await
            .unwrap()
            .is_none()
    );
    assert!(hpas.get_opt("memu-doomed-api").await.unwrap().is_some());

    // The new leader keeps reconciling changes.
    doomed["spec"]["image"] = json!("example.org/memu-worker:failover");
    let edited: MemUCluster = serde_json::from_value(doomed.clone()).unwrap();
    clusters
        .patch("memu-doomed", &ssa, &Patch::Apply(&edited))
        .await
        .unwrap();
    eventually("op-b rolls the new image", || async {
        deployments
            .get("memu-doomed-api")
            .await
            .ok()
            .and_then(|d| d.spec?.template.spec?.containers.first()?.image.clone())
            .as_deref()
            == Some("example.org/memu-worker:failover")
    })
    .await;

    // Delete policy: the finalizer removes the database, then the object goes.
    let cnpg: Api<DynamicObject> = dynamic_api(&client, &ns, "postgresql.cnpg.io", "v1", "Cluster");
    assert!(cnpg.get_opt("memu-doomed-db").await.unwrap().is_some());
    assert!(
        clusters
            .get("memu-doomed")
            .await
            .unwrap()
            .metadata
            .finalizers
            .is_some_and(|f| !f.is_empty()),
        "Delete adds a finalizer"
    );
    clusters
        .delete("memu-doomed", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the database and the cluster are gone", || async {
        cnpg.get_opt("memu-doomed-db")
            .await
            .ok()
            .flatten()
            .is_none()
            && clusters
                .get_opt("memu-doomed")
                .await
                .ok()
                .flatten()
                .is_none()
    })
    .await;

    drop(standby);
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn operator_reconciles_samples_against_a_real_api_server() {
    let client = client().await;
    apply_yaml_file(&client, "crds/yaml/memucluster.yaml").await;
    apply_yaml_file(&client, "e2e/k8s/crds/optional-crds.yaml").await;
    let ns = format!("e2e-{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;
    let clusters: Api<MemUCluster> = Api::namespaced(client.clone(), &ns);
    let raw: Api<DynamicObject> = dynamic_api(&client, &ns, "memu.dev", "v1alpha1", "MemUCluster");

    // Invalid specs are rejected by the API server with readable messages.
    let invalid = [
        (json!({"tier": "huge"}), "Unsupported value: \"huge\""),
        (
            json!({"tier": "medium", "database": {"topology": "single"}, "api": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}),
            "minReplicas must not exceed maxReplicas",
        ),
        (
            json!({"tier": "small", "llm": {"extraction": {"provider": "openai", "apiKey": "sk-123"}}}),
            "inline API keys are not allowed",
        ),
        (
            json!({"tier": "large", "database": {"topology": "citus"}}),
            "topology citus needs database.managed.shards",
        ),
        (
            json!({"tier": "small", "api": {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}}}),
            "topology sqlite runs a single replica",
        ),
        (
            json!({"tier": "small", "tracing": {"otlpEndpoint": "otel-collector:4318"}}),
            "otlpEndpoint must be an http:// or https:// URL",
        ),
    ];
    for (i, (spec, message)) in invalid.into_iter().enumerate() {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "memu.dev/v1alpha1", "kind": "MemUCluster",
            "metadata": {"name": format!("bad-{i}")}, "spec": spec,
        }))
        .unwrap();
        let err = raw
            .create(&PostParams::default(), &object)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(message), "{spec}: {err}");
        assert!(
            !err.to_string().contains("sk-123") || message.contains("inline"),
            "{err}"
        );
    }

    // A volume for the small tier's SQLite claim (the test cluster has no provisioner).
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_name = small_sample_volume(&client, &ns).await;

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = operator_kubeconfig(&client, &ns, dir.path()).await;
    let _leader = start_operator(&kubeconfig, &ns, "op-a", "15");
    let _standby = start_operator(&kubeconfig, &ns, "op-b", "15");
    let ssa = PatchParams::apply("memu-e2e").force();
    for name in ["small", "medium", "large"] {
        let mut object = sample(name);
        object["metadata"]["namespace"] = json!(ns);
        let object: MemUCluster = serde_json::from_value(object).unwrap();
        let n = object.metadata.name.clone().unwrap();
        clusters
            .patch(&n, &ssa, &Patch::Apply(&object))
            .await
            .unwrap();
    }

    // Small: a StatefulSet that becomes Ready on a kwok node, status with observedGeneration.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    eventually("small tier Ready", || async {
        clusters.get("memu-small").await.ok().and_then(|c| {
            let status = c.status?;
            Some(
                status.phase.as_deref() == Some("Ready")
                    && status.observed_generation == c.metadata.generation,
            )
        }) == Some(true)
    })
    .await;
    let small = clusters.get("memu-small").await.unwrap();
    let status = small.status.clone().unwrap();
    assert_eq!(status.api.as_ref().unwrap().summary, "1/1");
    for t in [
        "Ready",
        "Reconciling",
        "Stalled",
        "DatabaseReady",
        "Degraded",
    ] {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t} condition"));
        assert_eq!(c.observed_generation, small.metadata.generation);
    }
    let worker = sts.get("memu-small-worker").await.unwrap();
    assert_eq!(
        worker.metadata.owner_references.unwrap()[0].uid,
        small.metadata.uid.clone().unwrap()
    );
    let cm: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let config: WorkerConfig = serde_norway::from_str(
        &cm.get("memu-small-config").await.unwrap().data.unwrap()["worker.yaml"],
    )
    .unwrap();
    config.validate().unwrap();
    assert!(
        Api::<Service>::namespaced(client.clone(), &ns)
            .get("memu-small-api")
            .await
            .is_ok()
    );

    // Medium: Deployments left to their HPAs, PDBs, a migrations Job, the CNPG Cluster.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("medium children", || async {
        deployments.get("memu-medium-pipeline").await.is_ok()
    })
    .await;
    let api = deployments.get("memu-medium-api").await.unwrap();
    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns)
        .get("memu-medium-api")
        .await
        .unwrap();
    assert_eq!(hpa.spec.unwrap().max_replicas, 10);
    assert!(
        Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns)
            .get("memu-medium-api")
            .await
            .is_ok()
    );
    let jobs = Api::<Job>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("memu.dev/cluster=memu-medium"))
        .await
        .unwrap();
    assert_eq!(jobs.items.len(), 1);
    let cnpg: Api<DynamicObject> = dynamic_api(&client, &ns, "postgresql.cnpg.io", "v1", "Cluster");
    let db = cnpg.get("memu-medium-db").await.unwrap();
    assert!(
        db.metadata.owner_references.is_none(),
        "Retain: the database is not garbage-collected"
    );
    // The workers' RLS-bound login: generated once into a basic-auth Secret that CloudNativePG
    // turns into the managed role.
    assert_eq!(
        db.data["spec"]["managed"]["roles"][0]["passwordSecret"]["name"],
        "memu-medium-db-app-role"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let app_role = secrets.get("memu-medium-db-app-role").await.unwrap();
    assert_eq!(app_role.type_.as_deref(), Some("kubernetes.io/basic-auth"));
    let app_password = app_role.data.as_ref().unwrap()["password"].0.clone();
    assert_eq!(app_password.len(), 32);
    eventually("medium reports its database condition", || async {
        clusters
            .get("memu-medium")
            .await
            .ok()
            .and_then(|c| c.status)
            .is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "DatabaseReady"
                        && c.status == "False"
                        && c.reason == "ClusterNotReady"
                })
            })
    })
    .await;

    // Editing the spec rolls the pods through the config hash.
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["memu.dev/config-hash"]
            .clone()
    };
    let before = hash(&api);
    clusters
        .patch(
            "memu-medium",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"llm": {"extraction": {"model": "gpt-4o"}}}})),
        )
        .await
        .unwrap();
    eventually("config hash changes", || async {
        deployments
            .get("memu-medium-api")
            .await
            .map(|d| hash(&d) != before)
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        secrets
            .get("memu-medium-db-app-role")
            .await
            .unwrap()
            .data
            .unwrap()["password"]
            .0,
        app_password,
        "a reconcile never rewrites the generated password"
    );
    eventually("a migrations Job for the new configuration", || async {
        Api::<Job>::namespaced(client.clone(), &ns)
            .list(&ListParams::default().labels("memu.dev/cluster=memu-medium"))
            .await
            .map(|l| l.items.len() == 1 && l.items[0].metadata.name != jobs.items[0].metadata.name)
            .unwrap_or(false)
    })
    .await;

    // New HPA bounds reach the HPA.
    clusters
        .patch(
            "memu-medium",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"api": {"autoscaling": {"minReplicas": 3, "maxReplicas": 12}}}}),
            ),
        )
        .await
        .unwrap();
    eventually("the HPA takes the new bounds", || async {
        Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns)
            .get("memu-medium-api")
            .await
            .ok()
            .and_then(|h| h.spec)
            .is_some_and(|s| s.max_replicas == 12 && s.min_replicas == Some(3))
    })
    .await;

    // Switching from autoscaling to fixed replicas removes the HPA (orphan cleanup).
    clusters
        .patch(
            "memu-medium",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"api": {"autoscaling": null, "replicas": 3}}})),
        )
        .await
        .unwrap();
    eventually("HPA removed and replicas set", || async {
        let hpa_gone = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns)
            .get_opt("memu-medium-api")
            .await
            .map(|h| h.is_none())
            .unwrap_or(false);
        let replicas = deployments
            .get("memu-medium-api")
            .await
            .ok()
            .and_then(|d| d.spec?.replicas);
        hpa_gone && replicas == Some(3)
    })
    .await;

    // Only one of the two operator replicas holds the lease.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let holder = leases
        .get("memu-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    assert!(holder == "op-a" || holder == "op-b");

    // Deleting with Retain keeps the data volume claim and the database.
    clusters
        .delete("memu-small", &DeleteParams::default())
        .await
        .unwrap();
    clusters
        .delete("memu-medium", &DeleteParams::default())
        .await
        .unwrap();
    eventually("owned children garbage-collected", || async {
        sts.get_opt("memu-small-worker")
            .await
            .map(|s| s.is_none())
            .unwrap_or(false)
            && deployments
                .get_opt("memu-medium-api")
                .await
                .map(|d| d.is_none())
                .unwrap_or(false)
    })
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    assert!(
        pvcs.get_opt("data-memu-small-worker-0")
            .await
            .unwrap()
            .is_some(),
        "Retain keeps the data"
    );
    assert!(
        cnpg.get_opt("memu-medium-db").await.unwrap().is_some(),
        "Retain keeps the database"
    );

    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    pvs.delete(&pv_name, &DeleteParams::default())
        .await
        .unwrap();
}

/// Without KEDA the pipeline scales on CPU through an HPA; when KEDA's CRD appears the operator
/// switches it to a ScaledObject on the queue and sweeps the HPA, and fixed replicas sweep the
/// ScaledObject. The test removes the cluster-wide ScaledObject CRD for a while, so it runs in
/// the `optional-crds` test group (`.config/nextest.toml`), never beside the other tests that
/// install or read optional CRDs.
#[tokio::test]
async fn the_pipeline_scales_on_cpu_without_keda_and_on_the_queue_with_it() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let client = client().await;
    apply_yaml_file(&client, "crds/yaml/memucluster.yaml").await;
    apply_yaml_file(&client, "e2e/k8s/crds/optional-crds.yaml").await;
    let ns = format!("e2e-nokeda-{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("scaledobjects.keda.sh", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the ScaledObject CRD is gone", || async {
        crds.get_opt("scaledobjects.keda.sh")
            .await
            .is_ok_and(|c| c.is_none())
    })
    .await;
    // Whatever happens below, the shared API server gets KEDA's CRD back.
    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        switch_between_hpa_and_keda(&client, &ns),
    ))
    .await;
    apply_yaml_file(&client, "e2e/k8s/crds/optional-crds.yaml").await;
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn switch_between_hpa_and_keda(client: &Client, ns: &str) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = operator_kubeconfig(client, ns, dir.path()).await;
    let _operator = start_operator(&kubeconfig, ns, "op-a", "15");
    let clusters: Api<MemUCluster> = Api::namespaced(client.clone(), ns);
    let mut medium = sample("medium");
    medium["metadata"] = json!({"name": "memu-nokeda", "namespace": ns});
    let object: MemUCluster = serde_json::from_value(medium).unwrap();
    let ssa = PatchParams::apply("memu-e2e").force();
    clusters
        .patch("memu-nokeda", &ssa, &Patch::Apply(&object))
        .await
        .unwrap();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
    let cpu_target = |hpa: &HorizontalPodAutoscaler| {
        hpa.spec.as_ref().and_then(|s| {
            s.metrics.as_ref()?.iter().find_map(|m| {
                let r = m.resource.as_ref()?;
                (r.name == "cpu").then_some(r.target.average_utilization)?
            })
        })
    };
    eventually("CPU HPAs for both workloads", || async {
        let pipeline = hpas.get_opt("memu-nokeda-pipeline").await.ok().flatten();
        let api = hpas.get_opt("memu-nokeda-api").await.ok().flatten();
        pipeline.as_ref().and_then(cpu_target) == Some(memu_operator::render::DEFAULT_CPU_TARGET)
            && api.as_ref().and_then(cpu_target) == Some(65)
    })
    .await;
    let pipeline = hpas
        .get("memu-nokeda-pipeline")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!((pipeline.min_replicas, pipeline.max_replicas), (Some(1), 6));

    // KEDA appears: the pipeline moves to a ScaledObject on the queue, its HPA is swept.
    apply_yaml_file(client, "e2e/k8s/crds/optional-crds.yaml").await;
    let scaled: Api<DynamicObject> = dynamic_api(client, ns, "keda.sh", "v1alpha1", "ScaledObject");
    eventually("a ScaledObject replaces the pipeline's HPA", || async {
        scaled
            .get_opt("memu-nokeda-pipeline")
            .await
            .ok()
            .flatten()
            .is_some()
            && hpas
                .get_opt("memu-nokeda-pipeline")
                .await
                .is_ok_and(|h| h.is_none())
    })
    .await;
    assert!(hpas.get_opt("memu-nokeda-api").await.unwrap().is_some());

    // Fixed replicas: the ScaledObject goes too (orphan cleanup of optional kinds).
    clusters
        .patch(
            "memu-nokeda",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pipeline": {"autoscaling": null, "replicas": 2}}})),
        )
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    eventually("ScaledObject swept, replicas fixed", || async {
        let gone = scaled
            .get_opt("memu-nokeda-pipeline")
            .await
            .is_ok_and(|s| s.is_none());
        let replicas = deployments
            .get_opt("memu-nokeda-pipeline")
            .await
            .ok()
            .flatten()
            .and_then(|d| d.spec?.replicas);
        gone && replicas == Some(2)
    })
    .await;
}
