//! Starting and stopping a VM's qemu: finding the binary, choosing the accelerator (the KVM
//! probe), the command line, and telling the VM's qemu from any other process.
//!
//! qemu runs in its own session (`setsid`), so guests outlive a worker crash, and at low CPU
//! priority. A process counts as the VM's qemu only when `/proc/<pid>/cmdline` names the VM's
//! control socket, so a reused pid is never mistaken for it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use murmur_workflows::model::VmId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::guest::{handshake, request};
use crate::substrate::SubstrateError;
use crate::substrate::vm_dir::{all_pids, live_cmdline, recorded_pid};

/// File describing a VM.
pub const VM_META_FILE: &str = "vm.json";
/// The VM's qemu process id.
pub const PID_FILE: &str = "qemu.pid";
/// The control channel's unix socket.
pub const CONTROL_SOCKET: &str = "ctl.sock";
/// The terminal of `murmur shell` sessions: the guest's third serial port (`/dev/ttyS2`, at
/// 0x3E8), a unix socket the host connects to per session ([`super::exec`]).
pub const TTY_SOCKET: &str = "tty.sock";
/// qemu's machine protocol (QMP, [`super::qmp`]): what sleep and wake drive qemu with.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The guest console (first serial port), appended to (a restored qemu carries on the same
/// log).
pub const CONSOLE_LOG: &str = "console.log";
/// qemu's own stdout and stderr, appended to (a restored qemu's follow the first one's).
pub const QEMU_LOG: &str = "qemu.log";
/// Niceness of qemu processes unless `MURMUR_QEMU_NICE` says otherwise (the worker runs at 0).
const QEMU_NICE: i32 = 19;
/// How long a probe boot with KVM may take before KVM is declared unusable.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(6);

/// How guests are accelerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (a probe boot succeeded).
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `vm.json` records about a qemu VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVmMeta {
    /// The VM.
    pub id: VmId,
    /// Owning tenant.
    pub tenant: String,
    /// Workspace it was booted for.
    pub workspace: String,
    /// Image it boots.
    pub image: String,
    /// vCPUs (`-smp`).
    pub vcpus: u32,
    /// Memory in MiB (`-m`).
    pub memory_mb: u32,
    /// Accelerator it runs with.
    pub accel: Accel,
    /// The pool generation it was booted in.
    #[serde(default)]
    pub generation: u64,
}

/// Finds the qemu binary: `$MURMUR_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MURMUR_QEMU") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// The niceness qemu processes get: `MURMUR_QEMU_NICE` (0..=19), else 19.
pub fn niceness_from_env() -> i32 {
    std::env::var("MURMUR_QEMU_NICE")
        .ok()
        .and_then(|n| n.trim().parse::<i32>().ok())
        .map_or(QEMU_NICE, |n| n.clamp(0, 19))
}

/// Starts the VM's qemu in `dir` from the image directory `image` (in its own session, at
/// `niceness`), and records its pid. With `incoming` (a migration URI, see [`qemu_args`])
/// it restores the guest saved there instead of booting it.
pub fn spawn_qemu(
    qemu: &Path,
    image: &Path,
    dir: &Path,
    meta: &QemuVmMeta,
    niceness: i32,
    incoming: Option<&str>,
) -> Result<(), SubstrateError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(QEMU_LOG))
        .map_err(|e| SubstrateError::io("open qemu.log", e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| SubstrateError::io("open qemu.log", e))?;
    let mut cmd = tokio::process::Command::new(qemu);
    cmd.args(qemu_args(dir, image, meta, incoming))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // SAFETY: `setsid` and `nice` are async-signal-safe. `setsid` detaches qemu from the
    // worker's session so the guest outlives a worker crash or a Ctrl-C in the worker's
    // terminal. `nice` lowers qemu's CPU priority below the worker's: a guest booting in
    // the background (the backfill every claim triggers) runs a core flat out under TCG and
    // must not slow the control plane answering spawns (an idle guest uses ~no CPU).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::libc::nice(niceness);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| SubstrateError::io(format!("start {}", qemu.display()), e))?;
    if let Some(pid) = child.id() {
        std::fs::write(dir.join(PID_FILE), pid.to_string())
            .map_err(|e| SubstrateError::io("write qemu.pid", e))?;
    }
    // tokio reaps the child in the background once it exits.
    drop(child);
    Ok(())
}

/// The accelerator for the VMs under `qemu_dir` (`<state>/qemu`): `$MURMUR_QEMU_ACCEL`
/// (`kvm`, `tcg`), else the result of an earlier probe recorded in `qemu_dir/accel`, else a
/// short KVM probe boot of the base image in `images` (TCG when it fails), recorded.
pub async fn choose_accel(qemu: &Path, qemu_dir: &Path, images: &Path) -> Accel {
    let forced = std::env::var("MURMUR_QEMU_ACCEL").unwrap_or_default();
    match forced.as_str() {
        "kvm" => return Accel::Kvm,
        "tcg" => return Accel::Tcg,
        _ => {}
    }
    let record = qemu_dir.join("accel");
    match std::fs::read_to_string(&record).map(|s| s.trim().to_string()) {
        Ok(s) if s == "kvm" => return Accel::Kvm,
        Ok(s) if s == "tcg" => return Accel::Tcg,
        _ => {}
    }
    let accel = if Path::new("/dev/kvm").exists() && probe_kvm(qemu, qemu_dir, images).await {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let _ = std::fs::write(&record, accel.as_str());
    accel
}

/// Boots the base image with KVM and waits briefly for the handshake.
async fn probe_kvm(qemu: &Path, qemu_dir: &Path, images: &Path) -> bool {
    let vm = VmId("murmur-00000000".into());
    let dir = qemu_dir.join("probe");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let meta = QemuVmMeta {
        id: vm.clone(),
        tenant: String::new(),
        workspace: String::new(),
        image: murmur_workflows::model::DEFAULT_IMAGE.into(),
        vcpus: 1,
        memory_mb: 128,
        accel: Accel::Kvm,
        generation: 0,
    };
    let started = Instant::now();
    let ok = match spawn_qemu(
        qemu,
        &images.join(&meta.image),
        &dir,
        &meta,
        niceness_from_env(),
        None,
    ) {
        Ok(()) => handshake(&dir.join(CONTROL_SOCKET), KVM_PROBE_TIMEOUT)
            .await
            .is_ok(),
        Err(_) => false,
    };
    tracing::info!(
        kvm_boots = ok,
        probe_ms = started.elapsed().as_millis() as u64,
        "qemu: KVM probe boot"
    );
    stop_qemu(&dir, Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
    ok
}

/// The qemu command line of a VM (without the program). With `incoming` (a migration URI,
/// `exec:<command>`), qemu loads the guest's state from it instead of booting (`-incoming`):
/// everything else must be the same command line the state was saved from.
///
/// The second serial port's `unix:<ctl.sock>,` argument is how [`qemu_pid`] recognises the
/// VM's qemu: keep it as it is.
pub fn qemu_args(
    dir: &Path,
    image: &Path,
    meta: &QemuVmMeta,
    incoming: Option<&str>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |s: &str| args.push(s.into());
    push("-name");
    push(&format!("murmur-{}", meta.id));
    push("-accel");
    push(meta.accel.as_str());
    push("-m");
    push(&meta.memory_mb.to_string());
    push("-smp");
    push(&meta.vcpus.max(1).to_string());
    push("-display");
    push("none");
    push("-nic");
    push("none");
    push("-no-reboot");
    push("-kernel");
    args.push(image.join("vmlinuz").into());
    args.push("-initrd".into());
    args.push(image.join("initrd.gz").into());
    args.push("-append".into());
    args.push(format!("console=ttyS0 panic=-1 edd=off quiet murmur.vm={}", meta.id).into());
    // A chardev of its own rather than `-serial file:`, which truncates: a restored qemu
    // appends to the console of the first one.
    args.push("-chardev".into());
    args.push(
        format!(
            "file,id=console,path={},append=on",
            dir.join(CONSOLE_LOG).display()
        )
        .into(),
    );
    args.push("-serial".into());
    args.push("chardev:console".into());
    args.push("-serial".into());
    args.push(
        format!(
            "unix:{},server=on,wait=off",
            dir.join(CONTROL_SOCKET).display()
        )
        .into(),
    );
    args.push("-serial".into());
    args.push(format!("unix:{},server=on,wait=off", dir.join(TTY_SOCKET).display()).into());
    args.push("-qmp".into());
    args.push(format!("unix:{},server=on,wait=off", dir.join(QMP_SOCKET).display()).into());
    if let Some(uri) = incoming {
        args.push("-incoming".into());
        args.push(uri.into());
    }
    args
}

/// The pid of the VM's qemu when it runs: the recorded pid whose command line names this
/// VM's control socket (so a reused pid never counts), else any such process (one nobody
/// recorded, say after a crash between spawn and the pid file).
pub fn qemu_pid(dir: &Path) -> Option<i32> {
    if let Some(pid) = recorded_pid(dir, PID_FILE)
        && runs_vm(pid, dir)
    {
        return Some(pid);
    }
    all_pids().into_iter().find(|pid| runs_vm(*pid, dir))
}

/// True when `pid` is a live (not zombie) qemu serving the VM at `dir`.
pub fn runs_vm(pid: i32, dir: &Path) -> bool {
    let want = format!("unix:{},", dir.join(CONTROL_SOCKET).display());
    live_cmdline(pid).is_some_and(|cmd| {
        let mut args = cmd.split(|b| *b == 0);
        let is_qemu = args
            .next()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"));
        is_qemu && args.any(|a| a.starts_with(want.as_bytes()))
    })
}

/// Stops the VM's qemu: a `poweroff` request (the guest syncs and powers off) with `grace`,
/// then SIGTERM (qemu quits), then SIGKILL; waits until the process is gone.
pub async fn stop_qemu(dir: &Path, grace: Duration) {
    let Some(pid) = qemu_pid(dir) else {
        return;
    };
    let gone = |deadline: Instant| async move {
        while Instant::now() < deadline {
            if !runs_vm(pid, dir) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        !runs_vm(pid, dir)
    };
    if !grace.is_zero() {
        let socket = dir.join(CONTROL_SOCKET);
        let _ = request(&socket, "poweroff", "", grace).await;
        if gone(Instant::now() + grace).await {
            return;
        }
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if gone(Instant::now() + Duration::from_secs(2)).await {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = gone(Instant::now() + Duration::from_secs(2)).await;
}

/// What a qemu that exited before its guest was ready left: the tails of `qemu.log` and of
/// the guest console.
pub fn exit_report(dir: &Path) -> String {
    format!(
        "{} / console: {}",
        file_tail(&dir.join(QEMU_LOG), 400),
        file_tail(&dir.join(CONSOLE_LOG), 400)
    )
}

/// The last `max` bytes of a file, trimmed (for boot failures).
fn file_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qemu_command_line_uses_the_vm_shape() {
        let meta = QemuVmMeta {
            id: VmId("murmur-0000abcd".into()),
            tenant: "t".into(),
            workspace: "w".into(),
            image: "default".into(),
            vcpus: 2,
            memory_mb: 300,
            accel: Accel::Tcg,
            generation: 1,
        };
        let args: Vec<String> = qemu_args(Path::new("/s/vm"), Path::new("/s/img"), &meta, None)
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        assert_eq!(after("-m").as_deref(), Some("300"));
        assert_eq!(after("-smp").as_deref(), Some("2"));
        assert_eq!(after("-accel").as_deref(), Some("tcg"));
        assert!(after("-append").is_some_and(|a| a.contains("murmur.vm=murmur-0000abcd")));
        assert!(
            args.iter()
                .any(|a| a == "unix:/s/vm/ctl.sock,server=on,wait=off")
        );
        // The third serial port (ttyS2) is the shell's terminal, after the control channel.
        let serials: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-serial")
            .map(|(_, value)| value)
            .collect();
        assert_eq!(serials.len(), 3);
        assert_eq!(serials[2], "unix:/s/vm/tty.sock,server=on,wait=off");
        // The console is appended to (a restored qemu carries on the log), QMP is there to
        // sleep and wake the VM, and a boot loads no saved state.
        assert_eq!(serials[0], "chardev:console");
        assert_eq!(
            after("-chardev").as_deref(),
            Some("file,id=console,path=/s/vm/console.log,append=on")
        );
        assert_eq!(
            after("-qmp").as_deref(),
            Some("unix:/s/vm/qmp.sock,server=on,wait=off")
        );
        assert_eq!(after("-incoming"), None);
        // A restore is the same command line, plus where the state comes from.
        let uri = "exec:cat '/s/vm/sleep.state'";
        let restore: Vec<String> =
            qemu_args(Path::new("/s/vm"), Path::new("/s/img"), &meta, Some(uri))
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
        assert_eq!(restore[..args.len()], args[..]);
        assert_eq!(restore[args.len()..], ["-incoming", uri]);
    }

    #[test]
    fn a_pid_that_is_not_our_qemu_does_not_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(PID_FILE), std::process::id().to_string())
            .expect("write pid");
        assert!(!runs_vm(std::process::id() as i32, dir.path()));
        assert_eq!(qemu_pid(dir.path()), None);
    }
}
