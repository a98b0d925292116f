//! Markdown of the results: a table per benchmark, the targets with what this run says of them,
//! and the block of `docs/benchmarks.md` between its markers.

use std::path::Path;

use serde_json::Value;

const BEGIN: &str = "<!-- memu-bench results: begin (written by memu-bench --write-docs) -->";
const END: &str = "<!-- memu-bench results: end -->";

fn num(v: &Value, decimals: usize) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => format!("{x:.decimals$}"),
        _ => "–".into(),
    }
}

fn int(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.is_finite() => {
            let digits = format!("{:.0}", x);
            // Thousands separated, as the targets are written.
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
                    out.push(',');
                }
                out.push(c);
            }
            out
        }
        _ => "–".into(),
    }
}

fn at(rows: &Value, concurrency: u64) -> &Value {
    rows.as_array()
        .and_then(|r| {
            r.iter()
                .find(|x| x["concurrency"].as_u64() == Some(concurrency))
        })
        .unwrap_or(&Value::Null)
}

fn retrieve_tables(r: &Value) -> String {
    let mut out = format!(
        "Memory bandwidth measured in this run: {} GB/s; k = {}.\n\n",
        num(&r["memory_bandwidth_gb_per_s"], 1),
        r["k"]
    );
    out += "Store search (query vector in, no HTTP). Latency in ms at concurrency 1; requests/s at 1 / 8 / 32; \
            the p50 as a multiple of an exact scan over the same vectors and of the memory-bandwidth floor.\n\n";
    out += "| memories | users | D | store | quantization | recall@10 | p50 | p95 | p99 | req/s 1 / 8 / 32 | × exact scan | × floor |\n";
    out += "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let cases = r["cases"].as_array().cloned().unwrap_or_default();
    for case in &cases {
        for v in case["variants"].as_array().into_iter().flatten() {
            let s = &v["search"];
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |\n",
                int(&case["memories"]),
                int(&case["users"]),
                case["dimension"],
                v["backend"].as_str().unwrap_or(""),
                v["quantization"].as_str().unwrap_or(""),
                num(&v["recall_at_10"], 3),
                num(&at(s, 1)["p50_ms"], 3),
                num(&at(s, 1)["p95_ms"], 3),
                num(&at(s, 1)["p99_ms"], 3),
                int(&at(s, 1)["requests_per_second"]),
                int(&at(s, 8)["requests_per_second"]),
                int(&at(s, 32)["requests_per_second"]),
                num(&at(s, 1)["p50_ratio_to_exact_scan"], 2),
                num(&at(s, 1)["p50_ratio_to_memory_floor"], 1),
            );
        }
    }
    out += "\nOver HTTP on loopback (`POST /api/v3/memory/retrieve`, API key, categories ranked, JSON; the \
            query text's embedding served from the worker's cache). Latency in ms.\n\n";
    out += "| memories | users | D | store | quantization | p50 @1 | p99 @1 | p50 @32 | p99 @32 | req/s 1 / 8 / 32 |\n";
    out += "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|\n";
    for case in &cases {
        for v in case["variants"].as_array().into_iter().flatten() {
            let h = &v["http"];
            out += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |\n",
                int(&case["memories"]),
                int(&case["users"]),
                case["dimension"],
                v["backend"].as_str().unwrap_or(""),
                v["quantization"].as_str().unwrap_or(""),
                num(&at(h, 1)["p50_ms"], 2),
                num(&at(h, 1)["p99_ms"], 2),
                num(&at(h, 32)["p50_ms"], 2),
                num(&at(h, 32)["p99_ms"], 2),
                int(&at(h, 1)["requests_per_second"]),
                int(&at(h, 8)["requests_per_second"]),
                int(&at(h, 32)["requests_per_second"]),
            );
        }
    }
    out += "\n| memories | users | D | exact scan ms | floor ms | load s (sqlite / postgres) | HNSW build s (f32 / halfvec) |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|\n";
    for case in &cases {
        let variants = case["variants"].as_array().cloned().unwrap_or_default();
        let field = |backend: &str, quantization: &str, key: &str| {
            variants
                .iter()
                .find(|v| v["backend"] == backend && v["quantization"] == quantization)
                .map(|v| num(&v[key], 1))
                .unwrap_or_else(|| "–".into())
        };
        out += &format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} |\n",
            int(&case["memories"]),
            int(&case["users"]),
            case["dimension"],
            num(&case["exact_scan_ms"], 3),
            num(&case["memory_floor_ms"], 4),
            field("sqlite", "none", "load_seconds"),
            field("pgvector-hnsw", "none", "load_seconds"),
            field("pgvector-hnsw", "none", "index_build_seconds"),
            field("pgvector-hnsw", "int8", "index_build_seconds"),
        );
    }
    out
}

fn memorize_table(r: &Value) -> String {
    let mut out = format!(
        "LLM pipeline with the OpenAI-compatible stub; store: {}; {}-turn conversations. The ideal is one \
         stub latency per sequential request of a job.\n\n",
        r["backend"].as_str().unwrap_or(""),
        r["turns_per_conversation"]
    );
    out += "| stub latency ms | jobs | conversations | conv/s | ideal conv/s | ratio | LLM calls/conv | embedding requests/conv | tokens/conv |\n";
    out += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in r["results"].as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row["stub_latency_ms"],
            row["concurrency"],
            row["conversations"],
            num(&row["conversations_per_second"], 1),
            num(&row["ideal_conversations_per_second"], 1),
            num(&row["ratio_to_ideal"], 2),
            num(&row["llm_calls_per_conversation"], 2),
            num(&row["embedding_requests_per_conversation"], 2),
            int(&row["tokens_per_conversation"]),
        );
    }
    out
}

fn operator_table(r: &Value) -> String {
    if let Some(why) = r["skipped"].as_str() {
        return format!("Skipped: {why}.\n");
    }
    let mut out = format!(
        "{} MemUClusters (tier {}) against the real API server of the e2e harness; operator peak RSS \
         {} MiB (idle {} MiB); deleting them all took {} s.\n\n",
        int(&r["memuclusters"]),
        r["tier"].as_str().unwrap_or(""),
        num(&r["operator_peak_rss_mib"], 1),
        num(&r["operator_idle_rss_mib"], 1),
        num(&r["delete_seconds"], 1),
    );
    out += "| phase | s until every observedGeneration is current | reconciles | errors | reconcile p50 ms | p99 ms | API requests/reconcile |\n";
    out += "|---|---:|---:|---:|---:|---:|---:|\n";
    for phase in ["create", "update"] {
        let p = &r[phase];
        out += &format!(
            "| {phase} | {} | {} | {} | {} | {} | {} |\n",
            num(&p["seconds_until_observed_generation_current"], 1),
            int(&p["reconciles"]),
            int(&p["reconcile_errors"]),
            num(&p["reconcile_p50_ms"], 1),
            num(&p["reconcile_p99_ms"], 1),
            num(&p["api_requests_per_reconcile"], 2),
        );
    }
    out
}

/// The markdown of one benchmark's result.
pub fn section(name: &str, result: &Value) -> String {
    let m = &result["machine"];
    let mut out = format!(
        "### {name}\n\n{}, size {}, {} build, {} cores ({}), {} GiB; {} s.\n\n",
        m["date"].as_str().unwrap_or(""),
        result["size"].as_str().unwrap_or(""),
        m["profile"].as_str().unwrap_or(""),
        m["cores"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_gib"],
        num(&result["seconds"], 0),
    );
    out += &match name {
        "retrieve" => retrieve_tables(result),
        "memorize" => memorize_table(result),
        "operator" => operator_table(result),
        _ => String::new(),
    };
    out
}

/// What the run says of each target: met, missed, or not measured, with the figure.
fn targets(retrieve: Option<&Value>, memorize: Option<&Value>, operator: Option<&Value>) -> String {
    let verdict = |value: Option<f64>, met: &dyn Fn(f64) -> bool, unit: &str| match value {
        Some(v) if v.is_finite() => {
            format!("{} ({v:.3}{unit})", if met(v) { "met" } else { "missed" })
        }
        _ => "not measured in this run".to_string(),
    };
    let variants = |memories: u64, users: u64, dimension: u64| -> Vec<Value> {
        retrieve
            .and_then(|r| r["cases"].as_array())
            .into_iter()
            .flatten()
            .filter(|c| {
                c["memories"].as_u64() == Some(memories)
                    && c["users"].as_u64() == Some(users)
                    && c["dimension"].as_u64() == Some(dimension)
            })
            .flat_map(|c| c["variants"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let pg_100k_p99 = variants(100_000, 1, 384)
        .iter()
        .find(|v| v["backend"] == "pgvector-hnsw" && v["quantization"] == "none")
        .and_then(|v| at(&v["search"], 1)["p99_ms"].as_f64());
    let best_http_10k = variants(10_000, 1, 384)
        .iter()
        .flat_map(|v| v["http"].as_array().cloned().unwrap_or_default())
        .filter_map(|row| row["requests_per_second"].as_f64())
        .reduce(f64::max);
    let min_recall = retrieve
        .and_then(|r| r["cases"].as_array())
        .into_iter()
        .flatten()
        .flat_map(|c| c["variants"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v["recall_at_10"].as_f64())
        .reduce(f64::min);
    let max_calls = memorize
        .and_then(|m| m["results"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|r| r["llm_calls_per_conversation"].as_f64())
        .reduce(f64::max);
    let full_operator = operator.filter(|o| o["memuclusters"].as_u64() == Some(2_000));
    let rss = full_operator.and_then(|o| o["operator_peak_rss_mib"].as_f64());
    let p99 = full_operator.and_then(|o| {
        ["create", "update"]
            .iter()
            .filter_map(|p| o[*p]["reconcile_p99_ms"].as_f64())
            .reduce(f64::max)
    });
    let mut out = String::from("| target (2 cores) | this run |\n|---|---|\n");
    out += &format!(
        "| retrieve p99 ≤ 10 ms at 100k memories per user on pgvector (store search, query embedding excluded) | {} |\n",
        verdict(pg_100k_p99, &|v| v <= 10.0, " ms")
    );
    out += &format!(
        "| ≥ 1,000 retrieve requests/s at 10k memories (HTTP, best store and concurrency) | {} |\n",
        verdict(best_http_10k, &|v| v >= 1000.0, " req/s")
    );
    out += &format!(
        "| recall@10 ≥ 0.95 (every store, quantization and size) | {} |\n",
        verdict(min_recall, &|v| v >= 0.95, "")
    );
    out += &format!(
        "| memorize ≤ 3 LLM calls per 10-turn conversation | {} |\n",
        verdict(max_calls, &|v| v <= 3.0, " calls")
    );
    out += &format!(
        "| operator ≤ 50 MB RSS at 2,000 MemUClusters | {} |\n",
        verdict(rss.map(|mib| mib * 1.048_576), &|v| v <= 50.0, " MB")
    );
    out += &format!(
        "| operator reconcile p99 ≤ 100 ms at 2,000 MemUClusters | {} |\n",
        verdict(p99, &|v| v <= 100.0, " ms")
    );
    out
}

/// Replaces the results block of `page` with the results found in `dir`.
pub fn write(page: &Path, dir: &Path) -> anyhow::Result<()> {
    let read = |name: &str| -> Option<Value> {
        let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    };
    let (retrieve, memorize, operator) = (read("retrieve"), read("memorize"), read("operator"));
    let mut block = format!("{BEGIN}\n\n## Targets\n\n");
    block += &targets(retrieve.as_ref(), memorize.as_ref(), operator.as_ref());
    block += "\n## Results\n\n";
    for (name, result) in [
        ("retrieve", &retrieve),
        ("memorize", &memorize),
        ("operator", &operator),
    ] {
        if let Some(r) = result {
            block += &section(name, r);
            block += "\n";
        }
    }
    block += END;
    let text = std::fs::read_to_string(page)?;
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &text[..b], &text[e + END.len()..]),
        _ => format!("{}\n{block}\n", text.trim_end()),
    };
    std::fs::write(page, new)?;
    Ok(())
}

/// Fails on a wrong answer: approximate search that misses most neighbours, an operator that
/// never caught up. Never on speed.
pub fn check_answers(result: &Value) -> anyhow::Result<()> {
    for case in result["cases"].as_array().into_iter().flatten() {
        for v in case["variants"].as_array().into_iter().flatten() {
            let recall = v["recall_at_10"].as_f64().unwrap_or(0.0);
            anyhow::ensure!(
                recall > 0.5,
                "{} ({}) returned the wrong neighbours: recall@10 {recall}",
                v["backend"],
                v["quantization"]
            );
        }
    }
    for phase in ["create", "update"] {
        if result[phase].is_object() {
            anyhow::ensure!(
                result[phase]["seconds_until_observed_generation_current"].is_number(),
                "the operator never made every MemUCluster's observedGeneration current ({phase})"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(int(&json!(100000)), "100,000");
        assert_eq!(int(&json!(999)), "999");
        assert_eq!(int(&json!(1234.6)), "1,235");
        assert_eq!(int(&Value::Null), "–");
    }

    #[test]
    fn targets_say_met_missed_or_not_measured() {
        let operator = json!({"memuclusters": 2000, "operator_peak_rss_mib": 60.0,
            "create": {"reconcile_p99_ms": 20.0}, "update": {"reconcile_p99_ms": 40.0}});
        let memorize = json!({"results": [{"llm_calls_per_conversation": 2.0}]});
        let table = targets(None, Some(&memorize), Some(&operator));
        assert!(
            table.contains(
                "| memorize ≤ 3 LLM calls per 10-turn conversation | met (2.000 calls) |"
            ),
            "{table}"
        );
        assert!(
            table.contains("≤ 50 MB RSS at 2,000 MemUClusters | missed (62.915 MB) |"),
            "{table}"
        );
        assert!(
            table.contains("p99 ≤ 100 ms at 2,000 MemUClusters | met (40.000 ms) |"),
            "{table}"
        );
        assert!(
            table.contains("recall@10 ≥ 0.95 (every store, quantization and size) | not measured"),
            "{table}"
        );
    }

    #[test]
    fn the_block_between_the_markers_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join("page.md");
        std::fs::write(
            &page,
            format!("# Title\n\nprose\n\n{BEGIN}\nold\n{END}\n\nafter\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("memorize.json"),
            json!({"machine": {}, "results": []}).to_string(),
        )
        .unwrap();
        write(&page, dir.path()).unwrap();
        let text = std::fs::read_to_string(&page).unwrap();
        assert!(text.starts_with("# Title\n\nprose\n\n"));
        assert!(text.ends_with(&format!("{END}\n\nafter\n")));
        assert!(!text.contains("\nold\n") && text.contains("### memorize"));
    }

    #[test]
    fn wrong_answers_fail_and_slow_ones_do_not() {
        let bad = json!({"cases": [{"variants": [{"backend": "sqlite", "quantization": "int8", "recall_at_10": 0.1}]}]});
        assert!(check_answers(&bad).is_err());
        let stuck = json!({"create": {"seconds_until_observed_generation_current": null}});
        assert!(check_answers(&stuck).is_err());
        let slow = json!({"create": {"seconds_until_observed_generation_current": 900.0}});
        assert!(check_answers(&slow).is_ok());
    }
}
