//! `murmur auth login | status | sign`.

use std::io::Read as _;

use clap::{Subcommand, ValueEnum};
use murmur::config::{CONFIG_DIR, Context, Env, LOCAL_FILE, LocalConfig, resolve};
use murmur::output::Format;
use murmur_activities::auth::{DeveloperKey, TokenClaims, now_ms, peek_claims, split_credential};
use murmur_workflows::auth::unauthenticated;
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::model::format_rfc3339;

use crate::{Globals, Session, emit};

#[derive(Subcommand, Debug)]
pub(crate) enum AuthCommand {
    /// Store a credential (as `murmur-worker token issue` prints it) in
    /// .murmur/murmur.local.yaml (mode 0600, git-ignored).
    ///
    /// Examples:
    ///   murmur auth login --token "$CREDENTIAL"
    ///   murmur-worker token issue --tenant demo --developer ana --role member | murmur auth login
    Login {
        /// The credential; read from stdin when absent.
        #[arg(long)]
        token: Option<String>,
    },
    /// Show tenant, developer, role and expiry of the stored token (never the token itself).
    Status,
    /// Print a signed request as JSON (YAML with -o yaml), for the `temporal` CLI. Valid for
    /// 2 minutes, once.
    ///
    /// Example:
    ///   temporal workflow update execute --workflow-id pool/demo --name flush \
    ///     --input "$(murmur auth sign flush)"
    Sign {
        /// What to sign.
        operation: SignedOperation,
    },
}

/// Operations `murmur auth sign` can sign.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum SignedOperation {
    /// `flush` on pool/<tenant> (signal or update).
    Flush,
    /// `flush` with `nuke: true` on pool/<tenant>.
    Nuke,
}

pub(crate) async fn run(cmd: AuthCommand, globals: &Globals) -> Result<(), ApiError> {
    let workspace = globals.workspace.as_deref();
    match cmd {
        AuthCommand::Login { token } => login(token, workspace, globals.format),
        AuthCommand::Status => status(workspace, globals.format),
        AuthCommand::Sign { operation } => {
            let session = Session::open(globals).await?;
            let req = session
                .pool
                .signed_flush(matches!(operation, SignedOperation::Nuke))?;
            // The text form is one line of JSON: what `temporal ... --input` takes.
            match globals.format {
                Format::Yaml => print!("{}", Format::Yaml.document(&req)?),
                Format::Json | Format::Text => {
                    let text = serde_json::to_string(&req)
                        .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
                    println!("{text}");
                }
            }
            Ok(())
        }
    }
}

fn context(workspace: Option<&str>) -> Result<Context, ApiError> {
    let cwd = std::env::current_dir()
        .map_err(|e| ApiError::failed_precondition(format!("current directory: {e}")))?;
    resolve(&cwd, &Env::from_process(), workspace)
}

fn login(token: Option<String>, workspace: Option<&str>, format: Format) -> Result<(), ApiError> {
    let credential = match token {
        Some(t) => t,
        None => {
            let mut buf = String::new();
            std::io::stdin()
                .read_to_string(&mut buf)
                .map_err(|e| ApiError::invalid_argument(format!("read stdin: {e}")))?;
            buf
        }
    };
    let (token, key) = split_credential(&credential)
        .map_err(|e| ApiError::invalid_argument(format!("not a murmur credential: {e}")))?;
    DeveloperKey::new(token, key)
        .map_err(|e| ApiError::invalid_argument(format!("not a murmur credential: {e}")))?;
    let claims = peek_claims(token)
        .map_err(|_| ApiError::invalid_argument("not a murmur credential: unreadable token"))?;
    let ctx = context(workspace)?;
    if claims.tenant != ctx.tenant {
        return Err(ApiError::failed_precondition(format!(
            "this token is for tenant {}, but this project is tenant {}",
            claims.tenant, ctx.tenant
        )));
    }
    let project = ctx.project_dir.clone().ok_or_else(|| {
        ApiError::failed_precondition("no .murmur/murmur.yaml found from here upwards")
    })?;
    let path = project.join(CONFIG_DIR).join(LOCAL_FILE);
    let mut local: LocalConfig = match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => serde_norway::from_str(&text)
            .map_err(|e| ApiError::invalid_argument(format!("{}: {e}", path.display())))?,
        _ => LocalConfig::default(),
    };
    local.developer = Some(claims.sub.clone());
    local.identity_token = Some(token.to_string());
    local.identity_key = Some(key.to_string());
    let text = serde_norway::to_string(&local)
        .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    write_private(&path, &text)?;
    ignore_in_git(&project);
    let st = AuthStatus {
        expired: claims.exp * 1000 <= now_ms(),
        expires_at: format_rfc3339(claims.exp * 1000),
        tenant: claims.tenant,
        developer: claims.sub,
        role: claims.role,
        private_key: true,
    };
    emit(format, &st, || {
        format!(
            "Logged in as {} (tenant {}, role {}, expires {})\n",
            st.developer, st.tenant, st.role, st.expires_at
        )
    })
}

/// Writes `text` to `path` readable by the owner only (it holds a private key).
fn write_private(path: &std::path::Path, text: &str) -> Result<(), ApiError> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| {
        ApiError::failed_precondition(format!("cannot write {}: {e}", path.display()))
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)
}

/// Adds murmur.local.yaml to the project's .gitignore, when it has one and lacks the line.
fn ignore_in_git(project: &std::path::Path) {
    let gitignore = project.join(".gitignore");
    let Ok(text) = std::fs::read_to_string(&gitignore) else {
        return;
    };
    if text.lines().any(|l| l.trim().ends_with(LOCAL_FILE)) {
        return;
    }
    let line = format!("{CONFIG_DIR}/{LOCAL_FILE}\n");
    let sep = if text.ends_with('\n') || text.is_empty() {
        ""
    } else {
        "\n"
    };
    let _ = std::fs::write(&gitignore, format!("{text}{sep}{line}"));
}

/// What `murmur auth status -o json|yaml` (and `auth login -o json|yaml`) prints.
#[derive(serde::Serialize)]
struct AuthStatus {
    tenant: String,
    developer: String,
    role: String,
    expires_at: String,
    expired: bool,
    private_key: bool,
}

fn status(workspace: Option<&str>, format: Format) -> Result<(), ApiError> {
    let ctx = context(workspace)?;
    let identity = ctx
        .identity
        .as_ref()
        .ok_or_else(murmur_workflows::auth::missing_or_expired)?;
    let claims: TokenClaims =
        peek_claims(&identity.token).map_err(|_| unauthenticated("identity token is malformed"))?;
    let expired = claims.exp * 1000 <= now_ms();
    let st = AuthStatus {
        tenant: claims.tenant,
        developer: claims.sub,
        role: claims.role,
        expires_at: format_rfc3339(claims.exp * 1000),
        expired,
        private_key: DeveloperKey::new(&identity.token, &identity.key).is_ok(),
    };
    emit(format, &st, || {
        format!(
            "tenant:    {}\ndeveloper: {}\nrole:      {}\nexpires:   {}{}\nkey:       {}\n",
            st.tenant,
            st.developer,
            st.role,
            st.expires_at,
            if expired { " (expired)" } else { "" },
            if st.private_key {
                "present"
            } else {
                "missing or unusable"
            }
        )
    })?;
    if expired {
        return Err(murmur_workflows::auth::missing_or_expired());
    }
    Ok(())
}
