//! The memorize pipeline: claims queued jobs, extracts memory items, embeds them in batches,
//! files them into the user's own categories, rewrites the touched category summaries, and
//! writes everything together with the job's completion in one transaction.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::metrics::StatusLabels;
use crate::model::{
    Category, CategoryLink, CategoryUpdate, MemorizeOutcome, MemoryItem, MemoryType, Modality,
    NewItem, Resource, Scope, Task, dot,
};
use crate::service::{MemoryService, ServiceError};

pub mod llm;
pub mod offline;

/// Runs `concurrency` job loops until `shutdown` turns true; a loop finishes its current job
/// first, so SIGTERM never leaves a job half-applied.
pub async fn run(service: Arc<MemoryService>, mut shutdown: watch::Receiver<bool>) {
    let pipeline = service.config.pipeline.clone();
    let worker_id = format!("{}-{}", hostname(), Uuid::new_v4().simple());
    tracing::info!(%worker_id, concurrency = pipeline.concurrency, "pipeline started");
    let mut loops = tokio::task::JoinSet::new();
    for slot in 0..pipeline.concurrency {
        let service = service.clone();
        let mut shutdown = shutdown.clone();
        let worker_id = format!("{worker_id}/{slot}");
        loops.spawn(async move {
            let idle = Duration::from_millis(pipeline.poll_interval_ms);
            while !*shutdown.borrow() {
                match process_next(&service, &worker_id).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot claim a memorize job"),
                }
                tokio::select! {
                    _ = service.new_work.notified() => {}
                    _ = tokio::time::sleep(idle) => {}
                    _ = shutdown.changed() => {}
                }
            }
        });
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    while loops.join_next().await.is_some() {}
    tracing::info!("pipeline stopped");
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "memu".into())
}

/// Claims and processes one job; false when there was none.
pub async fn process_next(service: &MemoryService, worker_id: &str) -> Result<bool, ServiceError> {
    let lease = Duration::from_secs(service.config.pipeline.lease_secs);
    let Some((task, resource)) = service.store.claim_task(worker_id, lease).await? else {
        return Ok(false);
    };
    // One span per attempt, in the trace of the request that queued the job.
    let span = tracing::info_span!(
        "memorize job",
        otel.kind = "consumer",
        task_id = %task.id,
        attempt = task.attempts,
    );
    crate::telemetry::continue_from_trace_parent(&span, task.trace_parent.as_deref());
    run_claimed(service, worker_id, lease, task, resource)
        .instrument(span)
        .await?;
    Ok(true)
}

/// Runs a claimed job to its end: completed, failed for good, or released for a retry.
async fn run_claimed(
    service: &MemoryService,
    worker_id: &str,
    lease: Duration,
    task: Task,
    resource: Resource,
) -> Result<(), ServiceError> {
    let max_attempts = service.config.pipeline.max_attempts;
    if task.attempts > max_attempts {
        service
            .store
            .fail_task(
                &task,
                &format!("gave up after {max_attempts} attempts"),
                false,
            )
            .await?;
        count(service, "FAILED");
        return Ok(());
    }
    let started = Instant::now();
    // Keep the lease while the job runs, so another worker never takes it over.
    let heartbeat = {
        let store = service.store.clone();
        let (held, worker) = (task.clone(), worker_id.to_string());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = store.heartbeat_task(&held, &worker, lease).await {
                    tracing::warn!(error = %e, task_id = %held.id, "lease heartbeat failed");
                }
            }
        })
    };
    let mut session = crate::llm::LlmSession::new(
        &service.metrics,
        &service.config.llm.prices,
        task.user(),
        Some(task.id),
        "memorize",
    );
    let budget = Duration::from_secs(service.config.pipeline.job_timeout_secs);
    let job = async {
        if service.llm.extraction.is_some() {
            llm::memorize(service, &task, &resource, &mut session).await
        } else {
            memorize_offline(service, &task, &resource).await
        }
    };
    let result = match tokio::time::timeout(budget, job).await.unwrap_or_else(|_| {
        Err(ServiceError::Budget(format!(
            "the job did not finish within pipeline.job_timeout_secs ({}s)",
            budget.as_secs()
        )))
    }) {
        Ok(outcome) => {
            let written = outcome.items.len() as u64;
            let stored = service.store.complete_task(&task, outcome).await;
            if stored.is_ok() {
                service.metrics.memory_items_written.inc_by(written);
                service.invalidate(task.user()).await;
            }
            stored.map_err(ServiceError::from)
        }
        Err(e) => Err(e),
    };
    heartbeat.abort();
    // The cost log keeps every call, also those of a failed attempt.
    if !session.calls.is_empty()
        && let Err(e) = service.store.record_llm_usage(&session.calls).await
    {
        tracing::warn!(error = %e, task_id = %task.id, "cannot write the LLM cost log");
    }
    service
        .metrics
        .memorize_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            tracing::info!(task_id = %task.id, user_id = %task.user_id, "memorize job succeeded");
            count(service, "SUCCESS");
        }
        Err(e) => {
            let retry = retryable(&e) && task.attempts < max_attempts;
            tracing::warn!(task_id = %task.id, attempt = task.attempts, retry, error = %e, "memorize job failed");
            service
                .store
                .fail_task(&task, &e.to_string(), retry)
                .await?;
            if !retry {
                count(service, "FAILED");
            }
        }
    }
    Ok(())
}

fn count(service: &MemoryService, status: &str) {
    service
        .metrics
        .memorize_tasks
        .get_or_create(&StatusLabels {
            status: status.to_string(),
        })
        .inc();
}

fn retryable(e: &ServiceError) -> bool {
    match e {
        ServiceError::Provider(p) => p.is_retryable(),
        ServiceError::Store(_) | ServiceError::Budget(_) => true,
        _ => false,
    }
}

/// Extracts items without an LLM (see [`offline`]), embeds them in one batch, assigns them to
/// the user's categories and rewrites those categories' summaries.
pub async fn memorize_offline(
    service: &MemoryService,
    task: &Task,
    resource: &Resource,
) -> Result<MemorizeOutcome, ServiceError> {
    let config = &service.config.memory;
    let overrides = resource.overrides();
    let memory_types = overrides.memory_types(&config.memory_types);
    let scope = Scope::new(task.user(), Some(task.agent_id.clone()));
    let document = resource.modality == Modality::Document;
    let messages = if document {
        document_messages(resource)
    } else {
        resource.messages()
    };
    let happened_at = messages
        .iter()
        .find_map(|m| m.created_at)
        .or(resource.session_date())
        .or(Some(resource.created_at));
    let subject = resource
        .user_name()
        .unwrap_or_else(|| "The user".to_string());

    let mut drafts: Vec<(MemoryType, String, serde_json::Value)> = Vec::new();
    if memory_types.contains(&MemoryType::Profile) && !document {
        for statement in offline::profile_statements(&messages, &subject) {
            drafts.push((
                MemoryType::Profile,
                statement,
                serde_json::json!({"extractor": "rules"}),
            ));
        }
    }
    // A document's passages are knowledge where that type is kept; a conversation's are events.
    let passage_type = if document && memory_types.contains(&MemoryType::Knowledge) {
        Some(MemoryType::Knowledge)
    } else {
        memory_types
            .contains(&MemoryType::Event)
            .then_some(MemoryType::Event)
    };
    if let Some(passage_type) = passage_type {
        for segment in offline::segment(&messages, config.segment_max_tokens) {
            drafts.push((
                passage_type,
                segment.text(),
                serde_json::json!({"extractor": "segment", "first_message": segment.first, "messages": segment.messages.len()}),
            ));
        }
    }
    // Identical memories are stored once per user.
    let mut seen = HashSet::new();
    let mut fresh = Vec::new();
    for (memory_type, summary, extra) in drafts {
        if !seen.insert((memory_type, summary.clone())) {
            continue;
        }
        if service
            .store
            .find_identical_item(&scope, memory_type, &summary)
            .await?
            .is_none()
        {
            fresh.push((memory_type, summary, extra));
        }
    }

    let categories = service.job_categories(&scope, &overrides).await?;
    let texts: Vec<String> = fresh.iter().map(|(_, s, _)| s.clone()).collect();
    let vectors = service
        .embedder
        .embed(&texts)
        .instrument(tracing::info_span!("embed items", items = texts.len()))
        .await?;
    let now = Utc::now();
    let items: Vec<NewItem> = fresh
        .into_iter()
        .zip(vectors)
        .map(|((memory_type, summary, extra), embedding)| NewItem {
            item: MemoryItem {
                id: Uuid::now_v7(),
                tenant_id: scope.tenant_id.clone(),
                user_id: scope.user_id.clone(),
                agent_id: scope.agent_id.clone(),
                resource_id: Some(resource.id),
                memory_type,
                summary,
                happened_at,
                created_at: now,
                updated_at: now,
                extra,
            },
            embedding,
        })
        .collect();

    let anchors = category_anchors(service, &categories).await?;
    let links = assign_categories(&items, &anchors, config.category_min_similarity);

    // New summaries of the touched categories: their newest items, the new ones first.
    let mut touched: BTreeMap<Uuid, Vec<&MemoryItem>> = BTreeMap::new();
    for link in &links {
        if let Some(new) = items.iter().find(|n| n.item.id == link.item_id) {
            touched.entry(link.category_id).or_default().push(&new.item);
        }
    }
    let mut summaries = Vec::new();
    for (category_id, new_items) in &touched {
        let older = service
            .store
            .category_items(scope.user(), *category_id, config.category_summary_items)
            .await?;
        let lines: Vec<String> = new_items
            .iter()
            .map(|i| i.summary.clone())
            .chain(older.into_iter().map(|i| i.summary))
            .take(config.category_summary_items)
            .map(|s| format!("- {}", s.replace('\n', " / ")))
            .collect();
        summaries.push((*category_id, lines.join("\n")));
    }
    let summary_texts = summary_texts(&categories, &summaries);
    let summary_vectors = service.embedder.embed(&summary_texts).await?;
    let category_updates = category_updates(summaries, summary_vectors);

    Ok(MemorizeOutcome {
        items,
        links,
        category_updates,
        resource_caption: resource
            .caption
            .clone()
            .or_else(|| Some(offline::caption(&messages))),
        ..Default::default()
    })
}

/// What a category summary is embedded as: the category's name and description, then the
/// summary, so a query about the topic finds the category even when the summary is terse.
pub fn summary_texts(categories: &[Category], summaries: &[(Uuid, String)]) -> Vec<String> {
    summaries
        .iter()
        .map(|(id, summary)| {
            let c = categories
                .iter()
                .find(|c| c.id == *id)
                .expect("summaries name the scope's categories");
            format!(
                "{}: {}\n{}",
                c.name.replace('_', " "),
                c.description,
                summary
            )
        })
        .collect()
}

/// Rewritten summaries with their embeddings, in order.
pub fn category_updates(
    summaries: Vec<(Uuid, String)>,
    vectors: impl IntoIterator<Item = Vec<f32>>,
) -> Vec<CategoryUpdate> {
    summaries
        .into_iter()
        .zip(vectors)
        .map(|((category_id, summary), embedding)| CategoryUpdate {
            category_id,
            summary,
            embedding,
        })
        .collect()
}

/// A document's paragraphs as messages, so documents segment like conversations.
pub fn document_messages(resource: &Resource) -> Vec<crate::model::Message> {
    resource
        .document_text()
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(|p| crate::model::Message {
            role: "document".into(),
            content: p.trim().to_string(),
            name: None,
            created_at: None,
        })
        .collect()
}

/// What each category is compared with when filing by similarity: the embedding of its
/// configured description (stable, unlike its summary), else its stored embedding.
pub async fn category_anchors(
    service: &MemoryService,
    categories: &[Category],
) -> Result<Vec<(Uuid, Vec<f32>)>, ServiceError> {
    let specs = &service.config.memory.categories;
    let spec_vectors = service.category_spec_vectors().await?;
    Ok(categories
        .iter()
        .map(|c| {
            let v = specs
                .iter()
                .position(|s| s.name == c.name)
                .map(|i| spec_vectors[i].clone())
                .unwrap_or_else(|| c.embedding.clone());
            (c.id, v)
        })
        .collect())
}

/// Each item joins its most similar category, and every other one at or above `min_similarity`.
pub fn assign_categories(
    items: &[NewItem],
    anchors: &[(Uuid, Vec<f32>)],
    min_similarity: f32,
) -> Vec<CategoryLink> {
    let mut links = Vec::new();
    for new in items {
        let mut scored: Vec<(Uuid, f32)> = anchors
            .iter()
            .map(|(id, v)| (*id, dot(&new.embedding, v)))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (rank, (category_id, score)) in scored.into_iter().enumerate() {
            if rank == 0 || score >= min_similarity {
                links.push(CategoryLink {
                    item_id: new.item.id,
                    category_id,
                    confidence: score.clamp(0.0, 1.0),
                });
            }
        }
    }
    links
}
