//! Shared helpers of the worker's integration tests: real Postgres databases, the local model,
//! the OpenAI-compatible stub, and an in-process server on a real loopback port.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use memu_crds::worker::{DatabaseBackend, ProviderPreset, ProviderProfile, WorkerConfig};
use memu_e2e::openai_stub::{OpenAiStub, StubOptions};
use memu_worker::service::MemoryService;
use sqlx::Connection;

/// Dimension used with the stub embedder (small keeps tests quick).
pub const STUB_DIM: usize = 64;

/// The Postgres server the test script started (`e2e/test.sh` exports it).
pub fn admin_dsn() -> String {
    std::env::var("MEMU_TEST_DATABASE_URL").expect(
        "MEMU_TEST_DATABASE_URL is not set: run the suite through e2e/test.sh, which starts \
         PostgreSQL 15 + pgvector and exports it",
    )
}

/// A new, empty database on the test server with pgvector available; returns its DSN.
pub async fn fresh_database() -> String {
    let admin = admin_dsn();
    let name = format!("memu_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to test Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("DSN has a database name");
    format!("{base}/{name}")
}

/// Directory of the local model (`scripts/install-model.sh` prints it; the test script exports it).
pub fn model_dir() -> PathBuf {
    PathBuf::from(std::env::var("MEMU_TEST_MODEL_DIR").expect(
        "MEMU_TEST_MODEL_DIR is not set: run the suite through e2e/test.sh, which installs the \
         model with scripts/install-model.sh",
    ))
}

pub async fn stub() -> OpenAiStub {
    OpenAiStub::start(StubOptions {
        dimension: STUB_DIM,
        ..Default::default()
    })
    .await
    .expect("start stub")
}

/// Config using the stub for embeddings.
pub fn stub_config(stub: &OpenAiStub) -> WorkerConfig {
    let mut config = WorkerConfig::default();
    config.vector.dimension = STUB_DIM;
    config.providers.insert(
        "stub".into(),
        ProviderProfile {
            preset: ProviderPreset::Openai,
            base_url: Some(stub.base_url()),
            api_key_env: Some("MEMU_TEST_STUB_KEY_UNSET".into()),
            embed_model: Some("stub-embed".into()),
            chat_model: Some("stub-chat".into()),
            max_retries: 2,
            ..Default::default()
        },
    );
    config.embedding.provider = "stub".into();
    config.pipeline.poll_interval_ms = 50;
    config
}

/// Config using the local candle model.
pub fn local_config() -> WorkerConfig {
    let mut config = WorkerConfig::default();
    config.providers.get_mut("local").unwrap().model_dir = Some(model_dir());
    config.pipeline.poll_interval_ms = 50;
    config
}

pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

/// Points the config at a fresh database of the given kind.
pub async fn with_backend(mut config: WorkerConfig, postgres: bool) -> (WorkerConfig, Backend) {
    if postgres {
        let dsn = fresh_database().await;
        let var = format!("MEMU_TEST_DSN_{}", uuid::Uuid::new_v4().simple());
        // SAFETY: each test sets a variable of its own name; nothing reads it concurrently.
        unsafe { std::env::set_var(&var, &dsn) };
        config.database.backend = DatabaseBackend::Postgres;
        config.database.url_env = var;
        (config, Backend::Postgres(dsn))
    } else {
        let dir = tempfile::tempdir().unwrap();
        config.database.sqlite_path = dir.path().join("memu.db");
        (config, Backend::Sqlite(dir))
    }
}

/// A new key of the tenant (created when missing) with the given scopes.
pub async fn issue_key(service: &MemoryService, tenant: &str, scopes: &str) -> String {
    use secrecy::ExposeSecret as _;
    if service.store.get_tenant(tenant).await.unwrap().is_none() {
        service
            .access
            .create_tenant(tenant, tenant, Default::default())
            .await
            .unwrap();
    }
    let scopes = memu_worker::tenancy::parse_scopes(scopes).unwrap();
    let issued = service
        .access
        .issue_key(tenant, "test", scopes, None)
        .await
        .unwrap();
    issued.token.expose_secret().to_string()
}

/// An HTTP client that sends `Authorization: Bearer <key>` on every request.
pub fn authorized_client(api_key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {api_key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A service and an in-process server on a loopback port; stops when dropped.
pub struct TestServer {
    pub base: String,
    /// Key of tenant `default` with every scope; `http` sends it.
    pub api_key: String,
    pub service: Arc<MemoryService>,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: WorkerConfig) -> Self {
        memu_worker::server::install_crypto_provider();
        let service = memu_worker::server::build_service(config, true)
            .await
            .expect("build service");
        // Every test talks as a real client: with a key of tenant `default`.
        let api_key = issue_key(&service, "default", "read,write,admin").await;
        let config = &service.config;
        let tls = config.server.tls.is_some() && config.role.serves_api();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Test certificates name `localhost`.
        let base = match tls {
            true => format!("https://localhost:{port}"),
            false => format!("http://127.0.0.1:{port}"),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(memu_worker::server::serve(
            service.clone(),
            listener,
            None,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            base,
            service,
            http: authorized_client(&api_key),
            api_key,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// The OpenMetrics text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls a task until it leaves PENDING/PROCESSING (bounded number of polls).
    pub async fn wait_task(&self, task_id: &str) -> serde_json::Value {
        for _ in 0..600 {
            let (status, body) = self
                .get(&format!("/api/v3/memory/memorize/status/{task_id}"))
                .await;
            assert_eq!(status, 200, "{body}");
            if body["status"] == "SUCCESS" || body["status"] == "FAILED" {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("task {task_id} did not finish");
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A user of tenant `default` (the tenant of [`TestServer::api_key`]).
pub fn u(user_id: &str) -> memu_worker::model::UserRef<'_> {
    memu_worker::model::UserRef::new("default", user_id)
}

#[allow(unused_imports)] // Not every test file binds a port.
pub use memu_e2e::free_port;

/// A child process (a `memu-worker` binary under test), killed when dropped.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls a task through the HTTP API of a running worker until it leaves PENDING/PROCESSING
/// (bounded number of polls); returns the last status body.
pub async fn wait_task_over_http(
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    for _ in 0..400 {
        status = http
            .get(format!("{base}/api/v3/memory/memorize/status/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["status"] != "PENDING" && status["status"] != "PROCESSING" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    status
}

/// `memu-worker admin key create --output-file`, as `scripts/serve-local.sh` runs it; the key
/// file is private to its owner.
pub fn create_key(cmd: &mut std::process::Command, dir: &std::path::Path) -> String {
    create_scoped_key(cmd, dir, "read,write")
}

/// [`create_key`] with the given scopes (comma-separated).
pub fn create_scoped_key(
    cmd: &mut std::process::Command,
    dir: &std::path::Path,
    scopes: &str,
) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let file = dir.join(format!("api-key-{}", scopes.replace(',', "-")));
    let out = cmd
        .args([
            "admin", "key", "create", "--tenant", "default", "--scopes", scopes,
        ])
        .arg("--output-file")
        .arg(&file)
        .output()
        .expect("run memu-worker");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&key),
        "key echoed"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    key
}
