//! Node-to-node Raft RPC endpoints. Bodies are versioned bincode; decoding,
//! dispatch and encoding live in the raft crate.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::node::SharedNode;

const BINCODE: [(header::HeaderName, &str); 1] = [(header::CONTENT_TYPE, "application/octet-stream")];

/// A body we cannot decode is the peer's fault (e.g. another wire version).
fn reply(result: Result<Vec<u8>, jobsched_raft::WireError>) -> Response {
    match result {
        Ok(bytes) => (BINCODE, bytes).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

pub async fn append(State(node): State<SharedNode>, body: Bytes) -> Response {
    reply(jobsched_raft::handle_append(&node.raft, &body).await)
}

pub async fn vote(State(node): State<SharedNode>, body: Bytes) -> Response {
    reply(jobsched_raft::handle_vote(&node.raft, &body).await)
}

pub async fn snapshot(State(node): State<SharedNode>, body: Bytes) -> Response {
    reply(jobsched_raft::handle_snapshot(&node.raft, &body).await)
}

pub async fn prevote(State(node): State<SharedNode>, body: Bytes) -> Response {
    reply(node.elector.handle_prevote(&body).await)
}
