use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use clap::Parser;
use memu_operator::leader::LeaderElector;
use memu_operator::metrics::{KubeRequestLabels, OperatorMetrics};
use memu_operator::reconcile::{self, Context};

/// memU operator: reconciles MemUClusters.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address of /metrics and /healthz.
    #[arg(
        long,
        env = "MEMU_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8081"
    )]
    metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "memu-operator")]
    lease_name: String,
    /// Identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Reconcile MemUClusters of this namespace only (a namespace-scoped install);
    /// all namespaces when unset.
    #[arg(long, env = "MEMU_OPERATOR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // One crypto provider for the whole process (kube's client panics with two).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let identity = args
        .identity
        .unwrap_or_else(|| format!("memu-operator-{}", std::process::id()));
    let metrics = Arc::new(OperatorMetrics::default());
    // Every request to the API server is counted, so its cost per reconcile is visible.
    let count_requests = tower::util::MapRequestLayer::new({
        let requests = metrics.kube_requests.clone();
        move |request: http::Request<kube::client::Body>| {
            requests
                .get_or_create(&KubeRequestLabels::of(&request))
                .inc();
            request
        }
    });
    let client = kube::client::ClientBuilder::try_from(kube::Config::infer().await?)?
        .with_layer(&count_requests)
        .build();

    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get({
                let metrics = metrics.clone();
                move || async move { metrics.encode() }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    tokio::spawn(prune_cluster_metrics(
        client.clone(),
        metrics.clone(),
        args.watch_namespace.clone(),
    ));

    let lease = Duration::from_secs(args.lease_seconds);
    let elector = LeaderElector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        lease,
    );
    tracing::info!(%identity, "waiting for leadership");
    elector.acquire(lease / 3).await;
    metrics.leader.set(1);
    tracing::info!(%identity, "leading: reconciling MemUClusters");
    let ctx = Arc::new(Context::new(client, metrics));
    tokio::select! {
        _ = reconcile::run(ctx, args.watch_namespace.as_deref()) => tracing::info!("controller stopped"),
        _ = elector.keep(lease / 3) => {
            // Another replica may lead now: stop writing at once and let Kubernetes restart us.
            tracing::error!("lost the leader lease; exiting");
            std::process::exit(1);
        }
    }
    Ok(())
}

/// Drops the per-cluster gauges of deleted MemUClusters once a minute: a MemUCluster without
/// finalizer (deletionPolicy Retain) is never reconciled on deletion.
async fn prune_cluster_metrics(
    client: kube::Client,
    metrics: Arc<OperatorMetrics>,
    namespace: Option<String>,
) {
    use kube::api::{Api, ListParams};
    use memu_crds::cluster::MemUCluster;
    let api: Api<MemUCluster> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let listed_at = std::time::Instant::now();
        match api.list_metadata(&ListParams::default()).await {
            Ok(list) => {
                let existing = list
                    .items
                    .into_iter()
                    .map(|o| {
                        (
                            o.metadata.namespace.unwrap_or_default(),
                            o.metadata.name.unwrap_or_default(),
                        )
                    })
                    .collect();
                metrics.retain_clusters(&existing, listed_at);
            }
            Err(e) => tracing::debug!(error = %e, "cannot list MemUClusters to prune metrics"),
        }
    }
}
