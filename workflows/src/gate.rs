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
