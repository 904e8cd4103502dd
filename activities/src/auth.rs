//! Keys, identity tokens and request signatures (Ed25519 through `ring`, tokens as EdDSA JWTs
//! through `jsonwebtoken`), and the `murmur.verify` local activity that checks a request's
//! credential for a workflow.
//!
//! - The **worker key** (`<state>/keys/<kid>.pk8`, mode 0600; `current` names the one that
//!   signs) signs identity tokens and worker-internal requests. Rotating adds a key and makes
//!   it current; older keys keep verifying the tokens they signed until those expire, and are
//!   removed with `retire`.
//! - An **identity token** is a JWT (header `kid`) with the tenant, developer, role, expiry and
//!   the developer's Ed25519 public key (`cnf.pk`). It is not a secret on its own.
//! - A **credential** handed to a developer is `<token>~<private key>`; `murmur auth login`
//!   stores both in `murmur.local.yaml` (0600). Each request is signed with the private key.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use murmur_workflows::auth::{
    Credential, Identity, REQUEST_WINDOW_MS, Verdict, VerifyRequest, missing_or_expired,
    permission_denied, permits, signing_bytes, unauthenticated,
};
use murmur_workflows::error::{ApiError, Code};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Developer name of worker-internal requests.
pub const WORKER_IDENTITY: &str = "murmur-worker";
/// Issuer of identity tokens.
const ISSUER: &str = "murmur";
/// Separates the token from the private key in a credential string.
const CREDENTIAL_SEPARATOR: char = '~';

/// What went wrong handling keys or credentials locally.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A key or credential that cannot be used (the value itself is never shown).
    #[error("{0}")]
    Invalid(String),
}

impl KeyError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The claims of an identity token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Issuer (`murmur`).
    pub iss: String,
    /// The developer.
    pub sub: String,
    /// The tenant.
    pub tenant: String,
    /// The role.
    pub role: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// Confirmation: the developer's public key (base64url Ed25519).
    pub cnf: Confirmation,
}

/// The key a token is bound to (proof of possession).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// Base64url Ed25519 public key.
    pub pk: String,
}

/// The worker's signing keys, on disk.
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// The store under `<state_dir>/keys`, with a first key created if there is none.
    pub fn open(state_dir: &Path) -> Result<Self, KeyError> {
        let store = Self {
            dir: state_dir.join("keys"),
        };
        if store.current_kid().is_err() {
            store.rotate()?;
        }
        Ok(store)
    }

    /// Creates a new key and makes it the one that signs. Returns its id.
    pub fn rotate(&self) -> Result<String, KeyError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| KeyError::io("create the key directory", e))?;
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| KeyError::Invalid("cannot generate a key".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| KeyError::Invalid("generated key unusable".into()))?;
        let kid = key_id(pair.public_key().as_ref());
        let path = self.dir.join(format!("{kid}.pk8"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| KeyError::io("write the key", e))?;
        std::io::Write::write_all(&mut file, pkcs8.as_ref())
            .map_err(|e| KeyError::io("write the key", e))?;
        let tmp = self.dir.join(".current.tmp");
        std::fs::write(&tmp, &kid).map_err(|e| KeyError::io("write current", e))?;
        std::fs::rename(&tmp, self.dir.join("current"))
            .map_err(|e| KeyError::io("write current", e))?;
        Ok(kid)
    }

    /// Removes a key that no longer signs; tokens it signed stop working.
    pub fn retire(&self, kid: &str) -> Result<(), KeyError> {
        if self.current_kid()? == kid {
            return Err(KeyError::Invalid(
                "the current key cannot be retired; rotate first".into(),
            ));
        }
        if !valid_kid(kid) {
            return Err(KeyError::Invalid(format!("no key {kid}")));
        }
        std::fs::remove_file(self.dir.join(format!("{kid}.pk8")))
            .map_err(|e| KeyError::io(format!("remove key {kid}"), e))
    }

    /// Ids of every key, the current one first.
    pub fn key_ids(&self) -> Result<Vec<String>, KeyError> {
        let current = self.current_kid()?;
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| KeyError::io("list keys", e))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".pk8"))
                    .map(str::to_string)
            })
            .filter(|k| k != &current)
            .collect();
        ids.sort();
        ids.insert(0, current);
        Ok(ids)
    }

    fn current_kid(&self) -> Result<String, KeyError> {
        let kid = std::fs::read_to_string(self.dir.join("current"))
            .map_err(|e| KeyError::io("read the current key id", e))?;
        Ok(kid.trim().to_string())
    }

    fn pair(&self, kid: &str) -> Result<Ed25519KeyPair, KeyError> {
        if !valid_kid(kid) {
            return Err(KeyError::Invalid("unknown key".into()));
        }
        let bytes = std::fs::read(self.dir.join(format!("{kid}.pk8")))
            .map_err(|e| KeyError::io("read a key", e))?;
        Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| KeyError::Invalid("corrupt key".into()))
    }

    fn pkcs8(&self, kid: &str) -> Result<Vec<u8>, KeyError> {
        std::fs::read(self.dir.join(format!("{kid}.pk8")))
            .map_err(|e| KeyError::io("read a key", e))
    }

    /// Issues a credential: a token for (tenant, developer, role) valid for `ttl`, bound to a
    /// fresh developer key pair, as `<token>~<private key>`.
    pub fn issue(
        &self,
        tenant: &str,
        developer: &str,
        role: &str,
        ttl: Duration,
    ) -> Result<String, KeyError> {
        let (dev_pkcs8, dev_public) = generate_developer_key()?;
        let token = self.issue_token(tenant, developer, role, ttl, &dev_public)?;
        Ok(format!(
            "{token}{CREDENTIAL_SEPARATOR}{}",
            B64.encode(dev_pkcs8)
        ))
    }

    /// Issues a token bound to an existing developer public key.
    pub fn issue_token(
        &self,
        tenant: &str,
        developer: &str,
        role: &str,
        ttl: Duration,
        developer_public_key: &[u8],
    ) -> Result<String, KeyError> {
        let kid = self.current_kid()?;
        let now = now_ms() / 1000;
        let claims = TokenClaims {
            iss: ISSUER.into(),
            sub: developer.into(),
            tenant: tenant.into(),
            role: role.into(),
            iat: now,
            exp: now + ttl.as_secs(),
            cnf: Confirmation {
                pk: B64.encode(developer_public_key),
            },
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ed_der(&self.pkcs8(&kid)?),
        )
        .map_err(|e| KeyError::Invalid(format!("cannot sign the token: {e}")))
    }

    /// Signs a worker-internal request with the current key.
    pub fn sign_service(&self, op: &str, target: &str, body: &str) -> Result<Credential, KeyError> {
        let kid = self.current_kid()?;
        let pair = self.pair(&kid)?;
        let (request_id, ts) = (new_request_id()?, now_ms());
        let sig = pair.sign(&signing_bytes(op, target, &request_id, ts, body));
        Ok(Credential {
            token: None,
            service: Some(kid),
            request_id,
            ts,
            sig: B64.encode(sig.as_ref()),
        })
    }

    /// Checks a request's credential at time `now_ms` (or when the server received it, if the
    /// request says): token signature, expiry and tenant, request signature with the token's
    /// key (or a worker key), freshness, and permission. Replays are the caller's to check
    /// (request ids live in workflow state).
    pub fn verify(&self, req: &VerifyRequest, now_ms: u64) -> Verdict {
        // Who a denial names comes only from a token whose signature verified: a forged
        // token must not put someone else's name in the record of denials.
        let mut who = None;
        match self.check(req, req.received_ms.unwrap_or(now_ms), &mut who) {
            Ok(identity) => Verdict::Allowed(identity),
            Err(error) => Verdict::Denied {
                error,
                who: who.unwrap_or_else(|| "unknown".to_string()),
            },
        }
    }

    fn check(
        &self,
        req: &VerifyRequest,
        now: u64,
        who: &mut Option<String>,
    ) -> Result<Identity, ApiError> {
        let cred = req.credential.as_ref().ok_or_else(missing_or_expired)?;
        let signed = signing_bytes(&req.op, &req.target, &cred.request_id, cred.ts, &req.body);
        let sig = B64
            .decode(cred.sig.as_bytes())
            .map_err(|_| unauthenticated("request signature is malformed"))?;
        let (identity, public_key) = match (&cred.token, &cred.service) {
            (Some(token), _) => {
                let claims = self.decode_token(token, now)?;
                *who = Some(format!("{}@{}", claims.sub, claims.tenant));
                let pk = B64
                    .decode(claims.cnf.pk.as_bytes())
                    .map_err(|_| unauthenticated("identity token is malformed"))?;
                let identity = Identity {
                    tenant: claims.tenant,
                    developer: claims.sub,
                    role: claims.role,
                };
                (identity, pk)
            }
            (None, Some(kid)) if req.permission.is_none() => {
                let pair = self
                    .pair(kid)
                    .map_err(|_| unauthenticated("request signed by an unknown worker key"))?;
                let identity = Identity {
                    tenant: req.tenant.clone(),
                    developer: WORKER_IDENTITY.into(),
                    role: WORKER_IDENTITY.into(),
                };
                (identity, pair.public_key().as_ref().to_vec())
            }
            _ => return Err(missing_or_expired()),
        };
        UnparsedPublicKey::new(&ED25519, &public_key)
            .verify(&signed, &sig)
            .map_err(|_| {
                unauthenticated("request signature does not match the request (altered, or signed with another key)")
            })?;
        if cred.ts.abs_diff(now) > REQUEST_WINDOW_MS {
            let clock = if req.received_ms.is_some() {
                "the time the server received it"
            } else {
                "the worker's clock"
            };
            return Err(unauthenticated(format!(
                "request was signed {}s away from {clock} (allowed: {}s); sign it again",
                cred.ts.abs_diff(now) / 1000,
                REQUEST_WINDOW_MS / 1000
            )));
        }
        if identity.tenant != req.tenant {
            return Err(ApiError::new(
                Code::PermissionDenied,
                format!(
                    "identity token is for tenant {}, not {}",
                    identity.tenant, req.tenant
                ),
            ));
        }
        match &req.permission {
            Some(p) if !permits(&identity.role, p) => Err(permission_denied(p)),
            Some(_) => Ok(identity),
            None if identity.developer == WORKER_IDENTITY && cred.token.is_none() => Ok(identity),
            None => Err(ApiError::new(
                Code::PermissionDenied,
                format!("{} is reserved to the murmur worker", req.op),
            )),
        }
    }

    /// Checks a token's signature (by one of this store's keys) and expiry at `now_ms`.
    pub fn check_token(&self, token: &str, now_ms: u64) -> Result<TokenClaims, ApiError> {
        self.decode_token(token.trim(), now_ms)
    }

    fn decode_token(&self, token: &str, now: u64) -> Result<TokenClaims, ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| unauthenticated("identity token is malformed"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(unauthenticated("identity token is malformed"));
        }
        let kid = header
            .kid
            .ok_or_else(|| unauthenticated("identity token is malformed"))?;
        let pair = self.pair(&kid).map_err(|_| {
            unauthenticated("identity token was signed by an unknown or retired key")
        })?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        // Expiry is checked below against the verifier's clock, without leeway.
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<TokenClaims>(
            token,
            &DecodingKey::from_ed_der(pair.public_key().as_ref()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                unauthenticated("identity token signature is invalid")
            }
            _ => unauthenticated("identity token is malformed"),
        })?;
        if data.claims.exp * 1000 <= now {
            return Err(missing_or_expired());
        }
        Ok(data.claims)
    }
}

/// The `murmur.verify` local activity: checks a request's credential against the worker's
/// keys and clock. Run as a local activity, so its verdict is recorded in the workflow's
/// history (replay never re-checks against keys that may have rotated since).
pub struct AuthActivities {
    store: KeyStore,
}

impl AuthActivities {
    /// Verification against `store`.
    pub fn new(store: KeyStore) -> Self {
        Self { store }
    }
}

#[allow(missing_docs)]
mod activity_impl {
    use std::sync::Arc;

    use murmur_workflows::auth::{Verdict, VerifyRequest};
    use temporalio_common::ActivityError;
    use temporalio_macros::activities;
    use temporalio_sdk::activities::ActivityContext;

    use super::{AuthActivities, now_ms};

    #[activities]
    impl AuthActivities {
        /// Verifies a request's credential; a denial is logged (never the credential itself).
        /// Does not heartbeat: it is a local activity (they cannot) and never waits on
        /// anything but the key store.
        #[activity(name = "murmur.verify")]
        pub async fn verify(
            self: Arc<Self>,
            _ctx: ActivityContext,
            req: VerifyRequest,
        ) -> Result<Verdict, ActivityError> {
            let verdict = self.store.verify(&req, now_ms());
            if let Verdict::Denied { error, who } = &verdict {
                tracing::warn!(tenant = %req.tenant, op = %req.op, target = %req.target,
                    who = %who, error = %error, "request denied");
            }
            Ok(verdict)
        }
    }
}

/// A developer's credential as stored by `murmur auth login`.
pub struct DeveloperKey {
    /// The identity token.
    pub token: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for DeveloperKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeveloperKey(<redacted>)")
    }
}

impl DeveloperKey {
    /// Reads a token and its base64url private key.
    pub fn new(token: &str, private_key: &str) -> Result<Self, KeyError> {
        let bytes = B64
            .decode(private_key.trim().as_bytes())
            .map_err(|_| KeyError::Invalid("the private key is not valid base64url".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|_| KeyError::Invalid("the private key is not an Ed25519 key".into()))?;
        Ok(Self {
            token: token.trim().to_string(),
            pair,
        })
    }

    /// Reads a `<token>~<private key>` credential.
    pub fn from_credential(credential: &str) -> Result<Self, KeyError> {
        let (token, key) = split_credential(credential)?;
        Self::new(token, key)
    }

    /// Signs a request.
    pub fn sign(&self, op: &str, target: &str, body: &str) -> Result<Credential, KeyError> {
        self.sign_at(op, target, body, now_ms())
    }

    /// Signs a request as if at `ts` (epoch ms): what a request signed earlier and copied out
    /// of history looks like.
    pub fn sign_at(
        &self,
        op: &str,
        target: &str,
        body: &str,
        ts: u64,
    ) -> Result<Credential, KeyError> {
        let request_id = new_request_id()?;
        Ok(self.sign_exactly(op, target, body, &request_id, ts))
    }

    /// Signs a request with a given request id and time: deterministic (Ed25519 signatures
    /// are), which is what the shared signing test vectors check in every implementation.
    pub fn sign_exactly(
        &self,
        op: &str,
        target: &str,
        body: &str,
        request_id: &str,
        ts: u64,
    ) -> Credential {
        let sig = self
            .pair
            .sign(&signing_bytes(op, target, request_id, ts, body));
        Credential {
            token: Some(self.token.clone()),
            service: None,
            request_id: request_id.to_string(),
            ts,
            sig: B64.encode(sig.as_ref()),
        }
    }
}

/// Splits a `<token>~<private key>` credential into its two parts.
pub fn split_credential(credential: &str) -> Result<(&str, &str), KeyError> {
    credential
        .trim()
        .split_once(CREDENTIAL_SEPARATOR)
        .ok_or_else(|| {
            KeyError::Invalid(
                "a credential is <token>~<private key>, as murmur-worker token issue prints it"
                    .into(),
            )
        })
}

/// Reads a token's claims without verifying it (for `murmur auth status`).
pub fn peek_claims(token: &str) -> Result<TokenClaims, KeyError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| KeyError::Invalid("not a token".into()))?;
    let bytes = B64
        .decode(payload.as_bytes())
        .map_err(|_| KeyError::Invalid("not a token".into()))?;
    serde_json::from_slice(&bytes).map_err(|_| KeyError::Invalid("not a murmur token".into()))
}

/// A fresh developer key pair: (PKCS#8 private key, public key).
pub fn generate_developer_key() -> Result<(Vec<u8>, Vec<u8>), KeyError> {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| KeyError::Invalid("cannot generate a key".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| KeyError::Invalid("generated key unusable".into()))?;
    Ok((pkcs8.as_ref().to_vec(), pair.public_key().as_ref().to_vec()))
}

fn new_request_id() -> Result<String, KeyError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| KeyError::Invalid("no randomness".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn key_id(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn valid_kid(kid: &str) -> bool {
    kid.len() == 16 && kid.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Milliseconds since the epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use murmur_workflows::auth::{ops, roles};

    fn store() -> (tempfile::TempDir, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path()).unwrap();
        (dir, store)
    }

    /// A developer of `store` with a fresh credential.
    fn developer(
        store: &KeyStore,
        tenant: &str,
        dev: &str,
        role: &str,
        ttl: Duration,
    ) -> DeveloperKey {
        DeveloperKey::from_credential(&store.issue(tenant, dev, role, ttl).unwrap()).unwrap()
    }

    fn request(cred: Credential, permission: &str) -> VerifyRequest {
        VerifyRequest::developer(
            "acme",
            ops::FLUSH,
            "pool/acme",
            "{}".into(),
            permission,
            Some(cred),
        )
    }

    fn denied(v: Verdict) -> String {
        match v {
            Verdict::Denied { error, .. } => error.to_string(),
            Verdict::Allowed(i) => panic!("allowed {i:?}"),
        }
    }

    #[test]
    fn a_signed_request_passes_and_every_tampering_fails() {
        let (_d, store) = store();
        let cred = store
            .issue("acme", "ana", roles::ADMIN, Duration::from_secs(3600))
            .unwrap();
        let dev = DeveloperKey::from_credential(&cred).unwrap();
        let signed = dev.sign(ops::FLUSH, "pool/acme", "{}").unwrap();
        let now = now_ms();
        let ok = store.verify(&request(signed.clone(), "pool-config.delete"), now);
        assert!(
            matches!(ok, Verdict::Allowed(ref i) if i.developer == "ana"),
            "{ok:?}"
        );

        // Another target, body or time than what was signed.
        let mut other = request(signed.clone(), "pool-config.delete");
        other.target = "pool/other".into();
        assert!(
            denied(store.verify(&other, now)).starts_with("UNAUTHENTICATED: request signature")
        );
        let mut other = request(signed.clone(), "pool-config.delete");
        other.body = "{\"nuke\":true}".into();
        assert!(
            denied(store.verify(&other, now)).starts_with("UNAUTHENTICATED: request signature")
        );
        assert!(
            denied(store.verify(
                &request(signed.clone(), "pool-config.delete"),
                now + 600_000
            ))
            .starts_with("UNAUTHENTICATED: request was signed")
        );
        // A token with one byte of its signature changed.
        let mut forged = signed.clone();
        let token = forged.token.take().unwrap();
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        forged.token = Some(String::from_utf8(bytes).unwrap());
        assert_eq!(
            denied(store.verify(&request(forged.clone(), "pool-config.delete"), now)),
            "UNAUTHENTICATED: identity token signature is invalid"
        );
        // A forged token does not get to name who was refused.
        match store.verify(&request(forged, "pool-config.delete"), now) {
            Verdict::Denied { who, .. } => assert_eq!(who, "unknown"),
            Verdict::Allowed(i) => panic!("allowed {i:?}"),
        }
        // No credential at all.
        let mut none = request(signed, "pool-config.delete");
        none.credential = None;
        assert_eq!(
            denied(store.verify(&none, now)),
            "UNAUTHENTICATED: identity token is missing or expired"
        );
    }

    #[test]
    fn freshness_is_judged_when_the_server_received_the_request() {
        let (_d, store) = store();
        let dev = developer(
            &store,
            "acme",
            "ana",
            roles::ADMIN,
            Duration::from_secs(3600),
        );
        let signed = dev.sign(ops::FLUSH, "pool/acme", "{}").unwrap();
        let received = now_ms();
        // Checked ten minutes late by a busy worker: fresh when the server received it.
        let late = now_ms() + 600_000;
        let req = request(signed.clone(), "pool-config.delete").received_at(Some(received));
        assert!(
            matches!(store.verify(&req, late), Verdict::Allowed(_)),
            "a request received fresh was refused for the worker's delay"
        );
        // Received by the server ten minutes after it was signed: stale, whenever checked.
        let req = request(signed, "pool-config.delete").received_at(Some(received + 600_000));
        assert_eq!(
            denied(store.verify(&req, received)),
            "UNAUTHENTICATED: request was signed 600s away from the time the server received it \
             (allowed: 120s); sign it again"
        );
    }

    #[test]
    fn expiry_tenant_and_role_are_enforced() {
        let (_d, store) = store();
        let viewer = developer(
            &store,
            "acme",
            "vi",
            roles::VIEWER,
            Duration::from_secs(3600),
        );
        let cred = viewer.sign(ops::FLUSH, "pool/acme", "{}").unwrap();
        assert_eq!(
            denied(store.verify(&request(cred, "pool-config.delete"), now_ms())),
            "PERMISSION_DENIED: your role does not have pool-config.delete permission"
        );
        let other = developer(
            &store,
            "bravo",
            "bo",
            roles::ADMIN,
            Duration::from_secs(3600),
        );
        let cred = other.sign(ops::FLUSH, "pool/acme", "{}").unwrap();
        assert_eq!(
            denied(store.verify(&request(cred, "pool-config.delete"), now_ms())),
            "PERMISSION_DENIED: identity token is for tenant bravo, not acme"
        );
        let expired = developer(&store, "acme", "ex", roles::ADMIN, Duration::from_secs(0));
        let cred = expired.sign(ops::FLUSH, "pool/acme", "{}").unwrap();
        assert_eq!(
            denied(store.verify(&request(cred, "pool-config.delete"), now_ms())),
            "UNAUTHENTICATED: identity token is missing or expired"
        );
    }

    #[test]
    fn rotation_keeps_old_tokens_until_their_key_is_retired() {
        let (_d, store) = store();
        let old = developer(
            &store,
            "acme",
            "ana",
            roles::ADMIN,
            Duration::from_secs(3600),
        );
        let old_kid = store.key_ids().unwrap()[0].clone();
        let new_kid = store.rotate().unwrap();
        assert_eq!(store.key_ids().unwrap(), vec![new_kid, old_kid.clone()]);
        let cred = old.sign(ops::FLUSH, "pool/acme", "{}").unwrap();
        assert!(matches!(
            store.verify(&request(cred.clone(), "pool-config.delete"), now_ms()),
            Verdict::Allowed(_)
        ));
        store.retire(&old_kid).unwrap();
        assert!(
            denied(store.verify(&request(cred, "pool-config.delete"), now_ms()))
                .contains("unknown or retired key")
        );
    }

    #[test]
    fn worker_requests_are_signed_by_a_worker_key_only() {
        let (_d, store) = store();
        let cred = store.sign_service(ops::CLAIM, "pool/acme", "{}").unwrap();
        let mut req = request(cred, "x");
        req.op = ops::CLAIM.into();
        req.permission = None;
        assert!(matches!(store.verify(&req, now_ms()), Verdict::Allowed(_)));
        // A developer, even an admin, cannot send a worker-internal request.
        let admin = developer(
            &store,
            "acme",
            "ana",
            roles::ADMIN,
            Duration::from_secs(3600),
        );
        req.credential = Some(admin.sign(ops::CLAIM, "pool/acme", "{}").unwrap());
        assert!(denied(store.verify(&req, now_ms())).starts_with("PERMISSION_DENIED"));
    }

    #[test]
    fn keys_are_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let (d, store) = store();
        let kid = store.key_ids().unwrap()[0].clone();
        let mode = std::fs::metadata(d.path().join("keys").join(format!("{kid}.pk8")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
