//! The API's one error type and its mapping to status codes and the JSON
//! error body `{"error":{"code","message"}}`. 5xx causes are logged here and
//! their internals are not shown to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use jobsched_api::{ErrorBody, ErrorDetail};
use jobsched_core::Rejection;

/// Marker put on a response when the write reached a node that is no longer
/// leader; the forwarding layer retries it on the leader.
#[derive(Debug, Clone)]
pub struct NotLeaderMarker;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    InvalidJson(String),
    #[error("{message}")]
    Validation { field: Option<String>, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    StaleToken(String),
    #[error("{0}")]
    WrongStatus(String),
    #[error("worker was declared dead; register again")]
    WorkerDead,
    /// No leader is known (election in progress or no quorum).
    #[error("no leader is available; retry shortly")]
    NoLeader { leader: Option<String> },
    /// This node stopped being leader while handling the request.
    #[error("this node is not the leader")]
    NotLeader { leader: Option<String> },
    #[error("the write was not confirmed in time; its outcome is unknown")]
    Timeout,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        ApiError::Validation { field: Some(field.into()), message: message.into() }
    }

    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Validation { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::StaleToken(_) => (StatusCode::CONFLICT, "stale_token"),
            ApiError::WrongStatus(_) => (StatusCode::CONFLICT, "wrong_status"),
            ApiError::WorkerDead => (StatusCode::CONFLICT, "worker_dead"),
            ApiError::NoLeader { .. } | ApiError::NotLeader { .. } => (StatusCode::SERVICE_UNAVAILABLE, "no_leader"),
            ApiError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> Self {
        match r {
            Rejection::JobNotFound => ApiError::NotFound("no such job".into()),
            Rejection::WorkerNotFound => ApiError::NotFound("no such worker; register first".into()),
            Rejection::WorkerDead => ApiError::WorkerDead,
            Rejection::StaleToken { current } => ApiError::StaleToken(match current {
                Some(t) => format!("fencing token is stale: the job's current lease has token {t}"),
                None => "fencing token is stale: the job holds no lease with that token".into(),
            }),
            Rejection::WrongStatus { status } => {
                ApiError::WrongStatus(format!("job is {} and cannot do that", status.as_str()))
            }
            Rejection::Invalid { field, message } => ApiError::Validation { field: Some(field), message },
        }
    }
}

impl ApiError {
    /// The JSON error detail, as used in a response body or for one item of
    /// a batch answer.
    pub fn detail(&self) -> ErrorDetail {
        let (_, code) = self.parts();
        let message = match self {
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let (field, leader) = match self {
            ApiError::Validation { field, .. } => (field.clone(), None),
            ApiError::NoLeader { leader } | ApiError::NotLeader { leader } => (None, leader.clone()),
            _ => (None, None),
        };
        ErrorDetail { code: code.into(), message, field, leader }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.parts();
        let body = ErrorBody { error: self.detail() };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::NotLeader { .. }) {
            resp.extensions_mut().insert(NotLeaderMarker);
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
