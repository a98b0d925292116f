use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use memu_crds::worker::Role;
use memu_worker::{config, server};

/// memU worker: the memory service (HTTP API and memorize pipeline).
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// YAML configuration file; `MEMU_*` environment variables override it.
    #[arg(long, short, env = "MEMU_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and/or run the memorize pipeline.
    Serve {
        /// Overrides `role` of the configuration.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
    },
    /// Apply database migrations and create the vector schema, then exit.
    Migrate {
        /// Then distribute the tables by user_id (Citus coordinator only).
        #[arg(long)]
        distribute: bool,
    },
    /// Print the effective configuration (defaults + file + environment) as YAML.
    Config,
    /// Print the OpenAPI document as JSON.
    Openapi,
    /// Serve the memory tools over MCP on stdin/stdout (for agents that launch their tools),
    /// authenticated by the API key in `MEMU_API_KEY`; runs the memorize pipeline too when the
    /// role does.
    Mcp,
    /// Manage tenants and API keys, read the audit log and costs (on the configured database).
    #[command(subcommand)]
    Admin(memu_worker::admin_cli::AdminCommand),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Api,
    Pipeline,
    All,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Api => Role::Api,
            RoleArg::Pipeline => Role::Pipeline,
            RoleArg::All => Role::All,
        }
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut cfg = config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Config => {
            print!("{}", serde_norway::to_string(&cfg)?);
            return Ok(());
        }
        Command::Openapi => {
            println!("{}", memu_worker::api::openapi().to_pretty_json()?);
            return Ok(());
        }
        _ => {}
    }
    // The OTLP exporter's HTTP client needs the crypto provider: install it first.
    server::install_crypto_provider();
    let telemetry = memu_worker::telemetry::init(&cfg.logging, &cfg.tracing)?;
    match cli.command {
        Command::Migrate { distribute } => {
            server::build_service(cfg.clone(), true).await?;
            tracing::info!("migrations applied");
            if distribute {
                let tables = memu_worker::store::postgres::distribute_by_user(&cfg).await?;
                tracing::info!(?tables, "tables distributed by user_id");
            }
        }
        Command::Admin(command) => {
            let migrate = cfg.database.auto_migrate;
            let service = server::build_service(cfg, migrate).await?;
            memu_worker::admin_cli::run(&service, command).await?;
        }
        Command::Mcp => {
            let key = std::env::var("MEMU_API_KEY").ok().filter(|k| !k.is_empty());
            let migrate = cfg.database.auto_migrate;
            let service = server::build_service(cfg, migrate).await?;
            memu_worker::mcp::serve_stdio(service, key).await?;
        }
        Command::Serve { role } => {
            if let Some(role) = role {
                cfg.role = role.into();
            }
            server::check_auth_exposure(&cfg)?;
            let listener = TcpListener::bind(&cfg.server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
            let metrics_listener = match &cfg.server.metrics_listen {
                Some(addr) => Some(
                    TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?,
                ),
                None => None,
            };
            let migrate = cfg.database.auto_migrate;
            let service = server::build_service(cfg, migrate).await?;
            server::serve(
                service,
                listener,
                metrics_listener,
                server::shutdown_signal(),
            )
            .await?;
            tracing::info!("stopped cleanly");
        }
        Command::Config | Command::Openapi => unreachable!("handled above"),
    }
    telemetry.shutdown();
    Ok(())
}
