//! Crash safety of the memorize queue on real Postgres: several `memu-worker --role pipeline`
//! processes are killed with SIGKILL at random moments (at least 50 times) and restarted while
//! jobs flow in. Every job must end SUCCESS exactly once in effect: no lost job, no duplicate
//! item, no orphan category link, no duplicated category. The bounds are counts, not times.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, TestServer};
use memu_e2e::openai_stub::{OpenAiStub, StubOptions};
use serde_json::json;
use sqlx::Connection;

const WORKERS: usize = 3;
const KILLS: usize = 50;

fn spawn_worker(dsn: &str, stub: &OpenAiStub) -> Child {
    Command::new(env!("CARGO_BIN_EXE_memu-worker"))
        .args(["serve", "--role", "pipeline"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", dsn)
        .env("MEMU_SERVER__LISTEN", "127.0.0.1:0")
        .env("MEMU_DATABASE__BACKEND", "postgres")
        .env("MEMU_VECTOR__DIMENSION", common::STUB_DIM.to_string())
        .env("MEMU_EMBEDDING__PROVIDER", "stub")
        .env("MEMU_PROVIDERS__STUB__PRESET", "openai")
        .env("MEMU_PROVIDERS__STUB__BASE_URL", stub.base_url())
        .env("MEMU_PROVIDERS__STUB__EMBED_MODEL", "stub-embed")
        .env(
            "MEMU_PROVIDERS__STUB__API_KEY_ENV",
            "MEMU_TEST_STUB_KEY_UNSET",
        )
        .env("MEMU_PIPELINE__CONCURRENCY", "2")
        .env("MEMU_PIPELINE__POLL_INTERVAL_MS", "50")
        .env("MEMU_PIPELINE__LEASE_SECS", "2")
        .env("MEMU_PIPELINE__MAX_ATTEMPTS", "1000")
        .env("MEMU_LOGGING__FILTER", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start memu-worker")
}

/// The stub with 30 ms per reply, so that kills land while jobs are in flight.
async fn slow_stub() -> OpenAiStub {
    OpenAiStub::start(StubOptions {
        dimension: common::STUB_DIM,
        latency: Duration::from_millis(30),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A small deterministic generator (the test must not depend on a seed it cannot print).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test]
async fn killed_workers_lose_and_duplicate_nothing() {
    let stub = slow_stub().await;
    let mut config = common::stub_config(&stub);
    config.role = memu_crds::worker::Role::Api;
    let (config, db) = common::with_backend(config, true).await;
    let Backend::Postgres(dsn) = db else {
        unreachable!()
    };
    let api = TestServer::start(config).await;
    let mut workers: Vec<Child> = (0..WORKERS).map(|_| spawn_worker(&dsn, &stub)).collect();
    let mut rng = Lcg(0x6d656d75);
    let (mut kills, mut enqueued) = (0, 0);
    for _ in 0..4000 {
        let queue = api.service.store.queue_stats().await.unwrap();
        if kills < KILLS && queue.pending + queue.processing < 10 {
            enqueue(&api, enqueued, 20).await;
            enqueued += 20;
        }
        tokio::time::sleep(Duration::from_millis(20 + rng.next(180))).await;
        if kills < KILLS {
            let victim = rng.next(WORKERS as u64) as usize;
            workers[victim].kill().unwrap();
            workers[victim].wait().unwrap();
            workers[victim] = spawn_worker(&dsn, &stub);
            kills += 1;
        } else if queue.pending + queue.processing == 0 {
            break;
        }
    }
    for mut w in workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert!(kills >= KILLS);

    let attempts = assert_exactly_once(&dsn, enqueued).await;
    eprintln!("{enqueued} jobs, {kills} kills, {attempts} attempts in all");
    api.stop().await.unwrap();
}

/// Every enqueued job SUCCESS once in effect; returns the attempts made in all.
async fn assert_exactly_once(dsn: &str, enqueued: usize) -> i64 {
    let mut conn = sqlx::PgConnection::connect(dsn).await.unwrap();
    let scalar = |row: (i64,)| row.0;
    let q = |sql: &str| sqlx::AssertSqlSafe(sql.to_string());
    let tasks = scalar(
        sqlx::query_as("SELECT count(*) FROM memorize_tasks")
            .fetch_one(&mut conn)
            .await
            .unwrap(),
    );
    let succeeded = scalar(
        sqlx::query_as("SELECT count(*) FROM memorize_tasks WHERE status = 'SUCCESS'")
            .fetch_one(&mut conn)
            .await
            .unwrap(),
    );
    assert_eq!(tasks, enqueued as i64, "no job lost");
    assert_eq!(succeeded, tasks, "every job succeeded");
    for (what, sql) in [
        (
            "duplicate items",
            "SELECT count(*) FROM (SELECT user_id, resource_id, memory_type, summary FROM memory_items \
             GROUP BY 1, 2, 3, 4 HAVING count(*) > 1) d",
        ),
        (
            "resources without items",
            "SELECT count(*) FROM resources r WHERE NOT EXISTS \
             (SELECT 1 FROM memory_items m WHERE m.user_id = r.user_id AND m.resource_id = r.id)",
        ),
        (
            "orphan category links",
            "SELECT count(*) FROM category_items c LEFT JOIN memory_items m \
             ON m.user_id = c.user_id AND m.id = c.memory_item_id WHERE m.id IS NULL",
        ),
        (
            "users without exactly their ten categories",
            "SELECT count(*) FROM (SELECT user_id FROM memory_categories GROUP BY user_id \
             HAVING count(*) <> 10) c",
        ),
    ] {
        let n = scalar(sqlx::query_as(q(sql)).fetch_one(&mut conn).await.unwrap());
        assert_eq!(n, 0, "{what}");
    }
    scalar(
        sqlx::query_as("SELECT sum(attempts)::bigint FROM memorize_tasks")
            .fetch_one(&mut conn)
            .await
            .unwrap(),
    )
}

async fn enqueue(api: &TestServer, from: usize, n: usize) {
    for i in from..from + n {
        let (status, body) = api
            .post(
                "/api/v3/memory/memorize",
                json!({"user_id": format!("u{}", i % 10), "user_name": "Sam", "conversation": [
                    {"role": "user", "content": format!("Job {i}: I live in City{i}.")},
                    {"role": "assistant", "content": "Noted."}]}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
}

/// The database server itself restarts while workers hold leases and write results: the jobs
/// in flight are retried after their lease, none is lost or applied twice.
#[tokio::test]
async fn a_postgres_restart_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../e2e/scripts/start-postgres.sh"
    );
    let start = |data: &std::path::Path| {
        let out = Command::new("bash").arg(script).arg(data).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let data = dir.path().join("pg");
    let dsn = start(&data);
    let stub = slow_stub().await;
    let mut config = common::stub_config(&stub);
    config.role = memu_crds::worker::Role::Api;
    config.database.backend = memu_crds::worker::DatabaseBackend::Postgres;
    let var = format!("MEMU_TEST_DSN_{}", uuid::Uuid::new_v4().simple());
    // SAFETY: a variable of this test's own name; nothing reads it concurrently.
    unsafe { std::env::set_var(&var, &dsn) };
    config.database.url_env = var;
    let api = TestServer::start(config).await;
    let jobs = 60;
    enqueue(&api, 0, jobs).await;
    let mut workers: Vec<Child> = (0..2).map(|_| spawn_worker(&dsn, &stub)).collect();
    // Restart once some work is done and some is in flight.
    for _ in 0..400 {
        let q = api.service.store.queue_stats().await.unwrap();
        if (q.pending as usize) < jobs * 2 / 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let pgdata = data.join("pgdata");
    let restarted = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_ctl",
            "-D",
        ])
        .arg(&pgdata)
        .args(["-w", "-m", "fast", "restart"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(restarted.success());
    let mut done = false;
    for _ in 0..600 {
        if let Ok(q) = api.service.store.queue_stats().await
            && q.pending + q.processing == 0
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert!(done, "the queue drained after the restart");
    let attempts = assert_exactly_once(&dsn, jobs).await;
    eprintln!("{jobs} jobs across a Postgres restart, {attempts} attempts");
    api.stop().await.unwrap();
    let _ = Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_ctl",
            "-D",
        ])
        .arg(&pgdata)
        .args(["-m", "immediate", "stop"])
        .stdout(Stdio::null())
        .status();
}
