//! Sleep and wake of a qemu guest, driven over QMP ([`super::qmp`]): `sleep` pauses the
//! guest, saves its RAM and device state to `sleep.state` (a migration to a file) and ends
//! qemu; `wake` starts a new qemu with the same command line that loads that file, resumes
//! the guest, checks its agent answers and sets the guest's wall clock (it stood still). Why
//! every step is safe to repeat after a crash is in the parent module's docs ("Sleep and
//! wake").
//!
//! Files in the VM's directory: [`ASLEEP_MARKER`] (from the first step of a sleep to the
//! last of a wake); [`STATE_TMP`], what qemu's writer (the `exec:` command of
//! [`save_uri`]) writes, renamed by the writer to [`STATE_WRITTEN`] once it has written and
//! synced all it got; and [`STATE_FILE`], renamed from that by the worker once qemu said
//! the save completed, so it is the whole state whenever it exists. (The writer cannot tell
//! a save qemu gave up on from a complete one: both end its input.) A save is only ever
//! started, and leftovers only ever removed, while no writer runs ([`writing`]), so two
//! saves never write the same files.
//!
//! Both functions expect the caller to hold the VM's channel lock for all their work.

use std::path::Path;
use std::time::{Duration, Instant};

use murmur_workflows::model::VmId;
use serde_json::{Value, json};

use super::QemuProvider;
use super::guest::{handshake, set_clock, shell_quote};
use super::launch::{
    CONTROL_SOCKET, QMP_SOCKET, QemuVmMeta, VM_META_FILE, exit_report, qemu_pid, runs_vm,
    spawn_qemu, stop_qemu,
};
use super::qmp::{Qmp, QmpError};
use crate::substrate::SubstrateError;
use crate::substrate::vm_dir::{all_pids, live_cmdline};

/// Marks a VM asleep, going to sleep or waking up: written first by a sleep, removed last by
/// a wake.
pub const ASLEEP_MARKER: &str = "asleep";
/// A sleeping VM's RAM and device state (qemu's migration stream), complete when it exists.
pub const STATE_FILE: &str = "sleep.state";
/// The state while qemu's writer writes it.
pub const STATE_TMP: &str = "sleep.state.tmp";
/// The state once the writer has written and synced all qemu sent (whole only if qemu says
/// the save completed).
pub const STATE_WRITTEN: &str = "sleep.state.written";

/// How long one QMP exchange may take. Generous: qemu's main loop does not answer while it
/// waits for the writer to finish (`cat`, `sync`).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the save of a VM's state may take, from `stop` to the complete file.
pub const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a wake may take to have the guest running again (its state loaded).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a woken guest's agent may take to answer.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long setting a woken guest's clock may take.
const CLOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a running qemu may take to open its QMP socket (right after it started).
const QMP_SOCKET_WAIT: Duration = Duration::from_secs(5);
/// How long qemu may take to exit after `quit`, before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often qemu's progress is looked at.
const POLL: Duration = Duration::from_millis(20);
/// The save's bandwidth limit (bytes a second): qemu's default, 32 MiB/s, would make the
/// save of a 1 GiB guest take half a minute; this is no limit at all.
pub const SAVE_BANDWIDTH: u64 = 1 << 40;

/// True when the VM in `dir` is marked asleep (asleep, going to sleep or waking up).
pub fn is_marked(dir: &Path) -> bool {
    dir.join(ASLEEP_MARKER).exists()
}

/// True when the VM in `dir` sleeps with its state kept: it is alive although no qemu runs.
pub fn is_saved(dir: &Path) -> bool {
    is_marked(dir) && dir.join(STATE_FILE).is_file()
}

/// Where qemu writes the state: its writer `cat`s it into [`STATE_TMP`], syncs it and
/// renames it [`STATE_WRITTEN`] (only when all of that worked).
pub fn save_uri(dir: &Path) -> Result<String, SubstrateError> {
    let tmp = quoted(&dir.join(STATE_TMP))?;
    let written = quoted(&dir.join(STATE_WRITTEN))?;
    Ok(format!(
        "exec:cat > {tmp} && sync {tmp} && mv {tmp} {written}"
    ))
}

/// Where a waking qemu reads the state from.
pub fn restore_uri(dir: &Path) -> Result<String, SubstrateError> {
    Ok(format!("exec:cat {}", quoted(&dir.join(STATE_FILE))?))
}

/// A path quoted for `/bin/sh` (qemu runs an `exec:` migration through it).
pub(super) fn quoted(path: &Path) -> Result<String, SubstrateError> {
    path.to_str()
        .map(shell_quote)
        .ok_or_else(|| SubstrateError::Invalid {
            what: "state dir (not UTF-8)",
            value: path.display().to_string(),
        })
}

/// True while a writer of the VM in `dir` runs: a live process whose command line names its
/// [`STATE_TMP`] as [`save_uri`] does (the `sh` qemu started, which outlives its `cat`; even
/// one whose qemu is gone).
pub fn writing(dir: &Path) -> bool {
    let Ok(tmp) = quoted(&dir.join(STATE_TMP)) else {
        return false;
    };
    let needle = format!("cat > {tmp} ");
    all_pids().into_iter().any(|pid| {
        live_cmdline(pid).is_some_and(|cmd| {
            cmd.windows(needle.len())
                .any(|window| window == needle.as_bytes())
        })
    })
}

/// True while a migration of this status is under way (qemu's `MigrationStatus`).
fn migrating(status: &str) -> bool {
    matches!(
        status,
        "setup"
            | "active"
            | "cancelling"
            | "pre-switchover"
            | "device"
            | "wait-unplug"
            | "postcopy-active"
            | "postcopy-paused"
            | "postcopy-recover"
            | "colo"
    )
}

/// Puts the VM in `dir` to sleep (see the module docs): `Ok` once its state is in
/// [`STATE_FILE`] and its qemu is gone. Finishes what an earlier attempt left half done.
pub(super) async fn sleep(dir: &Path, vm: &VmId) -> Result<(), SubstrateError> {
    if !dir.is_dir() {
        return Err(SubstrateError::VmGone(vm.clone()));
    }
    let started = Instant::now();
    let Some(pid) = qemu_pid(dir) else {
        if dir.join(STATE_FILE).is_file() {
            // Asleep already (the marker is written again should it be missing).
            mark(dir)?;
            return Ok(());
        }
        if is_marked(dir) {
            tracing::warn!(vm = %vm, "qemu ended before the VM's state was saved: the VM is lost");
        }
        return Err(SubstrateError::VmGone(vm.clone()));
    };
    let saved = async {
        // Nothing is written before QMP answers: a VM that cannot be put to sleep stays
        // awake.
        let mut qmp = connect(dir, vm, Instant::now() + QMP_SOCKET_WAIT, "sleep").await?;
        mark(dir)?;
        save(&mut qmp, dir, vm, Instant::now() + SAVE_TIMEOUT).await?;
        quit(qmp, dir, vm, pid).await
    };
    match saved.await {
        Ok(()) => {}
        // qemu ended on its own once the state was in place (or a wake's qemu ended while
        // it loaded it): asleep all the same. (A state file left next to a running guest is
        // removed before anything else happens, by a wake or a save.)
        Err(_) if qemu_pid(dir).is_none() && dir.join(STATE_FILE).is_file() => {
            mark(dir)?;
        }
        Err(e) => return Err(e),
    }
    let size = std::fs::metadata(dir.join(STATE_FILE)).map_or(0, |m| m.len());
    tracing::info!(
        vm = %vm,
        state_bytes = size,
        took_ms = started.elapsed().as_millis() as u64,
        "qemu: VM asleep (its state saved, its qemu ended)"
    );
    Ok(())
}

/// Saves the VM's state (`stop`, then a migration to [`save_uri`]) unless an earlier
/// attempt's save is under way or done: `Ok` once [`STATE_FILE`] holds a save qemu said
/// completed. A save this call started that fails is undone ([`abandon`]); one that is not
/// done by `deadline` is left as a crash would leave it.
async fn save(
    qmp: &mut Qmp,
    dir: &Path,
    vm: &VmId,
    deadline: Instant,
) -> Result<(), SubstrateError> {
    let mut ours = false;
    let mut first = true;
    loop {
        // The migration first: a save that completes between the two looks is then seen
        // `completed` with qemu `finish-migrate` or `postmigrate`, never `paused` (which,
        // with `completed`, is a woken qemu: its restore's status).
        let migration = call(qmp, dir, vm, "query-migrate", None).await?;
        let status = migration
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        let run = run_state(qmp, dir, vm).await?;
        // A wake's restore (the state file is still the truth then), a save, its last step,
        // or its writer, under way (of an earlier attempt's too).
        let busy = run == "inmigrate"
            || run == "finish-migrate"
            || migrating(&status)
            || (ours && status == "none")
            || writing(dir);
        if first && (busy || run == "postmigrate") {
            tracing::info!(vm = %vm, run, migration = status,
                "qemu: an earlier sleep's save or a wake's restore is there: going on with it");
        }
        first = false;
        if busy {
            if Instant::now() >= deadline {
                return Err(SubstrateError::io(
                    format!("save the state of VM {vm}"),
                    std::io::Error::other(format!(
                        "not done within {SAVE_TIMEOUT:?} (qemu: {run}, migration: {status})"
                    )),
                ));
            }
            tokio::time::sleep(POLL).await;
            continue;
        }
        // qemu is idle and no writer runs: what is on disk is final.
        if status == "completed" && run == "postmigrate" {
            if keep_written(dir)? {
                return Ok(());
            }
            if ours {
                return Err(abandon(qmp, dir, vm, "writing the state file failed").await);
            }
        } else if ours {
            let why = migration
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or(&status)
                .to_string();
            return Err(abandon(qmp, dir, vm, &why).await);
        }
        // Nothing saved: no save yet, an earlier attempt's failed, or a woken qemu (its
        // restore's `completed`).
        start_save(qmp, dir, vm).await?;
        ours = true;
    }
}

/// Once a completed save's writer is done: the written state becomes [`STATE_FILE`] (an
/// earlier attempt may have renamed it already). False when the writer failed.
fn keep_written(dir: &Path) -> Result<bool, SubstrateError> {
    let (state, written) = (dir.join(STATE_FILE), dir.join(STATE_WRITTEN));
    if !state.is_file() {
        if !written.is_file() {
            remove_file(&dir.join(STATE_TMP))?;
            return Ok(false);
        }
        std::fs::rename(&written, &state)
            .map_err(|e| SubstrateError::io(format!("rename {}", written.display()), e))?;
        // The rename survives a host crash too (the data was synced by the writer).
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the VM's directory");
        }
    }
    remove_file(&dir.join(STATE_TMP))?;
    Ok(true)
}

/// Pauses the guest and starts writing its state. Any state left on disk is stale (this
/// qemu runs the guest, and no writer runs) and goes first, so what appears next is this
/// save's.
async fn start_save(qmp: &mut Qmp, dir: &Path, vm: &VmId) -> Result<(), SubstrateError> {
    // Paused first: the save is then one pass over memory that does not change.
    call(qmp, dir, vm, "stop", None).await?;
    for file in [STATE_FILE, STATE_WRITTEN, STATE_TMP] {
        remove_file(&dir.join(file))?;
    }
    call(
        qmp,
        dir,
        vm,
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": SAVE_BANDWIDTH })),
    )
    .await?;
    call(
        qmp,
        dir,
        vm,
        "migrate",
        Some(json!({ "uri": save_uri(dir)? })),
    )
    .await?;
    Ok(())
}

/// Undoes a save that failed (qemu idle, its writer done): the guest runs on, what was
/// written and the marker go. Returns the error to report.
async fn abandon(qmp: &mut Qmp, dir: &Path, vm: &VmId, why: &str) -> SubstrateError {
    tracing::warn!(vm = %vm, reason = why, "qemu: saving the VM failed: it runs on");
    let resumed = qmp.execute("cont", None).await;
    for file in [STATE_WRITTEN, STATE_TMP] {
        let _ = remove_file(&dir.join(file));
    }
    if let Err(e) = &resumed {
        // Still paused: left marked, so a retry (or a wake) finishes the job.
        tracing::warn!(vm = %vm, error = %e, "qemu: cannot resume the VM after a failed save");
    } else {
        let _ = remove_file(&dir.join(ASLEEP_MARKER));
    }
    SubstrateError::io(
        format!("save the state of VM {vm}"),
        std::io::Error::other(why.to_string()),
    )
}

/// Ends the saved VM's qemu (process `pid`): `quit`, then signals if it lingers.
async fn quit(mut qmp: Qmp, dir: &Path, vm: &VmId, pid: i32) -> Result<(), SubstrateError> {
    // The answer may be lost as qemu exits: whether it is gone is what counts.
    let _ = qmp.execute("quit", None).await;
    drop(qmp);
    let deadline = Instant::now() + QUIT_TIMEOUT;
    while runs_vm(pid, dir) && Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
    }
    if runs_vm(pid, dir) {
        tracing::warn!(vm = %vm, pid, "qemu did not quit after the VM was saved: killing it");
    }
    stop_qemu(dir, Duration::ZERO).await;
    match qemu_pid(dir) {
        None => Ok(()),
        Some(pid) => Err(SubstrateError::io(
            format!("stop qemu of VM {vm}"),
            std::io::Error::other(format!("pid {pid} still running")),
        )),
    }
}

/// Wakes the VM in `dir` (see the module docs): `Ok` once its guest runs and its agent
/// answers. Finishes what an earlier attempt left half done; an awake VM is left alone.
pub(super) async fn wake(
    provider: &QemuProvider,
    dir: &Path,
    vm: &VmId,
) -> Result<(), SubstrateError> {
    if !dir.is_dir() {
        return Err(SubstrateError::VmGone(vm.clone()));
    }
    let started = Instant::now();
    let restored = qemu_pid(dir).is_none();
    if restored {
        if !dir.join(STATE_FILE).is_file() {
            if is_marked(dir) {
                tracing::warn!(vm = %vm, "a sleeping VM's state is missing: the VM is lost");
            }
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        mark(dir)?;
        let meta = read_meta(dir)?;
        spawn_qemu(
            &provider.qemu,
            &provider.images_dir().join(&meta.image),
            dir,
            &meta,
            provider.niceness,
            Some(&restore_uri(dir)?),
        )?;
    } else if !is_marked(dir) {
        return Ok(());
    } else {
        tracing::info!(vm = %vm, "qemu: finishing an earlier wake (or an unfinished sleep)");
    }
    resume(dir, vm).await?;
    // The guest has run: the state file is stale now, and restoring it would take the guest
    // back in time. It goes at once; the marker goes last, once the agent answered (a crash
    // in between leaves a marked VM whose qemu runs, which the next wake finishes).
    for file in [STATE_FILE, STATE_WRITTEN, STATE_TMP] {
        remove_file(&dir.join(file))?;
    }
    let ready = handshake(&dir.join(CONTROL_SOCKET), AGENT_TIMEOUT)
        .await
        .map_err(|e| {
            SubstrateError::io(
                format!("reach the agent of woken VM {vm}"),
                std::io::Error::other(e.to_string()),
            )
        })?;
    if ready.vm != *vm {
        return Err(SubstrateError::Guest {
            vm: vm.clone(),
            reason: format!("woke up as {}", ready.vm),
        });
    }
    // Its wall clock stood still while it slept. A guest whose clock cannot be set is
    // usable all the same: said, not failed.
    if let Err(e) = set_clock(&dir.join(CONTROL_SOCKET), CLOCK_TIMEOUT).await {
        tracing::warn!(vm = %vm, error = %e, "qemu: cannot set the woken guest's clock");
    }
    remove_file(&dir.join(ASLEEP_MARKER))?;
    tracing::info!(
        vm = %vm,
        restored,
        took_ms = started.elapsed().as_millis() as u64,
        "qemu: VM awake"
    );
    Ok(())
}

/// Has the VM's running qemu run its guest: waits for a restore to load, cancels a save an
/// earlier sleep left under way, resumes a paused guest (qemu restores a guest saved paused
/// as paused); `Ok` once it runs and no writer of a save runs any more.
pub(super) async fn resume(dir: &Path, vm: &VmId) -> Result<(), SubstrateError> {
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut qmp = connect(dir, vm, deadline, "wake").await?;
    loop {
        let run = run_state(&mut qmp, dir, vm).await?;
        match run.as_str() {
            "running" if !writing(dir) => return Ok(()),
            // Loading the state, or a cancelled save's writer finishing.
            "inmigrate" | "running" => {}
            _ => {
                let migration = call(&mut qmp, dir, vm, "query-migrate", None).await?;
                let status = migration
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("none");
                if migrating(status) {
                    if status != "cancelling" {
                        call(&mut qmp, dir, vm, "migrate_cancel", None).await?;
                    }
                } else {
                    call(&mut qmp, dir, vm, "cont", None).await?;
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(SubstrateError::io(
                format!("wake VM {vm}"),
                std::io::Error::other(format!(
                    "the guest did not run within {RESTORE_TIMEOUT:?} (qemu: {run})"
                )),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Connects to the VM's QMP socket, retrying until `deadline` while its qemu runs (a qemu
/// just started opens it in a moment).
pub(super) async fn connect(
    dir: &Path,
    vm: &VmId,
    deadline: Instant,
    doing: &str,
) -> Result<Qmp, SubstrateError> {
    let socket = dir.join(QMP_SOCKET);
    loop {
        let error = match Qmp::connect(&socket, QMP_TIMEOUT).await {
            Ok(qmp) => return Ok(qmp),
            Err(e) => e,
        };
        if qemu_pid(dir).is_none() {
            return Err(qemu_ended(dir, vm));
        }
        if Instant::now() >= deadline {
            let missing =
                matches!(&error, QmpError::Io(e) if e.kind() == std::io::ErrorKind::NotFound);
            if missing {
                return Err(SubstrateError::Guest {
                    vm: vm.clone(),
                    reason: format!(
                        "this VM was booted without QMP (by an older murmur): {doing} needs a \
                         fresh VM"
                    ),
                });
            }
            return Err(qmp_failure(vm, error));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One QMP command; a failure because qemu is gone says so.
pub(super) async fn call(
    qmp: &mut Qmp,
    dir: &Path,
    vm: &VmId,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, SubstrateError> {
    match qmp.execute(command, arguments).await {
        Ok(value) => Ok(value),
        // qemu answered: it is there, and refused.
        Err(e @ (QmpError::Command { .. } | QmpError::Protocol(_))) => Err(qmp_failure(vm, e)),
        Err(_) if qemu_pid(dir).is_none() => Err(qemu_ended(dir, vm)),
        Err(e) => Err(qmp_failure(vm, e)),
    }
}

/// qemu's run state (`query-status`: `running`, `paused`, `inmigrate`, `postmigrate`, ...).
async fn run_state(qmp: &mut Qmp, dir: &Path, vm: &VmId) -> Result<String, SubstrateError> {
    let status = call(qmp, dir, vm, "query-status", None).await?;
    Ok(status
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string())
}

/// What it means that the VM's qemu is gone: a sleeping VM whose state is kept can be woken
/// again (the restore failed: say why); otherwise the VM is lost.
fn qemu_ended(dir: &Path, vm: &VmId) -> SubstrateError {
    if dir.join(STATE_FILE).is_file() {
        SubstrateError::Guest {
            vm: vm.clone(),
            reason: format!("qemu could not restore the VM: {}", exit_report(dir)),
        }
    } else {
        SubstrateError::VmGone(vm.clone())
    }
}

fn qmp_failure(vm: &VmId, e: QmpError) -> SubstrateError {
    SubstrateError::io(
        format!("drive qemu of VM {vm}"),
        std::io::Error::other(e.to_string()),
    )
}

/// Writes the marker (the time it was first written, for whoever looks).
fn mark(dir: &Path) -> Result<(), SubstrateError> {
    let path = dir.join(ASLEEP_MARKER);
    if path.exists() {
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    std::fs::write(&path, format!("{now}\n"))
        .map_err(|e| SubstrateError::io(format!("write {}", path.display()), e))
}

/// Removes a file that may not exist.
fn remove_file(path: &Path) -> Result<(), SubstrateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SubstrateError::io(format!("remove {}", path.display()), e)),
    }
}

/// The VM's `vm.json`: what its qemu was started with.
fn read_meta(dir: &Path) -> Result<QemuVmMeta, SubstrateError> {
    let path = dir.join(VM_META_FILE);
    let bytes = std::fs::read(&path)
        .map_err(|e| SubstrateError::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| SubstrateError::io(format!("parse {}", path.display()), e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A fake qemu on the QMP socket in `dir`, answering each command with `answer` (an
    /// error for `Err`), and a client connected to it. The commands it was sent are what the
    /// task returns once the client goes.
    async fn fake_qemu(
        dir: &Path,
        answer: impl FnMut(&str) -> Result<Value, String> + Send + 'static,
    ) -> (Qmp, tokio::task::JoinHandle<Vec<String>>) {
        let server = fake_qemu_server(dir, answer);
        let qmp = Qmp::connect(&dir.join(QMP_SOCKET), Duration::from_secs(5))
            .await
            .expect("connect");
        (qmp, server)
    }

    /// A fake qemu serving one connection on the QMP socket in `dir` (see [`fake_qemu`]).
    fn fake_qemu_server(
        dir: &Path,
        mut answer: impl FnMut(&str) -> Result<Value, String> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let socket = dir.join(QMP_SOCKET);
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut commands = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).expect("json");
                let command = request["execute"].as_str().expect("execute").to_string();
                let reply = if command == "qmp_capabilities" {
                    json!({ "return": {}, "id": request["id"] })
                } else {
                    commands.push(command.clone());
                    match answer(&command) {
                        Ok(value) => json!({ "return": value, "id": request["id"] }),
                        Err(desc) => json!({
                            "error": { "class": "GenericError", "desc": desc },
                            "id": request["id"]
                        }),
                    }
                };
                let line = format!("{reply}\n");
                if write.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
            commands
        })
    }

    /// A qemu that is `run` with its migration `status`: `stop` pauses it, `migrate` starts
    /// a save that is `active` for two looks and then ends as `outcome` (`completed`: the
    /// guest is `postmigrate`, and when `writes`, its writer wrote [`STATE_WRITTEN`] in
    /// `dir`), `cont` runs it, `migrate_cancel` cancels a save.
    fn qemu_like(
        dir: &Path,
        run: &str,
        status: &str,
        outcome: &'static str,
        writes: bool,
    ) -> impl FnMut(&str) -> Result<Value, String> + Send + 'static {
        let (mut run, mut status) = (run.to_string(), status.to_string());
        let written = dir.join(STATE_WRITTEN);
        let mut looks = 0;
        move |command| {
            match command {
                "query-status" => return Ok(json!({ "status": run })),
                "query-migrate" => {
                    if status == "active" {
                        looks += 1;
                        if looks > 2 {
                            status = outcome.into();
                            if outcome == "completed" {
                                run = "postmigrate".into();
                                if writes {
                                    std::fs::write(&written, b"saved").expect("write");
                                }
                            }
                        }
                    }
                    let mut answer = json!({ "status": status });
                    if status == "failed" {
                        answer["error-desc"] = json!("disk full");
                    }
                    return Ok(answer);
                }
                "stop" => run = "paused".into(),
                "cont" => run = "running".into(),
                "migrate" if status == "active" => return Err("already migrating".into()),
                "migrate" => {
                    status = "active".into();
                    looks = 0;
                }
                "migrate_cancel" => status = "cancelled".into(),
                _ => {}
            }
            Ok(json!({}))
        }
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn only_looks(commands: &[String]) -> bool {
        commands
            .iter()
            .all(|c| c == "query-status" || c == "query-migrate")
    }

    #[tokio::test]
    async fn a_save_pauses_the_guest_and_keeps_only_what_qemu_completed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = VmId("murmur-0000abcd".into());
        mark(dir.path()).expect("mark");
        std::fs::write(dir.path().join(STATE_FILE), b"stale").expect("write");
        // A woken qemu: its restore's `completed`, the state it was restored from left.
        let like = qemu_like(dir.path(), "running", "completed", "completed", true);
        let (mut qmp, server) = fake_qemu(dir.path(), like).await;
        save(&mut qmp, dir.path(), &vm, deadline())
            .await
            .expect("save");
        drop(qmp);
        let commands = server.await.expect("server");
        assert_eq!(
            commands[..5],
            [
                "query-migrate",
                "query-status",
                "stop",
                "migrate-set-parameters",
                "migrate"
            ]
        );
        assert!(only_looks(&commands[5..]), "{commands:?}");
        assert_eq!(
            std::fs::read(dir.path().join(STATE_FILE)).expect("state"),
            b"saved",
            "the stale state was kept"
        );
        assert!(!dir.path().join(STATE_WRITTEN).exists());
        assert!(is_marked(dir.path()));
    }

    #[tokio::test]
    async fn a_save_under_way_or_done_is_waited_for_not_started_again() {
        let vm = VmId("murmur-0000abcd".into());
        // Under way, then done.
        let dir = tempfile::tempdir().expect("tempdir");
        let like = qemu_like(dir.path(), "paused", "active", "completed", true);
        let (mut qmp, server) = fake_qemu(dir.path(), like).await;
        save(&mut qmp, dir.path(), &vm, deadline())
            .await
            .expect("save");
        drop(qmp);
        let commands = server.await.expect("server");
        assert!(only_looks(&commands), "{commands:?}");
        assert!(dir.path().join(STATE_FILE).is_file());
        // Done, its written state not yet kept; or kept already.
        for kept in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = if kept { STATE_FILE } else { STATE_WRITTEN };
            std::fs::write(dir.path().join(file), b"saved").expect("write");
            let like = qemu_like(dir.path(), "postmigrate", "completed", "completed", true);
            let (mut qmp, server) = fake_qemu(dir.path(), like).await;
            save(&mut qmp, dir.path(), &vm, deadline())
                .await
                .expect("save");
            drop(qmp);
            let commands = server.await.expect("server");
            assert!(only_looks(&commands), "{commands:?}");
            assert_eq!(
                std::fs::read(dir.path().join(STATE_FILE)).expect("state"),
                b"saved"
            );
        }
        // A restore under way is waited for; then the restored guest is saved.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut looks = 0;
        let mut like = qemu_like(dir.path(), "paused", "completed", "completed", true);
        let (mut qmp, server) = fake_qemu(dir.path(), move |command| {
            if command == "query-status" && looks < 3 {
                looks += 1;
                return Ok(json!({ "status": "inmigrate" }));
            }
            like(command)
        })
        .await;
        save(&mut qmp, dir.path(), &vm, deadline())
            .await
            .expect("save");
        drop(qmp);
        let commands = server.await.expect("server");
        let stop = commands.iter().position(|c| c == "stop").expect("a save");
        assert_eq!(
            commands[..stop]
                .iter()
                .filter(|c| *c == "query-status")
                .count(),
            4,
            "{commands:?}"
        );
        // An earlier attempt's save that failed, or whose writer failed, is started again.
        for (run, status) in [("paused", "failed"), ("postmigrate", "completed")] {
            let dir = tempfile::tempdir().expect("tempdir");
            let like = qemu_like(dir.path(), run, status, "completed", true);
            let (mut qmp, server) = fake_qemu(dir.path(), like).await;
            save(&mut qmp, dir.path(), &vm, deadline())
                .await
                .expect("save");
            drop(qmp);
            let commands = server.await.expect("server");
            assert!(commands.contains(&"migrate".into()), "{run}: {commands:?}");
        }
    }

    #[tokio::test]
    async fn a_save_that_fails_is_undone() {
        let vm = VmId("murmur-0000abcd".into());
        for (outcome, says) in [
            ("failed", "disk full"),
            ("completed", "writing the state file failed"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            mark(dir.path()).expect("mark");
            // The writer wrote all it got, but qemu gave up: that is no state.
            std::fs::write(dir.path().join(STATE_TMP), b"part").expect("write");
            let like = qemu_like(dir.path(), "running", "none", outcome, false);
            let (mut qmp, server) = fake_qemu(dir.path(), like).await;
            let error = save(&mut qmp, dir.path(), &vm, deadline())
                .await
                .expect_err("the save failed");
            assert!(error.to_string().contains(says), "{error}");
            assert!(!error.is_permanent(), "a retry may do better");
            drop(qmp);
            let commands = server.await.expect("server");
            assert_eq!(commands.last().map(String::as_str), Some("cont"));
            assert!(!is_marked(dir.path()), "the guest runs on, unmarked");
            for file in [STATE_FILE, STATE_WRITTEN, STATE_TMP] {
                assert!(!dir.path().join(file).exists(), "{outcome}: {file} left");
            }
        }

        // A save that is not done in time is left as it is, for a retry or a wake.
        let dir = tempfile::tempdir().expect("tempdir");
        mark(dir.path()).expect("mark");
        let like = qemu_like(dir.path(), "paused", "active", "active", true);
        let (mut qmp, server) = fake_qemu(dir.path(), like).await;
        let soon = Instant::now() + Duration::from_millis(200);
        assert!(save(&mut qmp, dir.path(), &vm, soon).await.is_err());
        drop(qmp);
        let commands = server.await.expect("server");
        assert!(only_looks(&commands), "{commands:?}");
        assert!(is_marked(dir.path()));
    }

    #[tokio::test]
    async fn a_resume_cancels_a_save_and_runs_a_paused_guest() {
        let vm = VmId("murmur-0000abcd".into());
        let dir = tempfile::tempdir().expect("tempdir");
        // `resume` connects by itself, so the fake serves it alone.
        let like = qemu_like(dir.path(), "paused", "active", "completed", true);
        let server = fake_qemu_server(dir.path(), like);
        resume(dir.path(), &vm).await.expect("resume");
        let commands = server.await.expect("server");
        let cancel = commands
            .iter()
            .position(|c| c == "migrate_cancel")
            .expect("the save cancelled");
        let cont = commands.iter().position(|c| c == "cont").expect("resumed");
        assert!(cancel < cont, "{commands:?}");
        assert_eq!(commands.last().map(String::as_str), Some("query-status"));
    }

    #[test]
    fn the_state_is_written_synced_and_read_back() {
        let dir = Path::new("/s/vms/t/murmur-0000abcd");
        assert_eq!(
            save_uri(dir).expect("uri"),
            "exec:cat > '/s/vms/t/murmur-0000abcd/sleep.state.tmp' \
             && sync '/s/vms/t/murmur-0000abcd/sleep.state.tmp' \
             && mv '/s/vms/t/murmur-0000abcd/sleep.state.tmp' \
             '/s/vms/t/murmur-0000abcd/sleep.state.written'"
        );
        assert_eq!(
            restore_uri(dir).expect("uri"),
            "exec:cat '/s/vms/t/murmur-0000abcd/sleep.state'"
        );
        // Quoted for the shell qemu runs it with, whatever the state dir is called.
        let odd = Path::new("/s/it's here");
        assert_eq!(
            restore_uri(odd).expect("uri"),
            "exec:cat '/s/it'\\''s here/sleep.state'"
        );
    }

    /// The writer qemu starts: it is seen running while it writes, and leaves what it got,
    /// synced, as the written state.
    #[tokio::test]
    async fn the_writer_is_seen_while_it_writes_and_leaves_the_written_state() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = save_uri(dir.path()).expect("uri");
        let command = uri.strip_prefix("exec:").expect("an exec: uri");
        let mut writer = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut input = writer.stdin.take().expect("stdin");
        input.write_all(b"the state").await.expect("write");
        assert!(writing(dir.path()), "the writer is not seen");
        assert!(!writing(Path::new("/elsewhere")));
        drop(input);
        assert!(writer.wait().await.expect("wait").success());
        assert!(!writing(dir.path()), "a writer that is done is seen");
        assert_eq!(
            std::fs::read(dir.path().join(STATE_WRITTEN)).expect("written"),
            b"the state"
        );
        assert!(!dir.path().join(STATE_TMP).exists());
        assert!(
            !dir.path().join(STATE_FILE).exists(),
            "only the worker keeps it"
        );
    }

    #[test]
    fn a_vm_is_asleep_by_its_marker_and_kept_by_its_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!is_marked(dir.path()) && !is_saved(dir.path()));
        mark(dir.path()).expect("mark");
        assert!(is_marked(dir.path()) && !is_saved(dir.path()));
        std::fs::write(dir.path().join(STATE_FILE), b"state").expect("write");
        assert!(is_saved(dir.path()));
        mark(dir.path()).expect("marking again is harmless");
        remove_file(&dir.path().join(ASLEEP_MARKER)).expect("remove");
        remove_file(&dir.path().join(ASLEEP_MARKER)).expect("removing again is harmless");
        assert!(!is_marked(dir.path()) && !is_saved(dir.path()));
    }

    #[test]
    fn migrations_under_way_are_told_from_ended_ones() {
        for status in ["setup", "active", "device", "cancelling"] {
            assert!(migrating(status), "{status}");
        }
        for status in ["none", "completed", "failed", "cancelled", ""] {
            assert!(!migrating(status), "{status}");
        }
    }
}
