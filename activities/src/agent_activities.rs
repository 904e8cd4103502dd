//! The activities of agents and nukes: claiming and releasing VMs through the pool workflow,
//! running an agent's command in its VM, and the nuke's steps (pause and reset the pool,
//! terminate every agent workflow, delete every VM a host holds).

// `#[activities]` generates an undocumented marker constant per activity; the activities
// themselves are documented below.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use murmur_workflows::activity_api::{
    CLAIM_REJECTED, ClaimInput, ListedVm, PoolPowerInput, PoolStepInput, PowerInput, PowerReport,
    ProbeClaimInput, ReleaseInput, RunInput, RunReport, STEP_REFUSED, TerminateAgentsInput,
    VM_LOST, VM_TAKEN, WipeListedInput, WipeReport,
};
use murmur_workflows::auth::{Credential, ops, unsigned_body};
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::{ClaimState, PowerState};
use murmur_workflows::messages::{
    Lenient, NukeStep, NukeStepReply, ReleaseReply, ReleaseRequest, VmPowerRequest,
};
use murmur_workflows::model::VmId;
use murmur_workflows::pool_workflow::{PoolWorkflow, pool_workflow_id};
use temporalio_client::{UntypedWorkflow, WorkflowExecuteUpdateOptions, WorkflowTerminateOptions};
use temporalio_common::{ActivityError, HasWorkflowDefinition, UpdateDefinition};
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::auth::KeyStore;
use crate::claim_batch::ClaimBatcher;
use crate::heartbeat::{with_heartbeats, with_progress};
use crate::substrate::{CommandSpec, CommandStatus, Provider, SubstrateError};
use crate::temporal_ops::{
    claim_state, interaction_error, query_error, running_runs, terminated_since, update_error,
    update_pool,
};

/// Longest a claim waits for the pool's answer: a pool that does not answer (no worker runs
/// its workflow tasks, or they keep failing) must not hold the agent's call forever; the
/// agent says so in its status and asks again.
const CLAIM_ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Terminations (nuke) and deletes (host wipe) in flight at once.
const NUKE_CONCURRENCY: usize = 8;

/// How much of an agent's output its status keeps.
pub const OUTPUT_TAIL_BYTES: usize = 4096;

use crate::meters::ClaimLatencies;

/// Activities that talk to the pool workflow, to Temporal's visibility, and to VMs. Their
/// requests to the pool are signed with the worker's key.
pub struct AgentActivities {
    provider: Arc<dyn Provider>,
    keys: KeyStore,
    claims: Arc<ClaimLatencies>,
    batcher: Arc<ClaimBatcher>,
}

impl AgentActivities {
    /// Activities over `provider`, signing with `keys`, recording claim latencies in `claims`.
    pub fn new(provider: Arc<dyn Provider>, keys: KeyStore, claims: Arc<ClaimLatencies>) -> Self {
        Self {
            provider,
            batcher: ClaimBatcher::new(keys.clone()),
            keys,
            claims,
        }
    }

    /// Sends a nuke step (signed with the worker key) to the pool, starting it if needed.
    async fn nuke_step<U>(
        &self,
        ctx: &ActivityContext,
        input: PoolStepInput,
        update: U,
    ) -> Result<NukeStepReply, ActivityError>
    where
        U: UpdateDefinition<
                Workflow = <PoolWorkflow as HasWorkflowDefinition>::Run,
                Input = Lenient<NukeStep>,
                Output = NukeStepReply,
            >,
    {
        let mut step = input.step;
        step.auth = Some(self.sign(ops::NUKE_STEP, &input.tenant, &step)?);
        let client = ctx.client();
        let call = update_pool(
            &client,
            &input.tenant,
            &ctx.info().task_queue,
            update,
            step.into(),
        );
        with_heartbeats(ctx, call).await?.map_err(|e| match e.code {
            Code::Unavailable | Code::Internal => retryable(e),
            // The pool refused the step (a replayed or stale request): final.
            _ => ActivityError::application(
                ApplicationFailure::builder(e)
                    .type_name(STEP_REFUSED.to_string())
                    .non_retryable(true)
                    .build(),
            ),
        })
    }

    /// Puts the VM to sleep (`asleep`) or wakes it, heartbeating, once the asker is known
    /// to own it.
    async fn power(
        &self,
        ctx: &ActivityContext,
        input: &PowerInput,
        asleep: bool,
    ) -> Result<PowerReport, ActivityError> {
        let started = Instant::now();
        self.check_owner(input)?;
        let (tenant, vm) = (input.tenant.as_str(), &input.vm);
        let done = if asleep {
            with_heartbeats(ctx, self.provider.sleep(tenant, vm)).await?
        } else {
            with_heartbeats(ctx, self.provider.wake(tenant, vm)).await?
        };
        done.map_err(|e| run_failure(vm, e))?;
        let took_ms = started.elapsed().as_millis() as u64;
        let what = if asleep { "vm asleep" } else { "vm awake" };
        let frees_memory = asleep && self.provider.sleep_frees_memory();
        tracing::info!(tenant, vm = %vm, took_ms, frees_memory, "{what}");
        Ok(PowerReport {
            took_ms,
            frees_memory,
        })
    }

    /// Refuses to put to sleep or wake a VM another agent owns ([`VM_TAKEN`]); records the
    /// asker as the owner of a VM nobody owns yet (the agent was about to start on it).
    fn check_owner(&self, input: &PowerInput) -> Result<(), ActivityError> {
        self.provider
            .claim_owner(&input.tenant, &input.vm, &input.owner)
            .map_err(|e| run_failure(&input.vm, e))
    }

    /// Signs a worker-internal request to `pool/<tenant>` (any `auth` the message carries is
    /// not part of what is signed).
    fn sign<T: serde::Serialize>(
        &self,
        op: &str,
        tenant: &str,
        message: &T,
    ) -> Result<Credential, ActivityError> {
        self.keys
            .sign_service(op, &pool_workflow_id(tenant), &unsigned_body(message))
            .map_err(|e| ActivityError::application(ApplicationFailure::new(e)))
    }
}

/// False only when the agent run named by a claim request (`<workflow id>@<run id>`) is
/// known to have ended: its workflow's current run is another one, or not running. A failed
/// lookup says true (the claim goes on; the reaper is the backstop).
async fn run_is_running(client: &temporalio_client::Client, request: &str) -> bool {
    let Some((workflow, run)) = request.rsplit_once('@') else {
        return true;
    };
    match client
        .get_workflow_handle::<UntypedWorkflow>(workflow.to_string())
        .describe(temporalio_client::WorkflowDescribeOptions::default())
        .await
    {
        Ok(d) => {
            d.run_id() == run && d.status() == temporalio_client::WorkflowExecutionStatus::Running
        }
        Err(_) => true,
    }
}

#[activities]
impl AgentActivities {
    /// Sends a claim to the tenant's pool (starting the pool if it is not running). A refusal
    /// (`CODE: reason`) fails without retry.
    #[activity(name = "murmur.claim_vm")]
    pub async fn claim_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: ClaimInput,
    ) -> Result<ClaimState, ActivityError> {
        let client = ctx.client();
        // A local activity can outlive its workflow run: a run terminated (by a nuke) while
        // its claim was in flight, replayed later to answer a query, asks again. Such a
        // ghost's claim would hold a VM nobody releases until the reaper notices, so it is
        // not sent.
        if !input.probe && !run_is_running(&client, &input.claim.request).await {
            return Err(api_failure(ApiError::failed_precondition(format!(
                "agent run {} has ended; its claim is not sent",
                input.claim.request
            ))));
        }
        let call = self.batcher.claim(
            &client,
            &input.tenant,
            &ctx.info().task_queue,
            input.claim.clone(),
        );
        let answer = tokio::time::timeout(CLAIM_ANSWER_WITHIN, with_heartbeats(&ctx, call))
            .await
            .map_err(|_| {
                retryable(ApiError::new(
                    Code::Unavailable,
                    format!(
                        "pool/{} did not answer within {}s",
                        input.tenant,
                        CLAIM_ANSWER_WITHIN.as_secs()
                    ),
                ))
            })?;
        let state = answer?.map_err(api_failure)?;
        if let ClaimState::Assigned { vm, .. } = &state
            && !input.probe
        {
            let seconds = crate::auth::now_ms().saturating_sub(input.started_at) as f64 / 1000.0;
            let warm = !input.claim.wait;
            self.claims.record(warm, seconds);
            tracing::info!(tenant = %input.tenant, agent = %input.claim.agent, vm = %vm,
                workspace = %input.claim.workspace, warm, claim_ms = (seconds * 1000.0) as u64,
                "vm handed out");
        }
        Ok(state)
    }

    /// Tells the pool an agent ended so it deletes the agent's VM. Without a running pool it
    /// answers so (`pool_running: false`): the agent then deletes its VM on the VM's own host.
    #[activity(name = "murmur.release_vm")]
    pub async fn release_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: ReleaseInput,
    ) -> Result<ReleaseReply, ActivityError> {
        let mut req = ReleaseRequest {
            request: input.request.clone(),
            auth: None,
        };
        req.auth = Some(self.sign(ops::RELEASE, &input.tenant, &req)?);
        let reply =
            update_running_pool(&ctx, &input.tenant, PoolWorkflow::release, req.into()).await?;
        Ok(reply.unwrap_or(ReleaseReply {
            vm: input.vm,
            gone: false,
            pool_running: false,
        }))
    }

    /// Asks the pool where a claim stands through its `claim_state` query (no update).
    #[activity(name = "murmur.probe_claim")]
    pub async fn probe_claim(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: ProbeClaimInput,
    ) -> Result<ClaimState, ActivityError> {
        match claim_state(
            &ctx.client(),
            &input.tenant,
            &input.request,
            CLAIM_ANSWER_WITHIN,
        )
        .await
        {
            Some(Ok(state)) => Ok(state),
            Some(Err(e)) => Err(retryable(query_error(e, "not running"))),
            None => Err(retryable(ApiError::new(
                Code::Unavailable,
                format!(
                    "pool/{} did not answer within {}s",
                    input.tenant,
                    CLAIM_ANSWER_WITHIN.as_secs()
                ),
            ))),
        }
    }

    /// Tells the pool an agent's VM went to sleep without host memory, or asks to wake it.
    /// Without a running pool it answers `Unknown` (the VM counts as it did).
    #[activity(name = "murmur.pool_power")]
    pub async fn pool_power(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PoolPowerInput,
    ) -> Result<PowerState, ActivityError> {
        let mut req = VmPowerRequest {
            request: input.request.clone(),
            vm: input.vm.clone(),
            change: input.change,
            auth: None,
        };
        req.auth = Some(self.sign(ops::VM_POWER, &input.tenant, &req)?);
        let state =
            update_running_pool(&ctx, &input.tenant, PoolWorkflow::vm_power, req.into()).await?;
        Ok(state.unwrap_or(PowerState::Unknown))
    }

    /// Runs the agent's command in its VM and waits for it to exit, heartbeating. Idempotent
    /// by run id: a retry (after a worker crash) attaches to the command already running.
    /// Cancelling the activity stops the command. Heartbeats from its own status loop, not
    /// through [`with_heartbeats`]: a cancellation must reach the command, not just drop the
    /// activity's work.
    #[activity(name = "murmur.run_agent")]
    pub async fn run_agent(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: RunInput,
    ) -> Result<RunReport, ActivityError> {
        let started = Instant::now();
        let spec = CommandSpec {
            run: input.run.clone(),
            argv: input.command.clone(),
            env: vec![("MURMUR_AGENT".to_string(), input.slug.clone())],
        };
        let (tenant, vm) = (input.tenant.as_str(), &input.vm);
        // A VM put to sleep before its command started (or a retry while it sleeps): the
        // command starts once it wakes.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while self.provider.is_asleep(tenant, vm) {
            tokio::select! {
                _ = ctx.cancelled() => return Err(ActivityError::cancelled()),
                _ = tick.tick() => {}
            }
            let _ = ctx.record_heartbeat(started.elapsed().as_secs()).await;
        }
        if !input.owner.is_empty() {
            // The VM's one owner, first come first served (a recovered pool may have handed
            // it out again, or deleted it, before this agent started on it). Nothing of the
            // agent ran yet, so a VM that is gone is as good as taken: it claims again.
            self.provider
                .claim_owner(tenant, vm, &input.owner)
                .map_err(|e| match e {
                    SubstrateError::VmGone(vm) => SubstrateError::Taken {
                        vm,
                        owner: murmur_workflows::activity_api::DELETING_OWNER.to_string(),
                    },
                    e => e,
                })
                .map_err(|e| run_failure(vm, e))?;
        }
        self.provider
            .start_command(tenant, vm, &spec)
            .await
            .map_err(|e| run_failure(vm, e))?;
        tracing::info!(tenant, vm = %vm, agent = %input.slug, "agent command started");
        let code = loop {
            tokio::select! {
                _ = ctx.cancelled() => {
                    let _ = self.provider.cancel_command(tenant, vm, &spec.run).await;
                    tracing::info!(tenant, vm = %vm, agent = %input.slug, "agent command cancelled");
                    return Err(ActivityError::cancelled());
                }
                _ = tick.tick() => {}
            }
            // A sleeping VM's command has not exited: it is frozen, and so is the guest
            // that would answer.
            if self.provider.is_asleep(tenant, vm) {
                let _ = ctx.record_heartbeat(started.elapsed().as_secs()).await;
                continue;
            }
            // A VM going to sleep answers once it is asleep: heartbeat meanwhile.
            let status = with_heartbeats(&ctx, self.provider.command_status(tenant, vm, &spec.run));
            let status = match status.await {
                Ok(status) => status,
                Err(_) => {
                    let _ = self.provider.cancel_command(tenant, vm, &spec.run).await;
                    return Err(ActivityError::cancelled());
                }
            };
            match status {
                Ok(CommandStatus::Exited(code)) => break code,
                Ok(CommandStatus::Running) => {
                    let _ = ctx.record_heartbeat(started.elapsed().as_secs()).await;
                }
                Ok(CommandStatus::Unknown) => {
                    return Err(run_failure(
                        vm,
                        SubstrateError::Guest {
                            vm: vm.clone(),
                            reason: format!("no run {}", spec.run),
                        },
                    ));
                }
                // Went to sleep while asked: asked again once awake.
                Err(_) if self.provider.is_asleep(tenant, vm) => {}
                Err(e) => return Err(run_failure(vm, e)),
            }
        };
        let output_tail = self
            .provider
            .command_output_tail(tenant, vm, &spec.run, OUTPUT_TAIL_BYTES)
            .await
            .unwrap_or_default();
        tracing::info!(tenant, vm = %vm, agent = %input.slug, exit_code = code, "agent command exited");
        Ok(RunReport {
            exit_code: code,
            output_tail,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Puts an agent's VM to sleep (on the VM's host).
    #[activity(name = "murmur.sleep_vm")]
    pub async fn sleep_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PowerInput,
    ) -> Result<PowerReport, ActivityError> {
        self.power(&ctx, &input, true).await
    }

    /// Wakes an agent's sleeping VM (on the VM's host).
    #[activity(name = "murmur.wake_vm")]
    pub async fn wake_vm(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PowerInput,
    ) -> Result<PowerReport, ActivityError> {
        self.power(&ctx, &input, false).await
    }

    /// Nuke step 1: the pool's `nuke_pause`; answers once nothing boots.
    #[activity(name = "murmur.nuke_pause")]
    pub async fn nuke_pause(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PoolStepInput,
    ) -> Result<NukeStepReply, ActivityError> {
        self.nuke_step(&ctx, input, PoolWorkflow::nuke_pause).await
    }

    /// Nuke, last step: the pool's `nuke_reset` (reset and resume).
    #[activity(name = "murmur.nuke_reset")]
    pub async fn nuke_reset(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PoolStepInput,
    ) -> Result<NukeStepReply, ActivityError> {
        self.nuke_step(&ctx, input, PoolWorkflow::nuke_reset).await
    }

    /// [`Self::nuke_pause`] under its name from before the nuke workflow's patch
    /// `nuke-step-names`, for nukes that scheduled it so and were in flight across an upgrade.
    #[activity(name = "murmur.pause_pool")]
    pub async fn nuke_pause_before_rename(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PoolStepInput,
    ) -> Result<NukeStepReply, ActivityError> {
        self.nuke_step(&ctx, input, PoolWorkflow::nuke_pause).await
    }

    /// [`Self::nuke_reset`] under its name from before the patch `nuke-step-names`.
    #[activity(name = "murmur.reset_pool")]
    pub async fn nuke_reset_before_rename(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PoolStepInput,
    ) -> Result<NukeStepReply, ActivityError> {
        self.nuke_step(&ctx, input, PoolWorkflow::nuke_reset).await
    }

    /// Nuke step 2: terminates every running agent workflow of the tenant, listing them
    /// with a visibility query and terminating [`NUKE_CONCURRENCY`] at a time, until none is
    /// left. Idempotent: a retry lists again (the terminated ones are gone); the count it
    /// heartbeated carries over.
    #[activity(name = "murmur.terminate_agents")]
    pub async fn terminate_agents(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: TerminateAgentsInput,
    ) -> Result<u64, ActivityError> {
        use futures::StreamExt;
        let client = ctx.client();
        let before: u64 = ctx
            .heartbeat_details()
            .deserialize::<u64>()
            .ok()
            .flatten()
            .unwrap_or(0);
        let count = std::sync::atomic::AtomicU64::new(before);
        let work = async {
            loop {
                let runs = running_runs(&client, &input.tenant, "agent")
                    .await
                    .map_err(retryable)?;
                if runs.is_empty() {
                    let mut terminated = count.load(Ordering::Relaxed);
                    // A retry after a crash: what the lost attempt terminated before its
                    // heartbeat carried the count is read back from visibility (every agent
                    // of the tenant closed as terminated since this step was first scheduled).
                    if let (true, Some(since)) = (ctx.info().attempt > 1, ctx.info().scheduled_time)
                    {
                        let seen = terminated_since(&client, &input.tenant, "agent", since)
                            .await
                            .map_err(retryable)?;
                        terminated = terminated.max(seen);
                    }
                    return Ok::<u64, ActivityError>(terminated);
                }
                let ids: Vec<String> = runs.into_iter().map(|(id, _)| id).collect();
                let ended = futures::stream::iter(ids)
                    .map(|id| {
                        let client = client.clone();
                        let reason = input.reason.clone();
                        async move { terminate(&client, &id, &reason).await }
                    })
                    .buffer_unordered(NUKE_CONCURRENCY)
                    .collect::<Vec<_>>()
                    .await;
                for e in ended {
                    match e {
                        Ok(true) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => return Err(retryable(e)),
                    }
                }
            }
        };
        with_progress(&ctx, work, || count.load(Ordering::Relaxed)).await?
    }

    /// Nuke step 3, on the host's own queue: deletes every VM of the tenant this host holds,
    /// orphans included, [`NUKE_CONCURRENCY`] at a time, and the tenant's kept outputs. Counts the VMs an agent had started
    /// on (their owner file names one).
    #[activity(name = "murmur.wipe_host")]
    pub async fn wipe_host(
        self: Arc<Self>,
        ctx: ActivityContext,
        tenant: String,
    ) -> Result<WipeReport, ActivityError> {
        let pass = with_heartbeats(&ctx, self.delete_all(&tenant)).await??;
        Ok(pass.report)
    }

    /// Nuke step 3a: what the host holds of the tenant, to be wiped by [`Self::wipe_listed`].
    #[activity(name = "murmur.list_tenant_vms")]
    pub async fn list_tenant_vms(
        self: Arc<Self>,
        _ctx: ActivityContext,
        tenant: String,
    ) -> Result<Vec<ListedVm>, ActivityError> {
        let vms = self
            .provider
            .list(&tenant)
            .await
            .map_err(|e| ActivityError::application(ApplicationFailure::new(e)))?;
        Ok(vms
            .into_iter()
            .map(|vm| ListedVm {
                owned: vm.owner.is_some(),
                id: vm.id,
            })
            .collect())
    }

    /// Nuke step 3b: deletes every VM of the tenant on this host; counts the listed VMs that
    /// are gone at the end (whichever attempt deleted them) and any other it deleted.
    #[activity(name = "murmur.wipe_listed")]
    pub async fn wipe_listed(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: WipeListedInput,
    ) -> Result<WipeReport, ActivityError> {
        let work = async {
            let now = self.delete_all(&input.tenant).await?;
            let left: std::collections::BTreeSet<VmId> = self
                .provider
                .list(&input.tenant)
                .await
                .map_err(|e| ActivityError::application(ApplicationFailure::new(e)))?
                .into_iter()
                .map(|vm| vm.id)
                .collect();
            let mut report = WipeReport {
                failed: left.len() as u64,
                ..WipeReport::default()
            };
            for vm in input.listed.iter().filter(|vm| !left.contains(&vm.id)) {
                report.deleted += 1;
                report.agent_vms += u64::from(vm.owned);
            }
            // VMs that appeared after the listing and were deleted now.
            let listed: std::collections::BTreeSet<&VmId> =
                input.listed.iter().map(|vm| &vm.id).collect();
            for (id, owned) in now.deleted_ids.iter() {
                if !listed.contains(id) {
                    report.deleted += 1;
                    report.agent_vms += u64::from(*owned);
                }
            }
            Ok::<_, ActivityError>(report)
        };
        with_heartbeats(&ctx, work).await?
    }

    /// Deletes every VM of the tenant this host holds, a bounded number at a time.
    async fn delete_all(&self, tenant: &str) -> Result<Deleted, ActivityError> {
        use futures::StreamExt;
        let tenant = tenant.to_string();
        {
            let vms = self
                .provider
                .list(&tenant)
                .await
                .map_err(|e| ActivityError::application(ApplicationFailure::new(e)))?;
            let results = futures::stream::iter(vms)
                .map(|vm| {
                    let provider = self.provider.clone();
                    let tenant = tenant.clone();
                    async move {
                        let owned = vm.owner.is_some();
                        let deleted = provider.delete(&tenant, &vm.id).await;
                        if let Err(e) = &deleted {
                            tracing::warn!(tenant = %tenant, vm = %vm.id, error = %e,
                                "nuke: VM not deleted");
                        }
                        (vm.id, deleted.is_ok(), owned)
                    }
                })
                .buffer_unordered(NUKE_CONCURRENCY)
                .collect::<Vec<_>>()
                .await;
            // The outputs those deletes kept, and any kept before, go too.
            self.provider.forget_kept_output(&tenant);
            let mut out = Deleted::default();
            for (id, deleted, owned) in results {
                if deleted {
                    out.report.deleted += 1;
                    out.report.agent_vms += u64::from(owned);
                    out.deleted_ids.push((id, owned));
                } else {
                    out.report.failed += 1;
                }
            }
            Ok(out)
        }
    }
}

/// What one pass of [`AgentActivities::delete_all`] did.
#[derive(Default)]
struct Deleted {
    /// Its counts.
    report: WipeReport,
    /// The VMs it deleted, with whether an agent had started on each.
    deleted_ids: Vec<(VmId, bool)>,
}

/// Terminates one agent workflow; true when it was terminated, false when it had ended.
async fn terminate(
    client: &temporalio_client::Client,
    id: &str,
    reason: &str,
) -> Result<bool, ApiError> {
    let handle = client.get_workflow_handle::<UntypedWorkflow>(id.to_string());
    let options = WorkflowTerminateOptions::builder()
        .reason(reason.to_string())
        .build();
    match handle.terminate(options).await {
        Ok(()) => {
            tracing::warn!(workflow = %id, "agent terminated");
            Ok(true)
        }
        Err(e) => {
            let e = interaction_error(e, "gone");
            // Already ended (not running any more) counts as done.
            if e.code == Code::NotFound || e.message.contains("already completed") {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// A refusal from the pool (`INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION`, ...) is
/// final; a server that cannot be reached is retried.
fn api_failure(e: ApiError) -> ActivityError {
    match e.code {
        Code::Unavailable | Code::Internal => retryable(e),
        _ => ActivityError::application(
            ApplicationFailure::builder(e)
                .type_name(CLAIM_REJECTED.to_string())
                .non_retryable(true)
                .build(),
        ),
    }
}

fn retryable(e: ApiError) -> ActivityError {
    ActivityError::application(ApplicationFailure::new(e))
}

/// A VM that is gone cannot run anything, however often we retry; one another agent owns
/// is not this agent's (the failure's message is the owner).
fn run_failure(vm: &murmur_workflows::model::VmId, e: SubstrateError) -> ActivityError {
    match e {
        SubstrateError::VmGone(_) => ActivityError::application(
            ApplicationFailure::builder(SubstrateError::VmGone(vm.clone()))
                .type_name(VM_LOST.to_string())
                .non_retryable(true)
                .build(),
        ),
        SubstrateError::Taken { owner, .. } => ActivityError::application(
            ApplicationFailure::builder(anyhow::anyhow!(owner))
                .type_name(VM_TAKEN.to_string())
                .non_retryable(true)
                .build(),
        ),
        e => ActivityError::application(ApplicationFailure::new(e)),
    }
}

/// Sends `update` to the tenant's pool, heartbeating while it waits; `None` when no pool
/// runs (nothing is started: these updates only make sense to a running pool).
async fn update_running_pool<U>(
    ctx: &ActivityContext,
    tenant: &str,
    update: U,
    input: U::Input,
) -> Result<Option<U::Output>, ActivityError>
where
    U: UpdateDefinition<Workflow = <PoolWorkflow as HasWorkflowDefinition>::Run>,
    U::Input: Send,
{
    let handle = ctx
        .client()
        .get_workflow_handle::<PoolWorkflow>(pool_workflow_id(tenant));
    let call = handle.execute_update(update, input, WorkflowExecuteUpdateOptions::default());
    match with_heartbeats(ctx, call).await? {
        Ok(out) => Ok(Some(out)),
        Err(e) => match update_error(e, "not running") {
            e if e.code == Code::NotFound => Ok(None),
            e => Err(ActivityError::application(ApplicationFailure::new(e))),
        },
    }
}

#[cfg(test)]
mod tests {
    use murmur_workflows::activity_api::{
        ClaimVm, ListTenantVms, NukePause, NukePauseBeforeRename, NukeReset, NukeResetBeforeRename,
        PoolPower, ProbeClaim, ReleaseVm, RunAgent, SleepVm, TerminateAgents, WakeVm, WipeHost,
        WipeListed,
    };
    use temporalio_common::ActivityDefinition;

    use super::AgentActivities;

    #[test]
    fn activity_names_match_the_workflow_markers() {
        assert_eq!(AgentActivities::claim_vm.name(), ClaimVm.name());
        assert_eq!(AgentActivities::release_vm.name(), ReleaseVm.name());
        assert_eq!(AgentActivities::pool_power.name(), PoolPower.name());
        assert_eq!(AgentActivities::probe_claim.name(), ProbeClaim.name());
        assert_eq!(AgentActivities::run_agent.name(), RunAgent.name());
        assert_eq!(AgentActivities::sleep_vm.name(), SleepVm.name());
        assert_eq!(AgentActivities::wake_vm.name(), WakeVm.name());
        assert_eq!(AgentActivities::nuke_pause.name(), NukePause.name());
        assert_eq!(AgentActivities::nuke_reset.name(), NukeReset.name());
        assert_eq!(
            AgentActivities::nuke_pause_before_rename.name(),
            NukePauseBeforeRename.name()
        );
        assert_eq!(
            AgentActivities::nuke_reset_before_rename.name(),
            NukeResetBeforeRename.name()
        );
        assert_eq!(
            AgentActivities::terminate_agents.name(),
            TerminateAgents.name()
        );
        assert_eq!(AgentActivities::wipe_host.name(), WipeHost.name());
        assert_eq!(
            AgentActivities::list_tenant_vms.name(),
            ListTenantVms.name()
        );
        assert_eq!(AgentActivities::wipe_listed.name(), WipeListed.name());
    }
}
