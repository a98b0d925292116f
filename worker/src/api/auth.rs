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
const POST_READS: [&str; 4] = [
    "/api/v3/memory/retrieve",
    "/api/v3/memory/categories",
    "/retrieve",
    "/categories",
];

/// Routes that create memorize jobs (daily quotas apply).
const JOB_ROUTES: [&str; 4] = [
    "/api/v3/memory/memorize",
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

impl IntoResponse for AccessError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            AccessError::Unauthorized(_) => {
                let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
                    .with_field("authorization")
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                response
            }
            AccessError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
            }
            AccessError::Limited {
                retry_after_secs, ..
            } => {
                let mut response =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
                        .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                response
            }
            AccessError::UnknownTenant(_) => ApiError::not_found(message).into_response(),
            AccessError::Store(e) => ApiError::from(e).into_response(),
        }
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
    let caller = Caller {
        principal,
        target: Arc::new(Mutex::new(None)),
    };
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
    if access.enabled() {
        let entry = AuditEntry {
            id: Uuid::now_v7(),
            tenant_id: caller.principal.tenant_id.clone(),
            at: Utc::now(),
            key_id: caller.principal.key_id.clone(),
            method: method.to_string(),
            route,
            target_user: caller.target.lock().expect("audit target lock").clone(),
            status: response.status().as_u16(),
        };
        if let Err(e) = state.service.store.append_audit(&[entry]).await {
            state.service.metrics.audit_failures.inc();
            tracing::error!(error = %e, "cannot append to the audit log");
        }
    }
    response
}
