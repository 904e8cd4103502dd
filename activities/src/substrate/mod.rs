//! Substrates: where VMs really live. No Temporal in here.
//!
//! Every substrate (the embedded `process` one, `qemu`, later cloud providers) implements
//! [`Provider`]: create from an image, wait for the readiness handshake, delete, and list
//! what exists for a tenant so orphans can be found. Create and delete are idempotent by VM
//! id, because Temporal may run an activity more than once; but nothing in this module knows
//! about Temporal: the activities (the rest of the crate) call a [`Provider`], never the
//! other way round (`activities/tests/layering.rs` checks it).
//!
//! # Layout
//!
//! - this file: the [`Provider`] trait and the types it speaks ([`SubstrateError`],
//!   [`VmInfo`], [`Ready`], [`CommandSpec`], [`CommandStatus`], [`Seal`]);
//! - [`vm_dir`]: what every local substrate keeps in a VM's directory and how (the owner
//!   record, listing, removal of read-only trees, path and run-id checks);
//! - [`process`]: the embedded `process` substrate (local sandboxes), and [`sandbox`], the
//!   supervisor that runs inside each of them, and [`local_exec`], its exec sessions (local
//!   process groups, with a pseudo-terminal for a shell);
//! - [`qemu`]: the `qemu` substrate (real Linux guests and their guest agent);
//! - [`faults`]: a fault-injecting wrapper around any provider, for chaos tests;
//! - [`session`]: the guest channel's types (output read from any offset, exec sessions
//!   with their own stdin, stdout, stderr and terminal) and the kept logs of ended runs.
//!
//! `process` and `qemu` do not import each other: what they share is in [`vm_dir`].

pub mod faults;
pub mod local_exec;
pub mod process;
pub mod qemu;
pub mod sandbox;
pub mod session;
pub mod vm_dir;

use std::time::Duration;

use async_trait::async_trait;
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::VmId;
use serde::{Deserialize, Serialize};
use session::{ExecSession, ExecSpec, OutputChunk};

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
    /// The VM is asleep: wake it first (`murmur wake <slug>`).
    #[error("VM {0} is asleep: wake it first")]
    Asleep(VmId),
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
    /// True when its supervisor (or guest) is running, or it is asleep with its state kept.
    pub alive: bool,
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

    /// Reads a run's combined output from byte `offset`, at most `max` bytes (capped at
    /// [`session::MAX_READ`]). Works while the run goes on (a follower polls), after it
    /// exited, and after its VM was deleted for as long as the host keeps the output
    /// ([`session::KeptLogs`]); `Err(VmGone)` when nothing of it is left.
    async fn read_output(
        &self,
        _tenant: &str,
        vm: &VmId,
        _run: &str,
        _offset: u64,
        _max: usize,
    ) -> Result<OutputChunk, SubstrateError> {
        Err(SubstrateError::VmGone(vm.clone()))
    }

    /// Deletes every output this host keeps of `tenant`'s ended runs (a nuke leaves nothing
    /// of the tenant behind). Substrates that keep none do nothing.
    fn forget_kept_output(&self, _tenant: &str) {}

    /// Starts a command next to the agent in a running VM (see [`session::ExecSession`]).
    /// Substrates without a guest channel refuse.
    async fn exec(
        &self,
        _tenant: &str,
        _vm: &VmId,
        _spec: &ExecSpec,
    ) -> Result<ExecSession, SubstrateError> {
        Err(SubstrateError::Invalid {
            what: "operation on this substrate",
            value: "exec".into(),
        })
    }

    /// Puts the VM to sleep: nothing in it runs until [`Provider::wake`], and everything in
    /// it (processes, memory, files) is kept. What is released depends on the substrate (see
    /// its docs). Idempotent, and safe to retry after a crash half way: a VM asleep already
    /// succeeds. `Err(VmGone)` when the VM does not exist.
    async fn sleep(&self, _tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        Err(SubstrateError::Invalid {
            what: "operation on this substrate",
            value: format!("sleep {vm}"),
        })
    }

    /// Wakes a VM put to sleep, with everything it held as it was. Idempotent: waking an
    /// awake VM succeeds, and a retry after a crash half way finishes the wake.
    async fn wake(&self, _tenant: &str, vm: &VmId) -> Result<(), SubstrateError> {
        Err(SubstrateError::Invalid {
            what: "operation on this substrate",
            value: format!("wake {vm}"),
        })
    }

    /// True when a VM put to sleep holds no host memory (its state is saved to disk and
    /// nothing of it runs), so it need not count against the tenant's `max_vms` while it
    /// sleeps; false when sleeping keeps its memory.
    fn sleep_frees_memory(&self) -> bool {
        false
    }

    /// True while the VM is asleep, or going to sleep or waking up (from the VM's record on
    /// this host: cheap, no call into the guest). A command in a sleeping VM has not exited.
    fn is_asleep(&self, _tenant: &str, _vm: &VmId) -> bool {
        false
    }

    /// Stops a run (its whole process group): SIGTERM, then SIGKILL after a grace period.
    async fn cancel_command(
        &self,
        tenant: &str,
        vm: &VmId,
        run: &str,
    ) -> Result<(), SubstrateError>;
}
