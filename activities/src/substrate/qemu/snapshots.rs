//! Snapshot boot: the saved state of a guest that has just become ready, from which later
//! VMs of the same image and shape are restored instead of booted.
//!
//! A snapshot is the migration stream of a guest (its RAM and device state) taken right
//! after its first ready handshake, while the guest agent waits for its first request. It
//! lives with its image, `<state>/qemu/images/<image>/snapshots/<key>.state`, with
//! `<key>.json` ([`SnapshotMeta`]) beside it; the key is the VM shape the stream fits
//! (`c<vcpus>-m<memory MiB>-<accel>`): a restore needs the same machine on the command line.
//!
//! - **Made afresh per image.** A new image (a bake, a rebuilt base image) is another
//!   directory, so its first VM boots and snapshots; an image directory replaced takes its
//!   snapshots with it.
//! - **Only a matching qemu restores one.** The meta records the qemu that made it
//!   (`qemu --version`); a snapshot of another qemu is deleted, not used.
//! - **Written whole or not at all.** The stream goes to a temporary file named after the VM
//!   writing it, renamed into place once complete (with its meta written first), so a crash
//!   leaves a stray temporary file, never a torn snapshot; [`Snapshots::collect_garbage`]
//!   removes strays and snapshots nobody restored from for [`SNAPSHOT_IDLE`].
//! - **Each restored guest takes its own identity** (the guest agent's `identity` request:
//!   VM id, hostname, clock, a fresh random seed) before its ready handshake, so no two
//!   guests share an id or their random numbers.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use murmur_workflows::model::VmId;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::guest::{parse_ready, request};
use super::launch::{CONTROL_SOCKET, QemuVmMeta};
use super::sleep::{SAVE_BANDWIDTH, call, connect, quoted, resume};
use crate::substrate::{Ready, SubstrateError};

/// Directory of an image's snapshots.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// Marker in an image's snapshots directory: its guest agent cannot take an identity (an
/// image of an older agent), so its VMs always boot afresh.
pub const UNSUPPORTED: &str = "unsupported";
/// A snapshot nobody restored from for this long is deleted (and temporary files of
/// snapshots that were never finished, after the same time).
pub const SNAPSHOT_IDLE: Duration = Duration::from_secs(24 * 3600);

/// Marker of a VM restored from a snapshot that has not taken its own identity yet.
pub const IDENTITY_PENDING: &str = "identity.pending";
/// Marker of a VM that boots afresh and saves its image's snapshot once ready.
pub const SNAPSHOT_WANTED: &str = "snapshot.wanted";
/// Longest the save of a snapshot may take (the VM is paused meanwhile); a slower one is
/// given up and the VM runs on.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one identity request may take.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often qemu's progress is looked at.
const POLL: Duration = Duration::from_millis(20);

/// What `<key>.json` records about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The image it was taken of.
    pub image: String,
    /// The VM shape and accelerator, as in its file name.
    pub key: String,
    /// `qemu --version` (first line) of the qemu that wrote it.
    pub qemu: String,
    /// The VM it was taken of.
    pub taken_of: String,
    /// Size of the stream in bytes.
    pub bytes: u64,
}

/// The snapshots of every image under `<state>/qemu/images`.
#[derive(Clone, Debug)]
pub struct Snapshots {
    images: PathBuf,
    qemu_version: String,
}

impl Snapshots {
    /// Snapshots of the images under `images`, made and restored by the qemu whose
    /// `--version` is `qemu_version`.
    pub fn new(images: impl Into<PathBuf>, qemu_version: impl Into<String>) -> Self {
        Self {
            images: images.into(),
            qemu_version: qemu_version.into(),
        }
    }

    /// The key of the snapshots a VM of this shape can be restored from.
    pub fn key(meta: &QemuVmMeta) -> String {
        format!("c{}-m{}-{}", meta.vcpus.max(1), meta.memory_mb, meta.accel)
    }

    fn dir(&self, image: &str) -> PathBuf {
        self.images.join(image).join(SNAPSHOTS_DIR)
    }

    /// Where the snapshot for `meta`'s image and shape is (whether or not it exists).
    pub fn path(&self, meta: &QemuVmMeta) -> PathBuf {
        self.dir(&meta.image)
            .join(format!("{}.state", Self::key(meta)))
    }

    fn meta_path(state: &Path) -> PathBuf {
        state.with_extension("json")
    }

    /// The snapshot a VM like `meta` can be restored from, if there is one made by this
    /// qemu; marks it used (its age counts from now). A snapshot of another qemu, or one
    /// whose meta is missing or unreadable, is deleted.
    pub fn usable(&self, meta: &QemuVmMeta) -> Option<PathBuf> {
        let state = self.path(meta);
        if !state.is_file() {
            return None;
        }
        let recorded: Option<SnapshotMeta> = std::fs::read(Self::meta_path(&state))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match recorded {
            Some(m) if m.qemu == self.qemu_version && m.image == meta.image => {
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&state)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                Some(state)
            }
            _ => {
                tracing::info!(snapshot = %state.display(), "snapshot of another qemu, or without its record: deleted");
                let _ = std::fs::remove_file(Self::meta_path(&state));
                let _ = std::fs::remove_file(&state);
                None
            }
        }
    }

    /// The temporary file VM `vm` writes the snapshot for `meta` to (its directory made).
    pub fn begin(&self, meta: &QemuVmMeta) -> std::io::Result<PathBuf> {
        let dir = self.dir(&meta.image);
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join(format!("{}.state.tmp-{}", Self::key(meta), meta.id)))
    }

    /// Puts a complete snapshot written to `tmp` in place: its meta first, then the stream
    /// renamed over any older one. Returns its size.
    pub fn commit(&self, meta: &QemuVmMeta, tmp: &Path) -> std::io::Result<u64> {
        let state = self.path(meta);
        let bytes = std::fs::metadata(tmp)?.len();
        let record = SnapshotMeta {
            image: meta.image.clone(),
            key: Self::key(meta),
            qemu: self.qemu_version.clone(),
            taken_of: meta.id.to_string(),
            bytes,
        };
        let json = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        let meta_tmp = tmp.with_extension("json-tmp");
        std::fs::write(&meta_tmp, json)?;
        std::fs::rename(&meta_tmp, Self::meta_path(&state))?;
        std::fs::rename(tmp, &state)?;
        Ok(bytes)
    }

    /// Deletes snapshots nobody restored from for `idle`, and temporary files as old
    /// (left by a crash while a snapshot was written). Returns how many files went.
    pub fn collect_garbage(&self, idle: Duration) -> usize {
        let Ok(images) = std::fs::read_dir(&self.images) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for image in images.filter_map(Result::ok) {
            let Ok(files) = std::fs::read_dir(image.path().join(SNAPSHOTS_DIR)) else {
                continue;
            };
            for file in files.filter_map(Result::ok) {
                let path = file.path();
                let name = file.file_name().to_string_lossy().into_owned();
                let idle_for = file
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                let stale = idle_for > idle;
                let is_state = name.ends_with(".state");
                let is_temporary = name.contains(".state.tmp-") || name.ends_with(".json-tmp");
                if stale && (is_state || is_temporary) && std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                    if is_state {
                        let _ = std::fs::remove_file(Self::meta_path(&path));
                    }
                }
                // A record whose stream is gone is removed with it.
                if name.ends_with(".json") && !path.with_extension("state").exists() {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        removed
    }
}

/// The `-incoming` source that restores a VM from `snapshot`.
pub fn restore_uri(snapshot: &Path) -> Result<String, SubstrateError> {
    Ok(format!("exec:cat {}", quoted(snapshot)?))
}

/// Saves the snapshot of the ready VM in `dir` (described by `meta`): pauses it, writes its
/// state to a temporary file, resumes it, and puts the snapshot in place once qemu says the
/// save completed and the writer is done. The VM runs on whatever happens (a failure only
/// means later VMs boot afresh). Returns the snapshot's size.
pub(super) async fn take(
    snaps: &Snapshots,
    dir: &Path,
    meta: &QemuVmMeta,
) -> Result<u64, SubstrateError> {
    let vm = &meta.id;
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let tmp = snaps
        .begin(meta)
        .map_err(|e| SubstrateError::io("make the snapshots directory", e))?;
    let mut done = tmp.clone().into_os_string();
    done.push(".done");
    let done = PathBuf::from(done);
    let uri = format!(
        "exec:cat > {t} && mv {t} {d} || rm -f {t}",
        t = quoted(&tmp)?,
        d = quoted(&done)?
    );
    let mut qmp = connect(dir, vm, Instant::now() + Duration::from_secs(5), "snapshot").await?;
    call(&mut qmp, dir, vm, "stop", None).await?;
    let saved = async {
        call(
            &mut qmp,
            dir,
            vm,
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": SAVE_BANDWIDTH })),
        )
        .await?;
        call(&mut qmp, dir, vm, "migrate", Some(json!({ "uri": uri }))).await?;
        loop {
            let migration = call(&mut qmp, dir, vm, "query-migrate", None).await?;
            match migration.get("status").and_then(Value::as_str) {
                Some("completed") => break,
                Some(status @ ("failed" | "cancelled")) => {
                    return Err(SubstrateError::io(
                        format!("snapshot VM {vm}"),
                        std::io::Error::other(format!("the save {status}")),
                    ));
                }
                _ if Instant::now() >= deadline => {
                    let _ = call(&mut qmp, dir, vm, "migrate_cancel", None).await;
                    return Err(SubstrateError::io(
                        format!("snapshot VM {vm}"),
                        std::io::Error::other(format!("not saved within {SNAPSHOT_TIMEOUT:?}")),
                    ));
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
        // Completed: the writer renames its file once it has written everything.
        while !done.is_file() {
            if !tmp.exists() && !done.is_file() {
                return Err(SubstrateError::io(
                    format!("snapshot VM {vm}"),
                    std::io::Error::other("writing the snapshot failed"),
                ));
            }
            if Instant::now() >= deadline {
                return Err(SubstrateError::io(
                    format!("snapshot VM {vm}"),
                    std::io::Error::other("the snapshot was not written in time"),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        snaps
            .commit(meta, &done)
            .map_err(|e| SubstrateError::io("put the snapshot in place", e))
    }
    .await;
    // The VM runs on in every case.
    let resumed = call(&mut qmp, dir, vm, "cont", None).await;
    if saved.is_err() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&done);
    }
    resumed?;
    saved
}

/// Gives a VM restored from a snapshot its own identity once its guest runs: the `identity`
/// request (its VM id, the host's clock, 32 random bytes from the host for the guest's
/// random pool). Its answer is the VM's ready handshake.
pub(super) async fn take_identity(dir: &Path, vm: &VmId) -> Result<Ready, SubstrateError> {
    resume(dir, vm).await?;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| SubstrateError::io("read /dev/urandom", e))?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let args = format!(
        "{vm} {now} {}",
        base64::engine::general_purpose::STANDARD.encode(seed)
    );
    let answer = request(
        &dir.join(CONTROL_SOCKET),
        "identity",
        &args,
        IDENTITY_TIMEOUT,
    )
    .await
    .map_err(|e| {
        SubstrateError::io(
            format!("give VM {vm} its identity"),
            std::io::Error::other(e.to_string()),
        )
    })?;
    let ready = parse_ready(&answer).ok_or_else(|| SubstrateError::Guest {
        vm: vm.clone(),
        reason: format!("identity answered {answer:?}"),
    })?;
    if ready.vm != *vm {
        return Err(SubstrateError::Guest {
            vm: vm.clone(),
            reason: format!("took the identity {} instead", ready.vm),
        });
    }
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::substrate::qemu::launch::Accel;
    use murmur_workflows::model::VmId;

    fn meta(id: &str, image: &str, memory_mb: u32) -> QemuVmMeta {
        QemuVmMeta {
            id: VmId(id.into()),
            tenant: "t".into(),
            workspace: "w".into(),
            image: image.into(),
            vcpus: 1,
            memory_mb,
            accel: Accel::Tcg,
            generation: 1,
        }
    }

    #[test]
    fn a_committed_snapshot_serves_its_image_and_shape_with_the_same_qemu_only() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(dir.path(), "QEMU emulator version 7.2.22");
        let a = meta("vm-a", "default", 192);
        assert_eq!(snaps.usable(&a), None, "nothing before the first boot");
        let tmp = snaps.begin(&a).unwrap();
        std::fs::write(&tmp, b"stream").unwrap();
        // Not usable while it is written.
        assert_eq!(snaps.usable(&a), None);
        assert_eq!(snaps.commit(&a, &tmp).unwrap(), 6);
        assert!(!tmp.exists());
        let path = snaps
            .usable(&meta("vm-b", "default", 192))
            .expect("a snapshot");
        assert_eq!(path, dir.path().join("default/snapshots/c1-m192-tcg.state"));
        // Another shape or image has none.
        assert_eq!(snaps.usable(&meta("vm-c", "default", 256)), None);
        assert_eq!(snaps.usable(&meta("vm-c", "img-1", 192)), None);
        // Another qemu does not restore it, and deletes it.
        let other = Snapshots::new(dir.path(), "QEMU emulator version 8.2.0");
        assert_eq!(other.usable(&a), None);
        assert!(!path.exists());
        assert_eq!(snaps.usable(&a), None);
    }

    #[test]
    fn garbage_collection_takes_idle_snapshots_and_strays_only() {
        let dir = tempfile::tempdir().unwrap();
        let snaps = Snapshots::new(dir.path(), "q");
        let a = meta("vm-a", "default", 192);
        let tmp = snaps.begin(&a).unwrap();
        std::fs::write(&tmp, b"s").unwrap();
        snaps.commit(&a, &tmp).unwrap();
        let stray = snaps.begin(&meta("vm-b", "default", 256)).unwrap();
        std::fs::write(&stray, b"half").unwrap();
        // Nothing is idle for a day yet.
        assert_eq!(snaps.collect_garbage(SNAPSHOT_IDLE), 0);
        assert!(snaps.usable(&a).is_some());
        // Two days later, both are past it.
        let long_ago = SystemTime::now() - 2 * SNAPSHOT_IDLE;
        for f in [snaps.path(&a), stray.clone()] {
            let file = std::fs::File::options().append(true).open(&f).unwrap();
            file.set_modified(long_ago).unwrap();
        }
        assert_eq!(snaps.collect_garbage(SNAPSHOT_IDLE), 2);
        assert!(!stray.exists());
        assert_eq!(snaps.usable(&a), None);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("default/snapshots"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
