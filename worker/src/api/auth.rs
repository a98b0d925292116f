//! Authentication middleware of the API routes: bearer key → tenant and scopes, the scope each
//! route needs, rate limits and daily quotas, and one audit entry per authenticated request.

use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use crate::access::{AccessError, Principal};
use crate::model::UserRef;
use crate::tenancy::{ApiScope, AuditEntry};

/// The authenticated caller of a request; handlers take every tenant from here, never from
/// the request body.
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    /// The end user the request is about, for the audit log (set by [`Caller::user`]).
    target: Arc<Mutex<Option<String>>>,
}

impl Caller {
    pub fn new(principal: Principal) -> Self {
        Self {
            principal,
            target: Arc::new(Mutex::new(None)),
        }
    }

    /// The user the request was about, as the audit log names it.
    pub fn audit_target(&self) -> Option<String> {
        self.target.lock().expect("audit target lock").clone()
    }

    pub fn tenant_id(&self) -> &str {
        &self.principal.tenant_id
    }

    /// `user_id` inside the caller's tenant; also names the request's target in the audit log.
    pub fn user<'a>(&'a self, user_id: &'a str) -> UserRef<'a> {
        self.target
            .lock()
            .expect("audit target lock")
            .get_or_insert_with(|| user_id.to_string());
        UserRef::new(&self.principal.tenant_id, user_id)
    }

    /// The request erased its target: its own audit entry names only this pseudonym.
    pub fn retarget(&self, pseudonym: &str) {
        *self.target.lock().expect("audit target lock") = Some(pseudonym.to_string());
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "route is not behind authentication",
            )
        })
    }
}

/// Routes answered with POST that only read.
const POST_READS: [&str; 7] = [
    "/api/v3/memory/retrieve",
    "/api/v3/memory/categories",
    "/api/v1/memory/retrieve/default-categories",
    "/api/v1/memory/retrieve/related-memory-items",
    "/api/v1/memory/retrieve/related-clustered-categories",
    "/retrieve",
    "/categories",
];

/// Routes that create memorize jobs (daily quotas apply).
const JOB_ROUTES: [&str; 5] = [
    "/api/v3/memory/memorize",
    "/api/v1/memory/memorize",
    "/memorize",
    "/api/v1/users/{user_id}/documents",
    "/api/v3/memory/memorize/{task_id}/retry",
];

/// The scope a route needs: admin routes `admin`, reads `read`, everything else `write`.
pub fn required_scope(method: &Method, route: &str) -> ApiScope {
    if route.starts_with("/admin/") {
        ApiScope::Admin
    } else if method == Method::GET || method == Method::HEAD || POST_READS.contains(&route) {
        ApiScope::Read
    } else {
        ApiScope::Write
    }
}

impl From<AccessError> for ApiError {
    fn from(e: AccessError) -> Self {
        let message = e.to_string();
        match e {
            AccessError::Unauthorized(_) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
                    .with_field("authorization")
            }
            AccessError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            AccessError::Limited { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            }
            AccessError::UnknownTenant(_) => ApiError::not_found(message),
            AccessError::Store(e) => ApiError::from(e),
        }
    }
}

impl IntoResponse for AccessError {
    fn into_response(self) -> Response {
        let header = match &self {
            AccessError::Unauthorized(_) => {
                Some((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")))
            }
            AccessError::Limited {
                retry_after_secs, ..
            } => Some((header::RETRY_AFTER, HeaderValue::from(*retry_after_secs))),
            _ => None,
        };
        let mut response = ApiError::from(self).into_response();
        if let Some((name, value)) = header {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates, authorizes and audits one API request.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let access = &state.service.access;
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let principal = match access.authenticate(bearer(&req)).await {
        Ok(p) => p,
        Err(e) => {
            state.service.metrics.auth_failures.inc();
            return e.into_response();
        }
    };
    let caller = Caller::new(principal);
    let checked = async {
        caller.principal.require(required_scope(&method, &route))?;
        access.admit(&caller.principal).await?;
        if method == Method::POST && JOB_ROUTES.contains(&route.as_str()) {
            access.check_daily_quota(&caller.principal).await?;
        }
        Ok::<_, AccessError>(())
    };
    let response = match checked.await {
        Ok(()) => {
            req.extensions_mut().insert(caller.clone());
            next.run(req).await
        }
        Err(e) => e.into_response(),
    };
    audit(&state, &caller, method.as_str(), route, response.status()).await;
    response
}

/// Appends one entry for an authenticated request to the audit log (when keys are enforced).
pub async fn audit(
    state: &AppState,
    caller: &Caller,
    method: &str,
    route: String,
    status: StatusCode,
) {
    if !state.service.access.enabled() {
        return;
    }
    let entry = AuditEntry {
        id: Uuid::now_v7(),
        tenant_id: caller.principal.tenant_id.clone(),
        at: Utc::now(),
        key_id: caller.principal.key_id.clone(),
        method: method.to_string(),
        route,
        target_user: caller.audit_target(),
        status: status.as_u16(),
    };
    if let Err(e) = state.service.store.append_audit(&[entry]).await {
        state.service.metrics.audit_failures.inc();
        tracing::error!(error = %e, "cannot append to the audit log");
    }
}

/// Resolves the bearer key of a request that authorizes per operation (MCP): the caller is
/// admitted (rate limit) here, each tool checks its own scope.
pub async fn identify(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let access = &state.service.access;
    let principal = match access.authenticate(bearer(&req)).await {
        Ok(p) => p,
        Err(e) => {
            state.service.metrics.auth_failures.inc();
            return e.into_response();
        }
    };
    if let Err(e) = access.admit(&principal).await {
        return e.into_response();
    }
    req.extensions_mut().insert(Caller::new(principal));
    next.run(req).await
}
