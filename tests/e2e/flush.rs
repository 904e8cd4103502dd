//! `murmur pool flush` end to end: real worker, real dev server, real sandboxes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::harness::{Allow, TestEnv, ids_in, stderr, stdout, warm};
use murmur_workflows::model::VmState;

fn substrate_ids(env: &TestEnv) -> BTreeSet<String> {
    env.substrate().into_iter().map(|v| v.id.0).collect()
}

fn inventory_ids(st: &murmur_workflows::status::PoolStatus) -> BTreeSet<String> {
    st.vms.iter().map(|v| v.id.0.clone()).collect()
}

#[test]
fn flush_replaces_every_warm_vm_with_a_fresh_one() {
    let env = TestEnv::start("flush");
    env.set_workspace("default", "min_idle: 3\n");
    let before = env.wait_for("3 warm VMs", |s| warm(s) == 3);
    let old: BTreeSet<String> = ids_in(&before, VmState::Warm).into_iter().collect();
    assert_eq!(
        substrate_ids(&env),
        old,
        "substrate holds exactly the warm VMs"
    );
    assert!(
        env.substrate().iter().all(|v| v.alive),
        "every sandbox supervisor runs"
    );

    let out = env.murmur(&["pool", "flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Flushing warm VMs...\nFlushed 3 warm VMs \u{2014} pool will replenish with fresh ones\n"
    );
    // The flush answers once its VMs are gone from the substrate.
    let now = substrate_ids(&env);
    assert!(
        now.is_disjoint(&old),
        "flushed sandboxes still exist: {now:?}"
    );

    let after = env.wait_for("3 fresh warm VMs", |s| s.workspaces[0].ready == 3);
    let fresh: BTreeSet<String> = ids_in(&after, VmState::Warm).into_iter().collect();
    assert!(fresh.is_disjoint(&old));
    assert!(after.vms.iter().all(|v| v.generation == after.generation));
    assert_eq!(substrate_ids(&env), fresh);
    // The three deletes went out as one activity (one host), not one each.
    let scheduled = scheduled_activities(&env);
    assert_eq!(
        scheduled
            .iter()
            .filter(|a| *a == "murmur.delete_vms")
            .count(),
        1,
        "{scheduled:?}"
    );
    assert!(
        !scheduled.iter().any(|a| a == "murmur.delete_vm"),
        "{scheduled:?}"
    );
}

/// The activity types the pool's current run has scheduled, in order.
fn scheduled_activities(env: &TestEnv) -> Vec<String> {
    env.history_events(&format!("pool/{}", env.tenant))
        .iter()
        .filter_map(|e| {
            e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn flush_of_an_empty_pool_says_there_was_nothing() {
    let env = TestEnv::start("empty");
    let out = env.murmur(&["pool", "flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Flushing warm VMs...\nNo warm VMs to flush\n");
}

#[test]
fn vms_booting_during_a_flush_are_never_warm_afterwards() {
    let env = TestEnv::start("booting");
    // Boots that take a while, so the flush lands while they are in flight.
    env.make_image("slow", "sleep 2\n");
    env.set_workspace("default", "min_idle: 2\nimage_ref: slow\n");
    let booting = env.wait_for("2 booting VMs", |s| ids_in(s, VmState::Booting).len() == 2);
    let pre_flush: BTreeSet<String> = ids_in(&booting, VmState::Booting).into_iter().collect();
    let out = env.murmur(&["pool", "flush"]);
    assert_eq!(stdout(&out), "Flushing warm VMs...\nNo warm VMs to flush\n");

    let deadline = Instant::now() + crate::harness::PATIENCE;
    loop {
        let st = env.status();
        let warm_now: BTreeSet<String> = ids_in(&st, VmState::Warm).into_iter().collect();
        assert!(
            warm_now.is_disjoint(&pre_flush),
            "a pre-flush VM became warm: {warm_now:?}"
        );
        if st.workspaces[0].ready == 2 && st.vms.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "pool never refilled: {st:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(substrate_ids(&env).is_disjoint(&pre_flush));
}

#[test]
fn max_vms_caps_what_exists_in_the_substrate() {
    let env = TestEnv::start("cap");
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=3"]);
    // Two workspaces want 6 warm VMs; the substrate never holds more than 3 (checked the
    // whole time), also while a flush replaces them.
    env.sound_while(Allow::default(), |_| {
        env.set_workspace("default", "min_idle: 3\n");
        env.set_workspace("other", "min_idle: 3\n");
        let st = env.wait_for("max_vms reached", |s| s.in_use == 3 && warm(s) == 3);
        env.murmur_ok(&["pool", "flush"]);
        let st = env.wait_for("3 fresh warm VMs", |s| {
            s.generation > st.generation
                && warm(s) == 3
                && s.vms.iter().all(|v| v.generation == s.generation)
        });
        assert_eq!(st.in_use, 3);
        assert!(
            st.workspaces
                .iter()
                .any(|w| w.reasons.contains(&"at_max_vms".to_string()))
        );
    });
}

#[test]
fn after_an_image_change_and_a_flush_every_warm_vm_is_from_the_new_image() {
    let env = TestEnv::start("image");
    env.make_image("img-b", "exit 0\n");
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.murmur_ok(&["patch", "workspace", "default", "--set", "image_ref=img-b"]);
    env.murmur_ok(&["pool", "flush"]);
    let st = env.wait_for("2 warm img-b VMs", |s| {
        s.workspaces[0].ready == 2 && s.vms.len() == 2
    });
    assert!(st.vms.iter().all(|v| v.image == "img-b"), "{:#?}", st.vms);
    assert!(env.substrate().iter().all(|v| v.image == "img-b"));
}

/// `temporal workflow signal|update execute --name flush [--input JSON]` on the pool.
fn temporal_flush(env: &TestEnv, how: &str, input: Option<&str>) -> std::process::Output {
    let wf = format!("pool/{}", env.tenant);
    let mut args: Vec<&str> = match how {
        "signal" => vec!["workflow", "signal"],
        _ => vec!["workflow", "update", "execute", "-o", "json"],
    };
    args.extend(["--workflow-id", &wf, "--name", "flush"]);
    if let Some(json) = input {
        args.extend(["--input", json]);
    }
    env.temporal(&args)
}

#[test]
fn temporal_cli_flushes_and_malformed_payloads_leave_the_pool_healthy() {
    let env = TestEnv::start("tcli");
    env.set_workspace("default", "min_idle: 1\n");
    let g0 = env.wait_for("1 warm VM", |s| warm(s) == 1).generation;

    // A signed request, as `murmur auth sign` prints it, through a signal and an update.
    let signed = env.murmur_ok(&["auth", "sign", "flush"]);
    let out = temporal_flush(&env, "signal", Some(signed.trim()));
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for("flush by signal", |s| {
        s.generation == g0 + 1 && warm(s) == 1
    });

    let signed = env.murmur_ok(&["auth", "sign", "flush"]);
    let out = temporal_flush(&env, "update", Some(signed.trim()));
    assert!(out.status.success(), "{}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("update JSON");
    assert_eq!(reply["result"]["flushed"], 1, "{reply}");

    // Without a credential nothing happens, and the refusal is on record.
    let out = temporal_flush(&env, "update", Some("{}"));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("UNAUTHENTICATED: identity token is missing or expired"),
        "{}",
        stderr(&out)
    );
    let out = temporal_flush(&env, "signal", None);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for("the bare signal to be refused", |s| s.denials.len() >= 2);
    assert_eq!(env.status().generation, g0 + 2);

    for bad in ["\"x\"", "{\"nuke\":\"yes\"}", "[1,2]", "{\"workspace\":7}"] {
        assert!(temporal_flush(&env, "signal", Some(bad)).status.success());
    }
    let out = temporal_flush(&env, "update", Some("{\"nuke\":\"yes\"}"));
    assert!(!out.status.success(), "a malformed update must be rejected");

    let st = env.wait_for("rejections counted", |s| s.rejected_messages >= 4);
    assert_eq!(st.generation, g0 + 2, "bad messages must not flush");
    let wf = format!("pool/{}", env.tenant);
    let out = env.temporal(&["workflow", "describe", "--workflow-id", &wf, "-o", "json"]);
    let describe = stdout(&out);
    assert!(
        !describe.contains("\"pendingWorkflowTask\""),
        "workflow task is stuck: {describe}"
    );
}

#[test]
fn worker_killed_during_a_flush_finishes_it_after_restart_without_leaks() {
    let mut env = TestEnv::start("crash");
    env.set_workspace("default", "min_idle: 3\n");
    let before = env.wait_for("3 warm VMs", |s| warm(s) == 3);
    let old: BTreeSet<String> = ids_in(&before, VmState::Warm).into_iter().collect();

    let flush = env
        .murmur_cmd(&["pool", "flush"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the worker as soon as the flush is in the pool's history.
    let deadline = Instant::now() + crate::harness::PATIENCE;
    while env.status().generation == before.generation {
        assert!(Instant::now() < deadline, "flush never reached the pool");
        std::thread::sleep(Duration::from_millis(10));
    }
    env.kill_worker();
    env.start_worker();

    let out = flush.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Flushing warm VMs...\nFlushed 3 warm VMs \u{2014} pool will replenish with fresh ones\n"
    );
    let st = env.wait_for("3 fresh warm VMs", |s| {
        s.workspaces[0].ready == 3 && s.vms.len() == 3
    });
    let substrate = substrate_ids(&env);
    assert_eq!(
        substrate,
        inventory_ids(&st),
        "substrate and inventory differ"
    );
    assert!(substrate.is_disjoint(&old));
}
