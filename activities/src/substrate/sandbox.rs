//! The sandbox supervisor: the "init" of a `process`-substrate VM.
//!
//! Started by [`super::process::ProcessProvider`] in its own session with the VM's clean
//! environment. It runs the image's `boot.sh` (a failure is written to `boot.failed` and the
//! VM never becomes ready), then serves a line protocol on `control.sock`:
//!
//! - `PING` → `READY <vm-id> <image>` (the readiness handshake);
//! - `RUN <json CommandSpec>` → `OK` (starts the command once per run id, in its own process
//!   group, in `root/`, with the VM's environment plus `MURMUR_AGENT`; output goes to
//!   `runs/<run>/output.log`, the pid to `runs/<run>/pid`, and the exit code, when it comes,
//!   to `runs/<run>/exit`, so the worker can follow a run across its own restarts);
//! - `CANCEL <run>` → `OK` (SIGTERM to the run's process group, SIGKILL 5 s later).
//!
//! Errors answer `ERR <reason>`. SIGTERM stops every run, then the supervisor.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::CommandSpec;
use super::process::{
    BOOT_FAILED_FILE, BOOT_SCRIPT, CONTROL_SOCKET, EXIT_FILE, META_FILE, OUTPUT_FILE, PID_FILE,
    SandboxMeta, run_dir, run_pids,
};
use super::vm_dir::valid_run_id;

/// Runs the supervisor of the sandbox at `dir` until SIGTERM.
pub async fn run_supervisor(dir: PathBuf) -> anyhow::Result<()> {
    let meta: SandboxMeta = serde_json::from_slice(
        &std::fs::read(dir.join(META_FILE)).with_context(|| format!("read {META_FILE}"))?,
    )
    .with_context(|| format!("parse {META_FILE}"))?;
    let root = dir.join("root");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    if let Err(reason) = run_boot_script(&root, &meta).await {
        std::fs::write(dir.join(BOOT_FAILED_FILE), &reason)?;
        anyhow::bail!("boot failed: {reason}");
    }

    let socket = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener =
        UnixListener::bind(&socket).with_context(|| format!("bind {}", socket.display()))?;
    tracing::info!(vm = %meta.id, image = %meta.image, "sandbox ready");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let (meta, dir) = (meta.clone(), dir.clone());
                    tokio::spawn(async move { serve(stream, &meta, &dir).await });
                }
            }
            _ = term.recv() => {
                tracing::info!(vm = %meta.id, "sandbox stopping");
                stop_all_runs(&dir);
                return Ok(());
            }
        }
    }
}

async fn serve(stream: UnixStream, meta: &SandboxMeta, dir: &Path) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        let reply = match verb {
            "PING" => format!("READY {} {}\n", meta.id, meta.image),
            "RUN" => match start_run(meta, dir, arg) {
                Ok(()) => "OK\n".to_string(),
                Err(e) => format!("ERR {}\n", one_line(&format!("{e:#}"))),
            },
            "CANCEL" => match cancel_run(dir, arg.trim()) {
                Ok(()) => "OK\n".to_string(),
                Err(e) => format!("ERR {}\n", one_line(&format!("{e:#}"))),
            },
            other => format!("ERR unknown command {:?}\n", truncate(other, 64)),
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Starts a run unless it was started before (then this is a no-op: the caller attaches).
fn start_run(meta: &SandboxMeta, dir: &Path, json: &str) -> anyhow::Result<()> {
    let spec: CommandSpec = serde_json::from_str(json).context("malformed RUN request")?;
    anyhow::ensure!(valid_run_id(&spec.run), "invalid run id {:?}", spec.run);
    anyhow::ensure!(!spec.argv.is_empty(), "empty command");
    let runs = run_dir(dir, "");
    std::fs::create_dir_all(&runs).context("create runs/")?;
    let rd = run_dir(dir, &spec.run);
    match std::fs::create_dir(&rd) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).context("create run directory"),
    }
    let root = dir.join("root");
    let log = std::fs::File::create(rd.join(OUTPUT_FILE)).context("create output.log")?;
    let log2 = log.try_clone().context("open output.log")?;
    let mut cmd = if spec.argv.len() == 1 {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c").arg(&spec.argv[0]);
        c
    } else {
        let mut c = tokio::process::Command::new(&spec.argv[0]);
        c.args(&spec.argv[1..]);
        c
    };
    cmd.current_dir(&root)
        .env_clear()
        .envs(meta.environment(&root))
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            // The command could not start: that is its exit (127, like a shell).
            std::fs::write(rd.join(OUTPUT_FILE), format!("cannot start command: {e}\n"))?;
            write_exit(&rd, 127)?;
            return Ok(());
        }
    };
    if let Some(pid) = child.id() {
        std::fs::write(rd.join(PID_FILE), pid.to_string()).context("write pid")?;
    }
    tracing::info!(vm = %meta.id, run = %spec.run, argv = ?spec.argv, "run started");
    tokio::spawn(async move {
        let code = match child.wait().await {
            Ok(status) => {
                use std::os::unix::process::ExitStatusExt;
                status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(-1)
            }
            Err(_) => -1,
        };
        if let Err(e) = write_exit(&rd, code) {
            tracing::error!(error = %e, "cannot record exit code");
        }
    });
    Ok(())
}

/// Records an exit code atomically (write, then rename).
fn write_exit(rd: &Path, code: i32) -> std::io::Result<()> {
    let tmp = rd.join(".exit.tmp");
    std::fs::write(&tmp, code.to_string())?;
    std::fs::rename(&tmp, rd.join(EXIT_FILE))
}

/// SIGTERM to a run's process group, SIGKILL after a grace period.
fn cancel_run(dir: &Path, run: &str) -> anyhow::Result<()> {
    anyhow::ensure!(valid_run_id(run), "invalid run id {run:?}");
    let rd = run_dir(dir, run);
    if rd.join(EXIT_FILE).exists() {
        return Ok(());
    }
    let pid: i32 = std::fs::read_to_string(rd.join(PID_FILE))
        .context("no such run")?
        .trim()
        .parse()
        .context("unreadable pid")?;
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if !rd.join(EXIT_FILE).exists() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    });
    Ok(())
}

/// Kills every run still going (the VM is being deleted).
fn stop_all_runs(dir: &Path) {
    for pid in run_pids(dir) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn one_line(s: &str) -> String {
    truncate(&s.replace('\n', " "), 400).to_string()
}

/// Runs `boot.sh` when the image has one; returns the failure reason otherwise.
async fn run_boot_script(root: &Path, meta: &SandboxMeta) -> Result<(), String> {
    let script = root.join(BOOT_SCRIPT);
    if !script.exists() {
        return Ok(());
    }
    let out = tokio::process::Command::new("/bin/sh")
        .arg(&script)
        .current_dir(root)
        .env_clear()
        .envs(meta.environment(root))
        .output()
        .await
        .map_err(|e| format!("cannot run {BOOT_SCRIPT}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{BOOT_SCRIPT} exited with {}: {}",
        out.status,
        truncate(stderr.trim(), 400)
    ))
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
