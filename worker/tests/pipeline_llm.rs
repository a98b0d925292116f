//! The LLM pipeline over real HTTP against the deterministic OpenAI-compatible stub, on SQLite
//! and on real Postgres + pgvector: extraction of every memory type, the repair path, dedupe,
//! per-user categories, `llm` and `hybrid` retrieve, retries, call counts and the cost log.

mod common;
use common::u;

use common::TestServer;
use memu_crds::worker::{MemoryType, ModelPrice, WorkerConfig};
use memu_e2e::openai_stub::{Endpoint, OpenAiStub, Scripted, embed_text};
use memu_worker::model::dot;
use memu_worker::prompts::PROMPT_VERSION;
use serde_json::{Value, json};

/// Runs an async test body once per store.
macro_rules! on_both_stores {
    ($body:ident: $sqlite:ident, $postgres:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            $body(false).await;
        }
        #[tokio::test]
        async fn $postgres() {
            $body(true).await;
        }
    };
}

async fn llm_server(
    postgres: bool,
    tune: impl FnOnce(&mut WorkerConfig),
) -> (TestServer, OpenAiStub, common::Backend) {
    let stub = common::stub().await;
    let mut config = common::stub_config(&stub);
    config.llm.provider = Some("stub".into());
    config.llm.prices.insert(
        "stub-chat".into(),
        ModelPrice {
            prompt_per_million: 1.0,
            completion_per_million: 2.0,
        },
    );
    config.pipeline.max_attempts = 2;
    tune(&mut config);
    let (config, db) = common::with_backend(config, postgres).await;
    (TestServer::start(config).await, stub, db)
}

fn reply(stub: &OpenAiStub, content: Value) {
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            content: Some(content.to_string()),
            ..Default::default()
        },
    );
}

fn extraction(caption: &str, items: &[(&str, &str)]) -> Value {
    json!({
        "caption": caption,
        "items": items.iter().map(|(t, s)| json!({"memory_type": t, "summary": s, "happened_at": null})).collect::<Vec<_>>(),
    })
}

/// Files item `i` into category `c` for each pair, and rewrites the given summaries.
fn filing(assignments: &[(usize, &str)], summaries: &[(&str, &str)]) -> Value {
    json!({
        "assignments": assignments.iter().map(|(i, c)| json!({"item": i, "categories": [{"name": c, "confidence": 0.9}]})).collect::<Vec<_>>(),
        "summaries": summaries.iter().map(|(c, s)| json!({"category": c, "summary": s})).collect::<Vec<_>>(),
    })
}

/// A ten-turn conversation (five from the user, five from the assistant).
fn ten_turns(topic: &str) -> Value {
    let turns: Vec<Value> = (0..10)
        .map(|i| {
            json!({
                "role": if i % 2 == 0 { "user" } else { "assistant" },
                "content": format!("{topic}: turn {i} of our chat about my week, my work and my plans."),
            })
        })
        .collect();
    json!(turns)
}

/// The two replies of a memorize that extracts one fact and files it in one category, whose
/// summary becomes that fact.
fn script_one_fact(
    stub: &OpenAiStub,
    caption: &str,
    memory_type: &str,
    fact: &str,
    category: &str,
) {
    reply(stub, extraction(caption, &[(memory_type, fact)]));
    reply(stub, filing(&[(0, category)], &[(category, fact)]));
}

async fn memorize(server: &TestServer, user: &str, conversation: Value) -> Value {
    let (status, body) = server
        .post(
            "/api/v3/memory/memorize",
            json!({"user_id": user, "user_name": "Maria", "conversation": conversation}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    server.wait_task(body["task_id"].as_str().unwrap()).await
}

async fn items_of(server: &TestServer, user: &str) -> Vec<Value> {
    let (status, body) = server
        .get(&format!("/api/v1/users/{user}/items?limit=100"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

fn chat_bodies(stub: &OpenAiStub) -> Vec<Value> {
    stub.requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::Chat)
        .map(|r| r.body)
        .collect()
}

async fn every_memory_type_in_one_call(postgres: bool) {
    let (server, stub, _db) = llm_server(postgres, |c| {
        c.memory.memory_types = MemoryType::ALL.to_vec();
    })
    .await;
    reply(
        &stub,
        extraction(
            "Maria talks about her life and work.",
            &[
                ("profile", "Maria lives in Lisbon."),
                (
                    "event",
                    "Maria gave a talk on octopus cognition on 2025-04-30.",
                ),
                ("knowledge", "Octopuses have three hearts."),
                ("behavior", "Maria reviews her notes every evening."),
                ("skill", "Maria is learning to free-dive."),
                (
                    "tool",
                    "Maria tracks her dives with the Garmin Descent app.",
                ),
                ("gossip", "Not a type, dropped."),
            ],
        ),
    );
    reply(
        &stub,
        filing(
            &[
                (0, "personal_info"),
                (1, "experiences"),
                (2, "knowledge"),
                (3, "habits"),
                (4, "goals"),
                (5, "activities"),
            ],
            &[
                ("personal_info", "Maria lives in Lisbon."),
                ("knowledge", "Maria knows octopuses have three hearts."),
            ],
        ),
    );
    let task = memorize(&server, "maria", ten_turns("work")).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");

    // A ten-turn conversation: one extraction call and one filing call (no neighbours yet).
    let chats = chat_bodies(&stub);
    assert!(chats.len() <= 3, "{} chat calls", chats.len());
    assert_eq!(chats.len(), 2);
    assert_eq!(chats[0]["response_format"]["type"], "json_schema");
    let system = chats[0]["messages"][0]["content"].as_str().unwrap();
    for t in MemoryType::ALL {
        assert!(system.contains(&format!("- {}:", t.as_str())), "{system}");
    }
    // Items embedded in one request; summaries in one more (after the category anchors).
    let embeds = stub.count(Endpoint::Embeddings);
    assert!(embeds <= 3, "{embeds} embedding requests");

    let items = items_of(&server, "maria").await;
    let mut types: Vec<&str> = items
        .iter()
        .map(|i| i["memory_type"].as_str().unwrap())
        .collect();
    types.sort();
    assert_eq!(
        types,
        ["behavior", "event", "knowledge", "profile", "skill", "tool"]
    );
    for item in &items {
        assert_eq!(item["extra"]["prompt_version"], PROMPT_VERSION, "{item}");
        assert_eq!(item["extra"]["extractor"], "llm");
    }
    let event = items.iter().find(|i| i["memory_type"] == "event").unwrap();
    assert!(
        event["happened_at"].as_str().is_some(),
        "events keep a time: {event}"
    );

    let (_, categories) = server
        .post("/api/v3/memory/categories", json!({"user_id": "maria"}))
        .await;
    let personal = categories["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "personal_info")
        .unwrap();
    assert_eq!(personal["summary"], "Maria lives in Lisbon.");

    // The cost log has both calls, priced from llm.prices.
    let (_, usage) = server.get("/api/v1/users/maria/usage").await;
    assert_eq!(usage["calls"], 2, "{usage}");
    let (pt, ct) = (
        usage["prompt_tokens"].as_f64().unwrap(),
        usage["completion_tokens"].as_f64().unwrap(),
    );
    assert!(pt > 0.0);
    let expected = (pt * 1.0 + ct * 2.0) / 1_000_000.0;
    assert!(
        (usage["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-12,
        "{usage}"
    );
    assert_eq!(usage["breakdown"][0]["operation"], "memorize");
    // The tenant's cost report has the same calls and cost, and the metric names the tenant.
    let (status, report) = server.get("/admin/v1/tenants/default/costs").await;
    assert_eq!(status, 200, "{report}");
    let row = &report.as_array().unwrap()[0];
    assert_eq!(
        (&row["tenant_id"], &row["user_id"], &row["calls"]),
        (&json!("default"), &json!("maria"), &json!(2)),
        "{report}"
    );
    assert!((row["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-12);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(
            r#"memu_llm_cost_usd_total{tenant="default",provider="stub",model="stub-chat"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"memu_llm_prompt_calls_total{provider="stub",model="stub-chat",prompt="extract"} 1"#
        ),
        "{metrics}"
    );

    // The same conversation again is recognised: same task, no new calls.
    let before = stub.requests().len();
    let (status, again) = server
        .post(
            "/api/v3/memory/memorize",
            json!({"user_id": "maria", "user_name": "Maria", "conversation": ten_turns("work")}),
        )
        .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["task_id"], task["task_id"]);
    assert_eq!(again["status"], "SUCCESS");
    assert_eq!(stub.requests().len(), before);
    // A daily token quota the tenant has used up refuses the next memorize; one above what it
    // used admits it.
    let used = (pt + ct) as u64;
    let job = json!({"user_id": "maria", "conversation": [{"role": "user", "content": "More."}]});
    for (quota, expected_status) in [(used + 1_000_000, 202), (used, 429)] {
        server
            .service
            .access
            .set_limits(
                "default",
                &memu_worker::tenancy::TenantLimits {
                    tokens_per_day: Some(quota),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let (status, body) = server.post("/api/v3/memory/memorize", job.clone()).await;
        assert_eq!(
            status, expected_status,
            "quota {quota}, used {used}: {body}"
        );
        if status == 429 {
            assert!(
                body["error"]["message"].as_str().unwrap().contains("token"),
                "{body}"
            );
        }
    }
    server.stop().await.unwrap();
}
on_both_stores!(every_memory_type_in_one_call: extraction_sqlite, extraction_postgres);

async fn repair_then_clean_failure(postgres: bool) {
    let (server, stub, _db) = llm_server(postgres, |_| {}).await;
    // Cut off at the token limit, then a good answer after the repair prompt.
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            content: Some(r#"{"caption": "Maria's home", "items": [{"memory_type": "prof"#.into()),
            finish_reason: Some("length".into()),
            ..Default::default()
        },
    );
    script_one_fact(
        &stub,
        "Maria's home",
        "profile",
        "Maria lives in Lisbon.",
        "personal_info",
    );
    let task = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "I live in Lisbon."}]),
    )
    .await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    let chats = chat_bodies(&stub);
    assert_eq!(chats.len(), 3);
    let repair = chats[1]["messages"].as_array().unwrap();
    assert_eq!(
        repair.len(),
        4,
        "system, user, the bad answer, the repair request"
    );
    assert_eq!(repair[2]["role"], "assistant");
    assert!(repair[3]["content"].as_str().unwrap().contains("cut off"));

    // Two unusable answers: FAILED at once with the reason, nothing written, resource kept.
    reply(&stub, json!("I am sorry, I cannot do that."));
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            content: Some("{\"caption\": \"x\", \"items\": [".into()),
            ..Default::default()
        },
    );
    let failed = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "My sister Ana lives in Porto."}]),
    )
    .await;
    assert_eq!(failed["status"], "FAILED", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("extract step") && error.contains("after one repair"),
        "{error}"
    );
    assert_eq!(
        chat_bodies(&stub).len(),
        5,
        "no retry of a model that cannot answer"
    );
    assert_eq!(items_of(&server, "maria").await.len(), 1);
    let export = server.service.export_user(u("maria")).await.unwrap();
    assert_eq!(export.resources.len(), 2, "the failed conversation is kept");
    // The failed attempt's calls are in the cost log too.
    let (_, usage) = server.get("/api/v1/users/maria/usage").await;
    assert_eq!(usage["calls"], 5, "{usage}");
    server.stop().await.unwrap();
}
on_both_stores!(repair_then_clean_failure: repair_sqlite, repair_postgres);

async fn dedupe_update_contradiction_duplicate(postgres: bool) {
    let (job, city, dog) = (
        "Maria works as a marine biologist.",
        "Maria lives in Lisbon.",
        "Bolt is the name of the family dog.",
    );
    let job2 = "Maria works as a marine biologist at the Lisbon aquarium.";
    let city2 = "Maria moved from Lisbon to Porto in 2025.";
    // The stub's embeddings decide the neighbours: check the premises, then set the threshold
    // between the intended pairs and the unrelated ones.
    let e = |t: &str| embed_text(t, common::STUB_DIM);
    let (update_sim, contra_sim) = (dot(&e(job2), &e(job)), dot(&e(city2), &e(city)));
    assert!(update_sim > dot(&e(job2), &e(city)));
    assert!(contra_sim > dot(&e(city2), &e(job)));
    let threshold = update_sim.min(contra_sim) - 0.01;
    for t in [job, city, job2] {
        assert!(dot(&e(dog), &e(t)) < threshold, "the dog is unrelated");
    }
    let (server, stub, _db) = llm_server(postgres, |c| {
        c.memory.dedupe_similarity = threshold;
        c.memory.dedupe_candidates = 1;
    })
    .await;
    reply(
        &stub,
        extraction(
            "Maria's job and home",
            &[("profile", job), ("profile", city)],
        ),
    );
    reply(
        &stub,
        filing(
            &[(0, "work_life"), (1, "personal_info")],
            &[("work_life", job), ("personal_info", city)],
        ),
    );
    let first = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "I am a marine biologist in Lisbon."}]),
    )
    .await;
    assert_eq!(first["status"], "SUCCESS", "{first}");

    // An exact repeat is dropped without asking; the rest goes to one dedupe call.
    reply(
        &stub,
        extraction(
            "Maria's news",
            &[
                ("profile", city),
                ("profile", job2),
                ("profile", city2),
                ("profile", dog),
            ],
        ),
    );
    reply(
        &stub,
        json!({"decisions": [
            {"new": 0, "action": "update", "target": "e1", "merged": job2},
            {"new": 1, "action": "contradiction", "target": "e2", "merged": null},
        ]}),
    );
    reply(&stub, filing(&[(0, "pets")], &[("work_life", job2)]));
    let second = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "News: new job, new city, and our dog Bolt."}]),
    )
    .await;
    assert_eq!(second["status"], "SUCCESS", "{second}");
    let chats = chat_bodies(&stub);
    assert_eq!(
        chats.len(),
        5,
        "extract, resolve and file for the second job"
    );
    let resolve = chats[3]["messages"][1]["content"].as_str().unwrap();
    assert!(
        resolve.contains(&format!("New memory 0: {job2}")),
        "{resolve}"
    );
    assert!(
        resolve.contains(&format!("existing e1: {job}")),
        "{resolve}"
    );
    assert!(
        resolve.contains(&format!("existing e2: {city}")),
        "{resolve}"
    );
    assert!(
        !resolve.contains(dog),
        "an item without neighbours is not asked about"
    );

    let items = items_of(&server, "maria").await;
    assert_eq!(items.len(), 3, "{items:?}");
    let find = |text: &str| items.iter().find(|i| i["summary"] == text).cloned();
    let updated = find(job2).expect("the job was updated in place");
    assert_eq!(updated["extra"]["history"][0]["summary"], job);
    assert_eq!(updated["extra"]["history"][0]["reason"], "update");
    let replaced = find(city2).expect("the newer city wins");
    assert_eq!(replaced["extra"]["history"][0]["summary"], city);
    assert_eq!(replaced["extra"]["history"][0]["reason"], "contradiction");
    assert!(find(dog).is_some());
    assert!(find(city).is_none() && find(job).is_none());

    // The revised text is what search finds now.
    let (_, found) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "query": "aquarium biologist", "top_k": 1}),
        )
        .await;
    assert_eq!(found["items"][0]["summary"], job2, "{found}");

    // A duplicate in other words: no new item, no filing call.
    reply(
        &stub,
        extraction(
            "Maria's job",
            &[(
                "profile",
                "Maria is a marine biologist at the Lisbon aquarium.",
            )],
        ),
    );
    reply(
        &stub,
        json!({"decisions": [{"new": 0, "action": "duplicate", "target": "e1", "merged": null}]}),
    );
    let third = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "As I said, I'm a biologist at the aquarium."}]),
    )
    .await;
    assert_eq!(third["status"], "SUCCESS", "{third}");
    assert_eq!(chat_bodies(&stub).len(), 7);
    assert_eq!(items_of(&server, "maria").await.len(), 3);
    server.stop().await.unwrap();
}
on_both_stores!(dedupe_update_contradiction_duplicate: dedupe_sqlite, dedupe_postgres);

async fn categories_never_cross_users(postgres: bool) {
    let (server, stub, _db) = llm_server(postgres, |_| {}).await;
    let secret = "Alice is saving for an engagement ring for Bob.";
    reply(&stub, extraction("Alice's plans", &[("profile", secret)]));
    reply(&stub, filing(&[(0, "goals")], &[("goals", secret)]));
    let a = memorize(
        &server,
        "alice",
        json!([{"role": "user", "content": "I'm saving for a ring for Bob."}]),
    )
    .await;
    assert_eq!(a["status"], "SUCCESS");
    script_one_fact(
        &stub,
        "Carol's plans",
        "profile",
        "Carol wants to run a marathon.",
        "goals",
    );
    let c = memorize(
        &server,
        "carol",
        json!([{"role": "user", "content": "I want to run a marathon."}]),
    )
    .await;
    assert_eq!(c["status"], "SUCCESS");

    // Carol's filing prompt showed Carol's (empty) categories, not Alice's summary.
    let chats = chat_bodies(&stub);
    let carol_filing = chats[3]["messages"][1]["content"].as_str().unwrap();
    assert!(carol_filing.contains("- goals:"), "{carol_filing}");
    assert!(!carol_filing.contains("engagement"), "{carol_filing}");
    for user in ["carol", "nobody"] {
        let (_, cats) = server
            .post("/api/v3/memory/categories", json!({"user_id": user}))
            .await;
        assert!(!cats.to_string().contains("engagement"), "{user}: {cats}");
        let (_, found) = server
            .post(
                "/api/v3/memory/retrieve",
                json!({"user_id": user, "query": "engagement ring for Bob", "method": "hybrid"}),
            )
            .await;
        for part in ["items", "categories", "resources"] {
            assert!(
                !found[part].to_string().contains("engagement"),
                "{user}: {found}"
            );
        }
    }
    let (_, cats) = server
        .post("/api/v3/memory/categories", json!({"user_id": "alice"}))
        .await;
    assert!(cats.to_string().contains(secret));
    server.stop().await.unwrap();
}
on_both_stores!(categories_never_cross_users: isolation_sqlite, isolation_postgres);

async fn llm_retrieve_stops_at_the_first_sufficient_tier(postgres: bool) {
    let (server, stub, _db) = llm_server(postgres, |_| {}).await;
    script_one_fact(
        &stub,
        "Maria's home",
        "profile",
        "Maria lives in Lisbon.",
        "personal_info",
    );
    memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "I live in Lisbon."}]),
    )
    .await;
    let before = chat_bodies(&stub).len();

    reply(
        &stub,
        json!({"needs_memory": true, "query": "Which city does Maria live in?"}),
    );
    reply(
        &stub,
        json!({"sufficient": false, "query": "Maria home city Lisbon"}),
    );
    reply(&stub, json!({"sufficient": true, "query": ""}));
    let (status, found) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "method": "llm", "query": [
                {"role": "user", "content": "I'm planning a trip home."},
                {"role": "assistant", "content": "Nice! Where to?"},
                {"role": "user", "content": "Guess where I live."}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["llm_calls"], 3);
    assert_eq!(found["sufficient_after"], "items");
    assert_eq!(found["rewritten_query"], "Maria home city Lisbon");
    assert_eq!(found["items"][0]["summary"], "Maria lives in Lisbon.");
    assert!(!found["categories"].as_array().unwrap().is_empty());
    assert!(
        found["resources"].as_array().unwrap().is_empty(),
        "stopped before resources"
    );
    let chats = chat_bodies(&stub);
    assert_eq!(chats.len(), before + 3);
    let route = chats[before]["messages"][1]["content"].as_str().unwrap();
    assert!(
        route.contains("assistant: Nice! Where to?")
            && route.contains("Latest message: Guess where I live."),
        "{route}"
    );

    // Small talk: one call, nothing searched.
    reply(&stub, json!({"needs_memory": false, "query": ""}));
    let (_, chat) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "method": "llm", "query": "Hello there!"}),
        )
        .await;
    assert_eq!(chat["llm_calls"], 1, "{chat}");
    assert_eq!(chat["needs_memory"], false);
    assert!(chat["items"].as_array().unwrap().is_empty());

    // rag: no chat call at all.
    let (_, rag) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "query": "Where does Maria live?"}),
        )
        .await;
    assert_eq!(rag["llm_calls"], 0);
    assert_eq!(chat_bodies(&stub).len(), before + 4);
    let (_, usage) = server.get("/api/v1/users/maria/usage").await;
    let retrieve_calls: u64 = usage["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["operation"] == "retrieve")
        .map(|b| b["calls"].as_u64().unwrap())
        .sum();
    assert_eq!(retrieve_calls, 4, "{usage}");
    server.stop().await.unwrap();
}
on_both_stores!(llm_retrieve_stops_at_the_first_sufficient_tier: llm_retrieve_sqlite, llm_retrieve_postgres);

async fn hybrid_finds_numbers(postgres: bool) {
    let (server, _stub, _db) = llm_server(postgres, |_| {}).await;
    let texts = [
        "Maria ordered a new wetsuit online last week.",
        "Maria's order from the dive shop was delayed.",
        "The tracking number of Maria's wetsuit order is 48213.",
        "Maria prefers ordering online to visiting shops.",
        "Maria's dive shop order included fins and a mask.",
    ];
    for text in texts {
        let (status, body) = server
            .post(
                "/api/v1/users/maria/items",
                json!({"memory_type": "event", "summary": text}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (_, hybrid) = server
        .post(
            "/api/v3/memory/retrieve",
            json!({"user_id": "maria", "query": "48213", "method": "hybrid", "top_k": 3}),
        )
        .await;
    assert_eq!(hybrid["items"][0]["summary"], texts[2], "{hybrid}");
    assert_eq!(hybrid["llm_calls"], 0);
    let text = server
        .service
        .store
        .search_text(u("maria"), "what is 48213?", &Default::default(), 5)
        .await
        .unwrap();
    assert_eq!(text.len(), 1);
    assert_eq!(text[0].item.summary, texts[2]);
    // Full text is per user too.
    let other = server
        .service
        .store
        .search_text(u("carol"), "48213", &Default::default(), 5)
        .await
        .unwrap();
    assert!(other.is_empty());
    server.stop().await.unwrap();
}
on_both_stores!(hybrid_finds_numbers: hybrid_sqlite, hybrid_postgres);

/// A rate limit with Retry-After is waited out and retried; the job still succeeds.
#[tokio::test]
async fn rate_limits_are_retried_in_the_pipeline() {
    let (server, stub, _db) = llm_server(false, |_| {}).await;
    stub.enqueue(
        Endpoint::Chat,
        Scripted {
            status: Some(429),
            retry_after: Some(1),
            ..Default::default()
        },
    );
    reply(
        &stub,
        extraction("home", &[("profile", "Maria lives in Lisbon.")]),
    );
    reply(&stub, filing(&[(0, "personal_info")], &[]));
    let task = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "I live in Lisbon."}]),
    )
    .await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    assert_eq!(
        chat_bodies(&stub).len(),
        3,
        "the 429, then extract and file"
    );
    // A summary the model did not rewrite stays as it was (empty), never blanked or invented.
    let (_, cats) = server
        .post("/api/v3/memory/categories", json!({"user_id": "maria"}))
        .await;
    assert!(
        cats["categories"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["summary"] == "")
    );
    server.stop().await.unwrap();
}

/// A provider that stays down: the job FAILS with the provider's reason after its attempts, and
/// the resource stays for a later retry.
#[tokio::test]
async fn provider_outage_fails_with_the_reason() {
    let (server, stub, _db) = llm_server(false, |c| {
        c.pipeline.max_attempts = 1;
        c.providers.get_mut("stub").unwrap().max_retries = 1;
    })
    .await;
    for _ in 0..2 {
        stub.enqueue(
            Endpoint::Chat,
            Scripted {
                status: Some(503),
                ..Default::default()
            },
        );
    }
    let task = memorize(
        &server,
        "maria",
        json!([{"role": "user", "content": "I live in Lisbon."}]),
    )
    .await;
    assert_eq!(task["status"], "FAILED", "{task}");
    assert!(task["error"].as_str().unwrap().contains("503"), "{task}");
    let export = server.service.export_user(u("maria")).await.unwrap();
    assert_eq!(export.resources.len(), 1);
    assert!(export.memory_items.is_empty());
    server.stop().await.unwrap();
}

async fn documents_are_memorized(postgres: bool) {
    let (server, stub, _db) = llm_server(postgres, |_| {}).await;
    reply(
        &stub,
        extraction(
            "Dive log notes",
            &[("knowledge", "Maria's safe free-dive limit is 18 metres.")],
        ),
    );
    reply(
        &stub,
        filing(
            &[(0, "knowledge")],
            &[("knowledge", "Maria's free-dive limit is 18 metres.")],
        ),
    );
    let body = json!({"title": "Dive log", "text": "# Dive log\n\nMy safe free-dive limit is 18 metres.\n\nNext goal: 20 metres."});
    let (status, queued) = server
        .post("/api/v1/users/maria/documents", body.clone())
        .await;
    assert_eq!(status, 202, "{queued}");
    let task = server.wait_task(queued["task_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    let prompt = chat_bodies(&stub)[0]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        prompt.contains("document: My safe free-dive limit is 18 metres."),
        "{prompt}"
    );
    assert_eq!(
        items_of(&server, "maria").await[0]["memory_type"],
        "knowledge"
    );
    // The same document again: recognised, not extracted twice.
    let (status, again) = server.post("/api/v1/users/maria/documents", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["task_id"], queued["task_id"]);
    // What this version cannot read is refused, naming the field.
    for (body, field) in [
        (json!({"text": "a photo", "modality": "image"}), "data"),
        (json!({"text": "a clip", "modality": "video"}), "modality"),
        (json!({"text": "  "}), "text"),
        (json!({"txt": "typo"}), "txt"),
    ] {
        let (status, error) = server.post("/api/v1/users/maria/documents", body).await;
        assert_eq!(status, 422, "{error}");
        assert!(
            error["error"]["field"]
                .as_str()
                .unwrap_or_default()
                .contains(field)
                || error.to_string().contains(field),
            "{error}"
        );
    }
    server.stop().await.unwrap();
}
on_both_stores!(documents_are_memorized: documents_sqlite, documents_postgres);

/// Images are described by the vision model and audio transcribed, then memorized as text that
/// remembers its source; the same file is never sent twice; a profile without the ability is
/// refused with 422.
#[tokio::test]
async fn images_and_audio_are_read_into_memories() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let (server, stub, _db) = llm_server(false, |c| {
        let stub = c.providers.get_mut("stub").unwrap();
        stub.vision = Some(true);
        stub.transcription_model = Some("stub-whisper".into());
    })
    .await;
    let png = b"\x89PNG\r\n\x1a\nfake image bytes";
    reply(
        &stub,
        json!("A photo of Maria holding a surfboard on Nazare beach."),
    );
    reply(
        &stub,
        extraction(
            "Beach photo",
            &[("event", "Maria went surfing at Nazare beach.")],
        ),
    );
    reply(&stub, filing(&[(0, "activities")], &[]));
    let body = json!({"modality": "image", "mime_type": "image/png", "data": b64(png), "title": "beach.png"});
    let (status, queued) = server
        .post("/api/v1/users/maria/documents", body.clone())
        .await;
    assert_eq!(status, 202, "{queued}");
    let task = server.wait_task(queued["task_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    let chats = chat_bodies(&stub);
    let parts = chats[0]["messages"][0]["content"].as_array().unwrap();
    assert_eq!(parts[1]["type"], "image_url");
    assert!(
        parts[1]["image_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,")
    );
    assert!(
        chats[1]["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("surfboard")
    );
    let (status, again) = server.post("/api/v1/users/maria/documents", body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        chat_bodies(&stub).len(),
        3,
        "the same image is not described twice"
    );

    stub.enqueue(
        Endpoint::Transcriptions,
        Scripted {
            content: Some("I just booked a flight to Tokyo for March.".into()),
            ..Default::default()
        },
    );
    reply(
        &stub,
        extraction(
            "Voice note",
            &[("event", "Maria booked a flight to Tokyo for March.")],
        ),
    );
    reply(&stub, filing(&[(0, "goals")], &[]));
    let (status, queued) = server
        .post(
            "/api/v1/users/maria/documents",
            json!({"modality": "audio", "mime_type": "audio/mpeg", "data": b64(b"ID3 fake audio")}),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let task = server.wait_task(queued["task_id"].as_str().unwrap()).await;
    assert_eq!(task["status"], "SUCCESS", "{task}");
    let transcription = stub
        .requests()
        .into_iter()
        .find(|r| r.endpoint == Endpoint::Transcriptions)
        .unwrap();
    assert_eq!(transcription.body["model"], "stub-whisper");
    let export = server.service.export_user(u("maria")).await.unwrap();
    let audio = export
        .resources
        .iter()
        .find(|r| r.to_string().contains("Tokyo"))
        .unwrap();
    assert_eq!(audio["content"]["source"]["modality"], "audio", "{audio}");
    assert_eq!(audio["content"]["source"]["mime_type"], "audio/mpeg");

    for (body, field) in [
        (
            json!({"modality": "image", "mime_type": "image/png", "data": "%%%"}),
            "data",
        ),
        (
            json!({"modality": "image", "mime_type": "audio/wav", "data": b64(png)}),
            "mime_type",
        ),
        (json!({"modality": "video", "data": b64(png)}), "modality"),
    ] {
        let (status, error) = server.post("/api/v1/users/maria/documents", body).await;
        assert_eq!(status, 422, "{error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    server.stop().await.unwrap();

    // Without vision or a transcription model: a clear 422, nothing sent anywhere.
    let (plain, plain_stub, _db2) = llm_server(false, |c| {
        let stub = c.providers.get_mut("stub").unwrap();
        stub.vision = Some(false);
        stub.transcription_model = Some(String::new());
    })
    .await;
    let (status, error) = plain
        .post(
            "/api/v1/users/maria/documents",
            json!({"modality": "image", "mime_type": "image/png", "data": b64(png)}),
        )
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(error["error"]["field"], "modality");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("vision")
    );
    let (status, _) = plain
        .post(
            "/api/v1/users/maria/documents",
            json!({"modality": "audio", "mime_type": "audio/wav", "data": b64(b"RIFF")}),
        )
        .await;
    assert_eq!(status, 422);
    assert!(
        plain_stub
            .requests()
            .iter()
            .all(|r| r.endpoint == Endpoint::Embeddings)
    );
    plain.stop().await.unwrap();
}
