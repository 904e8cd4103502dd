//! The `qemu` substrate: each VM is a real Linux guest.
//!
//! Layout under the state directory:
//!
//! - `qemu/images/<image>/`: `vmlinuz`, `initrd.gz` and `image.json`
//!   ([`images::ImageMeta`]); the base image `default` is built from Debian packages by the
//!   embedded `build.sh` ([`QemuProvider::ensure_base_image`]); baked images add a layer to
//!   their base's initrd.
//! - `qemu/vms/<tenant>/<vm>/`: `vm.json` ([`launch::QemuVmMeta`]), `qemu.pid`, `ctl.sock`
//!   (the guest's second serial port, the guest agent's control channel), `tty.sock` (the
//!   third, the terminal of `murmur shell`), `qmp.sock` (qemu's machine protocol, [`qmp`]),
//!   `console.log` (the first serial port) and `qemu.log` (qemu's own stderr), both
//!   appended to; while the VM sleeps, `asleep` (the marker) and `sleep.state` (its saved
//!   RAM and device state; `sleep.state.tmp` while qemu writes it, `sleep.state.written`
//!   once written, before qemu's verdict).
//!
//! Everything is on disk, so a restarted worker finds its guests with [`Provider::list`].
//!
//! # The guest channel
//!
//! - [`Provider::read_output`] reads a run's output in the guest from any offset (the
//!   `read` request, at most [`guest::READ_MAX`] bytes a call, with the size and whether the
//!   run exited, so a follower polls); once the VM is deleted it reads the kept copy
//!   ([`KeptLogs`] under `<state>/logs/`).
//! - [`Provider::delete`] first fetches, while the guest still runs, the output of every
//!   agent run into the kept logs: at most the last [`KEEP_MAX`] bytes of each, within
//!   [`KEEP_BUDGET`] in all, smallest outputs first and each from its end backwards, never
//!   failing the delete for it. The channel is a serial port (about 150 KiB/s under TCG), so
//!   the budget keeps ~1.5 MB in all there. A kept output cut short is the output's end,
//!   and starts at offset 0 of what was kept.
//! - [`Provider::exec`] starts a command next to the agent, served by [`exec`]. Without a
//!   terminal its streams go over the control channel; with one (`murmur shell`) the
//!   terminal is the guest's third serial port (`/dev/ttyS2`, `tty.sock` here): a serial
//!   line is a terminal, cooked and echoing like a pty's slave, so the busybox guest needs
//!   no pty helper. One shell at a time per VM. Exec sessions live apart from runs in the
//!   guest and are never kept.
//! - [`QemuProvider::ensure_base_image`] rebuilds the base image when its guest files
//!   (`/init`, the agent) are not this build's ([`guest_sha256`]).
//!
//! # Sleep and wake
//!
//! A guest has no disk and no NIC: its RAM and device state are the whole VM. So
//! [`Provider::sleep`] pauses the vCPUs (QMP `stop`), has qemu write that state (a
//! migration of the paused guest, one pass, to a `cat` into `sleep.state.tmp`, synced and
//! renamed `sleep.state.written`), renames that `sleep.state` once qemu says the save
//! completed (the writer alone cannot tell a whole save from one qemu gave up on: so the
//! file is the whole state whenever it exists, even after a host crash) and ends qemu
//! (`quit`): the host's memory for the guest is freed, and what the VM costs while it
//! sleeps is the file (about what the guest has touched of its RAM, free pages it once used
//! included; zero pages take no room). [`Provider::wake`] starts a new qemu with the VM's
//! same command line plus `-incoming` from that file, resumes the guest (qemu restores a
//! guest saved paused as paused, so wake says `cont`), removes the file as soon as the guest
//! runs (it is stale from then on: restoring it again would take the guest back in time),
//! waits until the agent answers on the control channel, sets the guest's wall clock to the
//! host's ([`guest::set_clock`]: it stood still while the guest slept, as every guest clock
//! did), and removes the marker last. The guest's processes go on where they were (a
//! `sleep 60` begun before still has what was left of its minute to go); the consoles are
//! appended to.
//!
//! While the marker `asleep` exists (from the first step of a sleep to the last of a wake)
//! [`Provider::is_asleep`] is true and the guest is not asked anything: a run's status is
//! `Running` (frozen, not exited), a cancel succeeds without effect (a delete stops the run
//! for good), [`Provider::read_output`] serves only kept outputs, starting a command, exec
//! and the output's tail are refused with [`SubstrateError::Asleep`], and exec sessions that
//! were open end. A sleeping VM whose state is kept lists as alive (the reaper must not
//! take it for dead), `create` leaves it alone, and `delete` removes it, state included,
//! without fetching outputs from a guest that does not run.
//!
//! Both hold the VM's channel lock throughout and are safe to repeat after a crash (the
//! worker killed at any point): every step is read back from the directory and from qemu
//! (its run state and migration status over QMP) rather than remembered.
//!
//! - Sleep with no qemu running: asleep when `sleep.state` exists; otherwise the VM is gone
//!   (or was lost: qemu ended before its state was saved).
//! - Sleep with qemu running: QMP must answer before the marker is written (an old VM booted
//!   without QMP stays awake). A save under way is waited for, and so is its writer (a
//!   wake's restore too: the file is still the truth then); a completed save (`completed`
//!   and `postmigrate`, looked at in that order, so a save completing in between is never
//!   taken for a woken qemu) is finished: the written file becomes `sleep.state`, `quit`,
//!   SIGTERM/SIGKILL if qemu lingers. Anything else (no save, a failed one, a woken qemu)
//!   starts a save, once no writer runs, removing every state file first: none can be this
//!   save's, and no two writers ever share the files. A save this call started that fails
//!   (qemu's verdict, or a writer that left nothing) is undone (`cont`, the marker
//!   removed); a timeout leaves everything as a crash would.
//! - Wake with no qemu running: restore from `sleep.state` if it exists, else the VM is
//!   gone. With qemu running and the marker there: wait for its restore, cancel a save a
//!   sleep left under way (and wait for its writer), `cont` a paused guest, then the same
//!   steps as after a restore. With qemu running and no marker: awake already.
//! - A qemu that cannot load the state ends: wake reports why (`qemu.log`) and keeps the
//!   file and the marker, so the VM stays asleep rather than lost.
//!
//! # Snapshot boot
//!
//! The first VM of an image (and VM shape) boots afresh and, once ready, saves the image's
//! snapshot (`snapshot.wanted` in its directory until then: the guest is paused for the
//! save, about a second under TCG, and runs on). Later VMs of that image and shape are
//! restored from it (`-incoming` from the snapshot, `identity.pending` in their directory)
//! and, once their guest runs, take their own identity with the agent's `identity` request
//! (VM id, hostname, `/etc/murmur/vm-id`, the host's clock, a random seed for the guest's
//! random pool) whose answer is their ready handshake. So a refill after a flush restores,
//! it does not boot. Where the snapshot lives, when it is used, replaced and collected:
//! [`snapshots`]. An image whose guest agent refuses the identity request (an older agent)
//! is marked to boot afresh. A worker that crashed while it saved a snapshot left the guest
//! paused: the boot's retry resumes it first. `MURMUR_QEMU_SNAPSHOT_BOOT=0` turns snapshot
//! boot off.
//!
//! # Layout
//!
//! - this file: [`QemuProvider`] and its [`Provider`] implementation;
//! - [`guest`]: the control-channel protocol spoken with the guest agent;
//! - [`exec`]: the tasks serving an exec session and a terminal session;
//! - [`launch`]: finding qemu, the accelerator and its KVM probe, the command line, telling
//!   the VM's qemu from other processes, stopping it;
//! - [`images`]: image metadata, the embedded guest files, the base image build and the
//!   bake's snapshot of a guest;
//! - [`qmp`]: a client of qemu's machine protocol (QMP) on the VM's `qmp.sock`;
//! - [`sleep`]: sleep and wake (the save to `sleep.state`, the restore from it);
//! - [`snapshots`]: snapshot boot (an image's snapshot: where, when usable, how written,
//!   collected; taking one, and a restored guest's identity).

pub mod exec;
pub mod guest;
pub mod images;
pub mod launch;
pub mod qmp;
pub mod sleep;
pub mod snapshots;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::VmId;

use self::guest::{
    ChannelError, READ_MAX, REQUEST_TIMEOUT, command_script, decode_data, handshake, new_exec_id,
    parse_read, parse_runs, parse_status, request, truncate,
};
use self::images::ImageMeta;
use self::launch::{
    Accel, CONTROL_SOCKET, QMP_SOCKET, QemuVmMeta, TTY_SOCKET, VM_META_FILE, exit_report,
    find_qemu, qemu_pid, spawn_qemu, stop_qemu,
};
use self::snapshots::{IDENTITY_PENDING, SNAPSHOT_IDLE, SNAPSHOT_WANTED, Snapshots};
use crate::substrate::session::{
    DEFAULT_LOG_RETENTION, ExecSession, ExecSpec, KeptLogs, MAX_READ, OutputChunk, WindowSize,
    check_exec,
};
use crate::substrate::vm_dir::{
    check_image_id, check_run_id, check_socket_path, claim_owner, list_vm_dirs, remove_vm_dir,
    seal_for_delete, tenant_dir, valid_run_id, vm_dir, vm_dirs_of_every_tenant,
};
use crate::substrate::{CommandSpec, CommandStatus, Provider, Ready, Seal, SubstrateError, VmInfo};

/// Most bytes of one run's output a delete keeps (the last ones).
pub const KEEP_MAX: u64 = 8 * 1024 * 1024;
/// How long a delete may spend fetching the outputs it keeps, in all.
pub const KEEP_BUDGET: Duration = Duration::from_secs(10);

/// The `qemu` substrate.
#[derive(Clone)]
pub struct QemuProvider {
    state_dir: PathBuf,
    qemu: PathBuf,
    accel: Accel,
    niceness: i32,
    kept: KeptLogs,
    /// Snapshot boot (`None`: every VM boots afresh; `MURMUR_QEMU_SNAPSHOT_BOOT=0`).
    snapshots: Option<Snapshots>,
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for QemuProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProvider")
            .field("state_dir", &self.state_dir)
            .field("qemu", &self.qemu)
            .field("accel", &self.accel)
            .field("niceness", &self.niceness)
            .finish_non_exhaustive()
    }
}

impl QemuProvider {
    /// A provider keeping its VMs and images under `<state_dir>/qemu`. Finds
    /// `qemu-system-x86_64` (or `$MURMUR_QEMU`), builds the base image when it is missing, and
    /// picks the accelerator ([`launch::choose_accel`]).
    pub async fn new(state_dir: impl Into<PathBuf>) -> Result<Self, SubstrateError> {
        let state_dir = state_dir.into();
        let qemu = find_qemu().ok_or_else(|| SubstrateError::Invalid {
            what: "substrate",
            value: "qemu: qemu-system-x86_64 not found (apt-get install -y qemu-system-x86, \
                    or set MURMUR_QEMU)"
                .into(),
        })?;
        let mut provider = Self {
            kept: KeptLogs::new(&state_dir, DEFAULT_LOG_RETENTION),
            state_dir,
            qemu,
            accel: Accel::Tcg,
            niceness: launch::niceness_from_env(),
            snapshots: None,
            locks: Arc::default(),
        };
        provider.ensure_base_image().await?;
        provider.accel =
            launch::choose_accel(&provider.qemu, &provider.qemu_dir(), &provider.images_dir())
                .await;
        let wanted = std::env::var("MURMUR_QEMU_SNAPSHOT_BOOT").map_or(true, |v| v.trim() != "0");
        if wanted {
            match qemu_version(&provider.qemu).await {
                Some(version) => {
                    provider.snapshots = Some(Snapshots::new(provider.images_dir(), version));
                }
                None => tracing::warn!("qemu --version did not answer: snapshot boot is off"),
            }
        }
        Ok(provider)
    }

    /// A provider that only inspects and deletes VMs (no image build, no probe), for tests
    /// and tools.
    pub fn inspector(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Self {
            kept: KeptLogs::new(&state_dir, DEFAULT_LOG_RETENTION),
            state_dir,
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            niceness: launch::niceness_from_env(),
            snapshots: None,
            locks: Arc::default(),
        }
    }

    /// Turns snapshot boot off: every VM boots afresh (for comparisons; the worker reads
    /// `MURMUR_QEMU_SNAPSHOT_BOOT=0`).
    pub fn without_snapshot_boot(mut self) -> Self {
        self.snapshots = None;
        self
    }

    /// True when VMs are restored from their image's snapshot once there is one.
    pub fn snapshot_boot(&self) -> bool {
        self.snapshots.is_some()
    }

    /// Runs this provider's guests at `niceness` (0..=19) instead of `MURMUR_QEMU_NICE`'s.
    pub fn with_niceness(mut self, niceness: i32) -> Self {
        self.niceness = niceness.clamp(0, 19);
        self
    }

    /// Keeps the outputs of deleted VMs' runs for `retention` (default: a day).
    pub fn with_log_retention(mut self, retention: Duration) -> Self {
        self.kept = KeptLogs::new(&self.state_dir, retention);
        self
    }

    /// The outputs this host keeps of runs whose VMs were deleted.
    pub fn kept_logs(&self) -> &KeptLogs {
        &self.kept
    }

    /// The accelerator guests run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// `<state>/qemu`: everything this substrate keeps.
    fn qemu_dir(&self) -> PathBuf {
        self.state_dir.join("qemu")
    }

    /// Where qemu images live (`<state>/qemu/images`).
    pub fn images_dir(&self) -> PathBuf {
        self.qemu_dir().join("images")
    }

    /// The metadata of an image, if it exists.
    pub fn image_meta(&self, image: &str) -> Option<ImageMeta> {
        images::image_meta(&self.images_dir(), image)
    }

    /// Builds the base image `default` with the embedded `build.sh` unless it exists with
    /// this build's guest files (its `image.json`'s `guest_sha256`, [`guest_sha256`]): a
    /// base image of other guest files (an older agent) is rebuilt. Images baked from it keep
    /// the guest files they were baked with.
    pub async fn ensure_base_image(&self) -> Result<(), SubstrateError> {
        let default = self
            .images_dir()
            .join(murmur_workflows::model::DEFAULT_IMAGE);
        let built = std::fs::read(default.join(images::IMAGE_META_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("guest_sha256")?.as_str().map(str::to_string));
        if default.exists() && built.as_deref() != Some(guest_sha256().as_str()) {
            tracing::info!(
                image = %default.display(),
                "the qemu base image has other guest files than this build: rebuilding it"
            );
            remove_vm_dir(&default).await?;
        }
        images::ensure_base_image(&self.images_dir(), &self.qemu_dir().join(".build")).await
    }

    fn vms_root(&self) -> PathBuf {
        self.qemu_dir().join("vms")
    }

    /// The directory of a VM.
    pub fn vm_dir(&self, tenant: &str, vm: &VmId) -> Result<PathBuf, SubstrateError> {
        vm_dir(&self.vms_root(), tenant, vm)
    }

    fn lock(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(dir.to_path_buf()).or_default().clone()
    }

    fn forget_lock(&self, dir: &Path) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(dir);
    }

    /// Sends one request to the guest agent of a VM (serialised per VM in this worker; the
    /// request itself may take [`REQUEST_TIMEOUT`] once it has the channel).
    /// [`SubstrateError::Asleep`] when the VM is asleep (looked at once the channel is ours,
    /// so a request that waited for a sleep to finish does not go to a guest that is gone).
    async fn ask(
        &self,
        dir: &Path,
        vm: &VmId,
        verb: &str,
        args: &str,
    ) -> Result<String, SubstrateError> {
        if !dir.exists() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        let lock = self.lock(dir);
        let _guard = lock.lock().await;
        if sleep::is_marked(dir) {
            return Err(SubstrateError::Asleep(vm.clone()));
        }
        let answer = request(&dir.join(CONTROL_SOCKET), verb, args, REQUEST_TIMEOUT).await;
        Self::answer(dir, vm, answer)
    }

    /// [`Self::ask`] within `timeout` in all, the wait for the channel included (for work
    /// with a budget of its own, like keeping outputs on delete).
    async fn ask_within(
        &self,
        dir: &Path,
        vm: &VmId,
        verb: &str,
        args: &str,
        timeout: Duration,
    ) -> Result<String, SubstrateError> {
        if !dir.exists() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        let started = Instant::now();
        let lock = self.lock(dir);
        let Ok(_guard) = tokio::time::timeout(timeout, lock.lock()).await else {
            return Self::answer(dir, vm, Err(ChannelError::Timeout(timeout)));
        };
        if sleep::is_marked(dir) {
            return Err(SubstrateError::Asleep(vm.clone()));
        }
        let left = timeout.saturating_sub(started.elapsed());
        let answer = request(&dir.join(CONTROL_SOCKET), verb, args, left).await;
        Self::answer(dir, vm, answer)
    }

    /// What a request's outcome means for the VM.
    fn answer(
        dir: &Path,
        vm: &VmId,
        answer: Result<String, ChannelError>,
    ) -> Result<String, SubstrateError> {
        match answer {
            Ok(answer) => Ok(answer),
            Err(ChannelError::Refused(reason)) => Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason,
            }),
            Err(e) if qemu_pid(dir).is_none() => {
                tracing::debug!(vm = %vm, error = %e, "qemu is gone");
                Err(SubstrateError::VmGone(vm.clone()))
            }
            Err(e) => Err(SubstrateError::io(
                format!("talk to VM {vm}"),
                std::io::Error::other(e.to_string()),
            )),
        }
    }

    /// The snapshots VMs of `image` are restored from and saved to, unless snapshot boot is
    /// off or the image's guest agent cannot take an identity.
    fn snapshot_source(&self, image: &str) -> Option<&Snapshots> {
        let snaps = self.snapshots.as_ref()?;
        let unsupported = self
            .images_dir()
            .join(image)
            .join(snapshots::SNAPSHOTS_DIR)
            .join(snapshots::UNSUPPORTED);
        (!unsupported.exists()).then_some(snaps)
    }

    /// The ready handshake of a VM restored from a snapshot: once its guest runs, it takes
    /// its own identity. A guest agent that refuses the identity request (an image of an
    /// older agent) marks the image as one to boot afresh from now on, and fails the boot.
    async fn restored_ready(&self, dir: &Path, vm: &VmId) -> Result<Ready, SubstrateError> {
        let lock = self.lock(dir);
        let _guard = lock.lock().await;
        match snapshots::take_identity(dir, vm).await {
            Ok(ready) => {
                let _ = std::fs::remove_file(dir.join(IDENTITY_PENDING));
                tracing::info!(vm = %vm, "qemu: VM restored from its image's snapshot");
                Ok(ready)
            }
            Err(e @ SubstrateError::Guest { .. }) => {
                if let Some(image) = read_vm_meta(dir).map(|m| m.image) {
                    let marker = self
                        .images_dir()
                        .join(&image)
                        .join(snapshots::SNAPSHOTS_DIR)
                        .join(snapshots::UNSUPPORTED);
                    let _ = std::fs::write(&marker, format!("{e}\n"));
                    tracing::warn!(vm = %vm, image, error = %e,
                        "the image's guest cannot take an identity: its VMs boot afresh");
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Saves its image's snapshot from a VM that booted afresh and is ready, when it was
    /// asked to (and no other VM did it meanwhile). Never fails the VM: it runs on.
    async fn snapshot_if_wanted(&self, dir: &Path, vm: &VmId) {
        if !dir.join(SNAPSHOT_WANTED).exists() {
            return;
        }
        let lock = self.lock(dir);
        let _guard = lock.lock().await;
        if let (Some(snaps), Some(meta)) = (self.snapshots.as_ref(), read_vm_meta(dir))
            && snaps.usable(&meta).is_none()
        {
            let started = Instant::now();
            match snapshots::take(snaps, dir, &meta).await {
                Ok(bytes) => tracing::info!(vm = %vm, image = %meta.image, bytes,
                    took_ms = started.elapsed().as_millis() as u64,
                    "qemu: saved the image's snapshot; later VMs of it are restored from it"),
                Err(e) => tracing::warn!(vm = %vm, image = %meta.image, error = %e,
                    "qemu: could not save the image's snapshot (VMs of it boot afresh)"),
            }
        }
        let _ = std::fs::remove_file(dir.join(SNAPSHOT_WANTED));
    }

    /// Reads a file of a running guest over the control channel.
    pub async fn read_guest_file(
        &self,
        tenant: &str,
        vm: &VmId,
        path: &str,
    ) -> Result<Vec<u8>, SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        let answer = self.ask(&dir, vm, "get", path).await?;
        decode_data(&answer).map_err(|reason| SubstrateError::Guest {
            vm: vm.clone(),
            reason,
        })
    }

    /// Opens a terminal session (see [`exec::start_tty`]): connects to the terminal's socket
    /// first, has the guest start the shell on its third serial port, then writes the `go`
    /// line on that connection (only then does the shell start: nothing it writes is lost).
    async fn open_shell(
        &self,
        dir: &Path,
        vm: &VmId,
        id: String,
        size: WindowSize,
        script_b64: &str,
    ) -> Result<ExecSession, SubstrateError> {
        use tokio::io::AsyncWriteExt;
        let socket = dir.join(TTY_SOCKET);
        let mut terminal = match tokio::net::UnixStream::connect(&socket).await {
            Ok(stream) => stream,
            Err(_) if sleep::is_marked(dir) => return Err(SubstrateError::Asleep(vm.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SubstrateError::Guest {
                    vm: vm.clone(),
                    reason: "this VM was booted without a terminal port (by an older murmur): \
                             a shell needs a fresh VM"
                        .into(),
                });
            }
            Err(e) => {
                return Err(SubstrateError::io(
                    format!("connect to {}", socket.display()),
                    e,
                ));
            }
        };
        let (rows, cols) = (size.rows.max(1), size.cols.max(1));
        let answer = self
            .ask(
                dir,
                vm,
                "shell",
                &format!("{id} {rows} {cols} {script_b64}"),
            )
            .await
            .map_err(|e| match e {
                SubstrateError::Guest { vm, reason } if reason == "unknown request" => {
                    SubstrateError::Guest {
                        vm,
                        reason: "this VM's guest agent predates murmur shell on qemu: a shell \
                                 needs a fresh VM"
                            .into(),
                    }
                }
                e => e,
            })?;
        if answer != "ok" {
            return Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason: format!("unexpected answer {:?}", truncate(&answer, 80)),
            });
        }
        let go = format!("go-{id}\n");
        if let Err(e) = terminal.write_all(go.as_bytes()).await {
            let _ = self.ask(dir, vm, "shdrop", &id).await;
            return Err(SubstrateError::io("write to the terminal", e));
        }
        let (session, input, output) = ExecSession::channel();
        exec::start_tty(
            exec::SessionTask {
                provider: self.clone(),
                dir: dir.to_path_buf(),
                vm: vm.clone(),
                id,
                input,
                output,
            },
            terminal,
        );
        Ok(session)
    }

    /// Fetches the output of every agent run of a live guest into the kept logs (at most the
    /// last [`KEEP_MAX`] bytes of each, within [`KEEP_BUDGET`] in all, smallest first, each
    /// from its end backwards). Never fails: what cannot be kept is logged. A sleeping VM's
    /// outputs are not kept (its guest does not run to give them).
    async fn keep_outputs(&self, tenant: &str, vm: &VmId, dir: &Path) {
        if !dir.exists() || qemu_pid(dir).is_none() {
            return;
        }
        if sleep::is_marked(dir) {
            tracing::debug!(vm = %vm, "the VM is asleep: its outputs are not kept");
            return;
        }
        let deadline = Instant::now() + KEEP_BUDGET;
        let left = || deadline.saturating_duration_since(Instant::now());
        let runs = match self.ask_within(dir, vm, "runs", "", left()).await {
            Ok(answer) => parse_runs(&answer),
            // Went to sleep meanwhile.
            Err(SubstrateError::Asleep(_)) => return,
            Err(e) => Err(e.to_string()),
        };
        let mut runs = match runs {
            Ok(runs) => runs,
            Err(error) => {
                tracing::warn!(vm = %vm, %error, "cannot list the runs to keep their outputs");
                return;
            }
        };
        // Small outputs first: one huge output must not cost the others theirs.
        runs.sort_by_key(|(_, size)| *size);
        for (run, size) in runs {
            // From the end backwards, so what the budget allows is the output's last bytes.
            let floor = size.saturating_sub(KEEP_MAX);
            let mut end = size;
            let mut pieces = Vec::new();
            while end > floor {
                if left().is_zero() {
                    break;
                }
                let start = end.saturating_sub(READ_MAX as u64).max(floor);
                let args = format!("{run} {start} {}", end - start);
                let read = match self.ask_within(dir, vm, "read", &args, left()).await {
                    Ok(answer) => parse_read(&answer),
                    Err(e) => Err(e.to_string()),
                };
                match read {
                    Ok(Some(read)) if read.data.len() as u64 == end - start => {
                        pieces.push(read.data);
                        end = start;
                    }
                    Ok(_) => {
                        tracing::warn!(vm = %vm, run, "a run's output shrank while it was kept");
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(vm = %vm, run, %error, "cannot fetch a run's output");
                        break;
                    }
                }
            }
            let data: Vec<u8> = pieces.into_iter().rev().flatten().collect();
            if end > floor {
                tracing::warn!(vm = %vm, run, kept = data.len(), size, "kept the end of a run's output only");
            }
            if let Err(e) = self.kept.keep_bytes(tenant, &run, &data) {
                tracing::warn!(vm = %vm, run, error = %e, "cannot keep the output of a run");
            }
            if left().is_zero() {
                break;
            }
        }
    }
}

/// True when the VM in `dir` is alive: its qemu runs, or it sleeps with its state kept.
fn alive(dir: &Path) -> bool {
    qemu_pid(dir).is_some() || sleep::is_saved(dir)
}

/// Writes an empty marker file into a VM's directory.
fn write_marker(dir: &Path, name: &str) -> Result<(), SubstrateError> {
    std::fs::write(dir.join(name), b"").map_err(|e| SubstrateError::io(format!("write {name}"), e))
}

/// A VM's `vm.json`, when it can be read.
fn read_vm_meta(dir: &Path) -> Option<QemuVmMeta> {
    std::fs::read(dir.join(VM_META_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The first line of `qemu --version`: which qemu writes and restores snapshots.
async fn qemu_version(qemu: &Path) -> Option<String> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

/// The sha256 (hex) of this build's guest files, `/init` and the agent together, as
/// `build.sh` records it in `image.json`.
pub fn guest_sha256() -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(images::GUEST_INIT.as_bytes());
    ctx.update(images::GUEST_AGENT.as_bytes());
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accelerator(&self) -> Option<String> {
        Some(self.accel.as_str().to_string())
    }

    fn has_image(&self, image: &str) -> bool {
        self.image_meta(image).is_some()
    }

    async fn create(&self, spec: &BootSpec) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(&spec.tenant, &spec.vm)?;
        check_socket_path(&dir.join(CONTROL_SOCKET))?;
        check_socket_path(&dir.join(TTY_SOCKET))?;
        check_socket_path(&dir.join(QMP_SOCKET))?;
        if self.image_meta(&spec.image).is_none() {
            return Err(SubstrateError::ImageNotFound(spec.image.clone()));
        }
        let lock = self.lock(&dir);
        let _guard = lock.lock().await;
        if dir.exists() {
            if alive(&dir) {
                return Ok(());
            }
            // A dead leftover of an earlier attempt: start over.
            remove_vm_dir(&dir).await?;
        }
        let meta = QemuVmMeta {
            id: spec.vm.clone(),
            tenant: spec.tenant.clone(),
            workspace: spec.workspace.clone(),
            image: spec.image.clone(),
            vcpus: spec.environment.vcpus,
            memory_mb: spec.environment.memory_mb,
            accel: self.accel,
            generation: spec.generation,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| SubstrateError::io(format!("create {}", dir.display()), e))?;
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| SubstrateError::io("encode vm.json", e.into()))?;
        std::fs::write(dir.join(VM_META_FILE), json)
            .map_err(|e| SubstrateError::io("write vm.json", e))?;
        // From the image's snapshot when there is one (the identity is given in
        // `wait_ready`); else afresh, and the first such VM saves the snapshot once ready.
        let mut incoming = None;
        if let Some(snaps) = self.snapshot_source(&meta.image) {
            snaps.collect_garbage(SNAPSHOT_IDLE);
            match snaps.usable(&meta) {
                Some(snapshot) => {
                    write_marker(&dir, IDENTITY_PENDING)?;
                    incoming = Some(snapshots::restore_uri(&snapshot)?);
                }
                None => write_marker(&dir, SNAPSHOT_WANTED)?,
            }
        }
        spawn_qemu(
            &self.qemu,
            &self.images_dir().join(&meta.image),
            &dir,
            &meta,
            self.niceness,
            incoming.as_deref(),
        )
    }

    async fn wait_ready(
        &self,
        tenant: &str,
        vm: &VmId,
        timeout: Duration,
    ) -> Result<Ready, SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        let socket = dir.join(CONTROL_SOCKET);
        let deadline = Instant::now() + timeout;
        if dir.join(SNAPSHOT_WANTED).exists() && qemu_pid(&dir).is_some() {
            // A worker that crashed while it saved the snapshot left the guest paused.
            let lock = self.lock(&dir);
            let _guard = lock.lock().await;
            let resumed = tokio::time::timeout(Duration::from_secs(5), sleep::resume(&dir, vm));
            if let Ok(Err(e)) = resumed.await {
                tracing::debug!(vm = %vm, error = %e, "could not look whether the guest runs");
            }
        }
        loop {
            if !dir.exists() {
                return Err(SubstrateError::BootFailed {
                    vm: vm.clone(),
                    reason: "VM was deleted while booting".into(),
                });
            }
            if qemu_pid(&dir).is_none() {
                return Err(SubstrateError::BootFailed {
                    vm: vm.clone(),
                    reason: format!(
                        "qemu exited before the guest was ready: {}",
                        exit_report(&dir)
                    ),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SubstrateError::BootTimeout {
                    vm: vm.clone(),
                    timeout,
                });
            }
            if dir.join(IDENTITY_PENDING).exists() {
                let restored = tokio::time::timeout(left, self.restored_ready(&dir, vm)).await;
                let Ok(restored) = restored else {
                    continue;
                };
                match restored {
                    Ok(ready) => return Ok(ready),
                    Err(e @ SubstrateError::Guest { .. }) => {
                        return Err(SubstrateError::BootFailed {
                            vm: vm.clone(),
                            reason: e.to_string(),
                        });
                    }
                    // Not running yet, or not answering yet: asked again.
                    Err(e) => {
                        tracing::debug!(vm = %vm, error = %e, "restored VM not ready yet");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let attempt = {
                let lock = self.lock(&dir);
                let _guard = lock.lock().await;
                handshake(&socket, left.min(Duration::from_secs(1))).await
            };
            if let Ok(ready) = attempt {
                if &ready.vm == vm {
                    self.snapshot_if_wanted(&dir, vm).await;
                    return Ok(ready);
                }
                return Err(SubstrateError::BootFailed {
                    vm: vm.clone(),
                    reason: format!("handshake answered for {}", ready.vm),
                });
            }
        }
    }

    fn claim_owner(&self, tenant: &str, vm: &VmId, owner: &str) -> Result<(), SubstrateError> {
        claim_owner(&self.vm_dir(tenant, vm)?, vm, owner)
    }

    fn seal_for_delete(
        &self,
        tenant: &str,
        vm: &VmId,
        expected: Option<&str>,
    ) -> Result<Seal, SubstrateError> {
        seal_for_delete(&self.vm_dir(tenant, vm)?, vm, expected)
    }

    async fn delete(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        self.keep_outputs(tenant, vm, &dir).await;
        {
            let lock = self.lock(&dir);
            let _guard = lock.lock().await;
            stop_qemu(&dir, Duration::from_secs(2)).await;
            if let Some(pid) = qemu_pid(&dir) {
                return Err(SubstrateError::io(
                    format!("stop qemu of VM {vm}"),
                    std::io::Error::other(format!("pid {pid} still running")),
                ));
            }
            remove_vm_dir(&dir).await?;
        }
        self.forget_lock(&dir);
        Ok(())
    }

    fn host_vms(&self) -> Vec<(String, VmId)> {
        vm_dirs_of_every_tenant(&self.vms_root())
    }

    async fn list(&self, tenant: &str) -> Result<Vec<VmInfo>, SubstrateError> {
        let tenant_dir = tenant_dir(&self.vms_root(), tenant)?;
        list_vm_dirs(tenant, &tenant_dir, VM_META_FILE, alive)
    }

    async fn start_command(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &CommandSpec,
    ) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        check_run_id(&spec.run)?;
        let script = command_script(spec, "/root").map_err(|reason| SubstrateError::Guest {
            vm: vm.clone(),
            reason,
        })?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(script);
        let answer = self
            .ask(&dir, vm, "run", &format!("{} {b64}", spec.run))
            .await?;
        if answer == "ok" {
            Ok(())
        } else {
            Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason: format!("unexpected answer {:?}", truncate(&answer, 80)),
            })
        }
    }

    async fn command_status(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<CommandStatus, SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        if !valid_run_id(run) {
            return Ok(CommandStatus::Unknown);
        }
        let answer = match self.ask(&dir, vm, "status", run).await {
            Ok(answer) => answer,
            // Frozen, not exited.
            Err(SubstrateError::Asleep(_)) => return Ok(CommandStatus::Running),
            Err(e) => return Err(e),
        };
        parse_status(&answer).ok_or_else(|| SubstrateError::Guest {
            vm: vm.clone(),
            reason: format!("unexpected answer {:?}", truncate(&answer, 80)),
        })
    }

    async fn command_output_tail(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
        max_bytes: usize,
    ) -> Result<String, SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        if !valid_run_id(run) {
            return Ok(String::new());
        }
        let answer = self
            .ask(&dir, vm, "tail", &format!("{run} {max_bytes}"))
            .await?;
        let bytes = decode_data(&answer).map_err(|reason| SubstrateError::Guest {
            vm: vm.clone(),
            reason,
        })?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if bytes.len() >= max_bytes
            && let Some(nl) = text.find('\n')
        {
            text.drain(..=nl);
        }
        Ok(text)
    }

    async fn read_output(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
        offset: u64,
        max: usize,
    ) -> Result<OutputChunk, SubstrateError> {
        check_run_id(run)?;
        let dir = self.vm_dir(tenant, vm)?;
        let max = max.min(MAX_READ).min(READ_MAX);
        if dir.exists() {
            match self
                .ask(&dir, vm, "read", &format!("{run} {offset} {max}"))
                .await
            {
                Ok(answer) => match parse_read(&answer) {
                    Ok(Some(read)) => return Ok(read.into_chunk(offset)),
                    // The guest knows no such run: a kept one, or one that has not started
                    // yet (the agent is PHASE_RUNNING a moment before its command starts in
                    // the guest): nothing to read so far.
                    Ok(None) => {
                        return Ok(self
                            .kept
                            .read(tenant, run, offset, max)?
                            .unwrap_or_else(|| OutputChunk::nothing_yet(offset)));
                    }
                    Err(reason) => {
                        return Err(SubstrateError::Guest {
                            vm: vm.clone(),
                            reason,
                        });
                    }
                },
                // Deleted (or being deleted) meanwhile: the kept copy, if any.
                Err(SubstrateError::VmGone(_)) => {}
                // Asleep: what the host kept, if anything.
                Err(SubstrateError::Asleep(_)) => {
                    return self
                        .kept
                        .read(tenant, run, offset, max)?
                        .ok_or_else(|| SubstrateError::Asleep(vm.clone()));
                }
                Err(e) => return Err(e),
            }
        }
        self.kept
            .read(tenant, run, offset, max)?
            .ok_or_else(|| SubstrateError::VmGone(vm.clone()))
    }

    fn forget_kept_output(&self, tenant: &str) {
        self.kept.forget_tenant(tenant);
    }

    async fn exec(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &ExecSpec,
    ) -> Result<ExecSession, SubstrateError> {
        check_exec(spec)?;
        let dir = self.vm_dir(tenant, vm)?;
        if dir.exists() && sleep::is_marked(&dir) {
            return Err(SubstrateError::Asleep(vm.clone()));
        }
        if !dir.exists() || qemu_pid(&dir).is_none() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        let id = new_exec_id();
        let command = CommandSpec {
            run: id.clone(),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
        };
        let script =
            command_script(&command, "/root").map_err(|value| SubstrateError::Invalid {
                what: "command",
                value,
            })?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(script);
        if let Some(size) = spec.tty {
            return self.open_shell(&dir, vm, id, size, &b64).await;
        }
        let answer = self.ask(&dir, vm, "exec", &format!("{id} {b64}")).await?;
        if answer != "ok" {
            return Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason: format!("unexpected answer {:?}", truncate(&answer, 80)),
            });
        }
        let (session, input, output) = ExecSession::channel();
        exec::start(exec::SessionTask {
            provider: self.clone(),
            dir,
            vm: vm.clone(),
            id,
            input,
            output,
        });
        Ok(session)
    }

    /// Saves the guest's RAM and device state to `sleep.state` and ends its qemu (see
    /// "Sleep and wake" in the module docs), holding the VM's channel for all of it.
    async fn sleep(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        let lock = self.lock(&dir);
        let _guard = lock.lock().await;
        sleep::sleep(&dir, vm).await
    }

    /// Restores the guest from `sleep.state` in a new qemu and waits until its agent answers
    /// (see "Sleep and wake" in the module docs), holding the VM's channel for all of it.
    async fn wake(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        let lock = self.lock(&dir);
        let _guard = lock.lock().await;
        sleep::wake(self, &dir, vm).await
    }

    /// A sleeping guest is saved to `sleep.state` and its qemu ends: it holds no memory.
    fn sleep_frees_memory(&self) -> bool {
        true
    }

    fn is_asleep(&self, tenant: &str, vm: &VmId) -> bool {
        self.vm_dir(tenant, vm)
            .is_ok_and(|dir| sleep::is_marked(&dir))
    }

    async fn cancel_command(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        if !dir.exists() || !valid_run_id(run) {
            return Ok(());
        }
        match self.ask(&dir, vm, "cancel", run).await {
            // Asleep: nothing runs now; deleting the VM stops the run for good.
            Ok(_) | Err(SubstrateError::VmGone(_)) | Err(SubstrateError::Asleep(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Turns a provisioned guest into the image `image`: the guest writes its image id and
    /// packs every file changed since boot as a cpio layer ([`images::pack_guest`]), the host
    /// fetches it over the control channel and appends it to the base's initrd
    /// ([`images::add_layer`]).
    async fn snapshot(
        &self,
        tenant: &str,
        vm: &VmId,
        base: &str,
        image: &str,
    ) -> Result<(), SubstrateError> {
        check_image_id(image)?;
        let base_meta = self
            .image_meta(base)
            .ok_or_else(|| SubstrateError::ImageNotFound(base.into()))?;
        images::pack_guest(self, tenant, vm, image).await?;
        let layer = self.read_guest_file(tenant, vm, images::LAYER_PATH).await?;
        images::add_layer(&self.images_dir(), base, &base_meta, image, layer).await
    }
}
