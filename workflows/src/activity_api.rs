//! The activity interfaces the workflows call, as typed markers.
//!
//! The workflows crate must not depend on the activities crate, so the markers live here and
//! the activities crate implements them under the same names (a test there checks the names
//! match). Inputs and outputs are plain serde types. Each marker is declared with
//! [`activity!`](crate::activity): its type name, input and output in one line.

use serde::{Deserialize, Serialize};

use crate::machine::digest::Digests;
use crate::machine::{AgentScan, AgentScanRequest, BootSpec, HostScan, PoolRecord};
use crate::model::VmId;

/// Declares an activity marker: a unit struct whose [`ActivityDefinition`] has the given
/// type name, input and output, and whose `NAME` is that type name.
///
/// [`ActivityDefinition`]: temporalio_common::ActivityDefinition
#[macro_export]
macro_rules! activity {
    ($(#[$doc:meta])* $marker:ident = $name:literal : $input:ty => $output:ty) => {
        $(#[$doc])*
        pub struct $marker;

        impl $marker {
            /// The activity's type name.
            pub const NAME: &'static str = $name;
        }

        impl temporalio_common::ActivityDefinition for $marker {
            type Input = $input;
            type Output = $output;
            fn name(&self) -> &str {
                $name
            }
        }
    };
}

/// Failure type of a boot refused because the host holds `--host-max-vms` VMs already (not
/// retried; the pool places the VM elsewhere).
pub const HOST_FULL: &str = "HostFull";
/// Failure type of a claim the pool refused (`CODE: reason`; not retried).
pub const CLAIM_REJECTED: &str = "ClaimRejected";
/// Failure type of a command that cannot run because its VM is gone (not retried).
pub const VM_LOST: &str = "VmLost";
/// Failure type of a command refused because another agent owns the VM (not retried); the
/// message is the owner's claim request.
pub const VM_TAKEN: &str = "VmTaken";
/// Failure type of a nuke step the pool refused (not retried: a refusal is final).
pub const STEP_REFUSED: &str = "StepRefused";

activity! {
    /// Creates a VM and waits for its readiness handshake (idempotent by VM id).
    BootVm = "murmur.boot_vm": BootSpec => BootReport
}

/// Result of a successful boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// The VM that became ready.
    pub vm: VmId,
    /// Milliseconds from create to ready, as measured by the substrate.
    pub boot_ms: u64,
    /// The accelerator the VM runs with (`kvm`, `tcg` on the qemu substrate; empty where it
    /// means nothing).
    #[serde(default)]
    pub accel: String,
}

activity! {
    /// Deletes a VM (idempotent: deleting a VM that is gone succeeds) — unless the substrate
    /// records another agent than `owner` as its owner: then nothing is deleted and the reply
    /// names that agent.
    DeleteVm = "murmur.delete_vm": DeleteVmInput => DeleteReply
}

/// Input of [`DeleteVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmInput {
    /// Owning tenant.
    pub tenant: String,
    /// The VM.
    pub vm: VmId,
    /// The agent (claim request) the asker believes holds the VM, if any. Before deleting,
    /// the substrate seals the VM's owner record with [`DELETING_OWNER`] (so no agent can
    /// start on it any more); a VM another agent owns is left alone.
    #[serde(default)]
    pub owner: Option<String>,
}

/// What [`DeleteVm`] did. Reads `null` too (what the activity answered before it could
/// refuse), so histories from then replay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeleteReply {
    /// Set when the VM was not deleted because another agent owns it: that agent's claim
    /// request.
    pub owned_by: Option<String>,
}

impl<'de> Deserialize<'de> for DeleteReply {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Fields {
            owned_by: Option<String>,
        }
        let fields: Option<Fields> = Option::deserialize(d)?;
        Ok(Self {
            owned_by: fields.and_then(|f| f.owned_by),
        })
    }
}

activity! {
    /// Deletes several VMs of one host at once (a flush's, a scale-in's): each as
    /// [`DeleteVm`] deletes one (sealed first, refused when another agent owns it, up to
    /// [`DELETE_ATTEMPTS`] attempts), a bounded number at a time. One VM's failure is its own
    /// result; the others are unaffected.
    DeleteVms = "murmur.delete_vms": DeleteVmsInput => DeleteVmsReply
}

/// Attempts [`DeleteVms`] makes for each VM before reporting its failure (as the retry policy
/// of one [`DeleteVm`] does).
pub const DELETE_ATTEMPTS: u32 = 3;

/// Input of [`DeleteVms`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmsInput {
    /// Owning tenant.
    pub tenant: String,
    /// The VMs, each with the agent the asker believes holds it (see [`DeleteVmInput`]).
    pub vms: Vec<DeleteVmTarget>,
}

/// One VM of a [`DeleteVmsInput`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmTarget {
    /// The VM.
    pub vm: VmId,
    /// The agent (claim request) the asker believes holds it, if any.
    pub owner: Option<String>,
}

/// What [`DeleteVms`] did, one result per VM asked for, in the same order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmsReply {
    /// The results.
    pub results: Vec<DeleteVmResult>,
}

/// What happened to one VM of a [`DeleteVms`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmResult {
    /// The VM.
    pub vm: VmId,
    /// Set when it was not deleted because another agent owns it: that agent's claim request.
    #[serde(default)]
    pub owned_by: Option<String>,
    /// Set when its delete failed after every attempt: why.
    #[serde(default)]
    pub error: Option<String>,
}

/// What a VM's owner record says once a delete has sealed it: no agent may start on it.
pub const DELETING_OWNER: &str = "-deleting-";

activity! {
    /// Sends a claim to the tenant's pool (starting the pool if it is not running) and
    /// answers with where the claim stands. A refusal fails with [`CLAIM_REJECTED`].
    ClaimVm = "murmur.claim_vm": ClaimInput => crate::machine::ClaimState
}

/// Input of [`ClaimVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimInput {
    /// Tenant whose pool is asked.
    pub tenant: String,
    /// The claim.
    pub claim: crate::machine::ClaimRequest,
    /// When the agent started claiming (epoch ms), for the claim latency metric.
    #[serde(default)]
    pub started_at: u64,
    /// Only asks where a claim the pool holds stands (no metric, no hand-out log line).
    #[serde(default)]
    pub probe: bool,
}

activity! {
    /// Asks the tenant's pool where a claim stands through a query (no update, no history):
    /// a waiting agent's periodic look. Fails when the pool does not answer.
    ProbeClaim = "murmur.probe_claim": ProbeClaimInput => crate::machine::ClaimState
}

/// Input of [`ProbeClaim`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeClaimInput {
    /// Tenant whose pool is asked.
    pub tenant: String,
    /// The claim's request id.
    pub request: String,
}

activity! {
    /// Tells the pool an agent ended so it deletes the agent's VM; answers whether the pool
    /// runs (without one, the agent deletes its VM on the VM's host itself).
    ReleaseVm = "murmur.release_vm": ReleaseInput => crate::messages::ReleaseReply
}

/// Input of [`ReleaseVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInput {
    /// Tenant.
    pub tenant: String,
    /// The claim's request id.
    pub request: String,
    /// The VM the agent held, if any.
    pub vm: Option<VmId>,
}

activity! {
    /// Tells the tenant's pool an agent's VM went to sleep without host memory, or asks to
    /// wake it; answers where the VM stands with the pool's count (`Unknown` when no pool
    /// runs: the VM then counts as it did).
    PoolPower = "murmur.pool_power": PoolPowerInput => crate::machine::PowerState
}

/// Input of [`PoolPower`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPowerInput {
    /// Tenant.
    pub tenant: String,
    /// The claim's request id.
    pub request: String,
    /// The VM.
    pub vm: VmId,
    /// What changed.
    pub change: crate::machine::PowerChange,
}

activity! {
    /// Runs an agent's command in its VM and waits for it to exit, heartbeating (idempotent
    /// by run id). Fails with [`VM_LOST`] when the VM is gone and with [`VM_TAKEN`] when
    /// another agent owns it.
    RunAgent = "murmur.run_agent": RunInput => RunReport
}

/// Input of [`RunAgent`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInput {
    /// Tenant.
    pub tenant: String,
    /// The VM.
    pub vm: VmId,
    /// The agent's slug (`MURMUR_AGENT` in the command's environment).
    pub slug: String,
    /// Unique id of this run (the agent workflow's run id).
    pub run: String,
    /// The command: one word runs through `/bin/sh -c`, several are executed as they are.
    pub command: Vec<String>,
    /// The agent's claim request (`<workflow id>@<run id>`): the substrate records it as the
    /// VM's owner before the command starts, and refuses a VM another agent owns.
    #[serde(default)]
    pub owner: String,
}

activity! {
    /// Puts an agent's VM to sleep (idempotent; runs on the VM's host). Fails with
    /// [`VM_LOST`] when the VM is gone.
    SleepVm = "murmur.sleep_vm": PowerInput => PowerReport
}

activity! {
    /// Wakes an agent's sleeping VM (idempotent; runs on the VM's host). Fails with
    /// [`VM_LOST`] when the VM is gone.
    WakeVm = "murmur.wake_vm": PowerInput => PowerReport
}

/// Input of [`SleepVm`] and [`WakeVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerInput {
    /// Tenant.
    pub tenant: String,
    /// The VM.
    pub vm: VmId,
    /// The agent's claim request (`<workflow id>@<run id>`): a VM another agent owns is
    /// refused ([`VM_TAKEN`]).
    pub owner: String,
}

/// What [`SleepVm`] or [`WakeVm`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PowerReport {
    /// How long the substrate took, in milliseconds.
    pub took_ms: u64,
    /// True when the VM, asleep, holds no host memory (qemu: the guest is saved to a file
    /// and its process ended); false when it keeps it (a stopped process). Only a sleep
    /// sets it; a VM whose memory is freed stops counting against `max_vms`.
    pub frees_memory: bool,
}

/// How an agent's command ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunReport {
    /// Exit code (128 + n when killed by signal n).
    pub exit_code: i32,
    /// The last lines of its combined stdout and stderr.
    pub output_tail: String,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
}

activity! {
    /// Nuke step 1: the pool's `nuke_pause` update, which stops hand-outs and backfill;
    /// answers once nothing boots. A refusal fails with [`STEP_REFUSED`].
    NukePause = "murmur.nuke_pause": PoolStepInput => crate::messages::NukeStepReply
}

activity! {
    /// Nuke, last step: the pool's `nuke_reset` update, which forgets the inventory and
    /// resumes.
    NukeReset = "murmur.nuke_reset": PoolStepInput => crate::messages::NukeStepReply
}

activity! {
    /// [`NukePause`] under the name nukes scheduled before the patch
    /// `nuke-step-names` (`murmur.pause_pool`): they replay with it, and a worker still runs
    /// it for a nuke that was in flight when the worker was upgraded.
    NukePauseBeforeRename = "murmur.pause_pool": PoolStepInput => crate::messages::NukeStepReply
}

activity! {
    /// [`NukeReset`] under its name from before the patch `nuke-step-names`
    /// (`murmur.reset_pool`), like [`NukePauseBeforeRename`].
    NukeResetBeforeRename = "murmur.reset_pool": PoolStepInput => crate::messages::NukeStepReply
}

/// Input of [`NukePause`] and [`NukeReset`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStepInput {
    /// Tenant whose pool is asked.
    pub tenant: String,
    /// The step.
    pub step: crate::messages::NukeStep,
}

activity! {
    /// Nuke step 2: terminates every running agent workflow of the tenant, a bounded number
    /// at a time, listing them page by page; answers how many it terminated. Retried, it
    /// lists again (the terminated ones are gone) and adds to the count it heartbeated.
    TerminateAgents = "murmur.terminate_agents": TerminateAgentsInput => u64
}

/// Input of [`TerminateAgents`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateAgentsInput {
    /// Tenant.
    pub tenant: String,
    /// The reason recorded with each termination.
    pub reason: String,
}

activity! {
    /// Nuke step 3, on each host's queue: deletes every VM of the tenant the host holds,
    /// orphans included, a bounded number at a time.
    WipeHost = "murmur.wipe_host": String => WipeReport
}

activity! {
    /// Nuke step 3a, on each host's queue: the tenant's VMs the host holds, with whether an
    /// agent had started on each. Recorded in history, so the wipe that follows counts what
    /// was there at this moment however often it is retried.
    ListTenantVms = "murmur.list_tenant_vms": String => Vec<ListedVm>
}

/// One VM of [`ListTenantVms`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedVm {
    /// The VM.
    pub id: VmId,
    /// True when an agent had started on it (the substrate recorded an owner).
    #[serde(default)]
    pub owned: bool,
}

activity! {
    /// Nuke step 3b, on each host's queue: deletes every VM of the tenant the host holds, and
    /// reports the VMs of `listed` that are gone (deleted by this attempt or by one a worker
    /// crash cut short) plus any other it deleted.
    WipeListed = "murmur.wipe_listed": WipeListedInput => WipeReport
}

/// Input of [`WipeListed`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WipeListedInput {
    /// Tenant.
    pub tenant: String,
    /// What [`ListTenantVms`] found.
    pub listed: Vec<ListedVm>,
}

/// What [`WipeHost`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WipeReport {
    /// VMs deleted.
    pub deleted: u64,
    /// Of those, VMs an agent had started on (the substrate recorded an owner).
    pub agent_vms: u64,
    /// VMs that could not be deleted (left for the host's reaper).
    pub failed: u64,
}

activity! {
    /// A reaper listing on one host's queue: every VM of the tenant the host holds, answered
    /// as the differences from the pool's digests ([`HostScan::answer`]), with each VM's
    /// substrate record and whether its owner runs.
    ListHostVms = "murmur.list_host_vms": HostListInput => HostScan
}

/// Input of [`ListHostVms`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostListInput {
    /// Tenant.
    pub tenant: String,
    /// The pool's digests of its VMs on this host.
    pub digests: Digests,
}

activity! {
    /// A reaper's question to Temporal: which agents run (as differences from the claims'
    /// digests), stranded agent workflows (a bounded share per round), whether the nuke runs.
    ScanAgents = "murmur.scan_agents": AgentScanInput => AgentScan
}

/// Input of [`ScanAgents`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentScanInput {
    /// Tenant.
    pub tenant: String,
    /// What the pool asks.
    pub request: AgentScanRequest,
}

activity! {
    /// Recovery: reads the record the latest earlier run of `pool/<tenant>` left in its memo
    /// (or, for a run from before records, its config from its history).
    ReadPoolRecord = "murmur.read_pool_record": RecordQuery => RecordRead
}

/// Input of [`ReadPoolRecord`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecordQuery {
    /// Tenant.
    pub tenant: String,
    /// The run asking (not an earlier run).
    pub run_id: String,
}

/// What [`ReadPoolRecord`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecordRead {
    /// The record (`None`: no earlier run, or none with a readable config).
    pub record: Option<PoolRecord>,
    /// `memo` or `history`.
    pub source: String,
    /// The run it came from.
    pub run_id: String,
}

/// Memo key under which a pool run keeps its [`PoolRecord`].
pub const POOL_RECORD_MEMO: &str = "murmur.pool";

activity! {
    /// Checks a request's credential (a local activity: its verdict is recorded in history).
    Verify = "murmur.verify": crate::auth::VerifyRequest => crate::auth::Verdict
}

activity! {
    /// Reads the host registry's view (an empty view, version 0, when there is no registry).
    ReadHosts = "murmur.read_hosts": () => crate::hosts::HostView
}

activity! {
    /// A host's lease: runs on the host's own queue, heartbeating, for `term_ms`, then
    /// returns so the registry starts the next one. Its heartbeat (or schedule-to-start)
    /// timeout is how the registry learns the host is gone.
    HostLease = "murmur.host_lease": LeaseInput => ()
}

/// Input of [`HostLease`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LeaseInput {
    /// The host the lease is for (a worker refuses a lease of another host).
    pub host: String,
    /// Which lease.
    pub seq: u64,
    /// How long the lease runs before it is renewed, in ms.
    pub term_ms: u64,
    /// Time between heartbeats, in ms (0: two seconds); well inside the heartbeat timeout.
    pub beat_ms: u64,
}

activity! {
    /// Tells every running pool the host view changed (the pools' `hosts` doorbell).
    /// Returns how many pools were told.
    AnnounceHosts = "murmur.announce_hosts": crate::hosts::HostView => u32
}

/// Options for an activity on `host`'s queue in the deployment of `shared_queue` (`None`: the
/// shared queue itself). A host that stops polling its queue must not hold work forever, so
/// such an activity may wait `start_within` to be picked up.
pub fn on_host(
    mut options: temporalio_sdk::ActivityOptions,
    shared_queue: &str,
    host: Option<&str>,
    start_within: std::time::Duration,
) -> temporalio_sdk::ActivityOptions {
    if let Some(host) = host {
        options.task_queue = Some(crate::hosts::host_task_queue(shared_queue, host));
        options.schedule_to_start_timeout = Some(start_within);
    }
    options
}
