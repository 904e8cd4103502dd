//! The continuous invariant check catches what it is there for: a violation that lasts a
//! moment and then clears, made on purpose behind the pool's back.

use std::time::Duration;

use crate::harness::{Allow, TestEnv, warm};

/// A VM planted in the substrate for 300 ms and removed again (the pool never knew it) is
/// reported, and the same scenario without the plant reports nothing.
#[test]
fn a_violation_that_lasts_300_ms_and_then_clears_is_reported() {
    let env = TestEnv::start("sampler");
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);

    let ((), clean) = env.sampled(Allow::default(), |sampler| sampler.wait_reads(3));
    assert!(clean.is_empty(), "a quiet pool was reported: {clean:#?}");

    let ((), found) = env.sampled(Allow::default(), |sampler| {
        let mut orphan = env.plant_orphan("murmur-0dd0beef");
        // The violation lasts this long, whatever the sampler does meanwhile.
        std::thread::sleep(Duration::from_millis(300));
        let _ = orphan.kill();
        let _ = orphan.wait();
        std::fs::remove_dir_all(env.vm_dir("murmur-0dd0beef")).expect("remove the plant");
        sampler.wait_reads(2);
    });
    assert!(
        found
            .iter()
            .any(|v| v.contains("murmur-0dd0beef is in the substrate but not in the pool")),
        "the planted VM was not reported: {found:#?}"
    );
    assert!(
        env.substrate().iter().all(|v| v.id.0 != "murmur-0dd0beef"),
        "the plant is still there"
    );
}
