//! Model providers behind two narrow traits: embeddings and chat completions.
//! OpenAI-compatible HTTP covers OpenAI, Grok, Qwen, Doubao, OpenRouter and Voyage; `local` runs a
//! BERT-family model in process with candle.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use memu_crds::worker::{ProviderPreset, WorkerConfig};

use crate::metrics::Metrics;

pub mod local;
pub mod openai;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider} answered HTTP {status}: {message}")]
    Http {
        provider: String,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{provider} did not answer in time")]
    Timeout { provider: String },
    #[error("cannot reach {provider}: {message}")]
    Connect { provider: String, message: String },
    #[error("{provider} sent a response we cannot read: {message}")]
    Decode { provider: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("local model failed: {0}")]
    Model(String),
}

impl ProviderError {
    /// Worth another attempt: rate limits, server errors, timeouts, connection failures.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Http { status, .. } => {
                *status == 429 || *status >= 500 || *status == 408
            }
            ProviderError::Timeout { .. } | ProviderError::Connect { .. } => true,
            _ => false,
        }
    }

    /// Short class for metrics labels.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProviderError::Http { status: 429, .. } => "rate_limited",
            ProviderError::Http { status, .. } if *status >= 500 => "server_error",
            ProviderError::Http { .. } => "client_error",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::Connect { .. } => "connect_error",
            ProviderError::Decode { .. } => "decode_error",
            ProviderError::Config(_) => "config_error",
            ProviderError::Model(_) => "model_error",
        }
    }
}

#[async_trait]
pub trait Embedder: Send + Sync {
    /// Provider label for metrics and the stored embedding space (`openai`, `local`, ...).
    fn provider(&self) -> &str;
    fn model(&self) -> &str;
    /// One unit-length vector per text, in order.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError>;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// How the model must shape its answer.
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseFormat {
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching the schema (OpenAI structured outputs).
    JsonSchema {
        name: String,
        schema: serde_json::Value,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub response_format: ResponseFormat,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    pub usage: Usage,
    /// `stop`, `length` (truncated), ...
    pub finish_reason: Option<String>,
}

#[async_trait]
pub trait ChatModel: Send + Sync {
    fn provider(&self) -> &str;
    fn model(&self) -> &str;
    async fn chat(&self, request: ChatRequest) -> Result<ChatResponse, ProviderError>;
}

/// Turns images and audio into text: a vision chat call describes an image, the
/// transcription endpoint transcribes audio. Either may be unsupported by a profile.
#[async_trait]
pub trait MediaReader: Send + Sync {
    fn provider(&self) -> &str;
    fn reads_images(&self) -> bool;
    fn reads_audio(&self) -> bool;
    async fn describe_image(&self, mime_type: &str, data: &[u8]) -> Result<String, ProviderError>;
    async fn transcribe(&self, mime_type: &str, data: &[u8]) -> Result<String, ProviderError>;
}

/// The media reader of `llm.media` (else `llm.provider`), if any.
pub fn build_media(
    config: &WorkerConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<dyn MediaReader>>> {
    Ok(role_client(config, config.llm.media.as_deref(), metrics)?
        .map(|c| Arc::new(c) as Arc<dyn MediaReader>))
}

/// The OpenAI-compatible client of a role's profile (else `llm.provider`), if any.
fn role_client(
    config: &WorkerConfig,
    profile_name: Option<&str>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<openai::OpenAiClient>> {
    let Some(name) = profile_name.or(config.llm.provider.as_deref()) else {
        return Ok(None);
    };
    let profile = config
        .providers
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("no provider profile named `{name}`"))?;
    Ok(Some(openai::OpenAiClient::new(name, profile, metrics)?))
}

/// The embedder of the configured profile.
pub fn build_embedder(
    config: &WorkerConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<dyn Embedder>> {
    let name = &config.embedding.provider;
    let profile = config.embedding_profile()?;
    Ok(match profile.preset {
        ProviderPreset::Local => Arc::new(local::LocalEmbedder::load(
            name,
            profile,
            config.vector.dimension,
            metrics,
        )?),
        _ => Arc::new(
            openai::OpenAiClient::new(name, profile, metrics)?
                .for_embeddings(config.vector.dimension)?,
        ),
    })
}

/// The chat model of a profile, if one is configured for that role.
pub fn build_chat(
    config: &WorkerConfig,
    profile_name: Option<&str>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Option<Arc<dyn ChatModel>>> {
    Ok(role_client(config, profile_name, metrics)?.map(|c| Arc::new(c) as Arc<dyn ChatModel>))
}
