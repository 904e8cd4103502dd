//! The worker's operations endpoint, on `axum`: `/metrics` (Prometheus text format),
//! `/healthz` (liveness: the process serves) and `/readyz` (readiness: the worker polls its
//! task queues).
//!
//! # What `/metrics` holds
//!
//! | series | from | exported by |
//! |---|---|---|
//! | pool-level (`murmur_vms`, `murmur_pool_up`, …) | each pool's `status` query, read in the background ([`snapshot`]) | exactly one worker per pool ([`owner`]) |
//! | host-level (`murmur_host_*`) | this host's substrate, read at scrape time (no Temporal call) | every worker, for its own host |
//! | worker (`murmur_claim_latency_seconds`, `murmur_build_info`, …) | this process | every worker |
//! | the SDK's (`temporal_*`) | the SDK's exporter on a private loopback port ([`sdk`]) | every worker |
//!
//! A fleet-wide `sum()` of any series is therefore right: each pool's series come from one
//! worker, each host's from its own. murmur's families are built with the `prometheus`
//! crate, the one the SDK renders its own with, so the response is one text format.

pub mod owner;
pub mod pools;
pub mod sdk;
pub mod snapshot;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use murmur_activities::substrate::Provider;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use snapshot::SnapshotCache;

/// What the endpoint reads from.
pub struct MetricsState {
    /// The task queue this worker polls (for the readiness answer).
    pub task_queue: String,
    /// Where the SDK's own exporter listens, if it runs.
    pub sdk_metrics: Option<SocketAddr>,
    /// True while the worker polls its task queue.
    pub polling: Arc<AtomicBool>,
    /// This process's own collectors (claim latencies, refused boots, build info, the
    /// snapshot's health).
    pub registry: Registry,
    /// The latest pool-level snapshot.
    pub pools: Arc<SnapshotCache>,
    /// This host's substrate and capacity, for the host-level series.
    pub host: HostSeries,
}

/// What the host-level series read: this worker's own substrate, at scrape time.
pub struct HostSeries {
    /// This host's id (a label, so a fleet's series stay apart).
    pub id: String,
    /// The substrate (listing its VMs is local and cheap).
    pub provider: Arc<dyn Provider>,
    /// The most VMs this host runs, every tenant's together.
    pub max_vms: u32,
}

/// Binds the endpoint's address (before anything else takes ports, so a busy address is a
/// start-up error, not a silent one).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics address {addr}: {e}"))
}

/// The registry of this process's own collectors: build info plus `collectors`.
pub fn process_registry(
    collectors: Vec<Box<dyn prometheus::core::Collector>>,
) -> Result<Registry, prometheus::Error> {
    let registry = Registry::new();
    let build = IntGaugeVec::new(
        Opts::new(
            "murmur_build_info",
            "The worker's build: always 1, labelled with its version and commit.",
        ),
        &["version", "commit"],
    )?;
    build
        .get_metric_with_label_values(&[crate::VERSION, crate::COMMIT])?
        .set(1);
    registry.register(Box::new(build))?;
    for c in collectors {
        registry.register(c)?;
    }
    Ok(registry)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<MetricsState>,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics endpoint listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readyz(State(state): State<Arc<MetricsState>>) -> Response {
    if state.polling.load(Ordering::Relaxed) {
        format!("ready: polling task queue {}\n", state.task_queue).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: not polling task queue {}\n", state.task_queue),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<MetricsState>>) -> Response {
    match render(&state).await {
        Ok(body) => (
            [(header::CONTENT_TYPE, TextEncoder::new().format_type())],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics not rendered");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("metrics not rendered: {e}\n"),
            )
                .into_response()
        }
    }
}

/// The whole exposition: murmur's families (sorted by name), then the SDK's.
async fn render(state: &MetricsState) -> Result<String, prometheus::Error> {
    let mut families = state.registry.gather();
    // Listing the substrate reads directories: off the async threads.
    let provider = state.host.provider.clone();
    let on_host = tokio::task::spawn_blocking(move || provider.host_vms())
        .await
        .unwrap_or_default();
    families.extend(live_families(state, on_host)?);
    families.extend(state.pools.latest().families.iter().cloned());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::new();
    TextEncoder::new().encode_utf8(&families, &mut out)?;
    if let Some(addr) = state.sdk_metrics {
        match sdk::fetch(addr).await {
            Ok(text) => out.push_str(&text),
            Err(e) => tracing::warn!(error = %e, "SDK metrics left out of this scrape"),
        }
    }
    Ok(out)
}

/// The series read at scrape time from this process and `on_host`, the (tenant, VM) pairs of
/// this host's substrate (no Temporal call).
fn live_families(
    state: &MetricsState,
    on_host: Vec<(String, murmur_workflows::model::VmId)>,
) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let registry = Registry::new();
    let polling = IntGauge::new(
        "murmur_worker_polling",
        "1 while the worker polls its task queue.",
    )?;
    polling.set(i64::from(state.polling.load(Ordering::Relaxed)));
    registry.register(Box::new(polling))?;
    let host = &state.host;
    let vms = IntGaugeVec::new(
        Opts::new(
            "murmur_host_vms",
            "VMs on this host's substrate, by tenant (what host admission counts).",
        ),
        &["host", "tenant"],
    )?;
    let mut per_tenant: BTreeMap<String, i64> = BTreeMap::new();
    for (tenant, _) in on_host {
        *per_tenant.entry(tenant).or_default() += 1;
    }
    for (tenant, n) in per_tenant {
        vms.get_metric_with_label_values(&[&host.id, &tenant])?
            .set(n);
    }
    registry.register(Box::new(vms))?;
    let max = IntGaugeVec::new(
        Opts::new(
            "murmur_host_max_vms",
            "The most VMs this host runs, every tenant's together.",
        ),
        &["host"],
    )?;
    max.get_metric_with_label_values(&[&host.id])?
        .set(i64::from(host.max_vms));
    registry.register(Box::new(max))?;
    Ok(registry.gather())
}
