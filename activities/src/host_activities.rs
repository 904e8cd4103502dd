//! The host side of scale-out: the lease a host keeps alive on its own queue, reading the
//! registry's view, telling pools about it, and registering a worker as a host.

// `#[activities]` generates an undocumented marker constant per activity; the activities
// themselves are documented below.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use murmur_workflows::activity_api::LeaseInput;
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::host_registry_workflow::{HostRegistryWorkflow, RegistryInput};
use murmur_workflows::hosts::{HostLeave, HostRegistration, HostView, registry_workflow_id};
use murmur_workflows::messages::encode_json;
use murmur_workflows::pool_workflow::PoolWorkflow;
use temporalio_client::errors::WorkflowQueryError;
use temporalio_client::{
    Client, WorkflowIdConflictPolicy, WorkflowListOptions, WorkflowQueryOptions,
    WorkflowSignalOptions, WorkflowStartOptions,
};
use temporalio_common::ActivityError;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::auth::now_ms;
use crate::heartbeat::with_heartbeats;
use crate::temporal_ops::{query_error, rpc_error, running_pools_query};

/// The lease activity of one host (registered on the host's own queue only).
pub struct HostActivities {
    host: String,
    last_lease_beat: Arc<AtomicU64>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl HostActivities {
    /// Leases of `host`; every heartbeat stores its time (epoch ms) in `last_lease_beat`, so
    /// the worker notices when no lease runs and registers again. When `stopping` turns true
    /// (the worker is shutting down), a running lease fails at once, so the registry marks the
    /// host lost instead of waiting out the lease's term.
    pub fn new(
        host: impl Into<String>,
        last_lease_beat: Arc<AtomicU64>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            host: host.into(),
            last_lease_beat,
            stopping,
        }
    }
}

#[activities]
impl HostActivities {
    /// Heartbeats for the lease's term, then returns so the registry renews it. If this host
    /// dies, the missing heartbeats fail the lease and the registry marks the host lost. The
    /// heartbeats are the lease itself, so it beats from its own loop (at the lease's
    /// `beat_ms`), not through [`with_heartbeats`].
    #[activity(name = "murmur.host_lease")]
    pub async fn host_lease(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: LeaseInput,
    ) -> Result<(), ActivityError> {
        if input.host != self.host {
            return Err(ActivityError::application(
                ApplicationFailure::builder(ApiError::invalid_argument(format!(
                    "a lease of host {} reached host {}",
                    input.host, self.host
                )))
                .non_retryable(true)
                .build(),
            ));
        }
        let term = Duration::from_millis(input.term_ms.max(1_000));
        let ends = Instant::now() + term;
        tracing::debug!(host = %self.host, lease = input.seq, "host lease started");
        let beat = Duration::from_millis(if input.beat_ms == 0 {
            2_000
        } else {
            input.beat_ms.max(100)
        });
        let mut tick = tokio::time::interval(beat);
        let mut stopping = self.stopping.clone();
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Err(ActivityError::cancelled()),
                _ = stopping.wait_for(|s| *s) => {
                    return Err(ActivityError::application(
                        ApplicationFailure::builder(format!(
                            "host {} is shutting down", self.host
                        ))
                        .non_retryable(true)
                        .build(),
                    ));
                }
                _ = tick.tick() => {}
            }
            let _ = ctx.record_heartbeat(()).await;
            self.last_lease_beat.store(now_ms(), Ordering::Relaxed);
            if Instant::now() >= ends {
                return Ok(());
            }
        }
    }
}

/// The registry activities any worker runs (registered on the shared queue).
pub struct RegistryActivities;

#[activities]
impl RegistryActivities {
    /// The registry's host view; an empty one (version 0) when the registry is not running.
    #[activity(name = "murmur.read_hosts")]
    pub async fn read_hosts(
        self: Arc<Self>,
        ctx: ActivityContext,
        _input: (),
    ) -> Result<HostView, ActivityError> {
        with_heartbeats(&ctx, read_hosts(&ctx.client(), &ctx.info().task_queue))
            .await?
            .map_err(|e| ActivityError::application(ApplicationFailure::new(e)))
    }

    /// Tells every running pool of this deployment that the view changed (their `hosts`
    /// signal, carrying only the version); returns how many were told.
    #[activity(name = "murmur.announce_hosts")]
    pub async fn announce_hosts(
        self: Arc<Self>,
        ctx: ActivityContext,
        view: HostView,
    ) -> Result<u32, ActivityError> {
        with_heartbeats(&ctx, announce(&ctx, &view)).await?
    }
}

/// Signals `hosts` with the view's version to every running pool on the activity's shared
/// queue; how many were told.
async fn announce(ctx: &ActivityContext, view: &HostView) -> Result<u32, ActivityError> {
    let client = ctx.client();
    // A doorbell: pools read the view from the registry themselves.
    let payload = encode_json(&view.version)
        .map_err(|e| ActivityError::application(ApplicationFailure::new(e)))?;
    // Only this deployment's pools (the ones on this shared queue).
    let query = running_pools_query(&ctx.info().task_queue);
    let mut pools = client.list_workflows(query, WorkflowListOptions::default());
    let mut told = 0u32;
    while let Some(item) = pools.next().await {
        let wf = item.map_err(|e| ActivityError::application(ApplicationFailure::new(e)))?;
        let result = client
            .get_workflow_handle::<PoolWorkflow>(wf.id().to_string())
            .signal(
                PoolWorkflow::hosts_signal,
                payload.clone(),
                WorkflowSignalOptions::default(),
            )
            .await;
        match result {
            Ok(()) => told += 1,
            // A pool that closed meanwhile re-reads the view when it runs again.
            Err(e) => tracing::warn!(pool = %wf.id(), error = %e, "host view not delivered"),
        }
    }
    tracing::info!(version = view.version, pools = told, "host view announced");
    Ok(told)
}

/// Reads the view of the registry of the deployment on `shared_queue` through its `hosts`
/// query; version 0 when it is not running.
pub async fn read_hosts(client: &Client, shared_queue: &str) -> Result<HostView, ApiError> {
    let result = client
        .get_workflow_handle::<HostRegistryWorkflow>(registry_workflow_id(shared_queue))
        .query(
            HostRegistryWorkflow::hosts,
            (),
            WorkflowQueryOptions::default(),
        )
        .await;
    match result {
        Ok(view) => Ok(view),
        Err(WorkflowQueryError::NotFound(_)) => Ok(HostView::default()),
        Err(e) => Err(query_error(e, "the host registry is not running")),
    }
}

/// Tells the registry that this worker's host stops (it is lost at once). A registry that is
/// not running has nothing to forget.
pub async fn leave_registry(
    client: &Client,
    task_queue: &str,
    leave: &HostLeave,
) -> Result<(), ApiError> {
    let payload = encode_json(leave).map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    let result = client
        .get_workflow_handle::<HostRegistryWorkflow>(registry_workflow_id(task_queue))
        .signal(
            HostRegistryWorkflow::leave,
            payload,
            WorkflowSignalOptions::default(),
        )
        .await;
    match result {
        Ok(()) => Ok(()),
        Err(temporalio_client::errors::WorkflowInteractionError::NotFound(_)) => Ok(()),
        Err(e) => Err(rpc_error(&e.to_string())),
    }
}

/// Registers this worker as a host, starting the registry if it is not running.
pub async fn register_host(
    client: &Client,
    task_queue: &str,
    registration: &HostRegistration,
) -> Result<(), ApiError> {
    let payload =
        encode_json(registration).map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    let options =
        WorkflowStartOptions::new(task_queue.to_string(), registry_workflow_id(task_queue))
            .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
            .static_summary("murmur VM host registry".to_string())
            .build();
    client
        .signal_with_start_workflow(
            HostRegistryWorkflow::run,
            RegistryInput::default(),
            HostRegistryWorkflow::register,
            payload,
            options,
        )
        .await
        .map_err(|e| rpc_error(&e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use murmur_workflows::activity_api::{AnnounceHosts, HostLease, ReadHosts};
    use temporalio_common::ActivityDefinition;

    use super::{HostActivities, RegistryActivities};

    #[test]
    fn activity_names_match_the_workflow_markers() {
        assert_eq!(HostActivities::host_lease.name(), HostLease.name());
        assert_eq!(RegistryActivities::read_hosts.name(), ReadHosts.name());
        assert_eq!(
            RegistryActivities::announce_hosts.name(),
            AnnounceHosts.name()
        );
    }
}
