//! Who may do what, as plain data: the credential a mutating request carries, the bytes a
//! request signature covers, roles and permission matching, and the exact error lines.
//!
//! The cryptography (token signatures, request signatures, keys) lives in the activities
//! crate; workflows only ask a local activity to verify a credential and keep the record of
//! request ids already used (replay protection), which must be deterministic.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, Code};

/// How far a request's signing time may be from the verifier's clock.
pub const REQUEST_WINDOW_MS: u64 = 120_000;

/// Operation names a request signature covers.
pub mod ops {
    /// `murmur pool flush`.
    pub const FLUSH: &str = "pool.flush";
    /// `murmur pool flush --nuke` (and `flush` with `nuke` through the pool).
    pub const NUKE: &str = "pool.nuke";
    /// `murmur set | patch`.
    pub const CONFIG: &str = "config.apply";
    /// `murmur spawn`.
    pub const SPAWN: &str = "agent.spawn";
    /// `murmur kill`.
    pub const KILL: &str = "agent.kill";
    /// `murmur sleep`.
    pub const SLEEP: &str = "agent.sleep";
    /// `murmur wake`.
    pub const WAKE: &str = "agent.wake";
    /// `murmur on-idle`.
    pub const ON_IDLE: &str = "agent.on-idle";
    /// `murmur bake`.
    pub const BAKE: &str = "image.bake";
    /// Worker-internal: an agent claims a VM.
    pub const CLAIM: &str = "pool.claim";
    /// Worker-internal: the claims of many agents, sent together by one worker.
    pub const CLAIMS: &str = "pool.claims";
    /// Worker-internal: an agent releases its VM.
    pub const RELEASE: &str = "pool.release";
    /// Worker-internal: an agent's VM went to sleep without host memory, or is to wake.
    pub const VM_POWER: &str = "pool.vm-power";
    /// Worker-internal: a nuke pauses or resets the pool.
    pub const NUKE_STEP: &str = "pool.nuke-step";
}

/// The proof attached to a mutating request. A developer's request carries their identity
/// token (public: tenant, developer, role, expiry and the developer's public key, signed by
/// the worker's key) and a signature made with the developer's private key over the
/// operation, the target workflow, the request id, the signing time and the request body. A
/// worker-internal request carries the id of the worker key that signed it instead of a
/// token. What lands in workflow history is therefore useless to act with: the private key
/// never travels, the signature covers one request only, and a request id works once.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Credential {
    /// The developer's identity token.
    pub token: Option<String>,
    /// For worker-internal requests: the id of the worker key that signed.
    pub service: Option<String>,
    /// Unique per request (replay protection).
    pub request_id: String,
    /// When it was signed, epoch milliseconds.
    pub ts: u64,
    /// Base64url signature over [`signing_bytes`].
    pub sig: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token or the signature.
        f.debug_struct("Credential")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("service", &self.service)
            .field("request_id", &self.request_id)
            .field("ts", &self.ts)
            .finish_non_exhaustive()
    }
}

/// Who a verified credential belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Tenant of the token.
    pub tenant: String,
    /// Developer (`murmur-worker` for internal requests).
    pub developer: String,
    /// Role.
    pub role: String,
}

/// What a verifier is asked to check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    /// Tenant the target belongs to.
    pub tenant: String,
    /// Operation (see [`ops`]).
    pub op: String,
    /// Target workflow id.
    pub target: String,
    /// The request without its credential, as [`unsigned_body`] renders it.
    pub body: String,
    /// Permission required of a developer; `None` admits worker-internal requests only.
    pub permission: Option<String>,
    /// The credential.
    pub credential: Option<Credential>,
    /// When the Temporal server received the request (ms since the epoch), where the workflow
    /// knows it: a spawn's is its run's start. The signature's age and the token's expiry are
    /// then judged at that moment, not when a busy worker got round to checking it; without
    /// it, at the worker's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_ms: Option<u64>,
}

impl VerifyRequest {
    /// The same request, judged as received by the server at `received_ms`.
    pub fn received_at(self, received_ms: Option<u64>) -> Self {
        Self {
            received_ms,
            ..self
        }
    }

    /// A developer's request: `body` (the message as [`unsigned_body`] renders it) of
    /// operation `op` on workflow `target` of `tenant`, which needs `permission` (see
    /// [`permissions`]), signed with `credential`.
    pub fn developer(
        tenant: impl Into<String>,
        op: &str,
        target: impl Into<String>,
        body: String,
        permission: &str,
        credential: Option<Credential>,
    ) -> Self {
        Self {
            permission: Some(permission.to_string()),
            ..Self::service(tenant, op, target, body, credential)
        }
    }

    /// A worker-internal request (claim, release, nuke step): like [`Self::developer`], but
    /// no permission admits it, so only a worker's own key does.
    pub fn service(
        tenant: impl Into<String>,
        op: &str,
        target: impl Into<String>,
        body: String,
        credential: Option<Credential>,
    ) -> Self {
        Self {
            tenant: tenant.into(),
            op: op.to_string(),
            target: target.into(),
            body,
            permission: None,
            credential,
            received_ms: None,
        }
    }
}

/// The verifier's answer (a denial is an answer, not an activity failure).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The request may go ahead.
    Allowed(Identity),
    /// Refused.
    Denied {
        /// The `CODE: reason` to report.
        error: ApiError,
        /// Who the request claimed to come from (`developer@tenant` read from the token, or
        /// `unknown`), for the record of denials.
        who: String,
    },
}

/// The bytes a request signature covers.
pub fn signing_bytes(op: &str, target: &str, request_id: &str, ts: u64, body: &str) -> Vec<u8> {
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("murmur-request-v1\n{op}\n{target}\n{request_id}\n{ts}\n{hex}").into_bytes()
}

/// A request rendered without its `auth` field: the body a signature covers. The signer and
/// the verifier both render the decoded message, so field order and unknown fields in what
/// was sent do not matter.
pub fn unsigned_body<T: Serialize>(message: &T) -> String {
    let mut value = serde_json::to_value(message).unwrap_or(serde_json::Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.remove("auth");
    }
    value.to_string()
}

/// Who may do what: the permission every operation needs, in one place.
///
/// | operation | permission |
/// |---|---|
/// | `murmur pool flush`, `--nuke` | [`POOL_DELETE`] |
/// | `murmur set` / `patch` of an existing resource | `<kind>.edit` ([`config`]) |
/// | `murmur set` of a new workspace | `<kind>.create` ([`config`]) |
/// | `murmur spawn` | [`AGENT_CREATE`] |
/// | `murmur kill` | [`AGENT_EDIT`] |
/// | `murmur bake` | [`IMAGE_CREATE`] |
/// | claims, releases, nuke steps | none: signed by a worker key, refused from developers |
pub mod permissions {
    /// Flush and nuke.
    pub const POOL_DELETE: &str = "pool-config.delete";
    /// Spawn an agent.
    pub const AGENT_CREATE: &str = "agent.create";
    /// Kill an agent.
    pub const AGENT_EDIT: &str = "agent.edit";
    /// Bake an image.
    pub const IMAGE_CREATE: &str = "image.create";

    /// The permission a config write needs: `<kind>.edit` for a resource that exists,
    /// `<kind>.create` for a new one.
    pub fn config(kind: &str, exists: bool) -> String {
        format!("{kind}.{}", if exists { "edit" } else { "create" })
    }
}

/// Built-in role names.
pub mod roles {
    /// Everything.
    pub const ADMIN: &str = "murmur-tenant-admin";
    /// Agents, and reading pool-config, workspaces and images.
    pub const MEMBER: &str = "member";
    /// Reading and listing only.
    pub const VIEWER: &str = "viewer";
    /// Every built-in role.
    pub const ALL: [&str; 3] = [ADMIN, MEMBER, VIEWER];
}

/// The permissions of a built-in role (`{kind}.{verb}` patterns); unknown roles have none.
pub fn role_permissions(role: &str) -> &'static [&'static str] {
    match role {
        roles::ADMIN => &["*"],
        roles::MEMBER => &[
            "agent.*",
            "pool-config.read",
            "pool-config.list",
            "workspace.read",
            "workspace.list",
            "image.read",
            "image.list",
        ],
        roles::VIEWER => &["*.read", "*.list"],
        _ => &[],
    }
}

/// True when `pattern` (`*`, `kind.*`, `*.verb`, `kind.verb`) covers `permission`.
pub fn pattern_matches(pattern: &str, permission: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (Some((pk, pv)), Some((k, v))) = (pattern.split_once('.'), permission.split_once('.'))
    else {
        return false;
    };
    (pk == "*" || pk == k) && (pv == "*" || pv == v)
}

/// True when `role` grants `permission`.
pub fn permits(role: &str, permission: &str) -> bool {
    role_permissions(role)
        .iter()
        .any(|p| pattern_matches(p, permission))
}

/// `UNAUTHENTICATED: identity token is missing or expired`.
pub fn missing_or_expired() -> ApiError {
    ApiError::new(
        Code::Unauthenticated,
        "identity token is missing or expired",
    )
}

/// `UNAUTHENTICATED: <reason>`.
pub fn unauthenticated(reason: impl Into<String>) -> ApiError {
    ApiError::new(Code::Unauthenticated, reason)
}

/// `PERMISSION_DENIED: your role does not have <permission> permission`.
pub fn permission_denied(permission: &str) -> ApiError {
    ApiError::new(
        Code::PermissionDenied,
        format!("your role does not have {permission} permission"),
    )
}

/// One refused request, for operators (shown in status, logged by the worker).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// Workflow time of the refusal.
    pub at: u64,
    /// The operation.
    pub op: String,
    /// Who it claimed to be (developer from the token, when it could be read).
    pub who: String,
    /// The `CODE: reason`.
    pub why: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_kind_and_verb() {
        assert!(pattern_matches("*", "pool-config.delete"));
        assert!(pattern_matches("agent.*", "agent.create"));
        assert!(!pattern_matches("agent.*", "pool-config.read"));
        assert!(pattern_matches("*.read", "workspace.read"));
        assert!(!pattern_matches("*.read", "workspace.edit"));
        assert!(!pattern_matches("workspace", "workspace.read"));
    }

    #[test]
    fn built_in_roles_grant_what_the_spec_says() {
        assert!(permits(roles::ADMIN, "pool-config.delete"));
        assert!(!permits(roles::MEMBER, "pool-config.delete"));
        assert!(permits(roles::MEMBER, "agent.create"));
        assert!(permits(roles::MEMBER, "agent.edit"));
        assert!(!permits(roles::MEMBER, "workspace.edit"));
        assert!(permits(roles::VIEWER, "workspace.read"));
        assert!(!permits(roles::VIEWER, "agent.create"));
        assert!(!permits("root", "workspace.read"));
        assert_eq!(
            permission_denied("pool-config.delete").to_string(),
            "PERMISSION_DENIED: your role does not have pool-config.delete permission"
        );
    }

    #[test]
    fn the_signature_covers_the_body_but_not_the_credential() {
        #[derive(Serialize)]
        struct Msg {
            nuke: bool,
            auth: Option<Credential>,
        }
        let a = unsigned_body(&Msg {
            nuke: true,
            auth: None,
        });
        let b = unsigned_body(&Msg {
            nuke: true,
            auth: Some(Credential::default()),
        });
        assert_eq!(a, b);
        assert_ne!(
            signing_bytes("pool.flush", "pool/a", "r", 1, &a),
            signing_bytes("pool.flush", "pool/b", "r", 1, &a)
        );
        let shown = format!(
            "{:?}",
            Credential {
                token: Some("secret-token".into()),
                sig: "secret-sig".into(),
                ..Default::default()
            }
        );
        assert!(!shown.contains("secret"));
    }
}
