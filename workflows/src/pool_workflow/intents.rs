//! Carrying out the machine's [`Intent`]s: each becomes an activity, a signal, a child
//! workflow start or a timer, whose end comes back as an [`Outcome`] for the run loop to feed
//! to the machine.

use std::time::Duration;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use temporalio_common::RetryPolicy;
use temporalio_common::data_converters::RawValue;
use temporalio_sdk::{
    ActivityOptions, ChildWorkflowOptions, ParentClosePolicy, SignalWorkflowOptions,
    WorkflowContext, WorkflowIdReusePolicy,
};

use super::PoolWorkflow;
use crate::activity_api::{
    AgentScanInput, BootVm, DeleteVm, DeleteVmInput, DeleteVmTarget, DeleteVms, DeleteVmsInput,
    HOST_FULL, HostListInput, ListHostVms, ReadHosts, ReadPoolRecord, RecordQuery, RecordRead,
    ScanAgents, on_host,
};
use crate::agent_workflow::AgentWorkflow;
use crate::auth::Identity;
use crate::gate::Refusal;
use crate::hosts::HostView;
use crate::machine::{AgentScan, HostScan, Intent};
use crate::messages::FlushRequest;
use crate::model::VmId;
use crate::nuke_workflow::{NukeInput, NukeWorkflow};
use crate::search_attrs::search_attributes;
use crate::shell::{
    BOOT_TIMEOUT, HOST_START_WITHIN, after, application_message, failed_with_type, never_started,
    nuke_workflow_id, root_cause,
};

/// How an intent (or a check the shell started) ended.
pub(super) enum Outcome {
    /// A VM placed on a host came up, with the accelerator it runs with (empty where not
    /// applicable).
    Booted(VmId, Option<String>, String),
    /// A boot failed, with why.
    BootFailed(VmId, Option<String>, String),
    /// A boot was never picked up (its host does not poll its queue) or the host was full.
    BootNotStarted(VmId),
    /// A delete was confirmed.
    Deleted(VmId),
    /// A delete failed after its own retries, with why.
    DeleteFailed(VmId, String),
    /// A delete was refused: another agent owns the VM (its claim request).
    DeleteRefused(VmId, String),
    /// The back-off timer of a stuck delete fired.
    DeleteRetryDue(VmId, u32),
    /// The timer of a hold-back (image, seq) fired.
    HoldBackOver(String, u64),
    /// A signal to an agent was sent (or could not be: the agent ended; nothing depends on
    /// it).
    Signalled,
    /// The nuke workflow started (true) or could not start yet (false: one still runs).
    NukeStarted(bool),
    /// The timer before retrying a nuke start fired.
    NukeRetryDue,
    /// The previous run's record was read (or could not be).
    RecordRead(Result<RecordRead, String>),
    /// Host read number `.0` of this run returned the host view of a reaper round (`None`:
    /// the registry could not be read).
    HostsRead(u64, Option<Box<HostView>>),
    /// A host's listing of a round arrived.
    HostListed(u64, String, Result<Box<HostScan>, String>),
    /// Temporal's answer of a round arrived.
    AgentsListed(u64, Result<Box<AgentScan>, String>),
    /// The timer of the next reaper round fired.
    ScanDue(u64),
    /// A `flush` signal's credential was checked.
    SignalChecked(Box<FlushRequest>, Result<Identity, Refusal>),
    /// Several outcomes at once (the deletes of one [`DeleteVms`]), in order.
    Batch(Vec<Outcome>),
}

/// A started intent: activities and signals hold off continue-as-new until they end;
/// timers do not (a new run sets its own from the carried state).
pub(super) enum Started<'a> {
    /// Must end before the run may roll over.
    InFlight(LocalBoxFuture<'a, Outcome>),
    /// A durable timer.
    Timer(LocalBoxFuture<'a, Outcome>),
}

/// Starts `intent`.
pub(super) fn start<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    intent: Intent,
) -> Started<'a> {
    match intent {
        Intent::Boot(spec) => Started::InFlight(boot(c, spec)),
        Intent::Delete { vm, reason } => {
            let (host, owner) = c.state(|s| {
                (
                    s.pool.vms.get(&vm).and_then(|v| v.host.clone()),
                    s.pool.expected_owner(&vm),
                )
            });
            Started::InFlight(delete(c, tenant, vm, host, owner, &format!("{reason:?}")))
        }
        Intent::RetryDelete {
            vm,
            attempt,
            wait_ms,
        } => Started::Timer(after(c, wait_ms, Outcome::DeleteRetryDue(vm, attempt))),
        Intent::HoldBack {
            image,
            seq,
            wait_ms,
        } => Started::Timer(after(c, wait_ms, Outcome::HoldBackOver(image, seq))),
        Intent::Notify { agent } => {
            Started::InFlight(tell_agent(c, agent, AgentWorkflow::claim_settled))
        }
        // The agent asks where its claim stands; the reason travels with that answer.
        Intent::VmLost { agent, .. } => {
            Started::InFlight(tell_agent(c, agent, AgentWorkflow::vm_lost))
        }
        Intent::StartNuke { request, actor } => {
            Started::InFlight(start_nuke(c, tenant, request, actor))
        }
        Intent::NukeRetry { wait_ms } => Started::Timer(after(c, wait_ms, Outcome::NukeRetryDue)),
        Intent::ReadRecord => Started::InFlight(read_record(c, tenant)),
        Intent::ReadHosts => {
            let read = c.state_mut(|s| {
                s.host_reads += 1;
                s.host_reads
            });
            Started::InFlight(read_hosts(c, read))
        }
        Intent::ListHost {
            round,
            host,
            digests,
        } => {
            let input = HostListInput {
                tenant: tenant.to_string(),
                digests,
            };
            let opts = on_host(
                scan_options(&format!("reaper listing of {host}")),
                c.task_queue(),
                Some(&host),
                HOST_START_WITHIN,
            );
            let fut = c.execute_activity(ListHostVms, input, opts);
            Started::InFlight(
                async move {
                    let scan = fut.await.map(Box::new).map_err(|e| root_cause(&e));
                    Outcome::HostListed(round, host, scan)
                }
                .boxed_local(),
            )
        }
        Intent::ListAgents { round, request } => {
            let input = AgentScanInput {
                tenant: tenant.to_string(),
                request,
            };
            let fut = c.execute_activity(ScanAgents, input, scan_options("reaper: agents"));
            Started::InFlight(
                async move {
                    let scan = fut.await.map(Box::new).map_err(|e| root_cause(&e));
                    Outcome::AgentsListed(round, scan)
                }
                .boxed_local(),
            )
        }
        Intent::NextScan { round, wait_ms } => {
            Started::Timer(after(c, wait_ms, Outcome::ScanDue(round)))
        }
    }
}

fn boot<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    spec: crate::machine::BootSpec,
) -> LocalBoxFuture<'a, Outcome> {
    let vm = spec.vm.clone();
    let opts = ActivityOptions::with_start_to_close_timeout(BOOT_TIMEOUT + Duration::from_secs(30))
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

/// Options of a delete activity on `host`: heartbeats, three attempts 0.5 s to 5 s apart,
/// `start_to_close` each.
fn delete_options(
    c: &WorkflowContext<PoolWorkflow>,
    host: Option<&str>,
    start_to_close: Duration,
    summary: String,
) -> ActivityOptions {
    let opts = ActivityOptions::with_start_to_close_timeout(start_to_close)
        .heartbeat_timeout(Duration::from_secs(5))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(500))
                .maximum_interval(Duration::from_secs(5))
                .maximum_attempts(3)
                .build(),
        )
        .summary(summary)
        .build();
    on_host(opts, c.task_queue(), host, HOST_START_WITHIN)
}

/// A delete, with a bounded number of attempts: a VM that cannot be deleted is marked stuck
/// and retried on a timer by the machine, so no activity runs forever.
fn delete<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    vm: VmId,
    host: Option<String>,
    owner: Option<String>,
    reason: &str,
) -> LocalBoxFuture<'a, Outcome> {
    let summary = format!("delete {vm} ({reason})");
    let opts = delete_options(c, host.as_deref(), Duration::from_secs(30), summary);
    let input = DeleteVmInput {
        tenant: tenant.to_string(),
        vm: vm.clone(),
        owner,
    };
    let fut = c.execute_activity(DeleteVm, input, opts);
    async move {
        match fut.await {
            Ok(reply) => match reply.owned_by {
                None => Outcome::Deleted(vm),
                Some(owner) => Outcome::DeleteRefused(vm, owner),
            },
            Err(e) => Outcome::DeleteFailed(vm, application_message(&e)),
        }
    }
    .boxed_local()
}

/// Deletes `vms` (each with the agent believed to hold it) of one host in one activity; the
/// outcome holds each VM's own.
pub(super) fn delete_many<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
    host: Option<String>,
    vms: Vec<(VmId, Option<String>)>,
    reason: &str,
) -> LocalBoxFuture<'a, Outcome> {
    // Long enough for every VM's attempts; a worker that dies mid-batch is noticed by the
    // heartbeat and the batch runs again (deletes are idempotent).
    let summary = format!("delete {} VMs ({reason})", vms.len());
    let opts = delete_options(c, host.as_deref(), Duration::from_secs(120), summary);
    let ids: Vec<VmId> = vms.iter().map(|(vm, _)| vm.clone()).collect();
    let input = DeleteVmsInput {
        tenant: tenant.to_string(),
        vms: vms
            .into_iter()
            .map(|(vm, owner)| DeleteVmTarget { vm, owner })
            .collect(),
    };
    let fut = c.execute_activity(DeleteVms, input, opts);
    async move {
        match fut.await {
            Ok(reply) => {
                let mut results: std::collections::BTreeMap<VmId, Outcome> = reply
                    .results
                    .into_iter()
                    .map(|r| {
                        let outcome = match (r.owned_by, r.error) {
                            (Some(owner), _) => Outcome::DeleteRefused(r.vm.clone(), owner),
                            (None, Some(error)) => Outcome::DeleteFailed(r.vm.clone(), error),
                            (None, None) => Outcome::Deleted(r.vm.clone()),
                        };
                        (r.vm, outcome)
                    })
                    .collect();
                // One outcome per VM asked for, in order; a VM the reply left out failed.
                Outcome::Batch(
                    ids.into_iter()
                        .map(|vm| {
                            results.remove(&vm).unwrap_or_else(|| {
                                Outcome::DeleteFailed(vm, "the delete answered nothing".into())
                            })
                        })
                        .collect(),
                )
            }
            Err(e) => {
                let error = application_message(&e);
                Outcome::Batch(
                    ids.into_iter()
                        .map(|vm| Outcome::DeleteFailed(vm, error.clone()))
                        .collect(),
                )
            }
        }
    }
    .boxed_local()
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
        Outcome::Signalled
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

fn read_record<'a>(
    c: &'a WorkflowContext<PoolWorkflow>,
    tenant: &str,
) -> LocalBoxFuture<'a, Outcome> {
    let input = RecordQuery {
        tenant: tenant.to_string(),
        run_id: c.run_id().to_string(),
    };
    let opts = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(60))
        .heartbeat_timeout(Duration::from_secs(10))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_secs(1))
                .maximum_interval(Duration::from_secs(10))
                .build(),
        )
        // Retried until it answers: a recovery without its config would judge every VM
        // against defaults.
        .summary("recovery: read the previous run's record".to_string())
        .build();
    let fut = c.execute_activity(ReadPoolRecord, input, opts);
    async move { Outcome::RecordRead(fut.await.map_err(|e| root_cause(&e))) }.boxed_local()
}

fn read_hosts(c: &WorkflowContext<PoolWorkflow>, read: u64) -> LocalBoxFuture<'_, Outcome> {
    let fut = c.execute_activity(ReadHosts, (), scan_options("read the host registry"));
    async move { Outcome::HostsRead(read, fut.await.ok().map(Box::new)) }.boxed_local()
}

/// Options of the reaper's activities.
fn scan_options(summary: &str) -> ActivityOptions {
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
