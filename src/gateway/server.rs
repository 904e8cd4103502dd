//! The gateway's gRPC service on a worker host: `Logs` reads an agent's output through the
//! substrate (following by polling it), `Exec` runs a session next to the agent.
//!
//! Every call is checked by the [`Guard`] first; then the VM named must be the agent's on
//! this host (its owner record is the target the proof signed). An ended agent's VM is gone:
//! its output is read from what the host kept.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use murmur_activities::substrate::session::{
    ExecInput, ExecOutput, ExecSpec, MAX_READ, OutputChunk, WindowSize,
};
use murmur_activities::substrate::{Provider, SubstrateError};
use murmur_workflows::error::{ApiError, Code};
use murmur_workflows::model::VmId;
use tonic::{Request, Response, Status, Streaming};

use super::guard::{Ask, Guard};
use super::proto::exec_client_message::Message as In;
use super::proto::exec_server_message::Message as Out;
use super::proto::gateway_server::Gateway;
use super::proto::{ExecClientMessage, ExecServerMessage, LogsChunk, LogsRequest};
use super::request::{
    EXEC_OP, EXEC_PERMISSION, ExecBody, LOGS_OP, LOGS_PERMISSION, LogsBody, Target,
};

/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The gateway of one host.
pub struct GatewayService {
    provider: Arc<dyn Provider>,
    guard: Arc<Guard>,
    host: String,
}

impl GatewayService {
    /// The gateway of host `host`, over its substrate.
    pub fn new(provider: Arc<dyn Provider>, guard: Arc<Guard>, host: String) -> Self {
        Self {
            provider,
            guard,
            host,
        }
    }

    /// Whether `vm` is the agent's VM on this host: `Ok(true)` when it is there and owned by
    /// the target, `Ok(false)` when this host has no such VM, an error when another agent
    /// owns it.
    async fn vm_of(&self, target: &Target, signed: &str, vm: &VmId) -> Result<bool, ApiError> {
        let vms = self
            .provider
            .list(&target.tenant)
            .await
            .map_err(substrate_error)?;
        match vms.into_iter().find(|v| &v.id == vm) {
            None => Ok(false),
            Some(info) if info.owner.as_deref() == Some(signed) && info.alive => Ok(true),
            Some(info) if info.owner.as_deref() == Some(signed) => Ok(false),
            Some(_) => Err(ApiError::new(
                Code::PermissionDenied,
                format!("VM {vm} is not the VM of {}", target.workflow),
            )),
        }
    }
}

/// A substrate failure as the caller sees it.
fn substrate_error(e: SubstrateError) -> ApiError {
    match e {
        SubstrateError::VmGone(vm) => ApiError::not_found(format!(
            "VM {vm} is gone and this host keeps no output of the agent"
        )),
        SubstrateError::Invalid { what, value } => {
            ApiError::invalid_argument(format!("invalid {what}: {value}"))
        }
        SubstrateError::Asleep(vm) => ApiError::failed_precondition(format!(
            "VM {vm} is asleep: wake its agent first (murmur wake <slug>)"
        )),
        e => ApiError::new(Code::Unavailable, e.to_string()),
    }
}

/// An API error as a gRPC status: the matching code, and the `CODE: reason` line as the
/// message (what the CLI prints).
pub fn status_of(e: &ApiError) -> Status {
    let code = match e.code {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::Internal => tonic::Code::Internal,
        Code::Unavailable => tonic::Code::Unavailable,
    };
    Status::new(code, e.to_string())
}

fn vm_id(vm: &str) -> Result<VmId, ApiError> {
    if murmur_activities::substrate::vm_dir::valid_run_id(vm) {
        Ok(VmId(vm.to_string()))
    } else {
        Err(ApiError::invalid_argument(format!("invalid VM id {vm:?}")))
    }
}

/// A stream of gRPC messages.
type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Where a `Logs` stream stands between two messages.
struct Follow {
    provider: Arc<dyn Provider>,
    tenant: String,
    vm: VmId,
    run: String,
    offset: u64,
    follow: bool,
    done: bool,
}

impl Follow {
    async fn read(&self) -> Result<OutputChunk, Status> {
        self.provider
            .read_output(&self.tenant, &self.vm, &self.run, self.offset, MAX_READ)
            .await
            .map_err(|e| status_of(&substrate_error(e)))
    }

    /// The run's exit code, while its VM still knows it.
    async fn exit_code(&self) -> Option<i32> {
        match self
            .provider
            .command_status(&self.tenant, &self.vm, &self.run)
            .await
        {
            Ok(murmur_activities::substrate::CommandStatus::Exited(code)) => Some(code),
            _ => None,
        }
    }

    /// The next message: new bytes, or the end. Waits (polling) while following and nothing
    /// new was written.
    async fn next(mut self) -> Option<(Result<LogsChunk, Status>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let chunk = match self.read().await {
                Ok(chunk) => chunk,
                Err(status) => {
                    self.done = true;
                    return Some((Err(status), self));
                }
            };
            let at_end = chunk.next >= chunk.size;
            let last = at_end && (chunk.complete || !self.follow);
            if !chunk.data.is_empty() || last {
                self.offset = chunk.next;
                self.done = last;
                let complete = last && chunk.complete;
                let exit_code = match complete {
                    true => self.exit_code().await,
                    false => None,
                };
                let msg = LogsChunk {
                    data: chunk.data,
                    next: chunk.next,
                    complete,
                    exit_code,
                };
                return Some((Ok(msg), self));
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// The offset where the last `lines` lines of a run's output start.
async fn tail_offset(
    provider: &dyn Provider,
    tenant: &str,
    vm: &VmId,
    run: &str,
    lines: u32,
) -> Result<u64, ApiError> {
    let size = provider
        .read_output(tenant, vm, run, u64::MAX, 0)
        .await
        .map_err(substrate_error)?
        .size;
    let mut window = 64 * 1024u64;
    loop {
        let start = size.saturating_sub(window);
        let mut data = Vec::new();
        let mut at = start;
        while at < size {
            let chunk = provider
                .read_output(tenant, vm, run, at, MAX_READ)
                .await
                .map_err(substrate_error)?;
            if chunk.data.is_empty() {
                break;
            }
            at = chunk.next;
            data.extend(chunk.data);
        }
        // Newlines that end a line; a final unterminated line counts as one.
        let body = data.strip_suffix(b"\n").unwrap_or(&data);
        let mut seen = 0;
        for (i, b) in body.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen == lines {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        if start == 0 {
            return Ok(0);
        }
        window *= 4;
    }
}

/// Aborts a task when dropped (the exec stream's input forwarder ends with the stream).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn window(size: super::proto::WindowSize) -> WindowSize {
    WindowSize {
        rows: size.rows.min(u16::MAX as u32) as u16,
        cols: size.cols.min(u16::MAX as u32) as u16,
    }
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    type LogsStream = Answers<LogsChunk>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = request.into_inner();
        let body = murmur_workflows::auth::unsigned_body(&LogsBody::from(&req));
        let (target, identity) = self
            .guard
            .check(Ask {
                op: LOGS_OP,
                permission: LOGS_PERMISSION,
                target: &req.target,
                body,
                proof: req.proof.as_ref(),
            })
            .map_err(|e| status_of(&e))?;
        let vm = vm_id(&req.vm).map_err(|e| status_of(&e))?;
        // A live VM must be the agent's; a gone one is read from the kept output by run id.
        self.vm_of(&target, &req.target, &vm)
            .await
            .map_err(|e| status_of(&e))?;
        tracing::info!(target = %req.target, developer = %identity.developer, follow = req.follow, "gateway: logs");
        let offset = if req.tail_lines > 0 {
            tail_offset(
                self.provider.as_ref(),
                &target.tenant,
                &vm,
                &target.run,
                req.tail_lines,
            )
            .await
            .map_err(|e| status_of(&e))?
        } else {
            req.offset
        };
        let state = Follow {
            provider: self.provider.clone(),
            tenant: target.tenant,
            vm,
            run: target.run,
            offset,
            follow: req.follow,
            done: false,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            Follow::next,
        ))))
    }

    type ExecStream = Answers<ExecServerMessage>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecClientMessage>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let mut incoming = request.into_inner();
        let start = match incoming.message().await? {
            Some(ExecClientMessage {
                message: Some(In::Start(start)),
            }) => start,
            _ => {
                return Err(status_of(&ApiError::invalid_argument(
                    "the first message of an exec must be its start",
                )));
            }
        };
        let body = murmur_workflows::auth::unsigned_body(&ExecBody::from(&start));
        let (target, identity) = self
            .guard
            .check(Ask {
                op: EXEC_OP,
                permission: EXEC_PERMISSION,
                target: &start.target,
                body,
                proof: start.proof.as_ref(),
            })
            .map_err(|e| status_of(&e))?;
        let vm = vm_id(&start.vm).map_err(|e| status_of(&e))?;
        if !self
            .vm_of(&target, &start.target, &vm)
            .await
            .map_err(|e| status_of(&e))?
        {
            return Err(status_of(&ApiError::failed_precondition(format!(
                "the agent's VM {vm} is not running on host {}",
                self.host
            ))));
        }
        let slug = target.workflow.rsplit('/').next().unwrap_or_default();
        let spec = ExecSpec {
            argv: start.argv.clone(),
            env: vec![("MURMUR_AGENT".into(), slug.to_string())],
            tty: start.tty.map(window),
        };
        let session = self
            .provider
            .exec(&target.tenant, &vm, &spec)
            .await
            .map_err(|e| status_of(&substrate_error(e)))?;
        tracing::info!(target = %start.target, developer = %identity.developer, argv = ?start.argv, tty = start.tty.is_some(), "gateway: exec");
        let input = session.input;
        // Forwards what the caller sends. A caller that half-closes keeps the session (its
        // output is still read); one that breaks off ends it, since the forwarder (and with it
        // the input sender) is dropped with the answer stream.
        let forwarder = tokio::spawn(async move {
            while let Ok(Some(msg)) = incoming.message().await {
                let forwarded = match msg.message {
                    Some(In::Stdin(bytes)) => ExecInput::Stdin(bytes),
                    Some(In::StdinEnd(_)) => ExecInput::StdinEnd,
                    Some(In::Resize(size)) => ExecInput::Resize(window(size)),
                    Some(In::Signal(n)) => ExecInput::Signal(n),
                    Some(In::Start(_)) | None => continue,
                };
                if input.send(forwarded).await.is_err() {
                    return;
                }
            }
            // Half-closed: hold the input open (this task owns it) until the session ends
            // with the stream, which aborts the task.
            std::future::pending::<()>().await;
        });
        let state = (session.output, AbortOnDrop(forwarder));
        let answers = futures::stream::unfold(state, |(mut output, guard)| async move {
            let msg = output.recv().await?;
            let out = match msg {
                ExecOutput::Stdout(b) => Out::Stdout(b),
                ExecOutput::Stderr(b) => Out::Stderr(b),
                ExecOutput::Exit(code) => Out::Exit(code),
            };
            Some((
                Ok(ExecServerMessage { message: Some(out) }),
                (output, guard),
            ))
        });
        Ok(Response::new(answers.boxed()))
    }
}
