//! Exec sessions on qemu guests: a command started next to the agent, without a terminal,
//! served over the control channel by one tokio task per session ([`start`]); and terminal
//! sessions (`murmur shell`, [`start_tty`]), whose bytes go over the guest's third serial
//! port.
//!
//! The guest agent keeps a session in `/run/murmur-exec/<id>/` (apart from the runs in
//! `/run/murmur/`, so a session is never taken for an agent run nor kept as a log): the
//! command runs in its own process group, stdout and stderr go to two files, its stdin is a
//! FIFO fed from numbered chunk files. The task here:
//!
//! - polls (`poll <id> <stdout offset> <stderr offset> <max>`: new bytes of both streams and
//!   the exit status in one round trip) every [`POLL_FAST`] while output flows or input was
//!   just sent, backing off to [`POLL_IDLE`]; a poll that hit the per-stream cap is followed
//!   at once;
//! - forwards [`ExecOutput::Stdout`] and [`ExecOutput::Stderr`], and exactly one
//!   [`ExecOutput::Exit`] last, once the exit is seen and both streams are drained; then
//!   removes the session's directory (`drop`);
//! - forwards [`ExecInput::Stdin`] (in [`STDIN_CHUNK`] pieces, at most [`MAX_UNFED`] of them
//!   not yet copied into the command's stdin: a command that does not read its stdin holds
//!   the caller back instead of filling the guest's memory), [`ExecInput::StdinEnd`] and
//!   [`ExecInput::Signal`]; [`ExecInput::Resize`] means nothing without a terminal;
//! - when the caller goes away before the exit (the input sender or the output receiver
//!   dropped), kills the command's process group (SIGKILL) and removes its directory.
//!
//! Every request is one short round trip taken under the VM's channel lock, so the agent's
//! own status polling interleaves with the session's.
//!
//! A terminal session ([`start_tty`]) relays the bytes of `tty.sock` (the guest's `ttyS2`,
//! which the shell has as its controlling terminal): the socket's bytes are
//! [`ExecOutput::Stdout`] (a terminal has no stderr), [`ExecInput::Stdin`] is written to it
//! in [`TTY_WRITE`] pieces (qemu reads the socket only as fast as the guest's UART takes the
//! bytes, so nothing is lost on the host side; the guest's line discipline holds a few KiB
//! of unread input, so a paste far larger than that into a command that does not read may
//! lose bytes, as on a serial console), [`ExecInput::StdinEnd`] is a Ctrl-D,
//! [`ExecInput::Resize`] and [`ExecInput::Signal`] (to the terminal's foreground process
//! group) go over the control channel. The exit comes in-band, as the marker the guest
//! writes after everything the shell wrote ([`ExitMarker`]), with the exit code; a poll every
//! [`SHELL_POLL`] renews the session's lease in the guest and notices an exit whose marker
//! was lost. When the caller goes away, every process of the shell's session is killed.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use murmur_workflows::model::VmId;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::QemuProvider;
use super::guest::{ExecPoll, ExitMarker, POLL_MAX, STDIN_CHUNK, parse_poll, parse_shell_poll};
use crate::substrate::SubstrateError;
use crate::substrate::session::{ExecInput, ExecOutput};

/// Poll interval while output flows or input was just sent.
pub const POLL_FAST: Duration = Duration::from_millis(50);
/// Poll interval of an idle session (reached by doubling from [`POLL_FAST`]).
pub const POLL_IDLE: Duration = Duration::from_millis(200);
/// Stdin chunks sent to the guest and not yet copied into the command's stdin, at most.
pub const MAX_UNFED: u64 = 16;
/// Consecutive failed requests after which the session is given up.
const MAX_FAILURES: u32 = 5;
/// How long the last request of a dropped session (the kill) may take.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// The exit code reported when the session cannot be followed any more (the VM went away or
/// to sleep, the guest forgot the session, the channel kept failing).
pub const LOST_EXIT: i32 = 255;
/// Why a session ends when its VM goes to sleep. (Its command is frozen with the guest and
/// runs on after a wake, unfollowed: the kill that ends a lost session cannot reach a
/// sleeping guest.)
const ASLEEP: &str = "the VM went to sleep";

/// One session's serving task: an exec session ([`start`]) or a terminal ([`start_tty`]).
pub(super) struct SessionTask {
    /// The provider (for its serialised channel).
    pub provider: QemuProvider,
    /// The VM's directory.
    pub dir: PathBuf,
    /// The VM.
    pub vm: VmId,
    /// The session id (a directory name in the guest).
    pub id: String,
    /// What the caller sends.
    pub input: mpsc::Receiver<ExecInput>,
    /// What goes back to the caller.
    pub output: mpsc::Sender<ExecOutput>,
}

/// Why serving stopped before the command's exit was forwarded.
enum Stop {
    /// The caller went away: kill the command.
    CallerGone,
    /// The session cannot be followed any more (reason for the log and the caller).
    Lost(String),
}

/// Spawns the task serving a session the guest has started.
pub(super) fn start(task: SessionTask) {
    tokio::spawn(task.serve());
}

impl SessionTask {
    async fn ask(&self, verb: &str, args: &str) -> Result<String, SubstrateError> {
        self.provider.ask(&self.dir, &self.vm, verb, args).await
    }

    async fn serve(mut self) {
        match self.follow().await {
            Ok(()) => {}
            Err(Stop::CallerGone) => {
                tracing::debug!(vm = %self.vm, session = %self.id, "exec caller went away: killing");
            }
            Err(Stop::Lost(reason)) => {
                tracing::warn!(vm = %self.vm, session = %self.id, %reason, "exec session lost");
                let note = format!("murmur: exec session lost: {reason}\n");
                let _ = self
                    .output
                    .send(ExecOutput::Stderr(note.into_bytes()))
                    .await;
                let _ = self.output.send(ExecOutput::Exit(LOST_EXIT)).await;
            }
        }
        // After an exit: clean up; otherwise: SIGKILL to the process group, then clean up.
        let args = self.id.clone();
        let _ = tokio::time::timeout(DROP_TIMEOUT, self.ask("drop", &args)).await;
    }

    /// Serves the session until the exit was forwarded (`Ok`) or it stops.
    async fn follow(&mut self) -> Result<(), Stop> {
        let mut offsets = (0u64, 0u64);
        let mut sent = 0u64; // last stdin chunk sent
        let mut fed = 0u64; // last stdin chunk the guest copied into the command's stdin
        let mut stdin_open = true;
        let mut failures = 0u32;
        let mut delay = Duration::ZERO;
        loop {
            // Wait for the next poll, serving input meanwhile.
            let mut due = Instant::now() + delay;
            loop {
                if self.output.is_closed() {
                    return Err(Stop::CallerGone);
                }
                let room = sent - fed.min(sent) < MAX_UNFED;
                if !room && self.input.is_closed() {
                    return Err(Stop::CallerGone);
                }
                tokio::select! {
                    msg = self.input.recv(), if room => {
                        let Some(msg) = msg else {
                            return Err(Stop::CallerGone);
                        };
                        if self.forward(msg, &mut sent, &mut stdin_open).await? {
                            due = due.min(Instant::now() + POLL_FAST);
                            delay = POLL_FAST;
                        }
                    }
                    () = tokio::time::sleep_until(due) => break,
                }
            }
            let args = format!("{} {} {} {POLL_MAX}", self.id, offsets.0, offsets.1);
            let poll = match self.ask("poll", &args).await {
                Ok(answer) => parse_poll(&answer).map_err(|reason| SubstrateError::Guest {
                    vm: self.vm.clone(),
                    reason,
                }),
                Err(e) => Err(e),
            };
            let poll: ExecPoll = match poll {
                Ok(Some(poll)) => poll,
                Ok(None) => return Err(Stop::Lost("the guest forgot the session".into())),
                Err(SubstrateError::VmGone(_)) => return Err(Stop::Lost("the VM is gone".into())),
                Err(SubstrateError::Asleep(_)) => return Err(Stop::Lost(ASLEEP.into())),
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_FAILURES {
                        return Err(Stop::Lost(e.to_string()));
                    }
                    delay = POLL_IDLE;
                    continue;
                }
            };
            failures = 0;
            fed = fed.max(poll.fed);
            let capped = poll.stdout.len() >= POLL_MAX || poll.stderr.len() >= POLL_MAX;
            let flowing = !poll.stdout.is_empty() || !poll.stderr.is_empty();
            offsets.0 += poll.stdout.len() as u64;
            offsets.1 += poll.stderr.len() as u64;
            if !poll.stdout.is_empty() {
                self.emit(ExecOutput::Stdout(poll.stdout)).await?;
            }
            if !poll.stderr.is_empty() {
                self.emit(ExecOutput::Stderr(poll.stderr)).await?;
            }
            if let Some(code) = poll.exit
                && !capped
            {
                self.emit(ExecOutput::Exit(code)).await?;
                return Ok(());
            }
            delay = if capped {
                Duration::ZERO
            } else if flowing {
                POLL_FAST
            } else {
                (delay * 2).clamp(POLL_FAST, POLL_IDLE)
            };
        }
    }

    async fn emit(&self, out: ExecOutput) -> Result<(), Stop> {
        self.output.send(out).await.map_err(|_| Stop::CallerGone)
    }

    /// Forwards one input message to the guest; true when it reached the command (poll soon).
    async fn forward(
        &self,
        msg: ExecInput,
        sent: &mut u64,
        stdin_open: &mut bool,
    ) -> Result<bool, Stop> {
        match msg {
            ExecInput::Stdin(bytes) if *stdin_open => {
                for piece in bytes.chunks(STDIN_CHUNK) {
                    let seq = *sent + 1;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(piece);
                    // A chunk is a file named by its number: sending it again is harmless.
                    self.retry("input", &format!("{} {seq} {b64}", self.id))
                        .await?;
                    *sent = seq;
                }
                Ok(true)
            }
            ExecInput::StdinEnd if *stdin_open => {
                *stdin_open = false;
                self.retry("eof", &self.id).await?;
                Ok(true)
            }
            ExecInput::Signal(n) if (1..=64).contains(&n) => {
                self.retry("signal", &format!("{} {n}", self.id)).await?;
                Ok(true)
            }
            // Stdin after its end, a signal that does not exist, a window size without a
            // terminal: nothing to do.
            ExecInput::Stdin(_)
            | ExecInput::StdinEnd
            | ExecInput::Signal(_)
            | ExecInput::Resize(_) => Ok(false),
        }
    }

    /// A request that is safe to repeat, repeated on transient failures.
    async fn retry(&self, verb: &str, args: &str) -> Result<(), Stop> {
        let mut failures = 0;
        loop {
            match self.ask(verb, args).await {
                Ok(_) => return Ok(()),
                Err(SubstrateError::VmGone(_)) => {
                    return Err(Stop::Lost("the VM is gone".into()));
                }
                Err(SubstrateError::Asleep(_)) => return Err(Stop::Lost(ASLEEP.into())),
                Err(e @ SubstrateError::Guest { .. }) => return Err(Stop::Lost(e.to_string())),
                Err(e) => {
                    failures += 1;
                    if failures >= MAX_FAILURES {
                        return Err(Stop::Lost(e.to_string()));
                    }
                    tokio::time::sleep(POLL_IDLE).await;
                }
            }
        }
    }
}

/// How often a terminal session's status is asked for (which also renews its lease in the
/// guest); the exit itself normally comes in-band, as the [`ExitMarker`].
pub const SHELL_POLL: Duration = Duration::from_secs(1);
/// How long, once a poll saw the shell exit, the line may stay quiet before the exit is sent
/// without its marker (the marker was lost: say, the user's `stty` mangled it).
const EXIT_QUIET: Duration = Duration::from_secs(1);
/// How long bytes that may start the exit marker are held back before they count as output.
const HOLD_FLUSH: Duration = Duration::from_millis(200);
/// Most bytes written to the terminal's socket at once.
pub const TTY_WRITE: usize = 1024;

/// Spawns the task serving a terminal session the guest has started, on `terminal`: the
/// connection to the terminal's socket (the `go` line already written).
pub(super) fn start_tty(task: SessionTask, terminal: tokio::net::UnixStream) {
    tokio::spawn(task.serve_tty(terminal));
}

/// The terminal session's side.
impl SessionTask {
    async fn serve_tty(mut self, terminal: tokio::net::UnixStream) {
        let (read, write) = terminal.into_split();
        match self.follow_tty(read, write).await {
            Ok(()) => {}
            Err(Stop::CallerGone) => {
                tracing::debug!(vm = %self.vm, session = %self.id, "shell caller went away: killing");
            }
            Err(Stop::Lost(reason)) => {
                tracing::warn!(vm = %self.vm, session = %self.id, %reason, "shell session lost");
                // A terminal has one stream: the note goes where the user looks.
                let note = format!("\r\nmurmur: shell session lost: {reason}\r\n");
                let _ = self
                    .output
                    .send(ExecOutput::Stdout(note.into_bytes()))
                    .await;
                let _ = self.output.send(ExecOutput::Exit(LOST_EXIT)).await;
            }
        }
        // After an exit: clean up; otherwise: SIGKILL to the whole session, then clean up.
        let args = self.id.clone();
        let _ = tokio::time::timeout(DROP_TIMEOUT, self.ask("shdrop", &args)).await;
    }

    /// Relays the terminal until the exit was forwarded (`Ok`) or serving stops.
    async fn follow_tty(
        &mut self,
        mut read: tokio::net::unix::OwnedReadHalf,
        mut write: tokio::net::unix::OwnedWriteHalf,
    ) -> Result<(), Stop> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut marker = ExitMarker::new(&self.id);
        let mut buf = vec![0; 16 * 1024];
        let mut next_poll = Instant::now() + SHELL_POLL;
        let mut last_read = Instant::now();
        let mut exited: Option<i32> = None;
        let mut failures = 0u32;
        loop {
            let flush_at = last_read + HOLD_FLUSH;
            let holding = marker.holding();
            tokio::select! {
                n = read.read(&mut buf) => {
                    let n = match n {
                        Ok(0) => return Err(Stop::Lost("the terminal's connection closed".into())),
                        Ok(n) => n,
                        Err(e) => return Err(Stop::Lost(format!("the terminal's connection: {e}"))),
                    };
                    last_read = Instant::now();
                    let (out, code) = marker.feed(&buf[..n]);
                    if !out.is_empty() {
                        self.emit(ExecOutput::Stdout(out)).await?;
                    }
                    if let Some(code) = code {
                        self.emit(ExecOutput::Exit(code)).await?;
                        return Ok(());
                    }
                }
                msg = self.input.recv() => {
                    let Some(msg) = msg else {
                        return Err(Stop::CallerGone);
                    };
                    match msg {
                        ExecInput::Stdin(bytes) => {
                            for piece in bytes.chunks(TTY_WRITE) {
                                write.write_all(piece).await.map_err(|e| {
                                    Stop::Lost(format!("the terminal's connection: {e}"))
                                })?;
                            }
                        }
                        // End of input on a terminal is the EOF character (Ctrl-D).
                        ExecInput::StdinEnd => {
                            write.write_all(&[4]).await.map_err(|e| {
                                Stop::Lost(format!("the terminal's connection: {e}"))
                            })?;
                        }
                        ExecInput::Resize(size) => {
                            let args = format!("{} {} {}", self.id, size.rows.max(1), size.cols.max(1));
                            self.retry("winch", &args).await?;
                        }
                        ExecInput::Signal(n) if (1..=64).contains(&n) => {
                            self.retry("shsig", &format!("{} {n}", self.id)).await?;
                        }
                        ExecInput::Signal(_) => {}
                    }
                }
                () = tokio::time::sleep_until(flush_at), if holding => {
                    let out = marker.flush();
                    self.emit(ExecOutput::Stdout(out)).await?;
                }
                () = tokio::time::sleep_until(next_poll) => {
                    next_poll = Instant::now() + SHELL_POLL;
                    if let Some(code) = exited
                        && last_read.elapsed() >= EXIT_QUIET
                    {
                        tracing::warn!(vm = %self.vm, session = %self.id, "shell exited without its marker");
                        let out = marker.flush();
                        if !out.is_empty() {
                            self.emit(ExecOutput::Stdout(out)).await?;
                        }
                        self.emit(ExecOutput::Exit(code)).await?;
                        return Ok(());
                    }
                    let args = self.id.clone();
                    let poll = match self.ask("shpoll", &args).await {
                        Ok(answer) => parse_shell_poll(&answer).map_err(|reason| {
                            SubstrateError::Guest { vm: self.vm.clone(), reason }
                        }),
                        Err(e) => Err(e),
                    };
                    match poll {
                        Ok(Some(code)) => {
                            failures = 0;
                            exited = exited.or(code);
                        }
                        Ok(None) => return Err(Stop::Lost("the guest forgot the session".into())),
                        Err(SubstrateError::VmGone(_)) => {
                            return Err(Stop::Lost("the VM is gone".into()));
                        }
                        Err(SubstrateError::Asleep(_)) => return Err(Stop::Lost(ASLEEP.into())),
                        Err(e) => {
                            failures += 1;
                            if failures >= MAX_FAILURES {
                                return Err(Stop::Lost(e.to_string()));
                            }
                        }
                    }
                }
                () = self.output.closed() => return Err(Stop::CallerGone),
            }
        }
    }
}
