//! Metric names used by PromQL expressions — the alert rules
//! (`charts/memu-operator/files/prometheus-rules.yaml`) and the Grafana dashboard
//! (`config/grafana/memu-dashboard.json`) — and the names a `/metrics` page exports, so that the
//! tests can fail on every name that is used but not exported.
//!
//! The extractor is a small tokenizer, not a full PromQL parser: it skips strings, comments,
//! label matchers (`{...}`, except an exact `__name__="..."`), ranges and subqueries (`[...]`),
//! numbers and durations, Grafana variables (`$x`, `${x}`), the label lists of
//! `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`, keywords and aggregation operators,
//! and every identifier followed by `(` (a function). What is left is a metric name.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

/// Identifiers that are never metric names where they stand (compared lower-cased).
const KEYWORDS: &[&str] = &[
    // binary and set operators, modifiers
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    // aggregation operators (they may stand before `by (...)` rather than `(`)
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // number literals
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal that starts at `start` (a `"`, `'` or `` ` ``).
fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unterminated string starting at offset {start}"))
}

/// Index just past the bracket that closes the one at `start`, skipping strings inside.
fn skip_group(chars: &[char], start: usize, open: char, close: char) -> Result<usize, String> {
    let mut depth = 0usize;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i)?;
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    Err(format!("unbalanced '{open}' at offset {start}"))
}

fn skip_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// `__name__="x"` inside a label matcher names the metric `x`.
fn name_matcher(matchers: &str) -> Option<String> {
    let rest = matchers.split("__name__").nth(1)?.trim_start();
    let rest = rest.strip_prefix('=')?;
    if rest.starts_with('=') || rest.starts_with('~') {
        return None;
    }
    let rest = rest.trim_start().strip_prefix('"')?;
    rest.split('"').next().map(str::to_string)
}

/// Every metric name an expression selects.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut parens = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i)?,
            '(' => {
                parens += 1;
                i += 1;
            }
            ')' => {
                parens = parens
                    .checked_sub(1)
                    .ok_or_else(|| format!("unbalanced ')' at offset {i}"))?;
                i += 1;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                let end = skip_group(&chars, i, '{', '}')?;
                let inner: String = chars[i + 1..end - 1].iter().collect();
                // `${var}` never gets here: `$` consumes it below.
                names.extend(name_matcher(&inner));
                i = end;
            }
            '[' => i = skip_group(&chars, i, '[', ']')?,
            '}' | ']' => return Err(format!("unbalanced '{c}' at offset {i}")),
            '$' => {
                i += 1;
                if i < chars.len() && chars[i] == '{' {
                    i = skip_group(&chars, i, '{', '}')?;
                } else {
                    while i < chars.len() && is_ident_char(chars[i]) {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // Numbers (1, 0.5, 1e-3, 0x1f) and durations (5m, 1h30m).
                let start = i;
                i += 1;
                while i < chars.len() {
                    let d = chars[i];
                    let exponent_sign = (d == '-' || d == '+')
                        && matches!(chars[i - 1], 'e' | 'E')
                        && !chars[start..i].iter().any(|&x| x == 'x' || x == 'X');
                    if d.is_ascii_alphanumeric() || d == '.' || d == '_' || exponent_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                let ident: String = chars[start..i].iter().collect();
                let lower = ident.to_ascii_lowercase();
                let next = skip_space(&chars, i);
                let followed_by_paren = chars.get(next) == Some(&'(');
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if followed_by_paren {
                        i = skip_group(&chars, next, '(', ')')?;
                    }
                } else if KEYWORDS.contains(&lower.as_str()) || followed_by_paren {
                    // an operator, or a function call
                } else {
                    names.insert(ident);
                }
            }
            _ => i += 1,
        }
    }
    if parens > 0 {
        return Err("unbalanced '('".into());
    }
    Ok(names)
}

/// One PromQL expression and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// E.g. `prometheus-rules.yaml: alert HighErrorRate` or `dashboard: panel "Queue depth"`.
    pub place: String,
    pub expr: String,
}

/// The `expr` of every rule of a Prometheus rule-group document (`groups: [{rules: [...]}]`).
pub fn rule_expressions(yaml: &str) -> Result<Vec<Usage>, String> {
    let doc: Value = serde_norway::from_str(yaml).map_err(|e| format!("rule file: {e}"))?;
    let groups = doc["groups"]
        .as_array()
        .ok_or("rule file: no top-level `groups` list")?;
    let mut out = Vec::new();
    for group in groups {
        let rules = group["rules"]
            .as_array()
            .ok_or_else(|| format!("rule group {} has no rules list", group["name"]))?;
        for rule in rules {
            let name = rule["alert"]
                .as_str()
                .or_else(|| rule["record"].as_str())
                .ok_or("a rule without `alert` or `record`")?;
            let expr = rule["expr"]
                .as_str()
                .ok_or_else(|| format!("rule {name} has no expr"))?;
            out.push(Usage {
                place: format!("alert rule {name}"),
                expr: expr.to_string(),
            });
        }
    }
    Ok(out)
}

/// The PromQL of a Grafana query variable: `label_values(expr, label)` and
/// `query_result(expr)` give their expression; `label_values(label)` and `metrics(re)` none.
fn variable_expression(query: &str) -> Option<String> {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        // The label is the last argument; the metric expression (if any) precedes it.
        return args.rsplit_once(',').map(|(expr, _label)| expr.to_string());
    }
    if let Some(expr) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Some(expr.to_string());
    }
    if q.starts_with("metrics(") || q.starts_with("label_names(") {
        return None;
    }
    Some(q.to_string())
}

/// Every PromQL expression of a Grafana dashboard: panel targets (rows' nested panels too) and
/// query variables.
pub fn dashboard_expressions(dashboard: &Value) -> Vec<Usage> {
    fn panels(list: &Value, out: &mut Vec<Usage>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(Usage {
                        place: format!("dashboard panel \"{title}\""),
                        expr: expr.to_string(),
                    });
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let query = match &var["query"] {
            Value::String(s) => s.clone(),
            q => q["query"].as_str().unwrap_or_default().to_string(),
        };
        if let Some(expr) = variable_expression(&query) {
            out.push(Usage {
                place: format!(
                    "dashboard variable ${}",
                    var["name"].as_str().unwrap_or("?")
                ),
                expr,
            });
        }
    }
    out
}

/// The alert rules and the dashboard of this repository (`root` is the workspace).
pub fn repository_usages(root: &Path) -> Result<Vec<Usage>, String> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).map_err(|e| format!("{p}: {e}"));
    let mut out = rule_expressions(&read("charts/memu-operator/files/prometheus-rules.yaml")?)?;
    let dashboard: Value = serde_json::from_str(&read("config/grafana/memu-dashboard.json")?)
        .map_err(|e| format!("dashboard: {e}"))?;
    out.extend(dashboard_expressions(&dashboard));
    Ok(out)
}

/// The series names a Prometheus server scraping this OpenMetrics or Prometheus text can query:
/// a counter family `x` gives `x_total`, a histogram `x_bucket`, `x_sum` and `x_count`, a summary
/// `x`, `x_sum` and `x_count`, an info `x_info`; every sample line's name counts too.
pub fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for suffix in suffixes {
                let full = format!("{name}{suffix}");
                // A Prometheus-format counter family may already end in _total.
                names.insert(if kind == "counter" && name.ends_with("_total") {
                    name.to_string()
                } else {
                    full
                });
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Names used by `usages` (those `applies` selects) that are not in `exported` and not
/// `allowed` (name, reason): one line per name with the places that use it. Empty when all
/// are exported. An expression the extractor cannot read is reported too.
pub fn missing(
    usages: &[Usage],
    applies: impl Fn(&str) -> bool,
    exported: &BTreeSet<String>,
    allowed: &[(&str, &str)],
) -> Vec<String> {
    let mut by_name: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    let mut problems = Vec::new();
    for usage in usages {
        match metric_names(&usage.expr) {
            Ok(names) => {
                for name in names {
                    if applies(&name)
                        && !exported.contains(&name)
                        && !allowed.iter().any(|(a, _)| *a == name)
                    {
                        by_name.entry(name).or_default().insert(usage.place.clone());
                    }
                }
            }
            Err(e) => problems.push(format!(
                "{}: cannot read `{}`: {e}",
                usage.place, usage.expr
            )),
        }
    }
    problems.extend(by_name.into_iter().map(|(name, places)| {
        format!(
            "{name} (used by {})",
            places.into_iter().collect::<Vec<_>>().join(", ")
        )
    }));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).unwrap().into_iter().collect()
    }

    #[test]
    fn functions_operators_and_label_lists_are_not_names() {
        assert_eq!(
            names(
                r#"sum by (namespace, job) (rate(http_requests_total{route=~"/api/.+", status=~"5.."}[5m]))
                 / sum by (namespace, job) (rate(http_requests_total{route=~"/api/.+"}[5m])) > 0.001"#
            ),
            ["http_requests_total"]
        );
        assert_eq!(
            names(
                "histogram_quantile(0.99, sum by (le) (rate(memu_x_seconds_bucket[$__rate_interval])))"
            ),
            ["memu_x_seconds_bucket"]
        );
        assert_eq!(
            names(
                "a / on (pod) group_left (node) b unless ignoring(x) c or max without (y) (d) offset 1h"
            ),
            ["a", "b", "c", "d"]
        );
        assert_eq!(
            names("SUM BY (le) (rate(m[5m:1m])) and bool e > 1e-3 and f @ 1609746000"),
            ["e", "f", "m"]
        );
        assert_eq!(
            names("max(memu_operator_leader) < 1 or absent(memu_operator_leader)"),
            ["memu_operator_leader"]
        );
        assert_eq!(
            names(
                r#"label_replace(up{job="x"}, "dst", "$1", "src", "(.*)") + {__name__="named"} + recorded:rule:rate5m"#
            ),
            ["named", "recorded:rule:rate5m", "up"]
        );
        assert_eq!(
            names(r#"m{namespace=~"$namespace", pod="${pod}"} # a comment naming not_a_metric"#),
            ["m"]
        );
        assert!(metric_names("sum(rate(x[5m])").is_err());
        assert!(metric_names(r#"x{a="b}"#).is_err());
    }

    #[test]
    fn grafana_variables_give_their_expression() {
        let dashboard = serde_json::json!({
            "panels": [{"title": "row", "panels": [{"title": "p", "targets": [{"expr": "rate(a_total[1m])"}]}]}],
            "templating": {"list": [
                {"name": "ns", "type": "query", "query": {"query": "label_values(b_total{x=\"1\"}, namespace)"}},
                {"name": "lbl", "type": "query", "query": "label_values(job)"},
                {"name": "ds", "type": "datasource", "query": "prometheus"}
            ]}
        });
        let found: Vec<_> = dashboard_expressions(&dashboard)
            .into_iter()
            .map(|u| {
                metric_names(&u.expr)
                    .unwrap()
                    .into_iter()
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            found,
            [vec!["a_total".to_string()], vec!["b_total".to_string()]]
        );
    }

    #[test]
    fn exported_names_follow_the_metric_types() {
        let text = "# HELP http_requests Requests.\n# TYPE http_requests counter\n\
                    http_requests_total{route=\"/x\"} 1\n\
                    # TYPE lat_seconds histogram\n# TYPE depth gauge\ndepth 3\n# EOF\n";
        let names: Vec<_> = exported_names(text).into_iter().collect();
        assert_eq!(
            names,
            [
                "depth",
                "http_requests_total",
                "lat_seconds_bucket",
                "lat_seconds_count",
                "lat_seconds_sum"
            ]
        );
    }

    /// The check can fail: a name nobody exports (or the un-suffixed name of a counter or a
    /// histogram, the mistake of the requirements' example rule) is reported with its place.
    #[test]
    fn unknown_names_are_reported() {
        let exported = exported_names(
            "# TYPE http_request_duration_seconds histogram\n# TYPE http_requests counter\n",
        );
        let usages = vec![
            Usage {
                place: "alert rule LLMHighLatency".into(),
                expr: r#"histogram_quantile(0.99, http_request_duration_seconds{endpoint="/llm"}) > 10"#.into(),
            },
            Usage {
                place: "alert rule A".into(),
                expr: "rate(http_requests[5m]) + rate(http_requests_total[5m]) + kube_x".into(),
            },
            Usage {
                place: "dashboard panel \"B\"".into(),
                expr: "memu_operator_only".into(),
            },
        ];
        let report = missing(
            &usages,
            |n| !n.starts_with("memu_operator_"),
            &exported,
            &[("kube_x", "kube-state-metrics")],
        );
        assert_eq!(
            report,
            [
                "http_request_duration_seconds (used by alert rule LLMHighLatency)",
                "http_requests (used by alert rule A)"
            ]
        );
    }
}
