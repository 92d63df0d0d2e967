//! The HTTP server: public REST API, Raft RPC endpoints, OpenAPI explorer,
//! and the forwarding layer that sends requests from followers to the leader.
//!
//! Forwarding rule: every `/api/...` request except `GET /api/cluster`,
//! `/api/debug/*` and reads with `stale=true` is served by the leader. A
//! follower relays it (method, path, query, body) and returns the leader's
//! answer unchanged, so a client sees the same response from every node. A
//! hop budget (`x-jobsched-hops`) stops relay loops during leader changes.

pub mod cluster;
pub mod error;
pub mod extract;
pub mod forward;
pub mod jobs;
pub mod openapi;
pub mod raft_rpc;
pub mod relay_batch;
pub mod workers;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{get, post};
use axum::Router;

use crate::node::SharedNode;

pub fn router(node: SharedNode) -> Router {
    let api = Router::new()
        .route("/api/jobs", post(jobs::create_job).get(jobs::list_jobs))
        .route("/api/jobs/batch", post(jobs::create_jobs))
        .route("/api/jobs/acquire", post(jobs::acquire))
        .route("/api/jobs/complete", post(jobs::complete_many))
        .route("/api/jobs/{id}", get(jobs::get_job))
        .route("/api/jobs/{id}/complete", post(jobs::complete))
        .route("/api/jobs/{id}/release", post(jobs::release))
        .route("/api/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/workers/register", post(workers::register))
        .route("/api/workers", get(workers::list))
        .route("/api/workers/{id}", axum::routing::delete(workers::deregister).get(workers::get_worker))
        .route("/api/workers/{id}/heartbeat", post(workers::heartbeat))
        .route("/api/cluster", get(cluster::cluster))
        .route("/api/debug/digest", get(cluster::digest))
        .layer(axum::middleware::from_fn_with_state(node.clone(), forward::forward_to_leader))
        // Bodies over the limit get 413 from our extractors.
        .layer(DefaultBodyLimit::max(node.config.max_body_bytes));
    // Batched relays from followers run through the very same API router,
    // arriving on peer streams (as application frames) or as POST bodies.
    let api_service: Router = api.clone().with_state(node.clone());
    let relay_api = api_service.clone();
    let relays: jobsched_raft::peer_stream::AppRpc =
        Arc::new(move |body| Box::pin(relay_batch::answer_batch(relay_api.clone(), body)));
    // Peers are trusted and appends/snapshot chunks can be large: no limit.
    let raft = Router::new()
        .route(
            jobsched_raft::peer_stream::PATH_STREAM,
            get(move |node: State<SharedNode>, req: axum::extract::Request| {
                raft_rpc::stream(node, relays.clone(), req)
            }),
        )
        .route("/raft/append", post(raft_rpc::append))
        .route("/raft/vote", post(raft_rpc::vote))
        .route("/raft/snapshot", post(raft_rpc::snapshot))
        .route(jobsched_raft::PATH_PREVOTE, post(raft_rpc::prevote))
        .route(
            relay_batch::PATH_RELAY,
            post(move |body: axum::body::Bytes| relay_batch::serve(api_service.clone(), body)),
        )
        .layer(DefaultBodyLimit::disable());

    Router::new()
        .merge(api)
        .route("/health", get(cluster::health))
        .route("/ready", get(cluster::ready))
        .merge(raft)
        .merge(openapi::routes())
        .fallback(|| async { error::ApiError::NotFound("no such endpoint".into()) })
        .with_state(node)
}
