//! Provider clients over real HTTP against the deterministic OpenAI-compatible stub, and the
//! local candle model on real weights.

mod common;

use std::sync::Arc;

use memu_crds::worker::{ProviderPreset, ProviderProfile};
use memu_e2e::openai_stub::{Endpoint, OpenAiStub, Scripted, StubOptions};
use memu_worker::metrics::Metrics;
use memu_worker::model::dot;
use memu_worker::providers::local::LocalEmbedder;
use memu_worker::providers::openai::OpenAiClient;
use memu_worker::providers::{
    ChatMessage, ChatModel, ChatRequest, Embedder, ProviderError, ResponseFormat,
};
use serde_json::json;

fn profile(stub: &OpenAiStub, key_env: &str) -> ProviderProfile {
    ProviderProfile {
        preset: ProviderPreset::Openai,
        base_url: Some(stub.base_url()),
        api_key_env: Some(key_env.into()),
        chat_model: Some("gpt-test".into()),
        embed_model: Some("embed-test".into()),
        embed_batch_size: 64,
        max_retries: 3,
        ..Default::default()
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("text number {i}")).collect()
}

#[tokio::test]
async fn embeddings_are_batched_ordered_and_normalised() {
    memu_worker::server::install_crypto_provider();
    let stub = common::stub().await;
    let metrics = Arc::new(Metrics::new());
    let client = OpenAiClient::new("stub", &profile(&stub, "MEMU_TEST_NO_KEY"), metrics.clone())
        .unwrap()
        .for_embeddings(common::STUB_DIM)
        .unwrap();
    let input = texts(150);
    let vectors = client.embed(&input).await.unwrap();
    assert_eq!(vectors.len(), 150);
    // 150 texts at 64 per request: three requests, in input order.
    assert_eq!(stub.count(Endpoint::Embeddings), 3);
    for (text, v) in input.iter().zip(&vectors) {
        let expected = memu_e2e::openai_stub::embed_text(text, common::STUB_DIM);
        assert!(dot(v, &expected) > 0.999);
        assert!((dot(v, v) - 1.0).abs() < 1e-4);
    }
    let sizes: Vec<usize> = stub
        .requests()
        .iter()
        .map(|r| r.body["input"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 150);
    assert!(sizes.iter().all(|s| *s <= 64));
    let text = metrics.encode();
    assert!(
        text.contains(r#"memu_embedding_texts_total{provider="stub",model="embed-test"} 150"#),
        "{text}"
    );
}

#[tokio::test]
async fn rate_limits_are_retried_honouring_retry_after() {
    memu_worker::server::install_crypto_provider();
    let stub = common::stub().await;
    stub.enqueue(
        Endpoint::Embeddings,
        Scripted {
            status: Some(429),
            retry_after: Some(1),
            ..Default::default()
        },
    );
    stub.enqueue(
        Endpoint::Embeddings,
        Scripted {
            status: Some(503),
            ..Default::default()
        },
    );
    let metrics = Arc::new(Metrics::new());
    let client = OpenAiClient::new("stub", &profile(&stub, "MEMU_TEST_NO_KEY"), metrics.clone())
        .unwrap()
        .for_embeddings(common::STUB_DIM)
        .unwrap();
    let vectors = client.embed(&texts(2)).await.unwrap();
    assert_eq!(vectors.len(), 2);
    assert_eq!(
        stub.count(Endpoint::Embeddings),
        3,
        "429, 503, then success"
    );
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"memu_embedding_requests_total{provider="stub",model="embed-test",outcome="ok"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn client_errors_are_not_retried_and_retries_are_bounded() {
    memu_worker::server::install_crypto_provider();
    let stub = common::stub().await;
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            status: Some(400),
            ..Default::default()
        },
    );
    let client = OpenAiClient::new(
        "stub",
        &profile(&stub, "MEMU_TEST_NO_KEY"),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let request = ChatRequest {
        messages: vec![ChatMessage::user("hi")],
        response_format: ResponseFormat::Text,
        temperature: None,
        max_tokens: None,
    };
    let err = client.chat(request.clone()).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 400, .. }),
        "{err}"
    );
    assert_eq!(stub.count(Endpoint::Chat), 1);
    for _ in 0..10 {
        stub.enqueue(
            Endpoint::Chat,
            Scripted {
                status: Some(500),
                retry_after: Some(0),
                ..Default::default()
            },
        );
    }
    let err = client.chat(request).await.unwrap_err();
    assert!(err.is_retryable());
    assert_eq!(
        stub.count(Endpoint::Chat),
        1 + 4,
        "one try and max_retries=3 retries"
    );
}

#[tokio::test]
async fn chat_sends_structured_output_requests_and_reads_usage() {
    memu_worker::server::install_crypto_provider();
    let stub = OpenAiStub::start(StubOptions {
        api_key: Some("sk-test-secret".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    // SAFETY: a variable name used by this test only.
    unsafe { std::env::set_var("MEMU_TEST_CHAT_KEY", "sk-test-secret") };
    let metrics = Arc::new(Metrics::new());
    let client = OpenAiClient::new(
        "stub",
        &profile(&stub, "MEMU_TEST_CHAT_KEY"),
        metrics.clone(),
    )
    .unwrap();
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            content: Some(r#"{"items": []}"#.into()),
            ..Default::default()
        },
    );
    let schema = json!({"type": "object", "properties": {"items": {"type": "array"}}, "required": ["items"], "additionalProperties": false});
    let reply = client
        .chat(ChatRequest {
            messages: vec![
                ChatMessage::system("extract"),
                ChatMessage::user("I live in Oslo"),
            ],
            response_format: ResponseFormat::JsonSchema {
                name: "extraction".into(),
                schema: schema.clone(),
            },
            temperature: Some(0.0),
            max_tokens: Some(500),
        })
        .await
        .unwrap();
    assert_eq!(reply.content, r#"{"items": []}"#);
    assert_eq!(reply.finish_reason.as_deref(), Some("stop"));
    assert!(reply.usage.prompt_tokens > 0);
    let sent = &stub.requests()[0];
    assert!(sent.authorized);
    assert_eq!(sent.body["model"], "gpt-test");
    assert_eq!(sent.body["response_format"]["type"], "json_schema");
    assert_eq!(
        sent.body["response_format"]["json_schema"]["schema"],
        schema
    );
    assert_eq!(sent.body["max_tokens"], 500);
    assert!(
        metrics
            .encode()
            .contains(r#"memu_llm_tokens_total{provider="stub",model="gpt-test",kind="prompt"}"#)
    );

    // A wrong key is a clear error that never echoes the key.
    unsafe { std::env::set_var("MEMU_TEST_CHAT_KEY_WRONG", "sk-wrong-key") };
    let wrong =
        OpenAiClient::new("stub", &profile(&stub, "MEMU_TEST_CHAT_KEY_WRONG"), metrics).unwrap();
    let err = wrong
        .chat(ChatRequest {
            messages: vec![ChatMessage::user("hi")],
            response_format: ResponseFormat::Text,
            temperature: None,
            max_tokens: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Http { status: 401, .. }));
    assert!(!err.to_string().contains("sk-wrong-key"));
    assert!(!format!("{err:?}").contains("sk-wrong-key"));
}

#[tokio::test]
async fn wrong_embedding_dimension_is_a_clear_error() {
    memu_worker::server::install_crypto_provider();
    let stub = common::stub().await;
    let client = OpenAiClient::new(
        "stub",
        &profile(&stub, "MEMU_TEST_NO_KEY"),
        Arc::new(Metrics::new()),
    )
    .unwrap()
    .for_embeddings(1536)
    .unwrap();
    let err = client.embed(&texts(1)).await.unwrap_err();
    assert!(
        err.to_string().contains("vector.dimension is 1536"),
        "{err}"
    );
}

#[tokio::test]
async fn https_provider_without_a_key_is_refused_before_any_request() {
    let profile = ProviderProfile {
        preset: ProviderPreset::Openai,
        api_key_env: Some("MEMU_TEST_SURELY_UNSET".into()),
        ..Default::default()
    };
    let client = OpenAiClient::new("openai", &profile, Arc::new(Metrics::new()))
        .unwrap()
        .for_embeddings(1536)
        .unwrap();
    let err = client.embed(&texts(1)).await.unwrap_err();
    assert!(err.to_string().contains("MEMU_TEST_SURELY_UNSET"), "{err}");
}

/// The real all-MiniLM-L6-v2 weights through candle: related sentences are closer than
/// unrelated ones, and the output is unit length and deterministic.
#[tokio::test]
async fn local_model_embeds_semantically() {
    let profile = ProviderProfile {
        preset: ProviderPreset::Local,
        model_dir: Some(common::model_dir()),
        ..Default::default()
    };
    let embedder = LocalEmbedder::load("local", &profile, 384, Arc::new(Metrics::new())).unwrap();
    let input: Vec<String> = [
        "I adore my two dogs",
        "She loves her puppies",
        "The quarterly tax filing is due in April",
        "short",
    ]
    .map(String::from)
    .to_vec();
    let v = embedder.embed(&input).await.unwrap();
    assert_eq!(v.len(), 4);
    assert!(
        v.iter()
            .all(|x| x.len() == 384 && (dot(x, x) - 1.0).abs() < 1e-3)
    );
    assert!(
        dot(&v[0], &v[1]) > dot(&v[0], &v[2]) + 0.2,
        "{} vs {}",
        dot(&v[0], &v[1]),
        dot(&v[0], &v[2])
    );
    // Padding in a batch does not change a text's vector.
    let alone = embedder.embed(&input[3..]).await.unwrap();
    assert!(dot(&alone[0], &v[3]) > 0.999);
    let err = LocalEmbedder::load("local", &profile, 768, Arc::new(Metrics::new()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("vector.dimension"), "{err}");
    let missing = ProviderProfile {
        preset: ProviderPreset::Local,
        ..Default::default()
    };
    let err = LocalEmbedder::load("local", &missing, 384, Arc::new(Metrics::new()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("install-model.sh"), "{err}");
}
