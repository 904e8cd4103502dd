//! A workflow run's context is freed when the run is dropped with an operation still pending.
//! That is what happens to every run the worker evicts from its cache while it waits on a timer
//! or an activity: a queued agent, an agent whose command runs, the pool between rounds.
//! temporalio-workflow 1.1.1 kept such a context alive for the life of the process (the pending
//! operation's cancellation callback held the context it was registered in), and the worker grew
//! by ~20 KB for every agent it had ever run; `vendor/README.md` has the patch. The patch must not
//! change the commands a run issues, or histories recorded before it would not replay.
//!
//! The tests build a run's context the way the SDK's worker does (`BaseWorkflowContext::from_raw`
//! with a host) and watch the host: the context holds it, so the host's reference count says
//! whether the context is still alive, and the host keeps the commands the run sent.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Waker};
use std::time::Duration;

use temporalio_workflow::__private::sdk::{WorkflowHost, WorkflowInit};
use temporalio_workflow::common::data_converters::DataConverter;
use temporalio_workflow::common::protos::coresdk::workflow_activation::InitializeWorkflow;
use temporalio_workflow::common::protos::coresdk::workflow_commands::{
    WorkflowCommand, workflow_command::Variant,
};
use temporalio_workflow::{BaseWorkflowContext, TimerResult};

/// A host that keeps the commands the run sends it.
#[derive(Default)]
struct RecordingHost {
    commands: RefCell<Vec<WorkflowCommand>>,
}

impl RecordingHost {
    /// The sequence numbers of the `CancelTimer` commands sent so far.
    fn cancelled_timers(&self) -> Vec<u32> {
        self.commands
            .borrow()
            .iter()
            .filter_map(|c| match &c.variant {
                Some(Variant::CancelTimer(cancel)) => Some(cancel.seq),
                _ => None,
            })
            .collect()
    }
}

impl WorkflowHost for RecordingHost {
    fn set_current_details(&self, _details: String) {}
    fn push_command(&self, command: WorkflowCommand) {
        self.commands.borrow_mut().push(command);
    }
}

/// A fresh run's context, holding `host`.
fn run_context(host: &Rc<RecordingHost>) -> BaseWorkflowContext {
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

/// A timer of `context`'s run, polled once: its command sent and its cancellation registered.
fn pending_timer(
    context: &BaseWorkflowContext,
    duration: Duration,
) -> Pin<Box<dyn Future<Output = TimerResult>>> {
    let mut timer: Pin<Box<dyn Future<Output = TimerResult>>> = Box::pin(context.timer(duration));
    let poll = timer.as_mut().poll(&mut Context::from_waker(Waker::noop()));
    assert!(poll.is_pending(), "nothing resolves the timer");
    timer
}

#[test]
fn a_run_without_pending_operations_frees_its_context() {
    let host = Rc::new(RecordingHost::default());
    let context = run_context(&host);
    assert_eq!(Rc::strong_count(&host), 2, "the context holds the host");
    drop(context);
    assert_eq!(Rc::strong_count(&host), 1);
}

#[test]
fn a_run_dropped_while_its_timer_is_pending_frees_its_context() {
    let host = Rc::new(RecordingHost::default());
    let context = run_context(&host);
    let timer = pending_timer(&context, Duration::from_secs(3600));
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
fn timers_dropped_while_the_run_goes_on_do_not_keep_its_context() {
    // A timer that loses a `select!` is dropped while the run goes on (a pool waits on
    // thousands of them between two continue-as-new).
    let host = Rc::new(RecordingHost::default());
    let context = run_context(&host);
    for _ in 0..3 {
        drop(pending_timer(&context, Duration::from_secs(60)));
    }
    drop(context);
    assert_eq!(Rc::strong_count(&host), 1);
}

#[test]
fn a_workflow_cancelled_after_dropping_a_pending_timer_still_cancels_it() {
    // What the SDK did before the patch, and histories recorded then hold: cancelling the
    // workflow cancels every timer still pending, dropped or not.
    let host = Rc::new(RecordingHost::default());
    let context = run_context(&host);
    let dropped = pending_timer(&context, Duration::from_secs(60));
    drop(dropped);
    context.cancellation_token().cancel();
    assert_eq!(host.cancelled_timers(), vec![1]);
}
