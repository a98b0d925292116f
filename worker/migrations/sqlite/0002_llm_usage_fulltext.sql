-- Cost log of LLM calls, and full-text search (FTS5) over memory items for hybrid retrieve.

CREATE TABLE llm_usage (
    user_id           TEXT NOT NULL,
    id                TEXT NOT NULL,
    task_id           TEXT,
    operation         TEXT NOT NULL,
    prompt            TEXT NOT NULL,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    cost_usd          REAL NOT NULL,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (user_id, id)
);
CREATE INDEX idx_llm_usage_user_created ON llm_usage (user_id, created_at);

-- Its own copy of the text, keyed by the item's rowid so that triggers find a row without a scan.
CREATE VIRTUAL TABLE memory_fts USING fts5(
    summary,
    user_id UNINDEXED,
    item_id UNINDEXED,
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO memory_fts (rowid, summary, user_id, item_id)
    SELECT rowid, summary, user_id, id FROM memory_items;

CREATE TRIGGER memory_fts_insert AFTER INSERT ON memory_items BEGIN
    INSERT INTO memory_fts (rowid, summary, user_id, item_id)
        VALUES (new.rowid, new.summary, new.user_id, new.id);
END;
CREATE TRIGGER memory_fts_delete AFTER DELETE ON memory_items BEGIN
    DELETE FROM memory_fts WHERE rowid = old.rowid;
END;
CREATE TRIGGER memory_fts_update AFTER UPDATE OF summary ON memory_items BEGIN
    UPDATE memory_fts SET summary = new.summary WHERE rowid = old.rowid;
END;
