//! `murmur`: the command-line interface to a tenant's warm pool.

mod agent;
mod auth;
mod bake;
mod host;
mod pool;
mod resource;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use murmur::agents::AgentClient;
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
    /// The deployment's VM hosts: list them, drain one.
    #[command(subcommand)]
    Host(host::HostCommand),
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
    /// Print the client's version and the version of the worker serving the tenant's pool.
    Version,
    /// Print a shell completion script.
    ///
    /// Example:
    ///   murmur completions bash > /etc/bash_completion.d/murmur
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Identity: store a credential, show it, sign requests for the `temporal` CLI.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// Start an agent: claim a warm VM (or boot one) and run a command in it.
    ///
    /// Prints `Spawned: <slug>` once the pool has accepted the agent. The agent's workflow
    /// id is agent/<tenant>/<workspace>/<developer>/<slug>. Inside the VM the command runs in
    /// the VM's home with MURMUR_VM=1 and MURMUR_AGENT=<slug>.
    ///
    /// Examples:
    ///   murmur spawn fix-auth -- 'make test && git push'
    ///   murmur spawn --on-idle keep-alive shell -- sleep infinity
    Spawn(agent::SpawnArgs),
    /// Kill an agent: stop its command and destroy its VM (PHASE_CANCELED).
    ///
    /// Example:
    ///   murmur kill fix-auth
    Kill(agent::SlugArgs),
    /// List your agents in the workspace: SLUG PHASE VM (nothing when there are none).
    ///
    /// Examples:
    ///   murmur ls
    ///   murmur ls -q | xargs -n1 murmur kill
    Ls(agent::LsArgs),
    /// Show an agent: workflow, phase, VM, exit code, output tail.
    ///
    /// Example:
    ///   murmur status fix-auth
    ///   murmur status --json fix-auth | jq .exit_code
    Status(agent::StatusArgs),
    /// Wait until an agent reaches a phase (or went through it), then print its status.
    ///
    /// Exits 1 when the agent ends without reaching the phase.
    ///
    /// Examples:
    ///   murmur wait fix-auth
    ///   murmur wait --phase completed fix-auth
    Wait(agent::WaitArgs),
    /// Bake an image: boot a scratch VM from the recipe's base, run its script as root, and
    /// register the result as an immutable, content-addressed image (`img-<hash>` of base,
    /// script, files and architecture). An unchanged recipe is answered from the cache.
    ///
    /// Recipe (YAML): base: default / script: | ... / timeout: 600 / files: {path: content}
    ///
    /// Example:
    ///   murmur bake tools.yaml && murmur patch workspace web --set image_ref=img-3f2a9c0d1e4b
    Bake(bake::BakeArgs),
}

/// What a command needs: where it acts and a connected client.
pub(crate) struct Session {
    pub ctx: Context,
    pub client: temporalio_client::Client,
    pub pool: PoolClient,
    pub agents: AgentClient,
}

impl Session {
    async fn open(workspace: Option<&str>) -> Result<Self, ApiError> {
        let cwd = std::env::current_dir()
            .map_err(|e| ApiError::failed_precondition(format!("current directory: {e}")))?;
        let ctx = resolve(&cwd, &Env::from_process(), workspace)?;
        let client = connect(&format!("murmur-cli:{}", ctx.developer)).await?;
        Ok(Self {
            pool: PoolClient::new(client.clone(), ctx.clone()),
            agents: AgentClient::new(client.clone(), ctx.clone()),
            client,
            ctx,
        })
    }
}

/// Prints an error per the contract and picks the exit code.
fn report(e: &ApiError, hint: Option<&str>, json: bool) -> ExitCode {
    let hint = hint.or(murmur::hint(e.code));
    if json {
        let mut doc = serde_json::json!({ "code": e.code.as_str(), "message": e.message });
        if let Some(h) = hint {
            doc["hint"] = h.into();
        }
        eprintln!("{doc}");
    } else {
        eprintln!("{e}");
        if let Some(hint) = hint {
            eprintln!("{hint}");
        }
    }
    ExitCode::from(match e.code {
        Code::Unavailable => murmur::EXIT_UNAVAILABLE as u8,
        _ => murmur::EXIT_FAILURE as u8,
    })
}

/// `murmur version`: the client, and the worker that answers the pool's queries.
async fn version(workspace: Option<&str>) -> Result<(), ApiError> {
    println!(
        "client: murmur {} (commit {})",
        murmur::VERSION,
        murmur::COMMIT
    );
    let worker = match Session::open(workspace).await {
        Ok(session) => session
            .pool
            .worker_version()
            .await
            .unwrap_or_else(|e| format!("unknown ({e})")),
        Err(e) => format!("unknown ({e})"),
    };
    println!("worker: {worker}");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // Commands with --json report errors as {"code": ..., "message": ...} too.
    let json = std::env::args().any(|a| a == "--json");
    let cli = Cli::parse();
    let workspace = cli.workspace.as_deref();
    if matches!(cli.command, Command::Pool(_) | Command::Host(_)) && murmur::on_vm() {
        // Decided before any connection is made (a plain line, exit 1).
        eprintln!("{}", murmur::ON_VM_MESSAGE);
        return ExitCode::from(murmur::EXIT_FAILURE as u8);
    }
    let plain = |r: Result<(), ApiError>| r.map_err(|e| (e, None));
    let result = match cli.command {
        Command::Pool(cmd) => plain(pool::run(cmd, workspace).await),
        Command::Host(cmd) => plain(host::run(cmd).await),
        Command::Get(args) => plain(resource::get(args, workspace).await),
        Command::Set(args) => plain(resource::set(args, workspace).await),
        Command::Patch(args) => plain(resource::patch(args, workspace).await),
        Command::Auth(cmd) => plain(auth::run(cmd, workspace).await),
        Command::Version => plain(version(workspace).await),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "murmur", &mut std::io::stdout());
            Ok(())
        }
        Command::Spawn(args) => agent::spawn(args, workspace).await,
        Command::Kill(args) => agent::kill(args, workspace).await,
        Command::Ls(args) => agent::ls(args, workspace).await,
        Command::Status(args) => agent::status(args, workspace).await,
        Command::Wait(args) => agent::wait(args, workspace).await,
        Command::Bake(args) => plain(bake::run(args, workspace).await),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((e, hint)) => report(&e, hint, json),
    }
}
