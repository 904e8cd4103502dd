//! Determinism: golden histories of the pool, agent, nuke and host-registry workflows,
//! recorded with the Rust client into `tests/histories/`, must replay against the current
//! workflow code. A change that would break running workflows fails here, in CI, without a
//! server. The current set covers flushes, claims, kills, a nuke, hosts drained and lost,
//! continue-as-new, and a run that recovered after its predecessor was terminated, in which a
//! fired timer and a `flush` signal arrive in the same workflow task.
//!
//! Agents and the host registry are long-lived, so the histories of earlier builds
//! (`tests/histories/v1/`: before host placement, `v2/`: before recovery) must replay too, and
//! so must the nuke of the build before its pool steps were renamed (`v3/`: it scheduled
//! `murmur.pause_pool` and `murmur.reset_pool`; the patch `nuke-step-names` keeps it
//! replaying, and a nuke in flight across the upgrade running), and every history of the build
//! before the reaper told unclaimed agents to claim again (`v4/`: the patch
//! `tell-unclaimed-agents` keeps its pool runs on the old path). This build's set adds a pool
//! run whose reaper told a waiting agent to claim again, and that agent's history (patch
//! `claims-swept-by-pool`).
//! The pool and nuke histories of those builds are kept in `tests/histories/retired/` and not
//! replayed: the pool's run loop changed incompatibly with recovery (see ARCHITECTURE.md,
//! "Upgrading"); a pool run of an earlier build is ended and its successor recovers.
//!
//! Re-record (after a deliberate, versioned change) with:
//! `MURMUR_RECORD_HISTORIES=1 ./devserver.sh test -- --test e2e replay:: -- --ignored record`
//! (the recorder starts a private dev server and a worker that rolls over early).

use std::path::{Path, PathBuf};

use crate::harness::{EnvOptions, PATIENCE, PrivateServer, TestEnv, block_on, warm};
use murmur_workflows::agent::Phase;
use murmur_workflows::agent_workflow::AgentWorkflow;
use murmur_workflows::host_registry_workflow::HostRegistryWorkflow;
use murmur_workflows::nuke_workflow::NukeWorkflow;
use murmur_workflows::pool_workflow::PoolWorkflow;
use temporalio_client::{
    NamespacedClient, WorkflowExecutionInfo, WorkflowFetchHistoryOptions, WorkflowHistory,
};
use temporalio_sdk::workflow_replayer::{WorkflowReplayer, WorkflowReplayerOptions};

fn histories_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/histories")
}

/// The JSON histories directly in `dir`.
fn histories_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// The histories that must replay: this build's, the agents' and registry's of earlier
/// builds, the nuke's from before its pool steps were renamed (patch `nuke-step-names`), and
/// all of the build's before the reaper told unclaimed agents to claim again (`v4/`, patch
/// `tell-unclaimed-agents`).
const GOLDEN: [(&str, &[&str]); 5] = [
    (
        "",
        &[
            "pool-run1.json",
            "pool-run2.json",
            "pool-recovered.json",
            "pool-swept.json",
            "agent-completed.json",
            "agent-killed.json",
            "agent-swept.json",
            "nuke.json",
            "hosts.json",
        ],
    ),
    ("v1", &["agent-completed.json", "agent-killed.json"]),
    (
        "v2",
        &["agent-completed.json", "agent-killed.json", "hosts.json"],
    ),
    ("v3", &["nuke.json"]),
    (
        "v4",
        &[
            "pool-run1.json",
            "pool-run2.json",
            "pool-recovered.json",
            "agent-completed.json",
            "agent-killed.json",
            "nuke.json",
            "hosts.json",
        ],
    ),
];

#[test]
fn golden_histories_replay_against_the_current_workflow_code() {
    let mut files = Vec::new();
    for (dir, wanted) in GOLDEN {
        let dir = histories_dir().join(dir);
        let have = histories_in(&dir);
        for name in wanted {
            let file = dir.join(name);
            assert!(have.contains(&file), "{} missing", file.display());
            files.push(file);
        }
    }
    let failures = block_on(async {
        let options = WorkflowReplayerOptions::new()
            .register_workflow::<PoolWorkflow>()
            .and_then(|o| o.register_workflow::<AgentWorkflow>())
            .and_then(|o| o.register_workflow::<NukeWorkflow>())
            .and_then(|o| o.register_workflow::<HostRegistryWorkflow>())
            .expect("register workflows")
            .build();
        let replayer = WorkflowReplayer::new(options).expect("replayer");
        let mut failures = Vec::new();
        for file in &files {
            let bytes = std::fs::read(file).expect("read history");
            let history = WorkflowHistory::from_json(&bytes).expect("history JSON");
            if let Err(e) = replayer.replay_workflow(history).await {
                failures.push(format!("{}: {e}", file.display()));
            }
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "workflow code no longer replays its own histories:\n{}",
        failures.join("\n")
    );
}

/// The recovered pool's history has a workflow task that handled a fired timer and a
/// `flush` signal together (recorded with the worker down while both arrived); it must really
/// contain one, so the golden case cannot silently stop covering it: both events between one
/// workflow task's completion and the next one's start.
#[test]
fn the_recovered_history_has_a_timer_and_a_signal_in_one_workflow_task() {
    let events = events_of(&histories_dir().join("pool-recovered.json"));
    let mut since_completed: Vec<&str> = Vec::new();
    let mut found = false;
    for (kind, _) in &events {
        match kind.as_str() {
            "WorkflowTaskCompletedEventAttributes" => since_completed.clear(),
            "WorkflowTaskStartedEventAttributes" => {
                found |= since_completed.contains(&"TimerFiredEventAttributes")
                    && since_completed.contains(&"WorkflowExecutionSignaledEventAttributes");
            }
            other => since_completed.push(other),
        }
    }
    assert!(
        found,
        "no workflow task with both a fired timer and a signal"
    );
}

/// The events of a golden history, each as its attributes' kind
/// (`"TimerFiredEventAttributes"`) and the attributes.
fn events_of(file: &Path) -> Vec<(String, serde_json::Value)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let history: serde_json::Value = serde_json::from_slice(&bytes).expect("history JSON");
    history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| {
            let (kind, attributes) = e["attributes"].as_object()?.iter().next()?;
            Some((kind.clone(), attributes.clone()))
        })
        .collect()
}

/// The patches a history recorded (the ids in its `core_patch` markers).
fn patches_in(file: &Path) -> Vec<String> {
    use base64::Engine as _;
    events_of(file)
        .iter()
        .filter(|(kind, a)| {
            kind == "MarkerRecordedEventAttributes" && a["marker_name"] == "core_patch"
        })
        .filter_map(|(_, a)| {
            let data = a["details"]["patch-data"]["payloads"][0]["data"].as_str()?;
            let json = base64::engine::general_purpose::STANDARD
                .decode(data)
                .ok()?;
            let marker: serde_json::Value = serde_json::from_slice(&json).ok()?;
            Some(marker["id"].as_str()?.to_string())
        })
        .collect()
}

/// Asserts that `file` recorded patch `id` (or, with `recorded` false, that it did not).
fn assert_patch(file: &Path, id: &str, recorded: bool) {
    assert_eq!(
        patches_in(file).iter().any(|p| p == id),
        recorded,
        "{}: marker {id} recorded should be {recorded}",
        file.display()
    );
}

/// How many `claim_settled` signals a history sent (`sent`) or received.
fn claim_settled_signals(file: &Path, sent: bool) -> usize {
    let kind = if sent {
        "SignalExternalWorkflowExecutionInitiatedEventAttributes"
    } else {
        "WorkflowExecutionSignaledEventAttributes"
    };
    events_of(file)
        .iter()
        .filter(|(k, a)| k == kind && a["signal_name"] == "claim_settled")
        .count()
}

/// The golden set covers both sides of the sweep's patches, so it cannot silently stop
/// covering either: the earlier build's pool runs recorded no `tell-unclaimed-agents`
/// marker (they replay on the old path), this build's swept run did and told an agent to
/// claim again, and that agent waited with `claims-swept-by-pool` and was told.
#[test]
fn the_sweep_patches_are_covered_with_and_without_their_markers() {
    let dir = histories_dir();
    for old in ["pool-run1.json", "pool-run2.json", "pool-recovered.json"] {
        assert_patch(&dir.join("v4").join(old), "tell-unclaimed-agents", false);
    }
    let swept = dir.join("pool-swept.json");
    assert_patch(&swept, "tell-unclaimed-agents", true);
    assert!(
        claim_settled_signals(&swept, true) >= 1,
        "the swept pool run told no agent to claim again"
    );
    let agent = dir.join("agent-swept.json");
    assert_patch(&agent, "claims-swept-by-pool", true);
    // Told twice: by the sweep, and when its claim again waiting was served.
    assert!(
        claim_settled_signals(&agent, false) >= 2,
        "the waiting agent was not told to claim again and then served"
    );
}

/// Records the golden histories (see the module docs). Ignored unless asked for.
#[test]
#[ignore]
fn record() {
    if std::env::var("MURMUR_RECORD_HISTORIES").is_err() {
        eprintln!("set MURMUR_RECORD_HISTORIES=1 to overwrite tests/histories");
        return;
    }
    let server_dir = tempfile::tempdir().unwrap();
    let server = PrivateServer::start(server_dir.path().to_path_buf(), &[]);
    // Two hosts; h2 is drained, undrained, and then lost (a short lease timeout keeps the
    // recording quick). A fast reaper and an early roll-over make every kind of event show up
    // in a few minutes.
    let mut env = TestEnv::start_with(
        "golden",
        EnvOptions {
            temporal_address: Some(server.address()),
            ..EnvOptions::default()
        }
        .fast_reaper()
        .worker("MURMUR_HOST_ID", "h1")
        .worker("MURMUR_HOST_LEASE_TIMEOUT", "2s")
        .worker("MURMUR_POOL_ROLL_OVER", "400"),
    );
    env.start_host("h2");
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs on two hosts", |s| {
        warm(s) == 2 && s.hosts.iter().filter(|h| h.vms > 0).count() == 2
    });
    env.murmur_ok(&["host", "drain", "h2"]);
    env.wait_for("2 warm VMs on h1", |s| {
        warm(s) == 2 && s.vms.iter().all(|v| v.host.as_deref() == Some("h1"))
    });
    env.murmur_ok(&["host", "drain", "--undo", "h2"]);
    env.wait_for("the pool to see h2 live", |s| {
        s.hosts.iter().any(|h| h.host == "h2" && h.state == "live")
    });
    env.murmur_ok(&["pool", "flush"]);
    env.wait_for("2 warm VMs, some on h2 again", |s| {
        warm(s) == 2 && s.vms.iter().any(|v| v.host.as_deref() == Some("h2"))
    });
    env.kill_host("h2");
    env.wait_for("h2 lost and its VM replaced", |s| {
        warm(s) == 2 && s.counters.written_off > 0 && s.hosts.iter().any(|h| h.state == "lost")
    });
    env.murmur_ok(&["pool", "flush"]);
    env.wait_for("2 warm VMs after the flush", |s| warm(s) == 2);
    env.spawn("done", "echo golden");
    env.wait_phase("done", Phase::Completed);
    env.spawn("victim", "sleep 600");
    env.wait_phase("victim", Phase::Running);
    env.murmur_ok(&["kill", "victim"]);
    env.wait_phase("victim", Phase::Canceled);
    env.murmur_ok(&["pool", "flush", "--nuke"]);
    env.wait_for("the pool back after the nuke", |s| {
        warm(s) == 2 && s.nukes == 1
    });
    // The pool rolls over on its own (a reaper round every second).
    let pool_id = format!("pool/{}", env.tenant);
    let deadline = std::time::Instant::now() + PATIENCE * 3;
    while env.runs_of(&pool_id).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never rolled over"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    env.wait_for("2 warm VMs on the new run", |s| warm(s) == 2);
    let rolled = env.runs_of(&pool_id);

    // Terminated while an agent runs: the next run recovers the config, the warm VMs and the
    // agent's VM.
    env.spawn("keeper", "sleep 30");
    env.wait_phase("keeper", Phase::Running);
    let out = env.temporal(&[
        "workflow",
        "terminate",
        "--workflow-id",
        &pool_id,
        "--reason",
        "golden",
    ]);
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    env.murmur_ok(&["pool", "up"]);
    env.wait_for("the pool recovered", |s| {
        s.recovery.is_none() && warm(s) == 2 && s.claims_total == 1
    });
    let recovered = env
        .runs_of(&pool_id)
        .last()
        .cloned()
        .expect("a recovered run");

    // A fired timer and a `flush` signal in one workflow task: with the worker down, the
    // reaper's timer fires and the signal arrives; the worker's next task gets both.
    let signed = env.murmur_ok(&["auth", "sign", "flush"]);
    let generation = env.status().generation;
    let fired_before = timers_fired(&env, &pool_id);
    env.kill_worker();
    let deadline = std::time::Instant::now() + PATIENCE;
    while timers_fired(&env, &pool_id) == fired_before {
        assert!(
            std::time::Instant::now() < deadline,
            "no timer fired while the worker was down"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    env.start_worker();
    env.wait_for("the signalled flush applied", |s| {
        s.generation > generation && warm(s) == 2
    });
    assert_eq!(
        env.runs_of(&pool_id).last(),
        Some(&recovered),
        "the recovered run rolled over before the timer and the signal were recorded"
    );

    // A claim waiting when its pool run is terminated: the recovered run's reaper finds the
    // waiting agent and tells it (patch `tell-unclaimed-agents`), the agent claims again
    // (patch `claims-swept-by-pool`), and it is served once the holder is killed.
    env.wait_phase("keeper", Phase::Completed);
    env.queue_a_waiter_behind_a_holder("echo golden-waiter");
    let out = env.temporal(&["workflow", "terminate", "--workflow-id", &pool_id]);
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    env.murmur_ok(&["pool", "up"]);
    env.wait_for(
        "the waiter told to claim again, its claim queued again",
        |s| s.reaper.agents_told_to_claim >= 1 && s.claims.len() == 2,
    );
    let swept = env.runs_of(&pool_id).last().cloned().expect("a swept run");
    env.murmur_ok(&["kill", "holder"]);
    env.wait_phase("waiter", Phase::Completed);

    let out = histories_dir();
    std::fs::create_dir_all(&out).unwrap();
    let agent = |slug: &str| format!("agent/{}/default/tester/{slug}", env.tenant);
    let mut wanted = vec![
        (pool_id.clone(), Some(rolled[0].clone()), "pool-run1.json"),
        (pool_id.clone(), Some(rolled[1].clone()), "pool-run2.json"),
        (
            pool_id.clone(),
            Some(recovered.clone()),
            "pool-recovered.json",
        ),
        (pool_id.clone(), Some(swept.clone()), "pool-swept.json"),
        (agent("done"), None, "agent-completed.json"),
        (agent("waiter"), None, "agent-swept.json"),
        (agent("victim"), None, "agent-killed.json"),
        (format!("nuke/{}", env.tenant), None, "nuke.json"),
        (format!("{}-hosts", env.task_queue), None, "hosts.json"),
    ];
    // SAFETY: the recorder runs alone (`-- --ignored record`); nothing else reads the
    // environment concurrently. The client connects where the `temporal` CLI would.
    unsafe { std::env::set_var("TEMPORAL_ADDRESS", server.address()) };
    block_on(async {
        let client = murmur::client::connect("golden-recorder")
            .await
            .expect("connect");
        for (id, run, file) in wanted.drain(..) {
            let info = WorkflowExecutionInfo::builder()
                .namespace(client.namespace())
                .workflow_id(id.clone())
                .maybe_run_id(run)
                .build();
            let handle = info.bind_untyped(client.clone());
            let json = handle
                .fetch_history(WorkflowFetchHistoryOptions::default())
                .to_json()
                .await
                .expect("fetch history");
            std::fs::write(out.join(file), json).unwrap();
            eprintln!("saved {file} ({id})");
        }
    });
    drop(env);
    drop(server);
}

/// How many timers have fired in the latest run of workflow `id` (from its history).
fn timers_fired(env: &TestEnv, id: &str) -> usize {
    env.history_events(id)
        .iter()
        .filter(|e| e["eventType"] == "EVENT_TYPE_TIMER_FIRED")
        .count()
}

/// Replays one run fetched from the dev server against the current workflow code: the tool
/// for a nondeterminism error seen in a test's worker log. Ignored unless asked for:
/// `MURMUR_REPLAY_WORKFLOW=pool/<tenant> MURMUR_REPLAY_RUN=<run id> cargo test --test e2e
/// replay::a_run_from_the_server -- --ignored` (the latest run without `MURMUR_REPLAY_RUN`);
/// `MURMUR_REPLAY_SAVE=<file>` also keeps its history, in the golden histories' format.
#[test]
#[ignore]
fn a_run_from_the_server_replays() {
    let Ok(id) = std::env::var("MURMUR_REPLAY_WORKFLOW") else {
        panic!("set MURMUR_REPLAY_WORKFLOW (and MURMUR_REPLAY_RUN) to the run to replay");
    };
    let run = std::env::var("MURMUR_REPLAY_RUN").ok();
    let outcome = block_on(async {
        let client = murmur::client::connect("replay-one")
            .await
            .expect("connect");
        let info = WorkflowExecutionInfo::builder()
            .namespace(client.namespace())
            .workflow_id(id.clone())
            .maybe_run_id(run)
            .build();
        let json = info
            .bind_untyped(client.clone())
            .fetch_history(WorkflowFetchHistoryOptions::default())
            .to_json()
            .await
            .expect("fetch history");
        if let Ok(file) = std::env::var("MURMUR_REPLAY_SAVE") {
            std::fs::write(&file, &json).expect("save the history");
        }
        let options = WorkflowReplayerOptions::new()
            .register_workflow::<PoolWorkflow>()
            .and_then(|o| o.register_workflow::<AgentWorkflow>())
            .and_then(|o| o.register_workflow::<NukeWorkflow>())
            .and_then(|o| o.register_workflow::<HostRegistryWorkflow>())
            .expect("register workflows")
            .build();
        let replayer = WorkflowReplayer::new(options).expect("replayer");
        let history = WorkflowHistory::from_json(&json).expect("history JSON");
        replayer.replay_workflow(history).await
    });
    if let Err(e) = outcome {
        panic!("{id} does not replay: {e}");
    }
}
