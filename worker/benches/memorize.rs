//! Memorize throughput with the LLM pipeline against the OpenAI-compatible stub at 50 ms per
//! request (a stand-in for a fast hosted model): conversations per second at 1, 4 and 16
//! concurrent jobs, and the chat and embedding requests each conversation costs.
//!
//! `cargo bench -p memu-worker --bench memorize` prints a table and writes
//! `e2e/results/memorize-throughput.json`. The store is SQLite in a temporary directory, or
//! Postgres when `MEMU_TEST_DATABASE_URL` points at a server (as `e2e/test.sh` exports).

use std::sync::Arc;
use std::time::{Duration, Instant};

use memu_crds::worker::{ProviderPreset, ProviderProfile, WorkerConfig};
use memu_e2e::openai_stub::{Endpoint, OpenAiStub, StubOptions};
use memu_worker::model::{Message, Scope, TaskStatus, UserRef};
use memu_worker::service::{MemorizeInput, MemoryService};
use memu_worker::tenancy::DEFAULT_TENANT;
use serde_json::json;

#[path = "common/mod.rs"]
mod common;
use common::database;

const LATENCY: Duration = Duration::from_millis(50);
const DIM: usize = 64;

fn conversation(i: usize) -> Vec<Message> {
    (0..10)
        .map(|t| Message {
            role: if t % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!(
                "Conversation {i}, turn {t}: I moved to city {i} and started job {t}."
            ),
            name: None,
            created_at: None,
        })
        .collect()
}

struct Row {
    concurrency: usize,
    conversations: usize,
    seconds: f64,
    chat_per_conversation: f64,
    embeddings_per_conversation: f64,
}

async fn run(
    concurrency: usize,
    conversations: usize,
    dir: &std::path::Path,
) -> (Row, &'static str) {
    let stub = OpenAiStub::start(StubOptions {
        dimension: DIM,
        latency: LATENCY,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut config = WorkerConfig::default();
    config.vector.dimension = DIM;
    config.providers.insert(
        "stub".into(),
        ProviderProfile {
            preset: ProviderPreset::Openai,
            base_url: Some(stub.base_url()),
            api_key_env: Some("MEMU_BENCH_KEY_UNSET".into()),
            embed_model: Some("stub-embed".into()),
            chat_model: Some("stub-chat".into()),
            max_concurrency: 64,
            ..Default::default()
        },
    );
    config.embedding.provider = "stub".into();
    config.llm.provider = Some("stub".into());
    config.pipeline.concurrency = concurrency;
    config.pipeline.poll_interval_ms = 10;
    let backend = database(&mut config, dir, &format!("c{concurrency}")).await;
    let service: Arc<MemoryService> = memu_worker::server::build_service(config, true)
        .await
        .unwrap();
    // Category anchors are embedded once per process: keep that out of the figures.
    service.category_spec_vectors().await.unwrap();
    let before = (stub.count(Endpoint::Chat), stub.count(Endpoint::Embeddings));
    let mut tasks = Vec::new();
    for i in 0..conversations {
        let (task, _) = service
            .memorize(MemorizeInput {
                scope: Scope::new(UserRef::new(DEFAULT_TENANT, &format!("user-{i}")), None),
                idempotency_key: None,
                user_name: Some("Sam".into()),
                agent_name: None,
                session_date: None,
                messages: conversation(i),
            })
            .await
            .unwrap();
        tasks.push(task.id);
    }
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pipeline = tokio::spawn(memu_worker::pipeline::run(service.clone(), stop_rx));
    for id in &tasks {
        loop {
            let task = service.task(DEFAULT_TENANT, *id).await.unwrap();
            match task.status {
                TaskStatus::Success => break,
                TaskStatus::Failed => panic!("task failed: {:?}", task.error),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stop_tx.send(true).unwrap();
    pipeline.await.unwrap();
    let n = conversations as f64;
    (
        Row {
            concurrency,
            conversations,
            seconds,
            chat_per_conversation: (stub.count(Endpoint::Chat) - before.0) as f64 / n,
            embeddings_per_conversation: (stub.count(Endpoint::Embeddings) - before.1) as f64 / n,
        },
        backend,
    )
}

#[tokio::main]
async fn main() {
    memu_worker::server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let mut backend = "sqlite";
    for concurrency in [1, 4, 16] {
        let conversations = (concurrency * 8).max(16);
        let (row, b) = run(concurrency, conversations, dir.path()).await;
        backend = b;
        rows.push(row);
    }
    println!(
        "memorize throughput (LLM pipeline, stub at {} ms per request, {backend})",
        LATENCY.as_millis()
    );
    println!(
        "{:>11} {:>13} {:>9} {:>12} {:>10} {:>11} {:>10}",
        "concurrency", "conversations", "seconds", "conv/s", "ideal/s", "chat/conv", "embed/conv"
    );
    let mut out = Vec::new();
    for r in &rows {
        let throughput = r.conversations as f64 / r.seconds;
        // The physical limit: each job waits at least one latency per sequential request.
        let sequential = r.chat_per_conversation + r.embeddings_per_conversation;
        let ideal = r.concurrency as f64 / (sequential * LATENCY.as_secs_f64());
        println!(
            "{:>11} {:>13} {:>9.2} {:>12.2} {:>10.2} {:>11.2} {:>10.2}",
            r.concurrency,
            r.conversations,
            r.seconds,
            throughput,
            ideal,
            r.chat_per_conversation,
            r.embeddings_per_conversation
        );
        out.push(json!({
            "concurrency": r.concurrency,
            "conversations": r.conversations,
            "seconds": r.seconds,
            "conversations_per_second": throughput,
            "ideal_conversations_per_second": ideal,
            "ratio_to_ideal": throughput / ideal,
            "chat_requests_per_conversation": r.chat_per_conversation,
            "embedding_requests_per_conversation": r.embeddings_per_conversation,
        }));
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/results/memorize-throughput.json"
    );
    std::fs::write(
        path,
        serde_json::to_string_pretty(&json!({
            "benchmark": "memorize",
            "backend": backend,
            "stub_latency_ms": LATENCY.as_millis() as u64,
            "turns_per_conversation": 10,
            "results": out,
        }))
        .unwrap(),
    )
    .unwrap();
    println!("written: e2e/results/memorize-throughput.json");
}
