//! `murmur host ls | drain | forget`: the deployment's VM hosts, as the registry knows them, with the
//! VMs the running pools have placed on each.

use std::collections::BTreeMap;

use futures::StreamExt;
use murmur_activities::host_activities::read_hosts;
use murmur_activities::temporal_ops::{running_pools_query, update_error};
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::host_registry_workflow::HostRegistryWorkflow;
use murmur_workflows::hosts::{DrainRequest, HostInfo, HostView, registry_workflow_id};
use murmur_workflows::messages::Lenient;
use murmur_workflows::pool_workflow::PoolWorkflow;
use serde::{Deserialize, Serialize};
use temporalio_client::{
    Client, WorkflowExecuteUpdateOptions, WorkflowListOptions, WorkflowQueryOptions,
};
use temporalio_common::{HasWorkflowDefinition, UpdateDefinition};

/// One row of `murmur host ls`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    /// The registry's record of the host.
    #[serde(flatten)]
    pub info: HostInfo,
    /// `live`, `draining` or `lost`.
    pub status: String,
    /// VMs the running pools have on it (booting, warm, assigned or deleting).
    pub vms: u32,
}

/// The hosts of the deployment on `shared_queue`, with the VMs every running pool of it has
/// placed on each. A pool that does not answer its query is left out of the counts.
pub async fn list(client: &Client, shared_queue: &str) -> Result<Vec<HostRow>, ApiError> {
    let view: HostView = read_hosts(client, shared_queue).await?;
    let mut vms: BTreeMap<String, u32> = BTreeMap::new();
    let query = running_pools_query(shared_queue);
    let mut pools = client.list_workflows(query, WorkflowListOptions::default());
    while let Some(item) = pools.next().await {
        let wf = item.map_err(|e| ApiError::new(Code::Unavailable, e.to_string()))?;
        let status = client
            .get_workflow_handle::<PoolWorkflow>(wf.id().to_string())
            .query(PoolWorkflow::status, (), WorkflowQueryOptions::default())
            .await;
        if let Ok(status) = status {
            for h in status.hosts {
                *vms.entry(h.host).or_default() += h.vms;
            }
        }
    }
    Ok(view
        .hosts
        .into_values()
        .map(|info| HostRow {
            status: info.state_label().to_string(),
            vms: vms.get(&info.host).copied().unwrap_or(0),
            info,
        })
        .collect())
}

/// Starts (or, with `undo`, ends) the drain of `host`; answers with the host's record.
pub async fn drain(
    client: &Client,
    shared_queue: &str,
    host: &str,
    undo: bool,
    actor: &str,
) -> Result<HostInfo, ApiError> {
    let req = host_request(host, undo, actor)?;
    update_registry(client, shared_queue, HostRegistryWorkflow::drain, req).await
}

/// Forgets a lost host; answers with its last record.
pub async fn forget(
    client: &Client,
    shared_queue: &str,
    host: &str,
    actor: &str,
) -> Result<HostInfo, ApiError> {
    let req = host_request(host, false, actor)?;
    update_registry(client, shared_queue, HostRegistryWorkflow::forget, req).await
}

/// A request about `host`, after checking its id.
fn host_request(host: &str, undo: bool, actor: &str) -> Result<DrainRequest, ApiError> {
    murmur_workflows::hosts::validate_host_id(host)?;
    Ok(DrainRequest {
        host: host.to_string(),
        undo,
        actor: Some(actor.to_string()),
    })
}

/// Sends `update` to the registry of the deployment on `shared_queue`.
async fn update_registry<U>(
    client: &Client,
    shared_queue: &str,
    update: U,
    req: DrainRequest,
) -> Result<HostInfo, ApiError>
where
    U: UpdateDefinition<
            Workflow = <HostRegistryWorkflow as HasWorkflowDefinition>::Run,
            Input = Lenient<DrainRequest>,
            Output = HostInfo,
        >,
{
    client
        .get_workflow_handle::<HostRegistryWorkflow>(registry_workflow_id(shared_queue))
        .execute_update(update, req.into(), WorkflowExecuteUpdateOptions::default())
        .await
        .map_err(|e| {
            update_error(
                e,
                "the host registry is not running: no murmur-worker has started on this task queue",
            )
        })
}

/// The `murmur host ls` table (nothing when there are no hosts).
pub fn table(rows: &[HostRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let memory = if r.info.memory_mb == 0 {
                "-".to_string()
            } else {
                r.info.memory_mb.to_string()
            };
            vec![
                r.info.host.clone(),
                r.status.clone(),
                r.vms.to_string(),
                r.info.max_vms.to_string(),
                memory,
                r.info.substrate.clone(),
                r.info.losses.to_string(),
            ]
        })
        .collect();
    crate::output::table(
        &[
            "HOST",
            "STATE",
            "VMS",
            "MAX_VMS",
            "MEMORY_MB",
            "SUBSTRATE",
            "LOSSES",
        ],
        &cells,
        3,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_host_ids_are_not_truncated() {
        let id = format!("host-{}", "x".repeat(58));
        assert_eq!(id.len(), 63);
        let row = HostRow {
            info: HostInfo {
                host: id.clone(),
                max_vms: 500,
                substrate: "process".into(),
                ..Default::default()
            },
            status: "live".into(),
            vms: 3,
        };
        let text = table(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("HOST "), "{text}");
        let fields: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            fields,
            [id.as_str(), "live", "3", "500", "-", "process", "0"]
        );
        assert_eq!(lines[0].find("STATE"), lines[1].find("live"));
    }
}
