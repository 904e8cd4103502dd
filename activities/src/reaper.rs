//! The reaper's scan (`murmur.reap_scan`): what the substrate holds for a tenant, which
//! claimed agents have ended, and which agent workflows are stranded.
//!
//! The pool workflow decides what to delete ([`murmur_workflows::machine::Pool::reap`]); this
//! activity only looks (and, when `reap_stranded_workflows: enabled`, terminates stranded
//! agent workflows, which the pool does not own).
//!
//! *Stranded* means stuck on a retired build: the agent workflow is running but its workflow
//! task keeps failing (no worker can make progress on it: an unknown workflow type, a history
//! the current code cannot replay) and it has made no progress for longer than
//! `stranded_after`. The scan describes each running agent (a few at a time) and, for those
//! whose workflow task is on its second attempt or later, reads when history last moved.

// `#[activities]` generates an undocumented marker constant per activity; the activity itself
// is documented below.
#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use murmur_workflows::activity_api::{ReapInput, ReapScope};
use murmur_workflows::machine::{ReapScan, ScannedVm};
use murmur_workflows::model::{Millis, ReapPolicy};
use temporalio_client::{
    Client, NamespacedClient, UntypedWorkflow, WorkflowDescribeOptions, WorkflowExecutionInfo,
    WorkflowExecutionStatus, WorkflowFetchHistoryOptions, WorkflowHandle, WorkflowTerminateOptions,
};
use temporalio_common::ActivityError;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::agent_activities::with_heartbeats;
use crate::provider::Provider;
use crate::temporal_ops::running_runs;
use murmur_workflows::bake::BAKE_WORKSPACE;
use murmur_workflows::bake_workflow::scratch_vm_id;
use murmur_workflows::nuke_workflow::nuke_workflow_id;

/// The worker's reaper settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaperSettings {
    /// Time between scans.
    pub interval: Duration,
    /// How long a VM unknown to the pool must stay unknown before it is deleted.
    pub grace: Duration,
    /// How long an agent workflow's task must have been failing before it counts as stranded.
    pub stranded_after: Duration,
}

impl Default for ReaperSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            grace: Duration::from_secs(60),
            stranded_after: Duration::from_secs(48 * 3600),
        }
    }
}

/// The reaper's scan activity.
pub struct ReaperActivities {
    provider: Arc<dyn Provider>,
    settings: ReaperSettings,
}

impl ReaperActivities {
    /// Scans over `provider` with `settings`.
    pub fn new(provider: Arc<dyn Provider>, settings: ReaperSettings) -> Self {
        Self { provider, settings }
    }
}

#[activities]
impl ReaperActivities {
    /// Lists the tenant's VMs, finds claims of ended agents, and handles stranded agent
    /// workflows per the pool's policy.
    #[activity(name = "murmur.reap_scan")]
    pub async fn reap_scan(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: ReapInput,
    ) -> Result<ReapScan, ActivityError> {
        let client = ctx.client().clone();
        let work = async {
            let mut scan = ReapScan {
                grace_ms: millis(self.settings.grace),
                interval_ms: millis(self.settings.interval),
                ..ReapScan::default()
            };
            if input.scope != ReapScope::Workflows {
                scan.vms = self.list_vms(&client, &input.tenant).await?;
            }
            if input.scope == ReapScope::HostVms {
                return Ok(scan);
            }
            let running = running_runs(&client, &input.tenant, "agent")
                .await
                .map_err(|e| failure(e.to_string()))?;
            scan.finished_agents = finished_claims(&client, &input.claims, &running).await?;
            (scan.stranded_found, scan.stranded_terminated) = match input.stranded {
                ReapPolicy::Disabled => (0, 0),
                policy => {
                    self.handle_stranded(&client, &input.tenant, &running, policy)
                        .await
                }
            };
            if input.check_nuke {
                scan.nuke_running = Some(nuke_running(&client, &input.tenant).await?);
            }
            Ok::<_, ActivityError>(scan)
        };
        with_heartbeats(&ctx, work).await?
    }
}

impl ReaperActivities {
    /// The tenant's VMs in this worker's substrate, less the scratch VMs of bakes still
    /// running (those are the bakes', not orphans).
    async fn list_vms(
        &self,
        client: &Client,
        tenant: &str,
    ) -> Result<Vec<ScannedVm>, ActivityError> {
        let mut vms = self
            .provider
            .list(tenant)
            .await
            .map_err(|e| failure(e.to_string()))?;
        if vms.iter().any(|v| v.workspace == BAKE_WORKSPACE) {
            let baking = running_bake_vms(client, tenant).await?;
            vms.retain(|v| !baking.contains(&v.id));
        }
        Ok(vms
            .into_iter()
            .map(|v| ScannedVm {
                id: v.id,
                alive: v.alive,
                host: None,
            })
            .collect())
    }

    /// Finds stranded agent workflows among `running`; terminates them when `policy` is
    /// `enabled`, logs them when it is `dry_run`. Returns (found, terminated). Errors talking
    /// to the server are logged and skip the workflow: the VM reaping still runs.
    async fn handle_stranded(
        &self,
        client: &Client,
        tenant: &str,
        running: &BTreeSet<(String, String)>,
        policy: ReapPolicy,
    ) -> (u32, u32) {
        let stranded_after = self.settings.stranded_after;
        let checks = futures::stream::iter(running.iter().cloned())
            .map(|(id, run)| async move {
                let stuck_for = stuck_for(client, &id, &run).await;
                (id, run, stuck_for)
            })
            .buffer_unordered(STRANDED_CHECKS_AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        let (mut found, mut terminated) = (0, 0);
        for (id, run, stuck_for) in checks {
            let Some(age) = stuck_for.filter(|age| *age >= stranded_after) else {
                continue;
            };
            found += 1;
            if policy != ReapPolicy::Enabled {
                tracing::warn!(tenant, workflow = %id, run = %run, stuck_for_s = age.as_secs(),
                    "stranded agent workflow (reap_stranded_workflows: dry_run, left running)");
                continue;
            }
            let options = WorkflowTerminateOptions::builder()
                .reason(format!(
                    "murmur reaper: stranded on a retired build (no progress for {}s, its \
                     workflow task keeps failing)",
                    age.as_secs()
                ))
                .build();
            match run_handle(client, &id, &run).terminate(options).await {
                Ok(()) => {
                    terminated += 1;
                    tracing::warn!(tenant, workflow = %id, run = %run,
                        "stranded agent workflow terminated");
                }
                Err(e) => tracing::warn!(tenant, workflow = %id, error = %e,
                    "stranded agent workflow not terminated"),
            }
        }
        (found, terminated)
    }
}

/// Describes looked at concurrently when checking for stranded workflows.
const STRANDED_CHECKS_AT_ONCE: usize = 8;

/// How long a run has made no progress while its workflow task keeps failing, or `None` when
/// its task is not failing (or the server could not say). The first failure of a workflow
/// task is the last event in history (retries of a failing task are not recorded), so the
/// age of the last event is how long the run has been stuck.
async fn stuck_for(client: &Client, id: &str, run: &str) -> Option<Duration> {
    let handle = run_handle(client, id, run);
    let desc = handle
        .describe(WorkflowDescribeOptions::default())
        .await
        .ok()?;
    let task = desc.raw_description.pending_workflow_task.as_ref()?;
    if task.attempt < 2 {
        return None;
    }
    let mut history = handle.fetch_history(WorkflowFetchHistoryOptions::default());
    let mut last = None;
    while let Some(event) = history.next().await {
        last = event.ok()?.event_time;
    }
    let last = last?;
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::new(
        u64::try_from(last.seconds).ok()?,
        u32::try_from(last.nanos).ok()?,
    ))?;
    at.elapsed().ok()
}

/// Whether `nuke/<tenant>` runs (a closed or missing one does not).
async fn nuke_running(client: &Client, tenant: &str) -> Result<bool, ActivityError> {
    let handle = client.get_workflow_handle::<UntypedWorkflow>(nuke_workflow_id(tenant));
    match handle.describe(WorkflowDescribeOptions::default()).await {
        Ok(desc) => Ok(desc.status() == WorkflowExecutionStatus::Running),
        Err(temporalio_client::errors::WorkflowInteractionError::NotFound(_)) => Ok(false),
        Err(e) => Err(failure(e.to_string())),
    }
}

/// The scratch VMs of the bake workflows of `tenant` that are still running.
async fn running_bake_vms(
    client: &Client,
    tenant: &str,
) -> Result<BTreeSet<murmur_workflows::model::VmId>, ActivityError> {
    let bakes = running_runs(client, tenant, "bake")
        .await
        .map_err(|e| failure(e.to_string()))?;
    Ok(bakes.iter().map(|(_, run)| scratch_vm_id(run)).collect())
}

/// The claims whose agent workflow run has closed. Visibility lags behind, so a claim whose
/// agent is not in the running list is confirmed with a describe before it counts.
async fn finished_claims(
    client: &Client,
    claims: &[String],
    running: &BTreeSet<(String, String)>,
) -> Result<Vec<String>, ActivityError> {
    let mut finished = Vec::new();
    for request in claims {
        let Some((id, run)) = request.rsplit_once('@') else {
            continue;
        };
        if running.contains(&(id.to_string(), run.to_string())) {
            continue;
        }
        match run_handle(client, id, run)
            .describe(WorkflowDescribeOptions::default())
            .await
        {
            Ok(desc) if desc.status() == WorkflowExecutionStatus::Running => {}
            Ok(_) => finished.push(request.clone()),
            Err(temporalio_client::errors::WorkflowInteractionError::NotFound(_)) => {
                finished.push(request.clone())
            }
            Err(e) => return Err(failure(e.to_string())),
        }
    }
    Ok(finished)
}

fn run_handle(client: &Client, id: &str, run: &str) -> WorkflowHandle<Client, UntypedWorkflow> {
    WorkflowExecutionInfo::builder()
        .namespace(client.namespace())
        .workflow_id(id)
        .run_id(run.to_string())
        .build()
        .bind_untyped(client.clone())
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

fn failure(message: String) -> ActivityError {
    ActivityError::application(ApplicationFailure::new(anyhow::anyhow!(message)))
}

#[cfg(test)]
mod tests {
    use murmur_workflows::activity_api::ReapScanVms;
    use temporalio_common::ActivityDefinition;

    use super::ReaperActivities;

    #[test]
    fn activity_name_matches_the_workflow_marker() {
        assert_eq!(ReaperActivities::reap_scan.name(), ReapScanVms.name());
    }
}
