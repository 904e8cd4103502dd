//! Hostile input through every door a user has: each signal, update and query of the pool,
//! agent and nuke workflows gets malformed JSON, wrong types, unknown fields, negative and
//! huge numbers, a 1 MB string and unicode through the stock `temporal` CLI; the workflows
//! keep serving (no workflow task ever fails) and nothing changes. The `murmur` CLI gets bad
//! flags and bad YAML: a clear error, a non-zero exit code, no panic, nothing changed.

use crate::harness::{PATIENCE, TestEnv, stderr, stdout, warm};
use murmur_workflows::agent::Phase;

/// Payloads that no handler accepts as a valid request (or accepts as a harmless no-op).
fn payloads(dir: &std::path::Path) -> Vec<(String, Vec<String>)> {
    let huge = dir.join("huge.json");
    std::fs::write(
        &huge,
        format!("{{\"request\": \"{}\"}}", "x".repeat(1 << 20)),
    )
    .unwrap();
    let huge_string = dir.join("huge-string.json");
    std::fs::write(&huge_string, format!("\"{}\"", "é".repeat(1 << 19))).unwrap();
    let inline = |s: &str| (s.to_string(), vec!["--input".to_string(), s.to_string()]);
    vec![
        inline("\"x\""),
        inline("[1,2]"),
        inline("null"),
        inline("-1"),
        inline("1e308"),
        inline("{\"nuke\":\"yes\"}"),
        inline("{\"kind\":12,\"name\":-1,\"change\":[]}"),
        inline("{\"request\":\"ü🚀\",\"agent\":\"agent/ü/🚀\",\"workspace\":\"../../etc\"}"),
        inline("{\"unknown_field\":true,\"auth\":{\"token\":42}}"),
        inline("{\"max_vms\":-5,\"min_idle\":18446744073709551616}"),
        (
            "1 MB request id".into(),
            vec!["--input-file".into(), huge.display().to_string()],
        ),
        (
            "1 MB unicode string".into(),
            vec!["--input-file".into(), huge_string.display().to_string()],
        ),
    ]
}

/// No workflow task of `workflow` has failed: a bad message was refused, not choked on.
/// Every failed workflow task of every run of `workflow` (`run <id>: event <n>: <cause>`).
fn failed_tasks(env: &TestEnv, workflow: &str) -> Vec<String> {
    let out = env.temporal(&[
        "workflow",
        "list",
        "--query",
        &format!("WorkflowId = '{workflow}'"),
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let runs: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).expect("runs JSON");
    let mut run_ids: std::collections::BTreeSet<String> = runs
        .iter()
        .filter_map(|r| r["execution"]["runId"].as_str().map(str::to_string))
        .collect();
    // The latest run, also if visibility does not list it yet.
    let out = env.temporal(&[
        "workflow",
        "describe",
        "--workflow-id",
        workflow,
        "-o",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let latest: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("describe JSON");
    if let Some(id) = latest["workflowExecutionInfo"]["execution"]["runId"].as_str() {
        run_ids.insert(id.to_string());
    }
    assert!(!run_ids.is_empty(), "no run of {workflow}");
    let mut failed = Vec::new();
    for run_id in &run_ids {
        let out = env.temporal(&[
            "workflow",
            "show",
            "--workflow-id",
            workflow,
            "--run-id",
            run_id.as_str(),
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        let history: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("history JSON");
        for event in history["events"].as_array().into_iter().flatten() {
            if event["eventType"] == "EVENT_TYPE_WORKFLOW_TASK_FAILED" {
                failed.push(format!(
                    "run {run_id}: event {}: {}",
                    event["eventId"], event["workflowTaskFailedEventAttributes"]["cause"]
                ));
            }
        }
    }
    failed
}

/// No workflow task of any run of `workflow` failed.
fn assert_no_task_failed(env: &TestEnv, workflow: &str) {
    let failed = failed_tasks(env, workflow);
    assert!(
        failed.is_empty(),
        "workflow tasks of {workflow} failed on hostile input: {failed:#?}"
    );
}

/// The detector sees a real failed workflow task: one of a workflow type no worker knows.
fn assert_the_detector_sees_a_failed_task(env: &TestEnv) {
    let id = format!("stranded/{}", env.tenant);
    let out = env.temporal(&[
        "workflow",
        "start",
        "--type",
        "NoSuchWorkflow",
        "--task-queue",
        &env.task_queue,
        "--workflow-id",
        &id,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = std::time::Instant::now() + PATIENCE;
    while failed_tasks(env, &id).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed task of {id} was never seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = env.temporal(&[
        "workflow",
        "terminate",
        "--workflow-id",
        &id,
        "--reason",
        "test",
    ]);
}

#[test]
fn every_handler_survives_hostile_payloads_from_the_temporal_cli() {
    let env = TestEnv::start("hostile");
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn("target", "sleep 600");
    let agent = env.wait_phase("target", Phase::Running);
    let before = env.wait_for("the pool refilled around the agent", |s| {
        warm(s) == 2 && s.vms.len() == 3
    });
    let pool = format!("pool/{}", env.tenant);
    let cases = payloads(env.dir.path());

    let registry = format!("{}-hosts", env.task_queue);
    let agent_id = agent.workflow.clone();
    // Every handler the CLI can reach, and whether it must refuse these payloads: `up`
    // (reconcile now) and `admission` take anything harmlessly, every other update changes
    // something; signals and queries just must not choke.
    let mut handlers: Vec<(Door, &str, &str, bool)> = Vec::new();
    for name in ["flush", "up", "hosts", "no_such_signal"] {
        handlers.push((Door::Signal, &pool, name, false));
    }
    for name in [
        "flush",
        "apply_config",
        "claim",
        "release",
        "vm_power",
        "nuke_pause",
        "nuke_reset",
        "no_such_update",
    ] {
        handlers.push((Door::Update, &pool, name, true));
    }
    handlers.push((Door::Update, &pool, "up", false));
    handlers.push((Door::Update, &agent_id, "admission", false));
    for name in [
        "status",
        "config",
        "version",
        "claim_state",
        "no_such_query",
    ] {
        handlers.push((Door::Query, &pool, name, false));
    }
    for name in ["claim_settled", "vm_lost"] {
        handlers.push((Door::Signal, &agent_id, name, false));
    }
    for name in ["kill", "sleep", "wake", "on_idle"] {
        handlers.push((Door::Update, &agent_id, name, true));
    }
    handlers.push((Door::Query, &agent_id, "status", false));
    // The host registry: registrations are checked, drains of unknown hosts refused.
    handlers.push((Door::Signal, &registry, "register", false));
    handlers.push((Door::Signal, &registry, "leave", false));
    handlers.push((Door::Update, &registry, "drain", true));
    handlers.push((Door::Query, &registry, "hosts", false));
    for (what, input) in &cases {
        for &(door, workflow, name, must_refuse) in &handlers {
            let out = knock(&env, door, workflow, name, input);
            assert!(
                !(must_refuse && out.status.success()),
                "update {name} of {workflow} accepted hostile input {what}: {}",
                stdout(&out)
            );
        }
    }
    let sent = cases.len() * handlers.len();
    eprintln!("{sent} hostile messages sent");

    // Still serving, nothing changed: same VMs, same config, the agent still runs on its VM.
    let after = env.status();
    let ids = |st: &murmur_workflows::status::PoolStatus| {
        st.vms.iter().map(|v| v.id.0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&after),
        ids(&before),
        "hostile input changed the inventory"
    );
    assert_eq!(
        after.generation, before.generation,
        "a hostile flush went through"
    );
    assert_eq!(after.config_generation, before.config_generation);
    assert_eq!(after.nukes, 0);
    // (The per-run counter may have restarted with a continue-as-new: 1 MB payloads make
    // history grow fast. The log keeps every rejection.)
    assert!(
        env.worker_log().contains("rejected malformed message"),
        "rejections are logged"
    );
    let still = env.agent("target");
    assert_eq!(still.phase, Some(Phase::Running));
    assert_eq!(still.vm, agent.vm);
    assert_the_detector_sees_a_failed_task(&env);
    assert_no_task_failed(&env, &pool);
    assert_no_task_failed(&env, &agent.workflow);
    assert_no_task_failed(&env, &registry);
    // The one host is still live and still the only one.
    let hosts = env.murmur_ok(&["host", "ls", "--json"]);
    let hosts: Vec<serde_json::Value> = serde_json::from_str(&hosts).unwrap();
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(hosts[0]["status"], "live");

    // And it still does its job.
    let out = env.murmur_ok(&["pool", "flush"]);
    assert!(out.contains("Flushed 2"), "{out}");
    env.wait_for("2 fresh warm VMs", |s| warm(s) == 2);
    env.murmur_ok(&["kill", "target"]);
    env.wait_phase("target", Phase::Canceled);
}

/// How a message reaches a workflow through the `temporal` CLI.
#[derive(Clone, Copy)]
enum Door {
    Signal,
    Update,
    Query,
}

/// Sends `input` to handler `name` of `workflow` through `door`.
fn knock(
    env: &TestEnv,
    door: Door,
    workflow: &str,
    name: &str,
    input: &[String],
) -> std::process::Output {
    let verb: &[&str] = match door {
        Door::Signal => &["workflow", "signal"],
        Door::Update => &["workflow", "update", "execute"],
        Door::Query => &["workflow", "query"],
    };
    let mut args = verb.to_vec();
    args.extend(["--workflow-id", workflow, "--name", name]);
    let mut cmd = env.command_for_temporal(&args);
    cmd.args(input);
    let out = cmd.output().expect("run temporal");
    let err = stderr(&out);
    assert!(
        !err.contains("panicked"),
        "temporal {args:?}: worker-side panic surfaced: {err}"
    );
    out
}

#[test]
fn bad_flags_and_bad_yaml_get_clear_errors_and_change_nothing() {
    let env = TestEnv::start("badcli");
    env.set_workspace("default", "min_idle: 1\n");
    let before = env.wait_for("1 warm VM", |s| warm(s) == 1);
    let huge_description = format!("description: \"{}\"\n", "d".repeat(1 << 20));
    let yaml_cases: Vec<(&str, String)> = vec![
        ("not YAML", ": : :\n\t- [".into()),
        ("a list", "- 1\n- 2\n".into()),
        ("wrong type", "min_idle: lots\n".into()),
        ("negative", "min_idle: -3\n".into()),
        ("too big", "min_idle: 18446744073709551616\n".into()),
        ("unknown field", "min_idle: 1\nflavour: spicy\n".into()),
        ("1 MB description", huge_description),
        ("bad image", "image_ref: \"../../etc/passwd\"\n".into()),
        ("unicode", "image_ref: \"🚀\"\nmin_idle: 1\n".into()),
    ];
    for (what, yaml) in &yaml_cases {
        let out = env.murmur_stdin(&["set", "workspace", "default"], yaml);
        assert_clear_failure(&out, what);
    }
    let flag_cases: Vec<Vec<&str>> = vec![
        vec!["pool", "status", "--bogus"],
        vec!["pool", "flush", "--workspace", "Bad Name"],
        vec!["patch", "workspace", "default", "--set", "min_idle=-1"],
        vec!["patch", "workspace", "default", "--set", "min_idle"],
        vec!["patch", "workspace", "default", "--set", "no.such.key=1"],
        vec!["patch", "pool-config", "default", "--set", "max_vms=0"],
        vec![
            "patch",
            "pool-config",
            "default",
            "--set",
            "max_vms=99999999999999999999",
        ],
        vec!["get", "no-such-kind", "x"],
        vec!["spawn", "Ünïcode slug", "--", "true"],
        vec!["spawn", "ok-slug"],
        vec!["wait", "target", "--timeout", "soon"],
        vec!["kill", "no-such-agent"],
        vec!["sleep", "no-such-agent"],
        vec!["wake", "Bad Slug"],
        vec!["on-idle", "target", "terminate"],
        vec!["on-idle", "target", "hibernate"],
        vec!["on-idle", "target"],
        vec!["host", "drain", "Bad Host"],
        vec!["host", "drain", "no-such-host"],
        vec!["host", "frobnicate"],
    ];
    for args in &flag_cases {
        let out = env.murmur(args);
        assert_clear_failure(&out, &args.join(" "));
    }
    // The worker's settings, before or after `run`: refused before anything starts.
    for (args, says) in [
        (vec!["run", "--faults", "explode=1"], "unknown key"),
        (vec!["--faults", "create_fail=2"], "probability"),
        (vec!["run", "--boot-timeout", "5m"], "between 1s and 60s"),
        (vec!["run", "--reap-interval", "soon"], "invalid duration"),
        (vec!["run", "--substrate", "cloud"], "possible values"),
        (vec!["run", "--host-id", "Worker_1"], "invalid host id"),
        (vec!["--host-max-vms", "0"], "not in 1.."),
        (
            vec!["run", "--host-lease-timeout", "0s"],
            "between 1s and 1h",
        ),
        (vec!["run", "--host-memory-mb", "lots"], "invalid digit"),
        (vec!["run", "--workflow-cache", "1"], "between 2 and 100000"),
        (
            vec!["--workflow-cache", "many"],
            "expected a number of runs",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_murmur-worker"))
            .args(&args)
            .env("MURMUR_STATE_DIR", env.state_dir())
            .output()
            .expect("run murmur-worker");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let after = env.status();
    assert_eq!(after.config_generation, before.config_generation);
    assert_eq!(
        after.workspaces[0].config_generation, before.workspaces[0].config_generation,
        "a rejected change went through"
    );
    assert!(after.claims.is_empty(), "a rejected spawn claimed a VM");
    // Still healthy.
    let deadline = std::time::Instant::now() + PATIENCE;
    while warm(&env.status()) != 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn assert_clear_failure(out: &std::process::Output, what: &str) {
    let err = stderr(out);
    let code = out.status.code();
    assert!(
        matches!(code, Some(1 | 2 | 64 | 65)),
        "{what}: exit {code:?}, stderr {err}"
    );
    assert!(!err.trim().is_empty(), "{what}: no error message");
    assert!(!err.contains("panicked"), "{what}: panic: {err}");
    assert!(
        err.len() < 4096,
        "{what}: error message is a wall: {} bytes",
        err.len()
    );
}
