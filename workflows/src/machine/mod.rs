//! The pure pool state machine: the tenant's VM inventory and every decision about it.
//!
//! The pool workflow feeds [`Pool`] events (activity results, flushes, config edits, timer
//! ticks, reaper listings) and executes the [`Intent`]s it returns: activities to start and
//! timers to set. Every change ends in the same [`Pool::reconcile`] step that compares what
//! is wanted (each workspace's `min_idle` of fresh VMs, under `max_vms`) with what exists and
//! emits boots and deletes. An intent is recorded in the inventory *before* it is
//! returned (a VM is `booting` as soon as its boot is asked for, `deleting` as soon as its
//! delete is), so in-flight work always counts towards `max_vms` and a new run can re-issue
//! whatever was in flight ([`Pool::resume`]).
//!
//! One job per file: the inventory and its indexes ([`inventory`]), hand-out ([`claims`]),
//! VMs asleep without host memory and their wakes ([`dormancy`]), placement and host loss ([`placement`]), the
//! reaper's rounds ([`reaper`]), recovery of a pool whose run ended ([`recovery`]), the nuke
//! ([`nuke`]), admission of signed requests ([`admission`]), the digests that keep reaper
//! listings small ([`digest`]) and the compact form carried across continue-as-new
//! ([`packed`]).

pub mod admission;
mod claims;
pub mod digest;
pub mod dormancy;
pub mod inventory;
pub mod nuke;
mod packed;
mod placement;
pub mod reaper;
pub mod recovery;

use std::collections::BTreeMap;

pub use admission::{Admission, ReplayGuard};
pub use claims::{Claim, ClaimRequest, ClaimState};
pub use dormancy::{PowerChange, PowerState};
pub use nuke::NukeState;
pub use placement::HostUsage;
pub use reaper::{
    AgentScan, AgentScanRequest, DEFAULT_REAP_GRACE_MS, DEFAULT_REAP_INTERVAL_MS, HostScan,
    ReaperState, Round, ScanSettings, ScannedVm, VmLabels,
};
pub use recovery::{PoolRecord, Recovery};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::hosts::HostView;
use crate::model::{
    DeleteReason, Environment, ImageHealth, Meta, Millis, POOL_CONFIG_NAME, PoolConfigSpec,
    Resource, ResourceDoc, ResourceKind, VmId, VmRecord, VmState, WorkspaceSpec, format_rfc3339,
    patch_json, spec_from_json, validate_workspace_name,
};
use inventory::Inventory;

/// Consecutive boot failures of one image after which backfill for it is held back.
pub const FAILURE_THRESHOLD: u32 = 3;
/// First hold-back after [`FAILURE_THRESHOLD`] failures; doubles per further failure.
pub const BACKOFF_BASE_MS: Millis = 30_000;
/// Longest hold-back.
pub const BACKOFF_MAX_MS: Millis = 600_000;
/// First wait before a failed delete is tried again; doubles per further failure.
pub const DELETE_RETRY_BASE_MS: Millis = 5_000;
/// Longest wait between delete attempts of a VM stuck deleting.
pub const DELETE_RETRY_MAX_MS: Millis = 600_000;
/// Most workspaces a tenant may have (every one is carried in the pool's record).
pub const MAX_WORKSPACES: usize = 256;

/// Refused requests kept for `murmur pool status`.
pub const MAX_DENIALS: usize = 20;

/// Something the workflow shell must do in the world: an activity to start, a signal to
/// send, or a timer to set (timers end in the event the intent names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Create the VM and wait for its readiness handshake.
    Boot(BootSpec),
    /// Delete the VM from the substrate (idempotent).
    Delete {
        /// The VM.
        vm: VmId,
        /// Why, for logs.
        reason: DeleteReason,
    },
    /// Timer: after `wait_ms`, call [`Pool::delete_retry_due`] with `vm` and `attempt`.
    RetryDelete {
        /// The VM stuck deleting.
        vm: VmId,
        /// Which failure this retry follows (a stale timer changes nothing).
        attempt: u32,
        /// How long to wait.
        wait_ms: Millis,
    },
    /// Timer: hold back backfill for an image for `wait_ms`, then call
    /// [`Pool::hold_back_over`] with `image` and `seq`. A timer (recorded in history) rather
    /// than a clock comparison decides when the hold ends, so a replay always agrees.
    HoldBack {
        /// The failing image.
        image: String,
        /// Which hold-back this is.
        seq: u64,
        /// How long to hold back.
        wait_ms: Millis,
    },
    /// Tell an agent whose claim was waiting that it is settled (served or failed); the agent
    /// then asks where its claim stands. Nothing is lost if it does not arrive: agents also
    /// re-check on a timer.
    Notify {
        /// The agent's workflow id.
        agent: String,
    },
    /// Tell a running agent its VM is gone (lost with its host), and why; the agent stops
    /// its command and fails with the reason.
    VmLost {
        /// The agent's workflow id.
        agent: String,
        /// Why, for the agent's error.
        reason: String,
    },
    /// Start `nuke/<tenant>` as an abandoned child; report with [`Pool::nuke_started`].
    StartNuke {
        /// The admitted developer request it acts for.
        request: String,
        /// Who asked.
        actor: String,
    },
    /// Timer: after `wait_ms`, call [`Pool::nuke_retry_due`].
    NukeRetry {
        /// How long to wait.
        wait_ms: Millis,
    },
    /// Read the record the previous run of this pool left (its config and generation);
    /// report with [`Pool::record_read`].
    ReadRecord,
    /// Read the host registry's view; report with [`Pool::hosts_read`].
    ReadHosts,
    /// List what `host` holds for this tenant, answering with the differences from
    /// `digests`; report with [`Pool::host_listed`].
    ListHost {
        /// The reaper round it belongs to.
        round: u64,
        /// The host (its own task queue runs the listing).
        host: String,
        /// The pool's digests of its VMs on that host.
        digests: digest::Digests,
    },
    /// Ask Temporal which agents run (the differences from the claims' digests), about
    /// stranded agent workflows and the nuke; report with [`Pool::agents_listed`].
    ListAgents {
        /// The reaper round it belongs to.
        round: u64,
        /// What to ask.
        request: AgentScanRequest,
    },
    /// Timer: after `wait_ms`, call [`Pool::scan_due`] with `round`.
    NextScan {
        /// The round it starts.
        round: u64,
        /// How long to wait.
        wait_ms: Millis,
    },
}

/// Everything a substrate needs to create one VM (and records with it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    /// The new VM's id.
    pub vm: VmId,
    /// Owning tenant (the substrate labels VMs with it).
    pub tenant: String,
    /// Workspace it is booted for.
    pub workspace: String,
    /// Image to boot.
    pub image: String,
    /// Shape.
    pub environment: Environment,
    /// The host it is placed on; its activities run on that host's task queue (`None`: the
    /// shared queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The pool generation it is booted in (recorded by the substrate, so a pool that has to
    /// recover knows whether the VM is still fresh).
    #[serde(default)]
    pub generation: u64,
}

/// A change to a resource, as the CLI (or `temporal workflow update`) sends it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ConfigChange {
    /// Replace the whole spec (creates a workspace that does not exist yet).
    Set {
        /// The new spec as JSON; missing fields take their defaults.
        spec: serde_json::Value,
        /// When given, the change is refused unless the resource is still at this generation.
        #[serde(default)]
        expected_generation: Option<u64>,
    },
    /// Set individual fields (`key=value`, dotted keys for nested fields).
    Patch {
        /// Field assignments, applied in order.
        set: Vec<(String, String)>,
    },
}

/// A validated change, ready to be committed.
#[derive(Clone, Debug, PartialEq)]
pub enum ValidChange {
    /// New pool-config spec.
    PoolConfig(PoolConfigSpec),
    /// New spec for the named workspace.
    Workspace(String, WorkspaceSpec),
}

/// The tenant's pool: config, workspaces and VM inventory. Serialized (for continue-as-new)
/// with its inventory and claims packed ([`packed`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pool {
    /// Tenant this pool belongs to.
    pub tenant: String,
    /// Bumped by every flush; warm VMs of older generations are never handed out.
    pub generation: u64,
    /// `pool-config default`.
    pub config: Resource<PoolConfigSpec>,
    /// Workspaces by name.
    pub workspaces: BTreeMap<String, Resource<WorkspaceSpec>>,
    /// Every VM the pool is responsible for, in any state.
    #[serde(with = "packed::inventory")]
    pub vms: Inventory,
    /// Boot health per image (images no workspace and no VM uses are forgotten once healthy).
    pub images: BTreeMap<String, ImageHealth>,
    /// Totals since the pool was created.
    pub counters: Counters,
    /// Agents' claims by request id: waiting, booting or holding a VM.
    #[serde(with = "packed::claims")]
    pub claims: BTreeMap<String, Claim>,
    /// Where the pool stands with a nuke.
    #[serde(default)]
    pub nuke: NukeState,
    /// Nukes completed.
    #[serde(default)]
    pub nukes: u64,
    /// Signed developer requests already used (replay protection).
    #[serde(default)]
    pub replays: ReplayGuard,
    /// The latest refused requests, newest last (at most [`MAX_DENIALS`]).
    #[serde(default)]
    pub denials: Vec<crate::auth::Denial>,
    /// Workflow time of the last reconcile.
    #[serde(default)]
    pub last_reconcile_at: Millis,
    /// How long the last flush took (request to its VMs gone), in ms.
    #[serde(default)]
    pub last_flush_ms: Option<Millis>,
    /// How long the last nuke held the pool (pause to reset), in ms.
    #[serde(default)]
    pub last_nuke_ms: Option<Millis>,
    /// What the reaper remembers and has done.
    #[serde(default)]
    pub reaper: ReaperState,
    /// The accelerator the latest VM came up with (`kvm`, `tcg` on qemu; empty otherwise).
    #[serde(default)]
    pub accel: String,
    /// The hosts as the registry last said; new VMs are placed on them.
    #[serde(default)]
    pub hosts: HostView,
    /// Hosts that did not pick up a boot since the last host view: no new VM goes there.
    #[serde(default)]
    pub unreachable_hosts: std::collections::BTreeSet<String>,
    /// Set while a pool whose previous run ended without handing over its state rebuilds
    /// it from its sources of truth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
    /// Bumped whenever what [`Pool::record`] returns changes (the shell then writes it down).
    #[serde(default)]
    pub record_rev: u64,
    /// Arrival counter of claims (FIFO order).
    #[serde(default)]
    claim_seq: u64,
    /// What hand-out decisions read of the claims (derived, not carried).
    #[serde(skip)]
    claim_index: claims::ClaimIndex,
    /// Seed of the VM id sequence (drawn from workflow randomness once).
    id_seed: u64,
    /// How many ids were drawn so far.
    id_counter: u64,
}

/// Running totals shown in status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Boots requested.
    pub boots: u64,
    /// Boots that failed.
    pub boot_failures: u64,
    /// VMs confirmed deleted.
    pub deleted: u64,
    /// Flushes performed.
    pub flushes: u64,
    /// Warm VMs destroyed by flushes.
    pub flushed_vms: u64,
    /// VMs written off because their host was lost.
    #[serde(default)]
    pub written_off: u64,
    /// Delete attempts that failed (each then retried on a back-off timer).
    #[serde(default)]
    pub delete_failures: u64,
}

impl Pool {
    /// A new pool with the default pool-config and no workspaces (the first run of a tenant
    /// that never had a pool, and tests).
    pub fn new(tenant: impl Into<String>, id_seed: u64, now: Millis) -> Self {
        Self {
            tenant: tenant.into(),
            generation: 1,
            config: Resource {
                meta: Meta {
                    generation: 1,
                    updated_by: "murmur".into(),
                    updated_at: now,
                },
                spec: PoolConfigSpec::default(),
            },
            workspaces: BTreeMap::new(),
            vms: Inventory::default(),
            images: BTreeMap::new(),
            counters: Counters::default(),
            claims: BTreeMap::new(),
            nuke: NukeState::Idle,
            nukes: 0,
            replays: ReplayGuard::default(),
            denials: Vec::new(),
            last_reconcile_at: now,
            last_flush_ms: None,
            last_nuke_ms: None,
            reaper: ReaperState::default(),
            accel: String::new(),
            hosts: HostView::default(),
            unreachable_hosts: Default::default(),
            recovery: None,
            record_rev: 0,
            claim_seq: 0,
            claim_index: claims::ClaimIndex::default(),
            id_seed,
            id_counter: 0,
        }
    }

    /// VMs that count against `max_vms`: all of them, whatever their state (stuck deletes
    /// included), except dormant ones (asleep and holding no host memory, see
    /// [`dormancy`]).
    pub fn in_use(&self) -> u32 {
        u32::try_from(self.vms.len())
            .unwrap_or(u32::MAX)
            .saturating_sub(self.vms.dormant())
    }

    /// Intents that re-issue every operation that was in flight, for a new workflow run
    /// whose activities and timers did not carry over: boots and deletes (idempotent by VM
    /// id), the timers of hold-backs and stuck deletes, the nuke's pending step, the record
    /// read of a recovery, and a reaper round at once.
    pub fn resume(&mut self, now: Millis) -> Vec<Intent> {
        let mut out = Vec::new();
        for vm in self.vms.values() {
            match vm.state {
                VmState::Booting => out.push(Intent::Boot(self.boot_spec(vm))),
                VmState::Deleting if vm.delete_failures > 0 => out.push(Intent::RetryDelete {
                    vm: vm.id.clone(),
                    attempt: vm.delete_failures,
                    wait_ms: delete_backoff(vm.delete_failures),
                }),
                VmState::Deleting => out.push(Intent::Delete {
                    vm: vm.id.clone(),
                    reason: vm.delete_reason.unwrap_or(DeleteReason::Orphan),
                }),
                VmState::Warm | VmState::Assigned => {}
            }
        }
        for (image, h) in &self.images {
            if h.held {
                out.push(Intent::HoldBack {
                    image: image.clone(),
                    seq: h.hold_seq,
                    wait_ms: h.backoff_until.map_or(1, |t| t.saturating_sub(now).max(1)),
                });
            }
        }
        out.extend(self.resume_nuke());
        out.extend(self.resume_recovery());
        out.extend(self.reconcile(now));
        out
    }

    fn boot_spec(&self, vm: &VmRecord) -> BootSpec {
        let environment = self
            .workspaces
            .get(&vm.workspace)
            .map(|w| w.spec.environment.clone())
            .unwrap_or_default();
        BootSpec {
            vm: vm.id.clone(),
            tenant: self.tenant.clone(),
            workspace: vm.workspace.clone(),
            image: vm.image.clone(),
            environment,
            host: vm.host.clone(),
            generation: vm.generation,
        }
    }

    /// A VM finished its readiness handshake.
    pub fn boot_succeeded(&mut self, vm: &VmId, now: Millis) -> Vec<Intent> {
        let mut out = Vec::new();
        let current_generation = self.generation;
        let round = self.reaper.rounds;
        match self.vms.get_mut(vm) {
            Some(rec) if rec.state == VmState::Booting => {
                let health = self.images.entry(rec.image.clone()).or_default();
                health.consecutive_failures = 0;
                health.backoff_until = None;
                health.held = false;
                rec.ready_at = Some(now);
                rec.warm_round = round;
                if let Some(notify) = self.hand_booted_vm_to_claim(vm) {
                    // Handed to the agent it was booted for.
                    out.push(notify);
                } else if let Some(rec) = self.vms.get_mut(vm)
                    && rec.generation < current_generation
                {
                    rec.state = VmState::Deleting;
                    rec.delete_reason = Some(DeleteReason::StaleGeneration);
                    out.push(Intent::Delete {
                        vm: vm.clone(),
                        reason: DeleteReason::StaleGeneration,
                    });
                } else if self.on_draining_host(vm) {
                    out.push(self.mark_deleting(vm, DeleteReason::Drained));
                } else if let Some(rec) = self.vms.get_mut(vm) {
                    rec.state = VmState::Warm;
                }
            }
            // Late or duplicate result: the VM is already past booting; nothing to do.
            Some(_) => {}
            // A VM we do not know came up: it must not leak.
            None => out.push(self.adopt_orphan(vm, None, now)),
        }
        out.extend(self.reconcile(now));
        out
    }

    /// A VM did not become ready (or its create failed). It is deleted, in case the substrate
    /// created something before failing, and the image's failure count goes up.
    pub fn boot_failed(&mut self, vm: &VmId, error: &str, now: Millis) -> Vec<Intent> {
        let mut out: Vec<Intent> = self.fail_claim_of(vm, error).into_iter().collect();
        match self.vms.get_mut(vm) {
            Some(rec) if rec.state == VmState::Booting => {
                rec.state = VmState::Deleting;
                rec.delete_reason = Some(DeleteReason::BootFailed);
                let image = rec.image.clone();
                self.counters.boot_failures += 1;
                let h = self.images.entry(image.clone()).or_default();
                h.consecutive_failures += 1;
                h.total_failures += 1;
                h.last_error = Some(truncate(error, 512));
                if h.consecutive_failures >= FAILURE_THRESHOLD {
                    let doublings = (h.consecutive_failures - FAILURE_THRESHOLD).min(10);
                    let wait = (BACKOFF_BASE_MS << doublings).min(BACKOFF_MAX_MS);
                    h.backoff_until = Some(now + wait);
                    h.held = true;
                    h.hold_seq += 1;
                    out.push(Intent::HoldBack {
                        image: image.clone(),
                        seq: h.hold_seq,
                        wait_ms: wait,
                    });
                }
                out.push(Intent::Delete {
                    vm: vm.clone(),
                    reason: DeleteReason::BootFailed,
                });
            }
            Some(_) => {}
            None => out.push(self.adopt_orphan(vm, None, now)),
        }
        out.extend(self.reconcile(now));
        out
    }

    /// A boot placed on `host` ended (`Ok`, or `Err` with why). A VM the pool no longer knows
    /// (written off with its host meanwhile) is deleted on that host, unless the host is still
    /// lost (then its reaper deletes it once the host is back); anything else is
    /// [`Pool::boot_succeeded`] or [`Pool::boot_failed`].
    pub fn boot_ended_on(
        &mut self,
        vm: &VmId,
        host: Option<&str>,
        result: Result<(), &str>,
        now: Millis,
    ) -> Vec<Intent> {
        if !self.vms.contains_key(vm) {
            let mut out = Vec::new();
            // A lost host cannot be asked to delete it; its reaper will, once it is back.
            if !host.is_some_and(|h| self.hosts.is_lost(h)) {
                out.push(self.adopt_orphan(vm, host.map(str::to_string), now));
            }
            out.extend(self.reconcile(now));
            return out;
        }
        match result {
            Ok(()) => self.boot_succeeded(vm, now),
            Err(error) => self.boot_failed(vm, error, now),
        }
    }

    /// The substrate confirmed the VM is gone.
    pub fn deleted(&mut self, vm: &VmId, now: Millis) -> Vec<Intent> {
        if self.vms.remove(vm).is_some() {
            self.counters.deleted += 1;
            self.reaper.forgot(vm);
        }
        self.reconcile(now)
    }

    /// A delete could not be confirmed (its activity gave up after its own retries). The VM
    /// is now *stuck deleting*: it keeps counting against `max_vms`, the error is kept for
    /// status, and the delete is tried again after a back-off timer, so nothing (a flush's
    /// answer, continue-as-new) waits for it. A VM whose host is lost cannot be asked: it is
    /// written off (its host's reaper deletes it if the host comes back).
    pub fn delete_failed(&mut self, vm: &VmId, error: &str) -> Vec<Intent> {
        if let Some(host) = self.vms.get(vm).and_then(|v| v.host.clone())
            && self.hosts.is_lost(&host)
        {
            self.vms.remove(vm);
            self.reaper.forgot(vm);
            self.counters.written_off += 1;
            return Vec::new();
        }
        match self.vms.get_mut(vm) {
            Some(rec) if rec.state == VmState::Deleting => {
                rec.delete_failures += 1;
                rec.delete_error = Some(truncate(error, 512));
                self.counters.delete_failures += 1;
                vec![Intent::RetryDelete {
                    vm: vm.clone(),
                    attempt: rec.delete_failures,
                    wait_ms: delete_backoff(rec.delete_failures),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The back-off timer of a stuck delete fired: delete again (a stale timer, for a VM that
    /// is gone or failed again since, changes nothing).
    pub fn delete_retry_due(&mut self, vm: &VmId, attempt: u32) -> Vec<Intent> {
        match self.vms.get(vm) {
            Some(rec) if rec.state == VmState::Deleting && rec.delete_failures == attempt => {
                vec![Intent::Delete {
                    vm: vm.clone(),
                    reason: rec.delete_reason.unwrap_or(DeleteReason::Orphan),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// VMs stuck deleting, with their last error.
    pub fn stuck_deleting(&self) -> impl Iterator<Item = &VmRecord> {
        self.vms.values().filter(|v| v.stuck_deleting())
    }

    fn adopt_orphan(&mut self, vm: &VmId, host: Option<String>, now: Millis) -> Intent {
        self.vms.insert(
            vm.clone(),
            VmRecord {
                id: vm.clone(),
                workspace: String::new(),
                image: String::new(),
                generation: 0,
                state: VmState::Deleting,
                agent: None,
                claim: None,
                created_at: now,
                ready_at: None,
                delete_reason: Some(DeleteReason::Orphan),
                host,
                memory_mb: 0,
                delete_failures: 0,
                delete_error: None,
                warm_round: 0,
                dormant: false,
                wake_seq: 0,
            },
        );
        Intent::Delete {
            vm: vm.clone(),
            reason: DeleteReason::Orphan,
        }
    }

    /// Flush: bump the generation and destroy every warm VM at once. Booting VMs are discarded
    /// when they come up; assigned VMs are not touched. Returns the flushed VM ids and the
    /// intents (deletes, then backfill from the current images).
    pub fn flush(&mut self, now: Millis) -> (Vec<VmId>, Vec<Intent>) {
        self.generation += 1;
        self.record_changed();
        self.counters.flushes += 1;
        let mut flushed = Vec::new();
        let mut out = Vec::new();
        self.vms.for_each_mut(|rec| {
            if rec.state == VmState::Warm {
                rec.state = VmState::Deleting;
                rec.delete_reason = Some(DeleteReason::Flush);
                flushed.push(rec.id.clone());
                out.push(Intent::Delete {
                    vm: rec.id.clone(),
                    reason: DeleteReason::Flush,
                });
            }
        });
        self.counters.flushed_vms += flushed.len() as u64;
        out.extend(self.reconcile(now));
        (flushed, out)
    }

    /// True once every VM of `vms` is gone from the substrate or stuck deleting: what a flush
    /// waits for before it answers.
    pub fn flush_settled(&self, vms: &[VmId]) -> bool {
        vms.iter()
            .all(|vm| self.vms.get(vm).is_none_or(VmRecord::stuck_deleting))
    }

    /// Checks a config change without applying it (the update validator runs this, so a
    /// rejected change leaves no trace in history).
    pub fn validate_change(
        &self,
        kind: ResourceKind,
        name: &str,
        change: &ConfigChange,
    ) -> Result<ValidChange, ApiError> {
        let (current_spec, current_generation) = match kind {
            ResourceKind::PoolConfig => {
                if name != POOL_CONFIG_NAME {
                    return Err(ApiError::not_found(format!(
                        "pool-config {name:?} does not exist (the only one is \"default\")"
                    )));
                }
                (
                    Some(to_json(&self.config.spec)),
                    Some(self.config.meta.generation),
                )
            }
            ResourceKind::Workspace => {
                validate_workspace_name(name)?;
                let ws = self.workspaces.get(name);
                if ws.is_none() && self.workspaces.len() >= MAX_WORKSPACES {
                    return Err(ApiError::failed_precondition(format!(
                        "tenant {} has {MAX_WORKSPACES} workspaces, the most it may have; delete one first",
                        self.tenant
                    )));
                }
                (ws.map(|w| to_json(&w.spec)), ws.map(|w| w.meta.generation))
            }
        };
        let new_spec = match change {
            ConfigChange::Set {
                spec,
                expected_generation,
            } => {
                if let Some(expected) = expected_generation
                    && Some(*expected) != current_generation
                    && !(*expected == 0 && current_generation.is_none())
                {
                    return Err(ApiError::failed_precondition(format!(
                        "{} {name} is at generation {}, not {expected}; get it again and retry",
                        kind.as_str(),
                        current_generation.unwrap_or(0)
                    )));
                }
                if !spec.is_object() {
                    return Err(ApiError::invalid_argument(
                        "spec must be a mapping of fields",
                    ));
                }
                spec.clone()
            }
            ConfigChange::Patch { set } => {
                let mut doc = current_spec.ok_or_else(|| {
                    ApiError::not_found(format!(
                        "{} {name} does not exist; create it with murmur set {} {name}",
                        kind.as_str(),
                        kind.as_str()
                    ))
                })?;
                if set.is_empty() {
                    return Err(ApiError::invalid_argument(
                        "patch needs at least one --set key=value",
                    ));
                }
                for (key, value) in set {
                    patch_json(&mut doc, key, value)?;
                }
                doc
            }
        };
        match kind {
            ResourceKind::PoolConfig => {
                let spec: PoolConfigSpec = spec_from_json(new_spec)?;
                spec.validate()?;
                Ok(ValidChange::PoolConfig(spec))
            }
            ResourceKind::Workspace => {
                let spec: WorkspaceSpec = spec_from_json(new_spec)?;
                spec.validate()?;
                Ok(ValidChange::Workspace(name.to_string(), spec))
            }
        }
    }

    /// Commits a validated change, bumps the resource's generation and reconciles.
    pub fn commit_change(
        &mut self,
        change: ValidChange,
        actor: &str,
        now: Millis,
    ) -> (ResourceDoc, Vec<Intent>) {
        let doc = match change {
            ValidChange::PoolConfig(spec) => {
                if spec != self.config.spec {
                    self.config.spec = spec;
                    bump(&mut self.config.meta, actor, now);
                }
                make_doc(ResourceKind::PoolConfig, POOL_CONFIG_NAME, &self.config)
            }
            ValidChange::Workspace(name, spec) => {
                let ws = self
                    .workspaces
                    .entry(name.clone())
                    .or_insert_with(|| Resource {
                        meta: Meta::default(),
                        spec: spec.clone(),
                    });
                if ws.spec != spec || ws.meta.generation == 0 {
                    ws.spec = spec;
                    bump(&mut ws.meta, actor, now);
                }
                make_doc(ResourceKind::Workspace, &name, ws)
            }
        };
        self.record_changed();
        (doc, self.reconcile(now))
    }

    /// The `pool-config default` document (it always exists).
    pub fn pool_config_doc(&self) -> ResourceDoc {
        make_doc(ResourceKind::PoolConfig, POOL_CONFIG_NAME, &self.config)
    }

    /// The document of one resource, or `NOT_FOUND`.
    pub fn doc(&self, kind: ResourceKind, name: &str) -> Result<ResourceDoc, ApiError> {
        match kind {
            ResourceKind::PoolConfig if name == POOL_CONFIG_NAME => Ok(self.pool_config_doc()),
            ResourceKind::PoolConfig => Err(ApiError::not_found(format!(
                "pool-config {name:?} does not exist (the only one is \"default\")"
            ))),
            ResourceKind::Workspace => match self.workspaces.get(name) {
                Some(ws) => Ok(make_doc(kind, name, ws)),
                None => Err(ApiError::not_found(format!(
                    "workspace {name} does not exist; create it with murmur set workspace {name}"
                ))),
            },
        }
    }

    /// Every resource's document: the pool-config first, then the workspaces by name.
    pub fn docs(&self) -> Vec<ResourceDoc> {
        std::iter::once(self.pool_config_doc())
            .chain(
                self.workspaces
                    .iter()
                    .map(|(name, ws)| make_doc(ResourceKind::Workspace, name, ws)),
            )
            .collect()
    }

    /// True when `vm` may be handed out: warm, from the workspace's current image and the
    /// pool's current generation.
    pub fn is_fresh(&self, vm: &VmRecord) -> bool {
        vm.generation == self.generation
            && self
                .workspaces
                .get(&vm.workspace)
                .is_some_and(|ws| ws.spec.image_ref == vm.image)
    }

    /// The one reconcile step: compare each workspace's wanted warm VMs with what exists and
    /// emit boots (under `max_vms`, respecting image back-off) and deletes (surplus, and stale
    /// warm VMs when their room is needed). While a nuke holds the pool nothing happens;
    /// while the pool recovers, claims are served only from VMs it has adopted, and nothing
    /// boots or is shed (the inventory is not complete yet, so `max_vms` cannot be judged).
    pub fn reconcile(&mut self, now: Millis) -> Vec<Intent> {
        self.last_reconcile_at = self.last_reconcile_at.max(now);
        if self.nuke.holds_pool() {
            return Vec::new();
        }
        if self.recovery.is_some() {
            return self.serve_claims(now).0;
        }
        let mut out = self.shed_over_capacity();
        let (served, claims_waiting) = self.serve_claims(now);
        out.extend(served);
        let names: Vec<String> = self.workspaces.keys().cloned().collect();
        for name in names {
            let Some(ws) = self.workspaces.get(&name) else {
                continue;
            };
            let spec = ws.spec.clone();
            self.vms.settle();
            // Booting or warm, fresh (`is_fresh`: this workspace's image, this generation),
            // and not on a draining host.
            let draining = |h: &str| self.hosts.is_draining(h);
            let have = self
                .vms
                .booting_or_warm(&name, &spec.image_ref, self.generation, draining);
            if have > spec.min_idle {
                // Scale in: only warm VMs, oldest first; booting ones finish and are counted.
                let warm: Vec<VmId> = self
                    .vms
                    .warm_oldest_first(&name, &spec.image_ref, self.generation)
                    .into_iter()
                    .filter(|id| !self.on_draining_host(id))
                    .take((have - spec.min_idle) as usize)
                    .collect();
                for id in warm {
                    out.push(self.mark_deleting(&id, DeleteReason::ScaleIn));
                }
                continue;
            }
            let mut missing = spec.min_idle - have;
            if missing == 0 || claims_waiting || self.image_held(&spec.image_ref) {
                continue;
            }
            if self.probing(&spec.image_ref) {
                // After a back-off, one probe boot at a time until the image works again.
                missing = missing.min(if self.booting_with_image(&spec.image_ref) == 0 {
                    1
                } else {
                    0
                });
            }
            while missing > 0 {
                if self.in_use() >= self.config.spec.max_vms {
                    match self.stale_warm_vm() {
                        Some(id) => out.push(self.mark_deleting(&id, DeleteReason::StaleImage)),
                        None => break,
                    }
                    // The eviction frees room only once the delete is confirmed.
                    break;
                }
                match self.start_boot(&name, &spec, now) {
                    Some(boot) => out.push(boot),
                    // No host has room: nothing to boot until one has.
                    None => break,
                }
                missing -= 1;
            }
        }
        self.forget_healthy_images();
        out
    }

    /// Drops the boot health of images that are healthy and that no workspace and no VM
    /// uses, so the map does not grow with every image ever baked.
    fn forget_healthy_images(&mut self) {
        if self.images.len() <= self.workspaces.len() {
            return;
        }
        let wanted: std::collections::BTreeSet<&str> = self
            .workspaces
            .values()
            .map(|w| w.spec.image_ref.as_str())
            .chain(self.vms.values().map(|v| v.image.as_str()))
            .collect();
        let forget: Vec<String> = self
            .images
            .iter()
            .filter(|(image, h)| {
                !h.held && h.consecutive_failures == 0 && !wanted.contains(image.as_str())
            })
            .map(|(image, _)| image.clone())
            .collect();
        for image in forget {
            self.images.remove(&image);
        }
    }

    /// When `max_vms` was lowered below what exists, deletes warm VMs (stale ones first, then
    /// the oldest) until what remains fits. Assigned VMs are never touched.
    fn shed_over_capacity(&mut self) -> Vec<Intent> {
        let over = self.in_use().saturating_sub(self.config.spec.max_vms);
        if over == 0 {
            // The common case: no need to count the deletes in flight either.
            return Vec::new();
        }
        let excess = over.saturating_sub(self.deleting());
        if excess == 0 {
            // The common case: nothing to shed, so no need to sort the warm VMs.
            return Vec::new();
        }
        self.warm_in_eviction_order()
            .into_iter()
            .take(excess as usize)
            .map(|(_, id)| self.mark_deleting(&id, DeleteReason::ScaleIn))
            .collect()
    }

    /// VMs being deleted and not stuck (room that will come free soon; a dormant VM's
    /// delete frees none).
    fn deleting(&self) -> u32 {
        self.vms
            .values()
            .filter(|v| v.state == VmState::Deleting && v.delete_failures == 0 && !v.dormant)
            .count() as u32
    }

    /// Warm VMs in the order they should go when room is needed: stale ones (not fresh)
    /// first, then the oldest. Each with whether it is fresh.
    fn warm_in_eviction_order(&self) -> Vec<(bool, VmId)> {
        let mut warm: Vec<(bool, Millis, VmId)> = self
            .vms
            .values()
            .filter(|v| v.state == VmState::Warm)
            .map(|v| {
                (
                    self.is_fresh(v),
                    v.ready_at.unwrap_or(v.created_at),
                    v.id.clone(),
                )
            })
            .collect();
        warm.sort();
        warm.into_iter().map(|(fresh, _, id)| (fresh, id)).collect()
    }

    fn image_held(&self, image: &str) -> bool {
        self.images.get(image).is_some_and(|h| h.held)
    }

    /// The timer of hold-back `seq` of `image` fired: backfill may try the image again (one
    /// probe boot at a time). The timer of an older hold-back changes nothing.
    pub fn hold_back_over(&mut self, image: &str, seq: u64, now: Millis) -> Vec<Intent> {
        if let Some(h) = self.images.get_mut(image)
            && h.held
            && h.hold_seq == seq
        {
            h.held = false;
            h.backoff_until = None;
        }
        self.reconcile(now)
    }

    fn probing(&self, image: &str) -> bool {
        self.images
            .get(image)
            .is_some_and(|h| h.consecutive_failures >= FAILURE_THRESHOLD)
    }

    fn booting_with_image(&self, image: &str) -> usize {
        self.vms
            .values()
            .filter(|v| v.state == VmState::Booting && v.image == image)
            .count()
    }

    /// A warm VM that can never be handed out (its image or generation is stale), oldest first.
    fn stale_warm_vm(&mut self) -> Option<VmId> {
        self.vms.settle();
        let (generation, workspaces) = (self.generation, &self.workspaces);
        self.vms.oldest_warm_of_groups(|workspace, image, g| {
            let fresh = g == generation
                && workspaces
                    .get(workspace)
                    .is_some_and(|ws| ws.spec.image_ref == image);
            !fresh
        })
    }

    fn mark_deleting(&mut self, id: &VmId, reason: DeleteReason) -> Intent {
        if let Some(rec) = self.vms.get_mut(id) {
            rec.state = VmState::Deleting;
            rec.delete_reason = Some(reason);
            // A dormant VM being deleted leaves the line of wakes (it still holds no memory,
            // so it still does not count).
            rec.wake_seq = 0;
        }
        Intent::Delete {
            vm: id.clone(),
            reason,
        }
    }

    /// Records a new VM of `workspace` as booting and returns its boot, placed on a host;
    /// `None` when no host has room for it.
    fn start_boot(&mut self, workspace: &str, spec: &WorkspaceSpec, now: Millis) -> Option<Intent> {
        let memory_mb = spec.environment.memory_mb;
        self.vms.settle();
        let host = Some(self.place(memory_mb)?);
        let id = self.next_vm_id();
        let rec = VmRecord {
            id: id.clone(),
            workspace: workspace.to_string(),
            image: spec.image_ref.clone(),
            generation: self.generation,
            state: VmState::Booting,
            agent: None,
            claim: None,
            created_at: now,
            ready_at: None,
            delete_reason: None,
            host,
            memory_mb,
            delete_failures: 0,
            delete_error: None,
            warm_round: 0,
            dormant: false,
            wake_seq: 0,
        };
        self.counters.boots += 1;
        let intent = Intent::Boot(self.boot_spec(&rec));
        self.vms.insert(id, rec);
        Some(intent)
    }

    /// Draws the next unused VM id from a deterministic sequence (splitmix64 over the seed).
    fn next_vm_id(&mut self) -> VmId {
        loop {
            self.id_counter += 1;
            let mut z = self
                .id_seed
                .wrapping_add(self.id_counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let id = VmId::from_bits((z >> 32) as u32);
            if !self.vms.contains_key(&id) {
                return id;
            }
        }
    }

    /// Notes that the pool's record (config, workspaces, generation) changed.
    fn record_changed(&mut self) {
        self.record_rev += 1;
    }
}

/// Wait before the `failures`-th retry of a stuck delete.
fn delete_backoff(failures: u32) -> Millis {
    let doublings = failures.saturating_sub(1).min(10);
    (DELETE_RETRY_BASE_MS << doublings).min(DELETE_RETRY_MAX_MS)
}

fn bump(meta: &mut Meta, actor: &str, now: Millis) {
    meta.generation += 1;
    meta.updated_by = actor.to_string();
    meta.updated_at = now;
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn make_doc<S: Serialize>(kind: ResourceKind, name: &str, res: &Resource<S>) -> ResourceDoc {
    ResourceDoc {
        kind,
        name: name.to_string(),
        generation: res.meta.generation,
        updated_by: res.meta.updated_by.clone(),
        updated_at: format_rfc3339(res.meta.updated_at),
        spec: to_json(&res.spec),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
