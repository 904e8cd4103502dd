//! The pool's gate: a developer's request is verified by the `murmur.verify` local activity
//! (its verdict is in history, so a replay never re-checks against keys that may have
//! rotated since), then admitted once by the machine's replay guard; refusals are recorded
//! (who — from a verified identity only —, what, why) in the status and the worker log. A
//! worker-signed request (claim, release, VM power change) is checked by its update's
//! validator, which never runs on replay ([`service_checked`]); a refusal leaves no trace in
//! history and is logged by the worker that refused it.

use temporalio_sdk::WorkflowContext;

use super::PoolWorkflow;
use crate::auth::{Credential, Identity, VerifyRequest, ops, permissions, unsigned_body};
use crate::error::ApiError;
use crate::gate::{self, Refusal};
use crate::machine::{Admission, ClaimRequest};
use crate::messages::NukeStep;
use crate::model::Millis;
use crate::shell::{now_ms, nuke_workflow_id, pool_workflow_id};

/// Verifies a developer's request to the pool (permission `permission`) and admits it once.
pub(super) async fn developer(
    ctx: &WorkflowContext<PoolWorkflow>,
    op: &str,
    body: String,
    permission: &str,
    credential: Option<Credential>,
) -> Result<Identity, ApiError> {
    let target = ctx.state(|s| pool_workflow_id(&s.pool.tenant));
    verify_and_admit(ctx, op, target, body, permission, credential, |_| false)
        .await
        .map(|admitted| admitted.unwrap_or_default())
}

/// Verifies a worker-internal request (claim, release, nuke step): signed with a worker key,
/// fresh, refused from developers. Not recorded: these requests are idempotent by their own
/// keys, and a stale copy fails the freshness check.
pub(super) async fn service<T: serde::Serialize>(
    ctx: &WorkflowContext<PoolWorkflow>,
    op: &str,
    message: &T,
    credential: Option<Credential>,
) -> Result<Identity, ApiError> {
    let tenant = ctx.state(|s| s.pool.tenant.clone());
    let req = VerifyRequest::service(
        &tenant,
        op,
        pool_workflow_id(&tenant),
        unsigned_body(message),
        credential,
    );
    let verdict = gate::verify(ctx, req).await;
    let now = now_ms(ctx);
    let replaying = ctx.is_replaying();
    ctx.state_mut(|s| verdict.map_err(|r| refused(s, op, r, now, replaying)))
}

/// Checks a worker-signed request to this pool in an update validator (see
/// [`gate::check_service`]): signed with a worker key, fresh, refused from developers.
pub(super) fn service_checked<T: serde::Serialize>(
    pool: &PoolWorkflow,
    op: &str,
    message: &T,
    credential: Option<Credential>,
) -> Result<(), ApiError> {
    let tenant = &pool.pool.tenant;
    let req = VerifyRequest::service(
        tenant,
        op,
        pool_workflow_id(tenant),
        unsigned_body(message),
        credential,
    );
    gate::check_service(&req).map(|_| ())
}

/// The request a nuke's pause acts for: the pool's own (admitted when the `flush` with
/// `nuke` arrived), or the developer's signed request to the nuke workflow, verified again
/// now and admitted once. A pause retried by the nuke that holds the pool (its first answer
/// was lost with its worker) is that nuke's again, not a replay.
pub(super) async fn nuke(
    ctx: &WorkflowContext<PoolWorkflow>,
    step: &NukeStep,
) -> Result<String, ApiError> {
    let request = step
        .developer
        .as_ref()
        .and_then(|d| d.credential.as_ref())
        .map(|c| c.request_id.clone())
        .unwrap_or_else(|| step.authorized_request.clone());
    if !request.is_empty() && ctx.state(|s| s.pool.is_own_nuke(&request)) {
        return Ok(request);
    }
    let Some(signed) = &step.developer else {
        let now = now_ms(ctx);
        let replaying = ctx.is_replaying();
        let error = ApiError::failed_precondition(
            "this nuke was not asked for through this pool and carries no signed request",
        );
        return Err(ctx.state_mut(|s| refused(s, ops::NUKE, error.into(), now, replaying)));
    };
    let target = ctx.state(|s| nuke_workflow_id(&s.pool.tenant));
    // Two attempts of the same step can be in flight at once (the activity that sent the
    // first died with its worker and its retry sent a second): the one that finds the pool
    // paused by this request once its check is done is the same step, not a replay.
    verify_and_admit(
        ctx,
        ops::NUKE,
        target,
        signed.body.clone(),
        permissions::POOL_DELETE,
        signed.credential.clone(),
        |s| !request.is_empty() && s.pool.is_own_nuke(&request),
    )
    .await?;
    Ok(signed
        .credential
        .as_ref()
        .map(|c| c.request_id.clone())
        .unwrap_or_default())
}

/// Admits the spawn request behind a new claim once: the agent verified it; its request id
/// may be presented again only by the same agent run (which claims again after its pool was
/// recovered).
pub(super) fn spawn(s: &mut PoolWorkflow, req: &ClaimRequest, now: Millis) -> Result<(), ApiError> {
    s.pool.admit(
        &Admission {
            op: ops::SPAWN,
            developer: &req.developer,
            request_id: &req.spawn_request_id,
            signed_at: req.spawn_signed_at,
            consumer: Some(&req.request),
        },
        now,
    )
}

async fn verify_and_admit(
    ctx: &WorkflowContext<PoolWorkflow>,
    op: &str,
    target: String,
    body: String,
    permission: &str,
    credential: Option<Credential>,
    already_admitted: impl Fn(&PoolWorkflow) -> bool,
) -> Result<Option<Identity>, ApiError> {
    let tenant = ctx.state(|s| s.pool.tenant.clone());
    let req = VerifyRequest::developer(tenant, op, target, body, permission, credential.clone());
    let verdict = gate::verify(ctx, req).await;
    let now = now_ms(ctx);
    let replaying = ctx.is_replaying();
    ctx.state_mut(|s| {
        if already_admitted(s) {
            return Ok(None);
        }
        let identity = verdict.map_err(|r| refused(s, op, r, now, replaying))?;
        let cred = credential.unwrap_or_default();
        let admitted = s.pool.admit(
            &Admission {
                op,
                developer: &identity.developer,
                request_id: &cred.request_id,
                signed_at: cred.ts,
                consumer: None,
            },
            now,
        );
        if let Err(e) = &admitted
            && !replaying
        {
            tracing::warn!(tenant = %s.pool.tenant, op, who = %identity.developer, error = %e,
                "request denied");
        }
        admitted.map(|()| Some(identity))
    })
}

/// Records a refusal and returns its error.
fn refused(s: &mut PoolWorkflow, op: &str, r: Refusal, now: Millis, replaying: bool) -> ApiError {
    s.pool.record_denial(op, &r.who, &r.error, now);
    if !replaying {
        tracing::warn!(tenant = %s.pool.tenant, op, who = %r.who, error = %r.error,
            "request denied");
    }
    r.error
}
