//! The Helm chart (`charts/memu-operator`): `helm lint`, `helm template` of the default and of
//! every optional object through `kubeconform -strict` against JSON schemas made offline (the
//! built-in kinds from the test API server's OpenAPI document, MemUCluster from its CRD), and
//! what the rendered objects must carry (the generated ClusterRole, the operator's flags, the
//! hardening, the image the Dockerfile builds).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::{Helm, chart, helm_or_skip, repo, yaml_documents};
use memu_crds::cluster::MemUCluster;
use serde_json::{Map, Value, json};

/// Kinds the chart can render that have no schema here, and why.
const NO_SCHEMA: &[(&str, &str)] = &[(
    "PrometheusRule",
    "prometheus-operator's PrometheusRule CRD is not among e2e/k8s/crds/optional-crds.yaml, and \
     its schema cannot be fetched offline",
)];

/// Every optional object of the chart switched on, and the optional flags set.
const ALL_ON: &[&str] = &[
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "watchNamespace=apps",
    "--set",
    "serviceMonitor.labels.release=prometheus",
    "--set",
    "prometheusRule.labels.release=prometheus",
    "--set",
    "image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
];

fn template(helm: &Helm, extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "memu",
        chart.as_str(),
        "--namespace",
        "memu-system",
    ];
    args.extend_from_slice(extra);
    yaml_documents(&helm.run(&args))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn helm_lint_passes_with_defaults_and_with_every_toggle_and_refuses_unknown_values() {
    let Some(helm) = helm_or_skip("helm lint", false) else {
        return;
    };
    let chart = chart();
    helm.run(&["lint", "--strict", &chart]);
    let mut all = vec!["lint", "--strict", chart.as_str()];
    all.extend_from_slice(ALL_ON);
    helm.run(&all);

    // values.schema.json is strict: an unknown or mistyped value stops lint and install.
    for (bad, message) in [
        ("replicaCount=0", "minimum"),
        (
            "serviceMonitor.enable=true",
            "additional properties 'enable' not allowed",
        ),
        ("bogus=1", "additional properties 'bogus' not allowed"),
        ("metrics.port=70000", "maximum"),
        ("image.pullPolicy=Sometimes", "value must be one of"),
    ] {
        let out = helm.output(&["lint", &chart, "--set", bad]);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} must be refused: {text}");
        assert!(text.contains(message), "{bad}: {text}");
    }
}

#[test]
fn the_chart_follows_the_workspace_and_carries_the_generated_crd_and_role() {
    let Some(helm) = helm_or_skip("chart contents", false) else {
        return;
    };
    let meta: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("charts/memu-operator/Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["version"],
        env!("CARGO_PKG_VERSION"),
        "run scripts/sync-chart.sh"
    );
    assert_eq!(
        meta["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "run scripts/sync-chart.sh"
    );
    assert_eq!(
        std::fs::read_to_string(repo("charts/memu-operator/crds/memucluster.yaml")).unwrap(),
        std::fs::read_to_string(repo("crds/yaml/memucluster.yaml")).unwrap(),
        "the chart's CRD is stale: run scripts/sync-chart.sh"
    );

    let docs = template(&helm, &[]);
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount"
        ]),
        "ServiceMonitor and PrometheusRule are off by default"
    );
    // The ClusterRole is exactly the generated least-privilege role (it covers the leader Lease,
    // so the chart needs no Role of its own).
    let role = find(&docs, "ClusterRole");
    let generated = serde_json::to_value(memu_operator::rbac::cluster_role()).unwrap();
    assert_eq!(role["rules"], generated["rules"]);
    assert!(
        generated["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["apiGroups"][0] == "coordination.k8s.io" && r["resources"][0] == "leases")
    );
    let binding = find(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], "memu-system");

    // The Deployment: two replicas, leader election in the release namespace with the pod name
    // as identity, probes on /healthz of the metrics port, hardened pod and container.
    let deployment = find(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"],
        find(&docs, "ServiceAccount")["metadata"]["name"]
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        format!(
            "ghcr.io/memu-k8s/memu-operator:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for arg in [
        "--metrics-addr=0.0.0.0:8081",
        "--lease-namespace=$(POD_NAMESPACE)",
        "--lease-name=memu-memu-operator",
        "--lease-seconds=15",
        "--identity=$(POD_NAME)",
    ] {
        assert!(args.contains(&arg), "{arg} in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--watch-namespace")),
        "all namespaces by default"
    );
    let field = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()["valueFrom"]["fieldRef"]["fieldPath"]
            .clone()
    };
    assert_eq!(field("POD_NAME"), "metadata.name");
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(
        c["ports"][0],
        json!({"name": "metrics", "containerPort": 8081, "protocol": "TCP"})
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            c[probe]["httpGet"],
            json!({"path": "/healthz", "port": "metrics"}),
            "{probe}"
        );
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"]["memory"].is_string());
    let service = find(&docs, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // The toggles: a ServiceMonitor on the metrics Service, the rules of the shared file, one
    // namespace watched, the digest pinned.
    let docs = template(&helm, ALL_ON);
    let monitor = find(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"]
    );
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    let rules: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("charts/memu-operator/files/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        find(&docs, "PrometheusRule")["spec"]["groups"],
        rules["groups"]
    );
    let c = &find(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--watch-namespace=apps"))
    );
    assert!(c["image"].as_str().unwrap().ends_with(
        "memu-operator@sha256:0000000000000000000000000000000000000000000000000000000000000000"
    ));

    // Runbook links absolute where the docs are served; every alert links its own section.
    let docs = template(
        &helm,
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.runbookBaseUrl=https://docs.example.org/memu/",
        ],
    );
    let runbooks = std::fs::read_to_string(repo("docs/observability.md")).unwrap();
    let mut links = 0;
    for group in find(&docs, "PrometheusRule")["spec"]["groups"]
        .as_array()
        .unwrap()
    {
        for rule in group["rules"].as_array().unwrap() {
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            let anchor = url
                .strip_prefix("https://docs.example.org/memu/observability.md#")
                .unwrap_or_else(|| panic!("{url}"));
            assert_eq!(anchor, rule["alert"].as_str().unwrap().to_lowercase());
            assert!(
                runbooks.contains(&format!("### {}\n", rule["alert"].as_str().unwrap())),
                "docs/observability.md has no section for {anchor}"
            );
            links += 1;
        }
    }
    assert_eq!(links, 16);
    let refused = helm.output(&[
        "template",
        "memu",
        chart().as_str(),
        "--set",
        "prometheusRule.runbookBaseUrl=docs.example.org",
    ]);
    assert!(
        !refused.status.success(),
        "a base URL without a scheme is refused"
    );

    // One replica: no disruption budget that could never be satisfied.
    let docs = template(&helm, &["--set", "replicaCount=1"]);
    assert!(!docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
}

/// The Dockerfile builds what the chart and the operator run: the operator at the chart's
/// command, the worker with its entrypoint (the operator passes only `serve …` / `migrate`), and
/// the local model where the operator's rendered configuration points.
#[test]
fn the_images_match_the_chart_and_the_operators_rendered_pods() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let chart_deployment =
        std::fs::read_to_string(repo("charts/memu-operator/templates/deployment.yaml")).unwrap();
    assert!(chart_deployment.contains("- /usr/local/bin/memu-operator"));
    assert!(
        dockerfile.contains("COPY --from=build /out/memu-operator /usr/local/bin/memu-operator")
    );
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/memu-operator"]"#));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/memu-worker"]"#));
    assert!(
        dockerfile.contains("USER 65532:65532"),
        "the uid the rendered pods run as"
    );

    let small: MemUCluster = serde_json::from_value(common::sample("small")).unwrap();
    let config = memu_operator::render::worker_config(&small).unwrap();
    let model_dir = config.providers["local"].model_dir.clone().unwrap();
    let model_dir = model_dir.display().to_string();
    assert!(
        dockerfile.contains(&format!("COPY --from=model {model_dir} {model_dir}")),
        "the worker image carries the model at {model_dir}"
    );

    // One name per image across the chart, the operator's default and the docs.
    let worker_repo = memu_operator::render::DEFAULT_IMAGE
        .rsplit_once(':')
        .unwrap()
        .0;
    let values: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("charts/memu-operator/values.yaml")).unwrap(),
    )
    .unwrap();
    let operator_repo = values["image"]["repository"].as_str().unwrap();
    for doc in ["docs/images.md", "docs/install.md", "Dockerfile"] {
        let text = std::fs::read_to_string(repo(doc)).unwrap();
        assert!(text.contains(operator_repo), "{doc} names {operator_repo}");
        assert!(text.contains(worker_repo), "{doc} names {worker_repo}");
    }
}

#[tokio::test]
async fn rendered_manifests_pass_kubeconform_strict_against_offline_schemas() {
    let Some(helm) = helm_or_skip("kubeconform", true) else {
        return;
    };
    let Some(kubeconform) = std::env::var_os("MEMU_TEST_KUBECONFORM") else {
        eprintln!("skipped kubeconform: MEMU_TEST_KUBECONFORM is not set (e2e/test.sh sets it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mut include_crds = vec!["--include-crds"];
    include_crds.extend_from_slice(ALL_ON);
    let mut rendered = vec![
        ("default.yaml", template(&helm, &["--include-crds"])),
        ("all-on.yaml", template(&helm, ALL_ON)),
    ];
    rendered.push(("all-on-with-crds.yaml", template(&helm, &include_crds)));
    let samples: Vec<Value> = ["small", "medium", "large"]
        .iter()
        .map(|s| common::sample(s))
        .collect();
    rendered.push(("samples.yaml", samples));
    let mut expected = 0;
    let mut kinds = BTreeSet::new();
    for (file, docs) in &rendered {
        expected += docs.len();
        for d in docs {
            kinds.insert((
                d["apiVersion"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
            ));
        }
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect();
        std::fs::write(manifests.join(file), text.join("---\n")).unwrap();
    }

    // Schemas: the built-in kinds from the API server's OpenAPI v2 document, MemUCluster (and any
    // other CRD the repository carries) from the CRD's openAPIV3Schema.
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    let openapi = openapi_v2(&common::client().await).await;
    let mut crds = vec![];
    for file in [
        "charts/memu-operator/crds/memucluster.yaml",
        "e2e/k8s/crds/optional-crds.yaml",
    ] {
        crds.extend(yaml_documents(
            &std::fs::read_to_string(repo(file)).unwrap(),
        ));
    }
    let skipped: BTreeMap<&str, &str> = NO_SCHEMA.iter().copied().collect();
    for (api_version, kind) in &kinds {
        let schema = builtin_schema(&openapi, api_version, kind)
            .or_else(|| crd_schema(&crds, api_version, kind));
        match (schema, skipped.get(kind.as_str())) {
            (Some(schema), None) => std::fs::write(
                schemas.join(schema_file(api_version, kind)),
                serde_json::to_vec(&schema).unwrap(),
            )
            .unwrap(),
            (None, Some(_)) => {}
            (Some(_), Some(why)) => {
                panic!("{kind} has a schema now: drop it from NO_SCHEMA ({why})")
            }
            (None, None) => {
                panic!("no schema for {api_version} {kind}: add one or explain it in NO_SCHEMA")
            }
        }
    }

    let location = format!(
        "{}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        schemas.display()
    );
    let run = |path: &Path| {
        let mut cmd = Command::new(&kubeconform);
        cmd.args([
            "-strict",
            "-verbose",
            "-output",
            "json",
            "-schema-location",
            &location,
        ]);
        let skip: Vec<&str> = NO_SCHEMA.iter().map(|(kind, _)| *kind).collect();
        cmd.args(["-skip", &skip.join(",")]);
        let out = cmd.arg(path).output().unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kubeconform output: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), report)
    };
    let (ok, report) = run(&manifests);
    let resources = report["resources"].as_array().unwrap();
    let not_valid: Vec<&Value> = resources
        .iter()
        .filter(|r| {
            r["status"] != "statusValid"
                && !(r["status"] == "statusSkipped"
                    && skipped.contains_key(r["kind"].as_str().unwrap()))
        })
        .collect();
    assert!(ok && not_valid.is_empty(), "kubeconform: {not_valid:#?}");
    assert_eq!(
        resources.len(),
        expected,
        "every rendered object was checked: {report:#}"
    );

    // The schemas are strict and real: an unknown field or a wrong type is refused.
    let mut broken = rendered[0].1.clone();
    let d = broken
        .iter_mut()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    d["spec"]["template"]["spec"]["containers"][0]["imagePullPolize"] = json!("Always");
    let mut sample = common::sample("small");
    sample["spec"]["tire"] = json!("small");
    let mut service = find(&rendered[0].1, "Service").clone();
    service["spec"]["ports"][0]["port"] = json!("eighty");
    for (name, doc) in [
        ("deployment", d.clone()),
        ("memucluster", sample),
        ("service", service),
    ] {
        let path = dir.path().join(format!("broken-{name}.yaml"));
        std::fs::write(&path, serde_norway::to_string(&doc).unwrap()).unwrap();
        let (ok, report) = run(&path);
        assert!(!ok, "{name}: {report:#}");
        assert_eq!(
            report["resources"][0]["status"], "statusInvalid",
            "{name}: {report:#}"
        );
    }
}

async fn openapi_v2(client: &kube::Client) -> Value {
    // GET /openapi/v2 (JSON), built with kube's request builder.
    let request = kube::core::Request::new("/openapi")
        .get("v2", &Default::default())
        .unwrap();
    serde_json::from_str(&client.request_text(request).await.unwrap()).unwrap()
}

/// kubeconform's file name for a kind: `{{ .ResourceKind }}{{ .KindSuffix }}.json`, where the
/// suffix is `-<first label of the group>-<version>` (`-<version>` for the core group).
fn schema_file(api_version: &str, kind: &str) -> String {
    let suffix = match api_version.split_once('/') {
        Some((group, version)) => format!("-{}-{version}", group.split('.').next().unwrap()),
        None => format!("-{api_version}"),
    };
    format!("{}{}.json", kind.to_lowercase(), suffix).to_lowercase()
}

/// A standalone strict JSON schema of a built-in kind: its OpenAPI v2 definition with every
/// definition it references (local `#/definitions/...` references, so recursive types work),
/// objects closed to unknown fields, int-or-string and quantities as the API server reads them.
fn builtin_schema(openapi: &Value, api_version: &str, kind: &str) -> Option<Value> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let definitions = openapi["definitions"].as_object().unwrap();
    let (name, _) = definitions.iter().find(|(_, d)| {
        d["x-kubernetes-group-version-kind"]
            .as_array()
            .is_some_and(|gvks| {
                gvks.iter()
                    .any(|g| g["group"] == group && g["version"] == version && g["kind"] == kind)
            })
    })?;
    let mut needed = BTreeSet::from([name.clone()]);
    let mut queue = vec![name.clone()];
    while let Some(next) = queue.pop() {
        let mut refs = vec![];
        collect_refs(&definitions[&next], &mut refs);
        for r in refs {
            if needed.insert(r.clone()) {
                queue.push(r);
            }
        }
    }
    let mut defs = Map::new();
    for n in &needed {
        let mut d = definitions[n].clone();
        match n.as_str() {
            "io.k8s.apimachinery.pkg.util.intstr.IntOrString" => {
                d = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]})
            }
            "io.k8s.apimachinery.pkg.api.resource.Quantity" => {
                d = json!({"oneOf": [{"type": "string"}, {"type": "number"}]})
            }
            _ => strict(&mut d),
        }
        defs.insert(n.clone(), d);
    }
    let mut root = defs[name].clone();
    root["definitions"] = Value::Object(defs);
    Some(root)
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.trim_start_matches("#/definitions/").to_string());
            }
            m.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Objects with declared properties refuse others (what `kubeconform -strict` expects of its
/// schemas), unless the schema keeps unknown fields.
fn strict(v: &mut Value) {
    match v {
        Value::Object(m) => {
            let keeps_unknown = m.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if m.contains_key("properties")
                && !m.contains_key("additionalProperties")
                && !keeps_unknown
            {
                m.insert("additionalProperties".into(), json!(false));
            }
            if m.remove("x-kubernetes-int-or-string") == Some(json!(true)) {
                m.remove("type");
                m.remove("anyOf");
                m.insert(
                    "oneOf".into(),
                    json!([{"type": "string"}, {"type": "integer"}]),
                );
            }
            if m.remove("nullable") == Some(json!(true))
                && let Some(Value::String(t)) = m.get("type").cloned()
            {
                m.insert("type".into(), json!([t, "null"]));
            }
            if m.get("format") == Some(&json!("int-or-string")) {
                m.remove("format");
            }
            for (key, child) in m.iter_mut() {
                // Property names are data, not schemas: descend into their values only.
                if key == "properties" || key == "definitions" {
                    if let Value::Object(props) = child {
                        props.values_mut().for_each(strict);
                    }
                } else if key != "example" && key != "default" && key != "enum" {
                    strict(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strict),
        _ => {}
    }
}

/// The strict JSON schema of a custom resource from its CRD's `openAPIV3Schema`, with the fields
/// every object has.
fn crd_schema(crds: &[Value], api_version: &str, kind: &str) -> Option<Value> {
    let (group, version) = api_version.split_once('/')?;
    let crd = crds
        .iter()
        .find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == kind)?;
    let v = crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == version)?;
    let mut schema = v["schema"]["openAPIV3Schema"].clone();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props
            .entry("apiVersion")
            .or_insert(json!({"type": "string"}));
        props.entry("kind").or_insert(json!({"type": "string"}));
        props.entry("metadata").or_insert(json!({"type": "object"}));
    }
    strict(&mut schema);
    Some(schema)
}
