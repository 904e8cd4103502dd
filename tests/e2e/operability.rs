//! What an operator sees: the worker's metrics and health endpoint against the pool's own
//! status, the `--json` schemas, version and completions.

use crate::harness::{TestEnv, stderr, warm};
use murmur_workflows::agent::Phase;

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Every `murmur_*` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("murmur_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn metrics_match_the_pool_status_and_health_says_polling() {
    let mut env = TestEnv::start("metrics");
    env.enable_metrics();
    // The endpoint comes up before the worker polls: alive at once, ready once it polls.
    let deadline = std::time::Instant::now() + crate::harness::PATIENCE;
    let body = loop {
        let (live, body) = env.http_get("/healthz");
        assert_eq!((live.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));
        let (status, body) = env.http_get("/readyz");
        if status == "HTTP/1.1 200 OK" {
            break body;
        }
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
        assert!(
            body.starts_with("not ready: not polling task queue"),
            "{body}"
        );
        assert!(std::time::Instant::now() < deadline, "never polling");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(body.starts_with("ready: polling task queue"), "{body}");

    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn("probe", "sleep 30");
    env.wait_phase("probe", Phase::Running);
    let st = env.wait_for("backfill", |s| warm(s) == 2 && s.in_use == 3);

    let (status, text) = env.http_get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let t = &env.tenant;
    let vms = |state: &str| {
        sample(
            &text,
            "murmur_vms",
            &format!(
                "tenant=\"{t}\",workspace=\"default\",image=\"default\",current_generation=\"true\",state=\"{state}\""
            ),
        )
    };
    assert_eq!(vms("warm"), Some(2.0), "{text}");
    assert_eq!(vms("assigned"), Some(1.0), "{text}");
    let tenant = format!("tenant=\"{t}\"");
    assert_eq!(
        sample(&text, "murmur_vms_in_use", &tenant),
        Some(f64::from(st.in_use))
    );
    assert_eq!(sample(&text, "murmur_max_vms", &tenant), Some(10.0));
    assert_eq!(sample(&text, "murmur_agents", &tenant), Some(1.0));
    assert_eq!(
        sample(&text, "murmur_boots_total", &tenant),
        Some(st.counters.boots as f64)
    );
    // The agent took a warm VM: one warm claim measured, none cold.
    assert_eq!(
        sample(&text, "murmur_claim_latency_seconds_count", "kind=\"warm\""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "murmur_claim_latency_seconds_count", "kind=\"cold\""),
        Some(0.0)
    );
    assert_eq!(sample(&text, "murmur_worker_polling", ""), None);
    assert!(text.contains("\nmurmur_worker_polling 1\n"), "{text}");
    let build = format!(
        "version=\"{}\",commit=\"{}\"",
        env!("CARGO_PKG_VERSION"),
        env!("MURMUR_COMMIT")
    );
    assert_eq!(
        sample(&text, "murmur_build_info", &build),
        Some(1.0),
        "{text}"
    );
    // Counters are counters, named `_total`.
    assert!(text.contains("# TYPE murmur_rejected_messages_total counter\n"));
    // The SDK's own worker metrics are appended, in Prometheus conventions: counters end in
    // `_total`, durations are seconds and say so.
    let types: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE temporal_"))
        .collect();
    assert!(!types.is_empty(), "no SDK metrics in: {text}");
    assert!(
        types
            .iter()
            .filter(|t| t.ends_with(" counter"))
            .all(|t| t.split(' ').next().is_some_and(|n| n.ends_with("_total"))),
        "{types:?}"
    );
    assert!(
        types.iter().any(|t| t.contains("_seconds "))
            && !types.iter().any(|t| t.contains("_milliseconds")),
        "{types:?}"
    );
    // The deploy files' alerts and dashboard name only metrics the worker exports.
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/murmur.json"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let named = metric_names(&std::fs::read_to_string(&path).expect("read deploy file"));
        assert!(!named.is_empty(), "{file} names no murmur metric");
        for name in named {
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{file} uses {name}, which the worker does not export"
            );
        }
    }
    let (status, _) = env.http_get("/nope");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

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
