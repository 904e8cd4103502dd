//! Dormant VMs: assigned VMs asleep without holding host memory, and the wakes that bring
//! them back under `max_vms`.
//!
//! `max_vms` bounds what a tenant holds on its hosts. A VM put to sleep by a substrate that
//! frees its memory (qemu saves the guest to a file and ends its process) holds only disk,
//! so once its agent reports the sleep the VM is *dormant*: it stays assigned to its agent
//! but no longer counts ([`Pool::in_use`]), and the room it left may boot a VM for another
//! agent. A VM asleep on a substrate that keeps its memory (the process substrate stops its
//! processes) is never reported, and counts all along.
//!
//! Waking needs that room back. The agent asks before it wakes the VM: with room, the VM
//! counts again at once and the agent wakes it; at `max_vms` the wake waits in line, in the
//! same order as claims (a ticket from the claims' sequence), ahead of every claim that
//! would need room, and warm VMs nobody waiting can use are evicted for it as they are for
//! claims. When it is let in, the agent is told (`claim_settled`) and asks again.
//!
//! | VM | event | becomes | answer |
//! |---|---|---|---|
//! | assigned, counted | sleep reported | dormant | `Dormant` |
//! | dormant | wake asked, room | counted | `Awake` |
//! | dormant | wake asked, no room | dormant, in line | `Waiting` |
//! | dormant, in line | room comes free (reconcile) | counted; agent told | — |
//! | dormant, in line | sleep reported again (the agent changed its mind) | dormant, out of line | `Dormant` |
//! | dormant | deleted (agent ended, nuke) | deleting, out of line, still not counted | — |
//! | not the agent's | anything | unchanged | `Unknown` |
//!
//! The pool's count errs one way only: a VM counts from the moment its agent asks to wake it
//! until the pool hears it is asleep again, so a VM holding memory is always counted. A pool
//! rebuilt from host listings (its run ended) counts every VM it adopts, dormant or not,
//! until the agent reports a sleep again.

use serde::{Deserialize, Serialize};

use super::{Intent, Pool};
use crate::model::{Millis, VmId, VmState};

/// What an agent tells the pool about its VM's power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerChange {
    /// The VM is asleep and holds no host memory.
    Dormant,
    /// The agent wants to wake the VM: it must count against `max_vms` again first.
    Wake,
}

/// Where a VM stands with the pool's count, as the pool answers an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum PowerState {
    /// Dormant: the VM does not count against `max_vms`.
    Dormant,
    /// The VM counts against `max_vms`: its agent may wake it.
    Awake,
    /// The wake waits for room under `max_vms`.
    Waiting {
        /// 1-based place among the wakes in line.
        position: u32,
    },
    /// The pool does not know the VM as this claim's (it counts as it did).
    Unknown,
}

impl Pool {
    /// The agent behind claim `request` reports its VM `vm` asleep without host memory, or
    /// asks to wake it. Idempotent: the same change again answers where the VM stands.
    pub fn power_changed(
        &mut self,
        request: &str,
        vm: &VmId,
        change: PowerChange,
        now: Millis,
    ) -> (PowerState, Vec<Intent>) {
        let ours = self
            .claims
            .get(request)
            .is_some_and(|c| c.vm.as_ref() == Some(vm) && c.failed.is_none())
            && self.vms.get(vm).is_some_and(|r| {
                r.state == VmState::Assigned && r.claim.as_deref() == Some(request)
            });
        if !ours {
            return (PowerState::Unknown, Vec::new());
        }
        let next_seq = self.claim_seq + 1;
        let Some(rec) = self.vms.get_mut(vm) else {
            return (PowerState::Unknown, Vec::new());
        };
        match change {
            PowerChange::Dormant => {
                rec.dormant = true;
                rec.wake_seq = 0;
            }
            PowerChange::Wake if rec.dormant && rec.wake_seq == 0 => {
                rec.wake_seq = next_seq;
                self.claim_seq = next_seq;
            }
            PowerChange::Wake => {}
        }
        self.vms.settle();
        let out = self.reconcile(now);
        (self.power_state(vm), out)
    }

    /// Where `vm` stands with the pool's count.
    pub fn power_state(&self, vm: &VmId) -> PowerState {
        match self.vms.get(vm) {
            None => PowerState::Unknown,
            Some(rec) if !rec.dormant => PowerState::Awake,
            Some(rec) if rec.wake_seq == 0 => PowerState::Dormant,
            Some(_) => {
                let position = self
                    .vms
                    .wakes_in_line()
                    .iter()
                    .position(|id| id == vm)
                    .map_or(0, |p| p + 1);
                PowerState::Waiting {
                    position: position as u32,
                }
            }
        }
    }

    /// Lets in the wakes waiting for room while there is room, first in line first (not
    /// while recovering: `max_vms` cannot be judged yet). Returns the notifications for
    /// their agents and how many still wait.
    pub(super) fn serve_wakes(&mut self) -> (Vec<Intent>, u32) {
        self.vms.settle();
        let line = self.vms.wakes_in_line();
        let mut out = Vec::new();
        let mut waiting = 0u32;
        for vm in line {
            if waiting == 0
                && self.recovery.is_none()
                && self.in_use() < self.config.spec.max_vms
                && let Some(rec) = self.vms.get_mut(&vm)
            {
                rec.dormant = false;
                rec.wake_seq = 0;
                if let Some(agent) = rec.agent.clone() {
                    out.push(Intent::Notify { agent });
                }
                self.vms.settle();
            } else {
                waiting += 1;
            }
        }
        (out, waiting)
    }
}
