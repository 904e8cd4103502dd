//! `murmur sleep | wake | on-idle`: an agent's VM put to sleep and woken, and what the agent
//! does once its command exits.

use clap::Args;
use murmur_workflows::agent::OnIdle;

use crate::agent::{Outcome, SlugArgs, no_hint, with_hint};
use crate::{Globals, Session, emit};

/// What `murmur sleep | wake -o json|yaml` prints.
#[derive(serde::Serialize)]
struct Power<'a> {
    /// The agent's slug.
    slug: &'a str,
    /// Its workflow id.
    workflow: String,
    /// Its VM.
    vm: Option<String>,
    /// Whether the VM is asleep now.
    asleep: bool,
    /// The agent's phase now.
    phase: Option<&'static str>,
}

/// `murmur sleep <slug>`: prints `VM stopped` once the VM is asleep.
pub(crate) async fn sleep(args: SlugArgs, globals: &Globals) -> Outcome {
    power(args, globals, true).await
}

/// `murmur wake <slug>`: prints `VM started` once the VM is awake.
pub(crate) async fn wake(args: SlugArgs, globals: &Globals) -> Outcome {
    power(args, globals, false).await
}

async fn power(args: SlugArgs, globals: &Globals, asleep: bool) -> Outcome {
    let session = Session::open(globals).await.map_err(with_hint)?;
    let st = if asleep {
        session.agents.sleep(&args.slug).await
    } else {
        with_progress(&session, &args.slug, session.agents.wake(&args.slug)).await
    }
    .map_err(with_hint)?;
    let doc = Power {
        slug: &args.slug,
        workflow: st.workflow.clone(),
        vm: st.vm.as_ref().map(ToString::to_string),
        asleep: st.asleep,
        phase: st.phase.map(|p| p.as_str()),
    };
    let said = if asleep {
        "VM stopped\n"
    } else {
        "VM started\n"
    };
    emit(globals.format, &doc, || said.to_string()).map_err(no_hint)
}

/// How often a waiting wake looks at the agent's status for progress to report.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `call`, saying on stderr what the agent waits for while it waits (a wake of a VM
/// outside `max_vms` waits for room; the answer comes only once the VM runs).
async fn with_progress<T>(
    session: &Session,
    slug: &str,
    call: impl std::future::Future<Output = T>,
) -> T {
    let mut call = std::pin::pin!(call);
    let mut said: Option<String> = None;
    loop {
        tokio::select! {
            out = &mut call => return out,
            _ = tokio::time::sleep(PROGRESS_EVERY) => {
                let waiting = session.agents.status(slug).await.ok().and_then(|st| st.waiting);
                if waiting.is_some() && waiting != said {
                    eprintln!("{slug}: {}", waiting.as_deref().unwrap_or_default());
                }
                said = waiting;
            }
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct OnIdleArgs {
    /// The agent's slug.
    slug: String,
    /// sleep or keep-alive (terminate is chosen at spawn only).
    #[arg(value_parser = parse_on_idle)]
    mode: OnIdle,
}

/// Parses an on-idle mode (`keep_alive` too); `terminate` parses and is refused later, with
/// the reason.
fn parse_on_idle(s: &str) -> Result<OnIdle, String> {
    OnIdle::parse(s).map_err(|e| e.message)
}

/// What `murmur on-idle -o json|yaml` prints.
#[derive(serde::Serialize)]
struct OnIdleSet<'a> {
    /// The agent's slug.
    slug: &'a str,
    /// What it does the next time it goes idle.
    on_idle: &'static str,
}

/// `murmur on-idle <slug> <mode>`: prints `on-idle set to <mode> for <slug>`.
pub(crate) async fn on_idle(args: OnIdleArgs, globals: &Globals) -> Outcome {
    let mode = args.mode;
    let session = Session::open(globals).await.map_err(with_hint)?;
    let st = session
        .agents
        .set_on_idle(&args.slug, mode)
        .await
        .map_err(with_hint)?;
    let doc = OnIdleSet {
        slug: &args.slug,
        on_idle: st.on_idle.as_str(),
    };
    emit(globals.format, &doc, || {
        format!("on-idle set to {} for {}\n", st.on_idle.as_str(), args.slug)
    })
    .map_err(no_hint)
}
