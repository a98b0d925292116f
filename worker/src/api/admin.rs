//! Admin API (keys with the `admin` scope): tenants, their keys and limits, the audit log and
//! the cost report. Platform teams and the operator use it; tenants' own keys cannot.

use std::collections::BTreeSet;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiJson, ApiQuery, ErrorBody};
use crate::access::AccessError;
use crate::tenancy::{ApiKeyRecord, ApiScope, AuditEntry, CostRow, Tenant, TenantLimits};

fn access_error(e: AccessError) -> ApiError {
    match e {
        AccessError::Store(crate::store::StoreError::Invalid(message)) => {
            ApiError::invalid("tenant_id", message)
        }
        AccessError::Store(s) => s.into(),
        unknown @ AccessError::UnknownTenant(_) => ApiError::not_found(unknown.to_string()),
        other => ApiError::new(StatusCode::FORBIDDEN, "forbidden", other.to_string()),
    }
}

async fn existing_tenant(state: &AppState, tenant_id: &str) -> Result<Tenant, ApiError> {
    state
        .service
        .store
        .get_tenant(tenant_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("tenant {tenant_id} not found")))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1–63 lowercase letters, digits or `-`.
    pub tenant_id: String,
    #[serde(default)]
    pub name: String,
    /// Absent limits fall back to the worker's defaults.
    #[serde(default)]
    pub limits: TenantLimits,
}

/// Create a tenant.
#[utoipa::path(post, path = "/admin/v1/tenants", tag = "admin", request_body = CreateTenant,
    responses((status = 201, body = Tenant), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_tenant(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    check_limits(&req.limits)?;
    let tenant = state
        .service
        .access
        .create_tenant(&req.tenant_id, &req.name, req.limits)
        .await
        .map_err(access_error)?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

fn check_limits(limits: &TenantLimits) -> Result<(), ApiError> {
    if let Some(rps) = limits.rate_limit_rps
        && !(rps.is_finite() && rps > 0.0)
    {
        return Err(ApiError::invalid(
            "rate_limit_rps",
            "rate_limit_rps must be a positive number",
        ));
    }
    Ok(())
}

/// All tenants.
#[utoipa::path(get, path = "/admin/v1/tenants", tag = "admin",
    responses((status = 200, body = Vec<Tenant>)))]
pub async fn list_tenants(State(state): State<AppState>) -> Result<Json<Vec<Tenant>>, ApiError> {
    Ok(Json(state.service.store.list_tenants().await?))
}

/// One tenant.
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant_id}", tag = "admin",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = Tenant), (status = 404, body = ErrorBody)))]
pub async fn get_tenant(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Tenant>, ApiError> {
    Ok(Json(existing_tenant(&state, &tenant_id).await?))
}

/// Replace a tenant's limits (absent = the worker's default).
#[utoipa::path(put, path = "/admin/v1/tenants/{tenant_id}/limits", tag = "admin",
    params(("tenant_id" = String, Path)), request_body = TenantLimits,
    responses((status = 200, body = Tenant), (status = 404, body = ErrorBody)))]
pub async fn set_limits(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    ApiJson(limits): ApiJson<TenantLimits>,
) -> Result<Json<Tenant>, ApiError> {
    check_limits(&limits)?;
    state
        .service
        .access
        .set_limits(&tenant_id, &limits)
        .await
        .map_err(access_error)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("tenant {tenant_id} not found")))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    pub name: String,
    /// `read`, `write`, `admin`.
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A key as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyOut {
    pub key_id: String,
    pub tenant_id: String,
    pub name: String,
    pub scopes: BTreeSet<ApiScope>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for KeyOut {
    fn from(k: ApiKeyRecord) -> Self {
        Self {
            key_id: k.key_id,
            tenant_id: k.tenant_id,
            name: k.name,
            scopes: k.scopes,
            created_at: k.created_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            last_used_at: k.last_used_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: KeyOut,
    /// The bearer token: shown this once, stored only as a digest.
    pub api_key: String,
}

/// Create a key of the tenant; the answer is the only place its secret appears.
#[utoipa::path(post, path = "/admin/v1/tenants/{tenant_id}/keys", tag = "admin",
    params(("tenant_id" = String, Path)), request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_key(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    ApiJson(req): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let scopes = crate::tenancy::parse_scopes(&req.scopes.join(","))
        .map_err(|m| ApiError::invalid("scopes", m))?;
    if let Some(at) = req.expires_at
        && at <= Utc::now()
    {
        return Err(ApiError::invalid(
            "expires_at",
            "expires_at must be in the future",
        ));
    }
    let issued = state
        .service
        .access
        .issue_key(&tenant_id, &req.name, scopes, req.expires_at)
        .await
        .map_err(access_error)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            api_key: issued.token.expose_secret().to_string(),
            key: issued.record.into(),
        }),
    ))
}

/// The tenant's keys (without secrets).
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant_id}/keys", tag = "admin",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = Vec<KeyOut>), (status = 404, body = ErrorBody)))]
pub async fn list_keys(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
) -> Result<Json<Vec<KeyOut>>, ApiError> {
    existing_tenant(&state, &tenant_id).await?;
    let keys = state.service.store.list_api_keys(&tenant_id).await?;
    Ok(Json(keys.into_iter().map(KeyOut::from).collect()))
}

/// Revoke a key at once (idempotent).
#[utoipa::path(delete, path = "/admin/v1/tenants/{tenant_id}/keys/{key_id}", tag = "admin",
    params(("tenant_id" = String, Path), ("key_id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn revoke_key(
    State(state): State<AppState>,
    Path((tenant_id, key_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    match state
        .service
        .access
        .revoke_key(&tenant_id, &key_id)
        .await
        .map_err(access_error)?
    {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::not_found(format!(
            "key {key_id} of tenant {tenant_id} not found"
        ))),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// Only entries about this user.
    pub user_id: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// The tenant's audit log, newest first.
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant_id}/audit", tag = "admin",
    params(("tenant_id" = String, Path), AuditParams),
    responses((status = 200, body = Vec<AuditEntry>), (status = 404, body = ErrorBody)))]
pub async fn audit(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    existing_tenant(&state, &tenant_id).await?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 1000",
        ));
    }
    let entries = state
        .service
        .store
        .list_audit(&tenant_id, params.user_id.as_deref(), Some(limit))
        .await?;
    Ok(Json(entries))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CostParams {
    /// Start (inclusive, RFC 3339); default 30 days ago.
    pub since: Option<DateTime<Utc>>,
    /// End (exclusive, RFC 3339); default now.
    pub until: Option<DateTime<Utc>>,
}

/// LLM tokens and cost of the tenant per day, user, provider and model.
#[utoipa::path(get, path = "/admin/v1/tenants/{tenant_id}/costs", tag = "admin",
    params(("tenant_id" = String, Path), CostParams),
    responses((status = 200, body = Vec<CostRow>), (status = 404, body = ErrorBody)))]
pub async fn costs(
    State(state): State<AppState>,
    Path(tenant_id): Path<String>,
    ApiQuery(params): ApiQuery<CostParams>,
) -> Result<Json<Vec<CostRow>>, ApiError> {
    existing_tenant(&state, &tenant_id).await?;
    let until = params.until.unwrap_or_else(Utc::now);
    let since = params.since.unwrap_or(until - chrono::Duration::days(30));
    if since >= until {
        return Err(ApiError::invalid(
            "since",
            "since must be earlier than until",
        ));
    }
    let rows = state
        .service
        .store
        .cost_report(&tenant_id, since, until)
        .await?;
    Ok(Json(rows))
}
