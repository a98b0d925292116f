//! Citus safety of the Postgres store, checked on its source: every statement that touches a
//! per-user table names `user_id`, so Citus routes it to one shard; the few that deliberately
//! span users are listed here with the reason. And every unique key includes `user_id`.

use regex::Regex;

const PER_USER_TABLES: &str =
    "memory_items|memory_categories|category_items|resources|memorize_tasks|llm_usage|users";

/// Statements that span users on purpose (id-only lookups inside one tenant); they still name
/// the tenant. The queue-wide claim and queue figures live in SQL functions (migration 0005).
const CROSS_USER: &[(&str, &str)] = &[
    (
        "SELECT * FROM memorize_tasks WHERE tenant_id = $1 AND id = $2",
        "task status by id: ids are UUIDs, the API has no user in the path",
    ),
    (
        "WHERE tenant_id = $1 AND id = $2 AND status = 'FAILED'",
        "retry of a task by id",
    ),
    (
        "FROM memorize_tasks WHERE tenant_id = $1 AND created_at >= $2",
        "a tenant's daily usage for its quotas (fans out; one indexed count per shard)",
    ),
    ("SELECT 1 FROM pg_dist_partition", "Citus catalog"),
];

/// Query-builder heads whose tenant and user filters are pushed as later pieces (after the SET
/// list or the tsquery bind); the pieces must follow in the source.
const BUILDER_HEADS: &[(&str, &str)] = &[
    (
        "UPDATE memory_items SET updated_at = now()",
        ".push(\" WHERE tenant_id = \")",
    ),
    (
        " AS distance FROM memory_items WHERE tenant_id = ",
        ".push(\" AND user_id = \")",
    ),
    (
        "EXPLAIN SELECT id FROM memory_items WHERE tenant_id = ",
        ".push(\" AND user_id = \")",
    ),
    (
        "SELECT {ITEM_COLUMNS} FROM memory_items WHERE tenant_id = ",
        ".push(\" AND user_id = \")",
    ),
    (
        "ts_rank_cd(summary_tsv, q) AS rank FROM memory_items",
        ") AS q WHERE summary_tsv @@ q AND tenant_id = ",
    ),
];

fn literals(source: &str) -> Vec<String> {
    let literal = Regex::new(r#"(?s)"((?:[^"\\]|\\.)*)""#).unwrap();
    let continuation = Regex::new(r"\\\n\s*").unwrap();
    literal
        .captures_iter(source)
        .map(|c| continuation.replace_all(&c[1], "").to_string())
        .collect()
}

#[test]
fn every_statement_on_a_per_user_table_names_the_user() {
    let source = include_str!("../src/store/postgres.rs");
    let statement = Regex::new(&format!(
        r"(?i)\b(FROM|UPDATE|INTO|JOIN)\s+({PER_USER_TABLES})\b"
    ))
    .unwrap();
    let mut checked = 0;
    let mut offenders = Vec::new();
    for sql in literals(source) {
        if !statement.is_match(&sql) {
            continue;
        }
        checked += 1;
        // Both filters: Citus routes by user, and the application confines every statement to
        // the caller's tenant (row-level security checks it a second time).
        let names_both = sql.contains("user_id") && sql.contains("tenant_id");
        if names_both || CROSS_USER.iter().any(|(s, _)| sql.contains(s)) {
            continue;
        }
        if let Some((_, tail)) = BUILDER_HEADS.iter().find(|(head, _)| sql.contains(head)) {
            assert!(
                source.contains(tail),
                "the user filter after `{sql}` is gone"
            );
            continue;
        }
        offenders.push(sql);
    }
    assert!(
        checked > 30,
        "found only {checked} statements: is the parser still right?"
    );
    assert!(
        offenders.is_empty(),
        "statements without user_id: {offenders:#?}"
    );
}

#[test]
fn every_unique_key_includes_the_user() {
    let mut keys = 0;
    for migration in [
        include_str!("../migrations/postgres/0001_init.sql"),
        include_str!("../migrations/postgres/0002_llm_usage_fulltext.sql"),
        include_str!("../migrations/postgres/0003_task_idempotency.sql"),
        include_str!("../migrations/postgres/0005_tenants.sql"),
    ] {
        for line in migration.lines() {
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            let line = line.as_str();
            if line.starts_with("--") {
                continue;
            }
            let upper = line.to_uppercase();
            if upper.contains("PRIMARY KEY") || upper.contains("UNIQUE") {
                keys += 1;
                // Reference tables (memu_meta, tenants, api_keys) and the audit log (distributed
                // by tenant) are not per-user.
                let shared = [
                    "memu_meta",
                    "key text PRIMARY KEY",
                    "KEY (KEY)",
                    "tenant_id text PRIMARY KEY",
                    "key_id text PRIMARY KEY",
                    "PRIMARY KEY (tenant_id, id)",
                ];
                assert!(
                    line.contains("user_id") || shared.iter().any(|s| line.contains(s)),
                    "a unique key without user_id: {line}"
                );
            }
        }
    }
    assert!(keys >= 7, "found only {keys} keys");
}
