//! GitOps health of a MemUCluster: the Argo CD health script (`config/argocd/memucluster-health.lua`,
//! run by Debian's `lua5.4` with `obj` as a Lua table, as Argo CD passes it) and kstatus, the
//! library Flux's health checks use (`e2e/tools/kstatus`, built by `e2e/scripts/install-kstatus.sh`),
//! over the fixtures of `config/argocd/testdata/` and over the objects a real operator writes on
//! a real API server (`MEMU_TEST_KUBECONFIG`, started by `e2e/k8s/start.sh`).

use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use memu_crds::cluster::MemUCluster;
use serde_json::{Value, json};

mod common;
use common::{Operator, client, create_namespace, free_port, repo, small_sample_volume};

/// Lua source of a table constructor for a JSON value: objects become tables with string keys,
/// arrays sequences from index 1, null nil; integers stay Lua integers.
fn lua_value(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => format!("{f:?}"),
            (None, None) => n.to_string(),
        },
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            // Other control bytes and every non-ASCII byte as decimal escapes: exact UTF-8 bytes.
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03}")),
        }
    }
    out.push('"');
    out
}

/// (health status, message) the Argo CD health script gives `object`.
fn argocd_health(object: &Value) -> (String, String) {
    let script = std::fs::read_to_string(repo("config/argocd/memucluster-health.lua")).unwrap();
    let program = format!(
        "obj = {}\nlocal hs = (function()\n{script}\nend)()\n\
         assert(type(hs) == \"table\", \"the script returned no table\")\n\
         io.write(tostring(hs.status), \"\\n\", tostring(hs.message), \"\\n\")\n",
        lua_value(object)
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("health.lua");
    std::fs::write(&file, program).unwrap();
    let lua = std::env::var("MEMU_TEST_LUA").unwrap_or_else(|_| "lua5.4".into());
    let out = Command::new(&lua).arg(&file).output().unwrap_or_else(|e| {
        panic!("cannot run {lua} ({e}): run the suite through e2e/test.sh, which installs it with e2e/scripts/install-lua.sh")
    });
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

/// (status, message) kstatus computes for `object`.
fn kstatus(object: &Value) -> (String, String) {
    let tool = std::env::var("MEMU_TEST_KSTATUS").expect(
        "MEMU_TEST_KSTATUS is not set: run the suite through e2e/test.sh, which builds the tool \
         with e2e/scripts/install-kstatus.sh",
    );
    let mut child = Command::new(&tool)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(object.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kstatus-eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let mut fields = line.trim_end().splitn(3, '\t').skip(1);
    (
        fields.next().unwrap_or_default().to_string(),
        fields.next().unwrap_or_default().to_string(),
    )
}

#[test]
fn lua_tables_carry_json_values_exactly() {
    assert_eq!(
        lua_value(&json!({"a": [1, 2.5, null, true], "b": "x\"\\\né"})),
        r#"{["a"] = {1, 2.5, nil, true}, ["b"] = "x\"\\\n\195\169"}"#
    );
}

#[test]
fn fixtures_health_in_argocd_and_kstatus() {
    let dir = repo("config/argocd/testdata");
    let mut fixtures: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    fixtures.sort();
    assert!(fixtures.len() >= 6, "fixtures missing in {dir}");
    let mut failures = Vec::new();
    for path in &fixtures {
        let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        let object = &fixture["object"];
        let want = &fixture["expect"];
        let (status, message) = argocd_health(object);
        if status != want["argocd"]["status"].as_str().unwrap()
            || !message.contains(want["argocd"]["message"].as_str().unwrap())
        {
            failures.push(format!(
                "{name}: Argo CD health {status} \"{message}\", want {}",
                want["argocd"]
            ));
        }
        let (status, message) = kstatus(object);
        if status != want["kstatus"].as_str().unwrap() {
            failures.push(format!(
                "{name}: kstatus {status} \"{message}\", want {}",
                want["kstatus"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The argocd-cm snippet embeds the health script verbatim.
#[test]
fn argocd_cm_embeds_the_health_script() {
    let cm: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("config/argocd/argocd-cm-health.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    let embedded = cm["data"]["resource.customizations.health.memu.dev_MemUCluster"]
        .as_str()
        .expect("the health key of memu.dev/MemUCluster");
    let script = std::fs::read_to_string(repo("config/argocd/memucluster-health.lua")).unwrap();
    assert_eq!(
        embedded, script,
        "argocd-cm-health.yaml differs from memucluster-health.lua"
    );
}

// ---- against a real API server and operator ----

/// Polls `check` a bounded number of times until it yields a value.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..240 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("never happened: {what}");
}

fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// The object once the operator has written a status for its current generation in which
/// `condition` has `status`.
async fn observed(api: &Api<DynamicObject>, name: &str, kind: &str, status: &str) -> Value {
    eventually(
        &format!("{name}: {kind}={status} at its generation"),
        || async {
            let object = serde_json::to_value(api.get(name).await.ok()?).ok()?;
            let current =
                object["status"]["observedGeneration"] == object["metadata"]["generation"];
            (current && condition(&object, kind).is_some_and(|c| c["status"] == status))
                .then_some(object)
        },
    )
    .await
}

#[tokio::test]
async fn live_status_is_health_for_argocd_and_flux() {
    let client = client().await;
    common::apply_yaml_file(&client, "crds/yaml/memucluster.yaml").await;
    let ns = format!("gitops-{}", std::process::id());
    let namespaces = create_namespace(&client, &ns).await;

    let port = free_port();
    let kubeconfig = common::kubeconfig_path();
    let metrics_addr = format!("127.0.0.1:{port}");
    let _operator = Operator::spawn(
        [
            "--lease-namespace",
            &ns,
            "--watch-namespace",
            &ns,
            "--identity",
            "gitops",
            "--metrics-addr",
            &metrics_addr,
        ],
        [
            ("KUBECONFIG", kubeconfig.as_str()),
            ("RUST_LOG", "info,kube=warn"),
        ],
        &format!("memu-gitops-{ns}"),
    );

    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &ApiResource::erase::<MemUCluster>(&()));
    let create = |name: &str, spec: Value| {
        let api = api.clone();
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "memu.dev/v1alpha1", "kind": "MemUCluster",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        async move { api.create(&PostParams::default(), &object).await.unwrap() }
    };
    // Ready: the small sample (a StatefulSet that becomes ready on a kwok node), with a volume
    // for its SQLite claim (the test cluster has no provisioner).
    let pv = small_sample_volume(&client, &ns).await;
    let sample = common::sample("small");
    create("memu-small", sample["spec"].clone()).await;
    // Reconciling: the API pods wait for a certificate Secret that does not exist.
    create(
        "memu-waiting",
        json!({"tier": "small", "tls": {"secretName": "no-such-certificate"}}),
    )
    .await;
    // Stalled: a spec the operator cannot realise.
    create(
        "memu-stalled",
        json!({"tier": "medium", "database": {"topology": "replicas", "managed": {"instances": 1}}}),
    )
    .await;

    let ready = observed(&api, "memu-small", "Ready", "True").await;
    let waiting = observed(&api, "memu-waiting", "Reconciling", "True").await;
    let stalled = observed(&api, "memu-stalled", "Stalled", "True").await;
    // Stale: the ready object as a client sees it right after a spec change, before the
    // operator's next status.
    let mut stale = ready.clone();
    stale["metadata"]["generation"] = json!(ready["metadata"]["generation"].as_i64().unwrap() + 1);

    let cases = [
        ("ready", &ready, "Healthy", "Current"),
        ("reconciling", &waiting, "Progressing", "InProgress"),
        ("stalled", &stalled, "Degraded", "Failed"),
        ("stale generation", &stale, "Progressing", "InProgress"),
    ];
    let mut failures = Vec::new();
    for (case, object, argo, flux) in cases {
        let (a, a_message) = argocd_health(object);
        let (k, k_message) = kstatus(object);
        if a != argo || k != flux {
            failures.push(format!(
                "{case}: Argo CD {a} \"{a_message}\" (want {argo}), kstatus {k} \"{k_message}\" (want {flux})\n{object:#}"
            ));
        }
    }
    // The messages say why: the operator's Stalled message, the missing Secret.
    let (_, message) = argocd_health(&stalled);
    assert!(
        message.contains("instances of 2 or more") || message.contains("CloudNativePG"),
        "{message}"
    );
    let (_, message) = kstatus(&waiting);
    assert!(
        message.contains("no-such-certificate"),
        "kstatus message: {message}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The operator's per-cluster gauges, scraped from its /metrics.
    let metrics = eventually("operator metrics with the three clusters", || async {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (text.matches("memu_operator_cluster_ready{").count() >= 3).then_some(text)
    })
    .await;
    let sample_value = |series: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    let labels = |name: &str, tier: &str| {
        format!(r#"cluster_namespace="{ns}",cluster_name="{name}",tier="{tier}""#)
    };
    assert_eq!(
        sample_value(&format!(
            "memu_operator_cluster_ready{{{}}}",
            labels("memu-small", "small")
        ))
        .as_deref(),
        Some("1"),
        "{metrics}"
    );
    assert_eq!(
        sample_value(&format!(
            "memu_operator_cluster_ready{{{}}}",
            labels("memu-stalled", "medium")
        ))
        .as_deref(),
        Some("0"),
        "{metrics}"
    );
    assert_eq!(
        sample_value(&format!(
            "memu_operator_workload_replicas{{{},component=\"worker\",state=\"ready\"}}",
            labels("memu-small", "small")
        ))
        .as_deref(),
        Some("1"),
        "{metrics}"
    );
    // Every memu_operator_* name of the alert rules and the dashboard is exported by the
    // running operator.
    let usages = memu_e2e::promql::repository_usages(std::path::Path::new(&repo(""))).unwrap();
    let exported = memu_e2e::promql::exported_names(&metrics);
    let missing =
        memu_e2e::promql::missing(&usages, |n| n.starts_with("memu_operator_"), &exported, &[]);
    assert!(
        missing.is_empty(),
        "used but not exported by the running operator:\n{}",
        missing.join("\n")
    );

    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    let _ = Api::<PersistentVolume>::all(client.clone())
        .delete(&pv, &DeleteParams::background())
        .await;
}
