//! `murmur bake`.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;
use murmur::bake::{BakeEvent, bake, read_recipe};
use murmur::progress::{Progress, until_interrupted};
use murmur_workflows::error::ApiError;

use crate::{Globals, Session, emit};

#[derive(Args, Debug)]
pub(crate) struct BakeArgs {
    /// Bake again even when the image is cached (replaces it).
    #[arg(long)]
    force_new: bool,
    /// The recipe: YAML with `base`, `script`, optional `timeout` (seconds) and `files`
    /// (path: content).
    recipe: PathBuf,
}

pub(crate) async fn run(args: BakeArgs, globals: &Globals) -> Result<(), ApiError> {
    let recipe = read_recipe(&args.recipe)?;
    let image = recipe.image_id(murmur::bake::arch());
    let session = Session::open(globals).await?;
    let structured = globals.format.is_structured();
    let mut progress: Option<Progress> = None;
    let work = bake(
        &session.client,
        &session.ctx,
        recipe,
        args.force_new,
        |event| match event {
            BakeEvent::Cache(true) => {}
            BakeEvent::Cache(false) => {
                if !structured {
                    println!("Bake started (image: {image})");
                    let _ = std::io::stdout().flush();
                }
                progress = Some(Progress::start("booting a scratch VM"));
            }
            BakeEvent::Step(p) => {
                if let Some(bar) = progress.as_mut() {
                    bar.set(&p.step);
                }
            }
        },
    );
    let result = until_interrupted(work, "the bake", "temporal workflow describe").await;
    if let Some(bar) = progress.take() {
        bar.finish();
    }
    match result {
        Ok(report) => emit(globals.format, &report, || {
            if report.cached {
                format!("Image {} already cached\n", report.image)
            } else {
                format!(
                    "Image {} baked; to use it:\n  murmur patch workspace {} --set image_ref={}\n",
                    report.image, session.ctx.workspace, report.image
                )
            }
        }),
        Err(failure) => {
            if let Some(tail) = failure.output_tail.filter(|t| !t.is_empty()) {
                eprintln!("--- provisioning script output (last lines) ---");
                eprint!("{tail}");
                if !tail.ends_with('\n') {
                    eprintln!();
                }
                eprintln!("---");
            }
            Err(failure.error)
        }
    }
}
