//! A workflow run's context is freed when the run is dropped with an operation still pending.
//! That is what happens to every run the worker evicts from its cache while it waits on a timer
//! or an activity: a queued agent, an agent whose command runs, the pool between rounds.
//! temporalio-workflow 1.1.1 kept such a context alive for the life of the process (the pending
//! operation's cancellation callback held the context it was registered in), and the worker grew
//! by ~20 KB for every agent it had ever run; `vendor/README.md` has the patch.
//!
//! The tests build a run's context the way the SDK's worker does (`BaseWorkflowContext::from_raw`
//! with a host) and watch the host: the context holds it, so the host's reference count says
//! whether the context is still alive.

use std::future::Future;
use std::rc::Rc;
use std::task::{Context, Waker};
use std::time::Duration;

use temporalio_workflow::__private::sdk::{WorkflowHost, WorkflowInit};
use temporalio_workflow::common::data_converters::DataConverter;
use temporalio_workflow::common::protos::coresdk::workflow_activation::InitializeWorkflow;
use temporalio_workflow::common::protos::coresdk::workflow_commands::WorkflowCommand;
use temporalio_workflow::{BaseWorkflowContext, WorkflowCancellationToken};

/// A host that drops the commands the run sends it.
struct DiscardingHost;

impl WorkflowHost for DiscardingHost {
    fn set_current_details(&self, _details: String) {}
    fn push_command(&self, _command: WorkflowCommand) {}
}

/// A fresh run's context, holding `host`.
fn run_context(host: &Rc<DiscardingHost>) -> BaseWorkflowContext {
    let init = WorkflowInit {
        namespace: "default".into(),
        task_queue: "evicted-runs".into(),
        run_id: "run-1".into(),
        initialize_workflow: InitializeWorkflow {
            workflow_type: "Waiting".into(),
            workflow_id: "waiting".into(),
            randomness_seed: 7,
            ..Default::default()
        },
    };
    BaseWorkflowContext::from_raw(
        init,
        DataConverter::default(),
        host.clone(),
        None,
        Vec::new(),
    )
}

#[test]
fn a_run_without_pending_operations_frees_its_context() {
    let host = Rc::new(DiscardingHost);
    let context = run_context(&host);
    assert_eq!(Rc::strong_count(&host), 2, "the context holds the host");
    drop(context);
    assert_eq!(Rc::strong_count(&host), 1);
}

#[test]
fn a_run_dropped_while_its_timer_is_pending_frees_its_context() {
    let host = Rc::new(DiscardingHost);
    let context = run_context(&host);
    let mut timer = Box::pin(context.timer(Duration::from_secs(3600)));
    let poll = timer.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(poll.is_pending(), "nothing resolves the timer");
    // An eviction drops the run's futures and its context, in this order.
    drop(timer);
    drop(context);
    assert_eq!(
        Rc::strong_count(&host),
        1,
        "the context of a run evicted while it waited on a timer is still alive"
    );
}

#[test]
fn a_timer_dropped_while_the_run_goes_on_leaves_nothing_on_its_token() {
    // A timer that loses a `select!` is dropped while the run goes on; the run's context must
    // not keep it (a pool waits on thousands of such timers between two continue-as-new).
    let host = Rc::new(DiscardingHost);
    let context = run_context(&host);
    for _ in 0..3 {
        let mut timer = Box::pin(context.timer(Duration::from_secs(60)));
        let poll = timer.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        assert!(poll.is_pending());
    }
    drop(context);
    assert_eq!(Rc::strong_count(&host), 1);
}

#[test]
fn a_child_token_is_still_cancelled_with_its_parent() {
    // The patch keeps the one registration that must outlive its call: a child token's.
    let parent = WorkflowCancellationToken::new();
    let child = parent.child_token();
    parent.cancel_with_reason("killed");
    assert!(child.is_cancelled());
    assert_eq!(child.reason().as_deref(), Some("killed"));
}
