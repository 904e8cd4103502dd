//! Identity and permissions end to end: roles, missing / expired / forged / wrong-tenant
//! tokens through the murmur CLI and the `temporal` CLI, replays of requests copied out of a
//! workflow history, key rotation, and secrets kept out of the worker's log.

use crate::harness::{TestEnv, ids_in, stderr, stdout, warm};
use base64::Engine as _;
use murmur_workflows::agent::Phase;
use murmur_workflows::model::VmState;

const HINT_AUTH: &str = "Run murmur auth or check your murmur.local.yaml configuration.";
const HINT_PERM: &str = "Ask a tenant admin to grant you the required permission.";

/// A pool with one warm VM; returns its VM ids and generation.
fn warm_pool(env: &TestEnv) -> (Vec<String>, u64) {
    env.set_workspace("default", "min_idle: 1\n");
    let st = env.wait_for("1 warm VM", |s| warm(s) == 1);
    (ids_in(&st, VmState::Warm), st.generation)
}

/// Asserts the pool did not change: same warm VMs, same generation.
fn assert_untouched(env: &TestEnv, before: &(Vec<String>, u64)) {
    let st = env.status();
    assert_eq!(st.generation, before.1, "the pool was flushed");
    assert_eq!(ids_in(&st, VmState::Warm), before.0);
}

/// Runs `murmur pool flush` with `MURMUR_TOKEN` set to `credential`.
fn flush_as(env: &TestEnv, credential: &str) -> std::process::Output {
    env.murmur_as(credential, &["pool", "flush"])
}

/// A signed flush request for the `temporal` CLI, made with `credential`.
fn signed_as(env: &TestEnv, credential: &str, what: &str) -> String {
    let out = env.murmur_as(credential, &["auth", "sign", what]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

fn temporal_update(env: &TestEnv, input: &str) -> std::process::Output {
    let wf = format!("pool/{}", env.tenant);
    env.temporal(&[
        "workflow",
        "update",
        "execute",
        "--workflow-id",
        &wf,
        "--name",
        "flush",
        "--input",
        input,
    ])
}

fn temporal_signal(env: &TestEnv, input: &str) -> std::process::Output {
    let wf = format!("pool/{}", env.tenant);
    env.temporal(&[
        "workflow",
        "signal",
        "--workflow-id",
        &wf,
        "--name",
        "flush",
        "--input",
        input,
    ])
}

/// Changes one character of a token's signature.
fn forge(credential: &str) -> String {
    let (token, key) = credential.split_once('~').unwrap();
    let mut bytes = token.as_bytes().to_vec();
    let i = bytes.len() - 3;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    format!("{}~{key}", String::from_utf8(bytes).unwrap())
}

#[test]
fn only_roles_with_pool_config_delete_may_flush() {
    let env = TestEnv::start("roles");
    let before = warm_pool(&env);
    for role in ["viewer", "member"] {
        let cred = env.credential(&env.tenant, "someone", role, "1h");
        let out = flush_as(&env, &cred);
        assert_eq!(out.status.code(), Some(1), "{role}");
        assert_eq!(
            stderr(&out),
            format!(
                "PERMISSION_DENIED: your role does not have pool-config.delete permission\n{HINT_PERM}\n"
            ),
            "{role}"
        );
        assert_untouched(&env, &before);
    }
    // The refusals are on record: who, what, why.
    let st = env.status();
    assert_eq!(st.denials.len(), 2);
    assert_eq!(st.denials[0].who, format!("someone@{}", env.tenant));
    assert_eq!(st.denials[0].op, "pool.flush");
    assert!(st.denials[1].why.starts_with("PERMISSION_DENIED"));

    let admin = env.credential(&env.tenant, "boss", "murmur-tenant-admin", "1h");
    let out = flush_as(&env, &admin);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with("Flushed 1 warm VM \u{2014} pool will replenish with fresh ones\n")
    );
    assert_eq!(env.status().generation, before.1 + 1);
}

#[test]
fn missing_expired_forged_and_foreign_tokens_are_refused_everywhere() {
    let env = TestEnv::start("tokens");
    let other = TestEnv::start("othertenant");
    let before = warm_pool(&env);
    let admin = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "1h");
    let expired = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "0s");
    // Same worker key, another tenant: a valid token that must not act here.
    let foreign = env.credential(&other.tenant, "tester", "murmur-tenant-admin", "1h");
    let cases = [
        (
            expired.clone(),
            "UNAUTHENTICATED: identity token is missing or expired",
        ),
        (
            forge(&admin),
            "UNAUTHENTICATED: identity token signature is invalid",
        ),
        (
            foreign.clone(),
            &*format!(
                "PERMISSION_DENIED: identity token is for tenant {}, not {}",
                other.tenant, env.tenant
            ),
        ),
    ];
    for (cred, expected) in &cases {
        // The murmur CLI.
        let out = flush_as(&env, cred);
        assert_eq!(out.status.code(), Some(1));
        let hint = if expected.starts_with("UNAUTH") {
            HINT_AUTH
        } else {
            HINT_PERM
        };
        assert_eq!(stderr(&out), format!("{expected}\n{hint}\n"));
        // The temporal CLI, credential in the JSON input: update and signal.
        let signed = signed_as(&env, cred, "flush");
        let out = temporal_update(&env, &signed);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
        let denials = env.status().denials.len();
        assert!(temporal_signal(&env, &signed).status.success());
        let st = env.wait_for("the signal to be refused", |s| s.denials.len() > denials);
        // Who a denial names comes from a verified token only: a forged one claims nothing.
        let who = &st.denials.last().expect("a denial").who;
        if expected.contains("signature is invalid") {
            assert_eq!(who, "unknown", "a forged token named who was refused");
        }
        assert_untouched(&env, &before);
    }

    // No credential at all: no local file, no MURMUR_TOKEN.
    std::fs::remove_file(env.dir.path().join(".murmur/murmur.local.yaml")).unwrap();
    let out = env.murmur(&["pool", "flush"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!("UNAUTHENTICATED: identity token is missing or expired\n{HINT_AUTH}\n")
    );
    let out = temporal_update(&env, "{}");
    assert!(stderr(&out).contains("UNAUTHENTICATED: identity token is missing or expired"));
    // --json callers get the error as JSON.
    let out = env.murmur(&["auth", "status", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(err["code"], "UNAUTHENTICATED");
    assert_eq!(err["message"], "identity token is missing or expired");
    assert_untouched(&env, &before);

    // Nothing secret reached the worker's log.
    let log = std::fs::read_to_string(env.dir.path().join("worker.log")).unwrap();
    for cred in [&admin, &expired, &foreign] {
        let (token, key) = cred.split_once('~').unwrap();
        let signature = token.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token is in the worker log");
        assert!(!log.contains(key), "a private key is in the worker log");
    }
    assert!(log.contains("request denied"), "denials are logged");
}

/// The input of the first accepted `flush` update in the pool's history, as sent.
fn flush_input_from_history(env: &TestEnv) -> String {
    let events = env.history_events(&format!("pool/{}", env.tenant));
    let accepted = events
        .iter()
        .find_map(|e| {
            let req = &e["workflowExecutionUpdateAcceptedEventAttributes"]["acceptedRequest"];
            (req["input"]["name"] == "flush").then(|| req["input"]["args"]["payloads"][0].clone())
        })
        .expect("an accepted flush update in history");
    let data = accepted["data"].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn a_request_copied_out_of_history_cannot_be_replayed() {
    let env = TestEnv::start("replay");
    let before = warm_pool(&env);
    let signed = env.murmur_ok(&["auth", "sign", "flush"]);
    let out = temporal_update(&env, signed.trim());
    assert!(out.status.success(), "{}", stderr(&out));
    let after_first = env.wait_for("refill", |s| warm(s) == 1);
    assert_eq!(after_first.generation, before.1 + 1);
    let state = (ids_in(&after_first, VmState::Warm), after_first.generation);

    let copied = flush_input_from_history(&env);
    assert!(copied.contains("\"sig\""), "{copied}");
    // The same request again.
    let out = temporal_update(&env, &copied);
    assert!(
        stderr(&out).contains("UNAUTHENTICATED: request") && stderr(&out).contains("already used"),
        "{}",
        stderr(&out)
    );
    // With a fresh request id: the signature no longer matches.
    let mut doc: serde_json::Value = serde_json::from_str(&copied).unwrap();
    doc["auth"]["request_id"] = "00000000000000000000000000000001".into();
    let out = temporal_update(&env, &doc.to_string());
    assert!(
        stderr(&out).contains("UNAUTHENTICATED: request signature does not match"),
        "{}",
        stderr(&out)
    );
    // Turned into a nuke: also a different request than the one signed.
    doc["nuke"] = true.into();
    let out = temporal_update(&env, &doc.to_string());
    assert!(stderr(&out).contains("UNAUTHENTICATED"), "{}", stderr(&out));
    assert_untouched(&env, &state);
}

#[test]
fn members_spawn_but_cannot_change_config_and_viewers_cannot_kill() {
    let env = TestEnv::start("perms");
    env.set_workspace("default", "min_idle: 0\n");
    let member = env.credential(&env.tenant, "tester", "member", "1h");
    let viewer = env.credential(&env.tenant, "tester", "viewer", "1h");

    let out = env.murmur_as(
        &member,
        &["patch", "workspace", "default", "--set", "min_idle=3"],
    );
    assert!(
        stderr(&out)
            .starts_with("PERMISSION_DENIED: your role does not have workspace.edit permission"),
        "{}",
        stderr(&out)
    );
    let out = env.murmur_as(&viewer, &["spawn", "job", "--", "sleep 300"]);
    assert!(
        stderr(&out)
            .starts_with("PERMISSION_DENIED: your role does not have agent.create permission"),
        "{}",
        stderr(&out)
    );
    let out = env.murmur_as(&member, &["spawn", "job", "--", "sleep 300"]);
    assert!(out.status.success(), "{}", stderr(&out));
    env.wait_phase("job", Phase::Running);
    let out = env.murmur_as(&viewer, &["kill", "job"]);
    assert!(
        stderr(&out)
            .starts_with("PERMISSION_DENIED: your role does not have agent.edit permission"),
        "{}",
        stderr(&out)
    );
    assert_eq!(env.agent("job").phase, Some(Phase::Running));
    let out = env.murmur_as(&member, &["kill", "job"]);
    assert_eq!(stdout(&out), "killed job\n", "{}", stderr(&out));
    assert_eq!(env.agent("job").phase, Some(Phase::Canceled));
    assert_eq!(env.status().config.max_vms, 10);
    assert_eq!(env.status().workspaces[0].min_idle, 0);
}

#[test]
fn rotated_keys_keep_old_tokens_until_retired() {
    let env = TestEnv::start("rotate");
    let before = warm_pool(&env);
    let old = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "1h");
    let worker = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_murmur-worker"))
            .args(args)
            .env("MURMUR_STATE_DIR", env.state_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let old_kid = worker(&["key", "list"]).lines().next().unwrap().to_string();
    let new_kid = worker(&["key", "rotate"]).trim().to_string();
    assert_ne!(old_kid, new_kid);
    // The running worker accepts both the old token and one of the new key.
    let out = flush_as(&env, &old);
    assert!(out.status.success(), "{}", stderr(&out));
    let new = env.credential(&env.tenant, "tester", "murmur-tenant-admin", "1h");
    let out = flush_as(&env, &new);
    assert!(out.status.success(), "{}", stderr(&out));
    let st = env.wait_for("refill", |s| warm(s) == 1);
    assert_eq!(st.generation, before.1 + 2);

    worker(&["key", "retire", &old_kid]);
    let out = flush_as(&env, &old);
    assert!(
        stderr(&out)
            .starts_with("UNAUTHENTICATED: identity token was signed by an unknown or retired key"),
        "{}",
        stderr(&out)
    );
    assert!(flush_as(&env, &new).status.success());
}

#[test]
fn login_stores_a_private_git_ignored_credential() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::start("login");
    std::fs::write(env.dir.path().join(".gitignore"), "target\n").unwrap();
    let cred = env.credential(&env.tenant, "ana", "member", "1h");
    let out = env.murmur_stdin(&["auth", "login"], &cred);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!(
        "Logged in as ana (tenant {}, role member",
        env.tenant
    )));
    let file = env.dir.path().join(".murmur/murmur.local.yaml");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let gitignore = std::fs::read_to_string(env.dir.path().join(".gitignore")).unwrap();
    assert_eq!(gitignore, "target\n.murmur/murmur.local.yaml\n");
    let status = env.murmur_ok(&["auth", "status"]);
    assert!(status.contains("developer: ana\n") && status.contains("role:      member\n"));
    assert!(
        !status.contains(cred.split('~').next().unwrap()),
        "status printed the token"
    );
    // A token of another tenant is not stored.
    let foreign = env.credential("elsewhere", "ana", "member", "1h");
    let out = env.murmur(&["auth", "login", "--token", &foreign]);
    assert!(stderr(&out).starts_with("FAILED_PRECONDITION: this token is for tenant elsewhere"));
    let out = env.murmur(&["auth", "login", "--token", "not-a-credential"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("INVALID_ARGUMENT: not a murmur credential"));
}
