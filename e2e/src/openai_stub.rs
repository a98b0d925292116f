//! A deterministic OpenAI-compatible server for tests: `/v1/embeddings` and
//! `/v1/chat/completions` on loopback. It stands in for the paid APIs only; the worker talks to it
//! over real HTTP exactly as it would to a provider.
//!
//! Embeddings are a hashing-trick bag of words and character trigrams: texts sharing words are
//! similar, the same text always gives the same vector. Chat replies come from a script queued by
//! the test (status, body, `Retry-After`), else a deterministic default.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Which endpoint a scripted reply or a recorded request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Chat,
    Embeddings,
    Transcriptions,
}

/// One scripted reply; the next request to `endpoint` gets it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Scripted {
    /// HTTP status (200 when absent).
    #[serde(default)]
    pub status: Option<u16>,
    /// For chat: the assistant message content of a 200 reply.
    #[serde(default)]
    pub content: Option<String>,
    /// A whole response body, sent as is (errors, malformed payloads).
    #[serde(default)]
    pub body: Option<Value>,
    /// Seconds for the `Retry-After` header.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// `finish_reason` of a chat reply (`stop` when absent).
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recorded {
    pub endpoint: Endpoint,
    pub body: Value,
    /// Whether a Bearer token came with the request (never the token itself).
    pub authorized: bool,
    /// The W3C `traceparent` header the caller propagated, if any.
    #[serde(default)]
    pub traceparent: Option<String>,
}

#[derive(Clone, Debug)]
pub struct StubOptions {
    /// Embedding dimension when the request names none.
    pub dimension: usize,
    /// Added before every reply.
    pub latency: Duration,
    /// When set, requests must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
}

impl Default for StubOptions {
    fn default() -> Self {
        Self {
            dimension: 384,
            latency: Duration::ZERO,
            api_key: None,
        }
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<Vec<(Endpoint, VecDeque<Scripted>)>>,
    requests: Mutex<Vec<Recorded>>,
}

#[derive(Clone)]
struct AppState {
    options: Arc<StubOptions>,
    shared: Arc<Shared>,
}

/// A running stub; dropped = stopped.
pub struct OpenAiStub {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OpenAiStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OpenAiStub {
    /// Starts on 127.0.0.1 at a free port.
    pub async fn start(options: StubOptions) -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0".parse().expect("valid address"), options).await
    }

    pub async fn bind(addr: SocketAddr, options: StubOptions) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let app = router(AppState {
            options: Arc::new(options),
            shared: shared.clone(),
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// Base URL as providers expect it (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn enqueue(&self, endpoint: Endpoint, reply: Scripted) {
        push(&self.shared, endpoint, reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("lock").clone()
    }

    pub fn count(&self, endpoint: Endpoint) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.endpoint == endpoint)
            .count()
    }

    /// Runs until the server stops.
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

fn push(shared: &Shared, endpoint: Endpoint, reply: Scripted) {
    let mut script = shared.script.lock().expect("lock");
    match script.iter_mut().find(|(e, _)| *e == endpoint) {
        Some((_, queue)) => queue.push_back(reply),
        None => script.push((endpoint, VecDeque::from([reply]))),
    }
}

fn pop(shared: &Shared, endpoint: Endpoint) -> Option<Scripted> {
    let mut script = shared.script.lock().expect("lock");
    script
        .iter_mut()
        .find(|(e, _)| *e == endpoint)
        .and_then(|(_, q)| q.pop_front())
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .route("/_stub/script", post(script))
        .route("/_stub/requests", get(requests))
        .route("/_stub/reset", post(reset))
        .with_state(state)
}

#[derive(Deserialize)]
struct ScriptRequest {
    endpoint: Endpoint,
    #[serde(flatten)]
    reply: Scripted,
}

async fn script(State(state): State<AppState>, Json(req): Json<ScriptRequest>) -> StatusCode {
    push(&state.shared, req.endpoint, req.reply);
    StatusCode::NO_CONTENT
}

async fn requests(State(state): State<AppState>) -> Json<Vec<Recorded>> {
    Json(state.shared.requests.lock().expect("lock").clone())
}

async fn reset(State(state): State<AppState>) -> StatusCode {
    state.shared.requests.lock().expect("lock").clear();
    state.shared.script.lock().expect("lock").clear();
    StatusCode::NO_CONTENT
}

/// Records the request, applies latency and auth; `Err` is the reply to send instead.
async fn admit(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &Value,
) -> Result<(), Response> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    state.shared.requests.lock().expect("lock").push(Recorded {
        endpoint,
        body: body.clone(),
        authorized: bearer.is_some(),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    if !state.options.latency.is_zero() {
        tokio::time::sleep(state.options.latency).await;
    }
    if let Some(key) = &state.options.api_key
        && bearer != Some(key.as_str())
    {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided",
            None,
        ));
    }
    Ok(())
}

fn error(status: StatusCode, message: &str, retry_after: Option<u64>) -> Response {
    let mut response = (
        status,
        Json(json!({"error": {"message": message, "type": "stub_error", "code": status.as_u16()}})),
    )
        .into_response();
    if let Some(secs) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", secs.to_string().parse().expect("ascii"));
    }
    response
}

/// Replies with a scripted error or body, if the script says so.
fn scripted_override(reply: &Scripted) -> Option<Response> {
    let status = StatusCode::from_u16(reply.status.unwrap_or(200)).unwrap_or(StatusCode::OK);
    if let Some(body) = &reply.body {
        let mut response = (status, Json(body.clone())).into_response();
        if let Some(secs) = reply.retry_after {
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("ascii"));
        }
        return Some(response);
    }
    if !status.is_success() {
        return Some(error(status, "scripted failure", reply.retry_after));
    }
    None
}

/// Deterministic embedding of a text (unit length).
pub fn embed_text(text: &str, dimension: usize) -> Vec<f32> {
    let mut v = vec![0f32; dimension];
    let lower = text.to_lowercase();
    let mut add = |feature: &str, weight: f32| {
        let digest = Sha256::digest(feature.as_bytes());
        let index =
            u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) as usize % dimension;
        let sign = if digest[8] & 1 == 0 { 1.0 } else { -1.0 };
        v[index] += sign * weight;
    };
    for word in lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        add(&format!("w:{word}"), 1.0);
        let chars: Vec<char> = format!("#{word}#").chars().collect();
        for tri in chars.windows(3) {
            add(&format!("t:{}", tri.iter().collect::<String>()), 0.3);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    } else {
        v[0] = 1.0;
    }
    v
}

async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(reply) = admit(&state, Endpoint::Embeddings, &headers, &body).await {
        return reply;
    }
    if let Some(reply) = pop(&state.shared, Endpoint::Embeddings)
        && let Some(response) = scripted_override(&reply)
    {
        return response;
    }
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or an array of strings",
                None,
            );
        }
    };
    let dimension = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map(|d| d as usize)
        .unwrap_or(state.options.dimension);
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embed_text(t, dimension)}))
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": body.get("model").cloned().unwrap_or(Value::Null),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if let Err(reply) = admit(&state, Endpoint::Chat, &headers, &body).await {
        return reply;
    }
    let scripted = pop(&state.shared, Endpoint::Chat);
    if let Some(reply) = &scripted
        && let Some(response) = scripted_override(reply)
    {
        return response;
    }
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let prompt_tokens: usize = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.split_whitespace().count())
        .sum();
    let content = match scripted.as_ref().and_then(|s| s.content.clone()) {
        Some(content) => content,
        None => {
            let last = messages
                .last()
                .and_then(|m| m.get("content"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let digest = hex(&Sha256::digest(last.as_bytes())[..6]);
            if let Some(schema) = body.pointer("/response_format/json_schema/schema") {
                // Structured outputs: the smallest answer that fits the schema, so any
                // pipeline runs end to end without a script.
                instance_of(schema, &digest).to_string()
            } else if body.pointer("/response_format/type").is_some() {
                json!({"stub": digest}).to_string()
            } else {
                format!("stub reply {digest}")
            }
        }
    };
    let completion_tokens = content.split_whitespace().count();
    Json(json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": body.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": scripted.and_then(|s| s.finish_reason).unwrap_or_else(|| "stop".into()),
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// `/audio/transcriptions`: the multipart body is recorded by size and form fields; the text is
/// scripted, else derived from the file's bytes.
async fn transcriptions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body);
    let model = text
        .split("name=\"model\"\r\n\r\n")
        .nth(1)
        .and_then(|rest| rest.split("\r\n").next())
        .unwrap_or_default()
        .to_string();
    let recorded = json!({
        "bytes": body.len(),
        "model": model,
        "content_type": headers.get("content-type").and_then(|v| v.to_str().ok()),
    });
    if let Err(reply) = admit(&state, Endpoint::Transcriptions, &headers, &recorded).await {
        return reply;
    }
    let scripted = pop(&state.shared, Endpoint::Transcriptions);
    if let Some(reply) = &scripted
        && let Some(response) = scripted_override(reply)
    {
        return response;
    }
    if model.is_empty() || !text.contains("name=\"file\"") {
        return error(StatusCode::BAD_REQUEST, "model and file are required", None);
    }
    let content = scripted
        .and_then(|s| s.content)
        .unwrap_or_else(|| format!("transcript {}", hex(&Sha256::digest(&body)[..6])));
    Json(json!({"text": content})).into_response()
}

/// A deterministic instance of a JSON schema: every property, one element per array, the first
/// enum value, text derived from `seed`.
pub fn instance_of(schema: &Value, seed: &str) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.as_str(),
        // `["string", "null"]`: the first non-null type.
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ => "object",
    };
    match kind {
        "object" => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .map(|props| {
                    props
                        .iter()
                        .map(|(k, v)| (k.clone(), instance_of(v, &format!("{seed} {k}"))))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        "array" => json!([instance_of(
            schema.get("items").unwrap_or(&Value::Null),
            seed
        )]),
        "string" => json!(format!("stub {seed}")),
        "integer" => json!(0),
        "number" => json!(0.5),
        "boolean" => json!(true),
        _ => Value::Null,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_instances_fit_their_schema() {
        let schema = json!({"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "memory_type": {"type": "string", "enum": ["profile", "event"]},
                "when": {"type": ["string", "null"]},
                "n": {"type": "integer"}}}},
            "ok": {"type": "boolean"}}});
        let v = instance_of(&schema, "abc");
        assert_eq!(v["items"][0]["memory_type"], "profile");
        assert_eq!(v["items"][0]["when"], "stub abc items when");
        assert_eq!(v["items"][0]["n"], 0);
        assert_eq!(v["ok"], true);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors_and_share_words() {
        let a = embed_text("Alice lives in Berlin", 64);
        assert_eq!(a, embed_text("Alice lives in Berlin", 64));
        assert!((a.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        let near = embed_text("Where does Alice live? Berlin?", 64);
        let far = embed_text("quarterly tax filing deadline", 64);
        assert!(dot(&a, &near) > dot(&a, &far));
    }
}
