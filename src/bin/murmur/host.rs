//! `murmur host ls | drain | forget`.

use clap::Subcommand;
use murmur::client::{connect, task_queue};
use murmur_workflows::error::ApiError;

#[derive(Subcommand, Debug)]
pub(crate) enum HostCommand {
    /// List the VM hosts (murmur-worker processes) of this deployment: state (live,
    /// draining, lost), the VMs the pools have placed on each, capacity and losses.
    ///
    /// Examples:
    ///   murmur host ls
    ///   murmur host ls --json | jq '.[] | select(.status == "lost") | .host'
    Ls {
        /// Print the hosts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain a host: pools stop placing VMs on it and delete its warm VMs (they are replaced
    /// on other hosts); agents running there finish. With --undo, the host takes VMs again.
    ///
    /// Host commands act on the deployment (every tenant's pool on this task queue); they
    /// need access to the Temporal namespace, not a tenant credential.
    ///
    /// Examples:
    ///   murmur host drain worker-3
    ///   murmur host drain --undo worker-3
    Drain {
        /// The host id (as `murmur host ls` shows it).
        host: String,
        /// End the drain.
        #[arg(long)]
        undo: bool,
        /// Print the host as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a lost host that will not come back (a machine replaced by another), so it no
    /// longer shows in `murmur host ls` and in every pool's view. A live host cannot be
    /// forgotten; a forgotten host that starts again registers as new.
    ///
    /// Example:
    ///   murmur host forget worker-3
    Forget {
        /// The host id.
        host: String,
    },
}

pub(crate) async fn run(cmd: HostCommand) -> Result<(), ApiError> {
    let actor = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let client = connect(&format!("murmur-cli:{actor}")).await?;
    let queue = task_queue();
    match cmd {
        HostCommand::Ls { json } => {
            let rows = murmur::hosts::list(&client, &queue).await?;
            if json {
                println!("{}", to_json(&rows)?);
            } else {
                print!("{}", murmur::hosts::table(&rows));
            }
        }
        HostCommand::Forget { host } => {
            let info = murmur::hosts::forget(&client, &queue, &host, &actor).await?;
            println!("Host {} forgotten", info.host);
        }
        HostCommand::Drain { host, undo, json } => {
            let info = murmur::hosts::drain(&client, &queue, &host, undo, &actor).await?;
            if json {
                println!("{}", to_json(&info)?);
            } else if undo {
                println!("Host {} takes new VMs again", info.host);
            } else {
                println!(
                    "Host {} draining: no new VMs are placed there and its warm VMs are being replaced elsewhere",
                    info.host
                );
            }
        }
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string_pretty(v).map_err(|e| ApiError::invalid_argument(e.to_string()))
}
