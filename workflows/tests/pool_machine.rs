//! Property tests of the pure pool state machine over random event sequences: boots that
//! succeed or fail (sometimes leaving a VM behind), deletes, flushes, config edits, time
//! passing and crashes (a new run re-issuing in-flight work). A model substrate records what
//! really exists, so "no VM lost" is checked against it, not against the pool's own count.
//! Agents claim and release VMs, and nukes wipe everything, between any of those events.
//! The world also misbehaves: deletes that report success and leave the VM behind (ghosts),
//! warm VMs that die, agents that end without releasing; reaper scans, taken at one moment
//! and applied later (as the activity does), must clean all of it up without ever deleting
//! a VM the pool is using. With placement on, VMs live on three hosts that can be lost (their
//! VMs unreachable until they come back), come back, and be drained.

use std::collections::{BTreeMap, BTreeSet};

use murmur_workflows::hosts::{HostInfo, HostState, HostView};
use murmur_workflows::machine::{
    ClaimRequest, ClaimState, Command, ConfigChange, Pool, ReapScan, ScannedVm,
};
use murmur_workflows::model::{ResourceKind, VmId, VmState};
use proptest::prelude::*;

const WORKSPACES: [&str; 2] = ["web", "api"];
const IMAGES: [&str; 3] = ["default", "img-2", "img-3"];
/// The reaper's grace period in the model.
const GRACE_MS: u64 = 60_000;
/// The hosts of the placement model, each with room for [`HOST_MAX_VMS`] VMs.
const HOSTS: [&str; 3] = ["a", "b", "c"];
const HOST_MAX_VMS: u32 = 3;

#[derive(Clone, Debug)]
enum Step {
    /// Finish the n-th in-flight command (modulo their number). `leak`: a failed boot left
    /// its VM behind, or a successful delete did not really delete (a ghost).
    Finish {
        pick: usize,
        ok: bool,
        leak: bool,
    },
    Flush,
    SetMinIdle {
        ws: usize,
        n: u32,
    },
    SetMaxVms(u32),
    SetImage {
        ws: usize,
        image: usize,
    },
    Advance(u64),
    /// An agent claims a VM of a workspace.
    Claim {
        ws: usize,
    },
    /// The n-th live agent ends (modulo their number).
    Release {
        pick: usize,
    },
    /// A nuke: pause, let boots finish, delete everything in the substrate, reset.
    Nuke,
    /// The n-th live agent's workflow ends without releasing (terminated from outside).
    AgentDies {
        pick: usize,
    },
    /// The n-th warm VM dies in the substrate.
    VmDies {
        pick: usize,
    },
    /// A reaper scan lists the substrate now...
    ScanStart,
    /// ...and its result reaches the pool later.
    ScanFinish,
    /// The workflow run ends (continue-as-new or crash before results arrive): in-flight
    /// activity results are lost, the state is carried over through serde, work is re-issued.
    Restart,
    /// The n-th host stops (its lease fails): its VMs become unreachable.
    HostLost {
        pick: usize,
    },
    /// The n-th host, if lost, registers again.
    HostBack {
        pick: usize,
    },
    /// The n-th host's drain starts (`on`) or ends.
    Drain {
        pick: usize,
        on: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<usize>(), prop::bool::weighted(0.8), any::<bool>())
            .prop_map(|(pick, ok, leak)| Step::Finish { pick, ok, leak }),
        1 => Just(Step::Flush),
        1 => (0..2usize, 0..6u32).prop_map(|(ws, n)| Step::SetMinIdle { ws, n }),
        1 => (1..9u32).prop_map(Step::SetMaxVms),
        1 => (0..2usize, 0..3usize).prop_map(|(ws, image)| Step::SetImage { ws, image }),
        1 => (0..120_000u64).prop_map(Step::Advance),
        1 => Just(Step::Restart),
        3 => (0..2usize).prop_map(|ws| Step::Claim { ws }),
        2 => any::<usize>().prop_map(|pick| Step::Release { pick }),
        1 => Just(Step::Nuke),
        1 => any::<usize>().prop_map(|pick| Step::AgentDies { pick }),
        1 => any::<usize>().prop_map(|pick| Step::VmDies { pick }),
        2 => Just(Step::ScanStart),
        2 => Just(Step::ScanFinish),
        1 => any::<usize>().prop_map(|pick| Step::HostLost { pick }),
        1 => any::<usize>().prop_map(|pick| Step::HostBack { pick }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, on)| Step::Drain { pick, on }),
    ]
}

struct World {
    pool: Pool,
    now: u64,
    in_flight: Vec<Command>,
    /// What the substrate really holds.
    substrate: BTreeSet<VmId>,
    /// Every VM a boot was ever asked for (re-issued boots are not new VMs).
    booted: BTreeSet<VmId>,
    /// Request ids of agents that claimed and have not released.
    agents: Vec<String>,
    /// The VM each agent was handed, once it was.
    handed: std::collections::BTreeMap<String, VmId>,
    /// VMs cold-booted for a claim, and the image the claim's workspace wanted when it was made.
    booted_for: std::collections::BTreeMap<VmId, (String, String)>,
    next_agent: u64,
    /// VMs in the substrate the pool rightly forgot (ghost deletes): only a reaper finds them.
    strays: BTreeSet<VmId>,
    /// Agents that ended without releasing their claim.
    dead_agents: Vec<String>,
    /// VMs that died in the substrate while the pool thought them warm.
    vanished: BTreeSet<VmId>,
    /// A scan taken and not yet applied, with the warm VMs it judges.
    scan: Option<(ReapScan, BTreeSet<VmId>)>,
    /// Running hold-back timers: (deadline, image, seq).
    timers: Vec<(u64, String, u64)>,
    /// Placement on: the registry's view as the model keeps it (host steps do nothing
    /// otherwise).
    placement: bool,
    view: HostView,
    /// The host each VM was booted on.
    vm_host: BTreeMap<VmId, String>,
    /// Agents told their VM was lost: they end and release.
    lost_agents: Vec<String>,
}

impl World {
    fn new() -> Self {
        Self::with_placement(false)
    }

    fn with_placement(placement: bool) -> Self {
        let mut w = Self {
            pool: Pool::new("acme", 42, 1_000),
            now: 1_000,
            in_flight: Vec::new(),
            substrate: BTreeSet::new(),
            booted: BTreeSet::new(),
            agents: Vec::new(),
            handed: Default::default(),
            booted_for: Default::default(),
            next_agent: 0,
            strays: BTreeSet::new(),
            dead_agents: Vec::new(),
            vanished: BTreeSet::new(),
            scan: None,
            timers: Vec::new(),
            placement,
            view: HostView {
                version: 1,
                hosts: HOSTS
                    .iter()
                    .map(|h| {
                        (
                            h.to_string(),
                            HostInfo {
                                host: h.to_string(),
                                max_vms: HOST_MAX_VMS,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            },
            vm_host: BTreeMap::new(),
            lost_agents: Vec::new(),
        };
        if placement {
            w.pool.placement = true;
            let cmds = w.pool.hosts_changed(w.view.clone(), w.now);
            w.absorb(cmds);
        }
        for ws in WORKSPACES {
            w.change(
                ResourceKind::Workspace,
                ws,
                vec![("min_idle", "2".into())],
                true,
            );
        }
        w
    }

    fn change(&mut self, kind: ResourceKind, name: &str, set: Vec<(&str, String)>, create: bool) {
        let change = if create {
            let mut spec = serde_json::Map::new();
            for (k, v) in &set {
                spec.insert((*k).into(), serde_json::from_str(v).unwrap());
            }
            ConfigChange::Set {
                spec: serde_json::Value::Object(spec),
                expected_generation: None,
            }
        } else {
            ConfigChange::Patch {
                set: set.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            }
        };
        let valid = self
            .pool
            .validate_change(kind, name, &change)
            .expect("valid change");
        let (_, cmds) = self.pool.commit_change(valid, "prop", self.now);
        self.absorb(cmds);
    }

    fn absorb(&mut self, cmds: Vec<Command>) {
        let new_boots: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Boot(spec) if !self.booted.contains(&spec.vm) => Some(spec.clone()),
                _ => None,
            })
            .collect();
        if !new_boots.is_empty() {
            assert!(
                self.pool.in_use() <= self.pool.config.spec.max_vms,
                "booted over max_vms: {} in use, max {}",
                self.pool.in_use(),
                self.pool.config.spec.max_vms
            );
        }
        for spec in new_boots {
            let rec = &self.pool.vms[&spec.vm];
            assert_eq!(rec.state, VmState::Booting);
            assert_eq!(
                rec.image,
                self.pool.workspaces[&spec.workspace].spec.image_ref
            );
            if let Some(request) = &rec.claim {
                self.booted_for
                    .insert(spec.vm.clone(), (request.clone(), rec.image.clone()));
            }
            if self.placement {
                let host = spec.host.clone().expect("a placed boot names its host");
                assert!(
                    self.view.hosts[&host].placeable(),
                    "placed on {host}, which is lost or draining"
                );
                let on_host = self
                    .pool
                    .vms
                    .values()
                    .filter(|v| v.host.as_deref() == Some(host.as_str()))
                    .count() as u32;
                assert!(on_host <= HOST_MAX_VMS, "{on_host} VMs on {host}");
                self.vm_host.insert(spec.vm.clone(), host);
            } else {
                assert_eq!(spec.host, None);
            }
            self.booted.insert(spec.vm);
        }
        for cmd in cmds {
            match cmd {
                Command::HoldBack {
                    image,
                    seq,
                    wait_ms,
                } => self.timers.push((self.now + wait_ms, image, seq)),
                Command::VmLost { agent, reason } => {
                    assert!(reason.contains("was lost with host"), "{reason}");
                    let request = format!("{agent}@run");
                    if self.agents.contains(&request) {
                        self.lost_agents.push(request);
                    } else {
                        // Ended already without releasing: the reaper releases its claim.
                        assert!(self.dead_agents.contains(&request), "{agent} told, unknown");
                    }
                }
                cmd => self.in_flight.push(cmd),
            }
        }
    }

    /// True when `vm` lives on a host that is lost now.
    fn unreachable(&self, vm: &VmId) -> bool {
        self.vm_host.get(vm).is_some_and(|h| self.view.is_lost(h))
    }

    /// Hosts of the view that are live.
    fn live_hosts(&self) -> Vec<String> {
        self.view.live()
    }

    /// Changes one host in the model's view and tells the pool.
    fn change_host(&mut self, pick: usize, change: impl FnOnce(&mut HostInfo) -> bool) {
        if !self.placement {
            return;
        }
        let host = HOSTS[pick % HOSTS.len()];
        let Some(info) = self.view.hosts.get_mut(host) else {
            return;
        };
        if !change(info) {
            return;
        }
        self.view.version += 1;
        let cmds = self.pool.hosts_changed(self.view.clone(), self.now);
        self.absorb(cmds);
    }

    fn apply(&mut self, s: &Step) {
        match s {
            Step::Finish { pick, ok, leak } => {
                if self.in_flight.is_empty() {
                    return;
                }
                let cmd = self.in_flight.remove(pick % self.in_flight.len());
                let cmds = match cmd {
                    // Work sent to a lost host: never picked up, or cut short by its death.
                    Command::Boot(spec) if self.unreachable(&spec.vm) => {
                        if *leak {
                            self.substrate.insert(spec.vm.clone());
                            self.pool.boot_ended_on(
                                &spec.vm,
                                spec.host.as_deref(),
                                Err("host died"),
                                self.now,
                            )
                        } else {
                            self.pool.boot_not_started(&spec.vm, self.now)
                        }
                    }
                    Command::Delete { vm, .. } if self.unreachable(&vm) => {
                        self.pool.delete_failed(&vm)
                    }
                    Command::Boot(spec) if self.placement => {
                        let result = if *ok {
                            self.substrate.insert(spec.vm.clone());
                            Ok(())
                        } else {
                            if *leak {
                                self.substrate.insert(spec.vm.clone());
                            }
                            Err("boom")
                        };
                        self.pool
                            .boot_ended_on(&spec.vm, spec.host.as_deref(), result, self.now)
                    }
                    Command::Boot(spec) => {
                        if *ok {
                            self.substrate.insert(spec.vm.clone());
                            self.pool.boot_succeeded(&spec.vm, self.now)
                        } else {
                            if *leak {
                                // Created, but the call reported failure.
                                self.substrate.insert(spec.vm.clone());
                            }
                            self.pool.boot_failed(&spec.vm, "boom", self.now)
                        }
                    }
                    Command::Delete { vm, .. } => {
                        if *ok {
                            if *leak && self.substrate.contains(&vm) {
                                // Reported deleted, still there.
                                self.strays.insert(vm.clone());
                            } else {
                                self.substrate.remove(&vm);
                                self.strays.remove(&vm);
                            }
                            self.vanished.remove(&vm);
                            self.pool.deleted(&vm, self.now)
                        } else {
                            self.pool.delete_failed(&vm)
                        }
                    }
                    Command::Notify { .. } | Command::HoldBack { .. } | Command::VmLost { .. } => {
                        Vec::new()
                    }
                };
                self.absorb(cmds);
            }
            Step::Flush => {
                let warm_before: BTreeSet<VmId> = self
                    .pool
                    .vms
                    .values()
                    .filter(|v| v.state == VmState::Warm)
                    .map(|v| v.id.clone())
                    .collect();
                let assigned_before = self.count(VmState::Assigned);
                let (flushed, cmds) = self.pool.flush(self.now);
                assert_eq!(
                    flushed.iter().cloned().collect::<BTreeSet<_>>(),
                    warm_before
                );
                assert_eq!(self.count(VmState::Assigned), assigned_before);
                self.absorb(cmds);
            }
            Step::SetMinIdle { ws, n } => self.change(
                ResourceKind::Workspace,
                WORKSPACES[*ws],
                vec![("min_idle", n.to_string())],
                false,
            ),
            Step::SetMaxVms(n) => self.change(
                ResourceKind::PoolConfig,
                "default",
                vec![("max_vms", n.to_string())],
                false,
            ),
            Step::SetImage { ws, image } => self.change(
                ResourceKind::Workspace,
                WORKSPACES[*ws],
                vec![("image_ref", IMAGES[*image].to_string())],
                false,
            ),
            Step::Advance(ms) => {
                self.now += ms;
                let now = self.now;
                let (due, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.timers)
                    .into_iter()
                    .partition(|t| t.0 <= now);
                self.timers = running;
                for (_, image, seq) in due {
                    let cmds = self.pool.hold_back_over(&image, seq, now);
                    self.absorb(cmds);
                }
                let cmds = self.pool.reconcile(self.now);
                self.absorb(cmds);
            }
            Step::Claim { ws } => {
                self.next_agent += 1;
                let req = ClaimRequest {
                    request: format!("agent-{}@run", self.next_agent),
                    agent: format!("agent-{}", self.next_agent),
                    developer: "dev".into(),
                    workspace: WORKSPACES[*ws].into(),
                    wait: false,
                    ..Default::default()
                };
                if self.pool.validate_claim(&req).is_ok() {
                    let cmds = self.pool.claim(&req, self.now);
                    // A retried claim is the same claim.
                    assert!(self.pool.validate_claim(&req).is_ok());
                    assert!(self.pool.claim(&req, self.now).is_empty());
                    self.agents.push(req.request);
                    self.absorb(cmds);
                } else {
                    assert!(self.pool.paused, "claim refused while not paused");
                }
            }
            Step::Release { pick } => {
                if self.agents.is_empty() {
                    return;
                }
                let request = self.agents.remove(pick % self.agents.len());
                let held = self.handed.remove(&request);
                let (deleting, cmds) = self.pool.release(&request, self.now);
                assert_eq!(deleting, held, "release deletes exactly the VM handed out");
                if let Some(vm) = &held {
                    assert_eq!(self.pool.vms[vm].state, VmState::Deleting);
                }
                assert_eq!(self.pool.claim_state(&request), ClaimState::Unknown);
                self.absorb(cmds);
            }
            Step::Nuke => {
                self.pool.pause(self.now);
                assert!(self.pool.reconcile(self.now).is_empty(), "paused pool acts");
                // The pause answers once nothing boots.
                while let Some(i) = self
                    .in_flight
                    .iter()
                    .position(|c| matches!(c, Command::Boot(_)))
                {
                    self.apply(&Step::Finish {
                        pick: i,
                        ok: true,
                        leak: false,
                    });
                }
                assert!(self.pool.pause(self.now));
                // The nuke reaches every live host; a lost host keeps its VMs.
                let before = self.substrate.len();
                let substrate = std::mem::take(&mut self.substrate);
                self.substrate = substrate
                    .into_iter()
                    .filter(|vm| self.unreachable(vm))
                    .collect();
                let deleted = (before - self.substrate.len()) as u64;
                self.agents.clear();
                self.handed.clear();
                self.strays.clear();
                self.dead_agents.clear();
                self.vanished.clear();
                let cmds = self.pool.reset_after_nuke(deleted, self.now);
                self.absorb(cmds);
            }
            Step::AgentDies { pick } => {
                if self.agents.is_empty() {
                    return;
                }
                let request = self.agents.remove(pick % self.agents.len());
                self.handed.remove(&request);
                self.dead_agents.push(request);
            }
            Step::VmDies { pick } => {
                let warm: Vec<VmId> = self
                    .pool
                    .vms
                    .values()
                    .filter(|v| v.state == VmState::Warm && self.substrate.contains(&v.id))
                    .map(|v| v.id.clone())
                    .collect();
                if warm.is_empty() {
                    return;
                }
                let vm = warm[pick % warm.len()].clone();
                self.substrate.remove(&vm);
                self.vanished.insert(vm);
            }
            Step::ScanStart => {
                if self.scan.is_some() {
                    return;
                }
                // Only live hosts answer the listing.
                let scan = ReapScan {
                    vms: self
                        .substrate
                        .iter()
                        .filter(|id| !self.unreachable(id))
                        .map(|id| ScannedVm {
                            id: id.clone(),
                            alive: true,
                            host: self.vm_host.get(id).cloned(),
                        })
                        .collect(),
                    finished_agents: self.dead_agents.clone(),
                    grace_ms: GRACE_MS,
                    interval_ms: GRACE_MS,
                    hosts: self.placement.then(|| self.live_hosts()),
                    ..ReapScan::default()
                };
                self.scan = Some((scan, self.pool.reap_baseline()));
            }
            Step::ScanFinish => {
                let Some((scan, baseline)) = self.scan.take() else {
                    return;
                };
                let in_use: BTreeSet<VmId> = self
                    .pool
                    .vms
                    .values()
                    .filter(|v| {
                        v.state == VmState::Assigned
                            && !self.vanished.contains(&v.id)
                            && self.handed.values().any(|h| h == &v.id)
                    })
                    .map(|v| v.id.clone())
                    .collect();
                let cmds = self.pool.reap(&scan, &baseline, self.now);
                for c in &cmds {
                    if let Command::Delete { vm, .. } = c {
                        assert!(!in_use.contains(vm), "the reaper deleted {vm}, in use");
                    }
                }
                let claims = &self.pool.claims;
                self.dead_agents.retain(|r| claims.contains_key(r));
                self.absorb(cmds);
            }
            Step::Restart => {
                // Results of in-flight boots may have happened in the substrate already.
                for c in &self.in_flight {
                    if let Command::Boot(spec) = c {
                        self.substrate.insert(spec.vm.clone());
                        if !self.pool.vms.contains_key(&spec.vm) {
                            // Written off with its host meanwhile: only a reaper finds it.
                            self.strays.insert(spec.vm.clone());
                        }
                    }
                }
                self.in_flight.clear();
                self.timers.clear();
                self.scan = None;
                let json = serde_json::to_string(&self.pool).unwrap();
                self.pool = serde_json::from_str(&json).unwrap();
                let cmds = self.pool.resume(self.now);
                self.absorb(cmds);
            }
            Step::HostLost { pick } => {
                self.change_host(*pick, |h| {
                    let live = h.state == HostState::Live;
                    h.state = HostState::Lost;
                    live
                });
                let host = HOSTS[pick % HOSTS.len()];
                if self.placement {
                    assert!(
                        self.pool
                            .vms
                            .values()
                            .all(|v| v.host.as_deref() != Some(host)),
                        "VMs of lost host {host} still in the inventory"
                    );
                }
            }
            Step::HostBack { pick } => {
                let host = HOSTS[pick % HOSTS.len()];
                if self.placement && self.view.is_lost(host) {
                    // What it still holds and the pool wrote off: only its reaper finds it.
                    for vm in &self.substrate {
                        if self.vm_host.get(vm).map(String::as_str) == Some(host)
                            && !self.pool.vms.contains_key(vm)
                        {
                            self.strays.insert(vm.clone());
                        }
                    }
                }
                self.change_host(*pick, |h| {
                    let lost = h.state == HostState::Lost;
                    h.state = HostState::Live;
                    lost
                });
            }
            Step::Drain { pick, on } => self.change_host(*pick, |h| {
                let changed = h.draining != *on;
                h.draining = *on;
                changed
            }),
        }
        // Agents told their VM was lost end, and release their claim.
        for request in std::mem::take(&mut self.lost_agents) {
            if let Some(i) = self.agents.iter().position(|r| r == &request) {
                self.agents.remove(i);
                self.handed.remove(&request);
                let (deleting, cmds) = self.pool.release(&request, self.now);
                assert_eq!(deleting, None, "a lost VM is deleted again");
                self.absorb(cmds);
            }
        }
        self.check();
    }

    fn count(&self, state: VmState) -> usize {
        self.pool.vms.values().filter(|v| v.state == state).count()
    }

    fn check(&mut self) {
        // Hand-out: every live agent's claim, and every VM given to exactly one agent.
        let mut owners: std::collections::BTreeMap<VmId, String> = Default::default();
        for request in &self.agents {
            match self.pool.claim_state(request) {
                ClaimState::Assigned { vm, .. } => {
                    let rec = &self.pool.vms[&vm];
                    assert_eq!(rec.state, VmState::Assigned);
                    if let Some(prev) = owners.insert(vm.clone(), request.clone()) {
                        panic!("{vm} handed to {prev} and {request}");
                    }
                    match self.handed.get(request) {
                        Some(before) => assert_eq!(before, &vm, "an agent's VM changed"),
                        None => {
                            // Newly handed out: booted for this claim, or warm from the
                            // workspace's current image and the pool's current generation.
                            match self.booted_for.get(&vm) {
                                Some((r, _)) if r == request => {}
                                _ => {
                                    let ws = &self.pool.workspaces[&rec.workspace];
                                    assert_eq!(rec.image, ws.spec.image_ref, "stale image");
                                    assert_eq!(rec.generation, self.pool.generation);
                                }
                            }
                            self.handed.insert(request.clone(), vm);
                        }
                    }
                }
                ClaimState::Unknown => panic!("live claim {request} forgotten"),
                ClaimState::Waiting { .. } if !self.pool.paused => {
                    let claim = &self.pool.claims[request];
                    let usable = self.pool.vms.values().any(|v| {
                        v.workspace == claim.workspace
                            && v.state == VmState::Warm
                            && self.pool.is_fresh(v)
                    });
                    assert!(!usable, "{request} waits while a fresh warm VM is idle");
                }
                _ => {}
            }
        }
        for request in &self.dead_agents {
            if let ClaimState::Assigned { vm, .. } = self.pool.claim_state(request)
                && let Some(prev) = owners.insert(vm.clone(), request.clone())
            {
                panic!("{vm} handed to {prev} and {request}");
            }
        }
        for v in self.pool.vms.values() {
            if v.state == VmState::Assigned {
                assert!(owners.contains_key(&v.id), "{} assigned to nobody", v.id);
            }
        }
        for vm in &self.substrate {
            assert!(
                self.pool.vms.contains_key(vm) || self.strays.contains(vm) || self.unreachable(vm),
                "VM {vm} exists but the pool lost it"
            );
        }
        for v in self.pool.vms.values() {
            if let Some(host) = &v.host {
                assert!(
                    !self.view.is_lost(host),
                    "{} kept on lost host {host}",
                    v.id
                );
                assert!(
                    !(v.state == VmState::Warm && self.view.is_draining(host)),
                    "{} warm on draining host {host}",
                    v.id
                );
            }
        }
        for v in self.pool.vms.values() {
            if matches!(v.state, VmState::Warm | VmState::Assigned) {
                assert!(
                    self.substrate.contains(&v.id) || self.vanished.contains(&v.id),
                    "{} is {:?} but not in the substrate",
                    v.id,
                    v.state
                );
            }
            if v.state == VmState::Warm {
                assert_eq!(v.generation, self.pool.generation, "a pre-flush VM is warm");
            }
        }
    }

    /// Lets every operation finish successfully.
    fn drain(&mut self) {
        let mut guard = 0;
        while !self.in_flight.is_empty() {
            self.apply(&Step::Finish {
                pick: 0,
                ok: true,
                leak: false,
            });
            guard += 1;
            assert!(guard < 10_000, "commands never settle");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn pool_never_loses_or_overbooks_a_vm(steps in prop::collection::vec(step(), 1..120)) {
        settles_soundly(World::new(), &steps)?;
    }

    #[test]
    fn pool_on_hosts_never_loses_or_overbooks_a_vm(
        steps in prop::collection::vec(step(), 1..120)
    ) {
        settles_soundly(World::with_placement(true), &steps)?;
    }
}

/// Runs `steps`, then lets the world settle (hosts back, back-offs over, agents gone, two
/// reaper scans a grace period apart) and checks that substrate and inventory agree.
fn settles_soundly(mut w: World, steps: &[Step]) -> Result<(), TestCaseError> {
    {
        for s in steps {
            w.apply(s);
        }
        // Lost hosts come back and drains end.
        for pick in 0..HOSTS.len() {
            w.apply(&Step::HostBack { pick });
            w.apply(&Step::Drain { pick, on: false });
        }
        // Far in the future, with every back-off over, everything settles.
        w.apply(&Step::Advance(3_600_000));
        w.drain();
        // Every agent ends; their VMs go.
        while !w.agents.is_empty() {
            w.apply(&Step::Release { pick: 0 });
        }
        w.drain();
        // The reaper finds what the pool could not know: two scans a grace period apart.
        w.apply(&Step::ScanFinish);
        for _ in 0..2 {
            w.apply(&Step::ScanStart);
            w.apply(&Step::ScanFinish);
            w.drain();
            w.now += GRACE_MS;
        }
        w.apply(&Step::ScanStart);
        w.apply(&Step::ScanFinish);
        w.drain();
        prop_assert!(w.strays.is_empty(), "strays left: {:?}", w.strays);
        prop_assert!(w.dead_agents.is_empty(), "claims of ended agents left");
        prop_assert_eq!(w.count(VmState::Assigned), 0);
        let recorded: BTreeSet<VmId> = w.pool.vms.keys().cloned().collect();
        prop_assert_eq!(
            &recorded,
            &w.substrate,
            "substrate and inventory differ once settled"
        );
        prop_assert_eq!(w.count(VmState::Booting) + w.count(VmState::Deleting), 0);
        let max = w.pool.config.spec.max_vms as usize;
        prop_assert!(w.substrate.len() <= max.max(w.count(VmState::Assigned)));
        for (name, ws) in &w.pool.workspaces {
            let fresh = w
                .pool
                .vms
                .values()
                .filter(|v| &v.workspace == name && v.state == VmState::Warm && w.pool.is_fresh(v))
                .count() as u32;
            prop_assert!(
                fresh <= ws.spec.min_idle,
                "{} has {} warm, min_idle {}",
                name,
                fresh,
                ws.spec.min_idle
            );
        }
    }
    Ok(())
}

#[test]
fn flush_discards_vms_that_were_booting_before_it() {
    let mut w = World::new();
    let booting: Vec<VmId> = w.pool.vms.keys().cloned().collect();
    assert_eq!(booting.len(), 4);
    w.apply(&Step::Flush);
    w.drain();
    for vm in &booting {
        assert!(
            !w.pool.vms.contains_key(vm),
            "{vm} booted before the flush survived it"
        );
        assert!(!w.substrate.contains(vm));
    }
    assert_eq!(w.count(VmState::Warm), 4);
}

#[test]
fn a_failing_image_stops_backfill_instead_of_churning() {
    let mut w = World::new();
    w.change(
        ResourceKind::Workspace,
        "api",
        vec![("min_idle", "0".into())],
        false,
    );
    w.drain();
    w.change(
        ResourceKind::Workspace,
        "web",
        vec![("image_ref", "\"img-2\"".into())],
        false,
    );
    let mut boots = 0;
    for _ in 0..50 {
        let Some(i) = w
            .in_flight
            .iter()
            .position(|c| matches!(c, Command::Boot(_)))
        else {
            w.drain();
            continue;
        };
        boots += 1;
        w.apply(&Step::Finish {
            pick: i,
            ok: false,
            leak: true,
        });
    }
    w.drain();
    assert!(
        boots <= 4,
        "{boots} boots of a broken image without waiting"
    );
    let status = murmur_workflows::status::PoolStatus::build(&w.pool, false, false);
    let web = status
        .workspaces
        .iter()
        .find(|ws| ws.name == "web")
        .unwrap();
    assert!(
        web.reasons.contains(&"image_failing".to_string()),
        "{:?}",
        web.reasons
    );
    assert!(w.substrate.iter().all(|vm| w.pool.vms.contains_key(vm)));
    // Held back until the hold-back's timer fires; then exactly one probe boot is tried.
    assert!(
        !w.pool
            .reconcile(w.now + murmur_workflows::machine::BACKOFF_MAX_MS)
            .iter()
            .any(|c| matches!(c, Command::Boot(_))),
        "the clock alone ended a hold-back"
    );
    // Only the latest hold-back's timer ends it.
    w.timers.sort_by_key(|t| t.2);
    let (_, image, seq) = w.timers.pop().expect("a hold-back timer runs");
    for (_, old_image, old_seq) in std::mem::take(&mut w.timers) {
        let cmds = w.pool.hold_back_over(&old_image, old_seq, w.now);
        assert!(!cmds.iter().any(|c| matches!(c, Command::Boot(_))));
    }
    let cmds = w.pool.hold_back_over(&image, seq, w.now);
    assert_eq!(
        cmds.iter()
            .filter(|c| matches!(c, Command::Boot(_)))
            .count(),
        1
    );
}

fn claim(w: &mut World, n: u32, ws: &str) -> String {
    let req = ClaimRequest {
        request: format!("agent-{n}@run"),
        agent: format!("agent-{n}"),
        developer: "dev".into(),
        workspace: ws.into(),
        wait: false,
        ..Default::default()
    };
    w.pool.validate_claim(&req).expect("claim accepted");
    let cmds = w.pool.claim(&req, w.now);
    w.absorb(cmds);
    w.agents.push(req.request.clone());
    req.request
}

#[test]
fn claims_at_max_vms_wait_in_arrival_order_and_take_no_room_from_backfill() {
    let mut w = World::new();
    w.change(
        ResourceKind::PoolConfig,
        "default",
        vec![("max_vms", "2".into())],
        false,
    );
    for ws in WORKSPACES {
        w.change(
            ResourceKind::Workspace,
            ws,
            vec![("min_idle", "0".into())],
            false,
        );
    }
    w.drain();
    let first = claim(&mut w, 1, "web");
    let second = claim(&mut w, 2, "web");
    let third = claim(&mut w, 3, "api");
    let fourth = claim(&mut w, 4, "web");
    assert!(matches!(
        w.pool.claim_state(&first),
        ClaimState::Booting { .. }
    ));
    assert!(matches!(
        w.pool.claim_state(&second),
        ClaimState::Booting { .. }
    ));
    assert_eq!(
        w.pool.claim_state(&third),
        ClaimState::Waiting { position: 1 }
    );
    assert_eq!(
        w.pool.claim_state(&fourth),
        ClaimState::Waiting { position: 2 }
    );
    // Backfill wants VMs, but waiting agents come first.
    w.change(
        ResourceKind::Workspace,
        "web",
        vec![("min_idle", "1".into())],
        false,
    );
    w.drain();
    assert_eq!(w.pool.in_use(), 2);
    // The first agent ends: its room goes to the third claim (next in line), not the fourth.
    w.apply(&Step::Release { pick: 0 });
    w.drain();
    assert!(matches!(
        w.pool.claim_state(&third),
        ClaimState::Assigned { .. }
    ));
    assert_eq!(
        w.pool.claim_state(&fourth),
        ClaimState::Waiting { position: 1 }
    );
    // The same request again is the same claim, with the same VM.
    let ClaimState::Assigned { vm, .. } = w.pool.claim_state(&second) else {
        panic!("second claim not served");
    };
    let again = ClaimRequest {
        request: second.clone(),
        agent: "agent-2".into(),
        developer: "dev".into(),
        workspace: "web".into(),
        wait: true,
        ..Default::default()
    };
    assert!(w.pool.claim(&again, w.now).is_empty());
    assert_eq!(
        w.pool.claim_state(&second),
        ClaimState::Assigned { vm, host: None }
    );
}

#[test]
fn the_developer_limit_counts_live_agents_and_a_nuke_refuses_claims() {
    let mut w = World::new();
    w.change(
        ResourceKind::PoolConfig,
        "default",
        vec![("max_agents_per_developer", "1".into())],
        false,
    );
    claim(&mut w, 1, "web");
    let next = ClaimRequest {
        request: "agent-2@run".into(),
        agent: "agent-2".into(),
        developer: "dev".into(),
        workspace: "web".into(),
        wait: false,
        ..Default::default()
    };
    let e = w.pool.validate_claim(&next).unwrap_err();
    assert_eq!(
        e.to_string(),
        "FAILED_PRECONDITION: developer dev already has 1 running agents (max_agents_per_developer is 1); kill one or wait for one to finish"
    );
    let other = ClaimRequest {
        developer: "someone-else".into(),
        ..next.clone()
    };
    assert!(w.pool.validate_claim(&other).is_ok());
    w.apply(&Step::Release { pick: 0 });
    assert!(w.pool.validate_claim(&next).is_ok());
    w.pool.pause(w.now);
    let e = w.pool.validate_claim(&next).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("FAILED_PRECONDITION: a nuke of tenant acme")
    );
}
