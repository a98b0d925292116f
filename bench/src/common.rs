//! What the benchmarks share: run metadata, latency summaries, concurrent load, Prometheus text
//! and throwaway databases.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use memu_crds::worker::{DatabaseBackend, WorkerConfig};
use serde_json::{Value, json};
use sqlx::Connection;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// Small and quick: keeps the benchmarks compiling and working (CI).
    Smoke,
    /// The sizes the targets are stated for.
    Full,
}

impl Size {
    pub fn as_str(self) -> &'static str {
        match self {
            Size::Smoke => "smoke",
            Size::Full => "full",
        }
    }
}

/// Where results go: `e2e/results/` of the repository.
pub fn results_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/results"))
}

/// The run's date and machine, recorded with every result.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    json!({
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "memory_gib": (memory_kib / 1024.0 / 1024.0).round(),
        // Figures of an unoptimised build mean nothing; the table says which one ran.
        "profile": if cfg!(debug_assertions) { "dev" } else { "release" },
    })
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Latency percentiles (ms) and throughput of one load run.
pub fn summarize(mut latencies_ms: Vec<f64>, seconds: f64, concurrency: usize) -> Value {
    latencies_ms.sort_by(f64::total_cmp);
    json!({
        "concurrency": concurrency,
        "requests": latencies_ms.len(),
        "p50_ms": percentile(&latencies_ms, 0.50),
        "p95_ms": percentile(&latencies_ms, 0.95),
        "p99_ms": percentile(&latencies_ms, 0.99),
        "requests_per_second": latencies_ms.len() as f64 / seconds,
    })
}

/// Runs `requests` calls of `call(i)` from `concurrency` workers (worker w takes i = w, w + c,
/// …); returns each call's latency in ms and the wall time in seconds.
pub async fn run_concurrent<F, Fut>(concurrency: usize, requests: usize, call: F) -> (Vec<f64>, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in (worker..requests).step_by(concurrency) {
                    let t = Instant::now();
                    call(i).await;
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for w in workers {
        latencies.extend(w.await.expect("load worker panicked"));
    }
    (latencies, started.elapsed().as_secs_f64())
}

/// Points `config` at a new database on the Postgres server `MEMU_TEST_DATABASE_URL` names (as
/// `e2e/test.sh` and `scripts/bench.sh` export); false when there is none.
pub async fn use_new_postgres_database(config: &mut WorkerConfig, label: &str) -> bool {
    let Ok(admin) = std::env::var("MEMU_TEST_DATABASE_URL") else {
        return false;
    };
    let name = format!("memu_bench_{label}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to MEMU_TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create the benchmark database");
    let (base, _) = admin.rsplit_once('/').expect("a DSN ends in /database");
    let var = format!("MEMU_BENCH_DSN_{label}");
    // SAFETY: set before any store reads it, one name per database, on the main thread while
    // no other thread touches the environment.
    unsafe { std::env::set_var(&var, format!("{base}/{name}")) };
    config.database.backend = DatabaseBackend::Postgres;
    config.database.url_env = var;
    true
}

/// The DSN a Postgres `config` connects to.
pub fn dsn_of(config: &WorkerConfig) -> String {
    std::env::var(&config.database.url_env).expect("DSN variable set by use_new_postgres_database")
}

/// Sum of every sample of `name` in Prometheus text (all label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The cumulative buckets `(le, count)` of histogram `name` in Prometheus text, by `le`.
pub fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let le = rest.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit_once(' ')?.1.parse().ok()?;
            Some((le, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The observations between two scrapes of the same histogram.
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, count)| {
            let earlier = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, count - earlier)
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside the bucket as
/// Prometheus' `histogram_quantile` does.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(previous.0);
            }
            let within = (rank - previous.1) / (count - previous.1).max(f64::MIN_POSITIVE);
            return Some(previous.0 + (le - previous.0) * within);
        }
        previous = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE d histogram\n\
        d_bucket{le=\"0.001\"} 0\n\
        d_bucket{le=\"0.002\"} 50\n\
        d_bucket{le=\"0.004\"} 100\n\
        d_bucket{le=\"+Inf\"} 100\n\
        d_sum 0.2\nd_count 100\n\
        r_total{verb=\"get\"} 3\nr_total{verb=\"patch\"} 4\nr_totalx 9\n";

    #[test]
    fn histogram_quantiles_interpolate_within_buckets() {
        let buckets = histogram_buckets(TEXT, "d");
        let close = |q: f64, expected: f64| {
            let got = quantile(&buckets, q).unwrap();
            assert!((got - expected).abs() < 1e-12, "q{q}: {got} != {expected}");
        };
        close(0.5, 0.002);
        close(0.25, 0.0015);
        close(0.99, 0.00396);
        assert_eq!(quantile(&histogram_buckets(TEXT, "missing"), 0.5), None);
        // Between two scrapes: only what was observed in between counts.
        let earlier = [
            (0.001, 0.0),
            (0.002, 50.0),
            (0.004, 50.0),
            (f64::INFINITY, 50.0),
        ];
        let delta = bucket_delta(&earlier, &buckets);
        assert_eq!(delta[1].1, 0.0);
        assert!((quantile(&delta, 0.5).unwrap() - 0.003).abs() < 1e-12);
    }

    #[test]
    fn metric_sums_add_every_label_set_of_one_name() {
        assert_eq!(metric_sum(TEXT, "r_total"), 7.0);
        assert_eq!(metric_sum(TEXT, "d_count"), 100.0);
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
