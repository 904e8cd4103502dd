//! Placement: which host a new VM goes to, and what happens to VMs when a host is lost or
//! drained.
//!
//! The pool knows the hosts through the registry's [`HostView`] (pushed on every change and
//! re-read at every reaper scan; both arrive as events, so a replay decides the same). A new
//! VM goes to the live, non-draining host with the lowest share of its `max_vms` taken by
//! this pool's VMs, under both its VM and memory capacity; ties go to the lower host id.

use std::collections::BTreeMap;

use super::{Intent, Pool};
use crate::hosts::HostView;
use crate::model::{DeleteReason, Millis, VmId, VmState};

/// This pool's VMs and memory on one host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// VMs in any state.
    pub vms: u32,
    /// Memory of those VMs, in MiB.
    pub memory_mb: u64,
}

impl Pool {
    /// This pool's usage per host (VMs without a host are not counted).
    pub fn host_usage(&self) -> BTreeMap<String, HostUsage> {
        self.vms.host_usage()
    }

    /// The host a new VM of `memory_mb` goes to: least loaded among the placeable hosts with
    /// room; `None` when no host has room.
    pub(super) fn place(&self, memory_mb: u32) -> Option<String> {
        let usage = self.host_usage();
        self.hosts
            .hosts
            .values()
            .filter(|h| h.placeable() && !self.unreachable_hosts.contains(&h.host))
            .filter_map(|h| {
                let used = usage.get(&h.host).copied().unwrap_or_default();
                let fits_memory =
                    h.memory_mb == 0 || used.memory_mb + u64::from(memory_mb) <= h.memory_mb;
                (used.vms < h.max_vms && fits_memory).then(|| {
                    // Share of the host taken, in millionths (integer, so ordering is exact).
                    let load = u64::from(used.vms) * 1_000_000 / u64::from(h.max_vms.max(1));
                    (load, h.host.clone())
                })
            })
            .min()
            .map(|(_, host)| host)
    }

    /// True when no host can take a VM of `memory_mb` now.
    pub fn no_host_with_room(&self, memory_mb: u32) -> bool {
        self.place(memory_mb).is_none()
    }

    /// True when `vm` sits on a host being drained.
    pub(super) fn on_draining_host(&self, vm: &VmId) -> bool {
        self.vms
            .get(vm)
            .and_then(|v| v.host.as_deref())
            .is_some_and(|h| self.hosts.is_draining(h))
    }

    /// The registry's view of the hosts changed. An older view than the one held changes
    /// nothing. VMs of lost hosts are written off; warm VMs of draining hosts are deleted;
    /// then the usual reconcile backfills elsewhere.
    pub fn hosts_changed(&mut self, view: HostView, now: Millis) -> Vec<Intent> {
        if view.version < self.hosts.version {
            return Vec::new();
        }
        self.hosts = view;
        // A fresh look: hosts that did not pick up a boot may be tried again.
        self.unreachable_hosts.clear();
        let mut out = Vec::new();
        let placed: Vec<(VmId, String, VmState)> = self
            .vms
            .values()
            .filter_map(|v| v.host.clone().map(|h| (v.id.clone(), h, v.state)))
            .collect();
        for (id, host, state) in placed {
            if self.hosts.is_lost(&host) {
                out.extend(self.write_off(&id, &host));
            } else if state == VmState::Warm && self.hosts.is_draining(&host) {
                out.push(self.mark_deleting(&id, DeleteReason::Drained));
            }
        }
        out.extend(self.reconcile(now));
        out
    }

    /// A boot was never picked up (its host stopped polling its queue), so nothing was
    /// created: the VM is forgotten, a claim it was booting for waits again in its place, and
    /// the reconcile places a new boot elsewhere: the host counts as unreachable, and gets no
    /// new VM, until the next host view arrives (at the next reaper scan, or sooner when the
    /// registry announces a change). Not an image failure.
    pub fn boot_not_started(&mut self, vm: &VmId, now: Millis) -> Vec<Intent> {
        if let Some(rec) = self.vms.get(vm)
            && rec.state == VmState::Booting
        {
            if let Some(host) = rec.host.clone() {
                self.unreachable_hosts.insert(host);
            }
            self.vms.remove(vm);
            self.reaper.forgot(vm);
            for claim in self.claims.values_mut() {
                if claim.vm.as_ref() == Some(vm) {
                    claim.vm = None;
                }
            }
            self.claims_changed();
        }
        self.reconcile(now)
    }

    /// Forgets a VM whose host was lost: it cannot be reached, so nothing is asked of it (the
    /// host's reaper deletes it if the host comes back). A claim it was booting for waits for
    /// another VM in its place in the queue; the agent holding it is told its claim failed.
    fn write_off(&mut self, id: &VmId, host: &str) -> Option<Intent> {
        let rec = self.vms.remove(id)?;
        self.reaper.forgot(id);
        self.counters.written_off += 1;
        let claim_of_vm = self.claims.values_mut().find(|c| c.vm.as_ref() == Some(id));
        let claim = claim_of_vm?;
        claim.vm = None;
        self.claim_index = super::claims::ClaimIndex::default();
        if rec.state == VmState::Assigned {
            let reason = format!("VM {id} was lost with host {host}");
            claim.failed = Some(reason.clone());
            return Some(Intent::VmLost {
                agent: claim.agent.clone(),
                reason,
            });
        }
        // Booting for the claim: the claim waits again, in its place.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::{HostInfo, HostState};
    use crate::machine::{ClaimRequest, ClaimState, ConfigChange};
    use crate::model::ResourceKind;

    fn host(id: &str, max_vms: u32) -> HostInfo {
        HostInfo {
            host: id.into(),
            max_vms,
            substrate: "process".into(),
            ..Default::default()
        }
    }

    fn view(version: u64, hosts: Vec<HostInfo>) -> HostView {
        HostView {
            version,
            hosts: hosts.into_iter().map(|h| (h.host.clone(), h)).collect(),
        }
    }

    fn pool_with(min_idle: u32, hosts: Vec<HostInfo>) -> (Pool, Vec<Intent>) {
        let mut pool = Pool::new("t", 7, 0);
        pool.hosts_changed(view(1, hosts), 0);
        let change = pool
            .validate_change(
                ResourceKind::Workspace,
                "web",
                &ConfigChange::Set {
                    spec: serde_json::json!({ "min_idle": min_idle }),
                    expected_generation: None,
                },
            )
            .unwrap();
        let (_, intents) = pool.commit_change(change, "ana", 0);
        (pool, intents)
    }

    fn boots_per_host(intents: &[Intent]) -> BTreeMap<String, u32> {
        let mut per = BTreeMap::new();
        for c in intents {
            if let Intent::Boot(b) = c {
                *per.entry(b.host.clone().unwrap_or_default()).or_insert(0) += 1;
            }
        }
        per
    }

    #[test]
    fn boots_spread_across_hosts_by_load() {
        let (_, intents) = pool_with(6, vec![host("a", 4), host("b", 4), host("c", 8)]);
        // Loads: a 2/4, b 2/4, c 2/8... the least-loaded host gets each boot in turn.
        let per = boots_per_host(&intents);
        assert_eq!(per.values().sum::<u32>(), 6);
        assert!(per.len() == 3, "{per:?}");
        assert!(per["c"] >= per["a"]);
    }

    #[test]
    fn capacity_is_respected_and_no_room_boots_nothing() {
        let (pool, intents) = pool_with(5, vec![host("a", 1), host("b", 2)]);
        assert_eq!(boots_per_host(&intents).values().sum::<u32>(), 3);
        assert!(pool.no_host_with_room(256));
        let mut small = host("m", 10);
        small.memory_mb = 600;
        let (_, intents) = pool_with(5, vec![small]);
        // 256 MiB each: two fit in 600.
        assert_eq!(boots_per_host(&intents).values().sum::<u32>(), 2);
    }

    #[test]
    fn without_hosts_nothing_boots_until_one_registers() {
        let (mut pool, intents) = pool_with(2, vec![]);
        assert!(intents.is_empty());
        let intents = pool.hosts_changed(view(2, vec![host("a", 4)]), 1);
        assert_eq!(boots_per_host(&intents)["a"], 2);
    }

    #[test]
    fn a_lost_host_is_written_off_and_replaced_elsewhere() {
        let (mut pool, intents) = pool_with(4, vec![host("a", 4), host("b", 4)]);
        for c in &intents {
            if let Intent::Boot(b) = c {
                pool.boot_succeeded(&b.vm, 1);
            }
        }
        // An agent holds a VM on a.
        let req = ClaimRequest {
            request: "agent/x@1".into(),
            agent: "agent/x".into(),
            developer: "ana".into(),
            workspace: "web".into(),
            ..Default::default()
        };
        pool.claim(&req, 2);
        let ClaimState::Assigned { vm, .. } = pool.claim_state(&req.request) else {
            panic!("not assigned");
        };
        let held_host = pool.vms[&vm].host.clone().unwrap();
        let mut lost = view(3, vec![host("a", 4), host("b", 4)]);
        lost.hosts.get_mut(&held_host).unwrap().state = HostState::Lost;
        let before = pool.vms.len();
        let intents = pool.hosts_changed(lost, 3);
        let on_lost = pool
            .vms
            .values()
            .filter(|v| v.host.as_deref() == Some(held_host.as_str()))
            .count();
        assert_eq!(on_lost, 0);
        assert!(pool.counters.written_off >= 1);
        assert!(pool.vms.len() < before + boots_per_host(&intents).values().sum::<u32>() as usize);
        assert!(!boots_per_host(&intents).contains_key(&held_host));
        assert!(intents.contains(&Intent::VmLost {
            agent: "agent/x".into(),
            reason: format!("VM {vm} was lost with host {held_host}"),
        }));
        assert_eq!(
            pool.claim_state(&req.request),
            ClaimState::Failed {
                reason: format!("VM {vm} was lost with host {held_host}")
            }
        );
        // A late boot result from the lost host is left to that host's reaper while the host
        // is lost, and deleted there once it is back; never adopted as warm.
        let ghost = VmId::from_bits(0xdead);
        pool.boot_ended_on(&ghost, Some(&held_host), Ok(()), 4);
        assert!(!pool.vms.contains_key(&ghost));
        pool.hosts_changed(view(4, vec![host("a", 4), host("b", 4)]), 5);
        let intents = pool.boot_ended_on(&ghost, Some(&held_host), Ok(()), 6);
        assert!(intents.contains(&Intent::Delete {
            vm: ghost.clone(),
            reason: DeleteReason::Orphan
        }));
        assert_eq!(pool.vms[&ghost].host.as_deref(), Some(held_host.as_str()));
    }

    #[test]
    fn a_host_that_does_not_pick_up_a_boot_gets_none_until_the_next_view() {
        let (mut pool, intents) = pool_with(1, vec![host("a", 4), host("b", 4)]);
        let Some(Intent::Boot(first)) = intents.into_iter().find(|c| matches!(c, Intent::Boot(_)))
        else {
            panic!("no boot");
        };
        let slow = first.host.clone().unwrap();
        let intents = pool.boot_not_started(&first.vm, 1);
        let per = boots_per_host(&intents);
        assert_eq!(per.get(&slow), None, "placed on {slow} again: {per:?}");
        assert_eq!(per.values().sum::<u32>(), 1);
        assert!(pool.counters.boot_failures == 0, "not an image failure");
        pool.hosts_changed(view(2, vec![host("a", 4), host("b", 4)]), 2);
        assert!(pool.unreachable_hosts.is_empty());
    }

    #[test]
    fn draining_deletes_warm_vms_and_places_elsewhere() {
        let (mut pool, intents) = pool_with(2, vec![host("a", 4), host("b", 4)]);
        for c in &intents {
            if let Intent::Boot(b) = c {
                pool.boot_succeeded(&b.vm, 1);
            }
        }
        let mut drained = view(2, vec![host("a", 4), host("b", 4)]);
        drained.hosts.get_mut("a").unwrap().draining = true;
        let intents = pool.hosts_changed(drained, 2);
        assert!(intents.iter().any(|c| matches!(
            c,
            Intent::Delete {
                reason: DeleteReason::Drained,
                ..
            }
        )));
        assert_eq!(boots_per_host(&intents).get("a"), None);
        assert_eq!(boots_per_host(&intents)["b"], 1);
        // An older view changes nothing.
        assert!(pool.hosts_changed(view(1, vec![]), 3).is_empty());
    }
}
