//! Recovery: a pool whose previous run ended without handing over its state (cancelled,
//! terminated, reset, stopped by the server's history limit) rebuilds it from its sources of
//! truth before it deletes anything.
//!
//! - **Config** comes from the pool's *record* ([`PoolRecord`]: config, workspaces,
//!   generation, totals), which every run writes into its workflow memo whenever it changes;
//!   the memo of a closed run stays readable ([`Intent::ReadRecord`]).
//! - **VMs** come from the hosts: every VM's substrate record names its tenant, workspace,
//!   image, generation and, once an agent started on it, the agent (its claim request). The
//!   recovering pool's reaper rounds run back to back; each listing's VMs are adopted as
//!   assigned when a running agent owns them, adopted as warm (booted again: for a VM that
//!   is up that is only its readiness handshake) when they are fresh, and deleted when
//!   nobody owns them (see [`Pool::adopt`](super::Pool)).
//! - **Claims** of running agents are rebuilt from the VMs they own; an agent still waiting
//!   for a VM claims again when it finds its claim unknown.
//!
//! While recovering, claims are recorded and served from adopted VMs, but nothing boots and
//! nothing is shed: until every host has answered, `max_vms` cannot be judged. Recovery ends
//! after a round in which every live host answered in full (or after a few rounds, whoever
//! did not answer), and the ordinary reconcile takes over.

use serde::{Deserialize, Serialize};

use super::{Counters, Intent, Pool};
use crate::model::{Millis, PoolConfigSpec, Resource, WorkspaceSpec};
use std::collections::BTreeMap;

/// Rounds after which recovery ends even though some host did not answer (its VMs are
/// found by later rounds: adopted when an agent owns them, deleted otherwise).
pub const RECOVERY_MAX_ROUNDS: u32 = 5;

/// What a pool writes down so that a later run can start from it: everything that cannot be
/// read back from the hosts or from Temporal. Small: bounded by the number of workspaces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Tenant.
    pub tenant: String,
    /// The pool generation.
    pub generation: u64,
    /// `pool-config default`.
    pub config: Resource<PoolConfigSpec>,
    /// Workspaces by name.
    pub workspaces: BTreeMap<String, Resource<WorkspaceSpec>>,
    /// Nukes completed.
    #[serde(default)]
    pub nukes: u64,
    /// Running totals.
    #[serde(default)]
    pub counters: Counters,
}

/// How a recovery is going.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Recovery {
    /// The previous run's record was read (or there was none).
    pub config_read: bool,
    /// Where the config came from: `memo`, `history`, or `none` (a tenant without a pool
    /// before, or whose record could not be read: defaults).
    pub config_source: String,
    /// Rounds completed while recovering.
    pub rounds: u32,
    /// VMs adopted as held by a running agent.
    pub adopted_assigned: u64,
    /// VMs adopted as warm.
    pub adopted_warm: u64,
    /// VMs deleted because nobody owned them.
    pub deleted: u64,
}

impl Pool {
    /// The pool of a new workflow run that carries no state: defaults, until recovery reads
    /// back the previous run's record and the hosts' VMs.
    pub fn recovering(tenant: impl Into<String>, id_seed: u64, now: Millis) -> Self {
        let mut pool = Self::new(tenant, id_seed, now);
        pool.recovery = Some(Recovery::default());
        pool
    }

    /// True once the config in the pool is the tenant's (not while a recovery has yet to
    /// read it back).
    pub fn config_known(&self) -> bool {
        self.recovery.as_ref().is_none_or(|r| r.config_read)
    }

    /// What a later run needs to start from (written into the workflow memo).
    pub fn record(&self) -> PoolRecord {
        PoolRecord {
            tenant: self.tenant.clone(),
            generation: self.generation,
            config: self.config.clone(),
            workspaces: self.workspaces.clone(),
            nukes: self.nukes,
            counters: self.counters.clone(),
        }
    }

    /// The previous run's record arrived (`None`: there was none, or it could not be read),
    /// with where it came from. The pool takes its config, workspaces, generation and totals.
    pub fn record_read(
        &mut self,
        record: Option<PoolRecord>,
        source: &str,
        now: Millis,
    ) -> Vec<Intent> {
        let Some(recovery) = self.recovery.as_mut() else {
            return Vec::new();
        };
        if recovery.config_read {
            return Vec::new();
        }
        recovery.config_read = true;
        recovery.config_source = if record.is_some() { source } else { "none" }.to_string();
        if let Some(r) = record.filter(|r| r.tenant == self.tenant) {
            self.generation = r.generation.max(1);
            self.config = r.config;
            self.workspaces = r.workspaces;
            self.nukes = r.nukes;
            self.counters = r.counters;
        }
        self.record_changed();
        // The hosts are listed only now, so VMs are judged against the tenant's config.
        let mut out = self.restart_rounds();
        out.extend(self.reconcile(now));
        out
    }

    /// What a new run starts with: the record read of a recovery that has not got it yet,
    /// else a reaper round at once.
    pub(super) fn resume_recovery(&mut self) -> Vec<Intent> {
        if self.config_known() {
            self.restart_rounds()
        } else {
            vec![Intent::ReadRecord]
        }
    }

    /// A round ended: while recovering, it ends the recovery once every live host answered
    /// in full (or after [`RECOVERY_MAX_ROUNDS`]); the ordinary reconcile then takes over.
    pub(super) fn round_finished_recovery(&mut self, _now: Millis) -> Vec<Intent> {
        let incomplete = self.reaper.incomplete;
        let Some(r) = self.recovery.as_mut() else {
            return Vec::new();
        };
        r.rounds += 1;
        if incomplete && r.rounds < RECOVERY_MAX_ROUNDS {
            return Vec::new();
        }
        self.recovery = None;
        Vec::new()
    }
}
