//! OpenAI-compatible HTTP client (chat completions and embeddings), shared by every remote preset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::try_join_all;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use std::sync::atomic::{AtomicBool, Ordering};

use memu_crds::worker::{ProviderPreset, ProviderProfile, StructuredOutput};

use super::{ChatModel, ChatRequest, ChatResponse, Embedder, ProviderError, ResponseFormat, Usage};
use crate::config::read_secret_string;
use crate::metrics::{Metrics, ModelLabels, ModelOutcomeLabels, TokenLabels};
use crate::model::normalize;

/// Longest wait between retries, whatever `Retry-After` asks for.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct OpenAiClient {
    http: reqwest::Client,
    name: String,
    preset: ProviderPreset,
    base_url: String,
    api_key: Option<SecretString>,
    api_key_env: String,
    chat_model: String,
    embed_model: String,
    embed_dimensions: Option<usize>,
    expected_dimension: Option<usize>,
    batch_size: usize,
    max_retries: u32,
    vision: bool,
    transcription_model: Option<String>,
    structured_output: StructuredOutput,
    /// Set once the provider has refused `json_schema`: later calls use `json_object`.
    schema_refused: AtomicBool,
    slots: Semaphore,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingDatum>,
    #[serde(default)]
    usage: Option<EmbeddingUsage>,
}

#[derive(Deserialize)]
struct EmbeddingDatum {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct EmbeddingUsage {
    #[serde(default)]
    total_tokens: u64,
}

#[derive(Deserialize)]
struct ChatCompletion {
    choices: Vec<ChatChoice>,
    #[serde(default)]
    usage: Option<ChatUsage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct ChatUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl OpenAiClient {
    pub fn new(
        name: &str,
        profile: &ProviderProfile,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        // reqwest is built without a bundled crypto provider: make sure the process has one.
        crate::server::install_crypto_provider();
        let api_key_env = profile.api_key_env();
        let api_key = read_secret_string(&api_key_env, profile.api_key_file.as_deref())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(profile.timeout_secs))
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            name: name.to_string(),
            preset: profile.preset,
            base_url: profile.base_url(),
            api_key,
            api_key_env,
            chat_model: profile.chat_model().unwrap_or_default(),
            embed_model: profile.embed_model().unwrap_or_default(),
            embed_dimensions: profile.embed_dimensions,
            expected_dimension: None,
            batch_size: profile.embed_batch_size,
            max_retries: profile.max_retries,
            vision: profile.vision(),
            transcription_model: profile.transcription_model(),
            structured_output: profile.structured_output(),
            schema_refused: AtomicBool::new(false),
            slots: Semaphore::new(profile.max_concurrency),
            metrics,
        })
    }

    /// Checks the profile can embed and remembers the dimension every answer must have.
    pub fn for_embeddings(mut self, dimension: usize) -> anyhow::Result<Self> {
        if self.embed_model.is_empty() {
            anyhow::bail!(
                "provider profile `{}` has no embedding model: set providers.{}.embed_model",
                self.name,
                self.name
            );
        }
        self.expected_dimension = Some(dimension);
        Ok(self)
    }

    /// POSTs JSON with retries on 429/5xx/timeouts (exponential backoff with jitter, honouring
    /// `Retry-After`). The API key goes only into the Authorization header.
    async fn post(&self, path: &str, body: &Value) -> Result<Value, ProviderError> {
        let url = format!("{}{}", self.base_url, path);
        let mut attempt = 0;
        loop {
            let result = self.post_once(&url, body).await;
            match result {
                Err(err) if err.is_retryable() && attempt < self.max_retries => {
                    let wait = backoff(attempt, &err);
                    tracing::warn!(provider = %self.name, attempt, wait_ms = wait.as_millis() as u64, error = %err, "retrying provider request");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn post_once(&self, url: &str, body: &Value) -> Result<Value, ProviderError> {
        self.send(self.http.post(url).json(body)).await
    }

    /// Sends a prepared request within the concurrency limit and reads the JSON answer.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, ProviderError> {
        let span = tracing::info_span!(
            "provider request",
            otel.kind = "client",
            provider = %self.name,
            http.response.status_code = tracing::field::Empty,
        );
        self.send_traced(request).instrument(span).await
    }

    async fn send_traced(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<Value, ProviderError> {
        let _slot = self.slots.acquire().await.expect("semaphore never closed");
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose_secret());
        }
        // The provider (or a gateway in front of it) can join our trace.
        let mut trace_headers = reqwest::header::HeaderMap::new();
        crate::telemetry::inject_current(&mut trace_headers);
        let response = request
            .headers(trace_headers)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = response.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(Duration::from_secs_f64);
            let text = response.text().await.unwrap_or_default();
            return Err(ProviderError::Http {
                provider: self.name.clone(),
                status: status.as_u16(),
                message: error_message(&text),
                retry_after,
            });
        }
        response
            .json::<Value>()
            .await
            .map_err(|e| ProviderError::Decode {
                provider: self.name.clone(),
                message: e.to_string(),
            })
    }

    fn transport_error(&self, e: reqwest::Error) -> ProviderError {
        if e.is_timeout() {
            ProviderError::Timeout {
                provider: self.name.clone(),
            }
        } else {
            ProviderError::Connect {
                provider: self.name.clone(),
                message: e.to_string(),
            }
        }
    }

    fn require_key(&self) -> Result<(), ProviderError> {
        if self.api_key.is_none() && !self.base_url.starts_with("http://") {
            return Err(ProviderError::Config(format!(
                "provider profile `{}` has no API key: set {} (or providers.{}.api_key_file)",
                self.name, self.api_key_env, self.name
            )));
        }
        Ok(())
    }

    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        let mut body = json!({ "model": self.embed_model, "input": texts });
        if let Some(dims) = self.embed_dimensions {
            body["dimensions"] = json!(dims);
        }
        if self.preset != ProviderPreset::Voyage {
            body["encoding_format"] = json!("float");
        }
        let labels = ModelLabels {
            provider: self.name.clone(),
            model: self.embed_model.clone(),
        };
        let started = Instant::now();
        let result = self.post("/embeddings", &body).await.and_then(|v| {
            serde_json::from_value::<EmbeddingResponse>(v).map_err(|e| ProviderError::Decode {
                provider: self.name.clone(),
                message: e.to_string(),
            })
        });
        self.metrics
            .embedding_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.count(&self.metrics.embedding_requests, &self.embed_model, &result);
        let response = result?;
        if response.data.len() != texts.len() {
            return Err(ProviderError::Decode {
                provider: self.name.clone(),
                message: format!(
                    "sent {} texts, got {} embeddings",
                    texts.len(),
                    response.data.len()
                ),
            });
        }
        self.metrics
            .embedding_texts
            .get_or_create(&labels)
            .inc_by(texts.len() as u64);
        if let Some(usage) = response.usage {
            self.metrics
                .embedding_tokens
                .get_or_create(&labels)
                .inc_by(usage.total_tokens);
        }
        let mut data = response.data;
        data.sort_by_key(|d| d.index.unwrap_or(0));
        let mut out = Vec::with_capacity(data.len());
        for datum in data {
            let mut v = datum.embedding;
            if let Some(dim) = self.expected_dimension
                && v.len() != dim
            {
                return Err(ProviderError::Config(format!(
                    "model `{}` of provider `{}` returns {}-dimensional embeddings but vector.dimension is {dim}",
                    self.embed_model,
                    self.name,
                    v.len()
                )));
            }
            normalize(&mut v);
            out.push(v);
        }
        Ok(out)
    }

    fn count<T>(
        &self,
        family: &prometheus_client::metrics::family::Family<
            ModelOutcomeLabels,
            prometheus_client::metrics::counter::Counter,
        >,
        model: &str,
        result: &Result<T, ProviderError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        family
            .get_or_create(&ModelOutcomeLabels {
                provider: self.name.clone(),
                model: model.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// Wait before retry `attempt` (0-based): the server's `Retry-After` if given, else 0.5 s × 2^n
/// with ±50 % jitter so that many workers do not retry in lockstep.
fn backoff(attempt: u32, err: &ProviderError) -> Duration {
    if let ProviderError::Http {
        retry_after: Some(wait),
        ..
    } = err
    {
        return (*wait).min(MAX_BACKOFF);
    }
    let base = 0.5 * 2f64.powi(attempt as i32);
    let jitter = rand::rng().random_range(0.5..1.5);
    Duration::from_secs_f64((base * jitter).min(MAX_BACKOFF.as_secs_f64()))
}

/// The `error.message` of an OpenAI-style error body, else the body itself (shortened).
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.chars().take(300).collect())
}

#[async_trait]
impl Embedder for OpenAiClient {
    fn provider(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        &self.embed_model
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.require_key()?;
        let batches = texts
            .chunks(self.batch_size)
            .map(|chunk| self.embed_batch(chunk));
        Ok(try_join_all(batches).await?.into_iter().flatten().collect())
    }
}

#[async_trait]
impl ChatModel for OpenAiClient {
    fn provider(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        &self.chat_model
    }

    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        self.require_key()?;
        if self.chat_model.is_empty() {
            return Err(ProviderError::Config(format!(
                "provider profile `{}` has no chat model: set providers.{}.chat_model",
                self.name, self.name
            )));
        }
        let wants_schema = matches!(request.response_format, ResponseFormat::JsonSchema { .. });
        let mode = if self.schema_refused.load(Ordering::Relaxed) {
            StructuredOutput::JsonObject
        } else {
            self.structured_output
        };
        match self.chat_as(&request, mode).await {
            // Some OpenAI-compatible servers reject `json_schema`: ask again in JSON mode, with
            // the schema in the prompt, and keep doing so for this profile.
            Err(ProviderError::Http {
                status: 400,
                message,
                ..
            }) if wants_schema
                && mode == StructuredOutput::JsonSchema
                && (message.contains("response_format") || message.contains("json_schema")) =>
            {
                tracing::warn!(provider = %self.name, %message, "provider refused json_schema; using json_object");
                self.schema_refused.store(true, Ordering::Relaxed);
                self.chat_as(&request, StructuredOutput::JsonObject).await
            }
            other => other,
        }
    }
}

impl OpenAiClient {
    /// One chat completion with JSON requested the way `mode` says.
    async fn chat_as(
        &self,
        request: &ChatRequest,
        mode: StructuredOutput,
    ) -> Result<ChatResponse, ProviderError> {
        let mut messages = request.messages.clone();
        let mut body = json!({ "model": self.chat_model });
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(m) = request.max_tokens {
            body["max_tokens"] = json!(m);
        }
        match (&request.response_format, mode) {
            (ResponseFormat::Text, _) => {}
            (ResponseFormat::JsonObject, StructuredOutput::Prompt) => {}
            (ResponseFormat::JsonObject, _) => {
                body["response_format"] = json!({"type": "json_object"})
            }
            (ResponseFormat::JsonSchema { name, schema }, StructuredOutput::JsonSchema) => {
                body["response_format"] = json!({
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": true}
                })
            }
            (ResponseFormat::JsonSchema { schema, .. }, other) => {
                let instruction = crate::prompts::schema_instruction(schema);
                match messages.iter_mut().find(|m| m.role == "system") {
                    Some(system) => system.content.push_str(&instruction),
                    None => messages.insert(0, super::ChatMessage::system(instruction)),
                }
                if other == StructuredOutput::JsonObject {
                    body["response_format"] = json!({"type": "json_object"});
                }
            }
        }
        body["messages"] = json!(messages);
        let labels = ModelLabels {
            provider: self.name.clone(),
            model: self.chat_model.clone(),
        };
        let started = Instant::now();
        let result = self.post("/chat/completions", &body).await.and_then(|v| {
            serde_json::from_value::<ChatCompletion>(v).map_err(|e| ProviderError::Decode {
                provider: self.name.clone(),
                message: e.to_string(),
            })
        });
        self.metrics
            .llm_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.count(&self.metrics.llm_requests, &self.chat_model, &result);
        let completion = result?;
        let usage = completion
            .usage
            .map(|u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            })
            .unwrap_or_default();
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            self.metrics
                .llm_tokens
                .get_or_create(&TokenLabels {
                    provider: self.name.clone(),
                    model: self.chat_model.clone(),
                    kind: kind.to_string(),
                })
                .inc_by(n);
        }
        let choice =
            completion
                .choices
                .into_iter()
                .next()
                .ok_or_else(|| ProviderError::Decode {
                    provider: self.name.clone(),
                    message: "no choices in the completion".into(),
                })?;
        Ok(ChatResponse {
            content: choice.message.content.unwrap_or_default(),
            usage,
            finish_reason: choice.finish_reason,
        })
    }
}

/// A `multipart/form-data` body of text fields and one file (the transcription endpoint's
/// format), with a boundary that cannot occur in the fields.
fn multipart_body(fields: &[(&str, &str)], file: (&str, &str, &[u8])) -> (String, Vec<u8>) {
    let boundary = format!("memu-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    let (name, mime, data) = file;
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: {mime}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (boundary, body)
}

#[async_trait]
impl super::MediaReader for OpenAiClient {
    fn provider(&self) -> &str {
        &self.name
    }

    fn reads_images(&self) -> bool {
        self.vision && !self.chat_model.is_empty()
    }

    fn reads_audio(&self) -> bool {
        self.transcription_model.is_some()
    }

    async fn describe_image(&self, mime_type: &str, data: &[u8]) -> Result<String, ProviderError> {
        use base64::Engine as _;
        self.require_key()?;
        let url = format!(
            "data:{mime_type};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(data)
        );
        let body = json!({
            "model": self.chat_model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": crate::prompts::DESCRIBE_IMAGE},
                {"type": "image_url", "image_url": {"url": url}},
            ]}],
        });
        let started = Instant::now();
        let result = self.post("/chat/completions", &body).await;
        self.metrics
            .llm_duration
            .get_or_create(&ModelLabels {
                provider: self.name.clone(),
                model: self.chat_model.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.count(&self.metrics.llm_requests, &self.chat_model, &result);
        result?
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ProviderError::Decode {
                provider: self.name.clone(),
                message: "no description in the completion".into(),
            })
    }

    async fn transcribe(&self, mime_type: &str, data: &[u8]) -> Result<String, ProviderError> {
        self.require_key()?;
        let model = self.transcription_model.clone().ok_or_else(|| {
            ProviderError::Config(format!(
                "provider profile `{}` has no transcription_model",
                self.name
            ))
        })?;
        let extension = mime_type.rsplit('/').next().unwrap_or("bin");
        let (boundary, body) = multipart_body(
            &[("model", model.as_str()), ("response_format", "json")],
            (&format!("audio.{extension}"), mime_type, data),
        );
        let url = format!("{}/audio/transcriptions", self.base_url);
        let mut attempt = 0;
        let started = Instant::now();
        let result = loop {
            let request = self
                .http
                .post(&url)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(body.clone());
            match self.send(request).await {
                Err(err) if err.is_retryable() && attempt < self.max_retries => {
                    tokio::time::sleep(backoff(attempt, &err)).await;
                    attempt += 1;
                }
                other => break other,
            }
        };
        self.metrics
            .llm_duration
            .get_or_create(&ModelLabels {
                provider: self.name.clone(),
                model: model.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.count(&self.metrics.llm_requests, &model, &result);
        result?
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ProviderError::Decode {
                provider: self.name.clone(),
                message: "no text in the transcription".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_carry_fields_and_the_file() {
        let (boundary, body) =
            multipart_body(&[("model", "whisper-1")], ("a.wav", "audio/wav", b"RIFF"));
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{boundary}\r\n")));
        assert!(text.contains("name=\"model\"\r\n\r\nwhisper-1\r\n"));
        assert!(text.contains("filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n"));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
    }

    #[test]
    fn backoff_honours_retry_after_and_caps() {
        let err = ProviderError::Http {
            provider: "p".into(),
            status: 429,
            message: String::new(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(backoff(0, &err), Duration::from_secs(2));
        let err = ProviderError::Http {
            provider: "p".into(),
            status: 429,
            message: String::new(),
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(backoff(0, &err), MAX_BACKOFF);
        let timeout = ProviderError::Timeout {
            provider: "p".into(),
        };
        let first = backoff(0, &timeout);
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(750));
        assert!(backoff(20, &timeout) <= MAX_BACKOFF);
    }

    #[test]
    fn error_bodies_are_summarised() {
        assert_eq!(
            error_message(r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#),
            "Rate limit reached"
        );
        assert_eq!(error_message("plain failure"), "plain failure");
    }
}
