//! `murmur bake` on the process substrate end to end (the qemu version is in `qemu.rs`):
//! content-addressed ids, the cache, failures and timeouts, permissions, and bake → pin →
//! flush → fresh VMs from the new image.

use crate::harness::{TestEnv, stderr, stdout, warm};
use murmur_workflows::agent::Phase;
use murmur_workflows::bake::Recipe;

const RECIPE: &str = "base: default\nscript: |\n  mkdir -p etc/tools\n  echo v1 > etc/tools/version\nfiles:\n  etc/motd: hello from the recipe\n";

fn write_recipe(env: &TestEnv, name: &str, yaml: &str) -> String {
    let path = env.dir.path().join(name);
    std::fs::write(&path, yaml).expect("write recipe");
    path.display().to_string()
}

fn image_id(yaml: &str) -> String {
    let recipe: Recipe = serde_norway::from_str(yaml).expect("recipe");
    recipe.image_id(std::env::consts::ARCH)
}

#[test]
fn bake_pin_flush_boots_the_new_image() {
    let env = TestEnv::start("bake");
    env.set_workspace("default", "min_idle: 2\n");
    env.wait_for("2 warm VMs", |s| warm(s) == 2);
    let recipe = write_recipe(&env, "tools.yaml", RECIPE);
    let id = image_id(RECIPE);

    let out = env.murmur(&["bake", &recipe]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        env.worker_log_tail()
    );
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("Bake started (image: {id})\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "murmur patch workspace default --set image_ref={id}\n"
        )),
        "{text}"
    );
    let image = env.state_dir().join("images").join(&id);
    assert_eq!(
        std::fs::read_to_string(image.join("etc/tools/version")).expect("baked file"),
        "v1\n"
    );
    assert_eq!(
        std::fs::read_to_string(image.join("etc/motd")).expect("recipe file"),
        "hello from the recipe"
    );
    // The scratch sandbox is gone: only the 2 warm VMs remain.
    assert_eq!(env.substrate().len(), 2);

    // Unchanged recipe: answered from the cache.
    let out = env.murmur(&["bake", &recipe]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("Image {id} already cached\n"));
    // --force-new bakes again under the same id.
    let out = env.murmur(&["bake", "--force-new", &recipe]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with(&format!("Bake started (image: {id})\n")));

    // Pin, flush: the fresh VMs boot the new image.
    env.murmur_ok(&[
        "patch",
        "workspace",
        "default",
        "--set",
        &format!("image_ref={id}"),
    ]);
    let out = env.murmur(&["pool", "flush"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // VMs that were booting when the flush came are of the new image but a stale generation:
    // they are deleted as they come up, so wait until only the 2 fresh ones remain.
    let st = env.wait_for("only 2 warm VMs, of the new image", |s| {
        s.workspaces[0].ready == 2 && s.vms.len() == 2 && s.vms.iter().all(|v| v.image == id)
    });
    assert!(
        st.vms
            .iter()
            .all(|v| v.state == murmur_workflows::model::VmState::Warm)
    );
    env.spawn(
        "check",
        "cat etc/tools/version etc/murmur/image; echo $MURMUR_IMAGE",
    );
    let done = env.wait_phase("check", Phase::Completed);
    assert_eq!(
        done.output_tail.as_deref(),
        Some(format!("v1\n{id}\n{id}\n").as_str())
    );
}

#[test]
fn failed_and_timed_out_bakes_register_nothing_and_leave_no_vm() {
    let env = TestEnv::start("bakefail");
    let failing = "base: default\nscript: |\n  echo preparing\n  echo oops >&2\n  exit 3\n";
    let recipe = write_recipe(&env, "fail.yaml", failing);
    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("preparing\noops\n"), "{err}");
    assert!(
        err.contains(&format!(
            "FAILED_PRECONDITION: bake of {} failed: the provisioning script exited with 3",
            image_id(failing)
        )),
        "{err}"
    );
    assert!(
        !env.state_dir()
            .join("images")
            .join(image_id(failing))
            .exists()
    );
    assert!(env.substrate().is_empty(), "scratch VM left behind");

    let slow = "base: default\ntimeout: 2\nscript: |\n  echo started\n  sleep 30\n";
    let recipe = write_recipe(&env, "slow.yaml", slow);
    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("did not finish within 2 s"), "{err}");
    assert!(err.contains("started"), "{err}");
    assert!(!env.state_dir().join("images").join(image_id(slow)).exists());
    assert!(env.substrate().is_empty(), "scratch VM left behind");

    let missing = "base: no-such-image\nscript: true\n";
    let recipe = write_recipe(&env, "missing.yaml", missing);
    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("NOT_FOUND: base image no-such-image does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_recipes_and_missing_permissions_are_refused() {
    let env = TestEnv::start("bakebad");
    let recipe = write_recipe(&env, "bad.yaml", "base: default\n");
    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("INVALID_ARGUMENT: recipe "),
        "{}",
        stderr(&out)
    );
    let recipe = write_recipe(
        &env,
        "typo.yaml",
        "base: default\nscript: true\nscirpt: x\n",
    );
    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown field"), "{}", stderr(&out));
    let out = env.murmur(&["bake", "/nonexistent/recipe.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("INVALID_ARGUMENT: cannot read recipe"));

    let member = env.credential(&env.tenant, "mia", "member", "1h");
    env.login(&member);
    let recipe = write_recipe(&env, "ok.yaml", "base: default\nscript: true\n");
    let out = env.murmur(&["bake", &recipe]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out)
            .starts_with("PERMISSION_DENIED: your role does not have image.create permission"),
        "{}",
        stderr(&out)
    );
}

/// The reaper takes a bake's scratch VM for what it is while the bake runs (not an orphan),
/// and still reaps a scratch VM whose bake is gone.
#[test]
fn a_running_bake_keeps_its_scratch_vm_under_a_fast_reaper() {
    let env = TestEnv::start_with(
        "bakereap",
        crate::harness::EnvOptions::default().fast_reaper(),
    );
    env.set_workspace("default", "min_idle: 0\n");
    // Provisioning outlasts the reaper's grace period (2 s) several times over.
    let yaml = "base: default\nscript: |\n  sleep 6\n  echo slow > slow.txt\n";
    let recipe = write_recipe(&env, "slow.yaml", yaml);
    let out = env.murmur(&["bake", &recipe]);
    assert!(
        out.status.success(),
        "the bake failed under the reaper: {}\n{}",
        stderr(&out),
        env.worker_log_tail()
    );
    let st = env.status();
    assert_eq!(st.reaper.orphans_deleted, 0, "{:#?}", st.reaper);
    assert!(st.reaper.scans >= 3, "the reaper ran during the bake");

    // A scratch VM left behind by a bake that no longer runs is an orphan like any other.
    let leftover = env
        .state_dir()
        .join("vms")
        .join(&env.tenant)
        .join("murmur-5c7a7c40");
    std::fs::create_dir_all(leftover.join("root")).unwrap();
    std::fs::write(
        leftover.join("vm.json"),
        format!(
            "{{\"id\":\"murmur-5c7a7c40\",\"tenant\":\"{}\",\"workspace\":\"_bake\",\
             \"image\":\"default\",\"vcpus\":1,\"memory_mb\":512}}",
            env.tenant
        ),
    )
    .unwrap();
    env.wait_for("the stale scratch VM reaped", |s| {
        s.reaper.orphans_deleted >= 1
    });
    env.wait_settled_and_sound(crate::harness::PATIENCE);
}
