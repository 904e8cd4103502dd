//! Images as data: bake recipes, content-addressed image ids, the bake workflow's input,
//! progress and report.
//!
//! An image id is `img-` + the first 12 hex digits of a SHA-256 over the recipe's base image,
//! provisioning script, files (sorted by path) and the architecture, each length-prefixed so
//! no two different recipes render the same bytes. The same recipe on the same architecture
//! always names the same image; a bake of an existing image is answered from the cache.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::Credential;
use crate::error::ApiError;
use crate::model::{VmId, is_dns_label, valid_image_ref};

/// Provisioning time allowed when the recipe does not say.
pub const DEFAULT_BAKE_TIMEOUT_SECS: u64 = 600;
/// Longest provisioning time a recipe may ask for (a day).
pub const MAX_BAKE_TIMEOUT_SECS: u64 = 86_400;
/// Failure type of a bake step that retrying cannot fix.
pub const BAKE_FAILED: &str = "BakeFailed";
/// Workspace name recorded on scratch VMs (not a valid workspace name, so never confused
/// with a real one).
pub const BAKE_WORKSPACE: &str = "_bake";

/// A bake recipe (`murmur bake <recipe.yaml>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image to start from (`default`, or an earlier bake's id).
    pub base: String,
    /// Shell script run as root inside a scratch VM booted from `base`, in the image root
    /// (`/` on qemu, the sandbox root on the process substrate). Non-zero exit fails the bake.
    pub script: String,
    /// Seconds the script may run (default 600).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Files written (relative to the image root) before the script runs: path → content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

impl Recipe {
    /// Checks what a bake cannot work with.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !valid_image_ref(&self.base) {
            return Err(ApiError::invalid_argument(format!(
                "recipe base {:?} is not a valid image reference ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})",
                self.base
            )));
        }
        if self.script.trim().is_empty() {
            return Err(ApiError::invalid_argument("recipe script is empty"));
        }
        if let Some(t) = self.timeout
            && !(1..=MAX_BAKE_TIMEOUT_SECS).contains(&t)
        {
            return Err(ApiError::invalid_argument(format!(
                "recipe timeout must be between 1 and {MAX_BAKE_TIMEOUT_SECS} seconds (got {t})"
            )));
        }
        for path in self.files.keys() {
            let rel = path.trim_start_matches('/');
            let bad = rel.is_empty()
                || rel.ends_with('/')
                || rel.contains('\0')
                || rel
                    .split('/')
                    .any(|c| c.is_empty() || c == "." || c == "..");
            if bad {
                return Err(ApiError::invalid_argument(format!(
                    "recipe file path {path:?} must name a file inside the image (no '..', no empty components)"
                )));
            }
        }
        Ok(())
    }

    /// Provisioning time allowed, in seconds.
    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_BAKE_TIMEOUT_SECS)
    }

    /// The content-addressed id of the image this recipe bakes on `arch`.
    pub fn image_id(&self, arch: &str) -> String {
        let mut h = Sha256::new();
        let mut field = |tag: &str, value: &[u8]| {
            h.update(tag.as_bytes());
            h.update((value.len() as u64).to_be_bytes());
            h.update(value);
        };
        field("murmur-image-v1", b"");
        field("base", self.base.as_bytes());
        field("script", self.script.as_bytes());
        for (path, content) in &self.files {
            field("file", path.as_bytes());
            field("content", content.as_bytes());
        }
        field("arch", arch.as_bytes());
        let digest = h.finalize();
        let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
        format!("img-{hex}")
    }

    /// The script the scratch VM runs: the recipe's files written first (relative to the
    /// working directory, the image root), then the script, all under `set -e` for the files.
    pub fn provisioning_script(&self) -> String {
        let mut s = String::new();
        for (path, content) in &self.files {
            let rel = path.trim_start_matches('/');
            s.push_str(&format!(
                "mkdir -p \"$(dirname {p})\" && printf '%s' {c} > {p} || exit 1\n",
                p = shell_quote(rel),
                c = shell_quote(content)
            ));
        }
        s.push_str(&self.script);
        s
    }
}

/// Quotes a word for a POSIX shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r#"'\''"#))
}

/// Workflow id of the bake of `image` for `tenant`: identical bakes join one run.
pub fn bake_workflow_id(tenant: &str, image: &str) -> String {
    format!("bake/{tenant}/{image}")
}

/// Input of the bake workflow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BakeInput {
    /// Tenant baking (the scratch VM is one of its VMs while it lives).
    pub tenant: String,
    /// The image id the recipe names (checked against the recipe).
    pub image: String,
    /// Architecture the id was computed for.
    pub arch: String,
    /// The recipe.
    pub recipe: Recipe,
    /// Bake even when the image exists (replacing it).
    pub force_new: bool,
    /// Who asked.
    pub actor: Option<String>,
    /// The developer's signed request (`image.create`).
    pub auth: Option<Credential>,
}

impl BakeInput {
    /// Checks the input names a valid tenant, a valid recipe and the recipe's own id.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !is_dns_label(&self.tenant) {
            return Err(ApiError::invalid_argument(format!(
                "invalid tenant {:?}",
                self.tenant
            )));
        }
        self.recipe.validate()?;
        let expected = self.recipe.image_id(&self.arch);
        if self.image != expected {
            return Err(ApiError::invalid_argument(format!(
                "image id {} does not match the recipe ({expected})",
                self.image
            )));
        }
        Ok(())
    }
}

/// Where a bake is (the workflow's `progress` query).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BakeProgress {
    /// The current step, in words.
    pub step: String,
    /// Set once the cache was checked: true when the image existed (and no `--force-new`).
    pub cached: Option<bool>,
    /// The scratch VM, once one was asked for.
    pub vm: Option<VmId>,
    /// The host the bake runs on.
    #[serde(default)]
    pub host: Option<String>,
    /// Set when the bake failed: why.
    pub error: Option<String>,
    /// The provisioning script's output tail (after it ran).
    pub output_tail: Option<String>,
    /// True once the image is registered (or was cached).
    pub done: bool,
}

/// How a bake ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeReport {
    /// The image id.
    pub image: String,
    /// True when it existed already and nothing was baked.
    pub cached: bool,
}

/// Input of the provisioning step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionInput {
    /// Tenant of the scratch VM.
    pub tenant: String,
    /// The scratch VM.
    pub vm: VmId,
    /// The script (files first, see [`Recipe::provisioning_script`]).
    pub script: String,
    /// Seconds it may run.
    pub timeout_secs: u64,
}

/// What the provisioning step reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionReport {
    /// Exit code (128 + n for signal n; 124 when it timed out and was cancelled).
    pub exit_code: i32,
    /// True when it ran out of time.
    pub timed_out: bool,
    /// The last lines of its output.
    pub output_tail: String,
}

/// Input of the snapshot step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInput {
    /// Tenant of the scratch VM.
    pub tenant: String,
    /// The scratch VM.
    pub vm: VmId,
    /// The image it was booted from.
    pub base: String,
    /// The new image's id.
    pub image: String,
}

crate::activity! {
    /// True when the substrate holds the image.
    ImageExists = "murmur.image_exists": String => bool
}

crate::activity! {
    /// Runs a bake's provisioning script in the scratch VM as root, with its timeout
    /// (idempotent: a retry attaches to the run already started).
    ProvisionVm = "murmur.provision_vm": ProvisionInput => ProvisionReport
}

crate::activity! {
    /// Captures the scratch VM as the new image and registers it.
    SnapshotVm = "murmur.snapshot_vm": SnapshotInput => ()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            base: "default".into(),
            script: "echo hi > etc/greeting\n".into(),
            timeout: None,
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn the_id_is_the_hash_of_base_script_files_and_arch() {
        let r = recipe();
        let id = r.image_id("x86_64");
        assert!(id.starts_with("img-") && id.len() == 16, "{id}");
        assert_eq!(id, recipe().image_id("x86_64"), "stable");
        assert_ne!(id, r.image_id("aarch64"));
        let mut other = recipe();
        other.script.push(' ');
        assert_ne!(id, other.image_id("x86_64"));
        let mut other = recipe();
        other.base = "img-000000000000".into();
        assert_ne!(id, other.image_id("x86_64"));
        let mut other = recipe();
        other.files.insert("etc/a".into(), "1".into());
        assert_ne!(id, other.image_id("x86_64"));
        // The timeout does not change what is baked.
        let mut other = recipe();
        other.timeout = Some(5);
        assert_eq!(id, other.image_id("x86_64"));
    }

    #[test]
    fn bad_recipes_are_refused_with_a_reason() {
        let mut r = recipe();
        r.base = "../x".into();
        assert!(r.validate().is_err());
        let mut r = recipe();
        r.script = "  \n".into();
        assert!(r.validate().is_err());
        let mut r = recipe();
        r.timeout = Some(0);
        assert!(r.validate().is_err());
        let mut r = recipe();
        r.files.insert("etc/../../x".into(), String::new());
        assert!(r.validate().is_err());
        assert!(recipe().validate().is_ok());
    }

    #[test]
    fn the_provisioning_script_writes_files_first() {
        let mut r = recipe();
        r.files.insert("/etc/it's".into(), "a'b".into());
        assert_eq!(
            r.provisioning_script(),
            "mkdir -p \"$(dirname 'etc/it'\\''s')\" && printf '%s' 'a'\\''b' > 'etc/it'\\''s' || exit 1\necho hi > etc/greeting\n"
        );
    }

    #[test]
    fn the_input_must_name_its_recipes_id() {
        let r = recipe();
        let mut input = BakeInput {
            tenant: "t1".into(),
            image: r.image_id("x86_64"),
            arch: "x86_64".into(),
            recipe: r,
            ..Default::default()
        };
        assert!(input.validate().is_ok());
        input.image = "img-000000000000".into();
        assert!(input.validate().is_err());
    }
}
