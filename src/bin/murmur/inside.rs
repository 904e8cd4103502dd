//! `murmur logs | exec | shell`: inside an agent's VM, through its host's gateway.

use std::io::{IsTerminal, Read, Write};

use clap::Args;
use murmur::gateway::client::{self, ExecCall, Located, LogsOptions, message};
use murmur::gateway::proto::WindowSize;
use murmur::gateway::proto::exec_client_message::Message as In;
use murmur::gateway::proto::exec_server_message::Message as Out;
use murmur_workflows::agent::Phase;
use murmur_workflows::error::{ApiError, Code};
use tokio::sync::mpsc;

use crate::agent::with_hint;
use crate::{Globals, Session};

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    /// Follow the output while the agent's command runs; return when it exits.
    #[arg(short, long)]
    follow: bool,
    /// Start at the last N lines instead of the beginning.
    #[arg(long, value_name = "N")]
    since: Option<u32>,
    /// The agent's slug.
    slug: String,
}

#[derive(Args, Debug)]
pub(crate) struct ExecArgs {
    /// The agent's slug.
    slug: String,
    /// The command to run in the agent's VM. One word runs through /bin/sh -c; several are
    /// executed as given (put them after --).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct ShellArgs {
    /// The agent's slug.
    slug: String,
}

/// What the inside commands fail with: an error and maybe a hint.
type Failed = (ApiError, Option<&'static str>);

async fn locate(globals: &Globals, slug: &str) -> Result<(Session, Located), Failed> {
    let session = Session::open(globals).await.map_err(with_hint)?;
    let at = client::locate(&session.agents, &session.client, slug)
        .await
        .map_err(with_hint)?;
    Ok((session, at))
}

/// `murmur logs`: prints the output; exits 0 unless the agent's command has exited non-zero
/// (or the agent failed or was killed), then 1.
pub(crate) async fn logs(args: LogsArgs, globals: &Globals) -> Result<u8, Failed> {
    let (session, at) = locate(globals, &args.slug).await?;
    let options = LogsOptions {
        tail_lines: args.since.unwrap_or(0),
        follow: args.follow,
    };
    let mut stdout = std::io::stdout().lock();
    let end = client::logs(&session.ctx, &at, options, |bytes| {
        stdout.write_all(bytes)?;
        stdout.flush()
    })
    .await
    .map_err(|e| (e, None))?;
    if !end.complete {
        return Ok(0);
    }
    // The host knows the exit code while the VM lives; after, the agent's status does.
    let code = match end.exit_code {
        Some(code) => Some(code),
        None => session
            .agents
            .status(&args.slug)
            .await
            .ok()
            .and_then(|st| match st.phase {
                Some(Phase::Failed | Phase::Canceled) => Some(1),
                _ => st.exit_code,
            }),
    };
    Ok(u8::from(code.is_some_and(|c| c != 0)))
}

/// Reads the local stdin on a thread of its own (a blocking read must not hold up the
/// runtime or the exit) and hands its bytes over; `None` at its end.
fn stdin_reader() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Runs a session to its end: stdin and (without a terminal) Ctrl-C go in, stdout and stderr
/// come out; answers the remote exit code as a process exit code.
async fn drive(mut call: ExecCall, terminal: bool, gateway: &str) -> Result<u8, Failed> {
    let mut stdin = stdin_reader();
    let mut stdin_open = true;
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| {
            (
                ApiError::new(Code::Internal, format!("watch window size: {e}")),
                None,
            )
        })?;
    // One listener for the whole session, made before the first output arrives: a
    // `ctrl_c()` made anew each time round the loop misses a Ctrl-C that comes while an
    // output chunk is written (RELIABILITY #30).
    let mut interrupted = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| {
            (
                ApiError::new(Code::Internal, format!("watch Ctrl-C: {e}")),
                None,
            )
        })?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        tokio::select! {
            msg = call.output.message() => {
                let msg = msg.map_err(|s| (client::api_error(gateway, s), None))?;
                let Some(msg) = msg.and_then(|m| m.message) else {
                    return Err((ApiError::new(
                        Code::Unavailable,
                        format!("gateway {gateway}: the session ended without an exit code"),
                    ), None));
                };
                match msg {
                    Out::Stdout(b) => { let _ = stdout.write_all(&b); let _ = stdout.flush(); }
                    Out::Stderr(b) => { let _ = stderr.write_all(&b); let _ = stderr.flush(); }
                    Out::Exit(code) => return Ok(code.clamp(0, 255) as u8),
                }
            }
            bytes = stdin.recv(), if stdin_open => {
                let m = match bytes.flatten() {
                    Some(b) => In::Stdin(b),
                    None => { stdin_open = false; In::StdinEnd(true) }
                };
                let _ = call.input.send(message(m)).await;
            }
            _ = interrupted.recv(), if !terminal => {
                // Delivered to the remote command; it decides whether to end.
                let _ = call.input.send(message(In::Signal(2))).await;
            }
            _ = resized.recv(), if terminal => {
                if let Ok((cols, rows)) = crossterm::terminal::size() {
                    let _ = call.input.send(message(In::Resize(WindowSize {
                        rows: rows.into(),
                        cols: cols.into(),
                    }))).await;
                }
            }
        }
    }
}

/// `murmur exec`: exits with the remote command's exit code.
pub(crate) async fn exec(args: ExecArgs, globals: &Globals) -> Result<u8, Failed> {
    let (session, at) = locate(globals, &args.slug).await?;
    let call = client::exec(&session.ctx, &at, args.command, None)
        .await
        .map_err(|e| (e, None))?;
    drive(call, false, &at.gateway).await
}

/// Puts the local terminal in raw mode for as long as it lives.
struct RawMode;

impl RawMode {
    fn enter() -> Option<Self> {
        crossterm::terminal::enable_raw_mode().ok().map(|()| Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// `murmur shell`: an interactive shell in the agent's VM; exits with the shell's exit code.
pub(crate) async fn shell(args: ShellArgs, globals: &Globals) -> Result<u8, Failed> {
    let (session, at) = locate(globals, &args.slug).await?;
    if let Some(phase) = at.status.phase.filter(|p| p.is_terminal()) {
        return Err((
            ApiError::failed_precondition(format!(
                "agent {} has ended ({}); its VM is gone, so there is no shell to open (murmur logs {} shows its output)",
                args.slug,
                phase.short(),
                args.slug
            )),
            None,
        ));
    }
    let local_terminal = std::io::stdin().is_terminal();
    let size = crossterm::terminal::size().map_or((24, 80), |(cols, rows)| (rows, cols));
    let call = client::exec(
        &session.ctx,
        &at,
        vec!["/bin/sh".into(), "-i".into()],
        Some(size),
    )
    .await
    .map_err(|e| (e, None))?;
    // Keystrokes go to the remote terminal as typed (Ctrl-C included) until the shell exits;
    // the local terminal is restored on every way out.
    let raw = local_terminal.then(RawMode::enter).flatten();
    let code = drive(call, true, &at.gateway).await;
    drop(raw);
    code
}
