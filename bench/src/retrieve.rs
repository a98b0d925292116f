//! Vector retrieval of the stores, measured against the physical limit in the same run.
//!
//! For each case (memories, users, dimension) the same synthetic vectors are loaded into the
//! SQLite store and, when `MEMU_TEST_DATABASE_URL` names a server, into Postgres + pgvector
//! HNSW; each is measured exact (`f32`) and quantized (`int8`: int8 codes in the SQLite store,
//! a `halfvec` index in pgvector). Reported per variant:
//! - recall@10 against the exact answer;
//! - p50/p95/p99 and requests/s at concurrency 1, 8 and 32, of the store's search alone and of
//!   `POST /api/v3/memory/retrieve` over HTTP on loopback (the full request: auth, category
//!   ranking, JSON). The query embedding is excluded: the store receives vectors, and over HTTP
//!   the query texts' embeddings are cached by the worker, warmed before timing;
//! - the time as a ratio to an exact brute-force scan over the same vectors, and to the floor
//!   any scan has (the user's vector bytes ÷ memory bandwidth measured in this run).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use memu_crds::worker::{
    MemoryType, ProviderPreset, ProviderProfile, Quantization, Role, WorkerConfig,
};
use memu_e2e::openai_stub::{OpenAiStub, StubOptions};
use memu_worker::model::{ItemFilter, MemoryItem, NewItem, UserRef};
use memu_worker::store::MemoryStore;
use memu_worker::tenancy::{ApiScope, DEFAULT_TENANT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::Connection;
use uuid::Uuid;

use crate::common::{Size, dsn_of, run_concurrent, summarize, use_new_postgres_database};

const K: usize = 10;
const CONCURRENCY: [usize; 3] = [1, 8, 32];

#[derive(Clone, Copy)]
struct Case {
    memories: usize,
    users: usize,
    dimension: usize,
}

fn cases(size: Size) -> (Vec<Case>, usize) {
    let case = |memories, users, dimension| Case {
        memories,
        users,
        dimension,
    };
    match size {
        Size::Smoke => (vec![case(2_000, 1, 384)], 200),
        Size::Full => (
            vec![
                case(10_000, 1, 384),
                case(100_000, 1, 384),
                case(100_000, 1_000, 384),
                case(10_000, 1, 1536),
            ],
            1_000,
        ),
    }
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

/// The worker's service over `config`'s database, with the stub as its embedding provider (so
/// the HTTP path can embed query texts) and no result cache (every request searches).
async fn open_service(
    mut config: WorkerConfig,
    stub: &OpenAiStub,
) -> Arc<memu_worker::service::MemoryService> {
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
    config.embedding.query_cache_size = 100_000;
    config.cache.redis_url_env = "MEMU_BENCH_REDIS_UNSET".into();
    config.cache.local_retrieve_ttl_secs = 0;
    memu_worker::server::build_service(config, true)
        .await
        .expect("open the store and build the service")
}

/// Writes the case's memories (8 writers at a time) and returns them per user.
async fn load(store: &Arc<dyn MemoryStore>, case: Case, data: &mut Data) -> Vec<UserVectors> {
    let per_user = case.memories / case.users;
    let mut users = Vec::new();
    let mut rows = Vec::with_capacity(case.memories);
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
            rows.push(NewItem { item, embedding });
        }
        users.push(vectors);
    }
    let rows = Arc::new(rows);
    let total = rows.len();
    let store = store.clone();
    run_concurrent(8, total, move |i| {
        let (store, rows) = (store.clone(), rows.clone());
        async move { store.insert_item(&rows[i]).await.expect("insert") }
    })
    .await;
    users
}

/// What every variant of a case is asked, and the right answers.
struct Workload {
    users: Arc<Vec<UserVectors>>,
    queries: Arc<Vec<(usize, Vec<f32>)>>,
    exact: Vec<Vec<Uuid>>,
    exact_scan_ms: f64,
    floor_ms: f64,
}

impl Workload {
    fn new(users: Vec<UserVectors>, case: Case, data: &mut Data, n: usize, bandwidth: f64) -> Self {
        let mut rng = StdRng::seed_from_u64(11);
        let queries: Vec<(usize, Vec<f32>)> = (0..n)
            .map(|_| (rng.random_range(0..users.len()), data.sample()))
            .collect();
        let scanning = Instant::now();
        let exact: Vec<Vec<Uuid>> = queries
            .iter()
            .map(|(u, q)| users[*u].exact(q, case.dimension))
            .collect();
        let exact_scan_ms = scanning.elapsed().as_secs_f64() * 1e3 / n as f64;
        let per_user = case.memories / case.users;
        Self {
            users: Arc::new(users),
            queries: Arc::new(queries),
            exact,
            exact_scan_ms,
            floor_ms: (per_user * case.dimension * 4) as f64 / bandwidth * 1e3,
        }
    }
}

/// Recall@10 and the store's search latencies at each concurrency.
async fn measure_store(store: &Arc<dyn MemoryStore>, work: &Workload) -> (f64, Vec<Value>) {
    // Sequentially first: recall, and every user's index warmed.
    let mut hits = 0;
    for ((u, q), truth) in work.queries.iter().zip(&work.exact) {
        let user = UserRef::new(DEFAULT_TENANT, &work.users[*u].user);
        let found = store
            .search_items(user, q, &ItemFilter::default(), K)
            .await
            .expect("search");
        hits += found.iter().filter(|s| truth.contains(&s.item.id)).count();
    }
    let recall = hits as f64 / work.exact.iter().map(Vec::len).sum::<usize>() as f64;
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let (store, users, queries) = (store.clone(), work.users.clone(), work.queries.clone());
        let (latencies, seconds) = run_concurrent(concurrency, queries.len(), move |i| {
            let (store, users, queries) = (store.clone(), users.clone(), queries.clone());
            async move {
                let (u, q) = &queries[i];
                let user = UserRef::new(DEFAULT_TENANT, &users[*u].user);
                let found = store
                    .search_items(user, q, &ItemFilter::default(), K)
                    .await
                    .expect("search");
                std::hint::black_box(found);
            }
        })
        .await;
        rows.push(with_ratios(
            summarize(latencies, seconds, concurrency),
            work,
        ));
    }
    (recall, rows)
}

fn with_ratios(mut row: Value, work: &Workload) -> Value {
    let p50 = row["p50_ms"].as_f64().unwrap_or(f64::NAN);
    row["p50_ratio_to_exact_scan"] = json!(p50 / work.exact_scan_ms);
    row["p50_ratio_to_memory_floor"] = json!(p50 / work.floor_ms);
    row
}

/// The service's API on loopback with a real API key; returns the base URL, the key, and the
/// server's task.
async fn serve_http(
    service: Arc<memu_worker::service::MemoryService>,
) -> (String, String, tokio::task::JoinHandle<()>) {
    if service
        .store
        .get_tenant(DEFAULT_TENANT)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        service
            .access
            .create_tenant(DEFAULT_TENANT, "bench", Default::default())
            .await
            .expect("create the tenant");
    }
    let key = service
        .access
        .issue_key(
            DEFAULT_TENANT,
            "bench",
            BTreeSet::from([ApiScope::Read]),
            None,
        )
        .await
        .expect("issue a key")
        .token
        .expose_secret()
        .to_string();
    let app = memu_worker::api::router(service, Role::Api, false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, key, server)
}

/// `POST /api/v3/memory/retrieve` at each concurrency, after one warming pass over every query.
async fn measure_http(
    service: &Arc<memu_worker::service::MemoryService>,
    work: &Workload,
) -> Vec<Value> {
    let (url, key, server) = serve_http(service.clone()).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let users = work.users.clone();
    let n = work.queries.len();
    // Query texts in a fixed order of users: the same users the store measurement asked.
    let bodies: Arc<Vec<String>> = Arc::new(
        work.queries
            .iter()
            .enumerate()
            .map(|(i, (u, _))| {
                json!({"user_id": users[*u].user, "query": format!("what about topic {i}?"), "top_k": K})
                    .to_string()
            })
            .collect(),
    );
    let call = {
        let (client, bodies) = (client.clone(), bodies.clone());
        let endpoint = format!("{url}/api/v3/memory/retrieve");
        let bearer = format!("Bearer {key}");
        move |i: usize| {
            let request = client
                .post(&endpoint)
                .header("authorization", &bearer)
                .header("content-type", "application/json")
                .body(bodies[i].clone());
            async move {
                let response = request.send().await.expect("retrieve over HTTP");
                let status = response.status();
                let body = response.bytes().await.expect("read the answer");
                assert!(
                    status.is_success(),
                    "retrieve answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                std::hint::black_box(body);
            }
        }
    };
    let call = Arc::new(call);
    let warm = call.clone();
    run_concurrent(8, n, move |i| warm(i)).await;
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        let call = call.clone();
        let (latencies, seconds) = run_concurrent(concurrency, n, move |i| call(i)).await;
        rows.push(with_ratios(
            summarize(latencies, seconds, concurrency),
            work,
        ));
    }
    server.abort();
    rows
}

/// One store variant of a case, measured directly and over HTTP.
async fn measure_variant(
    backend: &str,
    service: &Arc<memu_worker::service::MemoryService>,
    work: &Workload,
    extra: Value,
) -> Value {
    let (recall, direct) = measure_store(&service.store, work).await;
    let http = measure_http(service, work).await;
    let quantization = match service.config.vector.quantization {
        Quantization::None => "none",
        Quantization::Int8 => "int8",
    };
    let mut result = json!({
        "backend": backend,
        "quantization": quantization,
        "recall_at_10": recall,
        "search": direct,
        "http": http,
    });
    if let (Some(r), Some(e)) = (result.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    eprintln!("  {backend} ({quantization}): recall@10 {recall:.3}");
    result
}

async fn measure_case(
    case: Case,
    queries: usize,
    bandwidth: f64,
    dir: &std::path::Path,
    index: usize,
) -> Value {
    eprintln!(
        "retrieve: {} memories, {} users, D = {}",
        case.memories, case.users, case.dimension
    );
    let stub = OpenAiStub::start(StubOptions {
        dimension: case.dimension,
        ..Default::default()
    })
    .await
    .expect("start the embedding stub");
    let mut data = Data::new(case.dimension, 7);
    let mut variants = Vec::new();

    // SQLite: loaded once, then opened exact and int8 over the same file.
    let mut sqlite = WorkerConfig::default();
    sqlite.vector.dimension = case.dimension;
    sqlite.database.sqlite_path = dir.join(format!("retrieve-{index}.db"));
    let service = open_service(sqlite.clone(), &stub).await;
    let loading = Instant::now();
    let users = load(&service.store, case, &mut data).await;
    let load_seconds = loading.elapsed().as_secs_f64();
    let work = Workload::new(users, case, &mut data, queries, bandwidth);
    let (exact_scan_ms, floor_ms) = (work.exact_scan_ms, work.floor_ms);
    variants.push(
        measure_variant(
            "sqlite",
            &service,
            &work,
            json!({"load_seconds": load_seconds}),
        )
        .await,
    );
    drop(service);
    sqlite.vector.quantization = Quantization::Int8;
    let service = open_service(sqlite, &stub).await;
    variants.push(measure_variant("sqlite", &service, &work, json!({})).await);
    drop(service);

    // pgvector: the same vectors loaded without the index, which migrate() then builds once
    // (far faster than row by row); then the halfvec index replaces it.
    let mut postgres = WorkerConfig::default();
    postgres.vector.dimension = case.dimension;
    if use_new_postgres_database(&mut postgres, &format!("retrieve{index}")).await {
        let mut conn = sqlx::PgConnection::connect(&dsn_of(&postgres))
            .await
            .unwrap();
        let (database,): (String,) = sqlx::query_as("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        // Index builds in memory; set before the service's connections open.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {database} SET maintenance_work_mem = '1GB'"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let service = open_service(postgres.clone(), &stub).await;
        sqlx::query("DROP INDEX idx_memory_embedding")
            .execute(&mut conn)
            .await
            .unwrap();
        // The same seed gives the same vectors in the same order; only the ids are new.
        let loading = Instant::now();
        let users = load(&service.store, case, &mut Data::new(case.dimension, 7)).await;
        let load_seconds = loading.elapsed().as_secs_f64();
        let mut work = Workload {
            users: Arc::new(users),
            ..work
        };
        work.exact = work
            .queries
            .iter()
            .map(|(u, q)| work.users[*u].exact(q, case.dimension))
            .collect();
        let building = Instant::now();
        service.store.migrate().await.expect("build the HNSW index");
        let build_seconds = building.elapsed().as_secs_f64();
        sqlx::query("ANALYZE memory_items")
            .execute(&mut conn)
            .await
            .unwrap();
        variants.push(
            measure_variant(
                "pgvector-hnsw",
                &service,
                &work,
                json!({"load_seconds": load_seconds, "index_build_seconds": build_seconds}),
            )
            .await,
        );
        drop(service);
        postgres.vector.quantization = Quantization::Int8;
        let building = Instant::now();
        let service = open_service(postgres, &stub).await;
        let build_seconds = building.elapsed().as_secs_f64();
        variants.push(
            measure_variant(
                "pgvector-hnsw",
                &service,
                &work,
                json!({"index_build_seconds": build_seconds}),
            )
            .await,
        );
    }
    json!({
        "memories": case.memories,
        "users": case.users,
        "memories_per_user": case.memories / case.users,
        "dimension": case.dimension,
        "queries": queries,
        "exact_scan_ms": exact_scan_ms,
        "memory_floor_ms": floor_ms,
        "variants": variants,
    })
}

pub async fn run(size: Size) -> Value {
    let (cases, queries) = cases(size);
    let dir = tempfile::tempdir().unwrap();
    // Measured once per run: the floor every case's scan is compared with.
    let bandwidth = memory_bandwidth();
    let mut results = Vec::new();
    for (i, case) in cases.into_iter().enumerate() {
        results.push(measure_case(case, queries, bandwidth, dir.path(), i).await);
    }
    json!({
        "k": K,
        "memory_bandwidth_gb_per_s": bandwidth / 1e9,
        "cases": results,
    })
}
