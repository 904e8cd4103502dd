//! The VM activities the pool workflow calls, implemented over a [`Provider`].

// `#[activities]` generates an undocumented marker constant per activity; the activities
// themselves are documented below.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use murmur_workflows::activity_api::{
    BootReport, DELETE_ATTEMPTS, DeleteReply, DeleteVmInput, DeleteVmResult, DeleteVmsInput,
    DeleteVmsReply, HOST_FULL,
};
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::VmId;
use murmur_workflows::pool_workflow::BOOT_TIMEOUT;
use temporalio_common::ActivityError;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::heartbeat::with_heartbeats;
use crate::meters::RefusedBoots;
use crate::substrate::{Provider, Seal, SubstrateError};

/// Failure type name of a boot that cannot succeed by retrying (the workflow's retry policy
/// lists it as non-retryable).
pub const BOOT_FAILED: &str = "BootFailed";
/// VMs a [`VmActivities::delete_vms`] deletes at the same time.
pub const DELETES_AT_ONCE: usize = 16;

/// Activities that create and delete VMs on one substrate.
pub struct VmActivities {
    provider: Arc<dyn Provider>,
    boot_timeout: Duration,
    /// Most VMs this host runs, every tenant's counted (`None`: no host admission).
    host_max_vms: Option<u32>,
    /// Admission check and create happen one boot at a time, so two boots cannot both take
    /// the last slot.
    admission: tokio::sync::Mutex<()>,
    /// Counts the boots refused because the host was full.
    refused: Option<RefusedBoots>,
}

impl VmActivities {
    /// Activities over `provider`; a VM that does not answer its readiness handshake within
    /// `boot_timeout` (at most [`BOOT_TIMEOUT`]) counts as a failed boot.
    pub fn new(provider: Arc<dyn Provider>, boot_timeout: Duration) -> Self {
        Self {
            provider,
            boot_timeout: boot_timeout.min(BOOT_TIMEOUT),
            host_max_vms: None,
            admission: tokio::sync::Mutex::new(()),
            refused: None,
        }
    }

    /// Refuses a boot (`HostFull`, not retried) once the substrate holds `max_vms` VMs of
    /// every tenant together: pools count only their own VMs when they place, so two tenants'
    /// pools sharing hosts could otherwise overcommit one. Each refusal is counted in
    /// `refused`.
    pub fn with_host_capacity(mut self, max_vms: u32, refused: RefusedBoots) -> Self {
        self.host_max_vms = Some(max_vms);
        self.refused = Some(refused);
        self
    }

    /// Creates the VM unless the host is full. A VM that exists already (a retried boot)
    /// is not counted against it.
    async fn admit_and_create(&self, spec: &BootSpec) -> Result<(), ActivityError> {
        let _one_at_a_time = self.admission.lock().await;
        if let Some(max) = self.host_max_vms {
            let on_host = self.provider.host_vms();
            let total = on_host.len();
            let retried = on_host
                .iter()
                .any(|(tenant, vm)| *tenant == spec.tenant && *vm == spec.vm);
            if !retried && total >= max as usize {
                tracing::warn!(tenant = %spec.tenant, vm = %spec.vm, total, max,
                    "host full: boot refused");
                if let Some(refused) = &self.refused {
                    refused.count();
                }
                return Err(ActivityError::application(
                    ApplicationFailure::builder(format!(
                        "host full: {total} of {max} VMs run here"
                    ))
                    .type_name(HOST_FULL.to_string())
                    .non_retryable(true)
                    .build(),
                ));
            }
        }
        self.provider.create(spec).await.map_err(|e| {
            tracing::warn!(tenant = %spec.tenant, vm = %spec.vm, image = %spec.image,
                error = %e, "vm create failed");
            substrate_failure(e)
        })
    }
}

#[activities]
impl VmActivities {
    /// Creates a VM and waits for its readiness handshake. Idempotent by VM id.
    #[activity(name = "murmur.boot_vm")]
    pub async fn boot_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        spec: BootSpec,
    ) -> Result<BootReport, ActivityError> {
        let started = Instant::now();
        tracing::info!(tenant = %spec.tenant, workspace = %spec.workspace, vm = %spec.vm,
            image = %spec.image, attempt = ctx.info().attempt, "vm boot started");
        with_heartbeats(&ctx, self.admit_and_create(&spec)).await??;
        let work = self
            .provider
            .wait_ready(&spec.tenant, &spec.vm, self.boot_timeout);
        let result = with_heartbeats(&ctx, work).await?;
        match result {
            Ok(_) => {
                let boot_ms = started.elapsed().as_millis() as u64;
                let accel = self.provider.accelerator().unwrap_or_default();
                tracing::info!(tenant = %spec.tenant, workspace = %spec.workspace, vm = %spec.vm,
                    image = %spec.image, boot_ms, substrate = self.provider.name(), accel,
                    "vm ready");
                Ok(BootReport {
                    vm: spec.vm,
                    boot_ms,
                    accel,
                })
            }
            Err(e) => {
                tracing::warn!(tenant = %spec.tenant, vm = %spec.vm, image = %spec.image,
                    error = %e, "vm boot failed");
                Err(substrate_failure(e))
            }
        }
    }

    /// Deletes a VM, unless another agent than `input.owner` owns it (then it answers with
    /// that owner and deletes nothing). The VM's owner record is sealed first, so no agent can
    /// start on it while it goes. Deleting a VM that is already gone succeeds.
    #[activity(name = "murmur.delete_vm")]
    pub async fn delete_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: DeleteVmInput,
    ) -> Result<DeleteReply, ActivityError> {
        let work = self.delete_one(&input.tenant, &input.vm, input.owner.as_deref());
        match with_heartbeats(&ctx, work).await? {
            Ok(reply) => Ok(reply),
            Err(e) => Err(ActivityError::application(ApplicationFailure::new(e))),
        }
    }

    /// Deletes several VMs of this host, [`DELETES_AT_ONCE`] at a time, each with up to
    /// [`DELETE_ATTEMPTS`] attempts; one result per VM, in the order asked.
    #[activity(name = "murmur.delete_vms")]
    pub async fn delete_vms(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: DeleteVmsInput,
    ) -> Result<DeleteVmsReply, ActivityError> {
        use futures::StreamExt;
        let tenant = input.tenant.as_str();
        let work = futures::stream::iter(input.vms)
            .map(|target| {
                let this = self.clone();
                async move {
                    let mut attempt = 1;
                    loop {
                        match this
                            .delete_one(tenant, &target.vm, target.owner.as_deref())
                            .await
                        {
                            Ok(reply) => {
                                break DeleteVmResult {
                                    vm: target.vm,
                                    owned_by: reply.owned_by,
                                    error: None,
                                };
                            }
                            Err(e) if attempt >= DELETE_ATTEMPTS => {
                                break DeleteVmResult {
                                    vm: target.vm,
                                    owned_by: None,
                                    error: Some(e.to_string()),
                                };
                            }
                            Err(_) => {
                                // As one delete's retry policy would: 0.5 s, then 1 s.
                                let wait = Duration::from_millis(500 << (attempt - 1));
                                tokio::time::sleep(wait).await;
                                attempt += 1;
                            }
                        }
                    }
                }
            })
            .buffered(DELETES_AT_ONCE)
            .collect::<Vec<_>>();
        let results = with_heartbeats(&ctx, work).await?;
        Ok(DeleteVmsReply { results })
    }
}

impl VmActivities {
    /// Deletes a VM, unless another agent than `owner` owns it (then it answers with that
    /// owner and deletes nothing). The VM's owner record is sealed first, so no agent can
    /// start on it while it goes. Deleting a VM that is already gone succeeds.
    async fn delete_one(
        &self,
        tenant: &str,
        vm: &VmId,
        owner: Option<&str>,
    ) -> Result<DeleteReply, SubstrateError> {
        if let Seal::OwnedBy(owner_now) = self.provider.seal_for_delete(tenant, vm, owner)? {
            tracing::warn!(tenant, vm = %vm, owner = %owner_now, expected = ?owner,
                "vm not deleted: another agent owns it");
            return Ok(DeleteReply {
                owned_by: Some(owner_now),
            });
        }
        match self.provider.delete(tenant, vm).await {
            Ok(()) => {
                tracing::info!(tenant, vm = %vm, "vm deleted");
                Ok(DeleteReply::default())
            }
            Err(e) => {
                tracing::warn!(tenant, vm = %vm, error = %e, "vm delete failed");
                Err(e)
            }
        }
    }
}

fn substrate_failure(e: SubstrateError) -> ActivityError {
    if e.is_permanent() {
        ActivityError::application(
            ApplicationFailure::builder(e)
                .type_name(BOOT_FAILED.to_string())
                .non_retryable(true)
                .build(),
        )
    } else {
        ActivityError::application(ApplicationFailure::new(e))
    }
}

#[cfg(test)]
mod tests {
    use murmur_workflows::activity_api::{BootVm, DeleteVm, DeleteVms};
    use temporalio_common::ActivityDefinition;

    use super::VmActivities;

    #[test]
    fn activity_names_match_the_workflow_markers() {
        assert_eq!(VmActivities::boot_vm.name(), BootVm.name());
        assert_eq!(VmActivities::delete_vm.name(), DeleteVm.name());
        assert_eq!(VmActivities::delete_vms.name(), DeleteVms.name());
    }
}
