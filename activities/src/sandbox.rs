//! The sandbox supervisor: the "init" of a `process`-substrate VM.
//!
//! Started by [`crate::process::ProcessProvider`] in its own session with the VM's clean
//! environment. It runs the image's `boot.sh` (a failure is written to `boot.failed` and the
//! VM never becomes ready), then serves a line protocol on `control.sock`:
//! `PING` → `READY <vm-id> <image>`. SIGTERM ends it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::process::{BOOT_FAILED_FILE, BOOT_SCRIPT, CONTROL_SOCKET, META_FILE, SandboxMeta};

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
                    let meta = meta.clone();
                    tokio::spawn(async move { serve(stream, &meta).await });
                }
            }
            _ = term.recv() => {
                tracing::info!(vm = %meta.id, "sandbox stopping");
                return Ok(());
            }
        }
    }
}

async fn serve(stream: UnixStream, meta: &SandboxMeta) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match line.trim() {
            "PING" => format!("READY {} {}\n", meta.id, meta.image),
            other => format!("ERR unknown command {:?}\n", truncate(other, 64)),
        };
        if write.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
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
