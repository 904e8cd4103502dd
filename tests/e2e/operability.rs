//! What an operator sees: the `--json` schemas, version and completions (the metrics
//! endpoint is [`crate::metrics`]).

use crate::harness::{TestEnv, stderr, warm};
use murmur_workflows::agent::Phase;

#[test]
fn json_views_have_their_documented_fields() {
    let env = TestEnv::start("schemas");
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn("one", "true");
    env.wait_phase("one", Phase::Completed);

    let pool: serde_json::Value =
        serde_json::from_str(&env.murmur_ok(&["pool", "status", "--json"])).unwrap();
    for key in [
        "tenant",
        "generation",
        "config",
        "in_use",
        "workspaces",
        "failing_images",
        "flush_in_progress",
        "nuke_in_progress",
        "counters",
        "vms",
        "claims",
        "denials",
        "last_reconcile_at",
    ] {
        assert!(pool.get(key).is_some(), "pool status --json lacks {key}");
    }
    let ws = &pool["workspaces"][0];
    for key in [
        "name",
        "min_idle",
        "image_ref",
        "ready",
        "groups",
        "reasons",
    ] {
        assert!(ws.get(key).is_some(), "workspace lacks {key}");
    }
    let agent: serde_json::Value =
        serde_json::from_str(&env.murmur_ok(&["status", "--json", "one"])).unwrap();
    assert_eq!(agent["phase"], "PHASE_COMPLETED");
    for key in [
        "workflow",
        "slug",
        "vm",
        "exit_code",
        "output_tail",
        "reached",
    ] {
        assert!(agent.get(key).is_some(), "status --json lacks {key}");
    }
    let ls: serde_json::Value =
        serde_json::from_str(&env.murmur_ok(&["ls", "-a", "--json"])).unwrap();
    assert_eq!(ls[0]["slug"], "one");
    assert_eq!(ls[0]["phase"], "completed");
    let auth: serde_json::Value =
        serde_json::from_str(&env.murmur_ok(&["auth", "status", "--json"])).unwrap();
    assert_eq!(auth["role"], "murmur-tenant-admin");
    assert_eq!(auth["expired"], false);
}

#[test]
fn version_reports_client_and_worker_and_completions_are_generated() {
    let env = TestEnv::start("version");
    env.set_workspace("default", "min_idle: 0\n");
    let out = env.murmur_ok(&["version"]);
    let version = env!("CARGO_PKG_VERSION");
    let commit = env!("MURMUR_COMMIT");
    assert!(
        out.contains(&format!("client: murmur {version} (commit {commit})")),
        "{out}"
    );
    assert!(
        out.contains(&format!("worker: murmur-worker {version}")),
        "{out}"
    );
    let out = env.murmur(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("complete -F"));
}
