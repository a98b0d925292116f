//! Retrieval beyond plain vector search: rank fusion for `hybrid`, and memU's LLM-guided flow
//! for `llm` with at most three chat calls (memU's takes five or more and re-embeds every
//! category summary per query; ours uses the stored summary embeddings).

use std::collections::HashMap;

use serde::Deserialize;
use uuid::Uuid;

use crate::llm::LlmSession;
use crate::model::ScoredItem;
use crate::prompts;
use crate::service::{MemoryService, RetrieveInput, RetrieveOutput, ServiceError, invalid};

/// Reciprocal rank fusion constant (the usual 60: damps the head of each list).
const RRF_K: f32 = 60.0;

/// Fuses ranked lists by reciprocal rank (Σ 1 / (60 + rank)); the fused value becomes the
/// score. An item found by both lists beats one found by either alone.
pub fn fuse_ranks(lists: &[Vec<ScoredItem>], k: usize) -> Vec<ScoredItem> {
    let mut fused: HashMap<Uuid, (f32, ScoredItem)> = HashMap::new();
    for list in lists {
        for (rank, hit) in list.iter().enumerate() {
            let gain = 1.0 / (RRF_K + rank as f32 + 1.0);
            fused
                .entry(hit.item.id)
                .and_modify(|(score, _)| *score += gain)
                .or_insert_with(|| (gain, hit.clone()));
        }
    }
    let mut out: Vec<ScoredItem> = fused
        .into_values()
        .map(|(score, mut hit)| {
            hit.score = score;
            hit
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| b.item.created_at.cmp(&a.item.created_at))
            .then_with(|| a.item.id.cmp(&b.item.id))
    });
    out.truncate(k);
    out
}

#[derive(Debug, Deserialize)]
struct Route {
    needs_memory: bool,
    #[serde(default)]
    query: String,
}

#[derive(Debug, Deserialize)]
struct Sufficiency {
    sufficient: bool,
    #[serde(default)]
    query: String,
}

/// `llm` retrieve: route (and rewrite) → categories → sufficient? → items → sufficient? →
/// resources. Every call goes to the cost log, also when a later step fails.
pub async fn retrieve_llm(
    service: &MemoryService,
    input: RetrieveInput,
) -> Result<RetrieveOutput, ServiceError> {
    let mut session = LlmSession::new(
        &service.metrics,
        &service.config.llm.prices,
        input.user(),
        None,
        "retrieve",
    );
    let result = llm_flow(service, input, &mut session).await;
    if !session.calls.is_empty()
        && let Err(e) = service.store.record_llm_usage(&session.calls).await
    {
        tracing::warn!(error = %e, "cannot write the LLM cost log");
    }
    result.map(|mut out| {
        out.llm_calls = session.calls.len();
        out
    })
}

async fn llm_flow(
    service: &MemoryService,
    input: RetrieveInput,
    session: &mut LlmSession<'_>,
) -> Result<RetrieveOutput, ServiceError> {
    let chat = service
        .llm
        .retrieval
        .clone()
        .or_else(|| service.llm.extraction.clone())
        .ok_or_else(|| {
            invalid(
                "method",
                "method `llm` needs an LLM provider (set llm.provider); this worker runs offline, use `rag`",
            )
        })?;
    let mut out = RetrieveOutput::searched(input.query.clone(), Vec::new(), Vec::new(), Vec::new());
    let route: Route = session
        .ask(chat.as_ref(), &prompts::route(&input.context, &input.query))
        .await?;
    if !route.needs_memory {
        out.needs_memory = false;
        return Ok(out);
    }
    if !route.query.trim().is_empty() {
        out.query = route.query.trim().to_string();
    }

    let scope = crate::model::Scope::new(input.user(), input.agent_id.clone());
    let mut vector = service.embed_query(&out.query).await?;
    out.categories = service.rank_categories(&scope, &vector).await?;
    // Nothing summarised yet: no point asking whether nothing suffices.
    if !out.categories.is_empty() {
        let recalled: Vec<String> = out
            .categories
            .iter()
            .map(|c| format!("{}: {}", c.category.name, c.category.summary))
            .collect();
        let check: Sufficiency = session
            .ask(
                chat.as_ref(),
                &prompts::sufficient(&out.query, "category summaries", &recalled),
            )
            .await?;
        if check.sufficient {
            out.sufficient_after = Some("categories");
            return Ok(out);
        }
        if !check.query.trim().is_empty() && check.query.trim() != out.query {
            out.query = check.query.trim().to_string();
            vector = service.embed_query(&out.query).await?;
        }
    }

    let search = RetrieveInput {
        query: out.query.clone(),
        ..input
    };
    out.items = service.search(&search, &vector, true).await?;
    let recalled: Vec<String> = out.items.iter().map(|i| i.item.summary.clone()).collect();
    let check: Sufficiency = session
        .ask(
            chat.as_ref(),
            &prompts::sufficient(&out.query, "memory items", &recalled),
        )
        .await?;
    if check.sufficient {
        out.sufficient_after = Some("items");
        return Ok(out);
    }
    out.resources = service.sources(search.user(), &out.items).await?;
    out.sufficient_after = Some("resources");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MemoryItem, MemoryType};
    use chrono::Utc;

    fn hit(id: u128, score: f32) -> ScoredItem {
        ScoredItem {
            item: MemoryItem {
                tenant_id: "t".into(),
                id: Uuid::from_u128(id),
                user_id: "u".into(),
                agent_id: String::new(),
                resource_id: None,
                memory_type: MemoryType::Event,
                summary: format!("item {id}"),
                happened_at: None,
                created_at: Utc::now(),
                updated_at: Utc::now(),
                extra: serde_json::json!({}),
            },
            score,
        }
    }

    #[test]
    fn items_in_both_lists_rise_to_the_top() {
        let vector = vec![hit(1, 0.9), hit(2, 0.8), hit(3, 0.7)];
        let text = vec![hit(3, 12.0), hit(4, 9.0)];
        let fused = fuse_ranks(&[vector, text], 3);
        let ids: Vec<u128> = fused.iter().map(|h| h.item.id.as_u128()).collect();
        // 3 is third by vector and first by text: 1/63 + 1/61 beats 1/61 alone.
        assert_eq!(ids[0], 3);
        assert_eq!(fused.len(), 3);
        assert!(fused.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn one_list_keeps_its_order() {
        let fused = fuse_ranks(&[vec![hit(5, 0.2), hit(6, 0.1)]], 10);
        let ids: Vec<u128> = fused.iter().map(|h| h.item.id.as_u128()).collect();
        assert_eq!(ids, [5, 6]);
    }
}
