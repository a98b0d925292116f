//! `memu-bench`: the benchmark suite of the data plane and the operator.
//!
//! `scripts/bench.sh --full` (builds in release, starts what the benchmarks need, runs this);
//! `--smoke` is what CI runs to keep them compiling and working. Each benchmark prints what it
//! measures and writes `e2e/results/<name>.json` (`e2e/results/smoke/` at smoke size);
//! `--write-docs` renders the results into `docs/benchmarks.md`. No figure is ever asserted:
//! only a wrong answer (recall, a failed job) fails a run.

mod common;
mod docs;
mod memorize;
mod operator;
mod retrieve;

use clap::Parser;
use common::{Size, machine, results_dir};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    Retrieve,
    Memorize,
    Operator,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Retrieve => "retrieve",
            Bench::Memorize => "memorize",
            Bench::Operator => "operator",
        }
    }
}

#[derive(Parser)]
#[command(about = "Benchmarks of memU on Kubernetes: data plane and operator")]
struct Args {
    /// Small sizes: keeps the benchmarks compiling and working (the default).
    #[arg(long, conflicts_with = "full")]
    smoke: bool,
    /// The sizes the targets are stated for (docs/benchmarks.md).
    #[arg(long)]
    full: bool,
    /// Only these benchmarks (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Render e2e/results/*.json into docs/benchmarks.md (after running any benchmark asked).
    #[arg(long)]
    write_docs: bool,
    /// With --write-docs: run nothing, only render the results on disk.
    #[arg(long, requires = "write_docs")]
    no_run: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    memu_worker::server::install_crypto_provider();
    let args = Args::parse();
    let size = if args.full { Size::Full } else { Size::Smoke };
    let benches = if args.only.is_empty() {
        vec![Bench::Retrieve, Bench::Memorize, Bench::Operator]
    } else {
        args.only.clone()
    };
    let dir = match size {
        Size::Full => results_dir(),
        Size::Smoke => results_dir().join("smoke"),
    };
    std::fs::create_dir_all(&dir)?;
    if !args.no_run {
        for bench in benches {
            let started = std::time::Instant::now();
            let figures: Value = match bench {
                Bench::Retrieve => retrieve::run(size).await,
                Bench::Memorize => memorize::run(size).await,
                Bench::Operator => operator::run(size).await?,
            };
            let mut result = json!({
                "benchmark": bench.name(),
                "size": size.as_str(),
                "machine": machine(),
                "seconds": started.elapsed().as_secs_f64(),
            });
            if let (Some(r), Some(f)) = (result.as_object_mut(), figures.as_object()) {
                r.extend(f.clone());
            }
            println!("{}", docs::section(bench.name(), &result));
            let path = dir.join(format!("{}.json", bench.name()));
            std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
            eprintln!("written: {}", path.display());
            // Wrong answers fail the run; slow ones never do.
            docs::check_answers(&result)?;
        }
    }
    if args.write_docs {
        let page = results_dir().join("../../docs/benchmarks.md");
        docs::write(&page, &dir)?;
        eprintln!("written: docs/benchmarks.md");
    }
    Ok(())
}
