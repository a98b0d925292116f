//! The HTTP API over real loopback HTTP: memorize → status → retrieve on both stores, user
//! isolation, the bad-input matrix, native CRUD, erase/export, health, metrics and OpenAPI.

mod common;
use common::u;

use common::TestServer;
use serde_json::{Value, json};

fn conversation() -> Value {
    json!([
        {"role": "user", "content": "Hi! I live in Lisbon and I work as a marine biologist."},
        {"role": "assistant", "content": "That sounds fascinating. What do you study?"},
        {"role": "user", "content": {"text": "Mostly octopus behaviour. My favorite animal is the octopus."}},
        {"role": "assistant", "content": "Octopuses are clever animals."}
    ])
}

async fn memorize_and_wait(server: &TestServer, user: &str) -> Value {
    let (status, body) = server
        .post(
            "/api/v3/memory/memorize",
            json!({"user_id": user, "user_name": "Maria", "session_date": "2025-05-01", "conversation": conversation()}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "PENDING");
    let task = server.wait_task(body["task_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    task
}

/// memorize → SUCCESS → retrieve returns the fact for that user and nothing for another.
async fn round_trip(server: &TestServer) {
    memorize_and_wait(server, "maria").await;
    let (status, body) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "query": "Which city does Maria live in?", "top_k": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let items = body["items"].as_array().unwrap();
    assert!(!items.is_empty());
    let texts: Vec<&str> = items
        .iter()
        .map(|i| i["summary"].as_str().unwrap())
        .collect();
    assert!(texts.iter().any(|t| t.contains("Lisbon")), "{texts:?}");
    assert!(items.iter().all(|i| i["summary"] == i["content"]));
    assert!(
        items
            .windows(2)
            .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64())
    );
    assert_eq!(body["rewritten_query"], "Which city does Maria live in?");
    assert!(!body["categories"].as_array().unwrap().is_empty(), "{body}");
    let resources = body["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 1);
    assert!(
        resources[0]["content"]
            .as_str()
            .unwrap()
            .contains("marine biologist")
    );
    assert!(
        resources[0]["caption"]
            .as_str()
            .unwrap()
            .starts_with("Conversation of 4 messages")
    );

    // The profile statement was rewritten in the third person with the user's name.
    let (_, profile) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "query": "job", "memory_types": ["profile"], "top_k": 10}),
        )
        .await;
    let profile_texts: Vec<&str> = profile["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["summary"].as_str().unwrap())
        .collect();
    assert!(
        profile_texts.contains(&"Maria lives in Lisbon and works as a marine biologist."),
        "{profile_texts:?}"
    );
    assert!(
        profile["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["memory_type"] == "profile")
    );

    // Another user sees nothing of Maria's: items, categories or resources.
    let (status, other) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "someone-else", "query": "Which city does Maria live in?"}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(other["items"].as_array().unwrap().is_empty(), "{other}");
    assert!(
        other["categories"].as_array().unwrap().is_empty(),
        "{other}"
    );
    assert!(other["resources"].as_array().unwrap().is_empty(), "{other}");
    let (_, cats) = server
        .post(
            "/api/v3/memory/categories",
            json!({"user_id": "someone-else"}),
        )
        .await;
    assert!(cats["categories"].as_array().unwrap().is_empty());

    // Maria's categories carry summaries of her memories.
    let (status, cats) = server
        .post("/categories", json!({"user_id": "maria"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(cats["status"], "success", "memU-server's envelope");
    let cats = cats["result"]["categories"].as_array().unwrap();
    assert_eq!(cats.len(), 10);
    assert!(
        cats.iter()
            .any(|c| c["summary"].as_str().unwrap().contains("Lisbon"))
    );
    assert!(cats.iter().all(|c| c["user_id"] == "maria"));

    // The same conversation again is recognised by its content hash: the earlier task comes back.
    let (status, again) = server
        .post(
            "/api/v3/memory/memorize",
            json!({"user_id": "maria", "user_name": "Maria", "session_date": "2025-05-01", "conversation": conversation()}),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["status"], "SUCCESS");
    assert!(
        again["message"]
            .as_str()
            .unwrap()
            .contains("memorized before")
    );
    // Another conversation repeating a fact adds no duplicate profile item.
    let (status, other) = server
        .post(
            "/api/v3/memory/memorize",
            json!({"user_id": "maria", "user_name": "Maria", "conversation": [
                {"role": "user", "content": "As I said, I live in Lisbon."}]}),
        )
        .await;
    assert_eq!(status, 202, "{other}");
    let task = server.wait_task(other["task_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    let (_, page) = server
        .get("/api/v1/users/maria/items?memory_type=profile&limit=100")
        .await;
    let summaries: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["summary"].as_str().unwrap())
        .collect();
    let unique: std::collections::HashSet<&&str> = summaries.iter().collect();
    assert_eq!(unique.len(), summaries.len(), "{summaries:?}");
}

#[tokio::test]
async fn offline_round_trip_on_sqlite_with_the_local_model() {
    let (config, _db) = common::with_backend(common::local_config(), false).await;
    let server = TestServer::start(config).await;
    round_trip(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn offline_round_trip_on_postgres_with_the_local_model() {
    let (config, _db) = common::with_backend(common::local_config(), true).await;
    let server = TestServer::start(config).await;
    round_trip(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn round_trip_with_a_remote_embedding_provider() {
    let stub = common::stub().await;
    let (config, _db) = common::with_backend(common::stub_config(&stub), true).await;
    let server = TestServer::start(config).await;
    round_trip(&server).await;
    let requests = stub.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.endpoint == memu_e2e::openai_stub::Endpoint::Embeddings)
    );
    // Retrieve with a repeated query is served from the embedding cache.
    let before = stub.requests().len();
    for _ in 0..3 {
        server
            .post(
                "/retrieve",
                json!({"user_id": "maria", "query": "cached question"}),
            )
            .await;
    }
    assert_eq!(stub.requests().len(), before + 1);
    server.stop().await.unwrap();
}

/// Every malformed request gets a 4xx with a JSON error naming the field, and writes nothing.
#[tokio::test]
async fn bad_input_matrix() {
    let stub = common::stub().await;
    let (mut config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    config.server.max_body_bytes = 4096;
    let server = TestServer::start(config).await;
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/api/v3/memory/memorize",
            json!({"conversation": conversation()}),
            422,
            "user_id",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": 42, "conversation": conversation()}),
            422,
            "user_id",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "", "conversation": conversation()}),
            422,
            "user_id",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u"}),
            422,
            "conversation",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "conversation": []}),
            422,
            "conversation",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "conversation": "hello"}),
            422,
            "conversation",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "conversation": [{"content": "x"}]}),
            422,
            "conversation[0].role",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "conversation": [{"role": "robot", "content": "x"}]}),
            422,
            "conversation[0].role",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "conversation": [{"role": "user", "content": "  "}]}),
            422,
            "conversation[0].content",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "conversation": [{"role": "user", "content": 5}]}),
            422,
            "conversation[0].content",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "u", "session_date": "yesterday", "conversation": conversation()}),
            422,
            "session_date",
        ),
        (
            "/api/v3/memory/memorize",
            json!({"user_id": "x".repeat(300), "conversation": conversation()}),
            422,
            "user_id",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"query": "q"}),
            422,
            "user_id",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u"}),
            422,
            "query",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": ""}),
            422,
            "query",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": []}),
            422,
            "query",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": "q", "top_k": 0}),
            422,
            "top_k",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": "q", "top_k": -1}),
            422,
            "top_k",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": "q", "top_k": 1000}),
            422,
            "top_k",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": "q", "memory_types": ["gossip"]}),
            422,
            "memory_types[0]",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": "q", "method": "magic"}),
            422,
            "method",
        ),
        (
            "/api/v3/memory/retrieve",
            json!({"user_id": "u", "query": "q", "method": "llm"}),
            422,
            "method",
        ),
        ("/api/v3/memory/categories", json!({}), 422, "user_id"),
        ("/clear", json!({"agent_id": "a"}), 422, "user_id"),
        (
            "/api/v1/users/u/items",
            json!({"summary": "s"}),
            422,
            "memory_type",
        ),
        (
            "/api/v1/users/u/items",
            json!({"memory_type": "profile", "summary": ""}),
            422,
            "summary",
        ),
        (
            "/api/v1/users/u/items",
            json!({"memory_type": "nope", "summary": "s"}),
            422,
            "memory_type",
        ),
        (
            "/api/v1/users/u/items",
            json!({"memory_type": "profile", "summary": "s", "extra": [1]}),
            422,
            "extra",
        ),
    ];
    for (path, body, want_status, want_field) in cases {
        let (status, reply) = server.post(path, body.clone()).await;
        assert_eq!(status, want_status, "{path} {body} -> {reply}");
        assert_eq!(
            reply["error"]["field"], want_field,
            "{path} {body} -> {reply}"
        );
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
    }

    // Not JSON at all, wrong content type, oversized, unknown route, wrong method, bad ids.
    let raw = |body: &'static str, ct: &'static str| {
        server
            .http
            .post(server.url("/api/v3/memory/memorize"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let r = raw("{not json", "application/json").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "malformed_json"
    );
    let r = raw("user_id=u", "application/x-www-form-urlencoded")
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let big =
        json!({"user_id": "u", "conversation": [{"role": "user", "content": "x".repeat(10_000)}]});
    let (status, reply) = server.post("/api/v3/memory/memorize", big).await;
    assert_eq!(status, 413, "{reply}");
    assert_eq!(reply["error"]["field"], "body");
    let (status, reply) = server.get("/no/such/route").await;
    assert_eq!(status, 404);
    assert_eq!(reply["error"]["code"], "not_found");
    let (status, reply) = server.get("/api/v3/memory/retrieve").await;
    assert_eq!(status, 405, "{reply}");
    assert_eq!(reply["error"]["code"], "method_not_allowed");
    let (status, reply) = server
        .get("/api/v3/memory/memorize/status/not-a-uuid")
        .await;
    assert_eq!(status, 422);
    assert_eq!(reply["error"]["field"], "task_id");
    let (status, _) = server
        .get(&format!(
            "/api/v3/memory/memorize/status/{}",
            uuid::Uuid::new_v4()
        ))
        .await;
    assert_eq!(status, 404);
    let (status, reply) = server.get("/api/v1/users/u/items?limit=0").await;
    assert_eq!(
        (status, reply["error"]["field"].as_str()),
        (422, Some("limit"))
    );
    let (status, reply) = server.get("/api/v1/users/u/items?limit=ten").await;
    assert_eq!(
        (status, reply["error"]["field"].as_str()),
        (422, Some("limit")),
        "{reply}"
    );
    let (status, reply) = server
        .get("/api/v1/users/u/items?memory_type=profile,gossip")
        .await;
    assert_eq!(
        (status, reply["error"]["field"].as_str()),
        (422, Some("memory_type"))
    );
    let (status, reply) = server.get("/api/v1/users/u/items?cursor=garbage").await;
    assert_eq!(
        (status, reply["error"]["field"].as_str()),
        (422, Some("cursor")),
        "{reply}"
    );
    let (status, reply) = server.get("/api/v1/users/u/items/not-a-uuid").await;
    assert_eq!(
        (status, reply["error"]["field"].as_str()),
        (422, Some("item_id"))
    );

    // Nothing above was written.
    let export = server.service.export_user(u("u")).await.unwrap();
    assert!(
        export.memory_items.is_empty() && export.resources.is_empty() && export.tasks.is_empty()
    );
    assert_eq!(stub.count(memu_e2e::openai_stub::Endpoint::Chat), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn native_item_crud_erase_and_export() {
    let stub = common::stub().await;
    let (config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    let server = TestServer::start(config).await;
    let (status, created) = server
        .post(
            "/api/v1/users/ana/items",
            json!({"memory_type": "knowledge", "summary": "Ana speaks Portuguese and Japanese", "happened_at": "2025-01-02T03:04:05Z", "extra": {"source": "manual"}}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let (status, got) = server.get(&format!("/api/v1/users/ana/items/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["summary"], "Ana speaks Portuguese and Japanese");
    assert_eq!(got["extra"]["source"], "manual");
    // Another user cannot read, change or delete it by id.
    let (status, _) = server.get(&format!("/api/v1/users/bo/items/{id}")).await;
    assert_eq!(status, 404);
    let response = server
        .http
        .patch(server.url(&format!("/api/v1/users/ana/items/{id}")))
        .json(
            &json!({"summary": "Ana speaks Portuguese, Japanese and Korean", "happened_at": null}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let updated: Value = response.json().await.unwrap();
    assert_eq!(
        updated["summary"],
        "Ana speaks Portuguese, Japanese and Korean"
    );
    assert!(updated["happened_at"].is_null());
    let (_, found) = server
        .post("/retrieve", json!({"user_id": "ana", "query": "Korean"}))
        .await;
    assert_eq!(found["result"]["items"][0]["id"], id.as_str());
    for n in 0..4 {
        server
            .post(
                "/api/v1/users/ana/items",
                json!({"memory_type": "event", "summary": format!("event {n}")}),
            )
            .await;
    }
    let (_, page1) = server.get("/api/v1/users/ana/items?limit=3").await;
    assert_eq!(page1["items"].as_array().unwrap().len(), 3);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = server
        .get(&format!("/api/v1/users/ana/items?limit=3&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 2);
    assert!(page2["next_cursor"].is_null());
    let (_, events) = server
        .get("/api/v1/users/ana/items?memory_type=event")
        .await;
    assert_eq!(events["items"].as_array().unwrap().len(), 4);

    let (status, export) = server.get("/api/v1/users/ana/export").await;
    assert_eq!(status, 200);
    assert_eq!(export["memory_items"].as_array().unwrap().len(), 5);
    let response = server
        .http
        .delete(server.url(&format!("/api/v1/users/ana/items/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = server
        .http
        .delete(server.url(&format!("/api/v1/users/ana/items/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let response = server
        .http
        .delete(server.url("/api/v1/users/ana"))
        .send()
        .await
        .unwrap();
    let erased: Value = response.json().await.unwrap();
    assert_eq!(erased["deleted"]["memory_items"], 4);
    let (_, export) = server.get("/api/v1/users/ana/export").await;
    assert!(export["memory_items"].as_array().unwrap().is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let stub = common::stub().await;
    let (config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    let server = TestServer::start(config).await;
    assert_eq!(server.get("/healthz").await.0, 200);
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));
    server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "m", "query": "anything"}),
        )
        .await;
    server
        .post("/api/v3/memory/retrieve", json!({"user_id": "m"}))
        .await;
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        r#"http_requests_total{method="POST",route="/api/v3/memory/retrieve",status="200"} 1"#,
        r#"http_requests_total{method="POST",route="/api/v3/memory/retrieve",status="422"} 1"#,
        "http_request_duration_seconds_bucket",
        r#"memu_db_pool_connections{pool="primary",state="max"} 16"#,
        r#"memu_embedding_requests_total{provider="stub",model="stub-embed",outcome="ok"}"#,
        "memu_vector_search_duration_seconds",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/api/v3/memory/memorize",
        "/api/v3/memory/retrieve",
        "/api/v1/users/{user_id}/items/{item_id}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    assert!(doc["components"]["schemas"]["RetrieveResponse"].is_object());
    let docs = server.http.get(server.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(
        docs.text()
            .await
            .unwrap()
            .to_lowercase()
            .contains("swagger")
    );
    server.stop().await.unwrap();
}

/// A failing embedding provider marks the task FAILED with the reason and keeps the resource.
#[tokio::test]
async fn provider_outage_fails_the_task_and_keeps_the_resource() {
    let stub = common::stub().await;
    let (mut config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    config.pipeline.max_attempts = 1;
    let server = TestServer::start(config).await;
    // Warm the category anchors, then make every embeddings call fail.
    for _ in 0..40 {
        stub.enqueue(
            memu_e2e::openai_stub::Endpoint::Embeddings,
            memu_e2e::openai_stub::Scripted {
                status: Some(400),
                ..Default::default()
            },
        );
    }
    let (status, body) = server
        .post(
            "/memorize",
            json!({"user_id": "z", "conversation": conversation()}),
        )
        .await;
    assert_eq!(status, 200, "memU-server answers 200: {body}");
    let task_id = body["result"]["task_id"].as_str().unwrap();
    assert!(task_id.starts_with("memorize-"), "{body}");
    let task = server.wait_task(task_id).await;
    assert_eq!(task["status"], "FAILED");
    let (_, status) = server.get(&format!("/memorize/status/{task_id}")).await;
    assert_eq!(status["result"]["status"], "FAILED", "{status}");
    assert!(status["result"]["detail"].as_str().unwrap().contains("400"));
    assert!(task["error"].as_str().unwrap().contains("400"), "{task}");
    let export = server.service.export_user(u("z")).await.unwrap();
    assert_eq!(
        export.resources.len(),
        1,
        "the raw conversation is kept for a retry"
    );
    assert!(export.memory_items.is_empty(), "nothing half-written");
    server.stop().await.unwrap();
}

/// Offline mode keeps a document's passages as knowledge items, searchable at once.
#[tokio::test]
async fn offline_documents_become_knowledge() {
    let stub = common::stub().await;
    let (config, _db) = common::with_backend(common::stub_config(&stub), false).await;
    let server = TestServer::start(config).await;
    let (status, queued) = server
        .post(
            "/api/v1/users/maria/documents",
            json!({"title": "Octopus facts", "text": "Octopuses have three hearts.\n\nTheir blood is blue."}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let task = server.wait_task(queued["task_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    let (_, found) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "query": "octopus hearts", "memory_types": ["knowledge"]}),
        )
        .await;
    let item = &found["items"][0];
    assert!(
        item["summary"].as_str().unwrap().contains("three hearts"),
        "{found}"
    );
    assert_eq!(found["resources"][0]["caption"], "Octopus facts");
    assert_eq!(found["resources"][0]["modality"], "document");
    assert!(
        found["resources"][0]["content"]
            .as_str()
            .unwrap()
            .contains("blue")
    );
    server.stop().await.unwrap();
}
