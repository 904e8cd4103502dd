//! The activity interfaces the workflows call, as typed markers.
//!
//! The workflows crate must not depend on the activities crate, so the markers live here and
//! the activities crate implements them under the same names (a test there checks the names
//! match). Inputs and outputs are plain serde types.

use serde::{Deserialize, Serialize};
use temporalio_common::ActivityDefinition;

use crate::machine::BootSpec;
use crate::model::VmId;

/// Activity type name of [`BootVm`].
pub const BOOT_VM: &str = "murmur.boot_vm";
/// Activity type name of [`DeleteVm`].
pub const DELETE_VM: &str = "murmur.delete_vm";

/// Creates a VM and waits for its readiness handshake (idempotent by VM id).
pub struct BootVm;

/// Result of a successful boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// The VM that became ready.
    pub vm: VmId,
    /// Milliseconds from create to ready, as measured by the substrate.
    pub boot_ms: u64,
}

impl ActivityDefinition for BootVm {
    type Input = BootSpec;
    type Output = BootReport;
    fn name(&self) -> &str {
        BOOT_VM
    }
}

/// Deletes a VM (idempotent: deleting a VM that is gone succeeds).
pub struct DeleteVm;

/// Input of [`DeleteVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmInput {
    /// Owning tenant.
    pub tenant: String,
    /// The VM.
    pub vm: VmId,
}

impl ActivityDefinition for DeleteVm {
    type Input = DeleteVmInput;
    type Output = ();
    fn name(&self) -> &str {
        DELETE_VM
    }
}
