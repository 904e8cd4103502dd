//! Agent operations the CLI offers: spawn, kill, sleep, wake, on-idle, status, list, wait.
//! Each maps onto the
//! agent workflow (`agent/<tenant>/<workspace>/<developer>/<slug>`) and the error contract.

use std::time::{Duration, Instant};

use futures::StreamExt;
use murmur_activities::temporal_ops::{
    SA_KIND, SA_TENANT, SA_WORKSPACE, claim_state, interaction_error, query_error, rpc_error,
    search_attributes, update_error, update_with_start_error,
};
use murmur_workflows::agent::{
    AgentInput, AgentStatus, KillRequest, OnIdle, OnIdleRequest, Phase, PowerRequest,
    agent_workflow_id,
};
use murmur_workflows::agent_workflow::AgentWorkflow;
use murmur_workflows::auth::ops;
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::ClaimState;
use murmur_workflows::model::VmId;
use serde::{Deserialize, Serialize};
use temporalio_client::errors::{WorkflowStartError, WorkflowUpdateWithStartError};
use temporalio_client::{
    Client, WorkflowDescribeOptions, WorkflowExecuteUpdateOptions, WorkflowExecutionStatus,
    WorkflowGetResultOptions, WorkflowHandle, WorkflowIdConflictPolicy, WorkflowIdReusePolicy,
    WorkflowListOptions, WorkflowQueryOptions, WorkflowUpdateWithStartOptions,
};
use temporalio_common::MemoValues;

use crate::config::Context;

/// How long `murmur status` waits for the pool to say where a waiting claim stands before it
/// shows the position the agent was given.
const LIVE_POSITION_WITHIN: Duration = Duration::from_secs(2);

/// Hint printed under a `NOT_FOUND` about an agent.
pub const NOT_FOUND_HINT: &str = "Check the slug spelling. Use murmur ls to see running agents.";

/// An agent's workflow handle, its execution status and run id.
type Found = (
    WorkflowHandle<Client, AgentWorkflow>,
    WorkflowExecutionStatus,
    String,
);

/// True when an update-with-start failed although its start was this call's own: the server
/// deduplicated it against the run an earlier try of the same call started (`StartDeduped`,
/// which the server gives only as text in the failure's details).
fn started_by_this_call(error: &WorkflowUpdateWithStartError) -> bool {
    format!("{error:?}").contains("StartDeduped")
}

/// One row of `murmur ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRow {
    /// The agent's slug.
    pub slug: String,
    /// The developer who started it.
    pub developer: String,
    /// Its phase, lower case (`running`).
    pub phase: String,
    /// Its VM, when it holds one.
    pub vm: Option<VmId>,
    /// The agent's workflow id.
    pub workflow: String,
}

/// Agent operations of one developer in one workspace.
pub struct AgentClient {
    client: Client,
    ctx: Context,
    task_queue: String,
}

impl AgentClient {
    /// Operations on `ctx`'s agents through `client`.
    pub fn new(client: Client, ctx: Context) -> Self {
        Self {
            client,
            ctx,
            task_queue: crate::client::task_queue(),
        }
    }

    /// The workflow id of the developer's agent `slug` in the current workspace.
    pub fn workflow_id(&self, slug: &str) -> String {
        agent_workflow_id(
            &self.ctx.tenant,
            &self.ctx.workspace,
            &self.ctx.developer,
            slug,
        )
    }

    fn not_found(slug: &str) -> ApiError {
        ApiError::not_found(format!("no agent with slug {slug}"))
    }

    /// Starts an agent and answers once the pool accepted its claim (or refused it, with the
    /// pool's `CODE: reason`).
    pub async fn spawn(
        &self,
        slug: &str,
        command: Vec<String>,
        on_idle: OnIdle,
    ) -> Result<AgentStatus, ApiError> {
        let mut input = AgentInput {
            tenant: self.ctx.tenant.clone(),
            workspace: self.ctx.workspace.clone(),
            developer: self.ctx.developer.clone(),
            slug: slug.to_string(),
            command,
            on_idle,
            auth: None,
        };
        input.validate()?;
        input.auth = Some(self.ctx.sign(ops::SPAWN, &input.workflow_id(), &input)?);
        let options = WorkflowUpdateWithStartOptions::new(
            self.task_queue.clone(),
            input.workflow_id(),
            WorkflowIdConflictPolicy::Fail,
        )
        .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
        .search_attributes(search_attributes(
            &self.ctx.tenant,
            "agent",
            Some(&self.ctx.workspace),
        ))
        .memo(agent_memo(&input))
        .static_summary(format!("agent {slug}: {}", input.command.join(" ")))
        .build();
        // An agent of this slug that has just ended (a refused spawn, say) may still be
        // closing: wait for it once instead of failing.
        for attempt in 0..2 {
            let result = self
                .client
                .execute_update_with_start_workflow(
                    AgentWorkflow::run,
                    input.clone(),
                    AgentWorkflow::admission,
                    ().into(),
                    options.clone(),
                )
                .await;
            match result {
                Ok(status) => return Ok(status),
                Err(WorkflowUpdateWithStartError::Start(WorkflowStartError::AlreadyStarted {
                    ..
                })) => {
                    if attempt == 0 && self.is_ending(slug).await {
                        continue;
                    }
                    return Err(ApiError::failed_precondition(format!(
                        "agent {slug} is already running; kill it first (murmur kill {slug}) or pick another slug"
                    )));
                }
                Err(other) => {
                    // A start the server matched to this call's own earlier try (its answer
                    // lost, say with a worker killed mid-spawn) whose run closed before a
                    // retry could hear its admission: the spawn took effect if the run was
                    // admitted, and its status says how it went.
                    if started_by_this_call(&other)
                        && let Ok(status) = self.status(slug).await
                        && status.reached.contains(&Phase::Running)
                    {
                        return Ok(status);
                    }
                    return Err(update_with_start_error(
                        other,
                        "the agent ended before it was admitted",
                    ));
                }
            }
        }
        Err(ApiError::failed_precondition(format!(
            "agent {slug} is already running; kill it first (murmur kill {slug}) or pick another slug"
        )))
    }

    /// True when the running agent `slug` is in a terminal phase (its workflow is closing);
    /// waits (briefly) for it to close.
    async fn is_ending(&self, slug: &str) -> bool {
        let Ok(status) = self.status(slug).await else {
            return false;
        };
        if !status.phase.is_some_and(Phase::is_terminal) {
            return false;
        }
        let handle = self
            .client
            .get_workflow_handle::<AgentWorkflow>(self.workflow_id(slug));
        let wait = handle.get_result(WorkflowGetResultOptions::default());
        let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        true
    }

    /// The agent's workflow handle, execution status and run id; `NOT_FOUND` for an unknown
    /// slug.
    async fn find(&self, slug: &str) -> Result<Found, ApiError> {
        murmur_workflows::agent::validate_slug(slug)?;
        let handle = self
            .client
            .get_workflow_handle::<AgentWorkflow>(self.workflow_id(slug));
        let description = handle
            .describe(WorkflowDescribeOptions::default())
            .await
            .map_err(|e| interaction_error(e, &Self::not_found(slug).message))?;
        Ok((
            handle,
            description.status(),
            description.run_id().to_string(),
        ))
    }

    /// The agent's status. An agent terminated from outside (a nuke) shows as canceled.
    pub async fn status(&self, slug: &str) -> Result<AgentStatus, ApiError> {
        Ok(self.status_of_run(slug).await?.0)
    }

    /// The agent's status and the run id of its latest workflow run.
    pub async fn status_of_run(&self, slug: &str) -> Result<(AgentStatus, String), ApiError> {
        let (handle, state, run_id) = self.find(slug).await?;
        let mut status = crate::client::patiently(|| {
            handle.query(AgentWorkflow::status, (), WorkflowQueryOptions::default())
        })
        .await
        .map_err(|e| query_error(e, &Self::not_found(slug).message))?;
        match state {
            WorkflowExecutionStatus::Terminated => status.phase = Some(Phase::Canceled),
            WorkflowExecutionStatus::TimedOut => status.phase = Some(Phase::Failed),
            _ => {}
        }
        if status.queue_position.is_some() && state == WorkflowExecutionStatus::Running {
            status.queue_position = self
                .live_queue_position(&format!("{}@{run_id}", status.workflow))
                .await
                .or(status.queue_position);
        }
        Ok((status, run_id))
    }

    /// Where a waiting claim stands in the pool's line now. A queued agent only learns its
    /// position when it claims (it waits for the pool's signal, not asking again), so the
    /// position an agent reports is the one it was given; this asks the pool. `None` when the
    /// pool does not say (not waiting any more, or not answering): the agent's own stands.
    async fn live_queue_position(&self, request: &str) -> Option<u32> {
        let answer = claim_state(
            &self.client,
            &self.ctx.tenant,
            request,
            LIVE_POSITION_WITHIN,
        );
        match answer.await {
            Some(Ok(ClaimState::Waiting { position })) => Some(position),
            _ => None,
        }
    }

    /// Cancels the agent and waits until it has ended (its VM destroyed).
    pub async fn kill(&self, slug: &str) -> Result<(), ApiError> {
        let (handle, run_id) = self.running(slug).await?;
        // Signed for this run only: a copy cannot kill a later agent of the same slug.
        let mut req = KillRequest { auth: None };
        let target = format!("{}@{run_id}", self.workflow_id(slug));
        req.auth = Some(self.ctx.sign(ops::KILL, &target, &req)?);
        handle
            .execute_update(
                AgentWorkflow::kill,
                req.into(),
                WorkflowExecuteUpdateOptions::default(),
            )
            .await
            .map_err(|e| update_error(e, &Self::not_found(slug).message))?;
        // The result is the cancellation; what matters is that cleanup has run.
        let _ = handle.get_result(WorkflowGetResultOptions::default()).await;
        Ok(())
    }

    /// Puts the agent's VM to sleep; answers once it is asleep (`PHASE_SLEEPING`).
    pub async fn sleep(&self, slug: &str) -> Result<AgentStatus, ApiError> {
        self.power(slug, true).await
    }

    /// Wakes the agent's VM; answers once it is awake.
    pub async fn wake(&self, slug: &str) -> Result<AgentStatus, ApiError> {
        self.power(slug, false).await
    }

    async fn power(&self, slug: &str, asleep: bool) -> Result<AgentStatus, ApiError> {
        let (handle, run_id) = self.running(slug).await?;
        // Signed for this run only, like a kill.
        let target = format!("{}@{run_id}", self.workflow_id(slug));
        let mut req = PowerRequest { auth: None };
        let op = if asleep { ops::SLEEP } else { ops::WAKE };
        req.auth = Some(self.ctx.sign(op, &target, &req)?);
        let update = if asleep {
            handle
                .execute_update(
                    AgentWorkflow::sleep,
                    req.into(),
                    WorkflowExecuteUpdateOptions::default(),
                )
                .await
        } else {
            handle
                .execute_update(
                    AgentWorkflow::wake,
                    req.into(),
                    WorkflowExecuteUpdateOptions::default(),
                )
                .await
        };
        update.map_err(|e| update_error(e, &Self::not_found(slug).message))
    }

    /// Sets what the agent does the next time it goes idle (`sleep` or `keep-alive`).
    pub async fn set_on_idle(&self, slug: &str, on_idle: OnIdle) -> Result<AgentStatus, ApiError> {
        if on_idle == OnIdle::Terminate {
            return Err(ApiError::invalid_argument(
                "--on-idle terminate cannot be set at runtime (use sleep or keep-alive)",
            ));
        }
        let (handle, run_id) = self.running(slug).await?;
        let target = format!("{}@{run_id}", self.workflow_id(slug));
        let mut req = OnIdleRequest {
            on_idle,
            auth: None,
        };
        req.auth = Some(self.ctx.sign(ops::ON_IDLE, &target, &req)?);
        handle
            .execute_update(
                AgentWorkflow::on_idle,
                req.into(),
                WorkflowExecuteUpdateOptions::default(),
            )
            .await
            .map_err(|e| update_error(e, &Self::not_found(slug).message))
    }

    /// The handle and run id of the agent's running workflow; `FAILED_PRECONDITION` when it
    /// has ended.
    async fn running(
        &self,
        slug: &str,
    ) -> Result<(WorkflowHandle<Client, AgentWorkflow>, String), ApiError> {
        let (handle, state, run_id) = self.find(slug).await?;
        if state != WorkflowExecutionStatus::Running {
            return Err(ApiError::failed_precondition(format!(
                "agent {slug} has already ended ({})",
                closed_phase(state).as_str()
            )));
        }
        Ok((handle, run_id))
    }

    /// Agents in the current workspace: the developer's own, or every developer's with
    /// `every_developer`; running ones, or ended ones too with `ended`. Sorted by developer,
    /// then slug.
    pub async fn list(
        &self,
        ended: bool,
        every_developer: bool,
    ) -> Result<Vec<AgentRow>, ApiError> {
        let mut query = format!(
            "{} = '{}' AND {} = 'agent' AND {} = '{}'",
            SA_TENANT.name(),
            self.ctx.tenant,
            SA_KIND.name(),
            SA_WORKSPACE.name(),
            self.ctx.workspace
        );
        if !ended {
            query.push_str(" AND ExecutionStatus = 'Running'");
        }
        // agent/<tenant>/<workspace>/ for every developer, .../<developer>/ for one.
        let in_workspace = format!(
            "{}/",
            agent_workflow_id(&self.ctx.tenant, &self.ctx.workspace, "", "").trim_end_matches('/')
        );
        let prefix = if every_developer {
            in_workspace.clone()
        } else {
            agent_workflow_id(
                &self.ctx.tenant,
                &self.ctx.workspace,
                &self.ctx.developer,
                "",
            )
        };
        let mut stream = self
            .client
            .list_workflows(query, WorkflowListOptions::default());
        let mut found: Vec<(String, WorkflowExecutionStatus)> = Vec::new();
        while let Some(item) = stream.next().await {
            let wf = item.map_err(|e| rpc_error(&e.to_string()))?;
            let id = wf.id().to_string();
            // Newest run first; older runs of a reused slug are skipped.
            if id.starts_with(&prefix) && !found.iter().any(|(f, _)| f == &id) {
                found.push((id, wf.status()));
            }
        }
        let mut rows = Vec::new();
        for (id, state) in found {
            // Developers hold no `/` (token issue refuses them), slugs are DNS labels.
            let Some((developer, slug)) = id
                .strip_prefix(&in_workspace)
                .and_then(|rest| rest.split_once('/'))
                .map(|(d, s)| (d.to_string(), s.to_string()))
            else {
                continue;
            };
            let row = if state == WorkflowExecutionStatus::Running {
                let st = self
                    .client
                    .get_workflow_handle::<AgentWorkflow>(id.clone())
                    .query(AgentWorkflow::status, (), WorkflowQueryOptions::default())
                    .await
                    .ok();
                AgentRow {
                    slug,
                    developer,
                    phase: st
                        .as_ref()
                        .and_then(|s| s.phase)
                        .unwrap_or(Phase::Starting)
                        .short(),
                    vm: st.and_then(|s| s.vm),
                    workflow: id,
                }
            } else {
                AgentRow {
                    slug,
                    developer,
                    phase: closed_phase(state).short(),
                    vm: None,
                    workflow: id,
                }
            };
            rows.push(row);
        }
        rows.sort_by(|a, b| (&a.developer, &a.slug).cmp(&(&b.developer, &b.slug)));
        Ok(rows)
    }

    /// Waits until the agent reaches `phase` (or went through it), or ends. Calls `progress`
    /// on every phase change. Fails with `FAILED_PRECONDITION` when the agent ended without
    /// reaching it, and after `timeout`.
    pub async fn wait(
        &self,
        slug: &str,
        phase: Phase,
        timeout: Option<Duration>,
        mut progress: impl FnMut(&AgentStatus),
    ) -> Result<AgentStatus, ApiError> {
        let started = Instant::now();
        let mut last = None;
        loop {
            let st = self.status(slug).await?;
            if st.phase != last {
                progress(&st);
                last = st.phase;
            }
            if st.has_reached(phase) {
                return Ok(st);
            }
            if let Some(now) = st.phase
                && now.is_terminal()
            {
                return Err(ApiError::failed_precondition(format!(
                    "agent {slug} ended in {now} without reaching {phase}"
                )));
            }
            if timeout.is_some_and(|t| started.elapsed() >= t) {
                return Err(ApiError::new(
                    Code::FailedPrecondition,
                    format!(
                        "agent {slug} did not reach {phase} within {} (it is in {})",
                        crate::duration::format_duration(timeout.unwrap_or_default()),
                        st.phase.map_or("no phase yet", Phase::as_str)
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the Web UI's memo shows for an agent: where it runs, who started it, what it runs.
fn agent_memo(input: &AgentInput) -> MemoValues {
    let mut memo = MemoValues::new();
    memo.insert("workspace", input.workspace.clone());
    memo.insert("developer", input.developer.clone());
    memo.insert("command", input.command.join(" "));
    memo.insert("on_idle", input.on_idle.as_str().to_string());
    memo
}

/// The phase of an agent workflow that is no longer running.
fn closed_phase(status: WorkflowExecutionStatus) -> Phase {
    match status {
        WorkflowExecutionStatus::Completed => Phase::Completed,
        WorkflowExecutionStatus::Canceled | WorkflowExecutionStatus::Terminated => Phase::Canceled,
        _ => Phase::Failed,
    }
}
