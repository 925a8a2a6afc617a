//! The gateway's typed errors.
//!
//! Every failure a request can meet is one [`Error`] variant carrying what a person needs to
//! act on it: a FHIR issue code, a diagnostic and the offending element (`expression`). The
//! HTTP edge (`http::outcome`) maps them to status codes and OperationOutcome once; nothing
//! else formats errors for clients. Diagnostics must never quote patient data.

use thiserror::Error;

use crate::store::StoreError;

/// One problem found in a request, as it will appear in `OperationOutcome.issue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// FHIR `IssueType` code: `structure`, `required`, `value`, `invariant`, `business-rule`...
    pub code: &'static str,
    pub diagnostics: String,
    /// FHIRPath (or JSON path for non-FHIR input) of the offending element.
    pub expression: Option<String>,
}

impl Issue {
    pub fn new(
        code: &'static str,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) -> Self {
        Issue {
            code,
            diagnostics: diagnostics.into(),
            expression: Some(expression.into()),
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    /// Malformed or structurally invalid input (400).
    #[error("invalid request: {}", first(.0))]
    Invalid(Vec<Issue>),
    /// Well-formed input that breaks a rule: profile, state machine, routing, consent (422).
    #[error("rule violated: {}", first(.0))]
    Unprocessable(Vec<Issue>),
    /// No such resource, or none the caller may see (404).
    #[error("{0} not found")]
    NotFound(String),
    /// No route at this path (404).
    #[error("no such endpoint")]
    NoEndpoint,
    /// No or unknown credentials (401).
    #[error("authentication required")]
    Unauthenticated,
    /// Authenticated, but this role may not use this interaction at all (403, no details).
    #[error("operation not permitted for this client")]
    Forbidden,
    /// Idempotency key reused with different content (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// `If-Match` names a version that is not the current one (412).
    #[error("version conflict: {0}")]
    PreconditionFailed(String),
    /// A required `If-Match` is missing (428).
    #[error("precondition required: {0}")]
    PreconditionRequired(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("unsupported content type: {0}")]
    UnsupportedMediaType(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The client asked for a format the server does not produce (406).
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    /// The client sent too many requests; retry after this many seconds (429).
    #[error("rate limited")]
    TooManyRequests(u64),
    /// The server is at its concurrency limit (503).
    #[error("overloaded")]
    Overloaded,
    /// The request was not handled within the request timeout (408).
    #[error("request timed out")]
    Timeout,
    /// Free space is below the floor: no new referrals until it returns (507).
    #[error("free space below the floor")]
    InsufficientStorage,
    /// The store failed (503): never caused by client input. A write's outcome is unknown.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug: a resource in the store that cannot be read back, and the like (500).
    #[error("internal error: {0}")]
    Internal(String),
}

fn first(issues: &[Issue]) -> String {
    issues
        .first()
        .map(|i| match &i.expression {
            Some(e) => format!("{e}: {}", i.diagnostics),
            None => i.diagnostics.clone(),
        })
        .unwrap_or_default()
}

impl Error {
    pub fn invalid(
        code: &'static str,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) -> Self {
        Error::Invalid(vec![Issue::new(code, expression, diagnostics)])
    }

    pub fn rule(expression: impl Into<String>, diagnostics: impl Into<String>) -> Self {
        Error::Unprocessable(vec![Issue::new("business-rule", expression, diagnostics)])
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound(what.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
