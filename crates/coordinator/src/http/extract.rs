//! Request extractors that turn bad input into our JSON errors: malformed
//! JSON is 400, well-formed JSON with wrong or missing fields is 422, a body
//! over the limit is 413. The body's content type is not required to be JSON
//! (curl users forget the header); it is parsed as JSON regardless.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::node::SharedNode;

/// A JSON body. An empty body is treated as `{}` when `T: Default` is asked
/// for via [`OptionalJson`].
pub struct ApiJson<T>(pub T);

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::Validation { field: None, message: e.to_string() },
            _ => ApiError::InvalidJson(e.to_string()),
        }
    })
}

async fn body_bytes(req: Request, state: &SharedNode) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    match Bytes::from_request(req, state).await {
        Ok(b) if b.len() > limit => Err(ApiError::TooLarge(limit)),
        Ok(b) => Ok(b),
        Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::TooLarge(limit)),
        Err(rej) => Err(ApiError::BadRequest(rej.body_text())),
    }
}

impl<T: DeserializeOwned> FromRequest<SharedNode> for ApiJson<T> {
    type Rejection = axum::response::Response;

    async fn from_request(req: Request, state: &SharedNode) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await.map_err(IntoResponse::into_response)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(
                ApiError::InvalidJson("request body is empty; a JSON object is expected".into()).into_response()
            );
        }
        parse(&bytes).map(ApiJson).map_err(IntoResponse::into_response)
    }
}

/// A JSON body that may be absent (then `T::default()`).
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<SharedNode> for OptionalJson<T> {
    type Rejection = axum::response::Response;

    async fn from_request(req: Request, state: &SharedNode) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await.map_err(IntoResponse::into_response)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        parse(&bytes).map(OptionalJson).map_err(IntoResponse::into_response)
    }
}

/// Parse a path id; a malformed id is a 400 naming it.
pub fn parse_id(kind: &str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest(format!("'{raw}' is not a valid {kind} id (UUID)")))
}
