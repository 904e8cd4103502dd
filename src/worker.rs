//! The worker process: connects, registers the workflows and activities on the task queue,
//! and runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use std::sync::atomic::{AtomicBool, Ordering};

use murmur_activities::agent_activities::{AgentActivities, ClaimLatencies};
use temporalio_common::telemetry::metrics::CoreMeter;
use temporalio_common::telemetry::{
    PrometheusExporterOptions, TelemetryOptions, start_prometheus_metric_exporter,
};
use temporalio_sdk::runtime::{PollerBehavior, RuntimeOptions};

use crate::metrics::MetricsState;
use murmur_activities::auth::{AuthActivities, KeyStore};
use murmur_activities::bake_activities::BakeActivities;
use murmur_activities::faults::{FaultConfig, FaultyProvider};
use murmur_activities::process::{ProcessProvider, SupervisorLaunch};
use murmur_activities::provider::Provider;
use murmur_activities::qemu::{Accel, QemuProvider};
use murmur_activities::reaper::{ReaperActivities, ReaperSettings};
use murmur_activities::vm_activities::VmActivities;
use murmur_workflows::agent_workflow::AgentWorkflow;
use murmur_workflows::bake_workflow::BakeWorkflow;
use murmur_workflows::nuke_workflow::NukeWorkflow;
use murmur_workflows::pool_workflow::PoolWorkflow;
use temporalio_sdk::{Runtime, Worker, WorkerOptions};

/// Concurrent activity task polls: flushes and nukes start many short activities at once.
const ACTIVITY_POLLERS: usize = 20;

/// What the worker needs to start.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Task queue to poll.
    pub task_queue: String,
    /// Where sandboxes, images and keys live.
    pub state_dir: PathBuf,
    /// Where to serve `/metrics` and `/healthz`, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The reaper's schedule and grace periods.
    pub reaper: ReaperSettings,
    /// How long a VM may take to answer its readiness handshake.
    pub boot_timeout: std::time::Duration,
    /// Faults to inject into the substrate (chaos tests only; `None` in production).
    pub faults: Option<FaultConfig>,
    /// Where VMs live.
    pub substrate: Substrate,
}

/// The substrates a worker can run VMs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Substrate {
    /// Local sandboxes (processes under a supervisor).
    #[default]
    Process,
    /// Real Linux guests under qemu.
    Qemu,
}

/// Starts the provider of `substrate` over `state_dir`.
async fn provider(
    substrate: Substrate,
    state_dir: &std::path::Path,
) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match substrate {
        Substrate::Process => {
            let exe = std::env::current_exe().context("locate the murmur-worker executable")?;
            Arc::new(ProcessProvider::new(
                state_dir,
                SupervisorLaunch {
                    program: exe,
                    args: vec!["sandbox".into()],
                },
            )?)
        }
        Substrate::Qemu => {
            let qemu = QemuProvider::new(state_dir)
                .await
                .map_err(|e| anyhow::anyhow!("qemu substrate: {e}"))?;
            tracing::info!(accel = %qemu.accel(), "qemu substrate: guests run with {}",
            match qemu.accel() {
                Accel::Kvm => "KVM (a probe boot succeeded)",
                Accel::Tcg => "TCG software emulation (KVM unavailable or its probe boot failed)",
            });
            Arc::new(qemu)
        }
    })
}

/// Runs the worker until a shutdown signal.
pub async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("create state dir {}", config.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&config.state_dir)?;
    let mut provider = provider(config.substrate, &state_dir).await?;
    let provider_name = provider.name();
    if let Some(faults) = &config.faults {
        tracing::warn!(
            ?faults,
            "FAULT INJECTION ENABLED: the substrate will fail on purpose"
        );
        provider = Arc::new(FaultyProvider::new(provider, faults.clone()));
    }
    let keys = KeyStore::open(&state_dir).map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
    let identity = format!("murmur-worker@{}:{}", hostname(), std::process::id());
    let client = crate::client::connect(&identity)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Err(e) = crate::client::register_search_attributes(&client).await {
        tracing::warn!(error = %e, "search attributes not registered; register MurmurTenant, MurmurWorkspace and MurmurKind (Keyword) on the namespace");
    }
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    // The SDK's own metrics go to a private exporter that /metrics appends to murmur's.
    let sdk_exporter = match config.metrics_addr {
        Some(_) => {
            let options = PrometheusExporterOptions::builder()
                .socket_addr(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
                .build();
            Some(start_prometheus_metric_exporter(options)?)
        }
        None => None,
    };
    let mut telemetry = TelemetryOptions::builder().build();
    if let Some(exporter) = &sdk_exporter {
        telemetry.metrics = Some(exporter.meter.clone() as Arc<dyn CoreMeter>);
    }
    let runtime_options = RuntimeOptions::builder()
        .telemetry_options(telemetry)
        .build()
        .map_err(|e| anyhow::anyhow!("runtime options: {e}"))?;
    let runtime = Runtime::from_current_tokio(runtime_options)
        .map_err(|e| anyhow::anyhow!("start Temporal runtime: {e}"))?;
    let claims = Arc::new(ClaimLatencies::default());
    let polling = Arc::new(AtomicBool::new(false));
    let options = WorkerOptions::new(config.task_queue.clone())
        .activity_task_poller_behavior(PollerBehavior::SimpleMaximum(ACTIVITY_POLLERS))
        .register_workflow::<PoolWorkflow>()?
        .register_workflow::<AgentWorkflow>()?
        .register_workflow::<NukeWorkflow>()?
        .register_workflow::<BakeWorkflow>()?
        .register_activities(VmActivities::new(provider.clone(), config.boot_timeout))
        .register_activities(ReaperActivities::new(provider.clone(), config.reaper))
        .register_activities(BakeActivities::new(provider.clone()))
        .register_activities(AgentActivities::new(provider, keys.clone(), claims.clone()))
        .register_activities(AuthActivities::new(keys))
        .build();
    if let Some(listener) = metrics_listener {
        let state = Arc::new(MetricsState {
            client: client.clone(),
            task_queue: config.task_queue.clone(),
            sdk_metrics: sdk_exporter.as_ref().map(|e| e.bound_addr),
            polling: polling.clone(),
            claims,
        });
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, state).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let mut worker = Worker::new(&runtime, client, options)?;
    let stop = worker.shutdown_handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stop();
    });
    tracing::info!(task_queue = %config.task_queue, state_dir = %state_dir.display(),
        substrate = provider_name, "worker running");
    polling.store(true, Ordering::Relaxed);
    let result = worker.run().await;
    polling.store(false, Ordering::Relaxed);
    result?;
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
