//! The pool status view: counts per workspace and image generation, reasons, config in force.
//!
//! Built from a [`Pool`] by a pure function so the query handler, the CLI and the tests all
//! see the same numbers. The JSON form is the `murmur pool status --json` schema.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::machine::{Claim, Counters, FAILURE_THRESHOLD, Pool, ReaperState, Recovery};
use crate::model::{ImageHealth, Millis, PoolConfigSpec, VmRecord, VmState};

/// Counts of one (image, generation) group inside a workspace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Image the VMs boot from.
    pub image: String,
    /// Pool generation they were booted in.
    pub generation: u64,
    /// Ready and idle.
    pub warm: u32,
    /// Create requested, not ready yet.
    pub booting: u32,
    /// Held by an agent.
    pub assigned: u32,
    /// Delete requested.
    pub deleting: u32,
}

/// One workspace's view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceStatus {
    /// Workspace name.
    pub name: String,
    /// Warm VMs wanted.
    pub min_idle: u32,
    /// Image new VMs boot from.
    pub image_ref: String,
    /// Resource generation of the workspace.
    pub config_generation: u64,
    /// Warm VMs that can be handed out now (current image and pool generation).
    pub ready: u32,
    /// Counts per (image, generation).
    pub groups: Vec<GroupStatus>,
    /// When the oldest warm VM became ready (epoch milliseconds); the CLI shows its age.
    pub oldest_warm_since: Option<Millis>,
    /// Consecutive boot failures of the current image.
    pub boot_failures: u32,
    /// Why the workspace is not at `min_idle`, as stable codes
    /// (`at_max_vms`, `image_failing`, `no_host_with_room`, `flush_in_progress`).
    pub reasons: Vec<String>,
}

/// The whole pool's view (`murmur pool status --json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Tenant.
    pub tenant: String,
    /// Current pool generation.
    pub generation: u64,
    /// `pool-config default` in force.
    pub config: PoolConfigSpec,
    /// Resource generation of the pool-config.
    pub config_generation: u64,
    /// VMs counting against `max_vms`.
    pub in_use: u32,
    /// Assigned VMs asleep without holding host memory (a qemu guest saved to disk): they
    /// do not count in `in_use`.
    #[serde(default)]
    pub dormant: u32,
    /// Of those, how many wait for room under `max_vms` to wake.
    #[serde(default)]
    pub wakes_waiting: u32,
    /// Per-workspace views, by name.
    pub workspaces: Vec<WorkspaceStatus>,
    /// Images that failed to boot at least once since their last success.
    pub failing_images: BTreeMap<String, ImageHealth>,
    /// True while a flush waits for its deletes.
    pub flush_in_progress: bool,
    /// True while a nuke runs.
    pub nuke_in_progress: bool,
    /// Totals since the pool was created.
    pub counters: Counters,
    /// Signals rejected for malformed input since this run started.
    pub rejected_messages: u64,
    /// The first [`STATUS_LIST_MAX`] VM records, by id (the `inventory` query pages through
    /// all of them).
    pub vms: Vec<VmRecord>,
    /// How many VM records there are.
    #[serde(default)]
    pub vms_total: u32,
    /// The first [`STATUS_LIST_MAX`] claims: waiting for room, booting, or holding a VM.
    #[serde(default)]
    pub claims: Vec<Claim>,
    /// How many claims there are.
    #[serde(default)]
    pub claims_total: u32,
    /// How many claims wait for room under `max_vms`.
    #[serde(default)]
    pub claims_waiting: u32,
    /// VMs whose delete keeps failing (they count against `max_vms`; retried on a back-off
    /// timer), the first [`STATUS_LIST_MAX`] of them.
    #[serde(default)]
    pub stuck_deleting: Vec<StuckVm>,
    /// How many VMs are stuck deleting.
    #[serde(default)]
    pub stuck_deleting_total: u32,
    /// Set while the pool rebuilds its state after a run that ended (see ARCHITECTURE.md,
    /// recovery): where its config came from and what it adopted so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
    /// The latest refused requests (who, what, why), oldest first.
    #[serde(default)]
    pub denials: Vec<crate::auth::Denial>,
    /// Nukes completed.
    #[serde(default)]
    pub nukes: u64,
    /// When the pool last compared wanted with actual (epoch ms, workflow time).
    #[serde(default)]
    pub last_reconcile_at: Millis,
    /// How long the last flush took, in ms.
    #[serde(default)]
    pub last_flush_ms: Option<Millis>,
    /// How long the last nuke held the pool, in ms.
    #[serde(default)]
    pub last_nuke_ms: Option<Millis>,
    /// What the reaper found and did.
    #[serde(default)]
    pub reaper: ReaperStatus,
    /// The accelerator VMs run with (`kvm` or `tcg` on the qemu substrate; empty otherwise).
    #[serde(default)]
    pub accel: String,
    /// The hosts this pool places on, with its own usage of each (empty before placement).
    #[serde(default)]
    pub hosts: Vec<PoolHostStatus>,
    /// Set by the client when the run that answered has ended (`terminated`, `cancelled`,
    /// ...): the status is that run's last state, and nothing serves the pool until a new
    /// run starts (`murmur pool up`), which recovers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_ended: Option<String>,
}

/// Most items of each list in a status (so a status stays small at any pool size).
pub const STATUS_LIST_MAX: usize = 200;

/// A VM stuck deleting, for status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StuckVm {
    /// The VM.
    pub id: crate::model::VmId,
    /// Its host.
    #[serde(default)]
    pub host: Option<String>,
    /// Delete attempts that failed in a row.
    #[serde(default)]
    pub failures: u32,
    /// Why the last one failed.
    #[serde(default)]
    pub error: String,
}

/// One host as a pool sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolHostStatus {
    /// The host id.
    pub host: String,
    /// `live`, `draining`, `lost`, or `unreachable` (live, but it did not pick up this pool's
    /// last boot; no new VM goes there until the next host view).
    pub state: String,
    /// The host's VM capacity.
    pub max_vms: u32,
    /// This pool's VMs on it.
    pub vms: u32,
}

/// The reaper's totals (`murmur pool status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaperStatus {
    /// Scans applied.
    pub scans: u64,
    /// When the last scan was applied (epoch ms, workflow time).
    pub last_scan_at: Option<Millis>,
    /// Unknown VMs waiting out their grace period now.
    pub suspects: u32,
    /// Unknown VMs deleted.
    pub orphans_deleted: u64,
    /// Claims of agents that ended without releasing them, released.
    pub agent_claims_released: u64,
    /// Warm VMs found dead or missing, replaced.
    pub dead_vms_replaced: u64,
    /// Stranded agent workflows seen by the last scan.
    pub stranded_found: u32,
    /// Stranded agent workflows terminated, in total.
    pub stranded_terminated: u64,
    /// Nukes the pool stopped waiting for because they ended without resetting it.
    pub abandoned_nukes: u64,
    /// VMs found held by a running agent the pool did not know, adopted.
    pub adopted: u64,
    /// Claims whose agent was not found running, waiting out the grace period.
    pub claim_suspects: u32,
    /// Running agents the pool held no claim of (a waiting claim lost with a pool run that
    /// ended), told to claim again.
    pub agents_told_to_claim: u64,
}

impl ReaperStatus {
    /// The view of the reaper's state.
    pub fn of(r: &ReaperState) -> Self {
        Self {
            scans: r.scans,
            last_scan_at: r.last_scan_at,
            suspects: u32::try_from(r.suspects.len()).unwrap_or(u32::MAX),
            orphans_deleted: r.orphans_deleted,
            agent_claims_released: r.agent_claims_released,
            dead_vms_replaced: r.dead_vms_replaced,
            stranded_found: r.stranded_found,
            stranded_terminated: r.stranded_terminated,
            abandoned_nukes: r.abandoned_nukes,
            adopted: r.adopted,
            claim_suspects: u32::try_from(r.claim_suspects.len()).unwrap_or(u32::MAX),
            agents_told_to_claim: r.agents_told_to_claim,
        }
    }
}

impl PoolStatus {
    /// Builds the view of `pool`.
    pub fn build(pool: &Pool, flush_in_progress: bool, nuke_in_progress: bool) -> Self {
        Self {
            tenant: pool.tenant.clone(),
            generation: pool.generation,
            config: pool.config.spec.clone(),
            config_generation: pool.config.meta.generation,
            in_use: pool.in_use(),
            dormant: pool.vms.dormant(),
            wakes_waiting: pool.vms.wakes_in_line().len() as u32,
            workspaces: Self::workspaces_of(pool, flush_in_progress, nuke_in_progress),
            failing_images: pool
                .images
                .iter()
                .filter(|(_, h)| h.consecutive_failures > 0)
                .map(|(k, h)| (k.clone(), h.clone()))
                .collect(),
            flush_in_progress,
            nuke_in_progress,
            counters: pool.counters.clone(),
            rejected_messages: 0,
            vms: pool.vms.values().take(STATUS_LIST_MAX).cloned().collect(),
            vms_total: u32::try_from(pool.vms.len()).unwrap_or(u32::MAX),
            claims: pool
                .claims
                .values()
                .take(STATUS_LIST_MAX)
                .cloned()
                .collect(),
            claims_total: u32::try_from(pool.claims.len()).unwrap_or(u32::MAX),
            claims_waiting: pool
                .claims
                .values()
                .filter(|c| c.vm.is_none() && c.failed.is_none())
                .count() as u32,
            stuck_deleting: pool
                .stuck_deleting()
                .take(STATUS_LIST_MAX)
                .map(|v| StuckVm {
                    id: v.id.clone(),
                    host: v.host.clone(),
                    failures: v.delete_failures,
                    error: v.delete_error.clone().unwrap_or_default(),
                })
                .collect(),
            stuck_deleting_total: u32::try_from(pool.stuck_deleting().count()).unwrap_or(u32::MAX),
            recovery: pool.recovery.clone(),
            denials: pool.denials.clone(),
            nukes: pool.nukes,
            last_reconcile_at: pool.last_reconcile_at,
            last_flush_ms: pool.last_flush_ms,
            last_nuke_ms: pool.last_nuke_ms,
            reaper: ReaperStatus::of(&pool.reaper),
            accel: pool.accel.clone(),
            hosts: {
                let usage = pool.host_usage();
                pool.hosts
                    .hosts
                    .values()
                    .map(|h| PoolHostStatus {
                        host: h.host.clone(),
                        state: if h.placeable() && pool.unreachable_hosts.contains(&h.host) {
                            "unreachable".to_string()
                        } else {
                            h.state_label().to_string()
                        },
                        max_vms: h.max_vms,
                        vms: usage.get(&h.host).map_or(0, |u| u.vms),
                    })
                    .collect()
            },
            run_ended: None,
        }
    }

    /// The per-workspace views alone, without copying the inventory (cheap enough for the
    /// workflow's current details, refreshed on every event).
    pub fn workspaces_of(
        pool: &Pool,
        flush_in_progress: bool,
        nuke_in_progress: bool,
    ) -> Vec<WorkspaceStatus> {
        let max_vms = pool.config.spec.max_vms;
        pool.workspaces
            .iter()
            .map(|(name, ws)| {
                let mine: Vec<&VmRecord> =
                    pool.vms.values().filter(|v| &v.workspace == name).collect();
                let mut groups: BTreeMap<(String, u64), GroupStatus> = BTreeMap::new();
                for v in &mine {
                    let g = groups
                        .entry((v.image.clone(), v.generation))
                        .or_insert_with(|| GroupStatus {
                            image: v.image.clone(),
                            generation: v.generation,
                            ..Default::default()
                        });
                    match v.state {
                        VmState::Warm => g.warm += 1,
                        VmState::Booting => g.booting += 1,
                        VmState::Assigned => g.assigned += 1,
                        VmState::Deleting => g.deleting += 1,
                    }
                }
                let ready = mine
                    .iter()
                    .filter(|v| v.state == VmState::Warm && pool.is_fresh(v))
                    .count() as u32;
                let fresh_or_booting = mine
                    .iter()
                    .filter(|v| {
                        matches!(v.state, VmState::Warm | VmState::Booting) && pool.is_fresh(v)
                    })
                    .count() as u32;
                let oldest_warm_since = mine
                    .iter()
                    .filter(|v| v.state == VmState::Warm)
                    .filter_map(|v| v.ready_at)
                    .min();
                let health = pool.images.get(&ws.spec.image_ref);
                let boot_failures = health.map_or(0, |h| h.consecutive_failures);
                let mut reasons = Vec::new();
                if fresh_or_booting < ws.spec.min_idle {
                    if pool.in_use() >= max_vms {
                        reasons.push("at_max_vms".to_string());
                    }
                    if boot_failures >= FAILURE_THRESHOLD {
                        reasons.push("image_failing".to_string());
                    }
                    if pool.no_host_with_room(ws.spec.environment.memory_mb) {
                        reasons.push("no_host_with_room".to_string());
                    }
                }
                if flush_in_progress {
                    reasons.push("flush_in_progress".to_string());
                }
                if nuke_in_progress {
                    reasons.push("nuke_in_progress".to_string());
                }
                if pool.recovery.is_some() {
                    reasons.push("recovering".to_string());
                }
                WorkspaceStatus {
                    name: name.clone(),
                    min_idle: ws.spec.min_idle,
                    image_ref: ws.spec.image_ref.clone(),
                    config_generation: ws.meta.generation,
                    ready,
                    groups: groups.into_values().collect(),
                    oldest_warm_since,
                    boot_failures,
                    reasons,
                }
            })
            .collect()
    }

    /// Warm VMs of a workspace, whatever their image or generation.
    pub fn warm(&self, workspace: &str) -> u32 {
        self.workspaces
            .iter()
            .filter(|w| w.name == workspace)
            .flat_map(|w| &w.groups)
            .map(|g| g.warm)
            .sum()
    }
}
