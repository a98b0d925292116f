//! Runs the deterministic OpenAI-compatible stub on loopback (for shell and Python tests).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use memu_e2e::openai_stub::{OpenAiStub, StubOptions};

#[derive(Parser)]
#[command(about = "Deterministic OpenAI-compatible stub (chat + embeddings) for tests")]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Embedding dimension when a request names none.
    #[arg(long, default_value_t = 384)]
    dimension: usize,
    /// Latency added to every reply, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Require this Bearer token.
    #[arg(long, env = "STUB_API_KEY")]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        eprintln!(
            "refusing to listen on {}: the stub serves loopback only",
            args.listen
        );
        std::process::exit(2);
    }
    let mut stub = OpenAiStub::bind(
        args.listen,
        StubOptions {
            dimension: args.dimension,
            latency: Duration::from_millis(args.latency_ms),
            api_key: args.api_key,
        },
    )
    .await?;
    // The first line of stdout is the base URL, for scripts to capture.
    println!("{}", stub.base_url());
    stub.wait().await;
    Ok(())
}
