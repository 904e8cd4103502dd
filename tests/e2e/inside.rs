//! Inside the VM, through the host gateway: `murmur logs [-f] [--since N]`, `murmur exec`
//! and `murmur shell` on the process substrate, and the gateway's checks (roles, tenants,
//! forged and replayed requests), made with the real CLI and, for what the CLI never sends,
//! with direct gRPC calls.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use murmur::gateway::proto::{LogsRequest, Proof};
use murmur::gateway::request::{LOGS_OP, LogsBody};
use murmur_activities::auth::DeveloperKey;
use murmur_workflows::agent::Phase;

use crate::harness::tmux::{KillSession, shell_command, tmux, wait_pane, wait_prompt};
use crate::harness::{PATIENCE, TestEnv, block_on, stderr, stdout};

/// An agent that prints `tick 0` … `tick 24` every 200 ms, then 100 lines of filler (so its
/// first lines are not in the 4 KiB tail its status keeps) and `done`, then exits with `code`.
fn ticking(code: i32) -> String {
    format!(
        "i=0; while [ $i -lt 25 ]; do echo \"tick $i\"; i=$((i+1)); sleep 0.2; done; \
         yes {FILLER} | head -n 100; echo done; exit {code}"
    )
}

/// One line of filler.
const FILLER: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// A keep-alive agent, running, for exec and shell.
fn keep_alive(env: &TestEnv, slug: &str) {
    env.set_workspace("default", "min_idle: 1\n");
    env.spawn_with(
        &["--on-idle", "keep-alive"],
        slug,
        "echo started; sleep 600",
    );
    env.wait_phase(slug, Phase::Running);
}

#[test]
fn logs_follow_the_agent_live_and_stay_after_it_ended() {
    let env = TestEnv::start("logs-follow");
    env.set_workspace("default", "min_idle: 1\n");
    env.spawn("tick", &ticking(0));
    env.wait_phase("tick", Phase::Running);
    let mut follower = env
        .murmur_cmd(&["logs", "-f", "tick"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a first line").unwrap();
    assert_eq!(first, "tick 0");
    // The first line came while the agent still runs: it is followed, not read afterwards.
    let st = env.agent("tick");
    assert_eq!(st.phase, Some(Phase::Running), "{st:#?}");
    assert_eq!(st.exit_code, None);
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = follower.wait().unwrap();
    assert!(
        status.success(),
        "murmur logs -f exits 0 when the agent exits 0"
    );
    assert_eq!(rest[23], "tick 24");
    assert_eq!(rest.len(), 24 + 100 + 1);
    assert_eq!(rest.last().map(String::as_str), Some("done"));
    // It returned because the command exited: the agent ends (its VM goes) after that.
    env.wait_phase("tick", Phase::Completed);

    // After the end the host still has the output, whole.
    let whole = env.murmur_ok(&["logs", "tick"]);
    assert!(whole.starts_with("tick 0\ntick 1\n"), "{whole:.40}");
    assert_eq!(whole.lines().count(), 126);
    let last = env.murmur_ok(&["logs", "--since", "2", "tick"]);
    assert_eq!(last, format!("{FILLER}\ndone\n"));

    // No output chunk is an event: the first line, long out of the tail, is nowhere in the
    // agent's history.
    let history = history_text(&env.history_events(&st.workflow));
    assert!(
        history.contains("done\n"),
        "the tail is in the run's result"
    );
    assert!(
        !history.contains("tick 0\n"),
        "a streamed line became history"
    );

    // An agent whose command fails: `logs -f` says so in its exit code.
    env.spawn("fails", "echo oops; exit 4");
    let out = env.murmur(&["logs", "-f", "fails"]);
    assert_eq!(stdout(&out), "oops\n");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // A nuke leaves nothing of the tenant behind: no kept output either.
    env.murmur_ok(&["pool", "flush", "--nuke"]);
    let out = env.murmur(&["logs", "tick"]);
    assert_eq!(out.status.code(), Some(1));
    let vm = st.vm.unwrap();
    assert_eq!(
        stderr(&out).lines().next(),
        Some(
            format!("NOT_FOUND: VM {vm} is gone and this host keeps no output of the agent")
                .as_str()
        )
    );
}

/// Every string in a history, and each one's base64 decoding where it has one (payloads
/// may be shown encoded): what a search for output must look through.
fn history_text(events: &[serde_json::Value]) -> String {
    use base64::Engine as _;
    fn walk(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::String(s) => {
                out.push_str(s);
                out.push('\n');
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(s) {
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    out.push('\n');
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            serde_json::Value::Object(map) => map.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = String::new();
    events.iter().for_each(|e| walk(e, &mut out));
    // Output inside a decoded JSON payload has its newlines escaped.
    out.replace("\\n", "\n")
}

#[test]
fn exec_keeps_streams_apart_passes_stdin_and_signals_and_returns_the_exit_code() {
    let env = TestEnv::start("exec");
    keep_alive(&env, "ka");
    let out = env.murmur(&[
        "exec",
        "ka",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    assert_eq!(out.status.code(), Some(7));

    let out = env.murmur_stdin(&["exec", "ka", "--", "cat"], "piped in\n");
    assert_eq!(stdout(&out), "piped in\n");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // It runs next to the agent, in its VM.
    let vm = env.agent("ka").vm.unwrap().0;
    let out = env.murmur_ok(&["exec", "ka", "--", "echo $MURMUR_VM_ID $MURMUR_AGENT"]);
    assert_eq!(out, format!("{vm} ka\n"));

    // Ctrl-C (SIGINT to the CLI) reaches the remote command, which ends by it.
    let mut child = env
        .murmur_cmd(&["exec", "ka", "--", "sh", "-c", "echo ready; exec sleep 30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "128 + SIGINT");
    assert!(!sleeping_in(&env.state_dir()), "the remote command is gone");
}

/// True when a `sleep 30` runs with its working directory under `state_dir` (an exec
/// session left behind).
fn sleeping_in(state_dir: &std::path::Path) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.filter_map(Result::ok).any(|p| {
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(p.path().join("cwd")).unwrap_or_default();
        cmdline == b"sleep\x0030\x00" && cwd.starts_with(state_dir)
    })
}

#[test]
fn shell_is_a_terminal_in_the_vm_and_the_local_terminal_is_restored() {
    let env = TestEnv::start("shell");
    keep_alive(&env, "ka");
    let vm = env.agent("ka").vm.unwrap().0;
    let dir = env.dir.path();
    let session = format!("murmur-shell-{}", std::process::id());
    // The pane records its terminal settings before and after (the second written whole and
    // then renamed: the test reads it as soon as it exists), and the shell's exit code.
    let script = format!(
        "stty -g > {d}/before; {cmd}; echo \"shell exited $?\"; stty -g > {d}/after.part && mv {d}/after.part {d}/after; sleep 600",
        d = dir.display(),
        cmd = shell_command(&env, "ka"),
    );
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &script,
    ]);
    let _kill = KillSession(session.clone());
    wait_prompt(&session);
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "echo vm=$MURMUR_VM_ID; stty size",
        "Enter",
    ]);
    wait_pane(&session, &format!("vm={vm}"));
    wait_pane(&session, "30 100");
    tmux(&["send-keys", "-t", &session, "exit 5", "Enter"]);
    wait_pane(&session, "shell exited 5");
    let deadline = Instant::now() + PATIENCE;
    while !dir.join("after").exists() {
        assert!(
            Instant::now() < deadline,
            "the pane never wrote its settings"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("before")).unwrap(),
        std::fs::read_to_string(dir.join("after")).unwrap(),
        "the local terminal was not restored"
    );

    // A completed agent has no VM to open a shell in.
    env.spawn("done", "true");
    env.wait_phase("done", Phase::Completed);
    let out = env.murmur(&["shell", "done"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(
            "FAILED_PRECONDITION: agent done has ended (completed); its VM is gone, so there is no shell to open"
        ),
        "{}",
        stderr(&out)
    );
}

/// A `Logs` request for `target`'s output on `vm`, signed with `credential`.
fn signed_logs(credential: &str, target: &str, vm: &str) -> LogsRequest {
    let mut req = LogsRequest {
        proof: None,
        target: target.into(),
        vm: vm.into(),
        offset: 0,
        tail_lines: 0,
        follow: false,
    };
    let key = DeveloperKey::from_credential(credential).unwrap();
    let body = murmur_workflows::auth::unsigned_body(&LogsBody::from(&req));
    let c = key.sign(LOGS_OP, target, &body).unwrap();
    req.proof = Some(Proof {
        token: c.token.unwrap_or_default(),
        request_id: c.request_id,
        ts: c.ts,
        sig: c.sig,
    });
    req
}

/// Sends a `Logs` request straight to a gateway: the output, or the error line.
fn call_logs(gateway: &str, req: LogsRequest) -> Result<Vec<u8>, String> {
    block_on(async {
        let mut client = murmur::gateway::client::connect(gateway)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = client
            .logs(req)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            out.extend(chunk.data);
        }
        Ok(out)
    })
}

/// The gateway address of the test's host, from `murmur host ls -o json`.
fn gateway_of(env: &TestEnv) -> String {
    let hosts: serde_json::Value =
        serde_json::from_str(&env.murmur_ok(&["host", "ls", "-o", "json"])).unwrap();
    let gateway = hosts[0]["gateway"].as_str().unwrap_or_default().to_string();
    assert!(gateway.starts_with("http://127.0.0.1:"), "{hosts:#}");
    gateway
}

#[test]
fn gateway_calls_need_the_role_the_tenant_and_a_fresh_signature() {
    let mut env = TestEnv::start("gateway-auth");
    keep_alive(&env, "ka");
    let st = env.agent("ka");
    let (vm, run) = (st.vm.clone().unwrap().0, st.run.clone().unwrap());
    let target = format!("{}@{run}", st.workflow);

    // The same developer with a viewer's role reads logs but cannot exec or open a shell.
    let developer = st.workflow.split('/').nth(3).unwrap().to_string();
    let viewer = env.credential(&env.tenant, &developer, "viewer", "1h");
    let out = env.murmur_as(&viewer, &["logs", "ka"]);
    assert_eq!(stdout(&out), "started\n", "{}", stderr(&out));
    for args in [&["exec", "ka", "--", "true"][..], &["shell", "ka"][..]] {
        let out = env.murmur_as(&viewer, args);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr(&out)
                .starts_with("PERMISSION_DENIED: your role does not have agent.edit permission"),
            "{args:?}: {}",
            stderr(&out)
        );
    }

    // Straight to the gateway: a proof from another tenant, a forged one, a replayed one.
    let gateway = gateway_of(&env);
    let admin = env.credential(&env.tenant, "ana", "murmur-tenant-admin", "1h");
    let other = env.credential("other-tenant", "eve", "murmur-tenant-admin", "1h");
    assert_eq!(
        call_logs(&gateway, signed_logs(&other, &target, &vm)).unwrap_err(),
        format!(
            "PERMISSION_DENIED: identity token is for tenant other-tenant, not {}",
            env.tenant
        )
    );
    let mut forged = signed_logs(&admin, &target, &vm);
    forged.offset = 3; // not what was signed
    assert!(
        call_logs(&gateway, forged)
            .unwrap_err()
            .starts_with("UNAUTHENTICATED: request signature does not match the request"),
    );
    let once = signed_logs(&admin, &target, &vm);
    let id = once.proof.as_ref().unwrap().request_id.clone();
    assert_eq!(call_logs(&gateway, once.clone()).unwrap(), b"started\n");
    let replayed = format!("UNAUTHENTICATED: request {id} was already used; sign a new request");
    assert_eq!(call_logs(&gateway, once.clone()).unwrap_err(), replayed);
    // The record of used requests survives the worker.
    env.kill_worker();
    env.start_worker();
    let gateway = gateway_of_restarted(&env, &gateway);
    assert_eq!(call_logs(&gateway, once).unwrap_err(), replayed);
    // Another agent's run with this VM: refused, the VM is not that agent's.
    let wrong = format!("{}-other@{run}", st.workflow);
    assert_eq!(
        call_logs(&gateway, signed_logs(&admin, &wrong, &vm)).unwrap_err(),
        format!(
            "PERMISSION_DENIED: VM {vm} is not the VM of {}-other",
            st.workflow
        )
    );
}

/// The gateway address after a worker restart (a new port: the host registers it again).
fn gateway_of_restarted(env: &TestEnv, old: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let gateway = gateway_of(env);
        if gateway != old {
            return gateway;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted worker never registered its gateway"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_gateway_with_tls_is_reached_over_https_with_its_ca_and_refused_without() {
    // A self-signed certificate for 127.0.0.1 (the CLI trusts it through MURMUR_GATEWAY_CA).
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=murmur-gateway-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is required to make the test's certificate");
    assert!(out.status.success(), "{}", stderr(&out));
    let env = TestEnv::start_with(
        "gateway-tls",
        crate::harness::EnvOptions {
            worker_env: vec![
                ("MURMUR_GATEWAY_TLS_CERT".into(), cert.display().to_string()),
                ("MURMUR_GATEWAY_TLS_KEY".into(), key.display().to_string()),
            ],
            ..Default::default()
        },
    );
    keep_alive(&env, "ka");
    let hosts: serde_json::Value =
        serde_json::from_str(&env.murmur_ok(&["host", "ls", "-o", "json"])).unwrap();
    assert!(
        hosts[0]["gateway"]
            .as_str()
            .unwrap_or_default()
            .starts_with("https://127.0.0.1:"),
        "{hosts:#}"
    );
    let out = env
        .murmur_cmd(&["logs", "ka"])
        .env("MURMUR_GATEWAY_CA", &cert)
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "started\n", "{}", stderr(&out));
    // Without the CA the certificate is not trusted: no connection, exit 69.
    let out = env.murmur(&["logs", "ka"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("UNAVAILABLE: gateway https://127.0.0.1:"),
        "{}",
        stderr(&out)
    );
}
