//! `murmur spawn | kill | ls | status | wait`.

use std::time::Duration;

use clap::{Args, ValueEnum};
use murmur::output::{agent_status, agent_table, spawned};
use murmur::progress::{Progress, until_interrupted};
use murmur_workflows::agent::{OnIdle, Phase};
use murmur_workflows::error::{ApiError, Code};

use crate::Session;

/// What the agent does once its command exits.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum OnIdleArg {
    /// Destroy the VM and end.
    Terminate,
    /// Stay idle with the VM until killed.
    #[value(alias = "keep_alive")]
    KeepAlive,
}

#[derive(Args, Debug)]
pub(crate) struct SpawnArgs {
    /// What to do when the command exits.
    #[arg(long, value_enum, default_value = "terminate")]
    on_idle: OnIdleArg,
    /// The agent's name: a DNS label, unique among your running agents in the workspace.
    slug: String,
    /// The command to run in the VM. One word runs through /bin/sh -c; several are executed
    /// as given (put them after --).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct SlugArgs {
    /// The agent's slug.
    slug: String,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// Print the status as JSON (the schema of `AgentStatus`).
    #[arg(long)]
    json: bool,
    /// The agent's slug.
    slug: String,
}

#[derive(Args, Debug)]
pub(crate) struct LsArgs {
    /// Print slugs only, one per line.
    #[arg(short, long)]
    quiet: bool,
    /// Print a JSON array of {slug, phase, vm, workflow}.
    #[arg(long)]
    json: bool,
    /// Include agents that have ended.
    #[arg(short, long)]
    all: bool,
}

#[derive(Args, Debug)]
pub(crate) struct WaitArgs {
    /// Phase to wait for (PHASE_RUNNING or running, task-complete, idle, completed, ...).
    #[arg(long, default_value = "running")]
    phase: String,
    /// Give up after this many seconds (exit 1).
    #[arg(long)]
    timeout: Option<u64>,
    /// The agent's slug.
    slug: String,
}

/// Adds the "use murmur ls" hint to an unknown-slug error.
fn with_hint(e: ApiError) -> (ApiError, Option<&'static str>) {
    let hint = (e.code == Code::NotFound).then_some(murmur::agents::NOT_FOUND_HINT);
    (e, hint)
}

type Outcome = Result<(), (ApiError, Option<&'static str>)>;

pub(crate) async fn spawn(args: SpawnArgs, workspace: Option<&str>) -> Outcome {
    let session = Session::open(workspace).await.map_err(with_hint)?;
    let on_idle = match args.on_idle {
        OnIdleArg::Terminate => OnIdle::Terminate,
        OnIdleArg::KeepAlive => OnIdle::KeepAlive,
    };
    let status = session
        .agents
        .spawn(&args.slug, args.command, on_idle)
        .await
        .map_err(with_hint)?;
    print!("{}", spawned(&args.slug));
    if let Some(waiting) = &status.waiting {
        eprintln!(
            "note: {} is waiting: {waiting}; it starts once the pool answers (murmur status {})",
            args.slug, args.slug
        );
    }
    Ok(())
}

pub(crate) async fn kill(args: SlugArgs, workspace: Option<&str>) -> Outcome {
    let session = Session::open(workspace).await.map_err(with_hint)?;
    session.agents.kill(&args.slug).await.map_err(with_hint)?;
    println!("killed {}", args.slug);
    Ok(())
}

pub(crate) async fn status(args: StatusArgs, workspace: Option<&str>) -> Outcome {
    let session = Session::open(workspace).await.map_err(with_hint)?;
    let st = session.agents.status(&args.slug).await.map_err(with_hint)?;
    if args.json {
        let text = serde_json::to_string_pretty(&st)
            .map_err(|e| with_hint(ApiError::new(Code::Internal, e.to_string())))?;
        println!("{text}");
    } else {
        print!("{}", agent_status(&st));
    }
    Ok(())
}

pub(crate) async fn ls(args: LsArgs, workspace: Option<&str>) -> Outcome {
    let session = Session::open(workspace).await.map_err(with_hint)?;
    let rows = session.agents.list(args.all).await.map_err(with_hint)?;
    if args.json {
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| with_hint(ApiError::new(Code::Internal, e.to_string())))?;
        println!("{text}");
    } else if args.quiet {
        for r in &rows {
            println!("{}", r.slug);
        }
    } else {
        print!("{}", agent_table(&rows));
    }
    Ok(())
}

pub(crate) async fn wait(args: WaitArgs, workspace: Option<&str>) -> Outcome {
    let phase = Phase::parse(&args.phase).map_err(with_hint)?;
    let session = Session::open(workspace).await.map_err(with_hint)?;
    let mut progress = Progress::start(&format!("{}: waiting for {}", args.slug, phase));
    let waiting = session.agents.wait(
        &args.slug,
        phase,
        args.timeout.map(Duration::from_secs),
        |st| {
            if let Some(p) = st.phase {
                progress.set(&format!(
                    "{}: {} (waiting for {phase})",
                    st.slug,
                    p.as_str()
                ));
            }
        },
    );
    let result = until_interrupted(
        waiting,
        "the agent",
        &format!("murmur status {}", args.slug),
    )
    .await;
    progress.finish();
    match result {
        Ok(st) => {
            print!("{}", agent_status(&st));
            Ok(())
        }
        Err(e) => {
            // Still show where the agent is, then fail.
            if let Ok(st) = session.agents.status(&args.slug).await {
                print!("{}", agent_status(&st));
            }
            Err(with_hint(e))
        }
    }
}
