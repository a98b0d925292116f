-- Cost log of LLM calls, and full-text search over memory items for hybrid retrieve.
-- Keyed by user_id like every other table, so Citus co-locates it with the user's rows.

CREATE TABLE llm_usage (
    user_id           text NOT NULL,
    id                uuid NOT NULL,
    task_id           uuid,
    operation         text NOT NULL,
    prompt            text NOT NULL,
    provider          text NOT NULL,
    model             text NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    latency_ms        bigint NOT NULL,
    cost_usd          double precision NOT NULL,
    created_at        timestamptz NOT NULL,
    PRIMARY KEY (user_id, id)
);
CREATE INDEX idx_llm_usage_user_created ON llm_usage (user_id, created_at);

-- 'simple' keeps names and numbers as they are (no stemming, no stop words, any language).
ALTER TABLE memory_items
    ADD COLUMN summary_tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', summary)) STORED;
CREATE INDEX idx_memory_items_tsv ON memory_items USING gin (summary_tsv);
