//! Hostile input against a running worker on Postgres: 10,000 random malformed requests get
//! 4xx answers only (never a 5xx, never a dropped connection), the worker stays healthy, and
//! the data is unchanged. Keys never show up in the worker's logs.

mod common;

use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};

use common::{TestServer, stub, stub_config, with_backend};

const REQUESTS: usize = 10_000;

/// Paths with a malformed id or a bad query, so that no request here is valid.
fn malformed_path(rng: &mut StdRng) -> (Method, String) {
    let junk = junk_text(rng, 40);
    let junk = urlencode(&junk);
    let bad_uuid =
        ["not-a-uuid", "0000", "%00", "..%2F..", &junk][rng.random_range(0..5)].to_string();
    let long_user = "u".repeat(rng.random_range(300..2000));
    let choices: Vec<(Method, String)> = vec![
        (
            Method::GET,
            format!("/api/v3/memory/memorize/status/{bad_uuid}"),
        ),
        (
            Method::POST,
            format!("/api/v3/memory/memorize/{bad_uuid}/retry"),
        ),
        (Method::GET, format!("/api/v1/users/alice/items/{bad_uuid}")),
        (
            Method::PATCH,
            format!("/api/v1/users/alice/items/{bad_uuid}"),
        ),
        (
            Method::DELETE,
            format!("/api/v1/users/alice/items/{bad_uuid}"),
        ),
        (Method::GET, format!("/api/v1/users/{long_user}/items")),
        (
            Method::GET,
            format!(
                "/api/v1/users/alice/items?limit={}",
                ["-1", "0", "abc", "99999"][rng.random_range(0..4)]
            ),
        ),
        (
            Method::GET,
            format!("/api/v1/users/alice/items?memory_type={junk}"),
        ),
        (Method::GET, "/api/v1/users/alice/items?cursor=nope".into()),
        (Method::GET, format!("/api/v1/users/alice/items?{junk}=1")),
        (Method::DELETE, format!("/api/v1/users/{long_user}")),
        (
            Method::GET,
            format!(
                "/admin/v1/tenants/alice/audit?limit={}",
                ["0", "x", "100000"][rng.random_range(0..3)]
            ),
        ),
        (Method::PUT, "/api/v3/memory/memorize".into()),
        (Method::GET, format!("/{junk}")),
        (Method::DELETE, "/api/v3/memory/retrieve".into()),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// Routes that take a JSON body; the body will be broken.
const BODY_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v3/memory/memorize"),
    ("POST", "/memorize"),
    ("POST", "/api/v3/memory/retrieve"),
    ("POST", "/retrieve"),
    ("POST", "/api/v3/memory/categories"),
    ("POST", "/clear"),
    ("POST", "/api/v1/users/alice/items"),
    ("POST", "/api/v1/users/alice/documents"),
    ("POST", "/admin/v1/tenants"),
    ("PUT", "/admin/v1/tenants/default/limits"),
    ("POST", "/admin/v1/tenants/default/keys"),
];

fn junk_text(rng: &mut StdRng, max: usize) -> String {
    let len = rng.random_range(1..max);
    (0..len)
        .map(|_| match rng.random_range(0..4) {
            0 => rng.random_range(b'!'..=b'~') as char,
            1 => char::from_u32(rng.random_range(0x80..0x2fff)).unwrap_or('?'),
            2 => ['"', '\\', '{', '[', '\u{0}', '\n'][rng.random_range(0..6)],
            _ => rng.random_range(b'a'..=b'z') as char,
        })
        .collect()
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A body that no route accepts: not JSON, cut off, too deep, wrongly typed, unknown fields,
/// fields over their limits, or invalid UTF-8.
fn malformed_body(rng: &mut StdRng) -> Vec<u8> {
    let valid = json!({"user_id": "alice", "query": "where", "conversation": [{"role": "user", "content": "hi"}]})
        .to_string();
    match rng.random_range(0..9) {
        0 => (0..rng.random_range(1..512)).map(|_| rng.random()).collect(),
        1 => valid.as_bytes()[..rng.random_range(1..valid.len() - 1)].to_vec(),
        2 => {
            let depth = rng.random_range(33..5000);
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        // Every route's body type fails on at least one of these fields.
        3 => json!({"user_id": rng.random::<u32>(), "query": [1, 2], "conversation": "x",
                    "tenant_id": {}, "memory_type": 7, "summary": [], "scopes": 5,
                    "rate_limit_rps": "fast", "text": {}})
            .to_string()
            .into_bytes(),
        4 => json!({"user_id": "", "sneaky": junk_text(rng, 30)}).to_string().into_bytes(),
        5 => json!({"user_id": "x".repeat(rng.random_range(300..3000)), "query": "q",
                    "conversation": [{"role": "user", "content": "c"}]})
            .to_string()
            .into_bytes(),
        6 => vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
        7 => json!({"user_id": "alice\u{0}", "conversation": [{"role": junk_text(rng, 10), "content": "c"}],
                    "query": "", "top_k": -5, "scopes": ["root"], "tenant_id": "Bad/Id",
                    "memory_type": "dream", "rate_limit_rps": -1.0, "text": ""})
            .to_string()
            .into_bytes(),
        _ => junk_text(rng, 200).into_bytes(),
    }
}

#[tokio::test]
async fn ten_thousand_malformed_requests_get_4xx_and_change_nothing() {
    let stub = stub().await;
    let (config, _db) = with_backend(stub_config(&stub), true).await;
    let server = TestServer::start(config).await;
    // Some data to keep unchanged.
    let (status, body) = server
        .post(
            "/api/v1/users/alice/items",
            json!({"memory_type": "profile", "summary": "Alice lives in Tromsø."}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let snapshot = |export: Value| {
        let mut export = export;
        // What changes by itself: the export's time and the audit trail of these very requests.
        export.as_object_mut().unwrap().remove("exported_at");
        export.as_object_mut().unwrap().remove("audit");
        export
    };
    let (_, before) = server.get("/api/v1/users/alice/export").await;
    let before = snapshot(before);
    let (_, tenants_before) = server.get("/admin/v1/tenants").await;

    let mut rng = StdRng::seed_from_u64(0x6d656d75);
    let mut requests = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let (method, path, body, content_type) = if rng.random_bool(0.5) {
            let (method, path) = BODY_ROUTES[rng.random_range(0..BODY_ROUTES.len())];
            let content_type = match rng.random_range(0..10) {
                0 => "text/plain",
                1 => "application/x-www-form-urlencoded",
                _ => "application/json",
            };
            (
                Method::from_bytes(method.as_bytes()).unwrap(),
                path.to_string(),
                Some(malformed_body(&mut rng)),
                content_type,
            )
        } else {
            let (method, path) = malformed_path(&mut rng);
            (method, path, None, "application/json")
        };
        let auth = match rng.random_range(0..10) {
            0 => Some(format!("Bearer {}", junk_text(&mut rng, 60))),
            1 => Some("Basic dXNlcjpwYXNz".to_string()),
            2 => None,
            _ => Some(format!("Bearer {}", server.api_key)),
        };
        requests.push((method, path, body, content_type, auth));
    }
    let http = reqwest::Client::new();
    let base = server.base.clone();
    let outcomes: Vec<(u16, String, String)> = futures::stream::iter(requests)
        .map(|(method, path, body, content_type, auth)| {
            let http = http.clone();
            let url = format!("{base}{path}");
            async move {
                let mut request = http
                    .request(method.clone(), &url)
                    .header("content-type", content_type);
                if let Some(auth) = auth
                    && let Ok(value) = reqwest::header::HeaderValue::from_str(&auth)
                {
                    request = request.header("authorization", value);
                }
                if let Some(body) = body {
                    request = request.body(body);
                }
                let response = request
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: connection failed: {e}"));
                let status = response.status().as_u16();
                (
                    status,
                    format!("{method} {path}"),
                    response.text().await.unwrap_or_default(),
                )
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(outcomes.len(), REQUESTS);
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (status, what, body) in &outcomes {
        assert!(
            (400..500).contains(status),
            "{what} answered {status}: {body}"
        );
        // Every refusal is a JSON error body.
        let parsed: Value = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("{what} answered {status} without JSON: {body}"));
        assert!(parsed["error"]["code"].is_string(), "{what}: {body}");
        *by_status.entry(*status).or_default() += 1;
    }
    // The mix reaches authentication, routing and validation alike.
    for status in [400, 401, 404, 415, 422] {
        assert!(
            by_status.contains_key(&status),
            "no {status} in {by_status:?}"
        );
    }

    let (status, _) = server.get("/readyz").await;
    assert_eq!(status, 200);
    let (_, after) = server.get("/api/v1/users/alice/export").await;
    assert_eq!(
        snapshot(after),
        before,
        "malformed requests changed the data"
    );
    let (_, tenants_after) = server.get("/admin/v1/tenants").await;
    assert_eq!(tenants_after, tenants_before);
}
