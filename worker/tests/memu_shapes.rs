//! memU's request shapes on both stores: memU 1.x's `queries`/`where`, `conversation_text`,
//! `override_config`, v3 delete, memU-server's envelope and the memU Cloud v1 routes (whose
//! category queries run on the Postgres store here; the SDK test drives them on SQLite).

mod common;
use common::TestServer;

use serde_json::{Value, json};

async fn memorize(server: &TestServer, path: &str, body: Value) -> Value {
    let (status, queued) = server.post(path, body).await;
    assert!(status == 200 || status == 202, "{status} {queued}");
    let task_id = queued["task_id"]
        .as_str()
        .or(queued["result"]["task_id"].as_str())
        .unwrap()
        .to_string();
    let task = server.wait_task(&task_id).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    task
}

async fn shapes(server: &TestServer) {
    // conversation_text: speakers by role and by name, continuation lines joined.
    memorize(
        server,
        "/api/v3/memory/memorize",
        json!({"user_id": "maria", "user_name": "Maria", "agent_name": "Coach", "agent_id": "coach",
               "conversation_text": "Maria: I live in Lisbon and I work as a marine biologist.\nCoach: Lovely!\nassistant: What do you study?\nMaria: Octopus behaviour,\nmostly in the Tagus estuary."}),
    )
    .await;
    let (_, export) = server.get("/api/v1/users/maria/export").await;
    let messages = &export["resources"][0]["content"]["messages"];
    assert_eq!(messages.as_array().unwrap().len(), 4, "{export}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(
        messages[3]["content"],
        "Octopus behaviour,\nmostly in the Tagus estuary."
    );

    // memU 1.x retrieve: queries + where answer what v3's query + user_id answers.
    let (status, v3) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "agent_id": "coach", "query": "Where does Maria live?"}),
        )
        .await;
    assert_eq!(status, 200, "{v3}");
    let (status, v1x) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"queries": [{"role": "user", "content": {"text": "Where does Maria live?"}}],
                   "where": {"user_id": "maria", "agent_id": "coach"}, "method": "rag"}),
        )
        .await;
    assert_eq!(status, 200, "{v1x}");
    assert!(!v3["items"].as_array().unwrap().is_empty());
    assert_eq!(v3["items"], v1x["items"]);
    let (_, typed) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"query": "Maria", "where": {"user_id": "maria", "memory_type__in": ["event"]}}),
        )
        .await;
    assert!(
        typed["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["memory_type"] == "event"),
        "{typed}"
    );
    for (body, field) in [
        (
            json!({"user_id": "maria", "query": "x", "where": {"user_id": "joao"}}),
            "where.user_id",
        ),
        (
            json!({"query": "x", "where": {"user_id__in": ["a"]}}),
            "where.user_id__in",
        ),
        (json!({"query": "x"}), "user_id"),
        (
            json!({"user_id": "maria", "query": "x", "queries": [{"role": "user", "content": "y"}]}),
            "queries",
        ),
        (json!({"user_id": "maria"}), "query"),
    ] {
        let (status, error) = server.post("/api/v3/memory/retrieve", body.clone()).await;
        assert_eq!(status, 422, "{body} → {error}");
        assert_eq!(error["error"]["field"], field, "{body} → {error}");
    }
    let (_, categories) = server
        .post(
            "/api/v3/memory/categories",
            json!({"where": {"user_id": "maria", "agent_id": "coach"}}),
        )
        .await;
    assert!(
        categories["categories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["summary"].as_str().unwrap().contains("Lisbon")),
        "{categories}"
    );

    // override_config: this job extracts only profile facts, filed only into its own category.
    memorize(
        server,
        "/api/v3/memory/memorize",
        json!({"user_id": "joao", "user_name": "Joao", "conversation": [
                {"role": "user", "content": "I play the guitar every evening and I love jazz."},
                {"role": "assistant", "content": "Jazz guitar is wonderful."}],
               "override_config": {"memory_types": ["profile"],
                   "memory_categories": [{"name": "music", "description": "instruments, genres and concerts"}]}}),
    )
    .await;
    let (_, items) = server.get("/api/v1/users/joao/items").await;
    let items = items["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(
        items.iter().all(|i| i["memory_type"] == "profile"),
        "{items:?}"
    );
    let (_, categories) = server
        .post("/api/v3/memory/categories", json!({"user_id": "joao"}))
        .await;
    let names: Vec<&str> = categories["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["music"], "{categories}");
    assert!(
        categories["categories"][0]["summary"]
            .as_str()
            .unwrap()
            .contains("guitar")
    );
    for (override_config, field) in [
        (json!({"memory_type_prompts": "x"}), "override_config"),
        (json!({"memory_types": []}), "override_config.memory_types"),
        (
            json!({"memory_categories": [{"name": "Bad Name", "description": "d"}]}),
            "override_config.memory_categories[0].name",
        ),
        (
            json!({"memory_categories": [{"name": "a", "description": "d"}, {"name": "a", "description": "e"}]}),
            "override_config.memory_categories[1].name",
        ),
    ] {
        let (status, error) = server
            .post(
                "/api/v3/memory/memorize",
                json!({"user_id": "joao", "conversation_text": "hello", "override_config": override_config}),
            )
            .await;
        assert_eq!(status, 422, "{error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }

    // memU Cloud v1 on this store: categories across agents, with sizes; items with their
    // best category; clustered categories.
    let (status, defaults) = server
        .post(
            "/api/v1/memory/retrieve/default-categories",
            json!({"user_id": "maria"}),
        )
        .await;
    assert_eq!(status, 200, "{defaults}");
    let listed = defaults["categories"].as_array().unwrap();
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|c| c["agent_id"] == "coach"
        && c["is_active"] == true
        && c["memory_count"].as_u64() > Some(0)));
    let (_, related) = server
        .post(
            "/api/v1/memory/retrieve/related-memory-items",
            json!({"user_id": "maria", "query": "Lisbon", "min_similarity": -1.0}),
        )
        .await;
    let best = &related["related_memories"][0];
    assert!(
        listed
            .iter()
            .any(|c| c["name"] == best["memory"]["category"]),
        "{related}"
    );
    let (_, clustered) = server
        .post(
            "/api/v1/memory/retrieve/related-clustered-categories",
            json!({"user_id": "joao", "category_query": "music", "min_similarity": -1.0, "want_summary": false}),
        )
        .await;
    assert_eq!(clustered["total_categories_found"], 1, "{clustered}");
    assert_eq!(
        clustered["clustered_categories"][0]["memories"][0]["category"],
        "music"
    );

    // memU-server's envelope, its task ids and states.
    let (status, queued) = server
        .post(
            "/memorize",
            json!({"user_id": "ana", "conversation": [{"role": "user", "content": {"text": "I speak Korean."}}]}),
        )
        .await;
    assert_eq!(status, 200, "{queued}");
    assert_eq!(queued["status"], "success");
    let task_id = queued["result"]["task_id"].as_str().unwrap();
    server.wait_task(task_id).await;
    let (_, status) = server.get(&format!("/memorize/status/{task_id}")).await;
    assert_eq!(
        status,
        json!({"status": "success", "result": {"task_id": task_id, "status": "COMPLETED", "detail": "SUCCESS"}})
    );
    let (code, error) = server.get("/memorize/status/memorize-nothex").await;
    assert_eq!(code, 422);
    assert_eq!(error["status"], "error");
    assert!(
        error["detail"][0]["msg"]
            .as_str()
            .unwrap()
            .contains("task_id"),
        "{error}"
    );
    let (code, error) = server.post("/retrieve", json!({"query": "Korean"})).await;
    assert_eq!(
        code, 422,
        "memU-server's retrieve spans users; ours needs one"
    );
    assert_eq!(error["error"]["field"], "user_id");
    let (_, found) = server
        .post("/retrieve", json!({"user_id": "ana", "query": "Korean"}))
        .await;
    assert_eq!(found["result"]["original_query"], "Korean");
    assert!(!found["result"]["items"].as_array().unwrap().is_empty());
    let (_, purged) = server.post("/clear", json!({"user_id": "ana"})).await;
    assert_eq!(purged["status"], "success");
    assert!(
        purged["result"]["purged_items"].as_u64() >= Some(1),
        "{purged}"
    );

    // memU 1.x's field name for a memory's text.
    let (status, created) = server
        .post(
            "/api/v1/users/maria/items",
            json!({"memory_type": "knowledge", "memory_content": "Octopuses have three hearts.", "agent_id": "coach"}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["summary"], "Octopuses have three hearts.");
    // ... and its memory_categories: the item is filed where it is told, by name.
    let (status, filed) = server
        .post(
            "/api/v1/users/maria/items",
            json!({"memory_type": "event", "memory_content": "Maria ran the Lisbon half marathon.",
                   "agent_id": "coach", "memory_categories": ["Activities", "goals"]}),
        )
        .await;
    assert_eq!(status, 201, "{filed}");
    let categories_of = |found: &Value, id: &Value| -> Vec<String> {
        found["related_memories"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["memory"]["memory_id"] == *id)
            .map(|r| r["memory"]["category"].as_str().unwrap().to_string())
            .collect()
    };
    let search = json!({"user_id": "maria", "query": "half marathon", "min_similarity": -1.0,
                        "top_k": 20, "include_categories": ["goals"]});
    let (_, found) = server
        .post(
            "/api/v1/memory/retrieve/related-memory-items",
            search.clone(),
        )
        .await;
    assert_eq!(categories_of(&found, &filed["id"]).len(), 1, "{found}");
    let (status, unknown) = server
        .post(
            "/api/v1/users/maria/items",
            json!({"memory_type": "event", "memory_content": "x", "memory_categories": ["sports"]}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(unknown["error"]["field"], "memory_categories[0]");
    let response = server
        .http
        .patch(server.url(&format!(
            "/api/v1/users/maria/items/{}",
            filed["id"].as_str().unwrap()
        )))
        .json(&json!({"memory_categories": ["experiences"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, found) = server
        .post("/api/v1/memory/retrieve/related-memory-items", search)
        .await;
    assert!(
        categories_of(&found, &filed["id"]).is_empty(),
        "refiled: no longer in goals"
    );

    // v3 delete: one agent's memories, then the user's.
    let (status, deleted) = server
        .post(
            "/api/v3/memory/delete",
            json!({"user_id": "maria", "agent_id": "coach"}),
        )
        .await;
    assert_eq!(status, 200, "{deleted}");
    assert!(deleted["deleted"]["memory_items"].as_u64() >= Some(1));
    let (_, left) = server.get("/api/v1/users/maria/items").await;
    assert!(left["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn memu_shapes_on_sqlite() {
    let (config, _db) = common::with_backend(common::local_config(), false).await;
    let server = TestServer::start(config).await;
    shapes(&server).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn memu_shapes_on_postgres() {
    let (config, _db) = common::with_backend(common::local_config(), true).await;
    let server = TestServer::start(config).await;
    shapes(&server).await;
    server.stop().await.unwrap();
}
