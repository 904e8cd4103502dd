//! Hand-out: agents claim VMs from the pool, and release them when they end.
//!
//! A claim is keyed by the request id its agent sends (the agent's workflow id and run id), so
//! a retried claim finds the claim it already made and gets the same VM. Claims are served in
//! the order they arrived: each first takes a warm VM of its workspace that is
//! [fresh](Pool::is_fresh); otherwise it gets room under `max_vms` to cold-boot one, strictly
//! first come, first served. While a claim waits for room, backfill boots nothing (agents come
//! before warm spares) and warm VMs nobody waiting can use are evicted to make room. Wakes of
//! dormant VMs waiting for room go before every claim that needs room.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Intent, Pool};
use crate::error::ApiError;
use crate::model::{DeleteReason, Millis, VmId, VmState};

/// An agent's request for a VM, as the pool records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// Idempotency key: the same request always means the same claim.
    pub request: String,
    /// The agent's workflow id.
    pub agent: String,
    /// Developer who spawned the agent (for `max_agents_per_developer`).
    pub developer: String,
    /// Workspace the VM must belong to.
    pub workspace: String,
    /// Arrival order (FIFO).
    pub seq: u64,
    /// The VM handed out, or being cold-booted, for this claim.
    pub vm: Option<VmId>,
    /// Why the claim cannot be served (its cold boot failed).
    pub failed: Option<String>,
    /// When the claim arrived.
    pub requested_at: Millis,
}

/// What hand-out decisions read of the claims, kept as the claims change so that a claim
/// costs O(log n) however many agents the tenant runs: the claims that may still wait, in
/// arrival order, and the claims per developer (`max_agents_per_developer`). Derived from
/// [`Pool::claims`]: never carried across continue-as-new, never compared (two pools are
/// equal whatever their indexes), rebuilt from the claims when missing. A change the indexes
/// do not follow step by step (host loss, a VM found taken, adoption, a nuke) drops them
/// ([`Pool::claims_changed`]); the property tests check them against a recount after every
/// step.
#[derive(Clone, Debug, Default)]
pub struct ClaimIndex {
    /// A superset of the waiting claims as `(seq, request)`: claims are added when made;
    /// entries of claims since served, failed or forgotten are dropped when met.
    waiting: Option<BTreeSet<(u64, String)>>,
    /// Claims per developer.
    per_developer: Option<BTreeMap<String, u32>>,
}

impl PartialEq for ClaimIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// True when `c` waits: not served (no VM booting or held for it) and not failed.
fn waits(c: &Claim) -> bool {
    c.vm.is_none() && c.failed.is_none()
}

impl ClaimIndex {
    fn waiting_of(claims: &BTreeMap<String, Claim>) -> BTreeSet<(u64, String)> {
        claims
            .values()
            .filter(|c| waits(c))
            .map(|c| (c.seq, c.request.clone()))
            .collect()
    }

    fn per_developer_of(claims: &BTreeMap<String, Claim>) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for c in claims.values() {
            *counts.entry(c.developer.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Checks the indexes that are built against a recount of `claims` (for tests):
    /// every waiting claim is in the waiting set, and the per-developer counts are exact.
    pub fn check(&self, claims: &BTreeMap<String, Claim>) -> Result<(), String> {
        if let Some(waiting) = &self.waiting {
            for entry in Self::waiting_of(claims) {
                if !waiting.contains(&entry) {
                    return Err(format!("waiting claim {} missing from the index", entry.1));
                }
            }
        }
        if let Some(counts) = &self.per_developer {
            let recount = Self::per_developer_of(claims);
            if *counts != recount {
                return Err(format!(
                    "claims per developer {counts:?}, a recount says {recount:?}"
                ));
            }
        }
        Ok(())
    }
}

/// What an agent asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClaimRequest {
    /// Idempotency key (the agent sends `<workflow id>@<run id>`).
    pub request: String,
    /// The agent's workflow id.
    pub agent: String,
    /// Developer who spawned it.
    pub developer: String,
    /// Workspace the VM must come from.
    pub workspace: String,
    /// False for an agent's first claim (admission), true when it asks again after being
    /// told its claim is settled (the claim latency metric tells warm from cold by it).
    pub wait: bool,
    /// Request id of the developer's signed spawn (used once, by this claim's agent run).
    pub spawn_request_id: String,
    /// When the developer signed the spawn (the agent verified it; the pool's replay check
    /// compares it with other signed times, never with a clock).
    pub spawn_signed_at: u64,
    /// The agent found the VM it was handed already taken by another agent (the substrate
    /// records one owner per VM, first come first served): that owner's claim request. The
    /// pool gives the VM to that owner and serves this claim again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_by: Option<String>,
    /// Proof that the worker sends it.
    pub auth: Option<crate::auth::Credential>,
}

/// Where a claim stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ClaimState {
    /// The VM is the agent's.
    Assigned {
        /// The VM.
        vm: VmId,
        /// The host it runs on (its activities go to that host's queue).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// A VM is being cold-booted for the agent.
    Booting {
        /// The VM.
        vm: VmId,
    },
    /// Waiting for room under `max_vms`.
    Waiting {
        /// 1-based place among the claims waiting for room.
        position: u32,
    },
    /// The claim cannot be served.
    Failed {
        /// Why.
        reason: String,
    },
    /// No such claim (never made, or already released).
    Unknown,
}

impl Pool {
    /// Checks a claim before it is recorded (the update validator runs this). A claim the pool
    /// already holds always passes, so retries are idempotent.
    pub fn validate_claim(&self, req: &ClaimRequest) -> Result<(), ApiError> {
        if self.claims.contains_key(&req.request) {
            return Ok(());
        }
        if req.request.is_empty() || req.agent.is_empty() {
            return Err(ApiError::invalid_argument(
                "a claim needs a request id and an agent",
            ));
        }
        if !self.config_known() {
            // Recovering: the workspaces are not read back yet; the handler checks again
            // once they are.
            return Ok(());
        }
        if self.nuke.holds_pool() {
            return Err(ApiError::failed_precondition(format!(
                "a nuke of tenant {} is in progress; spawn again once it completes",
                self.tenant
            )));
        }
        if !self.workspaces.contains_key(&req.workspace) {
            return Err(ApiError::not_found(format!(
                "workspace {} does not exist; create it with murmur set workspace {}",
                req.workspace, req.workspace
            )));
        }
        let limit = self.config.spec.max_agents_per_developer;
        let running = self.agents_of(&req.developer);
        if limit > 0 && running >= limit {
            return Err(ApiError::failed_precondition(format!(
                "developer {} already has {running} running agents (max_agents_per_developer is {limit}); kill one or wait for one to finish",
                req.developer
            )));
        }
        Ok(())
    }

    /// Non-terminal agents of a developer: those holding a claim.
    pub fn agents_of(&self, developer: &str) -> u32 {
        match &self.claim_index.per_developer {
            Some(counts) => counts.get(developer).copied().unwrap_or(0),
            None => self
                .claims
                .values()
                .filter(|c| c.developer == developer)
                .count() as u32,
        }
    }

    /// Drops the claim indexes after a change they do not follow step by step; they are
    /// rebuilt from the claims when next needed.
    pub(super) fn claims_changed(&mut self) {
        self.claim_index = ClaimIndex::default();
    }

    /// The claim indexes, checked against a recount (for tests).
    pub fn check_claim_index(&self) -> Result<(), String> {
        self.claim_index.check(&self.claims)
    }

    /// Records a claim (idempotent by request id) and serves what can be served. A claim
    /// whose VM was found taken by another agent gives the VM to that agent and waits again.
    pub fn claim(&mut self, req: &ClaimRequest, now: Millis) -> Vec<Intent> {
        if let Some(owner) = &req.taken_by {
            return self.vm_taken(&req.request, owner, now);
        }
        if self.claims.contains_key(&req.request) {
            return Vec::new();
        }
        self.claim_seq += 1;
        let claims = &self.claims;
        let index = &mut self.claim_index;
        index
            .waiting
            .get_or_insert_with(|| ClaimIndex::waiting_of(claims))
            .insert((self.claim_seq, req.request.clone()));
        *index
            .per_developer
            .get_or_insert_with(|| ClaimIndex::per_developer_of(claims))
            .entry(req.developer.clone())
            .or_insert(0) += 1;
        self.claims.insert(
            req.request.clone(),
            Claim {
                request: req.request.clone(),
                agent: req.agent.clone(),
                developer: req.developer.clone(),
                workspace: req.workspace.clone(),
                seq: self.claim_seq,
                vm: None,
                failed: None,
                requested_at: now,
            },
        );
        self.reconcile(now)
    }

    /// Where the claim `request` stands.
    pub fn claim_state(&self, request: &str) -> ClaimState {
        let Some(claim) = self.claims.get(request) else {
            return ClaimState::Unknown;
        };
        if let Some(reason) = &claim.failed {
            return ClaimState::Failed {
                reason: reason.clone(),
            };
        }
        match &claim.vm {
            Some(vm) => match self.vms.get(vm) {
                Some(rec) if rec.state == VmState::Assigned => ClaimState::Assigned {
                    vm: vm.clone(),
                    host: rec.host.clone(),
                },
                _ => ClaimState::Booting { vm: vm.clone() },
            },
            None => {
                // Claims are served in arrival order: its place is one more than the waiting
                // claims that came before it (one pass, nothing sorted or copied).
                let ahead = self
                    .claims
                    .values()
                    .filter(|c| c.vm.is_none() && c.failed.is_none() && c.seq < claim.seq)
                    .count();
                ClaimState::Waiting {
                    position: ahead as u32 + 1,
                }
            }
        }
    }

    /// The agent behind `request` ended: its VM is deleted (never returned to the pool) and the
    /// claim forgotten. A VM still booting for it joins the pool like any other boot. Returns
    /// the VM being deleted, if any, and the intents. Releasing an unknown claim does nothing.
    pub fn release(&mut self, request: &str, now: Millis) -> (Option<VmId>, Vec<Intent>) {
        let Some(claim) = self.claims.remove(request) else {
            return (None, Vec::new());
        };
        if let Some(counts) = &mut self.claim_index.per_developer
            && let Some(n) = counts.get_mut(&claim.developer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&claim.developer);
            }
        }
        let mut out = Vec::new();
        let mut deleting = None;
        if let Some(vm) = claim.vm
            && let Some(rec) = self.vms.get_mut(&vm)
        {
            match rec.state {
                VmState::Assigned => {
                    out.push(self.mark_deleting(&vm, DeleteReason::AgentEnded));
                    deleting = Some(vm);
                }
                VmState::Booting => rec.claim = None,
                VmState::Warm | VmState::Deleting => {}
            }
        }
        out.extend(self.reconcile(now));
        (deleting, out)
    }

    /// Claims not served yet and not failed, in arrival order (from the waiting index, whose
    /// entries of claims no longer waiting are dropped here).
    fn waiting_claims(&mut self) -> Vec<String> {
        let claims = &self.claims;
        let index = self
            .claim_index
            .waiting
            .get_or_insert_with(|| ClaimIndex::waiting_of(claims));
        let mut waiting = Vec::new();
        index.retain(|(seq, request)| {
            let still = claims
                .get(request)
                .is_some_and(|c| c.seq == *seq && waits(c));
            if still {
                waiting.push(request.clone());
            }
            still
        });
        waiting
    }

    /// Serves waiting claims: a fresh warm VM of the claim's workspace when there is one,
    /// else a cold boot while there is room, first come first served, after the wakes of
    /// dormant VMs in line (see [`super::dormancy`]). Returns the intents and whether some
    /// claim or wake is still waiting for room (backfill must then hold back).
    pub(super) fn serve_claims(&mut self, now: Millis) -> (Vec<Intent>, bool) {
        let (mut out, mut waiting_for_room) = self.serve_wakes();
        self.vms.settle();
        let no_room = waiting_for_room > 0
            || self.recovery.is_some()
            || self.in_use() >= self.config.spec.max_vms;
        if no_room && !self.vms.any_warm() {
            // Nothing can be served (no warm VM, no room to boot one) and nothing evicted,
            // so the queue is not walked: with thousands of agents queued at max_vms an event
            // stays O(log n). Backfill cannot boot either, so "waiting" is answered without
            // looking. (A claim whose workspace is unknown fails at the next full pass.)
            return (out, true);
        }
        for request in self.waiting_claims() {
            let Some(claim) = self.claims.get(&request) else {
                continue;
            };
            let (workspace, agent) = (claim.workspace.clone(), claim.agent.clone());
            let Some(spec) = self.workspaces.get(&workspace).map(|w| w.spec.clone()) else {
                if let Some(c) = self.claims.get_mut(&request) {
                    c.failed = Some(format!("workspace {workspace} does not exist"));
                }
                continue;
            };
            if let Some(vm) = self.fresh_warm_vm(&workspace) {
                if let Some(rec) = self.vms.get_mut(&vm) {
                    rec.state = VmState::Assigned;
                    rec.agent = Some(agent.clone());
                    rec.claim = Some(request.clone());
                }
                if let Some(c) = self.claims.get_mut(&request) {
                    c.vm = Some(vm);
                }
                out.push(Intent::Notify { agent });
                continue;
            }
            if waiting_for_room == 0
                && self.recovery.is_none()
                && self.in_use() < self.config.spec.max_vms
                && let Some(Intent::Boot(boot)) = self.start_boot(&workspace, &spec, now)
            {
                if let Some(rec) = self.vms.get_mut(&boot.vm) {
                    rec.claim = Some(request.clone());
                    rec.agent = Some(agent);
                }
                if let Some(c) = self.claims.get_mut(&request) {
                    c.vm = Some(boot.vm.clone());
                }
                out.push(Intent::Boot(boot));
                continue;
            }
            waiting_for_room += 1;
        }
        if waiting_for_room > 0 {
            out.extend(self.evict_for_claims(waiting_for_room));
        }
        (out, waiting_for_room > 0)
    }

    /// Makes room for claims waiting at `max_vms`: deletes warm VMs (stale ones first, then
    /// the oldest), counting the deletes already under way as room on its way.
    fn evict_for_claims(&mut self, waiting: u32) -> Vec<Intent> {
        let wanted = waiting.saturating_sub(self.deleting()) as usize;
        self.warm_in_eviction_order()
            .into_iter()
            .take(wanted)
            .map(|(fresh, id)| {
                let reason = if fresh {
                    DeleteReason::ScaleIn
                } else {
                    DeleteReason::StaleImage
                };
                self.mark_deleting(&id, reason)
            })
            .collect()
    }

    /// The oldest warm VM of `workspace` that may be handed out.
    fn fresh_warm_vm(&mut self, workspace: &str) -> Option<VmId> {
        // Fresh: this workspace's current image, this generation (`is_fresh`).
        let image = self.workspaces.get(workspace)?.spec.image_ref.clone();
        self.vms.settle();
        self.vms.oldest_warm(workspace, &image, self.generation)
    }

    /// A VM booted for a claim came up: it is the claim's, whatever happened to the pool's
    /// generation meanwhile; returns the notification for its agent. `None` when the claim is
    /// gone (the VM then joins the pool).
    pub(super) fn hand_booted_vm_to_claim(&mut self, vm: &VmId) -> Option<Intent> {
        let request = self.vms.get(vm).and_then(|v| v.claim.clone())?;
        let owner = self
            .claims
            .get(&request)
            .filter(|c| c.vm.as_ref() == Some(vm))
            .map(|c| c.agent.clone());
        let rec = self.vms.get_mut(vm)?;
        match owner {
            Some(agent) => {
                rec.state = VmState::Assigned;
                Some(Intent::Notify { agent })
            }
            None => {
                rec.claim = None;
                rec.agent = None;
                None
            }
        }
    }

    /// A VM booted for a claim failed: the claim fails with the boot's error; returns the
    /// notification for its agent.
    pub(super) fn fail_claim_of(&mut self, vm: &VmId, error: &str) -> Option<Intent> {
        let request = self.vms.get(vm).and_then(|v| v.claim.clone())?;
        let c = self.claims.get_mut(&request)?;
        if c.vm.as_ref() != Some(vm) {
            return None;
        }
        c.vm = None;
        c.failed = Some(format!("the VM booted for this agent failed: {error}"));
        Some(Intent::Notify {
            agent: c.agent.clone(),
        })
    }

    /// VMs being booted right now.
    pub fn booting(&self) -> usize {
        self.vms
            .values()
            .filter(|v| v.state == VmState::Booting)
            .count()
    }

    /// The agent behind `request` found the VM it was handed owned by `owner` (another
    /// agent's claim request, as the substrate records it): a pool that recovered adopted a
    /// VM as warm before its first agent had started on it. The VM goes to `owner` (adopting
    /// its claim if the pool does not know it) and `request` waits for another VM.
    fn vm_taken(&mut self, request: &str, owner: &str, now: Millis) -> Vec<Intent> {
        let Some(vm) = self.claims.get(request).and_then(|c| c.vm.clone()) else {
            return self.reconcile(now);
        };
        if owner == request {
            return self.reconcile(now);
        }
        if let Some(c) = self.claims.get_mut(request) {
            c.vm = None;
        }
        self.claims_changed();
        if owner == crate::activity_api::DELETING_OWNER {
            // The VM is gone or going: if the pool still counts it as this claim's, it goes.
            let ours = self
                .vms
                .get(&vm)
                .is_some_and(|v| v.claim.as_deref() == Some(request));
            if ours {
                let mut out = vec![self.mark_deleting(&vm, DeleteReason::Died)];
                out.extend(self.reconcile(now));
                return out;
            }
        } else {
            self.give_to_owner(&vm, owner, now);
        }
        self.reconcile(now)
    }

    /// The substrate says `owner` (an agent's claim request) holds `vm`: the VM becomes that
    /// agent's, whatever the pool thought (its claim is adopted when the pool does not know
    /// it; a claim the VM was given to waits again). An owner that no longer runs is found by
    /// the reaper like any agent that ended without releasing.
    pub(super) fn give_to_owner(&mut self, vm: &VmId, owner: &str, now: Millis) {
        self.claims_changed();
        let agent = agent_of(owner).to_string();
        for c in self.claims.values_mut() {
            if c.vm.as_ref() == Some(vm) && c.request != owner {
                c.vm = None;
            }
        }
        self.claim_seq += 1;
        let seq = self.claim_seq;
        let (developer, workspace) = agent_developer_and_workspace(&agent);
        let workspace = workspace
            .or_else(|| self.vms.get(vm).map(|v| v.workspace.clone()))
            .unwrap_or_default();
        let held = self
            .claims
            .entry(owner.to_string())
            .or_insert_with(|| Claim {
                request: owner.to_string(),
                agent: agent.clone(),
                developer,
                workspace,
                seq,
                vm: None,
                failed: None,
                requested_at: now,
            });
        held.vm = Some(vm.clone());
        if let Some(rec) = self.vms.get_mut(vm) {
            rec.state = VmState::Assigned;
            rec.agent = Some(agent);
            rec.claim = Some(owner.to_string());
            rec.delete_reason = None;
            rec.delete_failures = 0;
            rec.delete_error = None;
        }
        self.reaper.adopted += 1;
    }

    /// A delete was refused because the substrate records `owner` (another agent's claim)
    /// as the VM's owner: the VM is that agent's, not the pool's to delete.
    pub fn delete_refused(&mut self, vm: &VmId, owner: &str, now: Millis) -> Vec<Intent> {
        if self.vms.contains_key(vm) {
            self.give_to_owner(vm, owner, now);
        }
        self.reconcile(now)
    }

    /// The claim request the substrate should find as `vm`'s owner, if any: a delete is
    /// refused when the VM's owner file names another agent.
    pub fn expected_owner(&self, vm: &VmId) -> Option<String> {
        self.vms
            .get(vm)
            .filter(|v| v.state != VmState::Booting)
            .and_then(|v| v.claim.clone())
    }
}

/// The agent workflow id of a claim request (`<workflow id>@<run id>`).
pub(super) fn agent_of(request: &str) -> &str {
    request.rsplit_once('@').map_or(request, |(agent, _)| agent)
}

/// The developer and workspace named in an agent workflow id
/// (`agent/<tenant>/<workspace>/<developer>/<slug>`).
pub(super) fn agent_developer_and_workspace(agent: &str) -> (String, Option<String>) {
    let parts: Vec<&str> = agent.split('/').collect();
    match parts.as_slice() {
        ["agent", _tenant, workspace, developer, _slug] => {
            ((*developer).to_string(), Some((*workspace).to_string()))
        }
        _ => (String::new(), None),
    }
}
