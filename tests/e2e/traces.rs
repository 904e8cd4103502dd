//! OpenTelemetry traces: a worker started with `MURMUR_OTLP_ENDPOINT` exports the Temporal
//! SDK's spans (and murmur's) over OTLP/gRPC. A collector of the test's own receives them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{EnvOptions, PATIENCE, TestEnv, warm};
use murmur_workflows::agent::Phase;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// (service name, span name) of every span received.
type Received = Arc<Mutex<BTreeSet<(String, String)>>>;

/// An OTLP trace collector that records what it receives.
struct Collector(Received);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.insert((service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Starts a collector on a free loopback port, on a thread of its own; returns its
/// endpoint and what it receives.
fn start_collector() -> (String, Received) {
    let received = Received::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    listener.set_nonblocking(true).expect("non-blocking");
    let service = TraceServiceServer::new(Collector(received.clone()));
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("collector runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("collector serves");
        });
    });
    (format!("http://{addr}"), received)
}

#[test]
fn a_worker_exports_its_spans_over_otlp_when_asked() {
    let (endpoint, received) = start_collector();
    let env = TestEnv::start_with(
        "traces",
        EnvOptions::default().worker("MURMUR_OTLP_ENDPOINT", &endpoint),
    );
    env.set_workspace("default", "min_idle: 1\n");
    env.wait_for("1 warm VM", |s| warm(s) == 1);
    env.spawn("traced", "true");
    env.wait_phase("traced", Phase::Completed);
    // A span is exported when it ends, in batches (every 5 s): the VM's boot, the agent's
    // command, and the agent's workflow run (the pool's run never ends, so neither does its
    // span).
    let wanted = [
        "RunActivity:murmur.boot_vm",
        "RunActivity:murmur.run_agent",
        "RunWorkflow:AgentWorkflow",
    ];
    let deadline = Instant::now() + PATIENCE;
    loop {
        let names: BTreeSet<String> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|(service, _)| service == "murmur-worker")
            .map(|(_, name)| name.clone())
            .collect();
        if wanted.iter().all(|w| names.contains(*w)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the collector never received {wanted:?}; it has {names:?}\n{}",
            env.worker_log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        env.worker_log().contains("exporting traces over OTLP"),
        "the worker does not say it exports traces"
    );
}
