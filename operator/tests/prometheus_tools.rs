//! The alert rules and the dashboard's queries through Prometheus's own tooling: `promtool`
//! (Debian's, unpacked by e2e/scripts/install-promtool.sh) checks the rule file, runs the rule
//! unit tests of config/prometheus/rules-test.yaml, and parses every dashboard expression.

use std::process::Command;

use serde_json::{Value, json};

fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

fn promtool(args: &[&str]) -> String {
    let tool = std::env::var("MEMU_TEST_PROMTOOL").expect(
        "MEMU_TEST_PROMTOOL is not set: run the suite through e2e/test.sh, which unpacks promtool \
         with e2e/scripts/install-promtool.sh",
    );
    let out = Command::new(&tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_load_and_fire_at_their_thresholds() {
    let rules = repo("charts/memu-operator/files/prometheus-rules.yaml");
    let checked = promtool(&["check", "rules", &rules]);
    assert!(checked.contains("SUCCESS: 16 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", &repo("config/prometheus/rules-test.yaml")]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_dashboard_expression_parses() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("config/grafana/memu-dashboard.json")).unwrap(),
    )
    .unwrap();
    let usages = memu_e2e::promql::dashboard_expressions(&dashboard);
    assert!(usages.len() > 20, "{} expressions", usages.len());
    // Grafana's variables, as Grafana substitutes them, then each expression as a recording rule.
    let rules: Vec<Value> = usages
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let expr = u
                .expr
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*");
            json!({"record": format!("dashboard_expression_{i}"), "expr": expr})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yaml");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let checked = promtool(&["check", "rules", &file.display().to_string()]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", usages.len())),
        "{checked}"
    );
}
