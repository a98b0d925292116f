//! JSON errors and the request-body extractor that names the offending field.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::providers::ProviderError;
use crate::service::ServiceError;
use crate::store::StoreError;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable class: `invalid_request`, `not_found`, `payload_too_large`, ...
    pub code: &'static str,
    pub message: String,
    /// The offending field as a path (`conversation[2].role`), when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_request",
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    /// Names the field (or header) to blame.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid { field, message } => ApiError::invalid(field, message),
            ServiceError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            ServiceError::Provider(p) => provider_error(p),
            ServiceError::Store(s) => store_error(s),
            ServiceError::ModelOutput(message) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "model_output", message)
            }
            ServiceError::Budget(message) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
            }
        }
    }
}

fn provider_error(e: ProviderError) -> ApiError {
    let status = match &e {
        ProviderError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        ProviderError::Http { status: 429, .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, "provider_error", e.to_string())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        store_error(e)
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Invalid(message) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
        StoreError::Duplicate(what) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("{what} already in use"),
        ),
        StoreError::NotReady(message) | StoreError::Incompatible(message) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
        }
        StoreError::Database(sqlx::Error::PoolTimedOut) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "no database connection became free in time",
        ),
        other => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
        ),
    }
}

/// A JSON body whose errors name the field: `conversation[0].role: missing field`.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                let mime = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: "payload_too_large",
                    message: "the request body is larger than server.max_body_bytes".into(),
                    field: Some("body".into()),
                }
            } else {
                ApiError::new(rejection.status(), "invalid_request", rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deepest nesting a request body may have: far beyond any real payload, and a hostile body
/// is refused by one linear scan before the parser recurses into it.
pub const MAX_JSON_DEPTH: usize = 32;

/// Whether the JSON text nests arrays and objects deeper than `max` (strings are skipped).
fn nests_deeper_than(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses JSON, turning serde's error into one that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if nests_deeper_than(bytes, MAX_JSON_DEPTH) {
        return Err(ApiError::invalid(
            "body",
            format!("the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "malformed_json",
                message: format!("the body is not valid JSON: {inner}"),
                field: Some("body".into()),
            };
        }
        let message = strip_position(&inner.to_string());
        let field = match message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            Some(missing) if path == "." => missing.to_string(),
            Some(missing) => format!("{path}.{missing}"),
            None if path == "." => "body".to_string(),
            None => path,
        };
        ApiError::invalid(field.clone(), format!("{field}: {message}"))
    })?;
    de.end().map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: "malformed_json",
        message: format!("trailing characters after the JSON body: {e}"),
        field: Some("body".into()),
    })?;
    Ok(value)
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// Query string extractor with JSON errors.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let field = match message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.split('`').next())
                {
                    Some(missing) => missing.to_string(),
                    None => path,
                };
                ApiError::invalid(field.clone(), format!("query parameter {field}: {message}"))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        user_id: String,
        items: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        role: String,
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_json::<Body>(br#"{"items": []}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("user_id"));
        let e = parse_json::<Body>(br#"{"user_id": "u", "items": [{"role": "user"}, {}]}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("items[1].role"));
        let e = parse_json::<Body>(br#"{"user_id": 5, "items": []}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("user_id"));
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        let e = parse_json::<Body>(br#"{"user_id": "#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, "malformed_json");
        let e = parse_json::<Body>(br#"{"user_id": "u", "items": []} x"#).unwrap_err();
        assert_eq!(e.code, "malformed_json");
    }

    #[test]
    fn nesting_is_counted_outside_strings_only() {
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert!(nests_deeper_than(deep.as_bytes(), MAX_JSON_DEPTH));
        // Brackets and escaped quotes inside a string do not nest.
        let flat = format!(r#"{{"a": "{}", "b": [[1]]}}"#, r#"[{\""#.repeat(100));
        assert!(!nests_deeper_than(flat.as_bytes(), MAX_JSON_DEPTH));
        assert!(parse_json::<serde_json::Value>(flat.as_bytes()).is_ok());
        let e = parse_json::<serde_json::Value>(deep.as_bytes()).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.field.as_deref(), Some("body"));
    }
}
