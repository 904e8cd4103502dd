//! What every local substrate keeps in a VM's directory, and how.
//!
//! The `process` and `qemu` substrates both keep one directory per VM under
//! `<vms root>/<tenant>/<vm id>/`: a JSON metadata file (its labels), the owner record
//! ([`OWNER_FILE`]), a pid file and a control socket. This module holds the one copy of what
//! they share: path checks, the owner record (claim, seal, read), listing, removal of trees a
//! guest left read-only, atomic replacement of an image directory, and finding the process
//! that serves a VM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use murmur_workflows::activity_api::DELETING_OWNER;
use murmur_workflows::model::{VmId, is_dns_label, valid_image_ref};
use serde::Deserialize;

use super::{Seal, SubstrateError, VmInfo};

/// Longest path a unix socket can have on Linux.
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a control socket path a unix socket cannot have (the state dir is too deep).
pub fn check_socket_path(socket: &Path) -> Result<(), SubstrateError> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(SubstrateError::Invalid {
            what: "state dir (control socket path too long)",
            value: socket.display().to_string(),
        });
    }
    Ok(())
}

/// The directory of `tenant`'s VMs under `vms_root`; the tenant must be a DNS label.
pub fn tenant_dir(vms_root: &Path, tenant: &str) -> Result<PathBuf, SubstrateError> {
    if !is_dns_label(tenant) {
        return Err(SubstrateError::Invalid {
            what: "tenant",
            value: tenant.into(),
        });
    }
    Ok(vms_root.join(tenant))
}

/// The directory of a VM under `vms_root`; tenant and VM id must be valid names.
pub fn vm_dir(vms_root: &Path, tenant: &str, vm: &VmId) -> Result<PathBuf, SubstrateError> {
    if !VmId::is_valid(&vm.0) {
        return Err(SubstrateError::Invalid {
            what: "vm id",
            value: vm.0.clone(),
        });
    }
    Ok(tenant_dir(vms_root, tenant)?.join(&vm.0))
}

/// Run ids are file names: `[A-Za-z0-9-]{1,64}`.
pub fn valid_run_id(run: &str) -> bool {
    (1..=64).contains(&run.len()) && run.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A fresh id for an exec session, unique per host: alphanumeric, so `exec-<id>` is a valid
/// run id (the worker's pid, the time and a counter; not a secret).
pub fn new_session_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:x}{nanos:x}{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// [`valid_run_id`] as a substrate error.
pub fn check_run_id(run: &str) -> Result<(), SubstrateError> {
    if !valid_run_id(run) {
        return Err(SubstrateError::Invalid {
            what: "run id",
            value: run.into(),
        });
    }
    Ok(())
}

/// Refuses a name that cannot be an image id (a new image's, before anything is written).
pub fn check_image_id(image: &str) -> Result<(), SubstrateError> {
    if !valid_image_ref(image) {
        return Err(SubstrateError::Invalid {
            what: "image id",
            value: image.into(),
        });
    }
    Ok(())
}

/// Sets the permission bits of `path`.
pub fn set_mode(path: &Path, mode: u32) -> Result<(), SubstrateError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| SubstrateError::io(format!("chmod {}", path.display()), e))
}

/// Moves `stage` to `target`, replacing an older `target` (a forced re-bake): the old one is
/// renamed away first, so `target` is always either the old or the new complete image.
pub fn replace_dir(stage: &Path, target: &Path) -> std::io::Result<()> {
    static OLD: AtomicU64 = AtomicU64::new(1);
    if target.exists() {
        let old = target.with_extension(format!(
            "old.{:x}x{:x}",
            std::process::id(),
            OLD.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::rename(target, &old)?;
        std::fs::rename(stage, target)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    } else {
        std::fs::rename(stage, target)
    }
}

/// The process id recorded in `dir/<file>`, if there is one that parses.
pub fn recorded_pid(dir: &Path, file: &str) -> Option<i32> {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
}

/// Every process id in `/proc` (for finding a VM's process nobody recorded).
pub fn all_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .collect()
}

/// The command line of process `pid` (arguments separated by NUL bytes) when it is alive: a
/// zombie, or a process that is gone, has none.
pub fn live_cmdline(pid: i32) -> Option<Vec<u8>> {
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X")
    });
    if zombie {
        return None;
    }
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// File in a VM's directory naming the agent that owns it: its claim request
/// (`<agent workflow id>@<run id>`), written once, first come first served.
pub const OWNER_FILE: &str = "owner";

/// Records `owner` as the owner of the VM whose directory is `dir`, unless another owner is
/// recorded already (then [`SubstrateError::Taken`]). Atomic: the owner file appears whole,
/// through a hard link that fails when it exists, so two agents racing for one VM cannot
/// both win.
pub fn claim_owner(dir: &Path, vm: &VmId, owner: &str) -> Result<(), SubstrateError> {
    if !dir.is_dir() {
        return Err(SubstrateError::VmGone(vm.clone()));
    }
    let path = dir.join(OWNER_FILE);
    if let Some(existing) = read_owner(dir) {
        return if existing == owner {
            Ok(())
        } else {
            Err(SubstrateError::Taken {
                vm: vm.clone(),
                owner: existing,
            })
        };
    }
    let tmp = dir.join(format!(".owner.{}", std::process::id()));
    std::fs::write(&tmp, owner).map_err(|e| SubstrateError::io("write the owner file", e))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_owner(dir) {
            Some(existing) if existing == owner => Ok(()),
            Some(existing) => Err(SubstrateError::Taken {
                vm: vm.clone(),
                owner: existing,
            }),
            None => Err(SubstrateError::io("read the owner file", e)),
        },
        Err(e) => Err(SubstrateError::io("record the VM's owner", e)),
    }
}

/// Seals the VM in `dir` for deletion: records [`DELETING_OWNER`] as its owner unless an
/// agent owns it. A VM owned by `expected` (the agent being released) or already sealed may
/// go; one owned by anyone else may not.
pub fn seal_for_delete(
    dir: &Path,
    vm: &VmId,
    expected: Option<&str>,
) -> Result<Seal, SubstrateError> {
    match claim_owner(dir, vm, DELETING_OWNER) {
        Ok(()) | Err(SubstrateError::VmGone(_)) => Ok(Seal::Sealed),
        Err(SubstrateError::Taken { owner, .. })
            if owner == DELETING_OWNER || Some(owner.as_str()) == expected =>
        {
            Ok(Seal::Sealed)
        }
        Err(SubstrateError::Taken { owner, .. }) => Ok(Seal::OwnedBy(owner)),
        Err(e) => Err(e),
    }
}

/// The owner recorded in a VM's directory, if any.
pub fn read_owner(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(OWNER_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Removes a VM's directory tree, also when what ran in the VM left parts of it read-only
/// (Go's module cache does): write permission is restored on every directory, then the tree
/// is removed again. A tree that is already gone is fine.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            make_writable(dir);
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
        Err(e) => Err(e),
    }
}

/// [`remove_tree`] off the async runtime, as a substrate error.
pub async fn remove_vm_dir(dir: &Path) -> Result<(), SubstrateError> {
    let d = dir.to_path_buf();
    tokio::task::spawn_blocking(move || remove_tree(&d))
        .await
        .map_err(|e| SubstrateError::io("remove VM dir", std::io::Error::other(e)))?
        .map_err(|e| SubstrateError::io(format!("remove {}", dir.display()), e))
}

/// Gives the owner read, write and search permission on every directory under `dir` (not
/// following symlinks), so its entries can be removed.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

/// Every VM a local substrate keeps under `vms_root` (`<tenant>/<vm id>` directories), of
/// every tenant, from the directory names alone: no metadata read, no liveness check.
pub fn vm_dirs_of_every_tenant(vms_root: &Path) -> Vec<(String, VmId)> {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    names(vms_root)
        .into_iter()
        .filter(|tenant| is_dns_label(tenant))
        .flat_map(|tenant| {
            names(&vms_root.join(&tenant))
                .into_iter()
                .filter(|vm| VmId::is_valid(vm))
                .map(move |vm| (tenant.clone(), VmId(vm)))
        })
        .collect()
}

/// Lists the VMs a local substrate keeps as directories named by VM id under `tenant_dir`,
/// each with a JSON metadata file `meta_file` naming its workspace and image (missing or
/// unreadable metadata lists the VM anyway, with those fields empty: an orphan is still an
/// orphan). `alive` says whether a VM directory's process runs.
pub fn list_vm_dirs(
    tenant: &str,
    tenant_dir: &Path,
    meta_file: &str,
    alive: impl Fn(&Path) -> bool,
) -> Result<Vec<VmInfo>, SubstrateError> {
    /// The part of a VM's metadata a listing needs (both substrates write more).
    #[derive(Default, Deserialize)]
    #[serde(default)]
    struct Labels {
        workspace: String,
        image: String,
        generation: u64,
    }
    let entries = match std::fs::read_dir(tenant_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(SubstrateError::io(
                format!("list {}", tenant_dir.display()),
                e,
            ));
        }
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !VmId::is_valid(&name) {
            continue;
        }
        let dir = entry.path();
        let labels: Option<Labels> = std::fs::read(dir.join(meta_file))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let labelled = labels.is_some();
        let labels = labels.unwrap_or_default();
        out.push(VmInfo {
            id: VmId(name),
            tenant: tenant.to_string(),
            workspace: labels.workspace,
            image: labels.image,
            generation: labels.generation,
            owner: read_owner(&dir),
            labelled,
            alive: alive(&dir),
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_plain_file_names() {
        assert!(valid_run_id("agent-1"));
        assert!(!valid_run_id(""));
        assert!(!valid_run_id("../x"));
        assert!(!valid_run_id(&"a".repeat(65)));
    }

    #[test]
    fn a_replaced_dir_is_whole_and_the_old_one_is_gone() {
        let root = tempfile::tempdir().expect("tempdir");
        let (stage, target) = (root.path().join("stage"), root.path().join("img"));
        std::fs::create_dir_all(&target).expect("old");
        std::fs::write(target.join("v"), "old").expect("old file");
        std::fs::create_dir_all(&stage).expect("stage");
        std::fs::write(stage.join("v"), "new").expect("new file");
        replace_dir(&stage, &target).expect("replace");
        assert_eq!(
            std::fs::read_to_string(target.join("v")).expect("read"),
            "new"
        );
        let left: Vec<_> = std::fs::read_dir(root.path()).expect("ls").collect();
        assert_eq!(left.len(), 1, "only the new image is left");
    }

    #[test]
    fn this_process_is_alive_and_a_pid_file_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pid"), format!("{}\n", std::process::id())).expect("pid");
        assert_eq!(
            recorded_pid(dir.path(), "pid"),
            Some(std::process::id() as i32)
        );
        assert!(live_cmdline(std::process::id() as i32).is_some());
        assert!(all_pids().contains(&(std::process::id() as i32)));
    }
}
