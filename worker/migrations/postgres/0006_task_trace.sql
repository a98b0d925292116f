-- W3C traceparent of the request that queued a memorize task: the pipeline's spans continue
-- that trace (NULL when tracing is off). Nullable without a default: no table rewrite.
ALTER TABLE memorize_tasks ADD COLUMN trace_parent text;
