//! qemu images: what `image.json` says, the embedded guest files and the base image build,
//! and the bake's snapshot of a provisioned guest as a new image.
//!
//! An image is `<state>/qemu/images/<image>/`: `vmlinuz`, `initrd.gz` and `image.json`
//! ([`ImageMeta`]). Images are kernel + initramfs only (no disk). The base image `default` is
//! built from Debian packages by the embedded `build.sh` ([`ensure_base_image`]); a baked
//! image is its base's initrd with a layer appended ([`pack_guest`], [`add_layer`]).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use murmur_workflows::model::{VmId, valid_image_ref};
use serde::{Deserialize, Serialize};

use super::guest::{next_tag, shell_quote};
use crate::substrate::vm_dir::{replace_dir, set_mode};
use crate::substrate::{CommandSpec, CommandStatus, Provider, SubstrateError};

/// The guest image build script (Debian packages only, reproducible).
pub const BUILD_SCRIPT: &str = include_str!("../../../images/qemu/build.sh");
/// The guest's `/init`.
pub const GUEST_INIT: &str = include_str!("../../../images/qemu/init");
/// The guest agent.
pub const GUEST_AGENT: &str = include_str!("../../../images/qemu/murmur-agent");
/// File describing an image.
pub const IMAGE_META_FILE: &str = "image.json";
/// Where in the guest [`PACK_SCRIPT`] leaves the layer.
pub const LAYER_PATH: &str = "/run/murmur/layer.cpio.gz";
/// The guest-side script that packs a provisioned guest's changes as a cpio layer: every file
/// newer than `/init` (the base image's files all carry its fixed build time; anything a
/// provisioning script wrote is newer), outside the kernel filesystems, `/run` and `/tmp`.
pub const PACK_SCRIPT: &str = "cd / && find . -xdev -newer /init \
! -path './proc*' ! -path './sys*' ! -path './dev*' ! -path './run*' ! -path './tmp*' \
! -path . | cpio -o -H newc 2>/dev/null | gzip -9 > /run/murmur/layer.cpio.gz";

/// What `image.json` says about a qemu image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Image id (`default`, or `img-<hex>` for baked images).
    pub id: String,
    /// Always `qemu`.
    #[serde(default)]
    pub substrate: String,
    /// Guest architecture.
    #[serde(default)]
    pub arch: String,
    /// Guest kernel release (`uname -r` in the guest).
    #[serde(default)]
    pub kernel: String,
    /// The image this one was baked from (none for the base image).
    #[serde(default)]
    pub base: Option<String>,
}

/// The metadata of image `image` under `images`, if it exists whole.
pub fn image_meta(images: &Path, image: &str) -> Option<ImageMeta> {
    if !valid_image_ref(image) {
        return None;
    }
    let dir = images.join(image);
    if !dir.join("vmlinuz").is_file() || !dir.join("initrd.gz").is_file() {
        return None;
    }
    std::fs::read(dir.join(IMAGE_META_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Builds the base image `default` under `images` with the embedded `build.sh` unless it
/// exists; the scripts are written to `scripts` first.
pub async fn ensure_base_image(images: &Path, scripts: &Path) -> Result<(), SubstrateError> {
    let default = murmur_workflows::model::DEFAULT_IMAGE;
    if image_meta(images, default).is_some() {
        return Ok(());
    }
    std::fs::create_dir_all(scripts)
        .map_err(|e| SubstrateError::io(format!("create {}", scripts.display()), e))?;
    for (name, body) in [
        ("build.sh", BUILD_SCRIPT),
        ("init", GUEST_INIT),
        ("murmur-agent", GUEST_AGENT),
    ] {
        let path = scripts.join(name);
        std::fs::write(&path, body)
            .map_err(|e| SubstrateError::io(format!("write {}", path.display()), e))?;
        set_mode(&path, 0o755)?;
    }
    tracing::info!(
        image = default,
        "building the qemu base image (Debian kernel + busybox)"
    );
    let out = tokio::process::Command::new("bash")
        .arg(scripts.join("build.sh"))
        .arg(images.join(default))
        .arg(default)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| SubstrateError::io("run the guest image build", e))?;
    if !out.status.success() {
        return Err(SubstrateError::BootFailed {
            vm: VmId(String::new()),
            reason: format!(
                "guest image build failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Has a provisioned guest write its new image id to `/etc/murmur/image` and pack every file
/// changed since boot as a cpio layer at [`LAYER_PATH`] (at most 120 s).
pub async fn pack_guest(
    provider: &dyn Provider,
    tenant: &str,
    vm: &VmId,
    image: &str,
) -> Result<(), SubstrateError> {
    let run = format!("pack-{}", next_tag());
    let spec = CommandSpec {
        run: run.clone(),
        argv: vec![format!(
            "echo {} > /etc/murmur/image && {PACK_SCRIPT}",
            shell_quote(image)
        )],
        env: Vec::new(),
    };
    provider.start_command(tenant, vm, &spec).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match provider.command_status(tenant, vm, &run).await? {
            CommandStatus::Exited(0) => return Ok(()),
            CommandStatus::Exited(code) => {
                let tail = provider
                    .command_output_tail(tenant, vm, &run, 2000)
                    .await
                    .unwrap_or_default();
                return Err(SubstrateError::Guest {
                    vm: vm.clone(),
                    reason: format!("packing the guest failed (exit {code}): {tail}"),
                });
            }
            _ if Instant::now() > deadline => {
                return Err(SubstrateError::Guest {
                    vm: vm.clone(),
                    reason: "packing the guest timed out".into(),
                });
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Registers image `image` under `images`: `initrd.gz` = the initrd of `base` (described by
/// `base_meta`) + `layer` (the kernel unpacks concatenated archives in order, so the layer
/// overlays the base), with the base's kernel; staged, then put in place of an older image
/// of that id. Files the provisioning deleted are not captured (a layer only adds).
pub async fn add_layer(
    images: &Path,
    base: &str,
    base_meta: &ImageMeta,
    image: &str,
    layer: Vec<u8>,
) -> Result<(), SubstrateError> {
    let base_dir = images.join(base);
    let stage = images.join(format!(".{image}.tmp"));
    let target = images.join(image);
    let meta = ImageMeta {
        id: image.to_string(),
        substrate: "qemu".into(),
        arch: base_meta.arch.clone(),
        kernel: base_meta.kernel.clone(),
        base: Some(base.to_string()),
    };
    let work = move || -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(&stage);
        std::fs::create_dir_all(&stage)?;
        std::fs::copy(base_dir.join("vmlinuz"), stage.join("vmlinuz"))?;
        let mut initrd = std::fs::read(base_dir.join("initrd.gz"))?;
        initrd.extend_from_slice(&layer);
        std::fs::write(stage.join("initrd.gz"), initrd)?;
        std::fs::write(stage.join("layer.cpio.gz"), &layer)?;
        std::fs::write(
            stage.join(IMAGE_META_FILE),
            serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?,
        )?;
        replace_dir(&stage, &target)
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SubstrateError::io("write image", std::io::Error::other(e)))?
        .map_err(|e| SubstrateError::io(format!("register image {image}"), e))
}
