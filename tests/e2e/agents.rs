//! Agents end to end: spawn on warm VMs, hand-out under `max_vms`, flush and image changes
//! while agents run, kill, and the nuke (also across a worker crash). Real worker, real dev
//! server, real sandboxes.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Allow, PATIENCE, TestEnv, ids_in, stderr, stdout, warm};
use murmur_workflows::agent::Phase;
use murmur_workflows::model::VmState;

/// A command that runs until the test creates the file `go` in the VM's working directory.
const UNTIL_GO: &str = "while [ ! -f go ]; do sleep 0.05; done; echo released";

fn substrate_ids(env: &TestEnv) -> BTreeSet<String> {
    env.substrate().into_iter().map(|v| v.id.0).collect()
}

fn release(env: &TestEnv, vm: &str) {
    std::fs::write(env.vm_root(vm).join("go"), "").expect("write go file into the VM");
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only a live process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
}

#[test]
fn agents_take_warm_vms_and_the_pool_backfills() {
    let env = TestEnv::start("handout");
    env.set_workspace("default", "min_idle: 3\n");
    let before = env.wait_for("3 warm VMs", |s| warm(s) == 3);
    let warm_before: BTreeSet<String> = ids_in(&before, VmState::Warm).into_iter().collect();
    let boots_before = before.counters.boots;

    env.spawn("one", UNTIL_GO);
    env.spawn("two", UNTIL_GO);
    let one = env.wait_phase("one", Phase::Running);
    let two = env.wait_phase("two", Phase::Running);
    let (vm1, vm2) = (one.vm.unwrap().0, two.vm.unwrap().0);
    assert_ne!(vm1, vm2, "one VM handed to two agents");
    assert!(warm_before.contains(&vm1) && warm_before.contains(&vm2));

    let after = env.wait_for("backfill to 3 warm", |s| {
        warm(s) == 3 && ids_in(s, VmState::Assigned).len() == 2
    });
    // Exactly the two replacements were booted; no agent needed a boot of its own.
    assert_eq!(after.counters.boots, boots_before + 2);
    let assigned: BTreeSet<String> = ids_in(&after, VmState::Assigned).into_iter().collect();
    assert_eq!(assigned, BTreeSet::from([vm1.clone(), vm2.clone()]));

    // The command runs inside its VM, with the markers in its environment.
    release(&env, &vm1);
    let done = env.wait_phase("one", Phase::Completed);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.output_tail.as_deref(), Some("released\n"));
    // Its VM is destroyed, never returned to the pool.
    env.wait_for("the finished agent's VM to be gone", |s| {
        !s.vms.iter().any(|v| v.id.0 == vm1)
    });
    assert!(!substrate_ids(&env).contains(&vm1));
    assert!(env.agent("two").phase == Some(Phase::Running));
}

#[test]
fn the_agent_runs_in_its_vm_with_the_vm_markers() {
    let env = TestEnv::start("envs");
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn(
        "probe",
        "echo vm=$MURMUR_VM agent=$MURMUR_AGENT id=$MURMUR_VM_ID; pwd; exit 3",
    );
    let st = env.wait_phase("probe", Phase::Failed);
    let vm = st.vm.clone().unwrap().0;
    let tail = st.output_tail.unwrap();
    assert!(
        tail.starts_with(&format!("vm=1 agent=probe id={vm}\n")),
        "{tail}"
    );
    assert!(tail.contains(&format!("/{vm}/root")), "{tail}");
    assert_eq!(st.exit_code, Some(3));
    assert!(st.reached.contains(&Phase::Running));
    // `murmur status` prints the same as key: value lines.
    let text = env.murmur_ok(&["status", "probe"]);
    assert!(text.starts_with(&format!(
        "workflow: agent/{}/default/tester/probe\nphase:    PHASE_FAILED\nvm:       {vm}\n",
        env.tenant
    )));
    assert!(text.contains("exit code: 3\n"), "{text}");
}

#[test]
fn twenty_concurrent_spawns_share_ten_vms() {
    let env = TestEnv::start("twenty");
    env.set_workspace("default", "min_idle: 5\n");
    env.wait_for("5 warm VMs", |s| warm(s) == 5);

    // The invariants (never over max_vms in the substrate, no VM held twice, nothing the
    // pool does not know) are checked the whole time.
    env.sound_while(Allow::default(), |_| {
        let slugs: Vec<String> = (0..20).map(|i| format!("task-{i}")).collect();
        let spawns: Vec<_> = slugs
            .iter()
            .map(|slug| {
                env.murmur_cmd(&["spawn", slug, "--", "sleep 0.3; echo ok"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("start murmur spawn")
            })
            .collect();
        for child in spawns {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
        }

        let deadline = Instant::now() + PATIENCE;
        let mut vms = BTreeSet::new();
        for slug in &slugs {
            loop {
                let st = env.agent(slug);
                if st.phase == Some(Phase::Completed) {
                    assert_eq!(st.output_tail.as_deref(), Some("ok\n"));
                    assert!(vms.insert(st.vm.unwrap().0), "a VM served two agents");
                    break;
                }
                assert!(st.phase != Some(Phase::Failed), "{slug} failed: {st:#?}");
                assert!(Instant::now() < deadline, "{slug} never completed: {st:#?}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert_eq!(vms.len(), 20);

        // Nothing left behind: no claim, no assigned VM, the substrate is exactly the warm pool.
        let settled = env.wait_for("the pool to settle", |s| {
            s.claims.is_empty() && s.vms.iter().all(|v| v.state == VmState::Warm) && warm(s) == 5
        });
        let inventory: BTreeSet<String> = settled.vms.iter().map(|v| v.id.0.clone()).collect();
        assert_eq!(substrate_ids(&env), inventory);
        assert!(
            inventory.is_disjoint(&vms),
            "a used VM went back to the pool"
        );
    });
}

#[test]
fn a_flush_leaves_running_agents_and_their_vms_alone() {
    let env = TestEnv::start("flushrun");
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn("busy", UNTIL_GO);
    let vm = env.wait_phase("busy", Phase::Running).vm.unwrap().0;
    env.wait_for("backfill", |s| warm(s) == 2);

    let out = env.murmur(&["pool", "flush"]);
    assert_eq!(
        stdout(&out),
        "Flushing warm VMs...\nFlushed 2 warm VMs \u{2014} pool will replenish with fresh ones\n"
    );
    assert!(
        substrate_ids(&env).contains(&vm),
        "the flush took an agent's VM"
    );
    assert_eq!(env.agent("busy").phase, Some(Phase::Running));

    release(&env, &vm);
    let st = env.wait_phase("busy", Phase::Completed);
    assert_eq!(st.vm.unwrap().0, vm);
    assert_eq!(st.exit_code, Some(0));
}

#[test]
fn after_an_image_change_no_agent_gets_an_old_image_vm() {
    let env = TestEnv::start("imagechg");
    env.set_workspace("default", "min_idle: 3\n");
    env.wait_for("3 warm VMs", |s| warm(s) == 3);
    env.make_image("fresh", "true\n");
    // No flush: the three warm VMs of the old image are still there.
    env.murmur_ok(&["patch", "workspace", "default", "--set", "image_ref=fresh"]);
    for slug in ["first", "second"] {
        env.spawn(slug, "echo $MURMUR_IMAGE");
    }
    for slug in ["first", "second"] {
        let st = env.wait_phase(slug, Phase::Completed);
        assert_eq!(
            st.output_tail.as_deref(),
            Some("fresh\n"),
            "{slug} ran on a VM of the old image"
        );
    }
}

#[test]
fn kill_stops_the_command_and_destroys_the_vm() {
    let env = TestEnv::start("kill");
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn("victim", "echo $$ > pid; exec sleep 300");
    let vm = env.wait_phase("victim", Phase::Running).vm.unwrap().0;
    let pid_file = env.vm_root(&vm).join("pid");
    let deadline = Instant::now() + PATIENCE;
    let pid: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(alive(pid));

    let out = env.murmur(&["kill", "victim"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "killed victim\n");
    // `kill` answers once cleanup ran: command stopped, VM gone.
    assert!(!alive(pid), "the agent's command survived the kill");
    assert!(!Path::new(&env.vm_root(&vm)).exists(), "the VM survived");
    let st = env.agent("victim");
    assert_eq!(st.phase, Some(Phase::Canceled));
    assert!(!env.status().vms.iter().any(|v| v.id.0 == vm));
    // Killing it again is a clear error, not a second kill.
    let again = env.murmur(&["kill", "victim"]);
    assert!(
        stderr(&again).starts_with("FAILED_PRECONDITION: agent victim has already ended"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn keep_alive_agents_idle_with_their_vm_until_killed() {
    let env = TestEnv::start("idle");
    // No warm VMs: the agent's VM is cold-booted for it.
    env.set_workspace("default", "min_idle: 0\n");
    env.murmur_ok(&["spawn", "--on-idle", "keep-alive", "stay", "--", "true"]);
    let st = env.wait_phase("stay", Phase::Idle);
    let vm = st.vm.unwrap().0;
    assert_eq!(st.exit_code, Some(0));
    assert!(substrate_ids(&env).contains(&vm));
    let ls = env.murmur_ok(&["ls"]);
    assert_eq!(ls, format!("SLUG   PHASE   VM\nstay   idle    {vm}\n"));
    assert_eq!(env.murmur_ok(&["ls", "-q"]), "stay\n");
    assert_eq!(env.murmur_ok(&["kill", "stay"]), "killed stay\n");
    assert_eq!(env.agent("stay").phase, Some(Phase::Canceled));
    assert!(!substrate_ids(&env).contains(&vm));
    assert_eq!(env.murmur_ok(&["ls"]), "", "ls prints nothing when empty");
    assert_eq!(env.murmur_ok(&["ls", "--json"]).trim(), "[]");
}

#[test]
fn bad_slugs_unknown_agents_and_limits_are_clear_errors() {
    let env = TestEnv::start("errors");
    let out = env.murmur(&["spawn", "early", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("NOT_FOUND: workspace default does not exist"),
        "{}",
        stderr(&out)
    );
    env.set_workspace("default", "min_idle: 0\n");
    let out = env.murmur(&["spawn", "Bad_Slug", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("INVALID_ARGUMENT: invalid slug \"Bad_Slug\""));

    let out = env.murmur(&["status", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "NOT_FOUND: no agent with slug ghost\nCheck the slug spelling. Use murmur ls to see running agents.\n"
    );
    let out = env.murmur(&["kill", "ghost"]);
    assert!(stderr(&out).starts_with("NOT_FOUND: no agent with slug ghost\n"));

    env.murmur_ok(&[
        "patch",
        "pool-config",
        "default",
        "--set",
        "max_agents_per_developer=1",
    ]);
    env.spawn("only", UNTIL_GO);
    let out = env.murmur(&["spawn", "second", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).starts_with(
            "FAILED_PRECONDITION: developer tester already has 1 running agents (max_agents_per_developer is 1)"
        ),
        "{}",
        stderr(&out)
    );
    let out = env.murmur(&["spawn", "only", "--", "true"]);
    assert!(stderr(&out).starts_with("FAILED_PRECONDITION: agent only is already running"));
    let out = env.murmur(&["spawn", "nocmd"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing command is a usage error"
    );
}

#[test]
fn nuke_terminates_every_agent_and_deletes_every_vm() {
    let env = TestEnv::start("nuke");
    let bystander = TestEnv::start("bystander");
    bystander.set_workspace("default", "min_idle: 2\n");
    env.set_workspace("default", "min_idle: 3\n");
    env.wait_for("3 warm VMs", |s| warm(s) == 3);
    for i in 0..5 {
        env.spawn(&format!("a{i}"), UNTIL_GO);
    }
    let settled = env.wait_for("5 agents on VMs and 3 warm", |s| {
        warm(s) == 3 && ids_in(s, VmState::Assigned).len() == 5 && s.vms.len() == 8
    });
    let before: BTreeSet<String> = settled.vms.iter().map(|v| v.id.0.clone()).collect();
    let bystander_vms = bystander.wait_for("bystander warm", |s| warm(s) == 2);
    let mut orphan = env.plant_orphan("murmur-0badf00d");

    let out = env.murmur(&["pool", "flush", "--nuke"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Nuking all workflows and VMs...\nNuke complete (9 terminated/deleted)\n"
    );
    assert!(orphan.try_wait().unwrap().is_some(), "the orphan survived");

    // No agent workflow of the tenant runs any more.
    let listed = env.temporal(&[
        "workflow",
        "list",
        "--query",
        &format!(
            "MurmurTenant = '{}' AND MurmurKind = 'agent' AND ExecutionStatus = 'Running'",
            env.tenant
        ),
    ]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(
        !stdout(&listed).contains("agent/"),
        "agents still running:\n{}",
        stdout(&listed)
    );
    assert_eq!(env.murmur_ok(&["ls"]), "");
    assert_eq!(env.agent("a0").phase, Some(Phase::Canceled));
    // Every VM that existed is gone; what exists now is the pool's fresh backfill.
    let now = substrate_ids(&env);
    assert!(now.is_disjoint(&before), "VMs survived the nuke: {now:?}");
    assert!(!now.contains("murmur-0badf00d"));
    let after = env.wait_for("the pool to backfill", |s| warm(s) == 3);
    assert!(after.generation > settled.generation);
    assert!(after.claims.is_empty());
    // The other tenant was not touched.
    let untouched = bystander.status();
    assert_eq!(
        ids_in(&untouched, VmState::Warm),
        ids_in(&bystander_vms, VmState::Warm)
    );
}

#[test]
fn a_nuke_interrupted_by_a_worker_crash_completes_after_restart() {
    let mut env = TestEnv::start("nukecrash");
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn("doomed", UNTIL_GO);
    env.wait_phase("doomed", Phase::Running);
    let before: BTreeSet<String> = substrate_ids(&env);
    let mut orphan = env.plant_orphan("murmur-0000dead");

    let nuke = env
        .murmur_cmd(&["pool", "flush", "--nuke"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-nuke: the agent is terminated, the stubborn orphan is still being deleted.
    let deadline = Instant::now() + PATIENCE;
    while env.agent("doomed").phase != Some(Phase::Canceled) {
        assert!(
            Instant::now() < deadline,
            "the nuke never terminated the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.kill_worker();
    assert!(
        orphan.try_wait().unwrap().is_none(),
        "too late: the nuke finished before the crash"
    );
    env.start_worker();

    let out = nuke.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Nuking all workflows and VMs...\nNuke complete (4 terminated/deleted)\n"
    );
    assert!(orphan.try_wait().unwrap().is_some(), "the orphan survived");
    let now = substrate_ids(&env);
    assert!(
        now.is_disjoint(&before),
        "VMs leaked through the crash: {now:?}"
    );
    let after = env.wait_for("the pool to backfill", |s| warm(s) == 2);
    let inventory: BTreeSet<String> = after.vms.iter().map(|v| v.id.0.clone()).collect();
    assert_eq!(substrate_ids(&env), inventory);
}

#[test]
fn nukes_asked_at_the_same_time_join_one_run_also_through_the_temporal_cli() {
    let env = TestEnv::start("nukejoin");
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn("worker", UNTIL_GO);
    env.wait_phase("worker", Phase::Running);
    env.wait_for("backfill", |s| warm(s) == 1);
    // A stubborn orphan keeps the first nuke busy for a few seconds.
    let mut orphan = env.plant_orphan("murmur-00c0ffee");

    let first = env
        .murmur_cmd(&["pool", "flush", "--nuke"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let nuke_id = format!("nuke/{}", env.tenant);
    let deadline = Instant::now() + PATIENCE;
    while !env
        .temporal(&["workflow", "describe", "--workflow-id", &nuke_id])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the nuke never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same request through the temporal CLI, while the first one runs.
    let pool_id = format!("pool/{}", env.tenant);
    let signed = env.murmur_ok(&["auth", "sign", "nuke"]);
    let by_update = env
        .command_for_temporal(&[
            "workflow",
            "update",
            "execute",
            "-o",
            "json",
            "--workflow-id",
            &pool_id,
            "--name",
            "flush",
            "--input",
            signed.trim(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let second = env.murmur(&["pool", "flush", "--nuke"]);
    let first = first.wait_with_output().unwrap();
    let by_update = by_update.wait_with_output().unwrap();

    let expected = "Nuking all workflows and VMs...\nNuke complete (3 terminated/deleted)\n";
    assert_eq!(stdout(&first), expected, "{}", stderr(&first));
    assert_eq!(stdout(&second), expected, "{}", stderr(&second));
    assert!(by_update.status.success(), "{}", stderr(&by_update));
    let reply: serde_json::Value = serde_json::from_str(&stdout(&by_update)).unwrap();
    let nuke = &reply["result"]["nuke"];
    assert_eq!(nuke["terminated"], 1, "{reply}");
    assert_eq!(nuke["deleted"], 3, "{reply}");
    assert!(orphan.try_wait().unwrap().is_some(), "the orphan survived");

    let runs = env.temporal(&[
        "workflow",
        "count",
        "--query",
        &format!("WorkflowId = '{nuke_id}'"),
    ]);
    assert_eq!(stdout(&runs).trim(), "Total: 1", "{}", stdout(&runs));
}

#[test]
fn a_nuke_signal_from_the_temporal_cli_wipes_the_tenant() {
    let env = TestEnv::start("nukesig");
    env.set_workspace("default", "min_idle: 2\n");
    let before = env.wait_for("2 warm VMs", |s| warm(s) == 2);
    let g0 = before.generation;
    let old: BTreeSet<String> = ids_in(&before, VmState::Warm).into_iter().collect();
    let pool_id = format!("pool/{}", env.tenant);
    let signed = env.murmur_ok(&["auth", "sign", "nuke"]);
    let out = env.temporal(&[
        "workflow",
        "signal",
        "--workflow-id",
        &pool_id,
        "--name",
        "flush",
        "--input",
        signed.trim(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = env.wait_for("the nuke to reset the pool and backfill", |s| {
        s.generation > g0 && warm(s) == 2
    });
    let now: BTreeSet<String> = ids_in(&after, VmState::Warm).into_iter().collect();
    assert!(now.is_disjoint(&old));
    assert_eq!(substrate_ids(&env), now);
}

#[test]
fn agents_queued_at_max_vms_leave_the_pool_responsive_and_are_told_when_served() {
    let env = TestEnv::start("queue");
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=2"]);
    env.set_workspace("default", "min_idle: 0\n");
    env.sound_while(Allow::default(), |_| {
        let slugs: Vec<String> = (0..12).map(|i| format!("q{i}")).collect();
        for slug in &slugs {
            env.spawn(slug, UNTIL_GO);
        }
        let st = env.wait_for("2 agents on VMs, 10 queued", |s| {
            s.claims.len() == 12 && s.claims.iter().filter(|c| c.vm.is_none()).count() == 10
        });
        // Ten queued agents hold no update open: the pool still answers writes at once.
        let out = env.murmur(&["pool", "flush"]);
        assert!(out.status.success(), "{}", stderr(&out));
        env.murmur_ok(&["patch", "workspace", "default", "--set", "description=busy"]);
        let queued = env.agent(&slugs[11]);
        assert_eq!(queued.phase, Some(Phase::Starting));
        assert!(queued.queue_position.is_some(), "{queued:?}");

        // The two running agents finish; the next two in line are told and start.
        let running: Vec<String> = st
            .claims
            .iter()
            .filter_map(|c| c.vm.as_ref().map(|vm| vm.0.clone()))
            .collect();
        for vm in &running {
            // Their VMs may still be booting: wait until the command runs there.
            let root = env.vm_root(vm);
            let deadline = Instant::now() + PATIENCE;
            while !root.exists() {
                assert!(Instant::now() < deadline, "VM {vm} never came up");
                std::thread::sleep(Duration::from_millis(20));
            }
            release(&env, vm);
        }
        env.wait_for("the next two agents on VMs", |s| {
            s.claims.len() == 10 && s.claims.iter().filter(|c| c.vm.is_some()).count() == 2
        });
    });
}
