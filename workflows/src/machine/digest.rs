//! Bucket digests: how a reaper scan compares a large inventory with what a host (or
//! Temporal) really holds while sending almost nothing when they agree.
//!
//! Both sides split their keys (VM ids, claim request ids) into the same number of buckets by
//! a stable hash and sum the hashes per bucket (wrapping, so order does not matter). The pool
//! sends its sums; the other side answers with the keys of the buckets whose sums differ,
//! whole buckets only, up to a cap. A pool of 10,000 VMs that agrees with its hosts exchanges
//! a few kilobytes per scan instead of every VM id, and a disagreement costs only the
//! buckets it touches (anti-entropy in the manner of Dynamo's Merkle trees, one level deep).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most buckets a digest has (its size on the wire: 8 bytes each).
pub const MAX_BUCKETS: u32 = 1024;
/// Keys per bucket aimed for when choosing the bucket count.
const KEYS_PER_BUCKET: usize = 8;

/// FNV-1a over the key's bytes: stable across builds and platforms.
pub fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The bucket of `key` among `buckets` (a power of two).
pub fn bucket_of(key: &str, buckets: u32) -> u32 {
    // The high bits: FNV's low bits mix less well.
    let b = u64::from(buckets.max(1));
    ((key_hash(key) >> 32) % b) as u32
}

/// The bucket count for about `keys` keys: a power of two, 1 to [`MAX_BUCKETS`].
pub fn buckets_for(keys: usize) -> u32 {
    let wanted = keys.div_ceil(KEYS_PER_BUCKET).max(1);
    (wanted.next_power_of_two() as u32).min(MAX_BUCKETS)
}

/// Per-bucket sums of the hashes of a set of keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digests {
    /// Number of buckets (a power of two).
    pub buckets: u32,
    /// One wrapping sum per bucket.
    pub sums: Vec<u64>,
}

impl Digests {
    /// The digests of `keys` over `buckets` buckets.
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a str>, buckets: u32) -> Self {
        let buckets = buckets.clamp(1, MAX_BUCKETS);
        let mut sums = vec![0u64; buckets as usize];
        for key in keys {
            let i = bucket_of(key, buckets) as usize;
            sums[i] = sums[i].wrapping_add(key_hash(key));
        }
        Self { buckets, sums }
    }

    /// True when bucket `b` has the same sum on both sides.
    pub fn agrees(&self, other: &Digests, b: u32) -> bool {
        self.buckets == other.buckets && self.sums.get(b as usize) == other.sums.get(b as usize)
    }
}

/// What the other side answers: the keys of whole buckets that differ, at most `cap` of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, bound(deserialize = "T: Deserialize<'de>"))]
pub struct Differences<T> {
    /// Buckets listed in full below.
    pub reported: Vec<u32>,
    /// Every item of the reported buckets.
    pub items: Vec<T>,
    /// True when some differing buckets were left out (over the cap): ask again.
    pub truncated: bool,
    /// How many keys the other side holds in all (the next scan sizes its buckets by it).
    pub total: u32,
}

impl<T> Default for Differences<T> {
    fn default() -> Self {
        Self {
            reported: Vec::new(),
            items: Vec::new(),
            truncated: false,
            total: 0,
        }
    }
}

impl<T> Differences<T> {
    /// Compares `theirs` (the pool's digests) with `items` (what this side holds, each with
    /// its key) and keeps the items of the differing buckets, whole buckets in bucket order,
    /// while at most `cap` items are kept.
    pub fn between(theirs: &Digests, items: Vec<(String, T)>, cap: usize) -> Self {
        Self::between_flagging(theirs, items, cap, |_| false)
    }

    /// Like [`Differences::between`], but an item for which `flagged` holds (a VM that is
    /// dead, say) is left out of this side's sums, so its bucket always differs and it is
    /// always reported.
    pub fn between_flagging(
        theirs: &Digests,
        items: Vec<(String, T)>,
        cap: usize,
        flagged: impl Fn(&T) -> bool,
    ) -> Self {
        let buckets = theirs.buckets.clamp(1, MAX_BUCKETS);
        let total = u32::try_from(items.len()).unwrap_or(u32::MAX);
        let mut by_bucket: BTreeMap<u32, Vec<(String, T)>> = BTreeMap::new();
        for (key, item) in items {
            by_bucket
                .entry(bucket_of(&key, buckets))
                .or_default()
                .push((key, item));
        }
        let ours = |b: u32| -> u64 {
            by_bucket.get(&b).map_or(0, |items| {
                items
                    .iter()
                    .filter(|(_, item)| !flagged(item))
                    .fold(0u64, |s, (k, _)| s.wrapping_add(key_hash(k)))
            })
        };
        let mut out = Self {
            total,
            ..Self::default()
        };
        let has_flagged = |b: u32| {
            by_bucket
                .get(&b)
                .is_some_and(|items| items.iter().any(|(_, item)| flagged(item)))
        };
        let differing: Vec<u32> = (0..buckets)
            .filter(|b| {
                theirs.sums.get(*b as usize).copied().unwrap_or(0) != ours(*b) || has_flagged(*b)
            })
            .collect();
        for b in differing {
            let size = by_bucket.get(&b).map_or(0, Vec::len);
            if out.items.len() + size > cap {
                // Whole buckets only; a bucket bigger than the cap on its own tells the
                // asker to use more buckets (it sizes them by `total`).
                out.truncated = true;
                break;
            }
            out.reported.push(b);
            if let Some(mut items) = by_bucket.remove(&b) {
                items.sort_by(|a, b| a.0.cmp(&b.0));
                out.items.extend(items.into_iter().map(|(_, item)| item));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: u32) -> Vec<String> {
        (0..n).map(|i| format!("murmur-{i:08x}")).collect()
    }

    #[test]
    fn agreeing_sides_exchange_nothing() {
        let ks = keys(500);
        let d = Digests::of(ks.iter().map(String::as_str), buckets_for(ks.len()));
        assert_eq!(d.buckets, 64);
        let diff = Differences::between(&d, ks.iter().map(|k| (k.clone(), ())).collect(), 100);
        assert!(diff.reported.is_empty() && diff.items.is_empty() && !diff.truncated);
        assert_eq!(diff.total, 500);
    }

    #[test]
    fn one_extra_key_reports_only_its_bucket() {
        let ks = keys(500);
        let d = Digests::of(ks.iter().map(String::as_str), 64);
        let mut theirs: Vec<(String, String)> = ks.iter().map(|k| (k.clone(), k.clone())).collect();
        theirs.push(("murmur-ffffffff".into(), "murmur-ffffffff".into()));
        let diff = Differences::between(&d, theirs, 100);
        assert_eq!(diff.reported, vec![bucket_of("murmur-ffffffff", 64)]);
        assert!(diff.items.contains(&"murmur-ffffffff".to_string()));
        assert!(
            diff.items.len() < 30,
            "{} items for one extra key",
            diff.items.len()
        );
    }

    #[test]
    fn a_missing_key_reports_its_bucket_without_it() {
        let ks = keys(100);
        let d = Digests::of(ks.iter().map(String::as_str), 16);
        let theirs: Vec<(String, ())> = ks[1..].iter().map(|k| (k.clone(), ())).collect();
        let diff = Differences::between(&d, theirs, 100);
        assert_eq!(diff.reported, vec![bucket_of(&ks[0], 16)]);
    }

    #[test]
    fn the_cap_keeps_whole_buckets_and_says_so() {
        let ks = keys(1000);
        let empty = Digests::of(std::iter::empty(), 128);
        let diff = Differences::between(&empty, ks.iter().map(|k| (k.clone(), ())).collect(), 50);
        assert!(diff.truncated);
        assert!(diff.items.len() <= 50);
        let listed: usize = diff
            .reported
            .iter()
            .map(|b| ks.iter().filter(|k| bucket_of(k, 128) == *b).count())
            .sum();
        assert_eq!(listed, diff.items.len(), "buckets are reported whole");
    }

    #[test]
    fn a_flagged_item_always_reports_its_bucket() {
        let ks = keys(100);
        let d = Digests::of(ks.iter().map(String::as_str), 16);
        let items: Vec<(String, bool)> = ks.iter().map(|k| (k.clone(), k == &ks[3])).collect();
        let diff = Differences::between_flagging(&d, items, 100, |dead| *dead);
        assert_eq!(diff.reported, vec![bucket_of(&ks[3], 16)]);
        assert!(diff.items.contains(&true));
    }

    #[test]
    fn a_flagged_item_alone_reports_its_bucket() {
        // Nothing on the asker's side, one flagged item here: the sums agree (0), yet the
        // bucket is reported.
        let empty = Digests::of(std::iter::empty(), 1);
        let diff = Differences::between_flagging(&empty, vec![("k".to_string(), true)], 10, |d| *d);
        assert_eq!(diff.reported, vec![0]);
        assert_eq!(diff.items, vec![true]);
    }

    #[test]
    fn a_bucket_over_the_cap_asks_for_more_buckets() {
        let ks = keys(100);
        let empty = Digests::of(std::iter::empty(), 1);
        let diff = Differences::between(&empty, ks.iter().map(|k| (k.clone(), ())).collect(), 50);
        assert!(diff.truncated && diff.items.is_empty());
        assert_eq!(diff.total, 100);
        assert!(buckets_for(diff.total as usize) > 1);
    }

    #[test]
    fn bucket_counts_are_powers_of_two_within_bounds() {
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(8), 1);
        assert_eq!(buckets_for(9), 2);
        assert_eq!(buckets_for(10_000), 1024);
        assert_eq!(buckets_for(1_000_000), MAX_BUCKETS);
    }
}
