-- memU schema (seed §2.3), Citus-ready: every table carries user_id and every primary or unique
-- key includes it, so each table can be distributed by user_id with co-located joins.
-- The embedding columns and the HNSW index are created by the worker for the configured
-- dimension (see PgStore::ensure_vector_schema), because migrations cannot be parameterised.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE memu_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE users (
    user_id    text PRIMARY KEY,
    user_name  text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE resources (
    user_id      text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id           uuid NOT NULL,
    agent_id     text NOT NULL DEFAULT '',
    modality     text NOT NULL CHECK (modality IN ('conversation', 'document')),
    content_hash text NOT NULL,
    content      jsonb NOT NULL,
    caption      text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
CREATE INDEX idx_resources_hash ON resources (user_id, content_hash);

CREATE TABLE memory_items (
    user_id     text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    agent_id    text NOT NULL DEFAULT '',
    resource_id uuid,
    memory_type varchar(20) NOT NULL
        CHECK (memory_type IN ('profile', 'event', 'knowledge', 'behavior', 'skill', 'tool')),
    summary     text NOT NULL,
    happened_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    extra       jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (user_id, id),
    FOREIGN KEY (user_id, resource_id) REFERENCES resources (user_id, id)
        ON DELETE SET NULL (resource_id)
);
CREATE INDEX idx_memory_user_created ON memory_items (user_id, created_at DESC, id DESC);
CREATE INDEX idx_memory_user_summary ON memory_items (user_id, agent_id, memory_type, md5(summary));

CREATE TABLE memory_categories (
    user_id     text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    agent_id    text NOT NULL DEFAULT '',
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    summary     text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id),
    UNIQUE (user_id, agent_id, name)
);

CREATE TABLE category_items (
    user_id        text NOT NULL,
    memory_item_id uuid NOT NULL,
    category_id    uuid NOT NULL,
    confidence     real NOT NULL,
    PRIMARY KEY (user_id, memory_item_id, category_id),
    FOREIGN KEY (user_id, memory_item_id) REFERENCES memory_items (user_id, id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, category_id) REFERENCES memory_categories (user_id, id) ON DELETE CASCADE
);
CREATE INDEX idx_category_items_category ON category_items (user_id, category_id);

CREATE TABLE memorize_tasks (
    user_id      text NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    id           uuid NOT NULL,
    agent_id     text NOT NULL DEFAULT '',
    resource_id  uuid NOT NULL,
    status       text NOT NULL CHECK (status IN ('PENDING', 'PROCESSING', 'SUCCESS', 'FAILED')),
    attempts     integer NOT NULL DEFAULT 0,
    error        text,
    worker_id    text,
    lease_until  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    completed_at timestamptz,
    PRIMARY KEY (user_id, id),
    FOREIGN KEY (user_id, resource_id) REFERENCES resources (user_id, id) ON DELETE CASCADE
);
CREATE INDEX idx_tasks_id ON memorize_tasks (id);
CREATE INDEX idx_tasks_runnable ON memorize_tasks (created_at)
    WHERE status IN ('PENDING', 'PROCESSING');
