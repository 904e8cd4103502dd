//! Verifying a request's credential from inside a workflow: the `murmur.verify` local
//! activity checks it (its verdict is recorded in history, so replays never re-check);
//! admitting a developer's request once is the pool machine's
//! ([`crate::machine::admission`]).

use std::time::Duration;

use temporalio_common::RetryPolicy;
use temporalio_sdk::{LocalActivityOptions, WorkflowContext};

use crate::activity_api::Verify;
use crate::auth::{Identity, Verdict, VerifyRequest};
use crate::error::{ApiError, Code};

/// A refused request: the error to report and who it claimed to come from.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// `CODE: reason`.
    pub error: ApiError,
    /// `developer@tenant` from the token, or `unknown`.
    pub who: String,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            who: "unknown".into(),
        }
    }
}

/// Asks the worker to verify `req`'s credential.
pub async fn verify<W>(c: &WorkflowContext<W>, req: VerifyRequest) -> Result<Identity, Refusal> {
    let options = LocalActivityOptions::builder()
        .start_to_close_timeout(Duration::from_secs(10))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(200))
                .maximum_attempts(5)
                .build(),
        )
        .build();
    match c.execute_local_activity(Verify, req, options).await {
        Ok(Verdict::Allowed(identity)) => Ok(identity),
        Ok(Verdict::Denied { error, who }) => Err(Refusal { error, who }),
        Err(e) => Err(ApiError::new(
            Code::Unavailable,
            format!(
                "could not verify the request: {}",
                crate::shell::root_cause(&e)
            ),
        )
        .into()),
    }
}

/// The worker's own check of a worker-signed request (its keys, its clock), installed once
/// per worker process ([`install_service_check`]).
pub type ServiceCheck = dyn Fn(&VerifyRequest) -> Verdict + Send + Sync;

static SERVICE_CHECK: std::sync::OnceLock<Box<ServiceCheck>> = std::sync::OnceLock::new();

/// Installs the check [`check_service`] runs: the worker does it once at start, with its key
/// store. Returns false when a check was installed already (the first one stays).
pub fn install_service_check(check: Box<ServiceCheck>) -> bool {
    SERVICE_CHECK.set(check).is_ok()
}

/// Checks a worker-signed request (a claim, a release, a VM's power change) in an update
/// *validator*, against the worker's keys and clock, with no local activity.
///
/// A validator runs when its update is first delivered and never on replay: an update the
/// validator refused leaves no trace in history, and one in history as accepted passed the
/// check when it arrived, so the handler acts on it without checking again and a replay never
/// re-checks against keys that rotated since — what the `murmur.verify` local activity's
/// recorded verdict gives, without its round trip inside the workflow task (and without two
/// local activities in flight at once, whose markers a query answered meanwhile can split
/// across workflow tasks). A process that installed no check refuses every such request.
pub fn check_service(req: &VerifyRequest) -> Result<Identity, ApiError> {
    let Some(check) = SERVICE_CHECK.get() else {
        return Err(ApiError::new(
            Code::Unavailable,
            "this worker cannot check worker-signed requests (no key store installed)",
        ));
    };
    match check(req) {
        Verdict::Allowed(identity) => Ok(identity),
        Verdict::Denied { error, who } => {
            tracing::warn!(tenant = %req.tenant, op = %req.op, %who, %error,
                "worker-signed request refused");
            Err(error)
        }
    }
}
