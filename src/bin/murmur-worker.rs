//! `murmur-worker`: the Temporal worker that runs murmur's workflows and activities.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Runs murmur's pool workflows and VM activities against a Temporal server.
///
/// Connects like the `temporal` CLI: TEMPORAL_ADDRESS (default localhost:7233),
/// TEMPORAL_NAMESPACE (default `default`), TLS and API-key variables or a config profile.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "pretty",
        global = true,
        env = "MURMUR_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Export traces (the Temporal SDK's spans and murmur's) over OTLP/gRPC to this collector,
    /// e.g. http://127.0.0.1:4317. Off when not given.
    #[arg(long, global = true, env = "MURMUR_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// The worker's settings; accepted before or after `run` (and by the other subcommands,
/// which use `--state-dir`).
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Task queue to poll.
    #[arg(
        long,
        global = true,
        env = "MURMUR_TASK_QUEUE",
        default_value = "murmur"
    )]
    task_queue: String,
    /// Directory for sandboxes, images and keys.
    #[arg(
        long,
        global = true,
        env = "MURMUR_STATE_DIR",
        default_value = ".state"
    )]
    state_dir: PathBuf,
    /// Serve Prometheus metrics (/metrics), liveness (/healthz) and readiness (/readyz) on this address,
    /// e.g. 127.0.0.1:9464.
    #[arg(long, global = true, env = "MURMUR_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// How often the pool-level metrics are read from Temporal, in the background (a scrape
    /// never calls Temporal; it serves the last read).
    #[arg(long, global = true, env = "MURMUR_METRICS_REFRESH", default_value = "15s", value_parser = parse_duration)]
    metrics_refresh: std::time::Duration,
    /// Where VMs live: `process` (local sandboxes) or `qemu` (real Linux guests; needs
    /// qemu-system-x86_64, builds its guest image under the state dir on first start).
    #[arg(
        long,
        global = true,
        env = "MURMUR_SUBSTRATE",
        value_enum,
        default_value = "process"
    )]
    substrate: murmur::worker::Substrate,
    /// Time between reaper scans of the substrate (30s, 5m, ...).
    #[arg(long, global = true, env = "MURMUR_REAP_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    reap_interval: std::time::Duration,
    /// How long a VM the pool does not know must stay unknown before the reaper deletes it.
    #[arg(long, global = true, env = "MURMUR_REAP_GRACE", default_value = "60s", value_parser = parse_duration)]
    reap_grace: std::time::Duration,
    /// How long an agent workflow's task must have been failing before it counts as stranded
    /// (see reap_stranded_workflows).
    #[arg(long, global = true, env = "MURMUR_STRANDED_AFTER", default_value = "48h", value_parser = parse_duration)]
    stranded_after: std::time::Duration,
    /// History length (events) after which a pool workflow continues as new; its pools learn
    /// it from their reaper rounds. Lower it to see rollovers often (tests).
    #[arg(long, global = true, env = "MURMUR_POOL_ROLL_OVER", default_value = "10000",
        value_parser = clap::value_parser!(u32).range(100..=50_000))]
    pool_roll_over: u32,
    /// How long a new VM may take to answer its readiness handshake before its boot counts
    /// as failed (at most 60s).
    #[arg(long, global = true, env = "MURMUR_BOOT_TIMEOUT", default_value = "60s", value_parser = parse_boot_timeout)]
    boot_timeout: std::time::Duration,
    /// This worker's id as a VM host: it polls `murmur-host-<id>` for the work on its VMs.
    /// Default: this machine's hostname. Several workers on one machine need their own ids
    /// (and state dirs).
    #[arg(long, global = true, env = "MURMUR_HOST_ID", value_parser = parse_host_id)]
    host_id: Option<String>,
    /// Workflow runs this worker keeps cached, which is also how many workflow tasks it runs
    /// at once (at least 2). Each cached agent run holds ~90 KB; fewer means more history
    /// replays from the server when a run the cache dropped has work again. Keep it above the
    /// spawns that may be in flight at once (each holds a task while its first claim waits).
    #[arg(long, global = true, env = "MURMUR_WORKFLOW_CACHE",
        default_value_t = murmur::worker::DEFAULT_WORKFLOW_CACHE,
        value_parser = parse_workflow_cache)]
    workflow_cache: usize,
    /// Most VMs this host runs at once.
    #[arg(long, global = true, env = "MURMUR_HOST_MAX_VMS", default_value = "500",
        value_parser = clap::value_parser!(u32).range(1..))]
    host_max_vms: u32,
    /// Memory this host gives its VMs, in MiB (0: not limited). Default: 80% of this
    /// machine's RAM on qemu, not limited for process sandboxes.
    #[arg(long, global = true, env = "MURMUR_HOST_MEMORY_MB")]
    host_memory_mb: Option<u64>,
    /// How long this host may go without a lease heartbeat before the registry marks it lost
    /// and its VMs are written off (1s to 1h). Longer rides out slow restarts of a worker;
    /// shorter replaces a dead host's VMs sooner.
    #[arg(long, global = true, env = "MURMUR_HOST_LEASE_TIMEOUT", default_value = "15s", value_parser = parse_lease_timeout)]
    host_lease_timeout: std::time::Duration,
    /// Directory of the signing keys (default: the state dir). Every worker of a deployment
    /// must share the same keys.
    #[arg(long, global = true, env = "MURMUR_KEYS_DIR")]
    keys_dir: Option<PathBuf>,
    /// Where the host gateway (`murmur logs`, `exec`, `shell`) listens; `off` serves none.
    /// The default, a free loopback port, suits one machine; a fleet listens on an address
    /// the CLI can reach (`0.0.0.0:7450`) and usually sets --gateway-advertise.
    #[arg(
        long,
        global = true,
        env = "MURMUR_GATEWAY_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    gateway_listen: String,
    /// The gateway address registered for the CLI to connect to (`https://h1.internal:7450`);
    /// default: the bound address.
    #[arg(long, global = true, env = "MURMUR_GATEWAY_ADVERTISE")]
    gateway_advertise: Option<String>,
    /// How long the output of an ended agent stays on its host after its VM is deleted, for
    /// `murmur logs` (30m, 24h, 7d, ...).
    #[arg(long, global = true, env = "MURMUR_LOG_RETENTION", default_value = "24h", value_parser = parse_duration)]
    log_retention: std::time::Duration,
    /// TLS certificate chain (PEM) for the gateway; with --gateway-tls-key.
    #[arg(
        long,
        global = true,
        env = "MURMUR_GATEWAY_TLS_CERT",
        requires = "gateway_tls_key"
    )]
    gateway_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the gateway; with --gateway-tls-cert.
    #[arg(
        long,
        global = true,
        env = "MURMUR_GATEWAY_TLS_KEY",
        requires = "gateway_tls_cert"
    )]
    gateway_tls_key: Option<PathBuf>,
    /// Inject substrate faults, for chaos testing only, e.g.
    /// `create_fail=0.2,leak=0.1,delete_fail=0.2,ghost=0.05,latency=5ms..50ms,seed=7`.
    /// Off unless given.
    #[arg(long, global = true, env = "MURMUR_FAULTS")]
    faults: Option<murmur_activities::substrate::faults::FaultConfig>,
}

impl RunArgs {
    /// The gateway's settings from the flags (`None`: `--gateway-listen off`).
    fn gateway(&self) -> Result<Option<murmur::gateway::GatewaySettings>, String> {
        if self.gateway_listen == "off" {
            return Ok(None);
        }
        let listen = self.gateway_listen.parse().map_err(|e| {
            format!(
                "--gateway-listen {:?}: {e} (expected HOST:PORT or off)",
                self.gateway_listen
            )
        })?;
        let tls = match (&self.gateway_tls_cert, &self.gateway_tls_key) {
            (Some(cert), Some(key)) => Some(murmur::gateway::GatewayTls {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        Ok(Some(murmur::gateway::GatewaySettings {
            listen,
            advertise: self.gateway_advertise.clone(),
            tls,
        }))
    }

    /// Where the signing keys live.
    fn keys_dir(&self) -> &std::path::Path {
        self.keys_dir.as_deref().unwrap_or(&self.state_dir)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Issue identity credentials (signed with this worker's key).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage the worker's signing keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Supervise one process-substrate sandbox (started by the worker, not by hand).
    #[command(hide = true)]
    Sandbox {
        /// The sandbox directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Print a credential (`<token>~<private key>`) for a developer of a tenant; hand it over
    /// privately and store it with `murmur auth login`.
    ///
    /// Example:
    ///   murmur-worker token issue --tenant demo --developer ana --role member --ttl 12h
    Issue {
        /// Tenant the token acts for.
        #[arg(long)]
        tenant: String,
        /// The developer.
        #[arg(long)]
        developer: String,
        /// murmur-tenant-admin, member or viewer.
        #[arg(long)]
        role: String,
        /// Lifetime: 90s, 30m, 12h, 7d.
        #[arg(long, default_value = "12h")]
        ttl: String,
    },
    /// Check a token read from stdin against this worker's keys: exit 0 and print its
    /// developer, tenant and role when it is valid and unexpired, exit 1 otherwise.
    Check,
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a new signing key and make it current; tokens of older keys keep working until
    /// they expire or their key is retired.
    Rotate,
    /// List key ids, the current one first.
    List,
    /// Delete an old key: every token it signed stops working.
    Retire {
        /// The key id (from `key list`).
        kid: String,
    },
}

/// Parses `90s`, `1h30m`, `500ms`, `7d` (humantime), or plain seconds.
fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    Ok(murmur::duration::parse_duration(s)?)
}

/// A host id: a DNS label, so it makes a task queue name.
fn parse_host_id(s: &str) -> anyhow::Result<String> {
    murmur_workflows::hosts::validate_host_id(s).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(s.to_string())
}

/// A workflow cache size: between 2 (the SDK needs two task slots to poll both of its
/// queues) and 100,000.
fn parse_workflow_cache(s: &str) -> anyhow::Result<usize> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid workflow cache {s:?}: expected a number of runs"))?;
    anyhow::ensure!(
        (2..=100_000).contains(&n),
        "invalid workflow cache {s:?}: must be between 2 and 100000"
    );
    Ok(n)
}

/// A lease timeout: between 1s and 1h.
fn parse_lease_timeout(s: &str) -> anyhow::Result<std::time::Duration> {
    let d = parse_duration(s)?;
    anyhow::ensure!(
        (1..=3600).contains(&d.as_secs()),
        "invalid lease timeout {s:?}: must be between 1s and 1h"
    );
    Ok(d)
}

/// A boot timeout: a duration of at most the pool workflow's boot deadline.
fn parse_boot_timeout(s: &str) -> anyhow::Result<std::time::Duration> {
    let d = parse_duration(s)?;
    let max = murmur_workflows::pool_workflow::BOOT_TIMEOUT;
    anyhow::ensure!(
        !d.is_zero() && d <= max,
        "invalid boot timeout {s:?}: must be between 1s and {}s",
        max.as_secs()
    );
    Ok(d)
}

fn token_command(state_dir: &std::path::Path, cmd: TokenCommand) -> anyhow::Result<()> {
    use murmur_workflows::auth::roles;
    let (tenant, developer, role, ttl) = match cmd {
        TokenCommand::Issue {
            tenant,
            developer,
            role,
            ttl,
        } => (tenant, developer, role, ttl),
        TokenCommand::Check => {
            let mut token = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)?;
            let store = murmur_activities::auth::KeyStore::open(state_dir)?;
            let claims = store
                .check_token(&token, murmur_activities::auth::now_ms())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{} {} {}", claims.sub, claims.tenant, claims.role);
            return Ok(());
        }
    };
    anyhow::ensure!(
        murmur_workflows::model::is_dns_label(&tenant),
        "invalid tenant {tenant:?}: must match [a-z][a-z0-9-]{{0,62}}"
    );
    anyhow::ensure!(
        !developer.is_empty() && !developer.contains(['/', '~', '\n']),
        "invalid developer {developer:?}"
    );
    anyhow::ensure!(
        roles::ALL.contains(&role.as_str()),
        "unknown role {role:?} (expected one of {})",
        roles::ALL.join(", ")
    );
    let store = murmur_activities::auth::KeyStore::open(state_dir)?;
    let credential = store.issue(&tenant, &developer, &role, parse_duration(&ttl)?)?;
    println!("{credential}");
    Ok(())
}

fn key_command(state_dir: &std::path::Path, cmd: KeyCommand) -> anyhow::Result<()> {
    let store = murmur_activities::auth::KeyStore::open(state_dir)?;
    match cmd {
        KeyCommand::Rotate => println!("{}", store.rotate()?),
        KeyCommand::List => {
            for kid in store.key_ids()? {
                println!("{kid}");
            }
        }
        KeyCommand::Retire { kid } => store.retire(&kid)?,
    }
    Ok(())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Pretty,
    Json,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let telemetry = murmur::telemetry::init(&murmur::telemetry::TelemetryConfig {
        json_logs: matches!(cli.log_format, LogFormat::Json),
        otlp_endpoint: cli.otlp_endpoint.clone(),
    });
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("murmur-worker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Some(Command::Sandbox { dir }) => {
            murmur_activities::substrate::sandbox::run_supervisor(dir).await
        }
        Some(Command::Token(cmd)) => token_command(cli.run.keys_dir(), cmd),
        Some(Command::Key(cmd)) => key_command(cli.run.keys_dir(), cmd),
        Some(Command::Run) | None => {
            let gateway = match cli.run.gateway() {
                Ok(gateway) => gateway,
                Err(e) => {
                    eprintln!("murmur-worker: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            murmur::worker::run(murmur::worker::WorkerConfig {
                gateway,
                log_retention: cli.run.log_retention,
                task_queue: cli.run.task_queue,
                state_dir: cli.run.state_dir,
                workflow_cache: cli.run.workflow_cache,
                metrics_addr: cli.run.metrics_addr,
                metrics_refresh: cli.run.metrics_refresh,
                substrate: cli.run.substrate,
                reaper: murmur_activities::reaper::ReaperSettings {
                    interval: cli.run.reap_interval,
                    grace: cli.run.reap_grace,
                    stranded_after: cli.run.stranded_after,
                    roll_over_events: cli.run.pool_roll_over,
                },
                faults: cli.run.faults,
                boot_timeout: cli.run.boot_timeout,
                host: murmur::worker::HostSettings {
                    id: cli
                        .run
                        .host_id
                        .unwrap_or_else(murmur::worker::HostSettings::default_id),
                    max_vms: cli.run.host_max_vms,
                    lease_timeout: cli.run.host_lease_timeout,
                    memory_mb: cli.run.host_memory_mb.unwrap_or_else(|| {
                        murmur::worker::HostSettings::default_memory_mb(cli.run.substrate)
                    }),
                },
                keys_dir: cli.run.keys_dir,
            })
            .await
        }
    };
    let code = match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}
