//! The pool-level series are read from Temporal in the background, never per scrape: a
//! refresher reads the host view and the deployment's running pools, queries the pools this
//! worker exports (see [`super::owner`]), and swaps in a new [`PoolSnapshot`]. A scrape only
//! reads the latest snapshot, so scraping costs Temporal nothing and a slow or wedged pool
//! cannot slow a scrape.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use murmur_activities::host_activities::read_hosts;
use murmur_activities::temporal_ops::running_pools_query;
use murmur_workflows::hosts::HostState;
use murmur_workflows::pool_workflow::PoolWorkflow;
use murmur_workflows::status::PoolStatus;
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge};
use temporalio_client::{Client, WorkflowListOptions, WorkflowQueryOptions};

use super::owner::exporter_of;
use super::pools::{host_families, pool_families};

/// The key the deployment-wide host series are placed by, as a tenant's pool is by its
/// tenant: one worker exports them.
const HOST_SERIES_KEY: &str = "\0host-registry";
/// When the next refresh comes after a failed one, or while this host is not registered.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a refresh waits for one pool's status.
const POOL_ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// Pool queries in flight at once during a refresh.
const QUERIES_IN_FLIGHT: usize = 8;

/// The pool-level families of the last successful refresh.
#[derive(Debug, Default)]
pub struct PoolSnapshot {
    /// The families, ready to encode.
    pub families: Vec<MetricFamily>,
}

/// The latest snapshot, shared by the refresher (which replaces it) and the scrapes (which
/// read it), with the refresher's own health.
pub struct SnapshotCache {
    current: RwLock<Arc<PoolSnapshot>>,
    /// `murmur_pool_snapshot_timestamp_seconds`: when the last refresh succeeded.
    pub refreshed_at: IntGauge,
    /// `murmur_pool_snapshot_failures_total`: refreshes that could not read Temporal.
    pub failures: IntCounter,
    /// `murmur_pools_exported`: pools whose series this worker exports.
    pub exported: IntGauge,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        let gauge = |name: &str, help: &str| {
            IntGauge::new(name, help).expect("constant gauge options are valid")
        };
        Self {
            current: RwLock::default(),
            refreshed_at: gauge(
                "murmur_pool_snapshot_timestamp_seconds",
                "When this worker last read the pools it exports (Unix time; 0 before the first read).",
            ),
            failures: IntCounter::new(
                "murmur_pool_snapshot_failures_total",
                "Background reads of the pools that failed (the last good snapshot is served meanwhile).",
            )
            .expect("constant counter options are valid"),
            exported: gauge(
                "murmur_pools_exported",
                "Pools whose series this worker exports (each pool is exported by exactly one live worker).",
            ),
        }
    }
}

impl SnapshotCache {
    /// The latest snapshot.
    pub fn latest(&self) -> Arc<PoolSnapshot> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, snapshot: PoolSnapshot) {
        let snapshot = Arc::new(snapshot);
        match self.current.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }
}

/// Where the refresher reads from and who it is.
pub struct PoolSource {
    /// Client for visibility and queries.
    pub client: Client,
    /// The deployment's shared task queue (pools on other queues are not its to report).
    pub task_queue: String,
    /// This worker's host id: it exports the pools [`exporter_of`] gives it.
    pub host: String,
}

/// Why a refresh did not produce a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// the host registry could not be read: {0}
    #[error("the host registry could not be read: {0}")]
    Hosts(String),
    /// the running pools could not be listed: {0}
    #[error("the running pools could not be listed: {0}")]
    List(String),
    /// the snapshot could not be built: {0}
    #[error("the snapshot could not be built: {0}")]
    Build(#[from] prometheus::Error),
}

/// Refreshes `cache` from `source` now and then every `every`, until the process ends.
/// Until the registry lists this host as live (a worker that has just started), and after
/// a failed refresh, the next one comes after [`RETRY_AFTER`] instead, so a new worker
/// exports its pools at once rather than a period later.
pub async fn refresh_forever(source: PoolSource, cache: Arc<SnapshotCache>, every: Duration) {
    loop {
        let next = match refresh(&source).await {
            Ok(fresh) => {
                cache.replace(fresh.snapshot);
                cache.exported.set(fresh.exported as i64);
                cache.refreshed_at.set(unix_seconds());
                tracing::debug!(exported = fresh.exported, "pool metrics refreshed");
                if fresh.registered {
                    every
                } else {
                    every.min(RETRY_AFTER)
                }
            }
            Err(e) => {
                cache.failures.inc();
                tracing::warn!(error = %e, "pool metrics not refreshed; serving the last snapshot");
                every.min(RETRY_AFTER)
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// What one refresh read.
struct Refreshed {
    snapshot: PoolSnapshot,
    /// Pools it exports.
    exported: usize,
    /// True when the registry listed this host as live (so it was in the running for
    /// every pool).
    registered: bool,
}

/// One refresh.
async fn refresh(source: &PoolSource) -> Result<Refreshed, RefreshError> {
    let view = read_hosts(&source.client, &source.task_queue)
        .await
        .map_err(|e| RefreshError::Hosts(e.to_string()))?;
    let registered = view
        .hosts
        .get(&source.host)
        .is_some_and(|h| h.state == HostState::Live);
    let mut tenants = Vec::new();
    let mut listing = source.client.list_workflows(
        running_pools_query(&source.task_queue),
        WorkflowListOptions::default(),
    );
    while let Some(item) = listing.next().await {
        let wf = item.map_err(|e| RefreshError::List(e.to_string()))?;
        let tenant = wf.id().strip_prefix("pool/").unwrap_or(wf.id()).to_string();
        if exporter_of(&tenant, &view) == Some(source.host.as_str()) {
            tenants.push(tenant);
        }
    }
    let pools: Vec<(String, Option<PoolStatus>)> = futures::stream::iter(tenants)
        .map(|tenant| async move {
            let status = pool_status(&source.client, &tenant).await;
            (tenant, status)
        })
        .buffered(QUERIES_IN_FLIGHT)
        .collect()
        .await;
    let exported = pools.len();
    let mut families = pool_families(&pools)?;
    if exporter_of(HOST_SERIES_KEY, &view) == Some(source.host.as_str()) {
        families.extend(host_families(&view)?);
    }
    Ok(Refreshed {
        snapshot: PoolSnapshot { families },
        exported,
        registered,
    })
}

/// The pool's status, or `None` when it does not answer in time.
async fn pool_status(client: &Client, tenant: &str) -> Option<PoolStatus> {
    let handle = client.get_workflow_handle::<PoolWorkflow>(format!("pool/{tenant}"));
    let query = handle.query(PoolWorkflow::status, (), WorkflowQueryOptions::default());
    tokio::time::timeout(POOL_ANSWER_WITHIN, query)
        .await
        .ok()
        .and_then(Result::ok)
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
