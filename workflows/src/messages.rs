//! Messages exchanged with the pool workflow (signals, updates, queries) and how a lenient
//! handler reads them: anything the `temporal` CLI can send must be rejected cleanly, never
//! fail a workflow task.

use serde::{Deserialize, Serialize};
use temporalio_common::data_converters::RawValue;

use crate::error::ApiError;
use crate::machine::ConfigChange;
use crate::model::VmId;

/// Input of `flush` (signal and update). Every field is optional so `{}` is a plain flush.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlushRequest {
    /// Destroy everything, not just warm VMs (handled by the nuke workflow).
    pub nuke: bool,
    /// Who asks, for the audit trail.
    pub actor: Option<String>,
    /// Workspace context of the caller (the flush always covers the whole pool).
    pub workspace: Option<String>,
    /// Proof of who asks (see [`crate::auth::Credential`]).
    #[serde(default)]
    pub auth: Option<crate::auth::Credential>,
}

/// Most VM ids a flush reply lists (the count is always complete).
pub const FLUSH_REPLY_IDS: usize = 100;

/// Result of a flush.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReply {
    /// Warm VMs destroyed.
    pub flushed: u32,
    /// Their ids (the first [`FLUSH_REPLY_IDS`] of them).
    pub vms: Vec<VmId>,
    /// The pool generation after the flush.
    pub generation: u64,
    /// Of the flushed VMs, those whose delete keeps failing (stuck deleting; the pool keeps
    /// retrying them, and the flush does not wait for them).
    #[serde(default)]
    pub stuck: u32,
    /// For a nuke: what it terminated and deleted.
    #[serde(default)]
    pub nuke: Option<NukeReport>,
}

/// Answer of `up`: a summary (the full status is the `status` query).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpReply {
    /// Tenant.
    pub tenant: String,
    /// The pool generation.
    pub generation: u64,
    /// VMs counting against `max_vms`.
    pub in_use: u32,
    /// `max_vms`.
    pub max_vms: u32,
    /// Warm VMs.
    pub warm: u32,
    /// VMs booting.
    pub booting: u32,
    /// True while the pool rebuilds its state after a run that ended.
    pub recovering: bool,
}

/// Every resource of the tenant, as `murmur get` shows them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigSnapshot {
    /// `pool-config default`.
    pub pool_config: crate::model::ResourceDoc,
    /// All workspaces.
    pub workspaces: Vec<crate::model::ResourceDoc>,
    /// True while a recovering pool has not read its config back yet (the documents are
    /// defaults until then).
    #[serde(default)]
    pub recovering: bool,
}

/// Input of the `inventory` query: one page of the VM records and claims.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InventoryPage {
    /// Start after this VM id (`None`: from the first).
    pub after: Option<VmId>,
    /// Start the claims after this request id (`None`: from the first).
    pub claims_after: Option<String>,
    /// Most records per page (0: the default; at most [`INVENTORY_PAGE_MAX`]).
    pub limit: u32,
}

/// Input of the `claim_state` query: which claim.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClaimProbe {
    /// The claim's request id.
    pub request: String,
}

/// Largest page of the `inventory` query.
pub const INVENTORY_PAGE_MAX: u32 = 500;

/// One page of the inventory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Inventory {
    /// VM records, by id.
    pub vms: Vec<crate::model::VmRecord>,
    /// Claims, by request id.
    pub claims: Vec<crate::machine::Claim>,
    /// True when there are more VM records after this page.
    pub more_vms: bool,
    /// True when there are more claims after this page.
    pub more_claims: bool,
}

/// Result of a nuke.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NukeReport {
    /// Agent workflows terminated.
    pub terminated: u64,
    /// VMs deleted from the substrate, agents' VMs and orphans included.
    pub deleted: u64,
    /// Of those, VMs that belonged to a terminated agent.
    pub agent_vms: u64,
}

impl NukeReport {
    /// What `Nuke complete (N terminated/deleted)` counts: each agent terminated (its VM goes
    /// with it) and each other VM deleted (warm, booting, orphans).
    pub fn total(&self) -> u64 {
        self.terminated + self.deleted.saturating_sub(self.agent_vms)
    }
}

/// Input of the `apply_config` update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigRequest {
    /// `pool-config` or `workspace`.
    pub kind: String,
    /// Resource name.
    pub name: String,
    /// What to change.
    pub change: ConfigChange,
    /// Who asks, recorded as `updated_by`.
    #[serde(default)]
    pub actor: Option<String>,
    /// Proof of who asks (see [`crate::auth::Credential`]).
    #[serde(default)]
    pub auth: Option<crate::auth::Credential>,
}

/// Input of the `up` update and signal (nothing required).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpRequest {
    /// Who asks.
    pub actor: Option<String>,
}

/// Input of the pool's `release` update: the agent behind `request` ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReleaseRequest {
    /// The claim's request id.
    pub request: String,
    /// Proof that the worker sends it.
    pub auth: Option<crate::auth::Credential>,
}

/// Input of the pool's `vm_power` update: the VM of the agent behind `request` went to sleep
/// without holding host memory, or its agent wants to wake it (see
/// [`crate::machine::dormancy`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPowerRequest {
    /// The claim's request id.
    pub request: String,
    /// The VM.
    pub vm: VmId,
    /// What changed.
    pub change: crate::machine::PowerChange,
    /// Proof that the worker sends it.
    #[serde(default)]
    pub auth: Option<crate::auth::Credential>,
}

/// Most claims one `claims` update carries. A batch of this many stays far under the
/// server's payload limit (a claim is about 400 bytes of JSON).
pub const MAX_CLAIM_BATCH: usize = 256;

/// Input of the pool's `claims` update: the claims of many agents, sent together by one
/// worker and signed once by it (op [`crate::auth::ops::CLAIMS`] over the whole batch). The
/// claims inside carry no credential of their own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimBatch {
    /// The claims, each answered in turn (at most [`MAX_CLAIM_BATCH`]).
    pub claims: Vec<crate::machine::ClaimRequest>,
    /// Proof that the worker sends the batch.
    #[serde(default)]
    pub auth: Option<crate::auth::Credential>,
}

/// The pool's answer to one claim of a [`ClaimBatch`], in the batch's order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimAnswer {
    /// Where the claim stands (what the single `claim` update answers).
    State(crate::machine::ClaimState),
    /// The claim was refused (what the single `claim` update fails with).
    Refused(ApiError),
}

/// Answer of `release`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReleaseReply {
    /// The VM the agent held, if it held one.
    pub vm: Option<VmId>,
    /// True once that VM is gone from the substrate (always true without a VM).
    pub gone: bool,
    /// False when no pool runs: nobody deleted the VM, the agent must (on the VM's host).
    pub pool_running: bool,
}

impl Default for ReleaseReply {
    fn default() -> Self {
        Self {
            vm: None,
            gone: false,
            pool_running: true,
        }
    }
}

/// The developer's signed request behind a nuke started by `murmur pool flush --nuke`, as
/// the nuke workflow received it: the pool verifies it again when the nuke pauses it, so a
/// copy started later is refused for being stale, whatever the pool remembers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SignedNuke {
    /// The nuke workflow's input without its credential, as signed.
    pub body: String,
    /// The credential.
    pub credential: Option<crate::auth::Credential>,
}

/// Input of the pool's `nuke_pause` and `nuke_reset` updates (sent by the nuke workflow).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NukeStep {
    /// Who runs the nuke (the nuke workflow's id).
    pub actor: Option<String>,
    /// For `nuke_reset`: what the nuke did.
    pub report: NukeReport,
    /// For `nuke_pause` of a nuke the pool started: the request id the pool admitted.
    pub authorized_request: String,
    /// For `nuke_pause` of a nuke started by a developer: their signed request (verified
    /// and admitted once by the pool).
    pub developer: Option<SignedNuke>,
    /// Proof that the worker sends it.
    pub auth: Option<crate::auth::Credential>,
}

/// Answer of `nuke_pause` and `nuke_reset`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NukeStepReply {
    /// The pool generation afterwards.
    pub generation: u64,
    /// VMs in the pool's inventory afterwards.
    pub vms: u32,
}

/// Input of the pool workflow's run: the tenant, and the state carried over by
/// continue-as-new. Read leniently: an input that does not decode (a pool started by hand
/// with a wrong payload) starts a pool that recovers, its tenant taken from the workflow id,
/// rather than a workflow task that fails forever.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolInput {
    /// Tenant whose pool this is.
    pub tenant: String,
    /// State of the previous run, when continuing as new.
    #[serde(default)]
    pub carried: Option<Box<crate::machine::Pool>>,
}

impl<'de> Deserialize<'de> for PoolInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default)]
            tenant: String,
            #[serde(default)]
            carried: Option<Box<crate::machine::Pool>>,
        }
        let value = serde_json::Value::deserialize(d)?;
        Ok(match Fields::deserialize(value) {
            Ok(f) => Self {
                tenant: f.tenant,
                carried: f.carried,
            },
            Err(_) => Self::default(),
        })
    }
}

/// Longest error text kept about an undecodable message: a serde error may quote the whole
/// offending value (a 1 MB string), and the text travels back in the update's rejection.
const MAX_DECODE_ERROR: usize = 240;

/// Shortens an error text to [`MAX_DECODE_ERROR`] bytes on a character boundary.
pub fn short_error(text: &str) -> String {
    if text.len() <= MAX_DECODE_ERROR {
        return text.to_string();
    }
    let mut end = MAX_DECODE_ERROR;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// An update's input, read leniently: any JSON decodes, and what does not fit `T` is kept as
/// a short error for the update's validator to refuse. With a plain `T`, the SDK would answer
/// a mistyped payload with serde's error, which can quote the whole payload and push the
/// workflow task over the payload size limit; this never fails and never echoes input.
#[derive(Clone, Debug, PartialEq)]
pub enum Lenient<T> {
    /// The input decoded as `T`.
    Valid(T),
    /// Why it did not (short).
    Invalid(String),
}

impl<T> Lenient<T> {
    /// The input, or an `INVALID_ARGUMENT` saying why it is not one.
    pub fn into_result(self) -> Result<T, ApiError> {
        match self {
            Self::Valid(t) => Ok(t),
            Self::Invalid(e) => Err(not_a_message(&e)),
        }
    }

    /// Like [`Lenient::into_result`], by reference (for validators).
    pub fn as_result(&self) -> Result<&T, ApiError> {
        match self {
            Self::Valid(t) => Ok(t),
            Self::Invalid(e) => Err(not_a_message(e)),
        }
    }

    /// `Ok` when the input decoded: what a validator that checks nothing else returns.
    pub fn check(&self) -> Result<(), ApiError> {
        self.as_result().map(|_| ())
    }
}

impl<T> From<T> for Lenient<T> {
    fn from(t: T) -> Self {
        Self::Valid(t)
    }
}

impl<T: Serialize> Serialize for Lenient<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Valid(t) => t.serialize(serializer),
            Self::Invalid(_) => serializer.serialize_unit(),
        }
    }
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(match T::deserialize(value) {
            Ok(t) => Self::Valid(t),
            Err(e) => Self::Invalid(short_error(&e.to_string())),
        })
    }
}

/// The refusal of a payload that did not decode (`reason` is already short).
fn not_a_message(reason: &str) -> ApiError {
    ApiError::invalid_argument(format!("payload is not a valid message: {reason}"))
}

/// Reads a JSON message from a raw payload list, the lenient way: no payload reads as `{}`
/// (all-default types then accept it), anything undecodable is an `INVALID_ARGUMENT`.
pub fn decode_lenient<T: serde::de::DeserializeOwned>(raw: &RawValue) -> Result<T, ApiError> {
    let data: &[u8] = match raw.payloads.first() {
        Some(p) if !p.data.is_empty() => &p.data,
        _ => b"{}",
    };
    if let Some(p) = raw.payloads.first() {
        let encoding = p
            .metadata
            .get("encoding")
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .unwrap_or_default();
        if !encoding.is_empty() && encoding != "json/plain" && encoding != "binary/null" {
            return Err(ApiError::invalid_argument(format!(
                "payload encoding {encoding:?} is not json/plain"
            )));
        }
    }
    serde_json::from_slice(data).map_err(|e| not_a_message(&short_error(&e.to_string())))
}

/// Encodes a message the way the `temporal` CLI does (`json/plain`), for handlers that take
/// a raw payload.
pub fn encode_json<T: Serialize>(message: &T) -> Result<RawValue, serde_json::Error> {
    let mut payload = temporalio_common::protos::temporal::api::common::v1::Payload::default();
    payload
        .metadata
        .insert("encoding".to_string(), b"json/plain".to_vec());
    payload.data = serde_json::to_vec(message)?;
    Ok(RawValue::new(vec![payload]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use temporalio_common::protos::temporal::api::common::v1::Payload;

    fn json_payload(s: &str) -> RawValue {
        let mut p = Payload::default();
        p.metadata.insert("encoding".into(), b"json/plain".to_vec());
        p.data = s.as_bytes().to_vec();
        RawValue::new(vec![p])
    }

    #[test]
    fn encoded_messages_decode_back() {
        let req = FlushRequest {
            actor: Some("ana".into()),
            ..Default::default()
        };
        let raw = encode_json(&req).unwrap();
        assert_eq!(decode_lenient::<FlushRequest>(&raw).unwrap(), req);
    }

    #[test]
    fn lenient_decoding_accepts_empty_and_rejects_garbage() {
        let empty = RawValue::empty();
        assert_eq!(
            decode_lenient::<FlushRequest>(&empty).unwrap(),
            FlushRequest::default()
        );
        assert!(decode_lenient::<FlushRequest>(&json_payload("\"x\"")).is_err());
        assert!(decode_lenient::<FlushRequest>(&json_payload(r#"{"nuke":"yes"}"#)).is_err());
        let ok =
            decode_lenient::<FlushRequest>(&json_payload(r#"{"nuke":true,"extra":1}"#)).unwrap();
        assert!(ok.nuke);
    }
}
