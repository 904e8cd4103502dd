//! `murmur host ls | drain | forget`.

use clap::Subcommand;
use murmur::client::task_queue;
use murmur_workflows::error::ApiError;

use crate::{Globals, emit};

#[derive(Subcommand, Debug)]
pub(crate) enum HostCommand {
    /// List the VM hosts (murmur-worker processes) of this deployment: state (live,
    /// draining, lost), the VMs the pools have placed on each, capacity and losses.
    ///
    /// Examples:
    ///   murmur host ls
    ///   murmur host ls -o json | jq '.[] | select(.status == "lost") | .host'
    Ls,
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

pub(crate) async fn run(cmd: HostCommand, globals: &Globals) -> Result<(), ApiError> {
    let actor = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let client = globals.connect(&format!("murmur-cli:{actor}")).await?;
    let queue = task_queue();
    let format = globals.format;
    match cmd {
        HostCommand::Ls => {
            let rows = murmur::hosts::list(&client, &queue).await?;
            emit(format, &rows, || murmur::hosts::table(&rows))
        }
        HostCommand::Forget { host } => {
            let info = murmur::hosts::forget(&client, &queue, &host, &actor).await?;
            emit(format, &info, || format!("Host {} forgotten\n", info.host))
        }
        HostCommand::Drain { host, undo } => {
            let info = murmur::hosts::drain(&client, &queue, &host, undo, &actor).await?;
            emit(format, &info, || {
                if undo {
                    format!("Host {} takes new VMs again\n", info.host)
                } else {
                    format!(
                        "Host {} draining: no new VMs are placed there and its warm VMs are being replaced elsewhere\n",
                        info.host
                    )
                }
            })
        }
    }
}
