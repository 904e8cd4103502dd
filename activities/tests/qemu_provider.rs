//! The `qemu` provider against real qemu, without Temporal: boot, handshake, commands,
//! cancel, list, snapshot and delete. Reported as ignored (with the reason) where
//! `qemu-system-x86_64` is not installed; with `MURMUR_REQUIRE_QEMU=1` (CI) it runs, and fails
//! when it is missing.

use std::time::{Duration, Instant};

use murmur_activities::substrate::qemu::QemuProvider;
use murmur_activities::substrate::qemu::launch::{find_qemu, qemu_pid};
use murmur_activities::substrate::{CommandSpec, CommandStatus, Provider};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(murmur_qemu), ignore = "qemu-system-x86_64 is not installed")]
async fn a_real_guest_boots_runs_commands_snapshots_and_is_deleted() {
    assert!(
        find_qemu().is_some(),
        "qemu-system-x86_64 is required (MURMUR_REQUIRE_QEMU=1) but not installed: apt-get install qemu-system-x86"
    );
    let state = tempfile::tempdir().expect("tempdir");
    // At the default nice 19 a guest gets ~1.5% of a core against any other busy process
    // (a build next to the tests): under TCG it then cannot answer within the control
    // channel's 10 s. What this test checks is the provider, not that scheduling trade-off
    // (which the e2e qemu tests run with), so its guests run at the tests' own priority.
    let p = QemuProvider::new(state.path())
        .await
        .expect("provider")
        .with_niceness(0);
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
