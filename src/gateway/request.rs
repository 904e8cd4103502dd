//! What a gateway call signs: the operation, the target, and the request's canonical body.
//!
//! The CLI (and any other client) and the gateway both render the body from the decoded
//! request with [`murmur_workflows::auth::unsigned_body`], so field order on the wire does not
//! matter. The target is `<agent workflow id>@<run id>`: a proof covers one run of one agent,
//! and the run id names the output that is read.

use murmur_workflows::agent::agent_workflow_id;
use murmur_workflows::error::ApiError;
use serde::Serialize;

use super::proto::{ExecStart, LogsRequest};

/// The operation a `Logs` call signs.
pub const LOGS_OP: &str = "agent.logs";
/// The operation an `Exec` call (exec or shell) signs.
pub const EXEC_OP: &str = "agent.exec";
/// The permission `Logs` needs.
pub const LOGS_PERMISSION: &str = "agent.read";
/// The permission `Exec` needs.
pub const EXEC_PERMISSION: &str = murmur_workflows::auth::permissions::AGENT_EDIT;

/// The signed body of a `Logs` call.
#[derive(Serialize)]
pub struct LogsBody<'a> {
    /// The VM.
    pub vm: &'a str,
    /// Start offset.
    pub offset: u64,
    /// Last lines instead.
    pub tail_lines: u32,
    /// Follow.
    pub follow: bool,
}

impl<'a> From<&'a LogsRequest> for LogsBody<'a> {
    fn from(r: &'a LogsRequest) -> Self {
        Self {
            vm: &r.vm,
            offset: r.offset,
            tail_lines: r.tail_lines,
            follow: r.follow,
        }
    }
}

/// The signed body of an `Exec` call.
#[derive(Serialize)]
pub struct ExecBody<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The command.
    pub argv: &'a [String],
    /// The terminal size, for a shell.
    pub tty: Option<(u32, u32)>,
}

impl<'a> From<&'a ExecStart> for ExecBody<'a> {
    fn from(r: &'a ExecStart) -> Self {
        Self {
            vm: &r.vm,
            argv: &r.argv,
            tty: r.tty.map(|t| (t.rows, t.cols)),
        }
    }
}

/// An agent run a call is about, read from its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The tenant (from the workflow id).
    pub tenant: String,
    /// `agent/<tenant>/<workspace>/<developer>/<slug>`.
    pub workflow: String,
    /// The run id: the agent's command and its output go by it.
    pub run: String,
}

impl Target {
    /// The target string a proof signs.
    pub fn render(workflow: &str, run: &str) -> String {
        format!("{workflow}@{run}")
    }

    /// Parses `agent/<tenant>/<workspace>/<developer>/<slug>@<run id>`.
    pub fn parse(target: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::invalid_argument(format!(
                "invalid target {target:?}: expected agent/<tenant>/<workspace>/<developer>/<slug>@<run id>"
            ))
        };
        let (workflow, run) = target.rsplit_once('@').ok_or_else(bad)?;
        let parts: Vec<&str> = workflow.split('/').collect();
        let [kind, tenant, workspace, developer, slug] = parts.as_slice() else {
            return Err(bad());
        };
        if *kind != "agent"
            || agent_workflow_id(tenant, workspace, developer, slug) != workflow
            || !murmur_workflows::model::is_dns_label(tenant)
            || [workspace, developer, slug]
                .iter()
                .any(|p| p.is_empty() || **p == ".." || **p == ".")
            || !murmur_activities::substrate::vm_dir::valid_run_id(run)
        {
            return Err(bad());
        }
        Ok(Self {
            tenant: tenant.to_string(),
            workflow: workflow.to_string(),
            run: run.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_only_in_their_one_shape() {
        let t = Target::parse("agent/acme/web/ana/fix@0b6c-11").unwrap();
        assert_eq!(
            (t.tenant.as_str(), t.workflow.as_str(), t.run.as_str()),
            ("acme", "agent/acme/web/ana/fix", "0b6c-11")
        );
        for bad in [
            "agent/acme/web/ana/fix",
            "pool/acme@r",
            "agent/acme/web/ana@r",
            "agent/../web/ana/fix@r",
            "agent/acme/../ana/fix@r",
            "agent/acme/web/ana/fix@../r",
            "agent/acme/web/ana/fix/x@r",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
