//! The client's error type: what a call can end with after failover.
//!
//! Invariant: an [`ClientError::Api`] is a definite answer from a coordinator
//! (the request reached the cluster and was judged); every other variant says
//! nothing about whether the request had an effect, except
//! [`ClientError::Unavailable`] for requests the client only retried while it
//! was safe to (see the crate docs).

use std::time::Duration;

/// Everything a [`crate::Client`] call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A coordinator answered with a non-success status and (usually) an
    /// `{"error":{...}}` body. Not retried further.
    #[error("HTTP {status} {code}: {message}")]
    Api {
        status: u16,
        /// Machine-readable code (`not_found`, `stale_token`, `worker_dead`,
        /// `validation_failed`, ...); `http_<status>` when the body had none.
        code: String,
        message: String,
        /// The field a validation error is about, when the server named one.
        field: Option<String>,
        /// The leader's API address, when the server knew it.
        leader: Option<String>,
    },

    /// Every attempt within the retry budget failed with a retryable error
    /// (connection refused, timeout, 503, ...).
    #[error("no coordinator answered after {attempts} attempts in {elapsed:?}; last error: {last_error}")]
    Unavailable { attempts: u32, elapsed: Duration, last_error: String },

    /// A request that is not safe to repeat (acquire) failed in a way that
    /// leaves its outcome unknown (timeout, connection reset after sending).
    #[error("request to {node} failed and its outcome is unknown: {message}")]
    Uncertain { node: String, message: String },

    /// A 2xx response whose body was not the expected JSON.
    #[error("cannot decode the response of {node}: {message}")]
    Decode { node: String, message: String },

    /// Bad client configuration (no coordinators, unparsable URL, ...).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// HTTP status of an [`ClientError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Error code of an [`ClientError::Api`] error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The fencing token was not the job's current lease (409 `stale_token`).
    pub fn is_stale_token(&self) -> bool {
        self.code() == Some("stale_token")
    }

    /// 404 (job or worker unknown).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// The cluster declared this worker dead (409 `worker_dead`): register
    /// again under the same id.
    pub fn is_worker_dead(&self) -> bool {
        self.code() == Some("worker_dead")
    }

    /// A 4xx answer: repeating the same request will not help.
    pub fn is_client_error(&self) -> bool {
        self.status().is_some_and(|s| (400..500).contains(&s))
    }
}
