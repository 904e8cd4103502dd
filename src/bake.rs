//! `murmur bake`: reading a recipe, starting (or joining) the bake workflow of its
//! content-addressed image, following its progress.

use std::path::Path;
use std::time::Duration;

use murmur_activities::temporal_ops::{rpc_error, search_attributes};
use murmur_workflows::auth::ops;
use murmur_workflows::bake::{BakeInput, BakeProgress, BakeReport, Recipe, bake_workflow_id};
use murmur_workflows::bake_workflow::BakeWorkflow;
use murmur_workflows::error::{ApiError, Code};
use temporalio_client::{
    Client, WorkflowGetResultOptions, WorkflowIdConflictPolicy, WorkflowIdReusePolicy,
    WorkflowQueryOptions, WorkflowStartOptions,
};

use crate::config::Context;

/// The architecture image ids are computed for (the guest architecture of both substrates
/// here: qemu runs `qemu-system-x86_64`, the process substrate the host's).
pub fn arch() -> &'static str {
    std::env::consts::ARCH
}

/// Reads and checks a recipe file.
pub fn read_recipe(path: &Path) -> Result<Recipe, ApiError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ApiError::invalid_argument(format!("cannot read recipe {}: {e}", path.display()))
    })?;
    let recipe: Recipe = serde_norway::from_str(&text).map_err(|e| {
        ApiError::invalid_argument(format!(
            "recipe {} is not valid: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        ))
    })?;
    recipe.validate()?;
    Ok(recipe)
}

/// What the caller is told while a bake runs.
pub enum BakeEvent<'a> {
    /// The cache was checked: the image exists (`true`) or a bake started (`false`).
    Cache(bool),
    /// Progress of a running bake.
    Step(&'a BakeProgress),
}

/// How a bake that did not succeed ended.
#[derive(Debug)]
pub struct BakeFailure {
    /// `CODE: reason`.
    pub error: ApiError,
    /// The provisioning script's output tail, when it ran.
    pub output_tail: Option<String>,
}

impl From<ApiError> for BakeFailure {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            output_tail: None,
        }
    }
}

/// Starts the bake of `recipe` (or joins the one running for the same image) and waits for
/// it, reporting the cache verdict once and progress while it runs.
pub async fn bake(
    client: &Client,
    ctx: &Context,
    recipe: Recipe,
    force_new: bool,
    mut event: impl FnMut(BakeEvent<'_>),
) -> Result<BakeReport, BakeFailure> {
    let image = recipe.image_id(arch());
    let mut input = BakeInput {
        tenant: ctx.tenant.clone(),
        image: image.clone(),
        arch: arch().to_string(),
        recipe,
        force_new,
        actor: Some(ctx.developer.clone()),
        auth: None,
    };
    input.validate()?;
    let workflow_id = bake_workflow_id(&ctx.tenant, &image);
    input.auth = Some(ctx.sign(ops::BAKE, &workflow_id, &input)?);
    let options = WorkflowStartOptions::new(crate::client::task_queue(), workflow_id)
        .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
        .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
        .search_attributes(search_attributes(&ctx.tenant, "bake", None))
        .static_summary(format!("bake of {image} by {}", ctx.developer))
        .build();
    let handle = client
        .start_workflow(BakeWorkflow::run, input, options)
        .await
        .map_err(|e| rpc_error(&e.to_string()))?;
    let result = handle.get_result(WorkflowGetResultOptions::default());
    tokio::pin!(result);
    let mut told = false;
    let mut last = BakeProgress::default();
    let outcome = loop {
        tokio::select! {
            out = &mut result => break out,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Ok(p) = handle
                    .query(BakeWorkflow::progress, (), WorkflowQueryOptions::default())
                    .await
                {
                    if !told && let Some(cached) = p.cached {
                        told = true;
                        event(BakeEvent::Cache(cached));
                    }
                    if told {
                        event(BakeEvent::Step(&p));
                    }
                    last = p;
                }
            }
        }
    };
    match outcome {
        Ok(report) => {
            if !told {
                event(BakeEvent::Cache(report.cached));
            }
            Ok(report)
        }
        Err(e) => {
            // The failure carries the final progress (the reason and the script's output).
            let progress = match failure_progress(&e) {
                Some(progress) => progress,
                None => last,
            };
            if !told && progress.cached == Some(false) {
                event(BakeEvent::Cache(false));
            }
            let text = progress.error.clone().unwrap_or_else(|| format!("{e:?}"));
            let error = ApiError::find_in(&text).unwrap_or_else(|| {
                ApiError::new(Code::Internal, format!("bake did not complete: {e}"))
            });
            Err(BakeFailure {
                error,
                output_tail: progress.output_tail,
            })
        }
    }
}

/// The progress a failed bake carries in its failure's details.
fn failure_progress(e: &temporalio_client::errors::WorkflowGetResultError) -> Option<BakeProgress> {
    use temporalio_client::errors::WorkflowGetResultError;
    use temporalio_common::error::IncomingError;
    let WorkflowGetResultError::Failed(failure) = e else {
        return None;
    };
    let IncomingError::Application(app) = failure.as_ref() else {
        return None;
    };
    app.details::<BakeProgress>().ok().flatten()
}
