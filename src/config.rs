//! Finding who and where the CLI runs for: `.murmur/murmur.yaml` (shared: tenant, workspace)
//! and `.murmur/murmur.local.yaml` (per developer), found by walking up from the current
//! directory, with environment overrides.

use std::path::{Path, PathBuf};

use murmur_activities::auth::{DeveloperKey, peek_claims, split_credential};
use murmur_workflows::error::ApiError;
use murmur_workflows::model::{is_dns_label, validate_workspace_name};
use serde::{Deserialize, Serialize};

/// Directory that holds the config files.
pub const CONFIG_DIR: &str = ".murmur";
/// Shared config file name.
pub const SHARED_FILE: &str = "murmur.yaml";
/// Per-developer config file name.
pub const LOCAL_FILE: &str = "murmur.local.yaml";

/// `.murmur/murmur.yaml`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    /// The tenant.
    pub tenant: Option<String>,
    /// The default workspace.
    pub workspace: Option<String>,
}

/// `.murmur/murmur.local.yaml` (mode 0600: it holds the developer's private key).
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The developer's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub developer: Option<String>,
    /// The developer's identity token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_token: Option<String>,
    /// The developer's private key (base64url PKCS#8 Ed25519), which signs each request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_key: Option<String>,
    /// Workspace override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<String>,
}

impl std::fmt::Debug for LocalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalConfig")
            .field("developer", &self.developer)
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "identity_key",
                &self.identity_key.as_ref().map(|_| "<redacted>"),
            )
            .field("workspace", &self.workspace)
            .finish()
    }
}

/// A developer's stored credential: the identity token and the private key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredIdentity {
    /// The identity token.
    pub token: String,
    /// The private key (base64url).
    pub key: String,
}

impl std::fmt::Debug for StoredIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredIdentity(<redacted>)")
    }
}

/// Where the CLI acts: resolved tenant, workspace and developer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    /// Tenant whose pool is addressed.
    pub tenant: String,
    /// Workspace context.
    pub workspace: String,
    /// Who is acting (recorded as `updated_by`).
    pub developer: String,
    /// The directory holding `.murmur/`, when one was found.
    pub project_dir: Option<PathBuf>,
    /// The developer's credential (`MURMUR_TOKEN`, else murmur.local.yaml).
    pub identity: Option<StoredIdentity>,
}

impl Context {
    /// Signs a request for `target` with the developer's key. Without a credential:
    /// `UNAUTHENTICATED: identity token is missing or expired`.
    pub fn sign<T: Serialize>(
        &self,
        op: &str,
        target: &str,
        message: &T,
    ) -> Result<murmur_workflows::auth::Credential, ApiError> {
        let identity = self
            .identity
            .as_ref()
            .ok_or_else(murmur_workflows::auth::missing_or_expired)?;
        let key = DeveloperKey::new(&identity.token, &identity.key).map_err(|_| {
            murmur_workflows::auth::unauthenticated(
                "the identity key in murmur.local.yaml (or MURMUR_TOKEN) is not usable; run murmur auth login again",
            )
        })?;
        key.sign(op, target, &murmur_workflows::auth::unsigned_body(message))
            .map_err(|e| ApiError::new(murmur_workflows::error::Code::Internal, e.to_string()))
    }

    /// The path of `.murmur/murmur.local.yaml`, when a project was found.
    pub fn local_file(&self) -> Option<PathBuf> {
        self.project_dir
            .as_ref()
            .map(|d| d.join(CONFIG_DIR).join(LOCAL_FILE))
    }
}

/// Environment the resolution reads, injectable for tests.
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// `MURMUR_TENANT`.
    pub tenant: Option<String>,
    /// `MURMUR_WORKSPACE`.
    pub workspace: Option<String>,
    /// `MURMUR_DEVELOPER`, else `USER`.
    pub developer: Option<String>,
    /// `MURMUR_TOKEN`: a credential (`<token>~<private key>`).
    pub token: Option<String>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            tenant: var("MURMUR_TENANT"),
            workspace: var("MURMUR_WORKSPACE"),
            developer: var("MURMUR_DEVELOPER").or_else(|| var("USER")),
            token: var("MURMUR_TOKEN"),
        }
    }
}

/// Walks up from `start` to the first directory containing `.murmur/murmur.yaml`.
pub fn find_project(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join(CONFIG_DIR).join(SHARED_FILE).is_file())
        .map(Path::to_path_buf)
}

fn read_yaml<T: serde::de::DeserializeOwned + Default>(path: &Path) -> Result<T, ApiError> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(T::default()),
        Ok(text) => serde_norway::from_str(&text)
            .map_err(|e| ApiError::invalid_argument(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(ApiError::failed_precondition(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Resolves the context. Workspace order: `--workspace` flag > `MURMUR_WORKSPACE` >
/// murmur.local.yaml > murmur.yaml; tenant: `MURMUR_TENANT` > murmur.yaml.
pub fn resolve(cwd: &Path, env: &Env, flag_workspace: Option<&str>) -> Result<Context, ApiError> {
    let project_dir = find_project(cwd);
    let (shared, local) = match &project_dir {
        Some(dir) => (
            read_yaml::<SharedConfig>(&dir.join(CONFIG_DIR).join(SHARED_FILE))?,
            read_yaml::<LocalConfig>(&dir.join(CONFIG_DIR).join(LOCAL_FILE))?,
        ),
        None => (SharedConfig::default(), LocalConfig::default()),
    };
    let tenant = env.tenant.clone().or(shared.tenant).ok_or_else(|| {
        ApiError::failed_precondition(format!(
            "no tenant configured: create {CONFIG_DIR}/{SHARED_FILE} with `tenant:` and `workspace:` (searched from {} upwards), or set MURMUR_TENANT",
            cwd.display()
        ))
    })?;
    if !is_dns_label(&tenant) {
        return Err(ApiError::invalid_argument(format!(
            "invalid tenant {tenant:?}: must match [a-z][a-z0-9-]{{0,62}}"
        )));
    }
    let workspace = flag_workspace
        .map(str::to_string)
        .or_else(|| env.workspace.clone())
        .or(local.workspace)
        .or(shared.workspace)
        .unwrap_or_else(|| "default".to_string());
    validate_workspace_name(&workspace)?;
    let identity = match &env.token {
        Some(credential) => {
            let (token, key) = split_credential(credential).map_err(|_| {
                murmur_workflows::auth::unauthenticated(
                    "MURMUR_TOKEN is not a credential (<token>~<private key>)",
                )
            })?;
            Some(StoredIdentity {
                token: token.to_string(),
                key: key.to_string(),
            })
        }
        None => match (&local.identity_token, &local.identity_key) {
            (Some(token), Some(key)) => Some(StoredIdentity {
                token: token.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
    };
    // The token says who the developer is; agent workflow ids must match it.
    let token_developer = identity
        .as_ref()
        .and_then(|i| peek_claims(&i.token).ok())
        .map(|c| c.sub);
    let developer = token_developer
        .or(local.developer)
        .or_else(|| env.developer.clone())
        .unwrap_or_else(|| "unknown".to_string());
    Ok(Context {
        tenant,
        workspace,
        developer,
        project_dir,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(shared: &str, local: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".murmur")).unwrap();
        std::fs::write(dir.path().join(".murmur/murmur.yaml"), shared).unwrap();
        if let Some(l) = local {
            std::fs::write(dir.path().join(".murmur/murmur.local.yaml"), l).unwrap();
        }
        dir
    }

    #[test]
    fn workspace_precedence_is_flag_env_local_shared() {
        let p = project(
            "tenant: acme\nworkspace: shared\n",
            Some("workspace: local\n"),
        );
        let sub = p.path().join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        let mut env = Env::default();
        assert_eq!(resolve(&sub, &env, None).unwrap().workspace, "local");
        env.workspace = Some("fromenv".into());
        assert_eq!(resolve(&sub, &env, None).unwrap().workspace, "fromenv");
        assert_eq!(resolve(&sub, &env, Some("flag")).unwrap().workspace, "flag");
        assert_eq!(resolve(&sub, &env, None).unwrap().tenant, "acme");
    }

    #[test]
    fn missing_project_and_bad_yaml_are_clear_errors() {
        let empty = tempfile::tempdir().unwrap();
        let e = resolve(empty.path(), &Env::default(), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("FAILED_PRECONDITION: no tenant configured")
        );
        let p = project("tenant: [oops\n", None);
        let e = resolve(p.path(), &Env::default(), None).unwrap_err();
        assert!(e.to_string().starts_with("INVALID_ARGUMENT:"), "{e}");
        let p = project("tenant: acme\ntennant: typo\n", None);
        assert!(resolve(p.path(), &Env::default(), None).is_err());
    }

    #[test]
    fn invalid_workspace_flag_is_rejected() {
        let p = project("tenant: acme\n", None);
        let e = resolve(p.path(), &Env::default(), Some("Bad_Name")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("INVALID_ARGUMENT: invalid workspace name")
        );
    }
}
