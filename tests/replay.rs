//! Determinism: golden histories of the pool, agent and nuke workflows (flush, claim, kill,
//! nuke, continue-as-new), recorded with the Rust client into `tests/histories/`, must replay
//! against the current workflow code. A change that would break running workflows fails here,
//! in CI, without a server.
//!
//! Re-record (after a deliberate, versioned change) with:
//! `MURMUR_RECORD_HISTORIES=1 ./devserver.sh test -- --test replay -- --ignored record`
//! (the recorder starts a private dev server that suggests continue-as-new early).

mod common;

use std::path::{Path, PathBuf};

use common::{EnvOptions, PATIENCE, PrivateServer, TestEnv, block_on, warm};
use murmur_workflows::agent::Phase;
use murmur_workflows::agent_workflow::AgentWorkflow;
use murmur_workflows::nuke_workflow::NukeWorkflow;
use murmur_workflows::pool_workflow::PoolWorkflow;
use temporalio_client::{
    NamespacedClient, WorkflowExecutionInfo, WorkflowFetchHistoryOptions, WorkflowHistory,
};
use temporalio_sdk::workflow_replayer::{WorkflowReplayer, WorkflowReplayerOptions};

fn histories_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/histories")
}

#[test]
fn golden_histories_replay_against_the_current_workflow_code() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(histories_dir())
        .expect("tests/histories exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for wanted in [
        "pool-run1.json",
        "pool-run2.json",
        "agent-completed.json",
        "agent-killed.json",
        "nuke.json",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing: {names:?}"
        );
    }
    let failures = block_on(async {
        let options = WorkflowReplayerOptions::new()
            .register_workflow::<PoolWorkflow>()
            .and_then(|o| o.register_workflow::<AgentWorkflow>())
            .and_then(|o| o.register_workflow::<NukeWorkflow>())
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
    let env = TestEnv::start_with(
        "golden",
        EnvOptions {
            temporal_address: Some(server.address()),
            ..EnvOptions::default()
        },
    );
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
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
