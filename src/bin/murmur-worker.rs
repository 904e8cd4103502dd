//! `murmur-worker`: the Temporal worker that runs murmur's workflows and activities.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Task queue to poll.
    #[arg(long, env = "MURMUR_TASK_QUEUE", default_value = "murmur")]
    task_queue: String,
    /// Directory for sandboxes, images and keys.
    #[arg(long, env = "MURMUR_STATE_DIR", default_value = ".state")]
    state_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Supervise one process-substrate sandbox (started by the worker, not by hand).
    #[command(hide = true)]
    Sandbox {
        /// The sandbox directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Pretty,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,temporalio_sdk_core=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Some(Command::Sandbox { dir }) => murmur_activities::sandbox::run_supervisor(dir).await,
        Some(Command::Run) | None => {
            murmur::worker::run(murmur::worker::WorkerConfig {
                task_queue: cli.run.task_queue,
                state_dir: cli.run.state_dir,
            })
            .await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
