-- Embedded schema: the same tables as Postgres. Timestamps are microseconds since the epoch,
-- embeddings little-endian f32 blobs searched in process.

CREATE TABLE memu_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE users (
    user_id    TEXT PRIMARY KEY,
    user_name  TEXT,
    created_at INTEGER NOT NULL
);

CREATE TABLE resources (
    user_id      TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id           TEXT NOT NULL,
    agent_id     TEXT NOT NULL DEFAULT '',
    modality     TEXT NOT NULL CHECK (modality IN ('conversation', 'document')),
    content_hash TEXT NOT NULL,
    content      TEXT NOT NULL,
    caption      TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, id)
);
CREATE INDEX idx_resources_hash ON resources (user_id, content_hash);

CREATE TABLE memory_items (
    user_id     TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
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
    PRIMARY KEY (user_id, id)
);
CREATE INDEX idx_memory_user_created ON memory_items (user_id, created_at DESC, id DESC);
CREATE INDEX idx_memory_user_summary ON memory_items (user_id, agent_id, memory_type, summary);

CREATE TABLE memory_categories (
    user_id     TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id          TEXT NOT NULL,
    agent_id    TEXT NOT NULL DEFAULT '',
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    summary     TEXT NOT NULL DEFAULT '',
    embedding   BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, agent_id, name)
);

CREATE TABLE category_items (
    user_id        TEXT NOT NULL,
    memory_item_id TEXT NOT NULL,
    category_id    TEXT NOT NULL,
    confidence     REAL NOT NULL,
    PRIMARY KEY (user_id, memory_item_id, category_id),
    FOREIGN KEY (user_id, memory_item_id) REFERENCES memory_items (user_id, id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, category_id) REFERENCES memory_categories (user_id, id) ON DELETE CASCADE
);
CREATE INDEX idx_category_items_category ON category_items (user_id, category_id);

CREATE TABLE memorize_tasks (
    user_id      TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id           TEXT NOT NULL,
    agent_id     TEXT NOT NULL DEFAULT '',
    resource_id  TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('PENDING', 'PROCESSING', 'SUCCESS', 'FAILED')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    worker_id    TEXT,
    lease_until  INTEGER,
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    completed_at INTEGER,
    PRIMARY KEY (user_id, id),
    FOREIGN KEY (user_id, resource_id) REFERENCES resources (user_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX idx_tasks_id ON memorize_tasks (id);
CREATE INDEX idx_tasks_runnable ON memorize_tasks (status, created_at);
