//! `murmur get | set | patch` and the error contract, against a real pool workflow.

use crate::harness::{TestEnv, stderr, stdout};

#[test]
fn invalid_config_is_rejected_with_the_exact_error_and_changes_nothing() {
    let env = TestEnv::start("cfg");
    env.set_workspace("default", "min_idle: 0\n");
    let before = env.murmur_ok(&["get", "pool-config", "default"]);

    let out = env.murmur(&["patch", "pool-config", "default", "--set", "max_vms=0"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "INVALID_ARGUMENT: max_vms must be positive\n");

    let long = format!("description: {}\nmax_vms: 5\n", "x".repeat(1025));
    let out = env.murmur_stdin(&["set", "pool-config", "default"], &long);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "INVALID_ARGUMENT: description exceeds 1024 byte limit (1025 bytes)\n"
    );

    let out = env.murmur(&["patch", "workspace", "default", "--set", "min_idel=3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("INVALID_ARGUMENT: unknown field"),
        "{}",
        stderr(&out)
    );

    let out = env.murmur(&["patch", "workspace", "nope", "--set", "min_idle=3"]);
    assert!(
        stderr(&out).starts_with("NOT_FOUND: workspace nope does not exist"),
        "{}",
        stderr(&out)
    );

    let out = env.murmur_stdin(&["set", "workspace", "Bad_Name"], "min_idle: 1\n");
    assert!(
        stderr(&out).starts_with("INVALID_ARGUMENT: invalid workspace name"),
        "{}",
        stderr(&out)
    );

    let out = env.murmur_stdin(&["set", "workspace", "default"], "min_idle: [\n");
    assert!(
        stderr(&out).starts_with("INVALID_ARGUMENT: YAML"),
        "{}",
        stderr(&out)
    );

    assert_eq!(
        env.murmur_ok(&["get", "pool-config", "default"]),
        before,
        "a rejected change changed something"
    );
}

#[test]
fn changes_bump_the_generation_and_record_who_made_them() {
    let env = TestEnv::start("gen");
    env.set_workspace("web", "min_idle: 0\nimage_ref: default\n");
    let out = env.murmur_ok(&[
        "patch",
        "workspace",
        "web",
        "--set",
        "description=frontend",
        "--set",
        "environment.vcpus=2",
    ]);
    assert_eq!(out, "workspace web configured (generation 2)\n");
    let doc = env.murmur_ok(&["get", "workspace", "web"]);
    let v: serde_json::Value = serde_norway::from_str(&doc).unwrap();
    assert_eq!(v["generation"], 2);
    assert_eq!(v["updated_by"], "tester");
    assert_eq!(v["spec"]["environment"]["vcpus"], 2);
    assert_eq!(v["spec"]["description"], "frontend");

    // A stale document is refused instead of overwriting a newer change.
    let stale = doc.replace("generation: 2", "generation: 1");
    let out = env.murmur_stdin(&["set", "workspace", "web"], &stale);
    assert!(
        stderr(&out).starts_with("FAILED_PRECONDITION: workspace web is at generation 2"),
        "{}",
        stderr(&out)
    );
    // The document `get` prints is accepted by `set` as it is.
    let out = env.murmur_stdin(&["set", "workspace", "web"], &doc);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn pool_commands_refuse_to_run_on_a_vm() {
    let env = TestEnv::start("onvm");
    for args in [
        &["pool", "flush"][..],
        &["pool", "flush", "--nuke"],
        &["pool", "status"],
        &["pool", "up"],
    ] {
        // A Temporal address nothing listens on: contacting it would exit 69 (UNAVAILABLE).
        let out = env
            .murmur_cmd(args)
            .env("MURMUR_VM", "1")
            .env("TEMPORAL_ADDRESS", "127.0.0.1:1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(stderr(&out), "pool commands are not supported on VMs\n");
        assert_eq!(stdout(&out), "");
    }
}

#[test]
fn status_of_a_pool_that_was_never_started_is_not_found() {
    let env = TestEnv::start("nf");
    let out = env.murmur(&["pool", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("NOT_FOUND: the pool of tenant"),
        "{}",
        stderr(&out)
    );
    let out = env.murmur_ok(&["pool", "up"]);
    assert!(out.contains(&format!("Pool pool/{}", env.tenant)), "{out}");
}
