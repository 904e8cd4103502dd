//! The substrate interface: where VMs really live.
//!
//! Every substrate (the embedded `process` one, `qemu`, later cloud providers) implements
//! [`Provider`]: create from an image, wait for the readiness handshake, delete, and list
//! what exists for a tenant so orphans can be found. Create and delete are idempotent by VM
//! id, because Temporal may run an activity more than once.

use std::time::Duration;

use async_trait::async_trait;
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
    /// True when its supervisor (or guest) is running.
    pub alive: bool,
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
        let labels: Labels = std::fs::read(dir.join(meta_file))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        out.push(VmInfo {
            id: VmId(name),
            tenant: tenant.to_string(),
            workspace: labels.workspace,
            image: labels.image,
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
