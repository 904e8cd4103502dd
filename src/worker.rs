//! The worker process: connects, registers the workflows and activities on the task queue,
//! and runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use murmur_activities::agent_activities::AgentActivities;
use murmur_activities::auth::{AuthActivities, KeyStore};
use murmur_activities::process::{ProcessProvider, SupervisorLaunch};
use murmur_activities::provider::Provider;
use murmur_activities::vm_activities::VmActivities;
use murmur_workflows::agent_workflow::AgentWorkflow;
use murmur_workflows::nuke_workflow::NukeWorkflow;
use murmur_workflows::pool_workflow::PoolWorkflow;
use temporalio_sdk::{Runtime, Worker, WorkerOptions};

/// What the worker needs to start.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Task queue to poll.
    pub task_queue: String,
    /// Where sandboxes, images and keys live.
    pub state_dir: PathBuf,
}

/// Runs the worker until a shutdown signal.
pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state dir {}", config.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&config.state_dir)?;
    let exe = std::env::current_exe().context("locate the murmur-worker executable")?;
    let provider: Arc<dyn Provider> = Arc::new(ProcessProvider::new(
        &state_dir,
        SupervisorLaunch {
            program: exe,
            args: vec!["sandbox".into()],
        },
    )?);
    let keys = KeyStore::open(&state_dir).map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
    let identity = format!("murmur-worker@{}:{}", hostname(), std::process::id());
    let client = crate::client::connect(&identity)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Err(e) = crate::client::register_search_attributes(&client).await {
        tracing::warn!(error = %e, "search attributes not registered; register MurmurTenant, MurmurWorkspace and MurmurKind (Keyword) on the namespace");
    }
    let runtime = Runtime::from_current_tokio(Default::default())
        .map_err(|e| anyhow::anyhow!("start Temporal runtime: {e}"))?;
    let options = WorkerOptions::new(config.task_queue.clone())
        .register_workflow::<PoolWorkflow>()?
        .register_workflow::<AgentWorkflow>()?
        .register_workflow::<NukeWorkflow>()?
        .register_activities(VmActivities::new(provider.clone()))
        .register_activities(AgentActivities::new(provider, keys.clone()))
        .register_activities(AuthActivities::new(keys))
        .build();
    let mut worker = Worker::new(&runtime, client, options)?;
    let stop = worker.shutdown_handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stop();
    });
    tracing::info!(task_queue = %config.task_queue, state_dir = %state_dir.display(),
        substrate = "process", "worker running");
    worker.run().await?;
    tracing::info!("worker stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
