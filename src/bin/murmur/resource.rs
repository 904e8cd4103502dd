//! `murmur get | set | patch`.

use std::io::Read as _;
use std::path::PathBuf;

use murmur::output::{Format, resource_yaml};
use murmur_workflows::error::ApiError;
use murmur_workflows::machine::ConfigChange;
use murmur_workflows::model::{POOL_CONFIG_NAME, ResourceDoc, ResourceKind};

use crate::{Globals, Session, emit};

#[derive(clap::Args, Debug)]
pub(crate) struct GetArgs {
    /// Resource kind: pool-config or workspace.
    kind: String,
    /// Resource name (pool-config: default; workspace: defaults to the workspace context).
    name: Option<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SetArgs {
    /// Resource kind: pool-config or workspace.
    kind: String,
    /// Resource name.
    name: String,
    /// Read the YAML from this file instead of stdin.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct PatchArgs {
    /// Resource kind: pool-config or workspace.
    kind: String,
    /// Resource name.
    name: String,
    /// Field assignment KEY=VALUE (dotted keys for nested fields); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", required = true)]
    set: Vec<String>,
}

fn default_name(kind: ResourceKind, given: Option<String>, session: &Session) -> String {
    given.unwrap_or_else(|| match kind {
        ResourceKind::PoolConfig => POOL_CONFIG_NAME.to_string(),
        ResourceKind::Workspace => session.ctx.workspace.clone(),
    })
}

pub(crate) async fn get(args: GetArgs, globals: &Globals) -> Result<(), ApiError> {
    let kind = ResourceKind::parse(&args.kind)?;
    let session = Session::open(globals).await?;
    let name = default_name(kind, args.name, &session);
    let snapshot = session.pool.config().await?;
    let doc = match kind {
        ResourceKind::PoolConfig if name == POOL_CONFIG_NAME => Some(snapshot.pool_config),
        ResourceKind::PoolConfig => None,
        ResourceKind::Workspace => snapshot.workspaces.into_iter().find(|d| d.name == name),
    }
    .ok_or_else(|| ApiError::not_found(format!("{} {name} does not exist", kind.as_str())))?;
    // The text form of a resource is its YAML document (what `set` accepts).
    match globals.format {
        Format::Text | Format::Yaml => print!("{}", resource_yaml(&doc)),
        Format::Json => print!("{}", Format::Json.document(&doc)?),
    }
    Ok(())
}

/// Reads a `set` document: either a full `murmur get` document (its `spec` is used and its
/// `generation` guards against lost updates) or just the spec fields.
fn parse_set_document(
    text: &str,
    kind: ResourceKind,
    name: &str,
) -> Result<ConfigChange, ApiError> {
    let value: serde_json::Value = serde_norway::from_str(text)
        .map_err(|e| ApiError::invalid_argument(format!("YAML: {e}")))?;
    let value = if value.is_null() {
        serde_json::json!({})
    } else {
        value
    };
    let obj = value
        .as_object()
        .ok_or_else(|| ApiError::invalid_argument("YAML: expected a mapping of fields"))?;
    if let Some(spec) = obj.get("spec") {
        if let Some(k) = obj.get("kind").and_then(|k| k.as_str())
            && k != kind.as_str()
        {
            return Err(ApiError::invalid_argument(format!(
                "document kind {k:?} does not match {}",
                kind.as_str()
            )));
        }
        if let Some(n) = obj.get("name").and_then(|n| n.as_str())
            && n != name
        {
            return Err(ApiError::invalid_argument(format!(
                "document name {n:?} does not match {name:?}"
            )));
        }
        return Ok(ConfigChange::Set {
            spec: spec.clone(),
            expected_generation: obj.get("generation").and_then(|g| g.as_u64()),
        });
    }
    Ok(ConfigChange::Set {
        spec: value,
        expected_generation: None,
    })
}

/// What `set` and `patch` print: a line, or (-o json|yaml) the resource as it now is.
fn report_change(doc: &ResourceDoc, format: Format) -> Result<(), ApiError> {
    emit(format, doc, || {
        format!(
            "{} {} configured (generation {})\n",
            doc.kind.as_str(),
            doc.name,
            doc.generation
        )
    })
}

pub(crate) async fn set(args: SetArgs, globals: &Globals) -> Result<(), ApiError> {
    let kind = ResourceKind::parse(&args.kind)?;
    let text = match &args.file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ApiError::invalid_argument(format!("cannot read {}: {e}", path.display()))
        })?,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| ApiError::invalid_argument(format!("cannot read stdin: {e}")))?;
            s
        }
    };
    let change = parse_set_document(&text, kind, &args.name)?;
    let session = Session::open(globals).await?;
    let doc = session
        .pool
        .apply_config(kind.as_str(), &args.name, change)
        .await?;
    report_change(&doc, globals.format)
}

pub(crate) async fn patch(args: PatchArgs, globals: &Globals) -> Result<(), ApiError> {
    let kind = ResourceKind::parse(&args.kind)?;
    let set = args
        .set
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid_argument(format!("--set {kv:?}: expected KEY=VALUE"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let session = Session::open(globals).await?;
    let doc = session
        .pool
        .apply_config(kind.as_str(), &args.name, ConfigChange::Patch { set })
        .await?;
    report_change(&doc, globals.format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_accepts_full_documents_and_bare_specs() {
        let full = "kind: workspace\nname: web\ngeneration: 4\nspec:\n  min_idle: 3\n";
        match parse_set_document(full, ResourceKind::Workspace, "web").unwrap() {
            ConfigChange::Set {
                spec,
                expected_generation,
            } => {
                assert_eq!(spec["min_idle"], 3);
                assert_eq!(expected_generation, Some(4));
            }
            other => panic!("unexpected {other:?}"),
        }
        let bare = "min_idle: 2\n";
        assert!(matches!(
            parse_set_document(bare, ResourceKind::Workspace, "web").unwrap(),
            ConfigChange::Set {
                expected_generation: None,
                ..
            }
        ));
        assert!(
            parse_set_document(
                "kind: workspace\nname: other\nspec: {}\n",
                ResourceKind::Workspace,
                "web"
            )
            .is_err()
        );
        assert!(parse_set_document("- a list", ResourceKind::Workspace, "web").is_err());
        assert!(parse_set_document("min_idle: [", ResourceKind::Workspace, "web").is_err());
    }
}
