//! The `qemu` substrate: each VM is a real Linux guest.
//!
//! Layout under the state directory:
//!
//! - `qemu/images/<image>/`: `vmlinuz`, `initrd.gz` and `image.json` ([`ImageMeta`]); the
//!   base image `default` is built from Debian packages by the embedded `build.sh`
//!   ([`QemuProvider::ensure_base_image`]); baked images add a layer to their base's initrd.
//! - `qemu/vms/<tenant>/<vm>/`: `vm.json` ([`QemuVmMeta`]), `qemu.pid`, `ctl.sock` (the
//!   guest's second serial port, the guest agent's control channel), `console.log` (the
//!   first serial port) and `qemu.log` (qemu's own stderr).
//!
//! qemu runs in its own session (`setsid`), so guests outlive a worker crash; everything is on
//! disk, so a restarted worker finds them with [`Provider::list`]. A process counts as the VM's
//! qemu only when `/proc/<pid>/cmdline` names the VM's control socket, so a reused pid is never
//! mistaken for it.
//!
//! The host talks to the guest agent (`activities/images/qemu/murmur-agent`) one connection
//! per operation (the chardev serves one client at a time): it sends `<verb> <tag> <args>` and
//! skips every line until `@<tag> <answer>`, so a stale answer, a leftover handshake line or
//! any other junk on the line never confuses it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::{VmId, is_dns_label, valid_image_ref};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::provider::{
    CommandSpec, CommandStatus, Provider, Ready, SubstrateError, VmInfo, list_vm_dirs,
};

/// The guest image build script (Debian packages only, reproducible).
pub const BUILD_SCRIPT: &str = include_str!("../images/qemu/build.sh");
/// The guest's `/init`.
pub const GUEST_INIT: &str = include_str!("../images/qemu/init");
/// The guest agent.
pub const GUEST_AGENT: &str = include_str!("../images/qemu/murmur-agent");
/// File describing a VM.
pub const VM_META_FILE: &str = "vm.json";
/// File describing an image.
pub const IMAGE_META_FILE: &str = "image.json";
/// The VM's qemu process id.
pub const PID_FILE: &str = "qemu.pid";
/// The control channel's unix socket.
pub const CONTROL_SOCKET: &str = "ctl.sock";
/// The guest console (first serial port).
pub const CONSOLE_LOG: &str = "console.log";
/// Longest path a unix socket can have on Linux.
const MAX_SOCKET_PATH: usize = 107;
/// How long one control-channel request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
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

/// What `image.json` says about a qemu image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Image id (`default`, or `img-<hex>` for baked images).
    pub id: String,
    /// Always `qemu`.
    #[serde(default)]
    pub substrate: String,
    /// Guest architecture.
    #[serde(default)]
    pub arch: String,
    /// Guest kernel release (`uname -r` in the guest).
    #[serde(default)]
    pub kernel: String,
    /// The image this one was baked from (none for the base image).
    #[serde(default)]
    pub base: Option<String>,
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

/// Failures of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket could not be reached or broke.
    #[error("control channel: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("control channel: no answer within {0:?}")]
    Timeout(Duration),
    /// The guest answered `err <reason>`.
    #[error("guest agent: {0}")]
    Refused(String),
    /// The guest answered something this host does not understand.
    #[error("guest agent: unexpected answer {0:?}")]
    Unexpected(String),
}

/// The `qemu` substrate.
#[derive(Clone)]
pub struct QemuProvider {
    state_dir: PathBuf,
    qemu: PathBuf,
    accel: Accel,
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for QemuProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProvider")
            .field("state_dir", &self.state_dir)
            .field("qemu", &self.qemu)
            .field("accel", &self.accel)
            .finish_non_exhaustive()
    }
}

impl QemuProvider {
    /// A provider keeping its VMs and images under `<state_dir>/qemu`. Finds
    /// `qemu-system-x86_64` (or `$MURMUR_QEMU`), builds the base image when it is missing, and
    /// picks the accelerator: `$MURMUR_QEMU_ACCEL` (`kvm`, `tcg`), else the result of an earlier
    /// probe recorded in `qemu/accel`, else a short KVM probe boot (TCG when it fails).
    pub async fn new(state_dir: impl Into<PathBuf>) -> Result<Self, SubstrateError> {
        let state_dir = state_dir.into();
        let qemu = find_qemu().ok_or_else(|| SubstrateError::Invalid {
            what: "substrate",
            value: "qemu: qemu-system-x86_64 not found (apt-get install -y qemu-system-x86, \
                    or set MURMUR_QEMU)"
                .into(),
        })?;
        let mut provider = Self {
            state_dir,
            qemu,
            accel: Accel::Tcg,
            locks: Arc::default(),
        };
        provider.ensure_base_image().await?;
        provider.accel = provider.choose_accel().await;
        Ok(provider)
    }

    /// A provider that only inspects and deletes VMs (no image build, no probe), for tests
    /// and tools.
    pub fn inspector(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            locks: Arc::default(),
        }
    }

    /// The accelerator guests run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Where qemu images live (`<state>/qemu/images`).
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("qemu").join("images")
    }

    /// The metadata of an image, if it exists.
    pub fn image_meta(&self, image: &str) -> Option<ImageMeta> {
        if !valid_image_ref(image) {
            return None;
        }
        let dir = self.images_dir().join(image);
        if !dir.join("vmlinuz").is_file() || !dir.join("initrd.gz").is_file() {
            return None;
        }
        std::fs::read(dir.join(IMAGE_META_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Builds the base image `default` with the embedded `build.sh` unless it exists.
    pub async fn ensure_base_image(&self) -> Result<(), SubstrateError> {
        let default = murmur_workflows::model::DEFAULT_IMAGE;
        if self.image_meta(default).is_some() {
            return Ok(());
        }
        let scripts = self.state_dir.join("qemu").join(".build");
        std::fs::create_dir_all(&scripts)
            .map_err(|e| SubstrateError::io(format!("create {}", scripts.display()), e))?;
        for (name, body) in [
            ("build.sh", BUILD_SCRIPT),
            ("init", GUEST_INIT),
            ("murmur-agent", GUEST_AGENT),
        ] {
            let path = scripts.join(name);
            std::fs::write(&path, body)
                .map_err(|e| SubstrateError::io(format!("write {}", path.display()), e))?;
            set_mode(&path, 0o755)?;
        }
        tracing::info!(
            image = default,
            "building the qemu base image (Debian kernel + busybox)"
        );
        let out = tokio::process::Command::new("bash")
            .arg(scripts.join("build.sh"))
            .arg(self.images_dir().join(default))
            .arg(default)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| SubstrateError::io("run the guest image build", e))?;
        if !out.status.success() {
            return Err(SubstrateError::BootFailed {
                vm: VmId(String::new()),
                reason: format!(
                    "guest image build failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    async fn choose_accel(&self) -> Accel {
        let forced = std::env::var("MURMUR_QEMU_ACCEL").unwrap_or_default();
        match forced.as_str() {
            "kvm" => return Accel::Kvm,
            "tcg" => return Accel::Tcg,
            _ => {}
        }
        let record = self.state_dir.join("qemu").join("accel");
        match std::fs::read_to_string(&record).map(|s| s.trim().to_string()) {
            Ok(s) if s == "kvm" => return Accel::Kvm,
            Ok(s) if s == "tcg" => return Accel::Tcg,
            _ => {}
        }
        let accel = if std::path::Path::new("/dev/kvm").exists() && self.probe_kvm().await {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        let _ = std::fs::write(&record, accel.as_str());
        accel
    }

    /// Boots the base image with KVM and waits briefly for the handshake.
    async fn probe_kvm(&self) -> bool {
        let vm = VmId("murmur-00000000".into());
        let dir = self.state_dir.join("qemu").join("probe");
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
        let ok = match self.spawn_qemu(&dir, &meta) {
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

    fn tenant_dir(&self, tenant: &str) -> Result<PathBuf, SubstrateError> {
        if !is_dns_label(tenant) {
            return Err(SubstrateError::Invalid {
                what: "tenant",
                value: tenant.into(),
            });
        }
        Ok(self.state_dir.join("qemu").join("vms").join(tenant))
    }

    /// The directory of a VM.
    pub fn vm_dir(&self, tenant: &str, vm: &VmId) -> Result<PathBuf, SubstrateError> {
        if !VmId::is_valid(&vm.0) {
            return Err(SubstrateError::Invalid {
                what: "vm id",
                value: vm.0.clone(),
            });
        }
        Ok(self.tenant_dir(tenant)?.join(&vm.0))
    }

    fn lock(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(dir.to_path_buf()).or_default().clone()
    }

    fn forget_lock(&self, dir: &Path) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(dir);
    }

    fn spawn_qemu(&self, dir: &Path, meta: &QemuVmMeta) -> Result<(), SubstrateError> {
        let image = self.images_dir().join(&meta.image);
        let log = std::fs::File::create(dir.join("qemu.log"))
            .map_err(|e| SubstrateError::io("create qemu.log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| SubstrateError::io("open qemu.log", e))?;
        let niceness = std::env::var("MURMUR_QEMU_NICE")
            .ok()
            .and_then(|n| n.trim().parse::<i32>().ok())
            .map_or(QEMU_NICE, |n| n.clamp(0, 19));
        let mut cmd = tokio::process::Command::new(&self.qemu);
        cmd.args(qemu_args(dir, &image, meta))
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
            .map_err(|e| SubstrateError::io(format!("start {}", self.qemu.display()), e))?;
        if let Some(pid) = child.id() {
            std::fs::write(dir.join(PID_FILE), pid.to_string())
                .map_err(|e| SubstrateError::io("write qemu.pid", e))?;
        }
        // tokio reaps the child in the background once it exits.
        drop(child);
        Ok(())
    }

    /// Sends one request to the guest agent of a VM (serialised per VM in this worker).
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
        match request(&dir.join(CONTROL_SOCKET), verb, args, REQUEST_TIMEOUT).await {
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

/// The qemu command line of a VM (without the program).
pub fn qemu_args(dir: &Path, image: &Path, meta: &QemuVmMeta) -> Vec<OsString> {
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
    args.push("-serial".into());
    args.push(format!("file:{}", dir.join(CONSOLE_LOG).display()).into());
    args.push("-serial".into());
    args.push(
        format!(
            "unix:{},server=on,wait=off",
            dir.join(CONTROL_SOCKET).display()
        )
        .into(),
    );
    args
}

/// The pid of the VM's qemu when it runs: the recorded pid whose command line names this
/// VM's control socket (so a reused pid never counts), else any such process (one nobody
/// recorded, say after a crash between spawn and the pid file).
pub fn qemu_pid(dir: &Path) -> Option<i32> {
    if let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        && runs_vm(pid, dir)
    {
        return Some(pid);
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .find(|pid| runs_vm(*pid, dir))
}

/// True when `pid` is a live (not zombie) qemu serving the VM at `dir`.
fn runs_vm(pid: i32, dir: &Path) -> bool {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X")
    });
    if zombie {
        return false;
    }
    let want = format!("unix:{},", dir.join(CONTROL_SOCKET).display());
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        let mut args = cmd.split(|b| *b == 0);
        let is_qemu = args
            .next()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"));
        is_qemu && args.any(|a| a.starts_with(want.as_bytes()))
    })
}

/// Stops the VM's qemu: a `poweroff` request (the guest syncs and powers off) with `grace`,
/// then SIGTERM (qemu quits), then SIGKILL; waits until the process is gone.
async fn stop_qemu(dir: &Path, grace: Duration) {
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

static TAGS: AtomicU64 = AtomicU64::new(1);

/// A fresh request tag (alphanumeric, unique per worker process and request).
fn next_tag() -> String {
    format!(
        "{:x}x{:x}",
        std::process::id(),
        TAGS.fetch_add(1, Ordering::Relaxed)
    )
}

/// One request on the control channel: connect, send `<verb> <tag> <args>`, return the rest
/// of the line `@<tag> <answer>`, skipping every other line. `err <reason>` is a refusal.
pub async fn request(
    socket: &Path,
    verb: &str,
    args: &str,
    timeout: Duration,
) -> Result<String, ChannelError> {
    let tag = next_tag();
    let work = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let line = if args.is_empty() {
            format!("{verb} {tag}\n")
        } else {
            format!("{verb} {tag} {args}\n")
        };
        write.write_all(line.as_bytes()).await?;
        let mut reader = BufReader::new(read);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).await? == 0 {
                return Err(ChannelError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "control channel closed",
                )));
            }
            if let Some(answer) = parse_answer(&buf, &tag) {
                return match answer.strip_prefix("err") {
                    Some(reason) => Err(ChannelError::Refused(reason.trim().to_string())),
                    None => Ok(answer),
                };
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ChannelError::Timeout(timeout))?
}

/// The answer in `line` when it is `@<tag> <answer>` for this tag.
pub fn parse_answer(line: &[u8], tag: &str) -> Option<String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let rest = text.strip_prefix('@')?.strip_prefix(tag)?;
    if rest.is_empty() {
        return Some(String::new());
    }
    rest.strip_prefix(' ').map(str::to_string)
}

/// Parses a readiness answer: `ready <vm> <image>` (the agent's first line, or its answer to
/// `ping`).
pub fn parse_ready(answer: &str) -> Option<Ready> {
    let mut words = answer.split_whitespace();
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("ready"), Some(vm), Some(image), None) => Some(Ready {
            vm: VmId(vm.to_string()),
            image: image.to_string(),
        }),
        _ => None,
    }
}

/// Decodes `data <base64>`.
pub fn decode_data(answer: &str) -> Result<Vec<u8>, String> {
    let payload = answer
        .strip_prefix("data")
        .ok_or_else(|| format!("unexpected answer {:?}", truncate(answer, 80)))?
        .trim();
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| format!("malformed data: {e}"))
}

/// Parses a `status` answer.
pub fn parse_status(answer: &str) -> Option<CommandStatus> {
    let mut words = answer.split_whitespace();
    match (words.next(), words.next()) {
        (Some("running"), None) => Some(CommandStatus::Running),
        (Some("unknown"), None) => Some(CommandStatus::Unknown),
        (Some("exited"), Some(code)) => code.parse().ok().map(CommandStatus::Exited),
        _ => None,
    }
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r#"'\''"#))
}

/// The shell script the guest agent runs for a command: exports, then the command (one word
/// through `sh -c`, several executed as given). Env names must be shell identifiers.
pub fn command_script(spec: &CommandSpec, cwd: &str) -> Result<String, String> {
    if spec.argv.is_empty() {
        return Err("empty command".into());
    }
    let mut script = String::new();
    for (key, value) in &spec.env {
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("invalid environment variable name {key:?}"));
        }
        script.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    script.push_str(&format!("cd {}\n", shell_quote(cwd)));
    if spec.argv.len() == 1 {
        script.push_str(&format!("exec /bin/sh -c {}\n", shell_quote(&spec.argv[0])));
    } else {
        let words: Vec<String> = spec.argv.iter().map(|w| shell_quote(w)).collect();
        script.push_str(&format!("exec {}\n", words.join(" ")));
    }
    Ok(script)
}

/// Connects to a booting guest and pings until it answers `ready`, at most `timeout`.
/// Accepts the agent's own first line as well as the answer to a ping (that line goes to
/// whoever is connected when it is written, possibly nobody).
async fn handshake(socket: &Path, timeout: Duration) -> Result<Ready, ChannelError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::Timeout(timeout));
        }
        if let Ok(Ok(ready)) = tokio::time::timeout(left, handshake_once(socket)).await {
            return Ok(ready);
        }
        tokio::time::sleep(Duration::from_millis(50).min(left)).await;
    }
}

/// One connection: ping every 250 ms until a ready line arrives (or the connection breaks).
async fn handshake_once(socket: &Path) -> Result<Ready, ChannelError> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        let tag = next_tag();
        write.write_all(format!("ping {tag}\n").as_bytes()).await?;
        let until = Instant::now() + Duration::from_millis(250);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            buf.clear();
            match tokio::time::timeout(left, reader.read_until(b'\n', &mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => {
                    return Err(ChannelError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(Ok(_)) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\r', '\n']);
                    let answer = line
                        .strip_prefix('@')
                        .and_then(|l| l.split_once(' '))
                        .map_or(line, |(_, a)| a);
                    if let Some(ready) = parse_ready(answer) {
                        return Ok(ready);
                    }
                }
            }
        }
    }
}

/// The last lines of a file (for boot failures).
fn file_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), SubstrateError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SubstrateError::io(format!("chmod {}", path.display()), e))
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
        let socket = dir.join(CONTROL_SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SubstrateError::Invalid {
                what: "state dir (control socket path too long)",
                value: socket.display().to_string(),
            });
        }
        if self.image_meta(&spec.image).is_none() {
            return Err(SubstrateError::ImageNotFound(spec.image.clone()));
        }
        let lock = self.lock(&dir);
        let _guard = lock.lock().await;
        if dir.exists() {
            if qemu_pid(&dir).is_some() {
                return Ok(());
            }
            // A dead leftover of an earlier attempt: start over.
            crate::provider::remove_vm_dir(&dir).await?;
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
        self.spawn_qemu(&dir, &meta)
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
                        "qemu exited before the guest was ready: {} / console: {}",
                        file_tail(&dir.join("qemu.log"), 400),
                        file_tail(&dir.join(CONSOLE_LOG), 400)
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
            let attempt = {
                let lock = self.lock(&dir);
                let _guard = lock.lock().await;
                handshake(&socket, left.min(Duration::from_secs(1))).await
            };
            if let Ok(ready) = attempt {
                if &ready.vm == vm {
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
        crate::provider::claim_owner(&self.vm_dir(tenant, vm)?, vm, owner)
    }

    fn seal_for_delete(
        &self,
        tenant: &str,
        vm: &VmId,
        expected: Option<&str>,
    ) -> Result<crate::provider::Seal, SubstrateError> {
        crate::provider::seal_for_delete(&self.vm_dir(tenant, vm)?, vm, expected)
    }

    async fn delete(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
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
            crate::provider::remove_vm_dir(&dir).await?;
        }
        self.forget_lock(&dir);
        Ok(())
    }

    fn host_vms(&self) -> Vec<(String, VmId)> {
        crate::provider::vm_dirs_of_every_tenant(&self.state_dir.join("qemu").join("vms"))
    }

    async fn list(&self, tenant: &str) -> Result<Vec<VmInfo>, SubstrateError> {
        list_vm_dirs(tenant, &self.tenant_dir(tenant)?, VM_META_FILE, |dir| {
            qemu_pid(dir).is_some()
        })
    }

    async fn start_command(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &CommandSpec,
    ) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        if !crate::process::valid_run_id(&spec.run) {
            return Err(SubstrateError::Invalid {
                what: "run id",
                value: spec.run.clone(),
            });
        }
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
        if !crate::process::valid_run_id(run) {
            return Ok(CommandStatus::Unknown);
        }
        let answer = self.ask(&dir, vm, "status", run).await?;
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
        if !crate::process::valid_run_id(run) {
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

    async fn cancel_command(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<(), SubstrateError> {
        let dir = self.vm_dir(tenant, vm)?;
        if !dir.exists() || !crate::process::valid_run_id(run) {
            return Ok(());
        }
        match self.ask(&dir, vm, "cancel", run).await {
            Ok(_) | Err(SubstrateError::VmGone(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn snapshot(
        &self,
        tenant: &str,
        vm: &VmId,
        base: &str,
        image: &str,
    ) -> Result<(), SubstrateError> {
        self.snapshot_guest(tenant, vm, base, image).await
    }
}

/// The guest-side script that packs a provisioned guest's changes as a cpio layer: every file
/// newer than `/init` (the base image's files all carry its fixed build time; anything a
/// provisioning script wrote is newer), outside the kernel filesystems, `/run` and `/tmp`.
pub const PACK_SCRIPT: &str = "cd / && find . -xdev -newer /init \
! -path './proc*' ! -path './sys*' ! -path './dev*' ! -path './run*' ! -path './tmp*' \
! -path . | cpio -o -H newc 2>/dev/null | gzip -9 > /run/murmur/layer.cpio.gz";

impl QemuProvider {
    /// Turns a provisioned guest into the image `image`: the guest writes its image id to
    /// `/etc/murmur/image`, packs every file changed since boot as a cpio layer, the host
    /// fetches it over the control channel and writes `initrd.gz` = base initrd + layer (the
    /// kernel unpacks concatenated archives in order, so the layer overlays the base), with
    /// the base's kernel. Files the script deleted are not captured (a layer only adds).
    async fn snapshot_guest(
        &self,
        tenant: &str,
        vm: &VmId,
        base: &str,
        image: &str,
    ) -> Result<(), SubstrateError> {
        if !valid_image_ref(image) {
            return Err(SubstrateError::Invalid {
                what: "image id",
                value: image.into(),
            });
        }
        let base_meta = self
            .image_meta(base)
            .ok_or_else(|| SubstrateError::ImageNotFound(base.into()))?;
        let run = format!("pack-{}", next_tag());
        let spec = CommandSpec {
            run: run.clone(),
            argv: vec![format!(
                "echo {} > /etc/murmur/image && {PACK_SCRIPT}",
                shell_quote(image)
            )],
            env: Vec::new(),
        };
        self.start_command(tenant, vm, &spec).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.command_status(tenant, vm, &run).await? {
                CommandStatus::Exited(0) => break,
                CommandStatus::Exited(code) => {
                    let tail = self
                        .command_output_tail(tenant, vm, &run, 2000)
                        .await
                        .unwrap_or_default();
                    return Err(SubstrateError::Guest {
                        vm: vm.clone(),
                        reason: format!("packing the guest failed (exit {code}): {tail}"),
                    });
                }
                _ if Instant::now() > deadline => {
                    return Err(SubstrateError::Guest {
                        vm: vm.clone(),
                        reason: "packing the guest timed out".into(),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let layer = self
            .read_guest_file(tenant, vm, "/run/murmur/layer.cpio.gz")
            .await?;
        let base_dir = self.images_dir().join(base);
        let stage = self.images_dir().join(format!(".{image}.tmp"));
        let target = self.images_dir().join(image);
        let meta = ImageMeta {
            id: image.to_string(),
            substrate: "qemu".into(),
            arch: base_meta.arch.clone(),
            kernel: base_meta.kernel.clone(),
            base: Some(base.to_string()),
        };
        let work = move || -> std::io::Result<()> {
            let _ = std::fs::remove_dir_all(&stage);
            std::fs::create_dir_all(&stage)?;
            std::fs::copy(base_dir.join("vmlinuz"), stage.join("vmlinuz"))?;
            let mut initrd = std::fs::read(base_dir.join("initrd.gz"))?;
            initrd.extend_from_slice(&layer);
            std::fs::write(stage.join("initrd.gz"), initrd)?;
            std::fs::write(stage.join("layer.cpio.gz"), &layer)?;
            std::fs::write(
                stage.join(IMAGE_META_FILE),
                serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?,
            )?;
            replace_dir(&stage, &target)
        };
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| SubstrateError::io("write image", std::io::Error::other(e)))?
            .map_err(|e| SubstrateError::io(format!("register image {image}"), e))
    }
}

/// Moves `stage` to `target`, replacing an older `target` (a forced re-bake): the old one is
/// renamed away first, so `target` is always either the old or the new complete image.
pub fn replace_dir(stage: &Path, target: &Path) -> std::io::Result<()> {
    if target.exists() {
        let old = target.with_extension(format!("old.{}", next_tag()));
        std::fs::rename(target, &old)?;
        std::fs::rename(stage, target)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    } else {
        std::fs::rename(stage, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_by_tag_and_junk_is_skipped() {
        assert_eq!(parse_answer(b"@ab1 ok\n", "ab1").as_deref(), Some("ok"));
        assert_eq!(parse_answer(b"@ab1 ok\r\n", "ab1").as_deref(), Some("ok"));
        assert_eq!(parse_answer(b"@ab12 ok\n", "ab1"), None);
        assert_eq!(
            parse_answer(b"ready murmur-00000001 default\n", "ab1"),
            None
        );
        assert_eq!(parse_answer(b"\x00\xffgarbage\n", "ab1"), None);
        assert_eq!(
            parse_answer(b"@t9 exited 3\n", "t9").as_deref(),
            Some("exited 3")
        );
    }

    #[test]
    fn ready_status_and_data_parse() {
        let ready = parse_ready("ready murmur-0000abcd img-1234").expect("ready");
        assert_eq!(ready.vm.0, "murmur-0000abcd");
        assert_eq!(ready.image, "img-1234");
        assert!(parse_ready("ready murmur-0000abcd").is_none());
        assert!(parse_ready("ping 1").is_none());
        assert_eq!(parse_status("running"), Some(CommandStatus::Running));
        assert_eq!(parse_status("exited 143"), Some(CommandStatus::Exited(143)));
        assert_eq!(parse_status("unknown"), Some(CommandStatus::Unknown));
        assert_eq!(parse_status("exited x"), None);
        assert_eq!(decode_data("data aGkK").as_deref(), Ok(&b"hi\n"[..]));
        assert_eq!(decode_data("data ").as_deref(), Ok(&b""[..]));
        assert!(decode_data("data !!").is_err());
        assert!(decode_data("ok").is_err());
    }

    #[test]
    fn command_scripts_quote_everything() {
        let spec = CommandSpec {
            run: "r1".into(),
            argv: vec!["echo 'it''s' $MURMUR_AGENT".into()],
            env: vec![("MURMUR_AGENT".into(), "a'b".into())],
        };
        let script = command_script(&spec, "/root").expect("script");
        assert_eq!(
            script,
            "export MURMUR_AGENT='a'\\''b'\ncd '/root'\nexec /bin/sh -c 'echo '\\''it'\\'''\\''s'\\'' $MURMUR_AGENT'\n"
        );
        let multi = CommandSpec {
            run: "r2".into(),
            argv: vec!["printf".into(), "%s\n".into(), "x y".into()],
            env: vec![],
        };
        assert!(
            command_script(&multi, "/")
                .expect("script")
                .ends_with("exec 'printf' '%s\n' 'x y'\n")
        );
        let bad = CommandSpec {
            run: "r3".into(),
            argv: vec!["true".into()],
            env: vec![("A B".into(), "x".into())],
        };
        assert!(command_script(&bad, "/").is_err());
        let empty = CommandSpec {
            run: "r4".into(),
            argv: vec![],
            env: vec![],
        };
        assert!(command_script(&empty, "/").is_err());
    }

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
        let args: Vec<String> = qemu_args(Path::new("/s/vm"), Path::new("/s/img"), &meta)
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
