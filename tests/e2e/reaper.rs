//! The reaper against a real dev server and real sandboxes: VMs nobody knows are deleted after
//! the grace period, warm VMs that died are replaced, VMs of agents terminated from outside
//! murmur are given back, and stranded agent workflows are handled per
//! `reap_stranded_workflows`.

use std::time::{Duration, Instant};

use crate::harness::{EnvOptions, PATIENCE, TestEnv, ids_in, stdout, warm};
use murmur_activities::substrate::process::ProcessProvider;
use murmur_workflows::model::VmState;

#[test]
fn unknown_vms_are_deleted_after_the_grace_period_and_dead_ones_replaced() {
    let env = TestEnv::start_with("reap", EnvOptions::default().fast_reaper());
    env.set_workspace("default", "min_idle: 2\n");
    let st = env.wait_for("2 warm VMs", |s| warm(s) == 2);
    let first = ids_in(&st, VmState::Warm);

    // A VM nobody booted (a leak from some earlier life), and a warm VM whose process dies.
    let mut orphan = env.plant_orphan("murmur-1eafed00");
    let victim = &first[0];
    let dir = env.state_dir().join("vms").join(&env.tenant).join(victim);
    for pid in ProcessProvider::supervisor_pids(&dir) {
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .ok();
    }

    let st = env.wait_for("the orphan deleted and the dead VM replaced", |s| {
        s.reaper.orphans_deleted >= 1 && s.reaper.dead_vms_replaced >= 1 && warm(s) == 2
    });
    assert!(orphan.wait().is_ok(), "the orphan's process is gone");
    assert!(
        !ids_in(&st, VmState::Warm).contains(victim),
        "the dead VM is no longer counted as warm"
    );
    let st = env.wait_settled_and_sound(PATIENCE);
    assert_eq!(warm(&st), 2);
    assert!(
        !env.substrate().iter().any(|v| v.id.0 == "murmur-1eafed00"),
        "orphan still in the substrate"
    );
    let human = env.murmur_ok(&["pool", "status"]);
    assert!(
        human.contains("Reaper:") && human.contains("1 orphan"),
        "status shows the reaper's work:\n{human}"
    );
}

#[test]
fn a_vm_being_created_is_not_reaped() {
    // A slow boot (3 s) under a grace period of 2 s: the pool knows the VM from the moment
    // it asks for it, so the reaper must never take it for an orphan.
    let env = TestEnv::start_with("reapslow", EnvOptions::default().fast_reaper());
    env.make_image("slow", "#!/bin/sh\nsleep 3\n");
    env.set_workspace("default", "min_idle: 2\nimage_ref: slow\n");
    let st = env.wait_for("2 slow VMs warm, after a few scans", |s| {
        warm(s) == 2 && s.reaper.scans >= 3
    });
    assert_eq!(st.reaper.orphans_deleted, 0, "{:#?}", st.reaper);
    assert_eq!(st.counters.boot_failures, 0);
    assert_eq!(st.counters.boots, 2, "no VM was lost and booted again");
}

#[test]
fn the_vm_of_an_agent_terminated_from_outside_is_given_back() {
    let env = TestEnv::start_with("reapagent", EnvOptions::default().fast_reaper());
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn("stuck", "sleep 600");
    let st = env.wait_phase("stuck", murmur_workflows::agent::Phase::Running);
    let vm = st.vm.expect("agent has a VM").0;
    let out = env.temporal(&[
        "workflow",
        "terminate",
        "--workflow-id",
        &st.workflow,
        "--reason",
        "operator pressed the big red button",
    ]);
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));

    env.wait_for("the agent's claim released by the reaper", |s| {
        s.claims.is_empty() && s.reaper.agent_claims_released == 1
    });
    let deadline = Instant::now() + PATIENCE;
    while env.substrate().iter().any(|v| v.id.0 == vm) {
        assert!(
            Instant::now() < deadline,
            "{vm} still exists\n{}",
            env.worker_log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.wait_settled_and_sound(PATIENCE);
}

#[test]
fn stranded_agent_workflows_follow_the_policy() {
    let env = TestEnv::start_with(
        "stranded",
        EnvOptions::default()
            .fast_reaper()
            .worker("MURMUR_STRANDED_AFTER", "1s"),
    );
    env.set_workspace("default", "min_idle: 0\n");
    let id = start_stranded_agent(&env);

    // dry_run (the default): found and logged, left running.
    let st = env.wait_for("the stranded workflow found", |s| {
        s.reaper.stranded_found >= 1
    });
    assert_eq!(st.reaper.stranded_terminated, 0);
    assert!(
        env.worker_log()
            .contains("stranded agent workflow (reap_stranded_workflows: dry_run")
    );
    assert!(workflow_status(&env, &id).contains("RUNNING"));

    // enabled: terminated.
    env.murmur_ok(&[
        "patch",
        "pool-config",
        "default",
        "--set",
        "reap_stranded_workflows=enabled",
    ]);
    env.wait_for("the stranded workflow terminated", |s| {
        s.reaper.stranded_terminated >= 1
    });
    assert!(workflow_status(&env, &id).contains("TERMINATED"));
}

#[test]
fn disabled_leaves_stranded_workflows_alone() {
    let env = TestEnv::start_with(
        "strandoff",
        EnvOptions::default()
            .fast_reaper()
            .worker("MURMUR_STRANDED_AFTER", "1s"),
    );
    env.murmur_ok(&[
        "patch",
        "pool-config",
        "default",
        "--set",
        "reap_stranded_workflows=disabled",
    ]);
    let id = start_stranded_agent(&env);
    let st = env.wait_for("several scans", |s| s.reaper.scans >= 5);
    assert_eq!(st.reaper.stranded_found, 0);
    assert_eq!(st.reaper.stranded_terminated, 0);
    assert!(workflow_status(&env, &id).contains("RUNNING"));
}

/// Starts an agent workflow of a type no current worker knows: its workflow task fails on
/// every attempt, as it would for a build that was retired. Returns its id.
fn start_stranded_agent(env: &TestEnv) -> String {
    let id = format!("agent/{}/default/old/relic", env.tenant);
    let out = env.temporal(&[
        "workflow",
        "start",
        "--type",
        "murmur.agent.v0",
        "--task-queue",
        &env.task_queue,
        "--workflow-id",
        &id,
        "--search-attribute",
        &format!("MurmurTenant=\"{}\"", env.tenant),
        "--search-attribute",
        "MurmurKind=\"agent\"",
    ]);
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    id
}

fn workflow_status(env: &TestEnv, id: &str) -> String {
    let out = env.temporal(&["workflow", "describe", "--workflow-id", id, "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_default();
    json["workflowExecutionInfo"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
