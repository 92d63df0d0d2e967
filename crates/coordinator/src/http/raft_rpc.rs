//! Node-to-node Raft RPC endpoints. Bodies are versioned bincode; decoding,
//! dispatch and encoding live in the raft crate. `GET /raft/stream` upgrades
//! the connection to a peer stream (`jobsched_raft::peer_stream`), which is
//! what peers use; the per-RPC POST endpoints are its fallback.

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

/// `GET /raft/stream`: hand the connection over to the raft crate's peer
/// stream server (101), or 426 without the right `Upgrade` header. `relays`
/// answers the followers' relay batches sent on the stream.
pub async fn stream(
    State(node): State<SharedNode>,
    relays: jobsched_raft::peer_stream::AppRpc,
    mut req: axum::extract::Request,
) -> Response {
    jobsched_raft::peer_stream::accept_upgrade(&node.raft, &node.stopping, Some(relays), &mut req)
        .map(|()| axum::body::Body::empty())
        .into_response()
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
