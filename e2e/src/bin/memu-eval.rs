//! Runs a LoCoMo-format data set against a memU worker and an OpenAI-compatible endpoint,
//! prints the score table and writes the full report as JSON under e2e/results/.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use memu_e2e::eval::{EvalOptions, Sample, run};

#[derive(Parser)]
#[command(about = "LoCoMo-style evaluation of a memU worker: recall@k and LLM-judged accuracy")]
struct Args {
    /// LoCoMo-format JSON (a list of samples with `conversation` and `qa`).
    #[arg(long, default_value = "e2e/eval/locomo-sample.json")]
    dataset: PathBuf,
    /// Base URL of a running worker.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    worker: String,
    /// OpenAI-compatible base URL of the answer and judge models.
    #[arg(
        long,
        env = "MEMU_EVAL_LLM_URL",
        default_value = "https://api.openai.com/v1"
    )]
    llm_url: String,
    /// API key of that endpoint.
    #[arg(long, env = "MEMU_EVAL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// API key of the memU worker (read + write scopes).
    #[arg(long, env = "MEMU_API_KEY", hide_env_values = true)]
    worker_key: Option<String>,
    #[arg(long, default_value = "gpt-4o-mini")]
    answer_model: String,
    /// The judge model, named in the report.
    #[arg(long, default_value = "gpt-4o-mini")]
    judge_model: String,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// rag, hybrid or llm.
    #[arg(long, default_value = "rag")]
    method: String,
    /// Prefix of the user ids the samples are memorized under.
    #[arg(long, default_value = "eval-")]
    user_prefix: String,
    /// Where the JSON report goes.
    #[arg(long, default_value = "e2e/results/eval.json")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.dataset)
        .with_context(|| format!("cannot read {}", args.dataset.display()))?;
    let samples: Vec<Sample> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a LoCoMo-format list of samples",
            args.dataset.display()
        )
    })?;
    let report = run(
        &samples,
        EvalOptions {
            worker_url: args.worker.trim_end_matches('/').to_string(),
            llm_url: args.llm_url,
            api_key: args.api_key,
            worker_key: args.worker_key,
            answer_model: args.answer_model,
            judge_model: args.judge_model,
            top_k: args.top_k,
            method: args.method,
            user_prefix: args.user_prefix,
            max_polls: 1200,
        },
    )
    .await?;
    print!("{}", report.table());
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", args.out.display());
    Ok(())
}
