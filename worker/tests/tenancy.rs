//! Multi-tenancy against real Postgres: the isolation matrix (every route × every kind of
//! caller), row-level security as the worker's own database role, the admin API, limits, and
//! GDPR erase leaving nothing of the user behind.

mod common;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, Row};

use common::{TestServer, authorized_client, issue_key, stub, stub_config, with_backend};

const SECRET_A: &str = "Zanzibar";
const SECRET_B: &str = "Reykjavik";

async fn call(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = http.request(method, format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn memorize(server: &TestServer, http: &reqwest::Client, user: &str, text: &str) -> String {
    let (status, body) = call(
        http,
        &server.base,
        Method::POST,
        "/api/v3/memory/memorize",
        Some(json!({"user_id": user, "conversation": [{"role": "user", "content": text}]})),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let task: Value = serde_json::from_str(&body).unwrap();
    let id = task["task_id"].as_str().unwrap().to_string();
    for _ in 0..400 {
        let (_, body) = call(
            http,
            &server.base,
            Method::GET,
            &format!("/api/v3/memory/memorize/status/{id}"),
            None,
        )
        .await;
        if body.contains("SUCCESS") {
            return id;
        }
        assert!(!body.contains("FAILED"), "{body}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("task {id} did not finish");
}

async fn first_item(server: &TestServer, http: &reqwest::Client, user: &str) -> String {
    let (status, body) = call(
        http,
        &server.base,
        Method::GET,
        &format!("/api/v1/users/{user}/items"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    page["items"][0]["id"].as_str().unwrap().to_string()
}

/// One route of the API: what a caller of the owning tenant gets, with the ids filled in.
struct Route {
    method: Method,
    path: String,
    body: Option<Value>,
    own: u16,
}

fn routes(task: &str, item: &str) -> Vec<Route> {
    let r = |method: Method, path: String, body: Option<Value>, own: u16| Route {
        method,
        path,
        body,
        own,
    };
    let conversation = json!([{"role": "user", "content": "I collect stamps."}]);
    vec![
        r(
            Method::GET,
            format!("/api/v3/memory/memorize/status/{task}"),
            None,
            200,
        ),
        // A SUCCESS task cannot be retried: the owner learns why, others learn nothing.
        r(
            Method::POST,
            format!("/api/v3/memory/memorize/{task}/retry"),
            None,
            422,
        ),
        r(
            Method::POST,
            "/api/v3/memory/retrieve".into(),
            Some(json!({"user_id": "alice", "query": "where"})),
            200,
        ),
        r(
            Method::POST,
            "/retrieve".into(),
            Some(json!({"user_id": "alice", "query": "where"})),
            200,
        ),
        r(
            Method::POST,
            "/api/v3/memory/categories".into(),
            Some(json!({"user_id": "alice"})),
            200,
        ),
        r(Method::GET, "/api/v1/users/alice/items".into(), None, 200),
        r(
            Method::GET,
            format!("/api/v1/users/alice/items/{item}"),
            None,
            200,
        ),
        r(
            Method::PATCH,
            format!("/api/v1/users/alice/items/{item}"),
            Some(json!({"extra": {"k": 1}})),
            200,
        ),
        r(Method::GET, "/api/v1/users/alice/export".into(), None, 200),
        r(Method::GET, "/api/v1/users/alice/usage".into(), None, 200),
        r(
            Method::POST,
            "/api/v1/users/alice/items".into(),
            Some(json!({"memory_type": "knowledge", "summary": "Likes tea."})),
            201,
        ),
        r(
            Method::POST,
            "/api/v1/users/alice/documents".into(),
            Some(json!({"text": "A note about knots."})),
            202,
        ),
        r(
            Method::POST,
            "/api/v3/memory/memorize".into(),
            Some(json!({"user_id": "tmp", "conversation": conversation})),
            202,
        ),
        r(
            Method::POST,
            "/memorize".into(),
            Some(json!({"user_id": "tmp2", "conversation": conversation})),
            200,
        ),
        r(
            Method::POST,
            "/clear".into(),
            Some(json!({"user_id": "nobody"})),
            200,
        ),
        r(
            Method::DELETE,
            format!("/api/v1/users/alice/items/{item}"),
            None,
            204,
        ),
        r(Method::DELETE, "/api/v1/users/gone".into(), None, 200),
        r(Method::GET, "/admin/v1/tenants".into(), None, 200),
        // memU Cloud v1 (the SDK's routes) and memU-server's envelope routes.
        r(
            Method::GET,
            format!("/api/v1/memory/memorize/status/{task}"),
            None,
            200,
        ),
        r(Method::GET, format!("/memorize/status/{task}"), None, 200),
        r(
            Method::POST,
            "/api/v1/memory/retrieve/default-categories".into(),
            Some(json!({"user_id": "alice", "want_summary": false})),
            200,
        ),
        r(
            Method::POST,
            "/api/v1/memory/retrieve/related-memory-items".into(),
            Some(json!({"user_id": "alice", "query": "where", "min_similarity": -1.0})),
            200,
        ),
        r(
            Method::POST,
            "/api/v1/memory/retrieve/related-clustered-categories".into(),
            Some(json!({"user_id": "alice", "category_query": "home", "min_similarity": -1.0})),
            200,
        ),
        r(
            Method::POST,
            "/api/v1/memory/memorize".into(),
            Some(json!({"user_id": "tmp3", "conversation": conversation})),
            200,
        ),
        r(
            Method::POST,
            "/api/v1/memory/delete".into(),
            Some(json!({"user_id": "nobody"})),
            200,
        ),
        r(
            Method::POST,
            "/api/v3/memory/delete".into(),
            Some(json!({"user_id": "nobody"})),
            200,
        ),
    ]
}

fn needs_write(route: &Route) -> bool {
    !(route.method == Method::GET
        || route.path.contains("/retrieve")
        || route.path.contains("/categories"))
}

#[tokio::test]
async fn isolation_matrix_on_postgres() {
    let stub = stub().await;
    let (config, _db) = with_backend(stub_config(&stub), true).await;
    let server = TestServer::start(config).await;
    let service = &server.service;
    let a_key = issue_key(service, "tenant-a", "read,write,admin").await;
    let a_read = issue_key(service, "tenant-a", "read").await;
    let a_revoked = issue_key(service, "tenant-a", "read,write").await;
    let b_key = issue_key(service, "tenant-b", "read,write").await;
    let revoked_id = memu_worker::tenancy::key_id_of(&a_revoked)
        .unwrap()
        .to_string();
    assert!(
        service
            .access
            .revoke_key("tenant-a", &revoked_id)
            .await
            .unwrap()
    );

    let a = authorized_client(&a_key);
    let b = authorized_client(&b_key);
    // The same user id in both tenants: two users.
    let task = memorize(&server, &a, "alice", &format!("I live in {SECRET_A}.")).await;
    memorize(&server, &b, "alice", &format!("I live in {SECRET_B}.")).await;
    let item = first_item(&server, &a, "alice").await;

    let anonymous = reqwest::Client::new();
    let callers: Vec<(&str, reqwest::Client)> = vec![
        ("no key", anonymous.clone()),
        ("malformed key", authorized_client("memu_not-a-key")),
        (
            "unknown key",
            authorized_client(&format!("memu_aaaaaaaaaaaa_{}", "x".repeat(43))),
        ),
        ("revoked key", authorized_client(&a_revoked)),
        ("read-only key", authorized_client(&a_read)),
        ("other tenant", b.clone()),
    ];
    let mut checked = 0;
    for route in routes(&task, &item) {
        for (who, http) in &callers {
            let (status, body) = call(
                http,
                &server.base,
                route.method.clone(),
                &route.path,
                route.body.clone(),
            )
            .await;
            let expected = match *who {
                "no key" | "malformed key" | "unknown key" | "revoked key" => 401,
                "read-only key" if needs_write(&route) || route.path.starts_with("/admin") => 403,
                "read-only key" => route.own,
                // B's key on A's ids: nothing found; on user paths: B's own (empty) alice.
                _ if route.path.starts_with("/admin") => 403,
                _ if route.path.contains(&task) || route.path.contains(&item) => 404,
                _ => route.own,
            };
            assert_eq!(
                status, expected,
                "{who} on {} {}: {body}",
                route.method, route.path
            );
            assert!(
                *who == "read-only key" || !body.contains(SECRET_A),
                "{who} saw tenant A's data on {} {}: {body}",
                route.method,
                route.path
            );
            if status == 401 {
                assert!(body.contains("\"field\":\"authorization\""), "{body}");
            }
            checked += 1;
        }
        // The owner gets the route's own answer (last, since some routes change data).
        let (status, body) = call(
            &a,
            &server.base,
            route.method.clone(),
            &route.path,
            route.body.clone(),
        )
        .await;
        assert_eq!(
            status, route.own,
            "owner on {} {}: {body}",
            route.method, route.path
        );
    }
    assert_eq!(checked, 26 * 6);

    // B still has its own alice, untouched by everything A did.
    let (_, body) = call(
        &b,
        &server.base,
        Method::POST,
        "/api/v3/memory/retrieve",
        Some(json!({"user_id": "alice", "query": "Where does she live?"})),
    )
    .await;
    assert!(
        body.contains(SECRET_B) && !body.contains(SECRET_A),
        "{body}"
    );

    // Every authenticated request is audited under its own tenant, with the route template.
    let audit = service
        .store
        .list_audit("tenant-b", None, Some(1000))
        .await
        .unwrap();
    assert!(audit.iter().all(|e| e.tenant_id == "tenant-b"));
    assert!(
        audit
            .iter()
            .any(|e| e.route == "/api/v1/users/{user_id}/items/{item_id}" && e.status == 404)
    );
    let a_audit = service
        .store
        .list_audit("tenant-a", None, Some(1000))
        .await
        .unwrap();
    assert!(
        a_audit
            .iter()
            .any(|e| e.status == 403 && e.key_id.is_some())
    );
    // Keys never reach the audit log, the metrics or an error body.
    let metrics = server.metrics().await;
    for key in [&a_key, &b_key, &a_read] {
        assert!(!metrics.contains(key.as_str()));
        assert!(!format!("{audit:?}{a_audit:?}").contains(key.as_str()));
    }
    assert!(metrics.contains("memu_auth_failures_total"));
}

#[tokio::test]
async fn row_level_security_binds_the_workers_role() {
    let stub = stub().await;
    let (mut config, backend) = with_backend(stub_config(&stub), true).await;
    let common::Backend::Postgres(owner_dsn) = backend else {
        unreachable!()
    };
    // The worker serves as a role of its own; migrations run as the owner and grant it.
    let role = format!(
        "memu_app_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut owner = sqlx::PgConnection::connect(&owner_dsn).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'"
    )))
    .execute(&mut owner)
    .await
    .unwrap();
    let app_dsn = owner_dsn.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:pw-{role}@"),
        1,
    );
    let owner_var = format!("MEMU_TEST_OWNER_{}", uuid::Uuid::new_v4().simple());
    // SAFETY: a variable of this test's own name; nothing reads it concurrently.
    unsafe {
        std::env::set_var(&owner_var, &owner_dsn);
        std::env::set_var(&config.database.url_env, &app_dsn);
    }
    config.database.migrate_url_env = owner_var;
    config.database.app_role = Some(role.clone());
    let server = TestServer::start(config).await;
    let a = authorized_client(&issue_key(&server.service, "tenant-a", "read,write").await);
    let b = authorized_client(&issue_key(&server.service, "tenant-b", "read,write").await);
    // The whole pipeline runs as the app role: enqueue, claim (SECURITY DEFINER), complete.
    memorize(&server, &a, "alice", &format!("I live in {SECRET_A}.")).await;
    memorize(&server, &b, "bob", &format!("I live in {SECRET_B}.")).await;

    let mut app = sqlx::PgConnection::connect(&app_dsn).await.unwrap();
    // Without the setting: nothing, from every tenant table.
    for table in [
        "users",
        "resources",
        "memory_items",
        "memory_categories",
        "category_items",
        "memorize_tasks",
        "audit_log",
    ] {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&mut app)
                .await
                .unwrap();
        assert_eq!(n, 0, "{table} visible without memu.tenant_id");
    }
    // With tenant A's setting: only A's rows, even when asking for B's explicitly.
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT set_config('memu.tenant_id', 'tenant-a', true)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let rows = sqlx::query("SELECT tenant_id, summary FROM memory_items")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        assert_eq!(row.get::<String, _>("tenant_id"), "tenant-a");
        assert!(!row.get::<String, _>("summary").contains(SECRET_B));
    }
    let of_b: i64 =
        sqlx::query_scalar("SELECT count(*) FROM memory_items WHERE tenant_id = 'tenant-b'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(of_b, 0);
    // Writing into another tenant is refused by the policy's check.
    let forged =
        sqlx::query("INSERT INTO users (tenant_id, user_id) VALUES ('tenant-b', 'mallory')")
            .execute(&mut *tx)
            .await;
    assert!(
        forged.is_err(),
        "row-level security let a write into tenant B through"
    );
    tx.rollback().await.unwrap();
    // The audit log is append-only for the worker's role.
    let deleted = sqlx::query("DELETE FROM audit_log").execute(&mut app).await;
    assert!(
        deleted.is_err(),
        "the worker's role may delete audit entries"
    );
    // And the role cannot change the schema.
    assert!(
        sqlx::query("DROP TABLE memory_items")
            .execute(&mut app)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn admin_api_manages_tenants_keys_and_limits() {
    let stub = stub().await;
    let (mut config, _db) = with_backend(stub_config(&stub), true).await;
    config.pipeline.poll_interval_ms = 20;
    let server = TestServer::start(config).await;
    let admin = &server.http;
    let base = &server.base;
    let (status, body) = call(
        admin,
        base,
        Method::POST,
        "/admin/v1/tenants",
        Some(json!({"tenant_id": "acme", "name": "Acme", "limits": {"rate_limit_rps": 1.0}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = call(
        admin,
        base,
        Method::POST,
        "/admin/v1/tenants",
        Some(json!({"tenant_id": "Bad/Id"})),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("tenant_id"), "{body}");
    let (status, _) = call(
        admin,
        base,
        Method::POST,
        "/admin/v1/tenants",
        Some(json!({"tenant_id": "acme"})),
    )
    .await;
    assert_eq!(status, 409);
    let (status, body) = call(
        admin,
        base,
        Method::POST,
        "/admin/v1/tenants/acme/keys",
        Some(json!({"name": "app", "scopes": ["read", "write"]})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let key = created["api_key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    let (status, body) = call(
        admin,
        base,
        Method::POST,
        "/admin/v1/tenants/acme/keys",
        Some(json!({"scopes": ["root"]})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(body.contains("root"), "{body}");
    // Listing shows the key without its secret.
    let (_, listed) = call(
        admin,
        base,
        Method::GET,
        "/admin/v1/tenants/acme/keys",
        None,
    )
    .await;
    assert!(
        listed.contains(&key_id) && !listed.contains(&key),
        "{listed}"
    );

    // Rate limit: 1 request/s with a burst of 2 → the third quick request waits.
    let app = authorized_client(&key);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = app
            .get(format!("{base}/api/v1/users/u/items"))
            .send()
            .await
            .unwrap();
        statuses.push((
            response.status().as_u16(),
            response.headers().get("retry-after").cloned(),
        ));
    }
    assert_eq!(statuses[0].0, 200);
    assert_eq!(statuses[2].0, 429, "{statuses:?}");
    assert!(statuses[2].1.is_some(), "429 without Retry-After");

    // Daily memorize quota: one job, then 429 until midnight UTC.
    let (status, body) = call(
        admin,
        base,
        Method::PUT,
        "/admin/v1/tenants/acme/limits",
        Some(json!({"memorize_per_day": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let job = json!({"user_id": "q", "conversation": [{"role": "user", "content": "one"}]});
    let (status, body) = call(
        &app,
        base,
        Method::POST,
        "/api/v3/memory/memorize",
        Some(job.clone()),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let job2 = json!({"user_id": "q", "conversation": [{"role": "user", "content": "two"}]});
    let response = app
        .post(format!("{base}/api/v3/memory/memorize"))
        .json(&job2)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&wait));

    // A tenant key cannot use the admin API; revocation applies at once.
    let (status, _) = call(&app, base, Method::GET, "/admin/v1/tenants", None).await;
    assert_eq!(status, 403);
    let (status, _) = call(
        admin,
        base,
        Method::DELETE,
        &format!("/admin/v1/tenants/acme/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(&app, base, Method::GET, "/api/v1/users/u/items", None).await;
    assert_eq!(status, 401);
    let (status, _) = call(
        admin,
        base,
        Method::DELETE,
        "/admin/v1/tenants/acme/keys/nope",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = call(
        admin,
        base,
        Method::GET,
        "/admin/v1/tenants/acme/costs",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn erase_leaves_nothing_of_the_user_in_any_table() {
    let stub = stub().await;
    let (config, backend) = with_backend(stub_config(&stub), true).await;
    let common::Backend::Postgres(dsn) = backend else {
        unreachable!()
    };
    let server = TestServer::start(config).await;
    let a = authorized_client(&issue_key(&server.service, "tenant-a", "read,write").await);
    let b = authorized_client(&issue_key(&server.service, "tenant-b", "read,write").await);
    memorize(&server, &a, "erin", &format!("I live in {SECRET_A}.")).await;
    memorize(&server, &b, "erin", &format!("I live in {SECRET_B}.")).await;
    // A queued job of the user is part of what is erased.
    let (status, _) = call(
        &a,
        &server.base,
        Method::GET,
        "/api/v1/users/erin/export",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (_, export) = call(
        &a,
        &server.base,
        Method::GET,
        "/api/v1/users/erin/export",
        None,
    )
    .await;
    let export: Value = serde_json::from_str(&export).unwrap();
    assert_eq!(export["tenant_id"], "tenant-a");
    assert!(!export["memory_items"].as_array().unwrap().is_empty());
    assert!(
        export["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["target_user"] == "erin")
    );

    let (status, body) = call(&a, &server.base, Method::DELETE, "/api/v1/users/erin", None).await;
    assert_eq!(status, 200, "{body}");
    let mut conn = sqlx::PgConnection::connect(&dsn).await.unwrap();
    for table in [
        "users",
        "resources",
        "memory_items",
        "memory_categories",
        "category_items",
        "memorize_tasks",
        "llm_usage",
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE tenant_id = 'tenant-a' AND user_id = 'erin'"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(n, 0, "{table} still holds the erased user");
        let other: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE tenant_id = 'tenant-b' AND user_id = 'erin'"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if table == "users" || table == "memory_items" {
            assert!(
                other > 0,
                "erasing tenant A's erin touched tenant B's erin in {table}"
            );
        }
    }
    let named: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE tenant_id = 'tenant-a' AND target_user = 'erin'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(named, 0, "the audit log still names the erased user");
    let text: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(summary, ' '), '') FROM memory_items WHERE tenant_id = 'tenant-a'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(!text.contains(SECRET_A));
}
