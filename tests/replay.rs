//! Determinism: golden histories of the pool, agent, nuke and host-registry workflows (flush,
//! claim, kill, nuke, continue-as-new, hosts drained and lost), recorded with the Rust client
//! into `tests/histories/`, must replay against the current workflow code. A change that would
//! break running workflows fails here, in CI, without a server. `tests/histories/v1/` keeps
//! the histories recorded before host placement: runs started then must still replay (the
//! patch markers `host-placement`, `nuke-every-host` and `bake-on-one-host` see to it).
//!
//! Re-record (after a deliberate, versioned change) with:
//! `MURMUR_RECORD_HISTORIES=1 ./devserver.sh test -- --test replay -- --ignored record`
//! (the recorder starts a private dev server that suggests continue-as-new early).

mod common;

use std::path::{Path, PathBuf};

use common::{EnvOptions, PATIENCE, PrivateServer, TestEnv, block_on, warm};
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

#[test]
fn golden_histories_replay_against_the_current_workflow_code() {
    let current = histories_in(&histories_dir());
    let before_placement = histories_in(&histories_dir().join("v1"));
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    let common_names = [
        "pool-run1.json",
        "pool-run2.json",
        "agent-completed.json",
        "agent-killed.json",
        "nuke.json",
    ];
    for (files, extra) in [
        (&current, &["hosts.json"][..]),
        (&before_placement, &[][..]),
    ] {
        let have = names(files);
        for wanted in common_names.iter().chain(extra) {
            assert!(
                have.iter().any(|n| n == wanted),
                "{wanted} missing: {have:?}"
            );
        }
    }
    let files: Vec<PathBuf> = current.into_iter().chain(before_placement).collect();
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

/// Records the golden histories (see the module docs). Ignored unless asked for.
#[test]
#[ignore]
fn record() {
    if std::env::var("MURMUR_RECORD_HISTORIES").is_err() {
        eprintln!("set MURMUR_RECORD_HISTORIES=1 to overwrite tests/histories");
        return;
    }
    let server_dir = tempfile::tempdir().unwrap();
    // Suggest continue-as-new after a few hundred events, so the pool rolls over quickly.
    let server = PrivateServer::start(
        server_dir.path().to_path_buf(),
        &[
            "--dynamic-config-value",
            "limit.historyCount.suggestContinueAsNew=250",
        ],
    );
    // Two hosts; h2 is drained, undrained, and then lost (a short lease timeout keeps the
    // recording quick).
    let mut env = TestEnv::start_with(
        "golden",
        EnvOptions {
            temporal_address: Some(server.address()),
            ..EnvOptions::default()
        }
        .worker("MURMUR_HOST_ID", "h1")
        .worker("MURMUR_HOST_LEASE_TIMEOUT", "2s"),
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
    // Flushes until the pool continues as new.
    let pool_id = format!("pool/{}", env.tenant);
    let deadline = std::time::Instant::now() + PATIENCE * 3;
    while runs(&env, &pool_id).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never rolled over"
        );
        env.murmur_ok(&["pool", "flush"]);
        env.wait_for("2 warm VMs", |s| warm(s) == 2);
    }
    env.murmur_ok(&["pool", "flush"]);
    env.wait_for("2 warm VMs on the new run", |s| warm(s) == 2);

    let out = histories_dir();
    std::fs::create_dir_all(&out).unwrap();
    let pool_runs = runs(&env, &pool_id);
    let agent = |slug: &str| format!("agent/{}/default/tester/{slug}", env.tenant);
    let mut wanted = vec![
        (
            pool_id.clone(),
            Some(pool_runs[0].clone()),
            "pool-run1.json",
        ),
        (
            pool_id.clone(),
            Some(pool_runs[1].clone()),
            "pool-run2.json",
        ),
        (agent("done"), None, "agent-completed.json"),
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

/// Run ids of a workflow id, oldest first.
fn runs(env: &TestEnv, id: &str) -> Vec<String> {
    let out = env.temporal(&[
        "workflow",
        "list",
        "--query",
        &format!("WorkflowId = '{id}'"),
        "-o",
        "json",
    ]);
    let text = common::stdout(&out);
    let mut runs: Vec<(String, String)> = serde_json::from_str::<Vec<serde_json::Value>>(&text)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|w| {
            Some((
                w["startTime"].as_str()?.to_string(),
                w["execution"]["runId"].as_str()?.to_string(),
            ))
        })
        .collect();
    runs.sort();
    runs.into_iter().map(|(_, r)| r).collect()
}
