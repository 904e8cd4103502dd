//! Calls to Temporal shared by the activities and the CLI: murmur's search attributes, how a
//! pool workflow is started on demand, where a claim stands in a pool, and how client errors
//! map onto the `CODE: reason` contract.

use std::time::Duration;

use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::ClaimState;
use murmur_workflows::messages::{ClaimProbe, PoolInput};
use murmur_workflows::pool_workflow::{PoolWorkflow, pool_workflow_id};
use temporalio_client::errors::{
    WorkflowInteractionError, WorkflowQueryError, WorkflowUpdateError, WorkflowUpdateWithStartError,
};
use temporalio_client::{
    Client, WorkflowIdConflictPolicy, WorkflowQueryOptions, WorkflowUpdateWithStartOptions,
};
use temporalio_common::{HasWorkflowDefinition, UpdateDefinition};

pub use murmur_workflows::search_attrs::{SA_KIND, SA_TENANT, SA_WORKSPACE, search_attributes};

/// Visibility query for the running workflows of one kind (`agent`, `bake`, ...) of a tenant.
pub fn running_query(tenant: &str, kind: &str) -> String {
    format!(
        "{} = '{}' AND {} = '{}' AND ExecutionStatus = 'Running'",
        SA_TENANT.name(),
        tenant,
        SA_KIND.name(),
        kind
    )
}

/// How many `kind` workflows of `tenant` were terminated (closed as `Terminated`) at or after
/// `since`, through visibility.
pub async fn terminated_since(
    client: &temporalio_client::Client,
    tenant: &str,
    kind: &str,
    since: std::time::SystemTime,
) -> Result<u64, ApiError> {
    use futures::StreamExt;
    let query = format!(
        "{} = '{}' AND {} = '{}' AND ExecutionStatus = 'Terminated' AND CloseTime >= '{}'",
        SA_TENANT.name(),
        tenant,
        SA_KIND.name(),
        kind,
        humantime::format_rfc3339_millis(since)
    );
    let mut stream =
        client.list_workflows(query, temporalio_client::WorkflowListOptions::default());
    let mut count = 0;
    while let Some(item) = stream.next().await {
        item.map_err(|e| ApiError::new(Code::Unavailable, e.to_string()))?;
        count += 1;
    }
    Ok(count)
}

/// Visibility query for the running pool workflows of the deployment whose shared task queue
/// is `shared_queue` (quotes in the name are dropped, so it cannot end the literal).
pub fn running_pools_query(shared_queue: &str) -> String {
    format!(
        "{} = 'pool' AND ExecutionStatus = 'Running' AND TaskQueue = '{}'",
        SA_KIND.name(),
        shared_queue.replace('\'', "")
    )
}

/// Visibility query for the running agent workflows of a tenant.
pub fn running_agents_query(tenant: &str) -> String {
    running_query(tenant, "agent")
}

/// (workflow id, run id) of every running workflow of one kind of a tenant (a paginated
/// visibility list).
pub async fn running_runs(
    client: &temporalio_client::Client,
    tenant: &str,
    kind: &str,
) -> Result<std::collections::BTreeSet<(String, String)>, ApiError> {
    use futures::StreamExt;
    let mut stream = client.list_workflows(
        running_query(tenant, kind),
        temporalio_client::WorkflowListOptions::default(),
    );
    let mut runs = std::collections::BTreeSet::new();
    while let Some(item) = stream.next().await {
        let wf = item.map_err(|e| ApiError::new(Code::Unavailable, e.to_string()))?;
        runs.insert((wf.id().to_string(), wf.run_id().to_string()));
    }
    Ok(runs)
}

/// Options that start `pool/<tenant>` if it is not running, and use the running one if it is.
pub fn pool_start_options(tenant: &str, task_queue: &str) -> WorkflowUpdateWithStartOptions {
    WorkflowUpdateWithStartOptions::new(
        task_queue.to_string(),
        pool_workflow_id(tenant),
        WorkflowIdConflictPolicy::UseExisting,
    )
    .search_attributes(search_attributes(tenant, "pool", None))
    .static_summary(format!("warm pool of tenant {tenant}"))
    .build()
}

/// Input that starts a new pool for `tenant`.
pub fn pool_input(tenant: &str) -> PoolInput {
    PoolInput {
        tenant: tenant.to_string(),
        carried: None,
    }
}

/// Sends `update` to `pool/<tenant>`, starting the pool first if it is not running, and maps
/// the outcome onto the error contract.
pub async fn update_pool<U>(
    client: &Client,
    tenant: &str,
    task_queue: &str,
    update: U,
    input: U::Input,
) -> Result<U::Output, ApiError>
where
    U: UpdateDefinition<Workflow = <PoolWorkflow as HasWorkflowDefinition>::Run>,
    U::Input: Send,
{
    client
        .execute_update_with_start_workflow(
            PoolWorkflow::run,
            pool_input(tenant),
            update,
            input,
            pool_start_options(tenant, task_queue),
        )
        .await
        .map_err(|e| {
            update_with_start_error(
                e,
                &format!(
                    "the pool of tenant {tenant} is not running; start it with murmur pool up"
                ),
            )
        })
}

/// Maps a failure message from the worker to the error contract: the worker's own
/// `CODE: reason` when present, `INVALID_ARGUMENT` for payloads it could not decode.
pub fn failure_to_api(message: &str) -> ApiError {
    if let Some((code, rest)) = message.split_once(": ")
        && let Some(code) = Code::parse(code)
    {
        return ApiError::new(code, rest);
    }
    if let Some(e) = ApiError::find_in(message) {
        return e;
    }
    if message.contains("ncoding") || message.contains("deserializ") {
        return ApiError::invalid_argument(message.to_string());
    }
    ApiError::new(Code::Internal, message.to_string())
}

/// Maps an update error; `not_running` says what a missing workflow means.
pub fn update_error(e: WorkflowUpdateError, not_running: &str) -> ApiError {
    match e {
        WorkflowUpdateError::Failed(f) => failure_to_api(&f.message),
        WorkflowUpdateError::NotFound(_) => ApiError::not_found(not_running.to_string()),
        other => rpc_error(&other.to_string()),
    }
}

/// Maps an update-with-start error.
pub fn update_with_start_error(e: WorkflowUpdateWithStartError, not_running: &str) -> ApiError {
    match e {
        WorkflowUpdateWithStartError::Update(u) => update_error(u, not_running),
        other => rpc_error(&other.to_string()),
    }
}

/// Where the claim `request` stands in `tenant`'s pool: its `claim_state` query (no update,
/// nothing in the pool's history). `None` when the pool did not answer within `within`.
pub async fn claim_state(
    client: &Client,
    tenant: &str,
    request: &str,
    within: Duration,
) -> Option<Result<ClaimState, WorkflowQueryError>> {
    let pool = client.get_workflow_handle::<PoolWorkflow>(pool_workflow_id(tenant));
    let probe = ClaimProbe {
        request: request.to_string(),
    };
    let query = pool.query(
        PoolWorkflow::claim_state,
        probe.into(),
        WorkflowQueryOptions::default(),
    );
    tokio::time::timeout(within, query).await.ok()
}

/// Maps a query error.
pub fn query_error(e: WorkflowQueryError, not_running: &str) -> ApiError {
    match e {
        WorkflowQueryError::NotFound(_) => ApiError::not_found(not_running.to_string()),
        other => rpc_error(&other.to_string()),
    }
}

/// Maps a signal/cancel/terminate/describe error.
pub fn interaction_error(e: WorkflowInteractionError, not_running: &str) -> ApiError {
    match e {
        WorkflowInteractionError::NotFound(_) => ApiError::not_found(not_running.to_string()),
        other => rpc_error(&other.to_string()),
    }
}

/// Any other RPC failure: the worker's `CODE: reason` if one is inside, else `UNAVAILABLE`.
pub fn rpc_error(text: &str) -> ApiError {
    if let Some(e) = ApiError::find_in(text) {
        return e;
    }
    ApiError::new(Code::Unavailable, text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_failures_keep_their_code() {
        let e = failure_to_api("INVALID_ARGUMENT: max_vms must be positive");
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: max_vms must be positive");
        let e = failure_to_api("Encoding error: missing field `kind`");
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[test]
    fn agents_query_names_the_tenant_and_kind() {
        assert_eq!(
            running_agents_query("acme"),
            "MurmurTenant = 'acme' AND MurmurKind = 'agent' AND ExecutionStatus = 'Running'"
        );
    }
}
