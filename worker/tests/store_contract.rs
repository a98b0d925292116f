//! One contract for the `MemoryStore` trait, run against the embedded SQLite store and against a
//! real PostgreSQL 15 + pgvector server.

mod common;
use common::u;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use memu_crds::worker::{CategorySpec, Quantization, WorkerConfig};
use memu_worker::model::{
    CategoryLink, CategoryUpdate, ItemFilter, ItemPatch, MemorizeOutcome, MemoryItem, MemoryType,
    Modality, NewItem, Resource, Scope, Task, TaskStatus, normalize,
};
use memu_worker::store::{self, EmbeddingSpace, MemoryStore, StoreError};
use uuid::Uuid;

const DIM: usize = 16;

fn space() -> EmbeddingSpace {
    EmbeddingSpace {
        dimension: DIM,
        model: "test/contract".into(),
    }
}

async fn open(postgres: bool) -> (Arc<dyn MemoryStore>, WorkerConfig, common::Backend) {
    open_with(postgres, 0).await
}

/// A store whose failed jobs wait `backoff_ms` (doubling) before their next attempt.
async fn open_with(
    postgres: bool,
    backoff_ms: u64,
) -> (Arc<dyn MemoryStore>, WorkerConfig, common::Backend) {
    let mut config = WorkerConfig::default();
    config.vector.dimension = DIM;
    config.pipeline.retry_backoff_ms = backoff_ms;
    let (config, backend) = common::with_backend(config, postgres).await;
    let store = store::open(&config, space()).await.expect("open store");
    store.migrate().await.expect("migrate");
    (store, config, backend)
}

/// A deterministic unit vector pointing mostly along axis `axis`.
fn vector(axis: usize, wobble: f32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM)
        .map(|i| ((i * 7 + axis) % 5) as f32 * 0.01 * wobble)
        .collect();
    v[axis % DIM] += 1.0;
    normalize(&mut v);
    v
}

fn item(
    user: &str,
    agent: &str,
    memory_type: MemoryType,
    summary: &str,
    at: DateTime<Utc>,
) -> MemoryItem {
    MemoryItem {
        id: Uuid::now_v7(),
        tenant_id: "default".into(),
        user_id: user.into(),
        agent_id: agent.into(),
        resource_id: None,
        memory_type,
        summary: summary.into(),
        happened_at: Some(at),
        created_at: at,
        updated_at: at,
        extra: serde_json::json!({"k": "v"}),
    }
}

fn resource_and_task(user: &str, created: DateTime<Utc>) -> (Resource, Task) {
    let resource = Resource {
        id: Uuid::now_v7(),
        tenant_id: "default".into(),
        user_id: user.into(),
        agent_id: String::new(),
        modality: Modality::Conversation,
        content_hash: "abc".into(),
        content: serde_json::json!({"messages": [{"role": "user", "content": "I live in Oslo"}]}),
        caption: None,
        created_at: created,
    };
    let task = Task {
        id: Uuid::now_v7(),
        tenant_id: "default".into(),
        user_id: user.into(),
        agent_id: String::new(),
        resource_id: resource.id,
        status: TaskStatus::Pending,
        attempts: 0,
        error: None,
        created_at: created,
        started_at: None,
        completed_at: None,
        trace_parent: None,
    };
    (resource, task)
}

fn at(day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, day, 12, 0, 0).unwrap()
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(false).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(true).await })*
        }
    };
}

contract!(
    memorize_job_round_trip,
    one_job_per_user_at_a_time,
    failures_retry_then_fail,
    a_taken_over_claim_writes_nothing,
    retries_back_off_and_keep_the_users_order,
    search_ranks_filters_and_isolates_users,
    list_pages_and_filters,
    update_and_delete_items,
    erase_and_export_a_user,
    categories_are_private_per_user,
    embedding_space_is_checked,
    identical_items_are_found,
    int8_quantized_search_matches_exact,
);

/// With `quantization: int8` (SQLite: int8 codes in memory, rescored; pgvector: a halfvec HNSW
/// index) a search finds the exact top 10 and reports exact cosines, filters still apply, and
/// a row's update and deletion reach the quantized index.
async fn int8_quantized_search_matches_exact(pg: bool) {
    let mut config = WorkerConfig::default();
    config.vector.dimension = DIM;
    config.vector.quantization = Quantization::Int8;
    let (config, _db) = common::with_backend(config, pg).await;
    let store = store::open(&config, space()).await.unwrap();
    store.migrate().await.unwrap();
    let mut state = 99u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 10_000) as f32 / 10_000.0 - 0.5
    };
    let mut random_unit = || {
        let mut v: Vec<f32> = (0..DIM).map(|_| next()).collect();
        normalize(&mut v);
        v
    };
    let mut rows = Vec::new();
    for n in 0..300 {
        let memory_type = if n % 3 == 0 {
            MemoryType::Profile
        } else {
            MemoryType::Event
        };
        let i = item("q", "", memory_type, &format!("row {n}"), at(1));
        let embedding = random_unit();
        store
            .insert_item(&NewItem {
                item: i.clone(),
                embedding: embedding.clone(),
            })
            .await
            .unwrap();
        rows.push((i, embedding));
    }
    let exact_top = |rows: &[(MemoryItem, Vec<f32>)], q: &[f32], only: Option<MemoryType>| {
        let mut scored: Vec<(f32, Uuid)> = rows
            .iter()
            .filter(|(i, _)| only.is_none_or(|t| i.memory_type == t))
            .map(|(i, v)| (memu_worker::model::dot(v, q), i.id))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.truncate(10);
        scored
    };
    let mut found = 0;
    for _ in 0..20 {
        let q = random_unit();
        let truth = exact_top(&rows, &q, None);
        let got = store
            .search_items(u("q"), &q, &ItemFilter::default(), 10)
            .await
            .unwrap();
        assert_eq!(got.len(), 10);
        for hit in &got {
            let (_, v) = rows.iter().find(|(i, _)| i.id == hit.item.id).unwrap();
            let cosine = memu_worker::model::dot(v, &q);
            assert!(
                (hit.score - cosine).abs() < 1e-4,
                "score {} is not the exact cosine {cosine}",
                hit.score
            );
        }
        found += got
            .iter()
            .filter(|h| truth.iter().any(|(_, id)| *id == h.item.id))
            .count();
        let profiles = ItemFilter {
            memory_types: vec![MemoryType::Profile],
            ..Default::default()
        };
        let got = store.search_items(u("q"), &q, &profiles, 10).await.unwrap();
        assert!(
            got.iter()
                .all(|h| h.item.memory_type == MemoryType::Profile)
        );
    }
    let recall = found as f64 / 200.0;
    assert!(recall >= 0.95, "recall@10 {recall}");

    // The best match of a query equal to a row's vector is that row, until it is deleted.
    let (target, v) = rows[17].clone();
    assert_eq!(
        store
            .search_items(u("q"), &v, &ItemFilter::default(), 1)
            .await
            .unwrap()[0]
            .item
            .id,
        target.id
    );
    assert!(store.delete_item(u("q"), target.id).await.unwrap());
    let after = store
        .search_items(u("q"), &v, &ItemFilter::default(), 10)
        .await
        .unwrap();
    assert!(after.iter().all(|h| h.item.id != target.id));
}

async fn memorize_job_round_trip(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    store.check_ready().await.expect("ready after migrate");
    let (resource, task) = resource_and_task("alice", Utc::now());
    store
        .enqueue_memorize(&resource, &task, Some("Alice"), None)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_task("default", task.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        TaskStatus::Pending
    );

    let (claimed, claimed_resource) = store
        .claim_task("w1", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a task to claim");
    assert_eq!(claimed.id, task.id);
    assert_eq!(claimed.status, TaskStatus::Processing);
    assert_eq!(claimed.attempts, 1);
    assert_eq!(claimed_resource.content, resource.content);
    assert!(
        store
            .claim_task("w2", Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
    store
        .heartbeat_task(&task, "w1", Duration::from_secs(60))
        .await
        .unwrap();

    let scope = Scope::new(u("alice"), None);
    let categories = store
        .ensure_categories(
            &scope,
            &[(
                CategorySpec {
                    name: "places".into(),
                    description: "where".into(),
                },
                vector(3, 0.0),
            )],
        )
        .await
        .unwrap();
    let mut fact = item(
        "alice",
        "",
        MemoryType::Profile,
        "Alice lives in Oslo.",
        at(1),
    );
    fact.resource_id = Some(resource.id);
    let outcome = MemorizeOutcome {
        links: vec![CategoryLink {
            item_id: fact.id,
            category_id: categories[0].id,
            confidence: 0.9,
        }],
        category_updates: vec![CategoryUpdate {
            category_id: categories[0].id,
            summary: "- Alice lives in Oslo.".into(),
            embedding: vector(3, 1.0),
        }],
        items: vec![NewItem {
            item: fact.clone(),
            embedding: vector(1, 0.0),
        }],
        resource_caption: Some("caption".into()),
        revisions: Vec::new(),
    };
    store.complete_task(&claimed, outcome).await.unwrap();
    let done = store.get_task("default", task.id).await.unwrap().unwrap();
    assert_eq!(done.status, TaskStatus::Success);
    assert!(done.completed_at.is_some());

    let hits = store
        .search_items(u("alice"), &vector(1, 0.0), &ItemFilter::default(), 5)
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].item.summary, "Alice lives in Oslo.");
    assert!(hits[0].score > 0.99, "score {}", hits[0].score);
    let cats = store.list_categories(&scope).await.unwrap();
    assert_eq!(cats[0].summary, "- Alice lives in Oslo.");
    let members = store
        .category_items(u("alice"), categories[0].id, 10)
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
    let resources = store
        .get_resources(u("alice"), &[resource.id])
        .await
        .unwrap();
    assert_eq!(resources[0].caption.as_deref(), Some("caption"));
    assert!(
        store
            .claim_task("w1", Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
}

async fn one_job_per_user_at_a_time(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let (r1, t1) = resource_and_task("u1", at(1));
    let (r2, t2) = resource_and_task("u1", at(2));
    let (r3, t3) = resource_and_task("u2", at(3));
    for (r, t) in [(&r1, &t1), (&r2, &t2), (&r3, &t3)] {
        store.enqueue_memorize(r, t, None, None).await.unwrap();
    }
    let lease = Duration::from_secs(60);
    let first = store.claim_task("a", lease).await.unwrap().unwrap().0;
    assert_eq!(first.id, t1.id, "oldest first");
    // u1's second job waits for its first; u2's goes ahead.
    let second = store.claim_task("b", lease).await.unwrap().unwrap().0;
    assert_eq!(second.id, t3.id);
    assert!(store.claim_task("c", lease).await.unwrap().is_none());
    store
        .complete_task(&first, MemorizeOutcome::default())
        .await
        .unwrap();
    let third = store.claim_task("c", lease).await.unwrap().unwrap().0;
    assert_eq!(third.id, t2.id);
    // An expired lease makes the job claimable again, with the attempt counted.
    let (r4, t4) = resource_and_task("u3", at(4));
    store.enqueue_memorize(&r4, &t4, None, None).await.unwrap();
    let lost = store
        .claim_task("d", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(lost.id, t4.id);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = store.claim_task("e", lease).await.unwrap().unwrap().0;
    assert_eq!(again.id, t4.id);
    assert_eq!(again.attempts, 2);
}

async fn failures_retry_then_fail(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let (r, t) = resource_and_task("u", at(1));
    store.enqueue_memorize(&r, &t, None, None).await.unwrap();
    let lease = Duration::from_secs(60);
    let claimed = store.claim_task("w", lease).await.unwrap().unwrap().0;
    store
        .fail_task(&claimed, "provider down", true)
        .await
        .unwrap();
    let task = store.get_task("default", t.id).await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Pending);
    assert_eq!(task.error.as_deref(), Some("provider down"));
    let claimed = store.claim_task("w", lease).await.unwrap().unwrap().0;
    assert_eq!(claimed.attempts, 2);
    store.fail_task(&claimed, "bad input", false).await.unwrap();
    let task = store.get_task("default", t.id).await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Failed);
    assert!(task.completed_at.is_some());
    assert!(store.claim_task("w", lease).await.unwrap().is_none());
}

/// A failed job waits out its backoff, and the user's later jobs wait behind it (order kept),
/// while other users' jobs go ahead.
async fn retries_back_off_and_keep_the_users_order(pg: bool) {
    let (store, _config, _db) = open_with(pg, 300).await;
    let (r1, t1) = resource_and_task("u", at(1));
    let (r2, t2) = resource_and_task("u", at(2));
    let (r3, t3) = resource_and_task("other", at(3));
    for (r, t) in [(&r1, &t1), (&r2, &t2), (&r3, &t3)] {
        store.enqueue_memorize(r, t, None, None).await.unwrap();
    }
    let lease = Duration::from_secs(60);
    let first = store.claim_task("w", lease).await.unwrap().unwrap().0;
    assert_eq!(first.id, t1.id);
    store
        .fail_task(&first, "provider down", true)
        .await
        .unwrap();
    // u's first job backs off; u's second must not overtake it; the other user proceeds.
    let next = store.claim_task("w", lease).await.unwrap().unwrap().0;
    assert_eq!(next.id, t3.id);
    assert!(store.claim_task("w", lease).await.unwrap().is_none());
    let mut again = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some((t, _)) = store.claim_task("w", lease).await.unwrap() {
            again = Some(t);
            break;
        }
    }
    let again = again.expect("the backoff ends");
    assert_eq!(again.id, t1.id);
    assert_eq!(again.attempts, 2);
}

/// A worker whose lease expired and was taken over writes nothing: neither its results nor its
/// failure. Only the current claim completes, so a job's items exist once.
async fn a_taken_over_claim_writes_nothing(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let (r, t) = resource_and_task("u", at(1));
    store.enqueue_memorize(&r, &t, None, None).await.unwrap();
    let stale = store
        .claim_task("slow", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap()
        .0;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let current = store
        .claim_task("fast", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(current.id, stale.id);
    let outcome = |text: &str| {
        let mut fact = item("u", "", MemoryType::Profile, text, at(1));
        fact.resource_id = Some(r.id);
        MemorizeOutcome {
            items: vec![NewItem {
                item: fact,
                embedding: vector(1, 0.0),
            }],
            ..Default::default()
        }
    };
    store
        .fail_task(&stale, "late failure", false)
        .await
        .unwrap();
    store.complete_task(&stale, outcome("stale")).await.unwrap();
    assert_eq!(
        store
            .get_task("default", t.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        TaskStatus::Processing
    );
    store
        .complete_task(&current, outcome("current"))
        .await
        .unwrap();
    let task = store.get_task("default", t.id).await.unwrap().unwrap();
    assert_eq!(task.status, TaskStatus::Success);
    let page = store
        .list_items(u("u"), &ItemFilter::default(), 10, None)
        .await
        .unwrap();
    let texts: Vec<&str> = page.items.iter().map(|i| i.summary.as_str()).collect();
    assert_eq!(texts, ["current"]);
}

async fn search_ranks_filters_and_isolates_users(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let a = item("alice", "", MemoryType::Profile, "a-profile", at(1));
    let b = item("alice", "bot", MemoryType::Event, "a-event", at(5));
    let c = item("alice", "", MemoryType::Event, "a-event-2", at(9));
    let other = item("bob", "", MemoryType::Profile, "b-profile", at(1));
    for (i, e) in [
        (&a, vector(1, 0.0)),
        (&b, vector(1, 2.0)),
        (&c, vector(7, 0.0)),
        (&other, vector(1, 0.0)),
    ] {
        store
            .insert_item(&NewItem {
                item: i.clone(),
                embedding: e,
            })
            .await
            .unwrap();
    }
    let q = vector(1, 0.0);
    let hits = store
        .search_items(u("alice"), &q, &ItemFilter::default(), 10)
        .await
        .unwrap();
    let ids: Vec<Uuid> = hits.iter().map(|h| h.item.id).collect();
    assert_eq!(ids, vec![a.id, b.id, c.id], "ranked by cosine");
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(!ids.contains(&other.id), "another user's item leaked");

    let events = ItemFilter {
        memory_types: vec![MemoryType::Event],
        ..Default::default()
    };
    let ids: Vec<Uuid> = store
        .search_items(u("alice"), &q, &events, 10)
        .await
        .unwrap()
        .iter()
        .map(|h| h.item.id)
        .collect();
    assert_eq!(ids, vec![b.id, c.id]);
    let agent = ItemFilter {
        agent_id: Some("bot".into()),
        ..Default::default()
    };
    let ids: Vec<Uuid> = store
        .search_items(u("alice"), &q, &agent, 10)
        .await
        .unwrap()
        .iter()
        .map(|h| h.item.id)
        .collect();
    assert_eq!(ids, vec![b.id]);
    let window = ItemFilter {
        since: Some(at(4)),
        until: Some(at(9)),
        ..Default::default()
    };
    let ids: Vec<Uuid> = store
        .search_items(u("alice"), &q, &window, 10)
        .await
        .unwrap()
        .iter()
        .map(|h| h.item.id)
        .collect();
    assert_eq!(ids, vec![b.id]);
    assert_eq!(
        store
            .search_items(u("alice"), &q, &ItemFilter::default(), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .search_items(u("nobody"), &q, &ItemFilter::default(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let wrong = vec![0.0f32; DIM + 1];
    assert!(matches!(
        store
            .search_items(u("alice"), &wrong, &ItemFilter::default(), 3)
            .await,
        Err(StoreError::Invalid(_))
    ));
}

async fn list_pages_and_filters(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let mut ids = Vec::new();
    for day in 1..=7 {
        let t = if day % 2 == 0 {
            MemoryType::Event
        } else {
            MemoryType::Knowledge
        };
        let i = item("u", "", t, &format!("item {day}"), at(day));
        ids.push(i.id);
        store
            .insert_item(&NewItem {
                item: i,
                embedding: vector(day as usize, 0.0),
            })
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list_items(u("u"), &ItemFilter::default(), 3, cursor.as_deref())
            .await
            .unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|i| i.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, every item once");
    let events = ItemFilter {
        memory_types: vec![MemoryType::Event],
        ..Default::default()
    };
    let page = store.list_items(u("u"), &events, 50, None).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert!(
        page.items
            .iter()
            .all(|i| i.memory_type == MemoryType::Event)
    );
    assert!(matches!(
        store
            .list_items(u("u"), &ItemFilter::default(), 3, Some("garbage"))
            .await,
        Err(StoreError::Invalid(_))
    ));
}

async fn update_and_delete_items(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let i = item("u", "", MemoryType::Knowledge, "old text", at(1));
    store
        .insert_item(&NewItem {
            item: i.clone(),
            embedding: vector(2, 0.0),
        })
        .await
        .unwrap();
    // Warm any in-process index before the update, so the update must reach it.
    assert_eq!(
        store
            .search_items(u("u"), &vector(2, 0.0), &ItemFilter::default(), 1)
            .await
            .unwrap()[0]
            .item
            .id,
        i.id
    );
    let patch = ItemPatch {
        summary: Some("new text".into()),
        embedding: Some(vector(9, 0.0)),
        memory_type: Some(MemoryType::Skill),
        happened_at: Some(None),
        extra: Some(serde_json::json!({"edited": true})),
    };
    let updated = store
        .update_item(u("u"), i.id, &patch)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.summary, "new text");
    assert_eq!(updated.memory_type, MemoryType::Skill);
    assert_eq!(updated.happened_at, None);
    assert_eq!(updated.extra["edited"], true);
    let hit = &store
        .search_items(u("u"), &vector(9, 0.0), &ItemFilter::default(), 1)
        .await
        .unwrap()[0];
    assert_eq!(hit.item.id, i.id);
    assert!(hit.score > 0.99);
    let skills = ItemFilter {
        memory_types: vec![MemoryType::Skill],
        ..Default::default()
    };
    assert_eq!(
        store
            .search_items(u("u"), &vector(9, 0.0), &skills, 5)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .update_item(u("other"), i.id, &patch)
            .await
            .unwrap()
            .is_none(),
        "ids are scoped by user"
    );
    assert!(!store.delete_item(u("other"), i.id).await.unwrap());
    assert!(store.delete_item(u("u"), i.id).await.unwrap());
    assert!(store.get_item(u("u"), i.id).await.unwrap().is_none());
    assert!(
        store
            .search_items(u("u"), &vector(9, 0.0), &ItemFilter::default(), 5)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn erase_and_export_a_user(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let (r, t) = resource_and_task("gone", at(1));
    store.enqueue_memorize(&r, &t, None, None).await.unwrap();
    let claimed = store
        .claim_task("w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap()
        .0;
    let mut i = item("gone", "", MemoryType::Event, "to be erased", at(1));
    i.resource_id = Some(r.id);
    let cats = store
        .ensure_categories(
            &Scope::new(u("gone"), None),
            &[(
                CategorySpec {
                    name: "c".into(),
                    description: "d".into(),
                },
                vector(0, 0.0),
            )],
        )
        .await
        .unwrap();
    store
        .complete_task(
            &claimed,
            MemorizeOutcome {
                links: vec![CategoryLink {
                    item_id: i.id,
                    category_id: cats[0].id,
                    confidence: 1.0,
                }],
                items: vec![NewItem {
                    item: i.clone(),
                    embedding: vector(4, 0.0),
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let keep = item("kept", "", MemoryType::Event, "stays", at(1));
    store
        .insert_item(&NewItem {
            item: keep.clone(),
            embedding: vector(4, 0.0),
        })
        .await
        .unwrap();

    let export = store.export_user(u("gone")).await.unwrap();
    assert_eq!(export.memory_items.len(), 1);
    assert_eq!(export.memory_items[0]["summary"], "to be erased");
    assert_eq!(export.resources.len(), 1);
    assert_eq!(
        export.resources[0]["content"]["messages"][0]["content"],
        "I live in Oslo"
    );
    assert_eq!(export.categories.len(), 1);
    assert_eq!(export.category_items.len(), 1);
    assert_eq!(export.tasks.len(), 1);

    let counts = store.delete_user(u("gone"), None).await.unwrap();
    assert_eq!(
        (
            counts.memory_items,
            counts.categories,
            counts.resources,
            counts.tasks
        ),
        (1, 1, 1, 1)
    );
    assert!(store.get_task("default", t.id).await.unwrap().is_none());
    assert!(
        store
            .search_items(u("gone"), &vector(4, 0.0), &ItemFilter::default(), 5)
            .await
            .unwrap()
            .is_empty()
    );
    let export = store.export_user(u("gone")).await.unwrap();
    assert!(export.memory_items.is_empty() && export.resources.is_empty());
    assert_eq!(
        store
            .search_items(u("kept"), &vector(4, 0.0), &ItemFilter::default(), 5)
            .await
            .unwrap()
            .len(),
        1
    );

    // Erasing one agent keeps the user's other data.
    let mine = item("multi", "a1", MemoryType::Event, "agent one", at(1));
    let theirs = item("multi", "a2", MemoryType::Event, "agent two", at(1));
    for i in [&mine, &theirs] {
        store
            .insert_item(&NewItem {
                item: i.clone(),
                embedding: vector(5, 0.0),
            })
            .await
            .unwrap();
    }
    let counts = store.delete_user(u("multi"), Some("a1")).await.unwrap();
    assert_eq!(counts.memory_items, 1);
    let left = store
        .search_items(u("multi"), &vector(5, 0.0), &ItemFilter::default(), 5)
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|h| h.item.id).collect::<Vec<_>>(),
        vec![theirs.id]
    );
}

async fn categories_are_private_per_user(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let spec = (
        CategorySpec {
            name: "preferences".into(),
            description: "likes".into(),
        },
        vector(0, 0.0),
    );
    let a = store
        .ensure_categories(&Scope::new(u("a"), None), std::slice::from_ref(&spec))
        .await
        .unwrap();
    let b = store
        .ensure_categories(&Scope::new(u("b"), None), std::slice::from_ref(&spec))
        .await
        .unwrap();
    assert_ne!(a[0].id, b[0].id, "each user gets a private copy");
    // Creating again is idempotent.
    let again = store
        .ensure_categories(&Scope::new(u("a"), None), std::slice::from_ref(&spec))
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, a[0].id);
    let (r, t) = resource_and_task("a", at(1));
    store.enqueue_memorize(&r, &t, None, None).await.unwrap();
    let claimed = store
        .claim_task("w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap()
        .0;
    store
        .complete_task(
            &claimed,
            MemorizeOutcome {
                category_updates: vec![CategoryUpdate {
                    category_id: a[0].id,
                    summary: "a likes tea".into(),
                    embedding: vector(0, 1.0),
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .list_categories(&Scope::new(u("a"), None))
            .await
            .unwrap()[0]
            .summary,
        "a likes tea"
    );
    assert_eq!(
        store
            .list_categories(&Scope::new(u("b"), None))
            .await
            .unwrap()[0]
            .summary,
        ""
    );
    assert!(
        store
            .list_categories(&Scope::new(u("a"), Some("agent".into())))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn embedding_space_is_checked(pg: bool) {
    let (store, config, _db) = open(pg).await;
    drop(store);
    let mut other = config.clone();
    other.vector.dimension = DIM * 2;
    let reopened = store::open(
        &other,
        EmbeddingSpace {
            dimension: DIM * 2,
            model: "test/contract".into(),
        },
    )
    .await
    .unwrap();
    let err = reopened.migrate().await.unwrap_err();
    assert!(matches!(err, StoreError::Incompatible(_)), "{err}");
    assert!(err.to_string().contains("vector.dimension"), "{err}");
    let reopened = store::open(
        &config,
        EmbeddingSpace {
            dimension: DIM,
            model: "another/model".into(),
        },
    )
    .await
    .unwrap();
    let err = reopened.check_ready().await.unwrap_err();
    assert!(err.to_string().contains("another/model"), "{err}");
}

async fn identical_items_are_found(pg: bool) {
    let (store, _config, _db) = open(pg).await;
    let i = item("u", "", MemoryType::Profile, "The user likes tea.", at(1));
    store
        .insert_item(&NewItem {
            item: i.clone(),
            embedding: vector(1, 0.0),
        })
        .await
        .unwrap();
    let scope = Scope::new(u("u"), None);
    assert_eq!(
        store
            .find_identical_item(&scope, MemoryType::Profile, "The user likes tea.")
            .await
            .unwrap(),
        Some(i.id)
    );
    assert_eq!(
        store
            .find_identical_item(&scope, MemoryType::Event, "The user likes tea.")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .find_identical_item(
                &Scope::new(u("v"), None),
                MemoryType::Profile,
                "The user likes tea."
            )
            .await
            .unwrap(),
        None
    );
}

/// Stores that are not migrated are not ready, with a message saying what to run.
#[tokio::test]
async fn unmigrated_store_is_not_ready() {
    for pg in [false, true] {
        let mut config = WorkerConfig::default();
        config.vector.dimension = DIM;
        let (config, _db) = common::with_backend(config, pg).await;
        let store = store::open(&config, space()).await.unwrap();
        let err = store.check_ready().await.unwrap_err();
        assert!(err.to_string().contains("memu-worker migrate"), "{err}");
    }
}

/// pgvector's HNSW index serves per-user searches, and with iterative scans one user's top 10
/// among many users' rows matches exact search.
#[tokio::test]
async fn postgres_hnsw_is_used_and_keeps_recall_for_one_user_among_many() {
    postgres_hnsw_recall(Quantization::None).await;
}

/// The same with `quantization: int8`, which pgvector serves from a `halfvec` index; switching
/// back rebuilds the exact index and drops the halfvec one.
#[tokio::test]
async fn postgres_halfvec_hnsw_is_used_and_keeps_recall() {
    postgres_hnsw_recall(Quantization::Int8).await;
}

async fn postgres_hnsw_recall(quantization: Quantization) {
    use sqlx::Connection;
    let (index, other) = match quantization {
        Quantization::None => ("idx_memory_embedding", "idx_memory_embedding_halfvec"),
        Quantization::Int8 => ("idx_memory_embedding_halfvec", "idx_memory_embedding"),
    };
    let mut config = WorkerConfig::default();
    config.vector.dimension = DIM;
    config.vector.hnsw_ef_construction = 64;
    config.vector.quantization = quantization;
    let (config, backend) = common::with_backend(config, true).await;
    let common::Backend::Postgres(dsn) = backend else {
        unreachable!()
    };
    let pg = store::postgres::PgStore::open(&config, space())
        .await
        .unwrap();
    pg.migrate().await.unwrap();
    // 40 users x 1,000 random unit vectors, generated inside Postgres (seeded, so repeatable).
    let mut conn = sqlx::PgConnection::connect(&dsn).await.unwrap();
    // Bulk-load without the index, then let migrate() build it once (much faster than per row).
    for sql in [
        format!("DROP INDEX {index}").as_str(),
        "SELECT setseed(0.42)",
        "INSERT INTO users (tenant_id, user_id) SELECT 'default', 'user' || u FROM generate_series(0, 39) u",
        "INSERT INTO memory_items (tenant_id, user_id, id, memory_type, summary, embedding) \
         SELECT 'default', 'user' || (g % 40), gen_random_uuid(), 'event', 'row ' || g, \
                l2_normalize(ARRAY(SELECT random() - 0.5 FROM generate_series(1, 16) WHERE g > 0)::vector) \
         FROM generate_series(1, 40000) g",
        "ANALYZE memory_items",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    pg.migrate().await.unwrap();
    sqlx::query("ANALYZE memory_items")
        .execute(&mut conn)
        .await
        .unwrap();
    let mine: Vec<(Uuid, Vec<f32>)> = sqlx::query_as::<_, (Uuid, Vec<f32>)>(
        "SELECT id, embedding::real[] FROM memory_items WHERE user_id = 'user7'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(mine.len(), 1000);

    let plan = pg.explain_search(u("user7"), &mine[0].1, 10).await.unwrap();
    assert!(
        plan.contains(&format!("Index Scan using {index} ")),
        "HNSW index not used:\n{plan}"
    );

    let mut state = 7u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 10_000) as f32 / 10_000.0 - 0.5
    };
    let queries = 20;
    let mut recall_sum = 0.0;
    for _ in 0..queries {
        let mut q: Vec<f32> = (0..DIM).map(|_| next()).collect();
        normalize(&mut q);
        let mut exact: Vec<(f32, Uuid)> = mine
            .iter()
            .map(|(id, v)| (memu_worker::model::dot(v, &q), *id))
            .collect();
        exact.sort_by(|a, b| b.0.total_cmp(&a.0));
        let truth: HashSet<Uuid> = exact.iter().take(10).map(|(_, id)| *id).collect();
        let got = pg
            .search_items(u("user7"), &q, &ItemFilter::default(), 10)
            .await
            .unwrap();
        assert_eq!(got.len(), 10, "the filtered scan returned too few rows");
        assert!(got.iter().all(|h| h.item.user_id == "user7"));
        recall_sum += got.iter().filter(|h| truth.contains(&h.item.id)).count() as f64 / 10.0;
    }
    let recall = recall_sum / queries as f64;
    println!("recall@10 of user7 among 40 users ({quantization:?}): {recall:.3}");
    assert!(recall >= 0.9, "recall@10 {recall}");

    // Changing the precision is a migration: the new index is built, the old one dropped.
    let mut switched = config.clone();
    switched.vector.quantization = match quantization {
        Quantization::None => Quantization::Int8,
        Quantization::Int8 => Quantization::None,
    };
    let pg = store::postgres::PgStore::open(&switched, space())
        .await
        .unwrap();
    pg.migrate().await.unwrap();
    let indexes: Vec<(String,)> =
        sqlx::query_as("SELECT indexname::text FROM pg_indexes WHERE tablename = 'memory_items' AND indexname LIKE 'idx_memory_embedding%'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(indexes, vec![(other.to_string(),)]);
    let plan = pg.explain_search(u("user7"), &mine[0].1, 10).await.unwrap();
    assert!(
        plan.contains(&format!("Index Scan using {other} ")),
        "{plan}"
    );
}

/// With a read DSN configured, searches and listings go through a second pool (here pointed at
/// the same server, which stands for a streaming replica) while writes use the primary.
#[tokio::test]
async fn postgres_read_replica_pool_serves_reads() {
    let mut config = WorkerConfig::default();
    config.vector.dimension = DIM;
    let (mut config, backend) = common::with_backend(config, true).await;
    let common::Backend::Postgres(dsn) = backend else {
        unreachable!()
    };
    let var = format!("MEMU_TEST_READ_DSN_{}", Uuid::new_v4().simple());
    // SAFETY: a variable name of this test only.
    unsafe { std::env::set_var(&var, &dsn) };
    config.database.read_url_env = var;
    let store = store::open(&config, space()).await.unwrap();
    store.migrate().await.unwrap();
    let pools: Vec<&str> = store.pool_stats().iter().map(|p| p.pool).collect();
    assert_eq!(pools, vec!["primary", "replica"]);
    let i = item("r", "", MemoryType::Event, "read me", at(1));
    store
        .insert_item(&NewItem {
            item: i.clone(),
            embedding: vector(3, 0.0),
        })
        .await
        .unwrap();
    let hits = store
        .search_items(u("r"), &vector(3, 0.0), &ItemFilter::default(), 1)
        .await
        .unwrap();
    assert_eq!(hits[0].item.id, i.id);
    assert_eq!(
        store
            .list_items(u("r"), &ItemFilter::default(), 5, None)
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    store.check_ready().await.unwrap();
}
