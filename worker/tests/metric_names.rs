//! Every metric name the alert rules (`charts/memu-operator/files/prometheus-rules.yaml`) and
//! the Grafana dashboard (`config/grafana/memu-dashboard.json`) use is exported by the real
//! `memu-worker` binary: it is started on loopback (SQLite, the OpenAI-compatible stub for
//! embeddings and chat), driven through memorize, retrieve and a refused key so that every
//! labelled family has a series, and its `/metrics` is scraped. The operator's names
//! (`memu_operator_*`) are checked in `operator/tests/metric_names.rs`.

mod common;
use common::{Running, create_key, free_port};

use std::process::{Command, Stdio};
use std::time::Duration;

use memu_e2e::openai_stub::{Endpoint, OpenAiStub, Scripted, StubOptions};
use memu_e2e::promql;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_memu-worker");

/// Names no memU binary exports, used on purpose, each with its reason. Empty today: the
/// replica panels read the operator's gauges, not kube-state-metrics.
const ALLOWED: &[(&str, &str)] = &[];

/// Whether the worker must export `name` (the operator's and kube-state-metrics' are not its own).
fn worker_owns(name: &str) -> bool {
    !name.starts_with("memu_operator_") && !name.starts_with("kube_")
}

fn worker(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("--config")
        .arg(config);
    cmd
}

#[tokio::test]
async fn alert_and_dashboard_metric_names_are_exported_by_the_worker() {
    memu_worker::server::install_crypto_provider();
    let stub = OpenAiStub::start(StubOptions {
        dimension: common::STUB_DIM,
        ..Default::default()
    })
    .await
    .unwrap();
    // The first chat answer is not JSON: the step repairs it, and the invalid answer is counted.
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            content: Some("this is not JSON".into()),
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("worker.yaml");
    let config_doc = json!({
        "server": {"listen": format!("127.0.0.1:{port}")},
        "database": {"backend": "sqlite", "sqlite_path": dir.path().join("memu.db")},
        "vector": {"dimension": common::STUB_DIM},
        "embedding": {"provider": "stub"},
        "llm": {"provider": "stub", "prices": {"stub-chat": {"prompt_per_million": 1.0, "completion_per_million": 2.0}}},
        "providers": {"stub": {
            "preset": "openai", "base_url": stub.base_url(), "api_key_env": "MEMU_TEST_STUB_KEY_UNSET",
            "embed_model": "stub-embed", "chat_model": "stub-chat", "max_retries": 0,
        }},
        "pipeline": {"poll_interval_ms": 50},
    });
    std::fs::write(&config, serde_norway::to_string(&config_doc).unwrap()).unwrap();

    let key = create_key(&mut worker(&config), dir.path());
    let _running = Running(
        worker(&config)
            .args(["serve", "--role", "all"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let http = common::authorized_client(&key);
    let mut ready = false;
    for _ in 0..400 {
        if let Ok(r) = reqwest::get(format!("{base}/readyz")).await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the worker never became ready");

    // A refused key, a memorize to its end, two retrieves.
    let refused = reqwest::get(format!("{base}/api/v3/memory/memorize/status/x"))
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let task: Value = http
        .post(format!("{base}/api/v3/memory/memorize"))
        .json(&json!({"user_id": "maria", "conversation": [
            {"role": "user", "content": "I live in Lisbon and I work as a marine biologist."}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = task["task_id"].as_str().expect("a task id").to_string();
    let status = common::wait_task_over_http(&http, &base, &id).await;
    assert_eq!(status["status"], "SUCCESS", "{status}");
    for _ in 0..2 {
        let r = http
            .post(format!("{base}/api/v3/memory/retrieve"))
            .json(&json!({"user_id": "maria", "query": "Where does Maria live?"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported = promql::exported_names(&text);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let usages = promql::repository_usages(&root).unwrap();
    assert!(usages.len() > 20, "too few expressions found: {usages:?}");
    let missing = promql::missing(&usages, worker_owns, &exported, ALLOWED);
    assert!(
        missing.is_empty(),
        "metric names used by the alert rules or the dashboard but not exported by memu-worker:\n{}\n\n/metrics was:\n{text}",
        missing.join("\n")
    );
}
