//! Shared by the benchmarks: where their store lives.

use memu_crds::worker::{DatabaseBackend, WorkerConfig};
use sqlx::Connection;

/// Points `config` at a new database on the Postgres server `MEMU_TEST_DATABASE_URL` names (as
/// `e2e/test.sh` exports); false when there is none.
pub async fn use_new_postgres_database(config: &mut WorkerConfig, label: &str) -> bool {
    let Ok(admin) = std::env::var("MEMU_TEST_DATABASE_URL") else {
        return false;
    };
    let name = format!("memu_bench_{label}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    let var = format!("MEMU_BENCH_DSN_{label}");
    // SAFETY: set before the store reads it, one name per database, before any worker thread.
    unsafe { std::env::set_var(&var, format!("{base}/{name}")) };
    config.database.backend = DatabaseBackend::Postgres;
    config.database.url_env = var;
    true
}

/// Postgres when a server is configured, else a SQLite file in `dir`; returns the backend.
#[allow(dead_code)] // Not every benchmark picks one backend.
pub async fn database(
    config: &mut WorkerConfig,
    dir: &std::path::Path,
    label: &str,
) -> &'static str {
    if use_new_postgres_database(config, label).await {
        return "postgres";
    }
    config.database.sqlite_path = dir.join(format!("{label}.db"));
    "sqlite"
}
