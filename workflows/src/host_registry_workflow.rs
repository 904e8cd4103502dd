//! `HostRegistryWorkflow` (`murmur-hosts`, see [`crate::hosts::registry_workflow_id`]): which VM hosts live, as the thin shell around
//! [`Registry`].
//!
//! Workers register with the `register` signal (sent with start, so the first worker creates
//! the registry). For every live host the registry keeps one `murmur.host_lease` activity
//! running on the host's own queue: it heartbeats, and returns after its term to be renewed.
//! When the host dies the lease fails on its heartbeat timeout (or, when the host no longer
//! polls, on its schedule-to-start timeout) and the host is marked lost. Every change of the
//! view is announced to the running pools (`murmur.announce_hosts`), which also re-read it at
//! every reaper scan. `drain` (an update) starts or ends a host's drain, `forget` drops a lost
//! host; `hosts` (a query) answers with the view.

// `#[workflow_methods]` turns each handler into a marker constant without a doc comment; the
// handlers themselves are documented below.
#![allow(missing_docs)]

use std::time::Duration;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use temporalio_common::RetryPolicy;
use temporalio_common::data_converters::RawValue;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ContinueAsNewOptions, SyncWorkflowContext, WorkflowContext,
    WorkflowContextView, WorkflowResult,
};

use crate::activity_api::{AnnounceHosts, HostLease, LeaseInput, on_host};
use crate::error::ApiError;
use crate::hosts::{
    DrainRequest, HostInfo, HostLeave, HostRegistration, HostView, LeaseEnd, Registry,
    RegistryIntent,
};
use crate::messages::{Lenient, decode_lenient};
use crate::shell::{
    UpdateError, handlers_finished_if, next_finished, now_ms, root_cause, to_millis,
};

/// How long one lease runs before it is renewed.
pub const LEASE_TERM: Duration = Duration::from_secs(600);
/// Roll over to a new run once history grows past this many events.
const MAX_HISTORY_EVENTS: u32 = 5_000;

/// Input of the registry: empty for a new one, the registry itself after continue-as-new.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegistryInput {
    /// The registry carried over by continue-as-new.
    pub carried: Option<Registry>,
}

/// The registry workflow's state.
#[workflow]
pub struct HostRegistryWorkflow {
    registry: Registry,
    carried: bool,
    /// Intents produced by handlers, started by the run loop.
    outbox: Vec<RegistryIntent>,
    /// Messages rejected for bad input.
    rejected_messages: u64,
}

/// What finished among the registry's activities.
enum Outcome {
    /// Lease `seq` of a host ended.
    Lease(String, u64, LeaseEnd),
    /// An announcement went out (or failed).
    Announced,
}

#[workflow_methods]
impl HostRegistryWorkflow {
    /// A new registry, or the one carried by continue-as-new.
    #[init]
    pub fn new(ctx: &WorkflowContextView, input: RegistryInput) -> Self {
        let carried = input.carried.is_some();
        let registry = input
            .carried
            .unwrap_or_else(|| Registry::new(to_millis(ctx.start_time())));
        Self {
            registry,
            carried,
            outbox: Vec::new(),
            rejected_messages: 0,
        }
    }

    /// Runs leases and announcements until history is long, then continues as new.
    #[run]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        let c = ctx.clone();
        c.state_mut(|s| {
            if s.carried {
                let resumed = s.registry.resume();
                s.outbox.extend(resumed);
                s.outbox.push(RegistryIntent::Announce);
            }
        });
        let mut in_flight: Vec<LocalBoxFuture<'_, Outcome>> = Vec::new();
        let mut announcing = false;
        let mut announce_again = false;
        loop {
            for intent in c.state_mut(|s| std::mem::take(&mut s.outbox)) {
                match intent {
                    RegistryIntent::StartLease { host, seq } => {
                        in_flight.push(start_lease(&c, host, seq));
                    }
                    RegistryIntent::Announce if announcing => announce_again = true,
                    RegistryIntent::Announce => {
                        announcing = true;
                        in_flight.push(announce(&c));
                    }
                }
            }
            // Leases are long and do not hold off continue-as-new: the next run starts new
            // ones (an abandoned lease stops when its heartbeat finds this run closed).
            let roll_over = (c.continue_as_new_suggested()
                || c.history_length() > MAX_HISTORY_EVENTS)
                && !announcing;
            if roll_over && c.all_handlers_finished() {
                let carried = c.state(|s| s.registry.clone());
                let input = RegistryInput {
                    carried: Some(carried),
                };
                let Err(end) = c.continue_as_new(input, ContinueAsNewOptions::default());
                return Err(end);
            }
            let mut handlers_done = handlers_finished_if(&c, roll_over);
            temporalio_sdk::workflows::select! {
                outcome = next_finished(&mut in_flight).fuse() => {
                    let now = now_ms(&c);
                    let replaying = c.is_replaying();
                    match outcome {
                        Outcome::Lease(host, seq, end) => c.state_mut(|s| {
                            if let LeaseEnd::Failed(why) = &end
                                && !replaying
                                && s.registry.view.hosts.get(&host).is_some_and(|h| h.lease == seq)
                            {
                                tracing::warn!(host = %host, lease = seq, why = %why,
                                    "host lease failed: host lost");
                            }
                            let intents = s.registry.lease_ended(&host, seq, end, now);
                            s.outbox.extend(intents);
                        }),
                        Outcome::Announced => {
                            announcing = false;
                            if announce_again {
                                announce_again = false;
                                c.state_mut(|s| s.outbox.push(RegistryIntent::Announce));
                            }
                        }
                    }
                }
                r = c.wait_condition(|s| !s.outbox.is_empty()) => { r?; }
                _ = (&mut handlers_done).fuse() => {}
            }
        }
    }

    /// A worker registers as a host (any payload is accepted; a malformed one is logged and
    /// ignored).
    #[signal(name = "register")]
    pub fn register(&mut self, ctx: &mut SyncWorkflowContext<Self>, raw: RawValue) {
        let reg = decode_lenient::<HostRegistration>(&raw).and_then(|r| r.validate().map(|()| r));
        match reg {
            Ok(reg) => {
                let now = to_millis(ctx.workflow_time());
                let intents = self.registry.register(&reg, now);
                if !intents.is_empty() && !ctx.is_replaying() {
                    tracing::info!(host = %reg.host, instance = %reg.instance,
                        max_vms = reg.max_vms, memory_mb = reg.memory_mb, "host registered");
                }
                self.outbox.extend(intents);
            }
            Err(e) => {
                self.rejected_messages += 1;
                if !ctx.is_replaying() {
                    tracing::warn!(error = %e, "rejected malformed host registration");
                }
            }
        }
    }

    /// A worker that stops says so: its host is lost at once (any payload is accepted; a
    /// malformed one is logged and ignored, a leave of an earlier instance changes nothing).
    #[signal(name = "leave")]
    pub fn leave(&mut self, ctx: &mut SyncWorkflowContext<Self>, raw: RawValue) {
        let leave = decode_lenient::<HostLeave>(&raw).and_then(|l| l.validate().map(|()| l));
        match leave {
            Ok(leave) => {
                let now = to_millis(ctx.workflow_time());
                let intents = self.registry.leave(&leave, now);
                if !intents.is_empty() && !ctx.is_replaying() {
                    tracing::warn!(host = %leave.host, instance = %leave.instance,
                        reason = %leave.reason, "host lost: it is leaving");
                }
                self.outbox.extend(intents);
            }
            Err(e) => {
                self.rejected_messages += 1;
                if !ctx.is_replaying() {
                    tracing::warn!(error = %e, "rejected malformed host leave");
                }
            }
        }
    }

    /// Refuses a drain of a host nobody registered, or a malformed request.
    #[update_validator(drain)]
    pub fn validate_drain(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<DrainRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        self.registry.host(&req.host).map(|_| ()).map_err(boxed)
    }

    /// Starts (or, with `undo`, ends) a host's drain: pools stop placing VMs on it and delete
    /// its warm VMs; agents running there finish. Answers with the host.
    #[update]
    pub fn drain(
        &mut self,
        ctx: &mut SyncWorkflowContext<Self>,
        req: Lenient<DrainRequest>,
    ) -> Result<HostInfo, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        let (info, intents) = self
            .registry
            .set_draining(&req.host, !req.undo)
            .map_err(boxed)?;
        if !intents.is_empty() && !ctx.is_replaying() {
            tracing::warn!(host = %req.host, draining = !req.undo, actor = ?req.actor,
                "host drain changed");
        }
        self.outbox.extend(intents);
        Ok(info)
    }

    /// Refuses to forget a host that is unknown or still live, or a malformed request.
    #[update_validator(forget)]
    pub fn validate_forget(
        &self,
        _ctx: &WorkflowContextView,
        req: &Lenient<DrainRequest>,
    ) -> Result<(), UpdateError> {
        let req = req.as_result().map_err(boxed)?;
        self.registry
            .check_forget(&req.host)
            .map(|_| ())
            .map_err(boxed)
    }

    /// Forgets a lost host (`murmur host forget`); answers with its last record.
    #[update]
    pub fn forget(
        &mut self,
        ctx: &mut SyncWorkflowContext<Self>,
        req: Lenient<DrainRequest>,
    ) -> Result<HostInfo, UpdateError> {
        let req = req.into_result().map_err(boxed)?;
        let (info, intents) = self.registry.forget(&req.host).map_err(boxed)?;
        if !ctx.is_replaying() {
            tracing::warn!(host = %req.host, actor = ?req.actor, "lost host forgotten");
        }
        self.outbox.extend(intents);
        Ok(info)
    }

    /// The hosts (`murmur host ls`).
    #[query]
    pub fn hosts(&self, _ctx: &WorkflowContextView) -> HostView {
        self.registry.view.clone()
    }
}

/// Runs lease `seq` of `host` on the host's own queue.
fn start_lease<'a>(
    c: &'a WorkflowContext<HostRegistryWorkflow>,
    host: String,
    seq: u64,
) -> LocalBoxFuture<'a, Outcome> {
    // How long the host may go without a heartbeat before its lease fails and it is lost;
    // also how long a lease may wait to be picked up by the host.
    let timeout = c.state(|s| {
        s.registry.view.hosts.get(&host).map_or(
            Duration::from_millis(crate::hosts::DEFAULT_LEASE_TIMEOUT_MS),
            |h| h.lease_timeout(),
        )
    });
    let opts = ActivityOptions::with_start_to_close_timeout(LEASE_TERM + Duration::from_secs(60))
        .heartbeat_timeout(timeout)
        .retry_policy(RetryPolicy::builder().maximum_attempts(1).build())
        .summary(format!("lease {seq} of host {host}"))
        .build();
    let opts = on_host(opts, c.task_queue(), Some(&host), timeout);
    let input = LeaseInput {
        host: host.clone(),
        seq,
        term_ms: LEASE_TERM.as_millis() as u64,
        beat_ms: (timeout.as_millis() as u64 / 4).clamp(250, 2_000),
    };
    let fut = c.execute_activity(HostLease, input, opts);
    async move {
        let end = match fut.await {
            Ok(()) => LeaseEnd::Renew,
            Err(e) => LeaseEnd::Failed(root_cause(&e)),
        };
        Outcome::Lease(host, seq, end)
    }
    .boxed_local()
}

/// Tells every running pool the current view.
fn announce<'a>(c: &'a WorkflowContext<HostRegistryWorkflow>) -> LocalBoxFuture<'a, Outcome> {
    let view: HostView = c.state(|s| s.registry.view.clone());
    let opts = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(60))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_attempts(5)
                .build(),
        )
        .summary(format!("announce host view {}", view.version))
        .build();
    let fut = c.execute_activity(AnnounceHosts, view, opts);
    async move {
        // Pools re-read the view at every reaper scan, so a failed announcement only delays.
        let _ = fut.await;
        Outcome::Announced
    }
    .boxed_local()
}

fn boxed(e: ApiError) -> UpdateError {
    Box::new(e)
}
