//! `murmur sleep`, `murmur wake` and `murmur on-idle` on the process substrate: an agent put
//! to sleep goes on where it stopped, nothing in its VM runs while it sleeps, `--on-idle
//! sleep` parks the VM once the command exited, a kill or a nuke of a sleeping agent leaves
//! nothing behind, and a worker killed during a sleep or a wake loses and duplicates nothing.

use std::time::Duration;

use murmur_workflows::agent::Phase;

use crate::chaos::{spawn_murmur, wait_child};
use crate::harness::{COUNTER, PATIENCE, TestEnv, stderr, stdout};

/// The numbers are 1, 2, 3, ... with nothing skipped, repeated or restarted.
fn assert_one_count(seen: &[u64]) {
    let want: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(
        seen,
        want.as_slice(),
        "one count from 1, nothing lost or repeated"
    );
}

/// The scheduler state (`R`, `S`, `T` for stopped, ...) of a process, `None` once it is gone.
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the state follows the last `)`.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The process group id of the agent's run in its sandbox. The agent is `PHASE_RUNNING` as
/// soon as its run is asked for, a moment before the supervisor records the pid: waited for.
fn run_pid(env: &TestEnv, vm: &str, run: &str) -> i32 {
    let file = env.vm_dir(vm).join("runs").join(run).join("pid");
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(pid) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pid in {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every process of a process group (from `/proc`).
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    // state ppid pgrp ...
                    rest.split_whitespace().nth(2)?.parse::<i32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// Every process of the group is stopped (`T`), and there is at least one. A stop signal
/// takes effect as each process is next scheduled: waited for, up to [`PATIENCE`].
fn assert_frozen(pgid: i32) {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let states: Vec<(i32, Option<char>)> = group_members(pgid)
            .into_iter()
            .map(|pid| (pid, process_state(pid)))
            .collect();
        assert!(!states.is_empty(), "the agent's processes are there");
        if states.iter().all(|(_, state)| *state == Some('T')) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every process is stopped: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The group's leader runs again (not stopped), waited for as in [`assert_frozen`].
fn assert_thawed(pgid: i32) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while process_state(pgid) == Some('T') {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pgid} is still stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(process_state(pgid).is_some(), "process {pgid} is there");
}

#[test]
fn a_sleeping_agent_goes_on_where_it_stopped() {
    let env = TestEnv::start("sleep-counter");
    env.set_workspace("default", "min_idle: 1\n");
    env.spawn("counter", COUNTER);
    let st = env.wait_phase("counter", Phase::Running);
    let vm = st.vm.clone().expect("a VM").to_string();
    let run = st.run.clone().expect("a run id");
    env.wait_counted("counter", 3);

    assert_eq!(env.murmur_ok(&["sleep", "counter"]), "VM stopped\n");
    let st = env.agent("counter");
    assert_eq!(st.phase, Some(Phase::Sleeping), "{st:#?}");
    assert!(st.asleep);
    let text = env.murmur_ok(&["status", "counter"]);
    assert!(
        text.contains(&format!("vm:       {vm} [stopped]\n")),
        "{text}"
    );
    let pgid = run_pid(&env, &vm, &run);
    assert_frozen(pgid);
    // Asleep, nothing runs in it: no exec either, with a reason.
    let out = env.murmur(&["exec", "counter", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).starts_with(&format!("FAILED_PRECONDITION: VM {vm} is asleep")),
        "{}",
        stderr(&out)
    );

    let before = env.counted("counter");
    // Time passing while asleep is what is tested here: a counter that was not stopped
    // would print about five more numbers.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(env.counted("counter"), before, "nothing ran while asleep");
    assert_frozen(pgid);

    assert_eq!(env.murmur_ok(&["wake", "counter"]), "VM started\n");
    let st = env.agent("counter");
    assert_eq!(st.phase, Some(Phase::Running), "{st:#?}");
    assert!(!st.asleep);
    assert_eq!(
        st.vm.as_ref().map(ToString::to_string),
        Some(vm.clone()),
        "the same VM"
    );
    assert_eq!(
        st.reached.iter().filter(|p| **p == Phase::Sleeping).count(),
        1
    );
    let after = env.wait_counted("counter", before.len());
    // Resumed where it stopped: the next number, not 1, and not advanced by the sleep.
    assert_eq!(
        after[before.len()],
        before[before.len() - 1] + 1,
        "{after:?}"
    );
    assert_one_count(&after);
    assert_eq!(run_pid(&env, &vm, &run), pgid, "the same processes");

    // Sleeping and waking twice is fine; a kill of a sleeping agent destroys its VM.
    env.murmur_ok(&["sleep", "counter"]);
    assert_eq!(env.murmur_ok(&["sleep", "counter"]), "VM stopped\n");
    assert_eq!(env.murmur_ok(&["kill", "counter"]), "killed counter\n");
    assert_eq!(env.agent("counter").phase, Some(Phase::Canceled));
    // (A zombie has ended; it waits for whoever adopted it to reap it.)
    let left: Vec<(i32, Option<char>)> = group_members(pgid)
        .into_iter()
        .map(|pid| (pid, process_state(pid)))
        .filter(|(_, state)| *state != Some('Z'))
        .collect();
    assert!(left.is_empty(), "the agent's processes are gone: {left:?}");
    assert!(!env.vm_dir(&vm).exists(), "its sandbox is gone");
    env.wait_settled_and_sound(PATIENCE);
    // An ended agent cannot sleep or wake.
    let out = env.murmur(&["wake", "counter"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("FAILED_PRECONDITION: agent counter has already ended"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn on_idle_sleep_parks_the_vm_once_the_command_exited() {
    let env = TestEnv::start("sleep-on-idle");
    env.set_workspace("default", "min_idle: 1\n");
    env.spawn_with(&["--on-idle", "sleep"], "parked", "echo done");
    let st = env.wait_phase("parked", Phase::Sleeping);
    assert!(st.asleep, "{st:#?}");
    assert_eq!(st.exit_code, Some(0));
    let vm = st.vm.clone().expect("a VM").to_string();
    assert!(
        env.vm_dir(&vm).join("asleep").exists(),
        "the sandbox sleeps"
    );
    // A flush leaves a sleeping agent's VM alone: it is assigned.
    env.murmur_ok(&["pool", "flush"]);
    let st = env.wait_settled_and_sound(PATIENCE);
    assert!(
        st.vms.iter().any(|v| v.id.to_string() == vm),
        "the sleeping agent's VM is still in the pool's inventory"
    );
    assert!(env.vm_dir(&vm).exists());

    // Woken, it is idle with its VM; put to sleep again by hand.
    assert_eq!(env.murmur_ok(&["wake", "parked"]), "VM started\n");
    assert_eq!(env.agent("parked").phase, Some(Phase::Idle));
    assert!(!env.vm_dir(&vm).join("asleep").exists());
    assert_eq!(env.murmur_ok(&["sleep", "parked"]), "VM stopped\n");
    assert_eq!(env.agent("parked").phase, Some(Phase::Sleeping));

    // on-idle: sleep and keep-alive at runtime; terminate only at spawn.
    assert_eq!(
        env.murmur_ok(&["on-idle", "parked", "keep-alive"]),
        "on-idle set to keep-alive for parked\n"
    );
    assert_eq!(env.agent("parked").on_idle.as_str(), "keep-alive");
    let out = env.murmur(&["on-idle", "parked", "terminate"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot be set at runtime"),
        "{}",
        stderr(&out)
    );

    // A nuke deletes the sleeping VM with everything it kept.
    env.murmur_ok(&["pool", "flush", "--nuke"]);
    assert_eq!(env.agent("parked").phase, Some(Phase::Canceled));
    assert!(!env.vm_dir(&vm).exists(), "the sleeping VM is gone");
}

#[test]
fn a_worker_killed_during_a_sleep_or_a_wake_loses_nothing() {
    let mut env = TestEnv::start("sleep-chaos");
    env.set_workspace("default", "min_idle: 1\n");
    env.spawn("counter", COUNTER);
    let st = env.wait_phase("counter", Phase::Running);
    let vm = st.vm.clone().expect("a VM").to_string();
    let run = st.run.clone().expect("a run id");
    let pgid = run_pid(&env, &vm, &run);
    env.wait_counted("counter", 2);
    // Crash the worker at a few points inside each sleep and wake: the CLI call completes
    // once the worker is back, and the agent is then asleep or awake as asked, on its one
    // VM, with its one count.
    for (round, delay_ms) in [0u64, 30, 120, 400].into_iter().enumerate() {
        for (verb, phase, said) in [
            ("sleep", Phase::Sleeping, "VM stopped\n"),
            ("wake", Phase::Running, "VM started\n"),
        ] {
            let call = spawn_murmur(&env, &[verb, "counter"]);
            std::thread::sleep(Duration::from_millis(delay_ms));
            env.kill_worker();
            eprintln!("round {round}: {verb} crashed after {delay_ms} ms");
            env.start_worker();
            let out = wait_child(&env, call, PATIENCE);
            assert!(
                out.status.success(),
                "{verb} after a crash: {} {}",
                stdout(&out),
                stderr(&out)
            );
            assert_eq!(stdout(&out), said);
            let st = env.agent("counter");
            assert_eq!(st.phase, Some(phase), "{st:#?}");
            assert_eq!(st.vm.as_ref().map(ToString::to_string), Some(vm.clone()));
            if verb == "sleep" {
                assert_frozen(pgid);
            } else {
                assert_thawed(pgid);
            }
            let vms = env.substrate();
            assert_eq!(
                vms.iter().filter(|v| v.owner.is_some()).count(),
                1,
                "one agent VM, never a second: {vms:#?}"
            );
        }
    }
    let seen = env.wait_counted("counter", env.counted("counter").len());
    assert_one_count(&seen);
    env.wait_settled_and_sound(PATIENCE);
    env.murmur_ok(&["kill", "counter"]);
}

/// A stopped sandbox keeps its memory, so it keeps its place under `max_vms`: at the limit,
/// an agent spawned while another sleeps waits for room, and gets it when the sleeper ends.
#[test]
fn a_sleeping_sandbox_keeps_its_memory_and_its_place_under_max_vms() {
    let env = TestEnv::start("sleep-max-vms");
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=1"]);
    env.set_workspace("default", "min_idle: 0\n");
    env.spawn("sleeper", "sleep 600");
    env.wait_phase("sleeper", Phase::Running);
    assert_eq!(env.murmur_ok(&["sleep", "sleeper"]), "VM stopped\n");
    let pool = env.status();
    assert_eq!((pool.in_use, pool.dormant), (1, 0), "{pool:#?}");

    env.spawn("next", "sleep 600");
    let st = env.agent("next");
    assert_eq!(st.phase, Some(Phase::Starting), "{st:#?}");
    assert_eq!(st.queue_position, Some(1), "the sleeper's VM still counts");
    assert_eq!(env.murmur_ok(&["kill", "sleeper"]), "killed sleeper\n");
    let st = env.wait_phase("next", Phase::Running);
    assert!(st.vm.is_some());
    env.murmur_ok(&["kill", "next"]);
    env.wait_settled_and_sound(PATIENCE);
}
