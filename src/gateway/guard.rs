//! Who may call the gateway: every call's proof is verified like any signed request (token,
//! signature over operation, target and body, signing window, tenant, permission), and each
//! request id works once.
//!
//! The replay records are the pool's own [`ReplayGuard`] (decided by signed times only),
//! kept in `<state>/gateway/replays.json` and rewritten (write, then rename) before a call is
//! admitted, so a restarted worker still refuses a request it served before.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use murmur_activities::auth::{KeyStore, now_ms};
use murmur_workflows::auth::{Credential, Identity, Verdict, VerifyRequest};
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::{Admission, ReplayGuard};

use super::proto::Proof;
use super::request::Target;

/// The gateway's verifier.
pub struct Guard {
    keys: KeyStore,
    replays: Mutex<ReplayGuard>,
    file: PathBuf,
}

/// What a call asks for, to be checked.
pub struct Ask<'a> {
    /// The operation signed.
    pub op: &'a str,
    /// The permission it needs.
    pub permission: &'a str,
    /// The target as sent.
    pub target: &'a str,
    /// The canonical body.
    pub body: String,
    /// The proof sent.
    pub proof: Option<&'a Proof>,
}

impl Guard {
    /// A guard over `keys`, its replay records under `state_dir/gateway/` (unreadable
    /// records are set aside and start empty: the signing window still bounds replays).
    pub fn open(keys: KeyStore, state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("gateway");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("replays.json");
        let replays = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "gateway replay records unreadable; starting empty");
                ReplayGuard::default()
            }),
            Err(_) => ReplayGuard::default(),
        };
        Ok(Self {
            keys,
            replays: Mutex::new(replays),
            file,
        })
    }

    /// Verifies a call; answers with the target and who called.
    pub fn check(&self, ask: Ask<'_>) -> Result<(Target, Identity), ApiError> {
        let target = Target::parse(ask.target)?;
        let credential = ask.proof.map(|p| Credential {
            token: Some(p.token.clone()).filter(|t| !t.is_empty()),
            service: None,
            request_id: p.request_id.clone(),
            ts: p.ts,
            sig: p.sig.clone(),
        });
        let request_id = credential
            .as_ref()
            .map(|c| (c.request_id.clone(), c.ts))
            .unwrap_or_default();
        let req = VerifyRequest::developer(
            target.tenant.clone(),
            ask.op,
            ask.target,
            ask.body,
            ask.permission,
            credential,
        );
        let identity = match self.keys.verify(&req, now_ms()) {
            Verdict::Allowed(identity) => identity,
            Verdict::Denied { error, who } => {
                tracing::warn!(op = ask.op, target = ask.target, who, %error, "gateway call refused");
                return Err(error);
            }
        };
        if request_id.0.is_empty() || request_id.0.len() > 128 {
            return Err(murmur_workflows::auth::unauthenticated(
                "request id is missing or too long",
            ));
        }
        let mut replays = self.replays.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = replays.clone();
        next.admit(&Admission {
            op: ask.op,
            developer: &identity.developer,
            request_id: &request_id.0,
            signed_at: request_id.1,
            consumer: None,
        })?;
        self.persist(&next)?;
        *replays = next;
        Ok((target, identity))
    }

    fn persist(&self, replays: &ReplayGuard) -> Result<(), ApiError> {
        let internal = |e: std::io::Error| {
            ApiError::new(
                Code::Internal,
                format!("cannot record the request against replays: {e}"),
            )
        };
        let bytes = serde_json::to_vec(replays).map_err(|e| internal(e.into()))?;
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(internal)?;
        std::fs::rename(&tmp, &self.file).map_err(internal)
    }
}
