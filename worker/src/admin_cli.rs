//! `memu-worker admin …`: tenant and key management from a shell (or a Job), straight on the
//! database the configuration names.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use secrecy::ExposeSecret as _;

use crate::service::MemoryService;
use crate::tenancy::{TenantLimits, parse_scopes};

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Tenants: organisations or apps that own users.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys of a tenant.
    #[command(subcommand)]
    Key(KeyCommand),
    /// The tenant's audit log, newest first, as JSON lines.
    Audit {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// LLM cost of the tenant per day, user, provider and model, as JSON lines.
    Costs {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    Create {
        tenant_id: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        rate_limit_rps: Option<f64>,
        #[arg(long)]
        memorize_per_day: Option<u64>,
        #[arg(long)]
        tokens_per_day: Option<u64>,
    },
    List,
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Prints the new key once (or writes it to --output-file, mode 0600).
    Create {
        #[arg(long)]
        tenant: String,
        /// Comma-separated: read, write, admin.
        #[arg(long, default_value = "read,write")]
        scopes: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long)]
        expires_in_days: Option<i64>,
        #[arg(long)]
        output_file: Option<PathBuf>,
    },
    List {
        #[arg(long)]
        tenant: String,
    },
    Revoke {
        #[arg(long)]
        tenant: String,
        key_id: String,
    },
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

pub async fn run(service: &MemoryService, command: AdminCommand) -> anyhow::Result<()> {
    let access = &service.access;
    let store = &service.store;
    match command {
        AdminCommand::Tenant(TenantCommand::Create {
            tenant_id,
            name,
            rate_limit_rps,
            memorize_per_day,
            tokens_per_day,
        }) => {
            let limits = TenantLimits {
                rate_limit_rps,
                memorize_per_day,
                tokens_per_day,
            };
            print_json(&access.create_tenant(&tenant_id, &name, limits).await?)?;
        }
        AdminCommand::Tenant(TenantCommand::List) => {
            for tenant in store.list_tenants().await? {
                print_json(&tenant)?;
            }
        }
        AdminCommand::Key(KeyCommand::Create {
            tenant,
            scopes,
            name,
            expires_in_days,
            output_file,
        }) => {
            let scopes = parse_scopes(&scopes).map_err(anyhow::Error::msg)?;
            let expires_at =
                expires_in_days.map(|d| chrono::Utc::now() + chrono::Duration::days(d));
            let issued = access.issue_key(&tenant, &name, scopes, expires_at).await?;
            match output_file {
                Some(path) => {
                    write_private(&path, issued.token.expose_secret())?;
                    eprintln!(
                        "key {} of tenant {tenant} written to {}",
                        issued.record.key_id,
                        path.display()
                    );
                }
                None => println!("{}", issued.token.expose_secret()),
            }
        }
        AdminCommand::Key(KeyCommand::List { tenant }) => {
            for key in store.list_api_keys(&tenant).await? {
                print_json(&crate::api::admin::KeyOut::from(key))?;
            }
        }
        AdminCommand::Key(KeyCommand::Revoke { tenant, key_id }) => {
            if !access.revoke_key(&tenant, &key_id).await? {
                anyhow::bail!("tenant {tenant} has no key {key_id}");
            }
            eprintln!("key {key_id} revoked");
        }
        AdminCommand::Audit {
            tenant,
            user,
            limit,
        } => {
            for entry in store
                .list_audit(&tenant, user.as_deref(), Some(limit))
                .await?
            {
                print_json(&entry)?;
            }
        }
        AdminCommand::Costs { tenant, days } => {
            let until = chrono::Utc::now();
            let since = until - chrono::Duration::days(days);
            for row in store.cost_report(&tenant, since, until).await? {
                print_json(&row)?;
            }
        }
    }
    Ok(())
}

/// Writes a secret readable by the owner only.
fn write_private(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}
