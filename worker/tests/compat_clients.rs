//! Real clients against the `memu-worker` binary: memU's published Python SDK (memu-py 0.1.8)
//! on the memU Cloud v1 routes, and the official MCP Python SDK on `/mcp` and on
//! `memu-worker mcp` (stdio). The clients are installed by `e2e/scripts/install-python-clients.sh`,
//! whose interpreter `e2e/test.sh` exports as `MEMU_TEST_PYTHON_CLIENTS`.

mod common;
use common::{Running, create_key, create_scoped_key, free_port};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_memu-worker");

fn python() -> String {
    std::env::var("MEMU_TEST_PYTHON_CLIENTS").expect(
        "MEMU_TEST_PYTHON_CLIENTS is not set: run e2e/test.sh, or export the python that \
         e2e/scripts/install-python-clients.sh prints",
    )
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../e2e/python")
        .join(name)
}

/// The worker as a user runs it: SQLite in `dir`, offline extraction, the local model.
fn worker(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MEMU_DATABASE__SQLITE_PATH", dir.join("memu.db"))
        .env("MEMU_PROVIDERS__LOCAL__MODEL_DIR", common::model_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs one client script; its output is shown when it fails.
fn run_client(mut cmd: Command, what: &str) {
    let out = cmd.output().expect("run the python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("checks passed"), "{what}: {stdout}");
    println!("{stdout}");
}

struct Served {
    base: String,
    key: String,
    read_key: String,
    _running: Running,
    _dir: tempfile::TempDir,
}

async fn serve() -> Served {
    memu_worker::server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(&mut worker(dir.path()), dir.path());
    let read_key = create_scoped_key(&mut worker(dir.path()), dir.path(), "read");
    let port = free_port();
    let child = worker(dir.path())
        .arg("serve")
        .env("MEMU_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .spawn()
        .unwrap();
    let running = Running(child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for attempt in 0.. {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(attempt < 400, "worker at {base} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Served {
        base,
        key,
        read_key,
        _running: running,
        _dir: dir,
    }
}

#[tokio::test]
async fn memu_py_sdk_drives_the_cloud_v1_routes() {
    let served = serve().await;
    let mut cmd = Command::new(python());
    cmd.arg(script("memu_sdk_check.py"))
        .env("MEMU_API_BASE_URL", &served.base)
        .env("MEMU_API_KEY", &served.key)
        .env("MEMU_READ_KEY", &served.read_key);
    run_client(cmd, "memu-py SDK");
}

#[tokio::test]
async fn mcp_python_client_over_streamable_http() {
    let served = serve().await;
    let mut cmd = Command::new(python());
    cmd.arg(script("mcp_check.py"))
        .arg("http")
        .arg(format!("{}/mcp", served.base))
        .env("MEMU_API_KEY", &served.key)
        .env("MEMU_READ_KEY", &served.read_key);
    run_client(cmd, "MCP over HTTP");
}

#[tokio::test]
async fn mcp_python_client_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let key = create_key(&mut worker(dir.path()), dir.path());
    let mut cmd = Command::new(python());
    // The script hands its environment to the worker it launches: only the worker's own.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg(script("mcp_check.py"))
        .arg("stdio")
        .arg(BIN)
        .env("MEMU_API_KEY", &key)
        .env("MEMU_DATABASE__SQLITE_PATH", dir.path().join("memu.db"))
        .env("MEMU_PROVIDERS__LOCAL__MODEL_DIR", common::model_dir());
    run_client(cmd, "MCP over stdio");
}
