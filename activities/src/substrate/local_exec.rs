//! Exec sessions as local process groups: how the `process` substrate runs `murmur exec` and
//! `murmur shell` next to an agent.
//!
//! The command starts in the sandbox's `root/` with the sandbox's clean environment, in a
//! process group of its own (a session of its own under a terminal), and its process group id
//! is written to `runs/exec-<id>/pid`, so deleting the VM kills it like any run. Without a
//! terminal, stdout and stderr are two pipes, read apart. With one, the command gets a fresh
//! pseudo-terminal as its controlling terminal (stdin, stdout and stderr all on it), sized as
//! asked and resized on [`ExecInput::Resize`]. The session ends when the command exits and
//! its output is drained; when the caller drops its input sender first, the whole process
//! group is killed.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::SubstrateError;
use super::session::{ExecInput, ExecOutput, ExecSession, ExecSpec, WindowSize, check_exec};

/// How long output is still read after the command exited (a background process that keeps
/// the pipe open must not hold the session forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Where a local exec session runs.
#[derive(Clone, Debug)]
pub struct LocalExec {
    /// Working directory (the sandbox's `root/`).
    pub cwd: PathBuf,
    /// The sandbox's environment (nothing else of the worker's).
    pub env: Vec<(String, OsString)>,
    /// Directory receiving `pid` (the process group id) while the session runs.
    pub record_dir: PathBuf,
}

/// Starts `spec` as described in the module documentation.
pub fn start(local: LocalExec, spec: &ExecSpec) -> Result<ExecSession, SubstrateError> {
    check_exec(spec)?;
    std::fs::create_dir_all(&local.record_dir)
        .map_err(|e| SubstrateError::io("create the exec session's directory", e))?;
    let mut cmd = if spec.argv.len() == 1 {
        let mut c = std::process::Command::new("/bin/sh");
        c.arg("-c").arg(&spec.argv[0]);
        c
    } else {
        let mut c = std::process::Command::new(&spec.argv[0]);
        c.args(&spec.argv[1..]);
        c
    };
    cmd.current_dir(&local.cwd)
        .env_clear()
        .envs(local.env.iter().map(|(k, v)| (k, v)))
        .envs(spec.env.iter().map(|(k, v)| (k, v)));
    // A worker started in the background (`nohup`, `cmd &` in a script) runs with SIGINT,
    // SIGQUIT or SIGHUP ignored, and ignored signals survive exec: the session's command gets
    // the default dispositions, so Ctrl-C (and a hang-up) reach it.
    // SAFETY: only sigaction(2), async-signal-safe, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(default_signals);
    }
    let (session, input, output) = ExecSession::channel();
    match spec.tty {
        None => start_piped(cmd, &local.record_dir, input, output)?,
        Some(size) => start_tty(cmd, size, &local.record_dir, input, output)?,
    }
    Ok(session)
}

/// Restores the default disposition of the signals a session must be able to receive.
fn default_signals() -> std::io::Result<()> {
    use nix::sys::signal::{SigHandler, signal};
    for sig in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGTERM,
    ] {
        // SAFETY: setting SIG_DFL installs no handler.
        unsafe { signal(sig, SigHandler::SigDfl) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

fn cannot_start(e: std::io::Error) -> SubstrateError {
    SubstrateError::io("start the command", e)
}

fn record_pid(dir: &Path, pid: u32) -> Result<(), SubstrateError> {
    std::fs::write(dir.join(super::process::PID_FILE), pid.to_string())
        .map_err(|e| SubstrateError::io("record the exec session's pid", e))
}

fn start_piped(
    cmd: std::process::Command,
    record_dir: &Path,
    mut input: mpsc::Receiver<ExecInput>,
    output: mpsc::Sender<ExecOutput>,
) -> Result<(), SubstrateError> {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(cannot_start)?;
    let pid = child.id().unwrap_or_default();
    record_pid(record_dir, pid)?;
    let record_dir = record_dir.to_path_buf();
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let readers = [
        stdout.map(|s| tokio::spawn(pump(s, output.clone(), ExecOutput::Stdout))),
        stderr.map(|s| tokio::spawn(pump(s, output.clone(), ExecOutput::Stderr))),
    ];
    tokio::spawn(async move {
        let group = Pid::from_raw(pid as i32);
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                msg = input.recv() => match msg {
                    Some(ExecInput::Stdin(bytes)) => {
                        if let Some(s) = stdin.as_mut()
                            && s.write_all(&bytes).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    Some(ExecInput::StdinEnd) => stdin = None,
                    Some(ExecInput::Resize(_)) => {}
                    Some(ExecInput::Signal(n)) => signal_group(group, n),
                    None => {
                        // The caller went away: nothing of the session may stay behind.
                        let _ = killpg(group, Signal::SIGKILL);
                        break child.wait().await;
                    }
                },
            }
        };
        drop(stdin);
        for reader in readers.into_iter().flatten() {
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, reader).await;
        }
        let _ = output.send(ExecOutput::Exit(exit_code(status))).await;
        let _ = std::fs::remove_dir_all(&record_dir);
    });
    Ok(())
}

/// Forwards what a stream yields, chunk by chunk, until it ends or the receiver is gone.
async fn pump(
    mut stream: impl AsyncRead + Unpin,
    output: mpsc::Sender<ExecOutput>,
    wrap: fn(Vec<u8>) -> ExecOutput,
) {
    let mut buf = vec![0; 32 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if output.send(wrap(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn signal_group(group: Pid, n: i32) {
    if let Ok(signal) = Signal::try_from(n) {
        let _ = killpg(group, signal);
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|n| 128 + n))
            .unwrap_or(-1),
        Err(_) => -1,
    }
}

fn winsize(size: WindowSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

mod ioctl {
    nix::ioctl_write_ptr_bad!(
        /// `TIOCSWINSZ`: sets a terminal's window size.
        set_window_size,
        nix::libc::TIOCSWINSZ,
        nix::pty::Winsize
    );
}
use ioctl::set_window_size;

fn resize(master: &OwnedFd, size: WindowSize) {
    // SAFETY: the descriptor is a live pty master and the pointer is to a valid Winsize for
    // the duration of the call.
    let _ = unsafe { set_window_size(master.as_raw_fd(), &winsize(size)) };
}

fn start_tty(
    mut cmd: std::process::Command,
    size: WindowSize,
    record_dir: &Path,
    mut input: mpsc::Receiver<ExecInput>,
    output: mpsc::Sender<ExecOutput>,
) -> Result<(), SubstrateError> {
    use std::os::unix::process::CommandExt;
    let pty = nix::pty::openpty(Some(&winsize(size)), None)
        .map_err(|e| SubstrateError::io("open a pseudo-terminal", e.into()))?;
    let (master, slave) = (pty.master, pty.slave);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(cannot_start);
    cmd.stdin(Stdio::from(dup(&slave)?))
        .stdout(Stdio::from(dup(&slave)?))
        .stderr(Stdio::from(dup(&slave)?));
    if !cmd.get_envs().any(|(k, _)| k == "TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    // SAFETY: only async-signal-safe calls between fork and exec: setsid(2) and ioctl(2).
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // Make the terminal on stdin the controlling terminal of the new session.
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY as _, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(cannot_start)?;
    drop(slave);
    let pid = child.id().unwrap_or_default();
    record_pid(record_dir, pid)?;
    let record_dir = record_dir.to_path_buf();
    let reader = master.try_clone().map_err(cannot_start)?;
    let mut writer = std::fs::File::from(master.try_clone().map_err(cannot_start)?);
    // The master is read on a thread of its own: a read blocks until the command writes, and
    // ends with an error (EIO) once every process holding the terminal is gone.
    let out = output.clone();
    let pump = std::thread::spawn(move || {
        use std::io::Read;
        let mut reader = std::fs::File::from(reader);
        let mut buf = vec![0; 32 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if out
                        .blocking_send(ExecOutput::Stdout(buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        let group = Pid::from_raw(pid as i32);
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                msg = input.recv() => match msg {
                    Some(ExecInput::Stdin(bytes)) => {
                        use std::io::Write;
                        // Keystrokes are small; a terminal write does not block for long.
                        let _ = writer.write_all(&bytes);
                    }
                    // End of input on a terminal is the EOF character (Ctrl-D).
                    Some(ExecInput::StdinEnd) => {
                        use std::io::Write;
                        let _ = writer.write_all(&[4]);
                    }
                    Some(ExecInput::Resize(size)) => resize(&master, size),
                    Some(ExecInput::Signal(n)) => signal_group(group, n),
                    None => {
                        let _ = killpg(group, Signal::SIGKILL);
                        break child.wait().await;
                    }
                },
            }
        };
        // Nothing writes to the terminal once its processes are gone; what they wrote is
        // still read before the exit is sent.
        drop(master);
        drop(writer);
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + DRAIN_AFTER_EXIT;
            while !pump.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let _ = waited.await;
        let _ = output.send(ExecOutput::Exit(exit_code(status))).await;
        let _ = std::fs::remove_dir_all(&record_dir);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(dir: &Path) -> LocalExec {
        LocalExec {
            cwd: dir.to_path_buf(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            record_dir: dir.join("runs").join("exec-test"),
        }
    }

    fn spec(cmd: &str, tty: Option<WindowSize>) -> ExecSpec {
        ExecSpec {
            argv: vec![cmd.into()],
            env: Vec::new(),
            tty,
        }
    }

    /// Everything a session sends: stdout, stderr, and the exit (which must come last).
    async fn collect(session: &mut ExecSession) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(msg) = session.output.recv().await {
            match msg {
                ExecOutput::Stdout(b) => out.extend(b),
                ExecOutput::Stderr(b) => err.extend(b),
                ExecOutput::Exit(code) => {
                    assert!(session.output.recv().await.is_none(), "exit comes last");
                    return (out, err, code);
                }
            }
        }
        panic!("the session ended without an exit");
    }

    #[tokio::test]
    async fn streams_stay_apart_and_the_exit_code_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = start(
            local(dir.path()),
            &spec("echo out; echo err >&2; exit 7", None),
        )
        .unwrap();
        let (out, err, code) = collect(&mut s).await;
        assert_eq!(
            (out.as_slice(), err.as_slice(), code),
            (&b"out\n"[..], &b"err\n"[..], 7)
        );
        assert!(
            !dir.path().join("runs/exec-test").exists(),
            "the record goes"
        );
    }

    #[tokio::test]
    async fn stdin_reaches_the_command_and_its_end_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = start(local(dir.path()), &spec("cat", None)).unwrap();
        s.input
            .send(ExecInput::Stdin(b"piped\n".to_vec()))
            .await
            .unwrap();
        s.input.send(ExecInput::StdinEnd).await.unwrap();
        let (out, _, code) = collect(&mut s).await;
        assert_eq!((out.as_slice(), code), (&b"piped\n"[..], 0));
    }

    #[tokio::test]
    async fn a_signal_reaches_the_process_group() {
        // As in a worker started in the background: SIGINT ignored, which children inherit.
        // The session's command must get it anyway (RELIABILITY.md #25).
        // SAFETY: SIG_IGN installs no handler.
        unsafe {
            nix::sys::signal::signal(Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let mut s = start(local(dir.path()), &spec("exec sleep 30", None)).unwrap();
        s.input.send(ExecInput::Signal(2)).await.unwrap();
        let (_, _, code) = collect(&mut s).await;
        assert_eq!(code, 130);
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        let l = local(dir.path());
        let pid_file = l.record_dir.join("pid");
        let mut s = start(l, &spec("sleep 30", None)).unwrap();
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        drop(s.input);
        while s.output.recv().await.is_some() {}
        assert!(
            live_members(pid).is_empty(),
            "left running: {:?}",
            live_members(pid)
        );
    }

    /// Processes of process group `pgid` that are not zombies (a zombie waits for its
    /// reaper, which in a container may be slow; it runs nothing).
    fn live_members(pgid: i32) -> Vec<i32> {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .filter_map(Result::ok)
            .filter_map(|p| std::fs::read_to_string(p.path().join("stat")).ok())
            .filter_map(|stat| {
                // `pid (comm) state ppid pgrp ...`; comm may hold spaces, so split after ')'.
                let (head, rest) = stat.rsplit_once(") ")?;
                let pid: i32 = head.split_whitespace().next()?.parse().ok()?;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let (state, pgrp) = (*fields.first()?, fields.get(2)?.parse::<i32>().ok()?);
                (pgrp == pgid && state != "Z").then_some(pid)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_terminal_session_has_a_tty_of_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let size = WindowSize {
            rows: 33,
            cols: 101,
        };
        let mut s = start(local(dir.path()), &spec("sh", Some(size))).unwrap();
        s.input
            .send(ExecInput::Stdin(
                b"test -t 0 && stty size; exit 3\n".to_vec(),
            ))
            .await
            .unwrap();
        let (out, err, code) = collect(&mut s).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("33 101"), "{out:?}");
        assert!(err.is_empty());
        assert_eq!(code, 3);
    }
}
