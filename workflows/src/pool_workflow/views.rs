//! What the pool shows: the `up` summary, inventory pages, the config snapshot and the Web
//! UI's current details. Each is small whatever the pool's size.

use crate::machine::Pool;
use crate::messages::{ConfigSnapshot, INVENTORY_PAGE_MAX, Inventory, InventoryPage, UpReply};
use crate::model::VmState;
use crate::status::PoolStatus;

use super::PoolWorkflow;

/// The summary `up` answers with.
pub(super) fn up_reply(pool: &Pool) -> UpReply {
    let count = |state| pool.vms.values().filter(|v| v.state == state).count() as u32;
    UpReply {
        tenant: pool.tenant.clone(),
        generation: pool.generation,
        in_use: pool.in_use(),
        max_vms: pool.config.spec.max_vms,
        warm: count(VmState::Warm),
        booting: count(VmState::Booting),
        recovering: pool.recovery.is_some(),
    }
}

/// One page of the inventory.
pub(super) fn inventory(pool: &Pool, page: &InventoryPage) -> Inventory {
    let limit = match page.limit {
        0 => INVENTORY_PAGE_MAX,
        n => n.min(INVENTORY_PAGE_MAX),
    } as usize;
    let vms: Vec<_> = match &page.after {
        Some(after) => pool
            .vms
            .range((
                std::ops::Bound::Excluded(after.clone()),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, v)| v)
            .take(limit + 1)
            .cloned()
            .collect(),
        None => pool.vms.values().take(limit + 1).cloned().collect(),
    };
    let claims: Vec<_> = match &page.claims_after {
        Some(after) => pool
            .claims
            .range::<String, _>((
                std::ops::Bound::Excluded(after.clone()),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, c)| c)
            .take(limit + 1)
            .cloned()
            .collect(),
        None => pool.claims.values().take(limit + 1).cloned().collect(),
    };
    let (more_vms, more_claims) = (vms.len() > limit, claims.len() > limit);
    Inventory {
        vms: vms.into_iter().take(limit).collect(),
        claims: claims.into_iter().take(limit).collect(),
        more_vms,
        more_claims,
    }
}

/// Every resource of the tenant (`recovering` until a recovering pool has read them back).
pub(super) fn config_snapshot(pool: &Pool) -> ConfigSnapshot {
    let mut docs = pool.docs().into_iter();
    ConfigSnapshot {
        pool_config: docs.next().unwrap_or_else(|| pool.pool_config_doc()),
        workspaces: docs.collect(),
        recovering: !pool.config_known(),
    }
}

/// The Web UI's current details: generation, VMs in use, and per workspace the counts and
/// why it is short.
pub(super) fn details_markdown(s: &PoolWorkflow) -> String {
    let pool = &s.pool;
    let mut out = format!(
        "**pool/{}** generation {} — {} of {} VMs in use\n",
        pool.tenant,
        pool.generation,
        pool.in_use(),
        pool.config.spec.max_vms
    );
    if let Some(r) = &pool.recovery {
        out.push_str(&format!(
            "- recovering: config from {}, {} rounds, adopted {} assigned / {} warm, deleted {}\n",
            if r.config_read {
                r.config_source.as_str()
            } else {
                "(reading)"
            },
            r.rounds,
            r.adopted_assigned,
            r.adopted_warm,
            r.deleted
        ));
    }
    let stuck = pool.stuck_deleting().count();
    if stuck > 0 {
        out.push_str(&format!("- {stuck} VMs stuck deleting\n"));
    }
    for ws in &PoolStatus::workspaces_of(pool, s.flushes_in_progress > 0, pool.nuke.holds_pool()) {
        let (warm, booting, assigned, deleting) = ws.groups.iter().fold((0, 0, 0, 0), |a, g| {
            (
                a.0 + g.warm,
                a.1 + g.booting,
                a.2 + g.assigned,
                a.3 + g.deleting,
            )
        });
        out.push_str(&format!(
            "- `{}` image `{}`: {warm} warm / {booting} booting / {assigned} assigned / {deleting} deleting (min_idle {}){}\n",
            ws.name,
            ws.image_ref,
            ws.min_idle,
            if ws.reasons.is_empty() {
                String::new()
            } else {
                format!(" — {}", ws.reasons.join(", "))
            }
        ));
    }
    out
}
