//! `murmur`: the command-line interface to a tenant's warm pool.

mod agent;
mod auth;
mod bake;
mod host;
mod inside;
mod pool;
mod power;
mod resource;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use murmur::agents::AgentClient;
use murmur::client::{PoolClient, TemporalOptions, connect_with};
use murmur::config::{Context, Env, resolve};
use murmur::output::Format;
use murmur_workflows::error::{ApiError, Code};

/// Warm pools of agent VMs, run as Temporal workflows.
///
/// Tenant and workspace come from .murmur/murmur.yaml (searched upwards from the current
/// directory) and .murmur/murmur.local.yaml; MURMUR_TENANT and MURMUR_WORKSPACE override them.
/// Temporal is reached like the `temporal` CLI does: a profile of its config file
/// (--config-file or TEMPORAL_CONFIG_FILE, default ~/.config/temporalio/temporal.toml;
/// --profile or TEMPORAL_PROFILE, default `default`), the TEMPORAL_* environment variables
/// over it (TLS, API key, ...), and --address / --namespace (TEMPORAL_ADDRESS,
/// TEMPORAL_NAMESPACE) over both; localhost:7233 and `default` when nothing says otherwise.
///
/// Output: -o text (default, for people), -o json or -o yaml (for programs) on every command
/// that prints data; errors then come as a document too: {"code", "message", "hint"} on
/// stderr.
///
/// Exit codes: 0 success, 1 the operation failed (a `CODE: reason` line on stderr),
/// 2 invalid command line, 69 Temporal unreachable.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Workspace context (overrides murmur.yaml, murmur.local.yaml and MURMUR_WORKSPACE).
    #[arg(long, global = true)]
    workspace: Option<String>,
    /// Output format of results and errors: text, json or yaml.
    #[arg(
        short = 'o',
        long,
        value_enum,
        global = true,
        default_value_t = Format::Text,
        value_name = "FORMAT"
    )]
    output: Format,
    /// The same as -o json (what scripts used before -o existed).
    #[arg(long, global = true, hide = true)]
    json: bool,
    /// Temporal server address (host:port).
    #[arg(
        long,
        global = true,
        env = "TEMPORAL_ADDRESS",
        value_name = "HOST:PORT"
    )]
    address: Option<String>,
    /// Temporal namespace.
    #[arg(short = 'n', long, global = true, env = "TEMPORAL_NAMESPACE")]
    namespace: Option<String>,
    /// Profile of the Temporal config file to use.
    #[arg(long, global = true, env = "TEMPORAL_PROFILE")]
    profile: Option<String>,
    /// The Temporal config file (TOML, as the `temporal` CLI reads it).
    #[arg(long, global = true, env = "TEMPORAL_CONFIG_FILE", value_name = "PATH")]
    config_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// What every command takes from the global flags.
#[derive(Debug, Clone)]
pub(crate) struct Globals {
    /// --workspace.
    pub workspace: Option<String>,
    /// How to print results and errors.
    pub format: Format,
    /// Where Temporal is.
    pub temporal: TemporalOptions,
}

impl Globals {
    /// Connects to Temporal as `identity`.
    pub async fn connect(&self, identity: &str) -> Result<temporalio_client::Client, ApiError> {
        connect_with(identity, &self.temporal).await
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the tenant's warm pool.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// The deployment's VM hosts: list them, drain one.
    #[command(subcommand)]
    Host(host::HostCommand),
    /// Print a resource as YAML (as JSON with -o json).
    ///
    /// Examples:
    ///   murmur get pool-config default
    ///   murmur get workspace web
    ///   murmur get workspace web -o json | jq .spec.min_idle
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
    ///   murmur spawn --on-idle sleep review -- ./review.sh   # sleeps once done; murmur wake review
    Spawn(agent::SpawnArgs),
    /// Kill an agent: stop its command and destroy its VM (PHASE_CANCELED).
    ///
    /// Example:
    ///   murmur kill fix-auth
    Kill(agent::SlugArgs),
    /// Put an agent's VM to sleep: nothing in it runs, everything in it is kept
    /// (PHASE_SLEEPING). Prints `VM stopped` once it is asleep.
    ///
    /// On qemu the guest's memory and devices are saved to a file on its host and the qemu
    /// process ends, so the host's memory is freed; on the process substrate the sandbox's
    /// processes are stopped (compute released, memory kept). A sleeping agent keeps its VM:
    /// it still counts against max_vms, and a flush leaves it alone.
    ///
    /// Example:
    ///   murmur sleep fix-auth
    Sleep(agent::SlugArgs),
    /// Wake an agent's sleeping VM: it goes on where it stopped, processes and memory
    /// intact. Prints `VM started` once it is awake.
    ///
    /// Example:
    ///   murmur wake fix-auth
    Wake(agent::SlugArgs),
    /// Set what an agent does the next time its command exits: sleep or keep-alive.
    ///
    /// (terminate, the default, is chosen at spawn only.)
    ///
    /// Example:
    ///   murmur on-idle fix-auth keep-alive
    OnIdle(power::OnIdleArgs),
    /// List your agents in the workspace: SLUG PHASE VM (nothing when there are none).
    ///
    /// With --all, every developer's agents (a DEVELOPER column first); with --ended, ended
    /// agents too; with --watch, again whenever the list changes, until Ctrl-C.
    ///
    /// Examples:
    ///   murmur ls
    ///   murmur ls --all
    ///   murmur ls -w -o json    # one JSON array per change, one per line
    ///   murmur ls -q | xargs -n1 murmur kill
    Ls(agent::LsArgs),
    /// Show an agent: workflow, phase, VM, exit code, output tail.
    ///
    /// Example:
    ///   murmur status fix-auth
    ///   murmur status -o json fix-auth | jq .exit_code
    Status(agent::StatusArgs),
    /// Wait until an agent reaches a phase (or went through it), then print its status.
    ///
    /// Exits 1 when the agent ends without reaching the phase.
    ///
    /// Examples:
    ///   murmur wait fix-auth
    ///   murmur wait --phase completed fix-auth
    Wait(agent::WaitArgs),
    /// Print an agent's output (combined stdout and stderr) from the start; with -f, follow it
    /// while the command runs and return when it exits.
    ///
    /// Works for ended agents too while their host keeps the output (a day by default).
    /// Exits 0, or 1 when the agent's command exited non-zero or the agent failed.
    ///
    /// Examples:
    ///   murmur logs -f fix-auth
    ///   murmur logs --since 50 fix-auth
    Logs(inside::LogsArgs),
    /// Run a command in an agent's VM, next to the agent: stdout and stderr apart, stdin
    /// passed through, Ctrl-C delivered to the command; exits with the command's exit code.
    ///
    /// Examples:
    ///   murmur exec fix-auth -- git status
    ///   tar c src | murmur exec fix-auth -- tar x -C /tmp
    Exec(inside::ExecArgs),
    /// Open an interactive shell in an agent's VM (a terminal there; yours is in raw mode
    /// until the shell exits). Not for agents that have ended: their VM is gone.
    ///
    /// Example:
    ///   murmur shell fix-auth
    Shell(inside::ShellArgs),
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
    async fn open(globals: &Globals) -> Result<Self, ApiError> {
        let cwd = std::env::current_dir()
            .map_err(|e| ApiError::failed_precondition(format!("current directory: {e}")))?;
        let ctx = resolve(&cwd, &Env::from_process(), globals.workspace.as_deref())?;
        let client = globals
            .connect(&format!("murmur-cli:{}", ctx.developer))
            .await?;
        Ok(Self {
            pool: PoolClient::new(client.clone(), ctx.clone()),
            agents: AgentClient::new(client.clone(), ctx.clone()),
            client,
            ctx,
        })
    }
}

/// Prints an error per the contract (in `format`) and picks the exit code.
fn report(e: &ApiError, hint: Option<&str>, format: Format) -> ExitCode {
    let hint = hint.or(murmur::hint(e.code));
    eprint!("{}", murmur::output::error_text(e, hint, format));
    ExitCode::from(match e.code {
        Code::Unavailable => murmur::EXIT_UNAVAILABLE as u8,
        _ => murmur::EXIT_FAILURE as u8,
    })
}

/// Prints `value` in `format`: its document for JSON and YAML, `text` for text.
pub(crate) fn emit<T: serde::Serialize + ?Sized>(
    format: Format,
    value: &T,
    text: impl FnOnce() -> String,
) -> Result<(), ApiError> {
    if format.is_structured() {
        print!("{}", format.document(value)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

/// What `murmur version -o json|yaml` prints.
#[derive(serde::Serialize)]
struct VersionDoc {
    /// The client's version.
    client: &'static str,
    /// The commit the client was built from.
    commit: &'static str,
    /// The worker's version, or `unknown (why)`.
    worker: String,
}

/// `murmur version`: the client, and the worker that answers the pool's queries.
async fn version(globals: &Globals) -> Result<(), ApiError> {
    let worker = match Session::open(globals).await {
        Ok(session) => session
            .pool
            .worker_version()
            .await
            .unwrap_or_else(|e| format!("unknown ({e})")),
        Err(e) => format!("unknown ({e})"),
    };
    let doc = VersionDoc {
        client: murmur::VERSION,
        commit: murmur::COMMIT,
        worker,
    };
    emit(globals.format, &doc, || {
        format!(
            "client: murmur {} (commit {})\nworker: {}\n",
            doc.client, doc.commit, doc.worker
        )
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // The client SDK logs each retry of a call at WARN; the CLI says what went wrong
            // itself (`CODE: reason`, the first line scripts read), so those stay quiet unless
            // RUST_LOG asks for them.
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,temporalio_client=error")
            }),
        )
        .with_ansi(murmur::colour(std::io::IsTerminal::is_terminal(
            &std::io::stderr(),
        )))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Errors come in the format the (parsed) flags ask for; `--json` is `-o json`.
    let globals = Globals {
        workspace: cli.workspace,
        format: if cli.json { Format::Json } else { cli.output },
        temporal: TemporalOptions {
            address: cli.address,
            namespace: cli.namespace,
            profile: cli.profile,
            config_file: cli.config_file,
        },
    };
    let format = globals.format;
    if matches!(cli.command, Command::Pool(_) | Command::Host(_)) && murmur::on_vm() {
        // Decided before any connection is made (a plain line, exit 1).
        if format.is_structured() {
            let e = ApiError::failed_precondition(murmur::ON_VM_MESSAGE);
            eprint!("{}", murmur::output::error_text(&e, None, format));
        } else {
            eprintln!("{}", murmur::ON_VM_MESSAGE);
        }
        return ExitCode::from(murmur::EXIT_FAILURE as u8);
    }
    let plain = |r: Result<(), ApiError>| r.map(|()| 0).map_err(|e| (e, None));
    let g = &globals;
    let result = match cli.command {
        Command::Pool(cmd) => plain(pool::run(cmd, g).await),
        Command::Host(cmd) => plain(host::run(cmd, g).await),
        Command::Get(args) => plain(resource::get(args, g).await),
        Command::Set(args) => plain(resource::set(args, g).await),
        Command::Patch(args) => plain(resource::patch(args, g).await),
        Command::Auth(cmd) => plain(auth::run(cmd, g).await),
        Command::Version => plain(version(g).await),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "murmur", &mut std::io::stdout());
            Ok(0)
        }
        Command::Spawn(args) => agent::spawn(args, g).await.map(|()| 0),
        Command::Kill(args) => agent::kill(args, g).await.map(|()| 0),
        Command::Sleep(args) => power::sleep(args, g).await.map(|()| 0),
        Command::Wake(args) => power::wake(args, g).await.map(|()| 0),
        Command::OnIdle(args) => power::on_idle(args, g).await.map(|()| 0),
        Command::Ls(args) => agent::ls(args, g).await.map(|()| 0),
        Command::Status(args) => agent::status(args, g).await.map(|()| 0),
        Command::Wait(args) => agent::wait(args, g).await.map(|()| 0),
        Command::Bake(args) => plain(bake::run(args, g).await),
        Command::Logs(args) => inside::logs(args, g).await,
        Command::Exec(args) => inside::exec(args, g).await,
        Command::Shell(args) => inside::shell(args, g).await,
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code),
        Err((e, hint)) => report(&e, hint, format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("murmur").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn output_is_global_and_json_is_its_alias() {
        assert_eq!(parse(&["ls"]).output, Format::Text);
        assert_eq!(parse(&["-o", "yaml", "ls"]).output, Format::Yaml);
        assert_eq!(
            parse(&["pool", "status", "-o", "json"]).output,
            Format::Json
        );
        assert!(parse(&["status", "--json", "x"]).json);
        assert!(parse(&["host", "ls", "--json"]).json);
        assert!(Cli::try_parse_from(["murmur", "-o", "xml", "ls"]).is_err());
    }

    #[test]
    fn flags_after_the_agent_command_belong_to_the_command() {
        let cli = parse(&["spawn", "x", "--", "tool", "--json", "-o", "yaml"]);
        assert!(!cli.json);
        assert_eq!(cli.output, Format::Text);
        let cli = parse(&["spawn", "x", "tool", "--json"]);
        assert!(!cli.json);
    }

    #[test]
    fn temporal_flags_are_spelled_like_the_temporal_cli() {
        let cli = parse(&[
            "ls",
            "--address",
            "t.example:7233",
            "-n",
            "prod",
            "--profile",
            "ops",
            "--config-file",
            "/etc/temporal.toml",
        ]);
        assert_eq!(cli.address.as_deref(), Some("t.example:7233"));
        assert_eq!(cli.namespace.as_deref(), Some("prod"));
        assert_eq!(cli.profile.as_deref(), Some("ops"));
        assert_eq!(cli.config_file, Some(PathBuf::from("/etc/temporal.toml")));
    }

    #[test]
    fn durations_take_units() {
        let cli = parse(&["wait", "--timeout", "1h30m", "x"]);
        let Command::Wait(args) = cli.command else {
            panic!("not wait");
        };
        assert_eq!(args.timeout, Some(std::time::Duration::from_secs(5400)));
        let err = Cli::try_parse_from(["murmur", "wait", "--timeout", "soon", "x"]).unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        assert!(
            Cli::try_parse_from(["murmur", "pool", "status", "--watch", "--interval", "500ms"])
                .is_ok()
        );
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
