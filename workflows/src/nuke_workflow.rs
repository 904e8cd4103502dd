//! `NukeWorkflow` (`nuke/<tenant>`): the emergency wipe of `murmur pool flush --nuke`.
//!
//! Durable steps, each an activity whose result is in history, so a worker killed at any
//! point resumes where it stopped: (1) pause the pool (no hand-outs, no backfill, nothing
//! booting; the pool verifies the request behind the nuke again and admits it once, and a
//! refusal is final), (2) terminate every running agent workflow of the tenant (one
//! activity that lists page by page and terminates a bounded number at a time), (3) on every
//! live host, list the tenant's VMs (into history), then delete every VM of the tenant it
//! holds, orphans included, counting every listed VM that is gone at the end so a worker
//! killed mid-wipe does not make the report undercount, (4) reset and resume the pool. The reported total counts each terminated agent once, its VM with it, plus
//! every other VM deleted. A second nuke started while one runs joins it (the CLI starts
//! with the `UseExisting` conflict policy).

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ApplicationFailure, WorkflowContext, WorkflowContextView, WorkflowResult,
    WorkflowTermination,
};

use crate::activity_api::{
    ListTenantVms, NukePause, NukePauseBeforeRename, NukeReset, NukeResetBeforeRename,
    PoolStepInput, ReadHosts, STEP_REFUSED, TerminateAgents, TerminateAgentsInput, WipeHost,
    WipeListed, WipeListedInput, WipeReport, on_host,
};
use crate::auth::{VerifyRequest, ops, permissions, unsigned_body};
use crate::error::ApiError;
use crate::gate;
pub use crate::messages::NukeReport;
use crate::messages::{NukeStep, SignedNuke};
use crate::shell::{HOST_START_WITHIN, failed_with_type, pool_workflow_id, root_cause};

pub use crate::shell::nuke_workflow_id;

/// Patch marker: the pool steps are scheduled as `murmur.nuke_pause` and `murmur.nuke_reset`
/// (one name per step: the pool's update, the activity and the machine's method), no longer
/// as `murmur.pause_pool` and `murmur.reset_pool`.
const PATCH_NUKE_STEP_NAMES: &str = "nuke-step-names";

/// Input of a nuke.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NukeInput {
    /// Tenant to wipe.
    pub tenant: String,
    /// Who asked.
    pub actor: Option<String>,
    /// The developer's signed request (when started by `murmur pool flush --nuke`).
    pub auth: Option<crate::auth::Credential>,
    /// When started by the pool (which verified the request): that request's id.
    pub authorized_request: Option<String>,
}

/// Where a nuke is, for its query and the Web UI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NukeProgress {
    /// The current step.
    pub step: String,
    /// Agents found / terminated so far.
    pub agents: u64,
    /// Agents terminated so far.
    pub terminated: u64,
    /// VMs found.
    pub vms: u64,
    /// VMs deleted so far.
    pub deleted: u64,
    /// Hosts whose VMs could not be listed (their reapers delete what they hold once back).
    #[serde(default)]
    pub unreachable_hosts: Vec<String>,
}

/// The nuke workflow's state.
#[workflow]
pub struct NukeWorkflow {
    input: NukeInput,
    progress: NukeProgress,
}

#[workflow_methods]
impl NukeWorkflow {
    /// Takes the tenant to wipe.
    #[init]
    pub fn new(_ctx: &WorkflowContextView, input: NukeInput) -> Self {
        Self {
            input,
            progress: NukeProgress::default(),
        }
    }

    /// Pause, terminate agents, delete VMs, reset.
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<NukeReport> {
        let c = ctx.clone();
        let tenant = c.state(|s| s.input.tenant.clone());
        // The tenant ends up in a visibility query: only a DNS label may get there, and a
        // nuke of tenant T must be the one workflow `nuke/T` (so nukes of T join each other).
        let expected = nuke_workflow_id(&tenant);
        if !crate::model::is_dns_label(&tenant) || c.info().workflow_id() != expected {
            return Err(ApplicationFailure::new(ApiError::invalid_argument(format!(
                "a nuke needs a valid tenant and the workflow id nuke/<tenant> (tenant {tenant:?})"
            )))
            .into());
        }
        step(&c, "checking the request");
        let (authorized_request, developer) = authorize(&c, &tenant)
            .await
            .map_err(|e| WorkflowTermination::from(ApplicationFailure::new(e.to_string())))?;
        let actor = Some(format!("nuke/{tenant}"));

        step(&c, "pausing the pool");
        // Nukes scheduled their pool steps as `murmur.pause_pool` / `murmur.reset_pool`
        // before this patch; one such history replays (and a nuke in flight then runs on)
        // with those names. Asked once, for both steps.
        let renamed = c.patched(PATCH_NUKE_STEP_NAMES);
        let pause = PoolStepInput {
            tenant: tenant.clone(),
            step: NukeStep {
                actor: actor.clone(),
                authorized_request,
                developer,
                ..NukeStep::default()
            },
        };
        let pause_options = admin_options("pause the pool", 120);
        let paused = if renamed {
            c.execute_activity(NukePause, pause, pause_options).await
        } else {
            c.execute_activity(NukePauseBeforeRename, pause, pause_options)
                .await
        };
        if let Err(e) = paused {
            // A refusal (a replayed or stale request, another nuke) is final.
            let reason = if failed_with_type(&e, STEP_REFUSED) {
                root_cause(&e)
            } else {
                e.to_string()
            };
            if !c.is_replaying() {
                tracing::warn!(tenant = %tenant, %reason, "nuke refused by the pool");
            }
            return Err(ApplicationFailure::new(reason).into());
        }

        step(&c, "terminating agents");
        let terminate = TerminateAgentsInput {
            tenant: tenant.clone(),
            reason: format!("nuke of tenant {tenant}"),
        };
        let terminated = c
            .execute_activity(
                TerminateAgents,
                terminate,
                admin_options("terminate agents", 3600),
            )
            .await?;
        c.state_mut(|s| {
            s.progress.agents = terminated;
            s.progress.terminated = terminated;
        });

        step(&c, "deleting VMs");
        let wiped = wipe_every_host(&c, &tenant).await?;
        c.state_mut(|s| {
            s.progress.vms = wiped.deleted + wiped.failed;
            s.progress.deleted = wiped.deleted;
        });

        step(&c, "resetting the pool");
        let report = NukeReport {
            terminated,
            deleted: wiped.deleted,
            agent_vms: wiped.agent_vms,
        };
        let reset = PoolStepInput {
            tenant: tenant.clone(),
            step: NukeStep {
                actor,
                report: report.clone(),
                ..NukeStep::default()
            },
        };
        let reset_options = admin_options("reset the pool", 120);
        if renamed {
            c.execute_activity(NukeReset, reset, reset_options).await?;
        } else {
            c.execute_activity(NukeResetBeforeRename, reset, reset_options)
                .await?;
        }
        step(&c, "done");
        if !c.is_replaying() {
            tracing::warn!(tenant = %tenant, terminated = report.terminated,
                deleted = report.deleted, "nuke complete");
        }
        Ok(report)
    }

    /// Where the nuke is.
    #[query]
    pub fn progress(&self, _ctx: &WorkflowContextView) -> NukeProgress {
        self.progress.clone()
    }
}

/// Who may nuke: started by the pool (which verified and admitted the developer's
/// request), or carrying a developer's signed request with `pool-config.delete`. Returns the
/// pool's request id, or the developer's signed request (the pool verifies it again and
/// admits it once when the nuke pauses it).
async fn authorize(
    c: &WorkflowContext<NukeWorkflow>,
    tenant: &str,
) -> Result<(String, Option<SignedNuke>), ApiError> {
    let input = c.state(|s| s.input.clone());
    let started_by_pool = c
        .info()
        .parent()
        .is_some_and(|p| p.workflow_id() == pool_workflow_id(tenant));
    if started_by_pool {
        return Ok((input.authorized_request.unwrap_or_default(), None));
    }
    let body = unsigned_body(&input);
    let req = VerifyRequest::developer(
        tenant,
        ops::NUKE,
        nuke_workflow_id(tenant),
        body.clone(),
        permissions::POOL_DELETE,
        input.auth.clone(),
    );
    let identity = gate::verify(c, req).await.map_err(|r| {
        if !c.is_replaying() {
            tracing::warn!(tenant, who = %r.who, error = %r.error, "nuke denied");
        }
        r.error
    })?;
    if !c.is_replaying() {
        tracing::warn!(tenant, developer = %identity.developer, "nuke authorized");
    }
    Ok((
        String::new(),
        Some(SignedNuke {
            body,
            credential: input.auth,
        }),
    ))
}

/// Reads of the host registry, 2 s apart, before a nuke gives up waiting for it to exist.
const REGISTRY_WAITS: u32 = 30;

/// Nukes before this wiped each host with one activity that counted only what its last
/// attempt deleted: a worker killed during the wipe made the report undercount.
const PATCH_WIPE_COUNTS_LISTED: &str = "wipe-counts-listed";

/// One host's wipe. With `listed`, the VMs are listed first (into history), and the wipe
/// counts every listed VM that is gone at its end, so a retry after a crash reports what the
/// crashed attempt deleted too.
async fn wipe_host(
    c: &WorkflowContext<NukeWorkflow>,
    tenant: &str,
    options: ActivityOptions,
    listed: bool,
) -> Result<WipeReport, temporalio_sdk::ActivityExecutionError> {
    if !listed {
        return c
            .execute_activity(WipeHost, tenant.to_string(), options)
            .await;
    }
    let listed = c
        .execute_activity(ListTenantVms, tenant.to_string(), options.clone())
        .await?;
    let input = WipeListedInput {
        tenant: tenant.to_string(),
        listed,
    };
    c.execute_activity(WipeListed, input, options).await
}

/// Deletes every VM of the tenant on every live host, each host's wipe on its own queue. A
/// host that does not answer is skipped (its reaper deletes what it holds when it is back)
/// and named in the progress.
async fn wipe_every_host(
    c: &WorkflowContext<NukeWorkflow>,
    tenant: &str,
) -> Result<WipeReport, temporalio_sdk::ActivityExecutionError> {
    // Without a registry (version 0) there is no list of hosts: wait for one to start (every
    // worker starts it when it registers) rather than delete nothing.
    let mut view = c
        .execute_activity(ReadHosts, (), admin_options("read the host registry", 60))
        .await?;
    for _ in 0..REGISTRY_WAITS {
        if view.version > 0 {
            break;
        }
        c.timer(std::time::Duration::from_secs(2)).await;
        view = c
            .execute_activity(ReadHosts, (), admin_options("read the host registry", 60))
            .await?;
    }
    let listed_wipe = c.patched(PATCH_WIPE_COUNTS_LISTED);
    let wipes = futures::future::join_all(view.live().into_iter().map(|host| {
        let options = on_host(
            admin_options(&format!("delete every VM on {host}"), 3600),
            c.task_queue(),
            Some(&host),
            HOST_START_WITHIN,
        );
        async move {
            (
                host.clone(),
                wipe_host(c, tenant, options, listed_wipe).await,
            )
        }
    }))
    .await;
    let mut total = WipeReport::default();
    for (host, wiped) in wipes {
        match wiped {
            Ok(w) => {
                total.deleted += w.deleted;
                total.agent_vms += w.agent_vms;
                total.failed += w.failed;
            }
            Err(_) => c.state_mut(|s| s.progress.unreachable_hosts.push(host)),
        }
    }
    Ok(total)
}

fn step(c: &WorkflowContext<NukeWorkflow>, name: &str) {
    c.state_mut(|s| s.progress.step = name.to_string());
    if !c.is_replaying() {
        tracing::warn!(tenant = %c.state(|s| s.input.tenant.clone()), step = name, "nuke");
    }
    refresh_details(c);
}

fn refresh_details(c: &WorkflowContext<NukeWorkflow>) {
    let details = c.state(|s| {
        let p = &s.progress;
        format!(
            "**nuke/{}**: {}\n- agents terminated: {}\n- VMs deleted: {} of {}\n",
            s.input.tenant, p.step, p.terminated, p.deleted, p.vms
        )
    });
    c.set_current_details(details);
}

fn unlimited_retries() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(500))
        .maximum_interval(Duration::from_secs(30))
        .build()
}

/// Options of the nuke's admin activities: they heartbeat, so a worker that dies under one is
/// noticed within seconds and the activity retried elsewhere.
fn admin_options(summary: &str, timeout_secs: u64) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(timeout_secs))
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(unlimited_retries())
        .summary(summary.to_string())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_and_its_vm_count_once() {
        // 5 agents on VMs, 3 warm VMs, 1 orphan: 5 + (9 - 5).
        let report = NukeReport {
            terminated: 5,
            deleted: 9,
            agent_vms: 5,
        };
        assert_eq!(report.total(), 9);
        // Agents still starting hold no VM.
        let report = NukeReport {
            terminated: 2,
            deleted: 0,
            agent_vms: 0,
        };
        assert_eq!(report.total(), 2);
    }
}
