//! The `process` substrate: each VM is a local sandbox.
//!
//! A sandbox is a directory `<state>/vms/<tenant>/<vm-id>/` holding `vm.json` (what it is),
//! `root/` (a copy of the image's directory template, the VM's working directory) and a
//! supervisor process running in its own session and process group with a clean environment
//! (`MURMUR_VM=1`, `MURMUR_VM_ID`, ...). The supervisor runs the image's `boot.sh`, then answers
//! the readiness handshake on `control.sock`. Everything lives on disk, so a restarted worker
//! finds its VMs again with [`Provider::list`].
//!
//! # Sleep and wake
//!
//! [`Provider::sleep`] writes the marker `asleep` into the sandbox, then stops (`SIGSTOP`)
//! the process group of every run and exec session that has not exited; [`Provider::wake`]
//! continues them (`SIGCONT`) and removes the marker. While the marker is there no run or
//! exec session starts. A stopped process keeps its memory, open files and children, and
//! uses no CPU: sleep here releases **compute only, not memory** (the host's RAM stays
//! held, so a sleeping sandbox counts against `max_vms` like a running one). A process that
//! left its group (`setsid`, a daemon) is not stopped. Time goes on while asleep: a timer
//! that fell due fires at once on wake (a `sleep 1` ends), but nothing the processes did
//! not do happens for them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::{VmId, valid_image_ref};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::local_exec::{self, LocalExec};
use super::session::{
    DEFAULT_LOG_RETENTION, ExecSession, ExecSpec, KeptLogs, OutputChunk, read_at,
};
use super::vm_dir::{
    all_pids, check_image_id, check_run_id, check_socket_path, list_vm_dirs, live_cmdline,
    recorded_pid, remove_vm_dir, replace_dir, set_mode,
};
use super::{CommandSpec, CommandStatus, Provider, Ready, Seal, SubstrateError, VmInfo};

/// Name of the file describing a sandbox.
pub const META_FILE: &str = "vm.json";
/// Name of the supervisor's control socket inside a sandbox.
pub const CONTROL_SOCKET: &str = "control.sock";
/// File the supervisor writes when the boot script fails.
pub const BOOT_FAILED_FILE: &str = "boot.failed";
/// Script of an image that runs at boot, before the VM reports ready.
pub const BOOT_SCRIPT: &str = "boot.sh";
/// The supervisor's process id, recorded at spawn.
pub const SUPERVISOR_PID_FILE: &str = "supervisor.pid";
/// Directory of a sandbox holding one subdirectory per command run.
pub const RUNS_DIR: &str = "runs";
/// A run's combined stdout and stderr.
pub const OUTPUT_FILE: &str = "output.log";
/// A run's process (group) id.
pub const PID_FILE: &str = "pid";
/// A run's exit code, written when it exits.
pub const EXIT_FILE: &str = "exit";
/// Marker file of a sandbox that is asleep: its runs' process groups are stopped.
pub const ASLEEP_FILE: &str = "asleep";
/// How the run directories of exec sessions start (`runs/exec-<id>/`: a pid, no output).
pub const EXEC_RUN_PREFIX: &str = "exec-";
/// The default image's files, embedded in the binary.
const DEFAULT_IMAGE_FILES: &[(&str, &str, u32)] = &[
    (
        "etc/murmur/image",
        include_str!("../../images/default/etc/murmur/image"),
        0o644,
    ),
    ("README", include_str!("../../images/default/README"), 0o644),
    (
        "boot.sh",
        include_str!("../../images/default/boot.sh"),
        0o755,
    ),
];

/// What `vm.json` records about a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxMeta {
    /// The VM.
    pub id: VmId,
    /// Owning tenant.
    pub tenant: String,
    /// Workspace it was booted for.
    pub workspace: String,
    /// Image it was created from.
    pub image: String,
    /// Requested vCPUs (recorded; the process substrate does not enforce it).
    pub vcpus: u32,
    /// Requested memory in MiB (recorded; not enforced).
    pub memory_mb: u32,
    /// The pool generation it was booted in.
    #[serde(default)]
    pub generation: u64,
}

impl SandboxMeta {
    /// The environment every process in the sandbox gets (and nothing else from the worker).
    pub fn environment(&self, root: &Path) -> Vec<(String, OsString)> {
        vec![
            ("MURMUR_VM".into(), "1".into()),
            ("MURMUR_VM_ID".into(), self.id.0.clone().into()),
            ("MURMUR_TENANT".into(), self.tenant.clone().into()),
            ("MURMUR_WORKSPACE".into(), self.workspace.clone().into()),
            ("MURMUR_IMAGE".into(), self.image.clone().into()),
            ("HOME".into(), root.as_os_str().to_owned()),
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ]
    }
}

/// How to start a sandbox supervisor: a program and its leading arguments; `--dir <sandbox>`
/// is appended.
#[derive(Clone, Debug)]
pub struct SupervisorLaunch {
    /// Executable (normally `murmur-worker`).
    pub program: PathBuf,
    /// Arguments before `--dir` (normally `["sandbox"]`).
    pub args: Vec<OsString>,
}

/// The `process` substrate.
#[derive(Clone, Debug)]
pub struct ProcessProvider {
    state_dir: PathBuf,
    launch: SupervisorLaunch,
    kept: KeptLogs,
}

impl ProcessProvider {
    /// A provider keeping its sandboxes and images under `state_dir`. Writes the embedded
    /// `default` image there if it is missing.
    pub fn new(
        state_dir: impl Into<PathBuf>,
        launch: SupervisorLaunch,
    ) -> Result<Self, SubstrateError> {
        let state_dir = state_dir.into();
        let provider = Self {
            kept: KeptLogs::new(&state_dir, DEFAULT_LOG_RETENTION),
            state_dir,
            launch,
        };
        provider.install_default_image()?;
        Ok(provider)
    }

    /// A provider that can only inspect (list) sandboxes, for tests and tools.
    pub fn inspector(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Self {
            kept: KeptLogs::new(&state_dir, DEFAULT_LOG_RETENTION),
            state_dir,
            launch: SupervisorLaunch {
                program: PathBuf::from("/bin/false"),
                args: Vec::new(),
            },
        }
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

    /// Where images live: one directory template per image name.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    fn vms_root(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// The sandbox directory of a VM.
    pub fn sandbox_dir(&self, tenant: &str, vm: &VmId) -> Result<PathBuf, SubstrateError> {
        super::vm_dir::vm_dir(&self.vms_root(), tenant, vm)
    }

    fn install_default_image(&self) -> Result<(), SubstrateError> {
        let dir = self
            .images_dir()
            .join(murmur_workflows::model::DEFAULT_IMAGE);
        if dir.exists() {
            return Ok(());
        }
        let tmp = self.images_dir().join(".default.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        for (path, body, mode) in DEFAULT_IMAGE_FILES {
            let file = tmp.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| SubstrateError::io(format!("create {}", parent.display()), e))?;
            }
            std::fs::write(&file, body)
                .map_err(|e| SubstrateError::io(format!("write {}", file.display()), e))?;
            set_mode(&file, *mode)?;
        }
        std::fs::rename(&tmp, &dir)
            .map_err(|e| SubstrateError::io(format!("install image {}", dir.display()), e))
    }

    /// Process ids of the supervisors serving the sandbox at `dir`. The pid recorded at
    /// spawn (`supervisor.pid`) answers in one read; without it, or when that process is
    /// gone, every process's command line is searched for `--dir <dir>` (which also finds
    /// supervisors nobody recorded).
    pub fn supervisor_pids(dir: &Path) -> Vec<i32> {
        if let Some(pid) = recorded_pid(dir, SUPERVISOR_PID_FILE)
            && serves(pid, dir)
        {
            return vec![pid];
        }
        all_pids()
            .into_iter()
            .filter(|pid| serves(*pid, dir))
            .collect()
    }

    /// Maps a failed control-socket request: a VM without a live supervisor is gone.
    fn unreachable(&self, dir: &Path, vm: &VmId, e: std::io::Error) -> SubstrateError {
        if !dir.exists() || Self::supervisor_pids(dir).is_empty() {
            SubstrateError::VmGone(vm.clone())
        } else {
            SubstrateError::io(format!("talk to VM {vm}"), e)
        }
    }

    async fn spawn_supervisor(&self, dir: &Path, meta: &SandboxMeta) -> Result<(), SubstrateError> {
        let root = dir.join("root");
        let log = std::fs::File::create(dir.join("supervisor.log"))
            .map_err(|e| SubstrateError::io("create supervisor.log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| SubstrateError::io("open supervisor.log", e))?;
        let mut cmd = tokio::process::Command::new(&self.launch.program);
        cmd.args(&self.launch.args)
            .arg("--dir")
            .arg(dir)
            .current_dir(&root)
            .env_clear()
            .envs(meta.environment(&root))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        // SAFETY: `setsid` is async-signal-safe; it detaches the supervisor from the worker's
        // session so the VM outlives a worker crash or a Ctrl-C in the worker's terminal.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            SubstrateError::io(format!("start {}", self.launch.program.display()), e)
        })?;
        if let Some(pid) = child.id() {
            std::fs::write(dir.join(SUPERVISOR_PID_FILE), pid.to_string())
                .map_err(|e| SubstrateError::io("write supervisor.pid", e))?;
        }
        // tokio reaps the child in the background once it exits; we never wait on it here.
        drop(child);
        Ok(())
    }
}

#[async_trait]
impl Provider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn create(&self, spec: &BootSpec) -> Result<(), SubstrateError> {
        let dir = self.sandbox_dir(&spec.tenant, &spec.vm)?;
        if !valid_image_ref(&spec.image) {
            return Err(SubstrateError::ImageNotFound(spec.image.clone()));
        }
        check_socket_path(&dir.join(CONTROL_SOCKET))?;
        if dir.exists() {
            if !Self::supervisor_pids(&dir).is_empty() {
                return Ok(());
            }
            // A dead leftover of an earlier attempt: start over.
            remove_vm_dir(&dir).await?;
        }
        let image_dir = self.images_dir().join(&spec.image);
        if !image_dir.is_dir() {
            return Err(SubstrateError::ImageNotFound(spec.image.clone()));
        }
        let meta = SandboxMeta {
            id: spec.vm.clone(),
            tenant: spec.tenant.clone(),
            workspace: spec.workspace.clone(),
            image: spec.image.clone(),
            vcpus: spec.environment.vcpus,
            memory_mb: spec.environment.memory_mb,
            generation: spec.generation,
        };
        let root = dir.join("root");
        std::fs::create_dir_all(&dir)
            .map_err(|e| SubstrateError::io(format!("create {}", dir.display()), e))?;
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| SubstrateError::io("encode vm.json", e.into()))?;
        std::fs::write(dir.join(META_FILE), json)
            .map_err(|e| SubstrateError::io("write vm.json", e))?;
        let (from, to) = (image_dir.clone(), root.clone());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to))
            .await
            .map_err(|e| SubstrateError::io("copy image", std::io::Error::other(e)))?
            .map_err(|e| SubstrateError::io(format!("copy image {}", image_dir.display()), e))?;
        self.spawn_supervisor(&dir, &meta).await
    }

    async fn wait_ready(
        &self,
        tenant: &str,
        vm: &VmId,
        timeout: Duration,
    ) -> Result<Ready, SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        let socket = dir.join(CONTROL_SOCKET);
        let started = Instant::now();
        let mut last_alive_check = Instant::now();
        loop {
            if let Ok(reason) = std::fs::read_to_string(dir.join(BOOT_FAILED_FILE)) {
                return Err(SubstrateError::BootFailed {
                    vm: vm.clone(),
                    reason: reason.trim().to_string(),
                });
            }
            if let Ok(ready) = handshake(&socket).await {
                if &ready.vm == vm {
                    return Ok(ready);
                }
                return Err(SubstrateError::BootFailed {
                    vm: vm.clone(),
                    reason: format!("handshake answered for {}", ready.vm),
                });
            }
            if last_alive_check.elapsed() > Duration::from_millis(500) {
                last_alive_check = Instant::now();
                if !dir.exists() {
                    return Err(SubstrateError::BootFailed {
                        vm: vm.clone(),
                        reason: "sandbox was deleted while booting".into(),
                    });
                }
                if Self::supervisor_pids(&dir).is_empty() && !dir.join(BOOT_FAILED_FILE).exists() {
                    return Err(SubstrateError::BootFailed {
                        vm: vm.clone(),
                        reason: "supervisor exited before it was ready".into(),
                    });
                }
            }
            if started.elapsed() >= timeout {
                return Err(SubstrateError::BootTimeout {
                    vm: vm.clone(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn claim_owner(&self, tenant: &str, vm: &VmId, owner: &str) -> Result<(), SubstrateError> {
        super::vm_dir::claim_owner(&self.sandbox_dir(tenant, vm)?, vm, owner)
    }

    fn seal_for_delete(
        &self,
        tenant: &str,
        vm: &VmId,
        expected: Option<&str>,
    ) -> Result<Seal, SubstrateError> {
        super::vm_dir::seal_for_delete(&self.sandbox_dir(tenant, vm)?, vm, expected)
    }

    async fn delete(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        stop_supervisors(&dir).await;
        // Runs live in their own process groups; a supervisor killed hard cannot stop them.
        for pid in run_pids(&dir) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.keep_outputs(tenant, &dir);
        remove_vm_dir(&dir).await
    }

    async fn start_command(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &CommandSpec,
    ) -> Result<(), SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        check_run_id(&spec.run)?;
        if !dir.exists() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        if dir.join(ASLEEP_FILE).exists() {
            return Err(SubstrateError::Asleep(vm.clone()));
        }
        let json =
            serde_json::to_string(spec).map_err(|e| SubstrateError::io("encode RUN", e.into()))?;
        let answer = request(&dir.join(CONTROL_SOCKET), &format!("RUN {json}"))
            .await
            .map_err(|e| self.unreachable(&dir, vm, e))?;
        match answer.strip_prefix("ERR ") {
            None if answer == "OK" => Ok(()),
            Some(reason) => Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason: reason.to_string(),
            }),
            None => Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason: format!("unexpected answer {answer:?}"),
            }),
        }
    }

    async fn command_status(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<CommandStatus, SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        let rd = run_dir(&dir, run);
        if let Ok(code) = std::fs::read_to_string(rd.join(EXIT_FILE)) {
            return Ok(CommandStatus::Exited(code.trim().parse().unwrap_or(-1)));
        }
        if !dir.exists() || Self::supervisor_pids(&dir).is_empty() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        if rd.is_dir() {
            Ok(CommandStatus::Running)
        } else {
            Ok(CommandStatus::Unknown)
        }
    }

    async fn command_output_tail(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
        max_bytes: usize,
    ) -> Result<String, SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        match tail(&run_dir(&dir, run).join(OUTPUT_FILE), max_bytes) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(SubstrateError::io("read output.log", e)),
        }
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
        let dir = self.sandbox_dir(tenant, vm)?;
        let rd = run_dir(&dir, run);
        // The exit is read before the output: output read after an exit was seen is complete.
        let exited = rd.join(EXIT_FILE).exists();
        match read_at(&rd.join(OUTPUT_FILE), offset, max) {
            Ok(mut chunk) => {
                chunk.complete = exited;
                return Ok(chunk);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SubstrateError::io("read output.log", e)),
        }
        match self.kept.read(tenant, run, offset, max)? {
            Some(chunk) => Ok(chunk),
            // The sandbox is there and the run has not started yet (the agent is
            // PHASE_RUNNING a moment before the supervisor starts its command): nothing so far.
            None if dir.join(META_FILE).exists() => Ok(OutputChunk::nothing_yet(offset)),
            None => Err(SubstrateError::VmGone(vm.clone())),
        }
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
        let dir = self.sandbox_dir(tenant, vm)?;
        if !dir.exists() || Self::supervisor_pids(&dir).is_empty() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        if dir.join(ASLEEP_FILE).exists() {
            return Err(SubstrateError::Asleep(vm.clone()));
        }
        let meta: SandboxMeta = std::fs::read(dir.join(META_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| SubstrateError::VmGone(vm.clone()))?;
        let root = dir.join("root");
        let session = format!("{EXEC_RUN_PREFIX}{}", super::vm_dir::new_session_id());
        local_exec::start(
            LocalExec {
                env: meta.environment(&root),
                cwd: root,
                record_dir: run_dir(&dir, &session),
            },
            spec,
        )
    }

    async fn cancel_command(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<(), SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        if !dir.exists() {
            return Ok(());
        }
        let answer = request(&dir.join(CONTROL_SOCKET), &format!("CANCEL {run}")).await;
        if dir.join(ASLEEP_FILE).exists()
            && let Some(pid) = std::fs::read_to_string(run_dir(&dir, run).join(PID_FILE))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // A stopped group holds the SIGTERM until it runs again: let it, so it can quit.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGCONT);
        }
        match answer {
            Ok(answer) if answer == "OK" => Ok(()),
            Ok(answer) => Err(SubstrateError::Guest {
                vm: vm.clone(),
                reason: answer,
            }),
            Err(_) => {
                // No supervisor to ask: stop the run's process group directly.
                let rd = run_dir(&dir, run);
                if let Some(pid) = std::fs::read_to_string(rd.join(PID_FILE))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                Ok(())
            }
        }
    }

    async fn sleep(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        if !dir.exists() || Self::supervisor_pids(&dir).is_empty() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        // The marker first: from here on no new run or exec session starts, so the groups
        // listed below are all there is to stop (a second pass catches one that started just
        // before the marker was written).
        std::fs::write(dir.join(ASLEEP_FILE), b"")
            .map_err(|e| SubstrateError::io("write the asleep marker", e))?;
        let mut stopped = std::collections::BTreeSet::new();
        loop {
            let groups: Vec<i32> = run_pids(&dir)
                .into_iter()
                .filter(|pid| !stopped.contains(pid))
                .collect();
            if groups.is_empty() {
                break;
            }
            for pid in groups {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGSTOP);
                stopped.insert(pid);
            }
        }
        tracing::info!(tenant, vm = %vm, groups = stopped.len(), "sandbox asleep: its runs are stopped");
        Ok(())
    }

    async fn wake(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.sandbox_dir(tenant, vm)?;
        if !dir.exists() || Self::supervisor_pids(&dir).is_empty() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        let groups = run_pids(&dir);
        for pid in &groups {
            let _ = killpg(Pid::from_raw(*pid), Signal::SIGCONT);
        }
        match std::fs::remove_file(dir.join(ASLEEP_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SubstrateError::io("remove the asleep marker", e)),
        }
        tracing::info!(tenant, vm = %vm, groups = groups.len(), "sandbox awake: its runs go on");
        Ok(())
    }

    fn is_asleep(&self, tenant: &str, vm: &VmId) -> bool {
        self.sandbox_dir(tenant, vm)
            .is_ok_and(|dir| dir.join(ASLEEP_FILE).exists())
    }

    fn has_image(&self, image: &str) -> bool {
        valid_image_ref(image) && self.images_dir().join(image).is_dir()
    }

    /// The sandbox's `root/` (the base image's template plus whatever the provisioning
    /// script changed there) becomes the image's template, with `etc/murmur/image` = `image`.
    async fn snapshot(
        &self,
        tenant: &str,
        vm: &VmId,
        _base: &str,
        image: &str,
    ) -> Result<(), SubstrateError> {
        check_image_id(image)?;
        let root = self.sandbox_dir(tenant, vm)?.join("root");
        if !root.is_dir() {
            return Err(SubstrateError::VmGone(vm.clone()));
        }
        let stage = self.images_dir().join(format!(".{image}.tmp"));
        let target = self.images_dir().join(image);
        let id = image.to_string();
        let work = move || -> std::io::Result<()> {
            let _ = std::fs::remove_dir_all(&stage);
            copy_tree(&root, &stage)?;
            std::fs::create_dir_all(stage.join("etc/murmur"))?;
            std::fs::write(stage.join("etc/murmur/image"), format!("{id}\n"))?;
            replace_dir(&stage, &target)
        };
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| SubstrateError::io("write image", std::io::Error::other(e)))?
            .map_err(|e| SubstrateError::io(format!("register image {image}"), e))
    }

    fn host_vms(&self) -> Vec<(String, VmId)> {
        super::vm_dir::vm_dirs_of_every_tenant(&self.vms_root())
    }

    async fn list(&self, tenant: &str) -> Result<Vec<VmInfo>, SubstrateError> {
        let tenant_dir = super::vm_dir::tenant_dir(&self.vms_root(), tenant)?;
        list_vm_dirs(tenant, &tenant_dir, META_FILE, |dir| {
            !Self::supervisor_pids(dir).is_empty()
        })
    }
}

impl ProcessProvider {
    /// Moves the outputs of a VM's agent runs into the kept logs before the VM is removed
    /// (exec sessions have no output file and are skipped). Never fails the delete: a log
    /// that cannot be kept is only logged.
    fn keep_outputs(&self, tenant: &str, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(run_dir(dir, "")) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let run = entry.file_name().to_string_lossy().into_owned();
            if run.starts_with(EXEC_RUN_PREFIX) {
                continue;
            }
            if let Err(e) = self
                .kept
                .keep(tenant, &run, &entry.path().join(OUTPUT_FILE))
            {
                tracing::warn!(tenant, run, error = %e, "cannot keep the output of a run");
            }
        }
    }
}

/// The directory of run `run` in the sandbox at `dir` (`run` empty: the runs directory).
pub fn run_dir(dir: &Path, run: &str) -> PathBuf {
    let runs = dir.join(RUNS_DIR);
    if run.is_empty() { runs } else { runs.join(run) }
}

/// Process group ids of the runs of a sandbox that have not exited.
pub fn run_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(run_dir(dir, "")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|rd| !rd.join(EXIT_FILE).exists())
        .filter_map(|rd| std::fs::read_to_string(rd.join(PID_FILE)).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// Sends one request line to the supervisor and reads its answer line.
async fn request(socket: &Path, line: &str) -> std::io::Result<String> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await?;
    let mut answer = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut answer),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(answer.trim().to_string())
}

/// The last `max_bytes` of a file, starting at a line boundary when it was cut.
fn tail(path: &Path, max_bytes: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max_bytes as u64);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0
        && let Some(nl) = text.find('\n')
    {
        text.drain(..=nl);
    }
    Ok(text)
}

/// Asks the supervisor behind `socket` whether it is ready.
async fn handshake(socket: &Path) -> std::io::Result<Ready> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    write.write_all(b"PING\n").await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(2),
        BufReader::new(read).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))??;
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("READY"), Some(vm), Some(image)) => Ok(Ready {
            vm: VmId(vm.to_string()),
            image: image.to_string(),
        }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected handshake answer {line:?}"),
        )),
    }
}

/// Stops every supervisor of a sandbox and its process group: SIGTERM, then SIGKILL.
async fn stop_supervisors(dir: &Path) {
    let pids = ProcessProvider::supervisor_pids(dir);
    if pids.is_empty() {
        return;
    }
    for pid in &pids {
        let _ = killpg(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    // Watch the processes found (one read each), not the whole process table.
    let running = |pids: &[i32]| {
        pids.iter()
            .copied()
            .filter(|p| serves(*p, dir))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut left = running(&pids);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        left = running(&left);
    }
    for pid in &left {
        let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        left = running(&left);
    }
}

/// True when process `pid` is alive (not a zombie) and serves the sandbox at `dir`.
fn serves(pid: i32, dir: &Path) -> bool {
    let want = dir.as_os_str().as_encoded_bytes();
    live_cmdline(pid).is_some_and(|cmd| {
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        args.windows(2).any(|w| w[0] == b"--dir" && w[1] == want)
    })
}

/// Copies a directory tree (files, directories, symlinks), keeping permissions.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
