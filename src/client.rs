//! Talking to Temporal: connecting like the `temporal` CLI does, and the pool operations the
//! CLI offers (flush, status, up, get/set/patch), each mapped onto the error contract.

use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::ConfigChange;
use murmur_workflows::messages::{
    ConfigRequest, FlushReply, FlushRequest, PoolInput, UpRequest, encode_json,
};
use murmur_workflows::model::ResourceDoc;
use murmur_workflows::pool_workflow::{ConfigSnapshot, PoolWorkflow, pool_workflow_id};
use murmur_workflows::status::PoolStatus;
use temporalio_client::envconfig::LoadClientConfigProfileOptions;
use temporalio_client::errors::{
    WorkflowQueryError, WorkflowUpdateError, WorkflowUpdateWithStartError,
};
use temporalio_client::{
    Client, ClientOptions, Connection, WorkflowIdConflictPolicy, WorkflowQueryOptions,
    WorkflowUpdateWithStartOptions,
};
use temporalio_common::search_attributes::{SearchAttributeKey, SearchAttributes};

use crate::config::Context;

/// Search attribute: the tenant a workflow belongs to.
pub const SA_TENANT: SearchAttributeKey<String> = SearchAttributeKey::keyword("MurmurTenant");
/// Search attribute: the workspace an agent runs in.
pub const SA_WORKSPACE: SearchAttributeKey<String> = SearchAttributeKey::keyword("MurmurWorkspace");
/// Search attribute: `pool`, `agent`, `nuke` or `bake`.
pub const SA_KIND: SearchAttributeKey<String> = SearchAttributeKey::keyword("MurmurKind");

/// Registers murmur's search attributes on the client's namespace. Already registered ones
/// are left alone, so calling this on every worker start is safe. Fails when the server
/// refuses (for example Temporal Cloud, where an operator registers them once).
pub async fn register_search_attributes(client: &Client) -> Result<(), ApiError> {
    use temporalio_client::NamespacedClient;
    use temporalio_common::protos::temporal::api::enums::v1::IndexedValueType;
    use temporalio_common::protos::temporal::api::operatorservice::v1::AddSearchAttributesRequest;
    let request = AddSearchAttributesRequest {
        search_attributes: [SA_TENANT.name(), SA_WORKSPACE.name(), SA_KIND.name()]
            .into_iter()
            .map(|n| (n.to_string(), IndexedValueType::Keyword as i32))
            .collect(),
        namespace: client.namespace(),
    };
    match client
        .connection()
        .operator_service()
        .add_search_attributes(tonic::Request::new(request))
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(status) => Err(ApiError::new(
            Code::Unavailable,
            format!("register search attributes: {}", status.message()),
        )),
    }
}

/// The task queue the worker polls: `MURMUR_TASK_QUEUE` or `murmur`.
pub fn task_queue() -> String {
    std::env::var("MURMUR_TASK_QUEUE")
        .ok()
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| murmur_workflows::DEFAULT_TASK_QUEUE.to_string())
}

/// Connects with the same settings as the `temporal` CLI (`TEMPORAL_ADDRESS`,
/// `TEMPORAL_NAMESPACE`, TLS and API key variables, config profiles).
pub async fn connect(identity: &str) -> Result<Client, ApiError> {
    let (mut conn_opts, client_opts) = ClientOptions::load_from_config(
        LoadClientConfigProfileOptions::default(),
    )
    .map_err(|e| ApiError::invalid_argument(format!("Temporal client configuration: {e}")))?;
    conn_opts.identity = identity.to_string();
    let target = conn_opts.target.to_string();
    let connection = Connection::connect(conn_opts).await.map_err(|e| {
        ApiError::new(
            Code::Unavailable,
            format!("cannot reach Temporal at {target}: {e} (is the dev server running? ./devserver.sh start)"),
        )
    })?;
    Client::new(connection, client_opts)
        .map_err(|e| ApiError::new(Code::Unavailable, format!("Temporal client: {e}")))
}

/// Pool operations of one tenant.
pub struct PoolClient {
    client: Client,
    ctx: Context,
    task_queue: String,
}

impl PoolClient {
    /// Operations on `ctx.tenant`'s pool through `client`.
    pub fn new(client: Client, ctx: Context) -> Self {
        Self {
            client,
            ctx,
            task_queue: task_queue(),
        }
    }

    fn workflow_id(&self) -> String {
        pool_workflow_id(&self.ctx.tenant)
    }

    fn start_options(&self) -> WorkflowUpdateWithStartOptions {
        WorkflowUpdateWithStartOptions::new(
            self.task_queue.clone(),
            self.workflow_id(),
            WorkflowIdConflictPolicy::UseExisting,
        )
        .search_attributes(SearchAttributes::new([
            SA_TENANT.value_set(self.ctx.tenant.clone()),
            SA_KIND.value_set("pool".to_string()),
        ]))
        .build()
    }

    fn input(&self) -> PoolInput {
        PoolInput {
            tenant: self.ctx.tenant.clone(),
            carried: None,
        }
    }

    /// Flushes the pool (starting it if needed); answers once the flushed VMs are gone.
    pub async fn flush(&self) -> Result<FlushReply, ApiError> {
        let req = FlushRequest {
            nuke: false,
            actor: Some(self.ctx.developer.clone()),
            workspace: Some(self.ctx.workspace.clone()),
        };
        let req = encode_json(&req)
            .map_err(|e| ApiError::new(Code::Internal, format!("encode flush request: {e}")))?;
        self.client
            .execute_update_with_start_workflow(
                PoolWorkflow::run,
                self.input(),
                PoolWorkflow::flush,
                req,
                self.start_options(),
            )
            .await
            .map_err(update_with_start_error)
    }

    /// Starts the pool if it is not running and asks it to reconcile now.
    pub async fn up(&self) -> Result<PoolStatus, ApiError> {
        self.client
            .execute_update_with_start_workflow(
                PoolWorkflow::run,
                self.input(),
                PoolWorkflow::up,
                UpRequest {
                    actor: Some(self.ctx.developer.clone()),
                },
                self.start_options(),
            )
            .await
            .map_err(update_with_start_error)
    }

    /// The pool's status.
    pub async fn status(&self) -> Result<PoolStatus, ApiError> {
        self.client
            .get_workflow_handle::<PoolWorkflow>(self.workflow_id())
            .query(PoolWorkflow::status, (), WorkflowQueryOptions::default())
            .await
            .map_err(|e| query_error(e, &self.ctx.tenant))
    }

    /// Every resource of the tenant.
    pub async fn config(&self) -> Result<ConfigSnapshot, ApiError> {
        self.client
            .get_workflow_handle::<PoolWorkflow>(self.workflow_id())
            .query(PoolWorkflow::config, (), WorkflowQueryOptions::default())
            .await
            .map_err(|e| query_error(e, &self.ctx.tenant))
    }

    /// Applies a config change (starting the pool if needed) and returns the new document.
    pub async fn apply_config(
        &self,
        kind: &str,
        name: &str,
        change: ConfigChange,
    ) -> Result<ResourceDoc, ApiError> {
        let req = ConfigRequest {
            kind: kind.to_string(),
            name: name.to_string(),
            change,
            actor: Some(self.ctx.developer.clone()),
        };
        self.client
            .execute_update_with_start_workflow(
                PoolWorkflow::run,
                self.input(),
                PoolWorkflow::apply_config,
                req,
                self.start_options(),
            )
            .await
            .map_err(update_with_start_error)
    }
}

/// Maps a failure message from the worker to the error contract: the worker's own
/// `CODE: reason` when present, `INVALID_ARGUMENT` for payloads it could not decode.
fn failure_to_api(message: &str) -> ApiError {
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

fn update_error(e: WorkflowUpdateError) -> ApiError {
    match e {
        WorkflowUpdateError::Failed(f) => failure_to_api(&f.message),
        WorkflowUpdateError::NotFound(_) => {
            ApiError::not_found("the pool workflow is not running; start it with murmur pool up")
        }
        other => rpc_error(&other.to_string()),
    }
}

fn update_with_start_error(e: WorkflowUpdateWithStartError) -> ApiError {
    match e {
        WorkflowUpdateWithStartError::Update(u) => update_error(u),
        other => rpc_error(&other.to_string()),
    }
}

fn query_error(e: WorkflowQueryError, tenant: &str) -> ApiError {
    match e {
        WorkflowQueryError::NotFound(_) => ApiError::not_found(format!(
            "the pool of tenant {tenant} is not running; start it with murmur pool up"
        )),
        other => rpc_error(&other.to_string()),
    }
}

fn rpc_error(text: &str) -> ApiError {
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
}
