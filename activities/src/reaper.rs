//! The reaper's listings: what a host's substrate holds for a tenant (`murmur.list_host_vms`,
//! on the host's own queue), and what Temporal says about the tenant's agents
//! (`murmur.scan_agents`): which run, which are stranded, whether its nuke runs.
//!
//! Both answer as differences from the pool's digests (see
//! [`murmur_workflows::machine::digest`]), so a pool that agrees with the world gets back
//! almost nothing. The pool workflow decides what to delete or adopt
//! ([`murmur_workflows::machine::Pool::host_listed`]); these activities only look (and, when
//! `reap_stranded_workflows: enabled`, terminate stranded agent workflows, which the pool
//! does not own).
//!
//! *Stranded* means stuck on a retired build: the agent workflow is running but its workflow
//! task keeps failing (no worker can make progress on it: an unknown workflow type, a history
//! the current code cannot replay) and it has made no progress for longer than
//! `stranded_after`. Each round checks a bounded share of the running agents (a cursor walks
//! through them by workflow id): it describes each and, for those whose workflow task is on
//! its second attempt or later, reads when history last moved.

// `#[activities]` generates an undocumented marker constant per activity; the activities
// themselves are documented below.
#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use murmur_workflows::activity_api::{AgentScanInput, HostListInput};
use murmur_workflows::machine::reaper::running_differences;
use murmur_workflows::machine::{AgentScan, HostScan, ScanSettings};
use murmur_workflows::model::{Millis, ReapPolicy};
use temporalio_client::{
    Client, NamespacedClient, UntypedWorkflow, WorkflowDescribeOptions, WorkflowExecutionInfo,
    WorkflowExecutionStatus, WorkflowFetchHistoryOptions, WorkflowHandle, WorkflowTerminateOptions,
};
use temporalio_common::ActivityError;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::heartbeat::with_heartbeats;
use crate::substrate::Provider;
use crate::temporal_ops::running_runs;
use murmur_workflows::bake::BAKE_WORKSPACE;
use murmur_workflows::bake_workflow::scratch_vm_id;
use murmur_workflows::nuke_workflow::nuke_workflow_id;

/// Running agents a round checks for being stranded.
const STRANDED_PER_ROUND: usize = 32;

/// The worker's reaper settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaperSettings {
    /// Time between scans.
    pub interval: Duration,
    /// How long a VM unknown to the pool must stay unknown before it is deleted.
    pub grace: Duration,
    /// How long an agent workflow's task must have been failing before it counts as stranded.
    pub stranded_after: Duration,
    /// History length after which a pool continues as new (0: the default, 10,000 events).
    pub roll_over_events: u32,
}

impl ReaperSettings {
    /// What the listings report to the pool.
    fn scan_settings(&self) -> ScanSettings {
        ScanSettings {
            grace_ms: millis(self.grace),
            interval_ms: millis(self.interval),
            roll_over_events: self.roll_over_events,
        }
    }
}

impl Default for ReaperSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            grace: Duration::from_secs(60),
            stranded_after: Duration::from_secs(48 * 3600),
            roll_over_events: 0,
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
    /// Lists the tenant's VMs on this host and answers with the differences from the pool's
    /// digests: each VM of a differing bucket with its substrate record and whether the agent
    /// that owns it runs. Scratch VMs of bakes that still run are the bakes', left out.
    #[activity(name = "murmur.list_host_vms")]
    pub async fn list_host_vms(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: HostListInput,
    ) -> Result<HostScan, ActivityError> {
        let client = ctx.client().clone();
        let work = async {
            let mut vms = self
                .provider
                .list(&input.tenant)
                .await
                .map_err(|e| failure(e.to_string()))?;
            if vms.iter().any(|v| v.workspace == BAKE_WORKSPACE) {
                let baking = running_bake_vms(&client, &input.tenant).await?;
                vms.retain(|v| !baking.contains(&v.id));
            }
            let listing = vms.into_iter().map(|v| v.scanned()).collect();
            let mut scan = HostScan::answer(&input.digests, listing, self.settings.scan_settings());
            let owners: BTreeSet<String> = scan
                .diffs
                .items
                .iter()
                .filter_map(|v| v.labels.as_ref()?.owner.clone())
                .collect();
            if !owners.is_empty() {
                let running = running_requests(&client, &input.tenant).await?;
                for vm in &mut scan.diffs.items {
                    if let Some(labels) = vm.labels.as_mut() {
                        labels.owner_running =
                            labels.owner.as_ref().is_some_and(|o| running.contains(o));
                    }
                }
            }
            Ok::<_, ActivityError>(scan)
        };
        with_heartbeats(&ctx, work).await?
    }

    /// Asks Temporal which of the tenant's agents run (as differences from the claims'
    /// digests), checks this round's share of them for being stranded (handling them per the
    /// pool's policy), and whether the tenant's nuke runs.
    #[activity(name = "murmur.scan_agents")]
    pub async fn scan_agents(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: AgentScanInput,
    ) -> Result<AgentScan, ActivityError> {
        let client = ctx.client().clone();
        let work = async {
            let req = input.request;
            let running = running_runs(&client, &input.tenant, "agent")
                .await
                .map_err(|e| failure(e.to_string()))?;
            let mut scan = AgentScan {
                running: running_differences(
                    &req.claims,
                    running.iter().map(|(id, run)| format!("{id}@{run}")),
                ),
                settings: self.settings.scan_settings(),
                ..AgentScan::default()
            };
            if req.stranded != ReapPolicy::Disabled {
                let share: Vec<(String, String)> = running
                    .iter()
                    .filter(|(id, _)| req.stranded_after.as_ref().is_none_or(|after| id > after))
                    .take(STRANDED_PER_ROUND)
                    .cloned()
                    .collect();
                scan.stranded_cursor = (share.len() == STRANDED_PER_ROUND)
                    .then(|| share.last().map(|(id, _)| id.clone()))
                    .flatten();
                (scan.stranded_found, scan.stranded_terminated) = self
                    .handle_stranded(&client, &input.tenant, &share, req.stranded)
                    .await;
            }
            if req.check_nuke {
                scan.nuke_running = Some(nuke_running(&client, &input.tenant).await?);
            }
            Ok::<_, ActivityError>(scan)
        };
        with_heartbeats(&ctx, work).await?
    }
}

impl ReaperActivities {
    /// Finds stranded agent workflows among `running`; terminates them when `policy` is
    /// `enabled`, logs them when it is `dry_run`. Returns (found, terminated). Errors talking
    /// to the server are logged and skip the workflow: the VM reaping still runs.
    async fn handle_stranded(
        &self,
        client: &Client,
        tenant: &str,
        running: &[(String, String)],
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

/// The claim requests (`<workflow id>@<run id>`) of the tenant's running agents.
async fn running_requests(
    client: &Client,
    tenant: &str,
) -> Result<BTreeSet<String>, ActivityError> {
    let running = running_runs(client, tenant, "agent")
        .await
        .map_err(|e| failure(e.to_string()))?;
    Ok(running
        .into_iter()
        .map(|(id, run)| format!("{id}@{run}"))
        .collect())
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
    use murmur_workflows::activity_api::{ListHostVms, ScanAgents};
    use temporalio_common::ActivityDefinition;

    use super::ReaperActivities;

    #[test]
    fn activity_names_match_the_workflow_markers() {
        assert_eq!(ReaperActivities::list_host_vms.name(), ListHostVms.name());
        assert_eq!(ReaperActivities::scan_agents.name(), ScanAgents.name());
    }
}
