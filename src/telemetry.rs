//! The worker's logs and traces. Logs go to stderr (text or JSON, `RUST_LOG` filters them,
//! colour only on a terminal and never with `NO_COLOR`). Traces are off unless an OTLP
//! endpoint is given: then every span — the Temporal SDK's own (`RunWorkflow`,
//! `RunActivity`, ...) and murmur's — is also exported over OTLP/gRPC to that collector,
//! through `tracing-opentelemetry`, under the service name `murmur-worker`.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The service name traces are exported under.
pub const SERVICE_NAME: &str = "murmur-worker";

/// How the worker logs and traces.
#[derive(Clone, Debug, Default)]
pub struct TelemetryConfig {
    /// One JSON object per log line instead of text.
    pub json_logs: bool,
    /// Where to export traces (OTLP over gRPC, e.g. `http://127.0.0.1:4317`); `None`: no traces.
    pub otlp_endpoint: Option<String>,
}

/// Why logging or tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// the OTLP trace exporter for {endpoint} could not be built: {reason}
    #[error("the OTLP trace exporter for {endpoint} could not be built: {reason}")]
    Exporter {
        /// The endpoint asked for.
        endpoint: String,
        /// What the exporter said.
        reason: String,
    },
    /// logging could not be set up: {0}
    #[error("logging could not be set up: {0}")]
    Subscriber(String),
}

/// What must be kept while the process runs and shut down at its end (to flush the last
/// traces).
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter, if there is one.
    pub fn shutdown(self) {
        if let Some(provider) = self.traces
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "traces not flushed at exit");
        }
    }
}

/// Sets up the process's logging and, when configured, trace export. Must run inside a
/// Tokio runtime (the OTLP exporter's gRPC client lives on it).
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,temporalio_sdk_core=warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(crate::colour(std::io::IsTerminal::is_terminal(
            &std::io::stderr(),
        )))
        .with_writer(std::io::stderr);
    let logs = if config.json_logs {
        logs.json().boxed()
    } else {
        logs.boxed()
    };
    let traces = config
        .otlp_endpoint
        .as_deref()
        .map(trace_provider)
        .transpose()?;
    let trace_layer = traces
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(SERVICE_NAME)));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(trace_layer)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    Ok(Telemetry { traces })
}

/// A tracer provider that batches spans to the OTLP collector at `endpoint`.
fn trace_provider(endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(SERVICE_NAME)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            crate::VERSION,
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
