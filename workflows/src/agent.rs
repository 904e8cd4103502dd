//! Agents as plain data: phases, what a spawn asks for, what status shows, and the workflow id
//! scheme. Shared by the agent workflow, the CLI and the tests.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::model::{VmId, is_dns_label};

/// Where an agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Claiming a warm VM or waiting for one to boot.
    #[serde(rename = "PHASE_STARTING")]
    Starting,
    /// The command runs in the VM.
    #[serde(rename = "PHASE_RUNNING")]
    Running,
    /// The command exited.
    #[serde(rename = "PHASE_TASK_COMPLETE")]
    TaskComplete,
    /// Kept alive with its VM after the command (`--on-idle keep-alive`), until killed.
    #[serde(rename = "PHASE_IDLE")]
    Idle,
    /// Its VM is asleep (`murmur sleep`, or `--on-idle sleep` once the command exited):
    /// nothing in it runs, everything in it is kept; `murmur wake` resumes it.
    #[serde(rename = "PHASE_SLEEPING")]
    Sleeping,
    /// Its VM is being destroyed.
    #[serde(rename = "PHASE_DESTROYING")]
    Destroying,
    /// Ended normally (the command exited 0).
    #[serde(rename = "PHASE_COMPLETED")]
    Completed,
    /// Ended in error (no VM, or the command exited non-zero).
    #[serde(rename = "PHASE_FAILED")]
    Failed,
    /// Killed.
    #[serde(rename = "PHASE_CANCELED")]
    Canceled,
}

impl Phase {
    /// Every phase, in lifecycle order.
    pub const ALL: [Phase; 9] = [
        Phase::Starting,
        Phase::Running,
        Phase::TaskComplete,
        Phase::Idle,
        Phase::Sleeping,
        Phase::Destroying,
        Phase::Completed,
        Phase::Failed,
        Phase::Canceled,
    ];

    /// The API name (`PHASE_RUNNING`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "PHASE_STARTING",
            Self::Running => "PHASE_RUNNING",
            Self::TaskComplete => "PHASE_TASK_COMPLETE",
            Self::Idle => "PHASE_IDLE",
            Self::Sleeping => "PHASE_SLEEPING",
            Self::Destroying => "PHASE_DESTROYING",
            Self::Completed => "PHASE_COMPLETED",
            Self::Failed => "PHASE_FAILED",
            Self::Canceled => "PHASE_CANCELED",
        }
    }

    /// The lower-case name `murmur ls` shows (`task-complete`).
    pub fn short(self) -> String {
        self.as_str()["PHASE_".len()..]
            .to_ascii_lowercase()
            .replace('_', "-")
    }

    /// Parses `PHASE_RUNNING`, `running`, `task-complete` or `task_complete`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let want = s
            .trim()
            .to_ascii_uppercase()
            .replace('-', "_")
            .trim_start_matches("PHASE_")
            .to_string();
        Self::ALL
            .into_iter()
            .find(|p| p.as_str()["PHASE_".len()..] == want)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(|p| p.short()).collect();
                ApiError::invalid_argument(format!(
                    "unknown phase {s:?} (expected one of {})",
                    names.join(", ")
                ))
            })
    }

    /// True for the phases an agent never leaves.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent does once its command exits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnIdle {
    /// Destroy the VM and end (the default).
    #[default]
    Terminate,
    /// Stay in `PHASE_IDLE` with the VM until killed.
    #[serde(alias = "keep_alive")]
    KeepAlive,
    /// Put the VM to sleep and stay in `PHASE_SLEEPING` until woken or killed.
    Sleep,
}

impl OnIdle {
    /// The CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Terminate => "terminate",
            Self::KeepAlive => "keep-alive",
            Self::Sleep => "sleep",
        }
    }

    /// Parses the CLI spelling (`keep_alive` too).
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s.trim() {
            "terminate" => Ok(Self::Terminate),
            "keep-alive" | "keep_alive" => Ok(Self::KeepAlive),
            "sleep" => Ok(Self::Sleep),
            other => Err(ApiError::invalid_argument(format!(
                "unknown --on-idle {other:?} (expected sleep, keep-alive or terminate)"
            ))),
        }
    }
}

/// What a spawn asks for: the agent workflow's input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInput {
    /// Tenant.
    pub tenant: String,
    /// Workspace whose VMs it runs on.
    pub workspace: String,
    /// Developer who spawned it.
    pub developer: String,
    /// The agent's name (a DNS label).
    pub slug: String,
    /// The command to run in the VM.
    pub command: Vec<String>,
    /// What happens after the command exits.
    #[serde(default)]
    pub on_idle: OnIdle,
    /// The developer's signed spawn request.
    #[serde(default)]
    pub auth: Option<crate::auth::Credential>,
}

/// Input of the agent's `sleep` and `wake` updates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PowerRequest {
    /// The developer's signed request, for `<workflow id>@<run id>` (this run only).
    pub auth: Option<crate::auth::Credential>,
}

/// Input of the agent's `on_idle` update: what it does the next time it goes idle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OnIdleRequest {
    /// `sleep` or `keep-alive` (`terminate` cannot be set at runtime).
    pub on_idle: OnIdle,
    /// The developer's signed request, for `<workflow id>@<run id>` (this run only).
    pub auth: Option<crate::auth::Credential>,
}

/// Input of the agent's `kill` update.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KillRequest {
    /// The developer's signed request; it covers `<workflow id>@<run id>`, so it can kill this
    /// run only.
    pub auth: Option<crate::auth::Credential>,
}

impl AgentInput {
    /// Checks what a user typed: slug, command.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_slug(&self.slug)?;
        if self.command.is_empty() || self.command.iter().all(|w| w.trim().is_empty()) {
            return Err(ApiError::invalid_argument(
                "a command is required: murmur spawn <slug> -- <command...>",
            ));
        }
        if self.command.iter().any(|w| w.contains('\0')) {
            return Err(ApiError::invalid_argument(
                "the command contains a NUL byte",
            ));
        }
        Ok(())
    }

    /// The agent's workflow id.
    pub fn workflow_id(&self) -> String {
        agent_workflow_id(&self.tenant, &self.workspace, &self.developer, &self.slug)
    }
}

/// Checks an agent slug: a DNS label (`[a-z][a-z0-9-]{0,62}`).
pub fn validate_slug(slug: &str) -> Result<(), ApiError> {
    if is_dns_label(slug) {
        Ok(())
    } else {
        Err(ApiError::invalid_argument(format!(
            "invalid slug {slug:?}: must be a DNS label ([a-z][a-z0-9-]{{0,62}})"
        )))
    }
}

/// `agent/<tenant>/<workspace>/<developer>/<slug>`.
pub fn agent_workflow_id(tenant: &str, workspace: &str, developer: &str, slug: &str) -> String {
    format!("agent/{tenant}/{workspace}/{developer}/{slug}")
}

/// What `murmur status <slug>` shows: the agent workflow's `status` query.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's workflow id.
    pub workflow: String,
    /// Its slug.
    pub slug: String,
    /// Current phase.
    pub phase: Option<Phase>,
    /// Every phase it has been in, in order.
    pub reached: Vec<Phase>,
    /// The VM it holds or held.
    pub vm: Option<VmId>,
    /// The host of that VM: whose gateway serves `murmur logs`, `exec` and `shell`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The id its command runs (and its output is kept) under: the workflow's run id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Place in the queue for a VM while waiting at `max_vms`.
    pub queue_position: Option<u32>,
    /// The command.
    pub command: Vec<String>,
    /// What happens after the command exits.
    pub on_idle: OnIdle,
    /// The command's exit code, once it exited.
    pub exit_code: Option<i32>,
    /// The last lines of its output, once it exited.
    pub output_tail: Option<String>,
    /// Why it failed, when it failed for another reason than its exit code.
    pub error: Option<String>,
    /// True while its VM is asleep (`murmur status` shows `[stopped]` after the VM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub asleep: bool,
    /// While starting: what it is waiting for when that is not a VM (the pool does not
    /// answer, say), so a stuck start says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

impl AgentStatus {
    /// True when the agent is in `phase` now or went through it. A terminal phase counts only
    /// when it is the current one.
    pub fn has_reached(&self, phase: Phase) -> bool {
        if phase.is_terminal() {
            return self.phase == Some(phase);
        }
        self.reached.contains(&phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_in_every_spelling() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()).unwrap(), p);
            assert_eq!(Phase::parse(&p.short()).unwrap(), p);
        }
        assert_eq!(Phase::parse("task_complete").unwrap(), Phase::TaskComplete);
        assert_eq!(Phase::TaskComplete.short(), "task-complete");
        assert_eq!(Phase::parse("sleeping").unwrap(), Phase::Sleeping);
        assert!(Phase::parse("asleep").is_err());
    }

    #[test]
    fn on_idle_modes_parse_in_both_spellings_and_round_trip() {
        for mode in [OnIdle::Terminate, OnIdle::KeepAlive, OnIdle::Sleep] {
            assert_eq!(OnIdle::parse(mode.as_str()).unwrap(), mode);
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{}\"", mode.as_str()));
        }
        assert_eq!(OnIdle::parse("keep_alive").unwrap(), OnIdle::KeepAlive);
        let e = OnIdle::parse("hibernate").unwrap_err().to_string();
        assert!(e.starts_with("INVALID_ARGUMENT: unknown --on-idle"), "{e}");
    }

    #[test]
    fn bad_slugs_and_empty_commands_are_refused() {
        let mut input = AgentInput {
            tenant: "acme".into(),
            workspace: "web".into(),
            developer: "ana".into(),
            slug: "Fix_Auth".into(),
            command: vec!["true".into()],
            on_idle: OnIdle::Terminate,
            auth: None,
        };
        let e = input.validate().unwrap_err();
        assert!(e.to_string().starts_with("INVALID_ARGUMENT: invalid slug"));
        input.slug = "fix-auth".into();
        assert!(input.validate().is_ok());
        assert_eq!(input.workflow_id(), "agent/acme/web/ana/fix-auth");
        input.command = vec![" ".into()];
        assert!(input.validate().is_err());
    }
}
