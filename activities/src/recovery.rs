//! `murmur.read_pool_record`: where a pool whose previous run ended finds its config again.
//!
//! Every pool run keeps its record (config, workspaces, generation, totals) in its workflow
//! memo, which stays readable after the run closed, for as long as the namespace retains
//! closed runs. This activity lists the runs of `pool/<tenant>` (newest first), skips the run
//! asking, and answers with the first record found. A run from before records existed has
//! none: then the config is read from that run's history instead — the pool its first event
//! carried in, plus every config change its history accepted (replayed through the pure
//! machine) — and its generation is raised past every flush it may have seen, so none of its
//! warm VMs is mistaken for a fresh one.

// `#[activities]` generates an undocumented marker constant per activity; the activity itself
// is documented below.
#![allow(missing_docs)]

use std::sync::Arc;

use futures::StreamExt;
use murmur_workflows::activity_api::{POOL_RECORD_MEMO, RecordQuery, RecordRead};
use murmur_workflows::machine::{Pool, PoolRecord};
use murmur_workflows::messages::ConfigRequest;
use murmur_workflows::model::ResourceKind;
use murmur_workflows::pool_workflow::pool_workflow_id;
use temporalio_client::{
    Client, NamespacedClient, WorkflowExecutionInfo, WorkflowFetchHistoryOptions,
    WorkflowListOptions,
};
use temporalio_common::ActivityError;
use temporalio_common::protos::temporal::api::history::v1::history_event::Attributes;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::ActivityContext;

use crate::heartbeat::with_heartbeats;

/// Earlier runs looked at for a record (the newest that has one wins).
const RUNS_LOOKED_AT: usize = 20;

/// The recovery activity.
pub struct RecoveryActivities;

#[activities]
impl RecoveryActivities {
    /// Reads the record the latest earlier run of `pool/<tenant>` left (see the module).
    #[activity(name = "murmur.read_pool_record")]
    pub async fn read_pool_record(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: RecordQuery,
    ) -> Result<RecordRead, ActivityError> {
        let client = ctx.client().clone();
        let work = read(&client, &input);
        with_heartbeats(&ctx, work)
            .await?
            .map_err(|e| ActivityError::application(ApplicationFailure::new(anyhow::anyhow!(e))))
    }
}

/// The record of the latest run of `pool/<tenant>` that has one (the running run's, when it
/// wrote one), for readers that cannot ask the pool (`murmur get` on a pool that is not
/// running, or does not answer).
pub async fn latest_record(client: &Client, tenant: &str) -> Result<Option<PoolRecord>, String> {
    let query = RecordQuery {
        tenant: tenant.to_string(),
        run_id: String::new(),
    };
    let runs = earlier_runs(client, &query).await?;
    Ok(in_memo(tenant, &runs).and_then(|r| r.record))
}

async fn read(client: &Client, input: &RecordQuery) -> Result<RecordRead, String> {
    let runs = earlier_runs(client, input).await?;
    if let Some(found) = in_memo(&input.tenant, &runs) {
        return Ok(found);
    }
    let Some(latest) = runs.first() else {
        return Ok(RecordRead::default());
    };
    let id = pool_workflow_id(&input.tenant);
    let record = from_history(client, &input.tenant, &id, latest.run_id()).await?;
    Ok(RecordRead {
        source: if record.is_some() { "history" } else { "" }.into(),
        record,
        run_id: latest.run_id().to_string(),
    })
}

/// The record in the memo of the newest of `runs` that has one.
fn in_memo(tenant: &str, runs: &[temporalio_client::WorkflowExecution]) -> Option<RecordRead> {
    runs.iter().find_map(|run| {
        let record = run
            .memo()
            .get::<PoolRecord>(POOL_RECORD_MEMO)
            .ok()
            .flatten()
            .filter(|r| r.tenant == tenant)?;
        Some(RecordRead {
            record: Some(record),
            source: "memo".into(),
            run_id: run.run_id().to_string(),
        })
    })
}

/// The runs of `pool/<tenant>` other than `input.run_id`, newest first.
async fn earlier_runs(
    client: &Client,
    input: &RecordQuery,
) -> Result<Vec<temporalio_client::WorkflowExecution>, String> {
    if !murmur_workflows::model::is_dns_label(&input.tenant) {
        return Err(format!("invalid tenant {:?}", input.tenant));
    }
    let id = pool_workflow_id(&input.tenant);
    let mut runs = Vec::new();
    let mut listing = client.list_workflows(
        format!("WorkflowId = '{id}'"),
        WorkflowListOptions::builder().limit(RUNS_LOOKED_AT).build(),
    );
    while let Some(run) = listing.next().await {
        let run = run.map_err(|e| format!("list the runs of {id}: {e}"))?;
        if run.run_id() != input.run_id {
            runs.push(run);
        }
        if runs.len() >= RUNS_LOOKED_AT {
            break;
        }
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.start_time()));
    Ok(runs)
}

/// The config of a run without a record: the pool its first event carried, plus every config
/// change its history accepted.
async fn from_history(
    client: &Client,
    tenant: &str,
    id: &str,
    run_id: &str,
) -> Result<Option<PoolRecord>, String> {
    let handle = WorkflowExecutionInfo::builder()
        .namespace(client.namespace())
        .workflow_id(id)
        .run_id(run_id.to_string())
        .build()
        .bind_untyped(client.clone());
    let mut history = handle.fetch_history(WorkflowFetchHistoryOptions::default());
    let mut pool: Option<Pool> = None;
    let mut flushes = 0u64;
    while let Some(event) = history.next().await {
        let event = event.map_err(|e| format!("read the history of {id}: {e}"))?;
        match event.attributes {
            Some(Attributes::WorkflowExecutionStartedEventAttributes(a)) => {
                let carried = a
                    .input
                    .and_then(|p| p.payloads.into_iter().next())
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p.data).ok())
                    .and_then(|v| v.get("carried").cloned());
                pool = Some(carried_pool(tenant, carried.as_ref()));
            }
            Some(Attributes::WorkflowExecutionUpdateAcceptedEventAttributes(a)) => {
                let Some(update) = a.accepted_request.and_then(|r| r.input) else {
                    continue;
                };
                match update.name.as_str() {
                    "flush" => flushes += 1,
                    "apply_config" => {
                        let request = update
                            .args
                            .and_then(|p| p.payloads.into_iter().next())
                            .and_then(|p| serde_json::from_slice::<ConfigRequest>(&p.data).ok());
                        if let (Some(pool), Some(request)) = (pool.as_mut(), request) {
                            replay_change(pool, &request);
                        }
                    }
                    _ => {}
                }
            }
            Some(Attributes::WorkflowExecutionSignaledEventAttributes(a))
                if a.signal_name == "flush" =>
            {
                flushes += 1;
            }
            _ => {}
        }
    }
    Ok(pool.map(|mut p| {
        p.generation += flushes + 1;
        p.record()
    }))
}

/// The config, workspaces and generation of a carried pool (read field by field, so a
/// carried state of another layout still gives up its config); defaults when there is none.
fn carried_pool(tenant: &str, carried: Option<&serde_json::Value>) -> Pool {
    let mut pool = Pool::new(tenant, 0, 0);
    let Some(carried) = carried else {
        return pool;
    };
    if let Some(g) = carried.get("generation").and_then(|g| g.as_u64()) {
        pool.generation = g;
    }
    if let Some(config) = carried
        .get("config")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
    {
        pool.config = config;
    }
    if let Some(workspaces) = carried
        .get("workspaces")
        .and_then(|w| serde_json::from_value(w.clone()).ok())
    {
        pool.workspaces = workspaces;
    }
    pool
}

/// Applies an accepted config change through the pure machine, as the run did. A change
/// the machine refuses now (it was refused by the handler then, after its validator) is
/// skipped.
fn replay_change(pool: &mut Pool, request: &ConfigRequest) {
    let Ok(kind) = ResourceKind::parse(&request.kind) else {
        return;
    };
    if let Ok(change) = pool.validate_change(kind, &request.name, &request.change) {
        let actor = request.actor.clone().unwrap_or_else(|| "recovered".into());
        pool.commit_change(change, &actor, 0);
    }
}

#[cfg(test)]
mod tests {
    use murmur_workflows::activity_api::ReadPoolRecord;
    use murmur_workflows::machine::ConfigChange;
    use temporalio_common::ActivityDefinition;

    use super::*;

    #[test]
    fn activity_name_matches_the_workflow_marker() {
        assert_eq!(
            RecoveryActivities::read_pool_record.name(),
            ReadPoolRecord.name()
        );
    }

    #[test]
    fn a_carried_pool_gives_up_its_config_and_changes_replay() {
        let carried = serde_json::json!({
            "generation": 4,
            "config": {"meta": {"generation": 2, "updated_by": "ana", "updated_at": 5},
                       "spec": {"max_vms": 7}},
            "workspaces": {},
            "some_field_of_another_layout": [1, 2, 3]
        });
        let mut pool = carried_pool("acme", Some(&carried));
        assert_eq!(pool.generation, 4);
        assert_eq!(pool.config.spec.max_vms, 7);
        replay_change(
            &mut pool,
            &ConfigRequest {
                kind: "workspace".into(),
                name: "web".into(),
                change: ConfigChange::Set {
                    spec: serde_json::json!({"min_idle": 2}),
                    expected_generation: None,
                },
                actor: Some("bo".into()),
                auth: None,
            },
        );
        assert_eq!(pool.workspaces["web"].spec.min_idle, 2);
        assert_eq!(pool.workspaces["web"].meta.updated_by, "bo");
    }
}
