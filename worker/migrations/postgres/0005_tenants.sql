-- Tenancy: a tenant (organization or app) owns users, and every key leads with tenant_id, so the
-- same user_id in two tenants is two users. Existing rows become tenant 'default'.
-- Row-Level Security filters every tenant table by the transaction's `memu.tenant_id` (set with
-- SET LOCAL by the worker) for any role that is not the owner; the worker's role gets only the
-- grants that `memu-worker migrate` gives to `database.app_role`. Queue claims cross tenants, so
-- they go through SECURITY DEFINER functions owned by the migrating role.

INSERT INTO memu_meta (key, value) VALUES ('tenancy', 'v1') ON CONFLICT (key) DO NOTHING;

ALTER TABLE users ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE resources ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE memory_items ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE memory_categories ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE category_items ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE memorize_tasks ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE llm_usage ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';

-- The backfill is done; from now on every insert names its tenant (no silent 'default').
ALTER TABLE users ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE resources ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE memory_items ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE memory_categories ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE category_items ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE memorize_tasks ALTER COLUMN tenant_id DROP DEFAULT;
ALTER TABLE llm_usage ALTER COLUMN tenant_id DROP DEFAULT;

-- Foreign keys first (they depend on the keys they reference), then the keys.
ALTER TABLE category_items DROP CONSTRAINT category_items_user_id_memory_item_id_fkey;
ALTER TABLE category_items DROP CONSTRAINT category_items_user_id_category_id_fkey;
ALTER TABLE memorize_tasks DROP CONSTRAINT memorize_tasks_user_id_fkey;
ALTER TABLE memorize_tasks DROP CONSTRAINT memorize_tasks_user_id_resource_id_fkey;
ALTER TABLE memory_items DROP CONSTRAINT memory_items_user_id_fkey;
ALTER TABLE memory_items DROP CONSTRAINT memory_items_user_id_resource_id_fkey;
ALTER TABLE memory_categories DROP CONSTRAINT memory_categories_user_id_fkey;
ALTER TABLE resources DROP CONSTRAINT resources_user_id_fkey;

ALTER TABLE users DROP CONSTRAINT users_pkey;
ALTER TABLE users ADD PRIMARY KEY (tenant_id, user_id);
ALTER TABLE resources DROP CONSTRAINT resources_pkey;
ALTER TABLE resources ADD PRIMARY KEY (tenant_id, user_id, id);
ALTER TABLE memory_items DROP CONSTRAINT memory_items_pkey;
ALTER TABLE memory_items ADD PRIMARY KEY (tenant_id, user_id, id);
ALTER TABLE memory_categories DROP CONSTRAINT memory_categories_pkey;
ALTER TABLE memory_categories ADD PRIMARY KEY (tenant_id, user_id, id);
ALTER TABLE memory_categories DROP CONSTRAINT memory_categories_user_id_agent_id_name_key;
ALTER TABLE memory_categories ADD UNIQUE (tenant_id, user_id, agent_id, name);
ALTER TABLE category_items DROP CONSTRAINT category_items_pkey;
ALTER TABLE category_items ADD PRIMARY KEY (tenant_id, user_id, memory_item_id, category_id);
ALTER TABLE memorize_tasks DROP CONSTRAINT memorize_tasks_pkey;
ALTER TABLE memorize_tasks ADD PRIMARY KEY (tenant_id, user_id, id);
ALTER TABLE llm_usage DROP CONSTRAINT llm_usage_pkey;
ALTER TABLE llm_usage ADD PRIMARY KEY (tenant_id, user_id, id);

ALTER TABLE resources ADD FOREIGN KEY (tenant_id, user_id)
    REFERENCES users (tenant_id, user_id) ON DELETE CASCADE;
ALTER TABLE memory_items ADD FOREIGN KEY (tenant_id, user_id)
    REFERENCES users (tenant_id, user_id) ON DELETE CASCADE;
ALTER TABLE memory_items ADD FOREIGN KEY (tenant_id, user_id, resource_id)
    REFERENCES resources (tenant_id, user_id, id) ON DELETE SET NULL (resource_id);
ALTER TABLE memory_categories ADD FOREIGN KEY (tenant_id, user_id)
    REFERENCES users (tenant_id, user_id) ON DELETE CASCADE;
ALTER TABLE category_items ADD FOREIGN KEY (tenant_id, user_id, memory_item_id)
    REFERENCES memory_items (tenant_id, user_id, id) ON DELETE CASCADE;
ALTER TABLE category_items ADD FOREIGN KEY (tenant_id, user_id, category_id)
    REFERENCES memory_categories (tenant_id, user_id, id) ON DELETE CASCADE;
ALTER TABLE memorize_tasks ADD FOREIGN KEY (tenant_id, user_id)
    REFERENCES users (tenant_id, user_id) ON DELETE CASCADE;
ALTER TABLE memorize_tasks ADD FOREIGN KEY (tenant_id, user_id, resource_id)
    REFERENCES resources (tenant_id, user_id, id) ON DELETE CASCADE;

DROP INDEX idx_resources_hash;
CREATE INDEX idx_resources_hash ON resources (tenant_id, user_id, content_hash);
DROP INDEX idx_memory_user_created;
CREATE INDEX idx_memory_user_created ON memory_items (tenant_id, user_id, created_at DESC, id DESC);
DROP INDEX idx_memory_user_summary;
CREATE INDEX idx_memory_user_summary
    ON memory_items (tenant_id, user_id, agent_id, memory_type, md5(summary));
DROP INDEX idx_category_items_category;
CREATE INDEX idx_category_items_category ON category_items (tenant_id, user_id, category_id);
DROP INDEX idx_tasks_idempotency;
CREATE UNIQUE INDEX idx_tasks_idempotency ON memorize_tasks (tenant_id, user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX idx_tasks_tenant_created ON memorize_tasks (tenant_id, created_at);
DROP INDEX idx_llm_usage_user_created;
CREATE INDEX idx_llm_usage_user_created ON llm_usage (tenant_id, user_id, created_at);
CREATE INDEX idx_llm_usage_tenant_created ON llm_usage (tenant_id, created_at);

-- Control tables: read by the worker before a tenant is known (key lookup), so not under RLS;
-- only admin-scoped keys reach them through the API.
CREATE TABLE tenants (
    tenant_id        text PRIMARY KEY,
    name             text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    rate_limit_rps   double precision,
    memorize_per_day bigint,
    tokens_per_day   bigint
);
INSERT INTO tenants (tenant_id, name) VALUES ('default', 'default');

CREATE TABLE api_keys (
    key_id       text PRIMARY KEY,
    tenant_id    text NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    name         text NOT NULL DEFAULT '',
    scopes       text NOT NULL,
    secret_hash  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX idx_api_keys_tenant ON api_keys (tenant_id);

-- Append-only: the worker's role may insert and read, and only rewrite target_user (to
-- pseudonymise an erased user); nobody may delete.
CREATE TABLE audit_log (
    tenant_id   text NOT NULL,
    id          uuid NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    key_id      text,
    method      text NOT NULL,
    route       text NOT NULL,
    target_user text,
    status      integer NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX idx_audit_tenant_at ON audit_log (tenant_id, at);
CREATE INDEX idx_audit_target ON audit_log (tenant_id, target_user);

CREATE FUNCTION memu_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR (OLD.tenant_id, OLD.id, OLD.at, OLD.key_id, OLD.method, OLD.route, OLD.status)
        IS DISTINCT FROM (NEW.tenant_id, NEW.id, NEW.at, NEW.key_id, NEW.method, NEW.route, NEW.status) THEN
        RAISE EXCEPTION 'audit_log is append-only';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION memu_audit_append_only();

-- One policy per tenant table: rows of the transaction's tenant only, for reads and writes.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'resources', 'memory_items', 'memory_categories',
                             'category_items', 'memorize_tasks', 'llm_usage', 'audit_log'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING (tenant_id = current_setting(''memu.tenant_id'', true)) '
            'WITH CHECK (tenant_id = current_setting(''memu.tenant_id'', true))', t);
    END LOOP;
END $$;

-- The queue is shared by all tenants: a pipeline worker claims the oldest runnable job whose
-- user has no job in flight (a user's jobs apply in order, never concurrently).
CREATE FUNCTION memu_claim_task(p_worker text, p_lease_secs double precision)
RETURNS SETOF memorize_tasks
LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH next AS (
        SELECT t.tenant_id, t.user_id, t.id FROM memorize_tasks t
        WHERE ((t.status = 'PENDING' AND (t.not_before IS NULL OR t.not_before <= now()))
               OR (t.status = 'PROCESSING' AND t.lease_until < now()))
          AND NOT EXISTS (SELECT 1 FROM memorize_tasks o
                          WHERE o.tenant_id = t.tenant_id AND o.user_id = t.user_id AND o.id <> t.id
                            AND ((o.status = 'PROCESSING' AND o.lease_until >= now())
                                 OR (o.status = 'PENDING' AND o.created_at < t.created_at)))
        ORDER BY t.created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
    UPDATE memorize_tasks t SET status = 'PROCESSING', worker_id = p_worker,
        lease_until = now() + make_interval(secs => p_lease_secs), attempts = t.attempts + 1,
        started_at = COALESCE(t.started_at, now())
    FROM next
    WHERE t.tenant_id = next.tenant_id AND t.user_id = next.user_id AND t.id = next.id
    RETURNING t.*
$$;

CREATE FUNCTION memu_queue_stats(OUT pending bigint, OUT processing bigint, OUT oldest_secs double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT count(*) FILTER (WHERE status = 'PENDING'),
           count(*) FILTER (WHERE status = 'PROCESSING'),
           extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'PENDING'))::float8
    FROM memorize_tasks WHERE status IN ('PENDING', 'PROCESSING')
$$;

REVOKE EXECUTE ON FUNCTION memu_claim_task(text, double precision) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION memu_queue_stats() FROM PUBLIC;
