//! Chaos on real parts: the worker killed with SIGKILL at random points of backfill, flush,
//! spawn, kill and nuke; the Temporal server restarted under a running pool; a substrate
//! that fails 20% of its calls and leaks; an image whose VMs never become ready. After each
//! round the product's promises are checked against the real substrate
//! ([`TestEnv::wait_settled_and_sound`]): substrate == inventory, no VM held by two agents,
//! never over `max_vms`, and every agent either finished or still running with its VM.
//!
//! Rounds and the seed come from `MURMUR_CHAOS_ROUNDS` / `MURMUR_CHAOS_SEED` (printed, so a
//! failing round can be replayed), the operations of the kill rounds from `MURMUR_CHAOS_OPS`
//! (`flush,nuke`: every operation unless set), the substrate of the kill rounds from
//! `MURMUR_CHAOS_SUBSTRATE` (`process` unless `qemu`); CI runs a handful, `RELIABILITY.md`
//! records longer runs.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Allow, EnvOptions, PATIENCE, PrivateServer, TestEnv, stderr, warm};
use murmur_workflows::agent::Phase;
use murmur_workflows::model::VmState;

/// Small seeded dice so a failing run can be repeated with the same choices.
struct Dice(u64);

impl Dice {
    fn from_env() -> Self {
        let seed = std::env::var("MURMUR_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(7, |d| d.as_nanos() as u64)
            });
        eprintln!("chaos seed: {seed} (MURMUR_CHAOS_SEED={seed} repeats this run)");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

fn rounds(default: u32) -> u32 {
    std::env::var("MURMUR_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The operations the kill rounds choose from (0 patch, 1 flush, 2 spawn, 3 kill, 4 nuke):
/// all of them, or those `MURMUR_CHAOS_OPS` names (`flush,nuke`) to replay one kind of round
/// many times. With every operation allowed a seed chooses as it always did.
fn kill_round_ops() -> Vec<u64> {
    const NAMES: [&str; 5] = ["patch", "flush", "spawn", "kill", "nuke"];
    let Ok(list) = std::env::var("MURMUR_CHAOS_OPS") else {
        return (0..5).collect();
    };
    let ops: Vec<u64> = list
        .split(',')
        .map(|name| {
            let name = name.trim();
            NAMES
                .iter()
                .position(|n| *n == name)
                .unwrap_or_else(|| panic!("MURMUR_CHAOS_OPS: unknown operation {name:?}"))
                as u64
        })
        .collect();
    assert!(!ops.is_empty(), "MURMUR_CHAOS_OPS names no operation");
    ops
}

/// Every agent of the tenant is finished, or running with a VM the pool has assigned to it.
fn agents_sound(env: &TestEnv, slugs: &[String]) {
    let st = env.status();
    for slug in slugs {
        let a = env.agent(slug);
        let Some(phase) = a.phase else { continue };
        if phase.is_terminal() {
            continue;
        }
        if matches!(phase, Phase::Running | Phase::Idle | Phase::TaskComplete) {
            let vm =
                a.vm.clone()
                    .unwrap_or_else(|| panic!("{slug} runs without a VM"));
            assert!(
                st.vms
                    .iter()
                    .any(|v| v.id == vm && v.state == VmState::Assigned),
                "{slug} runs on {vm}, which the pool does not hold for it"
            );
        }
    }
}

#[test]
fn worker_killed_at_random_points_loses_and_leaks_nothing() {
    let mut dice = Dice::from_env();
    // `MURMUR_CHAOS_SUBSTRATE=qemu` runs the rounds on real guests.
    let substrate = std::env::var("MURMUR_CHAOS_SUBSTRATE").unwrap_or_default();
    let mut env = TestEnv::start_with(
        "chaos",
        EnvOptions {
            substrate,
            ..EnvOptions::default()
        }
        .fast_reaper(),
    );
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=6"]);
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    let mut slugs: Vec<String> = Vec::new();
    let n = rounds(6);
    let ops = kill_round_ops();
    // The invariants hold through every crash and restart, not only after each round.
    env.probe().sound_while(Allow::default(), |_| {
        for round in 0..n {
            let op = ops[dice.below(ops.len() as u64) as usize];
            let delay = Duration::from_millis(dice.below(600));
            // Start the operation without waiting for it, crash the worker somewhere inside it.
            let mut client: Option<(Op, Child)> = match op {
                0 => {
                    let min_idle = 1 + dice.below(4);
                    Some((
                        Op::Patch,
                        spawn_murmur(
                            &env,
                            &[
                                "patch",
                                "workspace",
                                "default",
                                "--set",
                                &format!("min_idle={min_idle}"),
                            ],
                        ),
                    ))
                }
                1 => Some((Op::Flush, spawn_murmur(&env, &["pool", "flush"]))),
                2 => {
                    let slug = format!("r{round}");
                    slugs.push(slug.clone());
                    Some((
                        Op::Spawn,
                        spawn_murmur(&env, &["spawn", &slug, "--", "sleep 2"]),
                    ))
                }
                3 => slugs
                    .last()
                    .map(|slug| (Op::Kill, spawn_murmur(&env, &["kill", slug]))),
                _ => Some((Op::Nuke, spawn_murmur(&env, &["pool", "flush", "--nuke"]))),
            };
            std::thread::sleep(delay);
            env.kill_worker();
            eprintln!(
                "round {round}: op {op} crashed after {} ms",
                delay.as_millis()
            );
            let restarted = Instant::now();
            env.start_worker();
            if let Some((op, c)) = client.take() {
                // The CLI call either completes against the restarted worker with its normal
                // output, or fails cleanly with a documented error line; it must not hang.
                let out = wait_child(&env, c, PATIENCE);
                eprintln!(
                    "round {round}: {op:?} answered {:.1} s after the restart",
                    restarted.elapsed().as_secs_f64()
                );
                completed_or_failed_cleanly(op, &out);
            }
            env.wait_settled_and_sound(PATIENCE);
            agents_sound(&env, &slugs);
        }
    });
    // Let every agent finish, then nothing but the warm pool may remain.
    for slug in &slugs {
        let deadline = Instant::now() + PATIENCE;
        while !env.agent(slug).phase.is_some_and(Phase::is_terminal) {
            assert!(Instant::now() < deadline, "{slug} never finished");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let st = env.wait_settled_and_sound(PATIENCE);
    assert!(st.claims.is_empty(), "claims left: {:#?}", st.claims);
    assert!(
        st.vms.iter().all(|v| v.state == VmState::Warm),
        "only warm VMs remain"
    );
}

/// The CLI operation a kill round starts.
#[derive(Clone, Copy, Debug)]
enum Op {
    Patch,
    Flush,
    Spawn,
    Kill,
    Nuke,
}

impl Op {
    /// What the operation prints on stdout when it succeeds.
    fn success_line(self) -> &'static [&'static str] {
        match self {
            Op::Patch => &[" configured (generation "],
            Op::Flush => &["Flushed ", "No warm VMs to flush"],
            Op::Spawn => &["Spawned: "],
            Op::Kill => &["killed "],
            Op::Nuke => &["Nuke complete"],
        }
    }
}

pub(crate) fn spawn_murmur(env: &TestEnv, args: &[&str]) -> Child {
    env.murmur_cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start murmur")
}

/// Waits for a `murmur` call (its output is small: the pipes cannot fill), failing the test
/// if it hangs. A hang's report says what the call printed and what Temporal holds for the
/// tenant's pool and nuke (pending activities, updates, the current workflow task), so a
/// failure seen once in CI can be diagnosed from its log.
pub(crate) fn wait_child(env: &TestEnv, mut child: Child, patience: Duration) -> Output {
    let deadline = Instant::now() + patience;
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return child.wait_with_output().expect("the murmur call's output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("the murmur call's output");
            panic!(
                "a murmur command hung across a worker crash\n--- its stdout ---\n{}\n--- its stderr ---\n{}\n{}",
                crate::harness::stdout(&out),
                crate::harness::stderr(&out),
                env.describe_tenant_workflows(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A call interrupted by a crash either succeeded with its normal output or failed with exit
/// 1 (the operation failed) or 69 (Temporal or the pool did not answer) and a documented
/// error line `CODE: reason`.
fn completed_or_failed_cleanly(op: Op, out: &Output) {
    let (stdout, stderr) = (crate::harness::stdout(out), crate::harness::stderr(out));
    match out.status.code() {
        Some(0) => assert!(
            op.success_line().iter().any(|l| stdout.contains(l)),
            "{op:?} succeeded without its output: {stdout:?}"
        ),
        Some(1 | 69) => {
            // Off a terminal a wait that lasts over 2 s prints its progress lines (lower
            // case) on stderr first; the error line comes after them.
            let first = stderr
                .lines()
                .find(|l| !l.starts_with(|c: char| c.is_ascii_lowercase()))
                .unwrap_or_default();
            let (code, reason) = first.split_once(": ").unwrap_or_default();
            assert!(
                !code.is_empty()
                    && code.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    && !reason.trim().is_empty(),
                "{op:?} failed without a CODE: reason line: {stderr:?}"
            );
            assert!(!stderr.contains("panicked"), "{op:?} panicked: {stderr}");
        }
        other => panic!("{op:?} exited with {other:?}: {stdout}{stderr}"),
    }
}

#[test]
fn substrate_faults_and_leaks_are_survived_and_cleaned_up() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 % 1_000_000);
    // `MURMUR_CHAOS_FAULTS` replaces the spec (e.g. to add hangs), `MURMUR_CHAOS_SUBSTRATE`
    // the substrate.
    let faults = std::env::var("MURMUR_CHAOS_FAULTS").unwrap_or_else(|_| {
        format!("create_fail=0.2,delete_fail=0.2,leak=0.05,ghost=0.1,latency=5ms..50ms,seed={seed}")
    });
    eprintln!("faults: {faults}");
    let env = TestEnv::start_with(
        "faults",
        EnvOptions {
            substrate: std::env::var("MURMUR_CHAOS_SUBSTRATE").unwrap_or_default(),
            ..EnvOptions::default()
        }
        .fast_reaper()
        .worker("MURMUR_FAULTS", &faults),
    );
    env.murmur_ok(&["patch", "pool-config", "default", "--set", "max_vms=8"]);
    env.set_workspace("default", "min_idle: 3\n");
    env.wait_for("3 warm VMs despite the faults", |s| warm(s) == 3);
    // Leaks and ghost deletes leave VMs the pool does not know until the reaper finds them;
    // everything else holds the whole time.
    let allow = Allow {
        orphans: true,
        ..Allow::default()
    };
    env.sound_while(allow, |_| {
        for i in 0..4 {
            env.murmur_ok(&["pool", "flush"]);
            env.spawn(&format!("f{i}"), "true");
        }
        for i in 0..4 {
            let slug = format!("f{i}");
            let deadline = Instant::now() + PATIENCE;
            while !env.agent(&slug).phase.is_some_and(Phase::is_terminal) {
                assert!(Instant::now() < deadline, "{slug} never finished");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    env.wait_settled_and_sound(Duration::from_secs(120));
    let log = env.worker_log();
    let faults: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("injected fault"))
        .collect();
    let ghosts = faults.iter().filter(|l| l.contains("ghost")).count();
    let leaks = faults.iter().filter(|l| l.contains("leak")).count();
    let hangs = faults.iter().filter(|l| l.contains("hang")).count();
    eprintln!(
        "faults injected: {} (ghost deletes {ghosts}, leaks {leaks}, hangs {hangs})",
        faults.len(),
    );
    assert!(
        !faults.is_empty(),
        "no fault was injected; the test proves nothing"
    );
    if ghosts > 0 {
        // The reaper deletes the ghost's VM in an activity and counts it when the pool sees
        // the activity complete: the substrate can be clean a moment before the count shows.
        let st = env.wait_for(
            &format!("the reaper to count the VMs {ghosts} ghost deletes left behind"),
            |s| s.reaper.orphans_deleted >= 1,
        );
        eprintln!("reaper: {:?}", st.reaper);
    }
    assert!(
        log.contains("FAULT INJECTION ENABLED"),
        "fault injection must be announced"
    );
}

#[test]
fn an_image_that_never_becomes_ready_is_held_back_not_churned() {
    let env = TestEnv::start_with(
        "badimage",
        EnvOptions::default()
            .fast_reaper()
            .worker("MURMUR_BOOT_TIMEOUT", "2s"),
    );
    // The boot script never finishes: the VM process lives, the handshake never comes.
    env.make_image("wedged", "#!/bin/sh\nsleep 3600\n");
    env.set_workspace("default", "min_idle: 2\nimage_ref: wedged\n");
    let st = env.wait_for("the image reported failing and held back", |s| {
        s.workspaces
            .iter()
            .any(|w| w.reasons.iter().any(|r| r == "image_failing"))
            && s.vms.is_empty()
    });
    let boots = st.counters.boots;
    assert!(
        (3..=4).contains(&boots),
        "{boots} boots before holding back"
    );
    let failing = &st.failing_images["wedged"];
    assert!(failing.backoff_until.is_some(), "{failing:?}");
    assert!(
        failing
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("did not become ready")),
        "{failing:?}"
    );
    // While held back, several reaper scans pass and nothing is booted again.
    let later = env.wait_for("a few more scans", |s| {
        s.reaper.scans >= st.reaper.scans + 3
    });
    assert_eq!(
        later.counters.boots, boots,
        "backfill churned a failing image"
    );
    assert!(env.substrate().is_empty(), "a timed-out VM was left behind");
    let human = env.murmur_ok(&["pool", "status"]);
    assert!(human.contains("image_failing"), "{human}");
    assert!(human.contains("backfill held back"), "{human}");
}

#[test]
fn a_server_restart_under_a_running_pool_loses_nothing() {
    let server_dir = tempfile::tempdir().unwrap();
    let mut server = PrivateServer::start(server_dir.path().to_path_buf(), &[]);
    let env = TestEnv::start_with(
        "restart",
        EnvOptions {
            temporal_address: Some(server.address()),
            ..EnvOptions::default()
        }
        .fast_reaper(),
    );
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn(
        "survivor",
        "while [ ! -f go ]; do sleep 0.05; done; echo made it",
    );
    let agent = env.wait_phase("survivor", Phase::Running);
    let vm = agent.vm.expect("a VM").0;

    server.stop();
    // The agent's command keeps running in its VM while the server is down.
    server.launch();

    // The worker reconnects on its own; the pool answers and serves as before.
    let st = env.wait_for("the pool serving again with 2 warm", |s| warm(s) == 2);
    assert_eq!(
        st.vms
            .iter()
            .filter(|v| v.state == VmState::Assigned)
            .count(),
        1
    );
    let out = env.murmur(&["pool", "flush"]);
    assert!(
        out.status.success(),
        "flush after restart: {}",
        stderr(&out)
    );
    std::fs::write(env.vm_root(&vm).join("go"), "").unwrap();
    let done = env.wait_phase("survivor", Phase::Completed);
    assert_eq!(done.exit_code, Some(0));
    assert!(done.output_tail.unwrap_or_default().contains("made it"));
    env.wait_settled_and_sound(PATIENCE);
}

/// Regression (found by a kill -9 round during a nuke): the nuke's pause activity was retried
/// after its worker died, the pool refused the second pause as a replay of the developer's
/// request, and the nuke retried forever. The same nuke may pause again (its developer's
/// signed request, admitted once by the first pause, is not a replay when the nuke holding
/// the pool presents it again); a reset that is retried after the pool resumed must not wipe
/// what the pool holds by then.
#[test]
fn a_retried_nuke_step_is_idempotent() {
    // (The steps are sent by hand, without the nuke's deletes in between: the VM warm before
    // the reset is left to the reaper, which a fast schedule lets the test wait for.)
    let env = TestEnv::start_with("nukeretry", EnvOptions::default().fast_reaper());
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    let request = developer_nuke(&env);
    let step = |name: &str| send_nuke_step(&env, name, &request);
    for attempt in 1..=2 {
        let out = step("nuke_pause");
        assert!(
            out.status.success(),
            "pause attempt {attempt}: {}",
            stderr(&out)
        );
    }
    assert!(env.status().nuke_in_progress);
    let out = step("nuke_reset");
    assert!(out.status.success(), "reset: {}", stderr(&out));
    let after_reset = env.wait_for("the pool refilled after the reset", |s| {
        warm(s) == 1 && !s.nuke_in_progress
    });
    let out = step("nuke_reset");
    assert!(out.status.success(), "retried reset: {}", stderr(&out));
    let st = env.status();
    assert_eq!(st.nukes, 1, "the retried reset counted as a second nuke");
    assert_eq!(
        st.vms, after_reset.vms,
        "the retried reset wiped the new inventory"
    );
    env.wait_settled_and_sound(PATIENCE);
}

/// A nuke terminated by hand between its pause and its reset left the pool paused for good
/// (no hand-outs, no backfill). The reaper now notices that no nuke runs and resumes the pool
/// after its grace period, and its scan cleans up what the half-done nuke left.
#[test]
fn a_pool_left_paused_by_a_terminated_nuke_resumes() {
    let env = TestEnv::start_with("deadnuke", EnvOptions::default().fast_reaper());
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    // A nuke's first step, then the nuke is gone (as if terminated from the UI).
    let out = send_nuke_step(&env, "nuke_pause", &developer_nuke(&env));
    assert!(out.status.success(), "pause: {}", stderr(&out));
    assert!(env.status().nuke_in_progress);

    let st = env.wait_for("the pool resumed by the reaper", |s| {
        !s.nuke_in_progress && s.reaper.abandoned_nukes == 1
    });
    assert_eq!(warm(&st), 2);
    // It serves again.
    env.spawn("after", "true");
    env.wait_phase("after", murmur_workflows::agent::Phase::Completed);
    env.wait_settled_and_sound(PATIENCE);
}

/// A developer's signed request for a nuke of the test's tenant, as `murmur pool flush
/// --nuke` signs it (with a fresh request id).
fn developer_nuke(env: &TestEnv) -> murmur_workflows::messages::SignedNuke {
    use murmur_activities::auth::DeveloperKey;
    use murmur_workflows::auth::{ops, unsigned_body};
    use murmur_workflows::nuke_workflow::{NukeInput, nuke_workflow_id};

    let credential = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "1h");
    let key = DeveloperKey::from_credential(&credential).expect("a developer key");
    let input = NukeInput {
        tenant: env.tenant.clone(),
        actor: Some("tester".into()),
        ..NukeInput::default()
    };
    let body = unsigned_body(&input);
    let signed = key
        .sign(ops::NUKE, &nuke_workflow_id(&env.tenant), &body)
        .expect("sign");
    murmur_workflows::messages::SignedNuke {
        body,
        credential: Some(signed),
    }
}

/// Sends the pool a nuke step (`nuke_pause` or `nuke_reset`) the way the nuke workflow's
/// activity does: signed with the worker's key, acting for the developer's `request`.
fn send_nuke_step(
    env: &TestEnv,
    name: &str,
    request: &murmur_workflows::messages::SignedNuke,
) -> std::process::Output {
    use murmur_activities::auth::KeyStore;
    use murmur_workflows::auth::{ops, unsigned_body};
    use murmur_workflows::messages::NukeStep;

    let pool = format!("pool/{}", env.tenant);
    let keys = KeyStore::open(&env.state_dir()).expect("worker keys");
    let mut step = NukeStep {
        actor: Some(format!("nuke/{}", env.tenant)),
        developer: Some(request.clone()),
        ..NukeStep::default()
    };
    step.auth = Some(
        keys.sign_service(ops::NUKE_STEP, &pool, &unsigned_body(&step))
            .expect("sign"),
    );
    let input = serde_json::to_string(&step).unwrap();
    env.temporal(&[
        "workflow",
        "update",
        "execute",
        "--workflow-id",
        &pool,
        "--name",
        name,
        "--input",
        &input,
    ])
}
