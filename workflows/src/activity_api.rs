//! The activity interfaces the workflows call, as typed markers.
//!
//! The workflows crate must not depend on the activities crate, so the markers live here and
//! the activities crate implements them under the same names (a test there checks the names
//! match). Inputs and outputs are plain serde types.

use serde::{Deserialize, Serialize};
use temporalio_common::ActivityDefinition;

use crate::machine::BootSpec;
use crate::model::VmId;

/// Activity type name of [`BootVm`].
pub const BOOT_VM: &str = "murmur.boot_vm";
/// Activity type name of [`DeleteVm`].
pub const DELETE_VM: &str = "murmur.delete_vm";

/// Creates a VM and waits for its readiness handshake (idempotent by VM id).
pub struct BootVm;

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

impl ActivityDefinition for BootVm {
    type Input = BootSpec;
    type Output = BootReport;
    fn name(&self) -> &str {
        BOOT_VM
    }
}

/// Deletes a VM (idempotent: deleting a VM that is gone succeeds).
pub struct DeleteVm;

/// Input of [`DeleteVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteVmInput {
    /// Owning tenant.
    pub tenant: String,
    /// The VM.
    pub vm: VmId,
}

impl ActivityDefinition for DeleteVm {
    type Input = DeleteVmInput;
    type Output = ();
    fn name(&self) -> &str {
        DELETE_VM
    }
}

/// Activity type name of [`ClaimVm`].
pub const CLAIM_VM: &str = "murmur.claim_vm";
/// Activity type name of [`ReleaseVm`].
pub const RELEASE_VM: &str = "murmur.release_vm";
/// Activity type name of [`RunAgent`].
pub const RUN_AGENT: &str = "murmur.run_agent";
/// Activity type name of [`PausePool`].
pub const PAUSE_POOL: &str = "murmur.pause_pool";
/// Activity type name of [`ResetPool`].
pub const RESET_POOL: &str = "murmur.reset_pool";
/// Activity type name of [`ListAgents`].
pub const LIST_AGENTS: &str = "murmur.list_agents";
/// Activity type name of [`TerminateAgent`].
pub const TERMINATE_AGENT: &str = "murmur.terminate_agent";
/// Activity type name of [`ListVms`].
pub const LIST_VMS: &str = "murmur.list_vms";

/// Failure type of a boot a host refused because it runs its `--host-max-vms` VMs already
/// (counting every tenant's); never retried there, the pool places the VM elsewhere.
pub const HOST_FULL: &str = "HostFull";
/// Failure type of a claim the pool refused (`CODE: reason` message); never retried.
pub const CLAIM_REJECTED: &str = "ClaimRejected";
/// Failure type of a VM that vanished under a running agent; never retried.
pub const VM_LOST: &str = "VmLost";

/// Asks the tenant's pool for a VM (the pool's `claim` update, starting the pool if needed).
pub struct ClaimVm;

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

impl ActivityDefinition for ClaimVm {
    type Input = ClaimInput;
    type Output = crate::machine::ClaimState;
    fn name(&self) -> &str {
        CLAIM_VM
    }
}

/// Tells the pool an agent ended (the pool's `release` update); the pool deletes its VM.
/// When the pool is not running, deletes the VM from the substrate directly.
pub struct ReleaseVm;

/// Input of [`ReleaseVm`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseInput {
    /// Tenant.
    pub tenant: String,
    /// The claim's request id.
    pub request: String,
    /// The VM the agent held, if it knows one (for the direct delete).
    pub vm: Option<VmId>,
}

impl ActivityDefinition for ReleaseVm {
    type Input = ReleaseInput;
    type Output = crate::messages::ReleaseReply;
    fn name(&self) -> &str {
        RELEASE_VM
    }
}

/// Runs an agent's command inside its VM until it exits (idempotent by run id: a retry
/// attaches to the command already running).
pub struct RunAgent;

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

impl ActivityDefinition for RunAgent {
    type Input = RunInput;
    type Output = RunReport;
    fn name(&self) -> &str {
        RUN_AGENT
    }
}

/// Nuke step: pause the pool (its `nuke_pause` update, starting the pool if needed).
pub struct PausePool;

impl ActivityDefinition for PausePool {
    type Input = PoolStepInput;
    type Output = crate::messages::NukeStepReply;
    fn name(&self) -> &str {
        PAUSE_POOL
    }
}

/// Nuke step: reset and resume the pool (its `nuke_reset` update).
pub struct ResetPool;

impl ActivityDefinition for ResetPool {
    type Input = PoolStepInput;
    type Output = crate::messages::NukeStepReply;
    fn name(&self) -> &str {
        RESET_POOL
    }
}

/// Input of [`PausePool`] and [`ResetPool`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStepInput {
    /// Tenant.
    pub tenant: String,
    /// What the pool is told.
    pub step: crate::messages::NukeStep,
}

/// Lists the workflow ids of every running agent of a tenant (a paginated visibility query
/// on the search attributes).
pub struct ListAgents;

impl ActivityDefinition for ListAgents {
    type Input = String;
    type Output = Vec<String>;
    fn name(&self) -> &str {
        LIST_AGENTS
    }
}

/// Terminates one agent workflow; one that already ended counts as done.
pub struct TerminateAgent;

/// Input of [`TerminateAgent`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateInput {
    /// The agent workflow's id.
    pub workflow_id: String,
    /// Recorded as the termination reason.
    pub reason: String,
}

impl ActivityDefinition for TerminateAgent {
    type Input = TerminateInput;
    type Output = ();
    fn name(&self) -> &str {
        TERMINATE_AGENT
    }
}

/// Lists every VM of a tenant the substrate holds, orphans included.
pub struct ListVms;

impl ActivityDefinition for ListVms {
    type Input = String;
    type Output = Vec<VmId>;
    fn name(&self) -> &str {
        LIST_VMS
    }
}

/// Activity type name of [`ReapScanVms`].
pub const REAP_SCAN: &str = "murmur.reap_scan";

/// The reaper's look at the world: the tenant's VMs in the substrate, which claimed agents
/// have ended, and (per `reap_stranded_workflows`) stranded agent workflows.
pub struct ReapScanVms;

/// Input of [`ReapScanVms`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReapInput {
    /// The tenant.
    pub tenant: String,
    /// Request ids (`<workflow id>@<run id>`) of the pool's claims, to check for ended agents.
    pub claims: Vec<String>,
    /// What to do with stranded agent workflows.
    pub stranded: crate::model::ReapPolicy,
    /// The pool is paused for a nuke: say whether `nuke/<tenant>` still runs.
    pub check_nuke: bool,
    /// What to look at (everything, unless the pool splits the scan across hosts).
    pub scope: ReapScope,
}

/// The part of a reaper scan one activity does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReapScope {
    /// The substrate and Temporal (one worker runs every VM: runs from before placement).
    #[default]
    Everything,
    /// Only the VMs of the host whose queue runs it.
    HostVms,
    /// Only Temporal: ended claims, stranded agents, the nuke check.
    Workflows,
}

impl ActivityDefinition for ReapScanVms {
    type Input = ReapInput;
    type Output = crate::machine::ReapScan;
    fn name(&self) -> &str {
        REAP_SCAN
    }
}

/// Activity type name of [`Verify`].
pub const VERIFY: &str = "murmur.verify";

/// Checks a request's credential (a local activity, so the verdict lands in history).
pub struct Verify;

impl ActivityDefinition for Verify {
    type Input = crate::auth::VerifyRequest;
    type Output = crate::auth::Verdict;
    fn name(&self) -> &str {
        VERIFY
    }
}

/// Activity type name of [`ReadHosts`].
pub const READ_HOSTS: &str = "murmur.read_hosts";
/// Activity type name of [`HostLease`].
pub const HOST_LEASE: &str = "murmur.host_lease";
/// Activity type name of [`AnnounceHosts`].
pub const ANNOUNCE_HOSTS: &str = "murmur.announce_hosts";

/// Reads the registry's host view (its `hosts` query); an empty view at version 0 when the
/// registry is not running.
pub struct ReadHosts;

impl ActivityDefinition for ReadHosts {
    type Input = ();
    type Output = crate::hosts::HostView;
    fn name(&self) -> &str {
        READ_HOSTS
    }
}

/// A host's lease: runs on the host's own queue, heartbeating, for `term_ms`, then returns
/// so the registry starts the next one. Its heartbeat (or schedule-to-start) timeout is how
/// the registry learns the host is gone.
pub struct HostLease;

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

impl ActivityDefinition for HostLease {
    type Input = LeaseInput;
    type Output = ();
    fn name(&self) -> &str {
        HOST_LEASE
    }
}

/// Tells every running pool the host view (the pools' `hosts` signal). Returns how many pools
/// were told.
pub struct AnnounceHosts;

impl ActivityDefinition for AnnounceHosts {
    type Input = crate::hosts::HostView;
    type Output = u32;
    fn name(&self) -> &str {
        ANNOUNCE_HOSTS
    }
}

/// Options for an activity on `host`'s queue in the deployment of `shared_queue` (`None`: the
/// shared queue itself). A host that stops
/// polling its queue must not hold work forever, so such an activity may wait
/// `start_within` to be picked up.
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
