//! The CLI's side of the gateway: find where an agent runs, sign the call, stream.
//!
//! An agent's status (its `status` query) names its VM, run and host; the registry's host
//! view names the host's gateway address. `MURMUR_GATEWAY_CA` (a PEM file) adds a CA to
//! trust for `https://` gateways, beside the system's roots.

use murmur_activities::host_activities::read_hosts;
use murmur_workflows::agent::AgentStatus;
use murmur_workflows::error::{ApiError, Code};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::proto::exec_client_message::Message as In;
use super::proto::gateway_client::GatewayClient;
use super::proto::{
    ExecClientMessage, ExecServerMessage, ExecStart, LogsChunk, LogsRequest, Proof, WindowSize,
};
use super::request::{EXEC_OP, ExecBody, LOGS_OP, LogsBody, Target};
use crate::agents::AgentClient;
use crate::config::Context;

/// Where an agent runs, as the CLI found it.
#[derive(Clone, Debug)]
pub struct Located {
    /// The agent's status when it was looked up.
    pub status: AgentStatus,
    /// `<workflow id>@<run id>`: what a call signs.
    pub target: String,
    /// The agent's VM.
    pub vm: String,
    /// Its host.
    pub host: String,
    /// The host's gateway address.
    pub gateway: String,
}

/// Finds agent `slug`'s VM, host and gateway.
pub async fn locate(
    agents: &AgentClient,
    client: &temporalio_client::Client,
    slug: &str,
) -> Result<Located, ApiError> {
    let (status, run_id) = agents.status_of_run(slug).await?;
    let Some(vm) = status.vm.clone() else {
        return Err(ApiError::failed_precondition(format!(
            "agent {slug} has no VM yet; it is waiting for one (murmur status {slug})"
        )));
    };
    let run = status.run.clone().unwrap_or(run_id);
    let Some(host) = status.host.clone() else {
        return Err(ApiError::failed_precondition(format!(
            "agent {slug} does not say which host runs its VM (it was started by an older \
             worker); its output is only in murmur status {slug}"
        )));
    };
    let view = read_hosts(client, &crate::client::task_queue()).await?;
    let info = view.hosts.get(&host).ok_or_else(|| {
        ApiError::new(
            Code::Unavailable,
            format!("host {host} of agent {slug} is not in the host registry"),
        )
    })?;
    if info.gateway.is_empty() {
        return Err(ApiError::new(
            Code::Unavailable,
            format!("host {host} serves no gateway (its worker is older than this CLI)"),
        ));
    }
    Ok(Located {
        target: Target::render(&status.workflow, &run),
        vm: vm.0,
        host,
        gateway: info.gateway.clone(),
        status,
    })
}

/// A gRPC failure as the `CODE: reason` line the gateway sent, or `UNAVAILABLE`.
pub fn api_error(gateway: &str, status: tonic::Status) -> ApiError {
    ApiError::find_in(status.message()).unwrap_or_else(|| {
        let code = match status.code() {
            tonic::Code::Unauthenticated => Code::Unauthenticated,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::NotFound => Code::NotFound,
            tonic::Code::InvalidArgument => Code::InvalidArgument,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            _ => Code::Unavailable,
        };
        ApiError::new(code, format!("gateway {gateway}: {}", status.message()))
    })
}

/// Connects to a gateway.
pub async fn connect(gateway: &str) -> Result<GatewayClient<Channel>, ApiError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::new(Code::Unavailable, format!("gateway {gateway}: {e}"))
    };
    let mut endpoint = Endpoint::from_shared(gateway.to_string()).map_err(|e| unavailable(&e))?;
    if gateway.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Ok(ca) = std::env::var("MURMUR_GATEWAY_CA") {
            let pem = std::fs::read(&ca).map_err(|e| {
                ApiError::invalid_argument(format!("MURMUR_GATEWAY_CA: read {ca}: {e}"))
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| unavailable(&e))?;
    }
    let channel = endpoint.connect().await.map_err(|e| unavailable(&e))?;
    Ok(GatewayClient::new(channel))
}

fn proof(credential: murmur_workflows::auth::Credential) -> Proof {
    Proof {
        token: credential.token.unwrap_or_default(),
        request_id: credential.request_id,
        ts: credential.ts,
        sig: credential.sig,
    }
}

/// What `murmur logs` asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogsOptions {
    /// The last N lines (0: everything).
    pub tail_lines: u32,
    /// Go on until the command has exited.
    pub follow: bool,
}

/// How a `Logs` stream ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogsEnd {
    /// The command has exited: the output is complete.
    pub complete: bool,
    /// Its exit code, when the host still knew it.
    pub exit_code: Option<i32>,
}

/// Streams an agent's output into `sink`; answers how the stream ended.
pub async fn logs(
    ctx: &Context,
    at: &Located,
    options: LogsOptions,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<LogsEnd, ApiError> {
    let mut req = LogsRequest {
        proof: None,
        target: at.target.clone(),
        vm: at.vm.clone(),
        offset: 0,
        tail_lines: options.tail_lines,
        follow: options.follow,
    };
    req.proof = Some(proof(ctx.sign(
        LOGS_OP,
        &at.target,
        &LogsBody::from(&req),
    )?));
    let mut client = connect(&at.gateway).await?;
    let mut stream = client
        .logs(req)
        .await
        .map_err(|s| api_error(&at.gateway, s))?
        .into_inner();
    let mut end = LogsEnd::default();
    while let Some(LogsChunk {
        data,
        complete,
        exit_code,
        ..
    }) = stream
        .message()
        .await
        .map_err(|s| api_error(&at.gateway, s))?
    {
        sink(&data).map_err(|e| ApiError::new(Code::Internal, format!("write output: {e}")))?;
        if complete {
            end = LogsEnd {
                complete,
                exit_code,
            };
        }
    }
    Ok(end)
}

/// A started exec session: send into `input`, read `output`.
pub struct ExecCall {
    /// Messages for the session (stdin, end of stdin, resizes, signals).
    pub input: mpsc::Sender<ExecClientMessage>,
    /// The session's answers.
    pub output: tonic::Streaming<ExecServerMessage>,
}

/// One message into a session.
pub fn message(m: In) -> ExecClientMessage {
    ExecClientMessage { message: Some(m) }
}

/// Starts `argv` next to the agent (under a terminal of `tty` size for a shell).
pub async fn exec(
    ctx: &Context,
    at: &Located,
    argv: Vec<String>,
    tty: Option<(u16, u16)>,
) -> Result<ExecCall, ApiError> {
    let mut start = ExecStart {
        proof: None,
        target: at.target.clone(),
        vm: at.vm.clone(),
        argv,
        tty: tty.map(|(rows, cols)| WindowSize {
            rows: rows.into(),
            cols: cols.into(),
        }),
    };
    start.proof = Some(proof(ctx.sign(
        EXEC_OP,
        &at.target,
        &ExecBody::from(&start),
    )?));
    let mut client = connect(&at.gateway).await?;
    let (input, rx) = mpsc::channel(64);
    input
        .send(message(In::Start(start)))
        .await
        .map_err(|_| ApiError::new(Code::Internal, "exec: the request stream closed"))?;
    let output = client
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| api_error(&at.gateway, s))?
        .into_inner();
    Ok(ExecCall { input, output })
}
