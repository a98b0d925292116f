-- A retried memorize task waits until not_before (exponential backoff between attempts).
ALTER TABLE memorize_tasks ADD COLUMN not_before INTEGER;
