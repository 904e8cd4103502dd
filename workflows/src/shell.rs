//! What every workflow shell shares: workflow ids, time, waiting on many futures in a
//! deterministic order, reading activity failures, and the error type of update handlers.
//!
//! Nothing here knows one workflow from another, so the workflow files import this module
//! and never each other's helpers (no import circles between them).

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use temporalio_sdk::{ActivityExecutionError, WorkflowContext};

use crate::error::ApiError;
use crate::model::Millis;

/// Boot deadline of one VM: create plus readiness handshake.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an activity on a host's queue may wait to be picked up before the host counts as
/// unreachable for it (the registry's lease decides whether the host is lost).
pub const HOST_START_WITHIN: Duration = Duration::from_secs(30);

/// Error type of update handlers, as the SDK wants it.
pub type UpdateError = Box<dyn Error + Send + Sync>;

/// Workflow id of a tenant's pool.
pub fn pool_workflow_id(tenant: &str) -> String {
    format!("pool/{tenant}")
}

/// Workflow id of a tenant's nuke.
pub fn nuke_workflow_id(tenant: &str) -> String {
    format!("nuke/{tenant}")
}

/// An [`ApiError`] as an update handler's error.
pub fn boxed(e: ApiError) -> UpdateError {
    Box::new(e)
}

/// Resolves with the first finished future, polling in insertion order (deterministic), and
/// removes it. Pending forever while the list is empty.
pub fn next_finished<'a, 'b, T>(
    list: &'a mut Vec<LocalBoxFuture<'b, T>>,
) -> impl Future<Output = T> + 'a {
    futures::future::poll_fn(move |cx| {
        for i in 0..list.len() {
            if let Poll::Ready(v) = Pin::new(&mut list[i]).poll(cx) {
                drop(list.remove(i));
                return Poll::Ready(v);
            }
        }
        Poll::Pending
    })
}

/// Resolves with *every* future of the lists that is ready, in list order and insertion
/// order, removing them; pending while none is. Everything that resolved in one workflow
/// activation is therefore handled in that activation, in an order that depends only on the
/// order the futures were started in, never on which one happened to be polled first.
pub fn all_ready<'a, 'b, T>(
    lists: [&'a mut Vec<LocalBoxFuture<'b, T>>; 2],
) -> impl Future<Output = Vec<T>> + 'a {
    let [first, second] = lists;
    futures::future::poll_fn(move |cx| {
        let mut ready = Vec::new();
        for list in [&mut *first, &mut *second] {
            let mut i = 0;
            while i < list.len() {
                if let Poll::Ready(v) = Pin::new(&mut list[i]).poll(cx) {
                    drop(list.remove(i));
                    ready.push(v);
                } else {
                    i += 1;
                }
            }
        }
        if ready.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(ready)
        }
    })
}

/// A future that resolves once every update handler has finished, when `wanted`; pending
/// forever otherwise.
pub fn handlers_finished_if<W>(c: &WorkflowContext<W>, wanted: bool) -> LocalBoxFuture<'_, ()> {
    if !wanted {
        return futures::future::pending().boxed_local();
    }
    let c2 = c.clone();
    async move {
        let _ = c2.wait_condition(|_| c2.all_handlers_finished()).await;
    }
    .boxed_local()
}

/// Resolves with `value` after `ms` of workflow time (a durable timer).
pub fn after<'a, W, T: 'a>(
    c: &'a WorkflowContext<W>,
    ms: Millis,
    value: T,
) -> LocalBoxFuture<'a, T> {
    let t = c.timer(Duration::from_millis(ms.max(1)));
    async move {
        t.await;
        value
    }
    .boxed_local()
}

/// The innermost failure message of an activity error (what the activity itself said).
pub fn root_cause(e: &ActivityExecutionError) -> String {
    let mut msg = e.to_string();
    if let Some(f) = e.failure() {
        msg = f.message.clone();
        let mut cause = f.cause.as_deref();
        while let Some(c) = cause {
            if !c.message.is_empty() {
                msg = c.message.clone();
            }
            cause = c.cause.as_deref();
        }
    }
    msg
}

/// The message of the first application failure in an activity error's cause chain (what
/// the activity said, whole), or the innermost message when there is none.
pub fn application_message(e: &ActivityExecutionError) -> String {
    use temporalio_common::protos::temporal::api::failure::v1::failure::FailureInfo;
    let mut failure = e.failure();
    while let Some(f) = failure {
        if matches!(f.failure_info, Some(FailureInfo::ApplicationFailureInfo(_))) {
            return f.message.clone();
        }
        failure = f.cause.as_deref();
    }
    root_cause(e)
}

/// True when an activity failed with an application failure of type `type_name` (anywhere
/// in the cause chain).
pub fn failed_with_type(e: &ActivityExecutionError, type_name: &str) -> bool {
    use temporalio_common::protos::temporal::api::failure::v1::failure::FailureInfo;
    let mut failure = e.failure();
    while let Some(f) = failure {
        if let Some(FailureInfo::ApplicationFailureInfo(info)) = &f.failure_info
            && info.r#type == type_name
        {
            return true;
        }
        failure = f.cause.as_deref();
    }
    false
}

/// True when an activity failed because no worker picked it up in time (its host does not
/// poll its queue), so it never ran.
pub fn never_started(e: &ActivityExecutionError) -> bool {
    use temporalio_common::protos::temporal::api::enums::v1::TimeoutType;
    use temporalio_common::protos::temporal::api::failure::v1::failure::FailureInfo;
    let mut failure = e.failure();
    while let Some(f) = failure {
        if let Some(FailureInfo::TimeoutFailureInfo(t)) = &f.failure_info
            && t.timeout_type == TimeoutType::ScheduleToStart as i32
        {
            return true;
        }
        failure = f.cause.as_deref();
    }
    false
}

/// Epoch milliseconds of a workflow time (0 when unknown).
pub fn to_millis(t: Option<SystemTime>) -> Millis {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as Millis)
}

/// The workflow's current time in epoch milliseconds (written down, never compared).
pub fn now_ms<W>(c: &WorkflowContext<W>) -> Millis {
    to_millis(c.workflow_time())
}
