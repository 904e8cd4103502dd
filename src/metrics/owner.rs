//! Which worker exports a pool's series. Every worker of a deployment can read every pool,
//! so if each exported all of them a fleet-wide `sum()` would read N times too high. Each
//! pool is exported by exactly one worker at a time: the live host that ranks highest for
//! the tenant by rendezvous (highest-random-weight) hashing. Every worker computes the same
//! answer from the same host view with no coordination, and when a host joins or is lost
//! only the pools it wins or held move.

use murmur_workflows::hosts::{HostState, HostView};

/// The host that exports `tenant`'s pool among the hosts of `view` that are not lost, or
/// `None` when no host is live.
pub fn exporter_of<'a>(tenant: &str, view: &'a HostView) -> Option<&'a str> {
    view.hosts
        .values()
        .filter(|h| h.state != HostState::Lost)
        .max_by_key(|h| (weight(tenant, &h.host), h.host.as_str()))
        .map(|h| h.host.as_str())
}

/// The rendezvous weight of (`tenant`, `host`): 64-bit FNV-1a over both, then the
/// SplitMix64 finaliser so that similar host names spread. Stable across processes, builds
/// and versions (unlike `std`'s hasher), as every worker of a fleet must agree on it.
fn weight(tenant: &str, host: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for byte in tenant.bytes().chain([0]).chain(host.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use murmur_workflows::hosts::HostInfo;
    use proptest::prelude::*;

    fn view(hosts: &[(&str, HostState)]) -> HostView {
        HostView {
            hosts: hosts
                .iter()
                .map(|(id, state)| {
                    (
                        id.to_string(),
                        HostInfo {
                            host: id.to_string(),
                            state: *state,
                            ..HostInfo::default()
                        },
                    )
                })
                .collect(),
            ..HostView::default()
        }
    }

    #[test]
    fn no_live_host_exports_nothing() {
        assert_eq!(exporter_of("t", &HostView::default()), None);
        assert_eq!(exporter_of("t", &view(&[("h1", HostState::Lost)])), None);
    }

    #[test]
    fn tenants_spread_over_hosts() {
        let v = view(&[
            ("h1", HostState::Live),
            ("h2", HostState::Live),
            ("h3", HostState::Live),
        ]);
        let mut per_host = std::collections::BTreeMap::new();
        for t in 0..300 {
            *per_host
                .entry(exporter_of(&format!("tenant-{t}"), &v).unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(per_host.len(), 3, "{per_host:?}");
        assert!(per_host.values().all(|n| *n > 50), "{per_host:?}");
    }

    proptest! {
        /// Losing a host moves only the pools it exported; every other pool stays put.
        #[test]
        fn losing_a_host_moves_only_its_pools(
            hosts in proptest::collection::btree_set("[a-z0-9-]{1,12}", 2..6),
            tenants in proptest::collection::vec("[a-z0-9-]{1,20}", 1..30),
            lost in 0usize..6,
        ) {
            let ids: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let lost = ids[lost % ids.len()];
            let before = view(&ids.iter().map(|h| (*h, HostState::Live)).collect::<Vec<_>>());
            let after = view(&ids.iter().map(|h| {
                (*h, if *h == lost { HostState::Lost } else { HostState::Live })
            }).collect::<Vec<_>>());
            for t in &tenants {
                let (b, a) = (exporter_of(t, &before), exporter_of(t, &after));
                prop_assert!(a.is_some() && a != Some(lost));
                if b != Some(lost) {
                    prop_assert_eq!(a, b);
                }
            }
        }
    }
}
