//! The pool's VM inventory with the indexes its decisions read, so that a decision does not
//! scan every VM:
//!
//! | index | answers | cost |
//! |---|---|---|
//! | VMs per (workspace, image, generation, state, host) | how many fresh warm or booting VMs a workspace has (reconcile) | O(keys of the workspace) |
//! | warm VMs per (workspace, image, generation), oldest first | the VM to hand out next | O(log n) |
//! | VMs and memory per host | where the next VM goes (placement) | O(hosts) |
//! | dormant VMs (asleep, holding no host memory), and the wakes waiting for room in line | what counts against `max_vms`; the wake to let in next | O(1); O(log n) |
//!
//! Every change goes through [`Inventory`]: [`Inventory::insert`], [`Inventory::remove`],
//! [`Inventory::clear`], [`Inventory::for_each_mut`] keep the indexes up to date at once;
//! [`Inventory::get_mut`] hands out the record and remembers what it was indexed under, and
//! [`Inventory::settle`] moves those records in the indexes. A query made while records are
//! unsettled answers from a scan instead, so an index can be slow but never wrong. The
//! indexes are derived data: they are not serialized, and [`Inventory::from`] rebuilds them.
//! [`Inventory::indexes_match_a_recount`] checks them against a full recount (the property
//! tests call it after every event).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Millis, VmId, VmRecord, VmState};

use super::placement::HostUsage;

/// (workspace, image, generation, state, host): the facts reconcile counts by.
type CountKey = (String, String, u64, VmState, Option<String>);
/// (workspace, image, generation, ready since, VM): warm VMs in hand-out order.
type WarmKey = (String, String, u64, Millis, VmId);
/// (place in line, VM): wakes of dormant VMs waiting for room.
type WakeKey = (u64, VmId);
/// What a record is indexed under.
type Indexed = (
    CountKey,
    Option<WarmKey>,
    Option<String>,
    u32,
    bool,
    Option<WakeKey>,
);

fn indexed(v: &VmRecord) -> Indexed {
    let count = (
        v.workspace.clone(),
        v.image.clone(),
        v.generation,
        v.state,
        v.host.clone(),
    );
    let warm = (v.state == VmState::Warm).then(|| {
        (
            v.workspace.clone(),
            v.image.clone(),
            v.generation,
            v.ready_at.unwrap_or(v.created_at),
            v.id.clone(),
        )
    });
    let wake = (v.dormant && v.wake_seq > 0).then(|| (v.wake_seq, v.id.clone()));
    (count, warm, v.host.clone(), v.memory_mb, v.dormant, wake)
}

/// The indexes proper.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Indexes {
    counts: BTreeMap<CountKey, u32>,
    warm: BTreeSet<WarmKey>,
    hosts: BTreeMap<String, HostUsage>,
    dormant: u32,
    wakes: BTreeSet<WakeKey>,
}

impl Indexes {
    fn add(&mut self, (count, warm, host, memory_mb, dormant, wake): Indexed) {
        *self.counts.entry(count).or_default() += 1;
        self.dormant += u32::from(dormant);
        if let Some(k) = wake {
            self.wakes.insert(k);
        }
        if let Some(k) = warm {
            self.warm.insert(k);
        }
        if let Some(host) = host {
            let u = self.hosts.entry(host).or_default();
            u.vms += 1;
            u.memory_mb += u64::from(memory_mb);
        }
    }

    fn sub(&mut self, (count, warm, host, memory_mb, dormant, wake): Indexed) {
        self.dormant = self.dormant.saturating_sub(u32::from(dormant));
        if let Some(k) = wake {
            self.wakes.remove(&k);
        }
        if let Some(n) = self.counts.get_mut(&count) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&count);
            }
        }
        if let Some(k) = warm {
            self.warm.remove(&k);
        }
        if let Some(host) = host
            && let Some(u) = self.hosts.get_mut(&host)
        {
            u.vms = u.vms.saturating_sub(1);
            u.memory_mb = u.memory_mb.saturating_sub(u64::from(memory_mb));
            if u.vms == 0 {
                self.hosts.remove(&host);
            }
        }
    }
}

/// Every VM the pool is responsible for, in any state, with its indexes.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    vms: BTreeMap<VmId, VmRecord>,
    idx: Indexes,
    /// Records handed out by `get_mut` since the last settle, with what they were indexed
    /// under then.
    unsettled: BTreeMap<VmId, Indexed>,
}

impl PartialEq for Inventory {
    fn eq(&self, other: &Self) -> bool {
        // The indexes follow from the records.
        self.vms == other.vms
    }
}

impl std::ops::Index<&VmId> for Inventory {
    type Output = VmRecord;

    /// The record of `id`; panics when there is none, as a map's index does (tests).
    fn index(&self, id: &VmId) -> &VmRecord {
        &self.vms[id]
    }
}

impl From<BTreeMap<VmId, VmRecord>> for Inventory {
    fn from(vms: BTreeMap<VmId, VmRecord>) -> Self {
        let mut inv = Inventory {
            vms,
            ..Inventory::default()
        };
        inv.rebuild();
        inv
    }
}

impl Inventory {
    /// The records, by VM id.
    pub fn map(&self) -> &BTreeMap<VmId, VmRecord> {
        &self.vms
    }

    /// The record of `id`.
    pub fn get(&self, id: &VmId) -> Option<&VmRecord> {
        self.vms.get(id)
    }

    /// True when the pool knows `id`.
    pub fn contains_key(&self, id: &VmId) -> bool {
        self.vms.contains_key(id)
    }

    /// How many VMs the pool knows.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// True when the pool knows no VM.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// The records, in VM id order.
    pub fn values(&self) -> std::collections::btree_map::Values<'_, VmId, VmRecord> {
        self.vms.values()
    }

    /// (id, record) pairs, in VM id order.
    pub fn iter(&self) -> std::collections::btree_map::Iter<'_, VmId, VmRecord> {
        self.vms.iter()
    }

    /// The VM ids, in order.
    pub fn keys(&self) -> std::collections::btree_map::Keys<'_, VmId, VmRecord> {
        self.vms.keys()
    }

    /// Records by id range (paging).
    pub fn range<R: std::ops::RangeBounds<VmId>>(
        &self,
        range: R,
    ) -> std::collections::btree_map::Range<'_, VmId, VmRecord> {
        self.vms.range(range)
    }

    /// Adds (or replaces) a record; returns the one it replaced.
    pub fn insert(&mut self, id: VmId, rec: VmRecord) -> Option<VmRecord> {
        let old = self.remove(&id);
        self.idx.add(indexed(&rec));
        self.vms.insert(id, rec);
        old
    }

    /// Removes a record.
    pub fn remove(&mut self, id: &VmId) -> Option<VmRecord> {
        let old = self.vms.remove(id)?;
        // The indexes hold the record as it was when it was last settled.
        let was = self.unsettled.remove(id).unwrap_or_else(|| indexed(&old));
        self.idx.sub(was);
        Some(old)
    }

    /// Forgets every record.
    pub fn clear(&mut self) {
        *self = Inventory::default();
    }

    /// The record of `id`, to change. The indexes follow at the next [`Inventory::settle`];
    /// until then queries answer from a scan.
    pub fn get_mut(&mut self, id: &VmId) -> Option<&mut VmRecord> {
        if !self.unsettled.contains_key(id) {
            let was = indexed(self.vms.get(id)?);
            self.unsettled.insert(id.clone(), was);
        }
        self.vms.get_mut(id)
    }

    /// Moves the records changed through [`Inventory::get_mut`] in the indexes.
    pub fn settle(&mut self) {
        for (id, was) in std::mem::take(&mut self.unsettled) {
            self.idx.sub(was);
            if let Some(rec) = self.vms.get(&id) {
                self.idx.add(indexed(rec));
            }
        }
    }

    /// Changes every record with `f`, then rebuilds the indexes (for changes to many VMs at
    /// once, such as a flush).
    pub fn for_each_mut(&mut self, f: impl FnMut(&mut VmRecord)) {
        self.vms.values_mut().for_each(f);
        self.rebuild();
    }

    /// Booting or warm VMs of `workspace` with `image` and `generation` whose host is not
    /// `excluded`.
    pub fn booting_or_warm(
        &self,
        workspace: &str,
        image: &str,
        generation: u64,
        excluded: impl Fn(&str) -> bool,
    ) -> u32 {
        let wanted = |w: &str, i: &str, g: u64, s: VmState, h: Option<&str>| {
            w == workspace
                && i == image
                && g == generation
                && matches!(s, VmState::Booting | VmState::Warm)
                && !h.is_some_and(&excluded)
        };
        if !self.unsettled.is_empty() {
            return self
                .vms
                .values()
                .filter(|v| {
                    wanted(
                        &v.workspace,
                        &v.image,
                        v.generation,
                        v.state,
                        v.host.as_deref(),
                    )
                })
                .count() as u32;
        }
        let from: CountKey = (
            workspace.to_string(),
            image.to_string(),
            generation,
            VmState::Booting,
            None,
        );
        self.idx
            .counts
            .range(from..)
            .take_while(|((w, i, g, s, _), _)| {
                w == workspace && i == image && *g == generation && *s <= VmState::Warm
            })
            .filter(|((w, i, g, s, h), _)| wanted(w, i, *g, *s, h.as_deref()))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Warm VMs of `workspace` with `image` and `generation`, oldest first (ties by id).
    pub fn warm_oldest_first(&self, workspace: &str, image: &str, generation: u64) -> Vec<VmId> {
        if !self.unsettled.is_empty() {
            let mut warm: Vec<(Millis, &VmId)> = self
                .vms
                .values()
                .filter(|v| {
                    v.state == VmState::Warm
                        && v.workspace == workspace
                        && v.image == image
                        && v.generation == generation
                })
                .map(|v| (v.ready_at.unwrap_or(v.created_at), &v.id))
                .collect();
            warm.sort();
            return warm.into_iter().map(|(_, id)| id.clone()).collect();
        }
        self.warm_range(workspace, image, generation)
            .map(|(_, _, _, _, id)| id.clone())
            .collect()
    }

    /// The oldest warm VM of `workspace` with `image` and `generation` (ties by id).
    pub fn oldest_warm(&self, workspace: &str, image: &str, generation: u64) -> Option<VmId> {
        if !self.unsettled.is_empty() {
            return self
                .warm_oldest_first(workspace, image, generation)
                .into_iter()
                .next();
        }
        self.warm_range(workspace, image, generation)
            .next()
            .map(|(_, _, _, _, id)| id.clone())
    }

    fn warm_range<'a>(
        &'a self,
        workspace: &'a str,
        image: &'a str,
        generation: u64,
    ) -> impl Iterator<Item = &'a WarmKey> + 'a {
        let from: WarmKey = (
            workspace.to_string(),
            image.to_string(),
            generation,
            0,
            VmId(String::new()),
        );
        self.idx
            .warm
            .range(from..)
            .take_while(move |(w, i, g, _, _)| w == workspace && i == image && *g == generation)
    }

    /// The oldest warm VM (by ready time, ties by id) among the groups of warm VMs — by
    /// (workspace, image, generation) — that `wanted` accepts. O(groups × log n) once
    /// settled: each group's oldest VM is the first of its range.
    pub fn oldest_warm_of_groups(&self, wanted: impl Fn(&str, &str, u64) -> bool) -> Option<VmId> {
        if !self.unsettled.is_empty() {
            return self
                .vms
                .values()
                .filter(|v| {
                    v.state == VmState::Warm && wanted(&v.workspace, &v.image, v.generation)
                })
                .min_by_key(|v| (v.ready_at.unwrap_or(v.created_at), v.id.clone()))
                .map(|v| v.id.clone());
        }
        let mut best: Option<(Millis, &VmId)> = None;
        let mut next = self.idx.warm.first();
        while let Some((w, i, g, ready, id)) = next {
            if wanted(w, i, *g) && best.is_none_or(|b| (*ready, id) < b) {
                best = Some((*ready, id));
            }
            // On to the next group: the first key past every key of this one.
            let past: WarmKey = match g.checked_add(1) {
                Some(g) => (w.clone(), i.clone(), g, 0, VmId(String::new())),
                None => (w.clone(), format!("{i}\0"), 0, 0, VmId(String::new())),
            };
            next = self.idx.warm.range(past..).next();
        }
        best.map(|(_, id)| id.clone())
    }

    /// True when some VM is warm. O(records changed since the last settle).
    pub fn any_warm(&self) -> bool {
        // The indexes hold changed records as they were: correct by what they are now.
        let was = self.unsettled.values().filter(|b| b.1.is_some()).count();
        let now = self.count_unsettled(|v| v.state == VmState::Warm);
        self.idx.warm.len() + now > was
    }

    /// Dormant VMs: asleep without holding host memory (they do not count against
    /// `max_vms`). O(records changed since the last settle): [`super::Pool::in_use`] asks
    /// on every decision.
    pub fn dormant(&self) -> u32 {
        let was = self.unsettled.values().filter(|b| b.4).count();
        let now = self.count_unsettled(|v| v.dormant);
        (self.idx.dormant as usize + now).saturating_sub(was) as u32
    }

    /// How many of the records changed since the last settle have `property` now.
    fn count_unsettled(&self, property: impl Fn(&VmRecord) -> bool) -> usize {
        self.unsettled
            .keys()
            .filter(|id| self.vms.get(id).is_some_and(&property))
            .count()
    }

    /// Dormant VMs whose agents wait for room to wake them, first in line first.
    pub fn wakes_in_line(&self) -> Vec<VmId> {
        if self.unsettled.is_empty() {
            return self.idx.wakes.iter().map(|(_, id)| id.clone()).collect();
        }
        let mut line: Vec<(u64, VmId)> = self
            .vms
            .values()
            .filter(|v| v.dormant && v.wake_seq > 0)
            .map(|v| (v.wake_seq, v.id.clone()))
            .collect();
        line.sort();
        line.into_iter().map(|(_, id)| id).collect()
    }

    /// This pool's VMs and memory per host (VMs without a host are not counted).
    pub fn host_usage(&self) -> BTreeMap<String, HostUsage> {
        if self.unsettled.is_empty() {
            return self.idx.hosts.clone();
        }
        let mut usage: BTreeMap<String, HostUsage> = BTreeMap::new();
        for v in self.vms.values() {
            if let Some(host) = &v.host {
                let u = match usage.get_mut(host.as_str()) {
                    Some(u) => u,
                    None => usage.entry(host.clone()).or_default(),
                };
                u.vms += 1;
                u.memory_mb += u64::from(v.memory_mb);
            }
        }
        usage
    }

    /// True when the indexes, once settled, equal a recount from the records.
    pub fn indexes_match_a_recount(&self) -> bool {
        let mut settled = self.clone();
        settled.settle();
        Inventory::from(self.vms.clone()).idx == settled.idx
    }

    fn rebuild(&mut self) {
        self.unsettled.clear();
        let mut idx = Indexes::default();
        for rec in self.vms.values() {
            idx.add(indexed(rec));
        }
        self.idx = idx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: u32, state: VmState, host: &str) -> VmRecord {
        VmRecord {
            id: VmId::from_bits(id),
            workspace: "web".into(),
            image: "img".into(),
            generation: 1,
            state,
            agent: None,
            claim: None,
            created_at: u64::from(id),
            ready_at: None,
            delete_reason: None,
            host: Some(host.into()),
            memory_mb: 256,
            delete_failures: 0,
            delete_error: None,
            warm_round: 0,
            dormant: false,
            wake_seq: 0,
        }
    }

    #[test]
    fn changed_records_move_in_the_indexes_and_unsettled_ones_are_answered_by_a_scan() {
        let mut inv = Inventory::default();
        for i in 0..4 {
            inv.insert(VmId::from_bits(i), vm(i, VmState::Warm, "h1"));
        }
        assert_eq!(inv.oldest_warm("web", "img", 1), Some(VmId::from_bits(0)));
        if let Some(rec) = inv.get_mut(&VmId::from_bits(0)) {
            rec.state = VmState::Assigned;
            rec.host = Some("h2".into());
            rec.dormant = true;
        }
        // Counts of changed records are right before a settle too, without a scan.
        assert_eq!(inv.dormant(), 1);
        assert!(inv.any_warm());
        // Unsettled: answered from a scan, already right.
        assert_eq!(inv.oldest_warm("web", "img", 1), Some(VmId::from_bits(1)));
        assert_eq!(inv.booting_or_warm("web", "img", 1, |_| false), 3);
        assert_eq!(inv.host_usage()["h2"].vms, 1);
        assert!(inv.indexes_match_a_recount());
        inv.settle();
        assert_eq!(inv.oldest_warm("web", "img", 1), Some(VmId::from_bits(1)));
        assert_eq!(inv.booting_or_warm("web", "img", 1, |_| false), 3);
        assert_eq!(inv.booting_or_warm("web", "img", 1, |h| h == "h1"), 0);
        assert_eq!(inv.host_usage()["h2"].vms, 1);
        // A record changed and then removed before a settle leaves nothing behind.
        if let Some(rec) = inv.get_mut(&VmId::from_bits(1)) {
            rec.state = VmState::Deleting;
        }
        inv.remove(&VmId::from_bits(1));
        inv.remove(&VmId::from_bits(0));
        inv.settle();
        assert!(!inv.host_usage().contains_key("h2"));
        assert!(inv.indexes_match_a_recount());
        assert_eq!(inv.dormant(), 0, "the dormant record was removed");
        inv.for_each_mut(|r| r.state = VmState::Deleting);
        assert!(inv.indexes_match_a_recount());
        assert!(!inv.any_warm());
        assert_eq!(inv.oldest_warm("web", "img", 1), None);
    }

    #[test]
    fn the_oldest_warm_vm_of_the_wanted_groups_is_what_a_scan_finds() {
        let mut inv = Inventory::default();
        // Three groups (workspace, image, generation), warm and not, ready times that
        // interleave across groups and tie within them.
        let groups = [("web", "img", 1), ("web", "img", 2), ("api", "old", 1)];
        for i in 0..30u32 {
            let (w, img, g) = groups[i as usize % 3];
            let mut rec = vm(i, VmState::Warm, "h1");
            rec.workspace = w.into();
            rec.image = img.into();
            rec.generation = g;
            rec.ready_at = Some(u64::from(100 - i / 2));
            if i % 4 == 0 {
                rec.state = VmState::Assigned;
            }
            inv.insert(rec.id.clone(), rec);
        }
        type Wanted<'a> = &'a dyn Fn(&str, &str, u64) -> bool;
        let scan = |inv: &Inventory, wanted: Wanted| {
            inv.values()
                .filter(|v| {
                    v.state == VmState::Warm && wanted(&v.workspace, &v.image, v.generation)
                })
                .min_by_key(|v| (v.ready_at.unwrap_or(v.created_at), v.id.clone()))
                .map(|v| v.id.clone())
        };
        let cases: [Wanted; 4] = [
            &|_, _, g| g != 2,
            &|w, _, _| w == "api",
            &|_, i, g| i == "img" && g == 2,
            &|_, _, _| false,
        ];
        for wanted in cases {
            assert_eq!(inv.oldest_warm_of_groups(wanted), scan(&inv, wanted));
        }
        assert!(inv.oldest_warm_of_groups(|_, _, _| true).is_some());
    }
}
