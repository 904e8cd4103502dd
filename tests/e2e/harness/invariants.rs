//! The product's promises, checked against the real substrate: once a scenario has settled
//! ([`TestEnv::wait_settled_and_sound`]) and continuously while it runs
//! ([`TestEnv::sound_while`]), so that a violation that later clears is still reported.
//!
//! The continuous check compares substrate listings (every 15 ms) with the pool's status
//! (read in-process between listing bursts). A listing and a status are never taken at the
//! same instant, so every rule is stated so that this skew cannot make it fire falsely:
//!
//! | rule | violation |
//! |---|---|
//! | no VM held by two agents | two claims of one status name the same VM |
//! | never over `max_vms` (pool) | a status's `in_use` exceeds its `max_vms` (with [`Allow::orphans`], not counting orphans the reaper found and is deleting: the pool did not make them, and it counts them while they occupy the host) |
//! | never over `max_vms` (substrate) | a listing holds more VMs than the larger `max_vms` of the statuses around it |
//! | nothing the pool does not know | a VM in a listing before a status and in one after it is not in that status (it existed at the status's instant) |
//! | nothing lost | a VM warm or assigned in two consecutive statuses is missing from a listing between them |
//!
//! Statuses taken while the pool recovers, from a run that ended, or during a nuke (which
//! deletes behind the pool's back) are not used for the last two rules.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use murmur_workflows::model::{DeleteReason, VmState};
use murmur_workflows::pool_workflow::PoolWorkflow;
use murmur_workflows::status::PoolStatus;

use murmur_activities::substrate::Provider;
use std::path::PathBuf;

use super::TestEnv;

/// What a scenario makes untrue on purpose, so the continuous check does not demand it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Allow {
    /// VMs in the substrate that the pool does not know (injected leaks and ghost deletes,
    /// planted orphans) until the reaper deletes them; lifts the substrate's `max_vms` rule,
    /// and the pool's `in_use` is held to `max_vms` without the orphans it is deleting.
    pub orphans: bool,
    /// Warm or assigned VMs gone from the substrate behind the pool's back (killed by the
    /// test) until the reaper notices.
    pub lost_vms: bool,
}

/// Most violations a check keeps (the first ones say what happened).
const KEEP: usize = 20;

/// How long the sampler lists the substrate between two status reads, and how often.
const LISTING_BURST: Duration = Duration::from_millis(60);
const LISTING_EVERY: Duration = Duration::from_millis(15);

/// Runs `scenario` while `check` runs every 100 ms on another thread, and returns what the
/// scenario returned with every violation `check` reported meanwhile (an invariant must hold
/// while things happen, not only once they settle).
pub fn while_checking<T>(
    check: impl Fn() -> Option<String> + Sync,
    scenario: impl FnOnce() -> T,
) -> (T, Vec<String>) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut violations = Vec::new();
            while !done.load(Ordering::Acquire) {
                if let Some(v) = check()
                    && violations.len() < KEEP
                {
                    violations.push(v);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            violations
        });
        let out = {
            let _stop = Stop(&done);
            scenario()
        };
        let violations = watcher.join().expect("the watcher thread panicked");
        (out, violations)
    })
}

/// Raises its flag when dropped: a scenario or a thread ended, also by a panic (a scope would
/// otherwise wait forever for a watcher that waits for the flag).
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A running continuous check, as the scenario sees it.
pub struct Sampler {
    /// Completed status reads.
    reads: AtomicU64,
    /// Set when the sampling thread has ended (normally or not).
    ended: AtomicBool,
}

impl Sampler {
    /// Waits until the sampler has read the status `n` more times (so what the scenario did
    /// so far has been looked at from both sides).
    pub fn wait_reads(&self, n: u64) {
        let target = self.reads.load(Ordering::Acquire) + n;
        let deadline = Instant::now() + super::PATIENCE;
        while self.reads.load(Ordering::Acquire) < target {
            assert!(
                !self.ended.load(Ordering::Acquire),
                "the sampler ended (see its panic above)"
            );
            assert!(Instant::now() < deadline, "the sampler stopped reading");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl TestEnv {
    /// The promises at this moment: every VM the substrate holds is in the pool's inventory
    /// and every warm or assigned VM is in the substrate; no VM is held by two agents; never
    /// more than `max_vms`. Returns the violations found.
    pub fn invariant_violations(&self) -> Vec<String> {
        let st = self.status();
        let substrate: BTreeSet<String> = self.substrate().into_iter().map(|v| v.id.0).collect();
        let inventory: BTreeSet<String> = st.vms.iter().map(|v| v.id.0.clone()).collect();
        let mut violations = status_violations(&st, Allow::default());
        assert_eq!(
            st.vms.len() as u32,
            st.vms_total,
            "the status lists only part of the inventory"
        );
        for vm in substrate.difference(&inventory) {
            violations.push(format!("{vm} is in the substrate but not in the pool"));
        }
        for v in &st.vms {
            if matches!(v.state, VmState::Warm | VmState::Assigned) && !substrate.contains(&v.id.0)
            {
                violations.push(format!(
                    "{} is {:?} but not in the substrate",
                    v.id, v.state
                ));
            }
        }
        violations
    }

    /// Waits until nothing boots or is being deleted and the invariants hold (the reaper
    /// included: a leak must be found and deleted), failing with the violations after
    /// `patience`.
    pub fn wait_settled_and_sound(&self, patience: Duration) -> PoolStatus {
        let deadline = Instant::now() + patience;
        loop {
            // The substrate first, the pool's status after it: the status returned is then
            // never older than the check that passed.
            let violations = self.invariant_violations();
            let st = self.status();
            let settled = st
                .vms
                .iter()
                .all(|v| matches!(v.state, VmState::Warm | VmState::Assigned));
            if settled && violations.is_empty() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "invariants do not hold: {violations:#?}\nstatus: {st:#?}\n{}",
                self.worker_log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `scenario` under the continuous check (module docs) and fails the test with the
    /// first violations when any rule broke while it ran. (A scenario that must change the
    /// environment, e.g. restart its worker, uses [`TestEnv::probe`] instead.)
    pub fn sound_while<T>(&self, allow: Allow, scenario: impl FnOnce(&Sampler) -> T) -> T {
        self.probe().sound_while(allow, scenario)
    }

    /// Runs `scenario` under the continuous check and returns the violations found (the
    /// check's own test uses this to see that a violation is reported).
    pub fn sampled<T>(
        &self,
        allow: Allow,
        scenario: impl FnOnce(&Sampler) -> T,
    ) -> (T, Vec<String>) {
        self.probe().sampled(allow, scenario)
    }

    /// What the continuous check needs of this environment, owned.
    pub fn probe(&self) -> Probe {
        Probe {
            tenant: self.tenant.clone(),
            provider: self.provider(),
            temporal_address: self.temporal_address.clone(),
            log: self.dir.path().join("worker.log"),
        }
    }
}

/// What the continuous check needs of a [`TestEnv`], owned, so that the scenario may still
/// change the environment (kill and restart its worker) while the check runs.
pub struct Probe {
    tenant: String,
    provider: Box<dyn Provider>,
    temporal_address: Option<String>,
    log: PathBuf,
}

impl Probe {
    /// Runs `scenario` under the continuous check (module docs) and fails the test with the
    /// first violations when any rule broke while it ran.
    pub fn sound_while<T>(&self, allow: Allow, scenario: impl FnOnce(&Sampler) -> T) -> T {
        let (out, violations) = self.sampled(allow, scenario);
        assert!(
            violations.is_empty(),
            "invariants broke while the scenario ran:\n{violations:#?}\n{}",
            super::log_tail(&self.log)
        );
        out
    }

    /// Runs `scenario` under the continuous check and returns the violations found (the
    /// check's own test uses this to see that a violation is reported).
    pub fn sampled<T>(
        &self,
        allow: Allow,
        scenario: impl FnOnce(&Sampler) -> T,
    ) -> (T, Vec<String>) {
        let done = AtomicBool::new(false);
        let sampler = Sampler {
            reads: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        };
        let violations = Mutex::new(Vec::new());
        let out = std::thread::scope(|s| {
            let checker = s.spawn(|| {
                let _ended = Stop(&sampler.ended);
                self.sample_until(&done, allow, &sampler, &violations)
            });
            let out = {
                let _stop = Stop(&done);
                sampler.wait_reads(1);
                scenario(&sampler)
            };
            checker.join().expect("the sampler thread panicked");
            out
        });
        let found = violations.into_inner().unwrap_or_else(|e| e.into_inner());
        (out, found)
    }

    fn sample_until(
        &self,
        done: &AtomicBool,
        allow: Allow,
        sampler: &Sampler,
        violations: &Mutex<Vec<String>>,
    ) {
        let started = Instant::now();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the sampler");
        let client = runtime
            .block_on(super::temporal_client(self.temporal_address.as_deref()))
            .expect("the sampler's Temporal client");
        let pool = format!("pool/{}", self.tenant);
        // The status, marked when its run has ended (an ended run still answers, by replay).
        let read = || -> Option<PoolStatus> {
            use temporalio_client::{
                UntypedWorkflow, WorkflowDescribeOptions, WorkflowExecutionStatus,
            };
            let handle = client.get_workflow_handle::<PoolWorkflow>(pool.clone());
            let query = handle.query(
                PoolWorkflow::status,
                (),
                temporalio_client::WorkflowQueryOptions::default(),
            );
            let mut st = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), query).await })
                .ok()?
                .ok()?;
            let untyped = client.get_workflow_handle::<UntypedWorkflow>(pool.clone());
            let desc = runtime
                .block_on(untyped.describe(WorkflowDescribeOptions::default()))
                .ok()?;
            if desc.status() != WorkflowExecutionStatus::Running {
                st.run_ended = Some(format!("{:?}", desc.status()));
            }
            Some(st)
        };
        let report = |found: Vec<String>| {
            let mut all = violations.lock().unwrap_or_else(|e| e.into_inner());
            for v in found {
                if all.len() < KEEP {
                    all.push(format!("at {:?}: {v}", started.elapsed()));
                }
            }
        };
        let mut before = read();
        sampler.reads.fetch_add(1, Ordering::AcqRel);
        let mut listings_before: Vec<BTreeSet<String>> = Vec::new();
        while !done.load(Ordering::Acquire) {
            let mut listings = Vec::new();
            let burst = Instant::now() + LISTING_BURST;
            loop {
                if let Ok(vms) = self.try_substrate() {
                    listings.push(vms);
                }
                if Instant::now() >= burst || done.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(LISTING_EVERY);
            }
            let after = read();
            sampler.reads.fetch_add(1, Ordering::AcqRel);
            if let Some(st) = &after {
                report(status_violations(st, allow));
            }
            report(listing_violations(
                allow,
                before.as_ref(),
                &listings_before,
                &listings,
                after.as_ref(),
            ));
            before = after;
            listings_before = listings;
        }
    }

    /// Every VM id the substrate holds for this tenant, or why it could not be listed.
    fn try_substrate(&self) -> Result<BTreeSet<String>, String> {
        super::block_on(self.provider.list(&self.tenant))
            .map(|vms| vms.into_iter().map(|v| v.id.0).collect())
            .map_err(|e| e.to_string())
    }
}

/// Violations one status shows by itself: a VM held by two agents, more VMs than `max_vms`.
fn status_violations(st: &PoolStatus, allow: Allow) -> Vec<String> {
    let mut violations = Vec::new();
    let mut holders: BTreeMap<&str, &str> = BTreeMap::new();
    for c in &st.claims {
        if let Some(vm) = &c.vm
            && let Some(other) = holders.insert(&vm.0, &c.request)
        {
            violations.push(format!("{vm} held by {other} and {}", c.request));
        }
    }
    // A ghost delete (success reported, VM left running) frees room the pool refills; the
    // reaper later finds the ghost and counts it while deleting it. The pool made neither
    // the ghost nor its excess, so where orphans are injected they are not held against it.
    let orphans = if allow.orphans {
        st.vms
            .iter()
            .filter(|v| {
                v.state == VmState::Deleting && v.delete_reason == Some(DeleteReason::Orphan)
            })
            .count() as u32
    } else {
        0
    };
    if st.in_use.saturating_sub(orphans) > st.config.max_vms {
        violations.push(format!(
            "{} VMs in use ({orphans} of them orphans being deleted), max_vms {}",
            st.in_use, st.config.max_vms
        ));
    }
    violations
}

/// True when a status can be held against the substrate: its run is live and not recovering,
/// no nuke deletes behind its back, and it lists the whole inventory.
fn comparable(st: &PoolStatus) -> bool {
    st.recovery.is_none()
        && st.run_ended.is_none()
        && !st.nuke_in_progress
        && st.vms.len() as u32 == st.vms_total
}

/// The rules between statuses and the listings around them (module docs): `before` was read
/// after `listings_before` and before `listings`; `after` after `listings`.
fn listing_violations(
    allow: Allow,
    before: Option<&PoolStatus>,
    listings_before: &[BTreeSet<String>],
    listings: &[BTreeSet<String>],
    after: Option<&PoolStatus>,
) -> Vec<String> {
    let mut violations = Vec::new();
    if !allow.orphans {
        let cap = [before, after]
            .into_iter()
            .flatten()
            .map(|s| s.config.max_vms)
            .max();
        if let Some(cap) = cap
            && let Some(most) = listings.iter().map(BTreeSet::len).max()
            && most > cap as usize
        {
            violations.push(format!("the substrate holds {most} VMs, max_vms {cap}"));
        }
        if let Some(st) = before.filter(|s| comparable(s)) {
            let known: BTreeSet<&str> = st.vms.iter().map(|v| v.id.0.as_str()).collect();
            let seen_before: BTreeSet<&String> = listings_before.iter().flatten().collect();
            let seen_after: BTreeSet<&String> = listings.iter().flatten().collect();
            for vm in seen_before.intersection(&seen_after) {
                if !known.contains(vm.as_str()) {
                    violations.push(format!("{vm} is in the substrate but not in the pool"));
                }
            }
        }
    }
    if !allow.lost_vms
        && let (Some(a), Some(b)) = (before, after)
        && comparable(a)
        && comparable(b)
    {
        let held = |st: &PoolStatus| -> BTreeSet<String> {
            st.vms
                .iter()
                .filter(|v| matches!(v.state, VmState::Warm | VmState::Assigned))
                .map(|v| v.id.0.clone())
                .collect()
        };
        let (ha, hb) = (held(a), held(b));
        for vm in ha.intersection(&hb) {
            if listings.iter().any(|l| !l.contains(vm)) {
                violations.push(format!(
                    "{vm} is warm or assigned but missing from the substrate"
                ));
            }
        }
    }
    violations
}
