//! The reaper: compares what the substrate really holds with the inventory, on a schedule.
//!
//! A scan (the `murmur.reap_scan` activity) lists the tenant's VMs in the substrate and asks
//! Temporal which agents holding claims have ended. [`Pool::reap`] turns that into the same
//! commands as everything else, then runs the ordinary [`Pool::reconcile`], so the backfill
//! that replaces what was reaped is the one code path of the pool:
//!
//! - a VM the substrate holds and the pool does not know is a *suspect* first; it is deleted
//!   only when consecutive scans spanning the grace period all find it unknown (a scan races
//!   with boots and deletes the pool has in flight);
//! - a warm VM that was already warm when the scan started but is missing or dead in the
//!   listing is written off and deleted (backfill replaces it);
//!
//! No decision compares clocks: the grace period is counted in scans (each scan is an event
//! in history, started by a timer), so a replay always decides the same.
//! - the claim of an agent whose workflow has closed (terminated from outside murmur, say) is
//!   released: its VM is deleted, or its place in the queue given up.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Command, Pool};
use crate::model::{DeleteReason, Millis, VmId, VmState};

/// How long an unknown VM must stay unknown before the reaper deletes it, when the worker
/// does not say otherwise.
pub const DEFAULT_REAP_GRACE_MS: Millis = 60_000;

/// Time between scans when the worker does not say otherwise.
pub const DEFAULT_REAP_INTERVAL_MS: Millis = 30_000;

/// One VM as a scan found it in the substrate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScannedVm {
    /// The VM.
    pub id: VmId,
    /// True when its process (or guest) is running.
    pub alive: bool,
    /// The host it was found on (`None` from a scan of the shared queue's worker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// What one reaper scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReapScan {
    /// Every VM of the tenant in the substrate.
    pub vms: Vec<ScannedVm>,
    /// Claims (request ids) whose agent workflow has closed.
    pub finished_agents: Vec<String>,
    /// Agent workflows found stranded (their workflow task keeps failing) in this scan.
    pub stranded_found: u32,
    /// Of those, how many the scan terminated (`reap_stranded_workflows: enabled`).
    pub stranded_terminated: u32,
    /// The worker's grace period for unknown VMs, in ms (0: the default).
    pub grace_ms: Millis,
    /// The worker's time between scans, in ms (0: the default).
    pub interval_ms: Millis,
    /// Asked for while the pool is paused: whether the nuke that paused it still runs.
    pub nuke_running: Option<bool>,
    /// The hosts whose VMs the scan listed (`None`: one listing of everything, from runs
    /// before host placement). Only VMs of these hosts can be judged dead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
}

/// The reaper's memory and its totals, shown in `murmur pool status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaperState {
    /// Scans applied.
    pub scans: u64,
    /// Workflow time of the last scan applied.
    pub last_scan_at: Option<Millis>,
    /// Unknown VMs deleted after their grace period.
    pub orphans_deleted: u64,
    /// VMs of agents that ended without releasing them (and waiting claims of such agents).
    pub agent_claims_released: u64,
    /// Warm VMs found dead or missing in the substrate, deleted and replaced.
    pub dead_vms_replaced: u64,
    /// Stranded agent workflows seen by the last scan.
    pub stranded_found: u32,
    /// Stranded agent workflows terminated, in total.
    pub stranded_terminated: u64,
    /// Unknown VMs waiting out their grace period, with how many scans in a row saw them.
    pub suspects: BTreeMap<VmId, u32>,
    /// Scans in a row that found the pool paused with no nuke running.
    pub paused_without_nuke: u32,
    /// Pauses resumed because their nuke had ended without resetting the pool (terminated by
    /// hand, say).
    pub abandoned_nukes: u64,
}

impl ReapScan {
    /// Scans in a row that must find a VM unknown before it is deleted: enough to span the
    /// grace period at the scan interval, and never fewer than two.
    pub fn sightings_needed(&self) -> u32 {
        let grace = if self.grace_ms == 0 {
            DEFAULT_REAP_GRACE_MS
        } else {
            self.grace_ms
        };
        let interval = if self.interval_ms == 0 {
            DEFAULT_REAP_INTERVAL_MS
        } else {
            self.interval_ms
        };
        u32::try_from(grace.div_ceil(interval) + 1)
            .unwrap_or(u32::MAX)
            .max(2)
    }
}

impl Pool {
    /// The warm VMs as a scan starts: only these are judged dead when its listing misses
    /// them (a VM that came up after the listing was taken would be missing from it).
    pub fn reap_baseline(&self) -> BTreeSet<VmId> {
        self.vms
            .values()
            .filter(|v| v.state == VmState::Warm)
            .map(|v| v.id.clone())
            .collect()
    }

    /// Applies a reaper scan that started with `baseline` ([`Pool::reap_baseline`]). Returns
    /// the deletes plus whatever the reconcile that follows wants (backfill for what was
    /// reaped).
    pub fn reap(
        &mut self,
        scan: &ReapScan,
        baseline: &BTreeSet<VmId>,
        now: Millis,
    ) -> Vec<Command> {
        if self.paused {
            // A nuke that ended without resetting the pool (terminated by hand) would leave it
            // paused for good: after scans in a row spanning the grace period find no nuke
            // running, the pool resumes, and this scan's findings clean up what the half-done
            // nuke left (VMs it deleted are missing, agents it terminated have ended).
            if scan.nuke_running != Some(false) {
                // A nuke is wiping everything anyway; its reset starts from a clean slate.
                self.reaper.paused_without_nuke = 0;
                return Vec::new();
            }
            self.reaper.paused_without_nuke += 1;
            if self.reaper.paused_without_nuke < scan.sightings_needed() {
                return Vec::new();
            }
            self.paused = false;
            self.paused_at = None;
            self.nuke_request = None;
            self.reaper.paused_without_nuke = 0;
            self.reaper.abandoned_nukes += 1;
        }
        let needed = scan.sightings_needed();
        self.reaper.scans += 1;
        self.reaper.last_scan_at = Some(now);
        self.reaper.stranded_found = scan.stranded_found;
        self.reaper.stranded_terminated += u64::from(scan.stranded_terminated);
        let listed: BTreeMap<&VmId, (bool, Option<&String>)> = scan
            .vms
            .iter()
            .map(|v| (&v.id, (v.alive, v.host.as_ref())))
            .collect();
        let scanned = |host: Option<&String>| match (&scan.hosts, host) {
            (None, _) => true,
            (Some(hosts), Some(h)) => hosts.contains(h),
            (Some(_), None) => false,
        };

        let mut out = Vec::new();
        // Unknown VMs: suspects first, deleted once the grace period has passed.
        // A host lost since the listing was taken cannot be asked to delete anything.
        let unknown: BTreeMap<VmId, Option<String>> = listed
            .iter()
            .filter(|(id, (_, host))| {
                !self.vms.contains_key(**id) && !host.is_some_and(|h| self.hosts.is_lost(h))
            })
            .map(|(id, (_, host))| ((*id).clone(), host.cloned()))
            .collect();
        self.reaper
            .suspects
            .retain(|id, _| unknown.contains_key(id));
        for (id, host) in unknown {
            let seen = self.reaper.suspects.entry(id.clone()).or_insert(0);
            *seen += 1;
            if *seen >= needed {
                self.reaper.suspects.remove(&id);
                self.reaper.orphans_deleted += 1;
                out.push(self.adopt_orphan(&id, host, now));
            }
        }

        // Warm VMs that died (or vanished) since they came up.
        let dead: Vec<VmId> = self
            .vms
            .values()
            .filter(|v| v.state == VmState::Warm && baseline.contains(&v.id))
            .filter(|v| scanned(v.host.as_ref()))
            .filter(|v| listed.get(&v.id).map(|l| l.0) != Some(true))
            .map(|v| v.id.clone())
            .collect();
        for id in dead {
            self.reaper.dead_vms_replaced += 1;
            out.push(self.mark_deleting(&id, DeleteReason::Died));
        }

        // Claims of agents that ended without releasing them.
        for request in &scan.finished_agents {
            if self.claims.contains_key(request) {
                self.reaper.agent_claims_released += 1;
                let (_, cmds) = self.release(request, now);
                out.extend(cmds);
            }
        }
        out.extend(self.reconcile(now));
        out
    }

    /// Request ids of every claim, for the next scan to check.
    pub fn claim_requests(&self) -> Vec<String> {
        self.claims.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::ClaimRequest;
    use crate::model::WorkspaceSpec;

    fn pool_with_warm(n: u32) -> (Pool, Vec<VmId>) {
        let mut pool = Pool::new("t", 7, 0);
        let spec = WorkspaceSpec {
            min_idle: n,
            image_ref: "default".into(),
            ..WorkspaceSpec::default()
        };
        pool.workspaces.insert(
            "default".into(),
            crate::model::Resource {
                meta: Default::default(),
                spec,
            },
        );
        pool.config.spec.max_vms = 10;
        let boots = pool.reconcile(0);
        let ids: Vec<VmId> = boots
            .iter()
            .filter_map(|c| match c {
                Command::Boot(s) => Some(s.vm.clone()),
                _ => None,
            })
            .collect();
        for id in &ids {
            pool.boot_succeeded(id, 10);
        }
        (pool, ids)
    }

    /// A scan listing `ids`, alive, with a grace period of `grace_ms` at a 1 s interval.
    fn scan_of(ids: &[VmId], grace_ms: Millis) -> ReapScan {
        ReapScan {
            vms: ids
                .iter()
                .map(|id| ScannedVm {
                    id: id.clone(),
                    alive: true,
                    host: None,
                })
                .collect(),
            grace_ms,
            interval_ms: 1_000,
            ..ReapScan::default()
        }
    }

    fn none() -> BTreeSet<VmId> {
        BTreeSet::new()
    }

    fn deletes(cmds: &[Command]) -> Vec<VmId> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Delete { vm, .. } => Some(vm.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_unknown_vm_is_deleted_only_after_the_grace_period() {
        let (mut pool, mut ids) = pool_with_warm(2);
        let orphan = VmId("murmur-0rphan00".into());
        ids.push(orphan.clone());
        // Grace 2 s at 1 s per scan: three sightings in a row.
        assert_eq!(scan_of(&ids, 2_000).sightings_needed(), 3);
        let first = pool.reap(&scan_of(&ids, 2_000), &none(), 100);
        assert!(
            deletes(&first).is_empty(),
            "deleted before the grace period"
        );
        assert!(pool.reaper.suspects.contains_key(&orphan));
        let early = pool.reap(&scan_of(&ids, 2_000), &none(), 1_100);
        assert!(deletes(&early).is_empty());
        let due = pool.reap(&scan_of(&ids, 2_000), &none(), 2_100);
        assert_eq!(deletes(&due), vec![orphan.clone()]);
        assert_eq!(pool.vms[&orphan].state, VmState::Deleting);
        assert_eq!(pool.reaper.orphans_deleted, 1);
        assert!(pool.reaper.suspects.is_empty());
    }

    #[test]
    fn a_suspect_that_disappears_is_forgotten() {
        let (mut pool, ids) = pool_with_warm(1);
        let mut with_stray = ids.clone();
        with_stray.push(VmId("murmur-57ray000".into()));
        pool.reap(&scan_of(&with_stray, 1_000), &none(), 100);
        assert_eq!(pool.reaper.suspects.len(), 1);
        let cmds = pool.reap(&scan_of(&ids, 1_000), &none(), 5_000);
        assert!(deletes(&cmds).is_empty());
        assert!(pool.reaper.suspects.is_empty());
    }

    #[test]
    fn a_dead_warm_vm_is_replaced_but_a_just_booted_one_is_not_judged() {
        let (mut pool, ids) = pool_with_warm(2);
        // ids[0] is missing from the listing; ids[1] is listed but dead.
        let mut scan = scan_of(&ids[1..], 1_000);
        scan.vms[0].alive = false;
        // Not warm yet when the scan started: the listing may predate them, so no verdict.
        let cmds = pool.reap(&scan, &none(), 20);
        assert!(deletes(&cmds).is_empty());
        let baseline = pool.reap_baseline();
        let cmds = pool.reap(&scan, &baseline, 60);
        let (mut gone, mut want) = (deletes(&cmds), ids.clone());
        gone.sort();
        want.sort();
        assert_eq!(gone, want);
        assert_eq!(pool.reaper.dead_vms_replaced, 2);
        let boots = cmds
            .iter()
            .filter(|c| matches!(c, Command::Boot(_)))
            .count();
        assert_eq!(boots, 2, "backfill replaces what was reaped");
    }

    #[test]
    fn the_claim_of_a_finished_agent_is_released() {
        let (mut pool, ids) = pool_with_warm(1);
        let req = ClaimRequest {
            request: "agent/t/default/dev/a@run1".into(),
            agent: "agent/t/default/dev/a".into(),
            developer: "dev".into(),
            workspace: "default".into(),
            ..ClaimRequest::default()
        };
        pool.claim(&req, 20);
        assert_eq!(pool.vms[&ids[0]].state, VmState::Assigned);
        assert_eq!(pool.claim_requests(), vec![req.request.clone()]);
        let mut scan = scan_of(&ids, 1_000);
        scan.finished_agents = vec![req.request.clone(), "unknown@run".into()];
        let cmds = pool.reap(&scan, &none(), 30);
        assert_eq!(deletes(&cmds), vec![ids[0].clone()]);
        assert!(pool.claims.is_empty());
        assert_eq!(pool.reaper.agent_claims_released, 1);
    }

    #[test]
    fn a_paused_pool_ignores_scans_while_its_nuke_runs() {
        let (mut pool, mut ids) = pool_with_warm(1);
        ids.push(VmId("murmur-0rphan00".into()));
        pool.paused = true;
        for running in [None, Some(true)] {
            let mut scan = scan_of(&ids, 1);
            scan.nuke_running = running;
            for _ in 0..5 {
                assert!(pool.reap(&scan, &none(), 10_000).is_empty());
            }
        }
        assert_eq!(pool.reaper.scans, 0);
        assert!(pool.paused);
    }

    #[test]
    fn a_pool_left_paused_by_a_dead_nuke_resumes_after_the_grace_period() {
        let (mut pool, ids) = pool_with_warm(2);
        pool.pause(0);
        // The nuke deleted one warm VM, then was terminated by hand.
        let mut scan = scan_of(&ids[1..], 2_000);
        scan.nuke_running = Some(false);
        let baseline = pool.reap_baseline();
        assert!(pool.reap(&scan, &baseline, 1_000).is_empty());
        assert!(pool.reap(&scan, &baseline, 2_000).is_empty());
        assert!(pool.paused, "resumed before the grace period");
        let cmds = pool.reap(&scan, &baseline, 3_000);
        assert!(!pool.paused);
        assert_eq!(pool.reaper.abandoned_nukes, 1);
        assert_eq!(
            deletes(&cmds),
            vec![ids[0].clone()],
            "the VM the nuke deleted"
        );
        assert!(
            cmds.iter().any(|c| matches!(c, Command::Boot(_))),
            "backfill resumes"
        );
    }
}
