//! `NukeWorkflow` (`nuke/<tenant>`): the emergency wipe of `murmur pool flush --nuke`.
//!
//! Durable steps, each an activity whose result is in history, so a worker killed at any
//! point resumes where it stopped: (1) pause the pool (no hand-outs, no backfill, nothing
//! booting), (2) list every running agent workflow of the tenant and terminate each,
//! (3) list every VM of the tenant the substrate holds, orphans included, and delete each,
//! a bounded number at a time, (4) reset and resume the pool. The reported total counts
//! each terminated agent once, its VM with it, plus every other VM deleted. A second nuke started while
//! one runs joins it (the CLI starts with the `UseExisting` conflict policy).

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

use std::time::Duration;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ApplicationFailure, WorkflowContext, WorkflowContextView, WorkflowResult,
    WorkflowTermination,
};

use crate::activity_api::{
    DeleteVm, DeleteVmInput, ListAgents, ListVms, PausePool, PoolStepInput, ReadHosts, ResetPool,
    TerminateAgent, TerminateInput, on_host,
};
use crate::auth::{VerifyRequest, ops, unsigned_body};
use crate::error::ApiError;
use crate::gate;
pub use crate::messages::NukeReport;
use crate::messages::NukeStep;
use crate::model::VmId;
use crate::pool_workflow::{HOST_START_WITHIN, pool_workflow_id};

/// Deletes (and terminations) in flight at once.
pub const NUKE_CONCURRENCY: usize = 8;

/// Workflow id of a tenant's nuke.
pub fn nuke_workflow_id(tenant: &str) -> String {
    format!("nuke/{tenant}")
}

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
        let authorized_request = authorize(&c, &tenant)
            .await
            .map_err(|e| WorkflowTermination::from(ApplicationFailure::new(e.to_string())))?;
        let actor = Some(format!("nuke/{tenant}"));

        step(&c, "pausing the pool");
        let pause = PoolStepInput {
            tenant: tenant.clone(),
            step: NukeStep {
                actor: actor.clone(),
                report: NukeReport::default(),
                authorized_request,
                auth: None,
            },
        };
        let paused = c
            .execute_activity(PausePool, pause, admin_options("pause the pool", 120))
            .await?;

        step(&c, "terminating agents");
        let agents = c
            .execute_activity(ListAgents, tenant.clone(), admin_options("list agents", 60))
            .await?;
        c.state_mut(|s| s.progress.agents = agents.len() as u64);
        let agents_listed = agents.clone();
        let reason = format!("nuke of tenant {tenant}");
        let jobs = agents
            .into_iter()
            .map(|workflow_id| {
                let input = TerminateInput {
                    workflow_id,
                    reason: reason.clone(),
                };
                let c = c.clone();
                async move {
                    let _ = c
                        .execute_activity(TerminateAgent, input, admin_options("terminate", 30))
                        .await;
                    c.state_mut(|s| s.progress.terminated += 1);
                    refresh_details(&c);
                }
                .boxed_local()
            })
            .collect();
        run_bounded(jobs).await;

        let held: std::collections::BTreeMap<VmId, String> = paused.held.into_iter().collect();
        let terminated_agents: std::collections::BTreeSet<String> =
            agents_listed.into_iter().collect();

        step(&c, "deleting VMs");
        let vms = list_vms_everywhere(&c, &tenant).await?;
        let agent_vms = vms
            .iter()
            .filter(|(vm, _)| held.get(vm).is_some_and(|a| terminated_agents.contains(a)))
            .count() as u64;
        c.state_mut(|s| s.progress.vms = vms.len() as u64);
        let jobs = vms
            .into_iter()
            .map(|(vm, host)| {
                let input = DeleteVmInput {
                    tenant: tenant.clone(),
                    vm,
                };
                let c = c.clone();
                async move {
                    let summary = format!("delete {}", input.vm);
                    let options =
                        ActivityOptions::with_start_to_close_timeout(Duration::from_secs(30))
                            .heartbeat_timeout(Duration::from_secs(5))
                            .retry_policy(unlimited_retries())
                            .summary(summary)
                            .build();
                    let options =
                        on_host(options, c.task_queue(), host.as_deref(), HOST_START_WITHIN);
                    if c.execute_activity(DeleteVm, input, options).await.is_ok() {
                        c.state_mut(|s| s.progress.deleted += 1);
                    }
                    refresh_details(&c);
                }
                .boxed_local()
            })
            .collect();
        run_bounded(jobs).await;

        step(&c, "resetting the pool");
        let report = c.state(|s| NukeReport {
            terminated: s.progress.terminated,
            deleted: s.progress.deleted,
            agent_vms,
        });
        let reset = PoolStepInput {
            tenant: tenant.clone(),
            step: NukeStep {
                actor,
                report: report.clone(),
                authorized_request: String::new(),
                auth: None,
            },
        };
        c.execute_activity(ResetPool, reset, admin_options("reset the pool", 120))
            .await?;
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

/// Who may nuke: started by the pool (which verified the developer's request), or carrying
/// a developer's signed request with `pool-config.delete`. Returns the request id, which the
/// pool admits once when the nuke pauses it.
async fn authorize(c: &WorkflowContext<NukeWorkflow>, tenant: &str) -> Result<String, ApiError> {
    let input = c.state(|s| s.input.clone());
    let started_by_pool = c
        .info()
        .parent()
        .is_some_and(|p| p.workflow_id() == pool_workflow_id(tenant));
    if started_by_pool {
        return Ok(input.authorized_request.unwrap_or_default());
    }
    let req = VerifyRequest {
        tenant: tenant.to_string(),
        op: ops::NUKE.to_string(),
        target: nuke_workflow_id(tenant),
        body: unsigned_body(&input),
        permission: Some("pool-config.delete".to_string()),
        credential: input.auth.clone(),
    };
    let identity = gate::verify(c, req).await.map_err(|r| {
        if !c.is_replaying() {
            tracing::warn!(tenant, who = %r.who, error = %r.error, "nuke denied");
        }
        r.error
    })?;
    if !c.is_replaying() {
        tracing::warn!(tenant, developer = %identity.developer, "nuke authorized");
    }
    Ok(input.auth.map(|a| a.request_id).unwrap_or_default())
}

/// Patch marker: the nuke lists and deletes VMs on every live host (runs from before host
/// placement asked the one worker behind the shared queue).
const PATCH_NUKE_EVERY_HOST: &str = "nuke-every-host";
/// Reads of the host registry, 2 s apart, before a nuke gives up waiting for it to exist.
const REGISTRY_WAITS: u32 = 30;

/// Every VM of the tenant, with the host it lives on: one listing per live host, each on the
/// host's own queue. A host that does not answer is skipped (its reaper deletes what it holds
/// when it is back) and named in the progress.
async fn list_vms_everywhere(
    c: &WorkflowContext<NukeWorkflow>,
    tenant: &str,
) -> Result<Vec<(VmId, Option<String>)>, temporalio_sdk::ActivityExecutionError> {
    if !c.patched(PATCH_NUKE_EVERY_HOST) {
        let vms = c
            .execute_activity(ListVms, tenant.to_string(), admin_options("list VMs", 60))
            .await?;
        return Ok(vms.into_iter().map(|vm| (vm, None)).collect());
    }
    // Without a registry (version 0) there is no list of hosts: wait for one to start (every
    // worker starts it when it registers) rather than delete nothing.
    let mut view = c
        .execute_activity(ReadHosts, (), admin_options("read the host registry", 60))
        .await?;
    for _ in 0..REGISTRY_WAITS {
        if view.version > 0 {
            break;
        }
        c.timer(Duration::from_secs(2)).await;
        view = c
            .execute_activity(ReadHosts, (), admin_options("read the host registry", 60))
            .await?;
    }
    let listings = futures::future::join_all(view.live().into_iter().map(|host| {
        let options = on_host(
            admin_options(&format!("list VMs on {host}"), 60),
            c.task_queue(),
            Some(&host),
            HOST_START_WITHIN,
        );
        let fut = c.execute_activity(ListVms, tenant.to_string(), options);
        async move { (host, fut.await) }
    }))
    .await;
    let mut vms = Vec::new();
    for (host, listing) in listings {
        match listing {
            Ok(found) => vms.extend(found.into_iter().map(|vm| (vm, Some(host.clone())))),
            Err(_) => c.state_mut(|s| s.progress.unreachable_hosts.push(host)),
        }
    }
    Ok(vms)
}

/// Runs the jobs with at most [`NUKE_CONCURRENCY`] in flight, starting them in order.
async fn run_bounded(jobs: Vec<LocalBoxFuture<'_, ()>>) {
    let mut pending = jobs.into_iter();
    let mut running: Vec<LocalBoxFuture<'_, ()>> = Vec::new();
    loop {
        while running.len() < NUKE_CONCURRENCY {
            match pending.next() {
                Some(job) => running.push(job),
                None => break,
            }
        }
        if running.is_empty() {
            return;
        }
        crate::pool_workflow::next_finished(&mut running).await;
    }
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
            "**nuke/{}**: {}\n- agents terminated: {} of {}\n- VMs deleted: {} of {}\n",
            s.input.tenant, p.step, p.terminated, p.agents, p.deleted, p.vms
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
