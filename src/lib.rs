//! murmur: a control plane for warm pools of agent VMs on Temporal.
//!
//! # Layout
//!
//! - [`config`]: `.murmur/` discovery and the resolved [`config::Context`].
//! - [`client`]: connecting to Temporal and the pool operations the CLI offers.
//! - [`agents`]: the agent operations the CLI offers (spawn, kill, status, ls, wait).
//! - [`hosts`]: `murmur host ls | drain`: the deployment's VM hosts.
//! - [`bake`]: `murmur bake`: recipes, starting or joining a bake, following it.
//! - [`duration`]: durations on command lines (`30s`, `1h30m`, `500ms`).
//! - [`progress`]: spinners / progress lines on long waits, Ctrl-C that stops waiting only.
//! - [`output`]: the normative output lines, status table and YAML documents.
//! - [`gateway`]: the host gateway (`murmur logs`, `exec`, `shell`): its protocol, the
//!   worker's service and the CLI's side.
//! - [`metrics`]: the worker's `/metrics`, `/healthz` and `/readyz` endpoint.
//! - [`telemetry`]: the worker's logs and its OpenTelemetry traces (off unless an OTLP
//!   endpoint is given).
//! - [`worker`]: the `murmur-worker` process.
//!
//! The binaries in `src/bin/` are thin adapters over these modules. The workflows (pure,
//! deterministic) live in the `murmur-workflows` crate, the side effects (substrates,
//! activities) in `murmur-activities`.
#![deny(missing_docs)]

pub mod agents;
pub mod bake;
pub mod client;
pub mod config;
pub mod duration;
pub mod gateway;
pub mod hosts;
pub mod metrics;
pub mod output;
pub mod progress;
pub mod telemetry;
pub mod worker;

/// Exit status of a failed operation (any `CODE: reason` error).
pub const EXIT_FAILURE: i32 = 1;

/// This build's version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit this build was made from (`unknown` outside a git checkout).
pub const COMMIT: &str = env!("MURMUR_COMMIT");
/// Exit status of a malformed command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when Temporal cannot be reached.
pub const EXIT_UNAVAILABLE: i32 = 69;

/// What pool commands print on an agent VM.
pub const ON_VM_MESSAGE: &str = "pool commands are not supported on VMs";

/// True when running inside a murmur VM (pool commands refuse to run there).
pub fn on_vm() -> bool {
    std::env::var("MURMUR_VM").is_ok_and(|v| v == "1")
        || std::path::Path::new("/etc/murmur/vm").exists()
}

/// True when output to a stream may carry colour: the stream is a terminal and `NO_COLOR` is
/// unset or empty (<https://no-color.org>).
pub fn colour(stream_is_terminal: bool) -> bool {
    stream_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Hint printed under an error, per code.
pub fn hint(code: murmur_workflows::error::Code) -> Option<&'static str> {
    use murmur_workflows::error::Code;
    match code {
        Code::Unauthenticated => {
            Some("Run murmur auth or check your murmur.local.yaml configuration.")
        }
        Code::PermissionDenied => Some("Ask a tenant admin to grant you the required permission."),
        _ => None,
    }
}
