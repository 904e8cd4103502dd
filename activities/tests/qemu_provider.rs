//! The `qemu` provider against real qemu, without Temporal: boot, handshake, commands,
//! cancel, list, snapshot and delete (and a control channel that loses no request to a line
//! an earlier connection cut short, nor to a child of the agent exiting mid-request); and
//! the guest channel: a run's output followed from offsets (live, then kept after the
//! delete) and exec sessions (streams apart, exit codes, stdin, signals, and nothing left
//! behind when the caller goes away; and shells: a terminal in the guest, its size, a
//! resize, large output, Ctrl-C, one at a time); and sleep and wake (no qemu while asleep,
//! the guest's run resumed where it was, and every point a worker may be killed at finished
//! by the next call). Reported as ignored (with the reason) where
//! `qemu-system-x86_64` is not installed; with `MURMUR_REQUIRE_QEMU=1` (CI) it runs, and fails
//! when it is missing.

use std::time::{Duration, Instant};

use murmur_activities::substrate::qemu::QemuProvider;
use murmur_activities::substrate::qemu::launch::{QemuVmMeta, find_qemu, qemu_pid, spawn_qemu};
use murmur_activities::substrate::qemu::qmp::Qmp;
use murmur_activities::substrate::qemu::sleep::{restore_uri, save_uri, writing};
use murmur_activities::substrate::session::{
    ExecInput, ExecOutput, ExecSession, ExecSpec, WindowSize,
};
use murmur_activities::substrate::{CommandSpec, CommandStatus, Provider, SubstrateError};
use murmur_workflows::machine::BootSpec;
use murmur_workflows::model::{Environment, VmId};

/// Deletes the VMs it knows when dropped, so a failing test leaves no qemu behind.
struct Cleanup {
    provider: QemuProvider,
    vms: Vec<VmId>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let vms = std::mem::take(&mut self.vms);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                for vm in vms {
                    let _ = provider.delete("t1", &vm).await;
                }
            });
        })
        .join();
    }
}

/// A provider on real qemu in a fresh state dir (its base image built there), its guests at
/// the tests' own priority: at the default nice 19 a guest gets ~1.5% of a core against any
/// other busy process (a build next to the tests), and under TCG it then cannot answer within
/// the control channel's 10 s. What these tests check is the provider, not that scheduling
/// trade-off (which the e2e qemu tests run with).
async fn real_provider() -> (tempfile::TempDir, QemuProvider) {
    assert!(
        find_qemu().is_some(),
        "qemu-system-x86_64 is required (MURMUR_REQUIRE_QEMU=1) but not installed: apt-get install qemu-system-x86"
    );
    let state = tempfile::tempdir().expect("tempdir");
    let p = QemuProvider::new(state.path())
        .await
        .expect("provider")
        .with_niceness(0);
    (state, p)
}

fn spec(vm: &str, image: &str) -> BootSpec {
    BootSpec {
        vm: VmId(vm.into()),
        tenant: "t1".into(),
        workspace: "w".into(),
        image: image.into(),
        environment: Environment {
            vcpus: 1,
            memory_mb: 192,
        },
        host: None,
        generation: 1,
    }
}

async fn wait_exit(p: &QemuProvider, vm: &VmId, run: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match p.command_status("t1", vm, run).await.expect("status") {
            CommandStatus::Exited(code) => return code,
            _ if Instant::now() > deadline => panic!("run {run} did not exit"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The control channel loses no request to what happened before it:
///
/// - a connection that closed with the start of a line not yet passed on to the guest (as a
///   handshake returning at its first ready line may leave a ping) leaves the guest holding
///   that start: the next request must not be glued to it;
/// - a request line arrives in pieces (the serial port passes a FIFO's worth at a time), and
///   a child of the agent that exits in between (a run ending) must not cost the agent the
///   piece it had read (busybox `read` starts over when a signal interrupts it).
async fn every_request_is_answered_whatever_came_before(p: &QemuProvider, vm: &VmId) {
    use murmur_activities::substrate::qemu::guest::{next_tag, parse_answer, request_line};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let dir = p.vm_dir("t1", vm).expect("dir");
    let socket = dir.join("ctl.sock");
    {
        let mut cut = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        cut.write_all(b"ping 12").await.expect("write");
    }
    assert_eq!(
        p.command_status("t1", vm, "r0").await.expect("status"),
        CommandStatus::Unknown,
        "after a line cut short"
    );

    // A run that says on the console when it is about to exit; its end is the agent's
    // child exiting while the agent holds half a request.
    let marker = "murmur-test-run-exits";
    let ender = CommandSpec {
        run: "r0".into(),
        argv: vec![format!("sleep 0.3; echo {marker} >/dev/console")],
        env: vec![],
    };
    p.start_command("t1", vm, &ender).await.expect("run");
    let tag = next_tag();
    let line = request_line("status", &tag, "r0");
    let (first, rest) = line.split_at(line.len() - 3);
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    write.write_all(first.as_bytes()).await.expect("write");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&std::fs::read(dir.join("console.log")).unwrap_or_default())
        .contains(marker)
    {
        assert!(Instant::now() < deadline, "the run did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The run's keeper records the exit code and ends just after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    write.write_all(rest.as_bytes()).await.expect("write");
    let mut reader = BufReader::new(read);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).await.expect("read");
            assert!(n > 0, "the channel closed");
            if let Some(answer) = parse_answer(&buf, &tag) {
                return answer;
            }
        }
    })
    .await
    .expect("a request in pieces across a child's exit is answered");
    // `running` only when the keeper was slower than the wait: answered all the same.
    assert!(answer == "exited 0" || answer == "running", "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
async fn a_real_guest_boots_runs_commands_snapshots_and_is_deleted() {
    let (_state, p) = real_provider().await;
    let vm = VmId("murmur-0000aa01".into());
    let mut cleanup = Cleanup {
        provider: p.clone(),
        vms: vec![vm.clone()],
    };

    let started = Instant::now();
    p.create(&spec(&vm.0, "default")).await.expect("create");
    p.create(&spec(&vm.0, "default"))
        .await
        .expect("create is idempotent");
    let ready = p
        .wait_ready("t1", &vm, Duration::from_secs(60))
        .await
        .expect("ready");
    eprintln!("boot to ready: {:?} ({})", started.elapsed(), p.accel());
    assert_eq!(ready.vm, vm);
    assert_eq!(ready.image, "default");
    // A second handshake after the first one consumed the ready line.
    p.wait_ready("t1", &vm, Duration::from_secs(10))
        .await
        .expect("ready again");
    every_request_is_answered_whatever_came_before(&p, &vm).await;

    let run = CommandSpec {
        run: "r1".into(),
        argv: vec![
            "uname -r; cat /etc/murmur/vm; echo $MURMUR_VM $MURMUR_AGENT $MURMUR_IMAGE; exit 7"
                .into(),
        ],
        env: vec![("MURMUR_AGENT".into(), "it's-me".into())],
    };
    let t = Instant::now();
    p.start_command("t1", &vm, &run).await.expect("run");
    p.start_command("t1", &vm, &run)
        .await
        .expect("run is idempotent");
    assert_eq!(wait_exit(&p, &vm, "r1").await, 7);
    eprintln!("command round trip: {:?}", t.elapsed());
    let out = p
        .command_output_tail("t1", &vm, "r1", 4096)
        .await
        .expect("tail");
    let kernel = p.image_meta("default").expect("meta").kernel;
    assert_eq!(out, format!("{kernel}\n1\n1 it's-me default\n"));

    let sleeper = CommandSpec {
        run: "r2".into(),
        argv: vec!["sleep".into(), "600".into()],
        env: vec![],
    };
    p.start_command("t1", &vm, &sleeper).await.expect("run");
    assert_eq!(
        p.command_status("t1", &vm, "r2").await.expect("status"),
        CommandStatus::Running
    );
    p.cancel_command("t1", &vm, "r2").await.expect("cancel");
    assert_eq!(wait_exit(&p, &vm, "r2").await, 143);
    assert_eq!(
        p.command_status("t1", &vm, "nope").await.expect("status"),
        CommandStatus::Unknown
    );

    let listed = p.list("t1").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].alive);
    assert_eq!(listed[0].workspace, "w");

    // Provision and snapshot: the new image boots and carries the file.
    let prov = CommandSpec {
        run: "r3".into(),
        argv: vec!["mkdir -p /opt/tool && echo baked > /opt/tool/greeting".into()],
        env: vec![],
    };
    p.start_command("t1", &vm, &prov).await.expect("run");
    assert_eq!(wait_exit(&p, &vm, "r3").await, 0);
    p.snapshot("t1", &vm, "default", "img-test000001")
        .await
        .expect("snapshot");
    assert!(p.has_image("img-test000001"));

    let dir = p.vm_dir("t1", &vm).expect("dir");
    p.delete("t1", &vm).await.expect("delete");
    assert!(!dir.exists(), "VM dir left behind");
    assert!(qemu_pid(&dir).is_none(), "qemu left running");
    p.delete("t1", &vm).await.expect("delete is idempotent");

    let vm2 = VmId("murmur-0000aa02".into());
    cleanup.vms.push(vm2.clone());
    p.create(&spec(&vm2.0, "img-test000001"))
        .await
        .expect("create");
    let ready = p
        .wait_ready("t1", &vm2, Duration::from_secs(60))
        .await
        .expect("ready");
    assert_eq!(ready.image, "img-test000001");
    let check = CommandSpec {
        run: "r1".into(),
        argv: vec!["cat /opt/tool/greeting /etc/murmur/image".into()],
        env: vec![],
    };
    p.start_command("t1", &vm2, &check).await.expect("run");
    assert_eq!(wait_exit(&p, &vm2, "r1").await, 0);
    let out = p
        .command_output_tail("t1", &vm2, "r1", 4096)
        .await
        .expect("tail");
    assert_eq!(out, "baked\nimg-test000001\n");

    // A worker that lost track (say, it crashed) still finds the guest, and a dead one is
    // reported dead.
    let dir2 = p.vm_dir("t1", &vm2).expect("dir");
    let pid = qemu_pid(&dir2).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    while qemu_pid(&dir2).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = p.list("t1").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(!listed[0].alive, "a killed guest must be listed dead");
    p.delete("t1", &vm2).await.expect("delete");
    assert!(p.list("t1").await.expect("list").is_empty());
    cleanup.vms.clear();
}

/// What an exec session sent until its output channel closed: stdout, stderr, every message.
async fn collect(mut session: ExecSession) -> (Vec<u8>, Vec<u8>, Vec<ExecOutput>) {
    let (mut out, mut err, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, session.output.recv())
            .await
            .expect("the session ended in time");
        let Some(msg) = msg else {
            break;
        };
        match &msg {
            ExecOutput::Stdout(b) => out.extend_from_slice(b),
            ExecOutput::Stderr(b) => err.extend_from_slice(b),
            ExecOutput::Exit(_) => {}
        }
        all.push(msg);
    }
    drop(session.input);
    (out, err, all)
}

fn exits(all: &[ExecOutput]) -> Vec<i32> {
    all.iter()
        .filter_map(|m| match m {
            ExecOutput::Exit(code) => Some(*code),
            _ => None,
        })
        .collect()
}

fn command(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|w| w.to_string()).collect(),
        ..Default::default()
    }
}

/// Runs `script` in the guest through exec and returns its stdout (it must exit 0).
async fn guest_sh(p: &QemuProvider, vm: &VmId, script: &str) -> String {
    let session = p.exec("t1", vm, &command(&[script])).await.expect("exec");
    let (out, err, all) = collect(session).await;
    assert_eq!(
        exits(&all),
        vec![0],
        "{script}: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).expect("utf-8")
}

/// Receives a terminal session's output until it contains `want` (after byte `from` of
/// `seen`), failing after 60 s; an exit before that fails too.
async fn until(session: &mut ExecSession, seen: &mut Vec<u8>, from: usize, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if String::from_utf8_lossy(&seen[from.min(seen.len())..]).contains(want) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, session.output.recv()).await {
            Ok(Some(ExecOutput::Stdout(b))) => seen.extend_from_slice(&b),
            Ok(other) => panic!(
                "no {want:?} before {other:?}: {:?}",
                String::from_utf8_lossy(seen)
            ),
            Err(_) => panic!(
                "no {want:?} in time: {:?}",
                String::from_utf8_lossy(&seen[from.min(seen.len())..])
            ),
        }
    }
}

fn shell_spec(rows: u16, cols: u16) -> ExecSpec {
    ExecSpec {
        tty: Some(WindowSize { rows, cols }),
        ..command(&["sh"])
    }
}

/// `murmur shell` on a qemu guest: size, environment, exit code, resize, a large output
/// whole, one shell at a time, and nothing left running when the caller goes away.
async fn shell_sessions(p: &QemuProvider, vm: &VmId) {
    // Size and environment, the exit code last; the terminal is the only stream.
    let t = Instant::now();
    let mut s = p.exec("t1", vm, &shell_spec(33, 101)).await.expect("shell");
    let mut seen = Vec::new();
    until(&mut s, &mut seen, 0, "# ").await;
    eprintln!("shell start to first prompt: {:?}", t.elapsed());
    // Keystroke echo: one byte out, the same byte back.
    let rounds = 10;
    let t = Instant::now();
    for _ in 0..rounds {
        let from = seen.len();
        s.input
            .send(ExecInput::Stdin(b"x".to_vec()))
            .await
            .expect("send");
        until(&mut s, &mut seen, from, "x").await;
    }
    eprintln!("keystroke echo round trip: {:?}", t.elapsed() / rounds);
    // Erase them again (Ctrl-U), then the commands, with a terminal's Enter (CR).
    s.input
        .send(ExecInput::Stdin(
            b"\x15stty size; echo vm=$MURMUR_VM_ID; exit 3\r".to_vec(),
        ))
        .await
        .expect("send");
    let (out, err, all) = collect(s).await;
    let text = String::from_utf8_lossy(&seen).into_owned() + &String::from_utf8_lossy(&out);
    assert!(text.contains("33 101\r\n"), "{text:?}");
    assert!(text.contains(&format!("vm={}\r\n", vm.0)), "{text:?}");
    assert!(
        !text.contains("murmur-exit"),
        "the exit marker is stripped: {text:?}"
    );
    assert!(err.is_empty(), "a terminal has no stderr");
    assert_eq!(exits(&all), vec![3]);
    assert_eq!(all.last(), Some(&ExecOutput::Exit(3)));

    // A resize reaches the terminal; a large output arrives whole; one shell at a time.
    let mut s = p.exec("t1", vm, &shell_spec(24, 80)).await.expect("shell");
    let mut seen = Vec::new();
    until(&mut s, &mut seen, 0, "# ").await;
    match p.exec("t1", vm, &shell_spec(24, 80)).await {
        Err(SubstrateError::Guest { reason, .. }) => {
            assert_eq!(reason, "a shell is already open on this VM");
        }
        other => panic!("a second shell was not refused: {other:?}"),
    }
    s.input
        .send(ExecInput::Resize(WindowSize {
            rows: 50,
            cols: 132,
        }))
        .await
        .expect("send");
    let from = seen.len();
    s.input
        .send(ExecInput::Stdin(b"stty size\r".to_vec()))
        .await
        .expect("send");
    until(&mut s, &mut seen, from, "50 132\r\n").await;
    let from = seen.len();
    let t = Instant::now();
    s.input
        .send(ExecInput::Stdin(
            b"seq 1 50000; echo seq-$((6*7))\r".to_vec(),
        ))
        .await
        .expect("send");
    until(&mut s, &mut seen, from, "seq-42\r\n").await;
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&seen[from..]).into_owned();
    let numbers: Vec<&str> = text
        .split("\r\n")
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    let expected: Vec<String> = (1..=50000).map(|i| i.to_string()).collect();
    assert!(
        numbers == expected,
        "seq 1 50000 did not arrive whole ({} lines)",
        numbers.len()
    );
    eprintln!(
        "seq 1 50000 through the terminal: {took:?} ({:.0} KiB/s)",
        text.len() as f64 / 1024.0 / took.as_secs_f64()
    );
    // Ctrl-C reaches the foreground job through the terminal's line discipline.
    let from = seen.len();
    s.input
        .send(ExecInput::Stdin(b"sleep 33\r".to_vec()))
        .await
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !guest_sh(p, vm, "ps").await.contains("sleep 33") {
        assert!(Instant::now() < deadline, "sleep 33 never started");
    }
    s.input
        .send(ExecInput::Stdin(b"\x03".to_vec()))
        .await
        .expect("send");
    until(&mut s, &mut seen, from, "^C\r\n").await;
    // (An interrupted command ends the rest of its line too, as in any shell.)
    let from = seen.len();
    s.input
        .send(ExecInput::Stdin(b"echo after=$?\r".to_vec()))
        .await
        .expect("send");
    until(&mut s, &mut seen, from, "after=130\r\n").await;

    // The caller going away kills the shell and all it started, and frees the terminal.
    s.input
        .send(ExecInput::Stdin(b"sleep 34 & sleep 35\r".to_vec()))
        .await
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !guest_sh(p, vm, "ps").await.contains("sleep 35") {
        assert!(Instant::now() < deadline, "sleep 35 never started");
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = guest_sh(p, vm, "ps; echo shells $(ls /run/murmur-tty | wc -l)").await;
        let left = ["sleep 34", "sleep 35", "sh -i", " sh\n"]
            .iter()
            .any(|w| seen.contains(w));
        if !left && seen.contains("shells 0\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped shell was left: {seen}"
        );
    }
    let s = p
        .exec("t1", vm, &shell_spec(24, 80))
        .await
        .expect("a shell again");
    s.input.send(ExecInput::StdinEnd).await.expect("send");
    let (_, _, all) = collect(s).await;
    assert_eq!(exits(&all), vec![0], "Ctrl-D ends the shell");
}

/// Reads a run's whole output through `read_output`, from offset 0 until it is complete.
async fn read_all(p: &QemuProvider, vm: &VmId, run: &str) -> Vec<u8> {
    let mut data = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let chunk = p
            .read_output("t1", vm, run, data.len() as u64, 256 * 1024)
            .await
            .expect("read_output");
        assert_eq!(chunk.next, (data.len() + chunk.data.len()) as u64);
        data.extend_from_slice(&chunk.data);
        if chunk.complete && chunk.next >= chunk.size {
            return data;
        }
        assert!(Instant::now() < deadline, "run {run} not complete in time");
        if chunk.data.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
async fn the_guest_channel_follows_output_execs_commands_and_keeps_logs() {
    let (state, p) = real_provider().await;
    let vm = VmId("murmur-0000ab01".into());
    let mut cleanup = Cleanup {
        provider: p.clone(),
        vms: vec![vm.clone()],
    };
    p.create(&spec(&vm.0, "default")).await.expect("create");
    p.wait_ready("t1", &vm, Duration::from_secs(60))
        .await
        .expect("ready");

    // A run followed from offsets: its first line arrives while it still runs.
    let lines = CommandSpec {
        run: "r1".into(),
        argv: vec!["for i in 1 2 3 4 5 6; do echo line $i; sleep 0.2; done".into()],
        env: vec![],
    };
    p.start_command("t1", &vm, &lines).await.expect("run");
    let expected = "line 1\nline 2\nline 3\nline 4\nline 5\nline 6\n";
    let mut followed = Vec::new();
    let mut first_line_live = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let chunk = p
            .read_output("t1", &vm, "r1", followed.len() as u64, 4096)
            .await
            .expect("read_output");
        followed.extend_from_slice(&chunk.data);
        if first_line_live.is_none() && followed.starts_with(b"line 1\n") {
            first_line_live = Some(!chunk.complete);
        }
        if chunk.complete && chunk.next >= chunk.size {
            break;
        }
        assert!(Instant::now() < deadline, "r1 not complete in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(String::from_utf8_lossy(&followed), expected);
    assert_eq!(
        first_line_live,
        Some(true),
        "the first line came only after the exit"
    );
    let part = p
        .read_output("t1", &vm, "r1", 7, 6)
        .await
        .expect("read_output");
    assert_eq!((part.data.as_slice(), part.next), (&b"line 2"[..], 13));
    assert_eq!((part.size, part.complete), (expected.len() as u64, true));
    let past = p
        .read_output("t1", &vm, "r1", 1000, 10)
        .await
        .expect("read_output");
    assert!(past.data.is_empty());
    assert_eq!(past.next, expected.len() as u64);
    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        p.read_output("t1", &vm, "r1", 0, 64)
            .await
            .expect("read_output");
    }
    eprintln!("read round trip: {:?}", t.elapsed() / rounds);
    // A run the guest does not know (yet: an agent is PHASE_RUNNING a moment before its
    // command starts) has nothing to read so far; not complete, so a follower waits.
    let nothing = p
        .read_output("t1", &vm, "nope", 0, 10)
        .await
        .expect("read_output");
    assert!(nothing.data.is_empty() && !nothing.complete, "{nothing:?}");

    // Exec: the streams apart, the exit code last and once.
    let session = p
        .exec("t1", &vm, &command(&["echo out; echo err >&2; exit 7"]))
        .await
        .expect("exec");
    let (out, err, all) = collect(session).await;
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(exits(&all), vec![7]);
    assert_eq!(all.last(), Some(&ExecOutput::Exit(7)));

    // Stdin reaches the command, and its end ends `cat`.
    let session = p.exec("t1", &vm, &command(&["cat"])).await.expect("exec");
    let piped = b"hello\nworld\n".to_vec();
    session
        .input
        .send(ExecInput::Stdin(piped.clone()))
        .await
        .expect("send");
    session.input.send(ExecInput::StdinEnd).await.expect("send");
    let (out, _, all) = collect(session).await;
    assert_eq!(out, piped);
    assert_eq!(exits(&all), vec![0]);
    assert_eq!(all.last(), Some(&ExecOutput::Exit(0)));

    // A stdin larger than what may wait in the guest unread (chunked, held back by the
    // guest's progress) arrives whole.
    let session = p.exec("t1", &vm, &command(&["wc -c"])).await.expect("exec");
    let input = session.input.clone();
    let t = Instant::now();
    let feed = tokio::spawn(async move {
        for _ in 0..20 {
            input
                .send(ExecInput::Stdin(vec![b'x'; 20_000]))
                .await
                .expect("send");
        }
        input.send(ExecInput::StdinEnd).await.expect("send");
    });
    let (out, _, all) = collect(session).await;
    feed.await.expect("feeder");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "400000");
    assert_eq!(exits(&all), vec![0]);
    eprintln!("400 kB of stdin through exec: {:?}", t.elapsed());

    // A signal reaches the command's process group: SIGINT ends `sleep` with 128 + 2.
    let session = p
        .exec("t1", &vm, &command(&["sleep", "30"]))
        .await
        .expect("exec");
    session
        .input
        .send(ExecInput::Signal(2))
        .await
        .expect("send");
    let (_, _, all) = collect(session).await;
    assert_eq!(exits(&all), vec![130]);

    // The caller going away kills the command and leaves nothing of the session behind.
    let session = p
        .exec("t1", &vm, &command(&["sleep", "31"]))
        .await
        .expect("exec");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !guest_sh(&p, &vm, "ps").await.contains("sleep 31") {
        assert!(Instant::now() < deadline, "sleep 31 never started");
    }
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = guest_sh(&p, &vm, "ps; echo sessions $(ls /run/murmur-exec | wc -l)").await;
        // Only this listing's own session is left.
        if !seen.contains("sleep 31") && seen.contains("sessions 1\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dropped session was left: {seen}"
        );
    }

    // A shell: a terminal of the asked size in the guest (its third serial port).
    shell_sessions(&p, &vm).await;

    // Exec latency, start to exit.
    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        let session = p.exec("t1", &vm, &command(&["true"])).await.expect("exec");
        assert_eq!(exits(&collect(session).await.2), vec![0]);
    }
    eprintln!("exec `true` start to exit: {:?}", t.elapsed() / rounds);

    // Throughput of read_output on a 5 MB output.
    let big = CommandSpec {
        run: "big".into(),
        argv: vec!["dd if=/dev/urandom bs=1000000 count=5 2>/dev/null".into()],
        env: vec![],
    };
    p.start_command("t1", &vm, &big).await.expect("run");
    assert_eq!(wait_exit(&p, &vm, "big").await, 0);
    let t = Instant::now();
    let data = read_all(&p, &vm, "big").await;
    let took = t.elapsed();
    assert_eq!(data.len(), 5_000_000);
    eprintln!(
        "read_output of 5 MB: {took:?} ({:.0} KiB/s)",
        data.len() as f64 / 1024.0 / took.as_secs_f64()
    );
    let sum = guest_sh(&p, &vm, "sha256sum /run/murmur/big/output").await;
    let host_sum = {
        let path = state.path().join("big.bin");
        std::fs::write(&path, &data).expect("write");
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        sum.split_whitespace().next(),
        host_sum.split_whitespace().next(),
        "the bytes read differ from the guest's"
    );

    // After the delete the outputs are read from the kept logs, complete: the small one
    // whole, of the 5 MB one (more than the delete's budget moves under TCG) at least its
    // end; exec sessions were not kept.
    let t = Instant::now();
    p.delete("t1", &vm).await.expect("delete");
    eprintln!("delete (keeping the outputs): {:?}", t.elapsed());
    cleanup.vms.clear();
    assert_eq!(
        String::from_utf8_lossy(&read_all(&p, &vm, "r1").await),
        expected
    );
    let chunk = p
        .read_output("t1", &vm, "r1", 7, 6)
        .await
        .expect("read_output");
    assert_eq!(
        (chunk.data.as_slice(), chunk.complete),
        (&b"line 2"[..], true)
    );
    let kept_big = read_all(&p, &vm, "big").await;
    eprintln!("kept of the 5 MB output: {} bytes", kept_big.len());
    assert!(!kept_big.is_empty(), "nothing of the big output was kept");
    assert!(
        data.ends_with(&kept_big),
        "the kept big output is not the end of the output"
    );
    let mut kept: Vec<String> = std::fs::read_dir(state.path().join("logs").join("t1"))
        .expect("kept logs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, vec!["big.log", "r1.log"]);
    assert!(matches!(
        p.read_output("t1", &vm, "nope", 0, 10).await,
        Err(SubstrateError::VmGone(_))
    ));
    assert!(matches!(
        p.exec("t1", &vm, &command(&["true"])).await,
        Err(SubstrateError::VmGone(_))
    ));
}

/// A run's output as it is now (read from offset 0 until its current size).
async fn output_now(p: &QemuProvider, vm: &VmId, run: &str) -> String {
    let mut data = Vec::new();
    loop {
        let chunk = p
            .read_output("t1", vm, run, data.len() as u64, 256 * 1024)
            .await
            .expect("read_output");
        data.extend_from_slice(&chunk.data);
        if chunk.data.is_empty() || chunk.next >= chunk.size {
            return String::from_utf8_lossy(&data).into_owned();
        }
    }
}

/// The numbers a counting run printed so far, one a line (a line being written is left out).
async fn counted(p: &QemuProvider, vm: &VmId, run: &str) -> Vec<u64> {
    let text = output_now(p, vm, run).await;
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| l.trim().parse().expect("a number a line"))
        .collect()
}

/// Polls until the counting run printed more than `than` numbers; returns them all.
async fn counted_beyond(p: &QemuProvider, vm: &VmId, run: &str, than: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let numbers = counted(p, vm, run).await;
        if numbers.len() > than {
            return numbers;
        }
        assert!(
            Instant::now() < deadline,
            "{run} printed nothing new: {numbers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A run that prints 1, 2, 3, ... once a second.
fn counter(run: &str) -> CommandSpec {
    CommandSpec {
        run: run.into(),
        argv: vec!["i=0; while true; do i=$((i+1)); echo $i; sleep 1; done".into()],
        env: vec![],
    }
}

/// Boots a guest of `vm` and waits until it is ready.
async fn boot(p: &QemuProvider, vm: &VmId) {
    p.create(&spec(&vm.0, "default")).await.expect("create");
    p.wait_ready("t1", vm, Duration::from_secs(60))
        .await
        .expect("ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
async fn a_guest_sleeps_without_qemu_and_wakes_where_it_was() {
    let (_state, p) = real_provider().await;
    let vm = VmId("murmur-0000ac01".into());
    let mut cleanup = Cleanup {
        provider: p.clone(),
        vms: vec![vm.clone()],
    };
    boot(&p, &vm).await;
    let dir = p.vm_dir("t1", &vm).expect("dir");
    assert!(!p.is_asleep("t1", &vm));
    p.wake("t1", &vm)
        .await
        .expect("waking an awake VM does nothing");

    p.start_command("t1", &vm, &counter("count"))
        .await
        .expect("run");
    let seen = counted_beyond(&p, &vm, "count", 2).await;
    // Just after a tick: the sleep then starts well before the next one.
    let seen = counted_beyond(&p, &vm, "count", seen.len()).await;
    let last = *seen.last().expect("a number");

    let t = Instant::now();
    p.sleep("t1", &vm).await.expect("sleep");
    let slept_in = t.elapsed();
    let state_bytes = std::fs::metadata(dir.join("sleep.state"))
        .expect("the saved state")
        .len();
    eprintln!(
        "sleep of a 192 MB guest: {slept_in:?}, sleep.state {} bytes ({:.1} MiB)",
        state_bytes,
        state_bytes as f64 / 1048576.0
    );
    assert!(qemu_pid(&dir).is_none(), "qemu still runs in its sleep");
    assert!(p.is_asleep("t1", &vm));
    let listed = p.list("t1").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].alive, "a sleeping VM is alive");
    assert_eq!(
        p.command_status("t1", &vm, "count").await.expect("status"),
        CommandStatus::Running,
        "a frozen run has not exited"
    );
    let t = Instant::now();
    p.sleep("t1", &vm)
        .await
        .expect("sleeping a sleeping VM does nothing");
    assert!(t.elapsed() < Duration::from_secs(1));
    // Nothing is asked of a guest that does not run.
    assert!(matches!(
        p.read_output("t1", &vm, "count", 0, 10).await,
        Err(SubstrateError::Asleep(_))
    ));
    assert!(matches!(
        p.start_command("t1", &vm, &counter("other")).await,
        Err(SubstrateError::Asleep(_))
    ));
    assert!(matches!(
        p.command_output_tail("t1", &vm, "count", 100).await,
        Err(SubstrateError::Asleep(_))
    ));
    assert!(matches!(
        p.exec("t1", &vm, &command(&["true"])).await,
        Err(SubstrateError::Asleep(_))
    ));
    assert!(matches!(
        p.exec("t1", &vm, &shell_spec(24, 80)).await,
        Err(SubstrateError::Asleep(_))
    ));
    p.create(&spec(&vm.0, "default"))
        .await
        .expect("create leaves a sleeping VM alone");
    assert!(dir.join("sleep.state").is_file() && p.is_asleep("t1", &vm));

    // Time passes while it sleeps (this wait is what is under test).
    tokio::time::sleep(Duration::from_secs(5)).await;

    let t = Instant::now();
    p.wake("t1", &vm).await.expect("wake");
    let woke_in = t.elapsed();
    eprintln!("wake of a 192 MB guest: {woke_in:?}");
    assert!(!p.is_asleep("t1", &vm));
    assert!(qemu_pid(&dir).is_some(), "no qemu after the wake");
    for file in [
        "sleep.state",
        "sleep.state.tmp",
        "sleep.state.written",
        "asleep",
    ] {
        assert!(!dir.join(file).exists(), "{file} left after the wake");
    }
    // The count goes on where it stopped: not from 1 again, and not advanced by the time
    // asleep (it ran well under two seconds since it was resumed).
    let now = counted(&p, &vm, "count").await;
    assert_eq!(
        now[..seen.len()],
        seen[..],
        "the output before the sleep changed"
    );
    assert!(
        now.len() <= seen.len() + 2,
        "the count went on while asleep: {last} before, {now:?} after"
    );
    let after = counted_beyond(&p, &vm, "count", seen.len()).await;
    assert_eq!(after[seen.len()], last + 1, "{after:?}");
    let expected: Vec<u64> = (1..=after.len() as u64).collect();
    assert_eq!(after, expected, "the count restarted or skipped");
    assert_eq!(
        p.command_status("t1", &vm, "count").await.expect("status"),
        CommandStatus::Running
    );
    p.wake("t1", &vm)
        .await
        .expect("waking an awake VM does nothing");
    // The guest is usable: exec works, and its wall clock was set to the host's (it stood
    // still while the guest slept).
    assert_eq!(guest_sh(&p, &vm, "echo awake").await, "awake\n");
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let guest: i64 = guest_sh(&p, &vm, "date +%s")
        .await
        .trim()
        .parse()
        .expect("a time");
    assert!(
        (guest - host).abs() <= 2,
        "the guest's clock is {}s off the host's",
        guest - host
    );

    // A sleeping VM is deleted without a trace.
    p.sleep("t1", &vm).await.expect("sleep again");
    p.delete("t1", &vm).await.expect("delete");
    assert!(!dir.exists(), "VM dir left behind");
    assert!(qemu_pid(&dir).is_none(), "qemu left running");
    assert!(p.list("t1").await.expect("list").is_empty());
    cleanup.vms.clear();
}

/// The counting run's numbers so far extend `before` and go 1, 2, 3, ... without a gap or a
/// restart (nothing was lost or done twice), and it goes on counting; returns the numbers.
async fn counts_on(p: &QemuProvider, vm: &VmId, before: &[u64]) -> Vec<u64> {
    assert_eq!(
        p.command_status("t1", vm, "count").await.expect("status"),
        CommandStatus::Running
    );
    let now = counted_beyond(p, vm, "count", before.len()).await;
    assert_eq!(now[..before.len()], before[..], "the output went back");
    let expected: Vec<u64> = (1..=now.len() as u64).collect();
    assert_eq!(now, expected, "the count restarted or skipped");
    now
}

/// A QMP session with the VM's qemu, as a worker would have had it.
async fn qmp(dir: &std::path::Path) -> Qmp {
    Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(10))
        .await
        .expect("qmp")
}

/// What a sleep does before it is cut short, up to `steps` of: the marker, `stop`, the start
/// of the save, the save completed (qemu in `postmigrate`, its writer done).
async fn sleep_cut_short(dir: &std::path::Path, steps: usize) {
    std::fs::write(dir.join("asleep"), "0\n").expect("marker");
    let mut q = qmp(dir).await;
    if steps >= 2 {
        q.execute("stop", None).await.expect("stop");
    }
    if steps >= 3 {
        q.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 1u64 << 40})),
        )
        .await
        .expect("bandwidth");
        let uri = save_uri(dir).expect("uri");
        q.execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await
            .expect("migrate");
    }
    if steps >= 4 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = q.execute("query-status", None).await.expect("status");
            if status["status"] == "postmigrate" && !writing(dir) {
                break;
            }
            assert!(Instant::now() < deadline, "the save did not complete");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a wake does before it is cut short: qemu started to load the saved state.
fn wake_cut_short(p: &QemuProvider, dir: &std::path::Path) {
    let meta: QemuVmMeta =
        serde_json::from_slice(&std::fs::read(dir.join("vm.json")).expect("vm.json"))
            .expect("parse vm.json");
    spawn_qemu(
        &find_qemu().expect("qemu"),
        &p.images_dir().join(&meta.image),
        dir,
        &meta,
        0,
        Some(&restore_uri(dir).expect("uri")),
    )
    .expect("spawn");
}

/// Asserts the VM is asleep the way a finished sleep leaves it.
fn assert_asleep(p: &QemuProvider, vm: &VmId, dir: &std::path::Path, after: &str) {
    assert!(p.is_asleep("t1", vm), "{after}: not marked asleep");
    assert!(qemu_pid(dir).is_none(), "{after}: qemu still runs");
    assert!(dir.join("sleep.state").is_file(), "{after}: no saved state");
    for file in ["sleep.state.tmp", "sleep.state.written"] {
        assert!(!dir.join(file).exists(), "{after}: {file} left");
    }
}

/// Asserts the VM is awake the way a finished wake leaves it.
fn assert_awake(p: &QemuProvider, vm: &VmId, dir: &std::path::Path, after: &str) {
    assert!(!p.is_asleep("t1", vm), "{after}: still marked asleep");
    assert!(qemu_pid(dir).is_some(), "{after}: no qemu");
    for file in ["sleep.state", "sleep.state.tmp", "sleep.state.written"] {
        assert!(!dir.join(file).exists(), "{after}: {file} left");
    }
}

/// A worker killed at any point of a sleep or a wake: the next sleep or wake finishes the
/// job, and the guest's run goes on without losing or repeating a step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
async fn a_sleep_or_wake_cut_short_is_finished_by_the_next() {
    let (_state, p) = real_provider().await;
    let vm = VmId("murmur-0000ad01".into());
    let mut cleanup = Cleanup {
        provider: p.clone(),
        vms: vec![vm.clone()],
    };
    boot(&p, &vm).await;
    let dir = p.vm_dir("t1", &vm).expect("dir");
    p.start_command("t1", &vm, &counter("count"))
        .await
        .expect("run");
    let mut seen = counted_beyond(&p, &vm, "count", 1).await;

    // A sleep cut short after each of its steps, finished by the next sleep.
    for steps in 1..=4 {
        sleep_cut_short(&dir, steps).await;
        p.sleep("t1", &vm)
            .await
            .unwrap_or_else(|e| panic!("sleep after {steps} steps of another: {e}"));
        assert_asleep(&p, &vm, &dir, &format!("a sleep after {steps} steps"));
        p.wake("t1", &vm).await.expect("wake");
        assert_awake(&p, &vm, &dir, "a wake");
        seen = counts_on(&p, &vm, &seen).await;
    }

    // A sleep cut short after each of its steps, undone by a wake: the guest runs on (the
    // save that completed is not restored: that would not even be noticed here).
    for steps in 1..=4 {
        sleep_cut_short(&dir, steps).await;
        p.wake("t1", &vm)
            .await
            .unwrap_or_else(|e| panic!("wake after {steps} steps of a sleep: {e}"));
        assert_awake(
            &p,
            &vm,
            &dir,
            &format!("a wake after {steps} steps of a sleep"),
        );
        seen = counts_on(&p, &vm, &seen).await;
    }

    // The sleep's future dropped (a cancelled activity) once its marker is written.
    let task = tokio::spawn({
        let p = p.clone();
        let vm = vm.clone();
        async move { p.sleep("t1", &vm).await }
    });
    while !dir.join("asleep").exists() {
        tokio::task::yield_now().await;
    }
    task.abort();
    let _ = task.await;
    p.sleep("t1", &vm).await.expect("sleep after a dropped one");
    assert_asleep(&p, &vm, &dir, "a sleep after a dropped one");

    // A wake cut short once qemu was started to load the state, finished by the next wake,
    // then one whose future is dropped once qemu runs.
    wake_cut_short(&p, &dir);
    p.wake("t1", &vm).await.expect("wake after a cut one");
    assert_awake(&p, &vm, &dir, "a wake after a cut one");
    seen = counts_on(&p, &vm, &seen).await;
    p.sleep("t1", &vm).await.expect("sleep");
    let task = tokio::spawn({
        let p = p.clone();
        let vm = vm.clone();
        async move { p.wake("t1", &vm).await }
    });
    while qemu_pid(&dir).is_none() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    task.abort();
    let _ = task.await;
    p.wake("t1", &vm).await.expect("wake after a dropped one");
    assert_awake(&p, &vm, &dir, "a wake after a dropped one");
    seen = counts_on(&p, &vm, &seen).await;

    // A wake cut short, then a sleep: it waits for the restore and saves the guest again.
    p.sleep("t1", &vm).await.expect("sleep");
    wake_cut_short(&p, &dir);
    p.sleep("t1", &vm).await.expect("sleep after a cut wake");
    assert_asleep(&p, &vm, &dir, "a sleep after a cut wake");
    p.wake("t1", &vm).await.expect("wake");
    seen = counts_on(&p, &vm, &seen).await;

    // A state qemu cannot load: the wake says why, and the VM stays asleep with its state
    // (here put back, and woken after all).
    p.sleep("t1", &vm).await.expect("sleep");
    let good = dir.join("sleep.state.good");
    std::fs::rename(dir.join("sleep.state"), &good).expect("move the state aside");
    std::fs::write(dir.join("sleep.state"), b"not a migration stream").expect("write");
    let t = Instant::now();
    let woken = p.wake("t1", &vm).await;
    eprintln!("a wake from a bad state fails in {:?}", t.elapsed());
    match woken {
        Err(SubstrateError::Guest { reason, .. }) => {
            assert!(reason.contains("could not restore"), "{reason}");
        }
        other => panic!("a bad state woke: {other:?}"),
    }
    assert!(p.is_asleep("t1", &vm) && qemu_pid(&dir).is_none());
    assert!(p.list("t1").await.expect("list")[0].alive);
    std::fs::rename(&good, dir.join("sleep.state")).expect("put the state back");
    p.wake("t1", &vm).await.expect("wake");
    let seen = counts_on(&p, &vm, &seen).await;
    eprintln!("the count after every cut: {}", seen.len());

    // qemu gone half way through a sleep (killed before the state was saved): the VM is
    // lost, and said to be.
    sleep_cut_short(&dir, 2).await;
    let pid = qemu_pid(&dir).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    while qemu_pid(&dir).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        p.sleep("t1", &vm).await,
        Err(SubstrateError::VmGone(_))
    ));
    assert!(matches!(
        p.wake("t1", &vm).await,
        Err(SubstrateError::VmGone(_))
    ));
    let listed = p.list("t1").await.expect("list");
    assert!(!listed[0].alive, "a lost VM is listed dead");
    p.delete("t1", &vm).await.expect("delete");
    assert!(!dir.exists());
    cleanup.vms.clear();
}

/// What a guest says about itself: `MURMUR_VM_ID`, hostname, `/etc/murmur/vm-id`, and how
/// far its clock is from the host's, in seconds.
async fn identity_of(p: &QemuProvider, vm: &VmId) -> (String, String, String, i64) {
    let out = guest_sh(
        p,
        vm,
        "echo $MURMUR_VM_ID; hostname; cat /etc/murmur/vm-id; date +%s",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out:?}");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest_now: i64 = lines[3].parse().expect("date +%s");
    (
        lines[0].to_string(),
        lines[1].to_string(),
        lines[2].to_string(),
        (host_now - guest_now).abs(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
async fn later_guests_of_an_image_are_restored_from_its_snapshot_each_as_itself() {
    let (state, p) = real_provider().await;
    assert!(p.snapshot_boot(), "snapshot boot is on by default");
    let (first, second, third) = (
        VmId("murmur-0000ee01".into()),
        VmId("murmur-0000ee02".into()),
        VmId("murmur-0000ee03".into()),
    );
    let mut cleanup = Cleanup {
        provider: p.clone(),
        vms: vec![first.clone(), second.clone(), third.clone()],
    };
    let snapshot = state.path().join(format!(
        "qemu/images/default/snapshots/c1-m192-{}.state",
        p.accel()
    ));

    // The first guest of the image boots afresh and saves the snapshot once ready.
    let t0 = Instant::now();
    boot(&p, &first).await;
    let fresh = t0.elapsed();
    assert!(
        snapshot.is_file(),
        "the first ready guest saved the snapshot"
    );
    let vm_dir = |vm: &VmId| state.path().join("qemu/vms/t1").join(&vm.0);
    assert!(!vm_dir(&first).join("snapshot.wanted").exists());

    // Later ones are restored from it, each with its own identity and the host's time.
    let t0 = Instant::now();
    boot(&p, &second).await;
    let restored = t0.elapsed();
    boot(&p, &third).await;
    let cmdline = |vm: &VmId| {
        let pid = qemu_pid(&vm_dir(vm)).expect("qemu runs");
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
            .replace('\0', " ")
    };
    assert!(
        cmdline(&second).contains("-incoming"),
        "{}",
        cmdline(&second)
    );
    assert!(!cmdline(&first).contains("-incoming"));
    for vm in [&first, &second, &third] {
        let (env_id, hostname, marker, skew) = identity_of(&p, vm).await;
        assert_eq!(env_id, vm.0, "MURMUR_VM_ID");
        assert_eq!(hostname, vm.0, "hostname");
        assert_eq!(marker, vm.0, "/etc/murmur/vm-id");
        assert!(skew <= 5, "the guest's clock is {skew} s off the host's");
        assert!(!vm_dir(vm).join("identity.pending").exists());
    }
    // A restored guest runs commands like any other.
    let spec = CommandSpec {
        run: "r1".into(),
        argv: vec!["echo restored $MURMUR_AGENT".into()],
        env: vec![("MURMUR_AGENT".into(), "a1".into())],
    };
    p.start_command("t1", &second, &spec).await.expect("start");
    assert_eq!(wait_exit(&p, &second, "r1").await, 0);
    let out = p
        .command_output_tail("t1", &second, "r1", 100)
        .await
        .unwrap();
    assert_eq!(out, "restored a1\n");
    eprintln!(
        "fresh boot → ready {:.0} ms, snapshot restore → ready {:.0} ms",
        fresh.as_secs_f64() * 1000.0,
        restored.as_secs_f64() * 1000.0
    );

    // Snapshot boot off: a VM boots afresh even with the snapshot there.
    let plain = p.clone().without_snapshot_boot();
    let fourth = VmId("murmur-0000ee04".into());
    cleanup.vms.push(fourth.clone());
    boot(&plain, &fourth).await;
    assert!(!cmdline(&fourth).contains("-incoming"));
    let (env_id, ..) = identity_of(&plain, &fourth).await;
    assert_eq!(env_id, fourth.0);
    for vm in std::mem::take(&mut cleanup.vms) {
        p.delete("t1", &vm).await.expect("delete");
    }
}
