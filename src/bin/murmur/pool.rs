//! `murmur pool flush | status | up`.

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use murmur::duration::{format_duration, parse_duration};
use murmur::output::{FLUSH_START, Format, NUKE_START, flush_result, nuke_result, status_table};
use murmur::progress::{Progress, until_interrupted};
use murmur_workflows::error::ApiError;
use murmur_workflows::status::PoolStatus;

use crate::{Globals, Session, emit};

#[derive(Subcommand, Debug)]
pub(crate) enum PoolCommand {
    /// Destroy every warm VM so the pool replenishes from the current image.
    ///
    /// Running agents are not affected. Use after baking a new image or changing a
    /// workspace's image_ref. The flush covers the tenant's whole pool.
    ///
    /// With --nuke: terminate every agent workflow of the tenant, delete every VM (orphans
    /// included), then let the pool backfill again. A nuke already running is joined.
    ///
    /// Examples:
    ///   murmur pool flush
    ///   murmur pool flush --nuke
    Flush {
        /// Emergency wipe: every agent and every VM of the tenant, not just warm VMs.
        #[arg(long)]
        nuke: bool,
    },
    /// Show warm / booting / assigned / deleting VMs per workspace and image generation.
    ///
    /// Examples:
    ///   murmur pool status
    ///   murmur pool status -o json | jq '.workspaces[].ready'
    ///
    /// -o json and -o yaml print the schema of `PoolStatus` (with --watch: one JSON document
    /// per line, or one YAML document, per refresh).
    Status {
        /// Refresh every --interval (in place on a terminal) until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
        /// Time between refreshes with --watch (500ms, 2s, 1m, ...; a bare number is seconds).
        #[arg(long, default_value = "2s", value_parser = parse_duration, requires = "watch")]
        interval: Duration,
    },
    /// Start the pool workflow if it is not running and make it backfill now (idempotent).
    ///
    /// A pool whose previous run ended (cancelled, terminated, stopped by the history limit)
    /// recovers first: its config from the record the run left, its VMs from the hosts, the
    /// claims of running agents from the VMs they own. `pool up` waits for that, with
    /// progress.
    ///
    /// Examples:
    ///   murmur pool up --wait
    ///   murmur pool up --restart     # end a wedged run; the new one recovers
    Up {
        /// Wait until every workspace has min_idle warm VMs.
        #[arg(long)]
        wait: bool,
        /// End the pool's current run first (a run that does not answer, or one of an earlier
        /// build that cannot replay); the new run recovers the config, the VMs and the agents'
        /// claims. Needs namespace access, like `temporal workflow terminate`.
        #[arg(long)]
        restart: bool,
        /// How long --wait waits (120s, 5m, ...; a bare number is seconds).
        #[arg(long, default_value = "120s", value_parser = parse_duration, requires = "wait")]
        timeout: Duration,
    },
}

pub(crate) async fn run(cmd: PoolCommand, globals: &Globals) -> Result<(), ApiError> {
    let session = Session::open(globals).await?;
    let format = globals.format;
    match cmd {
        PoolCommand::Flush { nuke: true } => {
            if !format.is_structured() {
                println!("{NUKE_START}");
                let _ = std::io::stdout().flush();
            }
            let mut progress = Progress::start("starting the nuke");
            let nuke = session.pool.nuke(|p| {
                progress.set(&format!(
                    "{}: {}/{} agents terminated, {}/{} VMs deleted",
                    p.step, p.terminated, p.agents, p.deleted, p.vms
                ))
            });
            let report = until_interrupted(nuke, "the nuke", "murmur pool status").await;
            progress.finish();
            let report = report?;
            emit(format, &report, || {
                format!("{}\n", nuke_result(report.total()))
            })
        }
        PoolCommand::Flush { nuke: false } => {
            if !format.is_structured() {
                println!("{FLUSH_START}");
                let _ = std::io::stdout().flush();
            }
            let progress = Progress::start("waiting for the flushed VMs to be deleted");
            let reply =
                until_interrupted(session.pool.flush(), "the flush", "murmur pool status").await;
            progress.finish();
            let reply = reply?;
            emit(format, &reply, || {
                format!("{}\n", flush_result(reply.flushed))
            })
        }
        PoolCommand::Status { watch: false, .. } => {
            let st = session.pool.status().await?;
            print_status(&st, format)
        }
        PoolCommand::Status {
            watch: true,
            interval,
        } => watch_status(&session, interval.max(Duration::from_millis(200)), format).await,
        PoolCommand::Up {
            wait,
            timeout,
            restart,
        } => {
            if restart {
                session.pool.end_run("murmur pool up --restart").await?;
            }
            let up = session.pool.up().await?;
            let mut st = session.pool.status().await?;
            if up.recovering {
                st = wait_until_recovered(&session, st, timeout).await?;
            }
            if wait {
                st = wait_until_filled(&session, st, timeout).await?;
            }
            print_status(&st, format)
        }
    }
}

fn print_status(st: &PoolStatus, format: Format) -> Result<(), ApiError> {
    emit(format, st, || status_table(st, now_ms()))
}

/// Redraws the status until Ctrl-C: in place on a terminal, one block per refresh otherwise
/// (one JSON line or YAML document per refresh with -o json|yaml).
async fn watch_status(
    session: &Session,
    interval: Duration,
    format: Format,
) -> Result<(), ApiError> {
    use std::io::IsTerminal as _;
    let tty = std::io::stdout().is_terminal();
    loop {
        let st = session.pool.status().await?;
        if format.is_structured() {
            print!("{}", format.stream_item(&st)?);
        } else if tty {
            // Clear the screen and home the cursor, then draw.
            print!(
                "\x1b[2J\x1b[H{}\n(every {}; Ctrl-C to stop)\n",
                status_table(&st, now_ms()),
                format_duration(interval)
            );
        } else {
            println!("{}", status_table(&st, now_ms()));
        }
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Waits (with progress) until a pool that is recovering has rebuilt its state.
async fn wait_until_recovered(
    session: &Session,
    mut st: PoolStatus,
    timeout: Duration,
) -> Result<PoolStatus, ApiError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::start("Recovering the pool");
    while let Some(r) = &st.recovery {
        progress.set(&murmur::output::recovery_line(r));
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                murmur_workflows::error::Code::Unavailable,
                format!(
                    "pool/{} did not finish recovering within {}; see murmur pool status",
                    st.tenant,
                    format_duration(timeout)
                ),
            ));
        }
        let pause = tokio::time::sleep(Duration::from_millis(200));
        until_interrupted(pause, "the recovery", "murmur pool status").await;
        st = session.pool.status().await?;
    }
    progress.finish();
    Ok(st)
}

fn filled(st: &PoolStatus) -> bool {
    st.recovery.is_none() && st.workspaces.iter().all(|w| w.ready >= w.min_idle)
}

async fn wait_until_filled(
    session: &Session,
    mut st: PoolStatus,
    timeout: Duration,
) -> Result<PoolStatus, ApiError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::start("Waiting for warm VMs");
    while !filled(&st) {
        let counts: Vec<String> = st
            .workspaces
            .iter()
            .map(|w| format!("{} {}/{}", w.name, w.ready, w.min_idle))
            .collect();
        progress.set(&format!("Waiting for warm VMs: {}", counts.join(", ")));
        if Instant::now() >= deadline {
            return Err(ApiError::failed_precondition(format!(
                "pool did not fill within {}; see murmur pool status",
                format_duration(timeout)
            )));
        }
        let pause = tokio::time::sleep(Duration::from_millis(200));
        until_interrupted(pause, "backfill", "murmur pool status").await;
        st = session.pool.status().await?;
    }
    progress.finish();
    Ok(st)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
