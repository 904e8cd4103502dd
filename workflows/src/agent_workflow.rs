//! `AgentWorkflow` (`agent/<tenant>/<workspace>/<developer>/<slug>`): one agent's life.
//!
//! Claim a VM from the pool (admission first, so `murmur spawn` can report a refusal, then
//! wait for the VM), run the command in it, and on every way out — exit, failure, kill —
//! release the VM, which the pool then deletes. The release runs under a detached
//! cancellation token so it still happens after the workflow was cancelled.
//!
//! Before anything, the spawn's signed request is verified (`agent.create`, the token's
//! developer must be the one in the workflow id). `murmur kill` is the `kill` update, signed
//! for this run (`agent.edit`); a Temporal cancellation (UI, `temporal workflow cancel`) is
//! honoured too, since whoever can cancel in the namespace can also terminate.

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

use std::time::Duration;

use futures::FutureExt;

use temporalio_common::RetryPolicy;
use temporalio_common::data_converters::RawValue;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityExecutionError, ActivityOptions, ApplicationFailure, LocalActivityOptions,
    SyncWorkflowContext, WorkflowCancellationToken, WorkflowContext, WorkflowContextView,
    WorkflowResult, WorkflowTermination,
};

use crate::activity_api::{
    CLAIM_REJECTED, ClaimInput, ClaimVm, DeleteVm, DeleteVmInput, PoolPower, PoolPowerInput,
    PowerInput, ProbeClaim, ProbeClaimInput, ReleaseInput, ReleaseVm, RunAgent, RunInput,
    RunReport, SleepVm, VM_LOST, VM_TAKEN, WakeVm, on_host,
};
use crate::agent::{
    AgentInput, AgentStatus, KillRequest, OnIdle, OnIdleRequest, Phase, PowerRequest,
};
use crate::auth::{VerifyRequest, ops, permissions, unsigned_body};
use crate::error::ApiError;
use crate::gate;
use crate::machine::{ClaimRequest, ClaimState, PowerChange, PowerState};
use crate::messages::Lenient;
use crate::model::VmId;
use crate::shell::{HOST_START_WITHIN, UpdateError, failed_with_type, root_cause};

/// How often a waiting agent asks again where its claim stands, in case the pool's
/// notification was lost (a pool continuing as new, say).
pub const CLAIM_RECHECK: Duration = Duration::from_secs(60);
/// How long an agent waits before asking a pool that did not answer again.
pub const POOL_RETRY: Duration = Duration::from_secs(5);
/// Longest an agent's command may run.
pub const MAX_RUN_TIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The agent workflow's state.
#[workflow]
pub struct AgentWorkflow {
    input: AgentInput,
    /// `<workflow id>@<run id>`: the claim's idempotency key.
    request: String,
    run_id: String,
    status: AgentStatus,
    /// Set once the pool accepted or refused the claim.
    admission: Option<Result<(), ApiError>>,
    /// Set by a verified `kill`: who killed it.
    killed_by: Option<String>,
    /// True once a claim was sent to the pool (then it must be released).
    claimed: bool,
    /// Set by the pool's `claim_settled` signal: ask again where the claim stands.
    claim_settled: bool,
    /// Set by the pool's `vm_lost` signal: ask the pool whether the agent's VM is gone.
    vm_lost: bool,
    /// The host of the agent's VM (its activities run on that host's queue).
    vm_host: Option<String>,
    /// What `murmur sleep` / `murmur wake` (or `--on-idle sleep`) asked for: the VM asleep.
    /// The VM's actual state is `status.asleep`; the agent's power loop brings the one to
    /// the other.
    want_asleep: bool,
    /// True while a sleep or a wake of the VM is under way.
    power_busy: bool,
    /// How many sleeps and wakes have finished, whether they worked or not.
    power_done: u64,
    /// Why the last sleep or wake failed.
    power_error: Option<ApiError>,
    /// True while the pool counts the agent's sleeping VM as dormant (asleep without host
    /// memory, outside `max_vms`): before a wake the agent asks the pool for room.
    dormant: bool,
}

/// How the work part of an agent ended, before cleanup.
enum Ended {
    /// The command exited.
    Exited(RunReport),
    /// Killed.
    Canceled,
    /// Something else went wrong.
    Failed(String),
}

#[workflow_methods]
impl AgentWorkflow {
    /// Builds the state from the spawn's input.
    #[init]
    pub fn new(ctx: &WorkflowContextView, input: AgentInput) -> Self {
        let workflow = ctx.workflow_id().to_string();
        let run_id = ctx.run_id().to_string();
        let status = AgentStatus {
            workflow: workflow.clone(),
            slug: input.slug.clone(),
            phase: None,
            command: input.command.clone(),
            on_idle: input.on_idle,
            run: Some(run_id.clone()),
            ..Default::default()
        };
        Self {
            request: format!("{workflow}@{run_id}"),
            run_id,
            input,
            status,
            admission: None,
            killed_by: None,
            claimed: false,
            claim_settled: false,
            vm_lost: false,
            vm_host: None,
            want_asleep: false,
            power_busy: false,
            power_done: 0,
            power_error: None,
            dormant: false,
        }
    }

    /// Claim, run, clean up.
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<RunReport> {
        let c = ctx.clone();
        set_phase(&c, Phase::Starting);
        // Everything the agent does stops on a kill or a cancellation.
        let stop = c.cancellation_token().child_token();
        let ended = match authorize(&c).await {
            Ok(spawn) => work(&c, &stop, spawn).await,
            Err(e) => {
                c.state_mut(|s| s.admission = Some(Err(e.clone())));
                Ended::Failed(e.to_string())
            }
        };
        let mut ended = ended;
        let canceled = match &ended {
            Ended::Canceled => true,
            Ended::Exited(report) => {
                c.state_mut(|s| {
                    s.status.exit_code = Some(report.exit_code);
                    s.status.output_tail = Some(report.output_tail.clone());
                });
                set_phase(&c, Phase::TaskComplete);
                let on_idle = c.state(|s| s.input.on_idle);
                if on_idle == OnIdle::Terminate {
                    false
                } else {
                    c.state_mut(|s| s.want_asleep |= on_idle == OnIdle::Sleep);
                    let asleep = c.state(|s| s.status.asleep);
                    set_phase(&c, if asleep { Phase::Sleeping } else { Phase::Idle });
                    // Until a kill (Ok), a cancellation (Err), or the VM is lost with its host;
                    // meanwhile it sleeps and wakes as asked.
                    temporalio_sdk::workflows::select! {
                        _ = c.wait_condition(|s| s.killed_by.is_some()).fuse() => true,
                        reason = vm_lost(&c, &stop).fuse() => {
                            c.state_mut(|s| s.status.error = Some(reason.clone()));
                            ended = Ended::Failed(reason);
                            false
                        }
                        reason = power(&c, &stop, Phase::Idle).fuse() => {
                            c.state_mut(|s| s.status.error = Some(reason.clone()));
                            ended = Ended::Failed(reason);
                            false
                        }
                    }
                }
            }
            Ended::Failed(reason) => {
                c.state_mut(|s| s.status.error = Some(reason.clone()));
                false
            }
        };

        set_phase(&c, Phase::Destroying);
        if c.state(|s| s.claimed) {
            release(&c).await;
        }

        let result = if canceled {
            set_phase(&c, Phase::Canceled);
            Err(WorkflowTermination::cancelled())
        } else {
            match ended {
                Ended::Exited(report) if report.exit_code == 0 => {
                    set_phase(&c, Phase::Completed);
                    Ok(report)
                }
                Ended::Exited(report) => {
                    set_phase(&c, Phase::Failed);
                    Err(ApplicationFailure::new(format!(
                        "the agent's command exited with {}",
                        report.exit_code
                    ))
                    .into())
                }
                Ended::Failed(reason) => {
                    set_phase(&c, Phase::Failed);
                    Err(ApplicationFailure::new(reason).into())
                }
                Ended::Canceled => Err(WorkflowTermination::cancelled()),
            }
        };
        // Let updates in flight (a spawn's admission, a kill) answer before the run ends.
        let c2 = c.clone();
        let _ = c2.wait_condition(|_| c.all_handlers_finished()).await;
        result
    }

    /// Answers once the pool accepted the agent's claim (with the status) or refused it (with
    /// the pool's `CODE: reason`), or once the agent found the pool does not answer (the
    /// status then says so in `waiting`; the agent goes on asking). `murmur spawn` sends it
    /// together with the start.
    #[update]
    pub async fn admission(
        ctx: &mut WorkflowContext<Self>,
        _req: Lenient<()>,
    ) -> Result<AgentStatus, UpdateError> {
        ctx.wait_condition(|s| s.admission.is_some() || s.status.waiting.is_some())
            .await
            .map_err(|e| Box::new(e) as UpdateError)?;
        ctx.state(|s| match &s.admission {
            Some(Err(e)) => Err(Box::new(e.clone()) as UpdateError),
            _ => Ok(s.status.clone()),
        })
    }

    /// Refuses a `kill` whose payload is not a kill request (nothing reaches history).
    #[update_validator(kill)]
    pub fn validate_kill(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<KillRequest>,
    ) -> Result<(), UpdateError> {
        req.check().map_err(|e| Box::new(e) as UpdateError)
    }

    /// `murmur kill`: checks the signed request (`agent.edit`, signed for this run), then
    /// stops the agent: its command is cancelled and its VM destroyed. Answers at once; the
    /// caller waits for the workflow to end.
    #[update]
    pub async fn kill(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<KillRequest>,
    ) -> Result<AgentStatus, UpdateError> {
        let req = req.into_result().map_err(|e| Box::new(e) as UpdateError)?;
        let (tenant, target) = ctx.state(|s| {
            (
                s.input.tenant.clone(),
                format!("{}@{}", s.status.workflow, s.run_id),
            )
        });
        let verify = VerifyRequest::developer(
            tenant,
            ops::KILL,
            target,
            unsigned_body(&req),
            permissions::AGENT_EDIT,
            req.auth.clone(),
        );
        let who = gate::verify(ctx, verify).await.map_err(|r| {
            if !ctx.is_replaying() {
                tracing::warn!(who = %r.who, error = %r.error, "kill denied");
            }
            Box::new(r.error) as UpdateError
        })?;
        ctx.state_mut(|s| {
            if s.killed_by.is_none() {
                s.killed_by = Some(who.developer.clone());
            }
            Ok(s.status.clone())
        })
    }

    /// Refuses a `sleep` whose payload is not a power request (nothing reaches history).
    #[update_validator(sleep)]
    pub fn validate_sleep(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<PowerRequest>,
    ) -> Result<(), UpdateError> {
        req.check().map_err(|e| Box::new(e) as UpdateError)
    }

    /// `murmur sleep`: checks the signed request (`agent.edit`, signed for this run), then
    /// puts the agent's VM to sleep. Answers once the VM is asleep (`PHASE_SLEEPING`).
    #[update]
    pub async fn sleep(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<PowerRequest>,
    ) -> Result<AgentStatus, UpdateError> {
        power_request(ctx, req, true).await
    }

    /// Refuses a `wake` whose payload is not a power request (nothing reaches history).
    #[update_validator(wake)]
    pub fn validate_wake(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<PowerRequest>,
    ) -> Result<(), UpdateError> {
        req.check().map_err(|e| Box::new(e) as UpdateError)
    }

    /// `murmur wake`: checks the signed request (`agent.edit`, signed for this run), then
    /// wakes the agent's VM. Answers once it is awake: the agent is back in the phase it
    /// slept in (`PHASE_RUNNING` while its command runs, else `PHASE_IDLE`).
    #[update]
    pub async fn wake(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<PowerRequest>,
    ) -> Result<AgentStatus, UpdateError> {
        power_request(ctx, req, false).await
    }

    /// Refuses an `on_idle` whose payload is not an on-idle request, or that asks for
    /// `terminate` (nothing reaches history).
    #[update_validator(on_idle)]
    pub fn validate_on_idle(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<OnIdleRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(|e| Box::new(e) as UpdateError)?;
        if req.on_idle == OnIdle::Terminate {
            return Err(Box::new(ApiError::invalid_argument(
                "--on-idle terminate cannot be set at runtime (use sleep or keep-alive)",
            )));
        }
        Ok(())
    }

    /// `murmur on-idle`: checks the signed request (`agent.edit`, signed for this run), then
    /// sets what the agent does the next time it goes idle (`sleep` or `keep-alive`).
    #[update]
    pub async fn on_idle(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<OnIdleRequest>,
    ) -> Result<AgentStatus, UpdateError> {
        let req = req.into_result().map_err(|e| Box::new(e) as UpdateError)?;
        let verify = ctx.state(|s| {
            VerifyRequest::developer(
                s.input.tenant.clone(),
                ops::ON_IDLE,
                format!("{}@{}", s.status.workflow, s.run_id),
                unsigned_body(&req),
                permissions::AGENT_EDIT,
                req.auth.clone(),
            )
        });
        gate::verify(ctx, verify)
            .await
            .map_err(|r| Box::new(r.error) as UpdateError)?;
        ctx.state_mut(|s| {
            s.input.on_idle = req.on_idle;
            s.status.on_idle = req.on_idle;
            Ok(s.status.clone())
        })
    }

    /// From the pool: this agent's waiting claim was served (or failed); the agent asks
    /// again where it stands. Any payload is accepted and ignored.
    #[signal(name = "claim_settled")]
    pub fn claim_settled(&mut self, _ctx: &mut SyncWorkflowContext<Self>, _raw: RawValue) {
        self.claim_settled = true;
    }

    /// From the pool: the VM this agent runs on may be gone (lost with its host). The agent
    /// asks the pool where its claim stands and, when the pool confirms, stops its command and
    /// fails with the pool's reason. Any payload is accepted and ignored, so a stray signal
    /// costs one question to the pool.
    #[signal(name = "vm_lost")]
    pub fn vm_lost(&mut self, _ctx: &mut SyncWorkflowContext<Self>, _raw: RawValue) {
        self.vm_lost = true;
    }

    /// The agent's status (`murmur status`).
    #[query]
    pub fn status(&self, _ctx: &WorkflowContextView) -> AgentStatus {
        self.status.clone()
    }
}

/// Checks the spawn: the input names this workflow, and the developer's signed request
/// (`agent.create`) is theirs. Returns the request id and its signed time, which the pool
/// admits once.
async fn authorize(c: &WorkflowContext<AgentWorkflow>) -> Result<(String, u64), ApiError> {
    let (input, workflow) = c.state(|s| (s.input.clone(), s.status.workflow.clone()));
    input.validate()?;
    if input.workflow_id() != workflow {
        return Err(ApiError::invalid_argument(format!(
            "the agent's input names {}, not this workflow {workflow}",
            input.workflow_id()
        )));
    }
    // Judged when the server started this run: a server too busy to hand out the first
    // workflow task for minutes must not turn a fresh spawn into a stale one.
    let started_ms = c
        .info()
        .start_time()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64);
    let req = VerifyRequest::developer(
        &input.tenant,
        ops::SPAWN,
        workflow,
        unsigned_body(&input),
        permissions::AGENT_CREATE,
        input.auth.clone(),
    )
    .received_at(started_ms);
    let identity = gate::verify(c, req).await.map_err(|r| {
        if !c.is_replaying() {
            tracing::warn!(who = %r.who, error = %r.error, "spawn denied");
        }
        r.error
    })?;
    if identity.developer != input.developer {
        return Err(ApiError::new(
            crate::error::Code::PermissionDenied,
            format!(
                "the token of {} cannot spawn agents as {}",
                identity.developer, input.developer
            ),
        ));
    }
    Ok(input
        .auth
        .map_or_else(Default::default, |a| (a.request_id, a.ts)))
}

/// Runs `fut` (an activity started with the `stop` token) until it ends or the agent is
/// killed; a kill cancels `stop`, and the activity then ends cancelled.
async fn until_killed<T>(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let mut fut = std::pin::pin!(fut);
    temporalio_sdk::workflows::select! {
        out = (&mut fut).fuse() => return out,
        _ = c.wait_condition(|s| s.killed_by.is_some()).fuse() => {}
    }
    stop.cancel();
    fut.await
}

/// Claims a VM and runs the command in it. A VM found owned by another agent (the pool
/// recovered and handed it out again before its first agent started on it) is given back to
/// the pool, which serves this claim again.
async fn work(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    (spawn_request_id, spawn_signed_at): (String, u64),
) -> Ended {
    let mut claim = c.state(|s| ClaimRequest {
        request: s.request.clone(),
        agent: s.status.workflow.clone(),
        developer: s.input.developer.clone(),
        workspace: s.input.workspace.clone(),
        wait: false,
        spawn_request_id,
        spawn_signed_at,
        taken_by: None,
        auth: None,
    });
    // Admission, then waiting: each answer says where the claim stands.
    c.state_mut(|s| s.claimed = true);
    let started_at = crate::shell::now_ms(c);
    loop {
        let (vm, host) = match wait_for_vm(c, stop, &mut claim, started_at).await {
            Ok(held) => held,
            Err(ended) => return ended,
        };
        c.state_mut(|s| {
            s.vm_host = host.clone();
            s.status.host = host.clone();
        });
        match run(c, stop, vm, host).await {
            Ran::Ended(ended) => return ended,
            Ran::Taken(owner) => {
                if !c.is_replaying() {
                    tracing::warn!(agent = %claim.agent, %owner,
                        "the VM handed out is another agent's; claiming again");
                }
                set_phase(c, Phase::Starting);
                claim.taken_by = Some(owner);
                claim.wait = true;
            }
        }
    }
}

/// How a run in a VM ended.
enum Ran {
    /// Done, one way or another.
    Ended(Ended),
    /// The VM belongs to another agent (its claim request).
    Taken(String),
}

/// Claims until the pool hands over a VM (with its host). While the pool does not answer,
/// the status says so and the claim is sent again after [`POOL_RETRY`].
async fn wait_for_vm(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    claim: &mut ClaimRequest,
    started_at: u64,
) -> Result<(VmId, Option<String>), Ended> {
    let tenant = c.state(|s| s.input.tenant.clone());
    loop {
        let input = ClaimInput {
            tenant: tenant.clone(),
            claim: claim.clone(),
            started_at,
            probe: false,
        };
        let answer = until_killed(
            c,
            stop,
            c.execute_local_activity(ClaimVm, input, claim_options(stop)),
        )
        .await;
        claim.taken_by = None;
        let state = match answer {
            Ok(state) => state,
            Err(_) if stop.is_cancelled() => return Err(Ended::Canceled),
            Err(e) if failed_with_type(&e, CLAIM_REJECTED) => {
                let err = claim_error(&e);
                c.state_mut(|s| {
                    s.admission.get_or_insert(Err(err.clone()));
                });
                return Err(Ended::Failed(err.to_string()));
            }
            Err(e) => {
                // The pool does not answer (a worker is down, or the pool is wedged): say so,
                // and ask again.
                c.state_mut(|s| {
                    s.status.waiting = Some(format!("the pool does not answer: {}", root_cause(&e)))
                });
                refresh_details(c);
                if wait_or_killed(c, POOL_RETRY).await {
                    stop.cancel();
                    return Err(Ended::Canceled);
                }
                continue;
            }
        };
        c.state_mut(|s| {
            s.admission.get_or_insert(Ok(()));
            s.status.waiting = None;
            s.status.queue_position = match &state {
                ClaimState::Waiting { position } => Some(*position),
                _ => None,
            };
            if let ClaimState::Assigned { vm, .. } | ClaimState::Booting { vm } = &state {
                s.status.vm = Some(vm.clone());
            }
        });
        refresh_details(c);
        match state {
            ClaimState::Assigned { vm, host } => return Ok((vm, host)),
            ClaimState::Failed { reason } => return Err(Ended::Failed(reason)),
            // Unknown: the pool lost the claim (it recovered after its run ended); the next
            // claim is a new one. Waiting or booting: wait to be told (a signal from the
            // pool), or re-check now and then in case a notification was lost.
            ClaimState::Unknown | ClaimState::Waiting { .. } | ClaimState::Booting { .. } => {
                claim.wait = true;
                wait_to_be_served(c, stop, &claim.request).await?;
                c.state_mut(|s| s.claim_settled = false);
            }
        }
    }
}

/// Agents started before this look at a waiting claim with the claim update every
/// [`CLAIM_RECHECK`]; later ones look with the pool's `claim_state` query, less and less
/// often ([`CLAIM_RECHECK_MAX`]).
const PATCH_RECHECK_BY_QUERY: &str = "recheck-by-query";

/// Agents started before this look at a waiting claim with a local activity; later ones with
/// an ordinary activity ([`probe_options`]).
const PATCH_PROBE_AS_ACTIVITY: &str = "probe-as-activity";

/// Longest wait between two looks at a claim that still waits.
pub const CLAIM_RECHECK_MAX: Duration = Duration::from_secs(600);

/// Agents started before this look at a waiting claim from [`CLAIM_RECHECK`] on; later ones
/// only every [`CLAIM_RECHECK_SWEPT`], because the pool's reaper tells a running agent whose
/// claim it does not hold to claim again (the claims a pool run lost are found by the pool,
/// not by every waiting agent asking).
const PATCH_SWEPT_BY_POOL: &str = "claims-swept-by-pool";

/// Time between two looks at a waiting claim once the pool's sweep serves lost claims: a
/// last resort, not the way a claim is served. 10,000 queued agents looking every minute
/// were ~330 workflow tasks and 170 pool queries a second, and the worker fell behind
/// (docs/scaling.md); hourly they are 3 a second.
pub const CLAIM_RECHECK_SWEPT: Duration = Duration::from_secs(3_600);

/// Waits until the pool tells the agent its claim settled (`claim_settled`), or a look finds
/// it no longer waiting, or the agent is killed (`Err(Canceled)`). The looks are queries:
/// thousands of queued agents must not spend the pool's update budget (the server admits
/// 10 in-flight updates per workflow) or its history on asking whether anything changed.
/// The signal is what serves a claim; a claim lost with a pool run that ended is found by
/// the pool's reaper, which tells the agent to claim again ([`PATCH_SWEPT_BY_POOL`]), and the
/// hourly look is the last resort. Agents started before that back off from
/// [`CLAIM_RECHECK`] to [`CLAIM_RECHECK_MAX`].
async fn wait_to_be_served(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    request: &str,
) -> Result<(), Ended> {
    let swept = c.patched(PATCH_SWEPT_BY_POOL);
    let mut recheck = if swept {
        CLAIM_RECHECK_SWEPT
    } else {
        CLAIM_RECHECK
    };
    loop {
        let told = temporalio_sdk::workflows::select! {
            _ = c.wait_condition(|s| s.claim_settled || s.killed_by.is_some()).fuse() => true,
            _ = c.timer(recheck).fuse() => false,
        };
        if stop.is_cancelled() || c.state(|s| s.killed_by.is_some()) {
            stop.cancel();
            return Err(Ended::Canceled);
        }
        if told || !c.patched(PATCH_RECHECK_BY_QUERY) {
            return Ok(());
        }
        let input = c.state(|s| ProbeClaimInput {
            tenant: s.input.tenant.clone(),
            request: request.to_string(),
        });
        let state = if c.patched(PATCH_PROBE_AS_ACTIVITY) {
            c.execute_activity(ProbeClaim, input, probe_options(stop))
                .await
        } else {
            c.execute_local_activity(ProbeClaim, input, claim_options(stop))
                .await
        };
        match state {
            Ok(ClaimState::Waiting { position }) => {
                c.state_mut(|s| s.status.queue_position = Some(position));
                refresh_details(c);
            }
            Ok(ClaimState::Booting { .. }) => {}
            // Served, failed or lost (or the pool does not answer the query): ask with the
            // claim update, which says what to do next.
            _ => return Ok(()),
        }
        if !swept {
            recheck = (recheck * 2).min(CLAIM_RECHECK_MAX);
        }
    }
}

/// Waits `d`; true when the agent was killed meanwhile.
async fn wait_or_killed(c: &WorkflowContext<AgentWorkflow>, d: Duration) -> bool {
    temporalio_sdk::workflows::select! {
        _ = c.wait_condition(|s| s.killed_by.is_some()).fuse() => true,
        _ = c.timer(d).fuse() => false,
    }
}

/// Runs the command in `vm` until it exits, the agent is killed, or the VM is lost.
async fn run(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    vm: VmId,
    host: Option<String>,
) -> Ran {
    set_phase(c, Phase::Running);
    let input = c.state(|s| RunInput {
        tenant: s.input.tenant.clone(),
        vm,
        slug: s.input.slug.clone(),
        run: s.run_id.clone(),
        command: s.input.command.clone(),
        owner: s.request.clone(),
    });
    let options = ActivityOptions::with_start_to_close_timeout(MAX_RUN_TIME)
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_interval(Duration::from_secs(10))
                .non_retryable_error_types([VM_LOST, VM_TAKEN])
                .build(),
        )
        .summary(format!("run {}", input.command.join(" ")))
        .cancellation_token(stop.clone())
        .build();
    let options = on_host(options, c.task_queue(), host.as_deref(), HOST_START_WITHIN);
    let mut run = std::pin::pin!(until_killed(
        c,
        stop,
        c.execute_activity(RunAgent, input, options)
    ));
    let mut power = std::pin::pin!(power(c, stop, Phase::Running));
    // The pool tells a running agent when its VM was lost with its host; meanwhile the VM
    // sleeps and wakes as asked.
    temporalio_sdk::workflows::select! {
        out = (&mut run).fuse() => {
            if let Some(lost) = settle_power(c, &mut power).await {
                return Ran::Ended(Ended::Failed(lost));
            }
            match out {
            Ok(report) => Ran::Ended(Ended::Exited(report)),
            Err(_) if stop.is_cancelled() => Ran::Ended(Ended::Canceled),
            Err(e) if failed_with_type(&e, VM_TAKEN) => Ran::Taken(root_cause(&e)),
            Err(e) => Ran::Ended(Ended::Failed(format!(
                "the agent's command could not run: {}",
                root_cause(&e)
            ))),
            }
        },
        reason = vm_lost(c, stop).fuse() => {
            stop.cancel();
            let _ = run.await;
            Ran::Ended(Ended::Failed(reason))
        }
        reason = (&mut power).fuse() => {
            stop.cancel();
            let _ = run.await;
            Ran::Ended(Ended::Failed(reason))
        }
    }
}

/// Lets a sleep or wake under way finish (so the agent knows whether its VM is asleep)
/// after the command ended; `Some(reason)` when it found the VM gone.
async fn settle_power(
    c: &WorkflowContext<AgentWorkflow>,
    power: &mut std::pin::Pin<&mut impl std::future::Future<Output = String>>,
) -> Option<String> {
    if !c.state(|s| s.power_busy) {
        return None;
    }
    temporalio_sdk::workflows::select! {
        _ = c.wait_condition(|s| !s.power_busy).fuse() => None,
        lost = power.fuse() => Some(lost),
    }
}

/// The agent's side of `murmur sleep` and `murmur wake`: verifies the request, checks the
/// agent holds a VM, asks for it asleep or awake and answers once it is (or the transition
/// failed, or the agent ended meanwhile).
async fn power_request(
    ctx: &mut WorkflowContext<AgentWorkflow>,
    req: Lenient<PowerRequest>,
    asleep: bool,
) -> Result<AgentStatus, UpdateError> {
    let req = req.into_result().map_err(|e| Box::new(e) as UpdateError)?;
    let (op, verb) = if asleep {
        (ops::SLEEP, "sleep")
    } else {
        (ops::WAKE, "wake")
    };
    let verify = ctx.state(|s| {
        VerifyRequest::developer(
            s.input.tenant.clone(),
            op,
            format!("{}@{}", s.status.workflow, s.run_id),
            unsigned_body(&req),
            permissions::AGENT_EDIT,
            req.auth.clone(),
        )
    });
    gate::verify(ctx, verify).await.map_err(|r| {
        if !ctx.is_replaying() {
            tracing::warn!(who = %r.who, error = %r.error, "{verb} denied");
        }
        Box::new(r.error) as UpdateError
    })?;
    let (slug, phase) = ctx.state(|s| (s.status.slug.clone(), s.status.phase));
    match phase {
        Some(Phase::Running | Phase::Idle | Phase::Sleeping) => {}
        Some(Phase::Starting) | None => {
            return Err(Box::new(ApiError::failed_precondition(format!(
                "agent {slug} is starting: it has no VM to {verb} yet"
            ))));
        }
        Some(p) => {
            return Err(Box::new(ApiError::failed_precondition(format!(
                "agent {slug} is {}: only a running, idle or sleeping agent can {verb}",
                p.short()
            ))));
        }
    }
    let asked_at = ctx.state_mut(|s| {
        s.want_asleep = asleep;
        s.power_done
    });
    ctx.wait_condition(|s| {
        let settled = !s.power_busy && s.status.asleep == asleep;
        let failed = !s.power_busy && s.power_done > asked_at && s.power_error.is_some();
        let gone = !matches!(
            s.status.phase,
            Some(Phase::Running | Phase::Idle | Phase::Sleeping | Phase::TaskComplete)
        );
        settled || failed || gone
    })
    .await
    .map_err(|e| Box::new(e) as UpdateError)?;
    ctx.state(|s| {
        if s.status.asleep == asleep {
            Ok(s.status.clone())
        } else if let Some(e) = &s.power_error {
            Err(Box::new(e.clone()) as UpdateError)
        } else {
            Err(Box::new(ApiError::failed_precondition(format!(
                "agent {slug} ended before its VM could {verb}"
            ))) as UpdateError)
        }
    })
}

/// Puts the agent's VM to sleep and wakes it whenever `want_asleep` and the VM's state
/// differ, setting the phase (`PHASE_SLEEPING`, or `awake` once woken). A failed
/// transition leaves the VM as it was and is reported to whoever asked. Resolves only when
/// the VM turns out to be gone, with the reason.
async fn power(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    awake: Phase,
) -> String {
    loop {
        if c.wait_condition(|s| s.want_asleep != s.status.asleep)
            .await
            .is_err()
        {
            // Cancelled: the caller's other branches end the wait.
            return futures::future::pending().await;
        }
        let (asleep, input, host) = c.state_mut(|s| {
            s.power_busy = true;
            let input = PowerInput {
                tenant: s.input.tenant.clone(),
                vm: s.status.vm.clone().unwrap_or_else(|| VmId(String::new())),
                owner: s.request.clone(),
            };
            (s.want_asleep, input, s.vm_host.clone())
        });
        let options = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(300))
            .heartbeat_timeout(Duration::from_secs(10))
            .retry_policy(
                RetryPolicy::builder()
                    .initial_interval(Duration::from_secs(1))
                    .maximum_interval(Duration::from_secs(10))
                    .maximum_attempts(5)
                    .non_retryable_error_types([VM_LOST, VM_TAKEN])
                    .build(),
            )
            .summary(format!(
                "{} {}",
                if asleep { "sleep" } else { "wake" },
                input.vm
            ))
            .cancellation_token(stop.clone())
            .build();
        let options = on_host(options, c.task_queue(), host.as_deref(), HOST_START_WITHIN);
        let mut let_back_in = false;
        if !asleep && c.state(|s| s.dormant) {
            // The VM is outside `max_vms` while it sleeps: it needs room back before it wakes.
            if !room_to_wake(c, stop).await {
                c.state_mut(|s| {
                    s.power_busy = false;
                    s.power_done += 1;
                    s.want_asleep = s.status.asleep;
                    s.power_error = Some(ApiError::failed_precondition(
                        "the VM did not wake: the agent was put to sleep again, or killed, while its wake waited for room under max_vms",
                    ));
                });
                // Out of the line of wakes: the VM stays dormant.
                tell_pool(c, stop, PowerChange::Dormant).await;
                continue;
            }
            c.state_mut(|s| s.dormant = false);
            let_back_in = true;
        }
        let done = if asleep {
            c.execute_activity(SleepVm, input, options).await
        } else {
            c.execute_activity(WakeVm, input, options).await
        };
        if asleep && done.as_ref().is_ok_and(|r| r.frees_memory) {
            // Asleep without host memory: the pool need not count the VM while it sleeps.
            let dormant =
                tell_pool(c, stop, PowerChange::Dormant).await == Some(PowerState::Dormant);
            c.state_mut(|s| s.dormant = dormant);
        } else if let_back_in && done.as_ref().is_err_and(|e| !failed_with_type(e, VM_LOST)) {
            // The wake failed and the VM still sleeps without host memory: out of the count
            // again.
            let dormant =
                tell_pool(c, stop, PowerChange::Dormant).await == Some(PowerState::Dormant);
            c.state_mut(|s| s.dormant = dormant);
        }
        let lost = c.state_mut(|s| {
            s.power_busy = false;
            s.power_done += 1;
            match &done {
                Ok(_) => {
                    s.status.asleep = asleep;
                    s.power_error = None;
                    None
                }
                Err(e) if failed_with_type(e, VM_LOST) => {
                    Some(format!("the agent's VM is gone: {}", root_cause(e)))
                }
                Err(e) => {
                    // Left as it was; the caller hears why.
                    s.want_asleep = s.status.asleep;
                    s.power_error = Some(ApiError::new(
                        crate::error::Code::Unavailable,
                        format!(
                            "could not {} the VM: {}",
                            if asleep { "put to sleep" } else { "wake" },
                            root_cause(e)
                        ),
                    ));
                    None
                }
            }
        });
        if let Some(reason) = lost {
            return reason;
        }
        if done.is_ok() {
            set_phase(c, if asleep { Phase::Sleeping } else { awake });
        }
    }
}

/// Tells the pool about the agent's VM's power ([`PowerChange`]); `None` when the pool did
/// not answer (then the VM counts as it did: the pool's count only ever errs high).
async fn tell_pool(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
    change: PowerChange,
) -> Option<PowerState> {
    let input = c.state(|s| PoolPowerInput {
        tenant: s.input.tenant.clone(),
        request: s.request.clone(),
        vm: s.status.vm.clone().unwrap_or_else(|| VmId(String::new())),
        change,
    });
    match c
        .execute_local_activity(PoolPower, input, claim_options(stop))
        .await
    {
        Ok(state) => Some(state),
        Err(e) => {
            if !c.is_replaying() {
                tracing::warn!(agent = %c.state(|s| s.status.workflow.clone()), ?change,
                    error = %root_cause(&e), "the pool did not hear of the VM's power");
            }
            None
        }
    }
}

/// Waits until the pool counts the agent's dormant VM again, so that it may wake: at once
/// when there is room under `max_vms`, else in line (the status says where) until the pool
/// lets it in. False when the agent was put to sleep again or killed meanwhile.
async fn room_to_wake(
    c: &WorkflowContext<AgentWorkflow>,
    stop: &WorkflowCancellationToken,
) -> bool {
    loop {
        let waiting = match tell_pool(c, stop, PowerChange::Wake).await {
            // Unknown: the pool does not hold the VM as dormant (it was rebuilt from its
            // hosts and counts every VM), so there is nothing to wait for.
            Some(PowerState::Awake | PowerState::Unknown) => None,
            Some(PowerState::Waiting { position }) => Some(format!(
                "waiting for room under max_vms to wake its VM ({position} in line)"
            )),
            Some(PowerState::Dormant) => Some("waiting for the pool to let its VM wake".into()),
            None => Some("the pool does not answer; waiting to wake its VM".into()),
        };
        let Some(waiting) = waiting else {
            c.state_mut(|s| s.status.waiting = None);
            refresh_details(c);
            return true;
        };
        let retry = if waiting.starts_with("the pool") {
            POOL_RETRY
        } else {
            CLAIM_RECHECK
        };
        c.state_mut(|s| s.status.waiting = Some(waiting));
        refresh_details(c);
        let woken = |s: &AgentWorkflow| s.claim_settled || s.want_asleep || s.killed_by.is_some();
        temporalio_sdk::workflows::select! {
            _ = c.wait_condition(woken).fuse() => {}
            _ = c.timer(retry).fuse() => {}
        }
        let go_on = c.state_mut(|s| {
            s.claim_settled = false;
            let go_on = !s.want_asleep && s.killed_by.is_none() && !stop.is_cancelled();
            if !go_on {
                s.status.waiting = None;
            }
            go_on
        });
        if !go_on {
            refresh_details(c);
            return false;
        }
    }
}

/// Resolves once the pool confirms the agent's VM is gone (after a `vm_lost` signal, the
/// claim's state is `Failed`), with the pool's reason. Unconfirmed signals are ignored.
async fn vm_lost(c: &WorkflowContext<AgentWorkflow>, stop: &WorkflowCancellationToken) -> String {
    loop {
        if c.wait_condition(|s| s.vm_lost).await.is_err() {
            // Cancelled: the caller's other branch ends the wait.
            return futures::future::pending().await;
        }
        c.state_mut(|s| s.vm_lost = false);
        let input = c.state(|s| ClaimInput {
            tenant: s.input.tenant.clone(),
            claim: ClaimRequest {
                request: s.request.clone(),
                agent: s.status.workflow.clone(),
                developer: s.input.developer.clone(),
                workspace: s.input.workspace.clone(),
                wait: true,
                spawn_request_id: String::new(),
                spawn_signed_at: 0,
                taken_by: None,
                auth: None,
            },
            started_at: 0,
            probe: true,
        });
        let answer = c
            .execute_local_activity(ClaimVm, input, claim_options(stop))
            .await;
        if let Ok(ClaimState::Failed { reason }) = answer {
            return reason;
        }
    }
}

/// Options of a look at a waiting claim: an ordinary activity, not a local one. A local
/// activity keeps its agent's workflow task open (and the run pinned in the worker's cache)
/// until it returns, and the look is a query the pool's own workflow task answers. Thousands
/// of queued agents look in waves (a burst of spawns makes their timers fire together); as
/// local activities they held every workflow task slot of the worker while the pool's task,
/// which alone could answer them, waited for a slot: the 10,000-agent bench stalled at ~1,780
/// agents that way (RELIABILITY #36). An ordinary activity's agent task completes at once;
/// the look waits in an activity slot.
fn probe_options(stop: &WorkflowCancellationToken) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(30))
        .retry_policy(quick_retries())
        .summary("look at the waiting claim".to_string())
        .cancellation_token(stop.clone())
        .build()
}

/// Options of a claim call: a local activity, answered at once (skipping the activity task
/// queue is a large part of a warm spawn's latency).
fn claim_options(stop: &WorkflowCancellationToken) -> LocalActivityOptions {
    LocalActivityOptions::builder()
        .start_to_close_timeout(Duration::from_secs(30))
        .retry_policy(quick_retries())
        .cancellation_token(stop.clone())
        .build()
}

/// Retries of a call to the pool (a claim, a look at one): a few quick tries; after that the
/// agent says in its status that the pool does not answer, and asks again on a timer. A
/// rejected claim is final.
fn quick_retries() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(200))
        .maximum_interval(Duration::from_secs(2))
        .maximum_attempts(2)
        .non_retryable_error_types([CLAIM_REJECTED])
        .build()
}

/// Hands the VM back for deletion; runs even after a cancellation, and retries until the
/// pool confirms. Without a running pool the agent deletes its VM itself, on the VM's host.
async fn release(c: &WorkflowContext<AgentWorkflow>) {
    let (input, host) = c.state(|s| {
        (
            ReleaseInput {
                tenant: s.input.tenant.clone(),
                request: s.request.clone(),
                vm: s.status.vm.clone(),
            },
            s.vm_host.clone(),
        )
    });
    let options = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(60))
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_interval(Duration::from_secs(30))
                .build(),
        )
        .cancellation_token(WorkflowCancellationToken::new())
        .summary("release VM".to_string())
        .build();
    // Released until the VM is confirmed gone (the pool answers early after a while).
    for _ in 0..20 {
        match c
            .execute_activity(ReleaseVm, input.clone(), options.clone())
            .await
        {
            Ok(reply) if !reply.pool_running => {
                if let Some(vm) = &input.vm {
                    delete_own_vm(c, &input.tenant, vm, host.as_deref()).await;
                }
                break;
            }
            Ok(reply) if !reply.gone => continue,
            _ => break,
        }
    }
}

/// Deletes the agent's VM on its host's queue (no pool runs to do it).
async fn delete_own_vm(
    c: &WorkflowContext<AgentWorkflow>,
    tenant: &str,
    vm: &VmId,
    host: Option<&str>,
) {
    let options = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(30))
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_interval(Duration::from_secs(10))
                .maximum_attempts(10)
                .build(),
        )
        .cancellation_token(WorkflowCancellationToken::new())
        .summary(format!("delete {vm} (no pool runs)"))
        .build();
    let options = on_host(options, c.task_queue(), host, HOST_START_WITHIN);
    let input = DeleteVmInput {
        tenant: tenant.to_string(),
        vm: vm.clone(),
        owner: Some(c.state(|s| s.request.clone())),
    };
    let deleted = c.execute_activity(DeleteVm, input, options).await;
    if !c.is_replaying() {
        match deleted {
            Ok(_) => {
                tracing::warn!(tenant, vm = %vm, "no pool runs; deleted the agent's VM on its host")
            }
            // Left for the pool's reaper (a recovering pool deletes VMs of ended agents).
            Err(e) => tracing::warn!(tenant, vm = %vm, error = %root_cause(&e),
                "no pool runs and the VM could not be deleted"),
        }
    }
}

fn set_phase(c: &WorkflowContext<AgentWorkflow>, phase: Phase) {
    c.state_mut(|s| {
        s.status.phase = Some(phase);
        if !s.status.reached.contains(&phase) {
            s.status.reached.push(phase);
        }
        if !c.is_replaying() {
            tracing::info!(agent = %s.status.workflow, phase = %phase, vm = ?s.status.vm,
                "agent phase");
        }
    });
    refresh_details(c);
}

/// The Web UI's "current details": phase, VM, exit code.
fn refresh_details(c: &WorkflowContext<AgentWorkflow>) {
    let details = c.state(|s| {
        let st = &s.status;
        let mut out = format!(
            "**{}** `{}`\n- vm: {}{}\n- command: `{}`\n",
            st.slug,
            st.phase.map_or("-", Phase::as_str),
            st.vm.as_ref().map_or("-".to_string(), |v| v.to_string()),
            if st.asleep { " [stopped]" } else { "" },
            st.command.join(" ")
        );
        if st.vm.is_some() {
            out.push_str(&format!("- follow: `murmur logs -f {}`\n", st.slug));
        }
        if let Some(p) = st.queue_position {
            out.push_str(&format!("- waiting for a VM: position {p}\n"));
        }
        if let Some(w) = &st.waiting {
            out.push_str(&format!("- waiting: {w}\n"));
        }
        if let Some(code) = st.exit_code {
            out.push_str(&format!("- exit code: {code}\n"));
        }
        if let Some(e) = &st.error {
            out.push_str(&format!("- error: {e}\n"));
        }
        out
    });
    c.set_current_details(details);
}

/// The pool's `CODE: reason` from a failed claim, or an `UNAVAILABLE` one.
fn claim_error(e: &ActivityExecutionError) -> ApiError {
    let cause = root_cause(e);
    ApiError::find_in(&cause).unwrap_or_else(|| {
        ApiError::new(
            crate::error::Code::Unavailable,
            format!("could not claim a VM: {cause}"),
        )
    })
}
