//! `BakeWorkflow` (`bake/<tenant>/<image-id>`): bakes one content-addressed image.
//!
//! Steps, each an activity whose result is in history: verify the signed request
//! (`image.create`), check the cache (an existing image ends the bake as `cached` unless
//! `force_new`), check the base exists, boot a scratch VM from the base (`murmur.boot_vm`),
//! run the recipe's files and script in it as root with the recipe's timeout
//! (`murmur.provision_vm`), snapshot it into the new immutable image and register it
//! (`murmur.snapshot_vm`), and always delete the scratch VM (`murmur.delete_vm`), also when a
//! step failed. Identical bakes share the workflow id, so a second `murmur bake` of the same
//! recipe joins the first. The `progress` query says where it is and, after a failure, why
//! and what the script printed last.

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

use std::time::Duration;

use sha2::{Digest, Sha256};
use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ApplicationFailure, WorkflowContext, WorkflowContextView, WorkflowResult,
};

use crate::activity_api::{BootVm, DeleteVm, DeleteVmInput, ReadHosts, on_host};
use crate::auth::{VerifyRequest, ops, permissions, unsigned_body};
use crate::bake::{
    BAKE_WORKSPACE, BakeInput, BakeProgress, BakeReport, ImageExists, ProvisionInput, ProvisionVm,
    SnapshotInput, SnapshotVm, bake_workflow_id,
};
use crate::error::ApiError;
use crate::gate;
use crate::machine::BootSpec;
use crate::model::{Environment, VmId};
use crate::shell::{BOOT_TIMEOUT, root_cause};

/// The bake workflow's state.
#[workflow]
pub struct BakeWorkflow {
    input: BakeInput,
    progress: BakeProgress,
}

#[workflow_methods]
impl BakeWorkflow {
    /// Takes the recipe to bake.
    #[init]
    pub fn new(_ctx: &WorkflowContextView, input: BakeInput) -> Self {
        Self {
            input,
            progress: BakeProgress::default(),
        }
    }

    /// Verify, check the cache, boot, provision, snapshot, delete.
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<BakeReport> {
        let c = ctx.clone();
        match bake(&c).await {
            Ok(report) => {
                c.state_mut(|s| s.progress.done = true);
                step(&c, "done");
                Ok(report)
            }
            Err(e) => {
                c.state_mut(|s| s.progress.error = Some(e.to_string()));
                step(&c, "failed");
                // The failure carries the progress (the reason and the script's output), so
                // the caller has it with the result, not from a query after the run ended.
                let progress = c.state(|s| s.progress.clone());
                Err(ApplicationFailure::builder(e.to_string())
                    .details(progress)
                    .build()
                    .into())
            }
        }
    }

    /// Where the bake is.
    #[query]
    pub fn progress(&self, _ctx: &WorkflowContextView) -> BakeProgress {
        self.progress.clone()
    }
}

fn step(c: &WorkflowContext<BakeWorkflow>, what: &str) {
    c.state_mut(|s| s.progress.step = what.to_string());
}

fn options(summary: &str, timeout: Duration) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(timeout)
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_interval(Duration::from_secs(10))
                .maximum_attempts(3)
                .non_retryable_error_types([crate::bake::BAKE_FAILED])
                .build(),
        )
        .summary(summary.to_string())
        .build()
}

async fn bake(c: &WorkflowContext<BakeWorkflow>) -> Result<BakeReport, ApiError> {
    let input = c.state(|s| s.input.clone());
    input.validate()?;
    let expected = bake_workflow_id(&input.tenant, &input.image);
    if c.info().workflow_id() != expected {
        return Err(ApiError::invalid_argument(format!(
            "a bake of {} must run as {expected}",
            input.image
        )));
    }
    step(c, "checking the request");
    let req = VerifyRequest::developer(
        &input.tenant,
        ops::BAKE,
        expected,
        unsigned_body(&input),
        permissions::IMAGE_CREATE,
        input.auth.clone(),
    );
    gate::verify(c, req).await.map_err(|r| {
        if !c.is_replaying() {
            tracing::warn!(who = %r.who, error = %r.error, "bake denied");
        }
        r.error
    })?;

    // Every step runs on one host: the scratch VM lives there, and so does the image.
    let host = bake_host(c).await?;
    let options = |what: &str, timeout: Duration| {
        on_host(
            options(what, timeout),
            c.task_queue(),
            host.as_deref(),
            BAKE_STEP_START_WITHIN,
        )
    };
    step(c, "checking the image cache");
    let short = |what: &str| options(what, Duration::from_secs(60));
    let unavailable = |e: temporalio_sdk::ActivityExecutionError| {
        ApiError::new(crate::error::Code::Unavailable, root_cause(&e))
    };
    let exists = c
        .execute_activity(
            ImageExists,
            input.image.clone(),
            short("check the image cache"),
        )
        .await
        .map_err(unavailable)?;
    if exists && !input.force_new {
        c.state_mut(|s| s.progress.cached = Some(true));
        return Ok(BakeReport {
            image: input.image,
            cached: true,
        });
    }
    c.state_mut(|s| s.progress.cached = Some(false));
    let base_exists = c
        .execute_activity(
            ImageExists,
            input.recipe.base.clone(),
            short("check the base image"),
        )
        .await
        .map_err(unavailable)?;
    if !base_exists {
        return Err(ApiError::not_found(format!(
            "base image {} does not exist on this worker's substrate",
            input.recipe.base
        )));
    }

    // The scratch VM's id comes from this run's id: the same on replay, new per run.
    let vm = scratch_vm_id(c.info().run_id());
    c.state_mut(|s| s.progress.vm = Some(vm.clone()));
    let result = provision_and_snapshot(c, &input, &vm, host.as_deref()).await;

    step(c, "deleting the scratch VM");
    let delete = DeleteVmInput {
        tenant: input.tenant.clone(),
        vm: vm.clone(),
        owner: None,
    };
    let delete_options = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(120))
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_interval(Duration::from_secs(30))
                .build(),
        )
        .summary(format!("delete scratch VM {vm}"))
        .build();
    let delete_options = on_host(
        delete_options,
        c.task_queue(),
        host.as_deref(),
        BAKE_STEP_START_WITHIN,
    );
    let deleted = c.execute_activity(DeleteVm, delete, delete_options).await;
    let report = result?;
    deleted.map_err(unavailable)?;
    Ok(report)
}

/// The scratch VM of the bake run `run_id` (the reaper leaves it alone while that run lives).
pub fn scratch_vm_id(run_id: &str) -> VmId {
    let digest = Sha256::digest(run_id.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    VmId(format!("murmur-{hex}"))
}

/// How long a bake step may wait for its host to pick it up.
const BAKE_STEP_START_WITHIN: Duration = Duration::from_secs(60);

/// Patch marker: bakes run on one registered host (runs from before host placement used the
/// shared queue for every step).
const PATCH_BAKE_ON_ONE_HOST: &str = "bake-on-one-host";

/// The host this bake runs on: the live, non-draining host with the lowest id (`None` in
/// histories from before host placement).
async fn bake_host(c: &WorkflowContext<BakeWorkflow>) -> Result<Option<String>, ApiError> {
    if !c.patched(PATCH_BAKE_ON_ONE_HOST) {
        return Ok(None);
    }
    let view = c
        .execute_activity(
            ReadHosts,
            (),
            options("read the host registry", Duration::from_secs(30)),
        )
        .await
        .map_err(|e| ApiError::new(crate::error::Code::Unavailable, root_cause(&e)))?;
    let host = view
        .hosts
        .values()
        .find(|h| h.placeable())
        .map(|h| h.host.clone())
        .ok_or_else(|| {
            ApiError::new(
                crate::error::Code::Unavailable,
                "no live host to bake on; start a murmur-worker (murmur host ls lists hosts)",
            )
        })?;
    c.state_mut(|s| s.progress.host = Some(host.clone()));
    Ok(Some(host))
}

async fn provision_and_snapshot(
    c: &WorkflowContext<BakeWorkflow>,
    input: &BakeInput,
    vm: &VmId,
    host: Option<&str>,
) -> Result<BakeReport, ApiError> {
    let options = |what: &str, timeout: Duration| {
        on_host(
            options(what, timeout),
            c.task_queue(),
            host,
            BAKE_STEP_START_WITHIN,
        )
    };
    step(c, "booting a scratch VM");
    let spec = BootSpec {
        vm: vm.clone(),
        tenant: input.tenant.clone(),
        workspace: BAKE_WORKSPACE.to_string(),
        image: input.recipe.base.clone(),
        environment: Environment::default(),
        host: host.map(str::to_string),
        generation: 0,
    };
    let boot = options(
        &format!("boot scratch VM {vm} from {}", input.recipe.base),
        BOOT_TIMEOUT + Duration::from_secs(10),
    );
    c.execute_activity(BootVm, spec, boot).await.map_err(|e| {
        ApiError::failed_precondition(format!("scratch VM did not boot: {}", root_cause(&e)))
    })?;

    step(c, "running the provisioning script");
    let timeout_secs = input.recipe.timeout_secs();
    let run = ProvisionInput {
        tenant: input.tenant.clone(),
        vm: vm.clone(),
        script: input.recipe.provisioning_script(),
        timeout_secs,
    };
    let report = c
        .execute_activity(
            ProvisionVm,
            run,
            options(
                "run the provisioning script",
                Duration::from_secs(timeout_secs + 120),
            ),
        )
        .await
        .map_err(|e| {
            ApiError::failed_precondition(format!("provisioning failed: {}", root_cause(&e)))
        })?;
    c.state_mut(|s| s.progress.output_tail = Some(report.output_tail.clone()));
    if report.timed_out {
        return Err(ApiError::failed_precondition(format!(
            "bake of {} failed: the provisioning script did not finish within {timeout_secs} s",
            input.image
        )));
    }
    if report.exit_code != 0 {
        return Err(ApiError::failed_precondition(format!(
            "bake of {} failed: the provisioning script exited with {}",
            input.image, report.exit_code
        )));
    }

    step(c, "snapshotting the image");
    let snap = SnapshotInput {
        tenant: input.tenant.clone(),
        vm: vm.clone(),
        base: input.recipe.base.clone(),
        image: input.image.clone(),
    };
    c.execute_activity(
        SnapshotVm,
        snap,
        options("snapshot the scratch VM", Duration::from_secs(300)),
    )
    .await
    .map_err(|e| ApiError::failed_precondition(format!("snapshot failed: {}", root_cause(&e))))?;
    Ok(BakeReport {
        image: input.image.clone(),
        cached: false,
    })
}
