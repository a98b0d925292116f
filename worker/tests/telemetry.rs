//! OpenTelemetry tracing end to end: the worker exports over real OTLP/HTTP to a receiver on
//! loopback. A memorize request is one trace from the API through the queue and the pipeline's
//! steps to every LLM and embedding call (which carry `traceparent` to the provider); retrieve
//! likewise. Runs on SQLite and on real Postgres (the queued job carries the trace context
//! through the database).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::TestServer;
use memu_e2e::openai_stub::{Endpoint, Scripted};
use memu_e2e::otlp_sink::{OtlpSink, ReceivedSpan};
use serde_json::{Value, json};

const MEMORIZE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const RETRIEVE_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Polls the receiver until the trace holds spans of every name in `names` (bounded).
async fn wait_for_trace(sink: &OtlpSink, trace: &str, names: &[&str]) -> Vec<ReceivedSpan> {
    for _ in 0..200 {
        let spans = sink.trace(trace);
        let have: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        if names.iter().all(|n| have.contains(n)) {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let have: Vec<String> = sink.trace(trace).into_iter().map(|s| s.name).collect();
    panic!("trace {trace} lacks some of {names:?}; it has {have:?}");
}

/// Every span of the trace reaches `root` through its parents, and `root`'s parent is the
/// caller's span: one tree, continued from the request.
fn assert_one_tree(spans: &[ReceivedSpan], root: &ReceivedSpan) {
    let by_id: BTreeMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(root.parent_span_id, CALLER_SPAN, "{root:?}");
    for span in spans {
        let mut at = span;
        let mut hops = 0;
        while at.span_id != root.span_id {
            at = by_id
                .get(at.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("{} has a parent outside the trace: {at:?}", span.name));
            hops += 1;
            assert!(hops < 32, "a cycle above {}", span.name);
        }
    }
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &'a str) -> impl Iterator<Item = &'a ReceivedSpan> {
    spans.iter().filter(move |s| s.name == name)
}

fn reply(stub: &memu_e2e::openai_stub::OpenAiStub, content: Value) {
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            content: Some(content.to_string()),
            ..Default::default()
        },
    );
}

async fn traced_post(server: &TestServer, path: &str, trace: &str, body: Value) -> Value {
    let response = server
        .http
        .post(server.url(path))
        .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert!(status < 300, "{status} {body}");
    body
}

async fn one_trace_per_request(postgres: bool) {
    let sink = OtlpSink::start().await.unwrap();
    let stub = common::stub().await;
    let mut config = common::stub_config(&stub);
    config.llm.provider = Some("stub".into());
    config.tracing.otlp_endpoint = Some(sink.endpoint());
    config.tracing.service_name = "memu-worker-test".into();
    config.tracing.export_interval_ms = 100;
    memu_worker::server::install_crypto_provider();
    let _telemetry = memu_worker::telemetry::init(&config.logging, &config.tracing).unwrap();
    let (config, _db) = common::with_backend(config, postgres).await;
    let server = TestServer::start(config).await;

    // Memorize: extraction then filing, as the stub is told to answer.
    reply(
        &stub,
        json!({"caption": "Maria's city", "items": [
            {"memory_type": "profile", "summary": "Maria lives in Lisbon.", "happened_at": null}]}),
    );
    reply(
        &stub,
        json!({"assignments": [{"item": 0, "categories": [{"name": "personal_info", "confidence": 0.9}]}],
               "summaries": [{"category": "personal_info", "summary": "Maria lives in Lisbon."}]}),
    );
    let queued = traced_post(
        &server,
        "/api/v3/memory/memorize",
        MEMORIZE_TRACE,
        json!({"user_id": "maria", "user_name": "Maria", "conversation": [
            {"role": "user", "content": "I moved to Lisbon last year."},
            {"role": "assistant", "content": "How do you like it?"}]}),
    )
    .await;
    let done = server.wait_task(queued["task_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "SUCCESS", "{done}");

    let spans = wait_for_trace(
        &sink,
        MEMORIZE_TRACE,
        &[
            "POST /api/v3/memory/memorize",
            "memorize job",
            "llm extract",
            "llm categorize",
            "embed items",
            "provider request",
        ],
    )
    .await;
    let request = named(&spans, "POST /api/v3/memory/memorize")
        .next()
        .unwrap();
    assert_eq!(request.kind, 2, "a server span");
    assert_eq!(request.service_name, "memu-worker-test");
    assert_eq!(request.attributes["http.route"], "/api/v3/memory/memorize");
    assert_eq!(request.attributes["http.response.status_code"], "202");
    assert_one_tree(&spans, request);
    let job = named(&spans, "memorize job").next().unwrap();
    assert_eq!(job.kind, 5, "a consumer span");
    assert_eq!(
        job.attributes["task_id"],
        queued["task_id"].as_str().unwrap()
    );
    let extract = named(&spans, "llm extract").next().unwrap();
    assert_eq!(extract.attributes["gen_ai.request.model"], "stub-chat");
    assert!(
        extract.attributes["gen_ai.usage.input_tokens"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    // Every provider call is a client span; the chat calls sit under their step's span.
    let requests: Vec<_> = named(&spans, "provider request").collect();
    let sent = stub.requests();
    assert_eq!(requests.len(), sent.len(), "{requests:?}");
    assert!(requests.iter().all(|r| r.kind == 3));
    for step in ["llm extract", "llm categorize", "embed items"] {
        let step = named(&spans, step).next().unwrap();
        assert!(
            requests.iter().any(|r| r.parent_span_id == step.span_id),
            "no provider request under {}",
            step.name
        );
    }
    // The provider got the trace context on every call, naming the client span as parent.
    for recorded in &sent {
        let parent = recorded
            .traceparent
            .as_deref()
            .unwrap_or_else(|| panic!("no traceparent on a {:?} request", recorded.endpoint));
        let fields: Vec<&str> = parent.split('-').collect();
        assert_eq!(fields[1], MEMORIZE_TRACE, "{parent}");
        assert!(
            requests.iter().any(|r| r.span_id == fields[2]),
            "{parent} names no provider request span"
        );
    }

    // Retrieve: its own trace, with the query embedding and the vector search in it.
    let found = traced_post(
        &server,
        "/api/v3/memory/retrieve",
        RETRIEVE_TRACE,
        json!({"user_id": "maria", "query": "where does Maria live", "top_k": 1}),
    )
    .await;
    assert_eq!(
        found["items"][0]["summary"], "Maria lives in Lisbon.",
        "{found}"
    );
    let spans = wait_for_trace(
        &sink,
        RETRIEVE_TRACE,
        &[
            "POST /api/v3/memory/retrieve",
            "embed query",
            "vector search",
            "provider request",
        ],
    )
    .await;
    let request = spans
        .iter()
        .find(|s| s.name == "POST /api/v3/memory/retrieve")
        .unwrap();
    assert_one_tree(&spans, request);
    let last = stub.requests().pop().unwrap();
    assert_eq!(last.endpoint, Endpoint::Embeddings);
    assert!(last.traceparent.unwrap().contains(RETRIEVE_TRACE));

    // Probes and scrapes are not traced; the two POSTs made exactly the two traces (the
    // status polls are traces of their own, started by this untraced client).
    let _ = server.get("/healthz").await;
    let _ = server.metrics().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let all = sink.spans();
    assert!(
        all.iter()
            .all(|s| !s.name.contains("/healthz") && !s.name.contains("/metrics"))
    );
    let traces: BTreeSet<&str> = all
        .iter()
        .filter(|s| s.name.starts_with("POST /api/v3/memory/"))
        .map(|s| s.trace_id.as_str())
        .collect();
    assert_eq!(traces, BTreeSet::from([MEMORIZE_TRACE, RETRIEVE_TRACE]));
}

#[tokio::test]
async fn a_memorize_and_a_retrieve_are_one_trace_each_on_sqlite() {
    one_trace_per_request(false).await;
}

#[tokio::test]
async fn a_memorize_and_a_retrieve_are_one_trace_each_on_postgres() {
    one_trace_per_request(true).await;
}
