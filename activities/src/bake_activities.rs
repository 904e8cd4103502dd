//! The bake workflow's activities over a [`Provider`]: is an image cached, run the
//! provisioning script in the scratch VM, snapshot the scratch VM into the new image.

// `#[activities]` generates an undocumented marker constant per activity; the activities
// themselves are documented below.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use murmur_workflows::bake::{BAKE_FAILED, ProvisionInput, ProvisionReport, SnapshotInput};
use temporalio_common::ActivityError;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::heartbeat::with_heartbeats;
use crate::substrate::{CommandSpec, CommandStatus, Provider, SubstrateError};

/// Run id of a bake's provisioning script inside its scratch VM (one bake per VM, so a retry
/// after a worker crash attaches to the same run).
pub const PROVISION_RUN: &str = "bake-provision";
/// Output kept from a provisioning script.
const OUTPUT_TAIL_BYTES: usize = 4096;

/// Activities that bake images on one substrate.
pub struct BakeActivities {
    provider: Arc<dyn Provider>,
}

impl BakeActivities {
    /// Activities over `provider`.
    pub fn new(provider: Arc<dyn Provider>) -> Self {
        Self { provider }
    }
}

fn failure(e: SubstrateError) -> ActivityError {
    if e.is_permanent() {
        ActivityError::application(
            ApplicationFailure::builder(e)
                .type_name(BAKE_FAILED.to_string())
                .non_retryable(true)
                .build(),
        )
    } else {
        ActivityError::application(ApplicationFailure::new(e))
    }
}

#[activities]
impl BakeActivities {
    /// True when the substrate holds the image.
    #[activity(name = "murmur.image_exists")]
    pub async fn image_exists(
        self: Arc<Self>,
        ctx: ActivityContext,
        image: String,
    ) -> Result<bool, ActivityError> {
        with_heartbeats(&ctx, async { self.provider.has_image(&image) }).await
    }

    /// Runs the provisioning script as root in the scratch VM, at most `timeout_secs`; on
    /// timeout the script is cancelled and the report says so.
    #[activity(name = "murmur.provision_vm")]
    pub async fn provision_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: ProvisionInput,
    ) -> Result<ProvisionReport, ActivityError> {
        let provider = self.provider.clone();
        // On qemu the image root is `/`; the process substrate starts commands in the
        // sandbox root already.
        let script = if provider.name() == "qemu" {
            format!("cd / || exit 1\n{}", input.script)
        } else {
            input.script.clone()
        };
        let spec = CommandSpec {
            run: PROVISION_RUN.to_string(),
            argv: vec![script],
            env: vec![("MURMUR_BAKE".into(), "1".into())],
        };
        let (tenant, vm) = (input.tenant.as_str(), &input.vm);
        let work = async {
            provider.start_command(tenant, vm, &spec).await?;
            tracing::info!(tenant, vm = %vm, timeout_secs = input.timeout_secs, "bake: provisioning started");
            let deadline = Instant::now() + Duration::from_secs(input.timeout_secs);
            let (exit_code, timed_out) = loop {
                match provider.command_status(tenant, vm, PROVISION_RUN).await? {
                    CommandStatus::Exited(code) => break (code, false),
                    CommandStatus::Unknown => {
                        return Err(SubstrateError::Guest {
                            vm: vm.clone(),
                            reason: "the provisioning run vanished".into(),
                        });
                    }
                    CommandStatus::Running if Instant::now() >= deadline => {
                        provider.cancel_command(tenant, vm, PROVISION_RUN).await?;
                        break (124, true);
                    }
                    CommandStatus::Running => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            let output_tail = provider
                .command_output_tail(tenant, vm, PROVISION_RUN, OUTPUT_TAIL_BYTES)
                .await
                .unwrap_or_default();
            Ok(ProvisionReport {
                exit_code,
                timed_out,
                output_tail,
            })
        };
        let report = with_heartbeats(&ctx, work).await?.map_err(failure)?;
        tracing::info!(tenant, vm = %vm, exit_code = report.exit_code, timed_out = report.timed_out,
            "bake: provisioning ended");
        Ok(report)
    }

    /// Captures the scratch VM as the new image and registers it (replacing an older image
    /// of that id on a forced re-bake).
    #[activity(name = "murmur.snapshot_vm")]
    pub async fn snapshot_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: SnapshotInput,
    ) -> Result<(), ActivityError> {
        let work = self
            .provider
            .snapshot(&input.tenant, &input.vm, &input.base, &input.image);
        with_heartbeats(&ctx, work).await?.map_err(failure)?;
        tracing::info!(tenant = %input.tenant, vm = %input.vm, image = %input.image,
            base = %input.base, substrate = self.provider.name(), "bake: image registered");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use murmur_workflows::bake::{ImageExists, ProvisionVm, SnapshotVm};
    use temporalio_common::ActivityDefinition;

    use super::BakeActivities;

    #[test]
    fn activity_names_match_the_workflow_markers() {
        assert_eq!(BakeActivities::image_exists.name(), ImageExists.name());
        assert_eq!(BakeActivities::provision_vm.name(), ProvisionVm.name());
        assert_eq!(BakeActivities::snapshot_vm.name(), SnapshotVm.name());
    }
}
