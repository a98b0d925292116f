//! The memorize queue over HTTP on both stores: Idempotency-Key, retrying a FAILED task, and
//! the queue figures on /metrics that drive autoscaling.

mod common;

use common::TestServer;
use memu_e2e::openai_stub::{Endpoint, Scripted};
use serde_json::json;

async fn idempotency_retry_and_queue_metrics(postgres: bool) {
    let stub = common::stub().await;
    let mut config = common::stub_config(&stub);
    config.pipeline.max_attempts = 1;
    let (config, _db) = common::with_backend(config, postgres).await;
    let server = TestServer::start(config).await;
    let post = |key: &'static str, text: &'static str| {
        let request = server
            .http
            .post(server.url("/api/v3/memory/memorize"))
            .header("Idempotency-Key", key)
            .json(
                &json!({"user_id": "maria", "conversation": [{"role": "user", "content": text}]}),
            );
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    // A client retry with the same key gets the same task, even with a changed body.
    let (status, first) = post("req-1", "I live in Lisbon.").await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = post("req-1", "I live in Lisbon!").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["task_id"], first["task_id"]);
    let done = server.wait_task(first["task_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "SUCCESS");
    let (status, bad) = server
        .http
        .post(server.url("/api/v3/memory/memorize"))
        .header("Idempotency-Key", "   ")
        .json(&json!({"user_id": "maria", "conversation": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .unwrap();
    assert_eq!(status, 422);
    assert_eq!(
        bad.json::<serde_json::Value>().await.unwrap()["error"]["field"],
        "Idempotency-Key"
    );

    // A job whose provider fails ends FAILED; once the provider is back, a retry succeeds.
    for _ in 0..3 {
        stub.enqueue(
            Endpoint::Embeddings,
            Scripted {
                status: Some(400),
                ..Default::default()
            },
        );
    }
    let (status, doomed) = post("req-2", "My sister Ana lives in Porto.").await;
    assert_eq!(status, 202);
    let id = doomed["task_id"].as_str().unwrap().to_string();
    let failed = server.wait_task(&id).await;
    assert_eq!(failed["status"], "FAILED", "{failed}");
    // Drain what is left of the failure script.
    for _ in 0..3 {
        let _ = server.service.embedder.embed(&["drain".into()]).await;
    }
    let (status, retried) = server
        .post(&format!("/api/v3/memory/memorize/{id}/retry"), json!({}))
        .await;
    assert_eq!(status, 202, "{retried}");
    assert_eq!(retried["status"], "PENDING");
    let done = server.wait_task(&id).await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    let (status, not_failed) = server
        .post(&format!("/api/v3/memory/memorize/{id}/retry"), json!({}))
        .await;
    assert_eq!(status, 422, "{not_failed}");
    assert_eq!(not_failed["error"]["field"], "task_id");
    let (status, _) = server
        .post(
            &format!("/api/v3/memory/memorize/{}/retry", uuid::Uuid::new_v4()),
            json!({}),
        )
        .await;
    assert_eq!(status, 404);

    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"memu_queue_depth{status="PENDING"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("memu_queue_oldest_pending_age_seconds 0"),
        "{metrics}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn queue_sqlite() {
    idempotency_retry_and_queue_metrics(false).await;
}

#[tokio::test]
async fn queue_postgres() {
    idempotency_retry_and_queue_metrics(true).await;
}

/// Queue figures while work waits: a stopped pipeline leaves the tasks PENDING.
#[tokio::test]
async fn pending_work_shows_on_metrics() {
    let stub = common::stub().await;
    let mut config = common::stub_config(&stub);
    config.role = memu_crds::worker::Role::Api;
    let (config, _db) = common::with_backend(config, true).await;
    let server = TestServer::start(config).await;
    for i in 0..3 {
        let (status, _) = server
            .post(
                "/api/v3/memory/memorize",
                json!({"user_id": format!("u{i}"), "conversation": [{"role": "user", "content": "hello"}]}),
            )
            .await;
        assert_eq!(status, 202);
    }
    let stats = server.service.store.queue_stats().await.unwrap();
    assert_eq!((stats.pending, stats.processing), (3, 0));
    assert!(stats.oldest_pending_seconds >= 0.0);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"memu_queue_depth{status="PENDING"} 3"#),
        "{metrics}"
    );
    server.stop().await.unwrap();
}
