-- Idempotency-Key of memorize: a retried request returns the task it created the first time.
ALTER TABLE memorize_tasks ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX idx_tasks_idempotency ON memorize_tasks (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
