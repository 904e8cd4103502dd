//! The error contract shared by the worker and the CLI: `CODE: reason`.

use serde::{Deserialize, Serialize};

/// gRPC-style status codes murmur reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    /// Malformed or out-of-range input.
    InvalidArgument,
    /// The named thing does not exist.
    NotFound,
    /// The system is not in a state that allows the operation.
    FailedPrecondition,
    /// Missing or expired identity.
    Unauthenticated,
    /// Identity lacks the permission.
    PermissionDenied,
    /// Something broke on our side.
    Internal,
    /// The server could not be reached or did not answer.
    Unavailable,
}

impl Code {
    /// The upper-case name printed before the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::NotFound => "NOT_FOUND",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }

    /// Parses the upper-case name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::InvalidArgument,
            Self::NotFound,
            Self::FailedPrecondition,
            Self::Unauthenticated,
            Self::PermissionDenied,
            Self::Internal,
            Self::Unavailable,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// An error with a status code and a one-line reason, displayed as `CODE: reason`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    /// The status code.
    pub code: Code,
    /// One line saying what is wrong.
    pub message: String,
}

impl ApiError {
    /// Builds an error from a code and a reason.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_ARGUMENT: <message>`.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `NOT_FOUND: <message>`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// `FAILED_PRECONDITION: <message>`.
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    /// Finds a `CODE: reason` inside any text (for example a Temporal failure message that
    /// wraps the workflow's error), so the CLI can print the exact contract line.
    pub fn find_in(text: &str) -> Option<Self> {
        let mut best: Option<(usize, Self)> = None;
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::Unauthenticated,
            Code::PermissionDenied,
        ] {
            let needle = format!("{}: ", code.as_str());
            if let Some(pos) = text.find(&needle) {
                let rest = &text[pos + needle.len()..];
                let end = rest.find(['"', '\n']).unwrap_or(rest.len());
                let message = rest[..end].trim_end().to_string();
                if best.as_ref().is_none_or(|(p, _)| pos < *p) {
                    best = Some((pos, Self::new(code, message)));
                }
            }
        }
        best.map(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_code_then_reason() {
        let e = ApiError::invalid_argument("max_vms must be positive");
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: max_vms must be positive");
    }

    #[test]
    fn finds_contract_line_inside_wrapped_failure() {
        let wrapped = r#"Update failed: Failure { message: "INVALID_ARGUMENT: max_vms must be positive", source: "" }"#;
        let e = ApiError::find_in(wrapped).unwrap();
        assert_eq!(e, ApiError::invalid_argument("max_vms must be positive"));
        assert!(ApiError::find_in("connection refused").is_none());
    }
}
