//! `murmur`: the command-line interface to a tenant's warm pool.

mod pool;
mod resource;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use murmur::client::{PoolClient, connect};
use murmur::config::{Context, Env, resolve};
use murmur_workflows::error::{ApiError, Code};

/// Warm pools of agent VMs, run as Temporal workflows.
///
/// Tenant and workspace come from .murmur/murmur.yaml (searched upwards from the current
/// directory) and .murmur/murmur.local.yaml; MURMUR_TENANT and MURMUR_WORKSPACE override them.
/// Temporal is reached like the `temporal` CLI does: TEMPORAL_ADDRESS (default
/// localhost:7233), TEMPORAL_NAMESPACE (default `default`).
///
/// Exit codes: 0 success, 1 the operation failed (a `CODE: reason` line on stderr),
/// 2 invalid command line, 69 Temporal unreachable.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Workspace context (overrides murmur.yaml, murmur.local.yaml and MURMUR_WORKSPACE).
    #[arg(long, global = true)]
    workspace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the tenant's warm pool.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Print a resource as YAML.
    ///
    /// Examples:
    ///   murmur get pool-config default
    ///   murmur get workspace web
    Get(resource::GetArgs),
    /// Replace a resource from YAML (stdin, or -f FILE); creates a workspace that does not exist.
    ///
    /// Example:
    ///   printf 'min_idle: 3\nimage_ref: default\n' | murmur set workspace web
    Set(resource::SetArgs),
    /// Change fields of a resource.
    ///
    /// Examples:
    ///   murmur patch workspace web --set min_idle=5
    ///   murmur patch workspace web --set image_ref=img-2 --set environment.vcpus=2
    ///   murmur patch pool-config default --set max_vms=20
    Patch(resource::PatchArgs),
}

/// What a command needs: where it acts and a connected client.
pub(crate) struct Session {
    pub ctx: Context,
    pub pool: PoolClient,
}

impl Session {
    async fn open(workspace: Option<&str>) -> Result<Self, ApiError> {
        let cwd = std::env::current_dir()
            .map_err(|e| ApiError::failed_precondition(format!("current directory: {e}")))?;
        let ctx = resolve(&cwd, &Env::from_process(), workspace)?;
        let client = connect(&format!("murmur-cli:{}", ctx.developer)).await?;
        Ok(Self {
            pool: PoolClient::new(client, ctx.clone()),
            ctx,
        })
    }
}

/// Prints an error per the contract and picks the exit code.
fn report(e: &ApiError) -> ExitCode {
    eprintln!("{e}");
    if let Some(hint) = murmur::hint(e.code) {
        eprintln!("{hint}");
    }
    ExitCode::from(match e.code {
        Code::Unavailable => murmur::EXIT_UNAVAILABLE as u8,
        _ => murmur::EXIT_FAILURE as u8,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let workspace = cli.workspace.as_deref();
    let result = match cli.command {
        Command::Pool(cmd) => pool::run(cmd, workspace).await,
        Command::Get(args) => resource::get(args, workspace).await,
        Command::Set(args) => resource::set(args, workspace).await,
        Command::Patch(args) => resource::patch(args, workspace).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}
