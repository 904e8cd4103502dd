//! The guest channel's types: reading a run's output from any offset, and exec sessions
//! (a command started next to the agent, with its own stdin, stdout, stderr, signals and,
//! for a shell, a terminal).
//!
//! A substrate answers [`super::Provider::read_output`] and [`super::Provider::exec`] with
//! these; the worker's gateway (`src/gateway/`) carries them to the CLI. Nothing here goes
//! through Temporal: output and keystrokes never become workflow history.
//!
//! An [`ExecSession`] is two channels. The caller sends [`ExecInput`] (stdin bytes, end of
//! stdin, a window size, a signal) and receives [`ExecOutput`] (stdout, stderr, then exactly
//! one [`ExecOutput::Exit`] as the last message). Dropping the input sender ends the session:
//! the substrate kills the command's process group, so a broken connection never leaves a
//! command running.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::SubstrateError;
use super::vm_dir::valid_run_id;

/// Most bytes one [`super::Provider::read_output`] call returns.
pub const MAX_READ: usize = 256 * 1024;

/// Messages buffered per direction of an exec session before the producer waits.
pub const SESSION_BUFFER: usize = 64;

/// A piece of a run's combined output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputChunk {
    /// The bytes from the requested offset (at most the requested maximum; empty when
    /// nothing new was written yet).
    pub data: Vec<u8>,
    /// Offset just after `data`: where the next read starts.
    pub next: u64,
    /// Bytes the output holds now.
    pub size: u64,
    /// True when the run has exited (or its VM is gone and this is the kept copy), so the
    /// output will not grow any more.
    pub complete: bool,
}

impl OutputChunk {
    /// Nothing yet, read at `offset`, of a run that has not started (its output is empty).
    pub fn nothing_yet(offset: u64) -> Self {
        Self {
            data: Vec::new(),
            next: offset,
            size: 0,
            complete: false,
        }
    }
}

/// A terminal's size, in character cells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What to run next to the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// The command: one word runs through `/bin/sh -c`, several are executed as they are.
    pub argv: Vec<String>,
    /// Extra environment on top of the VM's own.
    pub env: Vec<(String, String)>,
    /// Run under a terminal of this size (a shell); `None`: plain pipes, stdout and stderr
    /// apart.
    pub tty: Option<WindowSize>,
}

/// What the caller sends into a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecInput {
    /// Bytes for the command's stdin (or the terminal).
    Stdin(Vec<u8>),
    /// The caller's stdin ended: close the command's.
    StdinEnd,
    /// The caller's terminal changed size.
    Resize(WindowSize),
    /// Deliver this signal (`SIGINT` = 2, ...) to the command's process group.
    Signal(i32),
}

/// What a session sends back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutput {
    /// Bytes the command wrote to stdout (or to the terminal).
    Stdout(Vec<u8>),
    /// Bytes the command wrote to stderr (never under a terminal).
    Stderr(Vec<u8>),
    /// The command exited with this code (128 + n when killed by signal n). Always last.
    Exit(i32),
}

/// A running exec session (see the module documentation).
#[derive(Debug)]
pub struct ExecSession {
    /// Into the command. Dropping it ends the session.
    pub input: mpsc::Sender<ExecInput>,
    /// Out of the command; ends after [`ExecOutput::Exit`].
    pub output: mpsc::Receiver<ExecOutput>,
}

impl ExecSession {
    /// A pair of channels: the session for the caller, and the substrate's ends.
    pub fn channel() -> (Self, mpsc::Receiver<ExecInput>, mpsc::Sender<ExecOutput>) {
        let (input, input_rx) = mpsc::channel(SESSION_BUFFER);
        let (output_tx, output) = mpsc::channel(SESSION_BUFFER);
        (Self { input, output }, input_rx, output_tx)
    }
}

/// Checks an exec request before anything starts.
pub fn check_exec(spec: &ExecSpec) -> Result<(), SubstrateError> {
    if spec.argv.is_empty() || spec.argv.iter().all(|w| w.trim().is_empty()) {
        return Err(SubstrateError::Invalid {
            what: "command",
            value: String::new(),
        });
    }
    if spec.argv.iter().any(|w| w.contains('\0')) {
        return Err(SubstrateError::Invalid {
            what: "command (it contains a NUL byte)",
            value: spec.argv.join(" "),
        });
    }
    Ok(())
}

/// How long the output of an ended agent is kept on its host by default.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The outputs of ended runs a host keeps after their VMs are deleted, so `murmur logs`
/// works for an agent that has ended: `<state>/logs/<tenant>/<run>.log`, pruned by age.
#[derive(Clone, Debug)]
pub struct KeptLogs {
    dir: PathBuf,
    retention: Duration,
}

impl KeptLogs {
    /// Kept logs under `state_dir/logs`, each kept for `retention` after its run's VM went.
    pub fn new(state_dir: &Path, retention: Duration) -> Self {
        Self {
            dir: state_dir.join("logs"),
            retention,
        }
    }

    fn path(&self, tenant: &str, run: &str) -> Result<PathBuf, SubstrateError> {
        if !valid_run_id(run) {
            return Err(SubstrateError::Invalid {
                what: "run id",
                value: run.to_string(),
            });
        }
        if !murmur_workflows::model::is_dns_label(tenant) {
            return Err(SubstrateError::Invalid {
                what: "tenant",
                value: tenant.to_string(),
            });
        }
        Ok(self.dir.join(tenant).join(format!("{run}.log")))
    }

    /// Moves (or copies, across filesystems) a run's output file into the kept logs, then
    /// prunes what is older than the retention. A missing `output` keeps nothing.
    pub fn keep(&self, tenant: &str, run: &str, output: &Path) -> Result<(), SubstrateError> {
        let target = self.path(tenant, run)?;
        if !output.exists() {
            return Ok(());
        }
        let parent = target.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent)
            .map_err(|e| SubstrateError::io("create the kept-logs directory", e))?;
        if std::fs::rename(output, &target).is_err() {
            std::fs::copy(output, &target).map_err(|e| SubstrateError::io("keep a log", e))?;
        }
        self.prune();
        Ok(())
    }

    /// Writes bytes as a run's kept output (a substrate that fetched them from a guest).
    pub fn keep_bytes(&self, tenant: &str, run: &str, data: &[u8]) -> Result<(), SubstrateError> {
        let target = self.path(tenant, run)?;
        let parent = target.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent)
            .map_err(|e| SubstrateError::io("create the kept-logs directory", e))?;
        std::fs::write(&target, data).map_err(|e| SubstrateError::io("keep a log", e))?;
        self.prune();
        Ok(())
    }

    /// Reads a kept output from `offset`; `Ok(None)` when none is kept for this run.
    pub fn read(
        &self,
        tenant: &str,
        run: &str,
        offset: u64,
        max: usize,
    ) -> Result<Option<OutputChunk>, SubstrateError> {
        let path = self.path(tenant, run)?;
        match read_at(&path, offset, max) {
            Ok(mut chunk) => {
                chunk.complete = true;
                Ok(Some(chunk))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SubstrateError::io("read a kept log", e)),
        }
    }

    /// Deletes every kept log of `tenant` (a nuke leaves nothing of the tenant behind).
    pub fn forget_tenant(&self, tenant: &str) {
        if murmur_workflows::model::is_dns_label(tenant) {
            let _ = std::fs::remove_dir_all(self.dir.join(tenant));
        }
    }

    /// Removes kept logs older than the retention.
    pub fn prune(&self) {
        let Some(cutoff) = SystemTime::now().checked_sub(self.retention) else {
            return;
        };
        let Ok(tenants) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for tenant in tenants.filter_map(Result::ok) {
            let Ok(logs) = std::fs::read_dir(tenant.path()) else {
                continue;
            };
            for log in logs.filter_map(Result::ok) {
                let old = log
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff);
                if old {
                    let _ = std::fs::remove_file(log.path());
                }
            }
        }
    }
}

/// Reads at most `max` bytes of `path` from `offset` (past the end: nothing).
pub fn read_at(path: &Path, offset: u64, max: usize) -> std::io::Result<OutputChunk> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let start = offset.min(size);
    f.seek(SeekFrom::Start(start))?;
    let want = (size - start).min(max.min(MAX_READ) as u64) as usize;
    let mut data = vec![0; want];
    f.read_exact(&mut data)?;
    Ok(OutputChunk {
        next: start + data.len() as u64,
        data,
        size,
        complete: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_resume_where_the_last_one_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"hello world").unwrap();
        let a = read_at(&path, 0, 5).unwrap();
        assert_eq!((a.data.as_slice(), a.next, a.size), (&b"hello"[..], 5, 11));
        let b = read_at(&path, a.next, 100).unwrap();
        assert_eq!(b.data, b" world");
        let c = read_at(&path, 99, 100).unwrap();
        assert!(c.data.is_empty());
        assert_eq!(c.next, 11);
    }

    #[test]
    fn a_kept_log_reads_as_complete_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let logs = KeptLogs::new(dir.path(), DEFAULT_LOG_RETENTION);
        let out = dir.path().join("output.log");
        std::fs::write(&out, b"line\n").unwrap();
        logs.keep("acme", "run-1", &out).unwrap();
        assert!(!out.exists(), "the output moves into the kept logs");
        let chunk = logs.read("acme", "run-1", 0, 100).unwrap().unwrap();
        assert_eq!(chunk.data, b"line\n");
        assert!(chunk.complete);
        assert!(logs.read("acme", "run-2", 0, 100).unwrap().is_none());
        assert!(logs.read("acme", "../x", 0, 100).is_err());
        assert!(logs.read("../acme", "run-1", 0, 100).is_err());
        logs.forget_tenant("acme");
        assert!(logs.read("acme", "run-1", 0, 100).unwrap().is_none());
    }

    #[test]
    fn kept_logs_older_than_the_retention_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let logs = KeptLogs::new(dir.path(), Duration::from_secs(3600));
        logs.keep_bytes("acme", "old", b"old\n").unwrap();
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("logs/acme/old.log"))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        // Keeping another log prunes what is past the retention, and only that.
        logs.keep_bytes("acme", "new", b"new\n").unwrap();
        assert!(logs.read("acme", "old", 0, 10).unwrap().is_none());
        assert_eq!(
            logs.read("acme", "new", 0, 10).unwrap().unwrap().data,
            b"new\n"
        );
    }

    #[test]
    fn empty_commands_are_refused() {
        assert!(check_exec(&ExecSpec::default()).is_err());
        let spec = ExecSpec {
            argv: vec!["echo".into(), "a\0b".into()],
            ..Default::default()
        };
        assert!(check_exec(&spec).is_err());
        let spec = ExecSpec {
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert!(check_exec(&spec).is_ok());
    }
}
