//! The `memu-worker` binary as a user runs it: start-up errors, migrate, serve, and a SIGTERM
//! that lets an in-flight request finish before exiting 0.

mod common;
use common::{Running, create_key, free_port};

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use memu_e2e::openai_stub::{Endpoint, OpenAiStub, StubOptions};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_memu-worker");

fn worker(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MEMU_DATABASE__SQLITE_PATH", dir.join("memu.db"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run memu-worker")
}

#[test]
fn help_and_startup_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let help = run(worker(dir.path()).arg("--help"));
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for word in ["serve", "migrate", "--config"] {
        assert!(text.contains(word), "{text}");
    }

    let bad = run(worker(dir.path())
        .arg("serve")
        .env("MEMU_SERVER__MAX_BODY_BYTES", "lots"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("server.max_body_bytes"));

    let file = dir.path().join("worker.yaml");
    std::fs::write(&file, "vector:\n  dimenson: 3\n").unwrap();
    let bad = run(worker(dir.path()).args(["--config", file.to_str().unwrap(), "serve"]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dimenson"));

    // No model configured: the message says how to get one.
    let no_model = run(worker(dir.path()).arg("migrate"));
    assert!(!no_model.status.success());
    assert!(String::from_utf8_lossy(&no_model.stderr).contains("install-model.sh"));

    // Postgres without a DSN says which variable to set.
    let no_dsn = run(worker(dir.path())
        .arg("migrate")
        .env("MEMU_DATABASE__BACKEND", "postgres")
        .env("MEMU_PROVIDERS__LOCAL__MODEL_DIR", common::model_dir()));
    assert!(!no_dsn.status.success());
    assert!(String::from_utf8_lossy(&no_dsn.stderr).contains("DATABASE_URL"));
}

#[tokio::test]
async fn migrate_distribute_needs_citus_and_keeps_the_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let dsn = common::fresh_database().await;
    let out = run(worker(dir.path())
        .args(["migrate", "--distribute"])
        .env("MEMU_DATABASE__BACKEND", "postgres")
        .env("DATABASE_URL", &dsn)
        .env("MEMU_PROVIDERS__LOCAL__MODEL_DIR", common::model_dir()));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("citus extension is not installed"),
        "{stderr}"
    );
    // The plain migration ran first and stays applied.
    let pool = sqlx::PgPool::connect(&dsn).await.unwrap();
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN \
         ('users', 'resources', 'memory_items', 'memory_categories', 'category_items', 'memorize_tasks')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 6);
}

#[test]
fn effective_config_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(worker(dir.path())
        .arg("config")
        .env("MEMU_ROLE", "pipeline"));
    assert!(out.status.success());
    let config: Value = serde_norway::from_slice(&out.stdout).unwrap();
    assert_eq!(config["role"], "pipeline");
    assert_eq!(config["vector"]["hnsw_m"], 16);
}

async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker at {base} never became ready");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    memu_worker::server::install_crypto_provider();
    let stub = OpenAiStub::start(StubOptions {
        dimension: common::STUB_DIM,
        latency: Duration::from_millis(1500),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let migrate = run(worker(dir.path())
        .arg("migrate")
        .env("MEMU_VECTOR__DIMENSION", common::STUB_DIM.to_string())
        .env("MEMU_EMBEDDING__PROVIDER", "stub")
        .env("MEMU_PROVIDERS__STUB__BASE_URL", stub.base_url())
        .env("MEMU_PROVIDERS__STUB__EMBED_MODEL", "stub-embed"));
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let key = create_key(
        worker(dir.path())
            .env("MEMU_VECTOR__DIMENSION", common::STUB_DIM.to_string())
            .env("MEMU_EMBEDDING__PROVIDER", "stub")
            .env("MEMU_PROVIDERS__STUB__BASE_URL", stub.base_url())
            .env("MEMU_PROVIDERS__STUB__EMBED_MODEL", "stub-embed"),
        dir.path(),
    );
    let child = worker(dir.path())
        .args(["serve", "--role", "all"])
        .env("MEMU_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("MEMU_VECTOR__DIMENSION", common::STUB_DIM.to_string())
        .env("MEMU_EMBEDDING__PROVIDER", "stub")
        .env("MEMU_PROVIDERS__STUB__BASE_URL", stub.base_url())
        .env("MEMU_PROVIDERS__STUB__EMBED_MODEL", "stub-embed")
        .env("MEMU_LOGGING__FORMAT", "json")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    wait_ready(&base).await;

    // A retrieve that waits on the slow embedding provider is in flight when SIGTERM arrives.
    let http = common::authorized_client(&key);
    let request = tokio::spawn({
        let url = format!("{base}/api/v3/memory/retrieve");
        async move {
            http.post(url)
                .json(&json!({"user_id": "u", "query": "in flight"}))
                .send()
                .await
        }
    });
    for _ in 0..200 {
        if stub.count(Endpoint::Embeddings) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        stub.count(Endpoint::Embeddings) > 0,
        "request never reached the provider"
    );
    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );

    let response = request
        .await
        .unwrap()
        .expect("in-flight request was cut off");
    assert_eq!(response.status(), 200);
    let status = tokio::task::spawn_blocking(move || running.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // New connections are refused once it has stopped.
    assert!(reqwest::get(format!("{base}/healthz")).await.is_err());
}

/// The README's first command, as a user runs it: only the model directory in the environment,
/// SQLite and offline mode by default; memorize → SUCCESS → retrieve finds the fact.
#[tokio::test]
async fn readme_flow_with_defaults_and_the_local_model() {
    memu_worker::server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let key = create_key(
        worker(dir.path()).env("MEMU_PROVIDERS__LOCAL__MODEL_DIR", common::model_dir()),
        dir.path(),
    );
    let child = worker(dir.path())
        .arg("serve")
        .env("MEMU_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("MEMU_PROVIDERS__LOCAL__MODEL_DIR", common::model_dir())
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let running = Running(child);
    wait_ready(&base).await;
    let http = common::authorized_client(&key);
    let anonymous = reqwest::get(format!("{base}/api/v3/memory/memorize/status/x"))
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401, "the API needs a key");
    let task: Value = http
        .post(format!("{base}/api/v3/memory/memorize"))
        .json(
            &json!({"user_id": "maria", "user_name": "Maria", "conversation": [
            {"role": "user", "content": "I live in Lisbon and I work as a marine biologist."},
            {"role": "assistant", "content": "Fascinating! What do you study?"}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = task["task_id"].as_str().unwrap();
    let status = common::wait_task_over_http(&http, &base, id).await;
    assert_eq!(status["status"], "SUCCESS", "{status}");
    let found: Value = http
        .post(format!("{base}/api/v3/memory/retrieve"))
        .json(&json!({"user_id": "maria", "query": "Where does Maria live?", "top_k": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        found["items"][0]["summary"], "Maria lives in Lisbon and works as a marine biologist.",
        "{found}"
    );
    // A wrong key is refused, and no key — valid or not — reaches the log, even at debug level.
    let forged = format!("memu_aaaaaaaaaaaa_{}", "S3cr3t".repeat(8));
    let refused = common::authorized_client(&forged)
        .get(format!("{base}/api/v1/users/maria/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    drop(running);
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert!(log.contains("serving"), "the worker logged nothing: {log}");
    let secret = key.rsplit('_').next().unwrap();
    assert!(!log.contains(secret), "the API key is in the log");
    assert!(!log.contains("S3cr3t"), "a presented key is in the log");
}
