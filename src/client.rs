//! Talking to Temporal: connecting like the `temporal` CLI does, and the pool operations the
//! CLI offers (flush, status, up, get/set/patch), each mapped onto the error contract.

use std::time::Duration;

use murmur_activities::temporal_ops::update_pool;
use murmur_workflows::auth::ops;
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::ConfigChange;
use murmur_workflows::messages::{
    ConfigRequest, ConfigSnapshot, FlushReply, FlushRequest, Inventory, InventoryPage, UpReply,
    UpRequest, encode_json,
};
use murmur_workflows::model::ResourceDoc;
use murmur_workflows::nuke_workflow::{
    NukeInput, NukeProgress, NukeReport, NukeWorkflow, nuke_workflow_id,
};
use murmur_workflows::pool_workflow::{PoolWorkflow, pool_workflow_id};
use murmur_workflows::status::PoolStatus;
use temporalio_client::envconfig::LoadClientConfigProfileOptions;
use temporalio_client::{
    Client, ClientOptions, Connection, WorkflowDescribeOptions, WorkflowExecutionStatus,
    WorkflowGetResultOptions, WorkflowIdConflictPolicy, WorkflowIdReusePolicy,
    WorkflowQueryOptions, WorkflowStartOptions,
};

use crate::config::Context;

/// The longest a read waits for the pool's answer while nothing says that the answer cannot
/// come. After a worker dies holding the pool's workflow task, the server gives that task 10 s
/// before handing it to another worker, which then replays the history: an answer can take
/// that long.
const POOL_ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// How often a read that waits for the pool checks that its answer can still come (the pool
/// runs, its workflow task is not failing over and over, a worker polls its task queue).
const CHECK_ANSWER_EVERY: Duration = Duration::from_secs(3);

/// How long a config read waits for the running pool before reading the record its run keeps.
const CONFIG_ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A worker that has not polled a task queue for this long is not polling it (a long poll
/// lasts up to about 70 s).
const POLLER_GONE_AFTER: Duration = Duration::from_secs(90);

pub use murmur_activities::temporal_ops::{SA_KIND, SA_TENANT, SA_WORKSPACE};

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

/// Where and how to reach Temporal, as the `temporal` CLI's global flags say it. Unset fields
/// fall back to the environment (`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_PROFILE`,
/// `TEMPORAL_CONFIG_FILE`, TLS and API-key variables), then the config file's profile, then
/// `localhost:7233` and `default`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TemporalOptions {
    /// The server's `host:port` (or URL); overrides the profile's and the environment's.
    pub address: Option<String>,
    /// The namespace; overrides the profile's and the environment's.
    pub namespace: Option<String>,
    /// The config file's profile to load (default: `default`).
    pub profile: Option<String>,
    /// The TOML config file (default: the `temporal` CLI's,
    /// `~/.config/temporalio/temporal.toml`).
    pub config_file: Option<std::path::PathBuf>,
}

/// Connects with the same settings as the `temporal` CLI (`TEMPORAL_ADDRESS`,
/// `TEMPORAL_NAMESPACE`, TLS and API key variables, config profiles).
pub async fn connect(identity: &str) -> Result<Client, ApiError> {
    connect_with(identity, &TemporalOptions::default()).await
}

/// The connection and client options `options` select: the config file's profile, the
/// environment over it, `options`' address and namespace over both.
pub fn load_options(
    options: &TemporalOptions,
) -> Result<(temporalio_client::ConnectionOptions, ClientOptions), ApiError> {
    use temporalio_client::envconfig::DataSource;
    let invalid = |e: &dyn std::fmt::Display| {
        ApiError::invalid_argument(format!("Temporal client configuration: {e}"))
    };
    // A file that is named must exist (the SDK reads an absent one as empty).
    if let Some(path) = &options.config_file
        && !path.is_file()
    {
        return Err(ApiError::invalid_argument(format!(
            "Temporal config file {} does not exist",
            path.display()
        )));
    }
    let load = LoadClientConfigProfileOptions::builder()
        .maybe_config_source(
            options
                .config_file
                .as_ref()
                .map(|p| DataSource::Path(p.display().to_string())),
        )
        .maybe_config_file_profile(options.profile.clone())
        .build();
    let mut profile = temporalio_common::envconfig::load_client_config_profile(load, None)
        .map_err(|e| invalid(&e))?;
    if let Some(address) = options.address.as_ref().filter(|a| !a.is_empty()) {
        profile.address = Some(address.clone());
    }
    if let Some(namespace) = options.namespace.as_ref().filter(|n| !n.is_empty()) {
        profile.namespace = Some(namespace.clone());
    }
    let namespace = profile
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let conn_opts =
        temporalio_client::ConnectionOptions::try_from(profile).map_err(|e| invalid(&e))?;
    Ok((conn_opts, ClientOptions::new(namespace).build()))
}

/// Connects as [`connect`] does, with `options` over the environment and config file.
pub async fn connect_with(identity: &str, options: &TemporalOptions) -> Result<Client, ApiError> {
    let (mut conn_opts, client_opts) = load_options(options)?;
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

    fn handle(&self) -> temporalio_client::WorkflowHandle<Client, PoolWorkflow> {
        self.client
            .get_workflow_handle::<PoolWorkflow>(self.workflow_id())
    }

    fn not_running(&self) -> String {
        format!(
            "the pool of tenant {} is not running; start it with murmur pool up",
            self.ctx.tenant
        )
    }

    /// Nukes the tenant: terminates every agent, deletes every VM, resets the pool. Joins a
    /// nuke that is already running instead of starting another; answers when it is done.
    pub async fn nuke(
        &self,
        mut progress: impl FnMut(&NukeProgress),
    ) -> Result<NukeReport, ApiError> {
        let mut input = NukeInput {
            tenant: self.ctx.tenant.clone(),
            actor: Some(self.ctx.developer.clone()),
            auth: None,
            authorized_request: None,
        };
        let target = nuke_workflow_id(&self.ctx.tenant);
        input.auth = Some(self.ctx.sign(ops::NUKE, &target, &input)?);
        let options =
            WorkflowStartOptions::new(self.task_queue.clone(), nuke_workflow_id(&self.ctx.tenant))
                .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
                .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
                .search_attributes(murmur_activities::temporal_ops::search_attributes(
                    &self.ctx.tenant,
                    "nuke",
                    None,
                ))
                .static_summary(format!(
                    "nuke of tenant {} by {}",
                    self.ctx.tenant, self.ctx.developer
                ))
                .build();
        let handle = self
            .client
            .start_workflow(NukeWorkflow::run, input, options)
            .await
            .map_err(|e| murmur_activities::temporal_ops::rpc_error(&e.to_string()))?;
        // Report the nuke's steps while waiting for its result.
        let result = handle.get_result(WorkflowGetResultOptions::default());
        tokio::pin!(result);
        let outcome = loop {
            tokio::select! {
                out = &mut result => break out,
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                    if let Ok(p) = handle
                        .query(NukeWorkflow::progress, (), WorkflowQueryOptions::default())
                        .await
                    {
                        progress(&p);
                    }
                }
            }
        };
        outcome.map_err(|e| {
            let text = format!("{e:?}");
            ApiError::find_in(&text).unwrap_or_else(|| {
                ApiError::new(Code::Internal, format!("nuke did not complete: {e}"))
            })
        })
    }

    /// Flushes the pool (starting it if needed); answers once the flushed VMs are gone.
    pub async fn flush(&self) -> Result<FlushReply, ApiError> {
        let req = self.signed_flush(false)?;
        let req = encode_json(&req)
            .map_err(|e| ApiError::new(Code::Internal, format!("encode flush request: {e}")))?;
        update_pool(
            &self.client,
            &self.ctx.tenant,
            &self.task_queue,
            PoolWorkflow::flush,
            req,
        )
        .await
    }

    /// A flush (or, with `nuke`, nuke) request for this pool, signed with the developer's key:
    /// what `murmur auth sign` prints for the `temporal` CLI.
    pub fn signed_flush(&self, nuke: bool) -> Result<FlushRequest, ApiError> {
        let mut req = FlushRequest {
            nuke,
            actor: Some(self.ctx.developer.clone()),
            workspace: Some(self.ctx.workspace.clone()),
            auth: None,
        };
        let op = if nuke { ops::NUKE } else { ops::FLUSH };
        req.auth = Some(self.ctx.sign(op, &self.workflow_id(), &req)?);
        Ok(req)
    }

    /// Starts the pool if it is not running (a new run recovers the tenant's state first) and
    /// asks it to reconcile now.
    pub async fn up(&self) -> Result<UpReply, ApiError> {
        update_pool(
            &self.client,
            &self.ctx.tenant,
            &self.task_queue,
            PoolWorkflow::up,
            UpRequest {
                actor: Some(self.ctx.developer.clone()),
            }
            .into(),
        )
        .await
    }

    /// Ends the pool's current run (terminates it, with `reason`), so the next run recovers.
    /// A pool that is not running is fine.
    pub async fn end_run(&self, reason: &str) -> Result<(), ApiError> {
        let handle = self
            .client
            .get_workflow_handle::<temporalio_client::UntypedWorkflow>(self.workflow_id());
        let options = temporalio_client::WorkflowTerminateOptions::builder()
            .reason(reason.to_string())
            .build();
        match handle.terminate(options).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = murmur_activities::temporal_ops::interaction_error(e, "not running");
                if e.code == Code::NotFound || e.message.contains("already completed") {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The pool's status; when the pool does not answer, an `UNAVAILABLE` saying why (not
    /// running, its workflow task failing, no worker polling).
    /// A run that has ended still answers (a worker replays its history); then the status
    /// says so in `run_ended`.
    pub async fn status(&self) -> Result<PoolStatus, ApiError> {
        let handle = self.handle();
        let query =
            patiently(|| handle.query(PoolWorkflow::status, (), WorkflowQueryOptions::default()));
        let (status, ended) = tokio::join!(self.answered(query), self.run_ended());
        let mut status = status?;
        status.run_ended = ended;
        Ok(status)
    }

    /// How the pool's latest run ended (`terminated`, `cancelled`, ...), or `None` while it
    /// runs (or when Temporal cannot say).
    async fn run_ended(&self) -> Option<String> {
        let handle = self
            .client
            .get_workflow_handle::<temporalio_client::UntypedWorkflow>(self.workflow_id());
        let desc = handle
            .describe(WorkflowDescribeOptions::default())
            .await
            .ok()?;
        let status = desc.status();
        (status != WorkflowExecutionStatus::Running).then(|| ended_as(status))
    }

    /// One page of the VM records and claims.
    pub async fn inventory(&self, page: InventoryPage) -> Result<Inventory, ApiError> {
        let handle = self.handle();
        let query = patiently(|| {
            handle.query(
                PoolWorkflow::inventory,
                page.clone().into(),
                WorkflowQueryOptions::default(),
            )
        });
        self.answered(query).await
    }

    /// The build of the worker serving the pool.
    pub async fn worker_version(&self) -> Result<String, ApiError> {
        let handle = self.handle();
        let query =
            patiently(|| handle.query(PoolWorkflow::version, (), WorkflowQueryOptions::default()));
        self.answered(query).await
    }

    /// Every resource of the tenant. Answers even when the pool does not: from the record
    /// its latest run keeps in its memo (a run that ended, or one that is wedged), or, while a
    /// new run recovers and has not written one yet, from the run before.
    pub async fn config(&self) -> Result<ConfigSnapshot, ApiError> {
        let handle = self.handle();
        let query = handle.query(PoolWorkflow::config, (), WorkflowQueryOptions::default());
        match tokio::time::timeout(CONFIG_ANSWER_WITHIN, query).await {
            Ok(Ok(snapshot)) if !snapshot.recovering => return Ok(snapshot),
            Ok(Err(temporalio_client::errors::WorkflowQueryError::NotFound(_))) => {
                return Err(ApiError::not_found(self.not_running()));
            }
            _ => {}
        }
        let record = murmur_activities::recovery::latest_record(&self.client, &self.ctx.tenant)
            .await
            .map_err(|e| ApiError::new(Code::Unavailable, e))?;
        match record {
            Some(record) => Ok(snapshot_of(record)),
            None => Err(self.why_no_answer().await),
        }
    }

    /// Waits for a query's answer; says why there is none as soon as it is clear that none
    /// can come, and at the latest after [`POOL_ANSWER_WITHIN`].
    async fn answered<T>(
        &self,
        query: impl std::future::Future<
            Output = Result<T, temporalio_client::errors::WorkflowQueryError>,
        >,
    ) -> Result<T, ApiError> {
        let started = tokio::time::Instant::now();
        tokio::pin!(query);
        loop {
            let error = match tokio::time::timeout(CHECK_ANSWER_EVERY, &mut query).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(temporalio_client::errors::WorkflowQueryError::NotFound(_))) => {
                    return Err(ApiError::not_found(self.not_running()));
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => None,
            };
            let queue = match self.diagnose().await {
                Diagnosis::CannotCome(why) => return Err(why),
                Diagnosis::MayCome { queue } => queue,
            };
            if error.is_some() || started.elapsed() >= POOL_ANSWER_WITHIN {
                return Err(self.no_answer(&format!(
                    "no answer within {}s although a worker polled its task queue {queue} lately (is it still running? see its log){}",
                    started.elapsed().as_secs(),
                    error.map(|e| format!("; the query failed: {e}")).unwrap_or_default()
                )));
            }
        }
    }

    /// Whether the pool can still answer: not when it does not run, when its workflow task
    /// fails again and again, or when no worker polls its task queue.
    async fn diagnose(&self) -> Diagnosis {
        let id = self.workflow_id();
        let handle = self
            .client
            .get_workflow_handle::<temporalio_client::UntypedWorkflow>(id.clone());
        let desc = match handle.describe(WorkflowDescribeOptions::default()).await {
            Ok(desc) => desc,
            Err(temporalio_client::errors::WorkflowInteractionError::NotFound(_)) => {
                return Diagnosis::CannotCome(ApiError::not_found(self.not_running()));
            }
            Err(e) => return Diagnosis::CannotCome(self.no_answer(&e.to_string())),
        };
        let status = desc.status();
        if status != WorkflowExecutionStatus::Running {
            return Diagnosis::CannotCome(ApiError::new(
                Code::Unavailable,
                format!(
                    "{id} is not running (its last run ended {}); murmur pool up starts a new run, which recovers the pool",
                    ended_as(status)
                ),
            ));
        }
        // A first retry follows a worker that died holding the task; more mean it fails.
        if let Some(task) = desc.raw_description.pending_workflow_task.as_ref()
            && task.attempt >= 3
        {
            return Diagnosis::CannotCome(self.no_answer(&format!(
                "its workflow task has failed {} times in a row (see the worker log; a build that cannot run it?)",
                task.attempt - 1
            )));
        }
        let queue = desc.task_queue().to_string();
        match self.pollers_of(&queue).await {
            Ok(0) => Diagnosis::CannotCome(self.no_answer(&format!(
                "no murmur-worker polls its task queue {queue} (start one: murmur-worker run --task-queue {queue})"
            ))),
            Ok(_) | Err(_) => Diagnosis::MayCome { queue },
        }
    }

    /// An `UNAVAILABLE` saying that the pool does not answer, and why.
    fn no_answer(&self, why: &str) -> ApiError {
        ApiError::new(
            Code::Unavailable,
            format!("{} does not answer: {why}", self.workflow_id()),
        )
    }

    /// Workers that polled the workflow task queue `queue` within [`POLLER_GONE_AFTER`].
    async fn pollers_of(&self, queue: &str) -> Result<usize, tonic::Status> {
        use temporalio_client::NamespacedClient;
        use temporalio_common::protos::temporal::api::enums::v1::{TaskQueueKind, TaskQueueType};
        use temporalio_common::protos::temporal::api::taskqueue::v1::TaskQueue;
        use temporalio_common::protos::temporal::api::workflowservice::v1::DescribeTaskQueueRequest;
        let request = DescribeTaskQueueRequest {
            namespace: self.client.namespace(),
            task_queue: Some(TaskQueue {
                name: queue.to_string(),
                kind: TaskQueueKind::Normal as i32,
                ..TaskQueue::default()
            }),
            task_queue_type: TaskQueueType::Workflow as i32,
            ..DescribeTaskQueueRequest::default()
        };
        let reply = self
            .client
            .connection()
            .workflow_service()
            .describe_task_queue(tonic::Request::new(request))
            .await?
            .into_inner();
        let now = std::time::SystemTime::now();
        Ok(reply
            .pollers
            .iter()
            .filter(|p| {
                p.last_access_time
                    .and_then(|t| std::time::SystemTime::try_from(t).ok())
                    .and_then(|t| now.duration_since(t).ok())
                    .is_none_or(|ago| ago < POLLER_GONE_AFTER)
            })
            .count())
    }

    /// Why the pool does not answer (when nothing is found wrong: which task queue it waits on).
    pub async fn why_no_answer(&self) -> ApiError {
        match self.diagnose().await {
            Diagnosis::CannotCome(why) => why,
            Diagnosis::MayCome { queue } => self.no_answer(&format!(
                "no answer in time although a worker polled its task queue {queue} lately (is it still running? see its log)"
            )),
        }
    }

    /// Applies a config change (starting the pool if needed) and returns the new document.
    pub async fn apply_config(
        &self,
        kind: &str,
        name: &str,
        change: ConfigChange,
    ) -> Result<ResourceDoc, ApiError> {
        let mut req = ConfigRequest {
            kind: kind.to_string(),
            name: name.to_string(),
            change,
            actor: Some(self.ctx.developer.clone()),
            auth: None,
        };
        req.auth = Some(self.ctx.sign(ops::CONFIG, &self.workflow_id(), &req)?);
        update_pool(
            &self.client,
            &self.ctx.tenant,
            &self.task_queue,
            PoolWorkflow::apply_config,
            req.into(),
        )
        .await
    }
}

/// The config snapshot of a pool's record.
fn snapshot_of(record: murmur_workflows::machine::PoolRecord) -> ConfigSnapshot {
    let mut pool = murmur_workflows::machine::Pool::new(record.tenant, 0, 0);
    pool.config = record.config;
    pool.workspaces = record.workspaces;
    let mut docs = pool.docs().into_iter();
    ConfigSnapshot {
        pool_config: docs.next().unwrap_or_else(|| pool.pool_config_doc()),
        workspaces: docs.collect(),
        recovering: false,
    }
}

/// Whether a pool that has not answered yet still can.
enum Diagnosis {
    /// It cannot; the error says why.
    CannotCome(ApiError),
    /// It may: it runs, and a worker polled its task queue `queue` lately.
    MayCome {
        /// The task queue of the pool's run.
        queue: String,
    },
}

/// How a run ended, as a word: `completed`, `failed`, `cancelled`, `terminated`,
/// `continued_as_new`, `timed_out`.
fn ended_as(status: WorkflowExecutionStatus) -> String {
    match status {
        WorkflowExecutionStatus::Completed => "completed",
        WorkflowExecutionStatus::Failed => "failed",
        WorkflowExecutionStatus::Canceled => "cancelled",
        WorkflowExecutionStatus::Terminated => "terminated",
        WorkflowExecutionStatus::ContinuedAsNew => "continued_as_new",
        WorkflowExecutionStatus::TimedOut => "timed_out",
        _ => "in an unknown way",
    }
    .to_string()
}

/// How long [`patiently`] asks a busy workflow again.
const BUSY_FOR_AT_MOST: Duration = POOL_ANSWER_WITHIN;

/// Pause between two questions to a busy workflow.
const BUSY_PAUSE: Duration = Duration::from_millis(250);

/// Sends a query (`ask`) and asks again while the workflow is busy: a workflow with a
/// workflow task in flight (e.g. on a worker just killed, until that task times out) holds
/// one query and refuses more with `ResourceExhausted` ("consistent query buffer is full").
/// That is a moment, not an answer; any other result is returned as it comes, and the last
/// refusal after [`BUSY_FOR_AT_MOST`].
pub(crate) async fn patiently<T, F>(
    ask: impl Fn() -> F,
) -> Result<T, temporalio_client::errors::WorkflowQueryError>
where
    F: std::future::Future<Output = Result<T, temporalio_client::errors::WorkflowQueryError>>,
{
    use temporalio_client::errors::WorkflowQueryError;
    let started = tokio::time::Instant::now();
    loop {
        match ask().await {
            Err(WorkflowQueryError::Rpc(status))
                if status.code() == tonic::Code::ResourceExhausted
                    && started.elapsed() < BUSY_FOR_AT_MOST =>
            {
                tracing::debug!(error = %status.message(), "the workflow is busy; asking again");
                tokio::time::sleep(BUSY_PAUSE).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod options_tests {
    use super::*;

    #[test]
    fn flags_override_the_profile_which_the_file_selects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("temporal.toml");
        std::fs::write(
            &file,
            "[profile.default]\naddress = \"file-default:7233\"\nnamespace = \"ns-default\"\n\n\
             [profile.prod]\naddress = \"prod.example:7233\"\nnamespace = \"ns-prod\"\n",
        )
        .unwrap();
        let mut options = TemporalOptions {
            profile: Some("prod".into()),
            config_file: Some(file.clone()),
            ..Default::default()
        };
        // The environment may set TEMPORAL_ADDRESS (the e2e harness does); flags win over it.
        if std::env::var_os("TEMPORAL_ADDRESS").is_none()
            && std::env::var_os("TEMPORAL_NAMESPACE").is_none()
        {
            let (conn, client) = load_options(&options).unwrap();
            assert_eq!(conn.target.as_str(), "http://prod.example:7233/");
            assert_eq!(client.namespace, "ns-prod");
        }
        options.address = Some("flag.example:7233".into());
        options.namespace = Some("ns-flag".into());
        let (conn, client) = load_options(&options).unwrap();
        assert_eq!(conn.target.as_str(), "http://flag.example:7233/");
        assert_eq!(client.namespace, "ns-flag");

        options.profile = Some("missing".into());
        let err = load_options(&options).unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{err}");
        options.profile = None;
        options.config_file = Some(dir.path().join("absent.toml"));
        assert!(load_options(&options).is_err());
    }
}
