//! The worker process: connects, registers the workflows and activities on the task queue,
//! and runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use std::sync::atomic::{AtomicBool, Ordering};

use murmur_activities::agent_activities::AgentActivities;
use murmur_activities::meters::{ClaimLatencies, RefusedBoots};
use temporalio_common::telemetry::metrics::CoreMeter;
use temporalio_common::telemetry::{
    PrometheusExporterOptions, TelemetryOptions, start_prometheus_metric_exporter,
};
use temporalio_sdk::runtime::worker_tuner::{FixedSizeSlotSupplier, TunerHolder};
use temporalio_sdk::runtime::{PollerBehavior, RuntimeOptions};

use crate::metrics::MetricsState;
use murmur_activities::auth::{AuthActivities, KeyStore};
use murmur_activities::bake_activities::BakeActivities;
use murmur_activities::host_activities::{
    HostActivities, RegistryActivities, leave_registry, register_host,
};
use murmur_activities::reaper::{ReaperActivities, ReaperSettings};
use murmur_activities::substrate::Provider;
use murmur_activities::substrate::faults::{FaultConfig, FaultyProvider};
use murmur_activities::substrate::process::{ProcessProvider, SupervisorLaunch};
use murmur_activities::substrate::qemu::QemuProvider;
use murmur_activities::substrate::qemu::launch::Accel;
use murmur_activities::vm_activities::VmActivities;
use murmur_workflows::agent_workflow::AgentWorkflow;
use murmur_workflows::bake_workflow::BakeWorkflow;
use murmur_workflows::host_registry_workflow::HostRegistryWorkflow;
use murmur_workflows::hosts::{HostLeave, HostRegistration, host_task_queue};
use murmur_workflows::nuke_workflow::NukeWorkflow;
use murmur_workflows::pool_workflow::PoolWorkflow;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use temporalio_sdk::{Runtime, Worker, WorkerOptions};

/// Concurrent activity task polls: flushes and nukes start many short activities at once.
const ACTIVITY_POLLERS: usize = 20;
/// Concurrent workflow task polls of the shared queue, sticky and not. Every agent's first
/// task (the spawn, its claim) comes from the non-sticky queue, which the SDK's default
/// (5 polls, a fifth of them non-sticky) gives one poll: spawns arriving together queued
/// behind it.
const WORKFLOW_POLLERS: usize = 10;
/// The share of [`WORKFLOW_POLLERS`] that polls the non-sticky queue (5 of 10).
const NONSTICKY_POLL_RATIO: f32 = 0.5;
/// Workflow runs the worker caches by default, and its workflow task slots on the shared queue
/// (the SDK gives a worker as many slots as runs it caches at most; its own default is 100).
/// An agent's task stays open while its first claim (a local activity) waits for the pool's
/// answer, and the pool's own task needs a slot of this same worker to give it: with 100
/// slots, a hundred agents waiting at once for a pool that had fallen behind held every slot,
/// the pool's task waited for one, and the 10,000-agent bench stalled at ~1,650 agents
/// (RELIABILITY #36). A cached run costs memory (~90 KB for an agent, measured:
/// docs/scaling.md), a slot does not; `--workflow-cache` trades one for the other.
pub const DEFAULT_WORKFLOW_CACHE: usize = 1_000;
/// Activity and local activity slots of the shared queue (the SDK's default).
const SHARED_ACTIVITY_SLOTS: usize = 100;
/// Activity slots of a host's queue beyond one per VM (boots, deletes, scans, the lease).
const HOST_SLOT_HEADROOM: usize = 64;

/// What the worker needs to start.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Task queue to poll.
    pub task_queue: String,
    /// Where sandboxes, images and keys live.
    pub state_dir: PathBuf,
    /// Workflow runs cached, and workflow task slots of the shared queue
    /// ([`DEFAULT_WORKFLOW_CACHE`]).
    pub workflow_cache: usize,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, if anywhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How often the pool-level series are read from Temporal (in the background; a scrape
    /// reads the last snapshot).
    pub metrics_refresh: std::time::Duration,
    /// The reaper's schedule and grace periods.
    pub reaper: ReaperSettings,
    /// How long a VM may take to answer its readiness handshake.
    pub boot_timeout: std::time::Duration,
    /// Faults to inject into the substrate (chaos tests only; `None` in production).
    pub faults: Option<FaultConfig>,
    /// Where VMs live.
    pub substrate: Substrate,
    /// This worker as a VM host: its id (its queue is `murmur-host-<id>`) and capacity.
    pub host: HostSettings,
    /// Where the signing keys live (shared by every worker of a deployment).
    pub keys_dir: Option<PathBuf>,
    /// The host gateway (`murmur logs`, `exec`, `shell`), if served.
    pub gateway: Option<crate::gateway::GatewaySettings>,
    /// How long the output of an ended agent is kept on its host after its VM is deleted.
    pub log_retention: Duration,
}

/// This worker as a VM host.
#[derive(Clone, Debug)]
pub struct HostSettings {
    /// The host id (a DNS label).
    pub id: String,
    /// Most VMs it runs at once.
    pub max_vms: u32,
    /// Memory for its VMs, in MiB (0: not limited).
    pub memory_mb: u64,
    /// How long it may go without a lease heartbeat before the registry marks it lost.
    pub lease_timeout: Duration,
}

impl HostSettings {
    /// The default host id: this machine's hostname, made a DNS label.
    pub fn default_id() -> String {
        let mut id: String = hostname()
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(60)
            .collect();
        if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
            id.insert_str(0, "h-");
        }
        id.trim_end_matches('-').to_string()
    }

    /// The default memory capacity: 80% of this machine's RAM for qemu guests; unlimited for
    /// process sandboxes (their memory is nominal).
    pub fn default_memory_mb(substrate: Substrate) -> u64 {
        match substrate {
            Substrate::Process => 0,
            Substrate::Qemu => total_memory_mb().map_or(0, |total| total * 4 / 5),
        }
    }
}

/// This machine's RAM in MiB, from /proc/meminfo.
fn total_memory_mb() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
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
    log_retention: Duration,
) -> anyhow::Result<Arc<dyn Provider>> {
    Ok(match substrate {
        Substrate::Process => {
            let exe = std::env::current_exe().context("locate the murmur-worker executable")?;
            Arc::new(
                ProcessProvider::new(
                    state_dir,
                    SupervisorLaunch {
                        program: exe,
                        args: vec!["sandbox".into()],
                    },
                )?
                .with_log_retention(log_retention),
            )
        }
        Substrate::Qemu => {
            let qemu = QemuProvider::new(state_dir)
                .await
                .map_err(|e| anyhow::anyhow!("qemu substrate: {e}"))?
                .with_log_retention(log_retention);
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
    let mut provider = provider(config.substrate, &state_dir, config.log_retention).await?;
    let provider_name = provider.name();
    if let Some(faults) = &config.faults {
        tracing::warn!(
            ?faults,
            "FAULT INJECTION ENABLED: the substrate will fail on purpose"
        );
        provider = Arc::new(FaultyProvider::new(provider, faults.clone()));
    }
    let keys_dir = config.keys_dir.clone().unwrap_or_else(|| state_dir.clone());
    let keys = KeyStore::open(&keys_dir).map_err(|e| anyhow::anyhow!("signing key: {e}"))?;
    let keys_for_gateway = keys.clone();
    // Worker-signed requests to a pool are checked by their update validators, against this
    // worker's keys and clock (murmur_workflows::gate::check_service).
    let checker = keys.clone();
    murmur_workflows::gate::install_service_check(Box::new(move |req| {
        checker.verify(req, murmur_activities::auth::now_ms())
    }));
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
            // Prometheus conventions: counters end in `_total`, durations are seconds and
            // say so in their names.
            let options = PrometheusExporterOptions::builder()
                .socket_addr(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
                .counters_total_suffix(true)
                .use_seconds_for_durations(true)
                .unit_suffix(true)
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
    let refused_boots = RefusedBoots::default();
    let polling = Arc::new(AtomicBool::new(false));
    // The shared queue: every workflow, and the activities any worker can run. The VM
    // activities are here too for pools from before host placement, whose VMs have no host.
    let shared_tuner = TunerHolder::builder()
        .workflow_task_slot_supplier(FixedSizeSlotSupplier::new(config.workflow_cache))
        .activity_task_slot_supplier(FixedSizeSlotSupplier::new(SHARED_ACTIVITY_SLOTS))
        .local_activity_task_slot_supplier(FixedSizeSlotSupplier::new(SHARED_ACTIVITY_SLOTS))
        .nexus_task_slot_supplier(FixedSizeSlotSupplier::new(1))
        .build();
    let shared = WorkerOptions::new(config.task_queue.clone())
        .tuner(shared_tuner)
        .max_cached_workflows(config.workflow_cache)
        .activity_task_poller_behavior(PollerBehavior::SimpleMaximum(ACTIVITY_POLLERS))
        .workflow_task_poller_behavior(PollerBehavior::SimpleMaximum(WORKFLOW_POLLERS))
        .nonsticky_to_sticky_poll_ratio(NONSTICKY_POLL_RATIO)
        .register_workflow::<PoolWorkflow>()?
        .register_workflow::<AgentWorkflow>()?
        .register_workflow::<NukeWorkflow>()?
        .register_workflow::<BakeWorkflow>()?
        .register_workflow::<HostRegistryWorkflow>()?
        .register_activities(VmActivities::new(provider.clone(), config.boot_timeout))
        .register_activities(ReaperActivities::new(provider.clone(), config.reaper))
        .register_activities(BakeActivities::new(provider.clone()))
        .register_activities(AgentActivities::new(
            provider.clone(),
            keys.clone(),
            claims.clone(),
        ))
        .register_activities(AuthActivities::new(keys.clone()))
        .register_activities(RegistryActivities)
        .register_activities(murmur_activities::recovery::RecoveryActivities)
        .build();
    // This host's queue: what must run where its VMs live.
    let host_queue = host_task_queue(&config.task_queue, &config.host.id);
    let last_lease_beat = Arc::new(AtomicU64::new(0));
    // Every running agent holds a `run_agent` slot here for its whole life: room for one per
    // VM plus boots, deletes, scans and the lease, so a full host never starves its lease.
    let host_slots = config.host.max_vms as usize + HOST_SLOT_HEADROOM;
    let host_tuner = TunerHolder::builder()
        .workflow_task_slot_supplier(FixedSizeSlotSupplier::new(2))
        .activity_task_slot_supplier(FixedSizeSlotSupplier::new(host_slots))
        .local_activity_task_slot_supplier(FixedSizeSlotSupplier::new(2))
        .nexus_task_slot_supplier(FixedSizeSlotSupplier::new(1))
        .build();
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let on_host = WorkerOptions::new(host_queue.clone())
        .tuner(host_tuner)
        .activity_task_poller_behavior(PollerBehavior::SimpleMaximum(ACTIVITY_POLLERS))
        .register_activities(
            VmActivities::new(provider.clone(), config.boot_timeout)
                .with_host_capacity(config.host.max_vms, refused_boots.clone()),
        )
        .register_activities(ReaperActivities::new(provider.clone(), config.reaper))
        .register_activities(BakeActivities::new(provider.clone()))
        .register_activities(AgentActivities::new(provider.clone(), keys, claims.clone()))
        .register_activities(HostActivities::new(
            config.host.id.clone(),
            last_lease_beat.clone(),
            stopping,
        ))
        .build();
    if let Some(listener) = metrics_listener {
        let pools = Arc::new(crate::metrics::snapshot::SnapshotCache::default());
        let registry = crate::metrics::process_registry(vec![
            claims.collector(),
            refused_boots.collector(),
            Box::new(pools.refreshed_at.clone()),
            Box::new(pools.failures.clone()),
            Box::new(pools.exported.clone()),
        ])?;
        let source = crate::metrics::snapshot::PoolSource {
            client: client.clone(),
            task_queue: config.task_queue.clone(),
            host: config.host.id.clone(),
        };
        tokio::spawn(crate::metrics::snapshot::refresh_forever(
            source,
            pools.clone(),
            config.metrics_refresh,
        ));
        let state = Arc::new(MetricsState {
            task_queue: config.task_queue.clone(),
            sdk_metrics: sdk_exporter.as_ref().map(|e| e.bound_addr),
            polling: polling.clone(),
            registry,
            pools,
            host: crate::metrics::HostSeries {
                id: config.host.id.clone(),
                provider: provider.clone(),
                max_vms: config.host.max_vms,
            },
        });
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(listener, state).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    let mut shared_worker = Worker::new(&runtime, client.clone(), shared)?;
    let mut host_worker = Worker::new(&runtime, client.clone(), on_host)?;
    let (stop_shared, stop_host) = (
        shared_worker.shutdown_handle(),
        host_worker.shutdown_handle(),
    );
    let gateway_address = match &config.gateway {
        Some(settings) => {
            let (listener, address) = crate::gateway::bind(settings).await?;
            let guard = crate::gateway::guard::Guard::open(keys_for_gateway, &state_dir)
                .context("gateway replay records")?;
            let service = crate::gateway::server::GatewayService::new(
                provider.clone(),
                Arc::new(guard),
                config.host.id.clone(),
            );
            let tls = settings.tls.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::gateway::serve(listener, service, tls).await {
                    tracing::error!(error = %e, "gateway stopped");
                }
            });
            tracing::info!(%address, "gateway serving");
            address
        }
        None => String::new(),
    };
    let registration = HostRegistration {
        host: config.host.id.clone(),
        instance: format!(
            "{}-{}",
            std::process::id(),
            murmur_activities::auth::now_ms()
        ),
        max_vms: config.host.max_vms,
        memory_mb: config.host.memory_mb,
        substrate: provider_name.to_string(),
        lease_timeout_ms: config.host.lease_timeout.as_millis() as u64,
        gateway: gateway_address,
    };
    let leave = HostLeave {
        host: registration.host.clone(),
        instance: registration.instance.clone(),
        reason: format!("host {} is shutting down", registration.host),
    };
    let (leave_client, leave_queue) = (client.clone(), config.task_queue.clone());
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        // The registry marks this host lost now instead of placing work on a queue nobody
        // will poll: the worker says it leaves, and a running lease ends at once.
        let _ = stopping_tx.send(true);
        match tokio::time::timeout(
            LEAVE_WITHIN,
            leave_registry(&leave_client, &leave_queue, &leave),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not tell the registry this host leaves; it is lost when its lease times out")
            }
            Err(_) => tracing::warn!(
                "the registry did not take this host's leave in time; it is lost when its lease times out"
            ),
        }
        stop_shared();
        stop_host();
    });
    let registrar = tokio::spawn(keep_registered(
        client,
        config.task_queue.clone(),
        registration,
        last_lease_beat,
    ));
    tracing::info!(task_queue = %config.task_queue, host = %config.host.id,
        host_queue = %host_queue, max_vms = config.host.max_vms,
        memory_mb = config.host.memory_mb, state_dir = %state_dir.display(),
        keys_dir = %keys_dir.display(), substrate = provider_name, "worker running");
    polling.store(true, Ordering::Relaxed);
    // `Worker::run` is not `Send`: both run on this task.
    let (shared_result, host_result) = tokio::join!(shared_worker.run(), host_worker.run());
    polling.store(false, Ordering::Relaxed);
    registrar.abort();
    shared_result?;
    host_result?;
    tracing::info!("worker stopped");
    Ok(())
}

/// How long a stopping worker waits for the registry to take its leave.
const LEAVE_WITHIN: Duration = Duration::from_secs(3);

/// How long no lease may have run before the worker registers again (the registry was
/// recreated, or it marked this host lost while it was cut off).
const REREGISTER_AFTER: Duration = Duration::from_secs(45);

/// Registers this worker as a host at once, then again whenever no lease has heartbeated for
/// [`REREGISTER_AFTER`]. A registration the server refuses is retried.
async fn keep_registered(
    client: temporalio_client::Client,
    task_queue: String,
    registration: HostRegistration,
    last_lease_beat: Arc<AtomicU64>,
) {
    let mut registered_at: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let since_beat = murmur_activities::auth::now_ms()
            .saturating_sub(last_lease_beat.load(Ordering::Relaxed));
        let due = match registered_at {
            None => true,
            Some(at) => {
                at.elapsed() >= REREGISTER_AFTER
                    && Duration::from_millis(since_beat) >= REREGISTER_AFTER
            }
        };
        if !due {
            continue;
        }
        match register_host(&client, &task_queue, &registration).await {
            Ok(()) => {
                if registered_at.is_some() {
                    tracing::warn!(host = %registration.host,
                        "no lease for {}s: registered again", REREGISTER_AFTER.as_secs());
                } else {
                    tracing::info!(host = %registration.host, "registered as a VM host");
                }
                registered_at = Some(std::time::Instant::now());
            }
            Err(e) => tracing::warn!(host = %registration.host, error = %e,
                "host registration failed; retrying"),
        }
    }
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
