//! Property tests of the pure pool state machine over random event sequences, against a
//! model of the world: hosts whose substrates really hold VMs (with the labels a substrate
//! records: workspace, image, generation, owner), agents that claim, start on their VM
//! (recording themselves as its owner, first come first served), end, or die without
//! releasing, and a Temporal that delivers every activity result in any order, late.
//!
//! The world misbehaves: boots fail (sometimes leaving a VM behind), deletes report success
//! and leave the VM behind (ghosts) or fail for good (a VM stuck deleting until an operator
//! fixes it), warm VMs die, hosts are lost and come back, are drained. The pool's run ends in
//! both ways a run can end: it continues as new (its state carried through serde, in-flight
//! results lost) or it is terminated (nothing carried: the next run recovers from its record
//! and the hosts). Reaper listings are taken when they are issued and applied when they
//! finish, as the activities do.
//!
//! Checked after every step, not only once settled: no VM the substrate holds is missing from
//! the inventory (except leaks only a reaper can find, and VMs a recovery has yet to list); no
//! boot while at `max_vms`; no VM held by two agents; an agent that started on a VM keeps it;
//! a VM handed out warm is of the current image and generation; the pool never deletes a VM a
//! live agent owns; no pre-flush VM is warm. Once the world settles, substrate == inventory.
//!
//! `PROPTEST_CASES` sets the number of cases (proptest's default: 256).

use std::collections::{BTreeMap, BTreeSet};

use murmur_workflows::hosts::{HostInfo, HostState, HostView};
use murmur_workflows::machine::digest::Digests;
use murmur_workflows::machine::reaper::running_differences;
use murmur_workflows::machine::{
    AgentScan, AgentScanRequest, ClaimRequest, ClaimState, ConfigChange, HostScan, Intent, Pool,
    PoolRecord, PowerChange, PowerState, ScanSettings, ScannedVm, VmLabels,
};
use murmur_workflows::model::{ResourceKind, VmId, VmState};
use proptest::prelude::*;

const TENANT: &str = "acme";
const WORKSPACES: [&str; 2] = ["web", "api"];
const IMAGES: [&str; 3] = ["default", "img-2", "img-3"];
/// The reaper's grace period and round interval in the model.
const GRACE_MS: u64 = 60_000;
const INTERVAL_MS: u64 = 30_000;
/// The hosts; together they have room for [`ROOM`] VMs.
const HOSTS: [&str; 3] = ["a", "b", "c"];
const ROOM: u32 = 12;
/// What a sealed VM's owner record says (see `activity_api::DELETING_OWNER`).
const DELETING: &str = murmur_workflows::activity_api::DELETING_OWNER;

#[derive(Clone, Debug)]
enum Step {
    /// Finish the n-th in-flight intent (modulo their number). `leak`: a failed boot left
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
    /// Time passes; timers that are due fire.
    Advance(u64),
    /// A new agent claims a VM of a workspace.
    Claim {
        ws: usize,
    },
    /// The n-th live agent that was handed a VM starts on it (records itself as owner).
    AgentStarts {
        pick: usize,
    },
    /// The n-th live agent ends and releases its claim.
    Release {
        pick: usize,
    },
    /// The n-th live agent's workflow ends without releasing (terminated from outside).
    AgentDies {
        pick: usize,
    },
    /// The n-th warm VM dies in the substrate.
    VmDies {
        pick: usize,
    },
    /// A VM becomes impossible to delete (a read-only tree a non-root worker cannot remove).
    Undeletable {
        pick: usize,
    },
    /// A nuke, asked for with `murmur pool flush --nuke`: it pauses the pool, terminates
    /// every agent, wipes every live host, resets the pool.
    Nuke,
    /// The registry's doorbell: a reaper round now.
    Doorbell,
    /// The run continues as new: its state is carried through serde, in-flight results and
    /// timers are lost, work is re-issued.
    Restart,
    /// The run is terminated: nothing is carried; the next run recovers.
    Terminate,
    HostLost {
        pick: usize,
    },
    HostBack {
        pick: usize,
    },
    Drain {
        pick: usize,
        on: bool,
    },
    /// The n-th agent that started on its VM puts it to sleep without host memory, and tells
    /// the pool.
    AgentSleeps {
        pick: usize,
    },
    /// The n-th agent whose VM sleeps asks the pool for room to wake it (and wakes it once
    /// let in).
    AgentWakes {
        pick: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (any::<usize>(), prop::bool::weighted(0.85), any::<bool>())
            .prop_map(|(pick, ok, leak)| Step::Finish { pick, ok, leak }),
        1 => Just(Step::Flush),
        1 => (0..2usize, 0..5u32).prop_map(|(ws, n)| Step::SetMinIdle { ws, n }),
        1 => (1..10u32).prop_map(Step::SetMaxVms),
        1 => (0..2usize, 0..3usize).prop_map(|(ws, image)| Step::SetImage { ws, image }),
        2 => (0..90_000u64).prop_map(Step::Advance),
        3 => (0..2usize).prop_map(|ws| Step::Claim { ws }),
        3 => any::<usize>().prop_map(|pick| Step::AgentStarts { pick }),
        2 => any::<usize>().prop_map(|pick| Step::Release { pick }),
        1 => any::<usize>().prop_map(|pick| Step::AgentDies { pick }),
        1 => any::<usize>().prop_map(|pick| Step::VmDies { pick }),
        1 => any::<usize>().prop_map(|pick| Step::Undeletable { pick }),
        1 => Just(Step::Nuke),
        1 => Just(Step::Doorbell),
        1 => Just(Step::Restart),
        1 => Just(Step::Terminate),
        1 => any::<usize>().prop_map(|pick| Step::HostLost { pick }),
        1 => any::<usize>().prop_map(|pick| Step::HostBack { pick }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, on)| Step::Drain { pick, on }),
        2 => any::<usize>().prop_map(|pick| Step::AgentSleeps { pick }),
        2 => any::<usize>().prop_map(|pick| Step::AgentWakes { pick }),
    ]
}

/// A VM as the substrate holds it.
#[derive(Clone, Debug)]
struct ModelVm {
    host: String,
    workspace: String,
    image: String,
    generation: u64,
    owner: Option<String>,
    alive: bool,
    undeletable: bool,
    /// Asleep without holding host memory (a qemu guest saved to disk).
    dormant: bool,
}

/// A live agent.
#[derive(Clone, Debug)]
struct Agent {
    request: String,
    workspace: String,
    /// The VM the pool last said is its.
    handed: Option<VmId>,
    /// The VM it started on (it owns it in the substrate).
    started: Option<VmId>,
    /// Its VM sleeps without host memory (the agent told the pool).
    asleep: bool,
    /// It asked to wake its VM and waits for room.
    waking: bool,
}

/// An intent in flight, with what a listing saw when it was taken.
#[derive(Clone, Debug)]
enum Flight {
    Intent(Intent),
    /// A delete, with the owner the pool expected when it issued it.
    Delete {
        vm: VmId,
        expected: Option<String>,
    },
    ReadHosts(HostView),
    ListHost {
        round: u64,
        host: String,
        digests: Digests,
        listing: Option<Vec<ScannedVm>>,
    },
    ListAgents {
        round: u64,
        req: AgentScanRequest,
        running: Vec<String>,
        nuke_running: bool,
    },
}

struct World {
    pool: Pool,
    now: u64,
    seed: u64,
    in_flight: Vec<Flight>,
    /// Running timers: (deadline, the intent that set them).
    timers: Vec<(u64, Intent)>,
    substrate: BTreeMap<VmId, ModelVm>,
    /// Every VM a boot was ever asked for.
    booted: BTreeSet<VmId>,
    agents: Vec<Agent>,
    /// Requests of agents that ended without releasing.
    dead: BTreeSet<String>,
    next_agent: u64,
    /// VMs the substrate holds that the pool may rightly not know: ghost deletes, leaks of
    /// written-off hosts, and everything a terminated run knew, until a recovery or a reaper
    /// finds them.
    strays: BTreeSet<VmId>,
    /// VMs that died while the pool thought them warm.
    vanished: BTreeSet<VmId>,
    /// The record last written to the memo.
    record: Option<PoolRecord>,
    view: HostView,
    /// VMs a run handed to an agent and then ended before the agent started on them: the
    /// next run cannot know they are taken until the agent records itself as their owner.
    raced: BTreeSet<VmId>,
    /// VMs cold-booted for a claim, with its request.
    booted_for: BTreeMap<VmId, String>,
    /// The VMs the pool counted as dormant after the last step.
    dormant_before: BTreeSet<VmId>,
}

fn settings() -> ScanSettings {
    ScanSettings {
        grace_ms: GRACE_MS,
        interval_ms: INTERVAL_MS,
        roll_over_events: 0,
    }
}

impl World {
    fn new(hosts: usize) -> Self {
        let mut w = Self {
            pool: Pool::new(TENANT, 42, 1_000),
            now: 1_000,
            seed: 42,
            in_flight: Vec::new(),
            timers: Vec::new(),
            substrate: BTreeMap::new(),
            booted: BTreeSet::new(),
            agents: Vec::new(),
            dead: BTreeSet::new(),
            next_agent: 0,
            strays: BTreeSet::new(),
            vanished: BTreeSet::new(),
            record: None,
            raced: BTreeSet::new(),
            booted_for: BTreeMap::new(),
            dormant_before: BTreeSet::new(),
            view: HostView {
                version: 1,
                hosts: HOSTS[..hosts]
                    .iter()
                    .map(|h| {
                        (
                            h.to_string(),
                            HostInfo {
                                host: h.to_string(),
                                max_vms: ROOM / hosts as u32,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            },
        };
        let intents = w.pool.hosts_changed(w.view.clone(), w.now);
        w.absorb(intents);
        // The run starts (a reaper round at once).
        let intents = w.pool.resume(w.now);
        w.absorb(intents);
        for ws in WORKSPACES {
            w.change(
                ResourceKind::Workspace,
                ws,
                vec![("min_idle", "2".into())],
                true,
            );
        }
        w.record = Some(w.pool.record());
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
        if !self.pool.config_known() {
            // The shell's handler waits for the config to be read back.
            return;
        }
        let valid = self
            .pool
            .validate_change(kind, name, &change)
            .expect("valid change");
        let (_, intents) = self.pool.commit_change(valid, "prop", self.now);
        self.absorb(intents);
    }

    fn live_requests(&self) -> BTreeSet<String> {
        self.agents.iter().map(|a| a.request.clone()).collect()
    }

    fn unreachable(&self, vm: &VmId) -> bool {
        self.substrate
            .get(vm)
            .is_some_and(|v| self.view.is_lost(&v.host))
    }

    /// Takes the intents the machine returned: checks boots, starts the rest.
    fn absorb(&mut self, intents: Vec<Intent>) {
        for intent in intents {
            match intent {
                Intent::Boot(spec) => {
                    if !self.booted.contains(&spec.vm) {
                        assert!(
                            self.pool.in_use() <= self.pool.config.spec.max_vms,
                            "booted over max_vms: {} in use, max {}",
                            self.pool.in_use(),
                            self.pool.config.spec.max_vms
                        );
                        assert!(self.pool.recovery.is_none(), "a new boot while recovering");
                        let rec = &self.pool.vms[&spec.vm];
                        assert_eq!(rec.state, VmState::Booting);
                        assert_eq!(
                            rec.image,
                            self.pool.workspaces[&spec.workspace].spec.image_ref
                        );
                        let host = spec.host.clone().expect("a boot names its host");
                        assert!(
                            self.view.hosts[&host].placeable(),
                            "placed on {host}, lost or draining"
                        );
                        let on_host = self
                            .pool
                            .vms
                            .values()
                            .filter(|v| v.host.as_deref() == Some(host.as_str()))
                            .count() as u32;
                        let room = self.view.hosts[&host].max_vms;
                        assert!(on_host <= room, "{on_host} VMs on {host}, room for {room}");
                        if let Some(request) = &rec.claim {
                            self.booted_for.insert(spec.vm.clone(), request.clone());
                        }
                        self.booted.insert(spec.vm.clone());
                    }
                    self.in_flight.push(Flight::Intent(Intent::Boot(spec)));
                }
                Intent::Delete { vm, .. } => {
                    let expected = self.pool.expected_owner(&vm);
                    // The pool never asks to delete a VM a live agent owns, unless it cannot
                    // know: the VM was handed out by a run that ended before its agent
                    // started on it (then the substrate refuses, and the VM goes to its owner).
                    if let Some(owner) = self.substrate.get(&vm).and_then(|v| v.owner.clone())
                        && self.live_requests().contains(&owner)
                        && expected.as_deref() != Some(owner.as_str())
                    {
                        assert!(
                            self.raced.contains(&vm),
                            "the pool asked to delete {vm}, owned by live agent {owner} (it expected {expected:?})"
                        );
                    }
                    self.in_flight.push(Flight::Delete { vm, expected });
                }
                Intent::ReadHosts => self.in_flight.push(Flight::ReadHosts(self.view.clone())),
                Intent::ListHost {
                    round,
                    host,
                    digests,
                } => {
                    let listing = (!self.view.is_lost(&host)).then(|| {
                        self.substrate
                            .iter()
                            .filter(|(_, v)| v.host == host)
                            .map(|(id, v)| ScannedVm {
                                id: id.clone(),
                                alive: v.alive,
                                labels: Some(VmLabels {
                                    workspace: v.workspace.clone(),
                                    image: v.image.clone(),
                                    generation: v.generation,
                                    owner: v.owner.clone(),
                                    owner_running: v.owner.as_ref().is_some_and(|o| {
                                        self.agents.iter().any(|a| &a.request == o)
                                    }),
                                }),
                            })
                            .collect()
                    });
                    self.in_flight.push(Flight::ListHost {
                        round,
                        host,
                        digests,
                        listing,
                    });
                }
                Intent::ListAgents { round, request } => {
                    let running = self.live_requests().into_iter().collect();
                    self.in_flight.push(Flight::ListAgents {
                        round,
                        req: request,
                        running,
                        nuke_running: false,
                    });
                }
                Intent::HoldBack { wait_ms, .. }
                | Intent::RetryDelete { wait_ms, .. }
                | Intent::NukeRetry { wait_ms }
                | Intent::NextScan { wait_ms, .. } => {
                    self.timers.push((self.now + wait_ms, intent));
                }
                Intent::VmLost { agent, reason } => {
                    assert!(reason.contains("was lost with host"), "{reason}");
                    // The agent ends and releases its claim (its VM is gone with the host).
                    if let Some(i) = self
                        .agents
                        .iter()
                        .position(|a| a.request.starts_with(&format!("{agent}@")))
                    {
                        let a = self.agents.remove(i);
                        let (deleting, intents) = self.pool.release(&a.request, self.now);
                        assert_eq!(deleting, None, "a lost VM is deleted again");
                        self.absorb(intents);
                    }
                }
                Intent::Notify { .. } => {}
                intent @ (Intent::StartNuke { .. } | Intent::ReadRecord) => {
                    self.in_flight.push(Flight::Intent(intent));
                }
            }
        }
    }

    fn finish(&mut self, pick: usize, ok: bool, leak: bool) {
        if self.in_flight.is_empty() {
            return;
        }
        let flight = self.in_flight.remove(pick % self.in_flight.len());
        let now = self.now;
        let intents = match flight {
            Flight::Intent(Intent::Boot(spec)) => {
                let host = spec.host.clone().unwrap_or_default();
                // A VM a failed boot leaves behind is often dead (its process exited).
                let create = |w: &mut World, alive: bool| {
                    w.substrate.entry(spec.vm.clone()).or_insert(ModelVm {
                        host: host.clone(),
                        workspace: spec.workspace.clone(),
                        image: spec.image.clone(),
                        generation: spec.generation,
                        owner: None,
                        alive,
                        undeletable: false,
                        dormant: false,
                    });
                };
                if self.view.is_lost(&host) {
                    if leak {
                        create(self, true);
                        self.pool
                            .boot_ended_on(&spec.vm, Some(&host), Err("host died"), now)
                    } else {
                        self.pool.boot_not_started(&spec.vm, now)
                    }
                } else if ok {
                    create(self, true);
                    self.pool.boot_ended_on(&spec.vm, Some(&host), Ok(()), now)
                } else {
                    if leak {
                        create(self, spec.vm.0.as_bytes()[7] % 2 == 0);
                    }
                    self.pool
                        .boot_ended_on(&spec.vm, Some(&host), Err("boom"), now)
                }
            }
            Flight::Delete { vm, expected } => {
                match self.substrate.get_mut(&vm) {
                    Some(v) if self.view.is_lost(&v.host) => {
                        self.pool.delete_failed(&vm, "host unreachable")
                    }
                    Some(v) => {
                        // The substrate seals the VM unless another agent owns it.
                        let refused = v
                            .owner
                            .clone()
                            .filter(|o| o != DELETING && Some(o.as_str()) != expected.as_deref());
                        if let Some(owner) = refused {
                            self.pool.delete_refused(&vm, &owner, now)
                        } else {
                            v.owner = Some(DELETING.into());
                            if v.undeletable || !ok {
                                self.pool.delete_failed(&vm, "cannot remove")
                            } else if leak {
                                // Reported deleted, still there.
                                self.strays.insert(vm.clone());
                                self.pool.deleted(&vm, now)
                            } else {
                                self.substrate.remove(&vm);
                                self.strays.remove(&vm);
                                self.vanished.remove(&vm);
                                self.pool.deleted(&vm, now)
                            }
                        }
                    }
                    None => {
                        self.vanished.remove(&vm);
                        self.pool.deleted(&vm, now)
                    }
                }
            }
            Flight::Intent(Intent::StartNuke { .. }) => self.pool.nuke_started(ok),
            Flight::Intent(Intent::ReadRecord) => {
                let record = self.record.clone();
                self.pool.record_read(record, "memo", now)
            }
            Flight::Intent(other) => panic!("not an activity: {other:?}"),
            Flight::ReadHosts(view) => self.pool.hosts_read(ok.then_some(view), now),
            Flight::ListHost {
                round,
                host,
                digests,
                listing,
            } => {
                let scan = match listing {
                    Some(listing) if ok => Ok(HostScan::answer(&digests, listing, settings())),
                    _ => Err("host did not answer".into()),
                };
                self.pool.host_listed(round, &host, scan, now)
            }
            Flight::ListAgents {
                round,
                req,
                running,
                nuke_running,
            } => {
                let scan = ok.then(|| AgentScan {
                    running: running_differences(&req.claims, running),
                    nuke_running: req.check_nuke.then_some(nuke_running),
                    settings: settings(),
                    ..AgentScan::default()
                });
                self.pool.agents_listed(
                    round,
                    scan.ok_or_else(|| "no answer".to_string()),
                    now,
                    true,
                )
            }
        };
        self.absorb(intents);
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        let (due, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.timers)
            .into_iter()
            .partition(|t| t.0 <= now);
        self.timers = running;
        for (_, timer) in due {
            let intents = match timer {
                Intent::HoldBack { image, seq, .. } => self.pool.hold_back_over(&image, seq, now),
                Intent::RetryDelete { vm, attempt, .. } => self.pool.delete_retry_due(&vm, attempt),
                Intent::NukeRetry { .. } => self.pool.nuke_retry_due(),
                Intent::NextScan { round, .. } => self.pool.scan_due(round),
                other => panic!("not a timer: {other:?}"),
            };
            self.absorb(intents);
        }
        let intents = self.pool.reconcile(now);
        self.absorb(intents);
    }

    /// What agents do on their own between steps: look at their claim; one the pool lost
    /// (its run ended) is claimed again; a VM handed out is noted.
    fn agents_look(&mut self) {
        let now = self.now;
        for i in 0..self.agents.len() {
            if self.agents[i].waking {
                self.try_to_wake(i);
            }
            let request = self.agents[i].request.clone();
            match self.pool.claim_state(&request) {
                ClaimState::Assigned { vm, .. } => {
                    if let Some(started) = &self.agents[i].started {
                        assert_eq!(
                            started, &vm,
                            "{request} started on {started}, now holds {vm}"
                        );
                    }
                    if self.agents[i].handed.is_none() {
                        // A new hand-out: booted for this claim, or warm from the workspace's
                        // current image and the pool's current generation.
                        if self.booted_for.get(&vm) != Some(&request) {
                            let rec = &self.pool.vms[&vm];
                            let ws = &self.pool.workspaces[&rec.workspace];
                            assert_eq!(
                                rec.image, ws.spec.image_ref,
                                "{vm} of a stale image handed out"
                            );
                            assert_eq!(
                                rec.generation, self.pool.generation,
                                "{vm} of an old generation handed out"
                            );
                        }
                        self.agents[i].handed = Some(vm);
                    }
                }
                // The pool lost the claim (its run ended): an agent that was never handed a
                // VM claims again; one that was handed a VM goes on to start on it.
                ClaimState::Unknown
                    if self.pool.config_known() && self.agents[i].handed.is_none() =>
                {
                    let req = self.claim_request(&request, &self.agents[i].workspace.clone());
                    if self.pool.validate_claim(&req).is_ok() {
                        let intents = self.pool.claim(&req, now);
                        self.absorb(intents);
                    }
                }
                _ => {}
            }
        }
    }

    fn claim_request(&self, request: &str, workspace: &str) -> ClaimRequest {
        ClaimRequest {
            request: request.to_string(),
            agent: request.split('@').next().unwrap_or_default().to_string(),
            developer: "dev".into(),
            workspace: workspace.to_string(),
            ..Default::default()
        }
    }

    fn apply(&mut self, s: &Step) {
        let now = self.now;
        match s {
            Step::Finish { pick, ok, leak } => self.finish(*pick, *ok, *leak),
            Step::Flush => {
                if !self.pool.config_known() {
                    return;
                }
                let warm_before: BTreeSet<VmId> = self
                    .pool
                    .vms
                    .values()
                    .filter(|v| v.state == VmState::Warm)
                    .map(|v| v.id.clone())
                    .collect();
                let assigned_before = self.count(VmState::Assigned);
                let (flushed, intents) = self.pool.flush(now);
                assert_eq!(
                    flushed.iter().cloned().collect::<BTreeSet<_>>(),
                    warm_before
                );
                assert_eq!(self.count(VmState::Assigned), assigned_before);
                self.absorb(intents);
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
            Step::Advance(ms) => self.advance(*ms),
            Step::Claim { ws } => {
                if !self.pool.config_known() {
                    return;
                }
                self.next_agent += 1;
                let workspace = WORKSPACES[*ws].to_string();
                let request = format!("agent/{TENANT}/{workspace}/dev/a{}@r1", self.next_agent);
                let req = self.claim_request(&request, &workspace);
                if self.pool.validate_claim(&req).is_ok() {
                    let intents = self.pool.claim(&req, now);
                    // A retried claim is the same claim.
                    assert!(self.pool.validate_claim(&req).is_ok());
                    assert!(self.pool.claim(&req, now).is_empty());
                    self.agents.push(Agent {
                        request,
                        workspace,
                        handed: None,
                        started: None,
                        asleep: false,
                        waking: false,
                    });
                    self.absorb(intents);
                } else {
                    assert!(
                        self.pool.nuke.holds_pool(),
                        "claim refused while no nuke holds the pool"
                    );
                }
            }
            Step::AgentStarts { pick } => {
                let ready: Vec<usize> = (0..self.agents.len())
                    .filter(|i| {
                        self.agents[*i].started.is_none() && self.agents[*i].handed.is_some()
                    })
                    .collect();
                if ready.is_empty() {
                    return;
                }
                let i = ready[pick % ready.len()];
                let vm = self.agents[i]
                    .handed
                    .clone()
                    .unwrap_or_else(|| unreachable!());
                let request = self.agents[i].request.clone();
                match self.substrate.get_mut(&vm) {
                    // Its VM was deleted before it started on it: it claims again (nothing
                    // of it ran anywhere).
                    None => {
                        let mut req =
                            self.claim_request(&request, &self.agents[i].workspace.clone());
                        req.taken_by = Some(DELETING.into());
                        self.agents[i].handed = None;
                        let intents = self.pool.claim(&req, now);
                        self.absorb(intents);
                    }
                    // Its host is lost: the agent fails and releases.
                    Some(v) if self.view.is_lost(&v.host) => self.end_agent(i),
                    Some(v) => match v.owner.clone() {
                        None => {
                            v.owner = Some(request);
                            self.agents[i].started = Some(vm);
                        }
                        Some(o) if o == request => self.agents[i].started = Some(vm),
                        Some(owner) => {
                            // Taken: the agent tells the pool and claims again.
                            let mut req =
                                self.claim_request(&request, &self.agents[i].workspace.clone());
                            req.taken_by = Some(owner);
                            self.agents[i].handed = None;
                            let intents = self.pool.claim(&req, now);
                            self.absorb(intents);
                        }
                    },
                }
            }
            Step::Release { pick } => {
                if self.agents.is_empty() {
                    return;
                }
                let i = pick % self.agents.len();
                self.end_agent(i);
            }
            Step::AgentDies { pick } => {
                if self.agents.is_empty() {
                    return;
                }
                let a = self.agents.remove(pick % self.agents.len());
                self.dead.insert(a.request);
            }
            Step::VmDies { pick } => {
                let warm: Vec<VmId> = self
                    .pool
                    .vms
                    .values()
                    .filter(|v| v.state == VmState::Warm && self.substrate.contains_key(&v.id))
                    .map(|v| v.id.clone())
                    .collect();
                if warm.is_empty() {
                    return;
                }
                let vm = warm[pick % warm.len()].clone();
                self.substrate.remove(&vm);
                self.vanished.insert(vm);
            }
            Step::Undeletable { pick } => {
                let ids: Vec<VmId> = self.substrate.keys().cloned().collect();
                if !ids.is_empty() {
                    let vm = &ids[pick % ids.len()];
                    if let Some(v) = self.substrate.get_mut(vm) {
                        v.undeletable = true;
                    }
                }
            }
            Step::Nuke => self.nuke(),
            Step::Doorbell => {
                let intents = self.pool.request_scan();
                self.absorb(intents);
            }
            Step::Restart => {
                // Results of in-flight boots may have happened in the substrate already.
                for f in &self.in_flight {
                    if let Flight::Intent(Intent::Boot(spec)) = f {
                        let host = spec.host.clone().unwrap_or_default();
                        self.substrate.entry(spec.vm.clone()).or_insert(ModelVm {
                            host,
                            workspace: spec.workspace.clone(),
                            image: spec.image.clone(),
                            generation: spec.generation,
                            owner: None,
                            alive: true,
                            undeletable: false,
                            dormant: false,
                        });
                        if !self.pool.vms.contains_key(&spec.vm) {
                            self.strays.insert(spec.vm.clone());
                        }
                    }
                }
                self.in_flight.clear();
                self.timers.clear();
                let json = serde_json::to_string(&self.pool).unwrap();
                self.pool = serde_json::from_str(&json).unwrap();
                let intents = self.pool.resume(now);
                self.absorb(intents);
            }
            Step::Terminate => {
                // In-flight boots may have created their VMs; everything the run knew is now
                // only in the substrate and the record.
                for f in &self.in_flight {
                    if let Flight::Intent(Intent::Boot(spec)) = f {
                        let host = spec.host.clone().unwrap_or_default();
                        self.substrate.entry(spec.vm.clone()).or_insert(ModelVm {
                            host,
                            workspace: spec.workspace.clone(),
                            image: spec.image.clone(),
                            generation: spec.generation,
                            owner: None,
                            alive: true,
                            undeletable: false,
                            dormant: false,
                        });
                    }
                }
                self.in_flight.clear();
                self.timers.clear();
                self.strays.extend(self.substrate.keys().cloned());
                for a in &self.agents {
                    if let (Some(vm), None) = (&a.handed, &a.started) {
                        self.raced.insert(vm.clone());
                    }
                }
                self.seed += 1;
                // The new run counts every VM it adopts (none is dormant to it).
                self.dormant_before.clear();
                self.pool = Pool::recovering(TENANT, self.seed, now);
                let intents = self.pool.resume(now);
                self.absorb(intents);
            }
            Step::HostLost { pick } => {
                self.change_host(*pick, |h| {
                    let live = h.state == HostState::Live;
                    h.state = HostState::Lost;
                    live
                });
            }
            Step::HostBack { pick } => {
                let host = HOSTS[pick % HOSTS.len()];
                if self.view.is_lost(host) {
                    // What it still holds and the pool wrote off: only its reaper finds it.
                    for (id, v) in &self.substrate {
                        if v.host == host && !self.pool.vms.contains_key(id) {
                            self.strays.insert(id.clone());
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
            Step::AgentSleeps { pick } => {
                let awake: Vec<usize> = (0..self.agents.len())
                    .filter(|i| {
                        let a = &self.agents[*i];
                        !a.asleep
                            && a.started
                                .as_ref()
                                .and_then(|vm| self.substrate.get(vm))
                                .is_some_and(|v| v.alive && !self.view.is_lost(&v.host))
                    })
                    .collect();
                if awake.is_empty() {
                    return;
                }
                let i = awake[pick % awake.len()];
                let vm = self.agents[i]
                    .started
                    .clone()
                    .unwrap_or_else(|| unreachable!());
                if let Some(v) = self.substrate.get_mut(&vm) {
                    v.dormant = true;
                }
                self.agents[i].asleep = true;
                let request = self.agents[i].request.clone();
                let (state, intents) =
                    self.pool
                        .power_changed(&request, &vm, PowerChange::Dormant, now);
                assert!(
                    matches!(state, PowerState::Dormant | PowerState::Unknown),
                    "a sleep reported answers {state:?}"
                );
                self.absorb(intents);
            }
            Step::AgentWakes { pick } => {
                let asleep: Vec<usize> = (0..self.agents.len())
                    .filter(|i| self.agents[*i].asleep && !self.agents[*i].waking)
                    .collect();
                if asleep.is_empty() {
                    return;
                }
                let i = asleep[pick % asleep.len()];
                self.agents[i].waking = true;
                self.try_to_wake(i);
            }
        }
        self.agents_look();
        // The shell writes the record whenever it changes (never a recovering run's defaults).
        if self.pool.config_known() {
            self.record = Some(self.pool.record());
        }
        self.check();
    }

    /// The i-th agent, waking, asks the pool for room; once it counts again it wakes its VM.
    fn try_to_wake(&mut self, i: usize) {
        let Some(vm) = self.agents[i].started.clone() else {
            return;
        };
        let request = self.agents[i].request.clone();
        let (state, intents) = self
            .pool
            .power_changed(&request, &vm, PowerChange::Wake, self.now);
        self.absorb(intents);
        match state {
            PowerState::Awake | PowerState::Unknown => {
                if let Some(v) = self.substrate.get_mut(&vm) {
                    v.dormant = false;
                }
                self.agents[i].asleep = false;
                self.agents[i].waking = false;
            }
            PowerState::Waiting { position } => assert!(position >= 1, "a wake in line at 0"),
            PowerState::Dormant => panic!("a wake asked for answers Dormant"),
        }
    }

    /// The i-th live agent ends and releases its claim.
    fn end_agent(&mut self, i: usize) {
        let a = self.agents.remove(i);
        let known = match self.pool.claim_state(&a.request) {
            ClaimState::Assigned { vm, .. } => Some(vm),
            _ => None,
        };
        let (deleting, intents) = self.pool.release(&a.request, self.now);
        assert_eq!(
            deleting, known,
            "release deletes exactly the VM the claim held"
        );
        assert_eq!(self.pool.claim_state(&a.request), ClaimState::Unknown);
        if deleting.is_none()
            && let Some(vm) = a.started.or(a.handed)
            && self.substrate.contains_key(&vm)
            && !self.pool.vms.contains_key(&vm)
        {
            // The pool did not know (yet) it held this VM: a reaper or recovery finds it.
            self.strays.insert(vm);
        }
        self.absorb(intents);
    }

    /// `murmur pool flush --nuke`: pause, terminate agents, wipe live hosts, reset.
    fn nuke(&mut self) {
        if !self.pool.config_known() {
            return;
        }
        let request = format!("nuke-{}", self.now);
        if self.pool.nuke_pause(&request, self.now).is_err() {
            return;
        }
        assert!(self.pool.reconcile(self.now).is_empty(), "a held pool acts");
        // The pause answers once nothing boots.
        while let Some(i) = self
            .in_flight
            .iter()
            .position(|f| matches!(f, Flight::Intent(Intent::Boot(_))))
        {
            self.finish(i, true, false);
        }
        assert_eq!(self.pool.booting(), 0);
        self.dead.extend(self.agents.drain(..).map(|a| a.request));
        let before = self.substrate.len();
        let view = self.view.clone();
        self.substrate.retain(|_, v| view.is_lost(&v.host));
        let deleted = (before - self.substrate.len()) as u64;
        self.strays.retain(|vm| self.substrate.contains_key(vm));
        self.vanished.clear();
        let intents = self.pool.nuke_reset(deleted, self.now);
        assert!(!self.pool.nuke.under_way());
        self.absorb(intents);
        // The nuke terminated every agent; their claims went with the reset.
        self.dead.clear();
        for (id, _) in self.substrate.iter() {
            if !self.pool.vms.contains_key(id) {
                self.strays.insert(id.clone());
            }
        }
    }

    fn change_host(&mut self, pick: usize, change: impl FnOnce(&mut HostInfo) -> bool) {
        let host = HOSTS[pick % HOSTS.len()];
        let Some(info) = self.view.hosts.get_mut(host) else {
            return;
        };
        if !change(info) {
            return;
        }
        self.view.version += 1;
        let intents = self.pool.hosts_changed(self.view.clone(), self.now);
        self.absorb(intents);
        let lost = self.view.is_lost(host);
        if lost {
            assert!(
                self.pool
                    .vms
                    .values()
                    .all(|v| v.host.as_deref() != Some(host)),
                "VMs of lost host {host} still in the inventory"
            );
        }
    }

    fn count(&self, state: VmState) -> usize {
        self.pool.vms.values().filter(|v| v.state == state).count()
    }

    fn check(&mut self) {
        // The inventory's indexes agree with a full recount of its records.
        assert!(
            self.pool.vms.indexes_match_a_recount(),
            "the inventory's indexes drifted from its records"
        );
        // So do the claims' (the waiting claims in arrival order, claims per developer).
        if let Err(e) = self.pool.check_claim_index() {
            panic!("the claim indexes drifted from the claims: {e}");
        }
        // The pool's count errs high only: a VM that holds host memory is never taken for
        // dormant, and only assigned VMs (or their deletes) are.
        for v in self.pool.vms.values() {
            if v.dormant {
                assert!(
                    self.substrate.get(&v.id).is_none_or(|m| m.dormant),
                    "{} holds memory but the pool counts it dormant",
                    v.id
                );
                assert!(
                    matches!(v.state, VmState::Assigned | VmState::Deleting),
                    "{} is dormant while {:?}",
                    v.id,
                    v.state
                );
            }
            assert!(v.wake_seq == 0 || v.dormant, "{} in line but counted", v.id);
        }
        // A wake is let in only with room under `max_vms`.
        let dormant: BTreeSet<VmId> = self
            .pool
            .vms
            .values()
            .filter(|v| v.dormant)
            .map(|v| v.id.clone())
            .collect();
        let woken = self
            .dormant_before
            .iter()
            .any(|id| self.pool.vms.contains_key(id) && !dormant.contains(id));
        if woken {
            assert!(
                self.pool.in_use() <= self.pool.config.spec.max_vms,
                "a wake let in over max_vms: {} in use, max {}",
                self.pool.in_use(),
                self.pool.config.spec.max_vms
            );
        }
        self.dormant_before = dormant;
        // No VM held by two claims.
        let mut holders: BTreeMap<VmId, String> = BTreeMap::new();
        for c in self.pool.claims.values() {
            if let Some(vm) = &c.vm
                && let Some(prev) = holders.insert(vm.clone(), c.request.clone())
            {
                panic!("{vm} held by {prev} and {}", c.request);
            }
        }
        for v in self.pool.vms.values() {
            if v.state == VmState::Assigned {
                assert!(holders.contains_key(&v.id), "{} assigned to nobody", v.id);
            }
        }
        // Nothing the substrate holds is missing from the inventory, but leaks only a reaper
        // can find, VMs a recovery has not listed yet, and VMs on lost hosts.
        for id in self.substrate.keys() {
            assert!(
                self.pool.vms.contains_key(id) || self.strays.contains(id) || self.unreachable(id),
                "VM {id} exists but the pool lost it"
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
            if matches!(v.state, VmState::Warm | VmState::Assigned) {
                assert!(
                    self.substrate.contains_key(&v.id) || self.vanished.contains(&v.id),
                    "{} is {:?} but not in the substrate",
                    v.id,
                    v.state
                );
            }
            if v.state == VmState::Warm {
                assert_eq!(v.generation, self.pool.generation, "a pre-flush VM is warm");
            }
        }
        // Strays the pool found are strays no more.
        let vms = &self.pool.vms;
        self.strays.retain(|id| !vms.contains_key(id));
    }

    /// Lets every operation finish successfully (deletes of undeletable VMs keep failing).
    fn drain(&mut self) {
        let mut guard = 0;
        while !self.in_flight.is_empty() {
            self.apply(&Step::Finish {
                pick: 0,
                ok: true,
                leak: false,
            });
            guard += 1;
            assert!(guard < 20_000, "intents never settle");
        }
    }
}

/// The properties below run with proptest's default config, so `PROPTEST_CASES` sets how many
/// cases they run (a fixed `with_cases` would silently override it).
#[test]
fn the_number_of_cases_comes_from_proptest_cases() {
    let cases = ProptestConfig::default().cases;
    match std::env::var("PROPTEST_CASES") {
        Ok(v) => assert_eq!(Ok(cases), v.parse::<u32>(), "PROPTEST_CASES={v}"),
        Err(_) => assert_eq!(cases, 256),
    }
}

proptest! {

    #[test]
    fn pool_on_one_host_never_loses_or_overbooks_a_vm(steps in prop::collection::vec(step(), 1..120)) {
        settles_soundly(World::new(1), &steps)?;
    }

    #[test]
    fn pool_on_three_hosts_never_loses_or_overbooks_a_vm(
        steps in prop::collection::vec(step(), 1..120)
    ) {
        settles_soundly(World::new(3), &steps)?;
    }
}

/// Runs `steps`, then lets the world settle (hosts back, drains over, stuck VMs made
/// deletable again, back-offs over, agents gone, reaper rounds a grace period apart) and
/// checks that substrate and inventory agree.
fn settles_soundly(mut w: World, steps: &[Step]) -> Result<(), TestCaseError> {
    for s in steps {
        w.apply(s);
    }
    for pick in 0..HOSTS.len() {
        w.apply(&Step::HostBack { pick });
        w.apply(&Step::Drain { pick, on: false });
    }
    // An operator fixes what could not be deleted.
    for v in w.substrate.values_mut() {
        v.undeletable = false;
    }
    w.drain();
    // Every agent ends; their VMs go.
    while !w.agents.is_empty() {
        w.apply(&Step::AgentStarts { pick: 0 });
        w.apply(&Step::Release { pick: 0 });
        w.drain();
    }
    // Far in the future, with every back-off over and the reaper's rounds running (each a
    // grace period apart), everything settles.
    for _ in 0..8 {
        w.apply(&Step::Advance(DELETE_SETTLE_MS));
        w.drain();
    }
    prop_assert!(
        w.pool.recovery.is_none(),
        "still recovering: {:?}",
        w.pool.recovery
    );
    prop_assert!(w.strays.is_empty(), "strays left: {:?}", w.strays);
    prop_assert!(
        w.pool.claims.is_empty(),
        "claims of ended agents left: {:?}",
        w.pool.claims.keys().collect::<Vec<_>>()
    );
    prop_assert_eq!(w.count(VmState::Assigned), 0);
    let recorded: BTreeSet<VmId> = w.pool.vms.keys().cloned().collect();
    let real: BTreeSet<VmId> = w.substrate.keys().cloned().collect();
    prop_assert_eq!(
        &recorded,
        &real,
        "substrate and inventory differ once settled"
    );
    prop_assert_eq!(w.count(VmState::Booting) + w.count(VmState::Deleting), 0);
    let max = w.pool.config.spec.max_vms as usize;
    prop_assert!(w.substrate.len() <= max);
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
    Ok(())
}

/// Long enough for any back-off (stuck deletes, hold-backs) and several reaper rounds.
const DELETE_SETTLE_MS: u64 = 700_000;

#[test]
fn flush_discards_vms_that_were_booting_before_it() {
    let mut w = World::new(1);
    let booting: Vec<VmId> = w.pool.vms.keys().cloned().collect();
    assert_eq!(booting.len(), 4);
    w.apply(&Step::Flush);
    w.drain();
    for vm in &booting {
        assert!(
            !w.pool.vms.contains_key(vm),
            "{vm} booted before the flush survived it"
        );
        assert!(!w.substrate.contains_key(vm));
    }
    assert_eq!(w.count(VmState::Warm), 4);
}

#[test]
fn a_terminated_pool_recovers_its_config_its_warm_vms_and_its_agents() {
    let mut w = World::new(3);
    w.drain();
    w.change(
        ResourceKind::PoolConfig,
        "default",
        vec![("max_vms", "9".into())],
        false,
    );
    w.apply(&Step::Claim { ws: 0 });
    w.apply(&Step::AgentStarts { pick: 0 });
    w.drain();
    let agent = w.agents[0].clone();
    let held = agent.started.clone().expect("started on its VM");
    let warm_before: BTreeSet<VmId> = w
        .pool
        .vms
        .values()
        .filter(|v| v.state == VmState::Warm)
        .map(|v| v.id.clone())
        .collect();
    assert!(!warm_before.is_empty());
    w.apply(&Step::Terminate);
    assert!(w.pool.recovery.is_some());
    w.drain();
    assert!(w.pool.recovery.is_none(), "recovery did not end");
    assert_eq!(w.pool.config.spec.max_vms, 9, "config lost");
    assert_eq!(
        w.pool.claim_state(&agent.request),
        ClaimState::Assigned {
            vm: held.clone(),
            host: w.substrate[&held].host.clone().into()
        },
        "the agent's VM was not adopted"
    );
    for vm in &warm_before {
        assert!(w.pool.vms.contains_key(vm), "warm {vm} was not adopted");
    }
    assert!(w.strays.is_empty());
}

#[test]
fn a_vm_whose_delete_keeps_failing_is_stuck_not_blocking_and_goes_once_it_can() {
    let mut w = World::new(1);
    w.drain();
    let warm: Vec<VmId> = w.pool.vms.keys().cloned().collect();
    w.substrate.get_mut(&warm[0]).unwrap().undeletable = true;
    w.apply(&Step::Flush);
    w.drain();
    let stuck: Vec<VmId> = w.pool.stuck_deleting().map(|v| v.id.clone()).collect();
    assert_eq!(stuck, vec![warm[0].clone()]);
    assert!(w.pool.flush_settled(&warm), "a flush waits for a stuck VM");
    assert!(
        w.in_flight.is_empty(),
        "a stuck delete holds an activity in flight"
    );
    // Carried across continue-as-new, retried on its timer, gone once it can be deleted.
    w.apply(&Step::Restart);
    w.drain();
    assert_eq!(w.pool.stuck_deleting().count(), 1);
    w.substrate.get_mut(&warm[0]).unwrap().undeletable = false;
    w.apply(&Step::Advance(DELETE_SETTLE_MS));
    w.drain();
    assert_eq!(w.pool.stuck_deleting().count(), 0);
    assert!(!w.substrate.contains_key(&warm[0]));
}

#[test]
fn a_failing_image_stops_backfill_instead_of_churning() {
    let mut w = World::new(1);
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
            .position(|f| matches!(f, Flight::Intent(Intent::Boot(_))))
        else {
            w.drain();
            continue;
        };
        boots += 1;
        w.finish(i, false, true);
        w.check();
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
        "{:?} {:?} {:?}",
        web.reasons,
        w.pool.images,
        w.pool
            .vms
            .values()
            .map(|v| (&v.id, v.state, &v.image))
            .collect::<Vec<_>>()
    );
    // Held back until the hold-back's timer fires; then exactly one probe boot is tried.
    assert!(
        !w.pool
            .reconcile(w.now + murmur_workflows::machine::BACKOFF_MAX_MS)
            .iter()
            .any(|c| matches!(c, Intent::Boot(_))),
        "the clock alone ended a hold-back"
    );
    let mut holds: Vec<(String, u64)> = w
        .timers
        .iter()
        .filter_map(|(_, t)| match t {
            Intent::HoldBack { image, seq, .. } => Some((image.clone(), *seq)),
            _ => None,
        })
        .collect();
    holds.sort_by_key(|h| h.1);
    let (image, seq) = holds.pop().expect("a hold-back timer runs");
    for (old_image, old_seq) in holds {
        let intents = w.pool.hold_back_over(&old_image, old_seq, w.now);
        assert!(!intents.iter().any(|c| matches!(c, Intent::Boot(_))));
    }
    let intents = w.pool.hold_back_over(&image, seq, w.now);
    assert_eq!(
        intents
            .iter()
            .filter(|c| matches!(c, Intent::Boot(_)))
            .count(),
        1
    );
}

fn claim(w: &mut World, n: u32, ws: &str) -> String {
    let request = format!("agent/{TENANT}/{ws}/dev/n{n}@r1");
    let req = w.claim_request(&request, ws);
    w.pool.validate_claim(&req).expect("claim accepted");
    let intents = w.pool.claim(&req, w.now);
    w.absorb(intents);
    w.agents.push(Agent {
        request: request.clone(),
        workspace: ws.into(),
        handed: None,
        started: None,
        asleep: false,
        waking: false,
    });
    request
}

/// One host, `max_vms` as given, no warm spares wanted: every VM is an agent's.
fn world_at_max_vms(max_vms: u32) -> World {
    let mut w = World::new(1);
    w.change(
        ResourceKind::PoolConfig,
        "default",
        vec![("max_vms", max_vms.to_string())],
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
    w
}

#[test]
fn claims_at_max_vms_wait_in_arrival_order_and_take_no_room_from_backfill() {
    let mut w = world_at_max_vms(2);
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
    let mut again = w.claim_request(&second, "web");
    again.wait = true;
    assert!(w.pool.claim(&again, w.now).is_empty());
    assert!(matches!(w.pool.claim_state(&second), ClaimState::Assigned { vm: v, .. } if v == vm));
}

#[test]
fn the_developer_limit_counts_live_agents_and_a_nuke_refuses_claims() {
    let mut w = World::new(1);
    w.change(
        ResourceKind::PoolConfig,
        "default",
        vec![("max_agents_per_developer", "1".into())],
        false,
    );
    claim(&mut w, 1, "web");
    let next = w.claim_request(&format!("agent/{TENANT}/web/dev/n2@r1"), "web");
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
    w.pool.nuke_pause("n1", w.now).unwrap();
    let e = w.pool.validate_claim(&next).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("FAILED_PRECONDITION: a nuke of tenant acme")
    );
}

#[test]
fn a_vm_handed_out_again_after_a_recovery_goes_to_the_agent_that_started_on_it() {
    // The old run handed a warm VM to agent A and ended before A started on it; the new run
    // adopts the VM as warm and hands it to B. A starts first: B is refused by the substrate,
    // tells the pool, and gets another VM; A keeps its VM.
    let mut w = World::new(1);
    // One VM in all, so the recovered pool can only hand A's VM to B.
    w.change(
        ResourceKind::Workspace,
        "api",
        vec![("min_idle", "0".into())],
        false,
    );
    w.change(
        ResourceKind::Workspace,
        "web",
        vec![("min_idle", "1".into())],
        false,
    );
    w.change(
        ResourceKind::PoolConfig,
        "default",
        vec![("max_vms", "1".into())],
        false,
    );
    w.drain();
    let a = claim(&mut w, 1, "web");
    w.agents_look();
    let vm = w.agents[0].handed.clone().expect("A was handed a VM");
    w.apply(&Step::Terminate);
    w.drain();
    // A has not started: the recovered pool does not know A's claim; it adopted the VM warm.
    assert_eq!(w.pool.vms[&vm].state, VmState::Warm);
    let b = claim(&mut w, 2, "web");
    let ClaimState::Assigned { vm: b_vm, .. } = w.pool.claim_state(&b) else {
        panic!("B not served");
    };
    assert_eq!(b_vm, vm, "B was handed A's VM");
    w.agents[1].handed = Some(vm.clone());
    // A starts on it (A still thinks it is its VM).
    w.agents[0].handed = Some(vm.clone());
    w.apply(&Step::AgentStarts { pick: 0 });
    assert_eq!(
        w.agents.iter().find(|x| x.request == a).unwrap().started,
        Some(vm.clone())
    );
    // B starts: taken.
    w.apply(&Step::AgentStarts { pick: 0 });
    w.drain();
    let b_agent = w.agents.iter().find(|x| x.request == b).unwrap();
    assert_ne!(b_agent.handed.as_ref(), Some(&vm));
    assert_eq!(
        w.pool.claims.get(&a).and_then(|c| c.vm.clone()),
        Some(vm),
        "the VM went back to the agent that started on it"
    );
}

#[test]
fn a_vm_asleep_without_memory_leaves_its_room_and_its_wake_goes_before_later_claims() {
    let mut w = world_at_max_vms(1);
    let first = claim(&mut w, 1, "web");
    w.drain();
    w.apply(&Step::AgentStarts { pick: 0 });
    let ClaimState::Assigned { vm: first_vm, .. } = w.pool.claim_state(&first) else {
        panic!("first claim not served");
    };
    let second = claim(&mut w, 2, "web");
    assert_eq!(
        w.pool.claim_state(&second),
        ClaimState::Waiting { position: 1 }
    );
    // The first agent's VM sleeps without host memory: its room goes to the second agent.
    w.apply(&Step::AgentSleeps { pick: 0 });
    assert_eq!(w.pool.power_state(&first_vm), PowerState::Dormant);
    assert_eq!(
        w.pool.in_use(),
        1,
        "the booting VM counts, the dormant one not"
    );
    w.drain();
    assert!(matches!(
        w.pool.claim_state(&second),
        ClaimState::Assigned { .. }
    ));
    // Its wake waits for room, and goes before a claim that came later.
    w.apply(&Step::AgentWakes { pick: 0 });
    assert_eq!(
        w.pool.power_state(&first_vm),
        PowerState::Waiting { position: 1 }
    );
    let third = claim(&mut w, 3, "web");
    assert_eq!(
        w.pool.claim_state(&third),
        ClaimState::Waiting { position: 1 }
    );
    assert!(w.agents[0].waking, "the wake was let in over max_vms");
    // The second agent ends: the room goes to the wake, not to the third claim.
    let i = w
        .agents
        .iter()
        .position(|a| a.request == second)
        .unwrap_or_else(|| unreachable!());
    w.apply(&Step::Release { pick: i });
    w.drain();
    assert_eq!(w.pool.power_state(&first_vm), PowerState::Awake);
    assert!(!w.agents[0].waking && !w.agents[0].asleep, "not woken");
    assert!(matches!(
        w.pool.claim_state(&third),
        ClaimState::Waiting { .. }
    ));
    assert_eq!(w.pool.in_use(), 1);
    // Carried across continue-as-new: a dormant VM and a wake in line survive the packing.
    w.apply(&Step::AgentSleeps { pick: 0 });
    w.drain();
    w.apply(&Step::AgentWakes { pick: 0 });
    let line = w.pool.power_state(&first_vm);
    assert!(matches!(line, PowerState::Waiting { .. }), "{line:?}");
    w.apply(&Step::Restart);
    assert_eq!(w.pool.power_state(&first_vm), line);
    assert!(
        w.pool.vms[&first_vm].dormant,
        "dormancy lost across continue-as-new"
    );
}
