//! The operator at scale against the real API server of the e2e harness
//! (`MEMU_TEST_KUBECONFIG`, started by `e2e/k8s/start.sh`): N MemUClusters are created at once,
//! then all of them changed at once. Reported per phase: the time until every MemUCluster's
//! `status.observedGeneration` is current, reconcile latency p50/p99 (the operator's own
//! histogram, interpolated within its buckets), reconciles, and Kubernetes API requests per
//! reconcile (the operator's request counter); for the run, the operator's peak RSS.
//!
//! The operator is the binary beside this one (`scripts/bench.sh` builds both), reconciling
//! one namespace of its own.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use memu_crds::cluster::MemUCluster;
use serde_json::{Value, json};

use crate::common::{Size, bucket_delta, histogram_buckets, metric_sum, quantile};

const CREATE_CONCURRENCY: usize = 16;

/// The operator process, killed when dropped.
struct OperatorProcess {
    child: Child,
    metrics_url: String,
}

impl OperatorProcess {
    fn spawn(kubeconfig: &str, namespace: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let binary = exe.with_file_name("memu-operator");
        anyhow::ensure!(
            binary.exists(),
            "{} is missing: build it in the same profile (scripts/bench.sh does)",
            binary.display()
        );
        let port = memu_e2e::free_port();
        let child = Command::new(binary)
            .args([
                "--watch-namespace",
                namespace,
                "--lease-namespace",
                namespace,
                "--identity",
                "memu-bench",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self {
            child,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
        })
    }

    /// Resident memory now and at its peak, in MiB (`/proc/<pid>/status`).
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kib| kib.parse::<f64>().ok())
                .map_or(f64::NAN, |kib| kib / 1024.0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    async fn scrape(&self) -> String {
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(&self.metrics_url).await
                && let Ok(text) = r.text().await
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the operator's /metrics never answered");
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client(kubeconfig: &str) -> anyhow::Result<Client> {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = MemUCluster::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("memu-bench").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    for _ in 0..120 {
        let established = crds
            .get(&name)
            .await?
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("CRD {name} never became established")
}

/// How many MemUClusters have a current `observedGeneration`.
async fn current(api: &Api<MemUCluster>) -> anyhow::Result<usize> {
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .iter()
        .filter(|c| {
            c.status.as_ref().and_then(|s| s.observed_generation) == c.metadata.generation
                && c.metadata.generation.is_some()
        })
        .count())
}

/// Waits until all `n` are current, sampling the operator's memory; seconds since `started`,
/// or `None` when `limit` passed first.
async fn wait_current(
    api: &Api<MemUCluster>,
    n: usize,
    started: Instant,
    limit: Duration,
    operator: &OperatorProcess,
    peak_rss: &mut f64,
) -> anyhow::Result<Option<f64>> {
    loop {
        let (rss, _) = operator.rss_mib();
        *peak_rss = peak_rss.max(rss);
        if current(api).await? == n {
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        if started.elapsed() > limit {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The operator's figures between two scrapes.
fn phase_figures(before: &str, after: &str, seconds: Option<f64>) -> Value {
    let name = "memu_operator_reconcile_duration_seconds";
    let delta = bucket_delta(
        &histogram_buckets(before, name),
        &histogram_buckets(after, name),
    );
    let counted = |metric: &str| metric_sum(after, metric) - metric_sum(before, metric);
    let reconciles = counted("memu_operator_reconciles_total");
    let requests = counted("memu_operator_kube_requests_total");
    json!({
        "seconds_until_observed_generation_current": seconds,
        "reconciles": reconciles,
        "reconcile_errors": counted("memu_operator_reconcile_errors_total"),
        "reconcile_p50_ms": quantile(&delta, 0.50).map(|s| s * 1e3),
        "reconcile_p99_ms": quantile(&delta, 0.99).map(|s| s * 1e3),
        "api_requests": requests,
        "api_requests_per_reconcile": requests / reconciles.max(1.0),
    })
}

pub async fn run(size: Size) -> anyhow::Result<Value> {
    let Ok(kubeconfig) = std::env::var("MEMU_TEST_KUBECONFIG") else {
        eprintln!("operator: skipped (MEMU_TEST_KUBECONFIG names no API server)");
        return Ok(json!({"skipped": "MEMU_TEST_KUBECONFIG not set"}));
    };
    let (n, limit) = match size {
        Size::Smoke => (20, Duration::from_secs(300)),
        Size::Full => (2_000, Duration::from_secs(600)),
    };
    let client = client(&kubeconfig).await?;
    install_crd(&client).await?;
    let namespace = format!(
        "memu-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}}))?,
        )
        .await?;
    let operator = OperatorProcess::spawn(&kubeconfig, &namespace)?;
    let idle = operator.scrape().await;
    let (idle_rss, _) = operator.rss_mib();
    let api: Api<MemUCluster> = Api::namespaced(client.clone(), &namespace);
    let mut peak_rss = idle_rss;
    eprintln!("operator: creating {n} MemUClusters in {namespace}");

    // Phase 1: N small-tier MemUClusters created at once.
    let started = Instant::now();
    let created: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let cluster: MemUCluster = serde_json::from_value(json!({
                    "apiVersion": "memu.dev/v1alpha1", "kind": "MemUCluster",
                    "metadata": {"name": format!("bench-{i:04}")},
                    "spec": {"tier": "small", "database": {"storageSize": "1Gi"}},
                }))?;
                api.create(&PostParams::default(), &cluster).await?;
                Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let create_seconds = started.elapsed().as_secs_f64();
    let seconds = wait_current(&api, n, started, limit, &operator, &mut peak_rss).await?;
    // Let the status-driven reconciles that follow settle before the phase is counted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_create = operator.scrape().await;
    let create = phase_figures(&idle, &after_create, seconds);
    eprintln!("operator: created: {create}");

    // Phase 2: every spec changed at once (a new generation each).
    let started = Instant::now();
    let patched: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.patch(
                    &format!("bench-{i:04}"),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"vector": {"hnswEfSearch": 120}}})),
                )
                .await?;
                Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    patched.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let seconds = wait_current(&api, n, started, limit, &operator, &mut peak_rss).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_update = operator.scrape().await;
    let update = phase_figures(&after_create, &after_update, seconds);
    eprintln!("operator: updated: {update}");
    let (_, hwm) = operator.rss_mib();

    // Clean up while the operator still runs to remove its finalizers.
    let deleting = Instant::now();
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    while deleting.elapsed() < limit
        && !api
            .list(&ListParams::default().limit(1))
            .await?
            .items
            .is_empty()
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let delete_seconds = deleting.elapsed().as_secs_f64();
    drop(operator);
    namespaces
        .delete(&namespace, &DeleteParams::default())
        .await?;
    Ok(json!({
        "memuclusters": n,
        "tier": "small",
        "create_requests_seconds": create_seconds,
        "create": create,
        "update": update,
        "delete_seconds": delete_seconds,
        "operator_idle_rss_mib": idle_rss,
        "operator_peak_rss_mib": hwm.max(peak_rss),
    }))
}
