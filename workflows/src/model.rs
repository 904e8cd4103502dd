//! The tenant's resources (pool-config, workspace) and the VM inventory record, as plain data.
//!
//! Everything here is deterministic: validation, patching and rendering use no clock, no I/O
//! and no randomness, so the pool workflow can run it and the CLI can run it too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Milliseconds since the Unix epoch, as read from workflow time.
pub type Millis = u64;

/// Largest `description` accepted on any resource, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;

/// Name of the single pool-config resource of a tenant.
pub const POOL_CONFIG_NAME: &str = "default";

/// The kinds of resource `murmur get | set | patch` know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// The tenant's `pool-config default` singleton.
    PoolConfig,
    /// A workspace of the tenant.
    Workspace,
}

impl ResourceKind {
    /// Parses the CLI spelling (`pool-config`, `workspace`).
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "pool-config" => Ok(Self::PoolConfig),
            "workspace" => Ok(Self::Workspace),
            other => Err(ApiError::invalid_argument(format!(
                "unknown resource kind {other:?} (expected pool-config or workspace)"
            ))),
        }
    }

    /// The CLI spelling of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PoolConfig => "pool-config",
            Self::Workspace => "workspace",
        }
    }
}

/// What `reap_stranded_workflows` asks the reaper to do with agent workflows on a retired build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReapPolicy {
    /// Log what would be reaped, change nothing (the default).
    #[default]
    DryRun,
    /// Terminate stranded workflows.
    Enabled,
    /// Do nothing. Unknown values also mean this.
    #[serde(other)]
    Disabled,
}

/// The tenant-wide pool limits (`pool-config default`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfigSpec {
    /// Cap on booting + warm + assigned + deleting VMs, in-flight creates included.
    pub max_vms: u32,
    /// Non-terminal top-level agents a developer may have; 0 = unlimited.
    #[serde(default)]
    pub max_agents_per_developer: u32,
    /// Free text, at most 1024 bytes.
    #[serde(default)]
    pub description: String,
    /// What the reaper does with stranded agent workflows.
    #[serde(default)]
    pub reap_stranded_workflows: ReapPolicy,
}

impl ReapPolicy {
    /// The spelling used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DryRun => "dry_run",
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

impl Default for PoolConfigSpec {
    fn default() -> Self {
        Self {
            max_vms: 10,
            max_agents_per_developer: 0,
            description: String::new(),
            reap_stranded_workflows: ReapPolicy::DryRun,
        }
    }
}

impl PoolConfigSpec {
    /// Checks the pool config: a positive `max_vms`, a description within its limits.
    pub fn validate(&self) -> Result<(), ApiError> {
        if self.max_vms == 0 {
            return Err(ApiError::invalid_argument("max_vms must be positive"));
        }
        validate_description(&self.description)
    }
}

/// The shape of the VMs a workspace boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// Virtual CPUs per VM.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Memory per VM in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u32,
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory_mb() -> u32 {
    256
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            vcpus: default_vcpus(),
            memory_mb: default_memory_mb(),
        }
    }
}

/// A workspace: which image its VMs boot from and how many warm ones to keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Warm VMs to keep ready for this workspace.
    #[serde(default)]
    pub min_idle: u32,
    /// The image new VMs boot from.
    #[serde(default = "default_image_ref")]
    pub image_ref: String,
    /// VM shape.
    #[serde(default)]
    pub environment: Environment,
    /// Free text, at most 1024 bytes.
    #[serde(default)]
    pub description: String,
}

/// The image every substrate ships with.
pub const DEFAULT_IMAGE: &str = "default";

fn default_image_ref() -> String {
    DEFAULT_IMAGE.to_string()
}

impl Default for WorkspaceSpec {
    fn default() -> Self {
        Self {
            min_idle: 0,
            image_ref: default_image_ref(),
            environment: Environment::default(),
            description: String::new(),
        }
    }
}

impl WorkspaceSpec {
    /// Checks field rules; the name is checked by [`validate_workspace_name`].
    pub fn validate(&self) -> Result<(), ApiError> {
        if !valid_image_ref(&self.image_ref) {
            return Err(ApiError::invalid_argument(format!(
                "image_ref {:?} is not a valid image reference ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})",
                self.image_ref
            )));
        }
        if !(1..=64).contains(&self.environment.vcpus) {
            return Err(ApiError::invalid_argument(
                "environment.vcpus must be between 1 and 64",
            ));
        }
        if !(64..=262_144).contains(&self.environment.memory_mb) {
            return Err(ApiError::invalid_argument(
                "environment.memory_mb must be between 64 and 262144",
            ));
        }
        validate_description(&self.description)
    }
}

fn validate_description(description: &str) -> Result<(), ApiError> {
    let n = description.len();
    if n > MAX_DESCRIPTION_BYTES {
        return Err(ApiError::invalid_argument(format!(
            "description exceeds {MAX_DESCRIPTION_BYTES} byte limit ({n} bytes)"
        )));
    }
    Ok(())
}

/// True for a name matching `[a-z][a-z0-9-]{0,62}`.
pub fn is_dns_label(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
}

/// Checks a workspace name (`[a-z][a-z0-9-]{0,62}`).
pub fn validate_workspace_name(name: &str) -> Result<(), ApiError> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "invalid workspace name {name:?}: must match [a-z][a-z0-9-]{{0,62}}"
        )))
    }
}

/// True for an image reference a substrate can use as a file name.
pub fn valid_image_ref(image: &str) -> bool {
    let mut chars = image.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && image.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Who last changed a resource, and when; `generation` only goes up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Bumped by every accepted change.
    pub generation: u64,
    /// The developer (or `murmur` for defaults) who made the last change.
    pub updated_by: String,
    /// When the last change was made.
    pub updated_at: Millis,
}

/// A resource with its bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource<S> {
    /// Generation and audit fields.
    pub meta: Meta,
    /// The desired state.
    pub spec: S,
}

/// The document `murmur get` prints and `murmur set` accepts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceDoc {
    /// `pool-config` or `workspace`.
    pub kind: ResourceKind,
    /// Resource name.
    pub name: String,
    /// Current generation.
    pub generation: u64,
    /// Who made the last change.
    pub updated_by: String,
    /// When the last change was made (RFC 3339, UTC).
    pub updated_at: String,
    /// The spec, as JSON.
    pub spec: serde_json::Value,
}

/// Identifier of one VM: `murmur-` followed by 8 lower-case hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(pub String);

impl VmId {
    /// Formats the id for a 32-bit value.
    pub fn from_bits(bits: u32) -> Self {
        Self(format!("murmur-{bits:08x}"))
    }

    /// True when `s` has the `murmur-xxxxxxxx` shape.
    pub fn is_valid(s: &str) -> bool {
        s.strip_prefix("murmur-")
            .is_some_and(|h| h.len() == 8 && h.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')))
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lifecycle state of a VM in the pool's inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Create requested; readiness handshake not seen yet.
    Booting,
    /// Ready and idle, waiting for a claim.
    Warm,
    /// Handed to exactly one agent.
    Assigned,
    /// Delete requested; gone from the inventory once the substrate confirms.
    Deleting,
}

impl VmState {
    /// Lower-case name used in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booting => "booting",
            Self::Warm => "warm",
            Self::Assigned => "assigned",
            Self::Deleting => "deleting",
        }
    }
}

/// Why a VM is being deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteReason {
    /// Warm VM destroyed by a flush.
    Flush,
    /// Came up after a flush that made its generation stale.
    StaleGeneration,
    /// Warm VM whose image is no longer the workspace's image, evicted for capacity.
    StaleImage,
    /// More warm VMs than `min_idle` asks for.
    ScaleIn,
    /// Did not become ready.
    BootFailed,
    /// Its agent ended.
    AgentEnded,
    /// Found in the substrate but unknown to the pool.
    Orphan,
    /// Wiped by a nuke.
    Nuke,
    /// A warm VM the reaper found dead or missing in the substrate.
    Died,
    /// A warm VM on a host being drained.
    Drained,
}

/// One VM the pool knows about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// `murmur-xxxxxxxx`.
    pub id: VmId,
    /// The workspace it was booted for.
    pub workspace: String,
    /// The image it boots from.
    pub image: String,
    /// The pool generation at boot time.
    pub generation: u64,
    /// Where it is in its lifecycle.
    pub state: VmState,
    /// The agent (workflow id) holding it, when assigned.
    pub agent: Option<String>,
    /// The claim (request id) it was cold-booted for, while it boots; such a VM is handed to
    /// that claim when it comes up instead of joining the warm pool.
    #[serde(default)]
    pub claim: Option<String>,
    /// When its create was requested.
    pub created_at: Millis,
    /// When its readiness handshake was seen.
    pub ready_at: Option<Millis>,
    /// Why it is being deleted, when deleting.
    pub delete_reason: Option<DeleteReason>,
    /// The host it was placed on (`None`: runs from before host placement, whose VMs live
    /// wherever the shared task queue's worker runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Memory it was booted with, in MiB (counts against its host's memory).
    #[serde(default)]
    pub memory_mb: u32,
    /// Delete attempts that failed in a row (each one an activity with its own retries); a
    /// VM with failures is *stuck deleting*: it still counts against `max_vms`, its delete is
    /// retried on a back-off timer, and nothing waits for it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub delete_failures: u32,
    /// Why its last delete failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_error: Option<String>,
    /// The reaper round that was starting when it became warm: a round judges only VMs that
    /// were warm before it started (its listing may predate a later boot).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub warm_round: u64,
    /// Asleep without holding host memory (a qemu guest saved to disk): an assigned VM that
    /// does not count against `max_vms` until its agent asks to wake it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dormant: bool,
    /// While a dormant VM's agent waits for room under `max_vms` to wake it: its place in
    /// line (a ticket from the claims' sequence, so wakes and claims share one order); 0
    /// when no wake waits.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub wake_seq: u64,
}

impl VmRecord {
    /// True when its delete failed and is waiting to be retried.
    pub fn stuck_deleting(&self) -> bool {
        self.state == VmState::Deleting && self.delete_failures > 0
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Health of one image as seen through its boots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHealth {
    /// Failures since the last successful boot.
    pub consecutive_failures: u32,
    /// All failures seen.
    pub total_failures: u64,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Backfill for this image is held until about then (for display; the hold itself ends
    /// when the shell's timer for it fires).
    pub backoff_until: Option<Millis>,
    /// Backfill for this image is held back.
    #[serde(default)]
    pub held: bool,
    /// Which hold-back is current (a timer of an older one changes nothing).
    #[serde(default)]
    pub hold_seq: u64,
}

/// Formats epoch milliseconds as RFC 3339 UTC (`2026-11-28T13:05:09Z`) without a clock.
pub fn format_rfc3339(ms: Millis) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// Sets `key` (dotted for nested fields, e.g. `environment.vcpus`) in a JSON object to `raw`,
/// read as JSON when it parses (numbers, booleans, quoted strings) and as a plain string otherwise.
pub fn patch_json(doc: &mut serde_json::Value, key: &str, raw: &str) -> Result<(), ApiError> {
    let value = serde_json::from_str::<serde_json::Value>(raw)
        .unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
    let mut target = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(ApiError::invalid_argument(format!("invalid key {key:?}")));
        }
        let obj = target
            .as_object_mut()
            .ok_or_else(|| ApiError::invalid_argument(format!("{key:?} is not an object field")))?;
        if i + 1 == parts.len() {
            if !obj.contains_key(*part) {
                return Err(ApiError::invalid_argument(format!("unknown field {key:?}")));
            }
            obj.insert((*part).to_string(), value);
            return Ok(());
        }
        target = obj
            .get_mut(*part)
            .ok_or_else(|| ApiError::invalid_argument(format!("unknown field {key:?}")))?;
    }
    Err(ApiError::invalid_argument(format!("invalid key {key:?}")))
}

/// Reads a spec from JSON, turning serde's message into an `INVALID_ARGUMENT`.
pub fn spec_from_json<S: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<S, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::invalid_argument(e.to_string()))
}

/// Counts per VM state, used by status views.
pub type StateCounts = BTreeMap<VmState, u32>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_795_870_509_000), "2026-11-28T12:55:09Z");
        assert_eq!(format_rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns_label("a"));
        assert!(is_dns_label("web-1"));
        assert!(!is_dns_label("1web"));
        assert!(!is_dns_label("Web"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_label(&"a".repeat(63)));
    }

    #[test]
    fn pool_config_errors_are_exact() {
        let spec = PoolConfigSpec {
            max_vms: 0,
            ..Default::default()
        };
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            "INVALID_ARGUMENT: max_vms must be positive"
        );
        let spec = PoolConfigSpec {
            description: "x".repeat(1025),
            ..Default::default()
        };
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            "INVALID_ARGUMENT: description exceeds 1024 byte limit (1025 bytes)"
        );
    }

    #[test]
    fn patch_sets_nested_and_typed_values() {
        let mut v = serde_json::to_value(WorkspaceSpec::default()).unwrap();
        patch_json(&mut v, "min_idle", "3").unwrap();
        patch_json(&mut v, "environment.vcpus", "2").unwrap();
        patch_json(&mut v, "image_ref", "img-2").unwrap();
        let spec: WorkspaceSpec = spec_from_json(v.clone()).unwrap();
        assert_eq!(spec.min_idle, 3);
        assert_eq!(spec.environment.vcpus, 2);
        assert_eq!(spec.image_ref, "img-2");
        assert!(patch_json(&mut v, "nope", "1").is_err());
        patch_json(&mut v, "min_idle", "-1").unwrap();
        assert!(spec_from_json::<WorkspaceSpec>(v).is_err());
    }

    #[test]
    fn unknown_reap_policy_means_disabled() {
        let p: ReapPolicy = serde_json::from_str("\"sometimes\"").unwrap();
        assert_eq!(p, ReapPolicy::Disabled);
    }
}
