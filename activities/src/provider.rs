//! The substrate interface: where VMs really live.
//!
//! Every substrate (the embedded `process` one, `qemu`, later cloud providers) implements
//! [`Provider`]: create from an image, wait for the readiness handshake, delete, and list
//! what exists for a tenant so orphans can be found. Create and delete are idempotent by VM
//! id, because Temporal may run an activity more than once.

use std::time::Duration;

use async_trait::async_trait;
use murmur_workflows::activity_api::DELETING_OWNER;
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::VmId;
use serde::{Deserialize, Serialize};

/// What went wrong in a substrate call.
#[derive(Debug, thiserror::Error)]
pub enum SubstrateError {
    /// The image does not exist on this substrate.
    #[error("image {0:?} not found")]
    ImageNotFound(String),
    /// The VM did not answer the readiness handshake in time.
    #[error("VM {vm} did not become ready within {timeout:?}")]
    BootTimeout {
        /// The VM.
        vm: VmId,
        /// The deadline it missed.
        timeout: Duration,
    },
    /// The VM's boot failed (for example its boot script exited non-zero).
    #[error("VM {vm} failed to boot: {reason}")]
    BootFailed {
        /// The VM.
        vm: VmId,
        /// What the substrate reported.
        reason: String,
    },
    /// The VM does not exist any more, or is dead.
    #[error("VM {0} is gone")]
    VmGone(VmId),
    /// The VM refused or failed a request.
    #[error("VM {vm}: {reason}")]
    Guest {
        /// The VM.
        vm: VmId,
        /// What it said.
        reason: String,
    },
    /// A name that cannot be used as given.
    #[error("invalid {what}: {value:?}")]
    Invalid {
        /// What kind of value.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// The VM belongs to another agent (the substrate records one owner per VM).
    #[error("{owner}")]
    Taken {
        /// The VM.
        vm: VmId,
        /// The owner's claim request (`<agent workflow id>@<run id>`).
        owner: String,
    },
    /// A local I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl SubstrateError {
    /// True when retrying the same call cannot help (bad image, boot failure).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// What a substrate knows about one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM.
    pub id: VmId,
    /// Owning tenant.
    pub tenant: String,
    /// Workspace it was created for (empty when its metadata was never written).
    pub workspace: String,
    /// Image it was created from (empty when unknown).
    pub image: String,
    /// Pool generation it was booted in (0 when unknown).
    #[serde(default)]
    pub generation: u64,
    /// The agent that started on it (its claim request), from the VM's owner file.
    #[serde(default)]
    pub owner: Option<String>,
    /// True when its metadata file could be read (an orphan whose record is missing or
    /// corrupt lists with empty labels and `false`).
    #[serde(default)]
    pub labelled: bool,
    /// True when its supervisor (or guest) is running.
    pub alive: bool,
}

/// File in a VM's directory naming the agent that owns it: its claim request
/// (`<agent workflow id>@<run id>`), written once, first come first served.
pub const OWNER_FILE: &str = "owner";

/// Records `owner` as the owner of the VM whose directory is `dir`, unless another owner is
/// recorded already (then [`SubstrateError::Taken`]). Atomic: the owner file appears whole,
/// through a hard link that fails when it exists, so two agents racing for one VM cannot
/// both win.
pub(crate) fn claim_owner(
    dir: &std::path::Path,
    vm: &VmId,
    owner: &str,
) -> Result<(), SubstrateError> {
    if !dir.is_dir() {
        return Err(SubstrateError::VmGone(vm.clone()));
    }
    let path = dir.join(OWNER_FILE);
    if let Some(existing) = read_owner(dir) {
        return if existing == owner {
            Ok(())
        } else {
            Err(SubstrateError::Taken {
                vm: vm.clone(),
                owner: existing,
            })
        };
    }
    let tmp = dir.join(format!(".owner.{}", std::process::id()));
    std::fs::write(&tmp, owner).map_err(|e| SubstrateError::io("write the owner file", e))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_owner(dir) {
            Some(existing) if existing == owner => Ok(()),
            Some(existing) => Err(SubstrateError::Taken {
                vm: vm.clone(),
                owner: existing,
            }),
            None => Err(SubstrateError::io("read the owner file", e)),
        },
        Err(e) => Err(SubstrateError::io("record the VM's owner", e)),
    }
}

/// Whether a VM may be deleted: sealed (no agent can start on it any more), or owned by
/// another agent than the one the asker expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seal {
    /// Nobody else owns it; its owner record now says it is being deleted.
    Sealed,
    /// Another agent (this claim request) owns it: leave it alone.
    OwnedBy(String),
}

/// Seals the VM in `dir` for deletion: records [`DELETING_OWNER`] as its owner unless an
/// agent owns it. A VM owned by `expected` (the agent being released) or already sealed may
/// go; one owned by anyone else may not.
pub(crate) fn seal_for_delete(
    dir: &std::path::Path,
    vm: &VmId,
    expected: Option<&str>,
) -> Result<Seal, SubstrateError> {
    match claim_owner(dir, vm, DELETING_OWNER) {
        Ok(()) | Err(SubstrateError::VmGone(_)) => Ok(Seal::Sealed),
        Err(SubstrateError::Taken { owner, .. })
            if owner == DELETING_OWNER || Some(owner.as_str()) == expected =>
        {
            Ok(Seal::Sealed)
        }
        Err(SubstrateError::Taken { owner, .. }) => Ok(Seal::OwnedBy(owner)),
        Err(e) => Err(e),
    }
}

/// The owner recorded in a VM's directory, if any.
pub(crate) fn read_owner(dir: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(dir.join(OWNER_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Removes a VM's directory tree, also when what ran in the VM left parts of it read-only
/// (Go's module cache does): write permission is restored on every directory, then the tree
/// is removed again. A tree that is already gone is fine.
pub(crate) fn remove_tree(dir: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            make_writable(dir);
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
        Err(e) => Err(e),
    }
}

/// [`remove_tree`] off the async runtime, as a substrate error.
pub(crate) async fn remove_vm_dir(dir: &std::path::Path) -> Result<(), SubstrateError> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || remove_tree(&d))
        .await
        .map_err(|e| SubstrateError::io("remove VM dir", std::io::Error::other(e)))?
        .map_err(|e| SubstrateError::io(format!("remove {}", dir.display()), e))
}

/// Gives the owner read, write and search permission on every directory under `dir` (not
/// following symlinks), so its entries can be removed.
fn make_writable(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

/// Every VM a local substrate keeps under `vms_root` (`<tenant>/<vm id>` directories), of
/// every tenant, from the directory names alone: no metadata read, no liveness check.
pub(crate) fn vm_dirs_of_every_tenant(vms_root: &std::path::Path) -> Vec<(String, VmId)> {
    let names = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    names(vms_root)
        .into_iter()
        .filter(|tenant| murmur_workflows::model::is_dns_label(tenant))
        .flat_map(|tenant| {
            names(&vms_root.join(&tenant))
                .into_iter()
                .filter(|vm| VmId::is_valid(vm))
                .map(move |vm| (tenant.clone(), VmId(vm)))
        })
        .collect()
}

/// Lists the VMs a local substrate keeps as directories named by VM id under `tenant_dir`,
/// each with a JSON metadata file `meta_file` naming its workspace and image (missing or
/// unreadable metadata lists the VM anyway, with those fields empty: an orphan is still an
/// orphan). `alive` says whether a VM directory's process runs.
pub(crate) fn list_vm_dirs(
    tenant: &str,
    tenant_dir: &std::path::Path,
    meta_file: &str,
    alive: impl Fn(&std::path::Path) -> bool,
) -> Result<Vec<VmInfo>, SubstrateError> {
    /// The part of a VM's metadata a listing needs (both substrates write more).
    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct Labels {
        workspace: String,
        image: String,
        generation: u64,
    }
    let entries = match std::fs::read_dir(tenant_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(SubstrateError::io(
                format!("list {}", tenant_dir.display()),
                e,
            ));
        }
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !VmId::is_valid(&name) {
            continue;
        }
        let dir = entry.path();
        let labels: Option<Labels> = std::fs::read(dir.join(meta_file))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let labelled = labels.is_some();
        let labels = labels.unwrap_or_default();
        out.push(VmInfo {
            id: VmId(name),
            tenant: tenant.to_string(),
            workspace: labels.workspace,
            image: labels.image,
            generation: labels.generation,
            owner: read_owner(&dir),
            labelled,
            alive: alive(&dir),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Proof of a finished readiness handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The VM that answered.
    pub vm: VmId,
    /// The image it says it runs.
    pub image: String,
}

/// A command to run inside a VM (an agent's task).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    /// Unique id of this run; starting the same run twice attaches to the first.
    pub run: String,
    /// The command: one word runs through `/bin/sh -c`, several are executed as they are.
    pub argv: Vec<String>,
    /// Extra environment (`MURMUR_AGENT`), on top of the VM's own.
    pub env: Vec<(String, String)>,
}

impl VmInfo {
    /// What a reaper listing reports about this VM.
    pub fn scanned(self) -> murmur_workflows::machine::ScannedVm {
        murmur_workflows::machine::ScannedVm {
            labels: self
                .labelled
                .then_some(murmur_workflows::machine::VmLabels {
                    workspace: self.workspace,
                    image: self.image,
                    generation: self.generation,
                    owner: self.owner,
                    owner_running: false,
                }),
            id: self.id,
            alive: self.alive,
        }
    }
}

/// Where a command run stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandStatus {
    /// Still running.
    Running,
    /// Exited with this code (128 + n when killed by signal n).
    Exited(i32),
    /// The VM knows no such run.
    Unknown,
}

/// A place where VMs live.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name (`process`, `qemu`).
    fn name(&self) -> &'static str;

    /// The accelerator VMs run with, where that means something (`kvm`, `tcg` on qemu).
    fn accelerator(&self) -> Option<String> {
        None
    }

    /// True when the image exists on this substrate (bake uses it to answer "already cached").
    fn has_image(&self, _image: &str) -> bool {
        false
    }

    /// Every VM on this substrate, of every tenant, as (tenant, VM) — what host admission
    /// counts. Cheap: no liveness check.
    fn host_vms(&self) -> Vec<(String, VmId)> {
        Vec::new()
    }

    /// Captures the filesystem of a VM booted from `base` (and provisioned since) as the new
    /// immutable image `image`, replacing an older image of that id. Substrates that cannot
    /// snapshot refuse.
    async fn snapshot(
        &self,
        _tenant: &str,
        _vm: &VmId,
        _base: &str,
        _image: &str,
    ) -> Result<(), SubstrateError> {
        Err(SubstrateError::Invalid {
            what: "operation on this substrate",
            value: "snapshot".into(),
        })
    }

    /// Records `owner` (an agent's claim request) as the VM's owner before the agent's
    /// command starts; refuses with [`SubstrateError::Taken`] when another agent owns it.
    fn claim_owner(&self, tenant: &str, vm: &VmId, owner: &str) -> Result<(), SubstrateError>;

    /// Seals the VM for deletion unless an agent other than `expected` owns it (see
    /// [`Seal`]).
    fn seal_for_delete(
        &self,
        tenant: &str,
        vm: &VmId,
        expected: Option<&str>,
    ) -> Result<Seal, SubstrateError>;

    /// Creates the VM described by `spec` and starts it. Creating a VM that already exists
    /// and is alive succeeds without doing anything; a dead leftover is replaced.
    async fn create(&self, spec: &BootSpec) -> Result<(), SubstrateError>;

    /// Waits until the VM answers its readiness handshake, at most `timeout`.
    async fn wait_ready(
        &self,
        tenant: &str,
        vm: &VmId,
        timeout: Duration,
    ) -> Result<Ready, SubstrateError>;

    /// Stops the VM and removes everything it left. Deleting a VM that does not exist succeeds.
    async fn delete(&self, tenant: &str, vm: &VmId) -> Result<(), SubstrateError>;

    /// Every VM of `tenant` this substrate holds, alive or not.
    async fn list(&self, tenant: &str) -> Result<Vec<VmInfo>, SubstrateError>;

    /// Starts a command in the VM (idempotent by `spec.run`). The command runs on when the
    /// worker dies; only deleting the VM or [`Provider::cancel_command`] stops it.
    async fn start_command(
        &self,
        tenant: &str,
        vm: &VmId,
        spec: &CommandSpec,
    ) -> Result<(), SubstrateError>;

    /// Where a run stands. `Err(VmGone)` when the VM itself is gone or dead.
    async fn command_status(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<CommandStatus, SubstrateError>;

    /// The last lines of a run's combined output (at most `max_bytes`).
    async fn command_output_tail(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
        max_bytes: usize,
    ) -> Result<String, SubstrateError>;

    /// Stops a run (its whole process group): SIGTERM, then SIGKILL after a grace period.
    async fn cancel_command(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<(), SubstrateError>;
}
