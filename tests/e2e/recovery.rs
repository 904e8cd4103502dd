//! The pool cannot be lost: a pool run that ends (terminated, cancelled, in the middle of a
//! flush), that cannot delete a VM, or that does not answer loses no VM, no agent and no
//! config, and says what is going on; a nuke copied out of history changes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{
    Allow, EnvOptions, PATIENCE, TestEnv, ids_in, stderr, stdout, warm, while_checking,
};
use murmur_workflows::agent::Phase;
use murmur_workflows::model::VmState;

/// Ends the pool's run with the `temporal` CLI while an agent runs on one VM and two are warm,
/// then `murmur pool up`: the agent keeps its VM (checked all along) and completes, the config
/// is as it was (also while no pool runs), the warm VMs are the same ones, and the substrate
/// equals the inventory.
fn pool_ends_under_a_running_agent(name: &str, end: &[&str]) {
    let env = TestEnv::start_with(name, EnvOptions::default().fast_reaper());
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=7"]);
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn("keep", "sleep 6; echo still-here");
    let vm = env
        .wait_phase("keep", Phase::Running)
        .vm
        .expect("the agent's VM");
    let st = env.wait_for("2 warm VMs besides the agent's", |s| warm(s) == 2);
    let mut warm_before = ids_in(&st, VmState::Warm);
    warm_before.sort();
    let config_before = env.murmur_ok(&["get", "pool-config", "default"]);
    let workspace_before = env.murmur_ok(&["get", "workspace", "default"]);
    let pool_id = format!("pool/{}", env.tenant);

    // The agent's VM must exist until its command has exited and the agent lets it go
    // (task complete, destroying, completed). A sample can find the VM deleted before it sees
    // that, so a VM found gone counts only while the agent is not that far.
    let completed = AtomicBool::new(false);
    let vm_dir = env.vm_dir(&vm.0);
    let ((), violations) = env.sound_while(Allow::default(), |_| {
        while_checking(
            || {
                if completed.load(Ordering::Acquire) || vm_dir.exists() {
                    return None;
                }
                if matches!(
                    env.agent("keep").phase,
                    Some(Phase::TaskComplete | Phase::Destroying | Phase::Completed)
                ) {
                    completed.store(true, Ordering::Release);
                    return None;
                }
                Some(format!("{vm}, held by the running agent, is gone"))
            },
            || {
                let mut args = vec!["workflow"];
                args.extend_from_slice(end);
                args.extend_from_slice(&["--workflow-id", &pool_id]);
                let out = env.temporal(&args);
                assert!(out.status.success(), "{}", stderr(&out));
                // No pool runs now: `murmur get` answers from the record the run left, and the
                // status, still answered from the ended run, says that it ended.
                assert_eq!(
                    env.murmur_ok(&["get", "pool-config", "default"]),
                    config_before
                );
                assert!(
                    env.status().run_ended.is_some(),
                    "the status of an ended run did not say so"
                );
                let text = env.murmur_ok(&["pool", "status"]);
                assert!(text.starts_with("NOT RUNNING"), "{text}");
                env.murmur_ok(&["pool", "up"]);
                let st = env.status();
                assert!(
                    st.recovery.is_none(),
                    "pool up answered before the recovery ended"
                );
                let claim = st
                    .claims
                    .iter()
                    .find(|c| c.agent.ends_with("/keep"))
                    .expect("the agent's claim was rebuilt");
                assert_eq!(claim.vm.as_ref(), Some(&vm), "the agent's VM changed");
                // Adopted warm VMs pass their readiness handshake again before they are warm; no
                // other VM may have been booted in their place.
                let st = env.wait_for("2 warm VMs again", |s| warm(s) == 2);
                let mut warm_after = ids_in(&st, VmState::Warm);
                warm_after.sort();
                assert_eq!(warm_after, warm_before, "the warm VMs were not adopted");
                let done = env.wait_phase("keep", Phase::Completed);
                assert_eq!(done.vm.as_ref(), Some(&vm));
                assert!(
                    done.output_tail.unwrap_or_default().contains("still-here"),
                    "the agent did not finish its command"
                );
            },
        )
    });
    assert!(violations.is_empty(), "{violations:#?}");
    assert_eq!(
        env.murmur_ok(&["get", "pool-config", "default"]),
        config_before
    );
    assert_eq!(
        env.murmur_ok(&["get", "workspace", "default"]),
        workspace_before
    );
    let st = env.wait_settled_and_sound(PATIENCE);
    assert_eq!(st.config.max_vms, 7);
    assert!(env.pool_runs().len() >= 2, "no new run started");
}

#[test]
fn a_terminated_pool_loses_no_vm_no_agent_and_no_config() {
    pool_ends_under_a_running_agent("rterm", &["terminate", "--reason", "test"]);
}

#[test]
fn a_cancelled_pool_loses_no_vm_no_agent_and_no_config() {
    pool_ends_under_a_running_agent("rcancel", &["cancel"]);
}

/// Terminated while a flush waits for its deletes (slowed down): the recovered pool keeps
/// the flush's generation, deletes what was being flushed and refills with fresh VMs.
#[test]
fn a_pool_terminated_in_the_middle_of_a_flush_finishes_it_after_recovery() {
    let env = TestEnv::start_with(
        "rflush",
        EnvOptions::default()
            .fast_reaper()
            .worker("MURMUR_FAULTS", "latency=1500ms..1500ms,seed=3"),
    );
    env.set_workspace("default", "min_idle: 3\n");
    let st = env.wait_for("3 warm VMs", |s| warm(s) == 3);
    let before = ids_in(&st, VmState::Warm);
    let generation = st.generation;
    let flush = env
        .murmur_cmd(&["pool", "flush"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("murmur pool flush");
    // A boot the ended run had in flight still creates its VM after the new run has listed
    // the hosts: an orphan until the reaper deletes it (checked at the end), so orphans are
    // allowed while this runs; nothing may be lost or held twice.
    let allow = Allow {
        orphans: true,
        ..Allow::default()
    };
    env.sound_while(allow, |_| {
        env.wait_for("the flush under way", |s| s.flush_in_progress);
        let out = env.temporal(&[
            "workflow",
            "terminate",
            "--workflow-id",
            &format!("pool/{}", env.tenant),
            "--reason",
            "test",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let flushed = flush.wait_with_output().expect("the flush ends");
        assert!(
            !flushed.status.success() && !stderr(&flushed).is_empty(),
            "the interrupted flush must fail with a reason: {}",
            stdout(&flushed)
        );
        env.murmur_ok(&["pool", "up"]);
        let st = env.wait_for("3 fresh warm VMs", |s| {
            warm(s) == 3 && s.vms.iter().all(|v| v.state == VmState::Warm)
        });
        assert_eq!(
            st.generation,
            generation + 1,
            "the flush's generation was lost"
        );
        for vm in &before {
            assert!(
                !st.vms.iter().any(|v| &v.id.0 == vm),
                "{vm}, flushed, is still in the pool"
            );
        }
    });
    env.wait_settled_and_sound(PATIENCE);
}

/// An agent that leaves a read-only tree in its VM (Go's module cache does) under a worker
/// that is not root: its VM is still deleted.
#[test]
fn an_unprivileged_worker_deletes_a_vm_an_agent_left_read_only() {
    let env = TestEnv::start_with(
        "rdonly",
        EnvOptions {
            worker_uid: Some(65534),
            ..EnvOptions::default()
        },
    );
    assert!(env.worker_is_unprivileged());
    env.set_workspace("default", "min_idle: 0\n");
    env.spawn(
        "gomod",
        "mkdir -p cache/mod/pkg@v1 && echo x > cache/mod/pkg@v1/f.go && chmod -R a-w cache",
    );
    let done = env.wait_phase("gomod", Phase::Completed);
    let vm = done.vm.expect("the agent's VM");
    env.wait_for("the agent's VM deleted", |s| s.in_use == 0);
    assert!(
        !env.vm_dir(&vm.0).exists(),
        "{vm} is still on disk:\n{}",
        env.worker_log_tail()
    );
    assert_eq!(env.status().stuck_deleting_total, 0);
}

/// A VM that cannot be deleted (fault injection) is stuck, shown as such, counted, carried
/// across continue-as-new; flushes still answer and the pool still rolls over.
#[test]
fn a_vm_that_cannot_be_deleted_is_stuck_and_blocks_nothing() {
    let mut env = TestEnv::start_with(
        "rstuck",
        EnvOptions::default()
            .fast_reaper()
            .worker("MURMUR_FAULTS", "stuck_deletes=1")
            .worker("MURMUR_POOL_ROLL_OVER", "150"),
    );
    let metrics = env.enable_metrics();
    assert!(!metrics.is_empty());
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    let out = env.murmur_ok(&["pool", "flush"]);
    assert!(out.contains("Flushed 2 warm VMs"), "{out}");
    let st = env.wait_for("one VM stuck deleting, 2 warm again", |s| {
        s.stuck_deleting_total == 1 && warm(s) == 2
    });
    let stuck = &st.stuck_deleting[0];
    assert!(stuck.error.contains("cannot be deleted"), "{stuck:?}");
    assert!(
        env.vm_dir(&stuck.id.0).exists(),
        "the stuck VM is gone from the substrate"
    );
    assert_eq!(st.in_use, 3, "a stuck VM counts against max_vms");
    let text = env.murmur_ok(&["pool", "status"]);
    assert!(text.contains("Stuck deleting: 1 VM(s)"), "{text}");
    let series = format!("murmur_vms_stuck_deleting{{tenant=\"{}\"}} 1\n", env.tenant);
    env.wait_metrics("the stuck VM", |text| text.contains(&series));
    // The pool rolls over with the VM stuck, carries it, and still answers flushes.
    let runs_before = env.pool_runs().len();
    let deadline = Instant::now() + PATIENCE * 2;
    while env.pool_runs().len() == runs_before {
        assert!(
            Instant::now() < deadline,
            "the pool never rolled over with a stuck VM"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = env.status();
    assert_eq!(
        st.stuck_deleting_total, 1,
        "the stuck VM was not carried across"
    );
    assert_eq!(st.stuck_deleting[0].id, stuck.id);
    let out = env.murmur_ok(&["pool", "flush"]);
    assert!(out.contains("Flushed 2 warm VMs"), "{out}");
    env.wait_for("2 warm VMs after the second flush", |s| warm(s) == 2);
}

/// A nuke's input copied out of history and started again changes nothing: at once (its
/// request was used), after the pool rolled over (the record of it was carried), and signed
/// too long ago (refused whatever the pool remembers). A live agent and the warm VMs stay.
#[test]
fn a_replayed_nuke_changes_nothing() {
    let env = TestEnv::start_with(
        "rnuke",
        EnvOptions::default()
            .fast_reaper()
            .worker("MURMUR_POOL_ROLL_OVER", "150"),
    );
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    let out = env.murmur_ok(&["pool", "flush", "--nuke"]);
    assert!(out.contains("Nuke complete"), "{out}");
    let nuke_id = format!("nuke/{}", env.tenant);
    let input = nuke_input(&env, &nuke_id);

    env.spawn_with(&["--on-idle", "keep-alive"], "live", "true");
    env.wait_phase("live", Phase::Idle);
    let st = env.wait_for("1 warm VM besides the agent's", |s| warm(s) == 1);
    let vms_before: Vec<String> = st.vms.iter().map(|v| v.id.0.clone()).collect();
    let nukes_before = st.nukes;

    let replay = |why: &str, input: &str| {
        let out = env.temporal(&[
            "workflow",
            "start",
            "--type",
            "NukeWorkflow",
            "--task-queue",
            &env.task_queue,
            "--workflow-id",
            &nuke_id,
            "--input",
            input,
        ]);
        assert!(out.status.success(), "{why}: start: {}", stderr(&out));
        let out = env.temporal(&["workflow", "result", "--workflow-id", &nuke_id]);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !out.status.success(),
            "{why}: the replayed nuke succeeded: {text}"
        );
        text
    };
    let text = replay("at once", &input);
    assert!(text.contains("already used"), "at once: {text}");

    let runs = env.pool_runs().len();
    let deadline = Instant::now() + PATIENCE * 2;
    while env.pool_runs().len() == runs {
        assert!(Instant::now() < deadline, "the pool never rolled over");
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = replay("after the pool rolled over", &input);
    assert!(text.contains("already used"), "after the roll-over: {text}");

    // Signed long ago: refused for being stale, though the pool never saw this request.
    let credential = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "1h");
    let key = murmur_activities::auth::DeveloperKey::from_credential(&credential).unwrap();
    let mut stale: murmur_workflows::nuke_workflow::NukeInput =
        serde_json::from_str(&input).unwrap();
    stale.auth = None;
    let body = murmur_workflows::auth::unsigned_body(&stale);
    let signed_at = murmur_activities::auth::now_ms() - 10 * 60_000;
    stale.auth = Some(
        key.sign_at(
            murmur_workflows::auth::ops::NUKE,
            &nuke_id,
            &body,
            signed_at,
        )
        .unwrap(),
    );
    let text = replay(
        "signed too long ago",
        &serde_json::to_string(&stale).unwrap(),
    );
    assert!(text.contains("signed 600s away"), "stale: {text}");

    assert_eq!(
        env.agent("live").phase,
        Some(Phase::Idle),
        "the live agent was touched"
    );
    let st = env.status();
    assert_eq!(st.nukes, nukes_before);
    let vms_after: Vec<String> = st.vms.iter().map(|v| v.id.0.clone()).collect();
    assert_eq!(vms_after, vms_before, "VMs changed");
    assert!(
        st.denials
            .iter()
            .any(|d| d.op == "pool.nuke" && d.why.contains("already used")),
        "{:#?}",
        st.denials
    );
    env.murmur_ok(&["kill", "live"]);
}

/// The input a nuke was started with, from its history.
fn nuke_input(env: &TestEnv, nuke_id: &str) -> String {
    let events = env.history_events(nuke_id);
    let data = events[0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"][0]["data"]
        .as_str()
        .expect("the nuke's input");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .expect("base64 input");
    String::from_utf8(bytes).unwrap()
}

/// A pool that does not answer says so: `murmur pool status` names the reason and exits
/// with the unavailable code, an agent waiting for it says so in its status, and
/// `murmur pool up --restart` ends the run; the new one recovers and the agent goes on.
#[test]
fn a_pool_that_does_not_answer_is_visible_and_restart_recovers_it() {
    let env = TestEnv::start_with("rwedge", EnvOptions::default().fast_reaper());
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    let pool_id = format!("pool/{}", env.tenant);
    // The pool's run is replaced by one on a task queue no worker polls.
    let out = env.temporal(&[
        "workflow",
        "terminate",
        "--workflow-id",
        &pool_id,
        "--reason",
        "test",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let input = format!("{{\"tenant\":\"{}\"}}", env.tenant);
    let out = env.temporal(&[
        "workflow",
        "start",
        "--type",
        "PoolWorkflow",
        "--task-queue",
        "nobody-polls-this",
        "--workflow-id",
        &pool_id,
        "--input",
        &input,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = env.murmur(&["pool", "status"]);
    assert_eq!(
        out.status.code(),
        Some(murmur::EXIT_UNAVAILABLE),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("does not answer") && stderr(&out).contains("nobody-polls-this"),
        "{}",
        stderr(&out)
    );
    // Config reads still answer, from the record the ended run left.
    let config = env.murmur_ok(&["get", "workspace", "default"]);
    assert!(config.contains("min_idle: 1"), "{config}");

    env.spawn("waiter", "echo got-a-vm");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = env.agent("waiter");
        if st
            .waiting
            .as_deref()
            .is_some_and(|w| w.contains("the pool does not answer"))
        {
            assert_eq!(st.phase, Some(Phase::Starting));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting agent never said why: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = env.murmur(&["pool", "up", "--restart"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        env.worker_log_tail()
    );
    let done = env.wait_phase("waiter", Phase::Completed);
    assert!(done.output_tail.unwrap_or_default().contains("got-a-vm"));
    assert_eq!(env.agent("waiter").waiting, None);
    env.wait_settled_and_sound(PATIENCE);
}

/// A claim queued in a pool run that is terminated is not in the recovered pool (a pool's
/// record keeps its config, not its queue). The reaper finds the waiting agent running
/// without a claim and tells it to claim again, so it gets the VM its neighbour frees. A
/// waiting agent no longer looks at its claim every minute (it would look in an hour): this
/// sweep is what serves it.
#[test]
fn a_claim_queued_in_a_terminated_pool_run_is_served_after_recovery() {
    let env = TestEnv::start_with("lostclaim", EnvOptions::default().fast_reaper());
    env.queue_a_waiter_behind_a_holder("echo got-a-vm");
    assert_eq!(env.agent("waiter").phase, Some(Phase::Starting));

    let pool_id = format!("pool/{}", env.tenant);
    let out = env.temporal(&["workflow", "terminate", "--workflow-id", &pool_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.murmur_ok(&["pool", "up"]);
    // The recovered pool adopts the holder's VM and learns the waiter's claim again only
    // from the waiter.
    let st = env.wait_for(
        "the waiter told to claim again, its claim queued again",
        |s| s.reaper.agents_told_to_claim >= 1 && s.claims.len() == 2,
    );
    assert!(st.claims.iter().any(|c| c.vm.is_none()), "{st:#?}");

    env.murmur_ok(&["kill", "holder"]);
    let done = env.wait_phase("waiter", Phase::Completed);
    assert!(
        done.output_tail.unwrap_or_default().contains("got-a-vm"),
        "the waiter's command did not run"
    );
    env.wait_settled_and_sound(PATIENCE);
}
