//! The operator's side of the metric-name check (the worker's is `worker/tests/metric_names.rs`):
//! every `memu_operator_*` name of the alert rules and the dashboard is in what
//! `OperatorMetrics::encode` serves on `/metrics` (with every family populated as the reconciler
//! does; `gitops_health.rs` scrapes a running operator too). And the shape of the rules and the
//! dashboard: `for`, severity, summary, description, a runbook section that exists, the
//! `${datasource}` variable everywhere.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memu_crds::cluster::{MemUCluster, MemUClusterStatus, WorkloadStatus};
use memu_e2e::promql;
use memu_operator::metrics::OperatorMetrics;
use memu_operator::reconcile::set_condition;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn cluster(name: &str, tier: &str) -> MemUCluster {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "memu.dev/v1alpha1", "kind": "MemUCluster",
        "metadata": {"name": name, "namespace": "apps"},
        "spec": {"tier": tier},
    }))
    .unwrap()
}

fn workload(desired: i32, ready: i32, selector: &str) -> WorkloadStatus {
    WorkloadStatus {
        desired_replicas: desired,
        ready_replicas: ready,
        summary: format!("{ready}/{desired}"),
        selector: selector.into(),
    }
}

#[test]
fn alert_and_dashboard_operator_names_are_exported() {
    let metrics = OperatorMetrics::default();
    metrics.observe(Duration::from_millis(20), true);
    metrics.observe(Duration::from_millis(20), false);
    metrics.errors.inc();
    metrics.leader.set(1);
    let mut status = MemUClusterStatus {
        phase: Some("Provisioning".into()),
        api: Some(workload(3, 1, "c=api")),
        pipeline: Some(workload(2, 2, "c=pipeline")),
        ..Default::default()
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        "False",
        "Progressing",
        "waiting",
        Some(1),
    );
    metrics.record_cluster(&cluster("memu-medium", "medium"), &status);
    let text = metrics.encode();
    let exported = promql::exported_names(&text);
    let usages = promql::repository_usages(&repo("")).unwrap();
    let missing = promql::missing(&usages, |n| n.starts_with("memu_operator_"), &exported, &[]);
    assert!(
        missing.is_empty(),
        "used by the alert rules or the dashboard but not exported by the operator:\n{}\n\n{text}",
        missing.join("\n")
    );
    assert!(
        text.contains(
            r#"memu_operator_workload_replicas{cluster_namespace="apps",cluster_name="memu-medium",tier="medium",component="api",state="ready"} 1"#
        ),
        "{text}"
    );
}

#[test]
fn cluster_gauges_follow_tier_phase_and_deletion() {
    let metrics = OperatorMetrics::default();
    let single = "app.kubernetes.io/component=worker";
    let mut status = MemUClusterStatus {
        phase: Some("Ready".into()),
        api: Some(workload(1, 1, single)),
        pipeline: Some(workload(1, 1, single)),
        ..Default::default()
    };
    set_condition(
        &mut status.conditions,
        "Ready",
        "True",
        "AllReplicasReady",
        "ok",
        Some(1),
    );
    metrics.record_cluster(&cluster("a", "small"), &status);
    let text = metrics.encode();
    assert!(
        text.contains(r#"memu_operator_cluster_ready{cluster_namespace="apps",cluster_name="a",tier="small"} 1"#),
        "{text}"
    );
    // One process serving both roles is one workload.
    assert_eq!(text.matches(r#"component="worker""#).count(), 2, "{text}");
    assert!(!text.contains(r#"component="api""#), "{text}");

    // A new tier and phase replace the old series instead of adding to them.
    status.phase = Some("Provisioning".into());
    status.api = Some(workload(3, 0, "c=api"));
    status.pipeline = Some(workload(2, 0, "c=pipeline"));
    set_condition(
        &mut status.conditions,
        "Ready",
        "False",
        "Progressing",
        "waiting",
        Some(2),
    );
    metrics.record_cluster(&cluster("a", "medium"), &status);
    metrics.record_cluster(&cluster("b", "small"), &status);
    let text = metrics.encode();
    assert!(!text.contains(r#"tier="small"} 1"#), "{text}");
    assert!(
        text.contains(r#"memu_operator_cluster_ready{cluster_namespace="apps",cluster_name="a",tier="medium"} 0"#),
        "{text}"
    );
    assert!(!text.contains(r#"phase="Ready""#), "{text}");
    assert!(!text.contains(r#"cluster_name="a",tier="small""#), "{text}");

    metrics.forget_cluster("apps", "a");
    let existing = BTreeSet::from([("apps".to_string(), "b".to_string())]);
    metrics.retain_clusters(&existing, std::time::Instant::now());
    let text = metrics.encode();
    assert!(!text.contains(r#"cluster_name="a""#), "{text}");
    assert!(text.contains(r#"cluster_name="b""#), "{text}");
    metrics.retain_clusters(&BTreeSet::new(), std::time::Instant::now());
    assert!(!metrics.encode().contains("cluster_name"));
}

/// A GitHub-style anchor of every heading of a Markdown file.
fn anchors(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_has_for_severity_annotations_and_a_runbook() {
    let rules: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo("charts/memu-operator/files/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    let docs = anchors(&std::fs::read_to_string(repo("docs/observability.md")).unwrap());
    let mut problems = Vec::new();
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("only alerting rules");
            alerts.insert(name.to_string());
            if rule["for"].as_str().is_none() {
                problems.push(format!("{name}: no `for`"));
            }
            if !["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or(""))
            {
                problems.push(format!("{name}: severity is not warning or critical"));
            }
            for key in ["summary", "description"] {
                if rule["annotations"][key].as_str().is_none_or(str::is_empty) {
                    problems.push(format!("{name}: no {key}"));
                }
            }
            match rule["annotations"]["runbook_url"]
                .as_str()
                .and_then(|u| u.strip_prefix("docs/observability.md#"))
            {
                Some(anchor) if docs.contains(anchor) => {}
                other => problems.push(format!(
                    "{name}: runbook_url {other:?} names no section of docs/observability.md"
                )),
            }
        }
    }
    // The requirements' alerts are all there.
    for wanted in [
        "HighErrorRate",
        "APIHighLatency",
        "VectorSearchSlow",
        "LLMHighLatency",
        "DatabasePoolExhausted",
        "MemorizeQueueBacklog",
        "MemUOperatorReconcileErrors",
        "MemUClusterNotReady",
    ] {
        if !alerts.contains(wanted) {
            problems.push(format!("alert {wanted} is missing"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_dashboard_reads_the_datasource_variable() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("config/grafana/memu-dashboard.json")).unwrap(),
    )
    .unwrap();
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "no prometheus datasource variable"
    );
    let mut seen = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        seen += 1;
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
    assert!(seen >= 20, "only {seen} panels");
}
