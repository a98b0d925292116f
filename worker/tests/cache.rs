//! The Redis cache against a real redis-server (started by the test script): two workers share
//! query embeddings and retrieve results, and a write through either one invalidates the user's
//! cached results on both.

mod common;

use common::TestServer;
use memu_e2e::openai_stub::Endpoint;
use serde_json::json;

fn redis_url() -> String {
    std::env::var("MEMU_TEST_REDIS_URL").expect(
        "MEMU_TEST_REDIS_URL is not set: run the suite through e2e/test.sh, which starts redis-server",
    )
}

fn hits(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn replicas_share_the_cache_and_writes_invalidate_it() {
    let stub = common::stub().await;
    let (mut config, _db) = common::with_backend(common::stub_config(&stub), true).await;
    let var = format!("MEMU_TEST_REDIS_{}", uuid::Uuid::new_v4().simple());
    // SAFETY: a variable of this test's own name; nothing reads it concurrently.
    unsafe { std::env::set_var(&var, redis_url()) };
    config.cache.redis_url_env = var;
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    let user = format!("cache-{}", uuid::Uuid::new_v4().simple());
    let items = format!("/api/v1/users/{user}/items");
    let (status, _) = a
        .post(
            &items,
            json!({"memory_type": "profile", "summary": "Maria lives in Lisbon."}),
        )
        .await;
    assert_eq!(status, 201);
    let query = json!({"user_id": user, "query": "Where does Maria live?", "top_k": 5});
    let (_, first) = a.post("/api/v3/memory/retrieve", query.clone()).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 1);

    // B answers from Redis: no embedding request, a cache hit.
    let embeds = stub.count(Endpoint::Embeddings);
    let (_, from_b) = b.post("/api/v3/memory/retrieve", query.clone()).await;
    assert_eq!(from_b["items"], first["items"]);
    assert_eq!(stub.count(Endpoint::Embeddings), embeds);
    let metrics_b = b.metrics().await;
    assert_eq!(
        hits(&metrics_b, "memu_retrieve_cache_hits_total"),
        1,
        "{metrics_b}"
    );

    // A write through B invalidates A's cached answer.
    let (status, _) = b
        .post(
            &items,
            json!({"memory_type": "profile", "summary": "Maria works at the Lisbon aquarium."}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, fresh) = a.post("/api/v3/memory/retrieve", query.clone()).await;
    assert_eq!(fresh["items"].as_array().unwrap().len(), 2, "{fresh}");

    // A query B never saw: its embedding comes from Redis, computed once by A.
    let other = json!({"user_id": user, "query": "What is Maria's job?", "top_k": 5});
    let (_, _) = a.post("/api/v3/memory/retrieve", other.clone()).await;
    let embeds = stub.count(Endpoint::Embeddings);
    b.service.invalidate(common::u(&user)).await;
    let (_, again) = b.post("/api/v3/memory/retrieve", other).await;
    assert_eq!(again["items"].as_array().unwrap().len(), 2);
    assert_eq!(
        stub.count(Endpoint::Embeddings),
        embeds,
        "the query embedding came from Redis"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Without Redis, retrieve results are cached in process only when configured; a write of the
/// user invalidates them.
#[tokio::test]
async fn the_local_result_cache_is_invalidated_by_writes() {
    let stub = common::stub().await;
    let (mut config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    config.cache.local_retrieve_ttl_secs = 60;
    let server = TestServer::start(config).await;
    let (status, _) = server
        .post(
            "/api/v1/users/u/items",
            json!({"memory_type": "event", "summary": "Maria ran a marathon."}),
        )
        .await;
    assert_eq!(status, 201);
    let query = json!({"user_id": "u", "query": "marathon", "method": "hybrid"});
    let (_, first) = server.post("/api/v3/memory/retrieve", query.clone()).await;
    let (_, cached) = server.post("/api/v3/memory/retrieve", query.clone()).await;
    assert_eq!(first["items"], cached["items"]);
    let id = first["items"][0]["id"].as_str().unwrap().to_string();
    let response = server
        .http
        .delete(server.url(&format!("/api/v1/users/u/items/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    let (_, after) = server.post("/api/v3/memory/retrieve", query).await;
    assert!(after["items"].as_array().unwrap().is_empty(), "{after}");
    let metrics = server.metrics().await;
    assert_eq!(hits(&metrics, "memu_retrieve_cache_hits_total"), 1);
    server.stop().await.unwrap();
}

/// A tenant's request rate is one budget across replicas when they share Redis.
#[tokio::test]
async fn replicas_share_the_tenants_rate_limit() {
    let stub = common::stub().await;
    let (mut config, _db) = common::with_backend(common::stub_config(&stub), true).await;
    let var = format!("MEMU_TEST_REDIS_{}", uuid::Uuid::new_v4().simple());
    // SAFETY: a variable of this test's own name; nothing reads it concurrently.
    unsafe { std::env::set_var(&var, redis_url()) };
    config.cache.redis_url_env = var;
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    // One request per 10 s, no burst: a second request anywhere within 10 s is refused.
    let tenant = format!("rate-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let key = common::issue_key(&a.service, &tenant, "read").await;
    a.service
        .access
        .set_limits(
            &tenant,
            &memu_worker::tenancy::TenantLimits {
                rate_limit_rps: Some(0.1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let http = common::authorized_client(&key);
    let first = http
        .get(a.url("/api/v1/users/u/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let second = http
        .get(b.url("/api/v1/users/u/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429, "replica B did not see A's request");
    let wait: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
}
