//! The worker's operations endpoint as Prometheus reads it: `/metrics` parsed with a
//! Prometheus text parser and checked against the pool's own status and the substrates,
//! `/healthz` and `/readyz`; a fleet of three workers whose sums are right; scrapes that
//! cost Temporal nothing; deploy files that name only series the worker exports.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::harness::{EnvOptions, PATIENCE, PrivateServer, TestEnv, warm};
use murmur_workflows::agent::Phase;
use prometheus_parse::{LineInfo, Scrape, Value};

/// Parses an exposition, failing on any line the parser does not understand (the parser
/// skips those silently).
fn parse(text: &str) -> Scrape {
    for line in text.lines() {
        let understood =
            !matches!(LineInfo::parse(line), LineInfo::Ignored) || line.starts_with("# ");
        assert!(understood, "not Prometheus text: {line:?}");
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse /metrics")
}

/// The value of the sample `name` whose labels include all of `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| scalar(&s.value))
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .filter_map(|s| scalar(&s.value))
        .sum()
}

fn scalar(v: &Value) -> Option<f64> {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => Some(*x),
        _ => None,
    }
}

/// Scrapes `addr` until `pred` holds for what it reads (the pool-level series follow the
/// pools within a refresh), returning the last exposition.
fn scrape_until(
    env: &TestEnv,
    addr: &str,
    what: &str,
    pred: impl Fn(&Scrape) -> bool,
) -> (String, Scrape) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, text) = env.http_get_at(addr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
        let scrape = parse(&text);
        if pred(&scrape) {
            return (text, scrape);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} in /metrics:\n{text}\n{}",
            env.worker_log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every `murmur_*` metric name a deploy file uses.
fn names_in_deploy_file(file: &str) -> std::collections::BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).expect("read deploy file");
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
    let addr = env.enable_metrics();
    // The endpoint comes up before the worker polls: alive at once, ready once it polls.
    let deadline = Instant::now() + PATIENCE;
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
        assert!(Instant::now() < deadline, "never polling");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(body.starts_with("ready: polling task queue"), "{body}");

    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    env.spawn("probe", "sleep 30");
    env.wait_phase("probe", Phase::Running);
    let st = env.wait_for("backfill", |s| warm(s) == 2 && s.in_use == 3);

    let t = env.tenant.clone();
    let vms = |scrape: &Scrape, state: &str| {
        value(
            scrape,
            "murmur_vms",
            &[
                ("tenant", &t),
                ("workspace", "default"),
                ("image", "default"),
                ("current_generation", "true"),
                ("state", state),
            ],
        )
    };
    let (text, scrape) = scrape_until(&env, &addr, "2 warm and 1 assigned VM", |s| {
        vms(s, "warm") == Some(2.0) && vms(s, "assigned") == Some(1.0)
    });
    let tenant = [("tenant", t.as_str())];
    assert_eq!(value(&scrape, "murmur_pool_up", &tenant), Some(1.0));
    assert_eq!(
        value(&scrape, "murmur_vms_in_use", &tenant),
        Some(f64::from(st.in_use))
    );
    assert_eq!(value(&scrape, "murmur_max_vms", &tenant), Some(10.0));
    assert_eq!(value(&scrape, "murmur_agents", &tenant), Some(1.0));
    assert_eq!(
        value(&scrape, "murmur_boots_total", &tenant),
        Some(st.counters.boots as f64)
    );
    assert_eq!(value(&scrape, "murmur_pools_exported", &[]), Some(1.0));
    // Host-level series: what this host's substrate holds, read at scrape time.
    assert_eq!(
        value(&scrape, "murmur_host_vms", &tenant),
        Some(env.substrate().len() as f64)
    );
    assert_eq!(
        value(&scrape, "murmur_hosts", &[("state", "live")]),
        Some(1.0)
    );
    // The agent took a warm VM: one warm claim measured, none cold.
    let claims = |kind: &str| {
        value(
            &scrape,
            "murmur_claim_latency_seconds_count",
            &[("kind", kind)],
        )
    };
    assert_eq!((claims("warm"), claims("cold")), (Some(1.0), Some(0.0)));
    assert_eq!(value(&scrape, "murmur_worker_polling", &[]), Some(1.0));
    assert_eq!(
        value(
            &scrape,
            "murmur_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", env!("MURMUR_COMMIT"))
            ]
        ),
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

    // An image whose boots fail: its failure count appears, so every series the alert rules
    // and dashboard name can be checked against a real scrape.
    env.make_image("broken", "#!/bin/sh\nexit 1\n");
    env.set_workspace("broken", "min_idle: 1\nimage_ref: broken\n");
    let (_, scrape) = scrape_until(&env, &addr, "the failing image", |s| {
        value(
            s,
            "murmur_image_consecutive_boot_failures",
            &[("tenant", &t), ("image", "broken")],
        )
        .is_some_and(|n| n >= 1.0)
    });
    let exported: std::collections::BTreeSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/murmur.json"] {
        let named = names_in_deploy_file(file);
        assert!(!named.is_empty(), "{file} names no murmur metric");
        for name in named {
            // Histogram buckets are parsed into their family.
            let family = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                exported.contains(family),
                "{file} uses {name}, which the worker does not export"
            );
        }
    }
    let (status, _) = env.http_get("/nope");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

/// Runs `murmur` as an admin of `tenant` (another tenant of the same deployment).
fn murmur_for(env: &TestEnv, tenant: &str, credential: &str, args: &[&str], stdin: &str) {
    use std::io::Write;
    let mut child = env
        .murmur_cmd(args)
        .env("MURMUR_TENANT", tenant)
        .env("MURMUR_TOKEN", credential)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run murmur");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("murmur output");
    assert!(
        out.status.success(),
        "murmur {args:?} for {tenant}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_fleet_exports_each_pool_once_so_sums_are_right() {
    let mut env = TestEnv::start_with(
        "fleet",
        EnvOptions::default().worker("MURMUR_HOST_ID", "h1"),
    );
    let mut endpoints = BTreeMap::new();
    endpoints.insert("h1", env.enable_metrics());
    endpoints.insert("h2", env.start_host_with_metrics("h2"));
    endpoints.insert("h3", env.start_host_with_metrics("h3"));
    // Two tenants of the one deployment, each with warm VMs spread over the hosts.
    let other = format!("{}-b", env.tenant);
    let other_admin = env.credential(&other, "tester", "murmur-tenant-admin", "1h");
    env.set_workspace("default", "min_idle: 4\n");
    murmur_for(
        &env,
        &other,
        &other_admin,
        &["set", "workspace", "default"],
        "min_idle: 3\n",
    );
    env.wait_for("4 warm VMs", |s| warm(s) == 4 && s.in_use == 4);
    let dirs = [
        ("h1", env.state_dir()),
        ("h2", env.host_state_dir("h2")),
        ("h3", env.host_state_dir("h3")),
    ];
    let tenants = [env.tenant.clone(), other.clone()];
    let in_substrates = |tenant: &str| -> usize {
        dirs.iter()
            .map(|(_, dir)| env.vms_of(dir.clone(), tenant).len())
            .sum()
    };
    let deadline = Instant::now() + PATIENCE;
    while in_substrates(&other) != 3 {
        assert!(
            Instant::now() < deadline,
            "the second tenant never had 3 VMs"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Scrape all three until every worker has read its pools since both settled, then the
    // fleet-wide sums must equal what the substrates hold.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let scrapes: Vec<Scrape> = endpoints
            .values()
            .map(|addr| parse(&env.http_get_at(addr, "/metrics").1))
            .collect();
        let fleet = |name: &str, labels: &[(&str, &str)]| -> f64 {
            scrapes.iter().map(|s| sum(s, name, labels)).sum()
        };
        let mut right = fleet("murmur_pools_exported", &[]) == 2.0
            && fleet("murmur_hosts", &[("state", "live")]) == 3.0;
        for t in &tenants {
            let want = in_substrates(t) as f64;
            right &= fleet("murmur_vms", &[("tenant", t)]) == want
                && fleet("murmur_host_vms", &[("tenant", t)]) == want
                && fleet("murmur_pool_up", &[("tenant", t)]) == 1.0;
        }
        if right {
            // Each host's own series count only its own substrate.
            for ((host, dir), scrape) in dirs.iter().zip(&scrapes) {
                for t in &tenants {
                    assert_eq!(
                        sum(scrape, "murmur_host_vms", &[("tenant", t), ("host", host)]),
                        env.vms_of(dir.clone(), t).len() as f64,
                        "{host}"
                    );
                }
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fleet-wide sums never matched the substrates: {}",
            tenants
                .iter()
                .map(|t| format!(
                    "{t}: substrates {}, murmur_vms {}, murmur_host_vms {}; ",
                    in_substrates(t),
                    fleet("murmur_vms", &[("tenant", t)]),
                    fleet("murmur_host_vms", &[("tenant", t)])
                ))
                .collect::<String>()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    murmur_for(
        &env,
        &other,
        &other_admin,
        &["patch", "workspace", "default", "--set", "min_idle=0"],
        "",
    );
    murmur_for(&env, &other, &other_admin, &["pool", "flush"], "");
    let deadline = Instant::now() + PATIENCE;
    while in_substrates(&other) != 0 {
        assert!(
            Instant::now() < deadline,
            "the second tenant's VMs were not deleted"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Requests the dev server's frontend has served that read workflows (what a scrape would
/// make if it called Temporal), from its own metrics endpoint.
fn temporal_reads(env: &TestEnv, server_metrics: &str) -> BTreeMap<&'static str, f64> {
    const READS: [&str; 6] = [
        "QueryWorkflow",
        "ListWorkflowExecutions",
        "DescribeWorkflowExecution",
        "CountWorkflowExecutions",
        "GetWorkflowExecutionHistory",
        "ScanWorkflowExecutions",
    ];
    let (_, text) = env.http_get_at(server_metrics, "/metrics");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("server metrics");
    READS
        .iter()
        .map(|op| {
            let n = sum(
                &scrape,
                "service_requests",
                &[("service_name", "frontend"), ("operation", op)],
            );
            (*op, n)
        })
        .collect()
}

#[test]
fn a_scrape_makes_no_temporal_call() {
    let server_dir = tempfile::tempdir().unwrap();
    let server_metrics = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        format!("127.0.0.1:{port}")
    };
    let port = server_metrics
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let server = PrivateServer::start(server_dir.path().to_path_buf(), &["--metrics-port", &port]);
    let mut env = TestEnv::start_with(
        "noscrapecall",
        EnvOptions {
            temporal_address: Some(server.address()),
            ..EnvOptions::default()
        },
    );
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    // One read of the pools when the worker starts, then none for an hour: every scrape
    // after it is served from that snapshot.
    let addr = env.enable_metrics_refreshing_every("1h");
    let t = env.tenant.clone();
    scrape_until(&env, &addr, "the pool's snapshot", |s| {
        value(s, "murmur_pool_up", &[("tenant", &t)]) == Some(1.0)
    });
    // The worker reads Temporal in the background too (its restart re-registers the host,
    // which makes the registry list the pools; the reaper lists agents), so a round of
    // scrapes may overlap one such read. A scrape that called Temporal would add at least
    // one read per scrape to every round; scrapes that do not leave some round untouched.
    const SCRAPES: usize = 20;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let before = temporal_reads(&env, &server_metrics);
        for _ in 0..SCRAPES {
            let (status, _) = env.http_get("/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
        }
        let after = temporal_reads(&env, &server_metrics);
        let added: f64 = after.values().sum::<f64>() - before.values().sum::<f64>();
        assert!(
            added < SCRAPES as f64,
            "{SCRAPES} scrapes made {added} Temporal reads: before {before:?}, after {after:?}"
        );
        if added == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no round of scrapes went without a Temporal read: last {before:?} -> {after:?}"
        );
    }
}
