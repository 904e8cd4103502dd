//! `PoolWorkflow` (`pool/<tenant>`): the thin Temporal shell around [`Pool`].
//!
//! The shell owns no decisions. It feeds the machine events (activity results, flushes,
//! config edits, back-off timers), starts the activities for the commands the machine returns
//! and keeps track of them until they finish. Handlers reachable from the `temporal` CLI take
//! lenient input; a malformed signal is logged and counted, never a failed workflow task.

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

use std::collections::BTreeSet;
use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use temporalio_common::RetryPolicy;
use temporalio_common::data_converters::RawValue;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ChildWorkflowOptions, ContinueAsNewOptions, ParentClosePolicy,
    SignalWorkflowOptions, SyncWorkflowContext, WorkflowContext, WorkflowContextView,
    WorkflowIdReusePolicy, WorkflowResult,
};

use crate::agent_workflow::AgentWorkflow;

use crate::activity_api::{
    BootVm, DeleteVm, DeleteVmInput, HOST_FULL, ReadHosts, ReapInput, ReapScanVms, ReapScope,
    on_host,
};
use crate::auth::{Credential, Denial, Identity, VerifyRequest, ops, unsigned_body};
use crate::error::ApiError;
use crate::gate::{self, Refusal};
use crate::hosts::HostView;
use crate::machine::{
    ClaimRequest, ClaimState, Command, DEFAULT_REAP_INTERVAL_MS, MAX_DENIALS, Pool, ReapScan,
};
use crate::messages::{
    ConfigRequest, FlushReply, FlushRequest, Lenient, NukeStep, NukeStepReply, PoolInput,
    ReleaseReply, ReleaseRequest, UpRequest, decode_lenient,
};
use crate::model::{Millis, ResourceDoc, ResourceKind, VmId};
use crate::nuke_workflow::{NukeInput, NukeReport, NukeWorkflow, nuke_workflow_id};
use crate::search_attrs::search_attributes;
use crate::status::PoolStatus;

/// Boot deadline of one VM: create plus readiness handshake.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Permission a flush or nuke needs.
const PERM_FLUSH: &str = "pool-config.delete";
/// Longest a `release` update waits for the VM to be gone before answering with where things
/// stand. Bounded so no update handler stays open for long (the server caps in-flight updates
/// per workflow, and open handlers hold off continue-as-new); the caller simply asks again.
pub const HANDLER_WAIT: Duration = Duration::from_secs(30);
/// Wait before retrying to start a nuke while the previous one is closing.
const NUKE_RETRY_MS: Millis = 1_000;
/// Patch marker: reaper scans run while the pool is paused, so a pool left paused by a nuke
/// that died resumes.
const PATCH_REAP_WHILE_PAUSED: &str = "reap-while-paused";
/// Patch marker: new VMs are placed on registered hosts and their activities routed to the
/// host's queue (runs from before it keep every VM behind the shared queue).
const PATCH_HOST_PLACEMENT: &str = "host-placement";
/// How long an activity on a host's queue may wait to be picked up before the host counts as
/// unreachable for it (the registry's lease decides whether the host is lost).
pub const HOST_START_WITHIN: Duration = Duration::from_secs(30);
/// Roll over to a new run once history grows past this many events.
const MAX_HISTORY_EVENTS: u32 = 10_000;

/// Error type of update handlers, as the SDK wants it.
pub type UpdateError = Box<dyn Error + Send + Sync>;

/// Workflow id of a tenant's pool.
pub fn pool_workflow_id(tenant: &str) -> String {
    format!("pool/{tenant}")
}

/// Every resource of the tenant, as `murmur get` shows them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSnapshot {
    /// `pool-config default`.
    pub pool_config: ResourceDoc,
    /// All workspaces.
    pub workspaces: Vec<ResourceDoc>,
}

/// The pool workflow's state: the machine plus the shell's own bookkeeping.
#[workflow]
pub struct PoolWorkflow {
    pool: Pool,
    /// Commands produced by handlers, started by the run loop.
    outbox: Vec<Command>,
    /// True when the run must re-issue in-flight work of a previous run.
    resumed: bool,
    /// Flush updates waiting for their deletes.
    flushes_in_progress: u32,
    /// Messages rejected for bad input.
    rejected_messages: u64,
    /// A `flush` with `nuke` asked for a nuke that has not started yet.
    nuke_requested: bool,
    /// The nuke workflow's start is in flight.
    nuke_starting: bool,
    /// The nuke could not start (the previous one had not closed yet): retry after a timer.
    nuke_waiting: bool,
    /// The retry timer of a nuke start runs.
    nuke_retry_pending: bool,
    /// What the last nuke did, for `flush` updates waiting on it.
    last_nuke: Option<NukeReport>,
    /// The verified request (id, developer) behind the nuke to start.
    nuke_authorization: Option<(String, String)>,
    /// `flush` signals waiting for their credential check.
    signalled: Vec<FlushRequest>,
    /// A reaper scan is due (set by the reaper's timer, and at the start of every run).
    reap_due: bool,
    /// Scans also run while paused (this run is past [`PATCH_REAP_WHILE_PAUSED`]).
    reap_while_paused: bool,
    /// Time between reaper scans (the worker's setting, from the last scan).
    reap_interval_ms: Millis,
    /// A reaper scan (which reads the host view first) is in flight.
    reap_in_flight: bool,
    /// A run from before host placement heard from a host registry: roll over to a new run,
    /// which places VMs on hosts.
    roll_over_for_placement: bool,
}

/// What finished among the activities the shell started.
enum Outcome {
    /// A VM placed on a host (`None`: the shared queue) came up, with the accelerator it runs
    /// with (empty where not applicable).
    Booted(VmId, Option<String>, String),
    /// A boot failed, with why.
    BootFailed(VmId, Option<String>, String),
    /// A boot was never picked up: its host does not poll its queue.
    BootNotStarted(VmId),
    Deleted(VmId),
    DeleteFailed(VmId),
    /// The nuke workflow started (true) or could not start yet (false: one still runs).
    NukeStarted(bool),
    /// A waiting agent was told its claim is settled (or could not be).
    Notified,
    /// A `flush` signal's credential was checked.
    SignalChecked(Box<FlushRequest>, Result<Identity, Refusal>),
    /// A reaper scan that started with these warm VMs finished (or failed, with why), with
    /// the host view read before it (when placement is on and the registry answered).
    Reaped(
        BTreeSet<VmId>,
        Result<Box<ReapScan>, String>,
        Option<Box<HostView>>,
    ),
    /// The reaper's timer fired: time for the next scan.
    ReapDue,
    /// The timer of a hold-back (image, seq) fired.
    HoldBackOver(String, u64),
    /// The timer before retrying a nuke start fired.
    NukeRetryDue,
}

#[workflow_methods]
impl PoolWorkflow {
    /// Builds the state from the input: a new pool, or the one carried by continue-as-new.
    #[init]
    pub fn new(ctx: &WorkflowContextView, input: PoolInput) -> Self {
        let resumed = input.carried.is_some();
        let pool = match input.carried {
            Some(pool) => *pool,
            None => Pool::new(
                input.tenant,
                ctx.raw().randomness_seed,
                to_millis(ctx.start_time()),
            ),
        };
        Self {
            pool,
            outbox: Vec::new(),
            resumed,
            flushes_in_progress: 0,
            rejected_messages: 0,
            nuke_requested: false,
            nuke_starting: false,
            nuke_waiting: false,
            nuke_retry_pending: false,
            last_nuke: None,
            nuke_authorization: None,
            signalled: Vec::new(),
            // The first scan runs as soon as the run starts: leftovers of a crash are found
            // (and, after the grace period, deleted) without waiting a full interval.
            reap_due: true,
            reap_while_paused: false,
            reap_interval_ms: DEFAULT_REAP_INTERVAL_MS,
            reap_in_flight: false,
            roll_over_for_placement: false,
        }
    }

    /// The run loop: start commands, wait for the next event, feed it to the machine.
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        let c = ctx.clone();
        let now = now_ms(&c);
        if !c.state(|s| s.pool.placement) && c.patched(PATCH_HOST_PLACEMENT) {
            c.state_mut(|s| s.pool.placement = true);
        }
        c.state_mut(|s| {
            let cmds = if s.resumed {
                s.pool.resume(now)
            } else {
                s.pool.reconcile(now)
            };
            s.outbox.extend(cmds);
        });
        let mut in_flight: Vec<LocalBoxFuture<'_, Outcome>> = Vec::new();
        // Timers do not hold off continue-as-new: the next run starts its own (a reaper scan
        // at once, hold-backs from the carried state, a nuke start if one is still asked for).
        let mut timers: Vec<LocalBoxFuture<'_, Outcome>> = Vec::new();
        let mut last_details = String::new();
        loop {
            let (tenant, cmds) =
                c.state_mut(|s| (s.pool.tenant.clone(), std::mem::take(&mut s.outbox)));
            for cmd in cmds {
                match cmd {
                    Command::HoldBack {
                        image,
                        seq,
                        wait_ms,
                    } => timers.push(after(&c, wait_ms, Outcome::HoldBackOver(image, seq))),
                    cmd => in_flight.push(start_command(&c, &tenant, cmd)),
                }
            }
            if c.state_mut(|s| s.take_nuke_start()) {
                let (request, actor) =
                    c.state(|s| s.nuke_authorization.clone().unwrap_or_default());
                in_flight.push(start_nuke(&c, &tenant, request, actor));
            }
            for req in c.state_mut(|s| std::mem::take(&mut s.signalled)) {
                in_flight.push(check_signal(&c, &tenant, req));
            }
            // Scanning while paused (to find a nuke that died) came after runs that did not:
            // their histories replay without it.
            if c.state(|s| s.pool.paused && s.reap_due && !s.reap_while_paused)
                && c.patched(PATCH_REAP_WHILE_PAUSED)
            {
                c.state_mut(|s| s.reap_while_paused = true);
            }
            if let Some((input, baseline)) = c.state_mut(|s| s.take_reap_due()) {
                if c.state(|s| s.pool.placement) {
                    in_flight.push(start_host_reap(&c, input, baseline));
                } else {
                    in_flight.push(start_reap(&c, input, baseline));
                }
            }
            let details = c.state(details_markdown);
            if details != last_details {
                c.set_current_details(details.clone());
                last_details = details;
            }

            // Roll over once history is long, between operations and with no handler running:
            // the new run starts from the same state.
            let roll_over = (c.continue_as_new_suggested()
                || c.history_length() > MAX_HISTORY_EVENTS
                || c.state(|s| s.roll_over_for_placement))
                && in_flight.is_empty()
                && !c.state(|s| s.nuke_requested);
            if roll_over && c.all_handlers_finished() {
                let carried = c.state(|s| s.pool.clone());
                let input = PoolInput {
                    tenant: carried.tenant.clone(),
                    carried: Some(Box::new(carried)),
                };
                let Err(end) = c.continue_as_new(input, ContinueAsNewOptions::default());
                return Err(end);
            }
            let mut handlers_done = handlers_finished_if(&c, roll_over);

            temporalio_sdk::workflows::select! {
                outcome = next_finished(&mut in_flight).fuse() => {
                    let now = now_ms(&c);
                    let replaying = c.is_replaying();
                    let interval = c.state_mut(|s| {
                        let mut reap_again = None;
                        let cmds = match outcome {
                            Outcome::Booted(vm, host, accel) => {
                                if !accel.is_empty() {
                                    s.pool.accel = accel;
                                }
                                s.pool.boot_ended_on(&vm, host.as_deref(), Ok(()), now)
                            }
                            Outcome::BootFailed(vm, host, err) => {
                                s.pool.boot_ended_on(&vm, host.as_deref(), Err(&err), now)
                            }
                            Outcome::BootNotStarted(vm) => s.pool.boot_not_started(&vm, now),
                            Outcome::Deleted(vm) => s.pool.deleted(&vm, now),
                            Outcome::DeleteFailed(vm) => s.pool.delete_failed(&vm),
                            Outcome::Notified => Vec::new(),
                            Outcome::SignalChecked(req, verdict) => {
                                s.apply_signalled_flush(*req, verdict, now, replaying);
                                Vec::new()
                            }
                            Outcome::Reaped(baseline, scan, view) => {
                                s.reap_in_flight = false;
                                let mut cmds = match view {
                                    Some(view) => s.hosts_changed(*view, now, replaying),
                                    None => Vec::new(),
                                };
                                cmds.extend(s.reaped(&baseline, scan, now, replaying));
                                reap_again = Some(s.reap_interval_ms);
                                cmds
                            }
                            Outcome::NukeStarted(started) => {
                                s.nuke_starting = false;
                                if started {
                                    s.nuke_requested = false;
                                } else {
                                    s.nuke_waiting = true;
                                }
                                Vec::new()
                            }
                            timer => s.timer_fired(timer, now),
                        };
                        s.outbox.extend(cmds);
                        reap_again
                    });
                    if let Some(ms) = interval {
                        timers.push(after(&c, ms, Outcome::ReapDue));
                    }
                    if c.state(|s| s.nuke_waiting) {
                        c.state_mut(|s| s.nuke_waiting = false);
                        timers.push(after(&c, NUKE_RETRY_MS, Outcome::NukeRetryDue));
                        c.state_mut(|s| s.nuke_retry_pending = true);
                    }
                }
                fired = next_finished(&mut timers).fuse() => {
                    let now = now_ms(&c);
                    c.state_mut(|s| {
                        let cmds = s.timer_fired(fired, now);
                        s.outbox.extend(cmds);
                    });
                }
                r = c.wait_condition(|s| {
                    !s.outbox.is_empty()
                        || !s.signalled.is_empty()
                        || s.nuke_start_due()
                        || (s.reap_due && (!s.pool.paused || s.reap_while_paused))
                }) => { r?; }
                _ = (&mut handlers_done).fuse() => {}
            }
        }
    }

    /// `flush` as an update: destroys every warm VM, bumps the generation, and answers once
    /// the flushed VMs are gone from the substrate. Any payload is read leniently (none at all
    /// is a plain flush); a malformed one is rejected before it reaches history.
    #[update_validator(flush)]
    pub fn validate_flush(
        &self,
        _ctx: &WorkflowContextView,
        raw: &RawValue,
    ) -> Result<(), UpdateError> {
        parse_flush(raw).map(|_| ()).map_err(boxed)
    }

    /// See the `flush` validator above. Needs `pool-config.delete`; with `nuke`, starts the
    /// nuke workflow (or joins the one running) and answers when it is done.
    #[update]
    pub async fn flush(
        ctx: &mut WorkflowContext<Self>,
        raw: RawValue,
    ) -> Result<FlushReply, UpdateError> {
        let req = parse_flush(&raw).map_err(boxed)?;
        let op = if req.nuke { ops::NUKE } else { ops::FLUSH };
        let who = Self::gate(
            ctx,
            op,
            unsigned_body(&req),
            Some(PERM_FLUSH),
            req.auth.clone(),
        )
        .await
        .map_err(boxed)?;
        if req.nuke {
            let request_id = req
                .auth
                .as_ref()
                .map(|a| a.request_id.clone())
                .unwrap_or_default();
            let before = ctx.state_mut(|s| {
                s.request_nuke(request_id, &who.developer);
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
        ctx.wait_condition(|s| vms.iter().all(|vm| !s.pool.vms.contains_key(vm)))
            .await
            .map_err(|e| Box::new(e) as UpdateError)?;
        let done = now_ms(ctx);
        ctx.state_mut(|s| {
            s.flushes_in_progress = s.flushes_in_progress.saturating_sub(1);
            s.pool.last_flush_ms = Some(done.saturating_sub(now));
        });
        Ok(FlushReply {
            flushed: vms.len() as u32,
            vms,
            generation,
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

    /// `up`: reconcile now and answer with the status.
    #[update]
    pub fn up(
        &mut self,
        ctx: &mut SyncWorkflowContext<Self>,
        _req: Lenient<UpRequest>,
    ) -> PoolStatus {
        let now = to_millis(ctx.workflow_time());
        let cmds = self.pool.reconcile(now);
        self.outbox.extend(cmds);
        self.status_view()
    }

    /// `up` as a signal; any payload is accepted.
    #[signal(name = "up")]
    pub fn up_signal(&mut self, ctx: &mut SyncWorkflowContext<Self>, _raw: RawValue) {
        let now = to_millis(ctx.workflow_time());
        let cmds = self.pool.reconcile(now);
        self.outbox.extend(cmds);
    }

    /// The host registry says its view changed (a doorbell: any payload is accepted and
    /// ignored). It asks for a reaper scan, which reads the view from the registry itself, so
    /// a stray signal costs one scan and can never make the pool believe a host was lost. A
    /// run from before host placement rolls over instead: the next run places VMs on hosts.
    #[signal(name = "hosts")]
    pub fn hosts_signal(&mut self, _ctx: &mut SyncWorkflowContext<Self>, _raw: RawValue) {
        if self.pool.placement {
            self.request_reap();
        } else {
            self.roll_over_for_placement = true;
        }
    }

    /// Validates a config change (rejections leave no trace in history).
    #[update_validator(apply_config)]
    pub fn validate_apply_config(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<ConfigRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        let kind = ResourceKind::parse(&req.kind).map_err(boxed)?;
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
        let exists = ctx.state(|s| s.pool.doc(kind, &req.name).is_ok());
        let permission = format!(
            "{}.{}",
            kind.as_str(),
            if exists { "edit" } else { "create" }
        );
        let who = Self::gate(
            ctx,
            ops::CONFIG,
            unsigned_body(&req),
            Some(&permission),
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
            let (doc, cmds) = s.pool.commit_change(change, &who.developer, now);
            s.outbox.extend(cmds);
            if !replaying {
                tracing::info!(tenant = %s.pool.tenant, kind = kind.as_str(), name = %req.name,
                    generation = doc.generation, actor = %who.developer, "config changed");
            }
            Ok(doc)
        })
    }

    /// Checks a claim: a retried one always passes; a new one needs its workspace to exist,
    /// the developer to be under `max_agents_per_developer`, and no nuke in progress.
    #[update_validator(claim)]
    pub fn validate_claim(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<ClaimRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        self.pool.validate_claim(req).map_err(boxed)
    }

    /// An agent claims a VM (idempotent by request id), or asks again where its claim stands.
    /// Answers at once.
    #[update]
    pub async fn claim(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<ClaimRequest>,
    ) -> Result<ClaimState, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        let known = ctx.state(|s| s.pool.claims.contains_key(&req.request));
        if !known {
            // A new claim: sent by the worker, for a spawn whose request id works once.
            Self::gate_service(ctx, ops::CLAIM, &req, req.auth.clone())
                .await
                .map_err(boxed)?;
            let now = now_ms(ctx);
            let replaying = ctx.is_replaying();
            ctx.state_mut(|s| s.admit_once(ops::SPAWN, &req.spawn_request_id, now, replaying))
                .map_err(boxed)?;
        }
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        ctx.state_mut(|s| -> Result<(), UpdateError> {
            s.pool.validate_claim(&req).map_err(boxed)?;
            let cmds = s.pool.claim(&req, now);
            s.outbox.extend(cmds);
            if !replaying {
                tracing::info!(tenant = %s.pool.tenant, agent = %req.agent,
                    claim = ?s.pool.claim_state(&req.request), "claim");
            }
            Ok(())
        })?;
        // Always answered at once: a claim that has to wait is told by a `claim_settled`
        // signal when it is served, so no update stays open (the server caps in-flight
        // updates per workflow; waiting ones would starve flushes and other claims).
        Ok(ctx.state(|s| s.pool.claim_state(&req.request)))
    }

    /// Refuses a `release` whose payload is not a release request.
    #[update_validator(release)]
    pub fn validate_release(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<ReleaseRequest>,
    ) -> Result<(), UpdateError> {
        req.check().map_err(boxed)
    }

    /// The agent behind a claim ended: its VM is deleted, never returned to the pool.
    /// Answers once the VM is gone (or after [`HANDLER_WAIT`]; asking again is harmless).
    #[update]
    pub async fn release(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<ReleaseRequest>,
    ) -> Result<ReleaseReply, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        Self::gate_service(ctx, ops::RELEASE, &req, req.auth.clone())
            .await
            .map_err(boxed)?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        let (held, deleting) = ctx.state_mut(|s| {
            let held = s.pool.claims.get(&req.request).and_then(|c| c.vm.clone());
            let (deleting, cmds) = s.pool.release(&req.request, now);
            s.outbox.extend(cmds);
            if !replaying {
                tracing::info!(tenant = %s.pool.tenant, request = %req.request, vm = ?held,
                    "release");
            }
            (held, deleting)
        });
        if let Some(vm) = &deleting {
            temporalio_sdk::workflows::select! {
                r = ctx.wait_condition(|s| !s.pool.vms.contains_key(vm)) => {
                    r.map_err(|e| Box::new(e) as UpdateError)?;
                }
                _ = ctx.timer(HANDLER_WAIT) => {}
            }
        }
        let gone = deleting.is_none_or(|vm| ctx.state(|s| !s.pool.vms.contains_key(&vm)));
        Ok(ReleaseReply { vm: held, gone })
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

    /// Nuke, step 1: stop hand-outs and backfill; answers once nothing is booting.
    #[update]
    pub async fn nuke_pause(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<NukeStep>,
    ) -> Result<NukeStepReply, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        Self::gate_service(ctx, ops::NUKE_STEP, &req, req.auth.clone())
            .await
            .map_err(boxed)?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        ctx.state_mut(|s| {
            // The developer request behind the nuke works once. The nuke holding the pool may
            // ask again (its activity is retried when a worker dies under it), and a nuke this
            // pool started itself was admitted when it was asked for.
            if s.pool.nuke_request.as_deref() != Some(req.authorized_request.as_str()) {
                s.admit_once(ops::NUKE, &req.authorized_request, now, replaying)?;
                s.pool.nuke_request = Some(req.authorized_request.clone());
            }
            Ok::<(), ApiError>(())
        })
        .map_err(boxed)?;
        ctx.state_mut(|s| {
            s.pool.pause(now);
            if !replaying {
                tracing::warn!(tenant = %s.pool.tenant, actor = ?req.actor, "nuke: pool paused");
            }
        });
        ctx.wait_condition(|s| s.pool.booting() == 0)
            .await
            .map_err(|e| Box::new(e) as UpdateError)?;
        Ok(ctx.state(|s| NukeStepReply {
            generation: s.pool.generation,
            vms: s.pool.in_use(),
            held: s
                .pool
                .vms
                .values()
                .filter(|v| v.state == crate::model::VmState::Assigned)
                .filter_map(|v| v.agent.clone().map(|a| (v.id.clone(), a)))
                .collect(),
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

    /// Nuke, last step: forget every VM and claim, bump the generation, resume backfill.
    #[update]
    pub async fn nuke_reset(
        ctx: &mut WorkflowContext<Self>,
        req: Lenient<NukeStep>,
    ) -> Result<NukeStepReply, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        Self::gate_service(ctx, ops::NUKE_STEP, &req, req.auth.clone())
            .await
            .map_err(boxed)?;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        Ok(ctx.state_mut(|s| {
            if !s.pool.paused {
                // A retried reset (the first answer was lost with its worker): the pool runs
                // again and may hold new VMs and claims already; resetting again would lose them.
                return NukeStepReply {
                    generation: s.pool.generation,
                    vms: s.pool.in_use(),
                    held: Vec::new(),
                };
            }
            let cmds = s.pool.reset_after_nuke(req.report.deleted, now);
            s.outbox.extend(cmds);
            s.pool.nuke_request = None;
            s.last_nuke = Some(req.report.clone());
            if !replaying {
                tracing::warn!(tenant = %s.pool.tenant, actor = ?req.actor,
                    terminated = req.report.terminated, deleted = req.report.deleted,
                    "nuke: pool reset and resumed");
            }
            NukeStepReply {
                generation: s.pool.generation,
                vms: s.pool.in_use(),
                held: Vec::new(),
            }
        }))
    }

    /// The pool status (`murmur pool status`).
    #[query]
    pub fn status(&self, _ctx: &WorkflowContextView) -> PoolStatus {
        self.status_view()
    }

    /// The build of the worker answering (`murmur version`).
    #[query]
    pub fn version(&self, _ctx: &WorkflowContextView) -> String {
        format!("murmur-worker {}", env!("CARGO_PKG_VERSION"))
    }

    /// Every resource of the tenant (`murmur get`).
    #[query]
    pub fn config(&self, _ctx: &WorkflowContextView) -> ConfigSnapshot {
        ConfigSnapshot {
            pool_config: self.pool.pool_config_doc(),
            workspaces: self
                .pool
                .workspaces
                .keys()
                .filter_map(|n| self.pool.doc(ResourceKind::Workspace, n).ok())
                .collect(),
        }
    }
}

impl PoolWorkflow {
    /// Flushes and queues the deletes; logs only the first time, not on replay.
    fn start_flush(&mut self, now: Millis, actor: &str, replaying: bool) -> (Vec<VmId>, u64) {
        let (vms, cmds) = self.pool.flush(now);
        self.outbox.extend(cmds);
        self.flushes_in_progress += 1;
        if !replaying {
            tracing::info!(tenant = %self.pool.tenant, actor, flushed = vms.len(),
                generation = self.pool.generation, "flush");
        }
        (vms, self.pool.generation)
    }

    /// The auth gate of every mutating request to the pool: the credential is verified by
    /// the `murmur.verify` local activity, then its request id is admitted once. A refusal
    /// is recorded (who, what, why) in the status and the worker log.
    async fn gate(
        ctx: &WorkflowContext<Self>,
        op: &str,
        body: String,
        permission: Option<&str>,
        credential: Option<Credential>,
    ) -> Result<Identity, ApiError> {
        let tenant = ctx.state(|s| s.pool.tenant.clone());
        let req = VerifyRequest {
            target: pool_workflow_id(&tenant),
            tenant,
            op: op.to_string(),
            body,
            permission: permission.map(str::to_string),
            credential: credential.clone(),
        };
        let verdict = gate::verify(ctx, req).await;
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        ctx.state_mut(|s| s.admit(op, verdict, credential.as_ref(), now, replaying))
    }

    /// The gate for worker-internal requests (claim, release, nuke steps): signed with the
    /// worker's key, refused from developers.
    async fn gate_service<T: serde::Serialize>(
        ctx: &WorkflowContext<Self>,
        op: &str,
        message: &T,
        credential: Option<Credential>,
    ) -> Result<Identity, ApiError> {
        Self::gate(ctx, op, unsigned_body(message), None, credential).await
    }

    /// Admits a verified request's id once; records any refusal.
    fn admit(
        &mut self,
        op: &str,
        verdict: Result<Identity, Refusal>,
        credential: Option<&Credential>,
        now: Millis,
        replaying: bool,
    ) -> Result<Identity, ApiError> {
        let result = verdict.and_then(|id| {
            let request_id = credential.map_or("", |c| c.request_id.as_str());
            self.pool
                .seen_requests
                .admit(request_id, now)
                .map(|()| id.clone())
                .map_err(|error| Refusal {
                    error,
                    who: format!("{}@{}", id.developer, id.tenant),
                })
        });
        if let Err(r) = &result {
            self.record_denial(op, r, now, replaying);
        }
        result.map_err(|r| r.error)
    }

    /// Admits a request id that was verified elsewhere (a spawn, a nuke) once.
    fn admit_once(
        &mut self,
        op: &str,
        request_id: &str,
        now: Millis,
        replaying: bool,
    ) -> Result<(), ApiError> {
        self.pool
            .seen_requests
            .admit(request_id, now)
            .inspect_err(|e| {
                self.record_denial(op, &Refusal::from(e.clone()), now, replaying);
            })
    }

    fn record_denial(&mut self, op: &str, refusal: &Refusal, now: Millis, replaying: bool) {
        self.pool.denials.push(Denial {
            at: now,
            op: op.to_string(),
            who: refusal.who.clone(),
            why: refusal.error.to_string(),
        });
        let excess = self.pool.denials.len().saturating_sub(MAX_DENIALS);
        self.pool.denials.drain(..excess);
        if !replaying {
            tracing::warn!(tenant = %self.pool.tenant, op, who = %refusal.who,
                error = %refusal.error, "request denied");
        }
    }

    /// Asks for a nuke, unless one is already under way (then the caller joins it).
    fn request_nuke(&mut self, request_id: String, actor: &str) {
        if !self.pool.paused && !self.nuke_requested {
            self.nuke_requested = true;
            self.nuke_authorization = Some((request_id, actor.to_string()));
        }
    }

    /// A `flush` signal whose credential was checked: admitted, it flushes (or nukes).
    fn apply_signalled_flush(
        &mut self,
        req: FlushRequest,
        verdict: Result<Identity, Refusal>,
        now: Millis,
        replaying: bool,
    ) {
        let op = if req.nuke { ops::NUKE } else { ops::FLUSH };
        let Ok(who) = self.admit(op, verdict, req.auth.as_ref(), now, replaying) else {
            return;
        };
        if req.nuke {
            let request_id = req.auth.map(|a| a.request_id).unwrap_or_default();
            self.request_nuke(request_id, &who.developer);
        } else {
            self.start_flush(now, &who.developer, replaying);
            // Nobody waits for a signal's deletes.
            self.flushes_in_progress = self.flushes_in_progress.saturating_sub(1);
        }
    }

    /// True when the run loop should start the nuke workflow now.
    fn nuke_start_due(&self) -> bool {
        self.nuke_requested && !self.nuke_starting && !self.nuke_retry_pending && !self.nuke_waiting
    }

    /// Claims the nuke start for the run loop. A nuke that paused the pool meanwhile is the
    /// one asked for (joined), so no second one starts.
    fn take_nuke_start(&mut self) -> bool {
        if self.pool.paused {
            self.nuke_requested = false;
        }
        if self.nuke_start_due() {
            self.nuke_starting = true;
            self.pool.nuke_request = self.nuke_authorization.as_ref().map(|(r, _)| r.clone());
            return true;
        }
        false
    }

    /// Asks for a reaper scan (its timer fired, or the host view changed). Idempotent, and a
    /// scan in flight absorbs it: whatever order a timer and a doorbell arrive in, and
    /// whether or not they arrive in one activation, the same scans run.
    fn request_reap(&mut self) {
        if !self.reap_in_flight {
            self.reap_due = true;
        }
    }

    /// Applies a host view read from the registry; logs VMs written off with lost hosts.
    fn hosts_changed(&mut self, view: HostView, now: Millis, replaying: bool) -> Vec<Command> {
        let before = self.pool.counters.written_off;
        let cmds = self.pool.hosts_changed(view, now);
        let written_off = self.pool.counters.written_off - before;
        if written_off > 0 && !replaying {
            tracing::warn!(tenant = %self.pool.tenant, written_off,
                "VMs of lost hosts written off");
        }
        cmds
    }

    /// Acts on a fired timer.
    fn timer_fired(&mut self, timer: Outcome, now: Millis) -> Vec<Command> {
        match timer {
            Outcome::ReapDue => self.request_reap(),
            Outcome::HoldBackOver(image, seq) => return self.pool.hold_back_over(&image, seq, now),
            Outcome::NukeRetryDue => self.nuke_retry_pending = false,
            _ => {}
        }
        Vec::new()
    }

    /// The input of the reaper scan that is due, with the warm VMs it will judge, if one is.
    /// While the pool is paused the scan only asks whether the nuke that paused it still runs.
    fn take_reap_due(&mut self) -> Option<(ReapInput, BTreeSet<VmId>)> {
        if !self.reap_due || (self.pool.paused && !self.reap_while_paused) {
            return None;
        }
        self.reap_due = false;
        self.reap_in_flight = true;
        let input = ReapInput {
            tenant: self.pool.tenant.clone(),
            claims: self.pool.claim_requests(),
            stranded: self.pool.config.spec.reap_stranded_workflows,
            check_nuke: self.pool.paused,
            scope: ReapScope::Everything,
        };
        Some((input, self.pool.reap_baseline()))
    }

    /// Applies a finished reaper scan; the caller starts the timer for the next one.
    fn reaped(
        &mut self,
        baseline: &BTreeSet<VmId>,
        scan: Result<Box<ReapScan>, String>,
        now: Millis,
        replaying: bool,
    ) -> Vec<Command> {
        match scan {
            Ok(scan) => {
                if scan.interval_ms > 0 {
                    self.reap_interval_ms = scan.interval_ms;
                }
                let before = self.pool.reaper.clone();
                let cmds = self.pool.reap(&scan, baseline, now);
                let after = &self.pool.reaper;
                let changed = after.orphans_deleted != before.orphans_deleted
                    || after.dead_vms_replaced != before.dead_vms_replaced
                    || after.agent_claims_released != before.agent_claims_released
                    || after.stranded_terminated != before.stranded_terminated
                    || after.abandoned_nukes != before.abandoned_nukes;
                if changed && !replaying {
                    tracing::warn!(tenant = %self.pool.tenant,
                        abandoned_nukes = after.abandoned_nukes - before.abandoned_nukes,
                        orphans_deleted = after.orphans_deleted - before.orphans_deleted,
                        dead_vms_replaced = after.dead_vms_replaced - before.dead_vms_replaced,
                        agent_claims_released =
                            after.agent_claims_released - before.agent_claims_released,
                        stranded_terminated =
                            after.stranded_terminated - before.stranded_terminated,
                        suspects = after.suspects.len(), "reaper cleaned up");
                }
                cmds
            }
            Err(error) => {
                if !replaying {
                    tracing::warn!(tenant = %self.pool.tenant, %error, "reaper scan failed");
                }
                Vec::new()
            }
        }
    }

    fn reject(&mut self, name: &str, err: &ApiError) {
        self.rejected_messages += 1;
        tracing::warn!(tenant = %self.pool.tenant, handler = name, error = %err,
            "rejected malformed message");
    }

    fn status_view(&self) -> PoolStatus {
        let mut s = PoolStatus::build(&self.pool, self.flushes_in_progress > 0, self.pool.paused);
        s.rejected_messages = self.rejected_messages;
        s
    }
}

/// Reads a flush request (with `nuke`, the pool starts the nuke workflow).
fn parse_flush(raw: &RawValue) -> Result<FlushRequest, ApiError> {
    decode_lenient(raw)
}

fn boxed(e: ApiError) -> UpdateError {
    Box::new(e)
}

/// Resolves with the first finished future, polling in insertion order (deterministic), and
/// removes it. Pending forever while the list is empty.
pub(crate) fn next_finished<'a, 'b, T>(
    list: &'a mut Vec<LocalBoxFuture<'b, T>>,
) -> impl Future<Output = T> + 'a {
    futures::future::poll_fn(move |cx| {
        for i in 0..list.len() {
            if let Poll::Ready(v) = Pin::new(&mut list[i]).poll(cx) {
                drop(list.remove(i));
                return Poll::Ready(v);
            }
        }
        Poll::Pending
    })
}

fn start_command<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    cmd: Command,
) -> LocalBoxFuture<'a, Outcome> {
    match cmd {
        Command::HoldBack {
            image,
            seq,
            wait_ms,
        } => after(c, wait_ms, Outcome::HoldBackOver(image, seq)),
        Command::Boot(spec) => {
            let vm = spec.vm.clone();
            let opts = ActivityOptions::with_start_to_close_timeout(
                BOOT_TIMEOUT + Duration::from_secs(30),
            )
            .heartbeat_timeout(Duration::from_secs(5))
            .retry_policy(
                RetryPolicy::builder()
                    .initial_interval(Duration::from_secs(1))
                    .maximum_attempts(3)
                    .non_retryable_error_types(["BootFailed"])
                    .build(),
            )
            .summary(match &spec.host {
                Some(host) => format!("boot {} from {} on {host}", spec.vm, spec.image),
                None => format!("boot {} from {}", spec.vm, spec.image),
            })
            .build();
            let host = spec.host.clone();
            let opts = on_host(opts, c.task_queue(), host.as_deref(), HOST_START_WITHIN);
            let fut = c.execute_activity(BootVm, spec, opts);
            async move {
                match fut.await {
                    Ok(report) => Outcome::Booted(vm, host, report.accel),
                    // Nothing was created: the host is not polling, or it is full.
                    Err(e) if never_started(&e) || failed_with_type(&e, HOST_FULL) => {
                        Outcome::BootNotStarted(vm)
                    }
                    Err(e) => Outcome::BootFailed(vm, host, root_cause(&e)),
                }
            }
            .boxed_local()
        }
        Command::Notify { agent } => tell_agent(c, agent, AgentWorkflow::claim_settled),
        // The agent asks where its claim stands; the reason travels with that answer.
        Command::VmLost { agent, .. } => tell_agent(c, agent, AgentWorkflow::vm_lost),
        Command::Delete { vm, reason } => {
            let opts = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(30))
                .heartbeat_timeout(Duration::from_secs(5))
                .retry_policy(
                    RetryPolicy::builder()
                        .initial_interval(Duration::from_millis(500))
                        .maximum_interval(Duration::from_secs(30))
                        .build(),
                )
                .summary(format!("delete {vm} ({reason:?})"))
                .build();
            let host = c.state(|s| s.pool.vms.get(&vm).and_then(|v| v.host.clone()));
            let opts = on_host(opts, c.task_queue(), host.as_deref(), HOST_START_WITHIN);
            let input = DeleteVmInput {
                tenant: tenant.to_string(),
                vm: vm.clone(),
            };
            let fut = c.execute_activity(DeleteVm, input, opts);
            async move {
                match fut.await {
                    Ok(()) => Outcome::Deleted(vm),
                    Err(_) => Outcome::DeleteFailed(vm),
                }
            }
            .boxed_local()
        }
    }
}

/// Sends `signal` (no payload) to an agent. An agent that has ended meanwhile cannot be told;
/// nothing depends on it (agents also re-check on a timer, or ask the pool).
fn tell_agent<'a, S>(
    c: &'a WorkflowContext<PoolWorkflow>,
    agent: String,
    signal: S,
) -> LocalBoxFuture<'a, Outcome>
where
    S: temporalio_common::SignalDefinition<Input = RawValue> + 'static,
{
    let sent = c.external_workflow(agent, None).signal(
        signal,
        RawValue::empty(),
        SignalWorkflowOptions::default(),
    );
    async move {
        let _ = sent.await;
        Outcome::Notified
    }
    .boxed_local()
}

/// A future that resolves once every update handler has finished, when `roll_over` is asked
/// for (the run loop then continues as new); pending forever otherwise.
pub(crate) fn handlers_finished_if<W>(
    c: &WorkflowContext<W>,
    roll_over: bool,
) -> LocalBoxFuture<'_, ()> {
    if !roll_over {
        return futures::future::pending().boxed_local();
    }
    let c2 = c.clone();
    async move {
        let _ = c2.wait_condition(|_| c2.all_handlers_finished()).await;
    }
    .boxed_local()
}

/// Starts `nuke/<tenant>` as an abandoned child (it must outlive this run, which it resets).
/// Resolves `false` when it cannot start because the previous nuke has not closed yet.
fn start_nuke<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    request: String,
    actor: String,
) -> LocalBoxFuture<'a, Outcome> {
    let options = ChildWorkflowOptions::builder()
        .workflow_id(nuke_workflow_id(tenant))
        .parent_close_policy(ParentClosePolicy::Abandon)
        .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
        .search_attributes(search_attributes(tenant, "nuke", None))
        .static_summary(format!(
            "nuke of tenant {tenant}, asked through pool/{tenant}"
        ))
        .build();
    let input = NukeInput {
        tenant: tenant.to_string(),
        actor: Some(actor),
        auth: None,
        authorized_request: Some(request),
    };
    let fut = c.start_child_workflow(NukeWorkflow::run, input, options);
    async move { Outcome::NukeStarted(fut.await.is_ok()) }.boxed_local()
}

/// Resolves with `outcome` after `ms` of workflow time (a durable timer).
fn after<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    ms: Millis,
    outcome: Outcome,
) -> LocalBoxFuture<'a, Outcome> {
    let t = c.timer(Duration::from_millis(ms.max(1)));
    async move {
        t.await;
        outcome
    }
    .boxed_local()
}

/// Runs one reaper scan; the run loop applies what it found.
fn start_reap<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    input: ReapInput,
    baseline: BTreeSet<VmId>,
) -> LocalBoxFuture<'a, Outcome> {
    let fut = c.execute_activity(ReapScanVms, input, reap_options("reaper scan"));
    async move {
        let scan = fut.await.map(Box::new).map_err(|e| root_cause(&e));
        Outcome::Reaped(baseline, scan, None)
    }
    .boxed_local()
}

/// Options of the reaper's activities.
fn reap_options(summary: &str) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(120))
        .heartbeat_timeout(Duration::from_secs(10))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_attempts(2)
                .build(),
        )
        .summary(summary.to_string())
        .build()
}

/// Runs one reaper scan across hosts: reads the host view, lists each live host's VMs on its
/// own queue and asks Temporal about agents on the shared queue, then merges what came back.
/// A host whose listing failed is left out of `hosts`, so none of its VMs is judged dead.
fn start_host_reap<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    input: ReapInput,
    baseline: BTreeSet<VmId>,
) -> LocalBoxFuture<'a, Outcome> {
    async move {
        let view = c
            .execute_activity(ReadHosts, (), reap_options("read the host registry"))
            .await
            .ok()
            .filter(|v| v.version > 0);
        let live = match &view {
            Some(v) => v.live(),
            None => c.state(|s| s.pool.hosts.live()),
        };
        let host_scans: Vec<_> = live
            .into_iter()
            .map(|host| {
                let scan = ReapInput {
                    scope: ReapScope::HostVms,
                    claims: Vec::new(),
                    ..input.clone()
                };
                let opts = on_host(
                    reap_options(&format!("reaper scan of {host}")),
                    c.task_queue(),
                    Some(&host),
                    HOST_START_WITHIN,
                );
                let fut = c.execute_activity(ReapScanVms, scan, opts);
                async move { (host, fut.await) }
            })
            .collect();
        let workflows = ReapInput {
            scope: ReapScope::Workflows,
            ..input
        };
        let (listings, found) = futures::future::join(
            futures::future::join_all(host_scans),
            c.execute_activity(
                ReapScanVms,
                workflows,
                reap_options("reaper scan of agents"),
            ),
        )
        .await;
        let scan = found.map_err(|e| root_cause(&e)).map(|mut merged| {
            let mut hosts = Vec::new();
            for (host, listing) in listings {
                if let Ok(listing) = listing {
                    merged.vms.extend(listing.vms.into_iter().map(|mut v| {
                        v.host = Some(host.clone());
                        v
                    }));
                    merged.grace_ms = merged.grace_ms.max(listing.grace_ms);
                    merged.interval_ms = merged.interval_ms.max(listing.interval_ms);
                    hosts.push(host);
                }
            }
            merged.hosts = Some(hosts);
            Box::new(merged)
        });
        Outcome::Reaped(baseline, scan, view.map(Box::new))
    }
    .boxed_local()
}

/// True when an activity failed with an application failure of type `type_name` (anywhere
/// in the cause chain).
pub(crate) fn failed_with_type(
    e: &temporalio_sdk::ActivityExecutionError,
    type_name: &str,
) -> bool {
    use temporalio_common::protos::temporal::api::failure::v1::failure::FailureInfo;
    let mut failure = e.failure();
    while let Some(f) = failure {
        if let Some(FailureInfo::ApplicationFailureInfo(info)) = &f.failure_info
            && info.r#type == type_name
        {
            return true;
        }
        failure = f.cause.as_deref();
    }
    false
}

/// True when an activity failed because no worker picked it up in time (its host does not
/// poll its queue), so it never ran.
pub(crate) fn never_started(e: &temporalio_sdk::ActivityExecutionError) -> bool {
    use temporalio_common::protos::temporal::api::enums::v1::TimeoutType;
    use temporalio_common::protos::temporal::api::failure::v1::failure::FailureInfo;
    let mut failure = e.failure();
    while let Some(f) = failure {
        if let Some(FailureInfo::TimeoutFailureInfo(t)) = &f.failure_info
            && t.timeout_type == TimeoutType::ScheduleToStart as i32
        {
            return true;
        }
        failure = f.cause.as_deref();
    }
    false
}

/// Checks a `flush` signal's credential (the run loop applies the verdict).
fn check_signal<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    req: FlushRequest,
) -> LocalBoxFuture<'a, Outcome> {
    let verify = VerifyRequest {
        tenant: tenant.to_string(),
        op: if req.nuke { ops::NUKE } else { ops::FLUSH }.to_string(),
        target: pool_workflow_id(tenant),
        body: unsigned_body(&req),
        permission: Some(PERM_FLUSH.to_string()),
        credential: req.auth.clone(),
    };
    async move {
        let verdict = gate::verify(c, verify).await;
        Outcome::SignalChecked(Box::new(req), verdict)
    }
    .boxed_local()
}

/// The innermost failure message of an activity error (what the activity itself said).
pub(crate) fn root_cause(e: &temporalio_sdk::ActivityExecutionError) -> String {
    let mut msg = e.to_string();
    if let Some(f) = e.failure() {
        msg = f.message.clone();
        let mut cause = f.cause.as_deref();
        while let Some(c) = cause {
            if !c.message.is_empty() {
                msg = c.message.clone();
            }
            cause = c.cause.as_deref();
        }
    }
    msg
}

fn details_markdown(s: &PoolWorkflow) -> String {
    let pool = &s.pool;
    let mut out = format!(
        "**pool/{}** generation {} — {} of {} VMs in use\n",
        pool.tenant,
        pool.generation,
        pool.in_use(),
        pool.config.spec.max_vms
    );
    for ws in &PoolStatus::workspaces_of(pool, s.flushes_in_progress > 0, pool.paused) {
        let (warm, booting, assigned, deleting) = ws.groups.iter().fold((0, 0, 0, 0), |a, g| {
            (
                a.0 + g.warm,
                a.1 + g.booting,
                a.2 + g.assigned,
                a.3 + g.deleting,
            )
        });
        out.push_str(&format!(
            "- `{}` image `{}`: {warm} warm / {booting} booting / {assigned} assigned / {deleting} deleting (min_idle {}){}\n",
            ws.name,
            ws.image_ref,
            ws.min_idle,
            if ws.reasons.is_empty() {
                String::new()
            } else {
                format!(" — {}", ws.reasons.join(", "))
            }
        ));
    }
    out
}

/// Epoch milliseconds of a workflow time (0 when unknown).
pub(crate) fn to_millis(t: Option<SystemTime>) -> Millis {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as Millis)
}

/// The workflow's current time in epoch milliseconds.
pub(crate) fn now_ms<W>(c: &WorkflowContext<W>) -> Millis {
    to_millis(c.workflow_time())
}
