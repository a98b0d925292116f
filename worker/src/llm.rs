//! Asking a chat model for JSON: structured outputs where the provider has them, a tolerant
//! parser for those that wrap or decorate JSON, one repair round trip when the answer is still
//! unusable, and a record of every call (tokens, latency, cost) for metrics and the cost log.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;
use uuid::Uuid;

use memu_crds::worker::ModelPrice;

use crate::metrics::{Metrics, PromptLabels, TenantModelLabels};
use crate::model::{LlmUsage, UserRef};
use crate::prompts::{self, Prompt};
use crate::providers::{ChatMessage, ChatModel, ChatRequest, ChatResponse, ResponseFormat};
use crate::service::ServiceError;

/// The LLM calls of one memorize job or one retrieve, with what they cost.
pub struct LlmSession<'a> {
    metrics: &'a Metrics,
    prices: &'a BTreeMap<String, ModelPrice>,
    tenant_id: String,
    user_id: String,
    task_id: Option<Uuid>,
    operation: &'static str,
    pub calls: Vec<LlmUsage>,
}

impl<'a> LlmSession<'a> {
    pub fn new(
        metrics: &'a Metrics,
        prices: &'a BTreeMap<String, ModelPrice>,
        user: UserRef<'_>,
        task_id: Option<Uuid>,
        operation: &'static str,
    ) -> Self {
        Self {
            metrics,
            prices,
            tenant_id: user.tenant_id.to_string(),
            user_id: user.user_id.to_string(),
            task_id,
            operation,
            calls: Vec::new(),
        }
    }

    /// Sends the prompt and decodes the answer as `T`. An answer that is not valid JSON for the
    /// step (or was cut off) gets one repair round trip; a second bad answer is a
    /// [`ServiceError::ModelOutput`] naming the step and the problem.
    pub async fn ask<T: DeserializeOwned>(
        &mut self,
        chat: &dyn ChatModel,
        prompt: &Prompt,
    ) -> Result<T, ServiceError> {
        let mut messages = vec![
            ChatMessage::system(prompt.system.clone()),
            ChatMessage::user(prompt.user.clone()),
        ];
        for attempt in 0..2 {
            let request = ChatRequest {
                messages: messages.clone(),
                response_format: ResponseFormat::JsonSchema {
                    name: format!("memu_{}", prompt.name),
                    schema: prompt.schema.clone(),
                },
                temperature: None,
                max_tokens: None,
            };
            let started = Instant::now();
            // One span per call (a repair is a second one), named after the step.
            let span = tracing::info_span!(
                "llm call",
                otel.name = %format!("llm {}", prompt.name),
                step = prompt.name,
                attempt,
                gen_ai.system = chat.provider(),
                gen_ai.request.model = chat.model(),
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
            );
            let response = chat.chat(request).instrument(span.clone()).await?;
            span.record("gen_ai.usage.input_tokens", response.usage.prompt_tokens);
            span.record(
                "gen_ai.usage.output_tokens",
                response.usage.completion_tokens,
            );
            self.record(chat, prompt.name, &response, started);
            match decode::<T>(&response) {
                Ok(value) => return Ok(value),
                Err(problem) => {
                    self.metrics
                        .llm_invalid_answers
                        .get_or_create(&self.labels(chat, prompt.name))
                        .inc();
                    tracing::warn!(step = prompt.name, attempt, %problem, "unusable LLM answer");
                    if attempt == 1 {
                        return Err(ServiceError::ModelOutput(format!(
                            "the {} step got no usable answer from {} after one repair: {problem}",
                            prompt.name,
                            chat.model()
                        )));
                    }
                    messages.push(ChatMessage {
                        role: "assistant".into(),
                        content: response.content,
                    });
                    messages.push(ChatMessage::user(prompts::repair(&problem)));
                }
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    fn labels(&self, chat: &dyn ChatModel, prompt: &str) -> PromptLabels {
        PromptLabels {
            provider: chat.provider().to_string(),
            model: chat.model().to_string(),
            prompt: prompt.to_string(),
        }
    }

    fn record(
        &mut self,
        chat: &dyn ChatModel,
        prompt: &str,
        response: &ChatResponse,
        started: Instant,
    ) {
        let usage = &response.usage;
        let cost = self
            .prices
            .get(chat.model())
            .map(|p| p.cost(usage.prompt_tokens, usage.completion_tokens))
            .unwrap_or(0.0);
        self.metrics
            .llm_prompt_calls
            .get_or_create(&self.labels(chat, prompt))
            .inc();
        self.metrics
            .llm_cost
            .get_or_create(&TenantModelLabels {
                tenant: self.tenant_id.clone(),
                provider: chat.provider().to_string(),
                model: chat.model().to_string(),
            })
            .inc_by(cost);
        self.calls.push(LlmUsage {
            id: Uuid::now_v7(),
            tenant_id: self.tenant_id.clone(),
            user_id: self.user_id.clone(),
            task_id: self.task_id,
            operation: self.operation.to_string(),
            prompt: prompt.to_string(),
            provider: chat.provider().to_string(),
            model: chat.model().to_string(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            latency_ms: started.elapsed().as_millis() as u64,
            cost_usd: cost,
            created_at: Utc::now(),
        });
    }
}

/// Decodes a chat answer as `T`, or says what is wrong with it.
pub fn decode<T: DeserializeOwned>(response: &ChatResponse) -> Result<T, String> {
    if response.finish_reason.as_deref() == Some("length") {
        return Err("the answer was cut off at the token limit".into());
    }
    let value = lenient_json(&response.content)?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("field `{path}`: {}", e.inner())
    })
}

/// Parses JSON the way models tend to send it: possibly inside a Markdown fence, with prose
/// around the object, or with trailing commas.
pub fn lenient_json(text: &str) -> Result<serde_json::Value, String> {
    let trimmed = text.trim();
    if let Ok(v) = serde_json::from_str(trimmed) {
        return Ok(v);
    }
    let start = trimmed.find('{');
    let end = trimmed.rfind('}');
    let candidate = match (start, end) {
        (Some(s), Some(e)) if e > s => &trimmed[s..=e],
        _ => return Err("the answer holds no JSON object".into()),
    };
    serde_json::from_str(candidate)
        .or_else(|_| serde_json::from_str(&strip_trailing_commas(candidate)))
        .map_err(|e| format!("the answer is not valid JSON ({e})"))
}

/// Removes commas directly before `}` or `]`, outside strings.
fn strip_trailing_commas(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for (i, &c) in chars.iter().enumerate() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Usage;
    use serde::Deserialize;

    fn answer(content: &str, finish: &str) -> ChatResponse {
        ChatResponse {
            content: content.into(),
            usage: Usage::default(),
            finish_reason: Some(finish.into()),
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Shape {
        items: Vec<String>,
    }

    #[test]
    fn fenced_decorated_and_trailing_comma_json_is_read() {
        for text in [
            r#"{"items": ["a"]}"#,
            "```json\n{\"items\": [\"a\"]}\n```",
            "Here you go:\n{\"items\": [\"a\",],}\nHope that helps.",
        ] {
            assert_eq!(
                decode::<Shape>(&answer(text, "stop")).unwrap(),
                Shape {
                    items: vec!["a".into()]
                },
                "{text}"
            );
        }
        // A comma inside a string stays.
        assert_eq!(
            strip_trailing_commas(r#"{"a": "x,}", "b": [1,],}"#),
            r#"{"a": "x,}", "b": [1]}"#
        );
    }

    #[test]
    fn unusable_answers_say_why() {
        let cut = decode::<Shape>(&answer(r#"{"items": ["a""#, "length")).unwrap_err();
        assert!(cut.contains("cut off"), "{cut}");
        let prose = decode::<Shape>(&answer("I cannot help with that.", "stop")).unwrap_err();
        assert!(prose.contains("no JSON object"), "{prose}");
        let shape = decode::<Shape>(&answer(r#"{"items": [1]}"#, "stop")).unwrap_err();
        assert!(shape.contains("items[0]"), "{shape}");
    }
}
