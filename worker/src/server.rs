//! Process wiring: build the providers, store and service from the configuration, then serve
//! the role's listeners and pipeline until SIGTERM, draining in-flight work.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use memu_crds::worker::WorkerConfig;

use crate::api;
use crate::metrics::Metrics;
use crate::pipeline;
use crate::providers::build_embedder;
use crate::service::{LlmModels, MemoryService, embedding_space};
use crate::store;

/// Installs the process-wide rustls crypto provider (ring) once; reqwest and sqlx use it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds the service: embedder, store (migrated when `auto_migrate`), metrics.
pub async fn build_service(
    config: WorkerConfig,
    migrate: bool,
) -> anyhow::Result<Arc<MemoryService>> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let embedder = build_embedder(&config, metrics.clone())?;
    let space = embedding_space(&config, embedder.as_ref());
    let store = store::open(&config, space).await?;
    if migrate {
        store.migrate().await.context("database migration failed")?;
    }
    let llm = LlmModels::from_config(&config, metrics.clone())?;
    let redis_url = crate::config::read_secret(
        &config.cache.redis_url_env,
        config.cache.redis_url_file.as_deref(),
    )?;
    let redis: Option<Arc<dyn crate::cache::Cache>> = match redis_url {
        Some(url) => Some(Arc::new(crate::cache::RedisCache::connect(&url).await?)),
        None => None,
    };
    let service = MemoryService::new(config, store, embedder, metrics)
        .with_llm(llm)
        .with_cache(redis);
    if service.access.install_bootstrap_key().await? {
        tracing::info!("bootstrap admin key installed (tenant system)");
    }
    Ok(Arc::new(service))
}

/// Authentication may be off only where nobody else can connect: the API on loopback.
pub fn check_auth_exposure(config: &WorkerConfig) -> anyhow::Result<()> {
    if config.auth.mode != memu_crds::worker::AuthMode::Disabled || !config.role.serves_api() {
        return Ok(());
    }
    let loopback = config
        .server
        .listen
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| config.server.listen.starts_with("localhost:"));
    match loopback {
        true => {
            tracing::warn!("auth.mode is disabled: every request acts as tenant `default`");
            Ok(())
        }
        false => anyhow::bail!(
            "auth.mode disabled is only allowed when server.listen is a loopback address, not {}",
            config.server.listen
        ),
    }
}

/// The certificate and key of `server.tls`; the error names the files, never their content.
async fn load_certificate(
    tls: &memu_crds::worker::TlsConfig,
) -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
    axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert_file, &tls.key_file)
        .await
        .with_context(|| {
            format!(
                "cannot load the TLS certificate {} with key {} (server.tls)",
                tls.cert_file.display(),
                tls.key_file.display()
            )
        })
}

/// Re-reads the certificate every `reload_secs` (a renewed Secret is served without a
/// restart); a file that does not load keeps the certificate in use.
async fn reload_certificate(
    rustls: axum_server::tls_rustls::RustlsConfig,
    tls: memu_crds::worker::TlsConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(tls.reload_secs));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = rustls
            .reload_from_pem_file(&tls.cert_file, &tls.key_file)
            .await
        {
            tracing::warn!(error = %e, cert = %tls.cert_file.display(), "TLS certificate reload failed; serving the previous one");
        }
    }
}

/// A future that resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Serves until `stop` resolves: HTTP listeners stop accepting and finish in-flight requests,
/// the pipeline finishes its current jobs; then returns.
pub async fn serve(
    service: Arc<MemoryService>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = service.config.clone();
    let role = config.role;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        tracing::info!("shutdown requested: draining");
        let _ = stop_tx.send(true);
    });
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut tasks = tokio::task::JoinSet::new();
    let app = api::router(service.clone(), role, metrics_listener.is_none());
    // TLS protects the API; a pipeline-only worker serves health and metrics, in plain HTTP,
    // and needs no certificate (one configuration serves every role).
    let tls_config = config.server.tls.as_ref().filter(|_| role.serves_api());
    let tls = tls_config.is_some();
    tracing::info!(addr = %listener.local_addr()?, %role, backend = service.store.backend(), tls, "serving");
    match tls_config {
        None => {
            let rx = stop_rx.clone();
            tasks.spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(wait_stop(rx))
                    .await
                    .context("HTTP server failed")
            });
        }
        Some(tls) => {
            let rustls = load_certificate(tls).await?;
            if tls.reload_secs > 0 {
                tokio::spawn(reload_certificate(
                    rustls.clone(),
                    tls.clone(),
                    stop_rx.clone(),
                ));
            }
            let handle = axum_server::Handle::new();
            let rx = stop_rx.clone();
            let stopping = handle.clone();
            // The grace period is enforced below, for every listener alike.
            tokio::spawn(async move {
                wait_stop(rx).await;
                stopping.graceful_shutdown(None);
            });
            let listener = listener.into_std()?;
            tasks.spawn(async move {
                axum_server::tls_rustls::from_tcp_rustls(listener, rustls)?
                    .handle(handle)
                    .serve(app.into_make_service())
                    .await
                    .context("HTTPS server failed")
            });
        }
    }
    if let Some(listener) = metrics_listener {
        let ops = api::ops_router().with_state(api::AppState {
            service: service.clone(),
        });
        tracing::info!(addr = %listener.local_addr()?, "serving health and metrics");
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(listener, ops)
                .with_graceful_shutdown(wait_stop(rx))
                .await
                .context("metrics server failed")
        });
    }
    if role.runs_pipeline() {
        let service = service.clone();
        let rx = stop_rx.clone();
        tasks.spawn(async move {
            pipeline::run(service, rx).await;
            Ok(())
        });
    }
    // Drain within the grace period once asked to stop.
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let mut stopped = stop_rx.clone();
    let drain = async {
        while let Some(result) = tasks.join_next().await {
            result.context("server task panicked")??;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::pin!(drain);
    tokio::select! {
        result = &mut drain => return result,
        _ = stopped.wait_for(|s| *s) => {}
    }
    match tokio::time::timeout(grace, drain).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!("in-flight work did not finish within {}s", grace.as_secs()),
    }
}
