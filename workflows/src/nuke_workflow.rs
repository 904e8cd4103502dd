//! `NukeWorkflow` (`nuke/<tenant>`): the emergency wipe of `murmur pool flush --nuke`.
//!
//! Durable steps, each an activity whose result is in history, so a worker killed at any
//! point resumes where it stopped: (1) pause the pool (no hand-outs, no backfill, nothing
//! booting), (2) list every running agent workflow of the tenant and terminate each,
//! (3) list every VM of the tenant the substrate holds, orphans included, and delete each,
//! a bounded number at a time, (4) reset and resume the pool. A second nuke started while
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
use temporalio_sdk::{ActivityOptions, WorkflowContext, WorkflowContextView, WorkflowResult};

use crate::activity_api::{
    DeleteVm, DeleteVmInput, ListAgents, ListVms, PausePool, PoolStepInput, ResetPool,
    TerminateAgent, TerminateInput,
};
use crate::messages::NukeStep;

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
}

/// Result of a nuke.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NukeReport {
    /// Agent workflows terminated.
    pub terminated: u64,
    /// VMs deleted from the substrate.
    pub deleted: u64,
}

impl NukeReport {
    /// What `Nuke complete (N terminated/deleted)` counts.
    pub fn total(&self) -> u64 {
        self.terminated + self.deleted
    }
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
        let actor = Some(format!("nuke/{tenant}"));

        step(&c, "pausing the pool");
        let pause = PoolStepInput {
            tenant: tenant.clone(),
            step: NukeStep {
                actor: actor.clone(),
                deleted: 0,
            },
        };
        c.execute_activity(PausePool, pause, admin_options("pause the pool", 120))
            .await?;

        step(&c, "terminating agents");
        let agents = c
            .execute_activity(ListAgents, tenant.clone(), admin_options("list agents", 60))
            .await?;
        c.state_mut(|s| s.progress.agents = agents.len() as u64);
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

        step(&c, "deleting VMs");
        let vms = c
            .execute_activity(ListVms, tenant.clone(), admin_options("list VMs", 60))
            .await?;
        c.state_mut(|s| s.progress.vms = vms.len() as u64);
        let jobs = vms
            .into_iter()
            .map(|vm| {
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
                    let _ = c.execute_activity(DeleteVm, input, options).await;
                    c.state_mut(|s| s.progress.deleted += 1);
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
        });
        let reset = PoolStepInput {
            tenant: tenant.clone(),
            step: NukeStep {
                actor,
                deleted: report.deleted,
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

fn admin_options(summary: &str, timeout_secs: u64) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(timeout_secs))
        .retry_policy(unlimited_retries())
        .summary(summary.to_string())
        .build()
}
