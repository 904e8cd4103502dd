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

/// Proof of a finished readiness handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The VM that answered.
    pub vm: VmId,
    /// The image it says it runs.
    pub image: String,
}

/// A place where VMs live.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Short name (`process`, `qemu`).
    fn name(&self) -> &'static str;

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
}
