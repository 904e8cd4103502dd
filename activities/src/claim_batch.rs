//! Claims sent to their pool in batches: every claim a worker makes (one per agent's
//! `murmur.claim_vm`) goes through one [`ClaimBatcher`], which sends the claims waiting for
//! the same pool together as one `claims` update, signed once.
//!
//! Group commit, not a timer: a claim that finds fewer than [`BATCHES_IN_FLIGHT`] batches of
//! its pool under way leaves at once, alone; claims that arrive while that many are under way
//! wait for the first to come back and then leave together (up to [`MAX_CLAIM_BATCH`]). An
//! idle worker adds no latency; a busy one costs its pool a few updates and workflow tasks
//! per round trip instead of one per claim, and never more than [`BATCHES_IN_FLIGHT`] of the
//! server's in-flight updates per workflow (10 by default).
//!
//! A pool that does not know `claims` (its workflow runs on a worker from before batches)
//! gets the claims one `claim` update each, as before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_workflows::auth::{ops, unsigned_body};
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::machine::{ClaimRequest, ClaimState};
use murmur_workflows::messages::{ClaimAnswer, ClaimBatch, MAX_CLAIM_BATCH};
use murmur_workflows::pool_workflow::{PoolWorkflow, pool_workflow_id};
use temporalio_client::errors::WorkflowUpdateError;
use temporalio_client::{Client, WorkflowExecuteUpdateOptions};
use tokio::sync::oneshot;

use crate::auth::KeyStore;
use crate::temporal_ops::{update_error, update_pool};

/// Batches of one pool a worker has under way at once.
pub const BATCHES_IN_FLIGHT: usize = 3;

/// Longest one batch may take before its claims are answered `UNAVAILABLE` (their agents ask
/// again; a claim is idempotent by its request id, so a batch that lands late does no harm).
pub const BATCH_ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What the server says when a workflow has too many updates in flight: the batch is sent
/// again a moment later (with whatever joined the queue meanwhile left for the next one).
const TOO_MANY_UPDATES: &str = "in-flight updates";
/// How long a batch refused for [`TOO_MANY_UPDATES`] waits before it is sent again.
const REFUSED_BACKOFF: Duration = Duration::from_millis(5);
/// What the workflow answers when it has no `claims` handler.
const NO_HANDLER: &str = "No update handler registered";

/// The answer a waiting claim gets.
type Answer = Result<ClaimState, ApiError>;

/// A claim waiting for its batch.
struct Waiting {
    claim: ClaimRequest,
    answer: oneshot::Sender<Answer>,
}

/// The claims of one pool: those waiting, and how many batches are under way.
#[derive(Default)]
struct Lane {
    waiting: VecDeque<Waiting>,
    under_way: usize,
}

/// Where a pool is: its tenant, and the task queue that starts it when it is not running.
#[derive(Clone)]
struct PoolAddress {
    tenant: String,
    task_queue: String,
}

/// Sends a worker's claims to their pools in batches (see the module docs).
pub struct ClaimBatcher {
    keys: KeyStore,
    lanes: Mutex<HashMap<String, Lane>>,
}

impl ClaimBatcher {
    /// A batcher that signs its batches with `keys`.
    pub fn new(keys: KeyStore) -> Arc<Self> {
        Arc::new(Self {
            keys,
            lanes: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `claim` to `pool/<tenant>` (started on `task_queue` when it is not running) with
    /// the other claims waiting for that pool, and returns the pool's answer to it: where the
    /// claim stands, or the refusal (`CODE: reason`).
    pub async fn claim(
        self: &Arc<Self>,
        client: &Client,
        tenant: &str,
        task_queue: &str,
        claim: ClaimRequest,
    ) -> Answer {
        let (answer, answered) = oneshot::channel();
        let start_sender = {
            let mut lanes = self.lock();
            let lane = lanes.entry(tenant.to_string()).or_default();
            lane.waiting.push_back(Waiting { claim, answer });
            let start = lane.under_way < BATCHES_IN_FLIGHT;
            if start {
                lane.under_way += 1;
            }
            start
        };
        if start_sender {
            let pool = PoolAddress {
                tenant: tenant.to_string(),
                task_queue: task_queue.to_string(),
            };
            tokio::spawn(Arc::clone(self).send_batches(client.clone(), pool));
        }
        answered.await.unwrap_or_else(|_| {
            Err(ApiError::new(
                Code::Unavailable,
                "the claim's batch ended without an answer",
            ))
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        // A panic elsewhere while the lock was held leaves plain data behind: keep using it.
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One sender: sends what waits for the pool, batch after batch, until nothing does.
    async fn send_batches(self: Arc<Self>, client: Client, pool: PoolAddress) {
        loop {
            let batch: Vec<Waiting> = {
                let mut lanes = self.lock();
                let Some(lane) = lanes.get_mut(&pool.tenant) else {
                    return;
                };
                if lane.waiting.is_empty() {
                    lane.under_way = lane.under_way.saturating_sub(1);
                    if lane.under_way == 0 {
                        lanes.remove(&pool.tenant);
                    }
                    return;
                }
                let n = lane.waiting.len().min(MAX_CLAIM_BATCH);
                lane.waiting.drain(..n).collect()
            };
            let claims: Vec<ClaimRequest> = batch.iter().map(|w| w.claim.clone()).collect();
            let (n, started) = (claims.len(), std::time::Instant::now());
            let answers =
                tokio::time::timeout(BATCH_ANSWER_WITHIN, self.send(&client, &pool, claims))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ApiError::new(
                            Code::Unavailable,
                            format!(
                                "pool/{} did not answer within {}s",
                                pool.tenant,
                                BATCH_ANSWER_WITHIN.as_secs()
                            ),
                        ))
                    });
            tracing::debug!(tenant = %pool.tenant, claims = n,
                took_ms = started.elapsed().as_millis() as u64, answered = answers.is_ok(),
                "claims batch");
            for (i, waiting) in batch.into_iter().enumerate() {
                let answer = match &answers {
                    Ok(all) => all.get(i).cloned().unwrap_or_else(|| {
                        Err(ApiError::new(
                            Code::Internal,
                            "the pool answered fewer claims than the batch held",
                        ))
                    }),
                    Err(e) => Err(e.clone()),
                };
                // The agent may have stopped waiting (its own timeout); nothing to do then.
                let _ = waiting.answer.send(answer);
            }
        }
    }

    /// Sends one batch and returns the answers in its order.
    async fn send(
        &self,
        client: &Client,
        pool: &PoolAddress,
        claims: Vec<ClaimRequest>,
    ) -> Result<Vec<Answer>, ApiError> {
        let mut batch = ClaimBatch { claims, auth: None };
        loop {
            batch.auth = Some(
                self.keys
                    .sign_service(
                        ops::CLAIMS,
                        &pool_workflow_id(&pool.tenant),
                        &unsigned_body(&batch),
                    )
                    .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?,
            );
            // A plain update to the running pool (the usual case, and the cheaper call);
            // update-with-start only when no pool runs.
            let sent = match client
                .get_workflow_handle::<PoolWorkflow>(pool_workflow_id(&pool.tenant))
                .execute_update(
                    PoolWorkflow::claims,
                    batch.clone().into(),
                    WorkflowExecuteUpdateOptions::default(),
                )
                .await
            {
                Err(WorkflowUpdateError::NotFound(_)) => {
                    update_pool(
                        client,
                        &pool.tenant,
                        &pool.task_queue,
                        PoolWorkflow::claims,
                        batch.clone().into(),
                    )
                    .await
                }
                other => other.map_err(|e| update_error(e, "not running")),
            };
            match sent {
                Ok(answers) => {
                    return Ok(answers
                        .into_iter()
                        .map(|a| match a {
                            ClaimAnswer::State(s) => Ok(s),
                            ClaimAnswer::Refused(e) => Err(e),
                        })
                        .collect());
                }
                Err(e) if e.message.contains(TOO_MANY_UPDATES) => {
                    tokio::time::sleep(REFUSED_BACKOFF).await;
                }
                Err(e) if e.message.contains(NO_HANDLER) => {
                    return Ok(self.send_one_by_one(client, pool, batch.claims).await);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The claims of a batch as single `claim` updates, for a pool without `claims`.
    async fn send_one_by_one(
        &self,
        client: &Client,
        pool: &PoolAddress,
        claims: Vec<ClaimRequest>,
    ) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(claims.len());
        for mut claim in claims {
            let signed = self.keys.sign_service(
                ops::CLAIM,
                &pool_workflow_id(&pool.tenant),
                &unsigned_body(&claim),
            );
            let answer = match signed {
                Ok(auth) => {
                    claim.auth = Some(auth);
                    update_pool(
                        client,
                        &pool.tenant,
                        &pool.task_queue,
                        PoolWorkflow::claim,
                        claim.into(),
                    )
                    .await
                }
                Err(e) => Err(ApiError::new(Code::Internal, e.to_string())),
            };
            answers.push(answer);
        }
        answers
    }
}
