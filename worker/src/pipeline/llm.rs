//! Memorize with an LLM, in as few round trips as the work allows:
//!
//! 1. one extraction call per segment (caption + items of every configured type at once;
//!    memU makes one call per memory type and another per segment caption);
//! 2. one batched embedding request for the new items;
//! 3. one dedupe call for all new items that have near neighbours among the user's memories
//!    (duplicate / update / contradiction; memU stores every repeat);
//! 4. one call that files the items into the user's own categories and rewrites the touched
//!    summaries (memU makes one call per category and shares categories across users);
//! 5. one batched embedding request for rewritten items and summaries.
//!
//! A ten-turn conversation fits one segment: at most three chat calls.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::llm::LlmSession;
use crate::model::{
    Category, CategoryLink, ItemFilter, MemorizeOutcome, MemoryItem, MemoryType, Message, Modality,
    NewItem, Resource, Scope, Task,
};
use crate::pipeline::{assign_categories, category_anchors, offline};
use crate::prompts::{self, PROMPT_VERSION};
use crate::service::{MemoryService, ServiceError};

#[derive(Debug, Deserialize)]
struct Extraction {
    #[serde(default)]
    caption: String,
    #[serde(default)]
    items: Vec<ExtractedItem>,
}

#[derive(Debug, Deserialize)]
struct ExtractedItem {
    memory_type: String,
    summary: String,
    #[serde(default)]
    happened_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Resolution {
    #[serde(default)]
    decisions: Vec<Decision>,
}

#[derive(Debug, Deserialize)]
struct Decision {
    new: usize,
    action: String,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    merged: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Filing {
    #[serde(default)]
    assignments: Vec<Assignment>,
    #[serde(default)]
    summaries: Vec<SummaryRewrite>,
}

#[derive(Debug, Deserialize)]
struct Assignment {
    item: usize,
    #[serde(default)]
    categories: Vec<Membership>,
}

#[derive(Debug, Deserialize)]
struct Membership {
    name: String,
    #[serde(default = "full_confidence")]
    confidence: f32,
}

fn full_confidence() -> f32 {
    1.0
}

#[derive(Debug, Deserialize)]
struct SummaryRewrite {
    category: String,
    summary: String,
}

/// The text of a resource in segments of at most `max_tokens`, each with its first message's
/// time (documents are split on paragraphs).
pub fn transcript_segments(
    resource: &Resource,
    max_tokens: usize,
) -> Vec<(String, Option<DateTime<Utc>>)> {
    let messages: Vec<Message> = match resource.modality {
        Modality::Conversation => resource.messages(),
        Modality::Document => super::document_messages(resource),
    };
    offline::segment(&messages, max_tokens)
        .into_iter()
        .map(|s| {
            let at = s.messages.iter().find_map(|m| m.created_at);
            let text = s
                .messages
                .iter()
                .map(|m| {
                    let who = match &m.name {
                        Some(name) => format!("{} ({name})", m.role),
                        None => m.role.clone(),
                    };
                    match m.created_at {
                        Some(t) => format!("[{}] {who}: {}", t.to_rfc3339(), m.content.trim()),
                        None => format!("{who}: {}", m.content.trim()),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            (text, at)
        })
        .collect()
}

/// A date or date-time as the model wrote it.
fn parse_when(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        })
}

fn normalized(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// One job with the configured LLMs; every call lands in `session` (also when the job fails).
pub async fn memorize(
    service: &MemoryService,
    task: &Task,
    resource: &Resource,
    session: &mut LlmSession<'_>,
) -> Result<MemorizeOutcome, ServiceError> {
    let config = &service.config.memory;
    let extraction = service
        .llm
        .extraction
        .clone()
        .expect("memorize with an LLM needs an extraction model");
    let categorization = service
        .llm
        .categorization
        .clone()
        .unwrap_or_else(|| extraction.clone());
    let scope = Scope::new(task.user(), Some(task.agent_id.clone()));
    let overrides = resource.overrides();
    let memory_types = overrides.memory_types(&config.memory_types);
    let subject = resource
        .user_name()
        .unwrap_or_else(|| "the user".to_string());
    let session_date = resource.session_date().map(|d| d.to_rfc3339());
    let default_time = resource.session_date().or(Some(resource.created_at));

    // 1. Extraction, one call per segment.
    let segments = transcript_segments(resource, config.extraction_segment_max_tokens);
    let mut captions = Vec::new();
    let mut drafts: Vec<(MemoryType, String, Option<DateTime<Utc>>, usize)> = Vec::new();
    for (i, (transcript, at)) in segments.iter().enumerate() {
        let prompt = prompts::extract(
            &subject,
            memory_types,
            transcript,
            i + 1,
            segments.len(),
            session_date.as_deref(),
        );
        let answer: Extraction = session.ask(extraction.as_ref(), &prompt).await?;
        if !answer.caption.trim().is_empty() {
            captions.push(answer.caption.trim().to_string());
        }
        for item in answer.items {
            let Some(memory_type) =
                MemoryType::parse(item.memory_type.trim()).filter(|t| memory_types.contains(t))
            else {
                tracing::warn!(memory_type = %item.memory_type, "dropping an item of a type not configured");
                continue;
            };
            let summary = item.summary.trim().to_string();
            if summary.is_empty() {
                continue;
            }
            let when = item
                .happened_at
                .as_deref()
                .and_then(parse_when)
                .or(*at)
                .or(default_time);
            drafts.push((memory_type, summary, when, i));
        }
    }

    // Exact repeats, within the job and against what the user has, cost nothing to drop.
    let mut seen = HashSet::new();
    let mut fresh = Vec::new();
    for draft in drafts {
        if !seen.insert((draft.0, normalized(&draft.1))) {
            continue;
        }
        if service
            .store
            .find_identical_item(&scope, draft.0, &draft.1)
            .await?
            .is_none()
        {
            fresh.push(draft);
        }
    }

    // 2. One batched embedding request for every new item.
    let texts: Vec<String> = fresh.iter().map(|d| d.1.clone()).collect();
    let vectors = service
        .embedder
        .embed(&texts)
        .instrument(tracing::info_span!("embed items", items = texts.len()))
        .await?;
    let now = Utc::now();
    let items: Vec<NewItem> = fresh
        .into_iter()
        .zip(vectors)
        .map(
            |((memory_type, summary, happened_at, segment), embedding)| NewItem {
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
                    extra: json!({
                        "extractor": "llm",
                        "model": extraction.model(),
                        "prompt_version": PROMPT_VERSION,
                        "segment": segment,
                    }),
                },
                embedding,
            },
        )
        .collect();

    // 3. Dedupe against the nearest existing items of the same type.
    let mut revisions: BTreeMap<Uuid, NewItem> = BTreeMap::new();
    let mut reembed: HashSet<Uuid> = HashSet::new();
    let mut cases: Vec<(usize, Vec<MemoryItem>)> = Vec::new();
    for (i, new) in items.iter().enumerate() {
        let filter = ItemFilter {
            agent_id: Some(scope.agent_id.clone()),
            memory_types: vec![new.item.memory_type],
            ..Default::default()
        };
        let near: Vec<MemoryItem> = service
            .store
            .search_items(
                scope.user(),
                &new.embedding,
                &filter,
                config.dedupe_candidates,
            )
            .await?
            .into_iter()
            .filter(|s| s.score >= config.dedupe_similarity)
            .map(|s| s.item)
            .collect();
        if !near.is_empty() {
            cases.push((i, near));
        }
    }
    let mut dropped: HashSet<usize> = HashSet::new();
    if !cases.is_empty() {
        // Short labels instead of UUIDs: models copy `e3` reliably.
        let mut labels: HashMap<String, MemoryItem> = HashMap::new();
        let mut prompt_cases = Vec::new();
        for (i, near) in &cases {
            let mut shown = Vec::new();
            for existing in near {
                let label = format!("e{}", labels.len() + 1);
                shown.push((label.clone(), existing.summary.clone()));
                labels.insert(label, existing.clone());
            }
            prompt_cases.push((items[*i].item.summary.clone(), shown));
        }
        let answer: Resolution = session
            .ask(extraction.as_ref(), &prompts::resolve(&prompt_cases))
            .await?;
        for decision in answer.decisions {
            let Some((index, _)) = cases.get(decision.new) else {
                continue;
            };
            let new = &items[*index];
            let Some(target) = decision
                .target
                .as_deref()
                .and_then(|t| labels.get(t.trim()))
            else {
                continue;
            };
            let action = decision.action.trim();
            if !matches!(action, "duplicate" | "update" | "contradiction") {
                continue;
            }
            dropped.insert(*index);
            if action == "duplicate" {
                continue;
            }
            // Later decisions about the same item build on the earlier revision.
            let current = revisions.remove(&target.id).unwrap_or_else(|| NewItem {
                item: target.clone(),
                embedding: Vec::new(),
            });
            let text = match (action, decision.merged.as_deref().map(str::trim)) {
                ("update", Some(merged)) if !merged.is_empty() => merged.to_string(),
                _ => new.item.summary.clone(),
            };
            let mut revised = current.item.clone();
            let mut extra = revised.extra.clone();
            if !extra.is_object() {
                extra = json!({});
            }
            let mut history = extra
                .get("history")
                .and_then(|h| h.as_array().cloned())
                .unwrap_or_default();
            history.push(json!({
                "summary": revised.summary,
                "replaced_at": now,
                "reason": action,
                "resource_id": resource.id,
            }));
            extra["history"] = json!(history);
            extra["prompt_version"] = json!(PROMPT_VERSION);
            revised.summary = text;
            revised.extra = extra;
            revised.updated_at = now;
            if action == "contradiction" {
                revised.happened_at = new.item.happened_at.or(revised.happened_at);
            }
            let embedding = if revised.summary == new.item.summary {
                reembed.remove(&revised.id);
                new.embedding.clone()
            } else {
                reembed.insert(revised.id);
                Vec::new()
            };
            revisions.insert(
                revised.id,
                NewItem {
                    item: revised,
                    embedding,
                },
            );
        }
    }
    let items: Vec<NewItem> = items
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(_, n)| n)
        .collect();

    // 4. File the items into the user's own categories and rewrite the touched summaries.
    let categories = service.job_categories(&scope, &overrides).await?;
    let filed: Vec<&MemoryItem> = items
        .iter()
        .map(|n| &n.item)
        .chain(revisions.values().map(|n| &n.item))
        .collect();
    let mut links = Vec::new();
    let mut new_summaries: Vec<(Uuid, String)> = Vec::new();
    if !filed.is_empty() {
        let listed: Vec<(String, String, String)> = categories
            .iter()
            .map(|c| (c.name.clone(), c.description.clone(), c.summary.clone()))
            .collect();
        let shown: Vec<(MemoryType, String)> = filed
            .iter()
            .map(|i| (i.memory_type, i.summary.clone()))
            .collect();
        let answer: Filing = session
            .ask(
                categorization.as_ref(),
                &prompts::categorize(&subject, &listed, &shown),
            )
            .await?;
        let by_name: HashMap<&str, &Category> =
            categories.iter().map(|c| (c.name.as_str(), c)).collect();
        let mut filed_ok: HashSet<usize> = HashSet::new();
        let mut touched: HashSet<Uuid> = HashSet::new();
        for assignment in &answer.assignments {
            let Some(item) = filed.get(assignment.item) else {
                continue;
            };
            for m in &assignment.categories {
                if let Some(c) = by_name.get(m.name.trim()) {
                    links.push(CategoryLink {
                        item_id: item.id,
                        category_id: c.id,
                        confidence: m.confidence.clamp(0.0, 1.0),
                    });
                    touched.insert(c.id);
                    filed_ok.insert(assignment.item);
                }
            }
        }
        // Items the model left out still land somewhere: their nearest category.
        let missing: Vec<NewItem> = items
            .iter()
            .enumerate()
            .filter(|(i, _)| !filed_ok.contains(i))
            .map(|(_, n)| n.clone())
            .collect();
        if !missing.is_empty() {
            let anchors = category_anchors(service, &categories).await?;
            for link in assign_categories(&missing, &anchors, f32::INFINITY) {
                links.push(link);
            }
        }
        for rewrite in answer.summaries {
            if let Some(c) = by_name.get(rewrite.category.trim())
                && !rewrite.summary.trim().is_empty()
                && !new_summaries.iter().any(|(id, _)| *id == c.id)
            {
                new_summaries.push((c.id, rewrite.summary.trim().to_string()));
            }
        }
    }

    // 5. One batched embedding request for rewritten items and summaries.
    let mut texts: Vec<String> = revisions
        .values()
        .filter(|n| reembed.contains(&n.item.id))
        .map(|n| n.item.summary.clone())
        .collect();
    let summary_texts = super::summary_texts(&categories, &new_summaries);
    texts.extend(summary_texts);
    let mut vectors = service.embedder.embed(&texts).await?.into_iter();
    for revision in revisions.values_mut() {
        if reembed.contains(&revision.item.id) {
            revision.embedding = vectors.next().expect("one vector per text");
        }
    }
    let category_updates = super::category_updates(new_summaries, vectors);

    Ok(MemorizeOutcome {
        items,
        revisions: revisions.into_values().collect(),
        links,
        category_updates,
        resource_caption: (!captions.is_empty()).then(|| captions.join(" ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_date_times_are_read() {
        assert_eq!(
            parse_when("2024-05-03").unwrap().to_rfc3339(),
            "2024-05-03T00:00:00+00:00"
        );
        assert_eq!(
            parse_when("2024-05-03T10:30:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2024-05-03T08:30:00+00:00"
        );
        assert!(parse_when("last spring").is_none());
    }

    #[test]
    fn repeats_compare_without_case_and_spacing() {
        assert_eq!(
            normalized("Maria  lives in\nLisbon"),
            normalized("maria lives in lisbon")
        );
    }
}
