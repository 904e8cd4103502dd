//! `PoolWorkflow` (`pool/<tenant>`): the thin Temporal shell around [`Pool`].
//!
//! The shell owns no decisions. Its handlers check credentials and feed the machine requests;
//! its run loop ([`run_loop`]) carries out the machine's intents ([`intents`]) and feeds
//! their outcomes back; [`views`] renders status, details and the record a later run starts
//! from. Handlers reachable from the `temporal` CLI take lenient input; a malformed signal is
//! logged and counted, never a failed workflow task.

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

mod admission;
mod intents;
mod run_loop;
mod views;

use std::time::Duration;

use temporalio_common::data_converters::RawValue;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{SyncWorkflowContext, WorkflowContext, WorkflowContextView, WorkflowResult};

use crate::auth::{ops, unsigned_body};
use crate::error::ApiError;
use crate::machine::{ClaimRequest, ClaimState, Intent, Pool, PowerState};
use crate::messages::{
    ClaimAnswer, ClaimBatch, ClaimProbe, ConfigRequest, ConfigSnapshot, FLUSH_REPLY_IDS,
    FlushReply, FlushRequest, Inventory, InventoryPage, Lenient, MAX_CLAIM_BATCH, NukeReport,
    NukeStep, NukeStepReply, PoolInput, ReleaseReply, ReleaseRequest, UpReply, UpRequest,
    VmPowerRequest, decode_lenient,
};
use crate::model::{ResourceDoc, ResourceKind};
use crate::shell::{UpdateError, boxed, now_ms, to_millis};
use crate::status::PoolStatus;

pub use crate::shell::{BOOT_TIMEOUT, HOST_START_WITHIN, pool_workflow_id};

/// Patch: worker-signed requests (claims, releases, VM power changes) are checked by their
/// update's validator ([`crate::gate::check_service`]), not by a `murmur.verify` local
/// activity in the handler; runs recorded before keep the activity on replay.
const PATCH_CHECKED_IN_VALIDATOR: &str = "service-checked-in-validator";

/// Patch: an agent whose claim is served while the pool answers it is not also signalled
/// `claim_settled` (the answer says so); runs recorded before signalled every claim served.
const PATCH_ANSWER_NOT_SIGNAL: &str = "claim-answer-not-signal";

/// Permission a flush or nuke needs.
const PERM_FLUSH: &str = crate::auth::permissions::POOL_DELETE;

/// Longest a `release` update waits for the VM to be gone before answering with where things
/// stand. Bounded so no update handler stays open for long (the server caps in-flight updates
/// per workflow, and open handlers hold off continue-as-new); the caller simply asks again.
pub const HANDLER_WAIT: Duration = Duration::from_secs(30);

/// The pool workflow's state: the machine plus the shell's own bookkeeping.
#[workflow]
pub struct PoolWorkflow {
    pool: Pool,
    /// Intents produced by handlers and outcomes, started by the run loop.
    outbox: Vec<Intent>,
    /// Flush updates waiting for their deletes.
    flushes_in_progress: u32,
    /// Messages rejected for bad input (this run).
    rejected_messages: u64,
    /// What the last nuke did, for `flush` updates waiting on it.
    last_nuke: Option<NukeReport>,
    /// `flush` signals waiting for their credential check.
    signalled: Vec<FlushRequest>,
    /// The revision of the pool's record last written into the memo (`None`: not this run).
    record_written: Option<u64>,
    /// The host registry rang (the `hosts` doorbell) since the run loop last looked; with
    /// whether a round would have started at that moment (what runs recorded before
    /// [`run_loop::PATCH_DOORBELL_AFTER_OUTCOMES`] did, in the handler).
    doorbell: Option<bool>,
    /// Host reads started this run; a read's result carries its number, and only the latest
    /// read may serve a round ([`run_loop::PATCH_LATEST_HOST_READ`]).
    host_reads: u64,
}

#[workflow_methods]
impl PoolWorkflow {
    /// Builds the state from the input: the pool carried by continue-as-new, or — for a run
    /// that carries nothing — a pool that first recovers from its sources of truth.
    #[init]
    pub fn new(ctx: &WorkflowContextView, input: PoolInput) -> Self {
        // The workflow id names the tenant; an input that disagrees (or did not decode) does
        // not get to pick another tenant's pool.
        let tenant = ctx
            .workflow_id()
            .strip_prefix("pool/")
            .unwrap_or(&input.tenant)
            .to_string();
        let pool = match input.carried {
            Some(pool) if pool.tenant == tenant => *pool,
            _ => Pool::recovering(
                tenant,
                ctx.raw().randomness_seed,
                to_millis(ctx.start_time()),
            ),
        };
        Self {
            pool,
            outbox: Vec::new(),
            flushes_in_progress: 0,
            rejected_messages: 0,
            last_nuke: None,
            signalled: Vec::new(),
            record_written: None,
            doorbell: None,
            host_reads: 0,
        }
    }

    /// The run loop: carry out intents, feed their outcomes to the machine, roll over.
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        run_loop::run(ctx).await
    }

    /// `flush` as an update: destroys every warm VM, bumps the generation, and answers once
    /// the flushed VMs are gone from the substrate (or stuck deleting). Any payload is read
    /// leniently (none at all is a plain flush); a malformed one is rejected before it
    /// reaches history.
    #[update_validator(flush)]
    pub fn validate_flush(
        &self,
        _ctx: &WorkflowContextView,
        raw: &RawValue,
    ) -> Result<(), UpdateError> {
        parse_flush(raw).map(|_| ()).map_err(boxed)
    }

    /// See the `flush` validator above. Needs `pool-config.delete`; with `nuke`, starts the
    /// nuke workflow (or joins the one under way) and answers when it is done.
    #[update]
    pub async fn flush(
        ctx: &mut WorkflowContext<Self>,
        raw: RawValue,
    ) -> Result<FlushReply, UpdateError> {
        let req = parse_flush(&raw).map_err(boxed)?;
        wait_for_config(ctx).await?;
        let op = if req.nuke { ops::NUKE } else { ops::FLUSH };
        let who = admission::developer(ctx, op, unsigned_body(&req), PERM_FLUSH, req.auth.clone())
            .await
            .map_err(boxed)?;
        let request_id = req
            .auth
            .as_ref()
            .map(|a| a.request_id.clone())
            .unwrap_or_default();
        if req.nuke {
            let before = ctx.state_mut(|s| {
                let intents = s.pool.request_nuke(&request_id, &who.developer);
                s.outbox.extend(intents);
                s.pool.nukes
            });
            ctx.wait_condition(|s| s.pool.nukes > before)
                .await
                .map_err(|e| Box::new(e) as UpdateError)?;
            return Ok(ctx.state(|s| FlushReply {
                generation: s.pool.generation,
                nuke: s.last_nuke.clone(),
                ..Default::default()
            }));
        }
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        let (vms, generation) = ctx.state_mut(|s| s.start_flush(now, &who.developer, replaying));
        ctx.wait_condition(|s| s.pool.flush_settled(&vms))
            .await
            .map_err(|e| Box::new(e) as UpdateError)?;
        let done = now_ms(ctx);
        let stuck = ctx.state_mut(|s| {
            s.flushes_in_progress = s.flushes_in_progress.saturating_sub(1);
            s.pool.last_flush_ms = Some(done.saturating_sub(now));
            vms.iter().filter(|vm| s.pool.vms.contains_key(vm)).count() as u32
        });
        Ok(FlushReply {
            flushed: vms.len() as u32,
            vms: vms.into_iter().take(FLUSH_REPLY_IDS).collect(),
            generation,
            stuck,
            nuke: None,
        })
    }

    /// `flush` as a signal (fire and forget), for `temporal workflow signal --name flush`.
    /// Takes any payload; a malformed one is logged and ignored. The credential is checked
    /// by the run loop before anything happens; a refusal is recorded in `denials`.
    #[signal(name = "flush")]
    pub fn flush_signal(&mut self, ctx: &mut SyncWorkflowContext<Self>, raw: RawValue) {
        match parse_flush(&raw) {
            Ok(req) => self.signalled.push(req),
            Err(e) if !ctx.is_replaying() => self.reject("flush", &e),
            Err(_) => self.rejected_messages += 1,
        }
    }

    /// `up`: reconcile now and answer with a summary.
    #[update]
    pub fn up(&mut self, ctx: &mut SyncWorkflowContext<Self>, _req: Lenient<UpRequest>) -> UpReply {
        let now = to_millis(ctx.workflow_time());
        let intents = self.pool.reconcile(now);
        self.outbox.extend(intents);
        views::up_reply(&self.pool)
    }

    /// `up` as a signal; any payload is accepted.
    #[signal(name = "up")]
    pub fn up_signal(&mut self, ctx: &mut SyncWorkflowContext<Self>, _raw: RawValue) {
        let now = to_millis(ctx.workflow_time());
        let intents = self.pool.reconcile(now);
        self.outbox.extend(intents);
    }

    /// The host registry says its view changed (a doorbell: any payload is accepted and
    /// ignored). It asks for a reaper round, which reads the view from the registry itself,
    /// so a stray signal costs one round and can never make the pool believe a host was lost.
    ///
    /// The handler only notes the ring; the run loop asks for the round after it has fed the
    /// machine every outcome that is ready. Asking here made the answer depend on whether the
    /// SDK delivered the doorbell with an activity's result in one activation or in two,
    /// which a replay after a worker crash did differently (a nondeterminism error,
    /// RELIABILITY.md #28).
    #[signal(name = "hosts")]
    pub fn hosts_signal(&mut self, _ctx: &mut SyncWorkflowContext<Self>, _raw: RawValue) {
        let would_start = self.pool.scan_would_start();
        self.doorbell = Some(self.doorbell.unwrap_or(false) || would_start);
    }

    /// Validates a config change (rejections leave no trace in history). While a recovering
    /// pool has not read its config back, only the payload is checked here; the handler
    /// checks the change once the config is known.
    #[update_validator(apply_config)]
    pub fn validate_apply_config(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<ConfigRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        let kind = ResourceKind::parse(&req.kind).map_err(boxed)?;
        if !self.pool.config_known() {
            return Ok(());
        }
        self.pool
            .validate_change(kind, &req.name, &req.change)
            .map(|_| ())
            .map_err(boxed)
    }

    /// Applies a config change and answers with the resource as it now is. Needs
    /// `<kind>.edit`, or `<kind>.create` for a workspace that does not exist yet.
    #[update]
    pub async fn apply_config(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<ConfigRequest>,
    ) -> Result<ResourceDoc, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        let kind = ResourceKind::parse(&req.kind).map_err(boxed)?;
        wait_for_config(ctx).await?;
        let exists = ctx.state(|s| s.pool.doc(kind, &req.name).is_ok());
        let permission = crate::auth::permissions::config(kind.as_str(), exists);
        let who = admission::developer(
            ctx,
            ops::CONFIG,
            unsigned_body(&req),
            &permission,
            req.auth.clone(),
        )
        .await
        .map_err(boxed)?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        ctx.state_mut(|s| {
            let change = s
                .pool
                .validate_change(kind, &req.name, &req.change)
                .map_err(boxed)?;
            let (doc, intents) = s.pool.commit_change(change, &who.developer, now);
            s.outbox.extend(intents);
            if !replaying {
                tracing::info!(tenant = %s.pool.tenant, kind = kind.as_str(), name = %req.name,
                    generation = doc.generation, actor = %who.developer, "config changed");
            }
            Ok(doc)
        })
    }

    /// Checks a claim: a known one always passes; a new one needs its workspace to exist,
    /// the developer to be under `max_agents_per_developer`, and no nuke holding the pool.
    #[update_validator(claim)]
    pub fn validate_claim(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<ClaimRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        if !self.pool.claims.contains_key(&req.request) || req.taken_by.is_some() {
            // Sent by the worker (a new claim: for a spawn whose request works once).
            admission::service_checked(self, ops::CLAIM, req, req.auth.clone()).map_err(boxed)?;
        }
        self.pool.validate_claim(req).map_err(boxed)
    }

    /// An agent claims a VM (idempotent by request id), asks again where its claim stands,
    /// or reports the VM it was handed taken by another agent. Answers at once.
    #[update]
    pub async fn claim(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<ClaimRequest>,
    ) -> Result<ClaimState, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        wait_for_config(ctx).await?;
        let known = ctx.state(|s| s.pool.claims.contains_key(&req.request));
        if (!known || req.taken_by.is_some()) && !ctx.patched(PATCH_CHECKED_IN_VALIDATOR) {
            admission::service(ctx, ops::CLAIM, &req, req.auth.clone())
                .await
                .map_err(boxed)?;
        }
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        // Always answered at once: a claim that has to wait is told by a `claim_settled`
        // signal when it is served, so no update stays open (the server caps in-flight
        // updates per workflow; waiting ones would starve flushes and other claims).
        let told = ctx.patched(PATCH_ANSWER_NOT_SIGNAL);
        ctx.state_mut(|s| s.take_claim(&req, now, replaying, told))
            .map_err(boxed)
    }

    /// Refuses a `claims` payload that is not a batch of claims, or too big a batch. Each
    /// claim is checked by the handler, which answers every claim on its own.
    #[update_validator(claims)]
    pub fn validate_claims(
        &self,
        _ctx: &WorkflowContextView,
        batch: &Lenient<ClaimBatch>,
    ) -> Result<(), UpdateError> {
        let batch = batch.as_result().map_err(boxed)?;
        if batch.claims.len() > MAX_CLAIM_BATCH {
            return Err(boxed(ApiError::invalid_argument(format!(
                "a batch holds at most {MAX_CLAIM_BATCH} claims, not {}",
                batch.claims.len()
            ))));
        }
        admission::service_checked(self, ops::CLAIMS, batch, batch.auth.clone()).map_err(boxed)?;
        Ok(())
    }

    /// The claims of many agents at once, sent by one worker and checked once for all of
    /// them (by the validator): the path of every agent's claim, so that hundreds of claims a second cost the
    /// pool a few updates and workflow tasks, not one each (the server also caps in-flight
    /// updates per workflow). Each claim is taken exactly as the single `claim` update takes
    /// it; the answers come back in the batch's order.
    #[update]
    pub async fn claims(
        ctx: &mut WorkflowContext<Self>,
        batch: Lenient<ClaimBatch>,
    ) -> Result<Vec<ClaimAnswer>, UpdateError> {
        let batch = batch.into_result().map_err(boxed)?;
        wait_for_config(ctx).await?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        let told = ctx.patched(PATCH_ANSWER_NOT_SIGNAL);
        Ok(ctx.state_mut(|s| {
            batch
                .claims
                .iter()
                .map(|req| match s.take_claim(req, now, replaying, told) {
                    Ok(state) => ClaimAnswer::State(state),
                    Err(e) => ClaimAnswer::Refused(e),
                })
                .collect()
        }))
    }

    /// Refuses a `release` whose payload is not a release request.
    #[update_validator(release)]
    pub fn validate_release(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<ReleaseRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        admission::service_checked(self, ops::RELEASE, req, req.auth.clone()).map_err(boxed)
    }

    /// The agent behind a claim ended: its VM is deleted, never returned to the pool.
    /// Answers once the VM is gone (or after [`HANDLER_WAIT`]; asking again is harmless).
    #[update]
    pub async fn release(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<ReleaseRequest>,
    ) -> Result<ReleaseReply, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        if !ctx.patched(PATCH_CHECKED_IN_VALIDATOR) {
            admission::service(ctx, ops::RELEASE, &req, req.auth.clone())
                .await
                .map_err(boxed)?;
        }
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        let (held, deleting) = ctx.state_mut(|s| {
            let held = s.pool.claims.get(&req.request).and_then(|c| c.vm.clone());
            let (deleting, intents) = s.pool.release(&req.request, now);
            s.outbox.extend(intents);
            if !replaying {
                tracing::info!(tenant = %s.pool.tenant, request = %req.request, vm = ?held,
                    "release");
            }
            (held, deleting)
        });
        if let Some(vm) = &deleting {
            temporalio_sdk::workflows::select! {
                r = ctx.wait_condition(|s| s.pool.flush_settled(std::slice::from_ref(vm))) => {
                    r.map_err(|e| Box::new(e) as UpdateError)?;
                }
                _ = ctx.timer(HANDLER_WAIT) => {}
            }
        }
        let gone = deleting.is_none_or(|vm| ctx.state(|s| !s.pool.vms.contains_key(&vm)));
        Ok(ReleaseReply {
            vm: held,
            gone,
            pool_running: true,
        })
    }

    /// Refuses a `vm_power` whose payload is not a power change.
    #[update_validator(vm_power)]
    pub fn validate_vm_power(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<VmPowerRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        admission::service_checked(self, ops::VM_POWER, req, req.auth.clone()).map_err(boxed)
    }

    /// An agent's VM went to sleep without holding host memory (it stops counting against
    /// `max_vms`), or its agent asks to wake it (it counts again once there is room; until
    /// then the wake waits in line and the agent is told by `claim_settled`). Answers at once.
    #[update]
    pub async fn vm_power(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<VmPowerRequest>,
    ) -> Result<PowerState, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        if !ctx.patched(PATCH_CHECKED_IN_VALIDATOR) {
            admission::service(ctx, ops::VM_POWER, &req, req.auth.clone())
                .await
                .map_err(boxed)?;
        }
        wait_for_config(ctx).await?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        Ok(ctx.state_mut(|s| {
            let (state, intents) = s.pool.power_changed(&req.request, &req.vm, req.change, now);
            s.outbox.extend(intents);
            if !replaying {
                tracing::info!(tenant = %s.pool.tenant, vm = %req.vm, change = ?req.change,
                    answer = ?state, in_use = s.pool.in_use(), "vm power");
            }
            state
        }))
    }

    /// Refuses a `nuke_pause` whose payload is not a nuke step.
    #[update_validator(nuke_pause)]
    pub fn validate_nuke_pause(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<NukeStep>,
    ) -> Result<(), UpdateError> {
        req.check().map_err(boxed)
    }

    /// Nuke, step 1: the nuke holds the pool (no hand-outs, no backfill); answers once
    /// nothing is booting. The request behind the nuke is the pool's own (admitted when it was
    /// asked for) or the developer's, which is verified again here (so a stale copy is
    /// refused whatever the pool remembers) and admitted once. A refusal is final.
    #[update]
    pub async fn nuke_pause(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<NukeStep>,
    ) -> Result<NukeStepReply, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        admission::service(ctx, ops::NUKE_STEP, &req, req.auth.clone())
            .await
            .map_err(boxed)?;
        let request = admission::nuke(ctx, &req).await.map_err(boxed)?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        ctx.state_mut(|s| {
            let paused = s.pool.nuke_pause(&request, now);
            if paused.is_ok() && !replaying {
                tracing::warn!(tenant = %s.pool.tenant, actor = ?req.actor, "nuke: pool paused");
            }
            paused.map(|_| ())
        })
        .map_err(boxed)?;
        ctx.wait_condition(|s| s.pool.booting() == 0)
            .await
            .map_err(|e| Box::new(e) as UpdateError)?;
        Ok(ctx.state(|s| NukeStepReply {
            generation: s.pool.generation,
            vms: s.pool.in_use(),
        }))
    }

    /// Refuses a `nuke_reset` whose payload is not a nuke step.
    #[update_validator(nuke_reset)]
    pub fn validate_nuke_reset(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<NukeStep>,
    ) -> Result<(), UpdateError> {
        req.check().map_err(boxed)
    }

    /// Nuke, last step: forget every VM and claim, bump the generation, resume backfill. A
    /// retried reset (its first answer was lost with its worker) changes nothing.
    #[update]
    pub async fn nuke_reset(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<NukeStep>,
    ) -> Result<NukeStepReply, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        admission::service(ctx, ops::NUKE_STEP, &req, req.auth.clone())
            .await
            .map_err(boxed)?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        Ok(ctx.state_mut(|s| {
            if s.pool.nuke.holds_pool() {
                let intents = s.pool.nuke_reset(req.report.deleted, now);
                s.outbox.extend(intents);
                s.last_nuke = Some(req.report.clone());
                if !replaying {
                    tracing::warn!(tenant = %s.pool.tenant, actor = ?req.actor,
                        terminated = req.report.terminated, deleted = req.report.deleted,
                        "nuke: pool reset and resumed");
                }
            }
            NukeStepReply {
                generation: s.pool.generation,
                vms: s.pool.in_use(),
            }
        }))
    }

    /// The pool status (`murmur pool status`); lists are capped, the inventory is paged by
    /// the `inventory` query.
    #[query]
    pub fn status(&self, _ctx: &WorkflowContextView) -> PoolStatus {
        self.status_view()
    }

    /// One page of the VM records and claims (`murmur pool status --inventory`).
    #[query]
    pub fn inventory(&self, _ctx: &WorkflowContextView, page: Lenient<InventoryPage>) -> Inventory {
        views::inventory(&self.pool, &page.into_result().unwrap_or_default())
    }

    /// Where one claim stands, without an update (a waiting agent's periodic look: it costs
    /// the pool no history and none of its in-flight update budget). A malformed input
    /// answers `Unknown`.
    #[query]
    pub fn claim_state(
        &self,
        _ctx: &WorkflowContextView,
        probe: Lenient<ClaimProbe>,
    ) -> ClaimState {
        match probe.into_result() {
            Ok(p) => self.pool.claim_state(&p.request),
            Err(_) => ClaimState::Unknown,
        }
    }

    /// The build of the worker answering (`murmur version`).
    #[query]
    pub fn version(&self, _ctx: &WorkflowContextView) -> String {
        format!("murmur-worker {}", env!("CARGO_PKG_VERSION"))
    }

    /// Every resource of the tenant (`murmur get`); `recovering` while a recovering pool
    /// has not read its config back yet.
    #[query]
    pub fn config(&self, _ctx: &WorkflowContextView) -> ConfigSnapshot {
        views::config_snapshot(&self.pool)
    }
}

impl PoolWorkflow {
    /// Takes a verified claim: a new one's spawn request is admitted once, then the machine
    /// records the claim (idempotent by request id) and says where it stands. With `told`,
    /// the claiming agent is not also signalled `claim_settled` for what this answer tells it
    /// (its claim served at once): the answer is the notification.
    fn take_claim(
        &mut self,
        req: &ClaimRequest,
        now: u64,
        replaying: bool,
        told: bool,
    ) -> Result<ClaimState, ApiError> {
        if !self.pool.claims.contains_key(&req.request) && req.taken_by.is_none() {
            admission::spawn(self, req, now)?;
        }
        self.pool.validate_claim(req)?;
        let intents = self.pool.claim(req, now);
        let to_the_claimant =
            |i: &Intent| matches!(i, Intent::Notify { agent } if *agent == req.agent);
        self.outbox.extend(
            intents
                .into_iter()
                .filter(|i| !(told && to_the_claimant(i))),
        );
        let state = self.pool.claim_state(&req.request);
        if !replaying {
            tracing::info!(tenant = %self.pool.tenant, agent = %req.agent, claim = ?state,
                "claim");
        }
        Ok(state)
    }

    /// Flushes and queues the deletes; logs only the first time, not on replay.
    fn start_flush(
        &mut self,
        now: u64,
        actor: &str,
        replaying: bool,
    ) -> (Vec<crate::model::VmId>, u64) {
        let (vms, intents) = self.pool.flush(now);
        self.outbox.extend(intents);
        self.flushes_in_progress += 1;
        if !replaying {
            tracing::info!(tenant = %self.pool.tenant, actor, flushed = vms.len(),
                generation = self.pool.generation, "flush");
        }
        (vms, self.pool.generation)
    }

    fn reject(&mut self, name: &str, err: &ApiError) {
        self.rejected_messages += 1;
        tracing::warn!(tenant = %self.pool.tenant, handler = name, error = %err,
            "rejected malformed message");
    }

    fn status_view(&self) -> PoolStatus {
        let mut s = PoolStatus::build(
            &self.pool,
            self.flushes_in_progress > 0,
            self.pool.nuke.holds_pool(),
        );
        s.rejected_messages = self.rejected_messages;
        s
    }
}

/// Waits until a recovering pool has read its config back (at once otherwise).
async fn wait_for_config(ctx: &WorkflowContext<PoolWorkflow>) -> Result<(), UpdateError> {
    ctx.wait_condition(|s| s.pool.config_known())
        .await
        .map_err(|e| Box::new(e) as UpdateError)
}

/// Reads a flush request (with `nuke`, the pool starts the nuke workflow).
fn parse_flush(raw: &RawValue) -> Result<FlushRequest, ApiError> {
    decode_lenient(raw)
}
