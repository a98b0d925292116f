//! Vector retrieval of the stores (SQLite embedded; Postgres + pgvector HNSW when
//! `MEMU_TEST_DATABASE_URL` names a server), measured against the physical limit in the same
//! run: an exact brute-force scan over the same vectors, and the floor a scan can reach
//! (bytes per user's vectors ÷ memory bandwidth measured now). Reports latency percentiles and
//! throughput at concurrency 1, 8 and 32 and recall@10 against the exact answer. The query
//! embedding is not part of it: queries are vectors, as the store receives them.
//!
//! `cargo bench -p memu-worker --bench retrieve -- --smoke` (CI: 2,000 memories, D = 384) or
//! `-- --full` (10k and 100k memories for one user, 100k over 1,000 users, 10k at D = 1536).
//! Prints a table and writes `e2e/results/retrieve.json`.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use memu_crds::worker::{MemoryType, WorkerConfig};
use memu_worker::model::{ItemFilter, MemoryItem, NewItem, UserRef};
use memu_worker::store::{self, EmbeddingSpace, MemoryStore};
use memu_worker::tenancy::DEFAULT_TENANT;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use uuid::Uuid;

#[path = "common/mod.rs"]
mod common;

const K: usize = 10;
const CONCURRENCY: [usize; 3] = [1, 8, 32];

#[derive(Clone, Copy)]
struct Case {
    memories: usize,
    dimension: usize,
    users: usize,
}

/// Unit vectors around a few dozen centres: embeddings of real text cluster by topic, which is
/// what makes approximate search hard (uniform random vectors are all nearly orthogonal).
struct Data {
    dimension: usize,
    centres: Vec<Vec<f32>>,
    rng: StdRng,
}

impl Data {
    fn new(dimension: usize, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let centres = (0..64)
            .map(|_| unit(gaussian(&mut rng, dimension)))
            .collect();
        Self {
            dimension,
            centres,
            rng,
        }
    }

    fn sample(&mut self) -> Vec<f32> {
        let centre = &self.centres[self.rng.random_range(0..self.centres.len())];
        // Noise of norm ≈ 2.4 around a unit centre: clusters that overlap, as topics do.
        let spread = 2.4 / (self.dimension as f32).sqrt();
        let noise = gaussian(&mut self.rng, self.dimension);
        unit(
            centre
                .iter()
                .zip(noise)
                .map(|(c, n)| c + spread * n)
                .collect(),
        )
    }
}

fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
    // Box–Muller; good enough for synthetic embeddings.
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// One user's vectors, contiguous, as an exact scan reads them.
struct UserVectors {
    user: String,
    ids: Vec<Uuid>,
    flat: Vec<f32>,
}

impl UserVectors {
    /// The exact top-k by inner product (the vectors are unit length: cosine).
    fn exact(&self, query: &[f32], dimension: usize) -> Vec<Uuid> {
        let mut scored: Vec<(f32, usize)> = self
            .flat
            .chunks_exact(dimension)
            .map(|v| v.iter().zip(query).map(|(a, b)| a * b).sum::<f32>())
            .enumerate()
            .map(|(i, s)| (s, i))
            .collect();
        let k = K.min(scored.len());
        scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        scored.truncate(k);
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.into_iter().map(|(_, i)| self.ids[i]).collect()
    }
}

/// Sequential read bandwidth of this machine now (bytes/s): the best of a few sums over a buffer
/// far larger than the caches.
fn memory_bandwidth() -> f64 {
    let buffer = vec![1.0f32; 64 << 20];
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let sum: f32 = buffer.chunks_exact(8).map(|c| c.iter().sum::<f32>()).sum();
        let seconds = started.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((buffer.len() * 4) as f64 / seconds);
    }
    best
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    let i = ((sorted_ms.len() as f64 - 1.0) * p).round() as usize;
    sorted_ms[i]
}

async fn open_store(config: &WorkerConfig, dimension: usize) -> Arc<dyn MemoryStore> {
    let store = store::open(
        config,
        EmbeddingSpace {
            dimension,
            model: "bench-synthetic".into(),
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store
}

async fn load(store: &dyn MemoryStore, case: Case, data: &mut Data) -> Vec<UserVectors> {
    let per_user = case.memories / case.users;
    let mut users = Vec::new();
    for u in 0..case.users {
        let user = format!("bench-user-{u}");
        let mut vectors = UserVectors {
            user: user.clone(),
            ids: Vec::with_capacity(per_user),
            flat: Vec::with_capacity(per_user * case.dimension),
        };
        for i in 0..per_user {
            let embedding = data.sample();
            let now = Utc::now();
            let item = MemoryItem {
                id: Uuid::now_v7(),
                tenant_id: DEFAULT_TENANT.into(),
                user_id: user.clone(),
                agent_id: String::new(),
                resource_id: None,
                memory_type: MemoryType::ALL[i % MemoryType::ALL.len()],
                summary: format!("synthetic memory {i} of {user}"),
                happened_at: None,
                created_at: now,
                updated_at: now,
                extra: json!({}),
            };
            vectors.ids.push(item.id);
            vectors.flat.extend_from_slice(&embedding);
            store
                .insert_item(&NewItem { item, embedding })
                .await
                .unwrap();
        }
        users.push(vectors);
    }
    users
}

async fn measure(
    backend: &str,
    config: WorkerConfig,
    case: Case,
    queries: usize,
    bandwidth: f64,
) -> Value {
    let mut data = Data::new(case.dimension, 7);
    let store = open_store(&config, case.dimension).await;
    let loading = Instant::now();
    let users = Arc::new(load(store.as_ref(), case, &mut data).await);
    let load_seconds = loading.elapsed().as_secs_f64();
    let mut rng = StdRng::seed_from_u64(11);
    let workload: Arc<Vec<(usize, Vec<f32>)>> = Arc::new(
        (0..queries)
            .map(|_| (rng.random_range(0..users.len()), data.sample()))
            .collect(),
    );
    let filter = ItemFilter::default();

    // Exact answers and the brute-force scan's own time over the same vectors.
    let scanning = Instant::now();
    let exact: Vec<Vec<Uuid>> = workload
        .iter()
        .map(|(u, q)| users[*u].exact(q, case.dimension))
        .collect();
    let scan_ms = scanning.elapsed().as_secs_f64() * 1e3 / queries as f64;
    let per_user = case.memories / case.users;
    let floor_ms = (per_user * case.dimension * 4) as f64 / bandwidth * 1e3;

    // Recall@10, sequentially (warms the store's caches too).
    let mut hits = 0;
    for ((u, q), truth) in workload.iter().zip(&exact) {
        let found = store
            .search_items(UserRef::new(DEFAULT_TENANT, &users[*u].user), q, &filter, K)
            .await
            .unwrap();
        hits += found.iter().filter(|s| truth.contains(&s.item.id)).count();
    }
    let recall = hits as f64 / exact.iter().map(Vec::len).sum::<usize>() as f64;

    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            let (store, users, workload) = (store.clone(), users.clone(), workload.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                for (u, q) in workload.iter().skip(worker).step_by(concurrency) {
                    let t = Instant::now();
                    let user = UserRef::new(DEFAULT_TENANT, &users[*u].user);
                    let found = store
                        .search_items(user, q, &ItemFilter::default(), K)
                        .await
                        .unwrap();
                    std::hint::black_box(found);
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.unwrap());
        }
        let seconds = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        let p50 = percentile(&latencies, 0.50);
        rows.push(json!({
            "concurrency": concurrency,
            "queries": latencies.len(),
            "p50_ms": p50,
            "p95_ms": percentile(&latencies, 0.95),
            "p99_ms": percentile(&latencies, 0.99),
            "requests_per_second": latencies.len() as f64 / seconds,
            "p50_ratio_to_exact_scan": p50 / scan_ms,
            "p50_ratio_to_memory_floor": p50 / floor_ms,
        }));
    }
    json!({
        "backend": backend,
        "memories": case.memories,
        "users": case.users,
        "memories_per_user": per_user,
        "dimension": case.dimension,
        "load_seconds": load_seconds,
        "exact_scan_ms": scan_ms,
        "memory_floor_ms": floor_ms,
        "recall_at_10": recall,
        "by_concurrency": rows,
    })
}

#[tokio::main]
async fn main() {
    memu_worker::server::install_crypto_provider();
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--full");
    let (cases, queries) = if full {
        (
            vec![
                Case {
                    memories: 10_000,
                    dimension: 384,
                    users: 1,
                },
                Case {
                    memories: 100_000,
                    dimension: 384,
                    users: 1,
                },
                Case {
                    memories: 100_000,
                    dimension: 384,
                    users: 1_000,
                },
                Case {
                    memories: 10_000,
                    dimension: 1536,
                    users: 1,
                },
            ],
            2_000,
        )
    } else {
        (
            vec![Case {
                memories: 2_000,
                dimension: 384,
                users: 1,
            }],
            300,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    // Measured once per run: the floor every case's scan is compared with.
    let bandwidth = memory_bandwidth();
    let mut results = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut sqlite = WorkerConfig::default();
        sqlite.vector.dimension = case.dimension;
        sqlite.database.sqlite_path = dir.path().join(format!("retrieve-{i}.db"));
        results.push(measure("sqlite", sqlite, *case, queries, bandwidth).await);
        let mut postgres = WorkerConfig::default();
        postgres.vector.dimension = case.dimension;
        if common::use_new_postgres_database(&mut postgres, &format!("retrieve{i}")).await {
            results.push(measure("pgvector-hnsw", postgres, *case, queries, bandwidth).await);
        }
    }
    println!(
        "{:<14} {:>8} {:>6} {:>5} {:>7} {:>4} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "backend",
        "memories",
        "users",
        "dim",
        "recall",
        "conc",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "req/s",
        "scan ms",
        "floor ms"
    );
    for r in &results {
        for c in r["by_concurrency"].as_array().unwrap() {
            println!(
                "{:<14} {:>8} {:>6} {:>5} {:>7.3} {:>4} {:>8.3} {:>8.3} {:>8.3} {:>9.0} {:>9.3} {:>9.4}",
                r["backend"].as_str().unwrap(),
                r["memories"].as_u64().unwrap(),
                r["users"].as_u64().unwrap(),
                r["dimension"].as_u64().unwrap(),
                r["recall_at_10"].as_f64().unwrap(),
                c["concurrency"].as_u64().unwrap(),
                c["p50_ms"].as_f64().unwrap(),
                c["p95_ms"].as_f64().unwrap(),
                c["p99_ms"].as_f64().unwrap(),
                c["requests_per_second"].as_f64().unwrap(),
                r["exact_scan_ms"].as_f64().unwrap(),
                r["memory_floor_ms"].as_f64().unwrap(),
            );
        }
    }
    // A functional failure (nothing found) fails the run; speed never does.
    for r in &results {
        assert!(
            r["recall_at_10"].as_f64().unwrap() > 0.5,
            "{} returned the wrong neighbours: {r}",
            r["backend"]
        );
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/results/retrieve.json");
    std::fs::write(
        path,
        serde_json::to_string_pretty(&json!({
            "benchmark": "retrieve",
            "size": if full { "full" } else { "smoke" },
            "date": Utc::now().to_rfc3339(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "k": K,
            "memory_bandwidth_gb_per_s": bandwidth / 1e9,
            "results": results,
        }))
        .unwrap(),
    )
    .unwrap();
    println!("written: e2e/results/retrieve.json");
}
