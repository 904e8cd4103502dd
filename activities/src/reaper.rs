//! The reaper's scan (`murmur.reap_scan`): what the substrate holds for a tenant, which
//! claimed agents have ended, and which agent workflows are stranded.
//!
//! The pool workflow decides what to delete ([`murmur_workflows::machine::Pool::reap`]); this
//! activity only looks (and, when `reap_stranded_workflows: enabled`, terminates stranded
//! agent workflows, which the pool does not own).
//!
//! *Stranded* means stuck on a retired build: the agent workflow is running but its workflow
//! task keeps failing (no worker can make progress on it: an unknown workflow type, a history
//! the current code cannot replay) for longer than `stranded_after`. The server flags such
//! workflows with the `TemporalReportedProblems` search attribute; the scan finds them with a
//! visibility query and confirms each with a describe.

// `#[activities]` generates an undocumented marker constant per activity; the activity itself
// is documented below.
#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use murmur_workflows::activity_api::ReapInput;
use murmur_workflows::machine::{ReapScan, ScannedVm};
use murmur_workflows::model::{Millis, ReapPolicy};
use temporalio_client::{
    Client, NamespacedClient, UntypedWorkflow, WorkflowDescribeOptions, WorkflowExecutionInfo,
    WorkflowExecutionStatus, WorkflowHandle, WorkflowListOptions, WorkflowTerminateOptions,
};
use temporalio_common::ActivityError;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::agent_activities::with_heartbeats;
use crate::provider::Provider;
use crate::temporal_ops::running_agents_query;

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
            let vms = self
                .provider
                .list(&input.tenant)
                .await
                .map_err(|e| failure(e.to_string()))?;
            let running = running_agents(&client, &input.tenant).await?;
            let finished = finished_claims(&client, &input.claims, &running).await?;
            let (stranded_found, stranded_terminated) = match input.stranded {
                ReapPolicy::Disabled => (0, 0),
                policy => self.handle_stranded(&client, &input.tenant, policy).await,
            };
            Ok::<_, ActivityError>(ReapScan {
                vms: vms
                    .into_iter()
                    .map(|v| ScannedVm {
                        id: v.id,
                        alive: v.alive,
                    })
                    .collect(),
                finished_agents: finished,
                stranded_found,
                stranded_terminated,
                grace_ms: millis(self.settings.grace),
                interval_ms: millis(self.settings.interval),
            })
        };
        with_heartbeats(&ctx, work).await?
    }
}

impl ReaperActivities {
    /// Finds stranded agent workflows of `tenant`; terminates them when `policy` is
    /// `enabled`, logs them when it is `dry_run`. Returns (found, terminated). A server whose
    /// visibility cannot answer the query is logged and skipped: the VM reaping still runs.
    async fn handle_stranded(
        &self,
        client: &Client,
        tenant: &str,
        policy: ReapPolicy,
    ) -> (u32, u32) {
        let query = format!(
            "{} AND TemporalReportedProblems IS NOT NULL",
            running_agents_query(tenant)
        );
        let mut stream = client.list_workflows(query, WorkflowListOptions::default());
        let mut flagged = BTreeSet::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(wf) => {
                    flagged.insert((wf.id().to_string(), wf.run_id().to_string()));
                }
                Err(e) => {
                    tracing::warn!(tenant, error = %e, "stranded agent workflows not checked");
                    return (0, 0);
                }
            }
        }
        let (mut found, mut terminated) = (0, 0);
        for (id, run) in flagged {
            let handle = run_handle(client, &id, &run);
            let Ok(desc) = handle.describe(WorkflowDescribeOptions::default()).await else {
                continue;
            };
            let Some(task) = desc.raw_description.pending_workflow_task.as_ref() else {
                continue;
            };
            let failing_since = task
                .original_scheduled_time
                .as_ref()
                .and_then(|t| {
                    SystemTime::UNIX_EPOCH.checked_add(Duration::new(
                        u64::try_from(t.seconds).ok()?,
                        u32::try_from(t.nanos).ok()?,
                    ))
                })
                .and_then(|t| t.elapsed().ok());
            let Some(age) = failing_since else { continue };
            if task.attempt < 2 || age < self.settings.stranded_after {
                continue;
            }
            found += 1;
            if policy != ReapPolicy::Enabled {
                tracing::warn!(tenant, workflow = %id, run = %run, attempts = task.attempt,
                    failing_for_s = age.as_secs(),
                    "stranded agent workflow (reap_stranded_workflows: dry_run, left running)");
                continue;
            }
            let options = WorkflowTerminateOptions::builder()
                .reason(format!(
                    "murmur reaper: stranded on a retired build (workflow task failing for {}s)",
                    age.as_secs()
                ))
                .build();
            match handle.terminate(options).await {
                Ok(()) => {
                    terminated += 1;
                    tracing::warn!(tenant, workflow = %id, run = %run,
                        "stranded agent workflow terminated");
                }
                Err(e) => {
                    tracing::warn!(tenant, workflow = %id, error = %e,
                        "stranded agent workflow not terminated")
                }
            }
        }
        (found, terminated)
    }
}

/// (workflow id, run id) of every running agent of `tenant`.
async fn running_agents(
    client: &Client,
    tenant: &str,
) -> Result<BTreeSet<(String, String)>, ActivityError> {
    let mut stream =
        client.list_workflows(running_agents_query(tenant), WorkflowListOptions::default());
    let mut running = BTreeSet::new();
    while let Some(item) = stream.next().await {
        let wf = item.map_err(|e| failure(e.to_string()))?;
        running.insert((wf.id().to_string(), wf.run_id().to_string()));
    }
    Ok(running)
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
