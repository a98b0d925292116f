//! The reconciler: observe → render (pure) → server-side apply → orphan cleanup → status.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use memu_crds::cluster::{
    DeletionPolicy, MemUCluster, MemUClusterStatus, REBALANCE_ANNOTATION, Topology, WorkloadStatus,
};

use crate::admin_key;
use crate::citus;
use crate::metrics::OperatorMetrics;
use crate::render::{self, CLUSTER_LABEL, Capabilities, Desired, MANAGER, SpecError};

const FINALIZER: &str = "memu.dev/cleanup";
const PERIODIC: Duration = Duration::from_secs(300);
const NOT_READY_POLL: Duration = Duration::from_secs(60);
const UNWATCHED_POLL: Duration = Duration::from_secs(10);
/// Reconciles at once: beyond this, more in flight only queue at the API server and hold memory.
const CONCURRENT_RECONCILES: u16 = 8;
/// A burst of child events (a StatefulSet's status moving through its rollout) is one reconcile.
const DEBOUNCE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// How long discovered capabilities are trusted: a CRD installed or removed is noticed within
/// this time, without three API reads per reconcile.
const CAPABILITIES_TTL: Duration = Duration::from_secs(10);

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<OperatorMetrics>,
    /// Capabilities and when they were discovered; one refresh at a time.
    capabilities: tokio::sync::Mutex<Option<(Instant, Capabilities)>>,
    /// Per MemUCluster (by uid: one recreated under the same name starts afresh), the generation
    /// and capabilities its orphans were last swept for. The children it wants change only with
    /// those, so the sweep's lists run only then (and once per cluster after a restart, which
    /// covers an upgraded operator).
    swept: std::sync::Mutex<HashMap<String, (Option<i64>, Capabilities)>>,
    /// Per MemUCluster (by uid), the resourceVersion each child had after the operator's last
    /// apply (by `kind/name`). An apply answered with that same version changed nothing, so
    /// telling changed from unchanged needs no GET before the apply.
    applied: std::sync::Mutex<HashMap<String, HashMap<String, String>>>,
}

/// The children's versions of one MemUCluster as last applied (see `Context::applied`).
pub struct AppliedVersions<'a> {
    ctx: &'a Context,
    cluster_uid: String,
}

impl AppliedVersions<'_> {
    fn get(&self, child: &str) -> Option<String> {
        let applied = self.ctx.applied.lock().expect("applied versions lock");
        applied.get(&self.cluster_uid)?.get(child).cloned()
    }

    fn record(&self, child: String, version: Option<String>) {
        let mut applied = self.ctx.applied.lock().expect("applied versions lock");
        let children = applied.entry(self.cluster_uid.clone()).or_default();
        match version {
            Some(v) => children.insert(child, v),
            None => children.remove(&child),
        };
    }
}

impl Context {
    pub fn new(client: Client, metrics: Arc<OperatorMetrics>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            capabilities: tokio::sync::Mutex::new(None),
            swept: std::sync::Mutex::new(HashMap::new()),
            applied: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn applied_versions(&self, cluster_uid: String) -> AppliedVersions<'_> {
        AppliedVersions {
            ctx: self,
            cluster_uid,
        }
    }

    /// The cluster's capabilities, discovered again once `CAPABILITIES_TTL` has passed.
    async fn capabilities(&self) -> Result<Capabilities, Error> {
        let mut cached = self.capabilities.lock().await;
        if let Some((at, caps)) = *cached
            && at.elapsed() < CAPABILITIES_TTL
        {
            return Ok(caps);
        }
        let caps = discover_capabilities(&self.client).await?;
        *cached = Some((Instant::now(), caps));
        Ok(caps)
    }

    fn needs_sweep(&self, uid: &str, generation: Option<i64>, caps: Capabilities) -> bool {
        self.swept.lock().expect("sweep memo lock").get(uid) != Some(&(generation, caps))
    }

    fn record_sweep(&self, uid: String, generation: Option<i64>, caps: Capabilities) {
        self.swept
            .lock()
            .expect("sweep memo lock")
            .insert(uid, (generation, caps));
    }

    /// Forgets what was memoized for a deleted cluster.
    fn forget(&self, uid: &str) {
        self.swept.lock().expect("sweep memo lock").remove(uid);
        self.applied
            .lock()
            .expect("applied versions lock")
            .remove(uid);
    }
}

/// An API over all namespaces, or over one for a namespace-scoped install.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until the stream ends (or the process is told to stop).
pub async fn run(ctx: Arc<Context>, namespace: Option<&str>) {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels(CLUSTER_LABEL);
    // The cache of MemUClusters keeps no managedFields: the reconciler never reads them, and
    // at thousands of clusters they would be most of the operator's memory.
    let (reader, writer) = reflector::store();
    let clusters = watcher::watcher(
        scoped::<MemUCluster>(&client, namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|cluster: &mut MemUCluster| cluster.managed_fields_mut().clear())
    .reflect(writer)
    .applied_objects();
    Controller::for_stream(clusters, reader)
        .owns(scoped::<Deployment>(&client, namespace), owned.clone())
        .owns(scoped::<StatefulSet>(&client, namespace), owned.clone())
        .owns(scoped::<Service>(&client, namespace), owned.clone())
        .owns(scoped::<ConfigMap>(&client, namespace), owned.clone())
        .owns(
            scoped::<HorizontalPodAutoscaler>(&client, namespace),
            owned.clone(),
        )
        .owns(scoped::<Job>(&client, namespace), owned)
        .with_config(
            controller::Config::default()
                .concurrency(CONCURRENT_RECONCILES)
                .debounce(DEBOUNCE),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile stream item");
            }
        })
        .await;
}

fn error_policy(cluster: Arc<MemUCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(name = %cluster.name_any(), %error, "reconcile failed");
    ctx.metrics.errors.inc();
    Action::requeue(Duration::from_secs(15))
}

pub async fn reconcile(cluster: Arc<MemUCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cluster.namespace().unwrap_or_else(|| "default".into());
    let api: Api<MemUCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let result = if cluster.spec.deletion_policy == DeletionPolicy::Delete
        || cluster.finalizers().iter().any(|f| f == FINALIZER)
    {
        finalizer(&api, FINALIZER, cluster, |event| async {
            match event {
                Finalizer::Apply(c) => apply(c, ctx.clone()).await,
                Finalizer::Cleanup(c) => cleanup(c, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(e.to_string()))
    } else {
        apply(cluster, ctx.clone()).await
    };
    ctx.metrics.observe(started.elapsed(), result.is_ok());
    result
}

async fn discover_capabilities(client: &Client) -> Result<Capabilities, Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    Ok(Capabilities {
        cnpg: crds.get_opt("clusters.postgresql.cnpg.io").await?.is_some(),
        service_monitor: crds
            .get_opt("servicemonitors.monitoring.coreos.com")
            .await?
            .is_some(),
        keda: crds.get_opt("scaledobjects.keda.sh").await?.is_some(),
    })
}

async fn apply(cluster: Arc<MemUCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = cluster.namespace().unwrap_or_else(|| "default".into());
    let name = cluster.name_any();
    let generation = cluster.metadata.generation;
    if cluster.spec.paused {
        let mut status = cluster.status.clone().unwrap_or_default();
        status.phase = Some("Paused".into());
        set_condition(
            &mut status.conditions,
            "Reconciling",
            "False",
            "Paused",
            "spec.paused is true: children are left as they are",
            generation,
        );
        patch_status(client, &ns, &name, &status, generation).await?;
        ctx.metrics.record_cluster(&cluster, &status);
        return Ok(Action::requeue(PERIODIC));
    }
    let caps = ctx.capabilities().await?;
    let mut desired = match render::desired(&cluster, caps) {
        Ok(d) => d,
        Err(SpecError { reason, message }) => {
            let mut status = cluster.status.clone().unwrap_or_default();
            status.phase = Some("Failed".into());
            set_condition(
                &mut status.conditions,
                "Stalled",
                "True",
                reason,
                &message,
                generation,
            );
            set_condition(
                &mut status.conditions,
                "Ready",
                "False",
                reason,
                &message,
                generation,
            );
            set_condition(
                &mut status.conditions,
                "Reconciling",
                "False",
                reason,
                &message,
                generation,
            );
            patch_status(client, &ns, &name, &status, generation).await?;
            ctx.metrics.record_cluster(&cluster, &status);
            publish(&ctx, &cluster, EventType::Warning, reason, &message).await;
            return Ok(Action::requeue(PERIODIC));
        }
    };
    let admin_key_version = ensure_admin_key(&ctx, &ns, &cluster).await?;
    render::stamp_admin_key_version(&mut desired, &admin_key_version);
    if is_managed_citus(&cluster) {
        ensure_login(
            client,
            &ns,
            &render::citus_credentials(&cluster, &new_password()),
        )
        .await?;
    }
    if render::uses_cnpg(&cluster) && caps.cnpg {
        ensure_login(
            client,
            &ns,
            &render::app_role_secret(&cluster, &new_password()),
        )
        .await?;
    }
    if render::managed_cache(&cluster).is_some() {
        ensure_login(
            client,
            &ns,
            &render::cache_secret(&cluster, &new_password()),
        )
        .await?;
    }
    let uid = cluster.uid().unwrap_or_default();
    let versions = ctx.applied_versions(uid.clone());
    let changed = apply_all(client, &ns, &desired, &versions).await?;
    let removed = if ctx.needs_sweep(&uid, generation, caps) {
        let removed = remove_orphans(client, &ns, &name, &desired, caps).await?;
        ctx.record_sweep(uid, generation, caps);
        removed
    } else {
        0
    };
    if changed + removed > 0 {
        publish(
            &ctx,
            &cluster,
            EventType::Normal,
            "Applied",
            &format!("applied {changed} changed and removed {removed} stale child objects"),
        )
        .await;
    }
    let status = observe(client, &ns, &cluster, &desired, caps).await?;
    patch_status(client, &ns, &name, &status, generation).await?;
    ctx.metrics.record_cluster(&cluster, &status);
    let ready = status.phase.as_deref() == Some("Ready");
    Ok(Action::requeue(if ready {
        PERIODIC
    } else if render::uses_cnpg(&cluster) && caps.cnpg {
        // The CloudNativePG Cluster is not watched: poll it while it comes up.
        UNWATCHED_POLL
    } else {
        // Every other child is watched and triggers a reconcile when it changes; this poll
        // only covers a lost event. (Polling thousands of unready clusters every few seconds
        // would load the API server more than all the watches do.)
        NOT_READY_POLL
    }))
}

fn is_managed_citus(cluster: &MemUCluster) -> bool {
    cluster.spec.topology() == Topology::Citus && cluster.spec.database.external.is_none()
}

fn new_password() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// Creates a generated database login Secret once; an existing one is kept (rewriting it would
/// lock the running database or workers out).
async fn ensure_login(client: &Client, ns: &str, login: &Secret) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = login.metadata.name.as_deref().unwrap_or_default();
    if api.get_metadata_opt(name).await?.is_some() {
        return Ok(());
    }
    match api.create(&PostParams::default(), login).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates the admin-key Secret once with a generated key (see `admin_key.rs`); an existing one
/// is kept as it is. Returns the Secret's version, which rolls the workers when it changes. The
/// key itself goes only into the Secret: never into a log, an event or the status.
async fn ensure_admin_key(ctx: &Context, ns: &str, cluster: &MemUCluster) -> Result<String, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = render::admin_key_name(cluster);
    let plan = admin_key::plan(cluster, api.get_opt(&name).await?, admin_key::generate);
    let event = plan.event(&name);
    let (stored, event) = match plan {
        admin_key::Plan::Create(secret) => {
            match api.create(&PostParams::default(), &secret).await {
                Ok(created) => (created, event),
                // Another reconcile (e.g. a previous leader's) created it first: that one stays.
                Err(kube::Error::Api(e)) if e.code == 409 => (api.get(&name).await?, None),
                Err(e) => return Err(e.into()),
            }
        }
        admin_key::Plan::Keep(s) | admin_key::Plan::KeepUnusable(s) => (s, event),
    };
    if let Some((type_, reason, note)) = event {
        publish(ctx, cluster, type_, reason, &note).await;
    }
    Ok(render::secret_version(&stored))
}

/// The `CacheReady` condition when `spec.cache` is set; true when there is nothing to wait for.
async fn observe_cache(
    client: &Client,
    ns: &str,
    cluster: &MemUCluster,
    status: &mut MemUClusterStatus,
) -> Result<bool, Error> {
    let Some(cache) = &cluster.spec.cache else {
        status.conditions.retain(|c| c.type_ != "CacheReady");
        return Ok(true);
    };
    let (ready, reason, message) = if cache.managed.is_some() {
        let name = render::cache_name(cluster);
        let ready = stateful_set_ready(client, ns, &name).await? > 0;
        (
            ready,
            if ready {
                "ManagedReady"
            } else {
                "ManagedNotReady"
            },
            format!(
                "managed Redis StatefulSet {name} {}",
                if ready { "ready" } else { "not ready yet" }
            ),
        )
    } else {
        (
            true,
            "External",
            "external Redis referenced by Secret".to_string(),
        )
    };
    set_condition(
        &mut status.conditions,
        "CacheReady",
        if ready { "True" } else { "False" },
        reason,
        &message,
        cluster.metadata.generation,
    );
    Ok(ready)
}

/// Ready replicas of a StatefulSet (0 when absent).
async fn stateful_set_ready(client: &Client, ns: &str, name: &str) -> Result<i32, Error> {
    Ok(Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
        .and_then(|s| s.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0))
}

/// Managed Citus: all nodes ready, then `pg_dist_node` converged on the desired workers.
/// Returns (ready, reason, message) for `DatabaseReady`.
async fn observe_citus(
    client: &Client,
    ns: &str,
    cluster: &MemUCluster,
    status: &mut MemUClusterStatus,
) -> Result<(bool, &'static str, String), Error> {
    let desired = render::citus_workers(cluster);
    let mut citus = status.citus.clone().unwrap_or_default();
    citus.desired_workers = desired.len() as i32;
    let mut nodes_ready = 0;
    for i in 0..render::citus_shards(cluster) {
        let sts = render::citus_name(cluster, &format!("worker-{i}"));
        nodes_ready += stateful_set_ready(client, ns, &sts).await?.min(1);
    }
    let coordinator_ready =
        stateful_set_ready(client, ns, &render::citus_name(cluster, "coordinator")).await? > 0;
    if !coordinator_ready || nodes_ready < citus.desired_workers {
        status.citus = Some(citus.clone());
        return Ok((
            false,
            "NodesNotReady",
            format!(
                "Citus coordinator {}, workers {nodes_ready}/{} ready",
                if coordinator_ready {
                    "ready"
                } else {
                    "not ready"
                },
                citus.desired_workers
            ),
        ));
    }
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&render::citus_name(cluster, "credentials"))
        .await?;
    let field = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    };
    let coordinator = citus::Coordinator {
        host: format!("{}.{ns}.svc", render::citus_name(cluster, "coordinator")),
        port: 5432,
        user: field("username"),
        password: field("password"),
        database: field("dbname"),
    };
    let requested = cluster.annotations().get(REBALANCE_ANNOTATION).cloned();
    let rebalance = requested.is_some() && requested != citus.last_rebalance;
    let result = citus::sync(&coordinator, &desired, rebalance).await;
    let outcome = match result {
        Ok(m) => {
            citus.registered_workers = m.registered as i32;
            if rebalance {
                citus.last_rebalance = requested;
            }
            let ready = m.registered == m.desired;
            (
                ready,
                if ready {
                    "WorkersRegistered"
                } else {
                    "MembershipPending"
                },
                format!(
                    "{}/{} Citus workers registered; {} membership changes applied",
                    m.registered,
                    m.desired,
                    m.applied.len()
                ),
            )
        }
        Err(e @ citus::CitusError::Unreachable(_)) => {
            (false, "CoordinatorUnreachable", e.to_string())
        }
        Err(e) => (false, "MembershipFailed", e.to_string()),
    };
    status.citus = Some(citus);
    Ok(outcome)
}

async fn publish(ctx: &Context, cluster: &MemUCluster, type_: EventType, reason: &str, note: &str) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

/// Server-side applies one object through `api`; true when the server's copy changed. The
/// version before is the one this operator last saw, read from the server only the first time.
async fn apply_object<K>(
    api: Api<K>,
    child: String,
    object: &K,
    versions: &AppliedVersions<'_>,
) -> Result<bool, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let before = match versions.get(&child) {
        Some(version) => Some(version),
        None => api
            .get_opt(&name)
            .await?
            .and_then(|o| o.meta().resource_version.clone()),
    };
    let after = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?;
    let version = after.meta().resource_version.clone();
    versions.record(child, version.clone());
    Ok(before != version)
}

/// Server-side applies one typed child.
async fn ssa<K>(
    client: &Client,
    ns: &str,
    object: &K,
    versions: &AppliedVersions<'_>,
) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let child = format!("{}/{}", K::kind(&()), object.name_any());
    apply_object(Api::namespaced(client.clone(), ns), child, object, versions).await
}

/// Server-side applies a dynamic child (CloudNativePG Cluster, ServiceMonitor, KEDA objects).
async fn ssa_dynamic(
    client: &Client,
    ns: &str,
    resource: &ApiResource,
    object: &kube::api::DynamicObject,
    versions: &AppliedVersions<'_>,
) -> Result<bool, Error> {
    let child = format!("{}/{}", resource.kind, object.name_any());
    let api = Api::namespaced_with(client.clone(), ns, resource);
    apply_object(api, child, object, versions).await
}

/// Applies every child, in three steps so that what the pods read exists before they start:
/// identity, configuration and services; then migration Jobs; then the workloads and what
/// scales and guards them. Within a step the objects are applied concurrently (a reconcile's
/// latency is its API round trips).
async fn apply_all(
    client: &Client,
    ns: &str,
    d: &Desired,
    versions: &AppliedVersions<'_>,
) -> Result<usize, Error> {
    type Applying<'a> = futures::future::BoxFuture<'a, Result<bool, Error>>;
    async fn step(applying: Vec<Applying<'_>>) -> Result<usize, Error> {
        let changed = futures::future::try_join_all(applying).await?;
        Ok(changed.into_iter().filter(|c| *c).count())
    }
    let mut first: Vec<Applying> = Vec::new();
    first.extend(
        d.service_account
            .iter()
            .map(|o| ssa(client, ns, o, versions).boxed()),
    );
    first.extend(
        d.config_map
            .iter()
            .map(|o| ssa(client, ns, o, versions).boxed()),
    );
    first.extend(
        d.services
            .iter()
            .map(|o| ssa(client, ns, o, versions).boxed()),
    );
    let mut changed = step(first).await?;

    // Jobs are immutable once created: apply only when absent.
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let jobs = &jobs;
    let applying: Vec<Applying> = d
        .jobs
        .iter()
        .map(|o| {
            async move {
                let name = o.meta().name.as_deref().unwrap_or_default();
                if jobs.get_metadata_opt(name).await?.is_some() {
                    return Ok(false);
                }
                ssa(client, ns, o, versions).await
            }
            .boxed()
        })
        .collect();
    changed += step(applying).await?;

    let mut last: Vec<Applying> = Vec::new();
    last.extend(
        d.stateful_sets
            .iter()
            .map(|o| ssa(client, ns, o, versions).boxed()),
    );
    last.extend(
        d.deployments
            .iter()
            .map(|o| ssa(client, ns, o, versions).boxed()),
    );
    last.extend(d.hpas.iter().map(|o| ssa(client, ns, o, versions).boxed()));
    last.extend(d.pdbs.iter().map(|o| ssa(client, ns, o, versions).boxed()));
    last.extend(
        d.dynamic
            .iter()
            .map(|(resource, o)| ssa_dynamic(client, ns, resource, o, versions).boxed()),
    );
    changed += step(last).await?;
    Ok(changed)
}

/// Deletes children of this cluster (by label) that the spec no longer wants.
async fn remove_orphans(
    client: &Client,
    ns: &str,
    name: &str,
    d: &Desired,
    caps: Capabilities,
) -> Result<usize, Error> {
    async fn sweep<K>(api: Api<K>, name: &str, keep: BTreeSet<String>) -> Result<usize, Error>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let mut removed = 0;
        for o in api
            .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")))
            .await?
        {
            let n = o.meta().name.clone().unwrap_or_default();
            // Only what this operator manages: it carries our managed-by label.
            let ours = o
                .meta()
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                .is_some_and(|m| m == MANAGER);
            if ours && !keep.contains(&n) {
                api.delete(&n, &DeleteParams::background()).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
    fn names<'a, K: Resource + 'a>(objects: impl IntoIterator<Item = &'a K>) -> BTreeSet<String> {
        objects
            .into_iter()
            .filter_map(|o| o.meta().name.clone())
            .collect()
    }
    fn api<K>(client: &Client, ns: &str) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(client.clone(), ns)
    }
    let mut removed = 0;
    removed += sweep::<Deployment>(api(client, ns), name, names(&d.deployments)).await?;
    removed += sweep::<StatefulSet>(api(client, ns), name, names(&d.stateful_sets)).await?;
    removed += sweep::<Service>(api(client, ns), name, names(&d.services)).await?;
    removed += sweep::<HorizontalPodAutoscaler>(api(client, ns), name, names(&d.hpas)).await?;
    removed += sweep::<PodDisruptionBudget>(api(client, ns), name, names(&d.pdbs)).await?;
    removed += sweep::<Job>(api(client, ns), name, names(&d.jobs)).await?;
    removed += sweep::<ConfigMap>(api(client, ns), name, names(&d.config_map)).await?;
    removed += sweep::<ServiceAccount>(api(client, ns), name, names(&d.service_account)).await?;
    // Optional kinds, where their CRD is installed. Never the CloudNativePG Cluster: it holds
    // the data and goes only by the deletion policy.
    for (group, version, kind, installed) in [
        ("keda.sh", "v1alpha1", "ScaledObject", caps.keda),
        ("keda.sh", "v1alpha1", "TriggerAuthentication", caps.keda),
        (
            "monitoring.coreos.com",
            "v1",
            "ServiceMonitor",
            caps.service_monitor,
        ),
    ] {
        if !installed {
            continue;
        }
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let keep = names(
            d.dynamic
                .iter()
                .filter(|(a, _)| a.kind == kind)
                .map(|(_, o)| o),
        );
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar);
        removed += sweep(api, name, keep).await?;
    }
    Ok(removed)
}

/// Deletion with `deletionPolicy: Delete`: the database and the data volumes go too.
async fn cleanup(cluster: Arc<MemUCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cluster.namespace().unwrap_or_else(|| "default".into());
    let name = cluster.name_any();
    ctx.metrics.forget_cluster(&ns, &name);
    ctx.forget(&cluster.uid().unwrap_or_default());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    pvcs.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels(&format!("{CLUSTER_LABEL}={name}")),
    )
    .await?;
    if ctx.capabilities().await?.cnpg {
        let ar = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "postgresql.cnpg.io",
            "v1",
            "Cluster",
        ));
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
        if api.get_opt(&render::cnpg_name(&cluster)).await?.is_some() {
            api.delete(&render::cnpg_name(&cluster), &DeleteParams::background())
                .await?;
        }
    }
    publish(
        &ctx,
        &cluster,
        EventType::Normal,
        "Deleted",
        "deletionPolicy Delete: removed the database and data volumes",
    )
    .await;
    Ok(Action::await_change())
}

fn workload_status(
    cluster: &MemUCluster,
    component: &str,
    desired: i32,
    ready: i32,
) -> WorkloadStatus {
    WorkloadStatus {
        desired_replicas: desired,
        ready_replicas: ready,
        summary: format!("{ready}/{desired}"),
        selector: render::selector_string(cluster, component),
    }
}

/// Reads the children back and computes phase and conditions.
async fn observe(
    client: &Client,
    ns: &str,
    cluster: &MemUCluster,
    d: &Desired,
    caps: Capabilities,
) -> Result<MemUClusterStatus, Error> {
    let generation = cluster.metadata.generation;
    let mut status = cluster.status.clone().unwrap_or_default();
    let mut all_ready = true;
    let mut degraded = Vec::new();
    // The SQLite tier's single worker (other StatefulSets are Citus nodes or the cache).
    if let Some(sts) = d
        .stateful_sets
        .iter()
        .find(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(render::COMPONENT_LABEL))
                .is_some_and(|c| c == "worker")
        })
        .filter(|_| cluster.spec.topology() == Topology::Sqlite)
    {
        let live = Api::<StatefulSet>::namespaced(client.clone(), ns)
            .get_opt(sts.metadata.name.as_deref().unwrap_or_default())
            .await?;
        let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = live
            .and_then(|s| s.status)
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        all_ready &= ready >= want;
        status.api = Some(workload_status(cluster, "worker", want, ready));
        status.pipeline = Some(workload_status(cluster, "worker", want, ready));
    }
    for dep in &d.deployments {
        let n = dep.metadata.name.clone().unwrap_or_default();
        let live = Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(&n)
            .await?;
        let live_status = live
            .as_ref()
            .and_then(|l| l.status.clone())
            .unwrap_or_default();
        let want = dep
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .or_else(|| {
                live.as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.replicas)
            })
            .unwrap_or(1);
        let ready = live_status.ready_replicas.unwrap_or(0);
        let updated = live_status.updated_replicas.unwrap_or(0);
        all_ready &= ready >= want && updated >= want;
        if ready < want && ready > 0 {
            degraded.push(format!("{n}: {ready}/{want} ready"));
        }
        let component = if n.ends_with("-api") {
            "api"
        } else {
            "pipeline"
        };
        let ws = workload_status(cluster, component, want, ready);
        if component == "api" {
            status.api = Some(ws)
        } else {
            status.pipeline = Some(ws)
        }
    }
    let (db_ready, db_reason, db_message) = match cluster.spec.topology() {
        Topology::Sqlite => (
            true,
            "Embedded",
            "SQLite on the worker's volume".to_string(),
        ),
        _ if cluster.spec.database.external.is_some() => (
            true,
            "External",
            "external database referenced by Secret".to_string(),
        ),
        Topology::Citus => observe_citus(client, ns, cluster, &mut status).await?,
        _ if caps.cnpg => {
            let (ar, obj) = d
                .dynamic
                .iter()
                .find(|(ar, _)| ar.kind == "Cluster")
                .expect("managed database rendered");
            let live = Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), ns, ar)
                .get_opt(obj.metadata.name.as_deref().unwrap_or_default())
                .await?;
            let want = obj.data["spec"]["instances"].as_i64().unwrap_or(1);
            let ready = live
                .and_then(|l| l.data["status"]["readyInstances"].as_i64())
                .unwrap_or(0);
            (
                ready >= want,
                if ready >= want {
                    "ClusterReady"
                } else {
                    "ClusterNotReady"
                },
                format!("CloudNativePG cluster {ready}/{want} instances ready"),
            )
        }
        _ => (
            false,
            "CloudNativePGMissing",
            "CloudNativePG is not installed".to_string(),
        ),
    };
    set_condition(
        &mut status.conditions,
        "DatabaseReady",
        if db_ready { "True" } else { "False" },
        db_reason,
        &db_message,
        generation,
    );
    let cache_ready = observe_cache(client, ns, cluster, &mut status).await?;
    // A missing certificate Secret keeps the API pods from starting: say which one.
    let tls_missing = match render::tls_secret_name(cluster) {
        Some(secret) => {
            let exists = Api::<Secret>::namespaced(client.clone(), ns)
                .get_metadata_opt(secret)
                .await?
                .is_some();
            render::tls_secret_condition(cluster, exists)
        }
        None => None,
    };
    let ready = all_ready && db_ready && cache_ready && tls_missing.is_none();
    status.phase = Some(
        if ready {
            "Ready"
        } else if !degraded.is_empty() {
            "Degraded"
        } else {
            "Provisioning"
        }
        .into(),
    );
    let (ready_reason, ready_message) = match &tls_missing {
        Some((reason, message)) => (*reason, message.as_str()),
        None if ready => ("AllReplicasReady", "all workloads ready"),
        None if all_ready && db_ready => ("Progressing", "waiting for the cache"),
        None => ("Progressing", "waiting for workloads and database"),
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        if ready { "True" } else { "False" },
        ready_reason,
        ready_message,
        generation,
    );
    set_condition(
        &mut status.conditions,
        "Reconciling",
        if ready { "False" } else { "True" },
        if ready { "Reconciled" } else { "Progressing" },
        // kstatus (Flux) shows this message while InProgress: say what it waits for.
        if ready {
            "children applied"
        } else {
            ready_message
        },
        generation,
    );
    set_condition(
        &mut status.conditions,
        "Stalled",
        "False",
        "Reconciled",
        "the spec can be realised",
        generation,
    );
    set_condition(
        &mut status.conditions,
        "Degraded",
        if degraded.is_empty() { "False" } else { "True" },
        if degraded.is_empty() {
            "AllAvailable"
        } else {
            "ReplicasUnavailable"
        },
        &if degraded.is_empty() {
            "all workloads available".to_string()
        } else {
            degraded.join("; ")
        },
        generation,
    );
    render::identify(cluster, &mut status);
    Ok(status)
}

/// Sets a condition, keeping `lastTransitionTime` when the status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: generation,
            last_transition_time: now,
        }),
    }
}

async fn patch_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: &MemUClusterStatus,
    generation: Option<i64>,
) -> Result<(), Error> {
    let mut status = status.clone();
    status.observed_generation = generation;
    let api: Api<MemUCluster> = Api::namespaced(client.clone(), ns);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}
