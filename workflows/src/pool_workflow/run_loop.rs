//! The pool's run loop. On every wake-up it first drains *every* outcome that is ready
//! (activities in the order they were started, then timers in the order they were set) into
//! the machine, then issues intents from state in one fixed order: the machine's intents
//! as it returned them, then credential checks of `flush` signals, then the record (memo),
//! then the Web UI's details. What happens therefore depends only on history, never on
//! which of two results arriving in the same workflow task was polled first.
//!
//! The run rolls over (continue-as-new) when the server suggests it or history passes the
//! worker's limit, once no activity is in flight and no update handler runs; timers do not
//! hold it off (the next run sets them again from the carried state, see `Pool::resume`).

use std::collections::BTreeMap;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use temporalio_common::MemoValue;
use temporalio_sdk::{ContinueAsNewOptions, WorkflowContext, WorkflowResult};

use super::PoolWorkflow;
use super::intents::{self, Outcome, Started};
use super::views;
use crate::activity_api::POOL_RECORD_MEMO;
use crate::auth::{Identity, VerifyRequest, ops, unsigned_body};
use crate::gate::{self, Refusal};
use crate::machine::Intent;
use crate::messages::{FlushRequest, PoolInput};
use crate::model::{Millis, VmId};
use crate::shell::{all_ready, handlers_finished_if, now_ms, pool_workflow_id};

/// Patch: deletes sharing a host go out as one `delete_vms` activity ([`batch_deletes`]).
const PATCH_BATCHED_DELETES: &str = "batched-deletes";
/// Patch: the `hosts` doorbell asks for a round after the outcomes that are ready were fed to
/// the machine ([`answer_doorbell`]), not in its handler.
pub(super) const PATCH_DOORBELL_AFTER_OUTCOMES: &str = "doorbell-after-outcomes";
/// Patch: a host read that a later read superseded serves no round ([`superseded_read`]).
pub(super) const PATCH_LATEST_HOST_READ: &str = "latest-host-read";
/// Patch: a reaper round tells running agents the pool holds no claim of to claim again
/// (`Pool::agents_listed`), which lets a waiting agent stop looking at its claim every
/// minute.
const PATCH_TELL_UNCLAIMED: &str = "tell-unclaimed-agents";

/// Runs the pool until it rolls over (or is cancelled).
pub(super) async fn run(ctx: &mut WorkflowContext<PoolWorkflow>) -> WorkflowResult<()> {
    let c = ctx.clone();
    let now = now_ms(&c);
    c.state_mut(|s| {
        let intents = s.pool.resume(now);
        s.outbox.extend(intents);
    });
    let mut in_flight: Vec<LocalBoxFuture<'_, Outcome>> = Vec::new();
    let mut timers: Vec<LocalBoxFuture<'_, Outcome>> = Vec::new();
    let mut last_details = String::new();
    loop {
        answer_doorbell(&c);
        issue(&c, &mut in_flight, &mut timers);
        let details = c.state(views::details_markdown);
        if details != last_details {
            c.set_current_details(details.clone());
            last_details = details;
        }

        let limit = c.state(|s| s.pool.reaper.settings.roll_over());
        let roll_over =
            (c.continue_as_new_suggested() || c.history_length() > limit) && in_flight.is_empty();
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
            outcomes = all_ready([&mut in_flight, &mut timers]).fuse() => {
                let outcomes: Vec<Outcome> =
                    outcomes.into_iter().filter(|o| !superseded_read(&c, o)).collect();
                let now = now_ms(&c);
                let replaying = c.is_replaying();
                let tell_unclaimed = outcomes
                    .iter()
                    .any(|o| matches!(o, Outcome::AgentsListed(..)))
                    && c.patched(PATCH_TELL_UNCLAIMED);
                c.state_mut(|s| {
                    for outcome in outcomes {
                        let intents = s.apply(outcome, now, replaying, tell_unclaimed);
                        s.outbox.extend(intents);
                    }
                });
            }
            r = c.wait_condition(|s| s.has_work()).fuse() => { r?; }
            _ = (&mut handlers_done).fuse() => {}
        }
    }
}

/// True for the result of a host read that a later read superseded: it is dropped. Two reads
/// can be in flight when a nuke's reset restarts the reaper's rounds during a round's read.
/// The earlier one used to serve whichever round was reading when it returned, so a read
/// that outlived its round (a worker killed meanwhile) served the next round or not depending
/// on whether the next round's timer was applied before or after it — and the SDK grouped the
/// two differently live and on replay: the run did not replay (RELIABILITY #37). Only the
/// latest read serves, whatever the order. Runs recorded before the patch keep the old rule.
fn superseded_read(c: &WorkflowContext<PoolWorkflow>, outcome: &Outcome) -> bool {
    let Outcome::HostsRead(read, _) = outcome else {
        return false;
    };
    *read != c.state(|s| s.host_reads) && c.patched(PATCH_LATEST_HOST_READ)
}

/// Asks for a reaper round when the `hosts` doorbell rang. Here, every outcome that was ready
/// when the run loop woke is in the machine already, however the SDK grouped them with the
/// doorbell. Runs recorded before the patch asked at the doorbell's own moment.
fn answer_doorbell(c: &WorkflowContext<PoolWorkflow>) {
    let Some(would_have_started) = c.state(|s| s.doorbell) else {
        return;
    };
    let now = c.patched(PATCH_DOORBELL_AFTER_OUTCOMES) || would_have_started;
    c.state_mut(|s| {
        s.doorbell = None;
        if now {
            let intents = s.pool.request_scan();
            s.outbox.extend(intents);
        }
    });
}

/// Issues what state asks for, in one fixed order.
fn issue<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    in_flight: &mut Vec<LocalBoxFuture<'a, Outcome>>,
    timers: &mut Vec<LocalBoxFuture<'a, Outcome>>,
) {
    let (tenant, intents, signals) = c.state_mut(|s| {
        (
            s.pool.tenant.clone(),
            std::mem::take(&mut s.outbox),
            std::mem::take(&mut s.signalled),
        )
    });
    let (intents, batches) = batch_deletes(c, intents);
    for intent in intents {
        match intents::start(c, &tenant, intent) {
            Started::InFlight(f) => in_flight.push(f),
            Started::Timer(f) => timers.push(f),
        }
    }
    for (host, (vms, reason)) in batches {
        in_flight.push(intents::delete_many(c, &tenant, host, vms, &reason));
    }
    for req in signals {
        in_flight.push(check_signal(c, &tenant, req));
    }
    if let Some(record) = c.state_mut(PoolWorkflow::take_record) {
        let memo = [(POOL_RECORD_MEMO, Some(MemoValue::new(record)))];
        if let Err(e) = c.upsert_memo(memo)
            && !c.is_replaying()
        {
            tracing::warn!(tenant = %tenant, error = %e, "could not write the pool record");
        }
    }
}

/// Deletes of one host issued together (a flush's, a scale-in's): (VM, believed owner) pairs
/// and the first one's reason, by host.
type DeleteBatches = BTreeMap<Option<String>, (Vec<(VmId, Option<String>)>, String)>;

/// Takes out of `intents` the deletes that share a host with another delete, to be issued as
/// one `delete_vms` activity per host instead of one activity each (one activity, one history
/// event pair and one completion instead of a hundred for a flush of 100). Runs recorded
/// before this existed keep one activity per delete ([`PATCH_BATCHED_DELETES`]).
fn batch_deletes(
    c: &WorkflowContext<PoolWorkflow>,
    intents: Vec<Intent>,
) -> (Vec<Intent>, DeleteBatches) {
    let hosts: Vec<Option<Option<String>>> = c.state(|s| {
        intents
            .iter()
            .map(|i| match i {
                Intent::Delete { vm, .. } => Some(s.pool.vms.get(vm).and_then(|v| v.host.clone())),
                _ => None,
            })
            .collect()
    });
    let mut per_host: BTreeMap<&Option<String>, usize> = BTreeMap::new();
    for host in hosts.iter().flatten() {
        *per_host.entry(host).or_default() += 1;
    }
    if !per_host.values().any(|n| *n > 1) || !c.patched(PATCH_BATCHED_DELETES) {
        return (intents, BTreeMap::new());
    }
    let shared: std::collections::BTreeSet<Option<String>> = per_host
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(h, _)| h.clone())
        .collect();
    let mut rest = Vec::new();
    let mut batches = DeleteBatches::new();
    for (intent, host) in intents.into_iter().zip(hosts) {
        match (intent, host) {
            (Intent::Delete { vm, reason }, Some(host)) if shared.contains(&host) => {
                let owner = c.state(|s| s.pool.expected_owner(&vm));
                batches
                    .entry(host)
                    .or_insert_with(|| (Vec::new(), format!("{reason:?}")))
                    .0
                    .push((vm, owner));
            }
            (intent, _) => rest.push(intent),
        }
    }
    (rest, batches)
}

/// Checks a `flush` signal's credential (the run loop applies the verdict).
fn check_signal<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    req: FlushRequest,
) -> LocalBoxFuture<'a, Outcome> {
    let verify = VerifyRequest::developer(
        tenant,
        if req.nuke { ops::NUKE } else { ops::FLUSH },
        pool_workflow_id(tenant),
        unsigned_body(&req),
        super::PERM_FLUSH,
        req.auth.clone(),
    );
    async move {
        let verdict = gate::verify(c, verify).await;
        Outcome::SignalChecked(Box::new(req), verdict)
    }
    .boxed_local()
}

impl PoolWorkflow {
    /// True when the run loop has something to issue.
    fn has_work(&self) -> bool {
        !self.outbox.is_empty()
            || !self.signalled.is_empty()
            || self.doorbell.is_some()
            || self.record_due()
    }

    /// True when the pool's record changed since it was last written (never while a
    /// recovering pool has not read its config back: its defaults must not be written).
    fn record_due(&self) -> bool {
        self.pool.config_known() && self.record_written != Some(self.pool.record_rev)
    }

    /// The record to write into the memo, when it is due.
    fn take_record(&mut self) -> Option<crate::machine::PoolRecord> {
        if !self.record_due() {
            return None;
        }
        self.record_written = Some(self.pool.record_rev);
        Some(self.pool.record())
    }

    /// Feeds one outcome to the machine; returns its intents.
    fn apply(
        &mut self,
        outcome: Outcome,
        now: Millis,
        replaying: bool,
        tell_unclaimed: bool,
    ) -> Vec<Intent> {
        let tenant = self.pool.tenant.clone();
        match outcome {
            Outcome::Booted(vm, host, accel) => {
                if !accel.is_empty() {
                    self.pool.accel = accel;
                }
                self.pool.boot_ended_on(&vm, host.as_deref(), Ok(()), now)
            }
            Outcome::BootFailed(vm, host, err) => {
                self.pool
                    .boot_ended_on(&vm, host.as_deref(), Err(&err), now)
            }
            Outcome::BootNotStarted(vm) => self.pool.boot_not_started(&vm, now),
            Outcome::Deleted(vm) => self.pool.deleted(&vm, now),
            Outcome::Batch(outcomes) => outcomes
                .into_iter()
                .flat_map(|o| self.apply(o, now, replaying, tell_unclaimed))
                .collect(),
            Outcome::DeleteFailed(vm, error) => {
                if !replaying {
                    tracing::warn!(tenant = %tenant, vm = %vm, %error,
                        "delete failed; the VM is stuck deleting and will be tried again");
                }
                self.pool.delete_failed(&vm, &error)
            }
            Outcome::DeleteRefused(vm, owner) => {
                if !replaying {
                    tracing::warn!(tenant = %tenant, vm = %vm, %owner,
                        "delete refused: another agent owns the VM; it is that agent's now");
                }
                self.pool.delete_refused(&vm, &owner, now)
            }
            Outcome::DeleteRetryDue(vm, attempt) => self.pool.delete_retry_due(&vm, attempt),
            Outcome::HoldBackOver(image, seq) => self.pool.hold_back_over(&image, seq, now),
            Outcome::Signalled => Vec::new(),
            Outcome::NukeStarted(started) => self.pool.nuke_started(started),
            Outcome::NukeRetryDue => self.pool.nuke_retry_due(),
            Outcome::RecordRead(read) => {
                let read = read.unwrap_or_default();
                if !replaying {
                    tracing::warn!(tenant = %tenant, source = %read.source, from_run = %read.run_id,
                        found = read.record.is_some(), "recovering the pool: record read");
                }
                self.pool.record_read(read.record, &read.source, now)
            }
            Outcome::HostsRead(_, view) => self.pool.hosts_read(view.map(|v| *v), now),
            Outcome::HostListed(round, host, scan) => {
                let before = self.pool.reaper.clone();
                let intents = self.pool.host_listed(round, &host, scan.map(|s| *s), now);
                if !replaying {
                    log_reaper(&tenant, &before, &self.pool.reaper);
                }
                intents
            }
            Outcome::AgentsListed(round, scan) => {
                let before = self.pool.reaper.clone();
                let intents = self
                    .pool
                    .agents_listed(round, scan.map(|s| *s), now, tell_unclaimed);
                if !replaying {
                    log_reaper(&tenant, &before, &self.pool.reaper);
                }
                intents
            }
            Outcome::ScanDue(round) => self.pool.scan_due(round),
            Outcome::SignalChecked(req, verdict) => {
                self.apply_signalled_flush(*req, verdict, now, replaying)
            }
        }
    }

    /// A `flush` signal whose credential was checked: admitted, it flushes (or nukes).
    fn apply_signalled_flush(
        &mut self,
        req: FlushRequest,
        verdict: Result<Identity, Refusal>,
        now: Millis,
        replaying: bool,
    ) -> Vec<Intent> {
        let op = if req.nuke { ops::NUKE } else { ops::FLUSH };
        let cred = req.auth.clone().unwrap_or_default();
        let admitted = verdict
            .map_err(|r| {
                self.pool.record_denial(op, &r.who, &r.error, now);
                r.error
            })
            .and_then(|who| {
                self.pool
                    .admit(
                        &crate::machine::Admission {
                            op,
                            developer: &who.developer,
                            request_id: &cred.request_id,
                            signed_at: cred.ts,
                            consumer: None,
                        },
                        now,
                    )
                    .map(|()| who)
            });
        let who = match admitted {
            Ok(who) => who,
            Err(error) => {
                if !replaying {
                    tracing::warn!(tenant = %self.pool.tenant, op, %error, "request denied");
                }
                return Vec::new();
            }
        };
        if req.nuke {
            return self.pool.request_nuke(&cred.request_id, &who.developer);
        }
        self.start_flush(now, &who.developer, replaying);
        // Nobody waits for a signal's deletes.
        self.flushes_in_progress = self.flushes_in_progress.saturating_sub(1);
        Vec::new()
    }
}

/// Logs what a reaper listing changed.
fn log_reaper(
    tenant: &str,
    before: &crate::machine::ReaperState,
    after: &crate::machine::ReaperState,
) {
    let changed = after.orphans_deleted != before.orphans_deleted
        || after.dead_vms_replaced != before.dead_vms_replaced
        || after.agent_claims_released != before.agent_claims_released
        || after.stranded_terminated != before.stranded_terminated
        || after.abandoned_nukes != before.abandoned_nukes
        || after.adopted != before.adopted
        || after.agents_told_to_claim != before.agents_told_to_claim;
    if changed {
        tracing::warn!(
            tenant,
            abandoned_nukes = after.abandoned_nukes - before.abandoned_nukes,
            orphans_deleted = after.orphans_deleted - before.orphans_deleted,
            dead_vms_replaced = after.dead_vms_replaced - before.dead_vms_replaced,
            agent_claims_released = after.agent_claims_released - before.agent_claims_released,
            stranded_terminated = after.stranded_terminated - before.stranded_terminated,
            adopted = after.adopted - before.adopted,
            agents_told_to_claim = after.agents_told_to_claim - before.agents_told_to_claim,
            suspects = after.suspects.len(),
            "reaper cleaned up"
        );
    }
}
