//! The `qemu` substrate end to end: real dev server, real worker, real qemu guests.
//! Reported as ignored (with the reason) where `qemu-system-x86_64` is not installed; with
//! `MURMUR_REQUIRE_QEMU=1` (CI) they run, and fail when it is missing.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::tmux::{KillSession, shell_command, tmux, wait_pane};
use crate::harness::{COUNTER, TestEnv, ids_in, stderr, stdout, warm};
use murmur_activities::substrate::qemu::QemuProvider;
use murmur_activities::substrate::qemu::launch::find_qemu;
use murmur_workflows::agent::Phase;
use murmur_workflows::model::VmState;

fn qemu_env(name: &str) -> TestEnv {
    assert!(
        find_qemu().is_some(),
        "qemu-system-x86_64 is required (MURMUR_REQUIRE_QEMU=1) but not installed: apt-get install qemu-system-x86"
    );
    TestEnv::start_on(name, "qemu")
}

/// Pids of the qemu processes running a VM of this test's tenant (from /proc, not from
/// murmur's own bookkeeping).
fn qemu_processes(env: &TestEnv) -> BTreeSet<i32> {
    let marker = format!(
        "{}/",
        env.state_dir().join("qemu/vms").join(&env.tenant).display()
    );
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = state
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            cmd.starts_with(
                &*find_qemu()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ) && cmd.contains(&marker)
                && !zombie
        })
        .collect()
}

fn vm_dirs(env: &TestEnv) -> BTreeSet<String> {
    std::fs::read_dir(env.state_dir().join("qemu/vms").join(&env.tenant))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn substrate_ids(env: &TestEnv) -> BTreeSet<String> {
    env.substrate().into_iter().map(|v| v.id.0).collect()
}

/// Waits until `pred` holds, failing after [`crate::harness::PATIENCE`].
fn eventually(env: &TestEnv, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + crate::harness::PATIENCE;
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            env.worker_log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `n` warm VMs that the substrate holds exactly, each with one live qemu.
fn wait_warm(env: &TestEnv, n: usize) -> BTreeSet<String> {
    let st = env.wait_for("warm qemu VMs", |s| {
        warm(s) as usize == n && s.vms.len() == n
    });
    // The accelerator the guests came up with is in the status (TCG here: KVM boots hang).
    assert!(
        matches!(st.accel.as_str(), "tcg" | "kvm"),
        "pool status names the accelerator: {:?}",
        st.accel
    );
    let ids: BTreeSet<String> = ids_in(&st, VmState::Warm).into_iter().collect();
    eventually(env, "the substrate to hold exactly the warm VMs", || {
        substrate_ids(env) == ids && qemu_processes(env).len() == n
    });
    assert!(env.substrate().iter().all(|v| v.alive));
    ids
}

fn image_kernel(env: &TestEnv, image: &str) -> String {
    QemuProvider::inspector(env.state_dir())
        .image_meta(image)
        .expect("image metadata")
        .kernel
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn warm_guests_run_agents_and_flush_replaces_them() {
    let env = qemu_env("qemu");
    env.set_workspace("default", "min_idle: 2\nenvironment:\n  memory_mb: 192\n");
    let first = wait_warm(&env, 2);
    let log = std::fs::read_to_string(env.dir.path().join("worker.log")).unwrap_or_default();
    assert!(
        log.contains("qemu substrate: guests run with"),
        "accel not logged"
    );

    // An agent's command runs inside the guest: its kernel, its marker file, its env.
    env.spawn(
        "kernel",
        "uname -r; cat /etc/murmur/vm; echo vm=$MURMUR_VM image=$MURMUR_IMAGE",
    );
    let done = env.wait_phase("kernel", Phase::Completed);
    let kernel = image_kernel(&env, "default");
    let host = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| stdout(&o).trim().to_string())
        .unwrap_or_default();
    eprintln!("guest kernel {kernel}, host kernel {host}");
    assert_eq!(
        done.output_tail.as_deref(),
        Some(format!("{kernel}\n1\nvm=1 image=default\n").as_str()),
        "{done:#?}"
    );
    let text = env.murmur_ok(&["status", "kernel"]);
    assert!(
        text.contains(&kernel),
        "murmur status shows the guest kernel: {text}"
    );
    if host != kernel {
        assert!(!text.contains(&host));
    }

    // The agent's VM is destroyed and the pool refills to 2.
    let before = wait_warm(&env, 2);
    assert!(first.iter().filter(|id| before.contains(*id)).count() == 1);
    let old_pids = qemu_processes(&env);

    let out = env.murmur(&["pool", "flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "Flushing warm VMs...\nFlushed 2 warm VMs \u{2014} pool will replenish with fresh ones\n"
    );
    // The flush answers once the guests are gone: no qemu of theirs, no directory left.
    let now = qemu_processes(&env);
    assert!(now.is_disjoint(&old_pids), "flushed qemu still running");
    let dirs = vm_dirs(&env);
    assert!(
        before.iter().all(|id| !dirs.contains(id)),
        "VM dirs left: {dirs:?}"
    );

    let fresh = wait_warm(&env, 2);
    assert!(fresh.is_disjoint(&before));
    // The refill restored its guests from the image's snapshot (the first guest saved it),
    // each as itself.
    let snapshot = env
        .state_dir()
        .join("qemu/images/default/snapshots")
        .join(format!("c1-m192-{}.state", env.status().accel));
    assert!(snapshot.is_file(), "{}", snapshot.display());
    for pid in qemu_processes(&env) {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if fresh
            .iter()
            .any(|id| cmd.contains(&format!("murmur.vm={id}")))
        {
            assert!(
                cmd.contains("-incoming exec:cat"),
                "restored, not booted: {cmd}"
            );
        }
    }
    env.spawn("whoami", "echo $MURMUR_VM_ID $(hostname)");
    let st = env.wait_phase("whoami", Phase::Completed);
    let vm = st.vm.expect("a VM").0;
    assert!(fresh.contains(&vm), "it ran on a refilled guest");
    assert_eq!(
        st.output_tail.as_deref(),
        Some(format!("{vm} {vm}\n").as_str())
    );
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn a_killed_worker_finds_its_guests_again_and_nothing_leaks() {
    let mut env = qemu_env("qemu-kill");
    env.set_workspace("default", "min_idle: 2\nenvironment:\n  memory_mb: 192\n");
    let warm_before = wait_warm(&env, 2);
    let pids = qemu_processes(&env);

    env.kill_worker();
    // Guests live in their own sessions: the crash does not take them down.
    assert_eq!(qemu_processes(&env), pids);
    env.start_worker();

    // The restarted worker settles: 2 warm, inventory == substrate == live qemu processes.
    let st = env.wait_for("the pool after the restart", |s| {
        warm(s) == 2 && s.vms.len() == 2
    });
    let ids: BTreeSet<String> = ids_in(&st, VmState::Warm).into_iter().collect();
    eventually(&env, "no leaked guest", || {
        substrate_ids(&env) == ids && qemu_processes(&env).len() == 2 && vm_dirs(&env) == ids
    });
    eprintln!("warm before {warm_before:?}, after {ids:?}");

    // And the guests it kept still answer.
    env.spawn("after", "echo alive in $(uname -r)");
    let done = env.wait_phase("after", Phase::Completed);
    assert!(
        done.output_tail
            .as_deref()
            .is_some_and(|t| t.starts_with("alive in ")),
        "{done:#?}"
    );
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn bake_pin_flush_boots_guests_of_the_new_image() {
    let env = qemu_env("qemu-bake");
    env.set_workspace("default", "min_idle: 2\nenvironment:\n  memory_mb: 192\n");
    let before = wait_warm(&env, 2);
    let yaml = "base: default\nscript: |\n  mkdir -p /opt/tools\n  echo v1 > /opt/tools/version\nfiles:\n  etc/motd: \"baked\\n\"\n";
    let recipe = env.dir.path().join("tools.yaml");
    std::fs::write(&recipe, yaml).expect("write recipe");
    let recipe = recipe.display().to_string();
    let id = serde_norway::from_str::<murmur_workflows::bake::Recipe>(yaml)
        .expect("recipe")
        .image_id(std::env::consts::ARCH);

    let started = Instant::now();
    let out = env.murmur(&["bake", &recipe]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        env.worker_log_tail()
    );
    eprintln!("qemu bake took {:?}", started.elapsed());
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("Bake started (image: {id})\n")),
        "{text}"
    );
    assert!(text.contains(&format!(
        "murmur patch workspace default --set image_ref={id}\n"
    )));
    let meta = QemuProvider::inspector(env.state_dir())
        .image_meta(&id)
        .expect("the baked image is registered");
    assert_eq!(meta.base.as_deref(), Some("default"));
    // The scratch guest is gone: only the warm ones run.
    eventually(&env, "the scratch guest to be deleted", || {
        qemu_processes(&env).len() == 2 && substrate_ids(&env) == before
    });

    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(stdout(&out), format!("Image {id} already cached\n"));

    env.murmur_ok(&[
        "patch",
        "workspace",
        "default",
        "--set",
        &format!("image_ref={id}"),
    ]);
    let out = env.murmur(&["pool", "flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_for("2 warm guests of the new image", |s| {
        s.workspaces[0].ready == 2 && s.vms.len() == 2 && s.vms.iter().all(|v| v.image == id)
    });
    wait_warm(&env, 2);
    env.spawn(
        "check",
        "cat /opt/tools/version /etc/motd /etc/murmur/image; echo $MURMUR_IMAGE",
    );
    let done = env.wait_phase("check", Phase::Completed);
    assert_eq!(
        done.output_tail.as_deref(),
        Some(format!("v1\nbaked\n{id}\n{id}\n").as_str()),
        "the new guests run the baked image"
    );

    // A failing script: its output and exit code, no image, no scratch guest left.
    let failing = env.dir.path().join("fail.yaml");
    std::fs::write(&failing, "base: default\nscript: echo broken; exit 4\n").expect("write");
    let out = env.murmur(&["bake", &failing.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("broken\n"), "{err}");
    assert!(
        err.contains("the provisioning script exited with 4"),
        "{err}"
    );
    eventually(&env, "no scratch guest left", || {
        qemu_processes(&env).len() == 2
    });
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn logs_and_exec_reach_into_a_guest_through_the_gateway() {
    let env = qemu_env("qemu-inside");
    env.set_workspace("default", "min_idle: 1\nenvironment:\n  memory_mb: 192\n");
    wait_warm(&env, 1);
    env.spawn_with(
        &["--on-idle", "keep-alive"],
        "ka",
        "echo started; cat /etc/murmur/vm; sleep 600",
    );
    env.wait_phase("ka", Phase::Running);

    // The agent's output, read from the guest while it runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = env.murmur_ok(&["logs", "ka"]);
        if out == "started\n1\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no output from the guest: {out:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // exec: a command next to the agent, in the guest (its marker file), streams apart.
    let out = env.murmur(&[
        "exec",
        "ka",
        "--",
        "sh",
        "-c",
        "cat /etc/murmur/vm; echo err >&2; exit 7",
    ]);
    assert_eq!(stdout(&out), "1\n");
    assert_eq!(stderr(&out), "err\n");
    assert_eq!(out.status.code(), Some(7));
    let out = env.murmur_stdin(&["exec", "ka", "--", "cat"], "into the guest\n");
    assert_eq!(stdout(&out), "into the guest\n", "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(0));

    // murmur shell: a terminal in the guest (its marker file, its VM id), driven in a real
    // terminal (tmux): sized, resized, the exit code back, the local terminal restored.
    let vm = env.agent("ka").vm.expect("the agent's VM").0;
    let dir = env.dir.path();
    let session = format!("murmur-qemu-shell-{}", std::process::id());
    // The settings after the shell are written whole and then renamed: the test reads them
    // as soon as the file exists.
    let script = format!(
        "stty -g > {d}/before; {cmd}; echo \"shell exited $?\"; stty -g > {d}/after.part && mv {d}/after.part {d}/after; sleep 600",
        d = dir.display(),
        cmd = shell_command(&env, "ka"),
    );
    let started = Instant::now();
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &script,
    ]);
    let _kill = KillSession(session.clone());
    // busybox ash's prompt for root in /root.
    wait_pane(&session, "/root #");
    eprintln!("murmur shell to the first prompt: {:?}", started.elapsed());
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "echo vm=$MURMUR_VM_ID marker=$(cat /etc/murmur/vm) agent=$MURMUR_AGENT; stty size",
        "Enter",
    ]);
    wait_pane(&session, &format!("vm={vm} marker=1 agent=ka"));
    wait_pane(&session, "30 100");
    tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
    // The new size reaches the guest (after the CLI's SIGWINCH, the gateway, the channel).
    let deadline = Instant::now() + crate::harness::PATIENCE;
    loop {
        tmux(&["send-keys", "-t", &session, "clear; stty size", "Enter"]);
        let pane = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session])
            .output()
            .expect("tmux");
        if String::from_utf8_lossy(&pane.stdout).contains("40 120") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never reached the guest"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    tmux(&["send-keys", "-t", &session, "exit 5", "Enter"]);
    wait_pane(&session, "shell exited 5");
    let deadline = Instant::now() + crate::harness::PATIENCE;
    while !dir.join("after").exists() {
        assert!(
            Instant::now() < deadline,
            "the pane never wrote its settings"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("before")).expect("before"),
        std::fs::read_to_string(dir.join("after")).expect("after"),
        "the local terminal was not restored"
    );
    // Nothing of the shell stays in the guest once it exited.
    eventually(
        &env,
        "the shell's session to be cleaned up in the guest",
        || {
            let out = env.murmur(&["exec", "ka", "--", "sh", "-c", "ls /run/murmur-tty | wc -l"]);
            stdout(&out).trim() == "0"
        },
    );
}

/// A counter agent on the one guest of a pool at `max_vms` 1 and `min_idle` 0 (so every
/// qemu process of the tenant is its guest's, even while it sleeps: a sleeping guest leaves
/// its room, and nothing is to fill it), counting; returns its VM.
fn counter_on_its_own_guest(env: &TestEnv) -> String {
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=1"]);
    env.set_workspace("default", "min_idle: 1\nenvironment:\n  memory_mb: 192\n");
    wait_warm(env, 1);
    env.spawn("counter", COUNTER);
    let st = env.wait_phase("counter", Phase::Running);
    env.set_workspace("default", "min_idle: 0\nenvironment:\n  memory_mb: 192\n");
    env.wait_counted("counter", 2);
    st.vm.expect("a VM").0
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn a_sleeping_guest_is_saved_to_its_host_and_goes_on_where_it_stopped() {
    let env = qemu_env("qemu-sleep");
    let vm = counter_on_its_own_guest(&env);
    let before = env.wait_counted("counter", 3);
    let t0 = Instant::now();

    assert_eq!(env.murmur_ok(&["sleep", "counter"]), "VM stopped\n");
    // Asleep: the guest is saved on its host and its qemu is gone, with the memory it held.
    assert!(qemu_processes(&env).is_empty(), "no qemu runs while asleep");
    let dir = env.state_dir().join("qemu/vms").join(&env.tenant).join(&vm);
    let saved = std::fs::metadata(dir.join("sleep.state")).expect("the saved guest");
    assert!(saved.len() > 0);
    let st = env.agent("counter");
    assert_eq!(st.phase, Some(Phase::Sleeping));
    assert!(st.asleep);
    // The pool and the reaper still see the VM, alive and the agent's.
    let vms = env.substrate();
    assert!(vms.iter().any(|v| v.id.0 == vm && v.alive), "{vms:#?}");
    // Time passing while asleep is what is tested: an awake counter would add five.
    std::thread::sleep(Duration::from_secs(5));
    assert!(qemu_processes(&env).is_empty());

    assert_eq!(env.murmur_ok(&["wake", "counter"]), "VM started\n");
    assert_eq!(qemu_processes(&env).len(), 1, "the guest runs again");
    assert!(
        !dir.join("sleep.state").exists(),
        "the saved guest is gone once awake"
    );
    let st = env.agent("counter");
    assert_eq!(st.phase, Some(Phase::Running));
    assert_eq!(st.vm.map(|v| v.0), Some(vm.clone()), "the same VM");
    let after = env.wait_counted("counter", before.len());
    let awake = t0.elapsed().as_secs_f64() - 5.0;
    // One count, from 1, resumed where it stopped (a reboot would start again at 1) ...
    let want: Vec<u64> = (1..=after.len() as u64).collect();
    assert_eq!(after, want, "one count, nothing lost or repeated");
    // ... and not advanced by the five seconds asleep: at most one number a second awake.
    let added = (after.len() - before.len()) as f64;
    assert!(
        added <= awake.ceil() + 1.0,
        "{added} numbers in {awake:.1} s awake: the counter went on while asleep"
    );

    // A kill of a sleeping agent removes the VM with its saved state.
    env.murmur_ok(&["sleep", "counter"]);
    assert_eq!(env.murmur_ok(&["kill", "counter"]), "killed counter\n");
    assert!(!dir.exists(), "the VM and its saved state are gone");
    eventually(&env, "no qemu of the killed agent", || {
        qemu_processes(&env).len() <= 1
    });
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn a_worker_killed_during_a_guest_sleep_or_wake_loses_nothing() {
    let mut env = qemu_env("qemu-sleep-chaos");
    let vm = counter_on_its_own_guest(&env);
    let dir = env.state_dir().join("qemu/vms").join(&env.tenant).join(&vm);
    // A guest's save and restore take a second or so under TCG: these crashes land before,
    // inside and after them.
    for delay_ms in [150u64, 600, 1500] {
        for (verb, said) in [("sleep", "VM stopped\n"), ("wake", "VM started\n")] {
            let call = crate::chaos::spawn_murmur(&env, &[verb, "counter"]);
            std::thread::sleep(Duration::from_millis(delay_ms));
            env.kill_worker();
            eprintln!("{verb} crashed after {delay_ms} ms");
            env.start_worker();
            let out = crate::chaos::wait_child(&env, call, crate::harness::PATIENCE);
            assert!(
                out.status.success(),
                "{verb}: {} {}",
                stdout(&out),
                stderr(&out)
            );
            assert_eq!(stdout(&out), said);
            let st = env.agent("counter");
            assert_eq!(st.vm.as_ref().map(|v| v.0.clone()), Some(vm.clone()));
            let running = qemu_processes(&env).len();
            if verb == "sleep" {
                assert_eq!(st.phase, Some(Phase::Sleeping), "{st:#?}");
                assert_eq!(running, 0, "asleep: no qemu");
                assert!(
                    dir.join("sleep.state").exists(),
                    "asleep: its state is saved"
                );
            } else {
                assert_eq!(st.phase, Some(Phase::Running), "{st:#?}");
                assert_eq!(running, 1, "awake: one qemu, never two");
            }
            assert_eq!(substrate_ids(&env), BTreeSet::from([vm.clone()]));
        }
    }
    let seen = env.wait_counted("counter", env.counted("counter").len());
    let want: Vec<u64> = (1..=seen.len() as u64).collect();
    assert_eq!(seen, want, "one count through every crash");
    env.murmur_ok(&["kill", "counter"]);
}

/// Runs `body` while another thread counts the tenant's qemu processes every few
/// milliseconds; fails if it ever saw more than `max`.
fn never_more_qemu_than(env: &TestEnv, max: usize, body: impl FnOnce()) {
    /// Stops the sampler however `body` ends (a panic in it included: the scope would
    /// otherwise wait for the sampler forever).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let most = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(qemu_processes(env).len());
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        {
            let _stop = StopOnDrop(&stop);
            body();
        }
        sampler.join().expect("the qemu sampler")
    });
    assert!(most <= max, "{most} qemu processes at once, max_vms {max}");
}

/// The lines a running `murmur` call writes to stderr, as they come.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().expect("a piped stderr");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
fn a_sleeping_guest_leaves_its_room_under_max_vms_and_wakes_when_there_is_room_again() {
    let env = qemu_env("qemu-sleep-room");
    let vm = counter_on_its_own_guest(&env);
    never_more_qemu_than(&env, 1, || {
        let before = env.wait_counted("counter", 3);
        // Saved to disk, the guest holds no host memory: it stops counting, and its room
        // goes to the next agent.
        assert_eq!(env.murmur_ok(&["sleep", "counter"]), "VM stopped\n");
        let pool = env.status();
        assert_eq!((pool.in_use, pool.dormant), (0, 1), "{pool:#?}");
        env.spawn("other", "sleep 600");
        let other = env.wait_phase("other", Phase::Running);
        assert_ne!(other.vm.as_ref().map(|v| v.0.clone()), Some(vm.clone()));

        // Waking needs the room back: the wake waits, saying so, and the guest stays saved.
        let mut wake = crate::chaos::spawn_murmur(&env, &["wake", "counter"]);
        let progress = stderr_lines(&mut wake);
        let said = progress
            .recv_timeout(crate::harness::PATIENCE)
            .expect("murmur wake reports its wait on stderr");
        assert!(
            said.starts_with("counter: waiting for room under max_vms to wake its VM (1 in line)"),
            "{said}"
        );
        let st = env.wait_agent("counter", "its wake to wait for room", |st| {
            st.waiting
                .as_deref()
                .is_some_and(|w| w.starts_with("waiting for room under max_vms"))
        });
        assert_eq!(st.phase, Some(Phase::Sleeping), "{st:#?}");
        assert_eq!(env.status().wakes_waiting, 1);
        let text = env.murmur_ok(&["pool", "status"]);
        assert!(
            text.contains("Asleep: 1 VM(s) saved to disk, holding no host memory (not in use); 1 waiting for room under max_vms to wake"),
            "{text}"
        );
        // The other agent ends: its VM goes, and then the sleeper wakes where it stopped.
        assert_eq!(env.murmur_ok(&["kill", "other"]), "killed other\n");
        let out = crate::chaos::wait_child(&env, wake, crate::harness::PATIENCE);
        let rest: Vec<String> = progress.try_iter().collect();
        assert!(out.status.success(), "{} {rest:?}", stdout(&out));
        assert_eq!(stdout(&out), "VM started\n");
        let st = env.agent("counter");
        assert_eq!(st.phase, Some(Phase::Running), "{st:#?}");
        assert_eq!(st.waiting, None);
        assert_eq!(st.vm.map(|v| v.0), Some(vm.clone()), "the same VM");
        let after = env.wait_counted("counter", before.len());
        let want: Vec<u64> = (1..=after.len() as u64).collect();
        assert_eq!(after, want, "one count, resumed where it stopped");
        let pool = env.status();
        assert_eq!((pool.in_use, pool.dormant), (1, 0), "{pool:#?}");
    });
    env.murmur_ok(&["kill", "counter"]);
}
