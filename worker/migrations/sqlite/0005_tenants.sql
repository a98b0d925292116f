-- Tenancy: every data table gets tenant_id as its first column and every key leads with it;
-- existing rows belong to tenant 'default'. SQLite cannot alter a primary key, so the tables
-- are rebuilt: create <name>_new, copy, drop the old tables children-first, rename.

-- Control tables.
CREATE TABLE tenants (
    tenant_id        TEXT NOT NULL PRIMARY KEY,
    name             TEXT NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL,
    rate_limit_rps   REAL,
    memorize_per_day INTEGER,
    tokens_per_day   INTEGER
);
INSERT INTO tenants (tenant_id, name, created_at, rate_limit_rps, memorize_per_day, tokens_per_day)
    VALUES ('default', 'default', CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER), NULL, NULL, NULL);

CREATE TABLE api_keys (
    key_id       TEXT NOT NULL PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    name         TEXT NOT NULL DEFAULT '',
    scopes       TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    last_used_at INTEGER
);
CREATE INDEX idx_api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE audit_log (
    tenant_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    at          INTEGER NOT NULL,
    key_id      TEXT,
    method      TEXT NOT NULL,
    route       TEXT NOT NULL,
    target_user TEXT,
    status      INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX idx_audit_tenant_at ON audit_log (tenant_id, at);
CREATE INDEX idx_audit_target ON audit_log (tenant_id, target_user);

-- Append-only; the one permitted change is rewriting target_user (pseudonymising an erased user).
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    WHEN old.tenant_id IS NOT new.tenant_id
      OR old.id IS NOT new.id
      OR old.at IS NOT new.at
      OR old.key_id IS NOT new.key_id
      OR old.method IS NOT new.method
      OR old.route IS NOT new.route
      OR old.status IS NOT new.status
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;
-- INSERT OR REPLACE deletes the old row without firing the DELETE trigger.
CREATE TRIGGER audit_log_no_replace BEFORE INSERT ON audit_log
    WHEN EXISTS (SELECT 1 FROM audit_log WHERE tenant_id = new.tenant_id AND id = new.id)
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only');
END;

-- The FTS triggers go first so that nothing in the rebuild touches memory_fts, which is kept as it
-- is: memory_items keeps its rowids, which memory_fts is keyed by.
DROP TRIGGER memory_fts_insert;
DROP TRIGGER memory_fts_delete;
DROP TRIGGER memory_fts_update;

-- New tables reference each other by their _new names; RENAME rewrites those references below.
CREATE TABLE users_new (
    tenant_id  TEXT NOT NULL DEFAULT 'default',
    user_id    TEXT NOT NULL,
    user_name  TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

CREATE TABLE resources_new (
    tenant_id    TEXT NOT NULL DEFAULT 'default',
    user_id      TEXT NOT NULL,
    id           TEXT NOT NULL,
    agent_id     TEXT NOT NULL DEFAULT '',
    modality     TEXT NOT NULL CHECK (modality IN ('conversation', 'document')),
    content_hash TEXT NOT NULL,
    content      TEXT NOT NULL,
    caption      TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, user_id, id),
    FOREIGN KEY (tenant_id, user_id) REFERENCES users_new (tenant_id, user_id) ON DELETE CASCADE
);

CREATE TABLE memory_items_new (
    tenant_id   TEXT NOT NULL DEFAULT 'default',
    user_id     TEXT NOT NULL,
    id          TEXT NOT NULL,
    agent_id    TEXT NOT NULL DEFAULT '',
    resource_id TEXT,
    memory_type TEXT NOT NULL
        CHECK (memory_type IN ('profile', 'event', 'knowledge', 'behavior', 'skill', 'tool')),
    summary     TEXT NOT NULL,
    happened_at INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    extra       TEXT NOT NULL DEFAULT '{}',
    embedding   BLOB NOT NULL,
    PRIMARY KEY (tenant_id, user_id, id),
    FOREIGN KEY (tenant_id, user_id) REFERENCES users_new (tenant_id, user_id) ON DELETE CASCADE
);

CREATE TABLE memory_categories_new (
    tenant_id   TEXT NOT NULL DEFAULT 'default',
    user_id     TEXT NOT NULL,
    id          TEXT NOT NULL,
    agent_id    TEXT NOT NULL DEFAULT '',
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    summary     TEXT NOT NULL DEFAULT '',
    embedding   BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, user_id, id),
    UNIQUE (tenant_id, user_id, agent_id, name),
    FOREIGN KEY (tenant_id, user_id) REFERENCES users_new (tenant_id, user_id) ON DELETE CASCADE
);

CREATE TABLE category_items_new (
    tenant_id      TEXT NOT NULL DEFAULT 'default',
    user_id        TEXT NOT NULL,
    memory_item_id TEXT NOT NULL,
    category_id    TEXT NOT NULL,
    confidence     REAL NOT NULL,
    PRIMARY KEY (tenant_id, user_id, memory_item_id, category_id),
    FOREIGN KEY (tenant_id, user_id, memory_item_id)
        REFERENCES memory_items_new (tenant_id, user_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, user_id, category_id)
        REFERENCES memory_categories_new (tenant_id, user_id, id) ON DELETE CASCADE
);

CREATE TABLE memorize_tasks_new (
    tenant_id       TEXT NOT NULL DEFAULT 'default',
    user_id         TEXT NOT NULL,
    id              TEXT NOT NULL,
    agent_id        TEXT NOT NULL DEFAULT '',
    resource_id     TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('PENDING', 'PROCESSING', 'SUCCESS', 'FAILED')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    error           TEXT,
    worker_id       TEXT,
    lease_until     INTEGER,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    completed_at    INTEGER,
    idempotency_key TEXT,
    not_before      INTEGER,
    PRIMARY KEY (tenant_id, user_id, id),
    FOREIGN KEY (tenant_id, user_id) REFERENCES users_new (tenant_id, user_id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, user_id, resource_id)
        REFERENCES resources_new (tenant_id, user_id, id) ON DELETE CASCADE
);

CREATE TABLE llm_usage_new (
    tenant_id         TEXT NOT NULL DEFAULT 'default',
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
    PRIMARY KEY (tenant_id, user_id, id)
);

-- Parents before children (foreign keys are enforced while copying); tenant_id takes its default.
INSERT INTO users_new (user_id, user_name, created_at)
    SELECT user_id, user_name, created_at FROM users;

INSERT INTO resources_new (user_id, id, agent_id, modality, content_hash, content, caption, created_at)
    SELECT user_id, id, agent_id, modality, content_hash, content, caption, created_at FROM resources;

INSERT INTO memory_items_new (rowid, user_id, id, agent_id, resource_id, memory_type, summary,
                              happened_at, created_at, updated_at, extra, embedding)
    SELECT rowid, user_id, id, agent_id, resource_id, memory_type, summary,
           happened_at, created_at, updated_at, extra, embedding
    FROM memory_items;

INSERT INTO memory_categories_new (user_id, id, agent_id, name, description, summary, embedding,
                                   created_at, updated_at)
    SELECT user_id, id, agent_id, name, description, summary, embedding, created_at, updated_at
    FROM memory_categories;

INSERT INTO category_items_new (user_id, memory_item_id, category_id, confidence)
    SELECT user_id, memory_item_id, category_id, confidence FROM category_items;

INSERT INTO memorize_tasks_new (user_id, id, agent_id, resource_id, status, attempts, error, worker_id,
                                lease_until, created_at, started_at, completed_at, idempotency_key,
                                not_before)
    SELECT user_id, id, agent_id, resource_id, status, attempts, error, worker_id,
           lease_until, created_at, started_at, completed_at, idempotency_key, not_before
    FROM memorize_tasks;

INSERT INTO llm_usage_new (user_id, id, task_id, operation, prompt, provider, model, prompt_tokens,
                           completion_tokens, latency_ms, cost_usd, created_at)
    SELECT user_id, id, task_id, operation, prompt, provider, model, prompt_tokens,
           completion_tokens, latency_ms, cost_usd, created_at
    FROM llm_usage;

-- Children first: with foreign keys on, DROP TABLE first deletes every row, and a parent's delete
-- would cascade into (or be refused by) the children that still exist.
DROP TABLE category_items;
DROP TABLE memorize_tasks;
DROP TABLE memory_items;
DROP TABLE memory_categories;
DROP TABLE resources;
DROP TABLE users;
DROP TABLE llm_usage;

ALTER TABLE users_new RENAME TO users;
ALTER TABLE resources_new RENAME TO resources;
ALTER TABLE memory_items_new RENAME TO memory_items;
ALTER TABLE memory_categories_new RENAME TO memory_categories;
ALTER TABLE category_items_new RENAME TO category_items;
ALTER TABLE memorize_tasks_new RENAME TO memorize_tasks;
ALTER TABLE llm_usage_new RENAME TO llm_usage;

CREATE INDEX idx_resources_hash ON resources (tenant_id, user_id, content_hash);
CREATE INDEX idx_memory_user_created ON memory_items (tenant_id, user_id, created_at DESC, id DESC);
CREATE INDEX idx_memory_user_summary ON memory_items (tenant_id, user_id, agent_id, memory_type, summary);
CREATE INDEX idx_category_items_category ON category_items (tenant_id, user_id, category_id);
CREATE UNIQUE INDEX idx_tasks_id ON memorize_tasks (id);
CREATE INDEX idx_tasks_runnable ON memorize_tasks (status, created_at);
CREATE UNIQUE INDEX idx_tasks_idempotency ON memorize_tasks (tenant_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX idx_tasks_tenant_created ON memorize_tasks (tenant_id, created_at);
CREATE INDEX idx_llm_usage_user_created ON llm_usage (tenant_id, user_id, created_at);
CREATE INDEX idx_llm_usage_tenant_created ON llm_usage (tenant_id, created_at);

-- Same as in 0002.
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
