//! Sleep and wake of a qemu guest, driven over QMP ([`super::qmp`]): `sleep` pauses the
//! guest, saves its RAM and device state to `sleep.state` (a migration to a file) and ends
//! qemu; `wake` starts a new qemu with the same command line that loads that file, resumes
//! the guest, checks its agent answers and sets the guest's wall clock (it stood still). Why every step is safe to repeat after a crash is
//! in the parent module's docs ("Sleep and wake").
//!
//! Files in the VM's directory: [`ASLEEP_MARKER`] (from the first step of a sleep to the
//! last of a wake), [`STATE_FILE`] (the complete saved state: it appears by a rename once
//! written and synced) and [`STATE_TMP`] (the state being written).
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

/// Marks a VM asleep, going to sleep or waking up: written first by a sleep, removed last by
/// a wake.
pub const ASLEEP_MARKER: &str = "asleep";
/// A sleeping VM's RAM and device state (qemu's migration stream), complete when it exists.
pub const STATE_FILE: &str = "sleep.state";
/// The state while qemu writes it (renamed to [`STATE_FILE`] once complete and synced).
pub const STATE_TMP: &str = "sleep.state.tmp";

/// How long one QMP exchange may take. Generous: qemu's main loop does not answer while it
/// waits for the command the state was written to (`cat`, `sync`) to finish.
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

/// Where qemu writes the state: through `cat` into [`STATE_TMP`], synced, then renamed to
/// [`STATE_FILE`] (so that file is complete whenever it exists, even after a host crash);
/// when any of it fails, the partial file is removed.
pub fn save_uri(dir: &Path) -> Result<String, SubstrateError> {
    let tmp = quoted(&dir.join(STATE_TMP))?;
    let state = quoted(&dir.join(STATE_FILE))?;
    Ok(format!(
        "exec:cat > {tmp} && sync {tmp} && mv {tmp} {state} || rm -f {tmp}"
    ))
}

/// Where a waking qemu reads the state from.
pub fn restore_uri(dir: &Path) -> Result<String, SubstrateError> {
    Ok(format!("exec:cat {}", quoted(&dir.join(STATE_FILE))?))
}

/// A path quoted for `/bin/sh` (qemu runs an `exec:` migration through it).
fn quoted(path: &Path) -> Result<String, SubstrateError> {
    path.to_str()
        .map(shell_quote)
        .ok_or_else(|| SubstrateError::Invalid {
            what: "state dir (not UTF-8)",
            value: path.display().to_string(),
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
        let deadline = Instant::now() + SAVE_TIMEOUT;
        save(&mut qmp, dir, vm, deadline).await?;
        wait_for_state(&mut qmp, dir, vm, deadline).await?;
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
/// attempt's save is under way or done: `Ok` once qemu says the save completed
/// (`postmigrate`). A save this call started that fails is undone ([`abandon`]).
async fn save(
    qmp: &mut Qmp,
    dir: &Path,
    vm: &VmId,
    deadline: Instant,
) -> Result<(), SubstrateError> {
    let mut ours = false;
    let mut first = true;
    loop {
        let run = run_state(qmp, dir, vm).await?;
        if run == "postmigrate" {
            if first {
                tracing::info!(vm = %vm, "qemu: an earlier sleep saved the VM: finishing it");
            }
            return Ok(());
        }
        let migration = call(qmp, dir, vm, "query-migrate", None).await?;
        let status = migration
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none");
        // A wake's restore under way (wait for it: the state file is still the truth), the
        // save's last step, or a save under way (of an earlier attempt too).
        let busy = run == "inmigrate"
            || run == "finish-migrate"
            || migrating(status)
            || (ours && status == "completed");
        if first && busy {
            tracing::info!(vm = %vm, run, migration = status,
                "qemu: an earlier sleep's save or a wake's restore is under way: waiting for it");
        }
        first = false;
        if !busy {
            if ours {
                let why = migration
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or(status)
                    .to_string();
                return Err(abandon(qmp, dir, vm, &why).await);
            }
            // Nothing under way, or an earlier attempt's save that failed (its `failed`),
            // or a woken qemu (its restore's `completed`): save from here.
            start_save(qmp, dir, vm).await?;
            ours = true;
        } else if Instant::now() >= deadline {
            // Left as a crash would leave it: a retry goes on waiting, a wake resumes.
            return Err(SubstrateError::io(
                format!("save the state of VM {vm}"),
                std::io::Error::other(format!(
                    "not done within {SAVE_TIMEOUT:?} (qemu: {run}, migration: {status})"
                )),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Pauses the guest and starts writing its state. Any state file left is stale (this qemu
/// runs the guest) and goes first, so the file that appears next is this save's.
async fn start_save(qmp: &mut Qmp, dir: &Path, vm: &VmId) -> Result<(), SubstrateError> {
    // Paused first: the save is then one pass over memory that does not change.
    call(qmp, dir, vm, "stop", None).await?;
    for file in [STATE_FILE, STATE_TMP] {
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

/// Waits until the completed save's file is in place (qemu has written the stream; `cat`,
/// `sync` and `mv` finish after it). When neither the file nor the partial one is there any
/// more, writing it failed (the command removes its partial file): the save is undone.
async fn wait_for_state(
    qmp: &mut Qmp,
    dir: &Path,
    vm: &VmId,
    deadline: Instant,
) -> Result<(), SubstrateError> {
    let (state, tmp) = (dir.join(STATE_FILE), dir.join(STATE_TMP));
    loop {
        if state.is_file() {
            return Ok(());
        }
        // The rename may happen between the two looks: the state file is looked at again.
        if !tmp.exists() && !state.is_file() {
            return Err(abandon(qmp, dir, vm, "writing the state file failed").await);
        }
        if Instant::now() >= deadline {
            return Err(SubstrateError::io(
                format!("save the state of VM {vm}"),
                std::io::Error::other(format!("{STATE_FILE} not written in time")),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Undoes a save that failed: the guest runs on, the partial file and the marker go. Returns
/// the error to report.
async fn abandon(qmp: &mut Qmp, dir: &Path, vm: &VmId, why: &str) -> SubstrateError {
    tracing::warn!(vm = %vm, reason = why, "qemu: saving the VM failed: it runs on");
    let resumed = qmp.execute("cont", None).await;
    let _ = remove_file(&dir.join(STATE_TMP));
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
    for file in [STATE_FILE, STATE_TMP] {
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
/// as paused).
async fn resume(dir: &Path, vm: &VmId) -> Result<(), SubstrateError> {
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    let mut qmp = connect(dir, vm, deadline, "wake").await?;
    loop {
        let run = run_state(&mut qmp, dir, vm).await?;
        match run.as_str() {
            "running" => return Ok(()),
            // Loading the state.
            "inmigrate" => {}
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
async fn connect(
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
async fn call(
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

    #[test]
    fn the_state_is_written_whole_or_not_at_all_and_read_back() {
        let dir = Path::new("/s/vms/t/murmur-0000abcd");
        assert_eq!(
            save_uri(dir).expect("uri"),
            "exec:cat > '/s/vms/t/murmur-0000abcd/sleep.state.tmp' \
             && sync '/s/vms/t/murmur-0000abcd/sleep.state.tmp' \
             && mv '/s/vms/t/murmur-0000abcd/sleep.state.tmp' '/s/vms/t/murmur-0000abcd/sleep.state' \
             || rm -f '/s/vms/t/murmur-0000abcd/sleep.state.tmp'"
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
