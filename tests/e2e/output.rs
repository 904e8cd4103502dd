//! Output formats end to end: `-o json` and `-o yaml` on every command that prints data,
//! errors in the format the flags ask for (and only the flags: not an agent command's own
//! `--json`), the Temporal connection flags, `ls --all` and `ls --watch`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::harness::{PATIENCE, TestEnv, stderr, stdout, warm};
use murmur_workflows::agent::Phase;

/// `text` parsed as `format` (`json` or `yaml`) into a generic value.
fn parse(format: &str, text: &str) -> serde_json::Value {
    match format {
        "json" => serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}")),
        _ => serde_norway::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}")),
    }
}

/// Runs `murmur -o format args`, asserts success and parses stdout.
fn doc(env: &TestEnv, args: &[&str], format: &str) -> serde_json::Value {
    let mut all = vec!["-o", format];
    all.extend_from_slice(args);
    let value = parse(format, &env.murmur_ok(&all));
    assert!(!value.is_null(), "murmur {all:?} printed nothing");
    value
}

/// The slugs of a `murmur ls -o json` array.
fn slugs(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r["slug"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts a failed run printed its error as `format` on stderr (nothing on stdout) and
/// returns the error document.
fn error_doc(out: &Output, format: &str, exit: i32) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(exit), "{}", stderr(out));
    assert_eq!(stdout(out), "", "errors go to stderr only");
    let e = parse(format, &stderr(out));
    assert!(e["code"].is_string(), "{e}");
    assert!(e["message"].is_string(), "{e}");
    e
}

#[test]
fn every_data_command_prints_json_and_yaml() {
    let env = TestEnv::start("formats");
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn("done", "true");
    env.wait_phase("done", Phase::Completed);
    env.spawn("busy", "sleep 600");
    env.wait_phase("busy", Phase::Running);

    for format in ["json", "yaml"] {
        let pool = doc(&env, &["pool", "status"], format);
        assert_eq!(pool["tenant"], env.tenant.as_str());
        assert!(pool["workspaces"].is_array());
        assert_eq!(slugs(&doc(&env, &["ls"], format)), ["busy"]);
        let ended = doc(&env, &["ls", "--ended"], format);
        assert_eq!(slugs(&ended), ["busy", "done"]);
        assert_eq!(ended[0]["developer"], "tester");
        let st = doc(&env, &["status", "busy"], format);
        assert_eq!(st["phase"], "PHASE_RUNNING");
        let waited = doc(&env, &["wait", "--phase", "running", "busy"], format);
        assert_eq!(waited["slug"], "busy");
        let ws = doc(&env, &["get", "workspace", "default"], format);
        assert_eq!(ws["name"], "default");
        assert_eq!(ws["spec"]["min_idle"], 1);
        let config = doc(&env, &["get", "pool-config"], format);
        assert!(config["spec"]["max_vms"].is_u64(), "{config}");
        let patched = doc(
            &env,
            &["patch", "workspace", "default", "--set", "min_idle=1"],
            format,
        );
        assert_eq!(patched["kind"], "workspace");
        let hosts = doc(&env, &["host", "ls"], format);
        assert!(hosts.as_array().is_some_and(|h| !h.is_empty()), "{hosts}");
        let version = doc(&env, &["version"], format);
        assert_eq!(version["client"], env!("CARGO_PKG_VERSION"));
        assert!(
            version["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("murmur-worker")),
            "{version}"
        );
    }
    // get's text form is its YAML; -o json is JSON.
    assert_eq!(
        env.murmur_ok(&["get", "workspace", "default"]),
        env.murmur_ok(&["get", "workspace", "default", "-o", "yaml"])
    );
    // The global flag goes before or after the command; --json is the same as -o json.
    assert_eq!(
        parse("json", &env.murmur_ok(&["status", "busy", "-o", "json"]))["slug"],
        "busy"
    );
    assert_eq!(
        parse("json", &env.murmur_ok(&["status", "--json", "busy"]))["slug"],
        "busy"
    );

    // Commands that act answer with what they did.
    let spawned = doc(&env, &["spawn", "third", "--", "sleep 600"], "json");
    assert_eq!(spawned["slug"], "third");
    let killed = doc(&env, &["kill", "third"], "yaml");
    assert_eq!(killed["killed"], true);
    let killed = doc(&env, &["kill", "busy"], "json");
    assert_eq!(killed["slug"], "busy");
    let flushed = doc(&env, &["pool", "flush"], "json");
    assert!(flushed["flushed"].is_u64(), "{flushed}");

    // Identity last: logging in changes who the later commands are.
    let credential = env.credential(&env.tenant, "ana", "murmur-tenant-admin", "1h");
    let login = env.murmur_stdin(&["auth", "login", "-o", "json"], &credential);
    assert!(login.status.success(), "{}", stderr(&login));
    assert_eq!(parse("json", &stdout(&login))["developer"], "ana");
    let auth = doc(&env, &["auth", "status"], "yaml");
    assert_eq!(auth["developer"], "ana");
    assert_eq!(auth["expired"], false);
}

#[test]
fn errors_come_in_the_format_the_flags_ask_for() {
    let env = TestEnv::start("errfmt");
    env.set_workspace("default", "min_idle: 0\n");

    let text = env.murmur(&["status", "ghost"]);
    assert_eq!(text.status.code(), Some(1));
    assert!(
        stderr(&text).starts_with("NOT_FOUND: "),
        "{}",
        stderr(&text)
    );
    assert!(stderr(&text).contains("murmur ls"), "the hint line");

    let json = error_doc(&env.murmur(&["status", "ghost", "-o", "json"]), "json", 1);
    assert_eq!(json["code"], "NOT_FOUND");
    assert!(
        json["hint"]
            .as_str()
            .is_some_and(|h| h.contains("murmur ls"))
    );
    assert_eq!(
        stderr(&env.murmur(&["status", "ghost", "-o", "json"]))
            .lines()
            .count(),
        1,
        "a JSON error is one line"
    );
    let alias = error_doc(&env.murmur(&["--json", "status", "ghost"]), "json", 1);
    assert_eq!(alias["code"], "NOT_FOUND");
    let yaml = error_doc(&env.murmur(&["-o", "yaml", "status", "ghost"]), "yaml", 1);
    assert_eq!(yaml["code"], "NOT_FOUND");
    assert!(!stderr(&env.murmur(&["-o", "yaml", "status", "ghost"])).starts_with('{'));

    // The agent command's own flags are the agent's: murmur's errors stay text.
    let out = env.murmur(&["spawn", "Bad_Slug", "--", "tool", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("INVALID_ARGUMENT: invalid slug"),
        "{}",
        stderr(&out)
    );
    let out = env.murmur(&["spawn", "Bad_Slug", "tool", "-o", "json"]);
    assert!(
        stderr(&out).starts_with("INVALID_ARGUMENT: "),
        "{}",
        stderr(&out)
    );

    // The Temporal flags: an address nothing listens on is UNAVAILABLE (69), a profile the
    // config file lacks is INVALID_ARGUMENT.
    let out = env.murmur(&["status", "ghost", "--address", "127.0.0.1:1", "-o", "json"]);
    let e = error_doc(&out, "json", 69);
    assert_eq!(e["code"], "UNAVAILABLE");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("127.0.0.1:1")),
        "{e}"
    );
    let config = env.state_dir().join("temporal.toml");
    std::fs::write(&config, "[profile.other]\nnamespace = \"default\"\n").unwrap();
    let config = config.display().to_string();
    let out = env.murmur(&[
        "status",
        "ghost",
        "--config-file",
        &config,
        "--profile",
        "prod",
        "-o",
        "yaml",
    ]);
    let e = error_doc(&out, "yaml", 1);
    assert_eq!(e["code"], "INVALID_ARGUMENT");
    // The profile's settings are used, and the flags override them: `other` names the
    // default namespace, so this reaches the pool (whose agent does not exist).
    let out = env.murmur(&[
        "status",
        "ghost",
        "--config-file",
        &config,
        "--profile",
        "other",
    ]);
    assert!(stderr(&out).starts_with("NOT_FOUND: "), "{}", stderr(&out));

    // A command line clap refuses keeps clap's own format (exit 2).
    let out = env.murmur(&["-o", "xml", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("possible values"), "{}", stderr(&out));
    let out = env.murmur(&["wait", "--timeout", "soon", "x", "-o", "json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid duration"),
        "{}",
        stderr(&out)
    );
}

/// A `murmur ls --watch` whose stdout lines arrive on a channel as they are printed.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    fn start(env: &TestEnv, args: &[&str]) -> Self {
        let mut child = env
            .murmur_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start murmur ls --watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The first line printed from now on that satisfies `pred`, failing after [`PATIENCE`].
    fn next_matching(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left.max(Duration::from_millis(1)))
                .unwrap_or_else(|e| panic!("no watch line with {what}: {e}"));
            let value = parse("json", &line);
            if pred(&value) {
                return slugs(&value);
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ls_all_shows_every_developer_and_watch_prints_changes() {
    let env = TestEnv::start("lsall");
    env.set_workspace("default", "min_idle: 0\n");
    env.spawn("mine", "sleep 600");
    // Another developer of the tenant: their own credential says who they are.
    let other = env.credential(&env.tenant, "other", "murmur-tenant-admin", "1h");
    let theirs = env
        .murmur_cmd(&["spawn", "theirs", "--", "sleep 600"])
        .env("MURMUR_TOKEN", other.trim())
        .output()
        .expect("run murmur");
    assert!(theirs.status.success(), "{}", stderr(&theirs));
    env.wait_phase("mine", Phase::Running);

    assert_eq!(slugs(&doc(&env, &["ls"], "json")), ["mine"]);
    let all = doc(&env, &["ls", "--all"], "json");
    let who: Vec<(&str, &str)> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["developer"].as_str()?, r["slug"].as_str()?)))
        .collect();
    assert_eq!(who, [("other", "theirs"), ("tester", "mine")]);
    let table = env.murmur_ok(&["ls", "--all"]);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines[0], ["DEVELOPER", "SLUG", "PHASE", "VM"], "{table}");
    assert!(
        lines.iter().any(|l| l[..2] == ["other", "theirs"]),
        "{table}"
    );

    // One JSON document per change, one per line: the first at once, the next when an
    // agent appears.
    let watcher = Watcher::start(&env, &["ls", "-w", "--interval", "200ms", "-o", "json"]);
    let first = watcher.next_matching("mine", |v| slugs(v).contains(&"mine".to_string()));
    assert_eq!(first, ["mine"]);
    env.spawn("late", "sleep 600");
    let next = watcher.next_matching("late", |v| slugs(v).contains(&"late".to_string()));
    assert_eq!(next, ["late", "mine"]);
    drop(watcher);
    for slug in ["mine", "late"] {
        env.murmur_ok(&["kill", slug]);
    }
}
