//! Memorize throughput of the LLM pipeline against the OpenAI-compatible stub at 0 ms (the
//! pipeline's own cost) and 50 ms per request (a fast hosted model): conversations per second
//! at 1, 4 and 16 concurrent jobs, the LLM calls, embedding requests and tokens each 10-turn
//! conversation costs, and the ratio to the ideal a job could reach (one latency per sequential
//! request). The store is SQLite, or Postgres when `MEMU_TEST_DATABASE_URL` names a server.

use std::time::{Duration, Instant};

use memu_crds::worker::{ProviderPreset, ProviderProfile, WorkerConfig};
use memu_e2e::openai_stub::{Endpoint, OpenAiStub, StubOptions};
use memu_worker::model::{Message, Scope, TaskStatus, UserRef};
use memu_worker::service::{MemorizeInput, MemoryService};
use memu_worker::tenancy::DEFAULT_TENANT;
use serde_json::{Value, json};

use crate::common::{Size, metric_sum, use_new_postgres_database};

const DIM: usize = 64;
const TURNS: usize = 10;

fn conversation(i: usize) -> Vec<Message> {
    (0..TURNS)
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

fn tokens(service: &MemoryService) -> f64 {
    let text = service.metrics.encode();
    metric_sum(&text, "memu_llm_tokens_total") + metric_sum(&text, "memu_embedding_tokens_total")
}

async fn run_one(
    latency: Duration,
    concurrency: usize,
    conversations: usize,
    dir: &std::path::Path,
) -> (Value, &'static str) {
    let stub = OpenAiStub::start(StubOptions {
        dimension: DIM,
        latency,
        ..Default::default()
    })
    .await
    .expect("start the stub");
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
    config.cache.redis_url_env = "MEMU_BENCH_REDIS_UNSET".into();
    let label = format!("m{}c{concurrency}", latency.as_millis());
    let backend = if use_new_postgres_database(&mut config, &label).await {
        "postgres"
    } else {
        config.database.sqlite_path = dir.join(format!("{label}.db"));
        "sqlite"
    };
    let service = memu_worker::server::build_service(config, true)
        .await
        .expect("build the service");
    // Category anchors are embedded once per process: keep that out of the figures.
    service.category_spec_vectors().await.unwrap();
    let before = (
        stub.count(Endpoint::Chat),
        stub.count(Endpoint::Embeddings),
        tokens(&service),
    );
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
                overrides: Default::default(),
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
                TaskStatus::Failed => panic!("memorize failed: {:?}", task.error),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stop_tx.send(true).unwrap();
    pipeline.await.unwrap();
    let n = conversations as f64;
    let chat = (stub.count(Endpoint::Chat) - before.0) as f64 / n;
    let embeddings = (stub.count(Endpoint::Embeddings) - before.1) as f64 / n;
    let throughput = n / seconds;
    // The physical limit: a job waits at least one latency per sequential request.
    let ideal = (!latency.is_zero())
        .then(|| concurrency as f64 / ((chat + embeddings) * latency.as_secs_f64()));
    (
        json!({
            "stub_latency_ms": latency.as_millis() as u64,
            "concurrency": concurrency,
            "conversations": conversations,
            "seconds": seconds,
            "conversations_per_second": throughput,
            "ideal_conversations_per_second": ideal,
            "ratio_to_ideal": ideal.map(|i| throughput / i),
            "llm_calls_per_conversation": chat,
            "embedding_requests_per_conversation": embeddings,
            "tokens_per_conversation": (tokens(&service) - before.2) / n,
        }),
        backend,
    )
}

pub async fn run(size: Size) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let mut backend = "sqlite";
    for latency in [Duration::ZERO, Duration::from_millis(50)] {
        for concurrency in [1, 4, 16] {
            let conversations = match size {
                Size::Smoke => 8,
                Size::Full => (concurrency * 8).max(32),
            };
            eprintln!(
                "memorize: stub at {} ms, {concurrency} concurrent jobs",
                latency.as_millis()
            );
            let (row, b) = run_one(latency, concurrency, conversations, dir.path()).await;
            backend = b;
            rows.push(row);
        }
    }
    // A functional failure fails the run; speed never does.
    for row in &rows {
        let calls = row["llm_calls_per_conversation"].as_f64().unwrap_or(0.0);
        assert!(calls >= 1.0, "the pipeline made no LLM call: {row}");
    }
    json!({
        "backend": backend,
        "turns_per_conversation": TURNS,
        "results": rows,
    })
}
