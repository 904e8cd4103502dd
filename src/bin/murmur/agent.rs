//! `murmur spawn | kill | ls | status | wait`.

use std::io::Write as _;
use std::time::Duration;

use clap::{Args, ValueEnum};
use murmur::duration::{format_duration, parse_duration};
use murmur::output::{Format, agent_status, agent_table, spawned};
use murmur::progress::{Progress, until_interrupted};
use murmur_workflows::agent::{OnIdle, Phase};
use murmur_workflows::error::{ApiError, Code};

use crate::{Globals, Session, emit};

/// What the agent does once its command exits.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum OnIdleArg {
    /// Destroy the VM and end.
    Terminate,
    /// Stay idle with the VM until killed.
    #[value(alias = "keep_alive")]
    KeepAlive,
    /// Put the VM to sleep (everything in it kept) until `murmur wake` or a kill.
    Sleep,
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
    pub(crate) slug: String,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The agent's slug. (-o json|yaml prints the schema of `AgentStatus`.)
    slug: String,
}

#[derive(Args, Debug)]
pub(crate) struct LsArgs {
    /// Print slugs only, one per line.
    #[arg(short, long)]
    quiet: bool,
    /// Every developer's agents in the workspace, not just yours (adds a DEVELOPER column).
    #[arg(short = 'A', long)]
    all: bool,
    /// Include agents that have ended.
    #[arg(short = 'a', long)]
    ended: bool,
    /// Print the list again whenever it changes, until Ctrl-C (-o json: one array per line).
    #[arg(short, long)]
    watch: bool,
    /// How often --watch looks (500ms, 2s, 1m, ...).
    #[arg(long, default_value = "2s", value_parser = parse_duration, requires = "watch")]
    interval: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct WaitArgs {
    /// Phase to wait for (PHASE_RUNNING or running, task-complete, idle, completed, ...).
    #[arg(long, default_value = "running")]
    phase: String,
    /// Give up after this long (exit 1): 90s, 5m, 1h30m; a bare number is seconds.
    #[arg(long, value_parser = parse_duration)]
    pub(crate) timeout: Option<Duration>,
    /// The agent's slug.
    slug: String,
}

/// Adds the "use murmur ls" hint to an unknown-slug error.
pub(crate) fn with_hint(e: ApiError) -> (ApiError, Option<&'static str>) {
    let hint = (e.code == Code::NotFound).then_some(murmur::agents::NOT_FOUND_HINT);
    (e, hint)
}

/// What an agent command returns: done, or the error and a hint for the user.
pub(crate) type Outcome = Result<(), (ApiError, Option<&'static str>)>;

/// What `murmur kill -o json|yaml` prints.
#[derive(serde::Serialize)]
struct Killed<'a> {
    /// The agent's slug.
    slug: &'a str,
    /// Its workflow id.
    workflow: String,
    /// Always true: the agent has been cancelled and its VM destroyed.
    killed: bool,
}

/// Maps a rendering failure onto the (error, hint) pair agent commands fail with.
pub(crate) fn no_hint(e: ApiError) -> (ApiError, Option<&'static str>) {
    (e, None)
}

pub(crate) async fn spawn(args: SpawnArgs, globals: &Globals) -> Outcome {
    let session = Session::open(globals).await.map_err(with_hint)?;
    let on_idle = match args.on_idle {
        OnIdleArg::Terminate => OnIdle::Terminate,
        OnIdleArg::KeepAlive => OnIdle::KeepAlive,
        OnIdleArg::Sleep => OnIdle::Sleep,
    };
    let status = session
        .agents
        .spawn(&args.slug, args.command, on_idle)
        .await
        .map_err(with_hint)?;
    emit(globals.format, &status, || spawned(&args.slug)).map_err(no_hint)?;
    if let Some(waiting) = &status.waiting {
        eprintln!(
            "note: {} is waiting: {waiting}; it starts once the pool answers (murmur status {})",
            args.slug, args.slug
        );
    }
    Ok(())
}

pub(crate) async fn kill(args: SlugArgs, globals: &Globals) -> Outcome {
    let session = Session::open(globals).await.map_err(with_hint)?;
    session.agents.kill(&args.slug).await.map_err(with_hint)?;
    let doc = Killed {
        slug: &args.slug,
        workflow: session.agents.workflow_id(&args.slug),
        killed: true,
    };
    emit(globals.format, &doc, || format!("killed {}\n", args.slug)).map_err(no_hint)
}

pub(crate) async fn status(args: StatusArgs, globals: &Globals) -> Outcome {
    let session = Session::open(globals).await.map_err(with_hint)?;
    let st = session.agents.status(&args.slug).await.map_err(with_hint)?;
    emit(globals.format, &st, || agent_status(&st)).map_err(no_hint)
}

/// `rows` as `murmur ls` prints them once (a watch prints JSON on one line per change).
fn render_rows(
    rows: &[murmur::agents::AgentRow],
    args: &LsArgs,
    format: Format,
    watching: bool,
) -> Result<String, ApiError> {
    Ok(match format {
        Format::Json | Format::Yaml if watching => format.stream_item(rows)?,
        Format::Json | Format::Yaml => format.document(rows)?,
        Format::Text if args.quiet => rows.iter().map(|r| format!("{}\n", r.slug)).collect(),
        Format::Text => agent_table(rows, args.all),
    })
}

pub(crate) async fn ls(args: LsArgs, globals: &Globals) -> Outcome {
    let session = Session::open(globals).await.map_err(with_hint)?;
    if !args.watch {
        let rows = session
            .agents
            .list(args.ended, args.all)
            .await
            .map_err(with_hint)?;
        print!(
            "{}",
            render_rows(&rows, &args, globals.format, false).map_err(no_hint)?
        );
        return Ok(());
    }
    watch_ls(&session, &args, globals.format)
        .await
        .map_err(with_hint)
}

/// `murmur ls --watch`: prints the list whenever it differs from what was printed last, until
/// Ctrl-C. On a terminal the text form is redrawn in place.
async fn watch_ls(session: &Session, args: &LsArgs, format: Format) -> Result<(), ApiError> {
    use std::io::IsTerminal as _;
    let redraw = format == Format::Text && std::io::stdout().is_terminal();
    let interval = args.interval.max(Duration::from_millis(200));
    let mut shown: Option<String> = None;
    loop {
        let rows = session.agents.list(args.ended, args.all).await?;
        let mut text = render_rows(&rows, args, format, true)?;
        if format == Format::Text && text.is_empty() {
            text = "(no agents)\n".to_string();
        }
        if shown.as_ref() != Some(&text) {
            if redraw {
                print!(
                    "\x1b[2J\x1b[H{text}\n(every {}; Ctrl-C to stop)\n",
                    format_duration(interval)
                );
            } else if format == Format::Text && shown.is_some() {
                print!("\n{text}");
            } else {
                print!("{text}");
            }
            let _ = std::io::stdout().flush();
            shown = Some(text);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub(crate) async fn wait(args: WaitArgs, globals: &Globals) -> Outcome {
    let phase = Phase::parse(&args.phase).map_err(with_hint)?;
    let session = Session::open(globals).await.map_err(with_hint)?;
    let mut progress = Progress::start(&format!("{}: waiting for {}", args.slug, phase));
    let waiting = session.agents.wait(&args.slug, phase, args.timeout, |st| {
        if let Some(p) = st.phase {
            progress.set(&format!(
                "{}: {} (waiting for {phase})",
                st.slug,
                p.as_str()
            ));
        }
    });
    let result = until_interrupted(
        waiting,
        "the agent",
        &format!("murmur status {}", args.slug),
    )
    .await;
    progress.finish();
    match result {
        Ok(st) => emit(globals.format, &st, || agent_status(&st)).map_err(no_hint),
        Err(e) => {
            // Still show where the agent is, then fail.
            if let Ok(st) = session.agents.status(&args.slug).await {
                emit(globals.format, &st, || agent_status(&st)).map_err(no_hint)?;
            }
            Err(with_hint(e))
        }
    }
}
