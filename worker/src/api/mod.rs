//! HTTP layer: routes, middleware (metrics, limits, timeouts, panics), health and OpenAPI.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument as _;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use memu_crds::worker::Role;

use crate::metrics::HttpLabels;
use crate::service::MemoryService;

pub mod admin;
pub mod auth;
pub mod cloud_v1;
pub mod error;
pub mod items;
pub mod memu;
pub mod memu_server;

use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<MemoryService>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "memU worker API", description = "Memorize conversations and retrieve what matters, per user."),
    tags(
        (name = "memory", description = "memU Cloud v3-compatible memorize / retrieve / categories"),
        (name = "memu-cloud-v1", description = "memU Cloud API v1, as memU's Python SDK (memu-py) calls it"),
        (name = "memu-server", description = "memU-server's routes in its envelope, scoped by user"),
        (name = "items", description = "Memory items of one user"),
        (name = "users", description = "Erase and export a user's data"),
        (name = "admin", description = "Tenants, API keys, audit log and costs (admin scope)"),
        (name = "ops", description = "Health and readiness"),
    )
)]
struct ApiDoc;

/// The memory API routes with their OpenAPI description.
fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(memu::memorize))
        .routes(routes!(memu::memorize_status))
        .routes(routes!(memu::memorize_retry))
        .routes(routes!(memu::retrieve))
        .routes(routes!(memu::categories))
        .routes(routes!(memu::delete))
        .routes(routes!(memu_server::memorize))
        .routes(routes!(memu_server::memorize_status))
        .routes(routes!(memu_server::retrieve))
        .routes(routes!(memu_server::categories))
        .routes(routes!(memu_server::clear))
        .routes(routes!(cloud_v1::memorize))
        .routes(routes!(cloud_v1::memorize_status))
        .routes(routes!(cloud_v1::default_categories))
        .routes(routes!(cloud_v1::related_memory_items))
        .routes(routes!(cloud_v1::related_clustered_categories))
        .routes(routes!(cloud_v1::delete))
        .routes(routes!(items::list, items::create))
        .routes(routes!(items::get, items::update, items::delete))
        .routes(routes!(items::delete_user))
        .routes(routes!(items::export))
        .routes(routes!(items::usage))
        .routes(routes!(items::memorize_document))
        .routes(routes!(admin::create_tenant, admin::list_tenants))
        .routes(routes!(admin::get_tenant))
        .routes(routes!(admin::set_limits))
        .routes(routes!(admin::create_key, admin::list_keys))
        .routes(routes!(admin::revoke_key))
        .routes(routes!(admin::audit))
        .routes(routes!(admin::costs))
}

/// The OpenAPI document of the API (also served at `/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = api_routes()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The full router for a role: the memory API for `api`/`all`, and health + metrics always.
pub fn router(service: Arc<MemoryService>, role: Role, with_ops: bool) -> Router {
    let config = service.config.clone();
    let state = AppState { service };
    let mut app = Router::new();
    if role.serves_api() {
        let (api, _) = api_routes().split_for_parts();
        let api = api
            // After routing, so the middleware sees the route template (scope and audit).
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::authenticate,
            ));
        // MCP tools authorize per tool: the middleware only identifies the caller.
        let mcp = Router::new()
            .nest_service("/mcp", crate::mcp::http_service(state.service.clone()))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::identify,
            ));
        app = app
            .merge(api)
            .merge(mcp)
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()));
    }
    if with_ops {
        app = app.merge(ops_router());
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.server.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(config.server.request_timeout_secs),
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(state.clone(), track_http))
        .with_state(state)
}

/// Health, readiness and metrics; served beside the API or on `server.metrics_listen`.
pub fn ops_router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn track_http(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    // Probes and scrapes are not traced: they would drown the requests that matter.
    let span = match route.as_str() {
        "/healthz" | "/readyz" | "/metrics" => tracing::Span::none(),
        _ => tracing::info_span!(
            "http request",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        ),
    };
    crate::telemetry::continue_from_headers(&span, req.headers());
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    state.service.metrics.observe_http(
        HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        },
        started.elapsed(),
    );
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server hit an unexpected error",
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200)))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The database is reachable, migrations are applied and the embedding space matches.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses((status = 200), (status = 503)))]
async fn readyz(State(state): State<AppState>) -> Response {
    match state.service.store.check_ready().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready", "reason": e.to_string()})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let service = &state.service;
    service.metrics.set_pool_stats(&service.store.pool_stats());
    // Queue figures come from the database, so every replica reports the same queue.
    match service.store.queue_stats().await {
        Ok(queue) => service.metrics.set_queue_stats(&queue),
        Err(e) => tracing::warn!(error = %e, "cannot read the queue figures"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        service.metrics.encode(),
    )
        .into_response()
}
